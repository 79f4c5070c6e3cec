"""lepton_mm.harness and lepton_mm.cli: to-do lists, records, reports, docs blocks and the
command line generated from a config, on a toy experiment that trains nothing (each run's
"accuracy" is a function of its key)."""

import argparse
import dataclasses
import json
import math
import re
import types

import pytest

from lepton_mm import cli, harness
from lepton_mm import experiment as ledger
from lepton_mm.experiment import RunKey


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    """A toy config.

    Attributes:
      methods, seeds: what to run.
      rate: how fast, in a description that
        continues on the next line.
      levels: the sweep.

    Returns:
      nothing (a section after Attributes ends it).
    """

    methods: tuple[str, ...] = ("a", "b")
    seeds: tuple[int, ...] = (0, 1)
    data_seed: int = 0
    workdir: str = "runs/toy"
    results: str = "results"
    quick: bool = False
    progress: bool | None = None
    rate: float = 0.5
    levels: tuple[float, ...] = (1.0, 2.5)
    noisy: bool = True
    tags: tuple[str, ...] = ("x",)


class Toy(harness.Experiment):
    name, script = "toy", "experiments/toy.py"
    flags = (("rate", "--rate"), ("levels", "--levels"), ("noisy", "--noisy"),
             ("tags", "--tags"))
    extra_methods = ("peer",)
    figures = ("curve.png",)

    def __init__(self, config):
        super().__init__(config)
        self.trained = []

    def methods(self):
        for m in self.config.methods:
            if m not in ("a", "b", "nan"):
                raise ValueError(f"Unrecognized method: {m!r}.")
        return list(self.config.methods)

    def prepare(self, todo):
        return {"prepared_for": len(todo)}

    def train(self, key, data, workdir):
        assert data == {"prepared_for": data["prepared_for"]}
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "ckpt").write_text("x")
        self.trained.append(key)
        acc = math.nan if key.method == "nan" else 0.5 + 0.1 * key.seed + self.config.rate / 10
        return {"metrics": {"test_accuracy": min(acc, 1.0) if acc == acc else 0.5,
                            "val_accuracy": 0.4, "raw": acc if acc == acc else None},
                "params": 7, "seconds_per_epoch": 1.5, "extra": {"note": key.method}}

    def summarize(self, runs):
        out = {}
        for m, rs in runs.items():
            out[m] = ledger.seed_stats({str(r["seed"]): r["metrics"]["test_accuracy"]
                                        for r in rs})
            if m == "nan":
                out[m]["mean"] = math.nan
        return out

    def tables(self, summary):
        return "".join(f"| {m} | {ledger.format_mean_std(s)} |\n" for m, s in summary.items())

    def plot(self, summary, out):
        (out / "curve.png").write_bytes(b"\x89PNG fake")
        return [out / "curve.png"]


class Unflagged(Toy):
    @dataclasses.dataclass(frozen=True)
    class Config(ToyConfig):
        unflagged: int = 1


def _toy(tmp_path, **overrides):
    return Toy(ToyConfig(workdir=str(tmp_path / "runs"), results=str(tmp_path / "results"),
                         **overrides))


