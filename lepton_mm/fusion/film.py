"""FiLM fusion: one modality's features scale and shift another's tokens.

References:
  Perez, Strub, de Vries, Dumoulin and Courville, "FiLM: Visual Reasoning with a General
  Conditioning Layer", AAAI 2018.
  MultiBench ``fusions/common_fusions.py`` (``FiLM``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import FrozenDict

from lepton_mm.fusion._common import pooled_or_zeros
from lepton_mm.fusion.base import FusionLayer, register
from lepton_mm.types import EncoderOutput, masked_mean

Array = jax.Array


@register("film")
class FiLMFusion(FusionLayer):
    """Feature-wise linear modulation of target tokens by conditioning modalities.

    For each target modality ``t`` with conditioners ``C_t``, every conditioner's pooled
    features ``z_c`` go through its own FiLM generator, a linear layer giving
    ``(Δγ_c, β_c)`` of size ``d_t`` each, and the target's tokens are modulated per
    channel:

        γ_t = 1 + Σ_{c ∈ C_t} Δγ_c(z_c),   β_t = Σ_{c ∈ C_t} β_c(z_c),
        FiLM(x_t) = γ_t ⊙ x_t + β_t          (every token of the target).

    Summing over conditioners is the same as one FiLM generator reading the
    concatenation of the conditioners' features, but it lets an absent conditioner drop
    out exactly. γ is parametrised as ``1 + Δγ`` so that a generator outputting zeros is
    the identity (the paper leaves γ unconstrained; this is only a reparametrisation).
    Conditioners always use their own unmodulated pooled features (no chaining).

    Each modulated target is mean-pooled over its valid tokens, the pooled targets are
    concatenated (sorted order) and a linear layer maps them to ``out_dim``.
    Generators use the default LeCun-normal kernels and zero biases.

    ``conditioning`` maps target → conditioner (or a sequence of conditioners). The
    default modulates the first modality in sorted order by all the others (for two
    modalities ``{"a": "b"}``: ``b`` conditions ``a``, MultiBench's ``base_modal=0``).
    Every modality must appear, as a target or a conditioner.

    Missing modalities: an absent conditioner gives ``Δγ = 0``, ``β = 0`` (identity
    modulation; the other conditioners still apply); an absent target contributes a
    zero vector to the concatenation. Absent values are selected away, never read.

    Shapes: inputs ``{m: EncoderOutput}`` (tokens ``[batch, time_m, dim_m]`` of targets,
    pooled ``[batch, dim_m]`` of conditioners); output float32 ``[batch, out_dim]``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from lepton_mm.types import EncoderOutput
      >>> layer = FiLMFusion({"a": 8, "b": 6, "c": 5}, 4, rngs=nnx.Rngs(0))
      >>> layer.conditioning
      {'a': ('b', 'c')}
      >>> xs = {m: EncoderOutput.from_tokens(jnp.ones((2, 3, d))) for m, d in
      ...       [("a", 8), ("b", 6), ("c", 5)]}
      >>> layer(xs).shape
      (2, 4)

    References:
      Perez, Strub, de Vries, Dumoulin and Courville, "FiLM: Visual Reasoning with a
      General Conditioning Layer", AAAI 2018.
    """

    def __init__(
        self,
        dims: Mapping[str, int],
        out_dim: int,
        *,
        rngs: nnx.Rngs,
        conditioning: Mapping[str, str | Sequence[str]] | None = None,
    ):
        """Builds the layer.

        Args:
          dims: modality name → feature size.
          out_dim: output size.
          rngs: parameter initialisation.
          conditioning: target → conditioner name or sequence of names. Default: the
            first sorted modality is modulated by all the others.

        Raises:
          ValueError: an unknown modality name, a modality conditioning itself, a
            target without conditioners, or a modality used neither way.
        """
        super().__init__(dims, out_dim)
        self.conditioning = FrozenDict(self._check_conditioning(conditioning))
        self.targets = tuple(self.conditioning)
        self.pairs = tuple((t, c) for t in self.targets for c in self.conditioning[t])
        self.generators = nnx.List([
            nnx.Linear(self.dims[c], 2 * self.dims[t], rngs=rngs) for t, c in self.pairs
        ])
        self.out_proj = nnx.Linear(sum(self.dims[t] for t in self.targets), self.out_dim,
                                   rngs=rngs)

    def _check_conditioning(
        self, conditioning: Mapping[str, str | Sequence[str]] | None,
    ) -> dict[str, tuple[str, ...]]:
        first, *others = self.modalities
        if conditioning is None:
            return {first: tuple(others)}
        if not isinstance(conditioning, Mapping) or not conditioning:
            raise ValueError(
                "conditioning: expected a non-empty mapping target -> conditioner(s), got "
                f"{conditioning!r}.")
        known = set(self.modalities)
        out: dict[str, tuple[str, ...]] = {}
        for t in sorted(conditioning):
            cs = conditioning[t]
            cs = (cs,) if isinstance(cs, str) else tuple(cs)
            for name in (t, *cs):
                if name not in known:
                    raise ValueError(
                        f"conditioning: unknown modality {name!r}; expected names from "
                        f"{list(self.modalities)}.")
            if not cs:
                raise ValueError(f"conditioning[{t!r}]: expected at least one conditioner.")
            if t in cs:
                raise ValueError(f"conditioning[{t!r}]: a modality cannot condition itself.")
            if len(set(cs)) != len(cs):
                raise ValueError(f"conditioning[{t!r}]: repeated conditioner in {cs!r}.")
            out[t] = tuple(sorted(cs))
        used = set(out) | {c for cs in out.values() for c in cs}
        unused = sorted(known - used)
        if unused:
            raise ValueError(
                f"conditioning: modality {unused[0]!r} is neither a target nor a "
                "conditioner; every modality must be used.")
        return out

    def film_parameters(self, inputs: Mapping[str, EncoderOutput]) -> dict[str, tuple[
            Array, Array]]:
        """Target → ``(γ, β)``, float32 ``[batch, dim_target]`` each."""
        xs = dict(zip(self.modalities, self.check_inputs(inputs), strict=True))
        batch = xs[self.modalities[0]].batch_size
        delta = {t: jnp.zeros((batch, 2 * self.dims[t]), jnp.float32) for t in self.targets}
        for (t, c), gen in zip(self.pairs, self.generators, strict=True):
            x = xs[c]
            delta[t] = delta[t] + jnp.where(x.present[:, None], gen(pooled_or_zeros(x)), 0.0)
        return {t: (1.0 + d[:, :self.dims[t]], d[:, self.dims[t]:]) for t, d in delta.items()}

    def modulate(self, inputs: Mapping[str, EncoderOutput]) -> dict[str, Array]:
        """Target → its modulated tokens, float32 ``[batch, time_t, dim_t]``.

        Masked (invalid) token positions are zeros.
        """
        xs = dict(zip(self.modalities, self.check_inputs(inputs), strict=True))
        out = {}
        for t, (gamma, beta) in self.film_parameters(inputs).items():
            valid = xs[t].mask[..., None]
            tokens = jnp.where(valid, xs[t].tokens.astype(jnp.float32), 0.0)
            out[t] = jnp.where(valid, gamma[:, None, :] * tokens + beta[:, None, :], 0.0)
        return out

    def __call__(self, inputs: Mapping[str, EncoderOutput]) -> Array:
        """Fuses ``inputs`` into float32 ``[batch, out_dim]``.

        Args:
          inputs: modality name → ``EncoderOutput``: targets' ``tokens`` and ``mask``,
            conditioners' ``pooled`` and ``mask`` are read.

        Returns:
          float32 ``[batch, out_dim]``, the fused representation.
        """
        masks = {m: x.mask for m, x in zip(self.modalities, self.check_inputs(inputs),
                                           strict=True)}
        modulated = self.modulate(inputs)
        pooled = [masked_mean(modulated[t], masks[t]) for t in self.targets]
        return self.out_proj(jnp.concatenate(pooled, axis=-1))
