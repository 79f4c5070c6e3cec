"""Synthetic tri-modal smoke experiment: train image + text + audio classifiers end to end.

Images, token sequences and log-mel spectrograms are generated from the seed with a
learnable class signal in each modality (a class template in the image, a class token in
the text, a class-specific frequency band in the audio), noise, variable lengths and
randomly missing modalities (``lepton_mm.recipes.smoke``: the config, the data, the
models). Each fusion layer from the registry is trained with the real encoders
(``ImageCNN``, ``TextTransformer``, ``AudioSpectrogramCNN``) by ``lepton_mm.training.fit``;
results go to ``WORKDIR/results.json`` (per fusion in ``WORKDIR/<fusion>/`` with
``--fusion all``). Re-running a command resumes it.

    python experiments/smoke.py --quick --fusion concat --workdir runs/smoke
    python experiments/smoke.py --quick --fusion all --workdir runs/smoke_all
    python experiments/smoke.py --quick --compare-steps     # nnx.jit vs jax.jit timing
    # multi-host (one command per process):
    python experiments/smoke.py --quick --distributed --coordinator-address host0:1234 \
        --num-processes 2 --process-id 0
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from lepton_mm import cli
from lepton_mm.recipes.smoke import (
    ConfigError,
    SmokeConfig,
    build_model,
    check_config,
    fusion_modalities,
    make_data,
    quick_config,
)

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


#: ``SmokeConfig``'s fields with a flag (``--mesh none`` or ``auto``).
FLAGS = cli.config_flags(SmokeConfig, ("fusion", "modalities", "quick", "seed", "workdir",
                                       "epochs", "batch_size", "num_train", "num_eval",
                                       "checkpoint_every", "mesh"))


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process runs (none of it enters a result).

    Attributes:
      compare_steps: time nnx.jit vs jax.jit train steps and exit.
      distributed: call ``jax.distributed.initialize`` (multi-host); implies
        ``--mesh auto``.
      coordinator_address: process 0's ``host:port`` (None: from the environment,
        ``lepton_mm.training.initialize_distributed``).
      num_processes: how many processes take part (None: from the environment).
      process_id: this process's index (None: from the environment).
    """

    compare_steps: bool = False
    distributed: bool = False
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    def __post_init__(self) -> None:
        for name, minimum in (("num_processes", 1), ("process_id", 0)):
            value = getattr(self, name)
            if value is not None and value < minimum:
                raise ConfigError(f"{name}: expected an int >= {minimum}, got {value!r}.")


def parse_args(argv: list[str] | None = None) -> tuple[SmokeConfig, Launch]:
    """Command line → ``(SmokeConfig, Launch)``.

    A malformed or unknown flag, or a setting either rejects, is one line on stderr and
    exit status 2 (``lepton_mm.cli``).
    """
    parser = cli.script_parser(__doc__)
    cli.add_flags(parser, SmokeConfig, FLAGS)
    launch_flags = cli.config_flags(Launch)
    cli.add_flags(parser, Launch, launch_flags)
    args = parser.parse_args(argv)
    launch = cli.make_config(parser, Launch, cli.flag_overrides(args, launch_flags))
    overrides = cli.flag_overrides(args, FLAGS)
    if launch.distributed:
        overrides["mesh"] = "auto"
    factory = quick_config if overrides.pop("quick", False) else SmokeConfig
    return cli.make_config(parser, factory, overrides), launch


def main(argv: list[str] | None = None) -> int:
    config, launch = parse_args(argv)
    if launch.distributed:
        from lepton_mm.training import initialize_distributed

        initialize_distributed(launch.coordinator_address, launch.num_processes,
                               launch.process_id)
    check_config(config)
    if launch.compare_steps:
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
