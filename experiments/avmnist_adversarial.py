"""AV-MNIST adversarial robustness: clean and PGD accuracy, attacking each modality.

Reads the checkpoints that ``experiments/avmnist.py`` trained (``WORKDIR/<method>/
seed<k>-<hash>/checkpoints``, the epoch with the best validation accuracy; read only)
and, on the first ``--num-test`` examples of the test split (default 1000 of the 10 000,
to keep the table affordable on a CPU), measures each run's accuracy under
``lepton_mm.adversarial`` attacks that perturb

* ``image``: the image only (the audio untouched),
* ``audio``: the log-mel only (its padded frames never perturbed),
* ``both``: image and audio at once, each within its own radius,

with PGD (``--steps`` steps, default 10, of ``2.5 * eps / steps``; a random start in
the ball from a fixed key, ``--attack-seed``, so every number is reproducible; the
last iterate, as in Madry et al.) in an L∞ ball over a sweep of radii and in an L2 ball
at a few radii, and, with ``--fgsm`` (default on; one gradient step, a few seconds per
target), FGSM at the middle L∞ radius as a cheaper reference. A unimodal model
(``image_only``, ``audio_only``) is attacked on its own modality only: its rows for the
other modality and for ``both`` read "n/a". Level ``k`` of ``both`` perturbs the image
by the image list's ``k``-th radius and the audio by the audio list's ``k``-th radius.

**Units of eps (per modality: the same number means different things).** Images are
reconstructions from 4 PCA components of pixels / 255: values mostly in [0, 1] (test
split: 1st-99th percentile -0.11 to 0.77, extremes -0.36 and 1.27), pixel std 0.20; an
attack keeps them in ``--image-clip`` (default [0, 1], the pixel range; a value already
outside it is never pushed further out). Audio inputs are log-mels standardised with
the training split's statistics (mean 1.87 dB, std 8.66 dB: one unit is 8.7 dB), std
about 1 over the valid frames; they are not clipped (a log-mel has no natural bound).
An example has 784 image values and about 3600 valid log-mel values. The radii were
chosen on the first 200 test examples of the seed-0 runs so that each sweep runs from a
mild drop to near zero (clean: image_only 68.5 %, concat 86.5 %, gated 84 %, audio_only
53.5 % on the whole split; accuracies in % at the three radii):

* image L∞ 0.01, 0.03, 0.1 (0.03 is about 8/255, the usual pixel budget): image_only
  48.5, 20.5, 0.5; concat 76, 54, 7.5; gated 73.5, 57, 8.5;
* audio L∞ 0.003, 0.01, 0.03 (0.03 units is 0.26 dB per mel bin): audio_only 46, 32,
  10.5; concat 82.5, 76, 51.5; gated 82, 75.5, 55 (at 0.1 audio_only is at 0 %);
* image L2 0.25, 0.5, 1 (RMS 0.009 to 0.036 per pixel): image_only 38.5, 20, 3;
  concat 69, 54, 21.5; gated 69.5, 54.5, 19.5;
* audio L2 0.1, 0.3, 1 (RMS up to 0.017 per valid value): audio_only 45, 31.5, 6.5;
  concat 82, 76, 44.5; gated 81.5, 76, 52.5.

None of the models was trained adversarially, so small perturbations of either input
suffice: the table compares where each model is weakest (which modality, which fusion
layer), not robust training.

**Cost** (measured on 2 CPU cores shared with two other jobs, load about 7, on
``concat`` with 400 examples, scaled to the default 1000): a fusion model takes about
16 min of wall time (9.5 CPU-minutes) per seed: 1 min for the image attacks, 6.5 for
the audio ones, 8 for both (a gradient through the audio LeNet is most of it); FGSM adds
about 30 s, and each method's first seed about 1-1.5 min of compilation (later seeds
reuse the programs). ``image_only`` takes about 1 min per seed, ``audio_only`` about
6.5. The default table (4 methods, 3 seeds) is thus about 2 h 15 min on such a machine
(``gated`` assumed to cost what ``concat`` does), less on idle cores.

**Records: the table spans sessions.** Checkpoints are not committed, but each run's
result is: ``--records`` (default ``results/avmnist_adversarial``) gets
``<method>/seed<k>.json`` as soon as the run is attacked: the attack settings, the
trained run it attacked (its ledger record's config hash and numerics, or the hash the
current config gives), the machine, versions, commit, command and the result. A run whose
record has the same settings and the same trained-run hash is current: it is read, not
attacked again, and needs no checkpoint. So a session trains some runs (their
checkpoints; ``--results`` elsewhere keeps the committed training records as they are),
attacks them and commits the records; ``--report`` builds the table and figure from the
records alone. A retrained checkpoint is the same run on another machine, not the same
weights: the record's ``machine`` says where it was attacked.

    python experiments/avmnist.py --fusion image_only,audio_only,concat,gated --seeds 0 \
        --results /tmp/scratch-ledger        # checkpoints in runs/avmnist, records untouched
    python experiments/avmnist_adversarial.py --seeds 0      # attacks; writes the records
    python experiments/avmnist_adversarial.py --report --figure docs/figures/avmnist_adversarial.png

Per run (in its record and in ``--out``'s JSON): the clean accuracy, the targets that
are "n/a", one entry per attack (attack, target, norm, level, steps, eps per attacked
modality, accuracy, seconds) and the run's wall and CPU seconds; ``--out`` adds the
command and settings;
stdout gets a markdown table per norm (rows method x attacked modality, columns the
radii, mean ± sample std over seeds, in %), and ``--figure`` a PNG: accuracy against
the radius level per method (mean ± std band), one panel per attacked modality, a row
per norm.

    python experiments/avmnist_adversarial.py --seeds 0 --fusion concat --num-test 200
    python experiments/avmnist_adversarial.py --fusion gated --targets audio --image-l2 ''
    python experiments/avmnist_adversarial.py --out results/avmnist_adversarial.json \\
        --figure docs/figures/avmnist_adversarial.png
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import avmnist  # experiments/avmnist.py: its runs' config hashes
import avmnist_compress  # experiments/: where load_trained finds avmnist.py's runs
import numpy as np

from lepton_mm import cli
from lepton_mm.harness import group_by_method, markdown_table, mean_std_text
from lepton_mm.recipes.avmnist import AVMNISTConfig, audio_setting, make_data, split_method

#: What an attack perturbs: one modality, or both.
TARGETS = ("image", "audio", "both")
#: The norms of the sweep, in table order.
NORMS = ("linf", "l2")
_NORM_NAMES = {"linf": "L∞", "l2": "L2"}


def _methods() -> tuple[str, ...]:
    from lepton_mm.fusion import FUSIONS
    from lepton_mm.recipes.avmnist import UNIMODAL

    return (*UNIMODAL, *sorted(FUSIONS))


@dataclasses.dataclass(frozen=True)
class AdversarialConfig:
    """Which trained runs to attack, how, and on how much of the test split.

    Attributes:
      methods: methods of ``experiments/avmnist.py`` (the flag is ``--fusion``):
        ``image_only``, ``audio_only``, fusion names, or their training variants
        (``concat+mdrop``).
      seeds: their seeds.
      workdir: where ``experiments/avmnist.py`` trained (read only).
      num_test: attack the first N test examples (None: all 10 000).
      targets: what is attacked: ``image``, ``audio`` and/or ``both``.
      image_linf: L∞ radii of the image attacks (pixel units, images in [0, 1]).
      audio_linf: L∞ radii of the audio attacks (units of the standardised log-mel,
        one unit = 8.7 dB); level k of ``both`` pairs the k-th radii.
      image_l2: L2 radii of the image attacks (per example, over its 784 pixels).
      audio_l2: L2 radii of the audio attacks (per example, over its valid frames).
      steps: PGD steps per attack (step size 2.5 * eps / steps).
      fgsm: also FGSM at the middle L∞ radius of each target.
      image_clip: the valid image range ``low,high`` an attack stays in (none: no clip).
      attack_seed: the key of PGD's random start (chunk c uses fold_in(key, c)).
      batch_size: examples per attacked chunk (results depend on it via the key).
      out: write the results here as JSON (None: the table on stdout only).
      figure: write the accuracy-vs-radius figure here as PNG (None: no figure).
      records: per-run records, ``<records>/<method>/seed<k>.json`` (None: none); a
        current one is read instead of attacking the run again.
      report: attack nothing: the table (and figure, ``--out``) from the current records.
    """

    methods: tuple[str, ...] = ("image_only", "audio_only", "concat", "gated")
    seeds: tuple[int, ...] = (0, 1, 2)
    workdir: str = "runs/avmnist"
    num_test: int | None = 1000
    targets: tuple[str, ...] = TARGETS
    image_linf: tuple[float, ...] = (0.01, 0.03, 0.1)
    audio_linf: tuple[float, ...] = (0.003, 0.01, 0.03)
    image_l2: tuple[float, ...] = (0.25, 0.5, 1.0)
    audio_l2: tuple[float, ...] = (0.1, 0.3, 1.0)
    steps: int = 10
    fgsm: bool = True
    image_clip: tuple[float, ...] | None = (0.0, 1.0)
    attack_seed: int = 0
    batch_size: int = 100
    out: str | None = None
    figure: str | None = None
    records: str | None = "results/avmnist_adversarial"
    report: bool = False

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "num_test"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {value}.")
        if not self.methods:
            raise ValueError("methods: expected at least one method, got none.")
        unknown = [m for m in self.methods if split_method(m)[0] not in _methods()]
        if unknown:
            raise ValueError(f"methods: unknown methods {unknown}; expected names from "
                             f"{list(_methods())} (or a training variant, name+variant).")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: expected distinct seeds, got {list(self.seeds)}.")
        bad = [t for t in self.targets if t not in TARGETS]
        if not self.targets or bad or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"targets: expected distinct names from {list(TARGETS)}, got "
                             f"{list(self.targets)}.")
        for name in ("image_linf", "audio_linf", "image_l2", "audio_l2"):
            values = getattr(self, name)
            if not all(math.isfinite(v) and v >= 0 for v in values):
                raise ValueError(f"{name}: expected radii >= 0, got {list(values)}.")
            if list(values) != sorted(values):
                raise ValueError(f"{name}: expected increasing radii, got {list(values)}.")
        if "both" in self.targets:
            for norm in NORMS:
                image, audio = self.radii("image", norm), self.radii("audio", norm)
                if len(image) != len(audio):
                    raise ValueError(
                        f"audio_{norm}: the 'both' target pairs the image and audio radii "
                        f"level by level; expected as many as image_{norm} "
                        f"({len(image)}), got {len(audio)}.")
        if self.image_clip is not None and not (
                len(self.image_clip) == 2 and self.image_clip[0] < self.image_clip[1]):
            raise ValueError(f"image_clip: expected low,high with low < high (or none), "
                             f"got {list(self.image_clip)}.")
        if self.report and self.records is None:
            raise ValueError("report: reads the records; expected a records directory, "
                             "got none.")

    def radii(self, modality: str, norm: str) -> tuple[float, ...]:
        """The radii of ``modality`` (``image`` or ``audio``) under ``norm``."""
        return tuple(getattr(self, f"{modality}_{norm}"))

    def levels(self, target: str, norm: str) -> list[dict[str, float]]:
        """``[{modality: eps}]``, one per radius level of ``target`` under ``norm``."""
        names = ("image", "audio") if target == "both" else (target,)
        radii = [self.radii(m, norm) for m in names]
        return [dict(zip(names, eps, strict=True)) for eps in zip(*radii, strict=True)]


def attacked(model_modalities: Sequence[str], target: str) -> tuple[str, ...] | None:
    """The modalities ``target`` perturbs on a model that encodes ``model_modalities``,
    or None ("n/a") when the model lacks one of them (a unimodal model is attacked on
    its own modality only)."""
    names = ("image", "audio") if target == "both" else (target,)
    return names if all(m in model_modalities for m in names) else None


def evaluate(model: Any, test: Mapping[str, Any], settings: AdversarialConfig, *,
             name: str = "") -> dict[str, Any]:
    """One run's record: clean accuracy and every attack of ``settings`` (the module
    docstring's keys); targets the model cannot be attacked on go to ``"n/a"``."""
    import jax

    from lepton_mm.adversarial import robust_accuracy

    start, cpu = time.perf_counter(), time.process_time()
    modalities = tuple(getattr(model, "modalities", ()))
    key = jax.random.key(settings.attack_seed)
    clip = {} if settings.image_clip is None else {"image": tuple(settings.image_clip)}

    def accuracy(eps: Mapping[str, float], norm: str = "linf", attack: str = "pgd"
                 ) -> float:
        """Accuracy with each modality of ``eps`` attacked within its own radius, the
        image clip applying where the image is attacked."""
        return float(robust_accuracy(
            model, test, eps_values=[eps], modalities=tuple(eps), norm=norm,
            attack=attack, steps=settings.steps, key=key, batch_size=settings.batch_size,
            clip={m: c for m, c in clip.items() if m in eps} or None)[0])

    out: dict[str, Any] = {
        "num_test": len(test["label"]), "modalities": list(modalities),
        "clean_accuracy": float(robust_accuracy(  # radius 0: no attack is run
            model, test, eps_values=[0.0], batch_size=settings.batch_size)[0]),
        "attacks": [], "n/a": []}
    for target in settings.targets:
        if attacked(modalities, target) is None:
            out["n/a"].append(target)
            continue
        for norm in NORMS:
            jobs = [("pgd", k + 1, eps) for k, eps in enumerate(settings.levels(target, norm))]
            if settings.fgsm and norm == "linf" and jobs:
                middle = len(jobs) // 2
                jobs.append(("fgsm", middle + 1, jobs[middle][2]))
            for attack, level, eps in jobs:
                t = time.perf_counter()
                result = accuracy(eps, norm, attack)
                out["attacks"].append({
                    "attack": attack, "target": target, "norm": norm, "level": level,
                    "steps": 1 if attack == "fgsm" else settings.steps,
                    "eps": eps, "accuracy": result,
                    "seconds": round(time.perf_counter() - t, 2)})
                print(f"{name} {attack} {target} {norm} {eps}: {100 * result:.1f} % "
                      f"({time.perf_counter() - t:.1f} s)", file=sys.stderr, flush=True)
    out["seconds"] = round(time.perf_counter() - start, 1)
    out["cpu_seconds"] = round(time.process_time() - cpu, 1)  # all threads
    return out


