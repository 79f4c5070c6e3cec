"""Shared pieces of the convolutional encoders (private).

Input checks with a conversion hint, per-layer configuration, the MultiBench-matching
kernel initialiser, exact masked pooling, a batch norm whose statistics ignore masked
positions, and ``conv_block``: the fused conv -> batch norm -> ReLU -> max-pool block
both CNN encoders run by default.

Why a fused block (measured on a 2-core AMD EPYC CPU with XLA CPU from jaxlib 0.10, the
AV-MNIST LeNets at batch 128; docs/performance.md has the numbers): written with
``nnx.Conv``, ``nnx.BatchNorm`` and window pooling, the training step spent most of its
time outside the arithmetic. ``lax.conv``'s weight gradient collapses on small maps
with many channels (~0.9 s for the 4x2x192->384 layer); im2col + one matmul avoids
that, but with channels last the 12-channel maps of the first layers vectorise badly
and the pooling gradient (reduce-window) dominated. ``conv_block`` therefore:

* keeps activations ``[channels, height, width, batch]``: elementwise and reduction
  passes run over long contiguous rows;
* computes the convolution as ``kernel^T [c_out, c_in*k*k] @ patches`` and lays the
  output positions out in pooling-phase order, ``[c_out, p_h*p_w, h', w', batch]``, so
  batch-norm statistics are one reduction and max pooling is a max over a leading axis
  (its gradient one elementwise pass); ReLU runs after the pool (they commute).

How the patches are made (measured at the AV-MNIST recipe's batch 40, 2-core AMD EPYC,
audio LeNet train step; docs/performance.md): im2col as one gather in phase order
(``conv_patches``, kept as the documented reference layout) copies ``batch``-long runs
and its gradient is a scatter-add, which XLA:CPU runs serially: 71.5 ms per step. Now
the patches are ``k*k`` shifted slices of the padded map in natural order (each a
contiguous ``width * batch`` run per row; the gradient is padded adds, no scatter) and
the ``c_out``-row output is transposed to phase order after the matmul; the first
layer, with one input channel, skips im2col altogether (``k*k`` shifted multiply-adds
forward, XLA's own convolution gradient backward): 51.3 ms. Compilation takes longer
(more, smaller ops): about +4 s for the audio LeNet's train step.

Masked positions (``row_mask``) are selected away with ``jnp.where`` before the matmul
and in every statistic, exactly as ``MaskedBatchNorm`` and ``masked_max_pool_time`` do.
"""

from __future__ import annotations

import functools
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


# ----------------------------------------------------------------------------------------
# The fused conv -> batch norm -> ReLU -> max-pool block ([channels, h, w, batch]).


def same_padding(k: int) -> tuple[int, int]:
    """Low / high zero padding of a stride-1 "SAME" convolution (as ``lax.conv``)."""
    return (k - 1) // 2, k // 2


