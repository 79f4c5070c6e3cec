"""Data augmentation for multimodal batches: pure, per-example, seeded, mask-aware.

Every transform is a pure JAX function of its inputs and an explicit PRNG ``key``:
the same key gives the same output, eagerly or under ``jax.jit`` (hyperparameters are
Python numbers, static under jit, and checked before any JAX computation). Example ``i``
of a batch draws from ``fold_in(key, i)``, so its augmentation does not depend on the
size of the batch it is in. Nothing is clipped to a value range.

Masks are honoured exactly: a padded frame or token (mask False) is returned bit-for-bit
as it came in and never becomes signal, and spans that are drawn "in time" are drawn
among an example's valid frames only.

* Images ``[batch, height, width, channels]``: ``random_translate`` (zero fill),
  ``cutout``, ``gaussian_noise``, ``brightness_contrast``. No flips (digits).
* Log-mel spectrograms ``[batch, time, mels]`` with a bool mask ``[batch, time]``:
  SpecAugment's ``time_mask`` and ``freq_mask``, and ``time_shift`` (a circular shift of
  the valid frames). Waveforms ``[batch, samples]``: ``waveform_noise`` at an SNR drawn
  from a range, relative to each clip's own RMS.
* Token ids ``[batch, time]`` with a mask: ``mask_tokens``.
* Mixup within a batch: ``mixup_batch`` returns the mixed batch and the ``Mixup``
  weights and partners; ``mix_labels`` turns labels into the matching soft targets.
* ``Augmenter``: per-modality transforms (``ImageAugment``, ``AudioAugment``,
  ``TextAugment`` or any ``(inputs, key) -> inputs`` callable) applied to a batch dict
  in the ``lepton_mm.models`` format; each modality draws from its own key, and
  examples whose ``batch["present"][m]`` is False keep that modality untouched.

Importing this module does not import Flax.

References:
  Park, Chan, Zhang, Chiu, Zoph, Cubuk and Le, "SpecAugment: A Simple Data Augmentation
  Method for Automatic Speech Recognition", Interspeech 2019 (arXiv:1904.08779).
  DeVries and Taylor, "Improved Regularization of Convolutional Neural Networks with
  Cutout", arXiv:1708.04552, 2017.
  Zhang, Cisse, Dauphin and Lopez-Paz, "mixup: Beyond Empirical Risk Minimization",
  ICLR 2018.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lepton_mm._validation import check_array, check_frame_mask, check_key
from lepton_mm.types import RESERVED_KEYS

__all__ = [
    "AudioAugment",
    "Augmenter",
    "ImageAugment",
    "Mixup",
    "TextAugment",
    "brightness_contrast",
    "cutout",
    "freq_mask",
    "gaussian_noise",
    "mask_tokens",
    "mix_labels",
    "mixup_batch",
    "random_translate",
    "time_mask",
    "time_shift",
    "waveform_noise",
]

Array = jax.Array

#: A per-modality transform: ``(batch[m], key) -> batch[m]`` (same structure and shapes).
Transform = Callable[[Any, Array], Any]

# The batch keys that are not modalities (``lepton_mm.models.RESERVED_KEYS``; repeated so
# that this module does not import Flax).


# ---------------------------------------------------------------------- validation


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a Python number, got {type(value).__name__}.")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}.")
    return value


def _rate(name: str, value: Any) -> float:
    value = _number(name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}: expected a rate in [0, 1], got {value!r}.")
    return value


def _nonneg(name: str, value: Any) -> float:
    value = _number(name, value)
    if value < 0:
        raise ValueError(f"{name}: expected a number >= 0, got {value!r}.")
    return value


def _nonneg_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int >= 0, got {type(value).__name__}.")
    if value < 0:
        raise ValueError(f"{name}: expected an int >= 0, got {value!r}.")
    return int(value)


def _snr_range(name: str, value: Any) -> tuple[float, float]:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        value = (value, value)
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
        raise TypeError(f"{name}: expected (low, high) in dB or one number, got {value!r}.")
    low, high = _number(f"{name}[0]", value[0]), _number(f"{name}[1]", value[1])
    if low > high:
        raise ValueError(f"{name}: expected low <= high, got ({low!r}, {high!r}).")
    return low, high


# ------------------------------------------------------------------------- helpers


def _example_keys(key: Array, n: int) -> Array:
    """``fold_in(key, i)`` for ``i < n``: example ``i``'s key, whatever the batch size."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n, dtype=jnp.uint32))


@functools.partial(jax.jit, static_argnames=("fn", "static"))
def _per_example(key: Array, arrays: tuple[Any, ...], floats: dict[str, float], *,
                 fn: Callable[..., Array], static: tuple[tuple[str, Any], ...] = ()) -> Array:
    """``fn(fold_in(key, i), *row_i, **floats, **static)`` for each example ``i``.

    ``fn`` is a module-level function (a stable static argument); ``static`` holds the
    hyperparameters that fix shapes, as hashable ``(name, value)`` pairs, and ``floats``
    the others, traced (float32 scalars), so an eager call compiles once per shape and
    static configuration; under an outer ``jit`` this is inlined.
    """
    keys = _example_keys(key, arrays[0].shape[0])
    return jax.vmap(lambda k, *rows: fn(k, *rows, **floats, **dict(static)))(keys, *arrays)


def _expand(flags: Array, ndim: int) -> Array:
    """``flags [batch, ...]`` with trailing unit axes up to rank ``ndim``."""
    return flags.reshape(flags.shape + (1,) * (ndim - flags.ndim))


def _spans(key: Array, count: int, cap: Array, total: Array) -> tuple[Array, Array]:
    """``count`` spans: width ~ U{0..cap}, start ~ U{0..total - width} (int32 each)."""
    k_width, k_start = jax.random.split(key)
    width = jax.random.randint(k_width, (count,), 0, cap + 1)
    start = jax.random.randint(k_start, (count,), 0, total - width + 1)
    return start, width


