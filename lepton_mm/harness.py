"""One harness for ledgered experiments: train the runs the ledger lacks, report the rest.

An experiment script subclasses ``Experiment`` with what is its own (the config,
the data, how one run trains, how the records read as tables) and gets the rest from
here: the run keys and the to-do list from the ledger (``lepton_mm.experiment``),
sharding, a checkpoint workdir per run that a changed config never resumes, records
with the command that reproduces them, the report (``results.json``, ``results.md``,
figures) and its copy into a docs page, and the shared command line (``--seeds``,
``--shard``, ``--force``, ``--report``, ``--out``, ``--docs``, ...)::

    class MyExperiment(Experiment):
        name, script = "mine", "experiments/mine.py"
        config_class, quick_config = MyConfig, staticmethod(my_quick_config)
        def methods(self): return ["a", "b"]
        def train(self, key, data, workdir): ...   # -> make_record's fields
        def summarize(self, runs): ...             # -> per-method summary
        def tables(self, summary): ...             # -> markdown

    def parse_args(argv=None):
        parser = make_parser(MyExperiment, doc=__doc__, methods="a, b", quick="fast")
        args = parser.parse_args(argv)
        return config_from_args(MyExperiment, parser, args), args

    def main(argv=None):
        config, args = parse_args(argv)
        return run_main(MyExperiment(config), args)

    if __name__ == "__main__":
        run_script(main)

Nothing here imports JAX at module level; ``Experiment.run`` imports it to record
the device kind.
"""

from __future__ import annotations

import abc
import argparse
import dataclasses
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from lepton_mm import experiment as ledger
from lepton_mm.experiment import NUMERICS, RunKey

__all__ = [
    "Experiment",
    "add_arguments",
    "add_flags",
    "base_overrides",
    "config_file",
    "config_from_args",
    "curve_stats",
    "enable_compilation_cache",
    "fit_facts",
    "flag_overrides",
    "int_at_least",
    "make_config",
    "make_parser",
    "markdown_table",
    "parse_floats",
    "parse_ints",
    "plot_curves",
    "run_costs",
    "run_main",
    "run_script",
    "seed_stats_of",
    "update_docs",
]


def parse_ints(text: str) -> tuple[int, ...]:
    """Comma-separated ints, for argparse ``type=``.

    Args:
      text: e.g. ``"0,1,2"`` (blank items are skipped).

    Returns:
      ``(0, 1, 2)``.
    """
    return tuple(int(s) for s in text.split(",") if s.strip())


