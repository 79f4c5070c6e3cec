"""AV-MNIST: image-only and audio-only baselines and every fusion layer, LeNet encoders.

The benchmark is ``lepton_mm.data.load_avmnist`` (PCA-degraded MNIST digits paired with
noisy spoken digits; ``docs/avmnist.md``). Each method is trained with MultiBench's
AV-MNIST recipe (LeNet encoders, a 100-unit fused layer, SGD, batch 40) by
``lepton_mm.training.fit``, the epoch with the best validation accuracy is kept and
evaluated on the test split. Per (method, seed) the run lives in
``WORKDIR/<method>/seed_<seed>/`` (checkpoints, ``log.jsonl``, ``result.json``); the
summary goes to ``WORKDIR/results.json`` and ``WORKDIR/results.md``. Re-running a
command skips finished runs and resumes interrupted ones.

    python experiments/avmnist.py --quick --workdir runs/avmnist_quick     # ~5 min, CPU
    python experiments/avmnist.py --fusion all --seeds 0,1,2 --workdir runs/avmnist
    python experiments/avmnist.py --fusion image_only,concat --epochs 3 --seeds 0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

UNIMODAL = ("image_only", "audio_only")
#: ``--quick`` trains these (the fusion zoo's classic representatives).
QUICK_METHODS = ("image_only", "audio_only", "concat", "low_rank", "gated")
NUM_CLASSES = 10


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
      workdir: root of the runs and the summary.
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
      quick: set by ``quick_config``.
    """

    methods: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0, 1, 2)
    data_seed: int = 0
    snr_db: float = -15.0
    workdir: str = "runs/avmnist"
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
    quick: bool = False

    def __post_init__(self):
        object.__setattr__(self, "methods", tuple(self.methods))
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: expected distinct seeds, got {list(self.seeds)}.")


def quick_config(**overrides: Any) -> AVMNISTConfig:
    """``--quick``: a subset, one seed, five methods, one epoch (~5 min on 2 CPU cores)."""
    base = dict(methods=QUICK_METHODS, seeds=(0,), epochs=1, num_train=6000, num_val=1000,
                num_test=2000, checkpoint_every=None, quick=True)
    return AVMNISTConfig(**{**base, **overrides})


def resolve_methods(config: AVMNISTConfig) -> list[str]:
    """The methods to run, validated (before any computation)."""
    from lepton_mm.fusion import FUSIONS

    known = [*UNIMODAL, *sorted(FUSIONS)]
    if not config.methods or config.methods == ("all",):
        return known
    for m in config.methods:
        if m not in known:
            raise ValueError(f"Unrecognized method: {m!r}. Known: {known} (or 'all').")
    return list(dict.fromkeys(config.methods))


# ------------------------------------------------------------------------------- data


def make_data(config: AVMNISTConfig) -> dict[str, Any]:
    """``{"train", "val", "test"}`` → batch-format dicts of numpy arrays for ``fit``.

    The first ``num_*`` examples of each split, their features computed once
    (``AVMNISTSplit.materialize``: ~0.4 ms and 32 KiB per example, 2.5 GB for the full
    data) and shared by every run of the process. Computing them per batch instead
    (``split[indices]``) would cost ~8 s per full epoch, every epoch of every run.
    With ``normalize_audio`` the log-mels are standardised by the mean and standard
    deviation of the training split's valid frames.
    """
    from lepton_mm.data import load_avmnist

    avmnist = load_avmnist(data_seed=config.data_seed, snr_db=config.snr_db)
    out = {}
    for name, n in (("train", config.num_train), ("val", config.num_val),
                    ("test", config.num_test)):
        split = getattr(avmnist, name)
        if n is not None:
            if not 0 < n <= len(split):
                raise ValueError(f"num_{name}: expected 1..{len(split)}, got {n}.")
            split = split.subset(np.arange(n))
        out[name] = split.materialize()
    if config.normalize_audio:
        mean, std = audio_statistics(out["train"])
        for data in out.values():
            log_mel = data["audio"][0]
            log_mel -= mean
            log_mel /= std
    return out


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


# -------------------------------------------------------------------------------- run


