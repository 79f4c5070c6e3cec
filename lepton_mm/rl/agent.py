"""An actor-critic over several observation modalities: lepton_mm encoders, a fusion layer
and a head whose outputs are the action logits and the state value.

The agent is a ``lepton_mm.models.MultimodalClassifier`` like any classifier, so the
library's presence masks carry over: ``batch["present"] = {modality: bool [batch]}``
marks a modality absent per example, and an absent one cannot move the output. Images
(``[height, width, channels]`` observations) go through ``PixelEncoder``, vectors
(``[features]``) through ``StateEncoder``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx

from lepton_mm._validation import check_modalities
from lepton_mm.encoders import ImageCNN
from lepton_mm.fusion import FUSIONS, build
from lepton_mm.models import MultimodalClassifier
from lepton_mm.rl.envs import EnvSpec
from lepton_mm.types import EncoderOutput

__all__ = ["PixelEncoder", "StateEncoder", "make_agent"]


class PixelEncoder(nnx.Module):
    """``ImageCNN`` (no pooling, no batch norm) whose feature map is flattened through a
    linear layer and a ReLU into one token, as in DQN's torso: unlike a mean over the
    map's cells it keeps where things are.

    Shapes: images float ``[batch, height, width, channels]`` → ``EncoderOutput`` with
    tokens ``[batch, 1, dim]``, an all-True mask ``[batch, 1]`` and pooled ``[batch, dim]``.

    Args:
      height: the image height.
      width: the image width.
      channels: the image channels.
      dim: the output size.
      rngs: parameter initialisation.
      widths: the convolutions' widths (3 x 3, "same" padding).
    """

    def __init__(self, height: int, width: int, channels: int, *, dim: int,
                 rngs: nnx.Rngs, widths: Sequence[int] = (16, 16)):
        self.dim = dim
        self.cnn = ImageCNN(channels, dim=widths[-1], widths=widths, pool=1,
                            batch_norm=False, rngs=rngs)
        h, w = self.cnn.output_size(height, width)
        self.proj = nnx.Linear(h * w * widths[-1], dim, rngs=rngs)

    def __call__(self, images: jax.Array) -> EncoderOutput:
        """Encodes a batch of images.

        Args:
          images: float ``[batch, height, width, channels]``.

        Returns:
          One token per image: tokens ``[batch, 1, dim]``.
        """
        tokens = self.cnn(images).tokens
        z = jax.nn.relu(self.proj(tokens.reshape(tokens.shape[0], -1)))
        return EncoderOutput.from_tokens(z[:, None, :])


class StateEncoder(nnx.Module):
    """A two-layer MLP (ReLU after both layers) for a state vector.

    Shapes: float ``[batch, features]`` → ``EncoderOutput`` with tokens ``[batch, 1,
    dim]``, an all-True mask ``[batch, 1]`` and pooled ``[batch, dim]``.

    Args:
      features: the vector's size.
      dim: the output size.
      rngs: parameter initialisation.
      hidden: the hidden layer's size.
    """

    def __init__(self, features: int, *, dim: int, rngs: nnx.Rngs, hidden: int = 64):
        self.dim = dim
        self.hidden = nnx.Linear(features, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> EncoderOutput:
        """Encodes a batch of state vectors.

        Args:
          x: float ``[batch, features]``.

        Returns:
          One token per vector: tokens ``[batch, 1, dim]``.
        """
        z = jax.nn.relu(self.out(jax.nn.relu(self.hidden(x))))
        return EncoderOutput.from_tokens(z[:, None, :])


def _encoder(modality: str, shape: tuple[int, ...], *, dim: int, rngs: nnx.Rngs,
             cnn_widths: Sequence[int]) -> nnx.Module:
    """``PixelEncoder`` for an image observation, ``StateEncoder`` for a vector."""
    if len(shape) == 3:
        return PixelEncoder(*shape, dim=dim, rngs=rngs, widths=cnn_widths)
    if len(shape) == 1:
        return StateEncoder(shape[0], dim=dim, rngs=rngs)
    raise ValueError(f"modalities: {modality!r} observations have shape {shape}; expected "
                     "an image [height, width, channels] or a vector [features].")


def make_agent(spec: EnvSpec, fusion: str | None, modalities: Sequence[str], *, dim: int,
               hidden: int, rngs: nnx.Rngs,
               cnn_widths: Sequence[int] = (16, 16)) -> MultimodalClassifier:
    """The actor-critic: encoders → fusion → ReLU → Linear(hidden, num_actions + 1).

    With two or more modalities the fusion layer maps to ``hidden``; with one,
    ``fusion=None`` and a Linear(dim, hidden) stands in for it. The encoders are built
    in sorted modality order, then the head, then the fusion layer (the order in which
    they draw from ``rngs``).

    Args:
      spec: the environment (``make_env``).
      fusion: a name in ``lepton_mm.fusion.FUSIONS``, or None for one modality.
      modalities: a subset of ``spec.modalities`` (a str is one modality).
      dim: each encoder's output size.
      hidden: the fused feature size.
      rngs: parameter initialisation.
      cnn_widths: the pixel encoder's convolution widths.

    Returns:
      The model: ``model({"pixels": [b, 10, 5, 1], "state": [b, 3], "present": {...}})``
      → float ``[b, num_actions + 1]`` (Catch's modalities; the action logits, then the
      value).

    Raises:
      ValueError: an unknown fusion (naming ``fusion``) or modality (naming
        ``modalities``), no modality, or a fusion for one modality / none for two.
    """
    modalities = sorted(dict.fromkeys(check_modalities("modalities", modalities,
                                                       spec.modalities)))
    if not modalities:
        raise ValueError(f"modalities: expected at least one of {list(spec.modalities)}.")
    if fusion is not None and fusion not in FUSIONS:
        raise ValueError(f"fusion: unknown fusion {fusion!r}. Known: {sorted(FUSIONS)}.")
    if (fusion is None) != (len(modalities) == 1):
        raise ValueError(f"fusion: {fusion!r} with modalities {modalities}; give a "
                         "fusion for two modalities and None for one.")
    observation = jax.eval_shape(  # shapes only: nothing is drawn from the key
        lambda key: spec.observe(spec.env.reset(key, spec.params)[1]), jax.random.key(0))
    encoders = {m: _encoder(m, observation[m].shape, dim=dim, rngs=rngs,
                            cnn_widths=cnn_widths) for m in modalities}
    out = nnx.Linear(hidden, spec.num_actions + 1, rngs=rngs)
    if fusion is None:
        head = nnx.Sequential(nnx.Linear(dim, hidden, rngs=rngs), jax.nn.relu, out)
        return MultimodalClassifier(encoders, None, head)
    layer = build(fusion, {m: dim for m in encoders}, hidden, rngs=rngs)
    return MultimodalClassifier(encoders, layer, nnx.Sequential(jax.nn.relu, out))
