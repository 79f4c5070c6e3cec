"""Late (decision-level) fusion: one head per modality, then a weighted average.

References:
  Snoek, Worring and Smeulders, "Early versus Late Fusion in Semantic Video Analysis",
  ACM Multimedia 2005.
  Liang et al., "MultiBench: Multiscale Benchmarks for Multimodal Representation
  Learning", NeurIPS 2021 (its late-fusion baselines).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lepton_mm.fusion._common import (
    MLP,
    check_choice,
    check_hidden,
    check_rate,
    masked_softmax,
    pooled_or_zeros,
)
from lepton_mm.fusion.base import FusionLayer, register
from lepton_mm.types import EncoderOutput

Array = jax.Array

_COMBINE = ("mean", "learned")


@register("late")
class LateFusion(FusionLayer):
    """Each modality predicts ``out_dim`` logits on its own; the predictions are averaged.

    ``y_m = head_m(z_m)`` (``z_m`` the pooled features, ``head_m`` a linear layer or an
    MLP), then ``y = Σ_m w_m y_m`` over the present modalities, where

    * ``combine="mean"``: ``w_m = 1 / (number of present modalities)``;
    * ``combine="learned"``: ``w = softmax(a)`` over the present modalities, ``a`` a
      learned ``[M]`` vector initialised to zeros (so it starts as the mean).

    Missing modalities: absent ones are excluded and the weights renormalised over the
    present ones, so with one modality left the output is exactly that modality's
    head; if all are absent the output is zeros. An absent modality's features are
    selected away (replaced by zeros) before its head, so they never matter.

    Shapes: inputs ``{m: EncoderOutput}`` with pooled ``[batch, dim_m]``; output float32
    ``[batch, out_dim]``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from lepton_mm.types import EncoderOutput
      >>> layer = LateFusion({"a": 8, "b": 6}, 4, combine="learned", rngs=nnx.Rngs(0))
      >>> xs = {m: EncoderOutput.from_tokens(jnp.ones((2, 3, d))) for m, d in
      ...       [("a", 8), ("b", 6)]}
      >>> layer(xs).shape
      (2, 4)

    References:
      Snoek, Worring and Smeulders, "Early versus Late Fusion in Semantic Video
      Analysis", ACM Multimedia 2005.
    """

    def __init__(
        self,
        dims: Mapping[str, int],
        out_dim: int,
        *,
        rngs: nnx.Rngs,
        hidden: Sequence[int] = (),
        dropout: float = 0.0,
        combine: str = "mean",
    ):
        """Builds the layer.

        Args:
          dims: modality name → pooled feature size.
          out_dim: output size (the number of logits each head predicts).
          rngs: parameter initialisation and the dropout stream.
          hidden: hidden sizes of every per-modality head; ``()`` (default) is linear.
          dropout: dropout rate before every linear layer of the heads (training only).
          combine: ``"mean"`` (default) or ``"learned"`` (softmax-normalised weights).
        """
        super().__init__(dims, out_dim)
        self.hidden = check_hidden("hidden", hidden)
        self.dropout_rate = check_rate("dropout", dropout)
        self.combine = check_choice("combine", combine, _COMBINE)
        self.heads = nnx.List([
            MLP(self.dims[m], self.hidden, self.out_dim, dropout=self.dropout_rate,
                rngs=rngs)
            for m in self.modalities
        ])
        self.logits = (nnx.Param(jnp.zeros((len(self.modalities),), jnp.float32))
                       if self.combine == "learned" else None)

    def weights(self, inputs: Mapping[str, EncoderOutput]) -> Array:
        """float32 ``[batch, M]``: each modality's weight (0 where absent).

        Rows sum to 1 over the present modalities, or are all zeros if none is present.
        """
        present = self.presence(self.check_inputs(inputs))
        if self.logits is None:
            count = jnp.sum(present, axis=1, keepdims=True, dtype=jnp.float32)
            return jnp.where(present, 1.0 / jnp.maximum(count, 1.0), 0.0)
        logits = jnp.broadcast_to(self.logits[...], present.shape)
        return masked_softmax(logits, present, axis=1)

    def head_outputs(self, inputs: Mapping[str, EncoderOutput], *,
                     rngs: nnx.Rngs | None = None) -> Array:
        """float32 ``[batch, M, out_dim]``: every head's prediction (absent → head(0))."""
        xs = self.check_inputs(inputs)
        return jnp.stack(
            [head(pooled_or_zeros(x), rngs=rngs) for head, x in zip(self.heads, xs,
                                                                     strict=True)],
            axis=1)

    def __call__(self, inputs: Mapping[str, EncoderOutput], *,
                 rngs: nnx.Rngs | None = None) -> Array:
        """Fuses ``inputs`` into float32 ``[batch, out_dim]``.

        Args:
          inputs: modality name → ``EncoderOutput`` (only ``pooled`` and ``mask`` read).
          rngs: dropout randomness for this call; the construction stream when omitted.

        Returns:
          float32 ``[batch, out_dim]``, the fused representation.
        """
        w = self.weights(inputs)
        ys = self.head_outputs(inputs, rngs=rngs)
        return jnp.sum(w[:, :, None] * ys, axis=1)
