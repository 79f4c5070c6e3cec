"""AV-MNIST: image-only and audio-only baselines and every fusion layer, LeNet encoders.

The benchmark is ``lepton_mm.data.load_avmnist`` (PCA-degraded MNIST digits paired with
noisy spoken digits; ``docs/avmnist.md``). Each method is trained with MultiBench's
AV-MNIST recipe (LeNet encoders, a 100-unit fused layer, SGD, batch 40) by
``lepton_mm.training.fit``, the epoch with the best validation accuracy is kept and
evaluated on the test split. Per (method, seed) the run lives in
``WORKDIR/<method>/seed_<seed>/`` (checkpoints, ``log.jsonl``, ``result.json``); the
summary goes to ``WORKDIR/results.json`` and ``WORKDIR/results.md``. Re-running a
command skips finished runs and resumes interrupted ones.

Every trained model is also tested on imperfect data (``docs/results.md``):
with the audio or the image marked absent (through ``batch["present"]``), under an
audio SNR sweep and an image Gaussian-noise sweep, scored by MultiBench's relative and
effective robustness; the sweeps are plotted to ``WORKDIR/audio_snr_sweep.png`` and
``WORKDIR/image_noise_sweep.png``. ``--modality-dropout P`` also trains every fusion
method with modality dropout, as ``<method>+mdrop``, in the same tables.

    python experiments/avmnist.py --quick --workdir runs/avmnist_quick     # ~3 min, 2 cores
    python experiments/avmnist.py --fusion all --seeds 0,1,2 --workdir runs/avmnist
    python experiments/avmnist.py --fusion image_only,concat --epochs 3 --seeds 0
    python experiments/avmnist.py --fusion concat,gated --modality-dropout 0.3
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lepton_mm.experiment import NUMERICS

UNIMODAL = ("image_only", "audio_only")
#: ``--quick`` trains these (the fusion zoo's classic representatives).
QUICK_METHODS = ("image_only", "audio_only", "concat", "low_rank", "gated")
NUM_CLASSES = 10
#: Suffix of the method key of a run trained with modality dropout (``concat+mdrop``).
MDROP_SUFFIX = "+mdrop"
#: Effective robustness is measured against this method: MultiBench's "LF" baseline,
#: late fusion by concatenating the encoders' features (MultiBench's ``Concat``).
REFERENCE_METHOD = "concat"
#: Audio SNR sweep (dB), least noisy first; the benchmark trains and tests at -15.
SNR_SWEEP = (20.0, 10.0, 0.0, -5.0, -10.0, -15.0, -20.0)
#: Image noise sweep: standard deviations of white Gaussian noise added to each pixel
#: of the PCA-reconstructed test images (whose pixels span roughly [0, 1]; per-image
#: pixel standard deviation ~0.2), least noisy first. See docs/results.md.
IMAGE_NOISE_SWEEP = (0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)
# fold_in tag of the image-noise key under key(data_seed) (AV-MNIST's own keys fold in
# the split ids 0-2 there).
_IMAGE_NOISE_TAG = 1000
_SWEEPS = ("audio_snr", "image_noise")


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
    """``--quick``: a subset, one seed, five methods, progress bars (~6 CPU-minutes).

    Measured: 2 min 53 s wall on 2 idle cores, robustness sweeps included, with the
    allocator tuned as the script does (docs/results.md).

    At the benchmark's -15 dB: the first 12 000 / 1000 / 2000 examples, one epoch of 750
    steps of batch 16. Chosen on validation accuracy (seed 0, data seed 0; image / audio
    / concat, %): 6000 examples for 375 steps gave 56.0 / 30.8 / 57.7, the same 6000
    twice (750 steps) 62.4 / 37.3 / 63.2, and 12 000 once (750 steps, the same cost)
    60.3 / 41.0 / 63.1: fresh examples train the audio branch better than repeats, and
    concat's margin over the image alone grows from 0.8 to 2.8 points. The previous
    6000 examples in 150 steps of batch 40 left the audio at 28 % and concat below the
    image. On the test split of this budget low_rank and gated beat both modalities,
    concat does not (58.2 vs 59.6 % for the image; docs/results.md).
    """
    base = dict(methods=QUICK_METHODS, seeds=(0,), epochs=1, batch_size=16,
                eval_batch_size=40, num_train=12000, num_val=1000, num_test=2000,
                checkpoint_every=None, progress=True, quick=True)
    return AVMNISTConfig(**{**base, **overrides})


def split_method(method: str) -> tuple[str, bool]:
    """``"concat+mdrop"`` -> ``("concat", True)``; ``"concat"`` -> ``("concat", False)``."""
    if method.endswith(MDROP_SUFFIX):
        return method[:-len(MDROP_SUFFIX)], True
    return method, False


def resolve_methods(config: AVMNISTConfig) -> list[str]:
    """The method keys to run, validated (before any computation).

    With ``modality_dropout > 0`` each fusion method ``m`` is followed by ``m+mdrop``.
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
    if not config.modality_dropout:
        return methods
    return [k for m in methods
            for k in ((m,) if m in UNIMODAL else (m, m + MDROP_SUFFIX))]


