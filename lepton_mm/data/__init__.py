"""Data: the bundled data sets, readers for your own files, and batch sources for ``fit``.

- ``BatchSource``: the protocol: ``len``, ``num_batches``, ``batches``.
- ``ArrayDataset``, ``BucketedDataset``: in-memory sources (one shape; length buckets).
- ``SNRRangeDataset``: AV-MNIST training examples whose audio is rebuilt every epoch at
  per-example SNRs drawn from a range (noise-robust training).
- ``epoch_permutation``: an epoch's shuffled order, from (seed, epoch) only.
- ``ManifestDataset``: your own files listed in a CSV / JSONL manifest, read through
  grain; ``ManifestRowError`` names a bad row.
- ``LogMelFeatures``: per-example audio front end: waveform -> log-mel, mask.
- ``export_avmnist_files``: AV-MNIST written as PNG + WAV files and a manifest;
  ``avmnist_file_features``: the feature functions that read them back.

Numpy only (plus JAX for AV-MNIST's on-the-fly audio features): nothing here imports
Flax, and nothing downloads.
"""

from lepton_mm.data.avmnist import (
    AVMNIST,
    AVMNISTSplit,
    ImagePCA,
    SNRRangeDataset,
    avmnist_arrays,
    fit_image_pca,
    load_avmnist,
    log_mel_statistics,
    normalize_log_mel,
    place_clip,
    standardize_log_mel,
    standardize_utterances,
    window_frame_mask,
)
from lepton_mm.data.avmnist_files import avmnist_file_features, export_avmnist_files
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
from lepton_mm.data.log_mel_features import LogMelFeatures
from lepton_mm.data.manifest import ManifestDataset, ManifestRowError

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
    "LogMelFeatures",
    "MUStARD",
    "ManifestDataset",
    "ManifestRowError",
    "SNRRangeDataset",
    "UnreadableFileError",
    "avmnist_arrays",
    "avmnist_file_features",
    "epoch_permutation",
    "export_avmnist_files",
    "fit_image_pca",
    "load_audio",
    "load_avmnist",
    "load_fsdd",
    "load_image",
    "load_mnist",
    "load_mustard",
    "log_mel_statistics",
    "normalize_log_mel",
    "place_clip",
    "resolve_data_dir",
    "standardize_log_mel",
    "standardize_utterances",
    "verified_path",
    "window_frame_mask",
]