def test_run_writes_a_record_per_run_then_trains_nothing(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(ledger, "git_commit",
                        lambda *a, **k: calls.append(1) or f"commit{len(calls)}")
    toy = _toy(tmp_path, rate=1.0)
    result = toy.run()
    assert len(calls) == 1
    assert toy.trained == toy.keys() == [RunKey("toy", m, s) for m in "ab" for s in (0, 1)]
    assert result["complete"] and result["current_runs"] == 4 and result["expected_runs"] == 4
    record = ledger.read_record(tmp_path / "results" / "toy" / "b" / "seed1.json")
    assert record["command"] == "python experiments/toy.py --methods b --seeds 1 --rate=1 --force"
    assert record["git_commit"] == "commit1"  # captured once, when the call started
    assert record["config"] == {"data_seed": 0, "rate": 1.0, "levels": [1.0, 2.5],
                                "noisy": True, "tags": ["x"], "method": "b"}
    assert record["config_hash"] == toy.config_hash(RunKey("toy", "b", 1))
    assert record["params"] == 7 and record["note"] == "b"
    assert record["peak_rss_scope"] in ("run", "process") and record["peak_rss_mb"] > 0
    assert record["metrics"]["test_accuracy"] == pytest.approx(0.7)
    # Nothing left to do: a second process trains nothing and reports the same.
    again = _toy(tmp_path, rate=1.0)
    assert again.run() == result and again.trained == []
    # Forced: trains every run again from scratch (its workdir is removed first).
    workdir = toy.workdir(RunKey("toy", "a", 0))
    (workdir / "stale-file").write_text("old")
    forced = _toy(tmp_path, rate=1.0)
    forced.run(shard="0/2", force=True)
    assert forced.trained == toy.keys()[0::2] and not (workdir / "stale-file").exists()


def test_shards_are_a_fixed_split_of_all_runs(tmp_path):
    """Workers that start at different times (or restart) never skip or repeat a run:
    each shard is fixed by the whole run list, not by what is still missing."""
    keys = _toy(tmp_path).keys()
    first = _toy(tmp_path)
    first.run(shard="0/2")  # shard 0 finishes before shard 1 starts
    assert first.trained == keys[0::2]
    second = _toy(tmp_path)
    assert second.todo(shard="1/2") == keys[1::2]
    second.run(shard="1/2")
    assert second.trained == keys[1::2]
    restarted = _toy(tmp_path)
    restarted.run(shard="0/2")
    assert restarted.trained == [] and restarted.report(tmp_path / "r")["complete"]


def test_workdirs_and_hashes_follow_the_config(tmp_path):
    toy, other = _toy(tmp_path), _toy(tmp_path, rate=0.25)
    key = RunKey("toy", "a", 0)
    assert toy.workdir(key).is_absolute() and toy.workdir(key).parent.name == "a"
    assert toy.workdir(key).name.startswith("seed0-")
    assert toy.workdir(key) != other.workdir(key)
    assert toy.config_hash(key) != other.config_hash(key)
    # Not recorded (seeds, paths, progress): the same run.
    moved = Toy(dataclasses.replace(toy.config, seeds=(0, 5), progress=True,
                                    workdir=toy.config.workdir))
    assert moved.config_hash(key) == toy.config_hash(key)
    assert toy.workdir(RunKey("toy", "a", 0, 2)).name.startswith("seed0-data2-")


def test_report_is_byte_identical_lists_stale_and_shows_extra_rows(tmp_path):
    toy = _toy(tmp_path)
    toy.run()
    # A peer's record (another producer, same numerics) is a row, never "missing".
    peer = ledger.make_record(
        RunKey("toy", "peer", 0), command="python peer.py", config={}, numerics=toy.numerics,
        metrics={"test_accuracy": 0.3, "val_accuracy": 0.3}, robustness=None, params=1,
        seconds_per_epoch=None, peak_rss_mb=1.0, machine={}, versions={}, git_commit=None)
    toy.ledger.write(peer)
    first = toy.report(tmp_path / "r1")
    second = toy.report(tmp_path / "r2")
    assert first == second and "peer" in first["methods"] and first["current_runs"] == 4
    for name in ("results.json", "results.md", "curve.png"):
        assert (tmp_path / "r1" / name).read_bytes() == (tmp_path / "r2" / name).read_bytes()
    assert json.loads((tmp_path / "r1" / "results.json").read_text()) == first
    assert (tmp_path / "r1" / "results.md").read_text().startswith(
        "4 of 4 runs have a current record.\n\n| a |")
    # Another config: every record is stale, listed, and in no table.
    stale = _toy(tmp_path, levels=(1.0, 3.0)).report(tmp_path / "r3")
    assert not stale["complete"] and set(stale["methods"]) == {"peer"}
    assert stale["stale"] == sorted(stale["missing"]) and len(stale["missing"]) == 4
    assert (tmp_path / "r3" / "results.md").read_text().startswith(
        "0 of 4 runs have a current record; missing: 4; stale (not in the tables): 4.")


def test_command_writes_only_what_differs_and_round_trips(tmp_path):
    toy = _toy(tmp_path, rate=0.00123456789, levels=(0.0, -3.0), noisy=False, quick=True,
               tags=("p", "q"))
    command = toy.command(RunKey("toy", "a", 2, 4))
    assert command == ("python experiments/toy.py --quick --methods a --seeds 2 "
                       "--data-seed 4 --rate=0.00123456789 --levels=0,-3 --no-noisy "
                       "--tags=p,q --force")
    # A recorded setting with no flag cannot be written: no unreproducible command.
    with pytest.raises(ValueError, match="unflagged=2 differs from the default"):
        Unflagged(Unflagged.Config(unflagged=2)).command(RunKey("toy", "a", 0))
    parser = cli.script_parser("Toy.")
    parser.add_argument("--methods")
    cli.add_arguments(parser, quick="q")
    cli.add_flags(parser, ToyConfig, (("data_seed", "--data-seed"), *Toy.flags))
    args = parser.parse_args(command.split()[2:])
    assert (args.quick, args.seeds, args.data_seed, args.rate, args.levels, args.noisy,
            args.tags, args.force) == (True, (2,), 4, 0.00123456789, (0.0, -3.0), False,
                                       ("p", "q"), True)
    # Every digit survives: the command's config is the record's (same hash).
    again = _toy(tmp_path, rate=args.rate, levels=args.levels, noisy=args.noisy,
                 quick=True, tags=args.tags)
    assert again.config_hash(RunKey("toy", "a", 2, 4)) == toy.config_hash(
        RunKey("toy", "a", 2, 4))


def test_add_flags_types_help_and_overrides(capsys):
    parser = cli.script_parser("Toy.")
    cli.add_flags(parser, ToyConfig, Toy.flags)
    args = parser.parse_args(["--rate", "0.25", "--levels=-1,2", "--no-noisy",
                              "--tags", "a,b"])
    assert (args.rate, args.levels, args.noisy, args.tags) == (0.25, (-1.0, 2.0), False,
                                                               ("a", "b"))
    assert cli.flag_overrides(args, Toy.flags) == {"rate": 0.25, "levels": (-1.0, 2.0),
                                                   "noisy": False, "tags": ("a", "b")}
    assert cli.flag_overrides(parser.parse_args([]), Toy.flags) == {}  # the config's
    assert cli.flag_overrides(parser.parse_args(["--levels", "", "--tags", "p,,q"]),
                              Toy.flags) == {"levels": (), "tags": ("p", "q")}
    # A malformed value is one line naming the flag, exit status 2 (no usage block).
    for argv, message in ((["--rate", "fast"], "argument --rate: expected a number, got "
                                               "'fast'"),
                          (["--levels", "1,x"], "argument --levels: expected "
                                                "comma-separated numbers, got '1,x'"),
                          (["--speed", "1"], "unrecognized arguments: --speed 1")):
        with pytest.raises(SystemExit) as info:
            parser.parse_args(argv)
        assert info.value.code == 2
        assert capsys.readouterr().err.splitlines() == [f"{parser.prog}: error: {message}"]
    assert "--rate RATE" in parser.format_help()
    help_text = " ".join(parser.format_help().split())
    assert ("how fast, in a description that continues on the next line. (default: 0.5)"
            in help_text)
    assert "the sweep. (default: 1,2.5)" in help_text and "nothing" not in help_text


def test_base_overrides_and_bad_flag_combinations():
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser, quick="q")
    args = parser.parse_args(["--seed", "3"])
    assert cli.base_overrides(parser, args, "toy") == {
        "seeds": (3,), "workdir": "runs/toy", "results": "results"}
    args = parser.parse_args(["--quick", "--no-progress", "--seeds", "0,1"])
    assert cli.base_overrides(parser, args, "toy") == {
        "seeds": (0, 1), "progress": False, "workdir": "runs/toy_quick",
        "results": "runs/toy_quick/results"}  # a smoke check never writes results/
    for bad in (["--seed", "1", "--seeds", "1,2"], ["--shard", "2/2"], ["--docs", "x.md"]):
        with pytest.raises(SystemExit):
            cli.base_overrides(parser, parser.parse_args(bad), "toy")


