"""Synthetic tri-modal smoke experiment: train image + text + audio classifiers end to end.

Images, token sequences and log-mel spectrograms are generated from the seed with a
learnable class signal in each modality (a class template in the image, a class token in
the text, a class-specific frequency band in the audio), noise, variable lengths and
randomly missing modalities. Each fusion layer from the registry is trained with the
real encoders (``ImageCNN``, ``TextTransformer``, ``AudioSpectrogramCNN``) by
``lepton_mm.training.fit``; results go to ``WORKDIR/results.json`` (per fusion in
``WORKDIR/<fusion>/`` with ``--fusion all``). Re-running a command resumes it.

    python experiments/smoke.py --quick --fusion concat --workdir runs/smoke
    python experiments/smoke.py --quick --fusion all --workdir runs/smoke_all
    python experiments/smoke.py --quick --compare-steps     # nnx.jit vs jax.jit timing
    # multi-host (one command per process):
    python experiments/smoke.py --quick --distributed --coordinator-address host0:1234 \
        --num-processes 2 --process-id 0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

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
      quick: smaller transformers in the fusion layers.
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
    """The ``--quick`` settings: a few seconds of training per fusion on 2 CPU cores."""
    base = dict(epochs=3, num_train=256, num_eval=128, dim=16, batch_size=32,
                early_stopping_patience=None, quick=True)
    return SmokeConfig(**{**base, **overrides})


# ------------------------------------------------------------------------------- data


def make_data(config: SmokeConfig, split: str) -> dict[str, Any]:
    """A synthetic split (``"train"`` or ``"eval"``) in the batch format, from the seed."""
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


# ------------------------------------------------------------------------------ model


def build_model(config: SmokeConfig, fusion: str, modalities: tuple[str, ...],
                rngs: Any) -> Any:
    """Encoders for ``modalities`` + the ``fusion`` layer + a linear head."""
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
    """The configured modalities, cut to what the fusion layer supports."""
    from lepton_mm.fusion import FUSIONS

    if fusion == "pooled":
        return config.modalities[:1]
    cls = FUSIONS[fusion]
    limit = cls.max_modalities or len(config.modalities)
    return config.modalities[:limit]


def check_config(config: SmokeConfig) -> list[str]:
    """Validates names before any computation; returns the fusions to run."""
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


# -------------------------------------------------------------------------------- run


def run_one(config: SmokeConfig, fusion: str, workdir: Path) -> dict[str, Any]:
    """Trains one fusion in ``workdir``; writes and returns its results."""
    import jax

    from lepton_mm.models import Classification
    from lepton_mm.training import OptimizerConfig, fit, seed_rngs

    modalities = fusion_modalities(config, fusion)
    start = time.perf_counter()
    model = build_model(config, fusion, modalities, seed_rngs(config.seed))
    result = fit(
        model, Classification(config.num_classes), make_data(config, "train"),
        eval_data=make_data(config, "eval"),
        optimizer=OptimizerConfig(name="adamw", learning_rate=config.learning_rate,
                                  weight_decay=1e-4, clip_norm=1.0),
        epochs=config.epochs, batch_size=config.batch_size, seed=config.seed,
        workdir=workdir, early_stopping_patience=config.early_stopping_patience,
        monitor="accuracy", mode="max", modality_dropout=config.modality_dropout,
        checkpoint_every=config.checkpoint_every, mesh=config.mesh,
        config={**dataclasses.asdict(config), "fusion": fusion})
    results = {
        "fusion": fusion,
        "modalities": list(modalities),
        "config": dataclasses.asdict(config),
        "metrics": result.best_metrics,
        "best_step": result.best_step,
        "steps": result.step,
        "stopped_early": result.stopped_early,
        "resumed_from": result.resumed_from,
        "history": list(result.history),
        "wall_time_s": time.perf_counter() - start,
        "num_params": result.num_params,
        "params_path": result.final_params_path,
    }
    if jax.process_index() == 0:
        (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def run(config: SmokeConfig) -> dict[str, Any]:
    """Runs the configured fusion (or all of them); returns the results dict."""
    import jax

    fusions = check_config(config)
    workdir = Path(config.workdir)
    if config.fusion != "all":
        return run_one(config, fusions[0], workdir)
    per_fusion = {f: run_one(config, f, workdir / f) for f in fusions}
    summary = {
        "config": dataclasses.asdict(config),
        "metrics": {f: r["metrics"] for f, r in per_fusion.items()},
        "wall_time_s": {f: r["wall_time_s"] for f, r in per_fusion.items()},
        "num_params": {f: r["num_params"] for f, r in per_fusion.items()},
    }
    if jax.process_index() == 0:
        (workdir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def compare_step_impls(config: SmokeConfig, *, steps: int = 30) -> dict[str, Any]:
    """Times the train step as ``nnx.jit`` (+ ``nnx.Optimizer``; graph and tree mode) vs
    ``jax.jit`` over the ``nnx.split`` state (what ``fit`` uses), on the same model,
    batch and optimiser.

    Returns:
      ``{"nnx_jit": {...}, "nnx_jit_tree_mode": {...}, "jax_jit": {...},
      "max_param_diff": float}`` with first-call (compile) and median per-step seconds;
      ``max_param_diff`` compares the nnx.jit and jax.jit parameters after all steps.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from lepton_mm.models import Classification
    from lepton_mm.training import (
        OptimizerConfig,
        TrainState,
        make_optimizer,
        make_train_step,
        seed_rngs,
    )

    fusion = check_config(config)[0] if config.fusion != "all" else "concat"
    modalities = fusion_modalities(config, fusion)
    task = Classification(config.num_classes)
    tx = make_optimizer(OptimizerConfig(name="adamw", learning_rate=config.learning_rate))
    data = make_data(config, "train")
    batch = jax.tree.map(lambda a: jnp.asarray(a[: config.batch_size]), data)
    batch["valid"] = jnp.ones((config.batch_size,), bool)

    def build():
        return build_model(dataclasses.replace(config, modality_dropout=0.0), fusion,
                           modalities, seed_rngs(config.seed))

    def nnx_step(model, optimizer, batch):
        def loss_fn(model):
            return task.loss(model(batch), batch, batch["valid"])

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    def timed(fn) -> dict[str, float]:
        start = time.perf_counter()
        jax.block_until_ready(fn())
        compile_s = time.perf_counter() - start
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times.append(time.perf_counter() - start)
        return {"first_call_s": compile_s, "median_step_s": float(np.median(times))}

    model_a = build()
    optimizer = nnx.Optimizer(model_a, tx, wrt=nnx.Param)
    graph_step = nnx.jit(nnx_step)
    nnx_result = timed(lambda: graph_step(model_a, optimizer, batch))
    model_t = build()
    optimizer_t = nnx.Optimizer(model_t, tx, wrt=nnx.Param, graph=False)
    tree_step = nnx.jit(nnx_step, graph=False)
    try:
        tree_result = timed(lambda: tree_step(model_t, optimizer_t, batch))
    except Exception as e:  # tree mode rejects some modules (shared variables, ...)
        tree_result = {"error": f"{type(e).__name__}: {e}"[:300]}

    model_b = build()
    graphdef, params, rest = nnx.split(model_b, nnx.Param, ...)
    params, rest = nnx.as_pure(params), nnx.as_pure(rest)
    holder = [TrainState(params, rest, tx.init(params))]
    step_fn = make_train_step(graphdef, tx, task, seed=config.seed)

    def jax_call():
        holder[0], stats = step_fn(holder[0], batch, jnp.int32(0))
        return stats["loss"]

    jax_result = timed(jax_call)
    a = nnx.as_pure(nnx.state(model_a, nnx.Param))
    diffs = jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y))), a, holder[0].params)
    return {"fusion": fusion, "steps": steps, "batch_size": config.batch_size,
            "device": str(jax.devices()[0]), "nnx_jit": nnx_result,
            "nnx_jit_tree_mode": tree_result, "jax_jit": jax_result,
            "max_param_diff": max(jax.tree.leaves(diffs))}


