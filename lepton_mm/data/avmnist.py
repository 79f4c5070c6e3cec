"""AV-MNIST rebuilt from the bundled MNIST and FSDD: a pure function of ``data_seed``.

AV-MNIST (Vielzeuf et al. 2018; MultiBench, Liang et al. 2021) pairs an MNIST image
whose PCA energy has been cut to 25 % with a noisy spoken recording of the same digit.
The original preprocessed release (and its ESC-50 noise) is not available, so this
module rebuilds the benchmark from the repository's data, with seeded white Gaussian
noise; ``docs/avmnist.md`` gives the full definition and the differences.

* Images: MNIST's official split, pixels / 255, projected onto the fewest leading
  principal components (PCA fitted on the 55 000 images of the training split only,
  MNIST train 0-54 999, so validation images play no part) whose cumulative explained
  variance reaches 25 % (k = 4), and reconstructed from them.
* Audio: FSDD split by take (0–4 test, 5–9 validation, 10–49 train); each clip scaled
  by its maximum absolute value, centred in a 1 s window (8000 samples, zero-padded or
  centre-cropped), white Gaussian noise at -15 dB SNR (relative to the clip's RMS) added
  to the clip's own samples only (the padding stays exactly zero), then a log-mel
  spectrogram ``[126, 64]`` and a mask that marks padding-only frames invalid.
* Pairing: each image gets a clip of the same digit from its split's takes, uniformly
  at random. Validation is the last 5000 MNIST training images (55 000 / 5000 / 10 000).

Every random choice of example ``i`` of split ``s`` comes from
``fold_in(fold_in(fold_in(key(data_seed), s), i), tag)`` (threefry, JAX's default), so
an example is the same on every run and machine whatever batch or subset it is
built in. Features are computed on the fly by jitted functions:
``AVMNISTSplit[indices]`` returns a batch in the ``lepton_mm.models`` batch format, and
``AVMNISTSplit.materialize()`` the whole split as one such dict (32 KiB per example).
For noise-robust training, ``SNRRangeDataset`` rebuilds a split's audio every epoch at
SNRs drawn per example from a range (keys with tag 2, also folding in the run's seed
and the epoch), and ``standardize_utterances`` standardises each log-mel by its own
valid frames.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lepton_mm._validation import check_array, check_positive_int
from lepton_mm.data.batching import _check_batch_size, _epoch_batches
from lepton_mm.data.bundled import load_fsdd, load_mnist, verified_path
from lepton_mm.features import log_mel_spectrogram, num_frames

Array = jax.Array

SPLITS = ("train", "val", "test")
#: FSDD takes per split (FSDD's official test split is takes 0-4).
TAKES = {"train": tuple(range(10, 50)), "val": tuple(range(5, 10)), "test": tuple(range(5))}
#: Examples per split (MultiBench's sizes): validation = the last 5000 MNIST train images.
SPLIT_SIZES = {"train": 55_000, "val": 5_000, "test": 10_000}
PCA_VARIANCE = 0.25
#: The number of components that PCA_VARIANCE selects on the training split's images
#: (checked at build time).
PCA_COMPONENTS = 4
SNR_DB = -15.0
SAMPLE_RATE = 8000
WINDOW = 8000  # samples: 1.0 s at 8 kHz
N_FFT = 256
HOP_LENGTH = 64
N_MELS = 64
NUM_FRAMES = num_frames(WINDOW, hop_length=HOP_LENGTH)  # 126

_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
_PAIR_TAG, _NOISE_TAG, _EPOCH_NOISE_TAG = 0, 1, 2


# -------------------------------------------------------------------------------- PCA


class ImagePCA(NamedTuple):
    """Principal components of flattened images (float64).

    Attributes:
      mean: ``[d]`` the mean of the images it was fitted on.
      components: ``[d, k]`` the ``k`` leading unit eigenvectors of the covariance, as
        columns, in decreasing order of variance.
      explained_variance_ratio: ``[d]`` every eigenvalue over their sum, decreasing.
    """

    mean: np.ndarray
    components: np.ndarray
    explained_variance_ratio: np.ndarray

    @property
    def num_components(self) -> int:
        return self.components.shape[1]

    def project(self, x: np.ndarray) -> np.ndarray:
        """float ``[n, d]`` → float64 coefficients ``[n, k]``."""
        return (np.asarray(x, np.float64) - self.mean) @ self.components

    def reconstruct(self, coefficients: np.ndarray) -> np.ndarray:
        """float64 ``[n, k]`` coefficients → float64 ``[n, d]`` images."""
        return self.mean + np.asarray(coefficients, np.float64) @ self.components.T


def _blas_single_thread() -> Any:
    # On 2 busy cores, OpenBLAS threads oversubscribe: 784x784 eigh took 5-17 s with
    # threads against 0.2 s without, the covariance 5 s against 2.4 s (measured).
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional (scikit-learn's dependency); only a speed matter
        return contextlib.nullcontext()
    return threadpool_limits(1)


def fit_image_pca(images: np.ndarray, *, variance: float = PCA_VARIANCE,
                  scale: float = 255.0, chunk: int = 10_000) -> ImagePCA:
    """Fits PCA on ``images / scale`` (eigh of the float64 covariance).

    Keeps the smallest number of leading components whose cumulative explained
    variance reaches ``variance``.

    Args:
      images: ``[n, ...]`` images (any numeric dtype); flattened to ``[n, d]``.
      variance: target fraction of the total variance, in ``(0, 1]``.
      scale: divisor applied to the pixels first (255 for uint8).
      chunk: rows per covariance block (bounds the float64 working memory).

    Returns:
      ``ImagePCA``; ``components`` has the ``k`` selected columns.
    """
    if not 0.0 < variance <= 1.0:
        raise ValueError(f"variance: expected a fraction in (0, 1], got {variance!r}.")
    x = np.asarray(images).reshape(len(images), -1)
    n, d = x.shape
    if n < 2:
        raise ValueError(f"images: need at least 2 images, got {n}.")
    with _blas_single_thread():
        mean = np.zeros(d)
        for i in range(0, n, chunk):
            mean += x[i:i + chunk].sum(axis=0, dtype=np.float64)
        mean /= n * scale
        cov = np.zeros((d, d))
        for i in range(0, n, chunk):
            block = x[i:i + chunk].astype(np.float64) / scale - mean
            cov += block.T @ block
        cov /= n
        eigenvalues, eigenvectors = np.linalg.eigh(cov)  # ascending
    eigenvalues, eigenvectors = eigenvalues[::-1].clip(min=0.0), eigenvectors[:, ::-1]
    ratio = eigenvalues / eigenvalues.sum()
    k = int(np.searchsorted(np.cumsum(ratio), variance - 1e-12) + 1)
    # Fix each component's sign (largest |entry| positive) so results are reproducible.
    vectors = eigenvectors[:, :k]
    signs = np.sign(vectors[np.abs(vectors).argmax(axis=0), np.arange(k)])
    return ImagePCA(mean=mean, components=vectors * signs, explained_variance_ratio=ratio)


# ------------------------------------------------------------------------------ audio


def place_clip(waveform: np.ndarray, window: int = WINDOW) -> tuple[np.ndarray, int, int]:
    """Scales a clip to peak 1 and centres it in a ``window``-sample frame.

    A clip shorter than the window is zero-padded on both sides (the extra sample, if
    any, goes to the right); a longer one is centre-cropped.

    Args:
      waveform: float ``[samples]``.
      window: output length.

    Returns:
      ``(placed, start, length)``: float32 ``[window]`` and the clip's samples
      ``placed[start:start + length]``; everything else is zero.

    Examples:
      >>> placed, start, length = place_clip(np.array([0.5, -0.25, 0.5], np.float32), 8)
      >>> placed.tolist(), start, length
      ([0.0, 0.0, 1.0, -0.5, 1.0, 0.0, 0.0, 0.0], 2, 3)
    """
    x = np.asarray(waveform, np.float32)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"waveform: expected a non-empty [samples] array, got shape "
                         f"{x.shape}.")
    peak = float(np.abs(x).max())
    if peak > 0:
        x = x / np.float32(peak)
    if x.size > window:
        offset = (x.size - window) // 2
        return x[offset:offset + window].copy(), 0, window
    start = (window - x.size) // 2
    placed = np.zeros(window, np.float32)
    placed[start:start + x.size] = x
    return placed, start, int(x.size)


def window_frame_mask(starts: Array, lengths: Array, num_samples: int, *,
                      n_fft: int = N_FFT, hop_length: int = HOP_LENGTH) -> Array:
    """Which centred spectrogram frames see each clip's samples ``[start, start+length)``.

    A two-sided ``lepton_mm.features.frame_mask`` for clips with padding on both sides.
    Frame ``t`` of ``log_mel_spectrogram`` windows samples
    ``[t * hop_length - n_fft // 2, t * hop_length + n_fft // 2)`` with a periodic Hann
    window whose first tap is exactly zero, so its value depends on the samples
    ``(t * hop_length - n_fft // 2, t * hop_length + n_fft // 2)``. The frame is valid
    iff those overlap the clip: a valid frame depends on the clip, an invalid one is
    computed from padding only. (``frame_mask`` also counts the zero-weight first tap,
    so for ``start = 0`` it can mark one more frame valid.)

    Args:
      starts: int ``[batch]``, first sample of each clip.
      lengths: int ``[batch]``, clip lengths (0 gives an all-False row).
      num_samples: padded length (static).
      n_fft: window length, as passed to ``log_mel_spectrogram``.
      hop_length: hop between frames.

    Returns:
      bool ``[batch, 1 + num_samples // hop_length]``.

    Examples:
      With ``n_fft=4, hop_length=2`` frame ``t`` weighs samples ``2t - 1 ... 2t + 1``; a
      clip on samples 6, 7, 8 reaches frames 3 and 4.

      >>> import jax.numpy as jnp
      >>> window_frame_mask(jnp.array([6]), jnp.array([3]), 16, n_fft=4,
      ...                   hop_length=2).astype(int).tolist()
      [[0, 0, 0, 1, 1, 0, 0, 0, 0]]
    """
    dims: dict[str, int] = {}
    check_array("starts", starts, "batch", kind="int", dims=dims)
    check_array("lengths", lengths, "batch", kind="int", dims=dims)
    n_fft = check_positive_int("n_fft", n_fft)
    if n_fft % 2:
        raise ValueError(f"n_fft: expected an even positive integer, got {n_fft}.")
    time = num_frames(num_samples, hop_length=hop_length)
    centre = jnp.arange(time) * hop_length  # [time]
    starts = jnp.asarray(starts)[:, None]
    ends = starts + jnp.asarray(lengths)[:, None]  # [batch, 1]
    first, stop = centre - n_fft // 2 + 1, centre + n_fft // 2  # nonzero taps
    return (first[None, :] < ends) & (stop[None, :] > starts) & (ends > starts)


def _example_keys(seed: Array, split_id: Array, index: Array, tag: int) -> Array:
    """One key per example: ``fold_in(fold_in(fold_in(key(seed), split), i), tag)``."""
    split_key = jax.random.fold_in(jax.random.key(seed), split_id)
    return jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(split_key, i), tag))(
        index)


@jax.jit
def _pair(seed: Array, split_id: Array, index: Array, counts: Array) -> Array:
    """Uniform draw in ``[0, counts[i])`` per example (which clip of its digit).

    ``split_id``, ``index`` and ``counts`` are int ``[n]``: all splits in one call.
    """
    root = jax.random.key(seed)

    def draw(s, i, n):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(root, s), i),
                                 _PAIR_TAG)
        return jax.random.randint(key, (), 0, n)

    return jax.vmap(draw)(split_id, index, counts)


def _add_noise(keys: Array, clips: Array, bank: Array, starts: Array, lengths: Array,
               rms: Array, scale: Array) -> tuple[Array, Array, Array, Array]:
    """(noisy [b, W], clean [b, W], start [b], length [b]): clip ``clips[i]`` plus
    ``rms[clips[i]] * scale[i] * normal(keys[i], [W])`` on its own samples only.

    ``scale`` is ``10 ** (-snr_db / 20)``: float32 ``[b]`` (an SNR per example) or a
    scalar (one SNR for all).
    """
    clean, start, length = bank[clips], starts[clips], lengths[clips]
    noise = jax.vmap(lambda k: jax.random.normal(k, (bank.shape[1],), jnp.float32))(keys)
    position = jnp.arange(bank.shape[1])[None, :]
    inside = (position >= start[:, None]) & (position < (start + length)[:, None])
    sigma = rms[clips] * scale
    noisy = clean + jnp.where(inside, sigma[:, None] * noise, 0.0)
    return noisy, clean, start, length


@functools.partial(jax.jit, static_argnames="snr_db")
def _noisy_windows(seed: Array, split_id: Array, index: Array, clips: Array, bank: Array,
                   starts: Array, lengths: Array, rms: Array, *,
                   snr_db: float) -> tuple[Array, Array, Array, Array]:
    """(noisy [b, W], clean [b, W], start [b], length [b]) for examples ``index``."""
    keys = _example_keys(seed, split_id, index, _NOISE_TAG)
    return _add_noise(keys, clips, bank, starts, lengths, rms,
                      np.float32(10.0 ** (-snr_db / 20.0)))


def _epoch_keys(seed: Array, split_id: Array, index: Array, run_seed: Array,
                epoch: Array) -> Array:
    """Per example: ``fold_in(fold_in(example key with tag 2, run_seed), epoch)``."""
    keys = _example_keys(seed, split_id, index, _EPOCH_NOISE_TAG)
    return jax.vmap(lambda k: jax.random.fold_in(jax.random.fold_in(k, run_seed), epoch))(
        keys)


def _draw_snr(keys: Array, low: Array, high: Array) -> Array:
    """float32 ``[b]``: ``uniform(fold_in(keys[i], 0), low, high)`` dB."""
    return jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 0), (), jnp.float32,
                                                 low, high))(keys)


@jax.jit
def _epoch_snr(seed: Array, split_id: Array, index: Array, run_seed: Array, epoch: Array,
               low: Array, high: Array) -> Array:
    """The SNR (dB, float32 ``[b]``) of examples ``index`` at ``(run_seed, epoch)``."""
    return _draw_snr(_epoch_keys(seed, split_id, index, run_seed, epoch), low, high)


def _epoch_noise(seed: Array, split_id: Array, index: Array, run_seed: Array,
                 epoch: Array, low: Array, high: Array, clips: Array, bank: Array,
                 starts: Array, lengths: Array,
                 rms: Array) -> tuple[Array, Array, Array, Array]:
    """``_noisy_windows`` with a fresh SNR and noise per ``(run_seed, epoch)`` example."""
    keys = _epoch_keys(seed, split_id, index, run_seed, epoch)
    scale = jnp.power(jnp.float32(10.0), -_draw_snr(keys, low, high) / 20.0)
    noise_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
    return _add_noise(noise_keys, clips, bank, starts, lengths, rms, scale)


_epoch_noisy_windows = jax.jit(_epoch_noise)


def _log_mel_and_mask(noisy: Array, start: Array, length: Array) -> tuple[Array, Array]:
    """(log_mel [b, time, mels], mask [b, time]) of noisy windows."""
    log_mel = log_mel_spectrogram(noisy, SAMPLE_RATE, n_fft=N_FFT, hop_length=HOP_LENGTH,
                                  n_mels=N_MELS)
    mask = window_frame_mask(start, length, noisy.shape[1], n_fft=N_FFT,
                             hop_length=HOP_LENGTH)
    return log_mel, mask


_features = jax.jit(_log_mel_and_mask)


def _utterance_standardized(log_mel: Array, mask: Array) -> Array:
    """float32 ``[b, time, mels]``: ``standardize_utterances`` (two-pass, float32)."""
    valid = mask[:, :, None]
    count = jnp.maximum(jnp.sum(mask, axis=1) * log_mel.shape[2], 1).astype(jnp.float32)
    count = count[:, None, None]
    mean = jnp.sum(jnp.where(valid, log_mel, 0.0), axis=(1, 2), keepdims=True) / count
    centred = jnp.where(valid, log_mel - mean, 0.0)
    std = jnp.sqrt(jnp.sum(centred * centred, axis=(1, 2), keepdims=True) / count)
    return jnp.where(valid, centred / jnp.where(std > 0, std, 1.0), log_mel)


_standardize_chunk = jax.jit(_utterance_standardized)


@functools.partial(jax.jit, static_argnames="utterance")
def _normalized_features(noisy: Array, start: Array, length: Array, mean: Array,
                         std: Array, *, utterance: bool) -> tuple[Array, Array]:
    """``_features``, the log-mels then standardised per utterance, else
    ``(log_mel - mean) / std``."""
    log_mel, mask = _log_mel_and_mask(noisy, start, length)
    if utterance:
        return _utterance_standardized(log_mel, mask), mask
    return (log_mel - mean) / std, mask


# ---------------------------------------------------------------------------- dataset


class NoisyAudio(NamedTuple):
    """Waveforms of a batch: the noisy model input and its parts.

    Attributes:
      noisy: float32 ``[batch, WINDOW]``, what the log-mel is computed from.
      clean: float32 ``[batch, WINDOW]``, the placed clip (peak 1) before the noise.
      start: int32 ``[batch]``, first clip sample in the window.
      length: int32 ``[batch]``, clip samples in the window (noise covers exactly these).
    """

    noisy: np.ndarray
    clean: np.ndarray
    start: np.ndarray
    length: np.ndarray


class _ClipBank(NamedTuple):
    """All FSDD recordings placed in the window, on the device (shared by the splits)."""

    waves: Array  # float32 [3000, WINDOW]
    starts: Array  # int32 [3000]
    lengths: Array  # int32 [3000]
    rms: Array  # float32 [3000], RMS of the clip samples (float64 then rounded)


class AVMNISTSplit:
    """One AV-MNIST split (or a subset of it): indexable, batches computed on the fly.

    ``split[indices]`` returns the batch dict::

        {"image": float32 [b, 28, 28, 1],                       # PCA-reconstructed
         "audio": (log_mel float32 [b, 126, 64], mask bool [b, 126]),
         "label": int32 [b]}

    as numpy arrays (``indices``: ints, a slice, an int array or a bool mask; a scalar
    index gives one example without the batch axis). ``materialize()`` gives the same
    dict for every example (to train with ``lepton_mm.training.fit``). Example ``i`` of
    a subset is example ``example_index[i]`` of the full split and has exactly its
    values.

    Attributes:
      name: ``"train"``, ``"val"`` or ``"test"``.
      data_seed: the seed everything random derives from.
      labels: int32 ``[n]``, the digit (image and audio agree).
      example_index: int64 ``[n]``, position in the full split (keys the noise).
      mnist_index: int64 ``[n]``, row in MNIST's train (train/val) or test set.
      clip_index: int64 ``[n]``, the paired FSDD recording.
      coefficients: float64 ``[n, 4]``, the images' PCA coefficients.
      pca: the ``ImagePCA`` (shared by the splits).
      snr_db: the noise level.
    """

    def __init__(self, name: str, data_seed: int, *, labels: np.ndarray,
                 example_index: np.ndarray, mnist_index: np.ndarray,
                 clip_index: np.ndarray, coefficients: np.ndarray, pca: ImagePCA,
                 bank: _ClipBank, snr_db: float):
        self.name = name
        self.data_seed = int(data_seed)
        self.labels = labels
        self.example_index = example_index
        self.mnist_index = mnist_index
        self.clip_index = clip_index
        self.coefficients = coefficients  # float64 [n, k]
        self.pca = pca
        self.snr_db = float(snr_db)
        self._bank = bank

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return (f"AVMNISTSplit({self.name!r}, n={len(self)}, data_seed={self.data_seed}, "
                f"snr_db={self.snr_db:g})")

    def _rows(self, index: Any) -> tuple[np.ndarray, bool]:
        rows = np.arange(len(self))[index]
        return np.atleast_1d(rows), rows.ndim == 0

    def subset(self, index: Any) -> AVMNISTSplit:
        """The examples ``index`` (same values as in the full split)."""
        rows, _ = self._rows(index)
        return AVMNISTSplit(
            self.name, self.data_seed, labels=self.labels[rows],
            example_index=self.example_index[rows], mnist_index=self.mnist_index[rows],
            clip_index=self.clip_index[rows], coefficients=self.coefficients[rows],
            pca=self.pca, bank=self._bank, snr_db=self.snr_db)

    def images(self, index: Any) -> np.ndarray:
        """float32 ``[b, 28, 28, 1]`` PCA reconstructions (values roughly in [0, 1])."""
        rows, scalar = self._rows(index)
        images = self.pca.reconstruct(self.coefficients[rows]).astype(np.float32)
        images = images.reshape(len(rows), 28, 28, 1)
        return images[0] if scalar else images

    def _audio_args(self, rows: np.ndarray) -> tuple[Any, ...]:
        b = self._bank
        return (np.int32(self.data_seed), np.int32(_SPLIT_IDS[self.name]),
                self.example_index[rows].astype(np.int32),
                self.clip_index[rows].astype(np.int32), b.waves, b.starts, b.lengths, b.rms)

    def waveforms(self, index: Any) -> NoisyAudio:
        """The noisy and clean 1 s windows behind the log-mels of ``index``."""
        rows, scalar = self._rows(index)
        out = NoisyAudio(*(np.asarray(a) for a in _noisy_windows(
            *self._audio_args(rows), snr_db=self.snr_db)))
        return NoisyAudio(*(a[0] for a in out)) if scalar else out

    def audio(self, index: Any) -> tuple[np.ndarray, np.ndarray]:
        """``(log_mel float32 [b, 126, 64], mask bool [b, 126])``."""
        rows, scalar = self._rows(index)
        # Two jitted calls: in one, XLA fuses the noise generation into the log-mel's
        # framing gather and recomputes it per frame (12x slower, measured).
        noisy, _, start, length = _noisy_windows(*self._audio_args(rows),
                                                 snr_db=self.snr_db)
        log_mel, mask = (np.asarray(a) for a in _features(noisy, start, length))
        return (log_mel[0], mask[0]) if scalar else (log_mel, mask)

    def __getitem__(self, index: Any) -> dict[str, Any]:
        rows, scalar = self._rows(index)
        batch = {"image": self.images(rows), "audio": self.audio(rows),
                 "label": self.labels[rows]}
        return jax.tree.map(lambda a: a[0], batch) if scalar else batch

    def materialize(self, *, chunk: int = 64) -> dict[str, Any]:
        """Every example's features at once: the batch dict over the whole split.

        Computed ``chunk`` examples at a time (one compilation; the last chunk is padded
        with repeats), with exactly the values of ``self[indices]``. Costs about
        0.4 ms and 32 KiB per example (2 CPU cores): the full training split takes
        ~1.8 GB. The result is a plain dict of numpy arrays, e.g. for
        ``lepton_mm.training.fit`` / ``ArrayDataset``.
        """
        n = len(self)
        log_mel = np.empty((n, NUM_FRAMES, N_MELS), np.float32)
        mask = np.empty((n, NUM_FRAMES), bool)
        for i in range(0, n, chunk):
            rows = np.arange(i, i + chunk) % n
            part_mel, part_mask = self.audio(rows)
            m = min(chunk, n - i)
            log_mel[i:i + m], mask[i:i + m] = part_mel[:m], part_mask[:m]
        return {"image": self.images(slice(None)), "audio": (log_mel, mask),
                "label": self.labels.copy()}


class AVMNIST(NamedTuple):
    """The three splits and the image PCA they share.

    Attributes:
      train: 55 000 examples (MNIST train 0-54 999, FSDD takes 10-49).
      val: 5000 examples (MNIST train 55 000-59 999, FSDD takes 5-9).
      test: 10 000 examples (MNIST test, FSDD takes 0-4).
      pca: the ``ImagePCA`` fitted on the training split's 55 000 images (MNIST train
        0-54 999; not the validation images).
    """

    train: AVMNISTSplit
    val: AVMNISTSplit
    test: AVMNISTSplit
    pca: ImagePCA


class _Sources(NamedTuple):
    pca: ImagePCA
    coefficients: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    mnist_index: dict[str, np.ndarray]
    bank: _ClipBank
    fsdd_label: np.ndarray
    fsdd_take: np.ndarray


@functools.lru_cache(maxsize=2)
def _sources(mnist_path: str, fsdd_path: str) -> _Sources:
    """Everything that does not depend on ``data_seed`` (cached per data folder)."""
    mnist = load_mnist(data_dir=Path(mnist_path).parent)
    n_train = SPLIT_SIZES["train"]
    train_idx = np.arange(n_train)
    val_idx = np.arange(n_train, n_train + SPLIT_SIZES["val"])
    test_idx = np.arange(SPLIT_SIZES["test"])
    # Fitted on the training split only: validation images must not shape the features.
    pca = fit_image_pca(mnist.x_train[train_idx], variance=PCA_VARIANCE)
    if pca.num_components != PCA_COMPONENTS:
        raise AssertionError(
            f"AV-MNIST: {PCA_VARIANCE:.0%} of the variance of MNIST's first {n_train} "
            f"training images needs {pca.num_components} components, expected "
            f"{PCA_COMPONENTS}; is {mnist_path} the official MNIST?")
    mnist_index = {"train": train_idx, "val": val_idx, "test": test_idx}
    pixels = {"train": mnist.x_train[train_idx], "val": mnist.x_train[val_idx],
              "test": mnist.x_test}
    digits = {"train": mnist.y_train[train_idx], "val": mnist.y_train[val_idx],
              "test": mnist.y_test}
    coefficients = {s: pca.project(pixels[s].reshape(len(pixels[s]), -1) / 255.0)
                    for s in SPLITS}
    labels = {s: digits[s].astype(np.int32) for s in SPLITS}

    fsdd = load_fsdd(data_dir=Path(fsdd_path).parent)
    if fsdd.sample_rate != SAMPLE_RATE:
        raise ValueError(f"FSDD: expected {SAMPLE_RATE} Hz, got {fsdd.sample_rate}.")
    placed = [place_clip(w) for w in fsdd.waveforms]
    waves = np.stack([p[0] for p in placed])
    starts = np.array([p[1] for p in placed], np.int32)
    lengths = np.array([p[2] for p in placed], np.int32)
    rms = np.array([np.sqrt(np.mean(np.square(w[s:s + n], dtype=np.float64)))
                    for w, s, n in zip(waves, starts, lengths, strict=True)], np.float32)
    bank = _ClipBank(jnp.asarray(waves), jnp.asarray(starts), jnp.asarray(lengths),
                     jnp.asarray(rms))
    return _Sources(pca, coefficients, labels, mnist_index, bank,
                    fsdd.label.astype(np.int32), fsdd.take.astype(np.int32))


def load_avmnist(*, data_seed: int = 0, snr_db: float = SNR_DB,
                 data_dir: str | os.PathLike[str] | None = None) -> AVMNIST:
    """Builds AV-MNIST's three splits (see the module docstring and docs/avmnist.md).

    Takes a few seconds (PCA on MNIST, cached per process and data folder); features
    are computed per batch on indexing.

    Args:
      data_seed: seeds the image-clip pairing and every noise sample.
      snr_db: signal-to-noise ratio of the added white noise (the benchmark: -15).
      data_dir: folder with ``mnist.npz`` and ``fsdd.npz`` (default: see
        ``lepton_mm.data``).

    Returns:
      ``AVMNIST(train, val, test, pca)`` with 55 000 / 5000 / 10 000 examples.

    Examples:
      >>> avmnist = load_avmnist(data_seed=0)  # doctest: +SKIP
      >>> batch = avmnist.train[:40]  # doctest: +SKIP
      >>> batch["image"].shape, batch["audio"][0].shape  # doctest: +SKIP
      ((40, 28, 28, 1), (40, 126, 64))
    """
    if isinstance(data_seed, bool) or not isinstance(data_seed, (int, np.integer)) or not (
            0 <= data_seed < 2**31):
        raise ValueError(f"data_seed: expected an int in [0, 2**31), got {data_seed!r}.")
    if not np.isfinite(snr_db):
        raise ValueError(f"snr_db: expected a finite number, got {snr_db!r}.")
    src = _sources(str(verified_path("mnist.npz", data_dir).resolve()),
                   str(verified_path("fsdd.npz", data_dir).resolve()))
    tables, draws_args = {}, []
    for name in SPLITS:
        candidates = _candidates(src.fsdd_label, src.fsdd_take, TAKES[name])
        counts = np.array([len(c) for c in candidates])
        tables[name] = np.stack([np.resize(c, counts.max()) for c in candidates])
        n = len(src.labels[name])
        draws_args.append((np.full(n, _SPLIT_IDS[name]), np.arange(n),
                           counts[src.labels[name]]))
    split_id, index, counts = (np.concatenate(a).astype(np.int32)
                               for a in zip(*draws_args, strict=True))
    draws = np.split(np.asarray(_pair(np.int32(data_seed), split_id, index, counts)),
                     np.cumsum([len(src.labels[name]) for name in SPLITS])[:-1])
    splits = {}
    for name, draw in zip(SPLITS, draws, strict=True):
        labels = src.labels[name]
        splits[name] = AVMNISTSplit(
            name, int(data_seed), labels=labels, example_index=np.arange(len(labels)),
            mnist_index=src.mnist_index[name],
            clip_index=tables[name][labels, draw].astype(np.int64),
            coefficients=src.coefficients[name], pca=src.pca, bank=src.bank,
            snr_db=snr_db)
    return AVMNIST(splits["train"], splits["val"], splits["test"], src.pca)


def _candidates(fsdd_label: np.ndarray, fsdd_take: np.ndarray,
                takes: Sequence[int]) -> list[np.ndarray]:
    """Per digit 0-9, the FSDD recordings of that digit among ``takes`` (sorted)."""
    in_split = np.isin(fsdd_take, takes)
    out = [np.flatnonzero(in_split & (fsdd_label == d)) for d in range(10)]
    if any(len(c) == 0 for c in out):
        raise ValueError(f"FSDD: some digit has no recording among takes {list(takes)}.")
    return out


# ------------------------------------------------------------------ arrays for training


def log_mel_statistics(log_mel: np.ndarray, mask: np.ndarray, *,
                       chunk: int = 1024) -> tuple[np.float32, np.float32]:
    """Mean and standard deviation of the valid frames of a split's log-mels.

    Args:
      log_mel: float ``[n, frames, mels]``.
      mask: bool ``[n, frames]``, True on valid frames.
      chunk: examples per float64 partial sum (no float64 copy of the whole split).

    Returns:
      ``(mean, std)`` as float32 (population std), from float64 sums.
    """
    dims: dict[str, int] = {}
    check_array("log_mel", log_mel, "batch frames mels", kind="float", dims=dims)
    check_array("mask", mask, "batch frames", kind="bool", dims=dims)
    total = square = count = 0.0
    for i in range(0, len(mask), chunk):
        valid = log_mel[i:i + chunk][mask[i:i + chunk]].astype(np.float64)
        total += valid.sum()
        square += (valid ** 2).sum()
        count += valid.size
    if not count:
        raise ValueError("mask: no valid frame to take statistics from.")
    mean = total / count
    return np.float32(mean), np.float32(np.sqrt(max(square / count - mean ** 2, 0.0)))


def standardize_log_mel(log_mel: np.ndarray, stats: tuple[float, float] | None) -> None:
    """Standardises log-mels in place.

    Args:
      log_mel: float32 ``[n, frames, mels]``, modified in place.
      stats: ``(mean, std)`` (``log_mel_statistics`` of the training split); None
        leaves ``log_mel`` unchanged.
    """
    if stats is not None:
        log_mel -= stats[0]
        log_mel /= stats[1]


def standardize_utterances(log_mel: np.ndarray, mask: np.ndarray, *,
                           chunk: int = 256) -> None:
    """Standardises each example's log-mel in place by its own valid frames.

    Example ``i``'s valid frames (``mask[i]``, every mel bin) become ``(x - mean_i) /
    std_i``, the mean and population std of those values (float32, two passes; the
    jitted computation ``SNRRangeDataset`` applies to each batch): a per-utterance
    alternative to ``standardize_log_mel``'s training-split statistics, blind to the
    recording's level and noise floor. Padding frames keep their values (the encoders
    never read them); an example without valid frames is unchanged, and one whose valid
    values are all equal is only centred.

    Args:
      log_mel: float32 ``[n, frames, mels]``, modified in place.
      mask: bool ``[n, frames]``, True on valid frames.
      chunk: examples per jitted call (the last one padded: one compilation).

    Examples:
      >>> x = np.array([[[1.0, 3.0], [5.0, 7.0], [-100.0, -100.0]]], np.float32)
      >>> standardize_utterances(x, np.array([[True, True, False]]))
      >>> np.round(x.astype(np.float64), 3).tolist()
      [[[-1.342, -0.447], [0.447, 1.342], [-100.0, -100.0]]]
    """
    dims: dict[str, int] = {}
    check_array("log_mel", log_mel, "batch frames mels", kind="float", dims=dims)
    check_array("mask", mask, "batch frames", kind="bool", dims=dims)
    n = len(mask)
    chunk = min(check_positive_int("chunk", chunk), n) if n else 1
    for i in range(0, n, chunk):
        rows = np.arange(i, i + chunk) % n  # the last chunk padded: one compilation
        m = min(chunk, n - i)
        out = np.asarray(_standardize_chunk(log_mel[rows].astype(np.float32), mask[rows]))
        log_mel[i:i + m] = out[:m]


def normalize_log_mel(log_mel: np.ndarray, mask: np.ndarray, how: Any) -> None:
    """Applies an ``avmnist_arrays`` ``"audio_norm"`` to log-mels, in place.

    Args:
      log_mel: float32 ``[n, frames, mels]``, modified in place.
      mask: bool ``[n, frames]``, True on valid frames.
      how: ``(mean, std)``: ``standardize_log_mel``; ``"utterance"``:
        ``standardize_utterances``; None: unchanged.

    Raises:
      ValueError: another string.
    """
    if isinstance(how, str):
        if how != "utterance":
            raise ValueError(f"how: expected (mean, std), 'utterance' or None, got {how!r}.")
        standardize_utterances(log_mel, mask)
    else:
        standardize_log_mel(log_mel, how)


def avmnist_arrays(*, data_seed: int = 0, snr_db: float = SNR_DB,
                   sizes: dict[str, int | None] | None = None,
                   normalize_audio: bool | str = True,
                   data_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The three splits as in-memory batch dicts, ready for ``fit`` / ``ArrayDataset``.

    Features are computed once (``AVMNISTSplit.materialize``: ~0.4 ms and 32 KiB per
    example, 2.5 GB for the full data); computing them per batch instead would cost
    ~8 s per full epoch, every epoch.

    Args:
      data_seed: as for ``load_avmnist``.
      snr_db: as for ``load_avmnist``.
      data_dir: as for ``load_avmnist``.
      sizes: per split name, keep its first this many examples (None or absent: all).
      normalize_audio: True (or ``"split"``): standardise every split's log-mels with
        the training split's ``log_mel_statistics`` (returned as ``"audio_stats"``);
        ``"utterance"``: each example by its own valid frames
        (``standardize_utterances``); False: leave them in dB.

    Returns:
      ``{"train", "val", "test"}``: dicts with ``image`` float32 ``[n, 28, 28, 1]``,
      ``audio`` (``[n, 126, 64]`` float32, ``[n, 126]`` bool) and ``label`` int32
      ``[n]``; ``"audio_stats"``: ``(mean, std)`` or None; and ``"audio_norm"``: what
      was applied, for ``normalize_log_mel`` (``(mean, std)``, ``"utterance"`` or None),
      so that audio rebuilt later (another SNR) can be normalised the same way.

    Raises:
      ValueError: a size outside ``1..len(split)``, an unknown split name or an
        unknown ``normalize_audio``.
    """
    how = _normalization("normalize_audio", normalize_audio)
    sizes = dict(sizes or {})
    unknown = set(sizes) - set(SPLITS)
    if unknown:
        raise ValueError(f"sizes: unknown split(s) {sorted(unknown)}; expected {SPLITS}.")
    for name, n in sizes.items():  # before any computation
        if n is not None and (isinstance(n, bool) or not isinstance(n, (int, np.integer))
                              or not 0 < n <= SPLIT_SIZES[name]):
            raise ValueError(f"num_{name}: expected an int in 1..{SPLIT_SIZES[name]}, "
                             f"got {n!r}.")
    avmnist = load_avmnist(data_seed=data_seed, snr_db=snr_db, data_dir=data_dir)
    out: dict[str, Any] = {}
    for name in SPLITS:
        split, n = getattr(avmnist, name), sizes.get(name)
        if n is not None:
            split = split.subset(np.arange(n))
        out[name] = split.materialize()
    out["audio_stats"] = None
    if how == "split":
        out["audio_stats"] = log_mel_statistics(*out["train"]["audio"])
    out["audio_norm"] = out["audio_stats"] if how == "split" else how
    for name in SPLITS:
        normalize_log_mel(*out[name]["audio"], out["audio_norm"])
    return out


def _normalization(name: str, value: Any) -> str | None:
    """``normalize_audio`` -> ``"split"``, ``"utterance"`` or None (checked)."""
    if isinstance(value, (bool, np.bool_)):
        return "split" if value else None
    if value is None or value in ("split", "none"):
        return None if value in (None, "none") else "split"
    if value == "utterance":
        return value
    raise ValueError(f"{name}: expected True / 'split', 'utterance' or False / 'none', got "
                     f"{value!r}.")


# --------------------------------------------------------- training at SNRs drawn per epoch


class SNRRangeDataset:
    """AV-MNIST examples whose audio is rebuilt every epoch at random SNRs: a ``BatchSource``.

    For noise-robust training: epoch ``e`` of a run with seed ``s`` visits the examples in
    ``ArrayDataset``'s order (``epoch_permutation(n, s, e)``, the last batch filled up with
    invalid repeats), and every example gets a fresh SNR, uniform on ``[low, high]`` dB,
    and a fresh white-noise draw. Example ``i`` of the split (``split.example_index``)
    takes both from ``k = fold_in(fold_in(fold_in(fold_in(fold_in(key(data_seed),
    split), i), 2), s), e)``: ``snr = uniform(fold_in(k, 0), low, high)``, noise
    ``normal(fold_in(k, 1), [8000])`` scaled to ``rms * 10 ** (-snr / 20)`` on the clip's
    own samples (as ``load_avmnist`` corrupts its clips at one SNR, whose noise key uses
    tag 1). So a batch is a function of ``(seed, epoch, batch index)`` alone, whatever
    batch or process computes it, and ``fit`` resumes a run exactly. Images and labels
    are held in memory; the audio is computed per batch (two jitted calls, like
    ``AVMNISTSplit.audio``), then normalised as ``normalize`` says.

    Cost (batch 40, 2 busy CPU cores, load 8): ~12 ms per batch (noise 3 ms, log-mel
    and normalisation 6 ms, the rest dispatch and assembly) against 0.15 ms for
    ``ArrayDataset`` indexing precomputed arrays. Beside the LeNet train step that is
    small: ``fit`` over 50 steps took 14.5 s against 14.0 s from memory for
    ``audio_only`` and 14.7 s against 14.3 s for ``concat`` (A B B A), ~4 %; on an idle
    machine, where a step takes ~80-130 ms, expect up to ~15 %. No training audio is
    held in memory (images: 3 KiB per example).

    Args:
      split: the examples (an ``AVMNISTSplit`` or a subset); its ``snr_db`` is unused.
      snr_db: ``(low, high)`` in dB, finite, ``low <= high`` (equal: one SNR, fresh noise
        every epoch).
      normalize: what ``normalize_log_mel`` applies to each batch's log-mels: the
        ``(mean, std)`` of ``log_mel_statistics``, ``"utterance"`` or None (dB).

    Raises:
      TypeError / ValueError: ``snr_db`` is not such a pair (the message names it), or
        ``normalize`` is another string.

    Examples:
      >>> train = load_avmnist(data_seed=0).train.subset(np.arange(1000))  # doctest: +SKIP
      >>> data = SNRRangeDataset(train, (-20.0, 20.0), normalize="utterance")  # doctest: +SKIP
      >>> batch = next(data.batches(40, seed=0, epoch=0))  # doctest: +SKIP
      >>> batch["audio"][0].shape, data.snr(np.arange(3), seed=0, epoch=0).shape  # doctest: +SKIP
      ((40, 126, 64), (3,))
    """

    def __init__(self, split: AVMNISTSplit, snr_db: tuple[float, float], *,
                 normalize: Any = None):
        self.snr_db = _check_snr_range("snr_db", snr_db)
        if isinstance(normalize, str) and normalize != "utterance":
            raise ValueError(f"normalize: expected (mean, std), 'utterance' or None, got "
                             f"{normalize!r}.")
        self.split, self.normalize = split, normalize
        self.images = split.images(slice(None))  # as materialize() builds them
        self.labels = split.labels

    def __len__(self) -> int:
        return len(self.split)

    def __repr__(self) -> str:
        return (f"SNRRangeDataset({self.split!r}, snr_db=({self.snr_db[0]:g}, "
                f"{self.snr_db[1]:g}), normalize={self.normalize!r})")

    def _epoch_args(self, rows: np.ndarray, seed: int, epoch: int) -> tuple[Any, ...]:
        for name, value in (("seed", seed), ("epoch", epoch)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not (
                    0 <= value < 2**32):
                raise ValueError(f"{name}: expected an int in [0, 2**32), got {value!r}.")
        split = self.split
        return (np.int32(split.data_seed), np.int32(_SPLIT_IDS[split.name]),
                split.example_index[rows].astype(np.int32), np.uint32(seed),
                np.uint32(epoch), np.float32(self.snr_db[0]), np.float32(self.snr_db[1]))

    def snr(self, index: Any, *, seed: int, epoch: int) -> np.ndarray:
        """float32 ``[b]``: the SNRs (dB) examples ``index`` get at ``(seed, epoch)``."""
        rows, _ = self.split._rows(index)
        return np.asarray(_epoch_snr(*self._epoch_args(rows, seed, epoch)))

    def waveforms(self, index: Any, *, seed: int, epoch: int) -> NoisyAudio:
        """The noisy and clean 1 s windows of examples ``index`` at ``(seed, epoch)``."""
        rows, _ = self.split._rows(index)
        b = self.split._bank
        return NoisyAudio(*(np.asarray(a) for a in _epoch_noisy_windows(
            *self._epoch_args(rows, seed, epoch), self.split.clip_index[rows].astype(np.int32),
            b.waves, b.starts, b.lengths, b.rms)))

    def audio(self, index: Any, *, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """``(log_mel float32 [b, 126, 64], mask bool [b, 126])`` at ``(seed, epoch)``,
        normalised."""
        rows, _ = self.split._rows(index)
        b = self.split._bank
        utterance = isinstance(self.normalize, str)
        mean, std = (0.0, 1.0) if utterance or self.normalize is None else self.normalize
        # Two programs, like AVMNISTSplit.audio: one, even with an optimization_barrier
        # between noise and log-mel, took 60 ms per batch of 40 against 12 (measured).
        noisy, _, start, length = _epoch_noisy_windows(
            *self._epoch_args(rows, seed, epoch), self.split.clip_index[rows].astype(np.int32),
            b.waves, b.starts, b.lengths, b.rms)
        log_mel, mask = _normalized_features(noisy, start, length, np.float32(mean),
                                             np.float32(std), utterance=utterance)
        return np.asarray(log_mel), np.asarray(mask)

    def num_batches(self, batch_size: int) -> int:
        """Batches per epoch: ``ceil(len(self) / batch_size)`` (the last one padded)."""
        return -(-len(self) // _check_batch_size(batch_size))

    def batches(self, batch_size: int, *, seed: int, epoch: int, shuffle: bool = True,
                start: int = 0, rows: slice | None = None) -> Iterator[dict[str, Any]]:
        """Yields the epoch's batch dicts from batch ``start`` on (``BatchSource``).

        Args:
          batch_size: rows per batch.
          seed: the run seed (the order and the audio).
          epoch: the epoch number (the order and the audio).
          shuffle: shuffle by ``epoch_permutation``; False keeps dataset order.
          start: index of the first batch (to resume mid-epoch).
          rows: the rows of each batch to return (multi-process: this process's share).

        Yields:
          ``{"image", "audio": (log_mel, mask), "label", "valid"}`` (numpy).
        """
        rows = rows or slice(None)
        for idx, valid in _epoch_batches(len(self), batch_size, seed=seed, epoch=epoch,
                                         shuffle=shuffle)[start:]:
            idx = idx[rows]
            yield {"image": self.images[idx], "audio": self.audio(idx, seed=seed, epoch=epoch),
                   "label": self.labels[idx], "valid": valid[rows]}


def _check_snr_range(name: str, value: Any) -> tuple[float, float]:
    """``(low, high)``: two finite numbers, ``low <= high`` (else an error naming ``name``)."""
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected (low, high) in dB, got {value!r}.") from None
    if not (np.isfinite(low) and np.isfinite(high) and low <= high):
        raise ValueError(f"{name}: expected finite (low, high) dB with low <= high, got "
                         f"{tuple(value)!r}.")
    return low, high