def test_update_docs_replaces_only_the_marked_block_and_copies_figures(tmp_path):
    toy = _toy(tmp_path)
    report = tmp_path / "report"
    report.mkdir()
    (report / "results.md").write_text("| a |\n")
    (report / "curve.png").write_bytes(b"png")
    begin, end = toy.docs_markers()
    assert (begin, end) == ("<!-- toy-report:begin -->", "<!-- toy-report:end -->")
    doc = tmp_path / "docs" / "page.md"
    doc.parent.mkdir()
    doc.write_text(f"intro\n{begin}\nold table\n{end}\nafter\n")
    harness.update_docs(toy, report, doc)
    assert doc.read_text() == f"intro\n{begin}\n| a |\n{end}\nafter\n"
    assert (tmp_path / "docs" / "figures" / "toy_curve.png").read_bytes() == b"png"
    (tmp_path / "plain.md").write_text("no markers\n")
    with pytest.raises(ValueError, match="--docs: .*no"):
        harness.update_docs(toy, report, tmp_path / "plain.md")
    (tmp_path / "reversed.md").write_text(f"{end}\nx\n{begin}\n")
    with pytest.raises(ValueError, match="begin, then end"):
        harness.update_docs(toy, report, tmp_path / "reversed.md")


def test_run_main_exit_codes(tmp_path, capsys):
    def args(**kw):
        return types.SimpleNamespace(**{"report": False, "docs": None, "out": None,
                                        "shard": None, "force": False, **kw})

    bad = _toy(tmp_path, methods=("a", "zzz"))
    assert cli.run_main(bad, args()) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["toy.py: error: Unrecognized method: 'zzz'."]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()
    assert cli.run_main(_toy(tmp_path, methods=("a",)), args()) == 0
    assert "complete: true" in capsys.readouterr().out
    # A non-finite number never reaches a report.
    with pytest.raises(ValueError, match="nan"):
        cli.run_main(_toy(tmp_path, methods=("nan",)), args())
    out = tmp_path / "only-report"
    assert cli.run_main(_toy(tmp_path, methods=("a",)), args(report=True, out=out)) == 0
    assert (out / "results.md").exists()


