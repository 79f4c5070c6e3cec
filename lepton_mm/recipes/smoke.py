"""A synthetic image + text + audio task: the config, the data and the models of the smoke run.

Images, token sequences and log-mel spectrograms are generated from the seed with a
learnable class signal in each modality (a class template in the image, a class token in
the text, a class-specific frequency band in the audio), noise, variable lengths and
randomly missing modalities (``make_data``). ``build_model`` puts the real encoders
(``ImageCNN``, ``TextTransformer``, ``AudioSpectrogramCNN``) under any fusion layer of the
registry; ``experiments/smoke.py`` trains one or all of them end to end in seconds.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "QUICK_FUSION_KWARGS",
    "ConfigError",
    "SmokeConfig",
    "build_model",
    "check_config",
    "fusion_modalities",
    "make_data",
    "quick_config",
]

#: Fusion-specific hyperparameters in quick mode (smaller transformers).
QUICK_FUSION_KWARGS = {
    "bottleneck": {"width": 16, "num_layers": 1, "fusion_layer": 0},
    "cross_attention": {"width": 16, "num_layers": 1},
    "early_transformer": {"width": 16, "num_layers": 1},
    "tensor": {"modality_dim": 8},
}


class ConfigError(ValueError):
    """A bad setting, found before any computation (the CLI reports it without a traceback)."""


def _check_setting(name: str, value: Any, minimum: int | None = None, *,
                   optional: bool = False, rate: bool = False) -> None:
    if optional and value is None:
        return
    if rate:
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not 0.0 <= value < 1.0:
            raise ConfigError(f"{name}: expected a rate in [0, 1), got {value!r}.")
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}: expected an int >= {minimum}, got {value!r}.")


@dataclasses.dataclass(frozen=True)
class SmokeConfig:
    """Everything the experiment needs (``quick_config()`` for the fast variant).

    Attributes:
      fusion: a name in ``lepton_mm.fusion.FUSIONS``, ``"pooled"`` (one modality) or
        ``"all"``.
      modalities: the modalities to use (any of image, text, audio).
      seed: drives data, initialisation, dropout, shuffling and modality dropout.
      workdir: run directory (checkpoints, logs, results.json).
      epochs, batch_size, learning_rate: training.
      num_train, num_eval: dataset sizes.
      num_classes: classes of the synthetic task.
      dim: encoder output size and fused size.
      image_size, text_len, vocab_size, audio_frames, n_mels: input sizes.
      signal: strength of the class signal in each modality (higher = easier).
      missing_rate: probability that a modality is absent for an example.
      modality_dropout: training-time modality dropout rate.
      early_stopping_patience: epochs without improvement before stopping.
      checkpoint_every: extra checkpoints every this many steps.
      mesh: None (one device) or "auto" (data parallel over all devices).
      quick: set by ``quick_config`` (a few seconds per fusion); smaller transformers in
        the fusion layers.
    """

    fusion: str = "concat"
    modalities: tuple[str, ...] = ("audio", "image", "text")
    seed: int = 0
    workdir: str = "runs/smoke"
    epochs: int = 8
    batch_size: int = 32
    learning_rate: float = 3e-3
    num_train: int = 1024
    num_eval: int = 256
    num_classes: int = 4
    dim: int = 32
    image_size: int = 16
    text_len: int = 12
    vocab_size: int = 32
    audio_frames: int = 32
    n_mels: int = 16
    signal: float = 0.6
    missing_rate: float = 0.15
    modality_dropout: float = 0.1
    early_stopping_patience: int | None = 3
    checkpoint_every: int | None = None
    mesh: str | None = None
    quick: bool = False

    def __post_init__(self):
        object.__setattr__(self, "modalities", tuple(sorted(self.modalities)))
        unknown = set(self.modalities) - {"audio", "image", "text"}
        if unknown or not self.modalities:
            raise ConfigError(f"modalities: expected a non-empty subset of audio, image, "
                              f"text; got {list(self.modalities)}.")
        for name in ("epochs", "batch_size", "num_train", "num_eval", "dim", "image_size",
                     "text_len", "vocab_size", "audio_frames", "n_mels"):
            _check_setting(name, getattr(self, name), 1)
        _check_setting("seed", self.seed, 0)
        _check_setting("num_classes", self.num_classes, 2)
        for name in ("early_stopping_patience", "checkpoint_every"):
            _check_setting(name, getattr(self, name), 1, optional=True)
        for name in ("missing_rate", "modality_dropout"):
            _check_setting(name, getattr(self, name), rate=True)
        if not (isinstance(self.learning_rate, (int, float)) and 0 < self.learning_rate
                < float("inf")):
            raise ConfigError(f"learning_rate: expected a positive finite number, got "
                              f"{self.learning_rate!r}.")
        if self.mesh not in (None, "auto"):
            raise ConfigError(f"mesh: expected None or 'auto', got {self.mesh!r}.")


def quick_config(**overrides: Any) -> SmokeConfig:
    """The ``--quick`` settings: a few seconds of training per fusion on 2 CPU cores.

    Args:
      **overrides: config fields that replace the quick settings.

    Returns:
      The config, ``quick=True``.
    """
    base = dict(epochs=3, num_train=256, num_eval=128, dim=16, batch_size=32,
                early_stopping_patience=None, quick=True)
    return SmokeConfig(**{**base, **overrides})


def make_data(config: SmokeConfig, split: str) -> dict[str, Any]:
    """A synthetic split in the batch format, a function of the config (its seed).

    Args:
      config: the sizes, ``signal``, ``missing_rate``, ``modalities`` and ``seed``.
      split: ``"train"`` (``num_train`` examples) or ``"eval"`` (``num_eval``).

    Returns:
      ``{"label": int32 [n], "present": {modality: bool [n]}}`` (at least one modality
      present per example) and the configured modalities: ``"image"`` float32
      ``[n, image_size, image_size, 1]``, ``"text"`` (int32 ids ``[n, text_len]``, bool
      mask), ``"audio"`` (float32 log-mel ``[n, audio_frames, n_mels]``, bool mask).

    Raises:
      ValueError: an unknown split.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split: expected 'train' or 'eval', got {split!r}.")
    n = config.num_train if split == "train" else config.num_eval
    c = config.num_classes
    templates = np.random.default_rng([config.seed, 2]).choice(
        [-1.0, 1.0], size=(c, config.image_size, config.image_size, 1)).astype(np.float32)
    rng = np.random.default_rng([config.seed, 0 if split == "train" else 1])
    labels = rng.integers(0, c, n)
    s = config.signal
    out: dict[str, Any] = {"label": labels.astype(np.int32)}

    # image: class template under noise
    noise = rng.normal(size=(n, config.image_size, config.image_size, 1))
    out["image"] = (s * templates[labels] + noise).astype(np.float32)

    # text: ids >= c are noise; the class token (id = label) appears with probability s
    length = rng.integers(config.text_len // 2, config.text_len + 1, n)
    mask = np.arange(config.text_len)[None, :] < length[:, None]
    ids = rng.integers(c, config.vocab_size, (n, config.text_len))
    has_signal = rng.random(n) < min(s + 0.2, 1.0)
    position = (rng.random(n) * length).astype(int)
    ids[np.arange(n)[has_signal], position[has_signal]] = labels[has_signal]
    out["text"] = (ids.astype(np.int32), mask)

    # audio: energy in a class-specific mel band over the valid frames
    frames = rng.integers(config.audio_frames // 2, config.audio_frames + 1, n)
    fmask = np.arange(config.audio_frames)[None, :] < frames[:, None]
    log_mel = rng.normal(size=(n, config.audio_frames, config.n_mels))
    band = np.arange(config.n_mels)[None, :] * c // config.n_mels == labels[:, None]
    log_mel += 1.5 * s * band[:, None, :]
    out["audio"] = (np.where(fmask[..., None], log_mel, 0.0).astype(np.float32), fmask)

    # missing modalities (at least one present per example)
    names = list(config.modalities)
    present = rng.random((n, len(names))) >= config.missing_rate
    none = ~present.any(axis=1)
    present[np.where(none)[0], rng.integers(0, len(names), none.sum())] = True
    out["present"] = {m: present[:, i] for i, m in enumerate(names)}
    return {k: v for k, v in out.items() if k in (*names, "label", "present")}


def build_model(config: SmokeConfig, fusion: str, modalities: tuple[str, ...],
                rngs: Any) -> Any:
    """Encoders for ``modalities`` + the ``fusion`` layer + a linear head.

    Args:
      config: the sizes (``dim``, ``vocab_size``, ...); ``quick``: smaller transformers.
      fusion: a name in ``FUSIONS`` or ``"pooled"``.
      modalities: ``fusion_modalities``'s.
      rngs: ``nnx.Rngs`` for the initialisation (and the text encoder's dropout).

    Returns:
      A ``MultimodalClassifier`` (``build_classifier``).
    """
    from lepton_mm.encoders import AudioSpectrogramCNN, ImageCNN, TextTransformer
    from lepton_mm.models import build_classifier

    d = config.dim
    makers = {
        "image": lambda: ImageCNN(1, dim=d, widths=(8, 16), rngs=rngs),
        "text": lambda: TextTransformer(
            config.vocab_size, dim=d, num_layers=1, num_heads=2, mlp_dim=2 * d,
            max_len=config.text_len, dropout=0.1, attention_dropout=0.0, rngs=rngs),
        "audio": lambda: AudioSpectrogramCNN(config.n_mels, dim=d, widths=(8, 16),
                                             rngs=rngs),
    }
    encoders = {m: makers[m]() for m in modalities}
    kwargs = QUICK_FUSION_KWARGS.get(fusion, {}) if config.quick else {}
    return build_classifier(encoders, fusion, num_outputs=config.num_classes,
                            fusion_dim=d, rngs=rngs, **kwargs)


def fusion_modalities(config: SmokeConfig, fusion: str) -> tuple[str, ...]:
    """The configured modalities, cut to what the fusion layer supports.

    Args:
      config: its ``modalities``.
      fusion: a name in ``FUSIONS`` or ``"pooled"`` (one modality).

    Returns:
      The first modalities (sorted) up to the fusion's ``max_modalities``.
    """
    from lepton_mm.fusion import FUSIONS

    if fusion == "pooled":
        return config.modalities[:1]
    cls = FUSIONS[fusion]
    limit = cls.max_modalities or len(config.modalities)
    return config.modalities[:limit]


def check_config(config: SmokeConfig) -> list[str]:
    """Validates names before any computation.

    Args:
      config: its ``fusion`` and ``workdir``.

    Returns:
      The fusions to run (``"all"``: every name in ``FUSIONS``, sorted).

    Raises:
      ConfigError: an unknown fusion, or a workdir that is a file.
    """
    from lepton_mm.fusion import FUSIONS

    workdir = Path(config.workdir)
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"workdir: {workdir} exists and is not a directory.")
    if config.fusion == "all":
        return sorted(FUSIONS)
    if config.fusion != "pooled" and config.fusion not in FUSIONS:
        raise ConfigError(f"Unrecognized fusion: {config.fusion!r}. Known fusions: "
                          f"{sorted(FUSIONS)} (or 'pooled', 'all').")
    return [config.fusion]
