"""Data: the bundled real data sets and readers for a researcher's own files.

Numpy only: nothing here imports Flax, and nothing downloads.
"""

from lepton_mm.data.bundled import (
    CHECKSUMS,
    FSDD,
    MNIST,
    DataFileError,
    MUStARD,
    load_fsdd,
    load_mnist,
    load_mustard,
    resolve_data_dir,
    verified_path,
)
from lepton_mm.data.files import UnreadableFileError, load_audio, load_image

__all__ = [
    "CHECKSUMS",
    "FSDD",
    "MNIST",
    "DataFileError",
    "MUStARD",
    "UnreadableFileError",
    "load_audio",
    "load_fsdd",
    "load_image",
    "load_mnist",
    "load_mustard",
    "resolve_data_dir",
    "verified_path",
]