def test_fit_facts_and_all_finite():
    history = [{"epoch": 1, "step": 10, "train_loss": 0.91234567, "eval": {"accuracy": 0.5,
                                                                         "loss": 1.0}},
               {"epoch": 2, "step": 20, "train_loss": 0.5, "eval": {"accuracy": 0.7,
                                                                   "loss": 0.8}},
               {"epoch": 3, "step": 30, "train_loss": 0.4, "eval": {"accuracy": 0.6,
                                                                   "loss": 0.9}}]
    fitted = types.SimpleNamespace(history=history, best_step=20, resumed_from=10)
    facts = harness.fit_facts(fitted, 9.0, eval_metrics=("accuracy", "loss"))
    assert facts["best_epoch"] == 2 and facts["epochs"] == 3
    assert facts["seconds_per_epoch"] == 4.5  # two epochs trained by this call
    assert facts["history"][0] == {"epoch": 1, "train_loss": 0.912346, "val_accuracy": 0.5,
                                   "val_loss": 1.0}
    restored = types.SimpleNamespace(history=history, best_step=30, resumed_from=30)
    assert harness.fit_facts(restored, 1.0)["seconds_per_epoch"] is None
    assert cli.parse_ints("0, 1,,2") == (0, 1, 2)
    assert cli.parse_floats("-15,2.5") == (-15.0, 2.5)


def test_seed_stats_of_a_methods_records():
    runs = [{"seed": 1, "m": 0.5}, {"seed": 0, "m": 0.75}]
    assert harness.seed_stats_of(runs, lambda r: r["m"]) == ledger.seed_stats(
        {"0": 0.75, "1": 0.5})
    assert harness.seed_stats_of(runs, lambda r: r["m"] if r["seed"] else None) is None


def test_group_by_method_and_mean_std_text():
    results = {"concat/seed0": 1, "concat+mdrop/seed0": 2, "concat/seed1": 3}
    assert harness.group_by_method(results) == {"concat": [1, 3], "concat+mdrop": [2]}
    assert list(harness.group_by_method(results)) == ["concat", "concat+mdrop"]
    assert harness.mean_std_text([0.6, 0.5]) == "55.0 ± 7.1"  # sample std, in %
    assert harness.mean_std_text([0.3]) == "30.0"
    assert harness.mean_std_text([4.4, 4.0, 4.8], scale=1.0, digits=2) == "4.40 ± 0.40"
    with pytest.raises(ValueError, match="values is empty"):
        harness.mean_std_text([])