def _covered(positions: Array, start: Array, width: Array) -> Array:
    """bool ``[n]``: position lies in at least one ``[start, start + width)``."""
    inside = ((positions[:, None] >= start[None, :])
              & (positions[:, None] < (start + width)[None, :]))
    return jnp.any(inside, axis=1)


# -------------------------------------------------------------------------- images


def _check_images(images: Any) -> None:
    check_array("images", images, "batch height width channels", kind="float")


def random_translate(images: Array, *, key: Array, max_shift: int) -> Array:
    """Shifts each image by a random whole number of pixels, filling with zeros.

    Example ``i`` draws ``(dy, dx)``, each uniform on ``{-max_shift, ..., max_shift}``,
    and ``out[i, y, x] = images[i, y - dy, x - dx]`` where that pixel exists, else 0.

    Args:
      images: float ``[batch, height, width, channels]``.
      key: a PRNG key.
      max_shift: the largest shift in pixels along each axis (int >= 0).

    Returns:
      float ``[batch, height, width, channels]``, the dtype of ``images``.

    Raises:
      TypeError: ``images`` is not a float array, or ``max_shift`` not an int.
      ValueError: wrong rank, or ``max_shift`` < 0.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> x = jnp.zeros((2, 5, 5, 1)).at[:, 2, 2, 0].set(1.0)
      >>> out = random_translate(x, key=jax.random.key(0), max_shift=2)
      >>> out.shape, float(out.sum())  # the pixel moved, still inside the image
      ((2, 5, 5, 1), 2.0)
    """
    _check_images(images)
    key = check_key(key)
    s = _nonneg_int("max_shift", max_shift)
    if s == 0:
        return images
    return _per_example(key, (images,), {}, fn=_translate_one, static=(("s", s),))


def _translate_one(k: Array, image: Array, *, s: int) -> Array:
    shift = jax.random.randint(k, (2,), -s, s + 1)
    padded = jnp.pad(image, ((s, s), (s, s), (0, 0)))
    return jax.lax.dynamic_slice(padded, (s - shift[0], s - shift[1], 0), image.shape)


def cutout(images: Array, *, key: Array, size: int, fill: float = 0.0) -> Array:
    """Sets a random ``size`` x ``size`` square of each image to ``fill`` (Cutout).

    As in DeVries & Taylor (2017) the square's centre is uniform over all pixels and
    the square is clipped at the border, so near an edge fewer pixels are covered.
    Rows ``cy - size // 2`` to ``cy - size // 2 + size - 1`` (likewise columns), all
    channels.

    Args:
      images: float ``[batch, height, width, channels]``.
      key: a PRNG key.
      size: the square's side in pixels (int >= 0; 0 leaves the images unchanged).
      fill: the value written into the square.

    Returns:
      float ``[batch, height, width, channels]``, the dtype of ``images``.

    Raises:
      TypeError: ``images`` is not a float array, or a hyperparameter has the wrong type.
      ValueError: wrong rank, ``size`` < 0 or ``fill`` not finite.
    """
    _check_images(images)
    key = check_key(key)
    size = _nonneg_int("size", size)
    fill = _number("fill", fill)
    if size == 0:
        return images
    return _per_example(key, (images,), {"fill": fill}, fn=_cutout_one,
                        static=(("size", size),))


def _cutout_one(k: Array, image: Array, *, size: int, fill: float) -> Array:
    height, width, _ = image.shape
    k_y, k_x = jax.random.split(k)
    top = jax.random.randint(k_y, (), 0, height) - size // 2
    left = jax.random.randint(k_x, (), 0, width) - size // 2
    rows, cols = jnp.arange(height), jnp.arange(width)
    inside = (((rows >= top) & (rows < top + size))[:, None]
              & ((cols >= left) & (cols < left + size))[None, :])
    return jnp.where(inside[:, :, None], jnp.asarray(fill, image.dtype), image)


def gaussian_noise(x: Array, *, key: Array, std: float, mask: Array | None = None) -> Array:
    """Adds white Gaussian noise ``std * N(0, 1)`` to each example (valid frames only).

    Args:
      x: float ``[batch, ...]``: images ``[batch, height, width, channels]``, log-mels
        ``[batch, time, mels]``, ...
      key: a PRNG key.
      std: the noise standard deviation, in the units of ``x`` (>= 0).
      mask: optional bool ``[batch, time]`` over the first two axes of ``x``; where it is
        False ``x`` is returned unchanged.

    Returns:
      float, the shape and dtype of ``x``.

    Raises:
      TypeError: ``x`` is not a float array, or ``std`` is not a number.
      ValueError: ``x`` is a scalar, ``std`` < 0, or ``mask`` has the wrong shape.
    """
    check_array("x", x, kind="float")
    if x.ndim == 0:
        raise ValueError("x: expected an array with a leading batch axis, got a scalar.")
    key = check_key(key)
    std = _nonneg("std", std)
    if mask is None:
        mask = jnp.ones(x.shape[:1], bool)
    else:
        check_frame_mask("mask", mask, x, "x")
    return _per_example(key, (x, mask), {"std": std}, fn=_noise_one)


def _noise_one(k: Array, x: Array, m: Array, *, std: float) -> Array:
    out = x + jnp.asarray(std, x.dtype) * jax.random.normal(k, x.shape, x.dtype)
    return jnp.where(_expand(m, x.ndim), out, x)


def brightness_contrast(images: Array, *, key: Array, brightness: float = 0.0,
                        contrast: float = 0.0) -> Array:
    """Random brightness and contrast: ``(x - mean) * c + mean + b`` per image.

    ``b`` is uniform on ``[-brightness, brightness]`` and ``c`` on
    ``[1 - contrast, 1 + contrast]``, one pair per image; ``mean`` is the image's mean
    over pixels and channels (computed in float32).

    Args:
      images: float ``[batch, height, width, channels]``.
      key: a PRNG key.
      brightness: the largest additive offset, in image units (>= 0).
      contrast: the largest relative change of contrast, in ``[0, 1]``.

    Returns:
      float ``[batch, height, width, channels]``, the dtype of ``images``.

    Raises:
      TypeError: ``images`` is not a float array, or a hyperparameter is not a number.
      ValueError: wrong rank, ``brightness`` < 0 or ``contrast`` outside ``[0, 1]``.
    """
    _check_images(images)
    key = check_key(key)
    brightness = _nonneg("brightness", brightness)
    contrast = _rate("contrast", contrast)
    return _per_example(key, (images,), {"brightness": brightness, "contrast": contrast},
                        fn=_brightness_contrast_one)


