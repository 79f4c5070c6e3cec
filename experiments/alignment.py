"""Cross-modal alignment on AV-MNIST: image ↔ audio retrieval and an audio classifier
over text-prompt embeddings.

Three parts on ``lepton_mm.data.load_avmnist`` (PCA-degraded MNIST digits paired with
noisy spoken digits; ``docs/avmnist.md``):

* ``clip_loss`` / ``sigmoid_loss``: a ``TwoTower`` (MultiBench's image and audio LeNets,
  each followed by a linear ``ProjectionHead`` into a shared ``embed_dim`` space) trained
  on the training pairs, no label used, with CLIP's softmax or SigLIP's sigmoid loss.
  Reported: *class-level* recall@k on the test split in both directions — a query is a
  hit if one of its ``k`` nearest items in the other modality (all test items are the
  gallery) shows the same digit (``lepton_mm.alignment.paired_class_recall``).
* ``prompt_classifier``: a ``lepton_mm.models.PromptMatcher`` — the audio LeNet and a
  ``ProjectionHead`` into MiniLM's 384-d space, trained *with the labels* (softmax
  cross-entropy, learned temperature) so that a clip's embedding is nearest the *frozen*
  all-MiniLM-L6-v2 embedding of a prompt naming its digit, the template drawn per
  example from ``TRAIN_TEMPLATES``. At test time the digit is read off the cosine with
  ten prompts alone (``zero_shot_classify``): "the spoken digit seven" (a training
  template), two templates never seen in training, and the training templates'
  ensemble. Zero-shot with respect to the prompt wording, not to the classes.

Every part also reports its untrained baseline (the same model at initialisation,
evaluated the same way) and chance (a random ranking of the gallery; 1/10 for the prompt
classifier). Training is ``lepton_mm.training.fit`` (Adam); the epoch with the best
validation loss (retrieval) or validation accuracy with "the spoken digit …" (prompt
classifier) is kept and the test split scored once, there. ``metrics["test_accuracy"]``
is the class-level R@1 averaged over both directions (retrieval: the accuracy of
labelling a query by its nearest item of the other modality) or the accuracy with "the
spoken digit {}"; ``val_accuracy`` the same on the validation split.

The config, the models and the prompt metrics are ``lepton_mm.recipes.alignment``'s; the
data are the AV-MNIST classifier's (``lepton_mm.recipes.avmnist.make_data``). Each (part,
seed) run is a record in ``results/alignment/<part>/seed<k>.json`` (``lepton_mm.harness``;
checkpoints in ``WORKDIR/<part>/``): a command trains only the runs without a current
record; ``--report --out DIR`` trains nothing.

    python experiments/alignment.py --quick              # ~3-5 min on 2 CPU cores
    python experiments/alignment.py --seeds 0
    python experiments/alignment.py --report --out runs/alignment_report
    python experiments/alignment.py --parts prompt_classifier --epochs 1 --num-train 10000
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from lepton_mm import cli, harness
from lepton_mm.experiment import RunKey
from lepton_mm.recipes.alignment import (
    ENSEMBLE,
    LOSSES,
    PARTS,
    AlignmentConfig,
    build_prompt_classifier,
    build_two_tower,
    prompt_metrics,
    prompt_table,
    quick_config,
    resolve_parts,
)
from lepton_mm.recipes.avmnist import NUM_CLASSES, make_data

# Per part, the settings of the other parts (not in its config, hence not in its hash).
_PART_ONLY = {"prompt_classifier": ("train_templates", "heldout_templates"),
              "retrieval": ("embed_dim", "image_channels")}


def _mean_r1(metrics: dict[str, dict[str, float]]) -> float:
    return (metrics["image_to_audio"]["recall@1"] + metrics["audio_to_image"]["recall@1"]) / 2


class Alignment(harness.Experiment):
    """The alignment tables: one run per (part, seed) of an ``AlignmentConfig``."""

    name, script, method_flag = "alignment", "experiments/alignment.py", "--parts"
    config_class, quick_config = AlignmentConfig, staticmethod(quick_config)
    methods_field = "parts"
    not_recorded = ("parts", "seeds", "workdir", "results", "progress", "checkpoint_every",
                    "quick")
    flags = cli.config_flags(AlignmentConfig, (
        "data_seed", "snr_db", "epochs", "batch_size", "learning_rate", "num_train",
        "num_val", "num_test", "embed_dim", "image_channels", "audio_channels"))

    def methods(self) -> list[str]:
        return resolve_parts(self.config)

    def run_config(self, method: str) -> dict[str, Any]:
        """The config's fields less ``not_recorded`` and the other parts' settings
        (``_PART_ONLY``), plus ``"part"``."""
        other = _PART_ONLY["retrieval" if method == "prompt_classifier"
                           else "prompt_classifier"]
        out = {k: v for k, v in super().run_config(method).items()
               if k not in other and k != "method"}
        return {**out, "part": method}

    def prepare(self, todo: list[RunKey]) -> dict[str, Any]:
        data = make_data(self.config)
        if any(k.method == "prompt_classifier" for k in todo):
            data["table"] = prompt_table(self.config)
        return data

    def train(self, key: RunKey, data: dict[str, Any], workdir: Path) -> dict[str, Any]:
        """Trains (or resumes) one run between the test split's untrained and trained
        evaluations. The prompt classifier scores each training clip against a template
        drawn once per seed, and validates with the first (the issue's prompt)."""
        from lepton_mm.alignment import chance_paired_class_recall as chance
        from lepton_mm.alignment import embed_in_batches, paired_class_recall
        from lepton_mm.experiment import config_hash
        from lepton_mm.models import Classification, Contrastive
        from lepton_mm.training import OptimizerConfig, fit, seed_rngs

        config, (train, val, test) = self.config, (data[s] for s in ("train", "val", "test"))
        rngs, n_mels, bs = seed_rngs(key.seed), test["audio"][0].shape[-1], config.eval_batch_size
        prompts = key.method == "prompt_classifier"
        if prompts:
            drawn = np.random.default_rng(key.seed).integers(
                0, len(config.train_templates), len(train["label"])).astype(np.int32)
            train = {"audio": train["audio"], "label": train["label"], "template": drawn}
            val = {"audio": val["audio"], "label": val["label"],
                   "template": np.zeros(len(val["label"]), np.int32)}
            model = build_prompt_classifier(config, data["table"], n_mels, rngs)
            task, monitor = Classification(NUM_CLASSES), "accuracy"

            def evaluate(model, split=test):
                embeddings = embed_in_batches(model, "embed", split["audio"], bs)
                return prompt_metrics(embeddings, split["label"], data["table"], config)
        else:
            model = build_two_tower(config, key.method, n_mels, rngs)
            task, monitor = Contrastive(kind=LOSSES[key.method][0], ks=config.ks), "loss"

            def evaluate(model, split=test):
                return paired_class_recall(
                    {"image": embed_in_batches(model, "embed_a", split["image"], bs),
                     "audio": embed_in_batches(model, "embed_b", split["audio"], bs)},
                    split["label"], config.ks)

        untrained = evaluate(model)
        start = time.perf_counter()
        fitted = fit(
            model, task, train, eval_data=val, workdir=workdir,
            optimizer=OptimizerConfig(learning_rate=config.learning_rate),
            epochs=config.epochs, batch_size=config.batch_size, eval_batch_size=bs,
            seed=key.seed, monitor=monitor, mode="max" if prompts else "min",
            checkpoint_every=config.checkpoint_every, progress=config.progress,
            tensorboard=False, config={"hash": config_hash(self.run_config(key.method))})
        facts = harness.fit_facts(fitted, time.perf_counter() - start,
                                  eval_metrics=(monitor,))
        metrics = {"trained": evaluate(model), "untrained": untrained,
                   "test_size": len(test["label"]),
                   **{k: facts[k] for k in ("best_epoch", "epochs", "history")}}
        if prompts:
            counts = np.bincount(test["label"], minlength=NUM_CLASSES)
            metrics.update(test_accuracy=metrics["trained"][config.train_templates[0]],
                           val_accuracy=fitted.best_metrics["accuracy"],
                           learned_scale=float(model.scale()[0]),
                           chance={"uniform": 1 / NUM_CLASSES,
                                   "majority class": float(counts.max() / counts.sum())},
                           heldout_templates=list(config.heldout_templates))
        else:
            metrics.update(test_accuracy=_mean_r1(metrics["trained"]),
                           val_accuracy=_mean_r1(evaluate(model, data["val"])),
                           val_loss=fitted.best_metrics["loss"],
                           chance=chance(("image", "audio"), test["label"], config.ks))
        return {"metrics": metrics, "params": fitted.num_params,
                "seconds_per_epoch": facts["seconds_per_epoch"],
                "extra": {"resumed_from": fitted.resumed_from}}

    def summarize(self, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
        """Per part, from its records: trained and untrained metrics (mean, std over
        seeds, per seed), chance, the validation accuracy and the training record
        (epochs, best epoch, seconds per epoch, parameters)."""
        def nested_stats(rs, field):  # seed_stats of every leaf of metrics[field]
            def walk(getter, template):
                if isinstance(template, dict):
                    return {k: walk(lambda r, k=k: getter(r)[k], v)
                            for k, v in template.items()}
                return harness.seed_stats_of(rs, getter)
            return walk(lambda r: r["metrics"][field], rs[0]["metrics"][field])

        summary: dict[str, Any] = {}
        for part, rs in runs.items():
            metrics = rs[0]["metrics"]
            summary[part] = {
                "trained": nested_stats(rs, "trained"),
                "untrained": nested_stats(rs, "untrained"),
                "val_accuracy": harness.seed_stats_of(rs, lambda r: r["metrics"]["val_accuracy"]),
                "chance": metrics["chance"], "test_size": metrics["test_size"],
                "epochs": metrics["epochs"], **harness.run_costs(rs)}
            if part == "prompt_classifier":  # records store keys sorted: restore columns
                config = rs[0]["config"]
                order = [*config["train_templates"], *config["heldout_templates"], ENSEMBLE]
                for name in ("trained", "untrained"):
                    summary[part][name] = {t: summary[part][name][t] for t in order}
                summary[part]["heldout_templates"] = metrics["heldout_templates"]
        return summary

    def tables(self, summary: dict[str, Any]) -> str:
        """The summary as markdown tables (recall and accuracy in %)."""
        lines: list[str] = []
        retrieval = [p for p in LOSSES if p in summary]
        if retrieval:
            lines += _retrieval_table(summary, retrieval)
        if "prompt_classifier" in summary:
            lines += _prompt_table(summary["prompt_classifier"])
        return "\n".join(lines) + "\n"


def _pct(s: dict[str, Any] | float) -> str:
    from lepton_mm.experiment import format_mean_std

    return format_mean_std(s) if isinstance(s, dict) else f"{100 * s:.1f}"


def _retrieval_table(summary: dict[str, Any], parts: list[str]) -> list[str]:
    ks = sorted((m.split("@")[1] for m in summary[parts[0]]["chance"]["image_to_audio"]),
                key=int)
    n = summary[parts[0]]["test_size"]
    directions = ("image_to_audio", "audio_to_image")
    header = " | ".join(f"{d} R@{k}" for d in ("image→audio", "audio→image") for k in ks)
    lines = [f"**Image ↔ audio, class-level recall@k (%)**, test split: {n:,} queries "
             f"against a gallery of all {n:,} items of the other modality.", "",
             f"| model | {header} | epochs (best) | s / epoch | parameters |",
             "|---|" + "---|" * (2 * len(ks) + 3)]

    def row(name, metrics, extra="— | — | —"):
        cells = " | ".join(_pct(metrics[d][f"recall@{k}"]) for d in directions for k in ks)
        lines.append(f"| {name} | {cells} | {extra} |")

    row("chance (random ranking)", summary[parts[0]]["chance"])
    untrained = [summary[p]["untrained"] for p in parts]
    # The towers of both losses start from the same seed; only the scale/bias differ,
    # which do not enter the embeddings: one row then.
    shared = all(u == untrained[0] for u in untrained)
    if shared:
        row("untrained (same initial towers for every loss)", untrained[0])
    for part in parts:
        s = summary[part]
        if not shared:
            row(f"untrained ({part} init)", s["untrained"])
        best = ", ".join(str(b) for b in s["best_epoch"].values())
        epoch = "—" if s["epoch_time_s"] is None else f"{s['epoch_time_s']:.0f}"
        row(f"**{part}**", s["trained"], f"{s['epochs']} ({best}) | {epoch} | "
                                         f"{s['num_params']:,}")
    return [*lines, ""]


def _prompt_table(s: dict[str, Any]) -> list[str]:
    prompts = list(s["trained"])
    heads = [f'"{p}"' if p.count("{}") else p for p in prompts]
    heads = [h + (" *(held out)*" if p in s.get("heldout_templates", ()) else "")
             for h, p in zip(heads, prompts, strict=True)]
    lines = [f"**Audio → digit through text-prompt embeddings (prompt classifier), "
             f"accuracy (%)**, test split ({s['test_size']:,} clips): the digit whose "
             "MiniLM prompt embedding is nearest; the audio tower was trained with the "
             "training split's labels against the training templates; column = the prompt "
             "template (*held out*: never seen in training).", "",
             "| model | " + " | ".join(heads) + " |", "|---|" + "---|" * len(prompts)]
    uniform, majority = s["chance"]["uniform"], s["chance"]["majority class"]
    lines.append(f"| chance (uniform; majority class {_pct(majority)}) | "
                 + " | ".join(_pct(uniform) for _ in prompts) + " |")
    for name in ("untrained", "trained"):
        lines.append(f"| {name} | " + " | ".join(_pct(s[name][p]) for p in prompts) + " |")
    epoch = "—" if s["epoch_time_s"] is None else f"{s['epoch_time_s']:.0f}"
    best = ", ".join(str(b) for b in s["best_epoch"].values())
    return [*lines, "", f"Trained for {s['epochs']} epoch(s) (best by validation accuracy: "
                        f"{best}), {epoch} s / epoch, {s['num_params']:,} parameters."]


def parse_args(argv: list[str] | None = None) -> tuple[AlignmentConfig, argparse.Namespace]:
    """Command line → ``(AlignmentConfig, the parsed arguments)``."""
    parser = cli.make_parser(
        Alignment, doc=__doc__, quick="subset, 1 seed, 1 epoch",
        methods=f"'all' or comma-separated: {', '.join(PARTS)} (default: all)")
    args = parser.parse_args(argv)
    return cli.config_from_args(Alignment, parser, args), args


def main(argv: list[str] | None = None) -> int:
    config, args = parse_args(argv)
    return cli.run_main(Alignment(config), args)


if __name__ == "__main__":
    cli.run_script(main)
