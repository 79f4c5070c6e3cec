"""Transformer building blocks shared by the attention-based fusion layers (private).

Everything here is mask-aware in the way the fusion contract needs:

* attention never looks at a key whose mask is False (the key/value input is zeroed
  before the projections and its score replaced before the softmax, so even NaN there
  cannot leak into outputs or gradients), and a query with *no* valid key gets an
  exact zero from the attention sublayer instead of NaN or a uniform average over
  padding;
* attention scores, softmax and LayerNorm run in float32 whatever the compute dtype;
* positions count valid tokens only (``valid_positions``), so where padding sits in a
  sequence does not change the embedding of a real token.

Blocks are pre-LayerNorm (Xiong et al., 2020, "On Layer Normalization in the Transformer
Architecture"), as in ViT/MBT and MulT: ``x + attn(LN(x))`` then ``x + mlp(LN(x))``; a
stack ends with one more LayerNorm.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from lepton_mm._validation import check_positive_int

Array = jax.Array

# Replaces the scores of masked keys. Finite, so softmax over a row that is entirely
# masked stays finite (its output is then zeroed explicitly).
_MASKED_SCORE = -1e30

KERNEL_INIT = nnx.initializers.xavier_uniform()
EMBED_INIT = nnx.initializers.normal(stddev=0.02)

POSITION_KINDS = ("sinusoidal", "learned", "none")


def check_rate(name: str, rate: float) -> float:
    """Returns ``rate`` as a float if it lies in ``[0, 1)``, else raises naming ``name``."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
        raise ValueError(f"{name}: expected a rate in [0, 1), got {rate!r}.")
    return float(rate)


def check_heads(width_name: str, width: int, num_heads: int) -> None:
    """Raises unless ``num_heads`` divides ``width``."""
    if width % num_heads:
        raise ValueError(
            f"num_heads: must divide {width_name}={width}, got {num_heads}.")


def valid_positions(mask: Array) -> Array:
    """int32 ``[batch, time]``: index of each valid token among the valid tokens of its row.

    Masked positions get the index of the last valid token before them (0 if none); they
    are never read as real tokens.
    """
    return jnp.maximum(jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1, 0)


def sinusoidal_embedding(positions: Array, dim: int) -> Array:
    """float32 ``[*positions.shape, dim]``: the fixed sin/cos code of Vaswani et al. (2017).

    Uses the ``[sin | cos]`` half layout of tensor2tensor/fairseq (as in MulT); an odd
    ``dim`` gets a trailing zero column.
    """
    half = dim // 2
    scale = math.log(10000.0) / max(half - 1, 1)
    freqs = jnp.exp(-scale * jnp.arange(half, dtype=jnp.float32))
    angles = jnp.einsum("...,k->...k", positions.astype(jnp.float32), freqs)
    emb = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros((*emb.shape[:-1], 1), jnp.float32)], axis=-1)
    return emb


class PositionEmbedding(nnx.Module):
    """Position code for one sequence, indexed by ``valid_positions(mask)``.

    Args:
      kind: ``"sinusoidal"`` (fixed, any length), ``"learned"`` (a ``[max_len, dim]``
        table initialised N(0, 0.02²), as in ViT/MBT) or ``"none"`` (zeros).
      dim: feature size.
      max_len: table size for ``"learned"``; longer inputs raise ``ValueError``.
      rngs: initialisation randomness.
    """

    def __init__(self, kind: str, dim: int, *, max_len: int, rngs: nnx.Rngs):
        if kind not in POSITION_KINDS:
            raise ValueError(
                f"position_embedding: expected one of {POSITION_KINDS}, got {kind!r}.")
        self.kind = kind
        self.dim = dim
        self.max_len = check_positive_int("max_len", max_len)
        self.table = (nnx.Param(EMBED_INIT(rngs.params(), (max_len, dim), jnp.float32))
                      if kind == "learned" else None)

    def __call__(self, mask: Array, *, name: str = "tokens") -> Array:
        """float32 ``[batch, time, dim]`` for a bool ``mask [batch, time]``."""
        positions = valid_positions(mask)
        if self.kind == "sinusoidal":
            return sinusoidal_embedding(positions, self.dim)
        if self.kind == "learned":
            if mask.shape[1] > self.max_len:
                raise ValueError(
                    f"{name}: sequence length {mask.shape[1]} exceeds max_len={self.max_len} "
                    "of the learned position embedding; raise max_len or truncate.")
            return jnp.take(self.table[...], positions, axis=0)
        return jnp.zeros((*mask.shape, self.dim), jnp.float32)


class MultiHeadAttention(nnx.Module):
    """Masked multi-head dot-product attention (queries from ``x``, keys/values from
    ``context``), softmax in float32.

    A query whose ``context_mask`` row is all False receives exact zeros.
    """

    def __init__(self, dim: int, num_heads: int, *, attention_dropout: float, dtype,
                 rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        linear = lambda: nnx.Linear(dim, dim, dtype=dtype, kernel_init=KERNEL_INIT,
                                    rngs=rngs)
        self.query = linear()
        self.key = linear()
        self.value = linear()
        self.out = linear()
        self.dropout = nnx.Dropout(attention_dropout, rngs=rngs)

    def __call__(self, x: Array, context: Array, context_mask: Array, *,
                 rngs: nnx.Rngs | None = None) -> Array:
        # x: [batch, tq, dim]; context: [batch, tk, dim]; context_mask: bool [batch, tk].
        batch, tq, dim = x.shape
        tk = context.shape[1]
        # Masked keys must not reach a matmul either: 0 * NaN would poison the values
        # (and the gradients of the queries).
        context = jnp.where(context_mask[..., None], context, 0)
        q = self.query(x).reshape(batch, tq, self.num_heads, self.head_dim)
        k = self.key(context).reshape(batch, tk, self.num_heads, self.head_dim)
        v = self.value(context).reshape(batch, tk, self.num_heads, self.head_dim)
        q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(self.head_dim)
        key_mask = context_mask[:, None, None, :]
        scores = jnp.where(key_mask, scores, _MASKED_SCORE)
        # Masked keys already get exp(-1e30 - max) = 0 unless the whole row is masked;
        # multiplying by the mask makes such a row all zeros instead of uniform.
        probs = jax.nn.softmax(scores, axis=-1) * key_mask
        probs = self.dropout(probs, rngs=rngs)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, tq, dim)
        out = self.out(out).astype(jnp.float32)
        has_key = jnp.any(context_mask, axis=1)[:, None, None]
        return jnp.where(has_key, out, 0.0)


