"""AV-MNIST: image-only and audio-only baselines and every fusion layer, LeNet encoders.

The benchmark is ``lepton_mm.data.load_avmnist`` (PCA-degraded MNIST digits paired with
noisy spoken digits; ``docs/avmnist.md``). Each method is trained with MultiBench's
AV-MNIST recipe (LeNet encoders, a 100-unit fused layer, SGD, batch 40) by
``lepton_mm.training.fit``; the epoch with the best validation accuracy is kept and
scored once on the test split, also with the audio or the image marked absent, under an
audio SNR sweep and an image-noise sweep (MultiBench's relative and effective
robustness; ``docs/results.md``). ``--modality-dropout P`` also trains every fusion
method with modality dropout, as ``<method>+mdrop``; ``--balance ogm_ge,gblend`` with a
balanced-learning strategy (``lepton_mm.balance``), as ``<method>+ogm_ge``,
``<method>+gblend`` and ``<method>+mmpareto``.

Each finished run is a record in ``results/avmnist/<method>/seed<k>.json``
(``lepton_mm.harness``): the command trains only the runs without a current record and
resumes an interrupted one from its checkpoints in ``WORKDIR``; ``--report`` writes the
tables and sweep figures of the records without training.

    python experiments/avmnist.py --quick                 # smoke check, ~3 min, 2 cores
    python experiments/avmnist.py --fusion all --seeds 0,1,2
    python experiments/avmnist.py --fusion all --seeds 0,1,2 --report --out /tmp/avr
    python experiments/avmnist.py --fusion concat,gated --modality-dropout 0.3
    python experiments/avmnist.py --fusion concat,late --balance ogm_ge,gblend,mmpareto
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from lepton_mm import harness
from lepton_mm.experiment import RunKey, format_mean_std, seed_stats

UNIMODAL = ("image_only", "audio_only")
#: ``--quick`` trains these (the fusion zoo's classic representatives).
QUICK_METHODS = ("image_only", "audio_only", "concat", "low_rank", "gated")
NUM_CLASSES = 10
#: Suffix of the method key of a run trained with modality dropout (``concat+mdrop``).
MDROP_SUFFIX = "+mdrop"
#: ``--balance`` strategies (``lepton_mm.balance``): the method key of a fusion method
#: trained with one is ``<method>+<name>`` (``concat+ogm_ge``).
BALANCE = {"ogm_ge": "OGM-GE (Peng et al. 2022)",
           "gblend": "offline Gradient Blending (Wang et al. 2020)",
           "mmpareto": "MMPareto (Wei & Hu 2024)"}
#: Effective robustness is measured against this method: MultiBench's "LF" baseline,
#: late fusion by concatenating the encoders' features (MultiBench's ``Concat``).
REFERENCE_METHOD = "concat"
#: Audio SNR sweep (dB), least noisy first; the benchmark trains and tests at -15.
SNR_SWEEP = (20.0, 10.0, 0.0, -5.0, -10.0, -15.0, -20.0)
#: Image noise sweep: standard deviations of white Gaussian noise added to each pixel
#: of the PCA-reconstructed test images (whose pixels span roughly [0, 1]; per-image
#: pixel standard deviation ~0.2), least noisy first. See docs/results.md.
IMAGE_NOISE_SWEEP = (0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)
#: Rows of the PyTorch MultiBench-recipe peer (``benchmarks/peers/multibench_avmnist.py``)
#: shown beside ours when their records exist.
PEER_METHODS = ("peer_multibench_image", "peer_multibench_audio", "peer_multibench_concat")
# fold_in tag under key(data_seed) of the test sweep's image noise (AV-MNIST's own keys
# fold in the split ids 0-2 there; avmnist_noise_levels.py's validation check uses 2000).
_IMAGE_NOISE_TAG = 1000
_SWEEPS = {"audio_snr": ("snr_db", "audio SNR (dB)"),
           "image_noise": ("image_noise_sigma", "image noise σ (pixel units)")}


@dataclasses.dataclass(frozen=True)
class Variant:
    """A training variant of a fusion method, run as ``<method>+<name>``.

    Attributes:
      flags: the command-line flags that select it, from the config.
      recorded: what its runs' hashed config adds (so a changed setting is a new run).
    """

    flags: Callable[[AVMNISTConfig], str]
    recorded: Callable[[AVMNISTConfig], dict[str, Any]]


#: The variants by name (``<method>+<name>``): modality dropout and the ``--balance``
#: strategies. ``AVMNIST.strategy`` builds a strategy's ``fit`` hook.
VARIANTS = {
    "mdrop": Variant(
        flags=lambda c: f"--modality-dropout {c.modality_dropout:g}",
        recorded=lambda c: {"modality_dropout": c.modality_dropout}),
    "ogm_ge": Variant(
        flags=lambda c: f"--balance ogm_ge --ogm-alpha {c.ogm_alpha:g}",
        recorded=lambda c: {"strategy": {"name": "ogm_ge", "alpha": c.ogm_alpha}}),
    "mmpareto": Variant(
        flags=lambda c: "--balance mmpareto",
        recorded=lambda c: {"strategy": {"name": "mmpareto", "gamma": 1.0}}),
    "gblend": Variant(
        flags=lambda c: (f"--balance gblend --gblend-pilot "
                         f"{','.join(map(str, c.gblend_pilot))} "
                         f"--gblend-train-examples {c.gblend_train_examples}"),
        recorded=lambda c: {"strategy": {"name": "gblend",
                                         "pilot_epochs": list(c.gblend_pilot),
                                         "pilot_train_examples": c.gblend_train_examples}}),
}
assert set(VARIANTS) == {MDROP_SUFFIX[1:], *BALANCE}


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
        if not (math.isfinite(float(self.ogm_alpha)) and float(self.ogm_alpha) > 0):
            raise ValueError(f"ogm_alpha: expected a number > 0, got {self.ogm_alpha!r}.")
        pilot = tuple(int(e) for e in self.gblend_pilot)
        if len(pilot) != 2 or not 1 <= pilot[0] < pilot[1]:
            raise ValueError(f"gblend_pilot: expected two epochs 1 <= n < m, got "
                             f"{list(self.gblend_pilot)}.")
        object.__setattr__(self, "gblend_pilot", pilot)
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
    validation accuracy (docs/results.md, "Quick mode")."""
    base = dict(methods=QUICK_METHODS, seeds=(0,), epochs=1, batch_size=16,
                eval_batch_size=40, num_train=12000, num_val=1000, num_test=2000,
                checkpoint_every=None, progress=True, quick=True)
    return AVMNISTConfig(**{**base, **overrides})


