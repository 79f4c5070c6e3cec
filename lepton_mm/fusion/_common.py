"""Shared pieces of the classic fusion layers (private).

Selecting an absent modality's features away (``jnp.where``, never a multiplication, so
NaN/Inf in absent rows cannot leak), a softmax restricted to present modalities, a
small MLP with dropout, and hyperparameter checks.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lepton_mm.types import EncoderOutput

Array = jax.Array


def pooled_or_zeros(x: EncoderOutput) -> Array:
    """float32 ``[batch, dim]``: ``x.pooled`` where the modality is present, else zeros.

    Absent rows are *selected* away, so their values (even NaN/Inf) never reach the
    result.
    """
    return jnp.where(x.present[:, None], x.pooled.astype(jnp.float32), 0.0)


def masked_softmax(logits: Array, mask: Array, axis: int = -1) -> Array:
    """Softmax over ``axis`` restricted to entries where ``mask`` is True.

    Args:
      logits: float array.
      mask: bool array of the same shape as ``logits``.
      axis: the axis normalised over.

    Returns:
      Weights of ``logits``' shape that sum to 1 over the True entries along ``axis``
      and are exactly 0 at False entries; a slice with no True entry is all zeros.
      Masked logits never influence the result, even if they are NaN or Inf.
    """
    neg = jnp.finfo(logits.dtype).min
    weights = jax.nn.softmax(jnp.where(mask, logits, neg), axis=axis)
    return jnp.where(mask, weights, 0.0)


def check_rate(name: str, rate: Any) -> float:
    """Returns ``rate`` as a float if it is a real number in [0, 1), else raises."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name}: expected a float in [0, 1), got {type(rate).__name__}.")
    if not 0.0 <= float(rate) < 1.0:
        raise ValueError(f"{name}: expected a rate in [0, 1), got {rate!r}.")
    return float(rate)


def check_hidden(name: str, hidden: Sequence[int]) -> tuple[int, ...]:
    """Returns ``hidden`` as a tuple of positive ints (possibly empty), else raises."""
    if isinstance(hidden, (int, np.integer)):
        raise TypeError(
            f"{name}: expected a sequence of layer sizes, got the int {hidden!r} "
            f"(write ({hidden},) for one hidden layer).")
    sizes = tuple(hidden)
    for h in sizes:
        if isinstance(h, bool) or not isinstance(h, (int, np.integer)) or h <= 0:
            raise ValueError(f"{name}: expected positive integers, got {hidden!r}.")
    return tuple(int(h) for h in sizes)


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """Returns ``value`` if it is one of ``choices``, else raises listing them."""
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}.")
    return value


class MLP(nnx.Module):
    """``dropout → Linear → ReLU`` per hidden layer, then ``dropout → Linear``.

    With ``hidden=()`` this is ``dropout → Linear``. Dropout is active in training mode
    only (``model.train()`` / ``model.eval()``).
    """

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int, *,
                 dropout: float, rngs: nnx.Rngs):
        sizes = (in_dim, *hidden, out_dim)
        self.linears = nnx.List([
            nnx.Linear(a, b, rngs=rngs) for a, b in itertools.pairwise(sizes)
        ])
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None

    def __call__(self, x: Array, *, rngs: nnx.Rngs | None = None) -> Array:
        """float ``[batch, in_dim]`` → float ``[batch, out_dim]``."""
        last = len(self.linears) - 1
        for i, linear in enumerate(self.linears):
            if self.dropout is not None:
                x = self.dropout(x, rngs=rngs)
            x = linear(x)
            if i < last:
                x = jax.nn.relu(x)
        return x