def _phase_grid(height: int, width: int, pool: tuple[int, int]) -> tuple[int, int]:
    return -(-height // pool[0]), -(-width // pool[1])


def to_channels_first(x: Array) -> Array:
    """``[batch, h, w, c]`` -> ``[c, h, w, batch]``, computed once into its own buffer.

    Left to itself XLA fuses this transpose into the first block's patch gather, which
    then re-reads the input with a stride of ``batch`` for each of the ``k*k*p*p``
    copies of every element (23 ms instead of 8 ms for the AV-MNIST audio input at batch 128). A
    reduction is never fused into its consumer, so ``max(x, -inf)`` written as one
    forces the transposed input into memory. NaN stays NaN. Only for encoder inputs:
    on activations the extra max costs more in the backward pass than it saves.
    """
    x = jnp.transpose(x, (3, 1, 2, 0))
    return jnp.max(jnp.stack([x, jnp.full_like(x, -jnp.inf)], axis=-1), axis=-1)


def conv_patches(x: Array, kernel_size: tuple[int, int], pool: tuple[int, int]) -> Array:
    """im2col of a stride-1 "SAME" convolution, positions in pooling-phase order.

    Args:
      x: ``[c, height, width, batch]``.
      kernel_size: ``(k_h, k_w)``.
      pool: pooling window ``(p_h, p_w)``. Output positions are laid out
        ``(a, b, r, s, batch)`` for map position ``(r * p_h + a, s * p_w + b)``, over the
        map padded to ``ceil(height / p_h) * p_h`` rows (likewise columns); positions
        past the map see zero padding.

    Returns:
      ``[c * k_h * k_w, p_h * p_w * ceil(height / p_h) * ceil(width / p_w) * batch]``,
      rows ordered ``(c, i, j)``: an HWIO kernel transposed to ``[c, k_h, k_w, c_out]``
      and reshaped to ``[c * k_h * k_w, c_out]`` multiplies it. One gather, in which
      every index copies a contiguous ``batch``-long run.
    """
    c, h, w, b = x.shape
    (kh, kw), (ph, pw) = kernel_size, pool
    h2, w2 = _phase_grid(h, w, pool)
    (top, bottom), (left, right) = same_padding(kh), same_padding(kw)
    xp = jnp.pad(x, ((0, 0), (top, bottom + h2 * ph - h), (left, right + w2 * pw - w),
                     (0, 0)))
    hp, wp = xp.shape[1], xp.shape[2]
    i, j, a, d, r, q = np.ix_(*(np.arange(n) for n in (kh, kw, ph, pw, h2, w2)))
    index = ((r * ph + a + i) * wp + (q * pw + d + j)).reshape(kh * kw, -1)
    patches = jnp.take(xp.reshape(c, hp * wp, b), index.astype(np.int32), axis=1)
    return patches.reshape(c * kh * kw, -1)


def _conv_phase_ordered(x: Array, kernel: Array, kernel_size: tuple[int, int],
                        pool: tuple[int, int]) -> Array:
    """``[c_out, p_h * p_w, h', w', batch]`` float32 conv output in pooling-phase order.

    im2col by ``k_h * k_w`` shifted slices of the padded map (each a contiguous
    ``width * batch`` run per row) in natural position order, one matmul, then the
    (``c_out``-row, so cheap) output transposed to phase order. Its gradient is a sum of
    padded slices, never a scatter.
    """
    c, h, w, b = x.shape
    (kh, kw), (ph, pw) = kernel_size, pool
    h2, w2 = _phase_grid(h, w, pool)
    rows, cols = h2 * ph, w2 * pw
    (top, bottom), (left, right) = same_padding(kh), same_padding(kw)
    xp = jnp.pad(x, ((0, 0), (top, bottom + rows - h), (left, right + cols - w), (0, 0)))
    patches = jnp.stack([xp[:, i:i + rows, j:j + cols, :]
                         for i in range(kh) for j in range(kw)], axis=1)
    y = jax.lax.dot_general(kernel, patches.reshape(c * kh * kw, -1),
                            (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    c_out = kernel.shape[1]
    y = y.reshape(c_out, h2, ph, w2, pw, b).transpose(0, 2, 4, 1, 3, 5)
    return y.reshape(c_out, ph * pw, h2, w2, b)


def _single_channel_direct(xp: Array, kernel: Array, kernel_size: tuple[int, int],
                           pool: tuple[int, int], grid: tuple[int, int]) -> Array:
    (kh, kw), (ph, pw), (h2, w2) = kernel_size, pool, grid
    kernel = kernel.astype(jnp.float32).reshape(kh, kw, -1)
    xp = xp.astype(jnp.float32)
    phases = []
    for a in range(ph):
        for d in range(pw):
            acc = None
            for i in range(kh):
                for j in range(kw):
                    window = jax.lax.slice(
                        xp, (a + i, d + j, 0),
                        (a + i + (h2 - 1) * ph + 1, d + j + (w2 - 1) * pw + 1, xp.shape[2]),
                        (ph, pw, 1))  # [h', w', batch]
                    term = kernel[i, j][:, None, None, None] * window[None]
                    acc = term if acc is None else acc + term
            phases.append(acc)
    return jnp.stack(phases, axis=1)  # [c_out, p_h * p_w, h', w', batch]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_single_channel(x: Array, kernel: Array, kernel_size: tuple[int, int],
                         pool: tuple[int, int]) -> Array:
    """The first layer's conv (one input channel) in pooling-phase order, float32.

    Args:
      x: ``[height, width, batch]``.
      kernel: ``[k_h * k_w, c_out]``.

    Returns:
      ``[c_out, p_h * p_w, h', w', batch]`` as ``conv_patches`` + matmul computes it.

    Forward: ``k_h * k_w`` shifted multiply-adds per phase, one fused elementwise pass
    (no im2col: with one input channel the patches would be ``k_h * k_w`` times the
    input, written and read back). Backward: the kernel gradient as one matmul per
    pooling phase (``_single_channel_kernel_grad``); the input gradient, only when used,
    as XLA's convolution gradient on the ``[batch, h, w, 1]`` layout.
    """
    return _single_channel_direct(_pad_single(x, kernel_size, pool), kernel, kernel_size,
                                  pool, _phase_grid(x.shape[0], x.shape[1], pool))


def _pad_single(x: Array, kernel_size: tuple[int, int], pool: tuple[int, int]) -> Array:
    h, w, _ = x.shape
    h2, w2 = _phase_grid(h, w, pool)
    (top, bottom), (left, right) = (same_padding(k) for k in kernel_size)
    return jnp.pad(x, ((top, bottom + h2 * pool[0] - h), (left, right + w2 * pool[1] - w),
                       (0, 0)))


def _conv_single_channel_fwd(x, kernel, kernel_size, pool):
    return _conv_single_channel(x, kernel, kernel_size, pool), (x, kernel)


# Output columns per block of the first layer's kernel-gradient matmul (see below).
_KERNEL_GRAD_BLOCK = 4


def _single_channel_kernel_grad(xp: Array, g: Array, kernel_size: tuple[int, int],
                                pool: tuple[int, int]) -> Array:
    """float32 ``[k_h * k_w, c_out]`` gradient of the direct first layer's kernel.

    ``xp``: the padded input ``[rows + k_h - 1, cols + k_w - 1, batch]``; ``g``: the
    output's cotangent ``[c_out, p_h * p_w, h', w', batch]`` (pooling-phase order).

    ``dk[i, j, c] = sum_{h, w, b} xp[h + i, w + j, b] g[c, h, w, b]``. im2col would
    write ``k_h * k_w`` shifted copies of the input (25 x 4 MB for the AV-MNIST audio
    layer at batch 128) only to read them once. Instead the output columns are cut into
    blocks of ``_KERNEL_GRAD_BLOCK`` pooling windows, and one batched matmul per block
    contracts rows, phases and batch (``K = p_h * h' * batch``) between ``g`` and the
    ``k_h`` row-shifted copies of that block's input columns plus the ``k_w - 1`` beyond
    it: ``R[block, (c, d, q), (i, w')]``, of which ``dk`` is the sum over the entries with
    ``w' = q * p_w + d + j``. Only ``k_h`` (not ``k_h * k_w``) shifted copies are made, for
    ``(_KERNEL_GRAD_BLOCK * p_w + k_w - 1) / k_w`` times the useful FLOPs (2.4x for 5 x 5
    kernels and 2 x 2 pools: ~0.7 GFLOP for the audio layer at batch 128).
    Against the previous per-phase im2col matmuls, on the AV-MNIST audio layer (2-core
    AMD EPYC Zen 4), this function alone (a /tmp timing script, not kept): 82 -> 43 ms at
    batch 128, 32 -> 9.5 ms at batch 40; the ``concat`` train step's time did not
    change (XLA overlapped the old stacks with other work; ``benchmarks/im2col.py
    --against first-layer-phase-matmuls``:
    0.97-1.02x), its XLA temporaries fell from 325 to 250 MB at batch 128
    (docs/performance.md). ``g`` is read in phase order (no transpose to a convolution
    layout) and nothing recomputes the forward.
    """
    (kh, kw), (ph, pw), q_blk = kernel_size, pool, _KERNEL_GRAD_BLOCK
    c_out, _, h2, w2, b = g.shape
    n_blk = -(-w2 // q_blk)
    g = g.reshape(c_out, ph, pw, h2, w2, b)
    if n_blk * q_blk != w2:  # zero columns contribute nothing
        g = jnp.pad(g, ((0, 0),) * 4 + ((0, n_blk * q_blk - w2), (0, 0)))
    # [block, (c, d, q), (a, r, b)]
    lhs = g.reshape(c_out, ph, pw, h2, n_blk, q_blk, b).transpose(4, 0, 2, 5, 1, 3, 6)
    lhs = lhs.reshape(n_blk, c_out * pw * q_blk, ph * h2 * b)
    width = q_blk * pw + kw - 1  # input columns one block reads
    extra = n_blk * q_blk * pw + kw - 1 - xp.shape[1]
    if extra > 0:
        xp = jnp.pad(xp, ((0, 0), (0, extra), (0, 0)))
    # rows[i, a, r] = xp[r * p_h + a + i]: [k_h, p_h, h', cols, batch]
    rows = jnp.stack([jnp.stack([jax.lax.slice(
        xp, (a + i, 0, 0), (a + i + (h2 - 1) * ph + 1, xp.shape[1], b), (ph, 1, 1))
        for a in range(ph)]) for i in range(kh)])
    blocks = jnp.stack([rows[:, :, :, k * q_blk * pw:k * q_blk * pw + width]
                        for k in range(n_blk)])  # [block, k_h, p_h, h', width, batch]
    rhs = blocks.transpose(0, 2, 3, 5, 1, 4).reshape(n_blk, ph * h2 * b, kh * width)
    r = jax.lax.dot_general(lhs, rhs, (((2,), (1,)), ((0,), (0,))),
                            preferred_element_type=jnp.float32)
    r = r.reshape(n_blk, c_out, pw, q_blk, kh, width)
    d, q, j = np.ix_(np.arange(pw), np.arange(q_blk), np.arange(kw))
    picked = r[:, :, d, q, :, q * pw + d + j]  # [p_w, block cols, k_w, block, c, k_h]
    dk = picked.sum(axis=(0, 1, 3))  # [k_w, c_out, k_h]
    return dk.transpose(2, 0, 1).reshape(kh * kw, c_out)


def _conv_single_channel_bwd(kernel_size, pool, res, g):
    x, kernel = res
    (kh, kw), (ph, pw) = kernel_size, pool
    h, w, b = x.shape
    c_out = kernel.shape[1]
    h2, w2 = _phase_grid(h, w, pool)
    xp = _pad_single(x, kernel_size, pool).astype(jnp.float32)
    g = g.astype(jnp.float32)
    dk = _single_channel_kernel_grad(xp, g, kernel_size, pool)
    # The input gradient (XLA's, on the natural [batch, h, w, 1] layout) is computed only
    # when something uses it (an attack on the input, a saliency map); XLA drops it from
    # a train step.
    g = g.reshape(c_out, ph, pw, h2, w2, b).transpose(5, 3, 1, 4, 2, 0)
    g = g.reshape(b, h2 * ph, w2 * pw, c_out)
    _, vjp = jax.vjp(
        lambda v: jax.lax.conv_general_dilated(
            v, kernel.astype(jnp.float32).reshape(kh, kw, 1, c_out), (1, 1), "VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            preferred_element_type=jnp.float32),
        jnp.transpose(xp, (2, 0, 1))[..., None])
    (dxp,) = vjp(g)
    (top, _), (left, _) = same_padding(kh), same_padding(kw)
    dx = jnp.transpose(dxp[..., 0], (1, 2, 0))[top:top + h, left:left + w]
    return dx.astype(x.dtype), dk.astype(kernel.dtype)


_conv_single_channel.defvjp(_conv_single_channel_fwd, _conv_single_channel_bwd)


def _static_valid(height: int, width: int, pool: tuple[int, int]) -> np.ndarray | None:
    """bool ``[1, p_h * p_w, h', w', 1]``: which phase positions lie inside the map, or
    None when the map is a whole number of windows."""
    (ph, pw), (h2, w2) = pool, _phase_grid(height, width, pool)
    if h2 * ph == height and w2 * pw == width:
        return None
    rows = np.arange(h2)[None, :] * ph + np.arange(ph)[:, None] < height  # [ph, h2]
    cols = np.arange(w2)[None, :] * pw + np.arange(pw)[:, None] < width  # [pw, w2]
    valid = rows[:, None, :, None] & cols[None, :, None, :]  # [ph, pw, h2, w2]
    return valid.reshape(1, ph * pw, h2, w2, 1)


def conv_block(
    x: Array,
    conv: nnx.Conv,
    norm: nnx.Module | None,
    *,
    pool: tuple[int, int],
    floor: bool,
    row_mask: Array | None = None,
    dtype: Any = None,
) -> tuple[Array, Array | None]:
    """One encoder block on ``[channels, height, width, batch]``: conv, norm, ReLU, pool.

    Computes ``pool(relu(norm(conv(x))))`` of the layer-by-layer modules (the encoders'
    reference path) with the same batch statistics and running-average updates, as one
    gather (im2col), one matmul and a few fused elementwise and reduction passes.

    Args:
      x: float ``[c_in, height, width, batch]``.
      conv: the block's ``nnx.Conv`` (stride 1, "SAME"); its kernel and optional bias
        are used, its ``__call__`` is not.
      norm: ``nnx.BatchNorm`` or ``MaskedBatchNorm`` over ``c_out`` features, or None.
        In training mode its batch statistics are computed here (masked positions and
        positions outside the map excluded) and its running averages updated as its
        own ``__call__`` would; in eval mode its running averages are used.
      pool: max-pooling window = stride ``(p_h, p_w)``.
      floor: drop partial windows (``nnx.max_pool`` "VALID") if True, else keep them
        (ceil; positions outside the map never win).
      row_mask: bool ``[height, batch]``, True for real rows (time frames). Masked rows
        are never read (selected away before the matmul and out of every statistic);
        an output row is valid iff any row of its window is; invalid output rows are
        zero. None: every row is real.
      dtype: matmul dtype (e.g. ``jnp.bfloat16``); statistics are float32 and the
        output has this dtype. None: ``x``'s dtype.

    Returns:
      ``(y, mask)``: ``y`` float ``[c_out, height', width', batch]`` with ``height' =
      height // p_h`` (floor) or ``ceil(height / p_h)``, likewise for width; ``mask``
      bool ``[height', batch]`` (None when ``row_mask`` is None).
    """
    c_in, height, width, batch = x.shape
    kh, kw, _, c_out = conv.kernel.shape
    ph, pw = pool
    h2, _ = _phase_grid(height, width, pool)
    out_dtype = dtype or x.dtype
    if row_mask is not None:
        x = jnp.where(row_mask[None, :, None, :], x, jnp.zeros((), x.dtype))
    kernel = jnp.transpose(conv.kernel[...], (2, 0, 1, 3)).reshape(c_in * kh * kw, c_out)
    if dtype is not None:
        x, kernel = x.astype(dtype), kernel.astype(dtype)
    if c_in == 1:
        y = _conv_single_channel(x[0], kernel, (kh, kw), pool)
    else:
        y = _conv_phase_ordered(x, kernel, (kh, kw), pool)
    if conv.bias is not None:
        y = y + conv.bias[...].astype(jnp.float32).reshape(c_out, 1, 1, 1, 1)

    # Which phase positions are real: inside the map and (with row_mask) unmasked.
    static = _static_valid(height, width, pool)
    valid = None if static is None else jnp.asarray(static)
    window_rows = None
    if row_mask is not None:
        rows = jnp.pad(row_mask, ((0, h2 * ph - height), (0, 0)))  # pads with False
        window_rows = rows.reshape(h2, ph, batch)
        dynamic = jnp.broadcast_to(
            jnp.transpose(window_rows, (1, 0, 2))[:, None, :, None, :],
            (ph, pw, h2, 1, batch)).reshape(1, ph * pw, h2, 1, batch)
        valid = dynamic if valid is None else valid & dynamic

    if norm is not None:
        mean, var = _batch_norm_stats(norm, y, valid, batch * height * width)
        a = norm.scale[...].astype(jnp.float32) * jax.lax.rsqrt(var + norm.epsilon)
        shift = norm.bias[...].astype(jnp.float32) - mean * a
        y = y * a.reshape(c_out, 1, 1, 1, 1) + shift.reshape(c_out, 1, 1, 1, 1)
    if valid is not None:
        y = jnp.where(valid, y, -jnp.inf)
    out = jax.nn.relu(_max_over_phases(y))  # [c_out, h2, w2, batch]; relu(max) = max(relu)
    mask = None if window_rows is None else jnp.any(window_rows, axis=1)  # [h2, batch]
    if floor:
        out = out[:, :height // ph, :width // pw]
        mask = None if mask is None else mask[:height // ph]
    if mask is not None:
        out = jnp.where(mask[None, :, None, :], out, 0.0)
    return out.astype(out_dtype), mask


@jax.custom_vjp
def _max_over_phases(y: Array) -> Array:
    """``max(y, axis=1)`` whose gradient goes to the first maximum only.

    The gradient of ``jnp.max`` splits ties evenly, which costs a count reduction and a
    division over the whole pre-pool map; routing it to the first maximum (as PyTorch's
    max pooling does, and equally a subgradient) is one elementwise pass.
    """
    return jnp.max(y, axis=1)


def _max_over_phases_fwd(y: Array) -> tuple[Array, tuple[Array, Array]]:
    out = jnp.max(y, axis=1)
    return out, (y, out)


def _max_over_phases_bwd(res: tuple[Array, Array], g: Array) -> tuple[Array]:
    y, out = res
    taken = jnp.zeros(out.shape, bool)
    grads = []
    for p in range(y.shape[1]):
        hit = (y[:, p] == out) & ~taken
        taken = taken | hit
        grads.append(jnp.where(hit, g, jnp.zeros((), g.dtype)))
    return (jnp.stack(grads, axis=1),)


_max_over_phases.defvjp(_max_over_phases_fwd, _max_over_phases_bwd)


def _batch_norm_stats(norm: nnx.Module, y: Array, valid: Array | None,
                      positions: int) -> tuple[Array, Array]:
    """Mean and (biased) variance per channel of ``y [c, phases, h', w', batch]``.

    Training mode: over the valid positions (``valid`` broadcastable to ``y``),
    updating ``norm``'s running averages like its ``__call__`` (``MaskedBatchNorm``
    skips the update when nothing is valid). Eval mode: the running averages. One pass,
    shifted by a per-channel sample of ``y`` so that ``E[(y - s)^2] - E[y - s]^2`` does
    not cancel catastrophically.
    """
    if norm.use_running_average:
        return norm.mean[...].astype(jnp.float32), norm.var[...].astype(jnp.float32)
    axes = (1, 2, 3, 4)
    s = jax.lax.stop_gradient(y[:, :1, :1, :1, :1])
    d = y - s
    if valid is None:
        count = jnp.asarray(positions, jnp.float32)
    else:
        d = jnp.where(valid, d, 0.0)
        count = jnp.sum(jnp.broadcast_to(valid, (1, *y.shape[1:])), dtype=jnp.float32)
    denom = jnp.maximum(count, 1.0)
    m1 = jnp.sum(d, axis=axes) / denom
    var = jnp.maximum(jnp.sum(jnp.square(d), axis=axes) / denom - jnp.square(m1), 0.0)
    mean = m1 + s.reshape(-1)
    m = norm.momentum
    new_mean = m * norm.mean[...] + (1 - m) * mean
    new_var = m * norm.var[...] + (1 - m) * var
    if isinstance(norm, MaskedBatchNorm):
        seen = count > 0
        new_mean = jnp.where(seen, new_mean, norm.mean[...])
        new_var = jnp.where(seen, new_var, norm.var[...])
    norm.mean[...] = jax.lax.stop_gradient(new_mean)
    norm.var[...] = jax.lax.stop_gradient(new_var)
    return mean, var