def _reset_peak_memory() -> bool:
    """Resets the process's peak RSS (Linux ``clear_refs``); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes vs KiB


def _run_key(config: AVMNISTConfig) -> dict[str, Any]:
    """The settings a finished run's result depends on (not methods/seeds/workdir)."""
    skip = {"methods", "seeds", "workdir", "progress", "checkpoint_every"}
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in skip}


def run_one(config: AVMNISTConfig, method: str, seed: int, data: dict[str, Any] | None,
            workdir: Path) -> dict[str, Any]:
    """Trains (or resumes) one method with one seed; returns and writes its result."""
    from lepton_mm.models import Classification
    from lepton_mm.training import OptimizerConfig, evaluate, fit, seed_rngs

    done = finished_result(config, workdir)
    if done is not None:
        return done
    key = _run_key(config)
    # fit checks the optimiser, batch size and seed of a checkpoint it resumes, not the
    # data: refuse to continue a run made with other settings (more epochs are fine).
    key_path = workdir / "run_key.json"
    if key_path.exists():
        old = json.loads(key_path.read_text())
        changed = sorted(k for k in {*old, *key} if k != "epochs" and old.get(k) != key.get(k))
        if changed:
            raise ValueError(f"{workdir}: holds a run with different {changed} "
                             f"({[old.get(k) for k in changed]} there, "
                             f"{[key.get(k) for k in changed]} now); use a fresh --workdir.")
    workdir.mkdir(parents=True, exist_ok=True)
    key_path.write_text(json.dumps(key, indent=2) + "\n")
    task = Classification(NUM_CLASSES)
    eval_batch_size = config.eval_batch_size or config.batch_size
    memory_scoped = _reset_peak_memory()
    start = time.perf_counter()
    model = build_model(config, method, seed_rngs(seed))
    fitted = fit(
        model, task, data["train"], eval_data=data["val"], workdir=workdir,
        optimizer=OptimizerConfig(name="sgd", learning_rate=config.learning_rate,
                                  momentum=config.momentum,
                                  weight_decay=config.weight_decay),
        epochs=config.epochs, batch_size=config.batch_size,
        eval_batch_size=eval_batch_size, seed=seed, monitor="accuracy", mode="max",
        checkpoint_every=config.checkpoint_every, progress=config.progress,
        tensorboard=False, config={**key, "method": method})
    fit_time = time.perf_counter() - start
    test = evaluate(model, task, data["test"], batch_size=eval_batch_size)
    resumed = fitted.resumed_from or 0
    epochs_here = sum(1 for r in fitted.history if r["step"] > resumed)
    best_epoch = next(r["epoch"] for r in fitted.history if r["step"] == fitted.best_step)
    result = {
        "method": method, "seed": seed, "run_key": key,
        "test_accuracy": test["accuracy"], "test_f1": test["f1"],
        "val_accuracy": fitted.best_metrics["accuracy"], "best_epoch": best_epoch,
        "epochs": len(fitted.history), "num_params": fitted.num_params,
        # Wall time of fit (training, per-epoch validation and compilation) per epoch
        # trained by this call; None if this call only restored a finished run.
        "epoch_time_s": fit_time / epochs_here if epochs_here else None,
        "peak_rss_mb": _peak_rss_mb(),
        "peak_rss_scope": "run" if memory_scoped else "process",
        "history": list(fitted.history),
        "resumed_from": fitted.resumed_from,
    }
    (workdir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def finished_result(config: AVMNISTConfig, workdir: Path) -> dict[str, Any] | None:
    """The stored result of a run finished with these settings, else None."""
    path = workdir / "result.json"
    if not path.exists():
        return None
    done = json.loads(path.read_text())
    return done if done.get("run_key") == _run_key(config) else None


def summarize(results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per method: test/val accuracy mean, std (over seeds; None for one) and per seed."""

    def stats(values: dict[str, float]) -> dict[str, Any]:
        x = np.array(list(values.values()), float)
        return {"mean": float(x.mean()),
                "std": float(x.std(ddof=1)) if len(x) > 1 else None,
                "per_seed": values}

    def mean_of(runs, field):
        values = [r[field] for r in runs if r[field] is not None]
        return float(np.mean(values)) if values else None

    summary = {}
    for method, runs in results.items():
        summary[method] = {
            "test_accuracy": stats({str(r["seed"]): r["test_accuracy"] for r in runs}),
            "val_accuracy": stats({str(r["seed"]): r["val_accuracy"] for r in runs}),
            "num_params": runs[0]["num_params"],
            "epoch_time_s": mean_of(runs, "epoch_time_s"),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "best_epoch": {str(r["seed"]): r["best_epoch"] for r in runs},
        }
    return summary


def markdown_table(summary: dict[str, Any]) -> str:
    """The summary as a markdown table (accuracies in %)."""

    def pct(s: dict[str, Any]) -> str:
        std = "" if s["std"] is None else f" ± {100 * s['std']:.1f}"
        return f"{100 * s['mean']:.1f}{std}"

    lines = ["| method | test accuracy (%) | val accuracy (%) | seeds | parameters | "
             "s / epoch | peak RSS (MB) |",
             "|---|---|---|---|---|---|---|"]
    for method, s in summary.items():
        epoch = "—" if s["epoch_time_s"] is None else f"{s['epoch_time_s']:.1f}"
        lines.append(
            f"| {method} | {pct(s['test_accuracy'])} | {pct(s['val_accuracy'])} | "
            f"{len(s['test_accuracy']['per_seed'])} | {s['num_params']:,} | {epoch} | "
            f"{s['peak_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def run(config: AVMNISTConfig) -> dict[str, Any]:
    """Runs every (method, seed) not finished yet; writes and returns the summary."""
    methods = resolve_methods(config)
    root = Path(config.workdir)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(
        json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    todo = [(m, s) for m in methods for s in config.seeds
            if finished_result(config, root / m / f"seed_{s}") is None]
    data = make_data(config) if todo else None  # a finished table needs no data
    results: dict[str, list[dict[str, Any]]] = {}
    total, count = len(methods) * len(config.seeds), 0
    for method in methods:
        for seed in config.seeds:
            count += 1
            print(f"[{count}/{total}] {method} seed {seed}", flush=True)
            r = run_one(config, method, seed, data, root / method / f"seed_{seed}")
            results.setdefault(method, []).append(r)
            print(f"        test accuracy {100 * r['test_accuracy']:.2f} %  (val "
                  f"{100 * r['val_accuracy']:.2f} %, best epoch {r['best_epoch']})",
                  flush=True)
            summary = summarize(results)
            (root / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
            (root / "results.md").write_text(markdown_table(summary))
    return summary


# ------------------------------------------------------------------------------- main


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(s) for s in text.split(",") if s.strip())


def parse_args(argv: list[str] | None = None) -> AVMNISTConfig:
    """Command line → ``AVMNISTConfig``."""
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
    parser.add_argument("--quick", action="store_true", help="subset, 1 seed, 5 methods")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument("--num-train", type=int, default=None)
    parser.add_argument("--num-val", type=int, default=None)
    parser.add_argument("--num-test", type=int, default=None)
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    args = parser.parse_args(argv)
    if args.seed is not None and args.seeds is not None:
        parser.error("give --seed or --seeds, not both")
    overrides: dict[str, Any] = {"data_seed": args.data_seed, "snr_db": args.snr_db,
                                 "progress": args.progress}
    if args.fusion is not None:
        overrides["methods"] = tuple(m for m in args.fusion.split(",") if m)
    if args.seed is not None or args.seeds is not None:
        overrides["seeds"] = (args.seed,) if args.seed is not None else args.seeds
    overrides["workdir"] = args.workdir or ("runs/avmnist_quick" if args.quick
                                            else "runs/avmnist")
    for name in ("epochs", "batch_size", "learning_rate", "num_train", "num_val",
                 "num_test"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    return quick_config(**overrides) if args.quick else AVMNISTConfig(**overrides)


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    resolve_methods(config)
    start = time.perf_counter()
    summary = run(config)
    print()
    print(markdown_table(summary), end="")
    print(f"\n{Path(config.workdir) / 'results.json'}  ({time.perf_counter() - start:.0f} s)")
    return 0 if all(math.isfinite(s["test_accuracy"]["mean"]) for s in summary.values()) \
        else 1


if __name__ == "__main__":
    sys.exit(main())
