"""AV-MNIST: image-only and audio-only baselines and every fusion layer, LeNet encoders.

The benchmark is ``lepton_mm.data.load_avmnist`` (PCA-degraded MNIST digits paired with
noisy spoken digits; ``docs/avmnist.md``). Each method is trained with MultiBench's
AV-MNIST recipe (LeNet encoders, a 100-unit fused layer, SGD, batch 40;
``lepton_mm.recipes.avmnist`` holds it: the config, data, model and robustness protocol,
which this script turns into ledger records and tables); the epoch with the best
validation accuracy is kept and scored once on the test split, also with the audio or
the image marked absent, under an audio SNR sweep and an image-noise sweep (MultiBench's
relative and effective robustness; ``docs/results.md``). ``--modality-dropout P`` also
trains every fusion method with modality dropout, as ``<method>+mdrop``; ``--balance
ogm_ge,gblend`` with a balanced-learning strategy (``lepton_mm.balance``), as
``<method>+ogm_ge``, ``<method>+gblend`` and ``<method>+mmpareto``. Noise-robust
training: ``--train-snr-db=-20,20`` also trains every audio-bearing method (audio_only
too) on training audio whose SNR is drawn per example and per epoch from that range, as
``<method>+snr_range``; ``--utterance-norm`` with each log-mel standardised by its own
frames, as ``<method>+utt_norm`` (both: also ``<method>+snr_range+utt_norm``). Their
validation and test data, and the SNR sweep, are the plain runs'. Adversarial
training: ``--adversarial-image-eps 0.03 --adversarial-audio-eps 0.01`` also trains
every method, as ``<method>+adv``, on L∞ PGD adversarial examples of each batch
(``--adversarial-steps``, default 3; a radius per modality, 0: not attacked; Madry et
al.: the adversarial batch only); it is tested, and swept, as the plain runs are.
Recurrent audio encoders: ``--audio-encoder gru,lstm,bigru`` also trains every
audio-bearing method (audio_only too) with the audio LeNet replaced by a GRU, an LSTM or
a bidirectional GRU of about the LeNet's parameter count (``AUDIO_ENCODERS``), as
``<method>+gru``, ``<method>+lstm``, ``<method>+bigru`` (``bilstm`` too); same recipe.
Mixed precision: ``--compute-dtype bfloat16`` also trains every method, as
``<method>+bf16``, with ``fit(compute_dtype=jnp.bfloat16)`` (bfloat16 forward and
backward, float32 master weights); its validation, test and sweeps run in float32 on
those weights, as ``fit`` returns them, so its accuracy compares with the plain run's.

Each finished run is a record in ``results/avmnist/<method>/seed<k>.json``
(``lepton_mm.harness``): the command trains only the runs without a current record and
resumes an interrupted one from its checkpoints in ``WORKDIR``; ``--report`` writes the
tables and sweep figures of the records without training.

    python experiments/avmnist.py --quick                 # smoke check, ~3 min, 2 cores
    python experiments/avmnist.py --fusion all --seeds 0,1,2
    python experiments/avmnist.py --fusion all --seeds 0,1,2 --report --out /tmp/avr
    python experiments/avmnist.py --fusion concat,gated --modality-dropout 0.3
    python experiments/avmnist.py --fusion concat,late --balance ogm_ge,gblend,mmpareto
    python experiments/avmnist.py --fusion audio_only,concat,late --train-snr-db=-20,20
    python experiments/avmnist.py --fusion image_only,audio_only,concat,gated \
        --adversarial-image-eps 0.03 --adversarial-audio-eps 0.01 --adversarial-steps 3
    python experiments/avmnist.py --fusion audio_only,concat --audio-encoder gru,lstm,bigru
    python experiments/avmnist.py --fusion image_only,audio_only,concat --compute-dtype bfloat16
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from lepton_mm import cli, harness
from lepton_mm.experiment import RunKey, format_mean_std
from lepton_mm.recipes.avmnist import (
    ADV_SUFFIX,
    AUDIO_ENCODERS,
    AUDIO_VARIANTS,
    BALANCE,
    BF16_SUFFIX,
    MDROP_SUFFIX,
    NUM_CLASSES,
    SWEEPS,
    AVMNISTConfig,
    adversarial_setting,
    adversarial_training,
    audio_setting,
    build_model,
    fit_recipe,
    gradient_blending_pilot,
    make_data,
    quick_config,
    resolve_methods,
    robustness_protocol,
    robustness_results,
    split_method,
    sweep_data,
    train_data,
    training_dtype,
    variant_tags,
)

#: Effective robustness is measured against this method: MultiBench's "LF" baseline,
#: late fusion by concatenating the encoders' features (MultiBench's ``Concat``).
REFERENCE_METHOD = "concat"
#: Rows of the PyTorch MultiBench-recipe peer (``benchmarks/peers/multibench_avmnist.py``)
#: shown beside ours when their records exist.
PEER_METHODS = ("peer_multibench_image", "peer_multibench_audio", "peer_multibench_concat")


@dataclasses.dataclass(frozen=True)
class Variant:
    """A training variant of a method, run as ``<method>+<name>``.

    Attributes:
      flags: the command-line flags that select it, from the config and the run's
        method key.
      recorded: what its runs' hashed config adds (so a changed setting is a new run),
        from the config and the run's method key.
    """

    flags: Callable[[AVMNISTConfig, str], str]
    recorded: Callable[[AVMNISTConfig, str], dict[str, Any]]


#: The variants by name (``<method>+<name>``, the audio ones also combined:
#: ``<method>+snr_range+utt_norm``): modality dropout, the ``--balance`` strategies, the
#: audio variants, adversarial training, the recurrent audio encoders and bfloat16
#: mixed precision (``training_dtype``).
#: ``AVMNIST.strategy`` builds a strategy's ``fit`` hook, ``audio_setting`` /
#: ``train_data`` an audio variant's data, ``build_model`` an encoder variant's model.
VARIANTS = {
    "mdrop": Variant(
        flags=lambda c, m: f"--modality-dropout {c.modality_dropout:g}",
        recorded=lambda c, m: {"modality_dropout": c.modality_dropout}),
    "ogm_ge": Variant(
        flags=lambda c, m: f"--balance ogm_ge --ogm-alpha {c.ogm_alpha:g}",
        recorded=lambda c, m: {"strategy": {"name": "ogm_ge", "alpha": c.ogm_alpha}}),
    "mmpareto": Variant(
        flags=lambda c, m: "--balance mmpareto",
        recorded=lambda c, m: {"strategy": {"name": "mmpareto", "gamma": 1.0}}),
    "pmr": Variant(  # untuned: alpha 1, no entropy term, prototypes averaged over ~10 steps
        flags=lambda c, m: "--balance pmr",
        recorded=lambda c, m: {"strategy": {"name": "pmr", "alpha": 1.0, "mu": 0.0,
                                            "momentum": 0.9}}),
    "gblend": Variant(
        flags=lambda c, m: (f"--balance gblend --gblend-pilot "
                            f"{','.join(map(str, c.gblend_pilot))} "
                            f"--gblend-train-examples {c.gblend_train_examples}"),
        recorded=lambda c, m: {"strategy": {"name": "gblend",
                                            "pilot_epochs": list(c.gblend_pilot),
                                            "pilot_train_examples":
                                                c.gblend_train_examples}}),
    "snr_range": Variant(
        flags=lambda c, m: f"--train-snr-db={harness.flag_text(c.train_snr_db)}",
        recorded=lambda c, m: {"train_snr_db": list(c.train_snr_db)}),
    "utt_norm": Variant(
        flags=lambda c, m: "--utterance-norm",
        recorded=lambda c, m: {"normalize_audio": "utterance"}),
    "adv": Variant(  # only the radii of the modalities the run attacks
        flags=lambda c, m: " ".join(
            [*(f"--adversarial-{name}-eps {harness.flag_text(eps)}" for name, eps in
               adversarial_setting(c, m)["eps"].items()),
             f"--adversarial-steps {c.adversarial_steps}"]),
        recorded=lambda c, m: {"adversarial_training": adversarial_setting(c, m)}),
    **{name: Variant(  # the encoder's whole setting: a changed size is a new run
        flags=lambda c, m, name=name: f"--audio-encoder {name}",
        recorded=lambda c, m, name=name: {"audio_encoder": {
            "name": name, **AUDIO_ENCODERS[name], "num_layers": 1,
            "pooled": "masked mean"}})
       for name in AUDIO_ENCODERS},
    "bf16": Variant(  # the train step's dtype; evaluation is float32 (run_config's protocol)
        flags=lambda c, m: "--compute-dtype bfloat16",
        recorded=lambda c, m: {"compute_dtype": "bfloat16"}),
}
assert set(VARIANTS) == {MDROP_SUFFIX[1:], *BALANCE, *AUDIO_VARIANTS, ADV_SUFFIX[1:],
                         *AUDIO_ENCODERS, BF16_SUFFIX[1:]}


class AVMNIST(harness.Experiment):
    """The AV-MNIST table: one run per (method, seed) of an ``AVMNISTConfig``."""

    name, script, method_flag = "avmnist", "experiments/avmnist.py", "--fusion"
    config_class, quick_config = AVMNISTConfig, staticmethod(quick_config)
    extra_methods = PEER_METHODS
    not_recorded = ("methods", "seeds", "workdir", "results", "progress",
                    "checkpoint_every", "modality_dropout", "robustness", "snr_sweep",
                    "image_noise_sweep", "balance", "ogm_alpha", "gblend_pilot",
                    "gblend_train_examples", "train_snr_db", "utterance_norm",
                    "adversarial_image_eps", "adversarial_audio_eps", "adversarial_steps",
                    "audio_encoder", "compute_dtype")
    # --modality-dropout, --balance and the strategies' settings, the audio variants',
    # adversarial training's, the audio encoder, the compute dtype: written by method_args
    method_fields = ("modality_dropout", "balance", "ogm_alpha", "gblend_pilot",
                     "gblend_train_examples", "train_snr_db", "utterance_norm",
                     "adversarial_image_eps", "adversarial_audio_eps", "adversarial_steps",
                     "audio_encoder", "compute_dtype")
    flags = cli.config_flags(
        AVMNISTConfig, ("data_seed", "snr_db", "epochs", "batch_size", "learning_rate",
                        "num_train", "num_val", "num_test", "robustness", "snr_sweep",
                        "image_noise_sweep", *method_fields),
        names={"image_noise_sweep": "--image-noise"})
    figures = tuple(f"{sweep}_sweep.png" for sweep in SWEEPS)

    def methods(self) -> list[str]:
        return resolve_methods(self.config)

    def method_args(self, method: str) -> list[str]:
        return [f"--fusion {split_method(method)[0]}",
                *(VARIANTS[tag].flags(self.config, method) for tag in variant_tags(method))]

    def run_config(self, method: str) -> dict[str, Any]:
        """The training settings, the modality-dropout rate of ``+mdrop`` runs, the
        strategy of ``--balance`` runs, the SNR range or normalisation of the audio
        variants, the attack of ``+adv`` runs, the recurrent audio encoder of ``+gru``
        (...) runs, the compute dtype of ``+bf16`` runs and the robustness protocol
        (when evaluated)."""
        from lepton_mm.data.avmnist import SPLIT_SIZES

        out = super().run_config(method)
        for tag in variant_tags(method):
            out.update(VARIANTS[tag].recorded(self.config, method))
        if self.config.robustness:
            out["robustness"] = robustness_protocol(
                self.config, self.config.num_test or SPLIT_SIZES["test"], method)
        return out

    def prepare(self, todo: list[RunKey]) -> dict[Any, dict[str, Any]]:
        """``make_data`` per audio normalisation the runs of ``todo`` need (``True``,
        ``"utterance"``, ...), each with its sweep inputs."""
        data = {}
        for key in todo:
            normalize = audio_setting(self.config, key.method)[1]
            if normalize not in data:
                data[normalize] = make_data(self.config, normalize_audio=normalize)
                if self.config.robustness:  # built before the runs' memory is measured
                    sweep_data(self.config, data[normalize])
        return data

    def train(self, key: RunKey, data: dict[str, Any], workdir: Path) -> dict[str, Any]:
        """Trains (or resumes) one run; the test split is scored once, by the robustness
        pass's both-modalities condition (so the table's test accuracy and the sweep's
        training-SNR point are the same number), in float32 (a ``+bf16`` run too)."""
        from lepton_mm.training import seed_rngs

        config, variant = self.config, split_method(key.method)[1]
        data = data[audio_setting(config, key.method)[1]]
        start = time.perf_counter()
        strategy, extra = self.strategy(key, data, workdir)
        model = build_model(config, key.method, seed_rngs(key.seed))
        fitted = fit_recipe(
            config, model, {**data, "train": train_data(config, data, key.method)},
            workdir, seed=key.seed, epochs=config.epochs,
            modality_dropout=config.modality_dropout if variant == "mdrop" else 0.0,
            strategy=strategy, adversary=adversarial_training(config, key.method),
            compute_dtype=training_dtype(key.method), meta={"hash": self.config_hash(key)})
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
        from lepton_mm.balance import OGMGE, PMR, GradientBlending, MMPareto
        from lepton_mm.models import Classification

        variant = split_method(key.method)[1]
        if variant == "ogm_ge":
            return OGMGE(alpha=self.config.ogm_alpha), {}
        if variant == "mmpareto":
            return MMPareto(Classification(NUM_CLASSES)), {}
        if variant == "pmr":
            return PMR(alpha=1.0, mu=0.0, momentum=0.9), {}
        if variant == "gblend":
            weights, losses = gradient_blending_pilot(
                self.config, split_method(key.method)[0], data, workdir / "gblend_pilot",
                seed=key.seed, meta={"hash": self.config_hash(key)})
            return GradientBlending(weights), {"gblend_weights": weights,
                                               "gblend_head_losses": losses}
        return None, {}

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

        stats = harness.seed_stats_of
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
        for sweep, (levels, _) in SWEEPS.items():
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
                 for sweep in SWEEPS}
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
                             for sw in SWEEPS for score in ("relative_robustness",
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
        error bars the std over seeds, variants (``+mdrop``, ``+snr_range``, ...) in
        their method's colour, one line style per variant."""
        from lepton_mm.robustness import plot_sweep

        written = []
        for sweep, (_, xlabel) in SWEEPS.items():
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
    parser = cli.make_parser(
        AVMNIST, doc=__doc__, quick="smoke check: subset, 1 seed, 5 methods",
        methods="'all' or comma-separated methods: image_only, audio_only, fusion names "
                "(default: all; --quick: a representative five)")
    args = parser.parse_args(argv)
    return cli.config_from_args(AVMNIST, parser, args), args


def main(argv: list[str] | None = None) -> int:
    config, args = parse_args(argv)
    return cli.run_main(AVMNIST(config), args)


if __name__ == "__main__":
    cli.run_script(main)