def split_method(method: str) -> tuple[str, str | None]:
    """A method key -> ``(fusion method, training variant)``: ``"concat+mdrop"`` ->
    ``("concat", "mdrop")``, ``"concat+ogm_ge"`` -> ``("concat", "ogm_ge")``,
    ``"concat"`` -> ``("concat", None)``."""
    base, plus, variant = method.partition("+")
    return (base, variant) if plus else (method, None)


def resolve_methods(config: AVMNISTConfig) -> list[str]:
    """The method keys to run, validated (before any computation).

    With ``modality_dropout > 0`` each fusion method ``m`` is followed by ``m+mdrop``,
    then by ``m+<strategy>`` for each of ``balance``.
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
    return [k for m in methods
            for k in ((m,) if m in UNIMODAL else (m, *(m + v for v in variants)))]


def make_data(config: AVMNISTConfig) -> dict[str, Any]:
    """``{"train", "val", "test", "audio_stats"}`` for ``fit``: ``avmnist_arrays`` of the
    config (features computed once per process, audio standardised by the training
    split's statistics when ``normalize_audio``)."""
    from lepton_mm.data import avmnist_arrays

    return avmnist_arrays(data_seed=config.data_seed, snr_db=config.snr_db,
                          normalize_audio=config.normalize_audio,
                          sizes={"train": config.num_train, "val": config.num_val,
                                 "test": config.num_test})


def sweep_data(config: AVMNISTConfig, data: dict[str, Any]) -> dict[str, Any]:
    """The test inputs of the robustness sweeps (built once per process, in ``data``).

    Returns ``{"audio": {snr: (log_mel, mask)}, "image": {sigma: images}}`` for the
    test examples in ``data``. The audio at each SNR is the test split rebuilt by
    ``load_avmnist(snr_db=snr)`` with the same ``data_seed`` (same pairing, same noise
    draws, scaled to that SNR), standardised with the *training* split's statistics at
    ``config.snr_db``; the images get ``add_gaussian_noise`` with the key
    ``fold_in(key(data_seed), 1000)`` (example ``i`` from ``fold_in(that, i)``: the same
    draw at every sigma and for every method). The training SNR and sigma 0 are the test
    split itself (the same arrays).
    """
    if "sweep" in data:
        return data["sweep"]
    import jax

    from lepton_mm.data import load_avmnist, standardize_log_mel
    from lepton_mm.robustness import add_gaussian_noise

    test = data["test"]
    n = len(test["label"])
    audio = {config.snr_db: test["audio"]}
    for snr in config.snr_sweep:
        if snr not in audio:
            split = load_avmnist(data_seed=config.data_seed, snr_db=snr).test
            audio[snr] = split.subset(np.arange(n)).materialize()["audio"]
            standardize_log_mel(audio[snr][0], data.get("audio_stats"))
    key = jax.random.fold_in(jax.random.key(config.data_seed), _IMAGE_NOISE_TAG)
    image = {sigma: test["image"] if sigma == 0 else np.asarray(
        add_gaussian_noise(test["image"], sigma, key=key, example_index=np.arange(n)))
        for sigma in config.image_noise_sweep}
    data["sweep"] = {"audio": audio, "image": image}
    return data["sweep"]


def build_model(config: AVMNISTConfig, method: str, rngs: Any) -> Any:
    """LeNet encoders → fusion (``fusion_dim``) → ReLU → Linear(10).

    Concat is MultiBench's model exactly: ``[48-d image; 192-d audio]`` → Linear(240,
    100) → ReLU → Linear(100, 10). Unimodal baselines use the same head on one
    encoder (Linear(d, 100) → ReLU → Linear(100, 10)); every other fusion layer replaces
    the first linear layer.
    """
    import jax
    from flax import nnx

    from lepton_mm.data.avmnist import N_MELS
    from lepton_mm.encoders import AudioSpectrogramCNN, ImageCNN
    from lepton_mm.fusion import build
    from lepton_mm.models import MultimodalClassifier

    encoders = {}
    if method != "audio_only":
        encoders["image"] = ImageCNN.lenet(1, channels=config.image_channels,
                                           additional_layers=3, rngs=rngs)
    if method != "image_only":
        encoders["audio"] = AudioSpectrogramCNN.lenet(
            N_MELS, channels=config.audio_channels, additional_layers=5, rngs=rngs)
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



def robustness_protocol(config: AVMNISTConfig, num_test: int) -> dict[str, Any]:
    """What a run's robustness results depend on (recomputed when it changes)."""
    return {"snr_db": list(config.snr_sweep), "image_noise_sigma":
            list(config.image_noise_sweep), "train_snr_db": config.snr_db,
            "data_seed": config.data_seed, "num_test": num_test,
            "normalize_audio": config.normalize_audio}


def robustness_results(config: AVMNISTConfig, method: str, model: Any,
                       data: dict[str, Any], *, full: bool = True) -> dict[str, Any]:
    """Test accuracy of a trained model under every robustness condition.

    Returns ``{"protocol", "both", "audio_absent", "image_absent", "audio_snr",
    "image_noise", "time_s", "test_predictions"}`` (``full=False``: the clean test split
    only): accuracies (fractions) with both modalities, with the audio / the image
    marked absent (``mark_absent``: through ``batch["present"]``, never zeros fed as
    data), and lists over ``config.snr_sweep`` and ``config.image_noise_sweep``
    (``ConditionEvaluator.evaluate``). Conditions a unimodal baseline lacks are None.
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
    return {"protocol": robustness_protocol(config, len(data["test"]["label"])),
            "both": out["clean"], "test_predictions": out["predictions"],
            **{k: out.get(k) for k in ("audio_absent", "image_absent", *_SWEEPS)},
            "time_s": time.perf_counter() - start}


class AVMNIST(harness.Experiment):
    """The AV-MNIST table: one run per (method, seed) of an ``AVMNISTConfig``."""

    name, script, method_flag = "avmnist", "experiments/avmnist.py", "--fusion"
    extra_methods = PEER_METHODS
    not_recorded = ("methods", "seeds", "workdir", "results", "progress",
                    "checkpoint_every", "modality_dropout", "robustness", "snr_sweep",
                    "image_noise_sweep", "balance", "ogm_alpha", "gblend_pilot",
                    "gblend_train_examples")
    flags = (("data_seed", "--data-seed"), ("snr_db", "--snr-db"), ("epochs", "--epochs"),
             ("batch_size", "--batch-size"),
             ("learning_rate", "--learning-rate"), ("num_train", "--num-train"),
             ("num_val", "--num-val"), ("num_test", "--num-test"),
             ("robustness", "--robustness"), ("snr_sweep", "--snr-sweep"),
             ("image_noise_sweep", "--image-noise"))
    # --modality-dropout, --balance and the strategies' settings, from method_args
    method_fields = ("modality_dropout", "balance", "ogm_alpha", "gblend_pilot",
                     "gblend_train_examples")
    figures = tuple(f"{sweep}_sweep.png" for sweep in _SWEEPS)

    def methods(self) -> list[str]:
        return resolve_methods(self.config)

    def default_config(self) -> AVMNISTConfig:
        return quick_config() if self.config.quick else AVMNISTConfig()

    def method_args(self, method: str) -> list[str]:
        base, variant = split_method(method)
        return [f"--fusion {base}",
                *([VARIANTS[variant].flags(self.config)] if variant else [])]

    def run_config(self, method: str) -> dict[str, Any]:
        """The training settings, the modality-dropout rate of ``+mdrop`` runs, the
        strategy of ``--balance`` runs and the robustness protocol (when evaluated)."""
        from lepton_mm.data.avmnist import SPLIT_SIZES

        out = super().run_config(method)
        variant = split_method(method)[1]
        if variant:
            out.update(VARIANTS[variant].recorded(self.config))
        if self.config.robustness:
            out["robustness"] = robustness_protocol(
                self.config, self.config.num_test or SPLIT_SIZES["test"])
        return out

    def prepare(self, todo: list[RunKey]) -> dict[str, Any]:
        data = make_data(self.config)
        if self.config.robustness:
            sweep_data(self.config, data)  # built before the runs' memory is measured
        return data

    def train(self, key: RunKey, data: dict[str, Any], workdir: Path) -> dict[str, Any]:
        """Trains (or resumes) one run; the test split is scored once, by the robustness
        pass's both-modalities condition (so the table's test accuracy and the sweep's
        training-SNR point are the same number)."""
        from lepton_mm.training import seed_rngs

        config, base = self.config, split_method(key.method)[0]
        start = time.perf_counter()
        strategy, extra = self.strategy(key, data, workdir)
        model = build_model(config, base, seed_rngs(key.seed))
        fitted = self.fit(key, model, data, workdir, epochs=config.epochs, strategy=strategy)
        facts = harness.fit_facts(fitted, time.perf_counter() - start)
        rob = robustness_results(config, key.method, model, data, full=config.robustness)
        predictions = rob.pop("test_predictions")
        return {"metrics": {
                    "test_accuracy": float(np.mean(predictions == data["test"]["label"])),
                    "val_accuracy": float(fitted.best_metrics["accuracy"]),
                    **{k: facts[k] for k in ("best_epoch", "epochs", "history")}},
                "robustness": rob if config.robustness else None,
                "params": fitted.num_params,
                "seconds_per_epoch": facts["seconds_per_epoch"],
                "extra": {"resumed_from": fitted.resumed_from, **extra}}

    def strategy(self, key: RunKey, data: dict[str, Any] | None,
                 workdir: Path | None) -> tuple[Any, dict[str, Any]]:
        """``fit``'s ``strategy`` for ``key``'s run (None unless ``--balance``) and what
        its record keeps about it (``+gblend``: the pilot's weights and losses)."""
        from lepton_mm.balance import OGMGE, GradientBlending, MMPareto
        from lepton_mm.models import Classification

        variant = split_method(key.method)[1]
        if variant == "ogm_ge":
            return OGMGE(alpha=self.config.ogm_alpha), {}
        if variant == "mmpareto":
            return MMPareto(Classification(NUM_CLASSES)), {}
        if variant == "gblend":
            weights, losses = self.gblend_weights(key, data, workdir / "gblend_pilot")
            return GradientBlending(weights), {"gblend_weights": weights,
                                               "gblend_head_losses": losses}
        return None, {}

    def fit(self, key: RunKey, model: Any, data: dict[str, Any], workdir: Path, *,
            epochs: int, strategy: Any = None) -> Any:
        """``lepton_mm.training.fit`` with the recipe: SGD, the best validation epoch
        kept, ``+mdrop`` runs with modality dropout."""
        from lepton_mm.experiment import config_hash
        from lepton_mm.models import Classification
        from lepton_mm.training import OptimizerConfig, fit

        config, variant = self.config, split_method(key.method)[1]
        return fit(
            model, Classification(NUM_CLASSES), data["train"], eval_data=data["val"],
            workdir=workdir, optimizer=OptimizerConfig(
                name="sgd", learning_rate=config.learning_rate, momentum=config.momentum,
                weight_decay=config.weight_decay),
            epochs=epochs, batch_size=config.batch_size,
            eval_batch_size=config.eval_batch_size or config.batch_size, seed=key.seed,
            monitor="accuracy", mode="max",
            modality_dropout=config.modality_dropout if variant == "mdrop" else 0.0,
            strategy=strategy, checkpoint_every=config.checkpoint_every,
            progress=config.progress, tensorboard=False,
            config={"hash": config_hash(self.run_config(key.method))})

    def gblend_weights(self, key: RunKey, data: dict[str, Any],
                       where: Path) -> tuple[dict[str, float], dict[str, Any]]:
        """Offline Gradient Blending's weights for ``key``'s run: a pilot of the same
        model (same seed) trained plain in ``where`` (resumable), each head's training
        and validation loss (``head_losses``) after epochs ``n`` and ``n + dn``
        (``config.gblend_pilot``), then ``gradient_blending_weights``.

        Returns:
          ``(weights, {"epoch <n>": {"train": {head: loss}, "val": {...}}, ...})``.
        """
        import jax

        from lepton_mm.balance import gradient_blending_weights, head_losses
        from lepton_mm.models import Classification
        from lepton_mm.training import seed_rngs

        config = self.config
        train = jax.tree.map(lambda a: a[:config.gblend_train_examples], data["train"])
        model = build_model(config, split_method(key.method)[0], seed_rngs(key.seed))
        losses = {}
        for epochs in config.gblend_pilot:  # the second call resumes the first's run
            self.fit(key, model, data, where, epochs=epochs)
            losses[f"epoch {epochs}"] = {
                split: head_losses(model, Classification(NUM_CLASSES), arrays,
                                   batch_size=config.eval_batch_size or config.batch_size)
                for split, arrays in (("train", train), ("val", data["val"]))}
        first, last = (losses[f"epoch {e}"] for e in config.gblend_pilot)
        pairs = lambda at: {h: (at["train"][h], at["val"][h]) for h in at["train"]}
        return gradient_blending_weights(pairs(first), pairs(last)), losses

    def describe(self, record: dict[str, Any]) -> str:
        rob = record.get("robustness") or {}
        return super().describe(record) + (
            "" if rob.get("audio_absent") is None else
            f"; audio absent {100 * rob['audio_absent']:.2f} %, image absent "
            f"{100 * rob['image_absent']:.2f} %")

    def summarize(self, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
        """Per method: accuracies (mean, std over seeds, per seed), costs and, with
        robustness results, ``audio_absent`` / ``image_absent`` and the two sweeps
        (``summarize_sweeps``: curves, relative and effective robustness against
        ``REFERENCE_METHOD``, min-max normalised over the methods summarised)."""
        from lepton_mm.robustness import summarize_sweeps

        def stats(rs, get):
            values = {str(r["seed"]): get(r) for r in rs}
            return None if None in values.values() else seed_stats(values)

        summary: dict[str, Any] = {}
        for method, rs in runs.items():
            summary[method] = {
                "test_accuracy": stats(rs, lambda r: r["metrics"]["test_accuracy"]),
                "val_accuracy": stats(rs, lambda r: r["metrics"]["val_accuracy"]),
                **harness.run_costs(rs),
                "modality_dropout": rs[0]["config"].get("modality_dropout", 0.0)}
            if all(r.get("robustness") for r in rs):
                for cond in ("audio_absent", "image_absent"):
                    summary[method][cond] = stats(rs, lambda r, c=cond: r["robustness"][c])
        for sweep, (levels, _) in _SWEEPS.items():
            curves = {m: {str(r["seed"]): r["robustness"][sweep] for r in rs}
                      for m, rs in runs.items() if "audio_absent" in summary[m]}
            curves = {m: c for m, c in curves.items()
                      if all(v is not None and None not in v for v in c.values())}
            protocol = next((runs[m][0]["robustness"]["protocol"] for m in curves), None)
            done = summarize_sweeps(curves, protocol[levels], reference=REFERENCE_METHOD) \
                if curves else {}
            for m in summary:
                if "audio_absent" in summary[m]:
                    summary[m][sweep] = done.get(m)
        return summary

    def tables(self, summary: dict[str, Any]) -> str:
        """Accuracy (with absent modalities) and costs; robustness scores; the sweeps.
        Accuracies in %, robustness scores as fractions."""
        pct = format_mean_std
        lines = ["| method | test accuracy (%) | audio absent (%) | image absent (%) | "
                 "val accuracy (%) | seeds | parameters | s / epoch | peak RSS (MB) |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for method, s in summary.items():
            epoch = "—" if s["epoch_time_s"] is None else f"{s['epoch_time_s']:.1f}"
            lines.append(
                f"| {method} | {pct(s['test_accuracy'])} | {pct(s.get('audio_absent'))} | "
                f"{pct(s.get('image_absent'))} | {pct(s['val_accuracy'])} | "
                f"{len(s['test_accuracy']['per_seed'])} | {s['num_params']:,} | {epoch} | "
                f"{s['peak_rss_mb']:.0f} |")
        swept = {sweep: {m: s[sweep] for m, s in summary.items() if s.get(sweep)}
                 for sweep in _SWEEPS}
        if any(swept.values()):
            lines += ["", "**Robustness** (MultiBench; relative: area under the accuracy "
                      "curve with the levels on [0, 1]; effective: against "
                      f"{REFERENCE_METHOD})", "",
                      "| method | audio SNR: relative | audio SNR: effective | "
                      "image noise: relative | image noise: effective |",
                      "|---|---|---|---|---|"]
            for method, s in summary.items():
                if s.get("audio_snr") or s.get("image_noise"):
                    cells = [format_mean_std(s[sw][score] if s.get(sw) else None,
                                             percent=False, digits=3)
                             for sw in _SWEEPS for score in ("relative_robustness",
                                                            "effective_robustness")]
                    lines.append(f"| {method} | " + " | ".join(cells) + " |")
        for sweep, title, unit in (("audio_snr", "Audio SNR sweep", "{:g} dB"),
                                   ("image_noise", "Image noise sweep", "σ {:g}")):
            if swept[sweep]:
                levels = next(iter(swept[sweep].values()))["levels"]
                lines += ["", f"**{title}** (test accuracy, %)", "",
                          "| method | " + " | ".join(unit.format(v) for v in levels) + " |",
                          "|---|" + "---|" * len(levels)]
                for method, sw in swept[sweep].items():
                    cells = [pct({"mean": m, "std": None if sw["std"] is None else sw["std"][i]})
                             for i, m in enumerate(sw["mean"])]
                    lines.append(f"| {method} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def plot(self, summary: dict[str, Any], out: Path) -> list[Path]:
        """``audio_snr_sweep.png`` and ``image_noise_sweep.png``: a line per method,
        error bars the std over seeds, ``+mdrop`` runs dashed in their method's colour."""
        from lepton_mm.robustness import plot_sweep

        written = []
        for sweep, (_, xlabel) in _SWEEPS.items():
            curves = {m: s[sweep] for m, s in summary.items() if s.get(sweep)}
            if curves:
                snr = sweep == "audio_snr"
                written.append(plot_sweep(
                    curves, out / f"{sweep}_sweep.png", xlabel=xlabel, invert_x=snr,
                    title=f"AV-MNIST: {'audio SNR' if snr else 'image noise'} sweep",
                    mark=(self.config.snr_db, f"training SNR ({self.config.snr_db:g} dB)")
                    if snr else None, group=split_method))
        return written


def parse_args(argv: list[str] | None = None) -> tuple[AVMNISTConfig, argparse.Namespace]:
    """Command line → ``(AVMNISTConfig, the parsed arguments)``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fusion", default=None,
                        help="'all' or comma-separated methods: image_only, audio_only, "
                             "fusion names (default: all; --quick: a representative five)")
    harness.add_arguments(parser, quick="smoke check: subset, 1 seed, 5 methods")
    harness.add_flags(parser, AVMNIST, AVMNISTConfig)
    parser.add_argument("--modality-dropout", type=float, default=None, metavar="P",
                        help="also train every fusion method with modality dropout at "
                             "rate P, as <method>+mdrop")
    parser.add_argument("--balance", default=None, metavar="NAMES",
                        help="also train every fusion method with each balanced-learning "
                             f"strategy ({', '.join(BALANCE)}), as <method>+<name>")
    parser.add_argument("--ogm-alpha", type=float, default=None, metavar="A",
                        help="OGM-GE's alpha for +ogm_ge runs (default 0.5)")
    parser.add_argument("--gblend-pilot", default=None, metavar="N,M",
                        help="epochs after which a +gblend run's pilot measures the heads' "
                             "losses (default 1,2)")
    parser.add_argument("--gblend-train-examples", type=int, default=None, metavar="K",
                        help="training examples the pilot's training losses use "
                             "(default 5000)")
    args = parser.parse_args(argv)
    overrides = {**harness.base_overrides(parser, args, "avmnist"),
                 **harness.config_file(parser, args, AVMNISTConfig),
                 **harness.flag_overrides(args, AVMNIST)}
    if args.modality_dropout is not None:
        overrides["modality_dropout"] = args.modality_dropout
    if args.balance is not None:
        overrides["balance"] = tuple(b for b in args.balance.split(",") if b)
    for name in ("ogm_alpha", "gblend_train_examples"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.gblend_pilot is not None:
        overrides["gblend_pilot"] = tuple(int(e) for e in args.gblend_pilot.split(","))
    if args.fusion is not None:
        overrides["methods"] = tuple(m for m in args.fusion.split(",") if m)
    return harness.make_config(parser, quick_config if args.quick else AVMNISTConfig,
                               overrides), args


def main(argv: list[str] | None = None) -> int:
    config, args = parse_args(argv)
    return harness.run_main(AVMNIST(config), args)


if __name__ == "__main__":
    from lepton_mm.training import tune_glibc_malloc

    tune_glibc_malloc()  # reuse freed step buffers (faster steps); docs/performance.md
    sys.exit(main())
