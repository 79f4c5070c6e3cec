"""MultiBench's AV-MNIST recipe: config, data, LeNet model, SGD training, robustness protocol.

One run of ``experiments/avmnist.py`` is: ``make_data`` (``lepton_mm.data.avmnist_arrays``
of the config), ``build_model`` (MultiBench's image and audio LeNets, a 100-unit fused
layer from ``lepton_mm.fusion``, Linear(100, 10)), ``fit_recipe`` (SGD with momentum and
L2 decay, batch 40, the epoch with the best validation accuracy kept) and
``robustness_results`` (the test split scored once, also with a modality absent and
under an audio SNR sweep and an image-noise sweep; ``docs/results.md``). A method
``<fusion>+<variant>`` trains the same model with modality dropout (``+mdrop``) or a
balanced-learning strategy (``+ogm_ge``, ``+gblend``, ``+mmpareto``, ``+pmr``;
``gradient_blending_pilot`` gives Gradient Blending its weights). The audio variants
(audio-bearing methods, ``audio_only`` included) change what the audio encoder is
trained on: ``+snr_range`` draws every training example's SNR afresh each epoch from
``train_snr_db`` (``train_data``: ``lepton_mm.data.SNRRangeDataset``), ``+utt_norm``
standardises each log-mel by its own valid frames, ``+snr_range+utt_norm`` both;
validation and test stay at the benchmark's ``snr_db``. ``+adv`` (any method) trains on
PGD adversarial examples of each batch (``adversarial_training``: Madry et al. 2018).
``+gru``, ``+lstm``, ``+bigru``, ``+bilstm`` (audio-bearing methods) replace the audio
LeNet by a recurrent encoder of about its parameter count (``AUDIO_ENCODERS``,
``audio_encoder``), trained with the same recipe. ``+bf16`` (any method) trains the same
model in mixed precision (``fit(compute_dtype=jnp.bfloat16)``: bfloat16 forward and
backward, float32 master weights; ``training_dtype``); it is validated, tested and swept
in float32, as ``fit`` returns it.

The follow-up experiments (``avmnist_compress.py``, ``avmnist_noise_levels.py``), the
benchmarks and ``experiments/alignment.py`` (``make_data``, ``lenet_encoders``) build
exactly these models and arrays. JAX and Flax are imported on first use.

References:
  Liang et al., "MultiBench: Multiscale Benchmarks for Multimodal Representation
  Learning", NeurIPS 2021 Datasets and Benchmarks. https://arxiv.org/abs/2107.07502
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "ADV_IMAGE_CLIP",
    "ADV_SUFFIX",
    "AUDIO_ENCODERS",
    "AUDIO_VARIANTS",
    "BALANCE",
    "BF16_SUFFIX",
    "COMPUTE_DTYPES",
    "IMAGE_NOISE_SWEEP",
    "MDROP_SUFFIX",
    "NUM_CLASSES",
    "QUICK_METHODS",
    "SNR_SWEEP",
    "SWEEPS",
    "UNIMODAL",
    "AVMNISTConfig",
    "adversarial_setting",
    "adversarial_training",
    "audio_encoder",
    "audio_encoder_name",
    "audio_setting",
    "build_model",
    "fit_recipe",
    "gradient_blending_pilot",
    "lenet_encoders",
    "make_data",
    "quick_config",
    "resolve_methods",
    "robustness_protocol",
    "robustness_results",
    "split_method",
    "sweep_data",
    "train_data",
    "training_dtype",
    "variant_tags",
]

#: The unimodal baselines (one LeNet, the same head).
UNIMODAL = ("image_only", "audio_only")
#: ``--quick`` trains these (the fusion zoo's classic representatives).
QUICK_METHODS = ("image_only", "audio_only", "concat", "low_rank", "gated")
#: Digits.
NUM_CLASSES = 10
#: Suffix of the method key of a run trained with modality dropout (``concat+mdrop``).
MDROP_SUFFIX = "+mdrop"
#: ``--balance`` strategies (``lepton_mm.balance``): the method key of a fusion method
#: trained with one is ``<method>+<name>`` (``concat+ogm_ge``).
BALANCE = {"ogm_ge": "OGM-GE (Peng et al. 2022)",
           "gblend": "offline Gradient Blending (Wang et al. 2020)",
           "mmpareto": "MMPareto (Wei & Hu 2024)",
           "pmr": "PMR (Fan et al. 2023)"}
#: The audio variants of a method (``audio_only`` and fusion methods): the method key of
#: a run trained with one is ``<method>+<name>`` (``concat+snr_range``); with both
#: options set, also ``<method>+snr_range+utt_norm``.
AUDIO_VARIANTS = {"snr_range": "SNR drawn per example and epoch from train_snr_db",
                  "utt_norm": "log-mels standardised per utterance"}
#: Recurrent audio encoders (``lepton_mm.encoders.RecurrentEncoder``, one layer over the
#: 64 log-mel bins of each frame, no dropout, no projection: ``dim`` is directions x
#: ``hidden_size``) that ``AVMNISTConfig.audio_encoder`` puts in place of the audio LeNet:
#: the method key of such a run is ``<method>+<name>`` (``audio_only+gru``). Each hidden
#: size is the one whose encoder has the parameter count closest to the audio LeNet's
#: (221,874 at ``audio_channels`` 6): 219,600 (GRU), 219,504 (LSTM), 220,644 (BiGRU),
#: 218,688 (BiLSTM) parameters; with the head, ``audio_only`` has 244,710 / 241,014 /
#: 254,154 / 246,998 against the LeNet's 242,184 (the head's first layer grows with
#: ``dim``).
AUDIO_ENCODERS = {"gru": {"cell": "gru", "bidirectional": False, "hidden_size": 240},
                  "lstm": {"cell": "lstm", "bidirectional": False, "hidden_size": 204},
                  "bigru": {"cell": "gru", "bidirectional": True, "hidden_size": 162},
                  "bilstm": {"cell": "lstm", "bidirectional": True, "hidden_size": 136}}
#: Suffix of the method key of a run trained adversarially (``concat+adv``).
ADV_SUFFIX = "+adv"
#: Suffix of the method key of a run trained in bfloat16 mixed precision (``concat+bf16``).
BF16_SUFFIX = "+bf16"
#: ``AVMNISTConfig.compute_dtype``'s values: ``"bfloat16"`` adds the ``+bf16`` runs.
COMPUTE_DTYPES = ("float32", "bfloat16")
#: The valid image range an adversarial training example is kept in (the pixel range;
#: ``experiments/avmnist_adversarial.py``'s ``--image-clip`` default). The audio (a
#: standardised log-mel) has no natural bound and is not clipped.
ADV_IMAGE_CLIP = (0.0, 1.0)
#: Audio SNR sweep (dB), least noisy first; the benchmark trains and tests at -15.
SNR_SWEEP = (20.0, 10.0, 0.0, -5.0, -10.0, -15.0, -20.0)
#: Image noise sweep: standard deviations of white Gaussian noise added to each pixel
#: of the PCA-reconstructed test images (whose pixels span roughly [0, 1]; per-image
#: pixel standard deviation ~0.2), least noisy first. See docs/results.md.
IMAGE_NOISE_SWEEP = (0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)
#: The robustness sweeps: name in ``robustness_results`` -> (its levels' key in the
#: protocol, the levels' axis label).
SWEEPS = {"audio_snr": ("snr_db", "audio SNR (dB)"),
          "image_noise": ("image_noise_sigma", "image noise σ (pixel units)")}
# fold_in tag under key(data_seed) of the test sweep's image noise (AV-MNIST's own keys
# fold in the split ids 0-2 there; avmnist_noise_levels.py's validation check uses 2000).
_IMAGE_NOISE_TAG = 1000


@dataclasses.dataclass(frozen=True)
class AVMNISTConfig:
    """Everything the experiment needs (``quick_config()`` for the fast variant).

    Attributes:
      methods: ``"image_only"``, ``"audio_only"`` and/or names in
        ``lepton_mm.fusion.FUSIONS``; empty means all of them.
      seeds: training seeds (initialisation and shuffling); one run per method and seed.
      data_seed: the data set's seed (pairing and noise; ``load_avmnist``).
      snr_db: the audio noise level; the benchmark is -15 dB (higher = easier, for
        fast pipeline checks only).
      workdir: root of the runs' checkpoints (local, not committed).
      results: root of the run ledger (``<results>/avmnist/<method>/seed<k>.json``,
        committed); ``--quick`` keeps its records under the workdir instead.
      epochs: passes over the training split; the best validation epoch is kept.
      batch_size: training batch size (MultiBench: 40).
      eval_batch_size: batch size for validation and test (None: ``batch_size``). On
        CPU small batches are cheaper: 1.3 ms per example at 16 against 1.8 at 200,
        and the eval step compiles in 2.7 s against 5.2 s (audio LeNet, 2 busy cores).
      learning_rate, momentum, weight_decay: SGD (L2 decay, not on biases or norms).
      fusion_dim: output size of every fusion layer (and of the unimodal hidden layer).
      image_channels: first width of the image LeNet (4 blocks: 6 -> 48 features).
      audio_channels: first width of the audio LeNet (6 blocks: 6 -> 192 features).
      num_train, num_val, num_test: use the first examples of each split (None: all).
      normalize_audio: standardise the log-mels (dB) with training-split statistics.
      checkpoint_every: also checkpoint every this many steps (resume granularity).
      progress: tqdm bars (None: when stdout is a terminal).
      modality_dropout: if > 0, every fusion method is also trained with
        ``fit(modality_dropout=...)`` (each example drops each modality with this
        probability, keeping at least one) as method ``<name>+mdrop``.
      balance: balanced-learning strategies (keys of ``BALANCE``); every fusion method
        is also trained with each, as method ``<name>+<strategy>``.
      ogm_alpha: OGM-GE's modulation strength ``alpha`` (``+ogm_ge`` runs; not tuned:
        the middle of the 0.1-1.0 range the paper reports).
      gblend_pilot: ``(n, n + dn)``: a ``+gblend`` run first trains a pilot of the same
        model for ``n + dn`` epochs, measures each head's training and validation loss
        (``head_losses``) after epochs ``n`` and ``n + dn``, and takes the blend's
        weights from them (``gradient_blending_weights``); the model is then trained
        from its initialisation with that blend.
      gblend_train_examples: the training examples the pilot's training losses are
        measured on (the first ones; the validation losses use the whole split).
      train_snr_db: ``(low, high)`` dB: every audio-bearing method is also trained,
        as ``<name>+snr_range``, on training audio whose SNR is drawn uniformly on
        ``[low, high]`` per example and per epoch (fresh noise too;
        ``SNRRangeDataset``), standardised with the statistics of the training split
        at ``snr_db``; validation and test stay at ``snr_db``. None: no such runs.
      utterance_norm: every audio-bearing method is also trained and tested with each
        log-mel standardised by its own valid frames' mean and std
        (``standardize_utterances``) instead of the training split's, as
        ``<name>+utt_norm`` (and ``<name>+snr_range+utt_norm`` with ``train_snr_db``).
      adversarial_image_eps, adversarial_audio_eps: L∞ radii of PGD adversarial
        training, per modality (0: that modality is not attacked). If either is > 0,
        every method with an attacked modality is also trained as ``<name>+adv``: each
        training batch is replaced by its PGD adversarial examples against the current
        parameters (Madry et al. 2018: the adversarial batch only, no clean half) and
        the step trains on those; validation, test and the sweeps stay clean. Units
        differ: the image radius is in pixel units (images are PCA reconstructions
        mostly in [0, 1], kept in ``ADV_IMAGE_CLIP``; 0.03 ~ 8/255), the audio radius
        in units of the standardised log-mel (std 1; one unit is 8.7 dB; not clipped).
        ``experiments/avmnist_adversarial.py`` evaluates at image 0.01 / 0.03 / 0.1 and
        audio 0.003 / 0.01 / 0.03; its middle pair, 0.03 and 0.01, is the suggested
        training radius. Cost per training step (concat, batch 40, CPU): see
        ``adversarial_steps``.
      adversarial_steps: PGD steps per training batch, from a random start in the ball
        keyed by the train step's key; step size ``2.5 * eps / steps`` (Madry et al.),
        but ``1.25 * eps`` for 1 step (FGSM with a random start, Wong et al. 2020,
        "Fast is better than free"). Each step is one forward and backward pass to the
        inputs: a concat train step at batch 40 took 345 ms with 1 step and 885 ms with
        3 against 142 ms plain, 2.4x and 6.2x (fastest of 4 rounds of 10 steps, the
        three alternated A B C C B A A B C ..., default XLA flags, on 2 CPU cores that
        two other training runs kept busy, load 6.3: read the ratios, not the times).
        An attack step costs more than a training step's forward and backward pass
        (unlike training, it differentiates down to the inputs).
      audio_encoder: recurrent audio encoders (keys of ``AUDIO_ENCODERS``: ``gru``,
        ``lstm``, ``bigru``, ``bilstm``; ``lenet``, the plain runs' encoder, may be
        named and adds nothing); every audio-bearing method (``audio_only`` too) is
        also trained with the audio LeNet replaced by each, as ``<name>+<encoder>``
        (``audio_only+gru``): a recurrent encoder of about the LeNet's parameter count
        over the 126 log-mel frames (the mask respected: padding never read), pooled
        by the masked mean of its states; the same head, optimiser, epochs, batch and
        test protocol. Not combined with the other variants. Cost per training step
        (``audio_only``, batch 40, 126 frames, SGD as the recipe's, default XLA flags):
        LeNet 207 ms, GRU 212, LSTM 247, BiGRU 268, BiLSTM 253 (fastest of 4 rounds of
        10 steps alternated A B C D E E D C B A ..., medians 228 / 243 / 252 / 286 / 279)
        on 2 CPU cores that two other training runs kept busy (load 6-7: read the
        ratios, 1.0-1.3x, not the times); the scan over frames costs about what the
        convolutions do, so no smaller setting is needed for the comparison.
      compute_dtype: ``float32`` (the plain runs only) or ``bfloat16``: every method is
        also trained in mixed precision, as ``<name>+bf16`` (``fit``'s
        ``compute_dtype``: the forward and backward pass on bfloat16 copies of the
        parameters and inputs, batch statistics and the loss in float32, float32 master
        weights updated by the same SGD). Its validation (the best epoch's choice), test
        and robustness sweeps run in float32 on those master weights: ``fit`` evaluates
        and returns the model in float32, so the numbers are what a user deploying the
        trained float32 weights sees, and differ from the plain runs' by the training
        alone. Not combined with the other variants.
      robustness: test every trained model with a modality absent and under the two
        sweeps (``robustness_results``).
      snr_sweep: audio SNRs (dB) of the robustness sweep, strictly decreasing.
      image_noise_sweep: image noise standard deviations, strictly increasing.
      quick: set by ``quick_config``.
    """

    methods: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0, 1, 2)
    data_seed: int = 0
    snr_db: float = -15.0
    workdir: str = "runs/avmnist"
    results: str = "results"
    epochs: int = 5
    batch_size: int = 40
    eval_batch_size: int | None = None
    learning_rate: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    fusion_dim: int = 100
    image_channels: int = 6
    audio_channels: int = 6
    num_train: int | None = None
    num_val: int | None = None
    num_test: int | None = None
    normalize_audio: bool = True
    checkpoint_every: int | None = 500
    progress: bool | None = None
    modality_dropout: float = 0.0
    balance: tuple[str, ...] = ()
    ogm_alpha: float = 0.5
    gblend_pilot: tuple[int, ...] = (1, 2)
    gblend_train_examples: int = 5000
    train_snr_db: tuple[float, float] | None = None
    utterance_norm: bool = False
    adversarial_image_eps: float = 0.0
    adversarial_audio_eps: float = 0.0
    adversarial_steps: int = 3
    audio_encoder: tuple[str, ...] = ()
    compute_dtype: str = "float32"
    robustness: bool = True
    snr_sweep: tuple[float, ...] = SNR_SWEEP
    image_noise_sweep: tuple[float, ...] = IMAGE_NOISE_SWEEP
    quick: bool = False

    def __post_init__(self):
        object.__setattr__(self, "methods", tuple(self.methods))
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: expected distinct seeds, got {list(self.seeds)}.")
        if not 0.0 <= float(self.modality_dropout) < 1.0:
            raise ValueError(f"modality_dropout: expected a rate in [0, 1), got "
                             f"{self.modality_dropout!r}.")
        object.__setattr__(self, "modality_dropout", float(self.modality_dropout))
        balance = tuple(dict.fromkeys(self.balance))
        unknown = [b for b in balance if b not in BALANCE]
        if unknown:
            raise ValueError(f"balance: unknown strategies {unknown}; known: {list(BALANCE)}.")
        object.__setattr__(self, "balance", balance)
        for name, ok, expected in (("learning_rate", lambda v: v > 0, "a number > 0"),
                                   ("momentum", lambda v: 0 <= v < 1, "a number in [0, 1)"),
                                   ("weight_decay", lambda v: v >= 0, "a number >= 0")):
            value = float(getattr(self, name))
            if not (math.isfinite(value) and ok(value)):
                raise ValueError(f"{name}: expected {expected}, got {getattr(self, name)!r}.")
        if not (math.isfinite(float(self.ogm_alpha)) and float(self.ogm_alpha) > 0):
            raise ValueError(f"ogm_alpha: expected a number > 0, got {self.ogm_alpha!r}.")
        pilot = tuple(int(e) for e in self.gblend_pilot)
        if len(pilot) != 2 or not 1 <= pilot[0] < pilot[1]:
            raise ValueError(f"gblend_pilot: expected two epochs 1 <= n < m, got "
                             f"{list(self.gblend_pilot)}.")
        object.__setattr__(self, "gblend_pilot", pilot)
        if self.train_snr_db is not None:
            try:
                low, high = (float(v) for v in self.train_snr_db)
            except (TypeError, ValueError):
                low = high = math.nan
            if not (math.isfinite(low) and math.isfinite(high) and low <= high):
                raise ValueError(f"train_snr_db: expected two finite dB values low <= high "
                                 f"(or None), got {self.train_snr_db!r}.")
            object.__setattr__(self, "train_snr_db", (low, high))
        for name in ("adversarial_image_eps", "adversarial_audio_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) \
                    or not (math.isfinite(float(value)) and float(value) >= 0):
                raise ValueError(f"{name}: expected a finite number >= 0 (0: not "
                                 f"attacked), got {value!r}.")
            object.__setattr__(self, name, float(value))
        steps = self.adversarial_steps
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise ValueError(f"adversarial_steps: expected an integer >= 1, got {steps!r}.")
        object.__setattr__(self, "adversarial_steps", int(steps))
        encoders = tuple(e for e in dict.fromkeys(self.audio_encoder) if e != "lenet")
        unknown = [e for e in encoders if e not in AUDIO_ENCODERS]
        if unknown:
            raise ValueError(f"audio_encoder: unknown encoders {unknown}; known: "
                             f"{['lenet', *AUDIO_ENCODERS]}.")
        object.__setattr__(self, "audio_encoder", encoders)
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype: expected one of {list(COMPUTE_DTYPES)} "
                             f"(bfloat16: also train every method as <method>{BF16_SUFFIX}), "
                             f"got {self.compute_dtype!r}.")
        for name, sign in (("snr_sweep", -1), ("image_noise_sweep", 1)):
            levels = tuple(float(v) for v in getattr(self, name))
            steps = np.diff(levels)
            if (len(levels) < 2 or not all(math.isfinite(v) for v in levels)
                    or not np.all(sign * steps > 0)):
                order = "decreasing" if sign < 0 else "increasing"
                raise ValueError(f"{name}: expected at least 2 finite, strictly {order} "
                                 f"levels (least imperfect first), got {list(levels)}.")
            object.__setattr__(self, name, levels)
        if self.image_noise_sweep[0] < 0:
            raise ValueError(f"image_noise_sweep: expected standard deviations >= 0, got "
                             f"{list(self.image_noise_sweep)}.")


def quick_config(**overrides: Any) -> AVMNISTConfig:
    """``--quick``: a smoke check, not a ranking (~3 min on 2 idle cores, sweeps
    included): the first 12 000 / 1000 / 2000 examples, one epoch of 750 steps of batch
    16, five methods, one seed, records under the workdir. The budget was chosen on
    validation accuracy (docs/results.md, "Quick mode").

    Args:
      **overrides: config fields that replace the quick settings.

    Returns:
      The config, ``quick=True``.
    """
    base = dict(methods=QUICK_METHODS, seeds=(0,), epochs=1, batch_size=16,
                eval_batch_size=40, num_train=12000, num_val=1000, num_test=2000,
                checkpoint_every=None, progress=True, quick=True)
    return AVMNISTConfig(**{**base, **overrides})


def split_method(method: str) -> tuple[str, str | None]:
    """A method key -> its fusion method and training variant.

    Args:
      method: e.g. ``"concat+mdrop"``, ``"concat+snr_range+utt_norm"`` or ``"concat"``.

    Returns:
      ``("concat", "mdrop")``, ``("concat", "snr_range+utt_norm")``, ``("concat", None)``.
    """
    base, plus, variant = method.partition("+")
    return (base, variant) if plus else (method, None)


def variant_tags(method: str) -> tuple[str, ...]:
    """A method key's training variants.

    Args:
      method: e.g. ``"concat+snr_range+utt_norm"``.

    Returns:
      ``("snr_range", "utt_norm")``; ``()`` for a plain method.
    """
    variant = split_method(method)[1]
    return tuple(variant.split("+")) if variant else ()


def resolve_methods(config: AVMNISTConfig) -> list[str]:
    """The method keys to run, validated (before any computation).

    Args:
      config: its ``methods`` (empty or ``("all",)``: every method), ``modality_dropout``,
        ``balance``, ``train_snr_db``, ``utterance_norm``, the adversarial radii,
        ``audio_encoder`` and ``compute_dtype``.

    Returns:
      The method keys in order: with ``modality_dropout > 0`` each fusion method ``m``
      is followed by ``m+mdrop``, then by ``m+<strategy>`` for each of ``balance``; each
      audio-bearing method (``audio_only`` too) then by ``m+snr_range`` (with
      ``train_snr_db``), ``m+utt_norm`` (with ``utterance_norm``) and, with both,
      ``m+snr_range+utt_norm``; each method with a modality of radius > 0 then by
      ``m+adv``; each audio-bearing method by ``m+<encoder>`` for each of
      ``audio_encoder``; each method last by ``m+bf16`` (``compute_dtype`` bfloat16).

    Raises:
      ValueError: an unknown method name.
    """
    from lepton_mm.fusion import FUSIONS

    known = [*UNIMODAL, *sorted(FUSIONS)]
    if not config.methods or config.methods == ("all",):
        methods = known
    else:
        for m in config.methods:
            if m not in known:
                raise ValueError(f"Unrecognized method: {m!r}. Known: {known} (or 'all'); "
                                 "train with modality dropout via --modality-dropout.")
        methods = list(dict.fromkeys(config.methods))
    variants = [*([MDROP_SUFFIX] if config.modality_dropout else []),
                *(f"+{b}" for b in config.balance)]
    snr, utt = config.train_snr_db is not None, config.utterance_norm
    audio = [*(["+snr_range"] if snr else []), *(["+utt_norm"] if utt else []),
             *(["+snr_range+utt_norm"] if snr and utt else [])]
    keys = []
    for m in methods:
        keys.append(m)
        if m not in UNIMODAL:
            keys += [m + v for v in variants]
        if m != "image_only":
            keys += [m + v for v in audio]
        if _adversarial_eps(config, m):
            keys.append(m + ADV_SUFFIX)
        if m != "image_only":
            keys += [f"{m}+{e}" for e in config.audio_encoder]
        if config.compute_dtype == "bfloat16":
            keys.append(m + BF16_SUFFIX)
    return keys


def _modalities(base: str) -> tuple[str, ...]:
    """The inputs of a method's model (no variant)."""
    return {"image_only": ("image",), "audio_only": ("audio",)}.get(base, ("image", "audio"))


def _adversarial_eps(config: AVMNISTConfig, base: str) -> dict[str, float]:
    """``{modality: L∞ radius}`` of the modalities a ``base+adv`` run attacks."""
    radii = {"image": config.adversarial_image_eps, "audio": config.adversarial_audio_eps}
    return {m: radii[m] for m in _modalities(base) if radii[m] > 0}


def adversarial_setting(config: AVMNISTConfig, method: str) -> dict[str, Any] | None:
    """How a ``+adv`` run is trained (recorded in its config and robustness protocol).

    Args:
      config: the adversarial radii and ``adversarial_steps``.
      method: the run's method key.

    Returns:
      None unless ``method`` is a ``+adv`` run; else ``{"attack": "pgd", "norm":
      "linf", "eps": {modality: radius}, "steps", "step_size", "random_start": True,
      "clip": {"image": [0.0, 1.0]} or {}, "batch": "adversarial"}`` (JSON values):
      the attacked modalities are those of the method's model with a radius > 0;
      ``step_size`` is the rule (``"2.5 * eps / steps"``, ``"1.25 * eps"`` for 1 step);
      ``batch``: the step trains on the adversarial examples only.

    Raises:
      ValueError: a ``+adv`` method none of whose modalities has a radius > 0 (e.g. a
        config that lacks the radii the run was trained with).
    """
    if "adv" not in variant_tags(method):
        return None
    eps = _adversarial_eps(config, split_method(method)[0])
    if not eps:
        raise ValueError(f"{method}: no modality of it has an adversarial radius > 0 "
                         f"(adversarial_image_eps={config.adversarial_image_eps:g}, "
                         f"adversarial_audio_eps={config.adversarial_audio_eps:g}); give "
                         "the radii it was trained with.")
    steps = config.adversarial_steps
    return {"attack": "pgd", "norm": "linf", "eps": eps, "steps": steps,
            "step_size": "1.25 * eps" if steps == 1 else "2.5 * eps / steps",
            "random_start": True,
            "clip": {"image": list(ADV_IMAGE_CLIP)} if "image" in eps else {},
            "batch": "adversarial"}


def _pgd_adversary(model: Any, batch: Any, key: Any, *, eps: tuple[tuple[str, float], ...],
                   steps: int, step_size: tuple[tuple[str, float], ...],
                   clip: tuple[tuple[str, tuple[float, float]], ...]) -> Any:
    """``fit``'s adversary of a ``+adv`` run: L∞ PGD on the task's loss (eval mode)."""
    from lepton_mm.adversarial import model_loss, pgd
    from lepton_mm.models import Classification

    return pgd(model_loss(model, task=Classification(NUM_CLASSES)), batch, eps=dict(eps),
               steps=steps, step_size=dict(step_size), modalities=tuple(m for m, _ in eps),
               norm="linf", clip=dict(clip) or None, key=key)


@functools.cache
def _adversary(eps: tuple[tuple[str, float], ...], steps: int) -> Any:
    # One object per setting: fit's compiled train step is shared by every seed.
    factor = 1.25 if steps == 1 else 2.5 / steps
    clip = tuple((m, ADV_IMAGE_CLIP) for m, _ in eps if m == "image")
    return functools.partial(_pgd_adversary, eps=eps, steps=steps,
                             step_size=tuple((m, factor * e) for m, e in eps), clip=clip)


def adversarial_training(config: AVMNISTConfig, method: str) -> Any:
    """``fit``'s ``adversary`` for a run: PGD adversarial training for ``+adv`` runs.

    Each training batch is replaced, inside the compiled train step, by ``pgd`` against
    the step's current parameters (the model in eval mode, cross-entropy on the
    labels): ``adversarial_steps`` L∞ steps from a uniformly random start in the ball
    (keyed by the step's adversary key, so a resumed run is exact), per attacked
    modality's radius, images kept in ``ADV_IMAGE_CLIP``; padded frames and absent
    modalities untouched. The parameters are then trained on that adversarial batch
    only (Madry et al. 2018), the perturbation a constant to the gradient.

    Args:
      config: the adversarial radii and ``adversarial_steps``.
      method: the run's method key.

    Returns:
      ``(model, batch, key) -> batch`` (a ``functools.partial``: its settings are in
      the checkpoint's stored config), or None for a run that is not ``+adv``.
    """
    setting = adversarial_setting(config, method)
    if setting is None:
        return None
    return _adversary(tuple(setting["eps"].items()), setting["steps"])


def training_dtype(method: str) -> str:
    """The compute dtype of a run's train step (``fit``'s ``compute_dtype``).

    Args:
      method: the run's method key.

    Returns:
      ``"bfloat16"`` for a ``+bf16`` run (mixed precision: float32 master weights,
      float32 evaluation), else ``"float32"``.
    """
    return "bfloat16" if BF16_SUFFIX[1:] in variant_tags(method) else "float32"


def audio_setting(config: AVMNISTConfig, method: str) -> tuple[tuple[float, float] | None,
                                                              bool | str]:
    """How a run's audio is trained on: its SNR range and its normalisation.

    Args:
      config: ``train_snr_db`` and ``normalize_audio``.
      method: the run's method key.

    Returns:
      ``(train_snr_db or None, normalize_audio)``: the range for ``+snr_range`` runs
      (else None: the fixed ``snr_db``), ``"utterance"`` for ``+utt_norm`` runs (else
      ``config.normalize_audio``).
    """
    tags = variant_tags(method)
    return (config.train_snr_db if "snr_range" in tags else None,
            "utterance" if "utt_norm" in tags else config.normalize_audio)


def make_data(config: Any, *, normalize_audio: bool | str | None = None) -> dict[str, Any]:
    """The arrays a run trains and is scored on (features computed once per process).

    Args:
      config: an ``AVMNISTConfig``, or any config with its data fields (``data_seed``,
        ``snr_db``, ``normalize_audio``, ``num_train``, ``num_val``, ``num_test``; the
        alignment recipe's).
      normalize_audio: replaces ``config.normalize_audio`` (``"utterance"``: the
        ``+utt_norm`` runs' data; ``audio_setting``).

    Returns:
      ``avmnist_arrays`` of the config: ``{"train", "val", "test", "audio_stats",
      "audio_norm"}``, the audio standardised by the training split's statistics when
      ``normalize_audio`` is True, per utterance when it is ``"utterance"``.
    """
    from lepton_mm.data import avmnist_arrays

    return avmnist_arrays(data_seed=config.data_seed, snr_db=config.snr_db,
                          normalize_audio=config.normalize_audio if normalize_audio is None
                          else normalize_audio,
                          sizes={"train": config.num_train, "val": config.num_val,
                                 "test": config.num_test})


def train_data(config: AVMNISTConfig, data: dict[str, Any], method: str) -> Any:
    """What a run of ``method`` trains on.

    Args:
      config: ``train_snr_db``, ``data_seed``, ``snr_db``, ``num_train``.
      data: ``make_data``'s, of the run's normalisation (``audio_setting``).
      method: the run's method key.

    Returns:
      ``data["train"]``; for a ``+snr_range`` run an ``SNRRangeDataset`` over the same
      examples (images and labels identical, the audio rebuilt every epoch at SNRs
      drawn from ``train_snr_db``), normalised as ``data["audio_norm"]`` says: the
      statistics of the training split at ``snr_db``, per utterance, or not at all.
    """
    snr_range, _ = audio_setting(config, method)
    if snr_range is None:
        return data["train"]
    from lepton_mm.data import SNRRangeDataset, load_avmnist

    split = load_avmnist(data_seed=config.data_seed, snr_db=config.snr_db).train
    split = split.subset(np.arange(len(data["train"]["label"])))  # the first num_train
    return SNRRangeDataset(split, snr_range, normalize=data["audio_norm"])


def sweep_data(config: AVMNISTConfig, data: dict[str, Any]) -> dict[str, Any]:
    """The test inputs of the robustness sweeps (built once per process, kept in ``data``).

    The audio at each SNR is the test split rebuilt by ``load_avmnist(snr_db=snr)`` with
    the same ``data_seed`` (same pairing, same noise draws, scaled to that SNR),
    normalised as the data's ``"audio_norm"`` says: the *training* split's statistics at
    ``config.snr_db``, or per utterance; the images
    get ``add_gaussian_noise`` with the key ``fold_in(key(data_seed), 1000)`` (example
    ``i`` from ``fold_in(that, i)``: the same draw at every sigma and for every method).
    The training SNR and sigma 0 are the test split itself (the same arrays).

    Args:
      config: the sweeps' levels, ``data_seed`` and ``snr_db``.
      data: ``make_data``'s dict (gains a ``"sweep"`` entry).

    Returns:
      ``{"audio": {snr: (log_mel, mask)}, "image": {sigma: images}}`` for the test
      examples in ``data``.
    """
    if "sweep" in data:
        return data["sweep"]
    import jax

    from lepton_mm.data import load_avmnist, normalize_log_mel
    from lepton_mm.robustness import add_gaussian_noise

    test = data["test"]
    n = len(test["label"])
    audio = {config.snr_db: test["audio"]}
    for snr in config.snr_sweep:
        if snr not in audio:
            split = load_avmnist(data_seed=config.data_seed, snr_db=snr).test
            audio[snr] = split.subset(np.arange(n)).materialize()["audio"]
            normalize_log_mel(*audio[snr], data.get("audio_norm", data.get("audio_stats")))
    key = jax.random.fold_in(jax.random.key(config.data_seed), _IMAGE_NOISE_TAG)
    image = {sigma: test["image"] if sigma == 0 else np.asarray(
        add_gaussian_noise(test["image"], sigma, key=key, example_index=np.arange(n)))
        for sigma in config.image_noise_sweep}
    data["sweep"] = {"audio": audio, "image": image}
    return data["sweep"]


def lenet_encoders(config: Any, modalities: tuple[str, ...] = ("image", "audio"), *,
                   rngs: Any, n_mels: int | None = None) -> dict[str, Any]:
    """MultiBench's AV-MNIST encoders, created in the order image, audio.

    Args:
      config: its ``image_channels`` and ``audio_channels`` (``AVMNISTConfig`` or the
        alignment recipe's config).
      modalities: which of ``"image"``, ``"audio"`` to build.
      rngs: ``nnx.Rngs`` for the initialisation.
      n_mels: mel bins of the audio input (None: AV-MNIST's 64).

    Returns:
      ``{modality: encoder}``: ``ImageCNN.lenet`` (4 blocks: 6 -> 48 features at width 6)
      and ``AudioSpectrogramCNN.lenet`` (6 blocks: 6 -> 192 features).
    """
    from lepton_mm.data.avmnist import N_MELS
    from lepton_mm.encoders import AudioSpectrogramCNN, ImageCNN

    encoders = {}
    if "image" in modalities:
        encoders["image"] = ImageCNN.lenet(1, channels=config.image_channels,
                                           additional_layers=3, rngs=rngs)
    if "audio" in modalities:
        encoders["audio"] = AudioSpectrogramCNN.lenet(
            N_MELS if n_mels is None else n_mels, channels=config.audio_channels,
            additional_layers=5, rngs=rngs)
    return encoders


def audio_encoder_name(method: str) -> str:
    """The audio encoder of a run: ``"lenet"``, or its ``AUDIO_ENCODERS`` tag.

    Args:
      method: the run's method key (``"audio_only+gru"``, ``"concat"``, ...).

    Returns:
      ``"gru"`` for ``"audio_only+gru"``; ``"lenet"`` for a method without one.
    """
    return next((t for t in variant_tags(method) if t in AUDIO_ENCODERS), "lenet")


def audio_encoder(name: str, *, rngs: Any, n_mels: int | None = None) -> Any:
    """A recurrent audio encoder of ``AUDIO_ENCODERS``.

    Args:
      name: a key of ``AUDIO_ENCODERS``.
      rngs: ``nnx.Rngs`` for the initialisation.
      n_mels: mel bins of each input frame (None: AV-MNIST's 64).

    Returns:
      A ``RecurrentEncoder`` (training mode), ``dim`` = directions x ``hidden_size``.

    Raises:
      ValueError: an unknown name.
    """
    from lepton_mm.data.avmnist import N_MELS
    from lepton_mm.encoders import RecurrentEncoder

    if name not in AUDIO_ENCODERS:
        raise ValueError(f"audio_encoder: expected one of {list(AUDIO_ENCODERS)}, got "
                         f"{name!r}.")
    spec = AUDIO_ENCODERS[name]
    dim = (2 if spec["bidirectional"] else 1) * spec["hidden_size"]
    return RecurrentEncoder(N_MELS if n_mels is None else n_mels, dim=dim, rngs=rngs,
                            num_layers=1, **spec)


def build_model(config: AVMNISTConfig, method: str, rngs: Any) -> Any:
    """LeNet encoders → fusion (``fusion_dim``) → ReLU → Linear(10).

    Concat is MultiBench's model exactly: ``[48-d image; 192-d audio]`` → Linear(240,
    100) → ReLU → Linear(100, 10). Unimodal baselines use the same head on one
    encoder (Linear(d, 100) → ReLU → Linear(100, 10)); every other fusion layer replaces
    the first linear layer. A ``+gru`` (``+lstm``, ...) run's audio encoder is that
    recurrent encoder (``audio_encoder``) instead of the LeNet; other variants train
    the plain model.

    Args:
      config: the widths (``fusion_dim``, ``image_channels``, ``audio_channels``).
      method: the run's method key: ``"image_only"``, ``"audio_only"`` or a name in
        ``FUSIONS``, with or without variants (``"concat+gru"``).
      rngs: ``nnx.Rngs`` for the initialisation.

    Returns:
      A ``MultimodalClassifier``.
    """
    import jax
    from flax import nnx

    from lepton_mm.fusion import build
    from lepton_mm.models import MultimodalClassifier

    method, name = split_method(method)[0], audio_encoder_name(method)
    modalities = _modalities(method)
    if name == "lenet":
        encoders = lenet_encoders(config, modalities, rngs=rngs)
    else:  # image first, as the plain models
        encoders = lenet_encoders(config, tuple(m for m in modalities if m != "audio"),
                                  rngs=rngs)
        if "audio" in modalities:
            encoders["audio"] = audio_encoder(name, rngs=rngs)
    d = config.fusion_dim
    if method in UNIMODAL:
        ((_, encoder),) = encoders.items()
        fusion = None
        head = nnx.Sequential(nnx.Linear(encoder.dim, d, rngs=rngs), jax.nn.relu,
                              nnx.Linear(d, NUM_CLASSES, rngs=rngs))
    else:
        dims = {m: e.dim for m, e in encoders.items()}
        fusion = build(method, dims, d, rngs=rngs)
        head = nnx.Sequential(jax.nn.relu, nnx.Linear(d, NUM_CLASSES, rngs=rngs))
    return MultimodalClassifier(encoders, fusion, head)


def fit_recipe(config: AVMNISTConfig, model: Any, data: dict[str, Any], workdir: Path, *,
               seed: int, epochs: int, modality_dropout: float = 0.0, strategy: Any = None,
               adversary: Any = None, compute_dtype: str = "float32",
               meta: dict[str, Any] | None = None) -> Any:
    """``lepton_mm.training.fit`` with the recipe: SGD with momentum and L2 decay, the
    epoch with the best validation accuracy kept.

    Args:
      config: the optimiser's and batches' settings, ``checkpoint_every``, ``progress``.
      model: ``build_model``'s (trained in place).
      data: ``make_data``'s (``"train"``, ``"val"``).
      workdir: the checkpoints (an interrupted run resumes from them).
      seed: shuffling and dropout.
      epochs: passes over the training split.
      modality_dropout: ``fit``'s rate (``+mdrop`` runs).
      strategy: ``fit``'s balanced-learning strategy (``--balance`` runs), or None.
      adversary: ``fit``'s adversary (``adversarial_training``: ``+adv`` runs), or None.
      compute_dtype: ``"float32"`` or ``"bfloat16"``: ``fit``'s train-step dtype
        (``training_dtype``: ``+bf16`` runs); validation stays float32.
      meta: ``fit``'s ``config``, kept with the checkpoints.

    Returns:
      ``fit``'s ``FitResult`` (the model's parameters float32 either way).
    """
    from lepton_mm.models import Classification
    from lepton_mm.training import OptimizerConfig, fit

    return fit(
        model, Classification(NUM_CLASSES), data["train"], eval_data=data["val"],
        workdir=workdir, optimizer=OptimizerConfig(
            name="sgd", learning_rate=config.learning_rate, momentum=config.momentum,
            weight_decay=config.weight_decay),
        epochs=epochs, batch_size=config.batch_size,
        eval_batch_size=config.eval_batch_size or config.batch_size, seed=seed,
        monitor="accuracy", mode="max", modality_dropout=modality_dropout,
        strategy=strategy, adversary=adversary, compute_dtype=compute_dtype,
        checkpoint_every=config.checkpoint_every, progress=config.progress,
        tensorboard=False, config=meta)


def gradient_blending_pilot(config: AVMNISTConfig, method: str, data: dict[str, Any],
                            workdir: Path, *, seed: int, meta: dict[str, Any] | None = None,
                            ) -> tuple[dict[str, float], dict[str, Any]]:
    """Offline Gradient Blending's weights for a ``method`` run: a pilot of the same model
    (same seed) trained plain in ``workdir`` (resumable), each head's training and
    validation loss (``head_losses``) after epochs ``n`` and ``n + dn``
    (``config.gblend_pilot``), then ``gradient_blending_weights``.

    Args:
      config: ``gblend_pilot``, ``gblend_train_examples`` and the training settings.
      method: the fusion method (no variant).
      data: ``make_data``'s.
      workdir: the pilot's checkpoints.
      seed: the run's seed.
      meta: ``fit``'s ``config``, kept with the pilot's checkpoints.

    Returns:
      ``(weights, {"epoch <n>": {"train": {head: loss}, "val": {...}}, ...})``.
    """
    import jax

    from lepton_mm.balance import gradient_blending_weights, head_losses
    from lepton_mm.models import Classification
    from lepton_mm.training import seed_rngs

    train = jax.tree.map(lambda a: a[:config.gblend_train_examples], data["train"])
    model = build_model(config, method, seed_rngs(seed))
    losses = {}
    for epochs in config.gblend_pilot:  # the second call resumes the first's run
        fit_recipe(config, model, data, workdir, seed=seed, epochs=epochs, meta=meta)
        losses[f"epoch {epochs}"] = {
            split: head_losses(model, Classification(NUM_CLASSES), arrays,
                               batch_size=config.eval_batch_size or config.batch_size)
            for split, arrays in (("train", train), ("val", data["val"]))}
    first, last = (losses[f"epoch {e}"] for e in config.gblend_pilot)
    pairs = lambda at: {h: (at["train"][h], at["val"][h]) for h in at["train"]}
    return gradient_blending_weights(pairs(first), pairs(last)), losses


def robustness_protocol(config: AVMNISTConfig, num_test: int,
                        method: str | None = None) -> dict[str, Any]:
    """What a run's robustness results depend on (recomputed when it changes).

    Args:
      config: the sweeps, the training SNR, ``data_seed`` and ``normalize_audio``.
      num_test: the test examples scored.
      method: the run's method key (an audio variant's training SNR range and
        normalisation, a ``+adv`` run's adversarial training, a ``+bf16`` run's dtypes;
        None: the plain runs').

    Returns:
      ``{"snr_db", "image_noise_sigma", "train_snr_db", "data_seed", "num_test",
      "normalize_audio"}`` (JSON values): ``train_snr_db`` is ``[low, high]`` for a
      ``+snr_range`` run, ``normalize_audio`` ``"utterance"`` for a ``+utt_norm`` run;
      a ``+adv`` run's adds ``"adversarial_training"`` (``adversarial_setting``: the
      radii and steps it was trained with; its test inputs are the plain runs'), a
      ``+bf16`` run's ``"compute_dtype": {"train": "bfloat16", "test": "float32"}``
      (trained in mixed precision, scored in float32 as ``robustness_results`` does).
    """
    snr_range, normalize = audio_setting(config, method or "")
    out = {"snr_db": list(config.snr_sweep), "image_noise_sigma":
           list(config.image_noise_sweep),
           "train_snr_db": config.snr_db if snr_range is None else list(snr_range),
           "data_seed": config.data_seed, "num_test": num_test,
           "normalize_audio": normalize}
    adversarial = adversarial_setting(config, method or "")
    if adversarial is not None:
        out["adversarial_training"] = adversarial
    if training_dtype(method or "") != "float32":
        out["compute_dtype"] = {"train": training_dtype(method or ""), "test": "float32"}
    return out


def robustness_results(config: AVMNISTConfig, method: str, model: Any,
                       data: dict[str, Any], *, full: bool = True) -> dict[str, Any]:
    """Test accuracy of a trained model under every robustness condition.

    Accuracies (fractions) with both modalities, with the audio / the image marked absent
    (``mark_absent``: through ``batch["present"]``, never zeros fed as data), and lists
    over ``config.snr_sweep`` and ``config.image_noise_sweep``
    (``ConditionEvaluator.evaluate``). Conditions a unimodal baseline lacks are None.
    Always in float32 (the model's parameters; a ``+bf16`` run's master weights), as
    ``fit``'s validation.

    Args:
      config: the sweeps and the evaluation batch size.
      method: the run's method key (a variant's conditions are its fusion method's).
      model: the trained model.
      data: ``make_data``'s (the sweeps' inputs are cached in it).
      full: False: the clean test split only.

    Returns:
      ``{"protocol", "both", "audio_absent", "image_absent", "audio_snr",
      "image_noise", "time_s", "test_predictions"}``.
    """
    from lepton_mm.robustness import ConditionEvaluator

    base, _ = split_method(method)
    has_image, has_audio = full and base != "audio_only", full and base != "image_only"
    sweep = sweep_data(config, data) if full else {}
    sweeps = {}
    if has_audio:
        sweeps["audio_snr"] = ("audio", [sweep["audio"][v] for v in config.snr_sweep])
    if has_image:
        sweeps["image_noise"] = ("image", [sweep["image"][v] for v in config.image_noise_sweep])
    start = time.perf_counter()
    evaluator = ConditionEvaluator(model, config.eval_batch_size or config.batch_size)
    out = evaluator.evaluate(data["test"], sweeps=sweeps, progress=config.progress,
                             absent=("audio", "image") if has_image and has_audio else ())
    return {"protocol": robustness_protocol(config, len(data["test"]["label"]), method),
            "both": out["clean"], "test_predictions": out["predictions"],
            **{k: out.get(k) for k in ("audio_absent", "image_absent", *SWEEPS)},
            "time_s": time.perf_counter() - start}