def parse_floats(text: str) -> tuple[float, ...]:
    """Comma-separated floats, for argparse ``type=``.

    Args:
      text: e.g. ``"20,-5.5"`` (blank items are skipped).

    Returns:
      ``(20.0, -5.5)``.
    """
    return tuple(float(s) for s in text.split(",") if s.strip())


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type=`` for ints ``>= minimum``, with a one-line error otherwise.

    Args:
      minimum: the smallest value accepted.

    Returns:
      The parser: ``"3"`` -> ``3``; ``"two"`` or a value below ``minimum`` raises
      ``argparse.ArgumentTypeError`` (``expected an integer >= 1, got 0``).
    """
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


def run_costs(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """What one method's records say about its cost, for a summary.

    Args:
      runs: the method's records (non-empty), each with ``metrics["best_epoch"]``.

    Returns:
      ``{"num_params", "epoch_time_s" (mean of the records' ``seconds_per_epoch``; None
      when no record trained), "peak_rss_mb" (the largest), "best_epoch" (per seed)}``.
    """
    times = [r["seconds_per_epoch"] for r in runs if r["seconds_per_epoch"] is not None]
    return {"num_params": runs[0]["params"],
            "epoch_time_s": float(np.mean(times)) if times else None,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "best_epoch": {str(r["seed"]): r["metrics"]["best_epoch"] for r in runs}}


def seed_stats_of(runs: Sequence[Mapping[str, Any]],
                  get: Callable[[Mapping[str, Any]], float | None]) -> dict[str, Any] | None:
    """``seed_stats`` of one number of each of a method's records, for a summary.

    Args:
      runs: the method's records (non-empty), each with ``seed``.
      get: the number, from a record (None where the record has none).

    Returns:
      ``seed_stats`` of ``{str(seed): get(record)}``, or None if a record has none.
    """
    values = {str(r["seed"]): get(r) for r in runs}
    return None if None in values.values() else ledger.seed_stats(values)


def curve_stats(runs: Sequence[Mapping[str, Any]],
                get: Callable[[Mapping[str, Any]], Sequence[float | None]], *,
                digits: int = 4) -> dict[str, Any]:
    """Mean and sample std over a method's records of a curve, point by point.

    Args:
      runs: the method's records (non-empty), whose curves have one length.
      get: the curve of a record (None where it has no value at a point: left out of
        that point's statistics).
      digits: decimals kept.

    Returns:
      ``{"mean": [...], "std": [...]}`` per point; ``std`` is None for one record.
    """
    curves = np.array([[np.nan if v is None else v for v in get(r)] for r in runs], float)
    return {"mean": np.round(np.nanmean(curves, 0), digits).tolist(),
            "std": (np.round(np.nanstd(curves, 0, ddof=1), digits).tolist()
                    if len(runs) > 1 else None)}


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """A markdown table's lines, for ``Experiment.tables``.

    Args:
      header: the column titles.
      rows: the cells of each row (written with ``str``).

    Returns:
      The header line, the ``|---|...`` line and one line per row.

    Examples:
      >>> markdown_table(["method", "accuracy"], [["concat", "81.9 ± 0.4"]])
      ['| method | accuracy |', '|---|---|', '| concat | 81.9 ± 0.4 |']
    """
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(map(str, row)) + " |" for row in rows)]


def plot_curves(curves: Mapping[str, Mapping[str, Any]], path: str | Path, *, xlabel: str,
                ylabel: str, title: str, styles: Mapping[str, str] | None = None,
                hline: tuple[float, str] | None = None,
                ylim: tuple[float, float] | None = None,
                legend_title: str | None = None) -> Path:
    """Curves over seeds as a PNG, for ``Experiment.plot``: a line per entry (the mean)
    in a band of ± one sample std.

    Args:
      curves: legend label -> ``{"x", "mean", "std"}`` (lists of one length; ``std``
        None: no band), e.g. from ``curve_stats``.
      path: the PNG to write.
      xlabel: the x-axis label.
      ylabel: the y-axis label.
      title: the figure's title.
      styles: legend label -> line style (``"--"``, ``":"``; default ``"-"``).
      hline: ``(y, text)``: a dotted grey line at ``y``, the text above it.
      ylim: the y-axis range (default: matplotlib's).
      legend_title: the legend's title.

    Returns:
      ``path`` as a ``pathlib.Path``.
    """
    from matplotlib.figure import Figure  # not pyplot: leaves the backend alone

    fig = Figure(figsize=(6.4, 3.6), dpi=100)
    ax = fig.subplots()
    for label, curve in curves.items():
        x, mean = np.asarray(curve["x"], float), np.asarray(curve["mean"], float)
        (line,) = ax.plot(x, mean, (styles or {}).get(label, "-"), lw=1.4, label=label)
        if curve["std"] is not None:
            std = np.asarray(curve["std"], float)
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15,
                            lw=0)
    if hline is not None:
        ax.axhline(hline[0], color="grey", lw=0.8, ls=":")
        right = max(float(np.max(c["x"])) for c in curves.values())
        ax.text(0.25 * right, hline[0] + 0.03, hline[1], color="grey", fontsize=8)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.legend(fontsize=8, loc="lower right", title=legend_title, title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def _flag_value(value: Any) -> str:
    """A config value as command-line text that parses back to exactly ``value``."""
    if isinstance(value, (tuple, list)):
        return ",".join(_flag_value(v) for v in value)
    if isinstance(value, float):
        short = f"{value:g}"  # "0.001", "-15": what a person types
        return short if float(short) == value else repr(value)  # else every digit
    return str(value)


def _parse_strs(text: str) -> tuple[str, ...]:
    """Comma-separated words, for argparse ``type=``."""
    words = tuple(w.strip() for w in text.split(","))
    if not all(words):
        raise argparse.ArgumentTypeError(f"expected comma-separated words, got {text!r}")
    return words


def fit_facts(fitted: Any, seconds: float, *,
              eval_metrics: Sequence[str] = ("accuracy",)) -> dict[str, Any]:
    """What a record keeps of a ``fit`` call, beside the experiment's own metrics.

    Args:
      fitted: the ``FitResult``.
      seconds: the call's wall time (training, validation and compilation).
      eval_metrics: validation metrics to keep per epoch of the history, as
        ``val_<name>``.

    Returns:
      ``{"best_epoch", "epochs", "history": [{"epoch", "train_loss", "val_<m>", ...}],
      "seconds_per_epoch"}``: ``seconds`` per epoch trained by this call (None when
      the call only restored a finished run).
    """
    resumed = fitted.resumed_from or 0
    trained_here = sum(1 for r in fitted.history if r["step"] > resumed)
    return {
        "best_epoch": next(r["epoch"] for r in fitted.history
                           if r["step"] == fitted.best_step),
        "epochs": len(fitted.history),
        "history": [{"epoch": r["epoch"], "train_loss": round(r["train_loss"], 6),
                     **{f"val_{m}": r["eval"][m] for m in eval_metrics}}
                    for r in fitted.history],
        "seconds_per_epoch": round(seconds / trained_here, 2) if trained_here else None,
    }


class Experiment(abc.ABC):
    """One experiment over a config: its runs, their records, its report.

    A subclass sets ``name`` (the ledger's experiment) and ``script`` (its path from the
    repository root) and implements ``methods``, ``train``, ``summarize``
    and ``tables``; it may override the others. The config is a frozen dataclass
    with at least ``seeds``, ``workdir``, ``results`` and ``quick`` fields (and
    ``data_seed``, ``progress`` when it has them).

    Attributes:
      name: the ledger's experiment name (records at ``<results>/<name>/...``).
      script: the script that trains a run, for the records' commands.
      config_class: the config dataclass (``make_parser``, ``config_from_args``).
      quick_config: the function that makes the ``--quick`` config from overrides (set
        it as ``staticmethod(quick_config)``; None: ``--quick`` only sets ``quick``).
      method_flag: the script's flag that picks methods (``--fusion``, ``--parts``).
      methods_field: the config field that flag sets (``methods``, ``parts``).
      numerics: the numerics version records must carry to be current.
      extra_methods: rows the experiment does not train (a peer library's), reported
        when their records carry the current numerics.
      not_recorded: config fields no run's result depends on (never hashed).
      flags: ``(config field, command-line flag)`` pairs, for ``command`` (written
        for fields whose value differs from the default config's).
      method_fields: config fields ``method_args`` writes on the command line
        (e.g. a rate that is part of the method's name).
      figures: file names of the figures ``plot`` writes (copied by ``--docs``).
    """

    name: ClassVar[str]
    script: ClassVar[str]
    config_class: ClassVar[type]
    quick_config: ClassVar[Callable[..., Any] | None] = None
    method_flag: ClassVar[str] = "--methods"
    methods_field: ClassVar[str] = "methods"
    numerics: ClassVar[str] = NUMERICS
    extra_methods: ClassVar[tuple[str, ...]] = ()
    not_recorded: ClassVar[tuple[str, ...]] = (
        "methods", "seeds", "workdir", "results", "progress", "checkpoint_every", "quick")
    flags: ClassVar[tuple[tuple[str, str], ...]] = ()
    method_fields: ClassVar[tuple[str, ...]] = ()
    figures: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: Any) -> None:
        self.config = config
        self.ledger = ledger.Ledger(config.results, self.name)

    # ----------------------------------------------------------------- the script's part

    @abc.abstractmethod
    def methods(self) -> list[str]:
        """The methods the config asks for, validated (raise ``ValueError`` on unknown
        names, before any computation)."""

    def default_config(self) -> Any:
        """The config ``command`` compares against (flags only for what differs): that of
        ``quick_config()`` for a quick config, else the config class's defaults."""
        if self.config.quick and self.quick_config is not None:
            return self.quick_config()
        return type(self.config)()

    def prepare(self, todo: Sequence[RunKey]) -> Any:
        """Data shared by the runs of ``todo`` (built once per process; not called when
        nothing is to do)."""
        return None

    @abc.abstractmethod
    def train(self, key: RunKey, data: Any, workdir: Path) -> dict[str, Any]:
        """Trains (or resumes from ``workdir``) one run.

        Returns:
          ``make_record``'s fields that only the run knows: ``metrics`` (with
          ``test_accuracy`` and ``val_accuracy``), ``params``, ``seconds_per_epoch``,
          optionally ``robustness`` and ``extra``.
        """

    @abc.abstractmethod
    def summarize(self, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
        """Per method, a summary of its current records (non-empty lists)."""

    @abc.abstractmethod
    def tables(self, summary: dict[str, Any]) -> str:
        """The summary as markdown (``summary`` is non-empty)."""

    def plot(self, summary: dict[str, Any], out: Path) -> list[Path]:
        """Writes the report's figures to ``out``; returns their paths."""
        return []

    def method_args(self, method: str) -> list[str]:
        """The command-line words that select ``method`` (default: ``method_flag``)."""
        return [f"{self.method_flag} {method}"]

    def describe(self, record: Mapping[str, Any]) -> str:
        """The line printed when a run finishes."""
        m = record["metrics"]
        return (f"test accuracy {100 * m['test_accuracy']:.2f} %  (val "
                f"{100 * m['val_accuracy']:.2f} %, {record['seconds_per_epoch']} s/epoch)")

    def report_fields(self) -> dict[str, Any]:
        """Extra top-level entries of ``results.json``."""
        return {}

    # ----------------------------------------------------------------- provided

    def keys(self) -> list[RunKey]:
        """Every run the config asks for: methods x seeds, at the config's data seed."""
        data_seed = getattr(self.config, "data_seed", 0)
        return [RunKey(self.name, m, s, data_seed)
                for m in self.methods() for s in self.config.seeds]

    def run_config(self, method: str) -> dict[str, Any]:
        """Everything the record of a ``method`` run depends on (hashed into its key):
        the config's fields less ``not_recorded``, plus the method."""
        fields = dataclasses.asdict(self.config)
        return {**{k: v for k, v in fields.items() if k not in self.not_recorded},
                "method": method}

    def config_hash(self, key: RunKey) -> str:
        """The config hash a current record of ``key`` carries."""
        return ledger.config_hash(self.run_config(key.method))

    def workdir(self, key: RunKey) -> Path:
        """``WORKDIR/<method>/seed<k>[-data<d>]-<hash>``, absolute: the run's checkpoints;
        the hash covers its config and the numerics (a changed run never resumes)."""
        tag = ledger.config_hash({"config": self.config_hash(key),
                                  "numerics": self.numerics})[:8]
        return (Path(self.config.workdir).absolute() / key.method
                / f"{key.file_name()[:-len('.json')]}-{tag}")

    def command(self, key: RunKey) -> str:
        """The command line (from the repository root) that trains just ``key`` again.

        Raises:
          ValueError: a config field the run's record depends on (``run_config``)
            differs from the default config but has no flag in ``flags`` (the command
            could not reproduce the run).
        """
        defaults = self.default_config()
        flagged = {field for field, _ in self.flags} | {"data_seed", "quick",
                                                         *self.method_fields}
        recorded = set(self.run_config(key.method))
        for f in dataclasses.fields(self.config):
            if (f.name in recorded and f.name not in flagged
                    and getattr(self.config, f.name) != getattr(defaults, f.name)):
                raise ValueError(
                    f"{self.name}: config field {f.name}={getattr(self.config, f.name)!r} "
                    f"differs from the default ({getattr(defaults, f.name)!r}) and has no "
                    "command-line flag: a record's command could not reproduce the run.")
        words = [f"python {self.script}", *(["--quick"] if self.config.quick else []),
                 *self.method_args(key.method), f"--seeds {key.seed}"]
        if key.data_seed != getattr(defaults, "data_seed", 0):
            words.append(f"--data-seed {key.data_seed}")
        for field, flag in self.flags:
            if field == "data_seed":  # from the key, above
                continue
            value, default = getattr(self.config, field), getattr(defaults, field)
            if value == default:
                continue
            if isinstance(value, bool):
                words.append(flag if value else f"--no-{flag[2:]}")
            else:
                words.append(f"{flag}={_flag_value(value)}")
        return " ".join([*words, "--force"])

    def todo(self, *, force: bool = False, shard: str | None = None) -> list[RunKey]:
        """The runs to train: shard ``"i/n"`` takes every n-th of *all* the run keys
        from i (a fixed split, so workers that start at different times, or restart,
        never skip or repeat a run), then keeps those without a current record (all of
        them with ``force``)."""
        keys = self.keys()
        return self._todo(keys, self._missing(keys), force=force, shard=shard)

    def _missing(self, keys: Sequence[RunKey]) -> list[RunKey]:
        return self.ledger.todo(keys, config_hashes=self.config_hash, numerics=self.numerics)

    @staticmethod
    def _todo(keys: Sequence[RunKey], missing: Sequence[RunKey], *, force: bool,
              shard: str | None) -> list[RunKey]:
        share = ledger.shard(keys, shard)
        return share if force else [k for k in share if k in set(missing)]

    def run(self, *, shard: str | None = None, force: bool = False) -> dict[str, Any]:
        """Trains the runs of ``todo``, writing each record as soon as its run ends
        (stopping loses at most the run in progress); returns ``report`` to the
        workdir.

        A forced run trains from scratch (its workdir is removed first). The records
        carry the commit checked out when this call started: the code that ran.
        """
        import jax

        keys = self.keys()
        missing = self._missing(keys)  # the records are read once
        done = len(keys) - len(missing)
        todo = self._todo(keys, missing, force=force, shard=shard)
        commands = {key: self.command(key) for key in todo}  # unreproducible: fail now
        print(f"{self.name}: {done} of {len(keys)} runs have a current record; training "
              f"{len(todo)}" + (f" (shard {shard})" if shard else ""), flush=True)
        commit = ledger.git_commit()
        machine = ledger.machine_info(device_kind=jax.devices()[0].device_kind)
        data = self.prepare(todo) if todo else None
        for count, key in enumerate(todo, 1):
            print(f"[{count}/{len(todo)}] {key.label()}", flush=True)
            workdir = self.workdir(key)
            if force and workdir.exists():
                shutil.rmtree(workdir)
            scoped = ledger.reset_peak_rss()
            fields = self.train(key, data, workdir)
            extra = {**fields.pop("extra", {}),
                     "peak_rss_scope": "run" if scoped else "process"}
            record = ledger.make_record(
                key, command=commands[key], config=self.run_config(key.method),
                numerics=self.numerics, robustness=fields.pop("robustness", None),
                peak_rss_mb=round(ledger.peak_rss_mb(), 1), machine=machine,
                git_commit=commit, extra=extra, **fields)
            path = self.ledger.write(record)
            print(f"        {self.describe(record)} -> {path}", flush=True)
        return self.report(self.config.workdir)

    def report(self, out: str | Path) -> dict[str, Any]:
        """Reads the ledger (trains nothing); writes ``results.json``, ``results.md`` and
        the figures to ``out``; returns the ``results.json`` content.

        ``results.json``: ``methods`` (``summarize`` of the current records, the
        ``extra_methods`` included), ``complete`` (every expected run has a current
        record), ``expected_runs``, ``current_runs``, ``missing`` and ``stale`` (run
        labels; a stale record, made with another config or numerics, is never in a
        table), ``numerics`` and ``report_fields``. The same records give
        byte-identical files.
        """
        out = Path(out)
        keys = self.keys()
        found = ledger.collect(self.ledger, keys, config_hashes=self.config_hash,
                               numerics=self.numerics, extra_methods=self.extra_methods)
        current = {m: runs for m, runs in found.current.items() if runs}
        summary = self.summarize(current) if current else {}
        result = {"methods": summary, "complete": found.complete,
                  "expected_runs": len(keys),
                  "current_runs": sum(len(r) for m, r in current.items()
                                      if m not in self.extra_methods),
                  "missing": found.missing, "stale": found.stale,
                  "numerics": self.numerics, **self.report_fields()}
        out.mkdir(parents=True, exist_ok=True)
        ledger.write_json(result, out / "results.json")
        head = (f"{result['current_runs']} of {len(keys)} runs have a current record"
                + ("" if found.complete else f"; missing: {len(found.missing)}")
                + (f"; stale (not in the tables): {len(found.stale)}"
                   if found.stale else "") + ".\n\n")
        ledger.write_text(head + (self.tables(summary) if summary else ""),
                          out / "results.md")
        if summary:
            self.plot(summary, out)
        return result

    def docs_markers(self) -> tuple[str, str]:
        """The lines that delimit this experiment's block in a docs page."""
        return (f"<!-- {self.name}-report:begin -->", f"<!-- {self.name}-report:end -->")

    def docs_block(self, report_dir: str | Path) -> str:
        """What ``update_docs`` puts in the page: the markers around ``results.md``."""
        begin, end = self.docs_markers()
        return f"{begin}\n{(Path(report_dir) / 'results.md').read_text()}{end}"


def update_docs(experiment: Experiment, report_dir: str | Path, doc: str | Path) -> None:
    """Replaces ``doc``'s block between the experiment's markers with the report in
    ``report_dir``, and copies its ``figures`` to ``<doc's folder>/figures/<name>_*``.

    Args:
      experiment: whose markers and figures.
      report_dir: a folder ``Experiment.report`` wrote.
      doc: the markdown page holding the markers.

    Raises:
      ValueError: ``doc`` lacks the markers.
    """
    doc, report_dir = Path(doc), Path(report_dir)
    begin, end = experiment.docs_markers()
    text = doc.read_text()
    if begin not in text or end not in text.split(begin, 1)[1]:
        raise ValueError(f"--docs: {doc} has no {begin} ... {end} block (begin, then end).")
    head, rest = text.split(begin, 1)
    ledger.write_text(head + experiment.docs_block(report_dir) + rest.split(end, 1)[1], doc)
    for name in experiment.figures:
        if (report_dir / name).exists():
            (doc.parent / "figures").mkdir(exist_ok=True)
            shutil.copyfile(report_dir / name,
                            doc.parent / "figures" / f"{experiment.name}_{name}")


# ------------------------------------------------------------------ the command line


def add_arguments(parser: argparse.ArgumentParser, *, quick: str) -> None:
    """Adds the flags every experiment shares.

    Args:
      parser: the script's parser.
      quick: the help text of ``--quick``.

    ``--seeds``/``--seed``, ``--workdir``, ``--results``, ``--quick``, ``--progress``,
    ``--shard``, ``--force``, ``--report``, ``--out`` and ``--docs``.
    """
    parser.add_argument("--config", default=None, metavar="TOML",
                        help="settings from a TOML file of config fields (e.g. "
                             "experiments/configs/*.toml); flags given too override it")
    parser.add_argument("--seeds", type=parse_ints, default=None, help="e.g. 0,1,2")
    parser.add_argument("--seed", type=int, default=None, help="a single seed")
    parser.add_argument("--workdir", default=None, help="checkpoints (not committed)")
    parser.add_argument("--results", default=None,
                        help="ledger root (default: results; --quick: WORKDIR/results)")
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--shard", default=None, metavar="I/N",
                        help="take every N-th run of the whole list from I (0-based; a fixed "
                             "split) and train those still to do")
    parser.add_argument("--force", action="store_true",
                        help="retrain (from scratch) runs whose record is current too")
    parser.add_argument("--report", action="store_true",
                        help="train nothing: write the report of the ledger to --out")
    parser.add_argument("--out", default=None, help="report directory (default: workdir)")
    parser.add_argument("--docs", default=None, metavar="MARKDOWN",
                        help="with --report: also put the report between this page's "
                             "<name>-report markers and copy its figures beside it")


def _field_help(config_cls: type) -> dict[str, str]:
    """Field name -> its description in the config class docstring's ``Attributes:``
    (``name: text`` or ``a, b, c: text``, continuation lines indented deeper)."""
    out: dict[str, str] = {}
    names: list[str] = []
    inside = False
    for line in (config_cls.__doc__ or "").splitlines():
        text = line.strip()
        if text == "Attributes:":
            inside = True
            continue
        if not inside:
            continue
        if not text or (not line.startswith(" " * 6) and text.endswith(":")):
            if not text:
                continue
            break
        head, sep, rest = text.partition(": ")
        if sep and line.startswith(" " * 6) and not line.startswith(" " * 7) and all(
                part.strip().isidentifier() for part in head.split(",")):
            names = [part.strip() for part in head.split(",")]
            for name in names:
                out[name] = rest
        else:
            for name in names:
                out[name] += " " + text
    return out


def add_flags(parser: argparse.ArgumentParser, experiment: type[Experiment],
              config_cls: type) -> None:
    """Adds a flag per ``experiment.flags`` entry, typed from ``config_cls``'s field.

    ``bool`` fields get ``--x/--no-x``; ``tuple[int | float | str, ...]``
    comma-separated lists (``--x=1,-2`` for negative values); numbers and strings their
    type. Each flag's value lands in ``args.<field>`` (None when not given) and its help
    is the field's description in the config docstring's ``Attributes:`` section.

    Args:
      parser: the script's parser.
      experiment: the ``Experiment`` subclass whose ``flags`` to add.
      config_cls: its config dataclass.
    """
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    descriptions = _field_help(config_cls)
    for field, flag in experiment.flags:
        annotation = _annotation_text(fields[field].type)
        default = fields[field].default
        if fields[field].default_factory is not dataclasses.MISSING:
            default = fields[field].default_factory()
        kind: dict[str, Any]
        if annotation.startswith("bool"):
            kind = {"action": argparse.BooleanOptionalAction}
        elif annotation.startswith("tuple[int"):
            kind = {"type": parse_ints}
        elif annotation.startswith("tuple[float"):
            kind = {"type": parse_floats}
        elif annotation.startswith("tuple[str"):
            kind = {"type": _parse_strs}
        elif annotation.startswith("tuple"):
            raise TypeError(f"add_flags: {config_cls.__name__}.{field} is {annotation}; "
                            "flags support tuples of int, float or str.")
        else:
            kind = {"type": next((t for t in (int, float) if annotation.startswith(t.__name__)),
                                 str)}
        shown = _flag_value(default) if default is not None else "none"
        parser.add_argument(flag, dest=field, default=None, **kind,
                            help=f"{descriptions.get(field, field)} (default: {shown})")


def flag_overrides(args: argparse.Namespace, experiment: type[Experiment]) -> dict[str, Any]:
    """The config fields given on the command line through ``add_flags``.

    Args:
      args: the parsed arguments.
      experiment: the ``Experiment`` subclass whose ``flags`` were added.

    Returns:
      ``{field: value}`` for every flag that was given.
    """
    return {field: getattr(args, field) for field, _ in experiment.flags
            if getattr(args, field) is not None}


def base_overrides(parser: argparse.ArgumentParser, args: argparse.Namespace,
                   name: str) -> dict[str, Any]:
    """Config overrides from the shared flags.

    Args:
      parser: the parser (bad combinations exit through ``parser.error``).
      args: its parsed arguments.
      name: the experiment's name, for the default workdir.

    Returns:
      ``seeds`` (from ``--seed``/``--seeds``), ``workdir`` (default ``runs/<name>``,
      ``runs/<name>_quick`` with ``--quick``), ``results`` (default ``results``,
      ``WORKDIR/results`` with ``--quick``: a smoke check never writes the committed
      ledger) and ``progress`` when given.
    """
    if args.shard is not None:
        try:
            ledger.shard([], args.shard)
        except ValueError as e:
            parser.error(str(e))
    if args.seed is not None and args.seeds is not None:
        parser.error("give --seed or --seeds, not both")
    if args.docs and not args.report:
        parser.error("--docs needs --report")
    out: dict[str, Any] = {}
    if args.seed is not None or args.seeds is not None:
        out["seeds"] = (args.seed,) if args.seed is not None else args.seeds
    if args.progress is not None:
        out["progress"] = args.progress
    out["workdir"] = args.workdir or f"runs/{name}{'_quick' if args.quick else ''}"
    out["results"] = args.results or (str(Path(out["workdir"]) / "results")
                                      if args.quick else "results")
    return out


def config_file(parser: argparse.ArgumentParser, args: argparse.Namespace,
                config_cls: type) -> dict[str, Any]:
    """The config fields set in ``--config FILE`` (TOML), minus those given as flags.

    Keys are the config dataclass's field names; lists become tuples; each value must
    have its field's type (an int is a float where a float is expected). A missing or
    malformed file, an unknown key or a wrong type ends the program through
    ``parser.error`` (one line naming the file and the key, exit status 2).

    Args:
      parser: the script's parser.
      args: its parsed arguments (``args.config`` the file, or None).
      config_cls: the experiment's config dataclass.

    Returns:
      ``{field: value}``: apply before the flags' overrides (flags win).
    """
    if not args.config:
        return {}
    import tomllib

    path = Path(args.config)
    try:
        settings = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        parser.error(f"--config {path}: cannot read it as TOML ({e})")
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    out = {}
    for key, value in settings.items():
        if key not in fields:
            parser.error(f"--config {path}: unknown setting {key!r}; known: "
                         f"{', '.join(sorted(fields))}")
        try:
            out[key] = _typed(value, _annotation_text(fields[key].type))
        except TypeError as e:
            parser.error(f"--config {path}: {key} = {value!r}: {e}")
    given = {"seeds": args.seeds is not None or args.seed is not None,
             "workdir": args.workdir is not None, "results": args.results is not None,
             "progress": args.progress is not None}
    return {k: v for k, v in out.items() if not given.get(k, False)}


def _annotation_text(kind: Any) -> str:
    """A dataclass field's type as text: ``"float"``, ``"tuple[int, ...]"``, ... (it
    already is a string under ``from __future__ import annotations``)."""
    if isinstance(kind, str):
        return kind
    return kind.__name__ if isinstance(kind, type) else str(kind)


def _typed(value: Any, annotation: str) -> Any:
    """A TOML value as the config field's type (from its annotation text)."""
    for kind in (part.strip() for part in annotation.split("|")):  # TOML has no null
        if kind.startswith("tuple[") and isinstance(value, list):
            item = kind[len("tuple["):].split(",")[0].strip()
            return tuple(_typed(v, item) for v in value)
        if kind == "bool" and isinstance(value, bool):
            return value
        if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind == "str" and isinstance(value, str):
            return value
    raise TypeError(f"expected {annotation}")


def enable_compilation_cache(path: str | Path) -> None:
    """Turns on JAX's persistent compilation cache: later runs (seeds, resumed
    processes) reuse compiled steps.

    Args:
      path: the cache folder.
    """
    import jax

    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def make_config(parser: argparse.ArgumentParser, factory: Callable[..., Any],
                overrides: Mapping[str, Any]) -> Any:
    """``factory(**overrides)``; a value the config rejects is one line and exit 2.

    The config dataclasses validate their fields (distinct seeds, rates in range, known
    strategy names, ...) and raise ``ValueError`` / ``TypeError`` naming the field; on the
    command line that is a bad flag value, reported like argparse's own errors but
    without the usage block: ``<script>: error: <message>`` on stderr, exit status 2.

    Args:
      parser: the script's parser (its ``prog`` names the script).
      factory: the config class or a function such as ``quick_config``.
      overrides: the fields from flags and config files.

    Returns:
      The config.
    """
    try:
        return factory(**overrides)
    except (ValueError, TypeError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")


def make_parser(experiment: type[Experiment], *, doc: str, methods: str,
                quick: str) -> argparse.ArgumentParser:
    """An experiment script's parser: its method flag, the shared flags, its config's.

    Args:
      experiment: the ``Experiment`` subclass (``method_flag``, ``flags``,
        ``config_class``).
      doc: the script's docstring (its first line describes the script in ``--help``).
      methods: the help text of ``experiment.method_flag``.
      quick: the help text of ``--quick``.

    Returns:
      The parser, with ``experiment.method_flag`` (comma-separated names), then
      ``add_arguments``'s flags, then ``add_flags``'s; the script may add its own.
    """
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument(experiment.method_flag, default=None, help=methods)
    add_arguments(parser, quick=quick)
    add_flags(parser, experiment, experiment.config_class)
    return parser


def config_from_args(experiment: type[Experiment], parser: argparse.ArgumentParser,
                     args: argparse.Namespace, **overrides: Any) -> Any:
    """The config a ``make_parser`` command line asks for.

    Later sources win: the shared flags (``base_overrides``), ``--config FILE``
    (``config_file``), the config's flags (``flag_overrides``), ``overrides``, the
    method flag. ``--quick`` builds it with ``experiment.quick_config``. A value the
    config rejects ends the program as ``make_config`` says.

    Args:
      experiment: the ``Experiment`` subclass the parser was made for.
      parser: ``make_parser``'s parser.
      args: its parsed arguments.
      **overrides: config fields from the script's own flags (None: not given).

    Returns:
      The config.
    """
    given = {**base_overrides(parser, args, experiment.name),
             **config_file(parser, args, experiment.config_class),
             **flag_overrides(args, experiment),
             **{k: v for k, v in overrides.items() if v is not None}}
    methods = getattr(args, experiment.method_flag.lstrip("-").replace("-", "_"))
    if methods is not None:
        given[experiment.methods_field] = tuple(m for m in methods.split(",") if m)
    factory = experiment.quick_config if args.quick and experiment.quick_config else (
        experiment.config_class)
    return make_config(parser, factory, given)


def run_main(experiment: Experiment, args: argparse.Namespace) -> int:
    """What an experiment script's ``main`` does after parsing.

    Validates the methods, then trains what is missing and reports (or, with
    ``--report``, only reports and optionally updates ``--docs``), and prints the tables.
    A non-finite number never reaches a report: seed statistics and the JSON writer
    reject it with an error naming the value.

    Args:
      experiment: the experiment over the parsed config.
      args: the parsed arguments (``report``, ``docs``, ``out``, ``shard``, ``force``).

    Returns:
      The exit status: 0, or 2 for an unknown method (one line on stderr).
    """
    try:
        experiment.methods()
    except ValueError as e:
        print(f"{Path(experiment.script).name}: error: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    out = Path(args.out or experiment.config.workdir)
    if args.report:
        result = experiment.report(out)
        if args.docs:
            update_docs(experiment, out, args.docs)
    else:
        enable_compilation_cache(Path(experiment.config.workdir) / "jax_cache")
        result = experiment.run(shard=args.shard, force=args.force)
        if args.out:
            result = experiment.report(out)
    print()
    print((out / "results.md").read_text(), end="")
    print(f"\n{out / 'results.json'}  complete: {str(result['complete']).lower()}  "
          f"({time.perf_counter() - start:.0f} s)")
    return 0


def run_script(main: Callable[[], int]) -> None:
    """What a training script does under ``if __name__ == "__main__":``.

    Tunes glibc's malloc for this process (freed step buffers are reused: faster steps;
    ``lepton_mm.training.tune_glibc_malloc``, docs/performance.md), then exits with
    ``main()``'s status. Tests call ``main`` itself, which leaves malloc alone.

    Args:
      main: the script's ``main`` (parses ``sys.argv``; returns the exit status).
    """
    from lepton_mm.training import tune_glibc_malloc

    tune_glibc_malloc()
    sys.exit(main())
