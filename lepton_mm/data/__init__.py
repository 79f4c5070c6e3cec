"""Data: the bundled data sets, readers for your own files, and batch sources for ``fit``.

  BatchSource                     the protocol: ``len``, ``num_batches``, ``batches``
  ArrayDataset, BucketedDataset   in-memory sources (one shape; length buckets)
  epoch_permutation               an epoch's shuffled order, from (seed, epoch) only

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
from lepton_mm.data.batching import (
    ArrayDataset,
    BatchSource,
    BucketedDataset,
    epoch_permutation,
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
    "ArrayDataset",
    "BatchSource",
    "BucketedDataset",
    "DataFileError",
    "ImagePCA",
    "MUStARD",
    "UnreadableFileError",
    "epoch_permutation",
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