def _brightness_contrast_one(k: Array, image: Array, *, brightness: float,
                             contrast: float) -> Array:
    k_b, k_c = jax.random.split(k)
    b = jax.random.uniform(k_b, (), minval=-brightness, maxval=brightness)
    c = jax.random.uniform(k_c, (), minval=1.0 - contrast, maxval=1.0 + contrast)
    x = image.astype(jnp.float32)
    mean = jnp.mean(x)
    return ((x - mean) * c + mean + b).astype(image.dtype)


# --------------------------------------------------------------------------- audio


def _check_log_mel(log_mel: Any, mask: Any) -> None:
    check_array("log_mel", log_mel, "batch time mels", kind="float")
    check_frame_mask("mask", mask, log_mel, "log_mel")


def time_mask(log_mel: Array, mask: Array, *, key: Array, max_width: int,
              num_masks: int = 1, max_fraction: float = 1.0, fill: float = 0.0) -> Array:
    """SpecAugment time masking among the valid frames (Park et al. 2019).

    For each of ``num_masks`` masks (the paper's ``m_T``) an example draws a width ``t``
    uniform on ``{0, ..., min(max_width, floor(max_fraction * tau))}`` (``T`` and ``p``)
    and a start ``t0`` uniform on ``{0, ..., tau - t}``, where ``tau`` is its number of
    valid frames, and sets valid frames ``t0, ..., t0 + t - 1`` (counted among the
    valid frames, in time order) to ``fill``. Masks may overlap. Padded frames are never
    masked or moved.

    Args:
      log_mel: float ``[batch, time, mels]``.
      mask: bool ``[batch, time]``, True at valid frames.
      key: a PRNG key.
      max_width: ``T``, the widest mask in frames (int >= 0).
      num_masks: ``m_T``, masks per example (int >= 0).
      max_fraction: ``p``, the widest mask as a fraction of the valid frames, in
        ``[0, 1]`` (``floor(p * tau)`` is computed in float32).
      fill: the masked value (0 is the mean of standardised log-mels, as in the paper).

    Returns:
      float ``[batch, time, mels]``, the dtype of ``log_mel``.

    Raises:
      TypeError: wrong dtypes, or a hyperparameter of the wrong type.
      ValueError: wrong ranks or shapes, or a hyperparameter out of range.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> x, valid = jnp.ones((1, 10, 4)), jnp.arange(10)[None] < 6
      >>> out = time_mask(x, valid, key=jax.random.key(1), max_width=3)
      >>> bool(jnp.all(out[:, 6:] == 1)), int((out[0, :, 0] == 0).sum()) <= 3
      (True, True)
    """
    _check_log_mel(log_mel, mask)
    key = check_key(key)
    max_width = _nonneg_int("max_width", max_width)
    num_masks = _nonneg_int("num_masks", num_masks)
    max_fraction = _rate("max_fraction", max_fraction)
    fill = _number("fill", fill)
    if max_width == 0 or num_masks == 0:
        return log_mel
    return _per_example(key, (log_mel, mask), {"max_fraction": max_fraction, "fill": fill},
                        fn=_time_mask_one,
                        static=(("max_width", max_width), ("num_masks", num_masks)))


def _time_mask_one(k: Array, x: Array, m: Array, *, max_width: int, num_masks: int,
                   max_fraction: float, fill: float) -> Array:
    tau = jnp.sum(m, dtype=jnp.int32)
    cap = jnp.minimum(max_width, jnp.floor(max_fraction * tau).astype(jnp.int32))
    start, width = _spans(k, num_masks, cap, tau)
    rank = jnp.cumsum(m, dtype=jnp.int32) - 1
    hit = m & _covered(rank, start, width)
    return jnp.where(hit[:, None], jnp.asarray(fill, x.dtype), x)


def freq_mask(log_mel: Array, mask: Array, *, key: Array, max_width: int,
              num_masks: int = 1, fill: float = 0.0) -> Array:
    """SpecAugment frequency masking on the valid frames (Park et al. 2019).

    For each of ``num_masks`` masks (``m_F``) an example draws a width ``f`` uniform on
    ``{0, ..., max_width}`` (``F``) and a first bin ``f0`` uniform on
    ``{0, ..., mels - f}``, and sets bins ``f0, ..., f0 + f - 1`` of its valid frames to
    ``fill``. Padded frames are unchanged.

    Args:
      log_mel: float ``[batch, time, mels]``.
      mask: bool ``[batch, time]``, True at valid frames.
      key: a PRNG key.
      max_width: ``F``, the widest mask in mel bins (int, ``0 <= F <= mels``).
      num_masks: ``m_F``, masks per example (int >= 0).
      fill: the masked value.

    Returns:
      float ``[batch, time, mels]``, the dtype of ``log_mel``.

    Raises:
      TypeError: wrong dtypes, or a hyperparameter of the wrong type.
      ValueError: wrong ranks or shapes, or a hyperparameter out of range.
    """
    _check_log_mel(log_mel, mask)
    key = check_key(key)
    max_width = _nonneg_int("max_width", max_width)
    num_masks = _nonneg_int("num_masks", num_masks)
    fill = _number("fill", fill)
    mels = log_mel.shape[2]
    if max_width > mels:
        raise ValueError(f"max_width: expected at most the {mels} mel bins of log_mel, got "
                         f"{max_width}.")
    if max_width == 0 or num_masks == 0:
        return log_mel
    return _per_example(key, (log_mel, mask), {"fill": fill}, fn=_freq_mask_one,
                        static=(("max_width", max_width), ("num_masks", num_masks)))


