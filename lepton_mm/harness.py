"""One harness for ledgered experiments: train the runs the ledger lacks, report the rest.

An experiment script subclasses ``Experiment`` with what is its own (the config,
the data, how one run trains, how the records read as tables) and gets the rest from
here: the run keys and the to-do list from the ledger (``lepton_mm.experiment``),
sharding, a checkpoint workdir per run that a changed config never resumes, records
with the command that reproduces them, the report (``results.json``, ``results.md``,
figures; ``seed_stats_of``, ``curve_stats``, ``markdown_table`` and ``plot_curves``
help write it, and ``group_by_method`` and ``mean_std_text`` a script's own tables)
and its copy into a docs page. Its command line comes from ``lepton_mm.cli``,
generated from the config dataclass (``--seeds``, ``--shard``, ``--force``,
``--report``, ``--out``, ``--docs``, ``--config FILE``, a flag per field of
``flags``)::

    class MyExperiment(Experiment):
        name, script = "mine", "experiments/mine.py"
        config_class, quick_config = MyConfig, staticmethod(my_quick_config)
        flags = cli.config_flags(MyConfig, ["epochs", "learning_rate"])
        def methods(self): return ["a", "b"]
        def train(self, key, data, workdir): ...   # -> make_record's fields
        def summarize(self, runs): ...             # -> per-method summary
        def tables(self, summary): ...             # -> markdown

    def parse_args(argv=None):
        parser = cli.make_parser(MyExperiment, doc=__doc__, methods="a, b", quick="fast")
        args = parser.parse_args(argv)
        return cli.config_from_args(MyExperiment, parser, args), args

    def main(argv=None):
        config, args = parse_args(argv)
        return cli.run_main(MyExperiment(config), args)

    if __name__ == "__main__":
        cli.run_script(main)

Nothing here imports JAX at module level; ``Experiment.run`` imports it to record
the device kind.
"""

from __future__ import annotations

import abc
import dataclasses
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from lepton_mm import experiment as ledger
from lepton_mm.experiment import NUMERICS, RunKey

__all__ = [
    "Experiment",
    "curve_stats",
    "enable_compilation_cache",
    "fit_facts",
    "flag_text",
    "group_by_method",
    "markdown_table",
    "mean_std_text",
    "plot_curves",
    "run_costs",
    "seed_stats_of",
    "update_docs",
]


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


def group_by_method(results: Mapping[str, Any]) -> dict[str, list[Any]]:
    """A script's per-run results grouped by method, for its tables and figures.

    Args:
      results: ``{"<method>/seed<k>": record}`` (e.g. ``concat+mdrop/seed1``).

    Returns:
      ``{method: [record, ...]}``, methods and records in order of appearance.

    Examples:
      >>> group_by_method({"concat/seed0": 1, "late/seed0": 2, "concat/seed1": 3})
      {'concat': [1, 3], 'late': [2]}
    """
    grouped: dict[str, list[Any]] = {}
    for name, record in results.items():
        grouped.setdefault(name.split("/seed")[0], []).append(record)
    return grouped


def mean_std_text(values: Sequence[float], *, scale: float = 100.0,
                  digits: int = 1) -> str:
    """``"mean ± sample std"`` of numbers over seeds, for a table cell.

    ``lepton_mm.experiment.format_mean_std`` of their mean and sample std (ddof=1),
    without a seed per value.

    Args:
      values: one number per seed (at least one).
      scale: multiply by this (default 100: fractions as percentages).
      digits: decimals.

    Returns:
      ``"mean ± std"``; just ``"mean"`` for one value.

    Raises:
      ValueError: ``values`` is empty.

    Examples:
      >>> mean_std_text([0.6, 0.5]), mean_std_text([4.4], scale=1.0, digits=2)
      ('55.0 ± 7.1', '4.40')
    """
    if len(values) == 0:
        raise ValueError("mean_std_text: values is empty")
    return ledger.format_mean_std(
        {"mean": float(np.mean(values)),
         "std": float(np.std(values, ddof=1)) if len(values) > 1 else None},
        scale=scale, digits=digits)


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


def flag_text(value: Any) -> str:
    """A config value as command-line text that parses back to exactly ``value``.

    Args:
      value: a bool, int, float, str, None or a tuple of them.

    Returns:
      Comma-separated items for a tuple; a float as short as it reads back exactly
      (``"0.001"``, ``"-15"``), else every digit; ``"none"`` for None.

    Examples:
      >>> flag_text((20.0, -5.5)), flag_text(1e-3), flag_text(0.1 + 0.2), flag_text(None)
      ('20,-5.5', '0.001', '0.30000000000000004', 'none')
    """
    if value is None:
        return "none"
    if isinstance(value, (tuple, list)):
        return ",".join(flag_text(v) for v in value)
    if isinstance(value, float):
        short = f"{value:g}"  # "0.001", "-15": what a person types
        return short if float(short) == value else repr(value)  # else every digit
    return str(value)


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
      config_class: the config dataclass (``lepton_mm.cli.make_parser``,
        ``config_from_args``).
      quick_config: the function that makes the ``--quick`` config from overrides (set
        it as ``staticmethod(quick_config)``; None: ``--quick`` only sets ``quick``).
      method_flag: the script's flag that picks methods (``--fusion``, ``--parts``).
      methods_field: the config field that flag sets (``methods``, ``parts``).
      numerics: the numerics version records must carry to be current.
      extra_methods: rows the experiment does not train (a peer library's), reported
        when their records carry the current numerics.
      not_recorded: config fields no run's result depends on (never hashed).
      flags: ``(config field, command-line flag)`` pairs: the script's flags
        (``lepton_mm.cli.add_flags``; ``cli.config_flags`` names them) and, for fields
        whose value differs from the default config's, words of ``command``.
      method_fields: config fields ``method_args`` writes on the command line instead
        (e.g. a rate that is part of the method's name; their flags, if any, are in
        ``flags`` too).
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
            if field == "data_seed" or field in self.method_fields:  # written above
                continue
            value, default = getattr(self.config, field), getattr(defaults, field)
            if value == default:
                continue
            if isinstance(value, bool):
                words.append(flag if value else f"--no-{flag[2:]}")
            else:
                words.append(f"{flag}={flag_text(value)}")
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


def enable_compilation_cache(path: str | Path) -> None:
    """Turns on JAX's persistent compilation cache: later runs (seeds, resumed
    processes) reuse compiled steps.

    Args:
      path: the cache folder.
    """
    import jax

    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
