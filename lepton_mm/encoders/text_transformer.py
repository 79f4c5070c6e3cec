"""A BERT-compatible text encoder in Flax NNX.

The architecture follows BERT (Devlin et al., 2019) exactly enough that the weights of any
``BertModel`` checkpoint (BERT, MiniLM, all-MiniLM-L6-v2, ...) load into it with
``lepton_mm.pretrained.load_text_transformer``:

  embeddings = LayerNorm(word[ids] + position[0..time) + segment[segment_ids]) -> dropout
  each block (post-LayerNorm):
    x = LayerNorm(x + dropout(dense(self_attention(x, mask))))
    x = LayerNorm(x + dropout(dense(gelu(dense(x)))))      # exact (erf) GELU

The output follows the library interface: ``EncoderOutput(tokens, mask, pooled)`` with
``pooled`` the masked mean of the final hidden states (the sentence-transformers recipe),
not BERT's ``[CLS]`` pooler.

References:
  Devlin et al., "BERT: Pre-training of Deep Bidirectional Transformers for Language
  Understanding", NAACL 2019. https://arxiv.org/abs/1810.04805
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from lepton_mm._validation import check_array, check_ids_in_range, check_positive_int
from lepton_mm.types import EncoderOutput

Array = jax.Array

# Added to attention scores at padded keys. Finite (not -inf) so that a row whose keys
# are all padding still gets a well-defined (uniform) softmax instead of NaN.
_MASK_BIAS = -1e9

_kernel_init = nnx.initializers.normal(stddev=0.02)


class _SelfAttention(nnx.Module):
    """Multi-head self-attention with BERT's parameter layout (query/key/value/output)."""

    def __init__(self, dim: int, num_heads: int, *, dropout: float, dtype, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        linear = lambda: nnx.Linear(dim, dim, dtype=dtype, kernel_init=_kernel_init, rngs=rngs)
        self.query = linear()
        self.key = linear()
        self.value = linear()
        self.output = linear()
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, x: Array, bias: Array, rngs: nnx.Rngs | None) -> Array:
        # x: [batch, time, dim]; bias: float32 [batch, 1, 1, time], 0 or _MASK_BIAS.
        batch, time, dim = x.shape
        heads = lambda y: y.reshape(batch, time, self.num_heads, self.head_dim)
        q = heads(self.query(x)).astype(jnp.float32)
        k = heads(self.key(x)).astype(jnp.float32)
        v = heads(self.value(x)).astype(jnp.float32)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(self.head_dim)
        probs = jax.nn.softmax(scores + bias, axis=-1)
        probs = self.dropout(probs, rngs=rngs)
        context = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, time, dim)
        return self.output(context)