def test_curve_stats_table_and_curve_figure(tmp_path):
    runs = [{"c": [0.0, None, 1.0]}, {"c": [1.0, 0.5, 0.0]}, {"c": [0.5, 1.5, 0.5]}]
    stats = harness.curve_stats(runs, lambda r: r["c"])  # None: left out of its point
    assert stats == {"mean": [0.5, 1.0, 0.5], "std": [0.5, 0.7071, 0.5]}
    assert harness.curve_stats(runs[1:2], lambda r: r["c"]) == {"mean": [1.0, 0.5, 0.0],
                                                                "std": None}
    assert harness.markdown_table(["a", "b"], [[1, "x"], ["y", 2.5]]) == [
        "| a | b |", "|---|---|", "| 1 | x |", "| y | 2.5 |"]
    path = harness.plot_curves(
        {"m (2)": {"x": [1, 2, 3], **stats}, "one": {"x": [1, 2, 3], "mean": [0, 1, 0],
                                                      "std": None}},
        tmp_path / "c.png", xlabel="x", ylabel="y", title="t", styles={"one": "--"},
        hline=(0.1, "chance"), ylim=(-1, 2), legend_title="method")
    assert path == tmp_path / "c.png" and path.read_bytes()[:4] == b"\x89PNG"


def _quick_toy(**overrides):
    return ToyConfig(**{"rate": 0.1, "quick": True, **overrides})


class Scripted(Toy):
    config_class, quick_config = ToyConfig, staticmethod(_quick_toy)
    method_flag = "--kinds"


def test_make_parser_and_config_from_args_give_a_scripts_command_line():
    parser = cli.make_parser(Scripted, doc="Toy: trains nothing.\n\nMore.",
                             methods="a or b", quick="fast")
    assert parser.description == "Toy: trains nothing."
    help_text = " ".join(parser.format_help().split())
    assert "--kinds KINDS a or b" in help_text and "--quick fast" in help_text
    assert "--rate RATE" in help_text and "--shard I/N" in help_text
    # Every field is in --help: those without a flag in a closing list.
    assert help_text.endswith("settings only a --config file sets (ToyConfig): "
                              "data_seed: data_seed (default: 0)")
    args = parser.parse_args(["--kinds", "b,a,", "--seed", "2", "--rate", "0.7",
                              "--levels", "3"])
    config = cli.config_from_args(Scripted, parser, args)
    assert config == ToyConfig(methods=("b", "a"), seeds=(2,), rate=0.7, levels=(3.0,))
    # --quick builds on the quick config (flags still win); `command` compares with it.
    quick = cli.config_from_args(Scripted, parser, parser.parse_args(["--quick"]))
    assert quick == _quick_toy(workdir="runs/toy_quick", results="runs/toy_quick/results")
    assert Scripted(quick).default_config() == _quick_toy()
    assert Toy(quick).default_config() == ToyConfig()  # no quick_config: the defaults
    faster = dataclasses.replace(quick, rate=0.2)
    assert Scripted(faster).command(RunKey("toy", "a", 0)) == (
        "python experiments/toy.py --quick --kinds a --seeds 0 --rate=0.2 --force")
    args = parser.parse_args(["--quick", "--rate", "0.2", "--kinds", "a", "--seeds", "0"])
    assert cli.config_from_args(Scripted, parser, args) == dataclasses.replace(
        faster, methods=("a",), seeds=(0,))


@dataclasses.dataclass(frozen=True)
class _Tool:
    """A tool's settings.

    Attributes:
      methods: what to run.
      limit: at most this many (None: all).
      out: where to write.
      table: a mapping (no flag).
    """

    methods: tuple[str, ...] = ("a",)
    limit: int | None = 5
    out: str | None = None
    table: dict | None = None

    def __post_init__(self):
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit: expected an integer >= 1, got {self.limit}.")


