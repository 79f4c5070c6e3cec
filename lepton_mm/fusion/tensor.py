"""Tensor Fusion Network and its low-rank factorisation (LMF).

References:
  Zadeh, Chen, Poria, Cambria and Morency, "Tensor Fusion Network for Multimodal
  Sentiment Analysis", EMNLP 2017.
  Liu, Shen, Lakshminarasimhan, Liang, Zadeh and Morency, "Efficient Low-rank
  Multimodal Fusion with Modality-Specific Factors", ACL 2018.
  MultiBench ``fusions/common_fusions.py`` (``TensorFusion``, ``LowRankTensorFusion``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import FrozenDict

from lepton_mm._validation import check_positive_int
from lepton_mm.fusion._common import MLP, check_hidden, check_rate, pooled_or_zeros
from lepton_mm.fusion.base import FusionLayer, register
from lepton_mm.types import EncoderOutput

Array = jax.Array


# PyTorch's ``nn.init.xavier_normal_`` (untruncated normal, ``std = sqrt(2 / (fan_in +
# fan_out))``) with its fan rule for any rank >= 2: ``fan_in = shape[1] · Π shape[2:]``,
# ``fan_out = shape[0] · Π shape[2:]``. JAX's ``glorot_normal`` differs in both: it draws
# from a normal truncated at ±2 std (rescaled to the same variance), and its fans are
# ``in_axis=-2, out_axis=-1``.
_xavier_normal = jax.nn.initializers.variance_scaling(1.0, "fan_avg", "normal", in_axis=1,
                                                      out_axis=0)


def _with_one(z: Array) -> Array:
    """``[batch, d]`` → ``[batch, d + 1]``: prepends the constant 1 of ``[1; z]``."""
    return jnp.concatenate([jnp.ones((z.shape[0], 1), z.dtype), z], axis=1)


@register("tensor")
class TensorFusion(FusionLayer):
    """Tensor Fusion Network: the outer product of ``[1; z_m]`` over modalities, then an MLP.

    ``Z = [1; z_1] ⊗ [1; z_2] ⊗ ... ⊗ [1; z_M]`` has ``Π_m (d_m + 1)`` entries and holds
    every unimodal, bimodal, ..., M-modal product of features (the appended 1 keeps the
    lower-order terms). It is flattened row-major, modalities in sorted name order (the
    first modality's index varies slowest), and mapped to ``out_dim`` by an MLP:
    ``dropout → Linear`` per layer, ReLU between layers (TFN's post-fusion network
    with ``hidden`` as its hidden sizes).

    ``z_m`` is the modality's pooled features, first linearly projected to
    ``modality_dim`` when its size exceeds ``modality_dim`` (so ``d_m`` above is
    ``min(dim_m, modality_dim)``), which keeps the tensor tractable: 3 modalities of
    size 32 give 35,937 entries, 3 of size 128 would give 2.1 million.
    ``fused_tensor(inputs)`` returns the flattened ``Z``.

    Missing modalities: an absent modality's ``z_m`` is the zero vector (after any
    projection, so the projection's bias does not leak in), i.e. its factor is
    ``[1; 0]`` and ``Z`` reduces to the outer product over the present modalities,
    embedded in the full tensor.

    Shapes: inputs ``{m: EncoderOutput}`` with pooled ``[batch, dim_m]``; output float32
    ``[batch, out_dim]``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from lepton_mm.types import EncoderOutput
      >>> layer = TensorFusion({"a": 3, "b": 2}, 4, rngs=nnx.Rngs(0))
      >>> xs = {m: EncoderOutput.from_tokens(jnp.ones((2, 5, d))) for m, d in
      ...       [("a", 3), ("b", 2)]}
      >>> layer.fused_tensor(xs).shape, layer(xs).shape
      ((2, 12), (2, 4))

    References:
      Zadeh, Chen, Poria, Cambria and Morency, "Tensor Fusion Network for Multimodal
      Sentiment Analysis", EMNLP 2017.
    """

    def __init__(
        self,
        dims: Mapping[str, int],
        out_dim: int,
        *,
        rngs: nnx.Rngs,
        modality_dim: int | None = 32,
        hidden: Sequence[int] = (),
        dropout: float = 0.0,
    ):
        """Builds the layer.

        Args:
          dims: modality name → pooled feature size.
          out_dim: output size.
          rngs: parameter initialisation and the dropout stream.
          modality_dim: modalities larger than this are linearly projected to it before
            the outer product; ``None`` never projects. Default 32.
          hidden: hidden sizes of the post-fusion MLP; ``()`` (default) is one linear
            layer from the flattened tensor to ``out_dim``.
          dropout: dropout rate before every linear layer of the MLP (training only).
        """
        super().__init__(dims, out_dim)
        self.modality_dim = (None if modality_dim is None
                             else check_positive_int("modality_dim", modality_dim))
        self.hidden = check_hidden("hidden", hidden)
        self.dropout_rate = check_rate("dropout", dropout)
        self.factor_dims = FrozenDict({
            m: d if self.modality_dim is None else min(d, self.modality_dim)
            for m, d in self.dims.items()
        })
        self.projections = nnx.List([
            nnx.Linear(self.dims[m], self.factor_dims[m], rngs=rngs)
            if self.factor_dims[m] != self.dims[m] else None
            for m in self.modalities
        ])
        self.tensor_size = int(np.prod([d + 1 for d in self.factor_dims.values()]))
        self.mlp = MLP(self.tensor_size, self.hidden, self.out_dim,
                       dropout=self.dropout_rate, rngs=rngs)

    def factors(self, inputs: Mapping[str, EncoderOutput]) -> tuple[Array, ...]:
        """The ``[1; z_m]`` vectors, float32 ``[batch, factor_dims[m] + 1]`` each."""
        xs = self.check_inputs(inputs)
        out = []
        for proj, x in zip(self.projections, xs, strict=True):
            z = pooled_or_zeros(x)  # before the projection too: NaN must not reach grads
            if proj is not None:
                z = jnp.where(x.present[:, None], proj(z), 0.0)
            out.append(_with_one(z))
        return tuple(out)

    def fused_tensor(self, inputs: Mapping[str, EncoderOutput]) -> Array:
        """float32 ``[batch, Π_m (factor_dims[m] + 1)]``: the flattened outer product."""
        factors = self.factors(inputs)
        t = factors[0]
        for f in factors[1:]:
            t = (t[:, :, None] * f[:, None, :]).reshape(t.shape[0], -1)
        return t

    def __call__(self, inputs: Mapping[str, EncoderOutput], *,
                 rngs: nnx.Rngs | None = None) -> Array:
        """Fuses ``inputs`` into float32 ``[batch, out_dim]``.

        Args:
          inputs: modality name → ``EncoderOutput`` (only ``pooled`` and ``mask`` read).
          rngs: dropout randomness for this call; the construction stream when omitted.

        Returns:
          float32 ``[batch, out_dim]``, the fused representation.
        """
        return self.mlp(self.fused_tensor(inputs), rngs=rngs)


@register("low_rank")
class LowRankFusion(FusionLayer):
    """Low-rank Multimodal Fusion: TFN's linear layer with a rank-``r`` weight tensor.

    TFN followed by a linear layer computes ``h = W · Z + b`` with ``W`` of shape
    ``[d_1 + 1, ..., d_M + 1, out_dim]``. LMF constrains
    ``W = Σ_{i<r} w_i · W_1^(i) ⊗ ... ⊗ W_M^(i)`` with per-modality factors
    ``W_m`` of shape ``[rank, d_m + 1, out_dim]`` and fusion weights ``w`` of shape
    ``[rank]`` (the ⊗ is over the input axes; ``out_dim`` is shared elementwise), and
    never forms ``Z`` or ``W``:

        h = Σ_i w_i · Π_m ([1; z_m] W_m^(i)) + b      (Π elementwise over out_dim).

    Cost is linear in the number of modalities and in each ``d_m``. The layer has no
    dropout (LMF's dropout lives in its unimodal subnetworks, i.e. the encoders here).

    Initialisation is MultiBench's (``LowRankTensorFusion``): PyTorch's
    ``xavier_normal_`` applied to each whole tensor, an untruncated normal with
    ``std = sqrt(2 / (fan_in + fan_out))`` and PyTorch's fan rule for an n-d tensor
    (``fan_in = shape[1] · Π shape[2:]``, ``fan_out = shape[0] · Π shape[2:]``). So each
    factor ``[rank, d_m + 1, out_dim]`` has ``std = sqrt(2 / ((d_m + 1 + rank) ·
    out_dim))`` (0.029 for ``rank=4, d_m=32, out_dim=64``), ``w`` (drawn as ``[1, rank]``)
    ``std = sqrt(2 / (rank + 1))``, and ``b`` is zero.

    Missing modalities: an absent modality's ``z_m`` is the zero vector, so its factor
    contributes ``[1; 0] W_m^(i)`` (the first row of each factor), exactly as TFN's
    ``[1; 0]``.

    Shapes: inputs ``{m: EncoderOutput}`` with pooled ``[batch, dim_m]``; output float32
    ``[batch, out_dim]``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from lepton_mm.types import EncoderOutput
      >>> layer = LowRankFusion({"a": 8, "b": 6, "c": 5}, 4, rank=2, rngs=nnx.Rngs(0))
      >>> xs = {m: EncoderOutput.from_tokens(jnp.ones((2, 3, d))) for m, d in
      ...       [("a", 8), ("b", 6), ("c", 5)]}
      >>> layer(xs).shape
      (2, 4)

    References:
      Liu, Shen, Lakshminarasimhan, Liang, Zadeh and Morency, "Efficient Low-rank
      Multimodal Fusion with Modality-Specific Factors", ACL 2018.
    """

    def __init__(
        self,
        dims: Mapping[str, int],
        out_dim: int,
        *,
        rngs: nnx.Rngs,
        rank: int = 4,
    ):
        """Builds the layer.

        Args:
          dims: modality name → pooled feature size.
          out_dim: output size.
          rngs: parameter initialisation.
          rank: number of rank-one terms ``r`` (default 4, within the 1-16 range the
            LMF paper explores).
        """
        super().__init__(dims, out_dim)
        self.rank = check_positive_int("rank", rank)
        self.factors = nnx.List([
            nnx.Param(_xavier_normal(rngs.params(), (self.rank, self.dims[m] + 1,
                                                     self.out_dim), jnp.float32))
            for m in self.modalities
        ])
        w = _xavier_normal(rngs.params(), (1, self.rank), jnp.float32)
        self.fusion_weights = nnx.Param(w.reshape(self.rank))
        self.bias = nnx.Param(jnp.zeros((self.out_dim,), jnp.float32))

    def __call__(self, inputs: Mapping[str, EncoderOutput]) -> Array:
        """Fuses ``inputs`` into float32 ``[batch, out_dim]``.

        Args:
          inputs: modality name → ``EncoderOutput`` (only ``pooled`` and ``mask`` read).

        Returns:
          float32 ``[batch, out_dim]``, the fused representation.
        """
        xs = self.check_inputs(inputs)
        prod = None
        for factor, x in zip(self.factors, xs, strict=True):
            z = _with_one(pooled_or_zeros(x))
            f = jnp.einsum("bd,rdo->bro", z, factor[...])
            prod = f if prod is None else prod * f
        return jnp.einsum("r,bro->bo", self.fusion_weights[...], prod) + self.bias[...][None, :]
