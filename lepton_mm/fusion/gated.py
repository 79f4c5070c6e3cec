"""Gated Multimodal Unit, generalised from two to any number of modalities.

References:
  Arevalo, Solorio, Montes-y-Gómez and González, "Gated Multimodal Units for
  Information Fusion", ICLR 2017 workshop.
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


@register("gated")
class GatedFusion(FusionLayer):
    """GMU: per-modality ``tanh`` branches mixed by gates computed from all modalities.

    ``h_m = tanh(W_m z_m + c_m)`` (size ``hidden_dim``), gate logits
    ``a = W_g [z_1; ...; z_M] + c_g`` reshaped to ``[M, hidden_dim]``, gates
    ``g = softmax_m(a)`` per hidden unit, and ``h = Σ_m g_m ⊙ h_m``. When
    ``hidden_dim != out_dim`` a final linear layer maps ``h`` to ``out_dim``; by default
    ``hidden_dim = out_dim`` and ``h`` is the output.

    For two modalities the paper's gate ``s = σ(W_s [z_1; z_2])``, ``h = s ⊙ h_1 +
    (1 - s) ⊙ h_2`` is the special case ``softmax(a_1, a_2) = (σ(a_1 - a_2),
    1 - σ(a_1 - a_2))``: the same family, parametrised by ``W_s = W_{g,1} - W_{g,2}``.
    The paper's equations omit biases; the linear layers here have them.

    Missing modalities: an absent modality's features enter the gate network as zeros
    and its gate logits are masked out of the softmax, so the gates renormalise over the
    present modalities. With a single modality present the output is exactly that
    modality's branch ``tanh(W_m z_m + c_m)`` (then the output projection, if any); with
    none present, zeros (then the projection's bias, if any).

    Shapes: inputs ``{m: EncoderOutput}`` with pooled ``[batch, dim_m]``; output float32
    ``[batch, out_dim]``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from lepton_mm.types import EncoderOutput
      >>> layer = GatedFusion({"a": 8, "b": 6, "c": 5}, 4, rngs=nnx.Rngs(0))
      >>> xs = {m: EncoderOutput.from_tokens(jnp.ones((2, 3, d))) for m, d in
      ...       [("a", 8), ("b", 6), ("c", 5)]}
      >>> layer(xs).shape
      (2, 4)

    References:
      Arevalo, Solorio, Montes-y-Gómez and González, "Gated Multimodal Units for
      Information Fusion", ICLR 2017 workshop.
    """

    def __init__(
        self,
        dims: Mapping[str, int],
        out_dim: int,
        *,
        rngs: nnx.Rngs,
        hidden_dim: int | None = None,
    ):
        """Builds the layer.

        Args:
          dims: modality name → pooled feature size.
          out_dim: output size.
          rngs: parameter initialisation.
          hidden_dim: size of the branches and gates; defaults to ``out_dim`` (no output
            projection).
        """
        super().__init__(dims, out_dim)
        self.hidden_dim = (self.out_dim if hidden_dim is None
                           else check_positive_int("hidden_dim", hidden_dim))
        self.branches = nnx.List([
            nnx.Linear(self.dims[m], self.hidden_dim, rngs=rngs) for m in self.modalities
        ])
        self.gate = nnx.Linear(sum(self.dims.values()),
                               len(self.modalities) * self.hidden_dim, rngs=rngs)
        self.out_proj = (nnx.Linear(self.hidden_dim, self.out_dim, rngs=rngs)
                         if self.hidden_dim != self.out_dim else None)

    def gates(self, inputs: Mapping[str, EncoderOutput]) -> Array:
        """float32 ``[batch, M, hidden_dim]``: the gates (0 for absent modalities).

        They sum to 1 over the present modalities (axis 1), or are all zeros when none
        is present.
        """
        xs = self.check_inputs(inputs)
        present = self.presence(xs)
        zs = jnp.concatenate([pooled_or_zeros(x) for x in xs], axis=-1)
        logits = self.gate(zs).reshape(zs.shape[0], len(xs), self.hidden_dim)
        mask = jnp.broadcast_to(present[:, :, None], logits.shape)
        return masked_softmax(logits, mask, axis=1)

    def branch_outputs(self, inputs: Mapping[str, EncoderOutput]) -> Array:
        """float32 ``[batch, M, hidden_dim]``: ``tanh(W_m z_m + c_m)`` (absent → z = 0)."""
        xs = self.check_inputs(inputs)
        return jnp.stack([jnp.tanh(branch(pooled_or_zeros(x)))
                          for branch, x in zip(self.branches, xs, strict=True)], axis=1)

    def __call__(self, inputs: Mapping[str, EncoderOutput]) -> Array:
        """Fuses ``inputs`` into float32 ``[batch, out_dim]``.

        Args:
          inputs: modality name → ``EncoderOutput`` (only ``pooled`` and ``mask`` read).

        Returns:
          float32 ``[batch, out_dim]``, the fused representation.
        """
        h = jnp.sum(self.gates(inputs) * self.branch_outputs(inputs), axis=1)
        return h if self.out_proj is None else self.out_proj(h)