def test_config_flags_optional_values_and_config_errors(capsys):
    flags = cli.config_flags(_Tool, ("methods", "limit", "out"), names={"methods": "--use"})
    assert flags == (("methods", "--use"), ("limit", "--limit"), ("out", "--out"))
    assert cli.config_flags(_Tool)[-1] == ("table", "--table")
    parser = cli.script_parser("A tool.\n\nMore.")
    cli.add_flags(parser, _Tool, flags)
    given = cli.flag_overrides(parser.parse_args(["--use", "b,c", "--limit", "none",
                                                  "--out", "x.json"]), flags)
    assert given == {"methods": ("b", "c"), "limit": None, "out": "x.json"}
    assert cli.make_config(parser, _Tool, given) == _Tool(("b", "c"), None, "x.json")
    assert "(default: 5)" in parser.format_help() and "--use METHODS" in parser.format_help()
    # A value the config rejects: one line naming the field, exit status 2.
    with pytest.raises(SystemExit) as info:
        cli.make_config(parser, _Tool, {"limit": 0})
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"{parser.prog}: error: limit: expected an integer >= 1, got 0."]
    with pytest.raises(TypeError, match=r"_Tool\.table is dict \| None; flags support"):
        cli.add_flags(cli.script_parser("A tool."), _Tool, (("table", "--table"),))


def test_run_script(monkeypatch):
    import lepton_mm.training

    tuned = []
    monkeypatch.setattr(lepton_mm.training, "tune_glibc_malloc", lambda: tuned.append(1))
    with pytest.raises(SystemExit) as info:
        cli.run_script(lambda: 3)
    assert info.value.code == 3 and tuned == [1]


def _config_parser():
    parser = argparse.ArgumentParser(prog="toy.py")
    cli.add_arguments(parser, quick="q")
    cli.add_flags(parser, ToyConfig, Toy.flags)
    return parser


def _from_file(tmp_path, text, argv=()):
    path = tmp_path / "c.toml"
    path.write_text(text)
    parser = _config_parser()
    args = parser.parse_args(["--config", str(path), *argv])
    return {**cli.base_overrides(parser, args, "toy"),
            **cli.config_file(parser, args, ToyConfig),
            **cli.flag_overrides(args, Toy.flags)}


def test_config_files_set_typed_fields_and_flags_override_them(tmp_path):
    got = _from_file(tmp_path, 'rate = 1\nlevels = [0.5, 2]\ntags = ["p"]\nseeds = [3, 4]\n'
                               'noisy = false\nworkdir = "w"\n')
    assert got == {"seeds": (3, 4), "workdir": "w", "results": "results", "rate": 1.0,
                   "levels": (0.5, 2.0), "tags": ("p",), "noisy": False}
    assert isinstance(got["rate"], float)
    got = _from_file(tmp_path, 'rate = 1\nseeds = [3]\nworkdir = "w"\n',
                     ["--rate", "0.25", "--seed", "7", "--workdir", "x"])
    assert (got["rate"], got["seeds"], got["workdir"]) == (0.25, (7,), "x")


@pytest.mark.parametrize("text, match", [
    ("speed = 1\n", r"--config .*c.toml: unknown setting 'speed'; known: .*rate"),
    ('rate = "fast"\n', r"rate = 'fast': expected float"),
    ("levels = 1.0\n", r"levels = 1.0: expected tuple\[float, ...\]"),
    ("noisy = 1\n", r"noisy = 1: expected bool"),
    ("rate = \n", r"cannot read it as TOML"),
])
def test_bad_config_files_are_one_line_errors(tmp_path, capsys, text, match):
    with pytest.raises(SystemExit) as exit_info:
        _from_file(tmp_path, text)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(match, err), err


@pytest.mark.parametrize("name, experiment, published", [
    ("avmnist", "AVMNIST", ["--fusion", "all", "--seeds", "0,1,2"]),
    ("mustard", "MUStARD", ["--seeds", "0,1,2"]),
    ("alignment", "Alignment", ["--seeds", "0"]),
])
def test_the_shipped_table_configs_are_the_published_commands(load_script, name, experiment,
                                                              published):
    """`--config experiments/configs/<name>_table.toml` trains exactly the runs of the
    command docs/results.md gives: the same run keys with the same config hashes (so the
    same records)."""
    script = load_script(name)
    from_file = getattr(script, experiment)(script.parse_args(
        ["--config", f"experiments/configs/{name}_table.toml"])[0])
    from_flags = getattr(script, experiment)(script.parse_args(published)[0])
    assert from_file.keys() == from_flags.keys() and len(from_file.keys()) >= 3
    assert [from_file.config_hash(k) for k in from_file.keys()] == [
        from_flags.config_hash(k) for k in from_flags.keys()]