class _EncoderBlock(nnx.Module):
    """One post-LayerNorm BERT layer: attention, then the GELU MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, *, dropout: float,
                 attention_dropout: float, layer_norm_eps: float, dtype, rngs: nnx.Rngs):
        self.attention = _SelfAttention(
            dim, num_heads, dropout=attention_dropout, dtype=dtype, rngs=rngs)
        self.attention_dropout = nnx.Dropout(dropout, rngs=rngs)
        self.attention_norm = nnx.LayerNorm(
            dim, epsilon=layer_norm_eps, dtype=jnp.float32, rngs=rngs)
        self.mlp_in = nnx.Linear(dim, mlp_dim, dtype=dtype, kernel_init=_kernel_init,
                                 rngs=rngs)
        self.mlp_out = nnx.Linear(mlp_dim, dim, dtype=dtype, kernel_init=_kernel_init,
                                  rngs=rngs)
        self.mlp_dropout = nnx.Dropout(dropout, rngs=rngs)
        self.mlp_norm = nnx.LayerNorm(dim, epsilon=layer_norm_eps, dtype=jnp.float32,
                                      rngs=rngs)

    def __call__(self, x: Array, bias: Array, rngs: nnx.Rngs | None) -> Array:
        y = self.attention_dropout(self.attention(x, bias, rngs), rngs=rngs)
        x = self.attention_norm(x + y)
        y = self.mlp_out(jax.nn.gelu(self.mlp_in(x), approximate=False))
        y = self.mlp_dropout(y, rngs=rngs)
        return self.mlp_norm(x + y)


class TextTransformer(nnx.Module):
    """BERT-compatible transformer encoder over token ids.

    Parameters are float32; ``dtype`` sets the compute dtype of the dense layers and
    embeddings (e.g. ``jnp.bfloat16`` on accelerators). Attention scores, softmax and
    LayerNorm always run in float32, so hidden states and outputs are float32.

    Like every NNX module it starts in training mode (dropout on); call ``model.eval()``
    for inference and ``model.train()`` to switch back.

    Args:
      vocab_size: number of token ids.
      dim: hidden size.
      num_layers: number of transformer blocks.
      num_heads: attention heads; must divide ``dim``.
      mlp_dim: hidden size of each block's MLP (BERT's ``intermediate_size``).
      max_len: number of learned positions; longer inputs raise ``ValueError``.
      rngs: ``nnx.Rngs`` for initialisation (``params``) and, in training mode, the
        default ``dropout`` stream.
      type_vocab_size: number of segment ids (BERT's ``token_type``).
      dropout: dropout rate on embeddings and on each block's residual branches.
      attention_dropout: dropout rate on attention probabilities.
      layer_norm_eps: LayerNorm epsilon (BERT uses 1e-12).
      dtype: compute dtype of the dense layers and embedding lookups.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> model = TextTransformer(100, dim=32, num_layers=2, num_heads=4, mlp_dim=64,
      ...                         max_len=16, rngs=nnx.Rngs(0))
      >>> model.eval()
      >>> ids = jnp.array([[5, 6, 7, 0]], dtype=jnp.int32)
      >>> out = model(ids, jnp.array([[True, True, True, False]]))
      >>> out.tokens.shape, out.pooled.shape
      ((1, 4, 32), (1, 32))
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        dim: int,
        num_layers: int,
        num_heads: int,
        mlp_dim: int,
        max_len: int,
        rngs: nnx.Rngs,
        type_vocab_size: int = 2,
        dropout: float = 0.1,
        attention_dropout: float = 0.1,
        layer_norm_eps: float = 1e-12,
        dtype: jnp.dtype = jnp.float32,
    ):
        self.vocab_size = check_positive_int("vocab_size", vocab_size)
        self.dim = check_positive_int("dim", dim)
        self.num_layers = check_positive_int("num_layers", num_layers)
        self.num_heads = check_positive_int("num_heads", num_heads)
        self.mlp_dim = check_positive_int("mlp_dim", mlp_dim)
        self.max_len = check_positive_int("max_len", max_len)
        self.type_vocab_size = check_positive_int("type_vocab_size", type_vocab_size)
        if dim % num_heads:
            raise ValueError(f"num_heads: must divide dim={dim}, got {num_heads}.")
        for name, rate in (("dropout", dropout), ("attention_dropout", attention_dropout)):
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"{name}: expected a rate in [0, 1), got {rate!r}.")
        self.dropout_rate = float(dropout)
        self.attention_dropout_rate = float(attention_dropout)
        self.layer_norm_eps = float(layer_norm_eps)

        embed = lambda n: nnx.Embed(n, dim, dtype=dtype, embedding_init=_kernel_init,
                                    rngs=rngs)
        self.word_embeddings = embed(vocab_size)
        self.position_embeddings = embed(max_len)
        self.segment_embeddings = embed(type_vocab_size)
        self.embed_norm = nnx.LayerNorm(dim, epsilon=layer_norm_eps, dtype=jnp.float32,
                                        rngs=rngs)
        self.embed_dropout = nnx.Dropout(dropout, rngs=rngs)
        self.layers = nnx.List([
            _EncoderBlock(dim, num_heads, mlp_dim, dropout=dropout,
                          attention_dropout=attention_dropout,
                          layer_norm_eps=layer_norm_eps, dtype=dtype, rngs=rngs)
            for _ in range(num_layers)
        ])

    def __call__(
        self,
        token_ids: Array,
        mask: Array,
        *,
        segment_ids: Array | None = None,
        rngs: nnx.Rngs | None = None,
    ) -> EncoderOutput:
        """Encodes a batch of token sequences.

        Ids at masked positions are ignored (replaced by 0 before the lookup), so padding
        may hold any value. Valid ids must lie in ``[0, vocab_size)``: this is checked
        when ``token_ids`` is concrete (numpy or an eager ``jax.Array``); under ``jax.jit``
        it cannot be, and an out-of-range id yields NaN features for that token.

        Args:
          token_ids: integer ``[batch, time]`` with ``time <= max_len``.
          mask: bool ``[batch, time]``, True at real tokens. Padded keys get no attention.
          segment_ids: integer ``[batch, time]`` in ``[0, type_vocab_size)``; zeros when
            omitted.
          rngs: dropout randomness in training mode; defaults to the stream given at
            construction.

        Returns:
          ``EncoderOutput``: ``tokens`` float32 ``[batch, time, dim]`` (final hidden
          states, zero at masked positions), ``mask`` as given, ``pooled`` float32
          ``[batch, dim]``, their masked mean (zeros for an all-False row).

        Raises:
          TypeError: an argument is not an array or has the wrong dtype kind.
          ValueError: wrong rank or shape, ``time > max_len``, or a concrete id out of
            range.
        """
        dims: dict[str, int] = {}
        check_array("token_ids", token_ids, "batch time", kind="int", dims=dims)
        check_array("mask", mask, "batch time", kind="bool", dims=dims)
        if segment_ids is not None:
            check_array("segment_ids", segment_ids, "batch time", kind="int", dims=dims)
        time = dims["time"]
        if time > self.max_len:
            raise ValueError(
                f"token_ids: sequence length {time} exceeds max_len={self.max_len}; "
                "truncate the input.")
        check_ids_in_range("token_ids", token_ids, mask, self.vocab_size)
        if segment_ids is not None:
            check_ids_in_range("segment_ids", segment_ids, mask, self.type_vocab_size)

        mask = jnp.asarray(mask)
        token_ids = jnp.where(mask, token_ids, 0)
        if segment_ids is None:
            segment_ids = jnp.zeros_like(token_ids)
        else:
            segment_ids = jnp.where(mask, segment_ids, 0)

        positions = self.position_embeddings(jnp.arange(time))[None]
        x = (self.word_embeddings(token_ids).astype(jnp.float32)
             + positions.astype(jnp.float32)
             + self.segment_embeddings(segment_ids).astype(jnp.float32))
        x = self.embed_dropout(self.embed_norm(x), rngs=rngs)

        bias = jnp.where(mask, 0.0, _MASK_BIAS).astype(jnp.float32)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, bias, rngs)
        return EncoderOutput.from_tokens(x, mask)