# ------------------------------------------------------------------------------- main


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = f"int >= {minimum}"
    return parse


def parse_args(argv: list[str] | None = None) -> tuple[SmokeConfig, argparse.Namespace]:
    """Command line → (``SmokeConfig``, the raw namespace).

    Malformed flags exit through ``argparse`` (status 2, usage on stderr); settings that
    parse but are invalid raise ``ConfigError``.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fusion", default="concat",
                        help="registry name, 'pooled' (one modality) or 'all'")
    parser.add_argument("--modalities", default="audio,image,text")
    parser.add_argument("--quick", action="store_true", help="small and fast")
    positive = _int_at_least(1)
    parser.add_argument("--seed", type=_int_at_least(0), default=0)
    parser.add_argument("--workdir", default="runs/smoke")
    parser.add_argument("--epochs", type=positive, default=None)
    parser.add_argument("--batch-size", type=positive, default=None)
    parser.add_argument("--num-train", type=positive, default=None)
    parser.add_argument("--num-eval", type=positive, default=None)
    parser.add_argument("--checkpoint-every", type=positive, default=None)
    parser.add_argument("--mesh", choices=("none", "auto"), default="none")
    parser.add_argument("--compare-steps", action="store_true",
                        help="time nnx.jit vs jax.jit train steps and exit")
    parser.add_argument("--distributed", action="store_true",
                        help="jax.distributed.initialize (multi-host); implies --mesh auto")
    parser.add_argument("--coordinator-address", default=None)
    parser.add_argument("--num-processes", type=positive, default=None)
    parser.add_argument("--process-id", type=_int_at_least(0), default=None)
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {
        "fusion": args.fusion, "seed": args.seed, "workdir": args.workdir,
        "modalities": tuple(m for m in args.modalities.split(",") if m),
        "mesh": "auto" if args.distributed or args.mesh == "auto" else None,
    }
    for name in ("epochs", "batch_size", "num_train", "num_eval", "checkpoint_every"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    config = quick_config(**overrides) if args.quick else SmokeConfig(**overrides)
    return config, args


def main(argv: list[str] | None = None) -> int:
    config, args = parse_args(argv)
    if args.distributed:
        from lepton_mm.training import initialize_distributed

        initialize_distributed(args.coordinator_address, args.num_processes,
                               args.process_id)
    check_config(config)
    if args.compare_steps:
        print(json.dumps(compare_step_impls(config), indent=2))
        return 0
    results = run(config)
    metrics = results["metrics"]
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConfigError as error:  # a bad setting: say so, without a traceback
        sys.exit(f"{Path(sys.argv[0]).name}: error: {error}")
