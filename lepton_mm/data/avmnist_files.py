"""AV-MNIST written out as files and a manifest, and the features that read them back.

``export_avmnist_files`` writes a split of AV-MNIST (or a slice of it) the way a
researcher's own data would sit on disk: one PNG and one WAV per example and a
manifest (``ManifestDataset`` reads it). ``avmnist_file_features`` gives the
per-example feature functions that turn those files back into AV-MNIST's arrays, so
the file path and the in-memory path (``AVMNISTSplit.materialize``) can be compared
example for example:

* images: each PNG holds the example's MNIST digit (8-bit grey, lossless); the feature
  function applies AV-MNIST's 25 % PCA cut (the training split's ``ImagePCA``, stored
  in ``features.npz``) to it. The 8-bit pixels are recovered exactly, so the image
  equals ``AVMNISTSplit.images`` up to float64 summation order (~1e-7).
* audio: each WAV holds the noisy 1 s window the log-mel is computed from, as 32-bit
  float samples, bit-exact. (16-bit PCM could not hold it: at -15 dB SNR the noisy
  window reaches about ±4, beyond PCM's [-1, 1) range, and 16-bit steps of 3e-5 would
  move the quietest spectrogram bins.) ``LogMelFeatures`` recomputes the log-mel and
  the frame mask from it (its padding is exactly zero, so the clip's position is read
  off the samples).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from lepton_mm.data.avmnist import (
    HOP_LENGTH,
    N_FFT,
    N_MELS,
    NUM_FRAMES,
    SAMPLE_RATE,
    SNR_DB,
    SPLITS,
    WINDOW,
    load_avmnist,
)
from lepton_mm.data.bundled import load_mnist
from lepton_mm.data.log_mel_features import LogMelFeatures

__all__ = ["avmnist_file_features", "export_avmnist_files"]

FEATURES_NAME = "features.npz"
_FORMATS = ("csv", "jsonl")
_BLOCK = 1024  # examples per statistics block: log_mel_statistics' default chunk
_CHUNK = 64  # examples per feature call: AVMNISTSplit.materialize's default chunk


@dataclasses.dataclass(frozen=True, eq=False)
class _PCACut:
    """AV-MNIST's image feature: an 8-bit grey image ``[28, 28, 1]`` in [0, 1] → its
    reconstruction from the leading principal components, float32 ``[28, 28, 1]``."""

    mean: np.ndarray  # float64 [784]
    components: np.ndarray  # float64 [784, k]

    def __call__(self, image: np.ndarray) -> np.ndarray:
        image = np.asarray(image)
        if image.size != self.mean.size:
            raise ValueError(f"image: expected {self.mean.size} pixels (28 x 28 grey), got "
                             f"shape {list(image.shape)}.")
        pixels = np.round(image.reshape(1, -1).astype(np.float64) * 255.0)  # exact uint8
        coefficients = (pixels / 255.0 - self.mean) @ self.components
        out = self.mean + coefficients @ self.components.T
        return out.astype(np.float32).reshape(image.shape)


def export_avmnist_files(out_dir: str | os.PathLike[str], *, split: str = "train",
                         index: Any = None, data_seed: int = 0, snr_db: float = SNR_DB,
                         manifest_format: str = "csv",
                         data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Writes AV-MNIST examples as PNG + WAV files with a manifest.

    Writes, under ``out_dir``: ``images/{split}_{i:05d}.png`` (the MNIST digit, 8-bit
    grey), ``audio/{split}_{i:05d}.wav`` (the noisy 1 s window, float32 at 8 kHz), with
    ``i`` the example's index in the full split; ``manifest.csv`` (or ``.jsonl``) with
    the columns ``image``, ``audio`` and ``label``, one row per example in order; and
    ``features.npz``: the image PCA and the ``log_mel_statistics`` of the exported
    examples (read by ``avmnist_file_features``). About 33 KiB per example.

    Args:
      out_dir: the folder to write to (created; existing files of the same names are
        overwritten).
      split: ``"train"``, ``"val"`` or ``"test"``.
      index: which examples of the split (anything ``AVMNISTSplit.subset`` takes, e.g.
        ``np.arange(200)`` or ``slice(0, 200)``); None: all of them.
      data_seed: as for ``load_avmnist``.
      snr_db: as for ``load_avmnist``.
      data_dir: as for ``load_avmnist``.
      manifest_format: ``"csv"`` or ``"jsonl"``.

    Returns:
      The manifest's path.

    Raises:
      ValueError: an unknown split or format, or an index that selects no example.

    Examples:
      >>> manifest = export_avmnist_files("avmnist_files", index=np.arange(200))  # doctest: +SKIP
      >>> data = ManifestDataset(manifest, grayscale=True, sample_rate=8000,
      ...                        features=avmnist_file_features(manifest.parent))  # doctest: +SKIP
    """
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {list(SPLITS)}, got {split!r}.")
    if manifest_format not in _FORMATS:
        raise ValueError(f"manifest_format: expected one of {list(_FORMATS)}, got "
                         f"{manifest_format!r}.")
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir: expected a str or os.PathLike, got "
                        f"{type(out_dir).__name__}.")
    import soundfile
    from PIL import Image

    avmnist = load_avmnist(data_seed=data_seed, snr_db=snr_db, data_dir=data_dir)
    data = getattr(avmnist, split)
    if index is not None:
        data = data.subset(index)
    if len(data) == 0:
        raise ValueError(f"index: selects no example of the {split} split.")
    mnist = load_mnist(data_dir=data_dir)
    digits = mnist.x_test if split == "test" else mnist.x_train
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    records, total, square, count = [], 0.0, 0.0, 0
    for block in range(0, len(data), _BLOCK):
        size = min(_BLOCK, len(data) - block)
        log_mel = np.empty((size, NUM_FRAMES, N_MELS), np.float32)
        mask = np.empty((size, NUM_FRAMES), bool)
        for first in range(0, size, _CHUNK):
            # chunks of one size, padded with repeats (as materialize: one compilation)
            rows = block + (first + np.arange(_CHUNK)) % size
            noisy = data.waveforms(rows).noisy
            m = min(_CHUNK, size - first)
            part_mel, part_mask = data.audio(rows)
            log_mel[first:first + m], mask[first:first + m] = part_mel[:m], part_mask[:m]
            for j, r in enumerate(rows[:m]):
                name = f"{split}_{int(data.example_index[r]):05d}"
                image, audio = f"images/{name}.png", f"audio/{name}.wav"
                Image.fromarray(digits[data.mnist_index[r]]).save(out / image)
                soundfile.write(out / audio, noisy[j], SAMPLE_RATE, subtype="FLOAT")
                records.append({"image": image, "audio": audio,
                                "label": int(data.labels[r])})
        valid = log_mel[mask].astype(np.float64)  # summed as log_mel_statistics does
        total, square, count = total + valid.sum(), square + (valid ** 2).sum(), \
            count + valid.size
    mean = total / count
    stats = np.array([mean, np.sqrt(max(square / count - mean ** 2, 0.0))], np.float32)
    np.savez(out / FEATURES_NAME, pca_mean=avmnist.pca.mean,
             pca_components=avmnist.pca.components, audio_stats=stats)
    manifest = out / f"manifest.{manifest_format}"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        if manifest_format == "csv":
            writer = csv.DictWriter(f, fieldnames=["image", "audio", "label"])
            writer.writeheader()
            writer.writerows(records)
        else:
            f.writelines(json.dumps(r) + "\n" for r in records)
    return manifest


