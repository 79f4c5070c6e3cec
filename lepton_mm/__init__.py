"""lepton_mm: multimodal fusion for JAX.

Encoders for images, text and audio, a JAX log-mel front end, pretrained BERT-family text
weights, and (in later modules) the classic fusion zoo, alignment losses and Optax
training loops. Subpackages are imported on first use, so ``import lepton_mm`` is cheap.

Public API at a glance:
  - ``lepton_mm.EncoderOutput``: tokens ``[batch, time, dim]``, mask ``[batch, time]``,
    pooled ``[batch, dim]``.
  - ``lepton_mm.masked_mean``: masked mean over time.
  - ``lepton_mm.features``: ``log_mel_spectrogram``, ``mel_filterbank``, ``frame_mask``.
  - ``lepton_mm.encoders``: ``ImageCNN``, ``TextTransformer``, ``AudioSpectrogramCNN``,
    ``RecurrentEncoder``, ``RecurrentTextEncoder`` (GRU/LSTM).
  - ``lepton_mm.pretrained``: ``load_text_transformer``, ``SentenceEncoder``.
  - ``lepton_mm.data``: ``load_mnist``, ``load_fsdd``, ``load_mustard``, ``load_image``,
    ``load_audio``.
  - ``lepton_mm.fusion``: ``FUSIONS``, ``build``, ``modality_dropout`` and the fusion
    layers.
  - ``lepton_mm.alignment``: ``clip_loss``, ``sigmoid_loss``, ``cca_loss``,
    ``ProjectionHead``, ...
  - ``lepton_mm.models``: ``MultimodalClassifier``, ``TwoTower``, tasks.
  - ``lepton_mm.metrics``: accuracy, F1, MAE, Pearson, MOSI Acc-2/7, recall@k (pure).
  - ``lepton_mm.robustness``: ``mark_absent``, ``add_gaussian_noise``,
    ``ConditionEvaluator``, MultiBench's relative and effective robustness.
  - ``lepton_mm.augment``: seeded, mask-aware augmentation: image shifts, cutout,
    SpecAugment, token masking, mixup, ``Augmenter``.
  - ``lepton_mm.adversarial``: FGSM and PGD (L∞, L2), ``robust_accuracy``.
  - ``lepton_mm.balance``: balanced multimodal learning for ``fit(strategy=...)``: OGM-GE,
    Gradient Blending, MMPareto, MSLR.
  - ``lepton_mm.attribution``: exact modality Shapley values, integrated gradients,
    gradient × input.
  - ``lepton_mm.quantize``: post-training int8 quantisation (per channel, through qwix)
    and quantisation-aware training.
  - ``lepton_mm.prune``: magnitude pruning (global, gradual inside ``fit``) and
    structured channel pruning of the CNN encoders.
  - ``lepton_mm.functional``: call any layer as a pure function (plain JAX, Linen).
  - ``lepton_mm.training``: ``fit``, ``OptimizerConfig``, checkpoints, sharding.
  - ``lepton_mm.export``: save / load a model as serialised StableHLO.
  - ``lepton_mm.experiment``: the run ledger: committed JSON records, stale detection,
    shards, seed statistics.
  - ``lepton_mm.rl``: PPO with fused observations (gymnax environments seen as several
    modalities, any fusion layer); needs the ``rl`` extra, imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from lepton_mm.types import EncoderOutput, masked_mean

__version__ = "0.1.0.dev0"

_SUBPACKAGES = (
    "adversarial", "alignment", "attribution", "augment", "balance", "data", "encoders",
    "experiment", "export", "features", "functional", "fusion", "metrics", "models",
    "pretrained", "prune", "quantize", "rl", "robustness", "training",
)

__all__ = ["EncoderOutput", "masked_mean", *_SUBPACKAGES]


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        return importlib.import_module(f"lepton_mm.{name}")
    raise AttributeError(f"module 'lepton_mm' has no attribute {name!r}")