# ------------------------------------------------------------------------------- data


def make_data(config: AVMNISTConfig) -> dict[str, Any]:
    """``{"train", "val", "test"}`` → batch-format dicts of numpy arrays for ``fit``.

    The first ``num_*`` examples of each split, their features computed once
    (``AVMNISTSplit.materialize``: ~0.4 ms and 32 KiB per example, 2.5 GB for the full
    data) and shared by every run of the process. Computing them per batch instead
    (``split[indices]``) would cost ~8 s per full epoch, every epoch of every run.
    With ``normalize_audio`` the log-mels are standardised by the mean and standard
    deviation of the training split's valid frames (returned as ``"audio_stats"``).
    """
    from lepton_mm.data import load_avmnist

    avmnist = load_avmnist(data_seed=config.data_seed, snr_db=config.snr_db)
    out: dict[str, Any] = {}
    for name, n in (("train", config.num_train), ("val", config.num_val),
                    ("test", config.num_test)):
        split = getattr(avmnist, name)
        if n is not None:
            if not 0 < n <= len(split):
                raise ValueError(f"num_{name}: expected 1..{len(split)}, got {n}.")
            split = split.subset(np.arange(n))
        out[name] = split.materialize()
    out["audio_stats"] = None
    if config.normalize_audio:
        mean, std = audio_statistics(out["train"])
        for name in ("train", "val", "test"):
            _normalize(out[name]["audio"][0], (mean, std))
        out["audio_stats"] = (mean, std)
    return out


def _normalize(log_mel: np.ndarray, stats: tuple[np.float32, np.float32] | None) -> None:
    """Standardises float32 ``[n, time, mels]`` log-mels in place (None: unchanged)."""
    if stats is not None:
        log_mel -= stats[0]
        log_mel /= stats[1]


def audio_statistics(data: dict[str, Any]) -> tuple[np.float32, np.float32]:
    """Mean and standard deviation (float64 sums) of the valid log-mel frames."""
    log_mel, mask = data["audio"]
    total = count = square = 0.0
    for i in range(0, len(mask), 1024):  # chunks: no float64 copy of the whole split
        valid = log_mel[i:i + 1024][mask[i:i + 1024]].astype(np.float64)
        total, square, count = total + valid.sum(), square + (valid ** 2).sum(), \
            count + valid.size
    mean = total / count
    return np.float32(mean), np.float32(np.sqrt(square / count - mean ** 2))


def sweep_data(config: AVMNISTConfig, data: dict[str, Any]) -> dict[str, Any]:
    """The test inputs of the robustness sweeps (built once per process, in ``data``).

    Returns ``{"audio": {snr: (log_mel, mask)}, "image": {sigma: images}}`` for the
    first ``num_test`` test examples. The audio at each SNR is the test split rebuilt by
    ``load_avmnist(snr_db=snr)`` with the same ``data_seed`` (same pairing, same noise
    draws, scaled to that SNR) and standardised with the *training* split's statistics
    at ``config.snr_db``; the images get ``add_gaussian_noise`` with the key
    ``fold_in(key(data_seed), 1000)`` (example ``i`` from ``fold_in(that, i)``: the same
    draw at every sigma and for every method). The levels equal to the training SNR and
    to sigma 0 are the test split itself (the same arrays).
    """
    if "sweep" in data:
        return data["sweep"]
    import jax

    from lepton_mm.data import load_avmnist
    from lepton_mm.robustness import add_gaussian_noise

    test = data["test"]
    n = len(test["label"])
    audio = {}
    for snr in config.snr_sweep:
        if snr == config.snr_db:
            audio[snr] = test["audio"]
            continue
        split = load_avmnist(data_seed=config.data_seed, snr_db=snr).test.subset(
            np.arange(n))
        log_mel, mask = split.materialize()["audio"]
        _normalize(log_mel, data.get("audio_stats"))
        audio[snr] = (log_mel, mask)
    key = jax.random.fold_in(jax.random.key(config.data_seed), _IMAGE_NOISE_TAG)
    image = {sigma: test["image"] if sigma == 0 else np.asarray(
        add_gaussian_noise(test["image"], sigma, key=key, example_index=np.arange(n)))
        for sigma in config.image_noise_sweep}
    data["sweep"] = {"audio": audio, "image": image}
    return data["sweep"]


# ------------------------------------------------------------------------------ model


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