def avmnist_file_features(folder: str | os.PathLike[str], *,
                          audio_stats: Any = "stored") -> dict[str, Any]:
    """The per-example feature functions that turn exported AV-MNIST files into its arrays.

    For ``ManifestDataset(manifest, grayscale=True, sample_rate=8000,
    features=avmnist_file_features(folder))``: its batches then hold AV-MNIST's
    ``image`` float32 ``[b, 28, 28, 1]`` and ``audio`` ``(log_mel float32 [b, 126, 64],
    mask bool [b, 126])``, as ``avmnist_arrays`` computes them.

    Args:
      folder: the ``out_dir`` of ``export_avmnist_files`` (holding ``features.npz``).
      audio_stats: how to standardise the log-mels: ``"stored"`` (default) with the
        statistics of the examples exported to ``folder`` (for a training-split export,
        what ``avmnist_arrays`` does); a ``(mean, std)`` pair, e.g. a training export's,
        for a validation or test export; None: not at all.

    Returns:
      ``{"image": fn, "audio": LogMelFeatures(...)}``.

    Raises:
      FileNotFoundError: ``folder`` has no ``features.npz``.
    """
    path = Path(folder) / FEATURES_NAME
    if not path.is_file():
        raise FileNotFoundError(f"folder: no {FEATURES_NAME} in {Path(folder)} (written by "
                                f"export_avmnist_files).")
    with np.load(path, allow_pickle=False) as f:
        mean, components, stored = f["pca_mean"], f["pca_components"], f["audio_stats"]
    if isinstance(audio_stats, str):
        if audio_stats != "stored":
            raise ValueError(f"audio_stats: expected 'stored', None or (mean, std), got "
                             f"{audio_stats!r}.")
        audio_stats = (stored[0], stored[1])
    return {"image": _PCACut(mean, components),
            "audio": LogMelFeatures(sample_rate=SAMPLE_RATE, num_samples=WINDOW,
                                    n_fft=N_FFT, hop_length=HOP_LENGTH, n_mels=N_MELS,
                                    stats=audio_stats)}
