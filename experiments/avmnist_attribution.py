"""AV-MNIST modality attribution: each modality's exact Shapley share per fusion layer.

Reads the checkpoints that ``experiments/avmnist.py`` trained (``WORKDIR/<method>/
seed<k>-<hash>/checkpoints``, the epoch with the best validation accuracy; read only)
and, on the test split, computes ``lepton_mm.attribution.modality_shapley`` per example:
the players are the image and the audio, the value of a coalition is the logit of the
class the full model predicts with only that coalition present (the other modality
marked absent through ``batch["present"]``, which every fusion layer honours). Per run
it keeps:

* ``phi``: the mean Shapley value of each modality (logit units), and their sum
  ``full - base`` (completeness: checked per example, the largest violation recorded);
* ``share``: each modality's share of the mean, ``phi_m / (phi_image + phi_audio)``;
* ``abs_share``: the same from mean absolute values (a modality that pushes some
  examples up and others down is not cancelled out);
* ``decides``: the fraction of examples whose larger Shapley value is that modality's;
* ``share_by_class``: the image's ``share`` over the examples of each true digit
  (None for a digit without examples);
* ``accuracy``: the full model's test accuracy (a check that the right run was read).

The share measures how much of each prediction's margin over the "nothing present"
output each modality carries. It is what the training-strategies work calls imbalance,
measured inside the fused model rather than by retraining. Results go to ``--out`` as
JSON (one entry per run and the command), a markdown table (mean ± std over seeds) to
stdout, and with ``--figure`` a bar chart of the image share per fusion layer.

    python experiments/avmnist_attribution.py --seeds 0 --fusion concat,late --num-test 1000
    python experiments/avmnist_attribution.py --out results/avmnist_attribution.json \\
        --figure docs/figures/avmnist_modality_shares.png
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import avmnist_compress  # experiments/: where load_trained finds avmnist.py's runs
import numpy as np

from lepton_mm import cli
from lepton_mm.harness import group_by_method, markdown_table, mean_std_text
from lepton_mm.recipes.avmnist import AVMNISTConfig, make_data, split_method

#: The modalities of the AV-MNIST models, the players.
MODALITIES = ("image", "audio")


def _fusions() -> tuple[str, ...]:
    from lepton_mm.fusion import FUSIONS

    return tuple(sorted(FUSIONS))


@dataclasses.dataclass(frozen=True)
class AttributionConfig:
    """Which trained runs to explain, and on how much of the test split.

    Attributes:
      methods: fusion methods of ``experiments/avmnist.py``, with or without a training
        variant (``concat``, ``concat+ogm_ge``; the flag is ``--fusion``; empty: every
        plain fusion layer). A variant's checkpoints are found through its record.
      seeds: their seeds.
      workdir: where ``experiments/avmnist.py`` trained (read only).
      num_test: the first N test examples (None: all 10 000).
      batch_size: examples per compiled Shapley call (4 forward passes each).
      out: write the results here as JSON (None: the table on stdout only).
      figure: write the image-share bar chart here as PNG (None: no figure).
    """

    methods: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0, 1, 2)
    workdir: str = "runs/avmnist"
    num_test: int | None = None
    batch_size: int = 1000
    out: str | None = None
    figure: str | None = None

    def __post_init__(self) -> None:
        for name in ("batch_size", "num_test"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {value}.")
        unknown = [m for m in self.methods if split_method(m)[0] not in _fusions()]
        if unknown:
            raise ValueError(f"methods: {unknown} are not fusion layers; expected names "
                             f"from {list(_fusions())}, optionally with a training "
                             f"variant (e.g. concat+ogm_ge; the unimodal baselines have "
                             f"one modality, nothing to share).")


def explain(model: Any, test: dict[str, Any], *, batch_size: int) -> dict[str, Any]:
    """Per-run Shapley summary (the module docstring's keys) of ``model`` on ``test``."""
    import jax
    from flax import nnx

    from lepton_mm.attribution import modality_shapley

    graphdef, state = nnx.split(model)

    @jax.jit
    def shapley(state, batch):
        out = modality_shapley(nnx.merge(graphdef, state), batch,
                               modalities=list(MODALITIES))
        return out.values, out.base, out.full, out.target

    labels = np.asarray(test["label"])
    parts: dict[str, list[np.ndarray]] = {k: [] for k in (*MODALITIES, "base", "full",
                                                         "target")}
    for start in range(0, len(labels), batch_size):
        batch = {k: (tuple(x[start:start + batch_size] for x in v) if isinstance(v, tuple)
                     else v[start:start + batch_size])
                 for k, v in test.items() if k != "label"}
        values, base, full, target = jax.device_get(shapley(state, batch))
        for m in MODALITIES:
            parts[m].append(values[m])
        for k, v in (("base", base), ("full", full), ("target", target)):
            parts[k].append(v)
    phi = {m: np.concatenate(parts[m]).astype(np.float64) for m in MODALITIES}
    base, full = (np.concatenate(parts[k]).astype(np.float64) for k in ("base", "full"))
    target = np.concatenate(parts["target"])
    gap = np.abs(sum(phi.values()) - (full - base))

    def shares(values: dict[str, np.ndarray]) -> dict[str, float]:
        total = sum(float(v.mean()) for v in values.values())
        return {m: float(v.mean()) / total for m, v in values.items()}

    image_wins = phi["image"] > phi["audio"]
    return {
        "num_test": len(labels),
        "accuracy": float(np.mean(target == labels)),
        "phi": {m: float(v.mean()) for m, v in phi.items()},
        "full_minus_base": float(np.mean(full - base)),
        "completeness_max_error": float(gap.max()),
        "share": shares(phi),
        "abs_share": shares({m: np.abs(v) for m, v in phi.items()}),
        "decides": {"image": float(image_wins.mean()), "audio": float(1 - image_wins.mean())},
        "share_by_class": {str(c): (shares({m: v[labels == c] for m, v in phi.items()})
                                    ["image"] if np.any(labels == c) else None)
                           for c in range(10)},
    }


def run(settings: AttributionConfig) -> dict[str, Any]:
    """``{"<method>/seed<k>": summary}`` of every run with a checkpoint."""
    config = AVMNISTConfig(workdir=settings.workdir)
    test = make_data(dataclasses.replace(config, num_test=settings.num_test))["test"]
    results: dict[str, Any] = {}
    for method in settings.methods or _fusions():
        for seed in settings.seeds:
            try:
                model = avmnist_compress.load_trained(config, method, seed)
            except FileNotFoundError as e:
                print(f"skipped {method}/seed{seed}: {e}", file=sys.stderr)
                continue
            results[f"{method}/seed{seed}"] = summary = explain(
                model, test, batch_size=settings.batch_size)
            print(f"{method}/seed{seed}: image share {summary['share']['image']:.3f}, "
                  f"accuracy {summary['accuracy']:.4f}", file=sys.stderr, flush=True)
    return results


def table(results: dict[str, Any]) -> str:
    """Markdown: one row per method, mean ± sample std over its seeds."""
    rows = []
    for method, runs in group_by_method(results).items():
        get = lambda key, m="image", runs=runs: [r[key][m] for r in runs]
        logit = functools.partial(mean_std_text, scale=1.0, digits=2)
        rows.append([method, len(runs), mean_std_text(get("share")),
                     mean_std_text(get("abs_share")), mean_std_text(get("decides")),
                     logit(get("phi")), logit(get("phi", "audio")),
                     mean_std_text([r["accuracy"] for r in runs]),
                     f"{max(r['completeness_max_error'] for r in runs):.1e}"])
    return "\n".join(markdown_table(
        ["fusion", "seeds", "image share of phi (%)", "image share of abs phi (%)",
         "image decides (%)", "phi image (logit)", "phi audio (logit)", "test accuracy (%)",
         "completeness error (max)"], rows))


def plot(results: dict[str, Any], path: str | Path) -> Path:
    """Bar chart: the image's Shapley share per fusion layer, mean ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grouped = group_by_method(results)
    names = list(grouped)
    shares = [[100 * r["share"]["image"] for r in grouped[n]] for n in names]
    means = [float(np.mean(s)) for s in shares]
    stds = [float(np.std(s, ddof=1)) if len(s) > 1 else 0.0 for s in shares]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.bar(names, means, yerr=stds, capsize=3, color="tab:blue", label="image")
    ax.bar(names, [100 - m for m in means], bottom=means, color="tab:orange",
           alpha=0.6, label="audio")
    ax.axhline(50, color="grey", lw=0.8, ls="--")
    ax.set_ylabel("Shapley share of the predicted logit (%)")
    ax.set_ylim(0, 100)
    ax.set_title("AV-MNIST: which modality carries each fusion layer's prediction")
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parse_args(argv: list[str] | None = None) -> AttributionConfig:
    """Command line → ``AttributionConfig`` (a bad flag or value: one line, exit 2)."""
    return cli.parse_config(__doc__, AttributionConfig, argv, names={"methods": "--fusion"})


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)

    import jax

    results = run(settings)
    if not results:
        print("no trained run found; train them with python experiments/avmnist.py",
              file=sys.stderr)
        return 1
    if settings.out:
        report = {"command": shlex.join(["python", "experiments/avmnist_attribution.py",
                                         *(argv if argv is not None else sys.argv[1:])]),
                  "device": jax.devices()[0].device_kind, "jax": jax.__version__,
                  "results": results}
        Path(settings.out).parent.mkdir(parents=True, exist_ok=True)
        Path(settings.out).write_text(json.dumps(report, indent=1) + "\n")
    if settings.figure:
        plot(results, settings.figure)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