#: Fields of ``AdversarialConfig`` a run's result does not depend on.
_NOT_RECORDED = ("methods", "seeds", "workdir", "out", "figure", "records", "report")


def attack_settings(settings: AdversarialConfig) -> dict[str, Any]:
    """What a run's result depends on besides the trained run (JSON values)."""
    fields = dataclasses.asdict(settings)
    return json.loads(json.dumps({k: v for k, v in fields.items() if k not in _NOT_RECORDED}))


def trained_run(config: AVMNISTConfig, method: str, seed: int) -> dict[str, Any] | None:
    """The trained run ``(method, seed)`` names: ``{"config_hash", "numerics",
    "ledger_test_accuracy"}`` from its ledger record under ``config.results`` (what
    ``load_trained``'s checkpoint folder is named by), else the hash the current config
    gives it (accuracy None); None when the config cannot name it (a ``+adv`` run with
    no record and no radii). ``ledger_test_accuracy`` is the record's (whole test
    split); a checkpoint retrained on another CPU kind scores a little differently, and
    the attack's own ``clean_accuracy`` is the attacked checkpoint's."""
    from lepton_mm.experiment import RunKey

    key = RunKey("avmnist", method, seed)
    path = Path(config.results) / "avmnist" / method / key.file_name()
    if path.is_file():
        record = json.loads(path.read_text())
        return {"config_hash": record["config_hash"], "numerics": record["numerics"],
                "ledger_test_accuracy": record["metrics"]["test_accuracy"]}
    try:
        experiment = avmnist.AVMNIST(config)
        return {"config_hash": experiment.config_hash(key),
                "numerics": experiment.numerics, "ledger_test_accuracy": None}
    except ValueError:
        return None


