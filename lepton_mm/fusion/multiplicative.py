"""Multiplicative interactions between two modalities.

References:
  Jayakumar, Czarnecki, Menick, Schwarz, Rae, Osindero, Teh, Harley and Pascanu,
  "Multiplicative Interactions and Where to Find Them", ICLR 2020.
  MultiBench ``fusions/common_fusions.py`` (``MultiplicativeInteractions2Modal``).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from lepton_mm.fusion._common import check_choice, pooled_or_zeros
from lepton_mm.fusion.base import FusionLayer, register
from lepton_mm.types import EncoderOutput

Array = jax.Array

_MODES = ("matrix", "vector", "scalar")


@register("multiplicative")
class MultiplicativeFusion(FusionLayer):
    """The multiplicative-interaction layer ``f(x, z) = zᵀ W x + zᵀ U + V x + b``.

    In the paper's notation ``z`` is the *context* (it generates the weights;
    MultiBench's ``m1``) and ``x`` the input (``m2``), here the pooled features of the
    two modalities. Equivalently, a hypernetwork maps ``z`` to the weight
    ``W' = z W + V`` and bias ``b' = z U + b`` of a linear map applied to ``x``.
    ``mode`` restricts W as in the paper and MultiBench:

    * ``"matrix"`` (general form, "hypernetwork"): W ``[d_z, d_x, out_dim]``,
      U ``[d_z, out_dim]``, V ``[d_x, out_dim]``, b ``[out_dim]``;
      ``h = einsum("bi,ijo,bj->bo", z, W, x) + z U + x V + b``.
    * ``"vector"`` (diagonal form, gating): W, U ``[d_z, d_x]``, V, b ``[d_x]``;
      ``h = (z W + V) ⊙ x + (z U + b)``, a ``d_x``-vector.
    * ``"scalar"`` (scales and biases): W, U ``[d_z]``, V, b scalars;
      ``h = (z·W + V) x + (z·U + b)``, a ``d_x``-vector.

    The ``"vector"`` and ``"scalar"`` forms produce ``d_x`` features, mapped to
    ``out_dim`` by a final linear layer when ``d_x != out_dim`` (our addition; the
    contract needs ``out_dim`` outputs).

    Initialisation: W, U and the matrix form's V are LeCun-normal over their input
    axes (for the matrix form's W the fan-in is ``d_z · d_x``), biases are zeros, and
    in the vector and scalar forms V starts at ones, so with ``z = 0`` the layer passes
    ``x`` through. (MultiBench draws them from Xavier/standard normals instead.)

    Only defined for two modalities (``max_modalities = 2``).

    Missing modalities: an absent modality's vector is zeros. With the context absent
    the output is ``x V + b`` (matrix) or ``V x + b`` (vector/scalar); with the input
    absent it is ``z U + b``; with both absent ``b``.

    Shapes: inputs ``{m: EncoderOutput}`` with pooled ``[batch, dim_m]``; output float32
    ``[batch, out_dim]``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from lepton_mm.types import EncoderOutput
      >>> layer = MultiplicativeFusion({"a": 8, "b": 6}, 4, mode="vector",
      ...                              rngs=nnx.Rngs(0))
      >>> xs = {m: EncoderOutput.from_tokens(jnp.ones((2, 3, d))) for m, d in
      ...       [("a", 8), ("b", 6)]}
      >>> layer(xs).shape
      (2, 4)

    References:
      Jayakumar et al., "Multiplicative Interactions and Where to Find Them", ICLR 2020;
      MultiBench's ``MultiplicativeInteractions2Modal``.
    """

    max_modalities = 2

    def __init__(
        self,
        dims: Mapping[str, int],
        out_dim: int,
        *,
        rngs: nnx.Rngs,
        mode: str = "matrix",
        context: str | None = None,
    ):
        """Builds the layer.

        Args:
          dims: modality name → pooled feature size (exactly two modalities).
          out_dim: output size.
          rngs: parameter initialisation.
          mode: ``"matrix"`` (default), ``"vector"`` or ``"scalar"``.
          context: the modality ``z`` that generates the weights; defaults to the
            first in sorted order (the other one is the input ``x``).
        """
        super().__init__(dims, out_dim)
        self.mode = check_choice("mode", mode, _MODES)
        if context is None:
            context = self.modalities[0]
        if context not in self.dims:
            raise ValueError(
                f"context: expected one of the modalities {list(self.modalities)}, got "
                f"{context!r}.")
        self.context = context
        self.other = next(m for m in self.modalities if m != context)
        dz, dx, do = self.dims[self.context], self.dims[self.other], self.out_dim
        lecun = jax.nn.initializers.lecun_normal
        f32 = jnp.float32
        if self.mode == "matrix":
            self.W = nnx.Param(lecun(in_axis=(0, 1), out_axis=2)(
                rngs.params(), (dz, dx, do), f32))
            self.U = nnx.Param(lecun()(rngs.params(), (dz, do), f32))
            self.V = nnx.Param(lecun()(rngs.params(), (dx, do), f32))
            self.b = nnx.Param(jnp.zeros((do,), f32))
        elif self.mode == "vector":
            self.W = nnx.Param(lecun()(rngs.params(), (dz, dx), f32))
            self.U = nnx.Param(lecun()(rngs.params(), (dz, dx), f32))
            self.V = nnx.Param(jnp.ones((dx,), f32))
            self.b = nnx.Param(jnp.zeros((dx,), f32))
        else:
            std = 1.0 / jnp.sqrt(jnp.asarray(dz, f32))
            self.W = nnx.Param(std * jax.random.normal(rngs.params(), (dz,), f32))
            self.U = nnx.Param(std * jax.random.normal(rngs.params(), (dz,), f32))
            self.V = nnx.Param(jnp.ones((), f32))
            self.b = nnx.Param(jnp.zeros((), f32))
        self.out_proj = (nnx.Linear(dx, do, rngs=rngs)
                         if self.mode != "matrix" and dx != do else None)

    def interaction(self, inputs: Mapping[str, EncoderOutput]) -> Array:
        """float32 ``f(x, z)`` before any output projection.

        ``[batch, out_dim]`` for ``"matrix"``, ``[batch, d_x]`` otherwise.
        """
        xs = dict(zip(self.modalities, self.check_inputs(inputs), strict=True))
        z = pooled_or_zeros(xs[self.context])
        x = pooled_or_zeros(xs[self.other])
        W, U, V, b = self.W[...], self.U[...], self.V[...], self.b[...]
        if self.mode == "matrix":
            return (jnp.einsum("bi,ijo,bj->bo", z, W, x) + z @ U + x @ V
                    + b[None, :])
        if self.mode == "vector":
            return (z @ W + V[None, :]) * x + (z @ U + b[None, :])
        return (z @ W + V)[:, None] * x + (z @ U + b)[:, None]

    def __call__(self, inputs: Mapping[str, EncoderOutput]) -> Array:
        """Fuses ``inputs`` into float32 ``[batch, out_dim]``.

        Args:
          inputs: modality name → ``EncoderOutput`` (only ``pooled`` and ``mask`` read).

        Returns:
          float32 ``[batch, out_dim]``, the fused representation.
        """
        h = self.interaction(inputs)
        return h if self.out_proj is None else self.out_proj(h)
