"""AV-MNIST compression: int8 quantisation and pruning of the trained models.

Reads the checkpoints that ``experiments/avmnist.py`` trained (``WORKDIR/<method>/
seed<k>-<hash>/checkpoints``, the epoch with the best validation accuracy; read only,
nothing is written there) and, for each method and seed, measures on the test split:

* ``float32``: the trained model;
* ``int8``: ``lepton_mm.quantize.quantize`` (int8 weights per output channel);
* ``int8+act``: also int8 activations where qwix supports them (its matmuls);
* ``sparse<p>``: ``lepton_mm.prune.prune_magnitude`` at ``p`` % (global, one shot, no
  fine-tuning), for each ``--sparsity`` level;
* ``channels<p>``: ``lepton_mm.prune.prune_channels`` at ``p`` % (both CNN encoders,
  one shot, no fine-tuning), for each ``--channel-sparsity`` level;

and, with ``--finetune-steps N``, the pruned variants fine-tuned by ``fit`` for ``N``
steps of the training recipe (SGD, batch 40) on the first training examples:
``sparse<p>+ft`` prunes gradually during those steps (``magnitude_pruning``: cubic
schedule over the first half, the mask then fixed), ``channels<p>+ft`` fine-tunes the
channel-pruned model. Each with its test accuracy, the size of its ``lepton_mm.export``
(``weights.safetensors``, and the same gzip-compressed, which is where unstructured
sparsity shows) and the CPU latency of the exported model on one batch (median over
``--rounds`` rounds in which the variants take turns, ``--calls`` calls each). Results
go to ``--out`` as JSON, and a markdown table to stdout.

    python experiments/avmnist_compress.py --fusion concat --seeds 0
    python experiments/avmnist_compress.py --fusion concat,gated --seeds 0,1,2 \\
        --num-test 2000 --out results/avmnist_compress.json
    python experiments/avmnist_compress.py --fusion concat --finetune-steps 300
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import avmnist  # experiments/avmnist.py: where its runs' checkpoints are (AVMNIST.workdir)
import numpy as np

from lepton_mm import cli
from lepton_mm.experiment import RunKey
from lepton_mm.recipes.avmnist import (
    NUM_CLASSES,
    AVMNISTConfig,
    build_model,
    make_data,
)

#: Global magnitude sparsity levels (fractions of the kernels) of the default sweep.
SPARSITY = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
#: Fractions of the CNN encoders' channels removed per block (all blocks but the last).
CHANNEL_SPARSITY = (0.25, 0.5, 0.75)


@dataclasses.dataclass(frozen=True)
class CompressConfig:
    """Which trained runs to compress, and how to measure the variants.

    Attributes:
      methods: methods of ``experiments/avmnist.py`` (the flag is ``--fusion``).
      seeds: their seeds.
      workdir: where ``experiments/avmnist.py`` trained (read only).
      num_test: score on the first N test examples (None: all 10 000).
      sparsity: global magnitude sparsity levels, fractions of the kernels (``sparse<p>``).
      channel_sparsity: fractions of the CNN encoders' channels removed (``channels<p>``).
      finetune_steps: also fine-tune each pruned model this many SGD steps (0: none).
      skip_int8: pruning variants only.
      batch: batch size of the latency measurement (the recipe's).
      rounds: latency: rounds in which the variants take turns.
      calls: latency: calls per turn.
      eval_batch_size: batch size of the accuracy evaluation.
      out: write the results here as JSON (None: the table on stdout only).
    """

    methods: tuple[str, ...] = ("concat",)
    seeds: tuple[int, ...] = (0,)
    workdir: str = "runs/avmnist"
    num_test: int | None = None
    sparsity: tuple[float, ...] = SPARSITY
    channel_sparsity: tuple[float, ...] = CHANNEL_SPARSITY
    finetune_steps: int = 0
    skip_int8: bool = False
    batch: int = 40
    rounds: int = 10
    calls: int = 5
    eval_batch_size: int = 500
    out: str | None = None

    def __post_init__(self) -> None:
        for name in ("batch", "rounds", "calls", "eval_batch_size", "num_test"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got "
                                 f"{getattr(self, name)}.")
        if self.finetune_steps < 0:
            raise ValueError(f"finetune_steps: expected an integer >= 0, got "
                             f"{self.finetune_steps}.")
        for name in ("sparsity", "channel_sparsity"):
            if not all(0.0 <= s < 1.0 for s in getattr(self, name)):
                raise ValueError(f"{name}: expected fractions in [0, 1), got "
                                 f"{list(getattr(self, name))}.")


def load_trained(config: Any, method: str, seed: int) -> Any:
    """The trained model of ``(method, seed)`` (best validation epoch), in eval mode.

    The run's checkpoint folder is named by its config hash and numerics. A variant run
    trained with non-default settings (``+adv`` with its radii, ``+mdrop`` at another
    rate, ...) has a hash that ``config``'s defaults do not give, so when the run has a
    ledger record (``<config.results>/avmnist/<method>/seed<k>.json``) its recorded hash
    and numerics name the folder; otherwise ``config`` does.
    """
    from flax import nnx

    from lepton_mm import experiment as ledger
    from lepton_mm.training import load_model

    key = RunKey("avmnist", method, seed)
    workdir = None
    record_path = Path(config.results) / "avmnist" / method / key.file_name()
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        tag = ledger.config_hash({"config": record["config_hash"],
                                  "numerics": record["numerics"]})[:8]
        workdir = (Path(config.workdir).absolute() / method
                   / f"{key.file_name()[:-len('.json')]}-{tag}")
    if workdir is None:
        workdir = avmnist.AVMNIST(config).workdir(key)
    if not (workdir / "checkpoints").is_dir():
        raise FileNotFoundError(f"{workdir}: no checkpoints; train it with "
                                f"python experiments/avmnist.py --fusion {method} "
                                f"--seeds {seed}")
    model = load_model(workdir, lambda: build_model(config, method, nnx.Rngs(0)))
    model.eval()
    return model


def finetune(model: Any, config: Any, train: dict[str, Any], *, steps: int, seed: int,
             sparsity: float | None = None) -> Any:
    """``model`` trained ``steps`` more steps with the recipe's SGD on ``train``'s first
    ``steps * batch_size`` examples (in a temporary workdir); with ``sparsity``, pruned
    gradually meanwhile (``magnitude_pruning`` over the first half of the steps)."""
    import optax
    from flax import nnx

    from lepton_mm.models import Classification
    from lepton_mm.prune import magnitude_pruning
    from lepton_mm.training import OptimizerConfig, fit, make_optimizer

    tx = make_optimizer(OptimizerConfig(name="sgd", learning_rate=config.learning_rate,
                                        momentum=config.momentum,
                                        weight_decay=config.weight_decay))
    name = "sgd"
    if sparsity is not None:
        tx = optax.chain(tx, magnitude_pruning(sparsity, end_step=steps // 2,
                                               frequency=max(1, steps // 20)))
        name = f"sgd-prune{sparsity}"
    n = steps * config.batch_size
    subset = {k: (tuple(x[:n] for x in v) if isinstance(v, tuple) else v[:n])
              for k, v in train.items()}
    model = nnx.clone(model)
    with tempfile.TemporaryDirectory() as tmp:
        fit(model, Classification(NUM_CLASSES), subset, workdir=tmp, optimizer=tx,
            optimizer_name=name, epochs=1, batch_size=config.batch_size, seed=seed,
            progress=False, tensorboard=False)
    return model


def variants(model: Any, batch: dict[str, Any], settings: CompressConfig, *,
             config: Any, train: dict[str, Any], seed: int) -> dict[str, Any]:
    """``{name: () -> compressed model}`` for every variant of the module docstring."""
    from lepton_mm.prune import prune_channels, prune_magnitude
    from lepton_mm.quantize import quantize

    steps = settings.finetune_steps
    tune = lambda m, **kw: finetune(m, config, train, steps=steps, seed=seed, **kw)
    out = {"float32": lambda: model}
    if not settings.skip_int8:
        out["int8"] = lambda: quantize(model, batch)
        out["int8+act"] = lambda: quantize(model, batch, activations=True)
    for s in settings.sparsity:
        out[f"sparse{round(100 * s)}"] = lambda s=s: prune_magnitude(model, s)
        if steps and s > 0:
            out[f"sparse{round(100 * s)}+ft"] = lambda s=s: tune(model, sparsity=s)
    for s in settings.channel_sparsity:
        out[f"channels{round(100 * s)}"] = lambda s=s: prune_channels(model, s)
        if steps:
            out[f"channels{round(100 * s)}+ft"] = lambda s=s: tune(prune_channels(model, s))
    return out


def latency_ms(exported: dict[str, Any], batch: dict[str, Any], *, rounds: int,
               calls: int) -> dict[str, float]:
    """Median wall time (ms) of one call of each exported model on ``batch``.

    The models take turns (``rounds`` rounds of ``calls`` calls each, after a warm-up),
    so a load that comes and goes on a shared machine affects them alike.
    """
    import jax

    times: dict[str, list[float]] = {name: [] for name in exported}
    for model in exported.values():
        jax.block_until_ready(model(batch))
    for _ in range(rounds):
        for name, model in exported.items():
            for _ in range(calls):
                start = time.perf_counter()
                jax.block_until_ready(model(batch))
                times[name].append(time.perf_counter() - start)
    return {name: 1000 * float(np.median(t)) for name, t in times.items()}


def measure(model: Any, test: dict[str, Any], batch: dict[str, Any], *,
            eval_batch_size: int) -> tuple[dict[str, Any], Any]:
    """Test accuracy and export sizes of one (compressed) model, and its export loaded."""
    from lepton_mm import export
    from lepton_mm.models import Classification
    from lepton_mm.prune import weight_sparsity
    from lepton_mm.training import evaluate

    accuracy = evaluate(model, Classification(NUM_CLASSES), test,
                        batch_size=eval_batch_size)["accuracy"]
    with tempfile.TemporaryDirectory() as tmp:
        path = export.save(model, (batch,), Path(tmp) / "model")
        weights = (path / export.WEIGHTS_FILE).read_bytes()
        module_bytes = (path / export.MODULE_FILE).stat().st_size
        loaded = export.load(path)  # holds its module and weights in memory
    return {"accuracy": float(accuracy), "weights_bytes": len(weights),
            "weights_gzip_bytes": len(gzip.compress(weights, compresslevel=6)),
            "module_bytes": module_bytes,
            "kernel_sparsity": weight_sparsity(model)}, loaded


def run(settings: CompressConfig) -> dict[str, Any]:
    """``{"<method>/seed<k>": {variant: measurements}}`` of every run with a checkpoint."""
    # The runs are found with the training config (its hash names their workdirs); the
    # data may be a prefix of the test split (the audio is standardised with the whole
    # training split's statistics either way, as in training).
    config = AVMNISTConfig(workdir=settings.workdir)
    data = make_data(dataclasses.replace(config, num_test=settings.num_test))
    test, size = data["test"], settings.batch
    batch = {k: (tuple(x[:size] for x in v) if isinstance(v, tuple) else v[:size])
             for k, v in test.items() if k != "label"}
    results: dict[str, Any] = {}
    for method in settings.methods:
        for seed in settings.seeds:
            try:
                model = load_trained(config, method, seed)
            except FileNotFoundError as e:
                print(f"skipped {method}/seed{seed}: {e}", file=sys.stderr)
                continue
            rows, exported = {}, {}
            for name, make in variants(model, batch, settings, config=config,
                                       train=data["train"], seed=seed).items():
                start = time.perf_counter()
                try:
                    rows[name], exported[name] = measure(
                        make(), test, batch, eval_batch_size=settings.eval_batch_size)
                except Exception as e:  # a variant qwix or pruning cannot make
                    rows[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
                rows[name]["seconds"] = round(time.perf_counter() - start, 1)
                print(f"{method}/seed{seed} {name}: {rows[name]}", file=sys.stderr,
                      flush=True)
            for name, ms in latency_ms(exported, batch, rounds=settings.rounds,
                                       calls=settings.calls).items():
                rows[name]["latency_ms"] = ms
            results[f"{method}/seed{seed}"] = rows
    return results


def table(results: dict[str, Any]) -> str:
    """Markdown: one row per run and variant, accuracy delta against float32."""
    lines = ["| run | variant | accuracy | delta (pp) | weights KB | gzip KB | "
             "latency ms/batch | kernel sparsity |", "|" + "---|" * 8]
    for run_name, rows in results.items():
        base = rows.get("float32", {}).get("accuracy")
        for name, r in rows.items():
            if "error" in r:
                lines.append(f"| {run_name} | {name} | {r['error']} |||||||")
                continue
            delta = "" if base is None else f"{100 * (r['accuracy'] - base):+.2f}"
            lines.append(
                f"| {run_name} | {name} | {100 * r['accuracy']:.2f} | {delta} | "
                f"{r['weights_bytes'] / 1024:.1f} | {r['weights_gzip_bytes'] / 1024:.1f} | "
                f"{r['latency_ms']:.2f} | {r['kernel_sparsity']:.2f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> CompressConfig:
    """Command line → ``CompressConfig`` (a bad flag or value: one line, exit status 2)."""
    return cli.parse_config(__doc__, CompressConfig, argv, names={"methods": "--fusion"})


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)

    import jax

    results = run(settings)
    report = {"command": shlex.join(["python", "experiments/avmnist_compress.py",
                                     *(argv if argv is not None else sys.argv[1:])]),
              "device": jax.devices()[0].device_kind, "jax": jax.__version__,
              "results": results}
    if settings.out:
        Path(settings.out).parent.mkdir(parents=True, exist_ok=True)
        Path(settings.out).write_text(json.dumps(report, indent=1) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
