"""Concatenation fusion: concatenate pooled features, then an MLP.

References:
  Liang et al., "MultiBench: Multiscale Benchmarks for Multimodal Representation
  Learning", NeurIPS 2021 (``fusions/common_fusions.py``: ``Concat``,
  ``ConcatWithLinear``); TorchMultimodal's ``ConcatFusionModule``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lepton_mm.fusion._common import MLP, check_hidden, check_rate, pooled_or_zeros
from lepton_mm.fusion.base import FusionLayer, register
from lepton_mm.types import EncoderOutput

Array = jax.Array


@register("concat")
class ConcatFusion(FusionLayer):
    """Concatenates the modalities' pooled features and maps them to ``out_dim``.

    ``h = MLP([z_1; ...; z_M])`` (optionally ``[z_1; ...; z_M; p]``), with the
    modalities in sorted name order. With the default ``hidden=()`` the MLP is one
    linear layer: MultiBench's ``ConcatWithLinear``. With hidden sizes it is
    ``Linear → ReLU`` per hidden layer, then a final ``Linear``; dropout comes before
    every linear layer (so also on the concatenated features).

    Missing modalities: an absent modality's ``z_m`` is the zero vector (its values are
    selected away, never read). With ``presence_features=True`` the MLP also sees
    ``p``, a float ``[batch, M]`` 0/1 presence indicator, so it can tell an absent
    modality from one whose features happen to be zero.

    Shapes: inputs ``{m: EncoderOutput}`` with pooled ``[batch, dim_m]``; output float32
    ``[batch, out_dim]``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from lepton_mm.types import EncoderOutput
      >>> layer = ConcatFusion({"a": 8, "b": 6}, 4, hidden=(16,), rngs=nnx.Rngs(0))
      >>> xs = {m: EncoderOutput.from_tokens(jnp.ones((2, 3, d))) for m, d in
      ...       [("a", 8), ("b", 6)]}
      >>> layer(xs).shape
      (2, 4)

    References:
      Liang et al., "MultiBench: Multiscale Benchmarks for Multimodal Representation
      Learning", NeurIPS 2021 (``ConcatWithLinear``); TorchMultimodal's
      ``ConcatFusionModule``.
    """

    def __init__(
        self,
        dims: Mapping[str, int],
        out_dim: int,
        *,
        rngs: nnx.Rngs,
        hidden: Sequence[int] = (),
        dropout: float = 0.0,
        presence_features: bool = False,
    ):
        """Builds the layer.

        Args:
          dims: modality name → pooled feature size.
          out_dim: output size.
          rngs: parameter initialisation and the dropout stream.
          hidden: hidden layer sizes of the MLP; ``()`` (default) is a single linear
            layer.
          dropout: dropout rate before every linear layer (training mode only).
          presence_features: also feed the 0/1 presence indicator of each modality.
        """
        super().__init__(dims, out_dim)
        self.hidden = check_hidden("hidden", hidden)
        self.dropout_rate = check_rate("dropout", dropout)
        self.presence_features = bool(presence_features)
        in_dim = sum(self.dims.values()) + (
            len(self.modalities) if self.presence_features else 0)
        self.mlp = MLP(in_dim, self.hidden, self.out_dim, dropout=self.dropout_rate,
                       rngs=rngs)

    def concatenated(self, inputs: Mapping[str, EncoderOutput]) -> Array:
        """float32 ``[batch, sum(dims) (+ M)]``: the MLP's input (absent → zeros)."""
        xs = self.check_inputs(inputs)
        parts = [pooled_or_zeros(x) for x in xs]
        if self.presence_features:
            parts.append(self.presence(xs).astype(jnp.float32))
        return jnp.concatenate(parts, axis=-1)

    def __call__(self, inputs: Mapping[str, EncoderOutput], *,
                 rngs: nnx.Rngs | None = None) -> Array:
        """Fuses ``inputs`` into float32 ``[batch, out_dim]``.

        Args:
          inputs: modality name → ``EncoderOutput`` (only ``pooled`` and ``mask`` read).
          rngs: dropout randomness for this call; the construction stream when omitted.

        Returns:
          float32 ``[batch, out_dim]``, the fused representation.
        """
        return self.mlp(self.concatenated(inputs), rngs=rngs)