def _freq_mask_one(k: Array, x: Array, m: Array, *, max_width: int, num_masks: int,
                   fill: float) -> Array:
    mels = x.shape[1]
    start, width = _spans(k, num_masks, jnp.int32(max_width), jnp.int32(mels))
    hit = _covered(jnp.arange(mels), start, width)
    return jnp.where(m[:, None] & hit[None, :], jnp.asarray(fill, x.dtype), x)


def time_shift(log_mel: Array, mask: Array, *, key: Array, max_shift: int) -> Array:
    """Rolls each example's valid frames by a random shift; padded frames stay put.

    Example ``i`` draws ``s`` uniform on ``{-max_shift, ..., max_shift}``; its valid
    frames, taken in time order, are rotated by ``s`` (``numpy.roll`` of the valid
    frames: content moves ``s`` valid frames later, wrapping around), so the mask and the
    set of frames stay the same.

    Args:
      log_mel: float ``[batch, time, mels]``.
      mask: bool ``[batch, time]``, True at valid frames.
      key: a PRNG key.
      max_shift: the largest shift in frames (int >= 0).

    Returns:
      float ``[batch, time, mels]``, the dtype of ``log_mel``.

    Raises:
      TypeError: wrong dtypes, or ``max_shift`` not an int.
      ValueError: wrong ranks or shapes, or ``max_shift`` < 0.
    """
    _check_log_mel(log_mel, mask)
    key = check_key(key)
    s = _nonneg_int("max_shift", max_shift)
    if s == 0:
        return log_mel
    return _per_example(key, (log_mel, mask), {}, fn=_time_shift_one,
                        static=(("s", s),))


def _time_shift_one(k: Array, x: Array, m: Array, *, s: int) -> Array:
    shift = jax.random.randint(k, (), -s, s + 1)
    tau = jnp.maximum(jnp.sum(m, dtype=jnp.int32), 1)
    rank = jnp.cumsum(m, dtype=jnp.int32) - 1
    order = jnp.argsort(~m, stable=True)  # the valid frames first, in time order
    source = jnp.where(m, order[jnp.mod(rank - shift, tau)], jnp.arange(x.shape[0]))
    return x[source]


def waveform_noise(waves: Array, *, key: Array, snr_db: tuple[float, float] | float,
                   mask: Array | None = None, lengths: Array | None = None) -> Array:
    """Adds white Gaussian noise at a random SNR to each clip's own samples.

    Example ``i`` draws ``snr`` uniform on ``[low, high]`` dB and adds
    ``rms_i * 10 ** (-snr / 20) * N(0, 1)`` to its clip samples, where ``rms_i`` is the
    RMS of those samples (float32): the signal-to-noise power ratio is ``snr`` dB. This
    is how AV-MNIST corrupts its clips (``lepton_mm.data.avmnist``), with the SNR drawn
    per example. Samples outside the clip are unchanged; a silent clip gets no noise.

    Args:
      waves: float ``[batch, samples]``.
      key: a PRNG key.
      snr_db: ``(low, high)`` in dB with ``low <= high``, or one number for a fixed SNR.
      mask: optional bool ``[batch, samples]``, True at the clip's samples.
      lengths: optional int ``[batch]``: the clip is the first ``lengths[i]`` samples.
        At most one of ``mask`` and ``lengths``; neither means every sample.

    Returns:
      float ``[batch, samples]``, the dtype of ``waves``.

    Raises:
      TypeError: wrong dtypes, or ``snr_db`` is not a pair of numbers.
      ValueError: wrong ranks or shapes, ``low > high``, or both ``mask`` and ``lengths``.
    """
    dims: dict[str, int] = {}
    check_array("waves", waves, "batch samples", kind="float", dims=dims)
    key = check_key(key)
    low, high = _snr_range("snr_db", snr_db)
    if mask is not None and lengths is not None:
        raise ValueError("mask, lengths: pass at most one of them.")
    if mask is not None:
        check_array("mask", mask, "batch samples", kind="bool", dims=dims)
        inside = mask
    elif lengths is not None:
        check_array("lengths", lengths, "batch", kind="int", dims=dims)
        inside = jnp.arange(waves.shape[1])[None, :] < lengths[:, None]
    else:
        inside = jnp.ones(waves.shape, bool)
    return _per_example(key, (waves, inside), {"low": low, "high": high},
                        fn=_waveform_noise_one)


def _waveform_noise_one(k: Array, wave: Array, clip: Array, *, low: float,
                        high: float) -> Array:
    k_snr, k_noise = jax.random.split(k)
    snr = jax.random.uniform(k_snr, (), minval=low, maxval=high)
    signal = jnp.where(clip, wave, 0).astype(jnp.float32)
    count = jnp.maximum(jnp.sum(clip, dtype=jnp.float32), 1.0)
    rms = jnp.sqrt(jnp.sum(signal * signal) / count)
    sigma = rms * 10.0 ** (-snr / 20.0)
    noise = sigma * jax.random.normal(k_noise, wave.shape, jnp.float32)
    return jnp.where(clip, (wave.astype(jnp.float32) + noise).astype(wave.dtype), wave)


# ---------------------------------------------------------------------------- text