# ------------------------------------------------------------------------- robustness


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
    "image_noise", "time_s", "test_predictions"}`` (``full=False``: the clean test
    split only, i.e. ``both`` and the predictions): accuracies (fractions) on the test
    split with both
    modalities, with the audio / the image marked absent (``mark_absent``: through
    ``batch["present"]``, never zeros fed as data), and the lists over
    ``config.snr_sweep`` and ``config.image_noise_sweep``. Conditions that do not apply
    to a unimodal baseline (its other modality absent or swept) are None.
    """
    from tqdm import tqdm

    from lepton_mm.robustness import ConditionEvaluator, mark_absent

    base, _ = split_method(method)
    test = data["test"]
    has_image, has_audio = base != "audio_only", base != "image_only"
    conditions: list[tuple[str, Any, dict[str, Any]]] = [("both", None, test)]
    if not full:
        has_image = has_audio = False
    else:
        sweep = sweep_data(config, data)
    if has_image and has_audio:
        conditions += [("audio_absent", None, mark_absent(test, "audio")),
                       ("image_absent", None, mark_absent(test, "image"))]
    if has_audio:
        conditions += [("audio_snr", i, {**test, "audio": sweep["audio"][snr]})
                       for i, snr in enumerate(config.snr_sweep)]
    if has_image:
        conditions += [("image_noise", i, {**test, "image": sweep["image"][sigma]})
                       for i, sigma in enumerate(config.image_noise_sweep)]
    start = time.perf_counter()
    evaluator = ConditionEvaluator(model, config.eval_batch_size or config.batch_size)
    labels = np.asarray(test["label"])
    out: dict[str, Any] = {
        "protocol": robustness_protocol(config, len(test["label"])),
        "both": None, "audio_absent": None, "image_absent": None,
        "audio_snr": [None] * len(config.snr_sweep) if has_audio else None,
        "image_noise": [None] * len(config.image_noise_sweep) if has_image else None}
    show = sys.stdout.isatty() if config.progress is None else bool(config.progress)
    for name, i, batch in tqdm(conditions, desc="robustness", leave=False,
                               disable=not show, dynamic_ncols=True):
        predictions = evaluator.predictions(batch)
        acc = float(np.mean(predictions == labels))
        if name == "both":
            out["test_predictions"] = predictions  # the table's test accuracy: this pass
        if i is None:
            out[name] = acc
        else:
            out[name][i] = acc
    out["time_s"] = time.perf_counter() - start
    return out


# -------------------------------------------------------------------------------- run

#: Experiment name in the ledger: records at ``results/avmnist/<method>/seed<k>.json``.
EXPERIMENT = "avmnist"
#: Rows of the PyTorch MultiBench-recipe peer (``benchmarks/peers/multibench_avmnist.py``)
#: shown beside ours when their records exist (current: same numerics version).
PEER_METHODS = ("peer_multibench_image", "peer_multibench_audio", "peer_multibench_concat")
_NOT_TRAINING = ("methods", "seeds", "workdir", "results", "progress", "checkpoint_every",
                 "modality_dropout", "robustness", "snr_sweep", "image_noise_sweep")


def run_config(config: AVMNISTConfig, method: str) -> dict[str, Any]:
    """Everything one run's record depends on (its ``config``; hashed into the key).

    The training settings (not methods, seeds, paths or progress bars), the
    modality-dropout rate for ``+mdrop`` runs only, and the robustness protocol.
    """
    from lepton_mm.data.avmnist import SPLIT_SIZES

    out = {k: v for k, v in dataclasses.asdict(config).items() if k not in _NOT_TRAINING}
    out["method"] = method
    if split_method(method)[1]:
        out["modality_dropout"] = config.modality_dropout
    if config.robustness:
        out["robustness"] = robustness_protocol(config, config.num_test or
                                                SPLIT_SIZES["test"])
    return out


def run_command(config: AVMNISTConfig, method: str, seed: int) -> str:
    """The command line (from the repository root) that trains just this run again."""
    defaults = quick_config() if config.quick else AVMNISTConfig()
    parts = ["python experiments/avmnist.py"]
    if config.quick:
        parts.append("--quick")
    base, mdrop = split_method(method)
    parts += [f"--fusion {base}", f"--seeds {seed}"]
    if mdrop:
        parts.append(f"--modality-dropout {config.modality_dropout:g}")
    flags = {"data_seed": "--data-seed", "snr_db": "--snr-db", "epochs": "--epochs",
             "batch_size": "--batch-size", "learning_rate": "--learning-rate",
             "num_train": "--num-train", "num_val": "--num-val", "num_test": "--num-test"}
    for field, flag in flags.items():
        value = getattr(config, field)
        if value != getattr(defaults, field):
            parts.append(f"{flag} {value:g}" if isinstance(value, float) else
                         f"{flag} {value}")
    if not config.robustness:
        parts.append("--no-robustness")
    if config.snr_sweep != defaults.snr_sweep:
        parts.append("--snr-sweep=" + ",".join(f"{v:g}" for v in config.snr_sweep))
    if config.image_noise_sweep != defaults.image_noise_sweep:
        parts.append("--image-noise " + ",".join(f"{v:g}" for v in config.image_noise_sweep))
    return " ".join([*parts, "--force"])


def run_one(config: AVMNISTConfig, method: str, seed: int, data: dict[str, Any],
            workdir: Path) -> dict[str, Any]:
    """Trains (or resumes from ``workdir``'s checkpoint) one run; returns its record.

    The test split is scored once, by the robustness pass's both-modalities condition
    (the table's test accuracy and the sweep's training-SNR point are the same number).
    """
    from lepton_mm import experiment as ledger
    from lepton_mm.models import Classification
    from lepton_mm.training import OptimizerConfig, fit, seed_rngs

    base, mdrop = split_method(method)
    settings = run_config(config, method)
    task = Classification(NUM_CLASSES)
    eval_batch_size = config.eval_batch_size or config.batch_size
    memory_scoped = ledger.reset_peak_rss()
    start = time.perf_counter()
    model = build_model(config, base, seed_rngs(seed))
    fitted = fit(
        model, task, data["train"], eval_data=data["val"], workdir=workdir,
        optimizer=OptimizerConfig(name="sgd", learning_rate=config.learning_rate,
                                  momentum=config.momentum,
                                  weight_decay=config.weight_decay),
        epochs=config.epochs, batch_size=config.batch_size,
        eval_batch_size=eval_batch_size, seed=seed, monitor="accuracy", mode="max",
        modality_dropout=config.modality_dropout if mdrop else 0.0,
        checkpoint_every=config.checkpoint_every, progress=config.progress,
        tensorboard=False, config={"hash": ledger.config_hash(settings)})
    fit_time = time.perf_counter() - start
    resumed = fitted.resumed_from or 0
    epochs_here = sum(1 for r in fitted.history if r["step"] > resumed)
    best_epoch = next(r["epoch"] for r in fitted.history if r["step"] == fitted.best_step)
    rob = robustness_results(config, method, model, data, full=config.robustness)
    predictions = rob.pop("test_predictions")
    metrics = {
        "test_accuracy": float(np.mean(predictions == np.asarray(data["test"]["label"]))),
        "val_accuracy": float(fitted.best_metrics["accuracy"]),
        "best_epoch": best_epoch, "epochs": len(fitted.history),
        "history": [{"epoch": r["epoch"], "train_loss": round(r["train_loss"], 6),
                     "val_accuracy": r["eval"]["accuracy"]} for r in fitted.history],
    }
    import jax

    return ledger.make_record(
        ledger.RunKey(EXPERIMENT, method, seed, config.data_seed),
        command=run_command(config, method, seed), config=settings, numerics=NUMERICS,
        metrics=metrics, robustness=rob if config.robustness else None,
        params=fitted.num_params,
        # fit's wall time (training, validation, compilation) per epoch trained by this
        # call; None when the call only restored a finished run.
        seconds_per_epoch=round(fit_time / epochs_here, 2) if epochs_here else None,
        peak_rss_mb=round(ledger.peak_rss_mb(), 1),
        machine=ledger.machine_info(device_kind=jax.devices()[0].device_kind),
        extra={"peak_rss_scope": "run" if memory_scoped else "process",
               "resumed_from": fitted.resumed_from})


# ---------------------------------------------------------------------------- summary


def _stats(values: Mapping[str, float]) -> dict[str, Any]:
    from lepton_mm.experiment import seed_stats

    return seed_stats(values)


def _sweep_summary(runs: Sequence[Mapping[str, Any]], sweep: str) -> dict[str, Any] | None:
    curves = {str(r["seed"]): r["robustness"][sweep] for r in runs}
    if any(c is None or None in c for c in curves.values()):
        return None
    protocol = runs[0]["robustness"]["protocol"]
    x = np.array(list(curves.values()), float)  # [seeds, levels]
    return {"levels": protocol["snr_db" if sweep == "audio_snr" else "image_noise_sigma"],
            "mean": x.mean(0).tolist(),
            "std": x.std(0, ddof=1).tolist() if len(x) > 1 else None,
            "per_seed": curves}


def summarize(results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per method: accuracies (mean, std over seeds, per seed), robustness and costs.

    ``test_accuracy`` and ``val_accuracy`` always; with robustness results also
    ``audio_absent`` / ``image_absent`` (accuracy with that modality marked absent;
    None where it does not apply) and ``audio_snr`` / ``image_noise``: the sweep's
    ``levels``, mean and std curves, ``per_seed`` curves, ``relative_robustness`` and
    ``effective_robustness`` (MultiBench's, per seed, then mean and std; effective
    against the mean curve of ``REFERENCE_METHOD`` when it is in ``results``) and their
    min-max normalisation over the methods summarised (``*_normalized``, of the means).
    """
    from lepton_mm.robustness import (
        effective_robustness,
        minmax_normalize,
        relative_robustness,
    )

    def mean_of(runs, field):
        values = [r[field] for r in runs if r[field] is not None]
        return float(np.mean(values)) if values else None

    summary: dict[str, Any] = {}
    for method, runs in results.items():
        entry = {
            "test_accuracy": _stats({str(r["seed"]): r["metrics"]["test_accuracy"]
                                     for r in runs}),
            "val_accuracy": _stats({str(r["seed"]): r["metrics"]["val_accuracy"]
                                    for r in runs}),
            "num_params": runs[0]["params"],
            "epoch_time_s": mean_of(runs, "seconds_per_epoch"),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "best_epoch": {str(r["seed"]): r["metrics"]["best_epoch"] for r in runs},
            "modality_dropout": runs[0]["config"].get("modality_dropout", 0.0),
        }
        if all(r.get("robustness") for r in runs):
            for cond in ("audio_absent", "image_absent"):
                values = {str(r["seed"]): r["robustness"][cond] for r in runs}
                entry[cond] = None if None in values.values() else _stats(values)
            for sweep in _SWEEPS:
                entry[sweep] = _sweep_summary(runs, sweep)
        summary[method] = entry

    for sweep in _SWEEPS:
        have = {m: s[sweep] for m, s in summary.items() if s.get(sweep)}
        ref = have.get(REFERENCE_METHOD)
        for s in have.values():
            s["relative_robustness"] = _stats(
                {k: relative_robustness(c) for k, c in s["per_seed"].items()})
            s["effective_robustness"] = None if ref is None or len(ref["mean"]) != len(
                s["mean"]) else _stats({k: effective_robustness(c, ref["mean"])
                                        for k, c in s["per_seed"].items()})
        for score in ("relative_robustness", "effective_robustness"):
            means = {m: s[score]["mean"] for m, s in have.items() if s[score] is not None}
            normalized = minmax_normalize(means) if means else {}
            for m, s in have.items():
                value = normalized.get(m)
                s[f"{score}_normalized"] = None if value is None or math.isnan(value) \
                    else value
    return summary


def _pct(s: Mapping[str, Any] | None) -> str:
    if s is None:
        return "—"
    std = "" if s["std"] is None else f" ± {100 * s['std']:.1f}"
    return f"{100 * s['mean']:.1f}{std}"


def _score(s: Mapping[str, Any] | None) -> str:
    if s is None:
        return "—"
    std = "" if s["std"] is None else f" ± {s['std']:.3f}"
    return f"{s['mean']:.3f}{std}"


def _level(sweep: str, value: float) -> str:
    return f"{value:g} dB" if sweep == "audio_snr" else f"σ {value:g}"


def markdown_table(summary: dict[str, Any]) -> str:
    """The summary as markdown: accuracy (with absent modalities), robustness, sweeps.

    The first table starts with ``| method |``; the others follow, each after a blank
    line and a bold title. Accuracies are in %, robustness scores as fractions.
    """
    lines = ["| method | test accuracy (%) | audio absent (%) | image absent (%) | "
             "val accuracy (%) | seeds | parameters | s / epoch | peak RSS (MB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for method, s in summary.items():
        epoch = "—" if s["epoch_time_s"] is None else f"{s['epoch_time_s']:.1f}"
        lines.append(
            f"| {method} | {_pct(s['test_accuracy'])} | {_pct(s.get('audio_absent'))} | "
            f"{_pct(s.get('image_absent'))} | {_pct(s['val_accuracy'])} | "
            f"{len(s['test_accuracy']['per_seed'])} | {s['num_params']:,} | {epoch} | "
            f"{s['peak_rss_mb']:.0f} |")
    swept = {sweep: {m: s[sweep] for m, s in summary.items() if s.get(sweep)}
             for sweep in _SWEEPS}
    if any(swept.values()):
        lines += ["", f"**Robustness** (MultiBench; relative: area under the accuracy "
                  f"curve with the levels on [0, 1]; effective: against "
                  f"{REFERENCE_METHOD})", "",
                  "| method | audio SNR: relative | audio SNR: effective | "
                  "image noise: relative | image noise: effective |",
                  "|---|---|---|---|---|"]
        for method, s in summary.items():
            if not (s.get("audio_snr") or s.get("image_noise")):
                continue
            cells = []
            for sweep in _SWEEPS:
                sw = s.get(sweep)
                cells += ([_score(sw["relative_robustness"]),
                           _score(sw["effective_robustness"])] if sw else ["—", "—"])
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    for sweep, title in (("audio_snr", "Audio SNR sweep"),
                         ("image_noise", "Image noise sweep")):
        if not swept[sweep]:
            continue
        levels = next(iter(swept[sweep].values()))["levels"]
        lines += ["", f"**{title}** (test accuracy, %)", "",
                  "| method | " + " | ".join(_level(sweep, v) for v in levels) + " |",
                  "|---|" + "---|" * len(levels)]
        for method, sw in swept[sweep].items():
            cells = [_pct({"mean": m, "std": None if sw["std"] is None else sd})
                     for m, sd in zip(sw["mean"], sw["std"] or sw["mean"], strict=True)]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_sweeps(summary: Mapping[str, Any], workdir: str | Path,
                train_snr_db: float | None = None) -> list[Path]:
    """``audio_snr_sweep.png`` and ``image_noise_sweep.png``: a line per method.

    Error bars are the standard deviation over seeds (none for one seed); ``+mdrop``
    runs are dashed in their method's colour. Returns the paths written (a sweep no
    method has is skipped).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    written = []
    for sweep, name, xlabel in (
            ("audio_snr", "audio_snr_sweep.png", "audio SNR (dB)"),
            ("image_noise", "image_noise_sweep.png", "image noise σ (pixel units)")):
        curves = {m: s[sweep] for m, s in summary.items() if s.get(sweep)}
        if not curves:
            continue
        fig = Figure(figsize=(6.4, 4.2))
        FigureCanvasAgg(fig)  # an Agg canvas on a bare Figure: no pyplot state
        ax = fig.add_subplot()
        colours: dict[str, Any] = {}
        for method, sw in curves.items():
            base, mdrop = split_method(method)
            mean = 100 * np.array(sw["mean"])
            err = None if sw["std"] is None else 100 * np.array(sw["std"])
            line = ax.errorbar(sw["levels"], mean, yerr=err, marker="o", markersize=3,
                               capsize=3, label=method, linestyle="--" if mdrop else "-",
                               color=colours.get(base))
            colours.setdefault(base, line.lines[0].get_color())
        if sweep == "audio_snr":
            ax.invert_xaxis()  # noisier to the right
            if train_snr_db is not None:
                ax.axvline(train_snr_db, color="grey", linestyle=":", linewidth=1,
                           label=f"training SNR ({train_snr_db:g} dB)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"AV-MNIST: {'audio SNR' if sweep == 'audio_snr' else 'image noise'}"
                     " sweep")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = Path(workdir) / name
        fig.savefig(path, dpi=100)
        written.append(path)
    return written


def expected_keys(config: AVMNISTConfig) -> list[Any]:
    """The ``RunKey`` of every (method, seed) the config asks for."""
    from lepton_mm.experiment import RunKey

    return [RunKey(EXPERIMENT, m, s, config.data_seed)
            for m in resolve_methods(config) for s in config.seeds]


def run(config: AVMNISTConfig, *, shard: str | None = None,
        force: bool = False) -> dict[str, Any]:
    """Trains every run whose record is missing or stale, writing each as it finishes.

    Records go to ``config.results`` (``results/avmnist/<method>/seed<k>.json``);
    checkpoints to ``WORKDIR/<method>/seed<k>-<hash>/`` (the hash of the run's config
    and numerics, so a changed config never resumes an old checkpoint). ``shard``
    ``"i/n"`` takes every n-th run still to do; ``force`` retrains current runs too,
    from scratch (their checkpoints are deleted first).
    Returns the report over the records (``report``).
    """
    from lepton_mm import experiment as ledger

    book = ledger.Ledger(config.results, EXPERIMENT)
    keys = expected_keys(config)
    hashes = {m: ledger.config_hash(run_config(config, m)) for m in resolve_methods(config)}
    missing = book.todo(keys, config_hashes=hashes, numerics=NUMERICS)
    todo = ledger.shard(keys if force else missing, shard)
    print(f"{len(keys) - len(missing)} "
          f"of {len(keys)} runs have a current record; training {len(todo)}"
          + (f" (shard {shard})" if shard else ""), flush=True)
    data = make_data(config) if todo else None  # a finished table needs no data
    if todo and config.robustness:
        sweep_data(config, data)  # built once, before the runs' peak memory is measured
    for count, key in enumerate(todo, 1):
        print(f"[{count}/{len(todo)}] {key.label()}", flush=True)
        workdir = run_workdir(config, key)
        if force and workdir.exists():  # a forced run trains from scratch
            shutil.rmtree(workdir)
        record = run_one(config, key.method, key.seed, data, workdir)
        path = book.write(record)
        m = record["metrics"]
        line = (f"        test accuracy {100 * m['test_accuracy']:.2f} %  (val "
                f"{100 * m['val_accuracy']:.2f} %, best epoch {m['best_epoch']}, "
                f"{record['seconds_per_epoch']} s/epoch) -> {path}")
        rob = record.get("robustness")
        if rob and rob.get("audio_absent") is not None:
            line += (f"; audio absent {100 * rob['audio_absent']:.2f} %, image absent "
                     f"{100 * rob['image_absent']:.2f} %")
        print(line, flush=True)
    return report(config, config.workdir)


def run_workdir(config: AVMNISTConfig, key: Any) -> Path:
    """``WORKDIR/<method>/seed<k>[-data<d>]-<hash>``: the run's checkpoints and log; the
    hash covers its config and the numerics version (a changed run never resumes)."""
    from lepton_mm import experiment as ledger

    tag = ledger.config_hash({"config": ledger.config_hash(run_config(config, key.method)),
                              "numerics": NUMERICS})[:8]
    return Path(config.workdir) / key.method / f"{key.file_name()[:-5]}-{tag}"


def report(config: AVMNISTConfig, out: str | Path) -> dict[str, Any]:
    """Reads the ledger (trains nothing); writes ``results.json``, ``results.md`` and the
    sweep figures to ``out``; returns the ``results.json`` content.

    ``results.json``: per method the ``summarize`` entry (the PyTorch peer's rows too,
    ``PEER_METHODS``, when their records exist), plus ``complete`` (every
    expected run has a current record), ``missing`` and ``stale`` (run labels; a stale
    record, made with another config or numerics version, is never in a table).
    The same records give byte-identical files.
    """
    from lepton_mm import experiment as ledger

    out = Path(out)
    book = ledger.Ledger(config.results, EXPERIMENT)
    keys = expected_keys(config)
    hashes = {m: ledger.config_hash(run_config(config, m)) for m in resolve_methods(config)}
    collected = ledger.collect(book, keys, config_hashes=hashes, numerics=NUMERICS,
                               extra_methods=PEER_METHODS)
    current = {m: runs for m, runs in collected.current.items() if runs}
    summary = summarize(current)
    result = {"methods": summary, "complete": collected.complete,
              "expected_runs": len(keys),
              "current_runs": sum(len(r) for m, r in current.items()
                                  if m not in PEER_METHODS),
              "missing": collected.missing, "stale": collected.stale,
              "numerics": NUMERICS}
    out.mkdir(parents=True, exist_ok=True)
    ledger.write_json(result, out / "results.json")
    head = (f"{result['current_runs']} of {len(keys)} runs have a current record"
            + ("" if collected.complete else f"; missing: {len(collected.missing)}")
            + (f"; stale (not in the tables): {len(collected.stale)}"
               if collected.stale else "") + ".\n\n")
    ledger.write_text(head + (markdown_table(summary) if summary else ""),
                      out / "results.md")
    if config.robustness and summary:
        plot_sweeps(summary, out, train_snr_db=config.snr_db)
    return result


#: Extra levels printed by ``--validate-image-noise`` between and beyond the sweep's.
_NOISE_PROBE = (0.05, 0.15, 0.4, 0.6, 1.5)
# fold_in tag of the validation noise key (the test sweep uses _IMAGE_NOISE_TAG).
_VAL_NOISE_TAG = 2000


def validate_image_noise(config: AVMNISTConfig) -> dict[str, dict[float, float]]:
    """Validation accuracy of each finished run's best checkpoint under image noise.

    For every method and seed in ``config`` with a checkpoint in the workdir: accuracy
    on the validation split with noise of each sweep level (and ``_NOISE_PROBE``) added,
    from the key ``fold_in(key(data_seed), 2000)`` (not the test sweep's draw). This is
    how the sweep's levels were checked (docs/results.md). Returns and prints
    ``{"<method>/seed<k>": {sigma: accuracy}}``.
    """
    import jax

    from lepton_mm import experiment as ledger
    from lepton_mm.robustness import ConditionEvaluator, add_gaussian_noise
    from lepton_mm.training import load_model, seed_rngs

    val = make_data(config)["val"]
    n = len(val["label"])
    key = jax.random.fold_in(jax.random.key(config.data_seed), _VAL_NOISE_TAG)
    sigmas = sorted({*config.image_noise_sweep, *_NOISE_PROBE})
    out = {}
    for method in resolve_methods(config):
        if method == "audio_only":
            continue
        for seed in config.seeds:
            k = ledger.RunKey(EXPERIMENT, method, seed, config.data_seed)
            workdir = run_workdir(config, k)
            if not workdir.exists():
                print(f"{k.label()}: no checkpoint in {workdir}")
                continue
            base, _ = split_method(method)
            model = load_model(workdir, lambda b=base, s=seed: build_model(
                config, b, seed_rngs(s)))
            evaluator = ConditionEvaluator(model, config.eval_batch_size or
                                           config.batch_size)
            curve = {}
            for sigma in sigmas:
                images = val["image"] if sigma == 0 else np.asarray(add_gaussian_noise(
                    val["image"], sigma, key=key, example_index=np.arange(n)))
                curve[sigma] = evaluator.accuracy({**val, "image": images})
            out[f"{method}/seed{seed}"] = curve
            print(f"{k.label()} validation accuracy (%): " + ", ".join(
                f"σ {s:g}: {100 * a:.1f}" for s, a in curve.items()), flush=True)
    return out


DOCS_BEGIN = "<!-- avmnist-report:begin -->"
DOCS_END = "<!-- avmnist-report:end -->"
_DOC_FIGURES = ("audio_snr_sweep.png", "image_noise_sweep.png")


def docs_block(report_dir: Path) -> str:
    """What ``update_docs`` puts between the markers: the report's ``results.md``."""
    return f"{DOCS_BEGIN}\n{(report_dir / 'results.md').read_text()}{DOCS_END}"


def update_docs(report_dir: Path, doc: Path) -> None:
    """Replaces the marked block of ``doc`` with the report in ``report_dir`` and copies
    its figures to ``doc``'s ``figures/avmnist_*.png``."""
    import shutil

    from lepton_mm.experiment import write_text

    text = doc.read_text()
    if DOCS_BEGIN not in text or DOCS_END not in text:
        raise ValueError(f"--docs: {doc} has no {DOCS_BEGIN} ... {DOCS_END} block.")
    head, rest = text.split(DOCS_BEGIN, 1)
    tail = rest.split(DOCS_END, 1)[1]
    write_text(head + docs_block(report_dir) + tail, doc)
    for name in _DOC_FIGURES:
        if (report_dir / name).exists():
            (doc.parent / "figures").mkdir(exist_ok=True)
            shutil.copyfile(report_dir / name, doc.parent / "figures" / f"avmnist_{name}")


# ------------------------------------------------------------------------------- main


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(s) for s in text.split(",") if s.strip())


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(s) for s in text.split(",") if s.strip())


def parse_args(argv: list[str] | None = None) -> tuple[AVMNISTConfig, argparse.Namespace]:
    """Command line → ``(AVMNISTConfig, the parsed arguments)``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fusion", default=None,
                        help="'all' or comma-separated methods: image_only, audio_only, "
                             "fusion names (default: all; --quick: a representative five)")
    parser.add_argument("--seeds", type=_ints, default=None, help="e.g. 0,1,2")
    parser.add_argument("--seed", type=int, default=None, help="a single seed")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--snr-db", type=float, default=-15.0,
                        help="audio noise level (the benchmark: -15)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--quick", action="store_true",
                        help="subset, 1 seed, 5 methods, progress bars")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument("--num-train", type=int, default=None)
    parser.add_argument("--num-val", type=int, default=None)
    parser.add_argument("--num-test", type=int, default=None)
    parser.add_argument("--modality-dropout", type=float, default=0.0, metavar="P",
                        help="also train every fusion method with modality dropout at "
                             "rate P, as <method>+mdrop")
    parser.add_argument("--robustness", action=argparse.BooleanOptionalAction,
                        default=True, help="absent-modality and noise-sweep evaluation")
    parser.add_argument("--snr-sweep", type=_floats, default=None,
                        help="audio SNRs in dB, decreasing (write --snr-sweep=20,0,-20)")
    parser.add_argument("--image-noise", type=_floats, default=None,
                        help="image noise standard deviations, increasing, e.g. 0,0.5,1")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--results", default=None,
                        help="ledger root (default: results; --quick: WORKDIR/results)")
    parser.add_argument("--shard", default=None, metavar="I/N",
                        help="train every N-th run still to do, starting at I (0-based)")
    parser.add_argument("--force", action="store_true",
                        help="retrain runs whose record is current too")
    parser.add_argument("--report", action="store_true",
                        help="train nothing: write the report of the ledger to --out")
    parser.add_argument("--out", default=None,
                        help="report directory (default: the workdir)")
    parser.add_argument("--validate-image-noise", action="store_true",
                        help="print the validation accuracy of each trained image-bearing "
                             "run's best checkpoint under the image-noise levels (how "
                             "the levels were checked)")
    parser.add_argument("--docs", default=None, metavar="MARKDOWN",
                        help="with --report: also put the report's tables between the "
                             "avmnist-report markers of this file (docs/results.md) and "
                             "its figures into the file's figures/ folder")
    args = parser.parse_args(argv)
    if args.shard is not None:
        from lepton_mm.experiment import shard

        try:
            shard([], args.shard)
        except ValueError as e:
            parser.error(str(e))
    if args.seed is not None and args.seeds is not None:
        parser.error("give --seed or --seeds, not both")
    overrides: dict[str, Any] = {"data_seed": args.data_seed, "snr_db": args.snr_db,
                                 "modality_dropout": args.modality_dropout,
                                 "robustness": args.robustness}
    if args.progress is not None:
        overrides["progress"] = args.progress
    if args.fusion is not None:
        overrides["methods"] = tuple(m for m in args.fusion.split(",") if m)
    if args.seed is not None or args.seeds is not None:
        overrides["seeds"] = (args.seed,) if args.seed is not None else args.seeds
    overrides["workdir"] = args.workdir or ("runs/avmnist_quick" if args.quick
                                            else "runs/avmnist")
    overrides["results"] = args.results or (str(Path(overrides["workdir"]) / "results")
                                            if args.quick else "results")
    if args.snr_sweep is not None:
        overrides["snr_sweep"] = args.snr_sweep
    if args.image_noise is not None:
        overrides["image_noise_sweep"] = args.image_noise
    for name in ("epochs", "batch_size", "learning_rate", "num_train", "num_val",
                 "num_test"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    config = quick_config(**overrides) if args.quick else AVMNISTConfig(**overrides)
    return config, args


def main(argv: list[str] | None = None) -> int:
    config, args = parse_args(argv)
    try:
        resolve_methods(config)
    except ValueError as e:
        print(f"avmnist.py: error: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    if args.validate_image_noise:
        validate_image_noise(config)
        return 0
    if args.report:
        result = report(config, args.out or config.workdir)
        if args.docs:
            update_docs(Path(args.out or config.workdir), Path(args.docs))
    else:
        _enable_compilation_cache(Path(config.workdir) / "jax_cache")
        run(config, shard=args.shard, force=args.force)
        result = report(config, args.out or config.workdir)
    out = Path(args.out or config.workdir)
    print()
    print((out / "results.md").read_text(), end="")
    print(f"\n{out / 'results.json'}  complete: {str(result['complete']).lower()}  "
          f"({time.perf_counter() - start:.0f} s)")
    means = [s["test_accuracy"]["mean"] for s in result["methods"].values()]
    return 0 if all(math.isfinite(m) for m in means) else 1


def _enable_compilation_cache(path: Path) -> None:
    """JAX's persistent compilation cache: later runs (seeds) reuse compiled steps."""
    import jax

    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


if __name__ == "__main__":
    from lepton_mm.training import tune_glibc_malloc

    tune_glibc_malloc()  # reuse freed step buffers (faster steps); docs/performance.md
    sys.exit(main())
