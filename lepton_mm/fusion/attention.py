"""Attention fusion: a softmax-weighted sum of projected modality features.

References:
  TorchMultimodal (Meta), ``torchmultimodal/modules/fusions/attention_fusion.py``,
  ``AttentionFusionModule``.
  Related: Hori et al., "Attention-Based Multimodal Fusion for Video Description",
  ICCV 2017 (modality-level attention weights).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from lepton_mm._validation import check_positive_int
from lepton_mm.fusion._common import masked_softmax, pooled_or_zeros
from lepton_mm.fusion.base import FusionLayer, register
from lepton_mm.types import EncoderOutput

Array = jax.Array


@register("attention")
class AttentionFusion(FusionLayer):
    """Projects each modality to a common size and mixes them with learned attention.

    As TorchMultimodal's ``AttentionFusionModule``: attention weights
    ``α = softmax(W_a [z_1; ...; z_M] + c_a)`` over the ``M`` modalities (one linear
    layer reads the concatenated pooled features and scores every modality), per-modality
    projections ``p_m = P_m z_m + e_m`` of size ``projection_dim``, and
    ``h = Σ_m α_m p_m``. When ``projection_dim != out_dim`` a final linear layer maps
    ``h`` to ``out_dim``; by default ``projection_dim = out_dim`` and ``h`` is the output
    (TorchMultimodal's module with ``encoding_projection_dim = out_dim``).

    Missing modalities: an absent modality's features enter the scoring layer as zeros
    and its score is masked out of the softmax, so the weights sum to 1 over the present
    modalities (``attention_weights``). With one modality present the output is its
    projection ``p_m``; with none present, zeros (then the output projection's bias, if
    any).

    Shapes: inputs ``{m: EncoderOutput}`` with pooled ``[batch, dim_m]``; output float32
    ``[batch, out_dim]``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from lepton_mm.types import EncoderOutput
      >>> layer = AttentionFusion({"a": 8, "b": 6, "c": 5}, 4, rngs=nnx.Rngs(0))
      >>> xs = {m: EncoderOutput.from_tokens(jnp.ones((2, 3, d))) for m, d in
      ...       [("a", 8), ("b", 6), ("c", 5)]}
      >>> layer(xs).shape
      (2, 4)
      >>> bool(jnp.allclose(layer.attention_weights(xs).sum(axis=1), 1.0))
      True

    References:
      TorchMultimodal (Meta), ``AttentionFusionModule``
      (``torchmultimodal/modules/fusions/attention_fusion.py``); modality-level
      attention as in Hori et al., "Attention-Based Multimodal Fusion for Video
      Description", ICCV 2017.
    """

    def __init__(
        self,
        dims: Mapping[str, int],
        out_dim: int,
        *,
        rngs: nnx.Rngs,
        projection_dim: int | None = None,
    ):
        """Builds the layer.

        Args:
          dims: modality name → pooled feature size.
          out_dim: output size.
          rngs: parameter initialisation.
          projection_dim: the common size modalities are projected to; defaults to
            ``out_dim`` (no output projection).
        """
        super().__init__(dims, out_dim)
        self.projection_dim = (self.out_dim if projection_dim is None
                               else check_positive_int("projection_dim", projection_dim))
        self.attention = nnx.Linear(sum(self.dims.values()), len(self.modalities),
                                    rngs=rngs)
        self.projections = nnx.List([
            nnx.Linear(self.dims[m], self.projection_dim, rngs=rngs)
            for m in self.modalities
        ])
        self.out_proj = (nnx.Linear(self.projection_dim, self.out_dim, rngs=rngs)
                         if self.projection_dim != self.out_dim else None)

    def attention_weights(self, inputs: Mapping[str, EncoderOutput]) -> Array:
        """float32 ``[batch, M]``: the weights, 0 for absent modalities.

        Rows sum to 1 over the present modalities, or are all zeros when none is present.
        """
        xs = self.check_inputs(inputs)
        zs = jnp.concatenate([pooled_or_zeros(x) for x in xs], axis=-1)
        return masked_softmax(self.attention(zs), self.presence(xs), axis=1)

    def __call__(self, inputs: Mapping[str, EncoderOutput]) -> Array:
        """Fuses ``inputs`` into float32 ``[batch, out_dim]``.

        Args:
          inputs: modality name → ``EncoderOutput`` (only ``pooled`` and ``mask`` read).

        Returns:
          float32 ``[batch, out_dim]``, the fused representation.
        """
        xs = self.check_inputs(inputs)
        alpha = self.attention_weights(inputs)
        projected = jnp.stack([proj(pooled_or_zeros(x))
                               for proj, x in zip(self.projections, xs, strict=True)],
                              axis=1)
        h = jnp.sum(alpha[:, :, None] * projected, axis=1)
        return h if self.out_proj is None else self.out_proj(h)