def mask_tokens(ids: Array, mask: Array, *, key: Array, rate: float, mask_id: int,
                keep: Array | None = None, keep_ids: Sequence[int] = ()) -> Array:
    """Replaces each valid token by ``mask_id`` with probability ``rate``.

    Padding (``mask`` False), positions where ``keep`` is True and tokens whose id is in
    ``keep_ids`` (e.g. ``[CLS]``, ``[SEP]``) are never replaced. The mask is unchanged.

    Args:
      ids: int ``[batch, time]`` token ids.
      mask: bool ``[batch, time]``, True at real tokens.
      key: a PRNG key.
      rate: the replacement probability per eligible token, in ``[0, 1]``.
      mask_id: the id written in (int >= 0 that fits the dtype of ``ids``).
      keep: optional bool ``[batch, time]``, True at positions never to replace.
      keep_ids: ids never to replace, wherever they are.

    Returns:
      int ``[batch, time]``, the dtype of ``ids``.

    Raises:
      TypeError: wrong dtypes, or a hyperparameter of the wrong type.
      ValueError: wrong shapes, ``rate`` outside ``[0, 1]``, or ``mask_id`` out of range.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> ids = jnp.array([[101, 7, 8, 9, 102, 0]])
      >>> mask = ids != 0
      >>> mask_tokens(ids, mask, key=jax.random.key(0), rate=1.0, mask_id=103,
      ...             keep_ids=(101, 102)).tolist()
      [[101, 103, 103, 103, 102, 0]]
    """
    dims: dict[str, int] = {}
    check_array("ids", ids, "batch time", kind="int", dims=dims)
    check_array("mask", mask, "batch time", kind="bool", dims=dims)
    if keep is not None:
        check_array("keep", keep, "batch time", kind="bool", dims=dims)
    key = check_key(key)
    rate = _rate("rate", rate)
    info = np.iinfo(np.dtype(ids.dtype))
    mask_id = _nonneg_int("mask_id", mask_id)
    if mask_id > info.max:
        raise ValueError(f"mask_id: expected an id that fits {ids.dtype} (<= {info.max}), "
                         f"got {mask_id}.")
    if isinstance(keep_ids, (str, bytes)) or not isinstance(keep_ids, Sequence):
        raise TypeError(f"keep_ids: expected a sequence of ints, got "
                        f"{type(keep_ids).__name__}.")
    keep_ids = tuple(_nonneg_int(f"keep_ids[{i}]", t) for i, t in enumerate(keep_ids))
    if keep is None:
        keep = jnp.zeros(ids.shape, bool)
    return _per_example(key, (ids, mask, keep), {"rate": rate}, fn=_mask_tokens_one,
                        static=(("mask_id", mask_id), ("keep_ids", keep_ids)))


def _mask_tokens_one(k: Array, ids: Array, m: Array, keep: Array, *, rate: float,
                     mask_id: int, keep_ids: tuple[int, ...]) -> Array:
    hit = jax.random.bernoulli(k, rate, ids.shape) & m & ~keep
    for token in keep_ids:
        hit = hit & (ids != token)
    return jnp.where(hit, jnp.asarray(mask_id, ids.dtype), ids)


# --------------------------------------------------------------------------- mixup


class Mixup(NamedTuple):
    """What ``mixup_batch`` drew: row ``i`` became ``w[i] * x[i] + (1 - w[i]) * x[p[i]]``.

    Attributes:
      weight: float32 ``[batch]`` in ``[0, 1]``, the weight of the example's own input;
        exactly 1 for a row that no modality mixed (absent or fully padded for it or its
        partner), so ``mix_labels`` leaves that row's label as it is.
      partner: int32 ``[batch]``, the row each example is mixed with (a permutation of
        the batch; a row may be its own partner).
    """

    weight: Array
    partner: Array


def _modality_parts(name: str, inputs: Any) -> tuple[Array, Array | None]:
    """``(data, mask or None)`` of ``batch[name]``: an array or ``(data, mask)``."""
    where = f"batch[{name!r}]"
    if isinstance(inputs, (tuple, list)):
        if len(inputs) != 2:
            raise ValueError(f"{where}: expected an array or a (data, mask) pair, got "
                             f"{len(inputs)} items.")
        data, mask = inputs
        check_array(f"{where}[0]", data)
        if data.ndim < 2:
            raise ValueError(f"{where}[0]: expected [batch, time, ...], got shape "
                             f"{tuple(data.shape)}.")
        check_frame_mask(f"{where}[1]", mask, data, f"{where}[0]")
        return data, mask
    check_array(where, inputs)
    if inputs.ndim == 0:
        raise ValueError(f"{where}: expected a leading batch axis, got a scalar.")
    return inputs, None


def _modalities(batch: Any) -> list[str]:
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch: expected a dict modality name -> arrays, got "
                        f"{type(batch).__name__}.")
    return sorted(k for k in batch if k not in RESERVED_KEYS)


def _present(batch: Mapping[str, Any], name: str, size: int) -> Array | None:
    present = batch.get("present") or {}
    if not isinstance(present, Mapping):
        raise TypeError(f"batch['present']: expected a dict modality -> bool [batch], got "
                        f"{type(present).__name__}.")
    flags = present.get(name)
    if flags is not None:
        check_array(f"batch['present'][{name!r}]", flags, str(size), kind="bool")
    return flags


