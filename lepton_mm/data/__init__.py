"""Data: the bundled real data sets and readers for a researcher's own files.

Numpy only (plus JAX for AV-MNIST's on-the-fly audio features): nothing here imports
Flax, and nothing downloads.
"""

from lepton_mm.data.avmnist import (
    AVMNIST,
    AVMNISTSplit,
    ImagePCA,
    fit_image_pca,
    load_avmnist,
    place_clip,
    window_frame_mask,
)
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
    "AVMNIST",
    "CHECKSUMS",
    "FSDD",
    "MNIST",
    "AVMNISTSplit",
    "DataFileError",
    "ImagePCA",
    "MUStARD",
    "UnreadableFileError",
    "fit_image_pca",
    "load_audio",
    "load_avmnist",
    "load_fsdd",
    "load_image",
    "load_mnist",
    "load_mustard",
    "place_clip",
    "resolve_data_dir",
    "verified_path",
    "window_frame_mask",
]
