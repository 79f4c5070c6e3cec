"""A per-example audio front end for files: waveform → fixed-size log-mel and frame mask.

``LogMelFeatures`` turns one decoded waveform of any length into the ``(log_mel, mask)``
pair the audio encoders take, with one shape for every example, so a
``ManifestDataset`` can batch it. The waveform is centred in a window of
``num_samples`` (zero-padded on both sides, or centre-cropped), the log-mel is
``lepton_mm.features.log_mel_spectrogram`` (librosa-compatible, jitted once per
setting), and a frame is valid iff it sees a sample between the window's first and
last non-zero sample (``window_frame_mask``): frames over digital silence added as
padding, by this front end or already in the file, are masked. On a window written by
``export_avmnist_files`` this reproduces AV-MNIST's features and mask exactly (its
padding is exactly zero and the noise covers the clip's samples).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lepton_mm._validation import check_positive_int
from lepton_mm.data.avmnist import window_frame_mask
from lepton_mm.features import log_mel_spectrogram

__all__ = ["LogMelFeatures"]


@functools.partial(jax.jit, static_argnames=("sample_rate", "n_fft", "hop_length",
                                             "n_mels"))
def _log_mel_window(window: jax.Array, start: jax.Array, length: jax.Array, *,
                    sample_rate: int, n_fft: int, hop_length: int,
                    n_mels: int) -> tuple[jax.Array, jax.Array]:
    """(log_mel float32 [frames, n_mels], mask bool [frames]) of one window [samples]."""
    log_mel = log_mel_spectrogram(window, sample_rate, n_fft=n_fft, hop_length=hop_length,
                                  n_mels=n_mels)
    mask = window_frame_mask(start[None], length[None], window.shape[0], n_fft=n_fft,
                             hop_length=hop_length)[0]
    return log_mel, mask


def _centred(waveform: np.ndarray, num_samples: int) -> np.ndarray:
    """float32 ``[num_samples]``: centred, zero-padded (extra sample right) or cropped."""
    if waveform.size >= num_samples:
        offset = (waveform.size - num_samples) // 2
        return np.ascontiguousarray(waveform[offset:offset + num_samples], np.float32)
    out = np.zeros(num_samples, np.float32)
    start = (num_samples - waveform.size) // 2
    out[start:start + waveform.size] = waveform
    return out


@dataclasses.dataclass(frozen=True)
class LogMelFeatures:
    """Waveform ``[samples]`` → ``(log_mel float32 [frames, n_mels], mask bool [frames])``.

    ``frames = 1 + num_samples // hop_length``. A frozen dataclass, so it pickles into
    grain's worker processes and compares by value.

    Attributes:
      sample_rate: the waveforms' rate in Hz (what ``ManifestDataset(sample_rate=)``
        decodes to).
      num_samples: the window every waveform is centred in (padded or cropped).
      n_fft: FFT and Hann window length (even).
      hop_length: samples between frames.
      n_mels: mel bands.
      stats: ``(mean, std)`` to standardise the log-mel with (e.g. the training split's
        ``log_mel_statistics``), or None.

    Examples:
      Half a second centred in one second lies on samples 2000-5999; frame ``t`` sees
      samples ``64 t - 127 ... 64 t + 127``, so frames 30-95 are valid.

      >>> import numpy as np
      >>> front_end = LogMelFeatures(sample_rate=8000, num_samples=8000, n_fft=256,
      ...                            hop_length=64)
      >>> log_mel, mask = front_end(np.ones(4000, np.float32))
      >>> log_mel.shape, np.flatnonzero(mask)[[0, -1]].tolist()
      ((126, 64), [30, 95])
    """

    sample_rate: int
    num_samples: int
    n_fft: int = 512
    hop_length: int = 128
    n_mels: int = 64
    stats: tuple[float, float] | None = None

    def __post_init__(self):
        for name in ("sample_rate", "num_samples", "n_fft", "hop_length", "n_mels"):
            check_positive_int(name, getattr(self, name))
        if self.n_fft % 2:
            raise ValueError(f"n_fft: expected an even positive integer, got {self.n_fft}.")
        if self.stats is not None:
            mean, std = (float(s) for s in self.stats)
            if not (np.isfinite(mean) and np.isfinite(std) and std > 0):
                raise ValueError(f"stats: expected a finite (mean, std) with std > 0, got "
                                 f"{self.stats!r}.")
            object.__setattr__(self, "stats", (mean, std))

    def __call__(self, waveform: Any) -> tuple[np.ndarray, np.ndarray]:
        """The features of one waveform.

        Args:
          waveform: float ``[samples]`` (at least one sample).

        Returns:
          ``(log_mel float32 [frames, n_mels], mask bool [frames])`` as numpy arrays.
        """
        x = np.asarray(waveform)
        if x.ndim != 1 or x.size == 0 or not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"waveform: expected a non-empty float [samples] array, got "
                             f"{x.dtype} {list(x.shape)}.")
        window = _centred(x, self.num_samples)
        nonzero = np.flatnonzero(window)
        start, length = ((int(nonzero[0]), int(nonzero[-1] - nonzero[0] + 1))
                         if nonzero.size else (0, 0))
        log_mel, mask = _log_mel_window(
            jnp.asarray(window), jnp.int32(start), jnp.int32(length),
            sample_rate=self.sample_rate, n_fft=self.n_fft, hop_length=self.hop_length,
            n_mels=self.n_mels)
        log_mel = np.array(log_mel)
        if self.stats is not None:  # as ``standardize_log_mel``: float32, in place
            log_mel -= np.float32(self.stats[0])
            log_mel /= np.float32(self.stats[1])
        return log_mel, np.asarray(mask)
