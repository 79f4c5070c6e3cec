"""Recurrent (GRU / LSTM) encoders over frame sequences and token sequences.

``RecurrentEncoder`` runs a stack of Flax NNX recurrent cells (``nnx.GRUCell`` or
``nnx.OptimizedLSTMCell``) over float frames ``[batch, time, features]`` (log-mel
spectrograms, or any per-frame features); ``RecurrentTextEncoder`` looks token ids up in
an embedding table and runs the same stack. Both return one token per input frame.

Masking is exact for any mask, not only for right-padded ones. Each direction is a
``jax.lax.scan`` over time whose carry is updated only at valid frames (held at masked
ones), and every layer's input is zeroed at masked frames first (a selection, so NaN/Inf
there cannot leak). Hence a sequence with padding (or holes) gives exactly what its
valid frames alone give, packed together:

* the forward direction starts from a zero state at the first valid frame;
* the backward direction scans from the end of the padded axis, keeping its zero state
  through the trailing padding, so it starts at each example's *last valid* frame (as
  PyTorch's ``pack_padded_sequence`` does), not at the padded end.

This is why the cells are scanned here rather than with ``nnx.RNN(seq_lengths=...)`` /
``nnx.Bidirectional``: those assume a right-padded prefix mask and read the values of
any hole in it.

Cell conventions (Flax 0.12, checked against ``torch.nn.GRU``/``torch.nn.LSTM`` in
tests/test_recurrent.py): both gate layouts are PyTorch's (GRU gates ``r, z, n``, reset
gate applied *after* the recurrent matmul, ``n = tanh(W_in x + b_in + r * (W_hn h))``;
LSTM gates ``i, f, g, o``). Flax's GRU has no recurrent bias, so it equals a
``torch.nn.GRU`` whose ``bias_hh`` is zero; its LSTM keeps one bias (on the recurrent
side), i.e. PyTorch's ``bias_ih + bias_hh``.

References:
  Cho et al., "Learning Phrase Representations using RNN Encoder-Decoder for
  Statistical Machine Translation", EMNLP 2014 (GRU).
  Hochreiter & Schmidhuber, "Long Short-Term Memory", Neural Computation 1997.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lepton_mm._validation import check_array, check_ids_in_range, check_positive_int
from lepton_mm.encoders._conv import check_float_input
from lepton_mm.types import EncoderOutput

Array = jax.Array

_CELLS = {"gru": nnx.GRUCell, "lstm": nnx.OptimizedLSTMCell}
_DTYPE_HINT = "Pass float frames (e.g. float32 log-mels); token ids go to RecurrentTextEncoder."


def _zero_carry(cell: nnx.Module, batch: int) -> Any:
    """The cell's zero state: ``h`` (GRU) or ``(c, h)`` (LSTM), each float32 ``[batch, hidden]``."""
    h = jnp.zeros((batch, cell.hidden_features), jnp.float32)
    return (h, h) if isinstance(cell, nnx.OptimizedLSTMCell) else h


def _scan_cell(cell: nnx.Module, x: Array, mask: Array, *, reverse: bool) -> Array:
    """Runs ``cell`` over time, updating its state only where ``mask`` is True.

    Args:
      cell: an ``nnx.GRUCell`` or ``nnx.OptimizedLSTMCell``.
      x: float ``[batch, time, in_features]``, zero at masked frames.
      mask: bool ``[batch, time]``.
      reverse: scan from the last frame to the first (outputs stay in time order).

    Returns:
      float ``[batch, time, hidden]``: the hidden state after each valid frame, zero at
      masked frames.
    """
    graphdef, state = nnx.split(cell)

    def step(carry, inputs):
        x_t, valid = inputs  # [batch, in_features], [batch]
        new_carry, y = nnx.merge(graphdef, state)(carry, x_t)
        keep = valid[:, None]
        carry = jax.tree.map(lambda new, old: jnp.where(keep, new.astype(old.dtype), old),
                             new_carry, carry)
        return carry, jnp.where(keep, y, jnp.zeros((), y.dtype))

    _, ys = jax.lax.scan(step, _zero_carry(cell, x.shape[0]),
                         (jnp.swapaxes(x, 0, 1), jnp.swapaxes(mask, 0, 1)), reverse=reverse)
    return jnp.swapaxes(ys, 0, 1)


