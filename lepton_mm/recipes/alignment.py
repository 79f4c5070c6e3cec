"""Cross-modal alignment on AV-MNIST: the config, the two-tower and prompt models, the metrics.

Three parts (``experiments/alignment.py`` trains and reports them):

* ``clip_loss`` / ``sigmoid_loss``: ``build_two_tower``, MultiBench's image and audio
  LeNets (``lepton_mm.recipes.avmnist.lenet_encoders``), each followed by a linear
  ``ProjectionHead`` into a shared ``embed_dim`` space, trained on the training pairs
  with CLIP's softmax or SigLIP's sigmoid loss (``LOSSES``) and scored by class-level
  recall@k (``lepton_mm.alignment.paired_class_recall``).
* ``prompt_classifier``: ``build_prompt_classifier``, the audio LeNet scored against the
  frozen all-MiniLM-L6-v2 embeddings of prompts naming each digit (``prompt_table``),
  trained with the labels; ``prompt_metrics`` reads the digit off the cosine with ten
  prompts of each template, training (``TRAIN_TEMPLATES``) and held out
  (``HELDOUT_TEMPLATES``), and with the training templates' ensemble.

The data are the AV-MNIST classifier's arrays (``lepton_mm.recipes.avmnist.make_data``
takes this config too). JAX and Flax are imported on first use.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from lepton_mm.recipes.avmnist import NUM_CLASSES, lenet_encoders

__all__ = [
    "DIGITS",
    "ENSEMBLE",
    "HELDOUT_TEMPLATES",
    "LOSSES",
    "PARTS",
    "TRAIN_TEMPLATES",
    "AlignmentConfig",
    "build_prompt_classifier",
    "build_two_tower",
    "prompt_metrics",
    "prompt_table",
    "quick_config",
    "resolve_parts",
]

#: The experiment's parts, in table order.
PARTS = ("clip_loss", "sigmoid_loss", "prompt_classifier")
#: the ``Contrastive`` task's ``kind`` and ``TwoTower``'s initial scale and bias per loss
#: (CLIP: 1/0.07 and no bias; SigLIP: 10 and -10, as in each paper).
LOSSES = {"clip_loss": ("softmax", 1 / 0.07, 0.0), "sigmoid_loss": ("sigmoid", 10.0, -10.0)}
#: The digit words the prompts name, by label.
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: Prompt templates seen in training; the first is the issue's and drives validation.
TRAIN_TEMPLATES = ("the spoken digit {}", "a recording of someone saying {}", "the number {}",
                   "a voice saying the word {}", "{}", "the digit {} said out loud")
#: Never seen in training: does the audio embedding follow MiniLM to new wordings?
HELDOUT_TEMPLATES = ("an audio clip of the number {}", "someone says {}")
#: The prompt classifier's column over its training-template ensemble.
ENSEMBLE = "ensemble of training templates"


@dataclasses.dataclass(frozen=True)
class AlignmentConfig:
    """Everything the experiment needs (``quick_config()`` for the fast variant).

    Attributes:
      parts: names in ``PARTS``; empty means all of them.
      seeds: training seeds (initialisation, shuffling, prompt templates).
      data_seed, snr_db: the data set's seed and audio noise level (``load_avmnist``;
        the benchmark is -15 dB).
      workdir: root of the runs' checkpoints (local, not committed).
      results: root of the run ledger (committed; ``--quick``: under the workdir).
      epochs: passes over the training split; the best validation epoch is kept.
      batch_size: training batch size (also the contrastive losses' negatives + 1).
      eval_batch_size: batch size of validation and of the test embeddings.
      learning_rate: Adam's learning rate.
      embed_dim: size of the image–audio shared space.
      image_channels, audio_channels: first widths of the image LeNet (4 blocks: 6 -> 48
        features) and of the audio LeNet (6 blocks: 6 -> 192 features).
      num_train, num_val, num_test: use the first examples of each split (None: all).
      normalize_audio: standardise the log-mels with training-split statistics.
      ks: the k of recall@k.
      train_templates, heldout_templates: the prompt classifier's training templates
        (``{}``: the digit word) and those only used at test time.
      checkpoint_every: also checkpoint every this many steps (resume granularity).
      progress: tqdm bars (None: when stdout is a terminal).
      quick: set by ``quick_config``.
    """

    parts: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0,)
    data_seed: int = 0
    snr_db: float = -15.0
    workdir: str = "runs/alignment"
    results: str = "results"
    epochs: int = 1
    batch_size: int = 64
    eval_batch_size: int = 64
    learning_rate: float = 3e-3
    embed_dim: int = 64
    image_channels: int = 6
    audio_channels: int = 6
    num_train: int | None = None
    num_val: int | None = None
    num_test: int | None = None
    normalize_audio: bool = True
    ks: tuple[int, ...] = (1, 5)
    train_templates: tuple[str, ...] = TRAIN_TEMPLATES
    heldout_templates: tuple[str, ...] = HELDOUT_TEMPLATES
    checkpoint_every: int | None = 500
    progress: bool | None = None
    quick: bool = False

    def __post_init__(self):
        for name in ("parts", "ks", "train_templates", "heldout_templates"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: expected distinct seeds, got {list(self.seeds)}.")
        if not self.ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1
                              for k in self.ks):
            raise ValueError(f"ks: expected positive ints, got {list(self.ks)}.")
        if not self.train_templates:
            raise ValueError("train_templates: expected at least one template.")
        for t in (*self.train_templates, *self.heldout_templates):
            if t.count("{}") != 1:
                raise ValueError(f"templates: each needs exactly one '{{}}', got {t!r}.")


def quick_config(**overrides: Any) -> AlignmentConfig:
    """``--quick``: a subset, one seed, one epoch, all parts (~3-5 min on 2 CPU cores);
    records under ``WORKDIR/results``, never in the committed ledger.

    Args:
      **overrides: config fields that replace the quick settings.

    Returns:
      The config, ``quick=True``.
    """
    merged = {**dict(seeds=(0,), epochs=1, num_train=6000, num_val=1000, num_test=2000,
                     checkpoint_every=None, quick=True), **overrides}
    merged.setdefault("workdir", "runs/alignment_quick")
    merged.setdefault("results", str(Path(merged["workdir"]) / "results"))
    return AlignmentConfig(**merged)


def resolve_parts(config: AlignmentConfig) -> list[str]:
    """The parts to run, validated (before any computation).

    Args:
      config: its ``parts`` (empty or ``("all",)``: every part).

    Returns:
      Part names, each once, in the config's order.

    Raises:
      ValueError: an unknown part.
    """
    if not config.parts or config.parts == ("all",):
        return list(PARTS)
    for p in config.parts:
        if p not in PARTS:
            raise ValueError(f"Unrecognized part: {p!r}. Known: {list(PARTS)} (or 'all').")
    return list(dict.fromkeys(config.parts))


def prompt_table(config: AlignmentConfig, encoder: Any = None) -> np.ndarray:
    """MiniLM embeddings of every prompt.

    Args:
      config: its templates.
      encoder: a ``SentenceEncoder`` (None: all-MiniLM-L6-v2).

    Returns:
      float32 ``[templates, 10, 384]``: unit-norm embeddings of every template (training
      ones first, then held-out) filled with each digit word.
    """
    if encoder is None:
        from lepton_mm.pretrained import SentenceEncoder

        encoder = SentenceEncoder.from_pretrained()
    templates = (*config.train_templates, *config.heldout_templates)
    texts = [t.format(word) for t in templates for word in DIGITS]
    table = np.asarray(encoder.encode(texts), np.float32)
    return table.reshape(len(templates), NUM_CLASSES, -1)


def build_two_tower(config: AlignmentConfig, part: str, n_mels: int, rngs: Any) -> Any:
    """Image LeNet and audio LeNet → linear ``ProjectionHead`` each → ``TwoTower``.

    Args:
      config: the LeNets' widths and ``embed_dim``.
      part: ``"clip_loss"`` or ``"sigmoid_loss"`` (the initial scale and bias).
      n_mels: mel bins of the audio input.
      rngs: ``nnx.Rngs`` for the initialisation.

    Returns:
      The ``TwoTower`` over modalities ``("image", "audio")``.
    """
    from lepton_mm.alignment import ProjectionHead
    from lepton_mm.models import TwoTower

    _, init_scale, init_bias = LOSSES[part]
    encoders = lenet_encoders(config, rngs=rngs, n_mels=n_mels)
    image, audio = encoders["image"], encoders["audio"]
    return TwoTower(image, audio, ProjectionHead(image.dim, config.embed_dim, rngs=rngs),
                    ProjectionHead(audio.dim, config.embed_dim, rngs=rngs),
                    modalities=("image", "audio"), init_scale=init_scale,
                    init_bias=init_bias)


def build_prompt_classifier(config: AlignmentConfig, table: np.ndarray, n_mels: int,
                            rngs: Any) -> Any:
    """The audio LeNet scored against the prompt table (``PromptMatcher``).

    Args:
      config: the audio LeNet's width.
      table: ``prompt_table``'s, float32 ``[templates, 10, 384]``.
      n_mels: mel bins of the audio input.
      rngs: ``nnx.Rngs`` for the initialisation.

    Returns:
      The ``PromptMatcher``.
    """
    from lepton_mm.models import PromptMatcher

    audio = lenet_encoders(config, ("audio",), rngs=rngs, n_mels=n_mels)["audio"]
    return PromptMatcher(audio, table, modality="audio", rngs=rngs)


def prompt_metrics(embeddings: np.ndarray, labels: np.ndarray, table: np.ndarray,
                   config: AlignmentConfig) -> dict[str, float]:
    """Zero-shot accuracy from the prompts of each template and of their ensemble.

    Args:
      embeddings: float32 ``[n, 384]``: the clips' embeddings.
      labels: int ``[n]``: their digits.
      table: ``prompt_table``'s, float32 ``[templates, 10, 384]``.
      config: its templates (the table's rows, in order).

    Returns:
      ``{template: accuracy}`` and ``{ENSEMBLE: accuracy}`` with the mean of the
      normalised training-template prompt embeddings per digit (as CLIP).
    """
    from lepton_mm.alignment import zero_shot_accuracy

    templates = (*config.train_templates, *config.heldout_templates)
    out = {t: zero_shot_accuracy(embeddings, labels, table[i]) for i, t in enumerate(templates)}
    out[ENSEMBLE] = zero_shot_accuracy(
        embeddings, labels, np.transpose(table[:len(config.train_templates)], (1, 0, 2)))
    return out