class TransformerBlock(nnx.Module):
    """Pre-LayerNorm Transformer block: (cross- or self-) attention, then a GELU MLP.

    Self-attention: ``x + drop(attn(LN(x), LN(x)))``; cross-attention (``cross=True``):
    ``x + drop(attn(LN(x), LN_kv(context)))`` with its own LayerNorm for the context.
    Then ``x + drop(W2 drop(gelu(W1 LN(x))))``. The residual stream stays float32.

    Args:
      dim: width of the residual stream (and of the context, for cross-attention).
      num_heads: attention heads; must divide ``dim``.
      mlp_dim: hidden size of the MLP.
      cross: whether keys/values come from a separate ``context`` sequence.
      dropout: rate on the residual branches and the MLP hidden layer.
      attention_dropout: rate on attention probabilities.
      dtype: compute dtype of the dense layers.
      rngs: initialisation and default dropout randomness.
    """

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, *, cross: bool = False,
                 dropout: float, attention_dropout: float, dtype, rngs: nnx.Rngs):
        norm = lambda: nnx.LayerNorm(dim, dtype=jnp.float32, rngs=rngs)
        self.cross = cross
        self.attention_norm = norm()
        self.context_norm = norm() if cross else None
        self.attention = MultiHeadAttention(
            dim, num_heads, attention_dropout=attention_dropout, dtype=dtype, rngs=rngs)
        self.attention_dropout = nnx.Dropout(dropout, rngs=rngs)
        self.mlp_norm = norm()
        self.mlp_in = nnx.Linear(dim, mlp_dim, dtype=dtype, kernel_init=KERNEL_INIT,
                                 rngs=rngs)
        self.mlp_out = nnx.Linear(mlp_dim, dim, dtype=dtype, kernel_init=KERNEL_INIT,
                                  rngs=rngs)
        self.mlp_hidden_dropout = nnx.Dropout(dropout, rngs=rngs)
        self.mlp_dropout = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, x: Array, mask: Array, context: Array | None = None,
                 context_mask: Array | None = None, *,
                 rngs: nnx.Rngs | None = None) -> Array:
        """Args: ``x`` float ``[batch, tq, dim]``, ``mask`` bool ``[batch, tq]`` (keys of
        self-attention); for cross-attention ``context [batch, tk, dim]`` and
        ``context_mask [batch, tk]``. Returns float32 ``[batch, tq, dim]``."""
        x = x.astype(jnp.float32)
        h = self.attention_norm(x)
        if self.cross:
            kv, kv_mask = self.context_norm(context.astype(jnp.float32)), context_mask
        else:
            kv, kv_mask = h, mask
        y = self.attention(h, kv, kv_mask, rngs=rngs)
        x = x + self.attention_dropout(y, rngs=rngs)
        h = self.mlp_norm(x)
        h = jax.nn.gelu(self.mlp_in(h), approximate=False)
        h = self.mlp_out(self.mlp_hidden_dropout(h, rngs=rngs)).astype(jnp.float32)
        return x + self.mlp_dropout(h, rngs=rngs)


class TransformerStack(nnx.Module):
    """``num_layers`` ``TransformerBlock``s and a final LayerNorm.

    For cross-attention stacks the same ``context`` feeds every layer (as in MulT's
    cross-modal transformer).
    """

    def __init__(self, num_layers: int, dim: int, num_heads: int, mlp_dim: int, *,
                 cross: bool = False, dropout: float, attention_dropout: float, dtype,
                 rngs: nnx.Rngs):
        self.layers = nnx.List([
            TransformerBlock(dim, num_heads, mlp_dim, cross=cross, dropout=dropout,
                             attention_dropout=attention_dropout, dtype=dtype, rngs=rngs)
            for _ in range(num_layers)
        ])
        self.norm = nnx.LayerNorm(dim, dtype=jnp.float32, rngs=rngs)

    def __call__(self, x: Array, mask: Array, context: Array | None = None,
                 context_mask: Array | None = None, *,
                 rngs: nnx.Rngs | None = None) -> Array:
        for layer in self.layers:
            x = layer(x, mask, context, context_mask, rngs=rngs)
        return self.norm(x)


def last_valid(x: Array, mask: Array) -> Array:
    """float ``[batch, dim]``: the last position of ``x [batch, time, dim]`` whose mask is
    True (wherever the padding sits); zeros for a row with no valid position."""
    index = jnp.max(jnp.where(mask, jnp.arange(mask.shape[1])[None, :], 0), axis=1)
    picked = jnp.take_along_axis(x, index[:, None, None], axis=1)[:, 0]
    return jnp.where(jnp.any(mask, axis=1)[:, None], picked, 0.0)