class RecurrentEncoder(nnx.Module):
    """Stacked (bi)directional GRU or LSTM over frames ``[batch, time, features]``.

    Layer ``l`` runs one cell forward in time (and, if ``bidirectional``, a second one
    backward, their hidden states concatenated forward first), with dropout on its
    input for ``l > 0`` (between layers, as ``torch.nn.GRU(dropout=...)``). The last
    layer's ``[batch, time, directions * hidden_size]`` states are projected to ``dim``
    by a linear layer only when the sizes differ. The initial state is zero.

    Output tokens are the per-frame states (zero at masked frames); ``pooled`` is their
    masked mean (not the final state), zeros for an example whose mask is all False.
    Masked frames are never read (see the module docstring): in eval and training mode
    alike, any values there leave the valid tokens and ``pooled`` bitwise unchanged, and
    in eval mode so does the amount of trailing padding.

    The module starts in training mode: call ``model.eval()`` for inference.

    Args:
      features: size of each input frame (the last input axis, e.g. ``n_mels``).
      dim: size of each output token.
      rngs: parameter initialisation and the dropout stream.
      cell: ``"gru"`` (``nnx.GRUCell``) or ``"lstm"`` (``nnx.OptimizedLSTMCell``).
      hidden_size: state size of each cell (per direction); defaults to
        ``ceil(dim / directions)``.
      num_layers: number of stacked recurrent layers.
      bidirectional: add a backward-in-time cell to every layer.
      dropout: dropout rate between layers (training mode only; unused with one layer).
      dtype: computation dtype of the cells and the projection (e.g. ``jnp.bfloat16``);
        parameters and recurrent states stay float32.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> model = RecurrentEncoder(8, dim=6, cell="lstm", bidirectional=True,
      ...                          rngs=nnx.Rngs(0))
      >>> model.eval()
      >>> out = model(jnp.ones((2, 5, 8)), jnp.arange(5)[None, :] < jnp.array([[5], [2]]))
      >>> out.tokens.shape, out.pooled.shape, model.hidden_size
      ((2, 5, 6), (2, 6), 3)
    """

    def __init__(
        self,
        features: int,
        *,
        dim: int,
        rngs: nnx.Rngs,
        cell: str = "gru",
        hidden_size: int | None = None,
        num_layers: int = 1,
        bidirectional: bool = False,
        dropout: float = 0.0,
        dtype: Any = None,
    ):
        self.features = check_positive_int("features", features)
        self.dim = check_positive_int("dim", dim)
        if cell not in _CELLS:
            raise ValueError(f"cell: expected one of {sorted(_CELLS)}, got {cell!r}.")
        self.cell = cell
        self.bidirectional = bool(bidirectional)
        directions = 2 if self.bidirectional else 1
        self.hidden_size = (-(-self.dim // directions) if hidden_size is None
                            else check_positive_int("hidden_size", hidden_size))
        self.num_layers = check_positive_int("num_layers", num_layers)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a rate in [0, 1), got {dropout!r}.")

        make = _CELLS[cell]
        ins = [self.features] + [directions * self.hidden_size] * (self.num_layers - 1)
        self.forward_cells = nnx.List([
            make(n, self.hidden_size, dtype=dtype, rngs=rngs) for n in ins])
        self.backward_cells = nnx.List([
            make(n, self.hidden_size, dtype=dtype, rngs=rngs) for n in ins]
        ) if self.bidirectional else None
        self.dropout = (nnx.Dropout(dropout, rngs=rngs)
                        if dropout > 0 and self.num_layers > 1 else None)
        out = directions * self.hidden_size
        self.proj = nnx.Linear(out, self.dim, dtype=dtype, rngs=rngs) if out != self.dim \
            else None

    def __call__(
        self,
        frames: Array,
        mask: Array | None = None,
        *,
        rngs: nnx.Rngs | None = None,
    ) -> EncoderOutput:
        """Encodes a batch of (possibly padded) frame sequences.

        Args:
          frames: float ``[batch, time, features]``. Values at masked frames are never
            read (they may be NaN).
          mask: bool ``[batch, time]``, True for real frames (any pattern, not only
            right padding); all True when omitted.
          rngs: dropout randomness for this call; the stream given at construction is
            used when omitted. Ignored in eval mode or without dropout.

        Returns:
          ``EncoderOutput`` with tokens float ``[batch, time, dim]`` (the last layer's
          states, projected if needed; zero where masked), mask bool ``[batch, time]``
          (as given) and pooled float ``[batch, dim]``, the masked mean of the tokens
          (zeros for an all-False row).

        Raises:
          TypeError: ``frames`` is not float, or ``mask`` is not bool.
          ValueError: wrong rank, wrong ``features``, empty axes, or a ``mask`` whose
            shape differs from ``frames.shape[:2]``.
        """
        dims = {"features": self.features}
        check_float_input("frames", frames, "batch time features", dims, _DTYPE_HINT)
        if mask is not None:
            check_array("mask", mask, "batch time", kind="bool", dims=dims)
        return self.encode(frames, mask, rngs=rngs)

    def encode(self, frames: Array, mask: Array | None, *,
               rngs: nnx.Rngs | None = None) -> EncoderOutput:
        """``__call__`` without the input checks (for callers that made them already).

        Args:
          frames: float ``[batch, time, features]``.
          mask: bool ``[batch, time]`` or None (all True).
          rngs: dropout randomness, as in ``__call__``.

        Returns:
          The ``EncoderOutput`` that ``__call__`` returns.
        """
        mask = (jnp.ones(frames.shape[:2], dtype=bool) if mask is None
                else jnp.asarray(mask))
        x = frames
        for layer in range(self.num_layers):
            if layer > 0 and self.dropout is not None:
                x = self.dropout(x, rngs=rngs)
            x = jnp.where(mask[..., None], x, jnp.zeros((), x.dtype))
            states = [_scan_cell(self.forward_cells[layer], x, mask, reverse=False)]
            if self.backward_cells is not None:
                states.append(_scan_cell(self.backward_cells[layer], x, mask, reverse=True))
            x = jnp.concatenate(states, axis=-1) if len(states) > 1 else states[0]
        if self.proj is not None:
            x = self.proj(x)
        return EncoderOutput.from_tokens(x.astype(jnp.float32), mask)


class RecurrentTextEncoder(nnx.Module):
    """Token embedding table followed by a ``RecurrentEncoder`` over the embeddings.

    Ids at masked positions are replaced by 0 before the lookup, so padding may hold any
    value; everything else (masking, pooling, layers, dropout) is ``RecurrentEncoder``'s.

    The module starts in training mode: call ``model.eval()`` for inference.

    Args:
      vocab_size: number of token ids.
      embed_dim: size of each token embedding (the recurrent input size).
      dim: size of each output token.
      rngs: parameter initialisation and the dropout stream.
      cell: ``"gru"`` or ``"lstm"``.
      hidden_size: state size of each cell (per direction); defaults to
        ``ceil(dim / directions)``.
      num_layers: number of stacked recurrent layers.
      bidirectional: add a backward-in-time cell to every layer.
      dropout: dropout rate between recurrent layers (training mode only).
      dtype: computation dtype of the embedding lookup, cells and projection.

    Attributes:
      embeddings: the ``nnx.Embed`` table, ``[vocab_size, embed_dim]``.
      rnn: the ``RecurrentEncoder`` over the embeddings.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> model = RecurrentTextEncoder(100, embed_dim=8, dim=6, rngs=nnx.Rngs(0))
      >>> model.eval()
      >>> ids = jnp.array([[5, 6, 7, 0]], dtype=jnp.int32)
      >>> out = model(ids, jnp.array([[True, True, True, False]]))
      >>> out.tokens.shape, out.pooled.shape
      ((1, 4, 6), (1, 6))
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        embed_dim: int,
        dim: int,
        rngs: nnx.Rngs,
        cell: str = "gru",
        hidden_size: int | None = None,
        num_layers: int = 1,
        bidirectional: bool = False,
        dropout: float = 0.0,
        dtype: Any = None,
    ):
        self.vocab_size = check_positive_int("vocab_size", vocab_size)
        self.embed_dim = check_positive_int("embed_dim", embed_dim)
        self.embeddings = nnx.Embed(self.vocab_size, self.embed_dim, dtype=dtype, rngs=rngs)
        self.rnn = RecurrentEncoder(
            self.embed_dim, dim=dim, rngs=rngs, cell=cell, hidden_size=hidden_size,
            num_layers=num_layers, bidirectional=bidirectional, dropout=dropout,
            dtype=dtype)
        self.dim = self.rnn.dim

    def __call__(
        self,
        token_ids: Array,
        mask: Array,
        *,
        rngs: nnx.Rngs | None = None,
    ) -> EncoderOutput:
        """Encodes a batch of token sequences.

        Valid ids must lie in ``[0, vocab_size)``: this is checked when ``token_ids`` is
        concrete (numpy or an eager ``jax.Array``); under ``jax.jit`` it cannot be.

        Args:
          token_ids: integer ``[batch, time]``.
          mask: bool ``[batch, time]``, True at real tokens (any pattern).
          rngs: dropout randomness in training mode; defaults to the stream given at
            construction.

        Returns:
          ``EncoderOutput``: tokens float32 ``[batch, time, dim]`` (zero at masked
          positions), mask as given, pooled float32 ``[batch, dim]``, the masked mean of
          the tokens (zeros for an all-False row).

        Raises:
          TypeError: an argument is not an array or has the wrong dtype kind.
          ValueError: wrong rank or shape, or a concrete id out of range.
        """
        dims: dict[str, int] = {}
        check_array("token_ids", token_ids, "batch time", kind="int", dims=dims)
        check_array("mask", mask, "batch time", kind="bool", dims=dims)
        check_ids_in_range("token_ids", token_ids, mask, self.vocab_size)
        mask = jnp.asarray(mask)
        x = self.embeddings(jnp.where(mask, token_ids, 0)).astype(jnp.float32)
        return self.rnn.encode(x, mask, rngs=rngs)
