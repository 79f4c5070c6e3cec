"""Cross-modal attention that resamples one modality's tokens onto another's time axis."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from lepton_mm._validation import check_positive_int
from lepton_mm.alignment.losses import _NEG
from lepton_mm.types import EncoderOutput, masked_mean

Array = jax.Array


def _check_output(name: str, value: object, dim: int, dim_name: str) -> EncoderOutput:
    if not isinstance(value, EncoderOutput):
        raise TypeError(f"{name}: expected an EncoderOutput, got {type(value).__name__}.")
    value.validate(name)
    if value.dim != dim:
        raise ValueError(
            f"{name}.tokens: expected feature size {dim_name}={dim}, got {value.dim} "
            f"(shape {tuple(value.tokens.shape)}).")
    return value


class CrossModalAligner(nnx.Module):
    """Masking-aware multi-head cross-attention from a target modality to a source one.

    Queries come from the target's tokens, keys and values from the source's, so the
    output lives on the *target's* time axis: the source sequence resampled onto it
    (e.g. audio frames aligned to text tokens)::

      tokens = W_o · MultiHead(softmax(q kᵀ/√d_h, masked) v)      [batch, time_target, dim]
      mask   = target.mask ∧ (source present)
      pooled = masked mean of tokens over mask

    Masking: source positions with ``mask`` False receive exactly zero attention weight,
    and masked tokens of either input are zeroed before projection, so NaN/Inf there
    never reach the outputs or the gradients. An example whose source is absent (its
    mask row all False) gets all-zero tokens, an all-False mask row and a zero
    ``pooled``; masked target positions are zero as well. Attention logits and softmax
    are computed in float32.

    Args:
      query_dim: feature size of the target's tokens.
      source_dim: feature size of the source's tokens.
      dim: output (and attention) size; divisible by ``num_heads``.
      num_heads: number of attention heads.
      rngs: ``nnx.Rngs`` for initialisation (``params``) and, in training mode, dropout.
      dropout: dropout rate on the attention weights, in ``[0, 1)``.
      dtype: compute dtype of the projections (parameters stay float32).

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from lepton_mm.types import EncoderOutput
      >>> text = EncoderOutput.from_tokens(jnp.ones((2, 5, 8)))
      >>> audio = EncoderOutput.from_tokens(jnp.ones((2, 7, 6)),
      ...                                   jnp.array([[True] * 7, [False] * 7]))
      >>> out = CrossModalAligner(8, 6, dim=4, num_heads=2, rngs=nnx.Rngs(0))(text, audio)
      >>> out.tokens.shape, out.mask.sum(axis=1).tolist()
      ((2, 5, 4), [5, 0])
    """

    def __init__(self, query_dim: int, source_dim: int, *, dim: int, num_heads: int,
                 rngs: nnx.Rngs, dropout: float = 0.0, dtype: jnp.dtype | None = None):
        self.query_dim = check_positive_int("query_dim", query_dim)
        self.source_dim = check_positive_int("source_dim", source_dim)
        self.dim = check_positive_int("dim", dim)
        self.num_heads = check_positive_int("num_heads", num_heads)
        if dim % num_heads:
            raise ValueError(f"num_heads: must divide dim={dim}, got {num_heads}.")
        if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a rate in [0, 1), got {dropout!r}.")
        linear = lambda i, o: nnx.Linear(i, o, dtype=dtype, param_dtype=jnp.float32,
                                         rngs=rngs)
        self.query = linear(query_dim, dim)
        self.key = linear(source_dim, dim)
        self.value = linear(source_dim, dim)
        self.output = linear(dim, dim)
        self.dropout = nnx.Dropout(float(dropout), rngs=rngs)

    def __call__(self, target: EncoderOutput, source: EncoderOutput, *,
                 rngs: nnx.Rngs | None = None) -> EncoderOutput:
        """Resamples ``source`` onto ``target``'s time axis.

        Args:
          target: tokens ``[batch, time_target, query_dim]`` (the queries) and mask.
          source: tokens ``[batch, time_source, source_dim]`` (keys/values) and mask.
          rngs: dropout randomness in training mode; defaults to the stream given at
            construction.

        Returns:
          ``EncoderOutput`` with tokens ``[batch, time_target, dim]``, mask
          ``target.mask & source.present[:, None]`` and pooled ``[batch, dim]``.

        Raises:
          TypeError: an input is not an ``EncoderOutput`` or has wrong dtypes.
          ValueError: malformed inputs, feature sizes other than ``query_dim`` /
            ``source_dim``, or different batch sizes.
        """
        target = _check_output("target", target, self.query_dim, "query_dim")
        source = _check_output("source", source, self.source_dim, "source_dim")
        if source.batch_size != target.batch_size:
            raise ValueError(
                f"source.tokens: expected batch={target.batch_size} (as target), got "
                f"shape {tuple(source.tokens.shape)}.")
        batch, time_target = target.mask.shape
        time_source = source.mask.shape[1]
        head_dim = self.dim // self.num_heads

        def heads(x: Array, time: int) -> Array:
            return x.reshape(batch, time, self.num_heads, head_dim).astype(jnp.float32)

        queries = jnp.where(target.mask[..., None], target.tokens, 0)
        keys_values = jnp.where(source.mask[..., None], source.tokens, 0)
        q = heads(self.query(queries), time_target)
        k = heads(self.key(keys_values), time_source)
        v = heads(self.value(keys_values), time_source)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
        key_mask = source.mask[:, None, None, :]
        weights = jax.nn.softmax(jnp.where(key_mask, logits, _NEG), axis=-1)
        weights = jnp.where(key_mask, weights, 0.0)  # rows with no valid key → 0
        weights = self.dropout(weights, rngs=rngs)
        attended = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        out = self.output(attended.reshape(batch, time_target, self.dim))
        mask = target.mask & source.present[:, None]
        tokens = jnp.where(mask[..., None], out, 0)
        return EncoderOutput(tokens=tokens, mask=mask, pooled=masked_mean(tokens, mask))