def mixup_batch(batch: Mapping[str, Any], *, key: Array, alpha: float,
                modalities: Sequence[str] | None = None) -> tuple[dict[str, Any], Mixup]:
    """Mixup within a batch, with the same weights and partners for every modality.

    Draws ``w ~ Beta(alpha, alpha)`` per example and a random permutation ``p`` of the
    batch, and replaces each mixed modality's data by ``w * x + (1 - w) * x[p]``. Where
    that would touch what must stay (the example's frame is padded or the modality is
    absent for it, or the partner's frame is padded or absent) the example keeps its own
    value; a row that no modality mixed gets weight 1 in the returned ``Mixup``. Labels
    are not changed: mix them with ``mix_labels`` (the loss then uses soft targets).
    Masks, ``present`` and ``valid`` are unchanged.

    Args:
      batch: a batch dict (``lepton_mm.models``): modality -> array or
        ``(data, mask)`` with a leading ``[batch]`` axis, plus optional ``"label"``,
        ``"present"`` and ``"valid"``.
      key: a PRNG key.
      alpha: the Beta distribution's parameter (> 0; small values mix little).
      modalities: the modalities to mix (each with float data); default: every
        modality whose data is float (token ids are left alone).

    Returns:
      ``(mixed batch, Mixup(weight float32 [batch], partner int32 [batch]))``; the new
      batch is a new dict sharing the unmixed arrays.

    Raises:
      TypeError: ``batch`` is not a dict, or a named modality's data is not float.
      ValueError: ``alpha`` <= 0, an unknown modality, or malformed arrays.
    """
    names = _modalities(batch)
    key = check_key(key)
    alpha = _number("alpha", alpha)
    if alpha <= 0:
        raise ValueError(f"alpha: expected a number > 0, got {alpha!r}.")
    if modalities is None:
        chosen = [m for m in names
                  if jnp.issubdtype(_modality_parts(m, batch[m])[0].dtype, jnp.floating)]
    else:
        chosen = [modalities] if isinstance(modalities, str) else list(modalities)
        for m in chosen:
            if m not in names:
                raise ValueError(f"modalities: unrecognized modality {m!r}; the batch has "
                                 f"{names}.")
            check_array(f"batch[{m!r}] data", _modality_parts(m, batch[m])[0], kind="float")
    if not chosen:
        raise ValueError(f"modalities: nothing to mix; the batch's modalities {names} have "
                         "no float data.")
    size = _modality_parts(chosen[0], batch[chosen[0]])[0].shape[0]
    k_weight, k_partner = jax.random.split(key)
    weight = jax.random.beta(k_weight, alpha, alpha, (size,), jnp.float32)
    partner = jax.random.permutation(k_partner, size).astype(jnp.int32)
    out = dict(batch)
    mixed_rows = jnp.zeros((size,), bool)
    for m in chosen:
        data, mask = _modality_parts(m, batch[m])
        if data.shape[0] != size:
            raise ValueError(f"batch[{m!r}]: expected batch size {size}, got "
                             f"{data.shape[0]}.")
        present = _present(batch, m, size)
        mixed = _mix(data, mask, present, weight, partner)
        out[m] = mixed if mask is None else type(batch[m])((mixed, batch[m][1]))
        mixed_rows = mixed_rows | _mixed_rows(mask, present, partner, size)
    return out, Mixup(jnp.where(mixed_rows, weight, 1.0), partner)


@functools.partial(jax.jit, static_argnums=3)
def _mixed_rows(mask: Array | None, present: Array | None, partner: Array,
                size: int) -> Array:
    """bool ``[batch]``: the rows ``_mix`` changes (some frame valid and present in both
    the row and its partner)."""
    ok = jnp.ones((size,), bool)
    if mask is not None:
        mask = jnp.asarray(mask)
        ok = jnp.any(mask & mask[partner], axis=1)
    if present is not None:
        ok = ok & present & present[partner]
    return ok


@jax.jit
def _mix(data: Array, mask: Array | None, present: Array | None, weight: Array,
         partner: Array) -> Array:
    """``w * x + (1 - w) * x[partner]`` where both rows' frames are valid and present."""
    ok = jnp.ones(data.shape[:1], bool)
    if mask is not None:
        ok = jnp.asarray(mask) & jnp.asarray(mask)[partner]
    if present is not None:
        ok = ok & _expand(present & present[partner], ok.ndim)
    w = _expand(weight, data.ndim).astype(data.dtype)
    mixed = w * data + (1 - w) * data[partner]
    return jnp.where(_expand(ok, data.ndim), mixed, data)


def mix_labels(labels: Array, mix: Mixup, *, num_classes: int | None = None) -> Array:
    """The soft targets of a mixup batch: ``w * y + (1 - w) * y[partner]``.

    Args:
      labels: int ``[batch]`` class ids (one-hot encoded with ``num_classes``) or float
        ``[batch, classes]`` targets (already soft).
      mix: the ``Mixup`` returned by ``mixup_batch``.
      num_classes: required with int labels.

    Returns:
      float32 ``[batch, classes]``, rows summing to 1 when the targets' rows do.

    Raises:
      TypeError: ``labels`` is neither int ``[batch]`` nor float ``[batch, classes]``,
        or ``num_classes`` is not an int.
      ValueError: shapes disagree with ``mix``, or ``num_classes`` is missing.
    """
    if not isinstance(mix, Mixup):
        raise TypeError(f"mix: expected the Mixup from mixup_batch, got "
                        f"{type(mix).__name__}.")
    check_array("labels", labels, kind="number")
    dims = {"batch": mix.weight.shape[0]}
    if jnp.issubdtype(labels.dtype, jnp.integer):
        check_array("labels", labels, "batch", dims=dims)
        if num_classes is None:
            raise ValueError("num_classes: required to one-hot encode int labels.")
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
            raise TypeError(f"num_classes: expected a positive int, got "
                            f"{type(num_classes).__name__}.")
        if num_classes <= 0:
            raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}.")
        targets = jax.nn.one_hot(labels, int(num_classes), dtype=jnp.float32)
    else:
        check_array("labels", labels, "batch classes", dims=dims)
        targets = labels.astype(jnp.float32)
    w = mix.weight[:, None].astype(jnp.float32)
    return w * targets + (1 - w) * targets[mix.partner]


# ---------------------------------------------------------------- per-modality configs


def _split_key(key: Array, tag: int) -> Array:
    return jax.random.fold_in(key, tag)


@dataclasses.dataclass(frozen=True)
class ImageAugment:
    """Image augmentation for ``Augmenter``: translate, brightness/contrast, cutout, noise.

    Called as ``ImageAugment(...)(images, key)``; the steps run in that order and a step
    whose size is 0 is skipped (the defaults change nothing). Each step draws from its
    own key folded from ``key``.

    Attributes:
      max_shift: ``random_translate``'s largest shift in pixels (int >= 0).
      brightness: ``brightness_contrast``'s largest offset (>= 0).
      contrast: ``brightness_contrast``'s largest contrast change, in ``[0, 1]``.
      cutout_size: ``cutout``'s square side in pixels (int >= 0).
      cutout_fill: the value ``cutout`` writes.
      noise_std: ``gaussian_noise``'s standard deviation (>= 0).
    """

    max_shift: int = 0
    brightness: float = 0.0
    contrast: float = 0.0
    cutout_size: int = 0
    cutout_fill: float = 0.0
    noise_std: float = 0.0

    def __post_init__(self):
        _nonneg_int("max_shift", self.max_shift)
        _nonneg("brightness", self.brightness)
        _rate("contrast", self.contrast)
        _nonneg_int("cutout_size", self.cutout_size)
        _number("cutout_fill", self.cutout_fill)
        _nonneg("noise_std", self.noise_std)

    def __call__(self, images: Array, key: Array) -> Array:
        """Augments ``images``: float ``[batch, height, width, channels]``.

        Args:
          images: float ``[batch, height, width, channels]``.
          key: a PRNG key.

        Returns:
          float ``[batch, height, width, channels]``, the dtype of ``images``.
        """
        _check_images(images)
        key = check_key(key)
        if self.max_shift:
            images = random_translate(images, key=_split_key(key, 0),
                                      max_shift=self.max_shift)
        if self.brightness or self.contrast:
            images = brightness_contrast(images, key=_split_key(key, 1),
                                         brightness=self.brightness, contrast=self.contrast)
        if self.cutout_size:
            images = cutout(images, key=_split_key(key, 2), size=self.cutout_size,
                            fill=self.cutout_fill)
        if self.noise_std:
            images = gaussian_noise(images, key=_split_key(key, 3), std=self.noise_std)
        return images


