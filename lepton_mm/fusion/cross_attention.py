"""Pairwise cross-modal attention fusion (MulT)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from lepton_mm._validation import check_positive_int
from lepton_mm.fusion import _transformer as tfm
from lepton_mm.fusion.base import FusionLayer, register
from lepton_mm.types import EncoderOutput, masked_mean

Array = jax.Array

_POOLS = ("last", "mean")


@register("cross_attention")
class CrossAttentionFusion(FusionLayer):
    """Multimodal Transformer (MulT): every modality attends to every other one.

    Following Tsai et al. (2019), for ``M`` modalities:

    1. Each modality's tokens go through a temporal Conv1D (no bias; ``kernel_size=1``
       is a per-token Linear) to ``width``, are scaled by ``sqrt(width)`` and get a
       position embedding (positions count that modality's valid tokens).
    2. For every target ``t`` and source ``s != t`` a cross-modal transformer
       (``num_layers`` pre-LayerNorm blocks, queries from ``t``, keys/values from the
       fixed embedded ``s``; its own weights) gives ``t``'s sequence enriched by ``s``:
       ``[batch, time_t, width]``. The sequences therefore need not be aligned.
    3. The ``M - 1`` outputs of target ``t`` are concatenated along features,
       ``[batch, time_t, (M-1)*width]``, and a self-attention transformer
       (``num_self_layers`` blocks) runs over ``t``'s time.
    4. ``t``'s sequence is reduced to one vector: its last valid token (``pool="last"``,
       MulT's choice) or the masked mean (``pool="mean"``).
    5. The ``M`` target vectors are concatenated, ``[batch, M*(M-1)*width]``, passed
       through MulT's residual block ``h + W2 drop(relu(W1 h))``, and a Linear maps
       them to ``out_dim``.

    There are ``M*(M-1)`` cross-modal transformers and ``M`` self-attention ones.

    Missing modalities: if source ``s`` is absent for an example, every cross-modal
    branch ``t <- s`` is all zeros for it (no keys to attend to); if target ``t`` is
    absent, ``t``'s vector in step 5 is zeros. The output therefore does not depend on an
    absent modality's tokens or pooled vector (``pooled`` is never used). Masked tokens
    of a present modality are zeroed before the convolution and never attended to.

    Differences from the reference code: GELU instead of ReLU in the transformer MLPs,
    a separate LayerNorm for keys/values, positions added once (not again before the
    self-attention stage), the last *valid* token rather than the last position, and
    padding masks (the reference has none).

    Args:
      dims: modality name → feature size of that modality's tokens.
      out_dim: output size.
      rngs: initialisation and (in training mode) default dropout randomness.
      width: per-modality width ``d`` (MulT uses 30-40).
      num_layers: blocks per cross-modal transformer.
      num_self_layers: blocks per target's self-attention transformer.
      num_heads: attention heads; must divide ``width``.
      mlp_dim: MLP hidden size of the cross-modal blocks (``None``: ``4 * width``); the
        self-attention blocks, ``M - 1`` times wider, use ``(M - 1) * mlp_dim``.
      kernel_size: temporal kernel of the input Conv1D ("SAME" padding).
      dropout: dropout on the embeddings, residual branches, MLP hidden layers and the
        output block.
      attention_dropout: dropout on attention probabilities.
      pool: ``"last"`` or ``"mean"`` (see step 4).
      position_embedding: ``"sinusoidal"`` (MulT), ``"learned"`` (``max_len`` positions
        per modality) or ``"none"``.
      max_len: longest sequence per modality for ``position_embedding="learned"``.
      dtype: compute dtype of the dense layers (attention softmax and LayerNorm are
        always float32; the output is float32).

    References:
      Tsai, Bai, Liang, Kolter, Morency and Salakhutdinov, "Multimodal Transformer for
      Unaligned Multimodal Language Sequences", ACL 2019.
      https://arxiv.org/abs/1906.00295 (code: github.com/yaohungt/Multimodal-Transformer)

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from lepton_mm.types import EncoderOutput
      >>> fusion = CrossAttentionFusion({"audio": 8, "text": 6}, 4, rngs=nnx.Rngs(0),
      ...                               width=8, num_layers=1)
      >>> fusion.eval()
      >>> out = fusion({"audio": EncoderOutput.from_tokens(jnp.ones((2, 5, 8))),
      ...               "text": EncoderOutput.from_tokens(jnp.ones((2, 3, 6)))})
      >>> out.shape
      (2, 4)
    """

    def __init__(
        self,
        dims: Mapping[str, int],
        out_dim: int,
        *,
        rngs: nnx.Rngs,
        width: int = 32,
        num_layers: int = 2,
        num_self_layers: int = 1,
        num_heads: int = 2,
        mlp_dim: int | None = None,
        kernel_size: int = 1,
        dropout: float = 0.1,
        attention_dropout: float = 0.1,
        pool: str = "last",
        position_embedding: str = "sinusoidal",
        max_len: int = 512,
        dtype: jnp.dtype = jnp.float32,
    ):
        super().__init__(dims, out_dim)
        self.width = check_positive_int("width", width)
        self.num_layers = check_positive_int("num_layers", num_layers)
        self.num_self_layers = check_positive_int("num_self_layers", num_self_layers)
        self.num_heads = check_positive_int("num_heads", num_heads)
        tfm.check_heads("width", width, num_heads)
        self.mlp_dim = check_positive_int("mlp_dim", 4 * width if mlp_dim is None else mlp_dim)
        self.kernel_size = check_positive_int("kernel_size", kernel_size)
        self.dropout_rate = tfm.check_rate("dropout", dropout)
        self.attention_dropout_rate = tfm.check_rate("attention_dropout", attention_dropout)
        if pool not in _POOLS:
            raise ValueError(f"pool: expected one of {_POOLS}, got {pool!r}.")
        self.pool = pool

        others = len(self.modalities) - 1
        stack = lambda layers, dim, mlp, cross: tfm.TransformerStack(
            layers, dim, num_heads, mlp, cross=cross, dropout=dropout,
            attention_dropout=attention_dropout, dtype=dtype, rngs=rngs)
        self.projections = nnx.Dict({
            m: nnx.Conv(self.dims[m], width, kernel_size=(kernel_size,), padding="SAME",
                        use_bias=False, dtype=dtype, kernel_init=tfm.KERNEL_INIT, rngs=rngs)
            for m in self.modalities
        })
        self.positions = nnx.Dict({
            m: tfm.PositionEmbedding(position_embedding, width, max_len=max_len, rngs=rngs)
            for m in self.modalities
        })
        self.embed_dropout = nnx.Dropout(dropout, rngs=rngs)
        # cross[t][s]: target t attends to source s.
        self.cross = nnx.Dict({
            t: nnx.Dict({s: stack(num_layers, width, self.mlp_dim, True)
                         for s in self.modalities if s != t})
            for t in self.modalities
        })
        self.self_attention = nnx.Dict({
            t: stack(num_self_layers, others * width, others * self.mlp_dim, False)
            for t in self.modalities
        })
        combined = len(self.modalities) * others * width
        self.head_in = nnx.Linear(combined, combined, dtype=dtype, rngs=rngs)
        self.head_hidden = nnx.Linear(combined, combined, dtype=dtype, rngs=rngs)
        self.head_dropout = nnx.Dropout(dropout, rngs=rngs)
        self.head_out = nnx.Linear(combined, out_dim, dtype=dtype, rngs=rngs)

    def __call__(self, inputs: Mapping[str, EncoderOutput], *,
                 rngs: nnx.Rngs | None = None) -> Array:
        """Fuses ``inputs`` (modality → ``EncoderOutput``) into float32 ``[batch, out_dim]``.

        Args:
          inputs: one ``EncoderOutput`` per modality of ``dims``.
          rngs: dropout randomness in training mode; defaults to the construction stream.

        Returns:
          float32 ``[batch, out_dim]``, the fused representation.
        """
        xs = self.check_inputs(inputs)
        masks = tuple(x.mask for x in xs)
        return self._fuse(self._cross_sequences(xs, rngs=rngs), masks, rngs=rngs)

    def _cross_sequences(self, xs: tuple[EncoderOutput, ...], *,
                         rngs: nnx.Rngs | None = None) -> dict[tuple[str, str], Array]:
        """Steps 1-2: ``{(target, source): float32 [batch, time_target, width]}``, all zeros
        for the examples where ``source`` is absent."""
        embedded = {}
        for m, x in zip(self.modalities, xs, strict=True):
            tokens = jnp.where(x.mask[..., None], x.tokens, 0)
            h = self.projections[m](tokens).astype(jnp.float32) * math.sqrt(self.width)
            h = h + self.positions[m](x.mask, name=f"inputs[{m!r}]")
            h = jnp.where(x.mask[..., None], h, 0.0)
            embedded[m] = self.embed_dropout(h, rngs=rngs)
        out = {}
        for t, xt in zip(self.modalities, xs, strict=True):
            for s, xsrc in zip(self.modalities, xs, strict=True):
                if s == t:
                    continue
                h = self.cross[t][s](embedded[t], xt.mask, embedded[s], xsrc.mask, rngs=rngs)
                out[t, s] = jnp.where(xsrc.present[:, None, None], h, 0.0)
        return out

    def _fuse(self, cross: Mapping[tuple[str, str], Array], masks: tuple[Array, ...], *,
              rngs: nnx.Rngs | None = None) -> Array:
        """Steps 3-5 from the cross-modal sequences and the modalities' masks."""
        pooled = []
        for t, mask in zip(self.modalities, masks, strict=True):
            h = jnp.concatenate([cross[t, s] for s in self.modalities if s != t], axis=-1)
            h = self.self_attention[t](h, mask, rngs=rngs)
            pooled.append(tfm.last_valid(h, mask) if self.pool == "last"
                          else masked_mean(h, mask))
        h = jnp.concatenate(pooled, axis=-1)
        y = self.head_hidden(self.head_dropout(jax.nn.relu(self.head_in(h)), rngs=rngs))
        return self.head_out(h + y.astype(jnp.float32)).astype(jnp.float32)
