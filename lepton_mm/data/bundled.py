"""Loaders for the real data sets bundled in the repository's ``data/`` folder.

Each loader verifies the file's sha256 before reading it and returns plain numpy
structures (no JAX, no Flax). Nothing is ever downloaded.

Data directory resolution, first match wins:
  1. the explicit ``data_dir`` argument;
  2. the ``LEPTON_MM_DATA`` environment variable;
  3. the repository's ``data/`` folder (next to the ``lepton_mm`` package in a checkout or
     an editable install);
  4. the copy a wheel install ships inside the package (``lepton_mm/_bundled_data/``,
     the same files: ``pip install .`` needs no checkout).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

ENV_VAR = "LEPTON_MM_DATA"

#: sha256 of every bundled file (see data/README.md for provenance and licences).
CHECKSUMS: dict[str, str] = {
    "mnist.npz": "06af5dfe73b70e3bc1c36439982b18a8d76803db9b544f6fdf838a37fbb01b64",
    "fsdd.npz": "4fddb0094e2f7a552a8e53fa7713892658f09ffe8c9f1ed1a29a93ca256d9ae2",
    "mustard_text.json.gz": "f83f8d989b5b50ad5926b4fe14d46c1385ab52e64ab3a81a355e18ece8caffde",
}

_REPO_DATA = Path(__file__).resolve().parents[2] / "data"
_PACKAGE_DATA = Path(__file__).resolve().parents[1] / "_bundled_data"
_verified: dict[tuple[str, int, int], str] = {}


class DataFileError(ValueError):
    """A bundled data file is missing, unreadable or fails its checksum."""


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> tuple[Path, str]:
    """Returns the data directory to read from and where that choice came from.

    Args:
      data_dir: an explicit folder; overrides everything else.

    Returns:
      ``(path, source)`` where ``source`` is ``"data_dir argument"``,
      ``"$LEPTON_MM_DATA"``, ``"repository data/"`` or ``"installed package data"``
      (the repository's folder wins when both exist; when neither does, the
      repository's path is returned and the loaders say where they looked).

    Raises:
      TypeError: ``data_dir`` is not a path.
    """
    if data_dir is not None:
        if not isinstance(data_dir, (str, os.PathLike)):
            raise TypeError(f"data_dir: expected a str, an os.PathLike or None, got "
                            f"{type(data_dir).__name__}.")
        return Path(data_dir).expanduser(), "data_dir argument"
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser(), f"${ENV_VAR}"
    if not _REPO_DATA.is_dir() and _PACKAGE_DATA.is_dir():
        return _PACKAGE_DATA, "installed package data"
    return _REPO_DATA, "repository data/"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verified_path(name: str, data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Finds a bundled file and checks its sha256 (once per process per file version).

    Args:
      name: a key of ``CHECKSUMS``, e.g. ``"mnist.npz"``.
      data_dir: see the module docstring.

    Returns:
      The verified path.

    Raises:
      DataFileError: the file is missing or its sha256 differs; the message names the
        file, the expected sha256 and where the loader looked.
    """
    if name not in CHECKSUMS:
        raise ValueError(f"name: unknown data file {name!r}; known: {sorted(CHECKSUMS)}.")
    folder, source = resolve_data_dir(data_dir)
    path = folder / name
    expected = CHECKSUMS[name]
    if not path.is_file():
        raise DataFileError(
            f"{name} not found: looked in {folder} (from the {source}). Expected a file "
            f"with sha256 {expected}. Pass data_dir= or set ${ENV_VAR} to the folder that "
            "holds it (the repository's data/ folder ships it; see data/README.md).")
    stat = path.stat()
    cache_key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    actual = _verified.get(cache_key) or _sha256(path)
    if actual != expected:
        raise DataFileError(
            f"{name} at {path} (from the {source}) fails its checksum: expected sha256 "
            f"{expected}, got {actual}. The file is corrupt or a different version; "
            "restore it from the repository's data/ folder.")
    _verified[cache_key] = actual
    return path


class MNIST(NamedTuple):
    """The official MNIST split (LeCun et al. 1998).

    Attributes:
      x_train: uint8 ``[60000, 28, 28]``, pixel values 0–255.
      y_train: uint8 ``[60000]``, digits 0–9.
      x_test: uint8 ``[10000, 28, 28]``.
      y_test: uint8 ``[10000]``.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


class FSDD(NamedTuple):
    """The Free Spoken Digit Dataset (Jackson et al.): 3000 recordings at 8 kHz.

    Sorted by (speaker, digit, take). FSDD's official split is takes 0–4 test.

    Attributes:
      waveforms: tuple of 3000 float32 ``[samples]`` arrays in [-1, 1) (int16 / 32768);
        lengths vary from 0.14 s to 2.28 s.
      label: uint8 ``[3000]``, the spoken digit.
      speaker: uint8 ``[3000]``, index into ``speaker_names``.
      speaker_names: str ``[6]``.
      take: uint8 ``[3000]``, 0–49.
      is_test: bool ``[3000]``, the official test split (take <= 4).
      filename: str ``[3000]``, the original wav name.
      sample_rate: int, 8000.
    """

    waveforms: tuple[np.ndarray, ...]
    label: np.ndarray
    speaker: np.ndarray
    speaker_names: np.ndarray
    take: np.ndarray
    is_test: np.ndarray
    filename: np.ndarray
    sample_rate: int


class MUStARD(NamedTuple):
    """MUStARD sarcasm detection (Castro et al. 2019), text and labels only.

    Attributes:
      ids: list of 690 utterance ids.
      utterances: list of 690 str, the utterance to classify.
      contexts: list of 690 lists of str, the preceding dialogue turns.
      speakers: list of 690 str.
      shows: list of 690 str (FRIENDS, BBT, GOLDENGIRLS, SARCASMOHOLICS).
      labels: bool ``[690]``, True = sarcastic.
      folds: list of 5 ``(train, test)`` int64 index arrays: the official
        speaker-dependent folds (552 train / 138 test each).
      items: the raw records (all fields, including ``context_speakers``).
    """

    ids: list[str]
    utterances: list[str]
    contexts: list[list[str]]
    speakers: list[str]
    shows: list[str]
    labels: np.ndarray
    folds: list[tuple[np.ndarray, np.ndarray]]
    items: list[dict[str, Any]]

    def speaker_independent_split(self) -> tuple[np.ndarray, np.ndarray]:
        """The upstream speaker-independent split: test = FRIENDS, train = the rest.

        Returns:
          ``(train, test)`` int64 index arrays (334 and 356 items).
        """
        is_test = np.array([s == "FRIENDS" for s in self.shows])
        return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def load_mnist(*, data_dir: str | os.PathLike[str] | None = None) -> MNIST:
    """Loads MNIST from ``mnist.npz`` after verifying its checksum.

    Args:
      data_dir: folder holding ``mnist.npz`` (see the module docstring for the default).

    Returns:
      ``MNIST`` with uint8 images ``[n, 28, 28]`` and uint8 labels ``[n]``.
    """
    path = verified_path("mnist.npz", data_dir)
    with np.load(path, allow_pickle=False) as f:
        return MNIST(f["x_train"], f["y_train"], f["x_test"], f["y_test"])


def load_fsdd(*, data_dir: str | os.PathLike[str] | None = None) -> FSDD:
    """Loads the Free Spoken Digit Dataset from ``fsdd.npz`` after verifying it.

    Args:
      data_dir: folder holding ``fsdd.npz``.

    Returns:
      ``FSDD`` with float32 waveforms in [-1, 1) and per-recording metadata.
    """
    path = verified_path("fsdd.npz", data_dir)
    with np.load(path, allow_pickle=False) as f:
        audio = f["audio"].astype(np.float32) / 32768.0
        offsets = f["offsets"]
        waveforms = tuple(audio[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1))
        return FSDD(
            waveforms=waveforms,
            label=f["label"],
            speaker=f["speaker"],
            speaker_names=f["speaker_names"],
            take=f["take"],
            is_test=f["is_test"],
            filename=f["filename"],
            sample_rate=int(f["sample_rate"]),
        )


def load_mustard(*, data_dir: str | os.PathLike[str] | None = None) -> MUStARD:
    """Loads MUStARD's text, context, speakers, labels and official folds.

    Args:
      data_dir: folder holding ``mustard_text.json.gz``.

    Returns:
      ``MUStARD`` (690 utterances, 345 sarcastic).
    """
    path = verified_path("mustard_text.json.gz", data_dir)
    with gzip.open(path, "rt", encoding="utf-8") as f:
        raw = json.load(f)
    items = raw["items"]
    return MUStARD(
        ids=list(raw["ids"]),
        utterances=[it["utterance"] for it in items],
        contexts=[list(it["context"]) for it in items],
        speakers=[it["speaker"] for it in items],
        shows=[it["show"] for it in items],
        labels=np.array([bool(it["sarcasm"]) for it in items]),
        folds=[(np.asarray(fo["train"], np.int64), np.asarray(fo["test"], np.int64))
               for fo in raw["folds"]],
        items=items,
    )
