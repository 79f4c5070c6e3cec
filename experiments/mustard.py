"""MUStARD text: sarcasm detection with all-MiniLM-L6-v2 on the official folds.

The benchmark is ``lepton_mm.data.load_mustard`` (690 sitcom utterances, half of them
sarcastic, each with its dialogue context) in the paper's speaker-dependent setup: its
five official folds, scored by weighted F1 (Castro et al. 2019). Three text-only methods:

  frozen_head     the utterance's MiniLM sentence embedding (frozen) -> MLP head
  finetune        ``TextTransformer`` initialised from MiniLM and fine-tuned with the head
                  (text tower at a ~30x lower learning rate; embedding tables frozen),
                  utterances batched by length bucket (``lepton_mm.data.BucketedDataset``)
  context_fusion  utterance and dialogue context as two modalities (frozen MiniLM
                  embeddings; the context's sentences are its tokens) -> fusion layer
                  (``concat`` by default) -> the same head

``--text-encoder gru,lstm,bigru`` also trains ``finetune`` with its Transformer replaced
by a recurrent encoder (``RecurrentTextEncoder``; ``TEXT_ENCODERS``) over the same
MiniLM word-piece ids, as ``finetune+gru``, ``finetune+lstm``, ``finetune+bigru``
(``bilstm`` too): trained from scratch (MiniLM has no recurrent weights to load; the
embeddings are learnt too), with ``finetune``'s epochs, batches, schedule and head,
every parameter at the head's rate.

Protocol, fixed before any run: every hyperparameter is a ``MUStARDConfig`` default. In
each fold a stratified 15 % of the training part (the same for every seed) is held out;
``lepton_mm.training.fit`` trains on the rest and keeps the epoch with the **lowest
validation loss** (``monitor="loss"``). Weighted F1 would be the natural rule, but the
``Classification`` task reports accuracy and macro F1 only, and the rule is not chosen
after seeing scores. The test fold is scored once, at the kept checkpoint. The config,
inputs, models and per-fold training are ``lepton_mm.recipes.mustard``'s.

Each (method, seed) run covers the config's folds and is one ledger record
(``lepton_mm.harness``), ``results/mustard/<method>/seed<k>.json``: per fold under
``metrics["folds"]`` (test weighted F1, accuracy and predictions; validation scores; the
history), their means over folds as ``test_weighted_f1``, ``test_accuracy`` and
``val_accuracy``; ``majority/seed0`` is the majority-class baseline. ``--report``'s
summary: mean and sample std over folds of the seed-averaged fold scores.

    python experiments/mustard.py --quick    # ~100 s of CPU; records in WORKDIR/results
    python experiments/mustard.py --seeds 0,1,2                          # 5 folds, all
    python experiments/mustard.py --report --seeds 0,1,2 --out runs/mustard_report
    python experiments/mustard.py --methods finetune --text-encoder gru,lstm,bigru \
        --seeds 0,1,2

References:
  Castro et al., "Towards Multimodal Sarcasm Detection (An _Obviously_ Perfect Paper)",
  ACL 2019. https://arxiv.org/abs/1906.01815
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from lepton_mm import cli, harness
from lepton_mm.experiment import RunKey, format_mean_std
from lepton_mm.recipes.mustard import (
    METHODS,
    TEXT_EMBED_DIM,
    TEXT_ENCODERS,
    VOCAB_SIZE,
    MUStARDConfig,
    fold_split,
    majority_fold,
    make_inputs,
    method_inputs,
    quick_config,
    resolve_methods,
    split_method,
    train_fold,
)

#: Castro et al. 2019, speaker-dependent setup, weighted F1 (approximate, in %).
PAPER = {"text_only": 65.0, "text_audio_video": 72.0}
_LABELS = {
    "majority": "majority class (train part)",
    "frozen_head": "(a) frozen MiniLM embedding + MLP head",
    "finetune": "(b) MiniLM fine-tuned (TextTransformer)",
    "context_fusion": "(c) utterance + context, {fusion} fusion (frozen MiniLM)",
    **{f"finetune+{name}": f"(b') {name.replace('bi', 'bi-').upper()} from scratch "
                           "(MiniLM word pieces)" for name in TEXT_ENCODERS},
}


class MUStARD(harness.Experiment):
    """The MUStARD table: one run per (method, seed) over the config's folds, and the
    majority-class baseline ``majority/seed0`` (trains nothing)."""

    name, script = "mustard", "experiments/mustard.py"
    config_class, quick_config = MUStARDConfig, staticmethod(quick_config)
    #: config fields with a flag of their own (the others: ``--config FILE``).
    flags = cli.config_flags(MUStARDConfig, ("folds", "head_epochs", "finetune_epochs",
                                             "freeze_layers", "max_tokens", "context_fusion",
                                             "text_encoder"))
    # --text-encoder: part of a run's method key, written by method_args
    not_recorded = (*harness.Experiment.not_recorded, "text_encoder")
    method_fields = ("text_encoder",)

    def methods(self) -> list[str]:
        return resolve_methods(self.config)

    def keys(self) -> list[RunKey]:
        """``majority/seed0``, then every (method, seed)."""
        return [RunKey(self.name, "majority", 0),
                *(k for k in super().keys() if k.method != "majority")]

    def method_args(self, method: str) -> list[str]:
        base, encoder = split_method(method)
        return [f"--methods {base}", *([f"--text-encoder {encoder}"] if encoder else [])]

    def run_config(self, method: str) -> dict[str, Any]:
        """The settings ``method``'s result depends on: the majority baseline's split
        only; the fine-tuning or the frozen-feature settings; the fusion of
        ``context_fusion``; a ``finetune+<encoder>`` run's encoder (and not the
        settings of the pretrained tower it does not have: its rate, its freezing)."""
        out = super().run_config(method)
        if method == "majority":
            return {k: out[k] for k in ("folds", "val_fraction", "method")}
        base, encoder = split_method(method)
        drop = ({"head_epochs", "head_batch_size", "head_learning_rate"}
                if base == "finetune" else
                {k for k in out if k == "max_tokens" or k.startswith(
                    ("finetune_", "text_", "freeze_", "warmup_"))})
        if base != "context_fusion":
            drop.add("context_fusion")
        if encoder is not None:
            drop |= {"text_learning_rate", "freeze_embeddings", "freeze_layers"}
        out = {k: v for k, v in out.items() if k not in drop}
        if encoder is not None:
            out["text_encoder"] = {"name": encoder, **TEXT_ENCODERS[encoder],
                                   "num_layers": 1, "embed_dim": TEXT_EMBED_DIM,
                                   "vocab_size": VOCAB_SIZE, "init": "random",
                                   "pooled": "masked mean"}
        return out

    def prepare(self, todo: list[RunKey]) -> dict[str, Any]:
        return make_inputs(self.config, sorted({k.method for k in todo} - {"majority"}))

    def train(self, key: RunKey, inputs: dict[str, Any], workdir: Path) -> dict[str, Any]:
        """Trains ``key``'s method on every fold of the config (``majority``: predicts
        the training part's majority class, trains nothing)."""
        config, labels, method = self.config, inputs["label"], key.method
        folds, rates, trainable = {}, [], 0
        for f in config.folds:
            split = fold_split(labels, *inputs["folds"][f], f, config.val_fraction)
            if method == "majority":
                folds[str(f)] = majority_fold(labels, split)
                continue
            if split_method(method)[0] == "finetune" and \
                    config.finetune_max_train is not None:
                split["train"] = split["train"][:config.finetune_max_train]
            folds[str(f)], rate, trainable = train_fold(
                config, method, key.seed, split, method_inputs(inputs, method), labels,
                workdir / f"fold{f}")
            rates += [] if rate is None else [rate]
        metrics = {k: float(np.mean([v[k] for v in folds.values()]))
                   for k in ("test_weighted_f1", "test_accuracy", "val_accuracy")}
        return {"metrics": {**metrics, "folds": folds}, "params": trainable,
                "seconds_per_epoch": round(float(np.mean(rates)), 2) if rates else None}

    def describe(self, record: dict[str, Any]) -> str:
        m, rate = record["metrics"], record["seconds_per_epoch"]
        return (f"weighted F1 {100 * m['test_weighted_f1']:.1f} %  (accuracy "
                f"{100 * m['test_accuracy']:.1f} %" + ("" if rate is None else
                                                      f", {rate} s/epoch") + ")")

    def summarize(self, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
        """Per method: weighted F1 and accuracy as the mean and sample std (ddof=1) over
        folds of the seed-averaged fold scores, with ``per_fold`` and ``per_seed`` (the
        seed's mean over folds) values; the seeds, trainable parameters and s / epoch."""
        out = {}
        for method, rs in runs.items():
            entry: dict[str, Any] = {"seeds": [r["seed"] for r in rs], "params": rs[0]["params"],
                                     "seconds_per_epoch": rs[0]["seconds_per_epoch"]}
            for metric in ("weighted_f1", "accuracy"):
                folds = sorted(rs[0]["metrics"]["folds"], key=int)
                per_fold = {f: float(np.mean([r["metrics"]["folds"][f][f"test_{metric}"]
                                              for r in rs])) for f in folds}
                x = np.array(list(per_fold.values()))
                entry[metric] = {
                    "mean": float(x.mean()), "std": float(x.std(ddof=1)) if x.size > 1 else None,
                    "per_fold": per_fold,
                    "per_seed": {str(r["seed"]): r["metrics"][f"test_{metric}"] for r in rs}}
            out[method] = entry
        return out

    def tables(self, summary: dict[str, Any]) -> str:
        """The summary as a markdown table (%, mean ± std over folds), paper rows last."""
        lines = ["| method | weighted F1 (%) | accuracy (%) | seeds | trainable params | "
                 "s / epoch |", "|---|---|---|---|---|---|"]
        for method, s in summary.items():
            time_cell = "—" if s["seconds_per_epoch"] is None else f"{s['seconds_per_epoch']:g}"
            params = f"{s['params']:,}" if s["params"] else "—"
            lines.append(f"| {_LABELS[method].format(fusion=self.config.context_fusion)} | "
                         f"{format_mean_std(s['weighted_f1'])} | "
                         f"{format_mean_std(s['accuracy'])} | {len(s['seeds'])} | {params} | "
                         f"{time_cell} |")
        for name, value in (("text only (BERT + SVM)", PAPER["text_only"]),
                            ("text + audio + video", PAPER["text_audio_video"])):
            lines.append(f"| Castro et al. 2019, {name} | ≈{value:.0f} | — | 5 folds | — | — |")
        return "\n".join(lines) + "\n"

    def report_fields(self) -> dict[str, Any]:
        return {"folds": list(self.config.folds),
                "metric": "weighted F1 on each official test fold; mean and sample std over "
                          "folds of the seed-averaged fold scores; epoch by validation loss"}


def parse_args(argv: list[str] | None = None) -> tuple[MUStARDConfig, argparse.Namespace]:
    """Command line -> ``(MUStARDConfig, the parsed arguments)``."""
    parser = cli.make_parser(
        MUStARD, doc=__doc__, quick="2 folds, short training",
        methods=f"'all' or comma-separated: {', '.join(METHODS)} (or majority: the "
                "baseline alone)")
    args = parser.parse_args(argv)
    return cli.config_from_args(MUStARD, parser, args), args


def main(argv: list[str] | None = None) -> int:
    config, args = parse_args(argv)
    return cli.run_main(MUStARD(config), args)


if __name__ == "__main__":
    cli.run_script(main)