@dataclasses.dataclass(frozen=True)
class AudioAugment:
    """Log-mel augmentation for ``Augmenter``: time shift, then SpecAugment's masks.

    Called as ``AudioAugment(...)(inputs, key)`` with ``inputs = (log_mel, mask)``; runs
    ``time_shift``, ``freq_mask``, ``time_mask`` in that order (a step whose width is 0
    is skipped; the defaults change nothing) and returns ``(log_mel, mask)`` with the
    mask unchanged. SpecAugment's LibriSpeech policy LB is ``freq_mask_width=27,
    num_freq_masks=1, time_mask_width=100, num_time_masks=1, time_mask_fraction=1.0``
    (time warping is not implemented).

    Attributes:
      max_shift: ``time_shift``'s largest shift in frames (int >= 0).
      freq_mask_width: ``F`` (int >= 0, at most the mel bins).
      num_freq_masks: ``m_F`` (int >= 0).
      time_mask_width: ``T`` (int >= 0).
      num_time_masks: ``m_T`` (int >= 0).
      time_mask_fraction: ``p``, in ``[0, 1]``.
      fill: the value masks write.
    """

    max_shift: int = 0
    freq_mask_width: int = 0
    num_freq_masks: int = 1
    time_mask_width: int = 0
    num_time_masks: int = 1
    time_mask_fraction: float = 1.0
    fill: float = 0.0

    def __post_init__(self):
        _nonneg_int("max_shift", self.max_shift)
        _nonneg_int("freq_mask_width", self.freq_mask_width)
        _nonneg_int("num_freq_masks", self.num_freq_masks)
        _nonneg_int("time_mask_width", self.time_mask_width)
        _nonneg_int("num_time_masks", self.num_time_masks)
        _rate("time_mask_fraction", self.time_mask_fraction)
        _number("fill", self.fill)

    def __call__(self, inputs: tuple[Array, Array], key: Array) -> tuple[Array, Array]:
        """Augments ``inputs = (log_mel, mask)``.

        Args:
          inputs: ``(log_mel float [batch, time, mels], mask bool [batch, time])``.
          key: a PRNG key.

        Returns:
          ``(log_mel, mask)``: the augmented log-mels (same dtype) and the same mask.
        """
        if not isinstance(inputs, (tuple, list)) or len(inputs) != 2:
            raise TypeError(f"inputs: expected (log_mel, mask), got "
                            f"{type(inputs).__name__}.")
        log_mel, mask = inputs
        _check_log_mel(log_mel, mask)
        key = check_key(key)
        if self.max_shift:
            log_mel = time_shift(log_mel, mask, key=_split_key(key, 0),
                                 max_shift=self.max_shift)
        if self.freq_mask_width and self.num_freq_masks:
            log_mel = freq_mask(log_mel, mask, key=_split_key(key, 1),
                                max_width=self.freq_mask_width,
                                num_masks=self.num_freq_masks, fill=self.fill)
        if self.time_mask_width and self.num_time_masks:
            log_mel = time_mask(log_mel, mask, key=_split_key(key, 2),
                                max_width=self.time_mask_width,
                                num_masks=self.num_time_masks,
                                max_fraction=self.time_mask_fraction, fill=self.fill)
        return log_mel, mask


@dataclasses.dataclass(frozen=True)
class TextAugment:
    """Token masking for ``Augmenter``: ``mask_tokens`` on ``(ids, mask)``.

    Attributes:
      rate: the replacement probability per eligible token, in ``[0, 1]``.
      mask_id: the id written in (e.g. ``[MASK]``; int >= 0).
      keep_ids: ids never replaced (e.g. ``(cls_id, sep_id)``), as a tuple.
    """

    rate: float
    mask_id: int
    keep_ids: tuple[int, ...] = ()

    def __post_init__(self):
        _rate("rate", self.rate)
        _nonneg_int("mask_id", self.mask_id)
        if not isinstance(self.keep_ids, tuple):
            raise TypeError(f"keep_ids: expected a tuple of ints (hashable), got "
                            f"{type(self.keep_ids).__name__}.")
        for i, t in enumerate(self.keep_ids):
            _nonneg_int(f"keep_ids[{i}]", t)

    def __call__(self, inputs: tuple[Array, Array], key: Array) -> tuple[Array, Array]:
        """Masks tokens of ``inputs = (ids, mask)``.

        Args:
          inputs: ``(ids int [batch, time], mask bool [batch, time])``.
          key: a PRNG key.

        Returns:
          ``(ids, mask)``: the new ids (same dtype) and the same mask.
        """
        if not isinstance(inputs, (tuple, list)) or len(inputs) != 2:
            raise TypeError(f"inputs: expected (ids, mask), got {type(inputs).__name__}.")
        ids, mask = inputs
        return mask_tokens(ids, mask, key=key, rate=self.rate, mask_id=self.mask_id,
                           keep_ids=self.keep_ids), mask


# ----------------------------------------------------------------------- composition


def _modality_tag(name: str) -> int:
    """A stable 31-bit integer for a modality name (its key is ``fold_in(key, tag)``)."""
    return zlib.crc32(name.encode("utf-8")) & 0x7FFFFFFF


