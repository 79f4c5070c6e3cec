"""Readers for a researcher's own image and audio files.

Both return float32 numpy arrays in the library's layouts and raise an error naming the
path for a missing, unreadable, truncated or empty file.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np


class UnreadableFileError(ValueError):
    """A file exists but cannot be decoded (corrupt, truncated, empty or wrong format)."""


def _existing_file(path: str | os.PathLike[str], what: str) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}.")
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{what} file not found: {p}")
    if not p.is_file():
        raise UnreadableFileError(f"{what} path is not a regular file: {p}")
    if p.stat().st_size == 0:
        raise UnreadableFileError(f"{what} file is empty (0 bytes): {p}")
    return p


def _size_hw(size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        size = (int(size), int(size))
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0
                       for s in size)):
        raise ValueError(
            f"size: expected a positive int or a (height, width) pair of positive ints, "
            f"got {size!r}.")
    return int(size[0]), int(size[1])


def load_image(
    path: str | os.PathLike[str],
    *,
    size: int | tuple[int, int] | None = None,
    grayscale: bool = False,
) -> np.ndarray:
    """Reads an image file (PNG, JPEG, BMP, TIFF, ... anything pillow decodes).

    Args:
      path: the image file.
      size: resize to ``(height, width)`` (or a square ``size``) with bilinear filtering
        and antialiasing; ``None`` keeps the original size.
      grayscale: convert to one luminance channel (ITU-R 601-2, pillow's ``"L"``).

    Returns:
      float32 ``[height, width, channels]`` in [0, 1], channels = 1 if ``grayscale``
      else 3. An alpha channel is dropped; palette and 16-bit images are converted.

    Raises:
      FileNotFoundError: no file at ``path``.
      UnreadableFileError: the file is empty, truncated or not an image.
    """
    from PIL import Image, UnidentifiedImageError

    hw = _size_hw(size)
    p = _existing_file(path, "image")
    try:
        with Image.open(p) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float32)
                scale = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
                im = Image.fromarray(np.clip(arr / scale * 255.0, 0, 255).astype(np.uint8))
            im = im.convert("L" if grayscale else "RGB")
            if hw is not None:
                im = im.resize((hw[1], hw[0]), Image.Resampling.BILINEAR)
            out = np.asarray(im, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UnreadableFileError(f"cannot read image {p}: {e}") from e
    if out.ndim == 2:
        out = out[..., None]
    return out


def load_audio(path: str | os.PathLike[str], *, sample_rate: int) -> np.ndarray:
    """Reads an audio file (WAV, FLAC, OGG, ...) as a mono waveform.

    Args:
      path: the audio file.
      sample_rate: the rate to resample to (Hz), e.g. 8000 for FSDD-like input.

    Returns:
      float32 ``[samples]``: channels averaged to mono, resampled with librosa
      (soxr high quality), values in the file's scale (roughly [-1, 1]).

    Raises:
      FileNotFoundError: no file at ``path``.
      UnreadableFileError: the file is empty, truncated, holds no samples, or is not audio.
    """
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) \
            or sample_rate <= 0:
        raise ValueError(f"sample_rate: expected a positive integer (Hz), got {sample_rate!r}.")
    p = _existing_file(path, "audio")
    import librosa
    import soundfile

    try:
        with warnings.catch_warnings():
            # librosa warns and falls back to audioread for formats soundfile lacks; we
            # want a clean error instead, so read with soundfile only.
            warnings.simplefilter("ignore")
            y, sr = soundfile.read(str(p), dtype="float32", always_2d=True)
    except (RuntimeError, soundfile.LibsndfileError, OSError, ValueError) as e:
        raise UnreadableFileError(f"cannot read audio {p}: {e}") from e
    if y.shape[0] == 0:
        raise UnreadableFileError(f"audio file {p} holds no samples.")
    y = y.mean(axis=1)
    if sr != sample_rate:
        y = librosa.resample(y, orig_sr=sr, target_sr=int(sample_rate), res_type="soxr_hq")
    return np.ascontiguousarray(y, dtype=np.float32)
