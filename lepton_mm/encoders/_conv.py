"""Shared pieces of the convolutional encoders (private).

Input checks with a conversion hint, per-layer configuration, the MultiBench-matching
kernel initialiser, exact masked pooling and a batch norm whose statistics ignore
masked positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lepton_mm._validation import check_array, format_layout

Array = jax.Array

# MultiBench's LeNet calls ``nn.init.kaiming_uniform_`` on every conv: a uniform
# distribution with bound sqrt(6 / fan_in), which is exactly He-uniform.
conv_kernel_init = nnx.initializers.he_uniform()

# PyTorch's BatchNorm2d defaults (momentum 0.1 there = decay 0.9 here; eps 1e-5).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def check_float_input(
    name: str, x: Any, layout: str, dims: dict[str, int], hint: str) -> None:
    """Like ``check_array(..., kind="float")`` but the dtype error carries ``hint``."""
    if hasattr(x, "shape") and hasattr(x, "dtype") and not jnp.issubdtype(
            x.dtype, jnp.floating):
        raise TypeError(
            f"{name}: expected a floating-point array with shape "
            f"{format_layout(layout.split(), dims)}, got dtype {np.dtype(x.dtype)}. {hint}")
    check_array(name, x, layout, kind="float", dims=dims, allow_empty=False)


def per_layer(name: str, value: int | Sequence[int], n: int) -> tuple[int, ...]:
    """Expands an int to ``n`` copies, or checks a sequence has ``n`` positive ints."""
    values = (value,) * n if isinstance(value, (int, np.integer)) else tuple(value)
    if len(values) != n:
        raise ValueError(
            f"{name}: expected an int or one value per layer ({n}), got {value!r}.")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise ValueError(f"{name}: expected positive integers, got {value!r}.")
    return tuple(int(v) for v in values)


def check_widths(widths: Sequence[int]) -> tuple[int, ...]:
    """Returns ``widths`` as a non-empty tuple of positive ints, else raises."""
    widths = tuple(widths)
    if not widths:
        raise ValueError("widths: expected at least one layer, got ().")
    return per_layer("widths", widths, len(widths))


def max_pool_ceil(x: Array, axis: int, window: int) -> Array:
    """Non-overlapping max pooling along ``axis``, keeping a partial last window.

    The axis is padded with ``-inf`` up to a multiple of ``window``, so no position is
    dropped and padding never wins the max. ``x``'s size along ``axis`` becomes
    ``ceil(size / window)``.
    """
    if window == 1:
        return x
    axis = axis % x.ndim
    size = x.shape[axis]
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, -size % window)
    x = jnp.pad(x, pad, constant_values=-jnp.inf)
    shape = (*x.shape[:axis], x.shape[axis] // window, window, *x.shape[axis + 1:])
    return jnp.max(x.reshape(shape), axis=axis + 1)


def masked_max_pool_time(x: Array, mask: Array, window: int) -> tuple[Array, Array]:
    """Max-pools ``x`` over time in windows of ``window`` frames, ignoring masked frames.

    Args:
      x: float ``[batch, time, freq, channels]``.
      mask: bool ``[batch, time]`` (True = valid).
      window: pooling window and stride along time.

    Returns:
      ``(x, mask)`` with ``time' = ceil(time / window)``. Time is padded with masked
      frames to a multiple of ``window``; masked frames count as ``-inf``; an output
      frame is valid iff any frame in its window is, and invalid outputs are zero.
      Valid outputs therefore depend only on valid inputs.
    """
    if window == 1:
        return x, mask
    batch, time = mask.shape
    pad = -time % window
    x = jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
    mask = jnp.pad(mask, ((0, 0), (0, pad)))  # pads with False
    frames = (time + pad) // window
    x = x.reshape(batch, frames, window, *x.shape[2:])
    window_mask = mask.reshape(batch, frames, window)
    x = jnp.max(jnp.where(window_mask[..., None, None], x, -jnp.inf), axis=2)
    mask = jnp.any(window_mask, axis=2)
    return jnp.where(mask[..., None, None], x, 0), mask


class MaskedBatchNorm(nnx.Module):
    """Batch norm over the last axis whose batch statistics skip masked positions.

    Same variables (``scale``, ``bias``, ``mean``, ``var``), running-average rule and
    ``use_running_average`` switch as ``nnx.BatchNorm`` (so ``model.train()`` and
    ``model.eval()`` reach it), plus a ``mask``. With no valid position in the batch
    the running statistics are left unchanged and the output stays finite.
    """

    def __init__(
        self,
        num_features: int,
        *,
        momentum: float = BN_MOMENTUM,
        epsilon: float = BN_EPSILON,
        use_running_average: bool = False,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        self.scale = nnx.Param(jnp.ones((num_features,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
        self.momentum = momentum
        self.epsilon = epsilon
        self.use_running_average = use_running_average
        self.dtype = dtype

    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        """Normalises ``x`` (float ``[..., features]``).

        Args:
          x: float ``[..., features]``.
          mask: bool, broadcastable to ``x.shape[:-1]``; positions where it is False
            are left out of the batch statistics. All positions count when omitted.

        Returns:
          ``x`` normalised, same shape, in ``dtype`` (default: ``x``'s dtype).
        """
        dtype = self.dtype or x.dtype
        stats_shape = (1,) * (x.ndim - 1) + (-1,)
        if self.use_running_average:
            mean = self.mean[...].reshape(stats_shape)
            var = self.var[...].reshape(stats_shape)
        else:
            xf = x.astype(jnp.float32)
            axes = tuple(range(x.ndim - 1))
            if mask is None:
                mask = jnp.ones(x.shape[:-1], dtype=bool)
            valid = jnp.broadcast_to(mask, x.shape[:-1])[..., None]
            count = jnp.sum(valid, dtype=jnp.float32)
            denom = jnp.maximum(count, 1.0)
            mean = jnp.sum(jnp.where(valid, xf, 0), axis=axes, keepdims=True) / denom
            var = jnp.sum(jnp.where(valid, jnp.square(xf - mean), 0), axis=axes,
                          keepdims=True) / denom
            m, seen = self.momentum, count > 0
            self.mean[...] = jax.lax.stop_gradient(jnp.where(
                seen, m * self.mean[...] + (1 - m) * mean.reshape(-1), self.mean[...]))
            self.var[...] = jax.lax.stop_gradient(jnp.where(
                seen, m * self.var[...] + (1 - m) * var.reshape(-1), self.var[...]))
        scale = self.scale[...].astype(jnp.float32).reshape(stats_shape)
        bias = self.bias[...].astype(jnp.float32).reshape(stats_shape)
        y = (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + self.epsilon)
        return (y * scale + bias).astype(dtype)
