"""``TwoTower``: two encoders + projections → L2-normalised embeddings for alignment.

Returns the embeddings plus a learnable float32 logit scale and bias, as in CLIP and
SigLIP; the loss lives in ``lepton_mm.models.tasks.Contrastive``.

References:
  Radford et al., "Learning Transferable Visual Models From Natural Language
  Supervision", ICML 2021 (learned log temperature, clamped at 100).
  Zhai et al., "Sigmoid Loss for Language Image Pre-Training", ICCV 2023 (learned bias,
  initialised at scale 10, bias -10).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lepton_mm.models.classifier import check_batch, encode_modalities

Array = jax.Array


class TwoTowerOutput(NamedTuple):
    """What ``TwoTower`` returns.

    Attributes:
      a: float32 ``[batch, dim]``, unit-norm embeddings of the first modality.
      b: float32 ``[batch, dim]``, unit-norm embeddings of the second modality.
      scale: float32 scalar ``> 0``: multiply cosine similarities by it.
      bias: float32 scalar added to the scaled similarities (SigLIP; 0 for CLIP use).
    """

    a: Array
    b: Array
    scale: Array
    bias: Array

    def logits(self) -> Array:
        """float32 ``[batch, batch]``: ``scale * a @ b.T + bias``."""
        return self.scale * (self.a @ self.b.T) + self.bias


def l2_normalize(x: Array, *, eps: float = 1e-6) -> Array:
    """float32 ``x / max(||x||, eps)`` along the last axis.

    Zero rows stay zero with a finite (zero) gradient: the norm's square root is never
    differentiated at 0.

    Args:
      x: float ``[..., dim]``.
      eps: the smallest norm divided by.

    Returns:
      float32 ``[..., dim]`` with unit-norm rows (zero rows stay zero).
    """
    x = x.astype(jnp.float32)
    squared = jnp.sum(x * x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(squared, eps * eps))


class TwoTower(nnx.Module):
    """Dual encoder for contrastive alignment of two modalities.

    ``a = normalize(projection_a(encoder_a(batch[modalities[0]]).pooled))`` and likewise
    for ``b``. The similarity scale is parametrised by its log (``logit_scale``, float32)
    and clamped to ``[min_scale, max_scale]`` when read; the bias (``logit_bias``) is a
    free float32 scalar. Both names match the optimiser's default ``no_decay`` patterns.

    Args:
      encoder_a: encoder of the first modality (returns ``EncoderOutput``).
      encoder_b: encoder of the second modality.
      projection_a: module mapping ``[batch, dim_a]`` → ``[batch, dim]``.
      projection_b: module mapping ``[batch, dim_b]`` → ``[batch, dim]``.
      modalities: the batch keys of the two modalities, in (a, b) order.
      init_scale: initial scale (SigLIP: 10; CLIP: 1 / 0.07).
      init_bias: initial bias (SigLIP: -10; use 0 for a softmax/CLIP loss).
      min_scale: lower clamp of the scale.
      max_scale: upper clamp of the scale (CLIP: 100).

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from lepton_mm.encoders import ImageCNN
      >>> rngs = nnx.Rngs(0)
      >>> model = TwoTower(ImageCNN(1, dim=8, widths=(4,), rngs=rngs),
      ...                  ImageCNN(1, dim=8, widths=(4,), rngs=rngs),
      ...                  nnx.Linear(8, 4, rngs=rngs), nnx.Linear(8, 4, rngs=rngs),
      ...                  modalities=("left", "right"))
      >>> out = model({"left": jnp.ones((3, 8, 8, 1)), "right": jnp.ones((3, 8, 8, 1))})
      >>> out.a.shape, out.logits().shape, float(out.scale)
      ((3, 4), (3, 3), 10.0)
    """

    def __init__(self, encoder_a: nnx.Module, encoder_b: nnx.Module,
                 projection_a: nnx.Module, projection_b: nnx.Module, *,
                 modalities: tuple[str, str] = ("a", "b"), init_scale: float = 10.0,
                 init_bias: float = -10.0, min_scale: float = 1e-2,
                 max_scale: float = 100.0):
        if (not isinstance(modalities, (tuple, list)) or len(modalities) != 2
                or not all(isinstance(m, str) and m for m in modalities)
                or modalities[0] == modalities[1]):
            raise ValueError(f"modalities: expected two distinct names, got {modalities!r}.")
        if not 0 < min_scale <= init_scale <= max_scale:
            raise ValueError(
                f"init_scale: expected 0 < min_scale <= init_scale <= max_scale, got "
                f"min_scale={min_scale}, init_scale={init_scale}, max_scale={max_scale}.")
        if not math.isfinite(init_bias):
            raise ValueError(f"init_bias: expected a finite number, got {init_bias!r}.")
        self.modalities = (str(modalities[0]), str(modalities[1]))
        self.encoder_a = encoder_a
        self.encoder_b = encoder_b
        self.projection_a = projection_a
        self.projection_b = projection_b
        self.log_min_scale = math.log(min_scale)
        self.log_max_scale = math.log(max_scale)
        self.logit_scale = nnx.Param(jnp.asarray(math.log(init_scale), jnp.float32))
        self.logit_bias = nnx.Param(jnp.asarray(init_bias, jnp.float32))

    @property
    def scale(self) -> Array:
        """float32 scalar: ``exp(clip(logit_scale, log(min_scale), log(max_scale)))``."""
        log_scale = jnp.clip(self.logit_scale[...].astype(jnp.float32),
                             self.log_min_scale, self.log_max_scale)
        return jnp.exp(log_scale)

    def embed_a(self, inputs: Any, present: Array | None = None) -> Array:
        """Unit-norm embeddings float32 ``[batch, dim]`` of the first modality's inputs."""
        return self._embed(self.encoder_a, self.projection_a, self.modalities[0], inputs,
                           present)

    def embed_b(self, inputs: Any, present: Array | None = None) -> Array:
        """Unit-norm embeddings float32 ``[batch, dim]`` of the second modality's inputs."""
        return self._embed(self.encoder_b, self.projection_b, self.modalities[1], inputs,
                           present)

    def _embed(self, encoder, projection, name, inputs, present) -> Array:
        batch = {name: inputs}
        if present is not None:
            batch["present"] = {name: present}
        out = encode_modalities({name: encoder}, batch, (name,))[name]
        return l2_normalize(projection(out.pooled))

    def __call__(self, batch: Mapping[str, Any]) -> TwoTowerOutput:
        """Embeds both modalities of ``batch`` (see ``lepton_mm.models`` for the format).

        Returns:
          ``TwoTowerOutput(a, b, scale, bias)``.
        """
        check_batch(batch, tuple(sorted(self.modalities)), who="TwoTower")
        present = batch.get("present") or {}
        ma, mb = self.modalities
        return TwoTowerOutput(
            a=self.embed_a(batch[ma], present.get(ma)),
            b=self.embed_b(batch[mb], present.get(mb)),
            scale=self.scale,
            bias=self.logit_bias[...].astype(jnp.float32),
        )