def _restore(name: str, inputs: Any, out: Any, present: Array | None) -> Any:
    """``out`` with padded frames and absent examples put back to ``inputs``."""
    where = f"transforms[{name!r}]"
    in_leaves, in_tree = jax.tree.flatten(inputs)
    out_leaves, out_tree = jax.tree.flatten(out)
    if in_tree != out_tree:
        raise TypeError(f"{where}: must return the structure of batch[{name!r}] "
                        f"({in_tree}), got {out_tree}.")
    for i, (a, b) in enumerate(zip(in_leaves, out_leaves, strict=True)):
        if not hasattr(b, "shape") or tuple(b.shape) != tuple(a.shape) or b.dtype != a.dtype:
            got = (f"{b.dtype}{list(b.shape)}" if hasattr(b, "shape")
                   else type(b).__name__)
            raise TypeError(f"{where}: leaf {i} must keep shape and dtype "
                            f"{a.dtype}{list(a.shape)}, got {got}.")
    _, mask = _modality_parts(name, inputs)
    return _guard(inputs, out, mask, present)


@jax.jit
def _guard(inputs: Any, out: Any, mask: Array | None, present: Array | None) -> Any:
    """``out`` with ``inputs``' values at padded frames and at absent examples."""
    if mask is not None:
        data, new_mask = out
        data = jnp.where(_expand(mask, data.ndim), data, inputs[0])
        out = type(out)((data, new_mask & mask))
    if present is None:
        return out
    return jax.tree.map(lambda a, b: jnp.where(_expand(present, b.ndim), b, a), inputs, out)


@dataclasses.dataclass(frozen=True)
class Augmenter:
    """Per-modality augmentation of a batch dict: the ``(batch, key) -> batch`` hook.

    ``Augmenter({"image": ImageAugment(max_shift=2), "audio": AudioAugment(...)})`` maps
    modality names to transforms ``(batch[m], key) -> batch[m]`` (the configs of this
    module, or any callable that keeps the structure, shapes and dtypes). Calling it on
    a batch in the ``lepton_mm.models`` format returns a new batch in which:

    * modality ``m`` is transformed with ``fold_in(key, crc32(m) & 0x7FFFFFFF)`` (the
      CRC-32 of its UTF-8 name), so modalities draw independently and adding one does
      not change the others' draws;
    * for a ``(data, mask)`` modality, padded frames (mask False) keep their input values
      bit-for-bit and the mask can only lose entries, whatever the transform does;
    * an example whose ``batch["present"][m]`` is False keeps all of ``batch[m]``;
    * every other key (labels, ``present``, ``valid``, unlisted modalities) is passed
      through.

    It is pure and jit-compatible; the config is frozen and hashable (the mapping is
    stored as a sorted tuple of ``(name, transform)`` pairs), so it can be a static
    argument of a jitted train step.

    Args:
      transforms: modality name -> transform (a mapping, or ``(name, transform)``
        pairs).

    Raises:
      TypeError: a transform is not callable, or a name is not a str.
      ValueError: a name is a reserved batch key, or no transforms are given.

    Examples:
      >>> import jax, numpy as np
      >>> augment = Augmenter({"audio": AudioAugment(time_mask_width=3)})
      >>> batch = {"audio": (np.ones((2, 8, 4), np.float32), np.arange(8) < [[5], [8]]),
      ...          "label": np.array([0, 1]),
      ...          "present": {"audio": np.array([False, True])}}
      >>> out = augment(batch, jax.random.key(0))
      >>> bool((out["audio"][0][0] == 1).all())  # absent for example 0: untouched
      True
    """

    transforms: Mapping[str, Transform] | tuple[tuple[str, Transform], ...]

    def __post_init__(self):
        items = (self.transforms.items() if isinstance(self.transforms, Mapping)
                 else self.transforms)
        try:
            pairs = [(name, fn) for name, fn in items]
        except (TypeError, ValueError):
            raise TypeError(f"transforms: expected a mapping modality name -> transform, "
                            f"got {type(self.transforms).__name__}.") from None
        if not pairs:
            raise ValueError("transforms: expected at least one modality -> transform.")
        for name, fn in pairs:
            if not isinstance(name, str) or not name:
                raise TypeError(f"transforms: modality names must be non-empty str, got "
                                f"{name!r}.")
            if name in RESERVED_KEYS:
                raise ValueError(f"transforms: {name!r} is a reserved batch key "
                                 f"({list(RESERVED_KEYS)}), not a modality.")
            if not callable(fn):
                raise TypeError(f"transforms[{name!r}]: expected a callable "
                                f"(inputs, key) -> inputs, got {type(fn).__name__}.")
        if len({name for name, _ in pairs}) != len(pairs):
            raise ValueError("transforms: a modality is listed twice.")
        object.__setattr__(self, "transforms", tuple(sorted(pairs, key=lambda p: p[0])))

    def __call__(self, batch: Mapping[str, Any], key: Array) -> dict[str, Any]:
        """Augments ``batch``'s modalities.

        Args:
          batch: a batch dict (``lepton_mm.models``) holding every modality named in
            ``transforms``.
          key: a PRNG key (e.g. ``fold_in(step_key, step)``).

        Returns:
          A new batch dict with the augmented modalities; other entries are the same
          objects.

        Raises:
          ValueError: a named modality is not in ``batch``, or its arrays are malformed.
          TypeError: a transform changed the structure, a shape or a dtype.
        """
        names = _modalities(batch)
        key = check_key(key)
        out = dict(batch)
        for name, transform in self.transforms:
            if name not in batch:
                raise ValueError(f"batch: unrecognized modality {name!r} (in transforms); "
                                 f"the batch has modalities {names}.")
            inputs = batch[name]
            data, _ = _modality_parts(name, inputs)
            present = _present(batch, name, data.shape[0])
            result = transform(inputs, jax.random.fold_in(key, _modality_tag(name)))
            out[name] = _restore(name, inputs, result, present)
        return out