def record_path(settings: AdversarialConfig, method: str, seed: int) -> Path:
    """``<records>/<method>/seed<k>.json``."""
    return Path(settings.records) / method / f"seed{seed}.json"


def current_record(settings: AdversarialConfig, method: str, seed: int,
                   trained: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The run's record if it holds these settings' result for this trained run."""
    if settings.records is None or trained is None:
        return None
    path = record_path(settings, method, seed)
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    same = (record.get("settings") == attack_settings(settings)
            and {k: record.get("trained", {}).get(k) for k in ("config_hash", "numerics")}
            == {k: trained[k] for k in ("config_hash", "numerics")})
    return record if same else None


def run_command(settings: AdversarialConfig, method: str, seed: int) -> str:
    """The command line that attacks just this run again with these settings (the
    attack settings that differ from the defaults; no paths)."""
    from lepton_mm.harness import flag_text

    words = ["python", "experiments/avmnist_adversarial.py", "--fusion", method,
             "--seeds", str(seed)]
    defaults = attack_settings(AdversarialConfig())
    for name, value in attack_settings(settings).items():
        if value == defaults[name]:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else "--no-" + name.replace("_", "-"))
        else:
            value = tuple(value) if isinstance(value, list) else value
            words += [flag, flag_text(value)]  # shlex.join quotes an empty one
    return shlex.join(words)


def write_record(settings: AdversarialConfig, method: str, seed: int,
                 trained: Mapping[str, Any] | None, result: Mapping[str, Any]) -> Path:
    """Writes the run's record atomically (an interrupted write leaves the old one)."""
    from lepton_mm import experiment as ledger

    return ledger.write_json({
        "method": method, "seed": seed, "command": run_command(settings, method, seed),
        "settings": attack_settings(settings), "trained": trained,
        "machine": ledger.machine_info(), "versions": ledger.versions(),
        "git_commit": ledger.git_commit(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "result": result}, record_path(settings, method, seed))


def run(settings: AdversarialConfig) -> dict[str, Any]:
    """``{"<method>/seed<k>": evaluate(...)}`` of every run with a current record (read)
    or a checkpoint (attacked, its record written); ``--report``: the records only."""
    config = AVMNISTConfig(workdir=settings.workdir)
    data: dict[Any, dict[str, Any]] = {}  # test split per audio normalisation
    results: dict[str, Any] = {}
    for method in settings.methods:
        normalize = audio_setting(config, method)[1]
        for seed in settings.seeds:
            name = f"{method}/seed{seed}"
            trained = trained_run(config, method, seed)
            record = current_record(settings, method, seed, trained)
            if record is not None:
                results[name] = record["result"]
                continue
            if settings.report:
                print(f"skipped {name}: no current record in {settings.records}",
                      file=sys.stderr)
                continue
            try:
                model = avmnist_compress.load_trained(config, method, seed)
            except FileNotFoundError as e:
                print(f"skipped {name}: {e}", file=sys.stderr)
                continue
            if normalize not in data:
                data[normalize] = make_data(dataclasses.replace(
                    config, num_test=settings.num_test), normalize_audio=normalize)["test"]
            results[name] = result = evaluate(model, data[normalize], settings, name=name)
            if settings.records is not None:
                write_record(settings, method, seed, trained, result)
            print(f"{name}: clean {100 * result['clean_accuracy']:.1f} %, "
                  f"{result['seconds']:.0f} s ({result['cpu_seconds']:.0f} s CPU)",
                  file=sys.stderr, flush=True)
    return results


def _accuracies(runs: Sequence[Mapping[str, Any]], attack: str, target: str, norm: str,
                level: int) -> list[float]:
    return [a["accuracy"] for r in runs for a in r["attacks"]
            if (a["attack"], a["target"], a["norm"], a["level"]) == (attack, target, norm,
                                                                     level)]


def _radii_text(eps_by_level: Sequence[Mapping[str, float]]) -> str:
    """``"0.01+0.003 / ..."``: image before audio whatever the dicts' order (a record
    read back from JSON has its keys sorted)."""
    return " / ".join("+".join(f"{eps[m]:g}" for m in ("image", "audio") if m in eps)
                      for eps in eps_by_level)


def table(results: Mapping[str, Any]) -> str:
    """Markdown, a table per norm: rows method x attacked modality, columns clean and
    each radius level (and FGSM), mean ± sample std over seeds in %; "n/a" where the
    model cannot be attacked on that modality."""
    grouped = group_by_method(results)
    attacks = [a for r in results.values() for a in r["attacks"]]
    targets = [t for t in TARGETS if any(
        t in r["n/a"] or any(a["target"] == t for a in r["attacks"])
        for r in results.values())]
    lines: list[str] = []
    for norm in NORMS:
        mine = [a for a in attacks if a["norm"] == norm]
        if not mine:
            continue
        levels = max(a["level"] for a in mine if a["attack"] == "pgd")
        fgsm = sorted({a["level"] for a in mine if a["attack"] == "fgsm"})
        eps = {t: {a["level"]: a["eps"] for a in mine if a["target"] == t
                   and a["attack"] == "pgd"} for t in targets}
        steps = sorted({a["steps"] for a in mine if a["attack"] == "pgd"})
        lines.append(f"**PGD-{'/'.join(map(str, steps))}, {_NORM_NAMES[norm]}**; radii "
                     f"per level (both: image+audio): " + "; ".join(
            f"{t} {_radii_text([eps[t][k] for k in sorted(eps[t])])}"
            for t in targets if eps[t]) + "\n")
        header = (["method", "attacked", "seeds", "clean"]
                  + [f"level {k}" for k in range(1, levels + 1)]
                  + [f"FGSM level {k}" for k in fgsm])
        rows = []
        for method, runs in grouped.items():
            clean = mean_std_text([r["clean_accuracy"] for r in runs])
            for target in targets:
                if all(target in r["n/a"] for r in runs):
                    rows.append([method, target, len(runs), clean,
                                 *["n/a"] * (levels + len(fgsm))])
                    continue
                cells = [_accuracies(runs, "pgd", target, norm, k)
                         for k in range(1, levels + 1)]
                cells += [_accuracies(runs, "fgsm", target, norm, k) for k in fgsm]
                rows.append([method, target, len(runs), clean,
                             *[mean_std_text(c) if c else "" for c in cells]])
        lines += [*markdown_table(header, rows), ""]
    return "\n".join(lines).rstrip("\n")


def plot(results: Mapping[str, Any], path: str | Path) -> Path:
    """Accuracy (%) against the radius level (0: clean) per method, mean ± std band
    over seeds: one panel per attacked modality, a row per norm (PGD)."""
    from matplotlib.figure import Figure  # not pyplot: leaves the backend alone

    grouped = group_by_method(results)
    attacks = [a for r in results.values() for a in r["attacks"] if a["attack"] == "pgd"]
    norms = [n for n in NORMS if any(a["norm"] == n for a in attacks)]
    targets = [t for t in TARGETS if any(a["target"] == t for a in attacks)]
    fig = Figure(figsize=(4.2 * max(len(targets), 1), 3.4 * max(len(norms), 1)), dpi=100)
    axes = np.asarray(fig.subplots(max(len(norms), 1), max(len(targets), 1),
                                   squeeze=False))
    for i, norm in enumerate(norms):
        for j, target in enumerate(targets):
            ax = axes[i, j]
            eps = {a["level"]: a["eps"] for a in attacks
                   if (a["target"], a["norm"]) == (target, norm)}
            levels = sorted(eps)
            for index, (method, runs) in enumerate(grouped.items()):
                color = f"C{index % 10}"  # a method's colour is the same in every panel
                runs = [r for r in runs if target not in r["n/a"]]
                if not runs:
                    continue
                curves = np.array([[r["clean_accuracy"]] + [
                    next(a["accuracy"] for a in r["attacks"]
                         if (a["attack"], a["target"], a["norm"], a["level"])
                         == ("pgd", target, norm, k)) for k in levels] for r in runs])
                mean = 100 * curves.mean(0)
                x = np.arange(len(levels) + 1)
                ax.plot(x, mean, "-o", ms=3, lw=1.4, color=color, label=method)
                if len(runs) > 1:
                    std = 100 * curves.std(0, ddof=1)
                    ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.15,
                                    lw=0)
            ax.set_xticks(np.arange(len(levels) + 1),
                          ["0"] + [_radii_text([eps[k]]) for k in levels],
                          fontsize=7 if target == "both" else 8)
            ax.set_ylim(0, 100)
            ax.set_title(f"{target} attacked, PGD {_NORM_NAMES[norm]}", fontsize=9)
            ax.set_xlabel("eps" + (" (image+audio)" if target == "both" else ""),
                          fontsize=8)
            if j == 0:
                ax.set_ylabel("test accuracy (%)")
            ax.legend(fontsize=7, loc="upper right")
    fig.suptitle("AV-MNIST: accuracy under PGD, by attacked modality", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def parse_args(argv: list[str] | None = None) -> AdversarialConfig:
    """Command line → ``AdversarialConfig`` (a bad flag or value: one line, exit 2)."""
    return cli.parse_config(__doc__, AdversarialConfig, argv, names={"methods": "--fusion"})


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)

    import jax

    start = time.perf_counter()
    command = shlex.join(["python", "experiments/avmnist_adversarial.py",
                          *(argv if argv is not None else sys.argv[1:])])
    results = run(settings)
    if not results:
        print("no trained run found; train them with python experiments/avmnist.py",
              file=sys.stderr)
        return 1
    if settings.out:
        report = {"command": command,
                  "settings": dataclasses.asdict(settings),
                  "device": jax.devices()[0].device_kind, "jax": jax.__version__,
                  "seconds": round(time.perf_counter() - start, 1), "results": results}
        Path(settings.out).parent.mkdir(parents=True, exist_ok=True)
        Path(settings.out).write_text(json.dumps(report, indent=1) + "\n")
    if settings.figure:
        plot(results, settings.figure)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
