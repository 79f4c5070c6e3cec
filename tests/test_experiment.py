"""lepton_mm.experiment: run keys, config hashes, atomic records, the ledger and reports.

Pure Python: nothing here trains a model or uses JAX.
"""

import doctest
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lepton_mm import experiment
from lepton_mm.experiment import Ledger, RunKey

MODULE_PATH = Path(experiment.__file__)


def _record(key, *, config=None, numerics="float32", metrics=None, **overrides):
    """A valid record with no machine/versions/git look-ups (fast, deterministic)."""
    kwargs = dict(
        command=f"python experiments/avmnist.py --method {key.method} --seed {key.seed}",
        config={"lr": 0.001, "epochs": 3} if config is None else config,
        numerics=numerics,
        metrics={"test_accuracy": 0.8, "val_accuracy": 0.75} if metrics is None else metrics,
        robustness=None, params=1234, seconds_per_epoch=2.5, peak_rss_mb=512.0,
        machine={"cpu": "test"}, versions={"jax": "0.0"}, git_commit=None)
    kwargs.update(overrides)
    return experiment.make_record(key, **kwargs)


def _key(method="concat", seed=0, data_seed=0):
    return RunKey(experiment="avmnist", method=method, seed=seed, data_seed=data_seed)


# ------------------------------------------------------------------------- run keys


def test_record_path_and_label(tmp_path):
    assert _key().record_path(tmp_path) == tmp_path / "avmnist" / "concat" / "seed0.json"
    key = _key("concat+mdrop", seed=1, data_seed=2)
    assert key.record_path(tmp_path) == tmp_path / "avmnist" / "concat+mdrop" / "seed1-data2.json"
    assert key.label() == "avmnist/concat+mdrop/seed1-data2"
    assert _key(seed=3).label() == "avmnist/concat/seed3"


@pytest.mark.parametrize("field, kwargs", [
    ("experiment", dict(experiment="AVMNIST")),
    ("experiment", dict(experiment="av-mnist")),
    ("experiment", dict(experiment="")),
    ("method", dict(method="a/b")),
    ("method", dict(method="late fusion")),
    ("method", dict(method="")),
    ("method", dict(method="..")),
    ("seed", dict(seed=-1)),
    ("seed", dict(seed=1.0)),
    ("seed", dict(seed=True)),
    ("data_seed", dict(data_seed=-2)),
])
def test_run_key_rejects_invalid_fields(field, kwargs):
    args = dict(experiment="avmnist", method="concat", seed=0) | kwargs
    with pytest.raises(ValueError, match=f"RunKey: {field} "):
        RunKey(**args)


# ---------------------------------------------------------------------- config hash


def test_config_hash_is_the_documented_sha256():
    reference = hashlib.sha256(b'{"a":[1,2],"b":{"c":0.1,"d":"x"}}').hexdigest()[:16]
    assert experiment.config_hash({"b": {"d": "x", "c": 0.1}, "a": (1, 2)}) == reference


def test_config_hash_key_order_tuples_and_values():
    h = experiment.config_hash
    assert h({"a": 1, "b": {"c": 2, "d": 3}}) == h({"b": {"d": 3, "c": 2}, "a": 1})
    assert h({"sizes": (1, 2)}) == h({"sizes": [1, 2]})
    assert h({"lr": 0.1}) != h({"lr": 0.2})
    assert h({"lr": 0.1}) != h({"lr": 0.1, "epochs": 3})
    assert h({"x": [1, 2]}) != h({"x": [2, 1]})


def test_config_hash_names_the_offending_key_path():
    with pytest.raises(TypeError, match=r"config\['optimizer'\]\['schedule'\]"):
        experiment.config_hash({"optimizer": {"schedule": object()}})
    with pytest.raises(TypeError, match=r"config\['sizes'\]\[1\]"):
        experiment.config_hash({"sizes": [1, np.int64(2)]})
    with pytest.raises(TypeError, match="non-string key 3"):
        experiment.config_hash({"a": {3: "x"}})
    with pytest.raises(ValueError, match=r"config\['lr'\] must be finite"):
        experiment.config_hash({"lr": float("nan")})


# ---------------------------------------------------------------------- make_record


def test_make_record_fills_hash_and_timestamp():
    record = _record(_key(seed=2, data_seed=1), extra={"note": "x"})
    assert record["config_hash"] == experiment.config_hash({"lr": 0.001, "epochs": 3})
    assert (record["seed"], record["data_seed"], record["note"]) == (2, 1, "x")
    assert set(experiment.REQUIRED_KEYS) <= set(record)
    assert record["created"].endswith("Z")


def test_make_record_fills_machine_when_none():
    record = _record(_key(), machine=None)
    assert record["machine"]["cores"] >= 1 and record["machine"]["device"] == "cpu"


@pytest.mark.parametrize("metrics, match", [
    ({"val_accuracy": 0.5}, r"metrics\['test_accuracy'\]"),
    ({"test_accuracy": 0.5}, r"metrics\['val_accuracy'\]"),
    ({"test_accuracy": 1.2, "val_accuracy": 0.5}, r"metrics\['test_accuracy'\].*\[0, 1\]"),
    ({"test_accuracy": "0.5", "val_accuracy": 0.5}, r"metrics\['test_accuracy'\]"),
    ({"test_accuracy": 0.5, "val_accuracy": float("nan")}, r"metrics\['val_accuracy'\]"),
    ({"test_accuracy": 0.5, "val_accuracy": 0.5, "per_class": [0.1, float("nan")]},
     r"metrics\['per_class'\]\[1\]"),
    ({"test_accuracy": 0.5, "val_accuracy": 0.5, "loss": {"final": float("inf")}},
     r"metrics\['loss'\]\['final'\]"),
])
def test_make_record_rejects_bad_metrics(metrics, match):
    with pytest.raises(ValueError, match=match):
        _record(_key(), metrics=metrics)


def test_make_record_rejects_clashing_extra_and_bad_numbers():
    with pytest.raises(ValueError, match=r"extra keys \['seed'\]"):
        _record(_key(), extra={"seed": 5})
    with pytest.raises(ValueError, match="extra keys"):
        _record(_key(), extra={"created": "now"})
    with pytest.raises(ValueError, match="params"):
        _record(_key(), params=-1)
    with pytest.raises(ValueError, match="seconds_per_epoch"):
        _record(_key(), seconds_per_epoch=float("nan"))
    with pytest.raises(TypeError, match=r"robustness\['noise'\]"):
        _record(_key(), robustness={"noise": {1, 2}})


# --------------------------------------------------------------------------- files


def test_write_record_round_trip_and_canonical_bytes(tmp_path):
    record = _record(_key(seed=1, data_seed=2))
    path = experiment.write_record(record, tmp_path)
    assert path == tmp_path / "avmnist" / "concat" / "seed1-data2.json"
    assert experiment.read_record(path) == record
    first = path.read_bytes()
    assert first == (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()
    reordered = dict(reversed(list(record.items())))
    experiment.write_record(reordered, tmp_path)
    assert path.read_bytes() == first


def test_write_record_validates(tmp_path):
    record = _record(_key())
    partial = {k: v for k, v in record.items() if k not in ("numerics", "params")}
    with pytest.raises(ValueError, match=r"\['numerics', 'params'\]"):
        experiment.write_record(partial, tmp_path)
    with pytest.raises(ValueError, match="config_hash"):
        experiment.write_record(record | {"config": {"lr": 1.0}}, tmp_path)
    assert not (tmp_path / "avmnist").exists()


def test_write_record_is_atomic_when_replace_fails(tmp_path, monkeypatch):
    path = experiment.write_record(_record(_key()), tmp_path)
    before = path.read_bytes()
    newer = _record(_key(), metrics={"test_accuracy": 0.9, "val_accuracy": 0.9})
    seen = []

    def failing_replace(src, dst):
        seen.append(json.loads(Path(src).read_text())["metrics"]["test_accuracy"])
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        experiment.write_record(newer, tmp_path)
    assert seen == [0.9]  # the temp file was fully written before the failure
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["seed0.json"]


_WRITER = """
import importlib.util, os, sys, time
module_path, root, writer, go = sys.argv[1:5]
spec = importlib.util.spec_from_file_location("_experiment", module_path)
m = importlib.util.module_from_spec(spec)
sys.modules["_experiment"] = m
spec.loader.exec_module(m)
assert "jax" not in sys.modules
while not os.path.exists(go):
    time.sleep(0.002)
w = int(writer)
for i in range(50):
    for seed in (50 * w + i, 999):
        key = m.RunKey(experiment="avmnist", method="concat", seed=seed)
        record = m.make_record(
            key, command=f"writer {w}", config={"writer": w, "i": i}, numerics="float32",
            metrics={"test_accuracy": i / 50, "val_accuracy": 0.5}, robustness=None,
            params=i, seconds_per_epoch=None, peak_rss_mb=1.0, machine={}, versions={},
            git_commit=None)
        m.write_record(record, root)
"""


def test_concurrent_writers_never_share_or_tear_files(tmp_path):
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(MODULE_PATH), str(tmp_path),
                               str(w), str(go)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for w in (0, 1)]
    time.sleep(0.2)
    go.touch()
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    directory = tmp_path / "avmnist" / "concat"
    names = sorted(p.name for p in directory.iterdir())
    assert names == sorted([f"seed{s}.json" for s in range(100)] + ["seed999.json"])
    for seed in range(100):
        record = experiment.read_record(directory / f"seed{seed}.json")
        assert record["seed"] == seed
        assert record["config"] == {"writer": seed // 50, "i": seed % 50}
        assert record["metrics"]["test_accuracy"] == (seed % 50) / 50
    shared = experiment.read_record(directory / "seed999.json")
    assert shared["config"]["writer"] in (0, 1) and shared["params"] == shared["config"]["i"]


def test_read_record_errors_name_the_path(tmp_path):
    bad = tmp_path / "seed0.json"
    bad.write_text('{"experiment": ')
    with pytest.raises(ValueError, match=f"{bad}.*not valid JSON"):
        experiment.read_record(bad)
    bad.write_text('{"experiment": "avmnist"}')
    with pytest.raises(ValueError, match=f"{bad}.*lacks required keys.*'method'"):
        experiment.read_record(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match=f"{bad}.*not an object"):
        experiment.read_record(bad)


def test_write_json_and_text(tmp_path):
    path = experiment.write_json({"b": 1, "a": [1.5]}, tmp_path / "sub" / "summary.json")
    assert path.read_text() == '{\n  "a": [\n    1.5\n  ],\n  "b": 1\n}\n'
    with pytest.raises(ValueError):
        experiment.write_json({"a": float("nan")}, path)
    assert json.loads(path.read_text()) == {"a": [1.5], "b": 1}
    text = experiment.write_text("| a | 81.9 ± 0.4 |\n", tmp_path / "table.md")
    assert text.read_text(encoding="utf-8") == "| a | 81.9 ± 0.4 |\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub", "table.md"]


# -------------------------------------------------------------------------- ledger

HASHES = {"concat": experiment.config_hash({"lr": 0.001, "epochs": 3}),
          "late": experiment.config_hash({"lr": 0.001, "epochs": 3})}


def test_ledger_todo_returns_missing_and_stale_in_order(tmp_path):
    ledger = Ledger(tmp_path, "avmnist")
    ledger.write(_record(_key(seed=0)))                                 # current
    ledger.write(_record(_key(seed=1), config={"lr": 0.01, "epochs": 3}))  # config changed
    ledger.write(_record(_key(seed=2), numerics="bf16"))                # numerics changed
    ledger.write(_record(_key("late", seed=0)))                         # current
    keys = [_key(seed=3), _key("late", seed=0), _key(seed=1), _key(seed=0), _key(seed=2)]
    expected = [_key(seed=3), _key(seed=1), _key(seed=2)]
    assert ledger.todo(keys, config_hashes=HASHES, numerics="float32") == expected
    assert ledger.todo(keys, config_hashes=lambda k: HASHES[k.method],
                       numerics="float32") == expected
    assert ledger.todo(keys, config_hashes=HASHES, numerics="bf16") == [
        _key(seed=3), _key("late", seed=0), _key(seed=1), _key(seed=0)]
    assert [ledger.status(_key(seed=s), config_hash=HASHES["concat"], numerics="float32")
            for s in range(4)] == ["current", "stale", "stale", "missing"]
    with pytest.raises(ValueError, match="no entry for method 'late'"):
        ledger.todo(keys, config_hashes={"concat": HASHES["concat"]}, numerics="float32")


def test_ledger_load_checks_the_key(tmp_path):
    ledger = Ledger(tmp_path, "avmnist")
    assert ledger.load(_key()) is None
    path = ledger.write(_record(_key()))
    assert ledger.load(_key())["seed"] == 0
    shutil.copy(path, path.with_name("seed5.json"))
    with pytest.raises(ValueError, match="seed5.json holds the record of avmnist/concat/seed0"):
        ledger.load(_key(seed=5))
    with pytest.raises(ValueError, match="experiment 'mustard'"):
        ledger.path(RunKey(experiment="mustard", method="concat", seed=0))
    with pytest.raises(ValueError, match="experiment must match"):
        Ledger(tmp_path, "AV")


def test_ledger_records_are_sorted(tmp_path):
    ledger = Ledger(tmp_path, "avmnist")
    for method, seed, data_seed in [("late", 0, 0), ("concat", 10, 0), ("concat", 2, 1),
                                    ("concat", 2, 0), ("concat", 0, 1)]:
        ledger.write(_record(_key(method, seed, data_seed)))
    (tmp_path / "avmnist" / "concat" / "notes.txt").write_text("not a record")
    got = [(r["method"], r["data_seed"], r["seed"]) for r in ledger.records()]
    assert got == [("concat", 0, 2), ("concat", 0, 10), ("concat", 1, 0), ("concat", 1, 2),
                   ("late", 0, 0)]
    assert Ledger(tmp_path, "mustard").records() == []


# --------------------------------------------------------------------------- sweeps


def test_shard_partitions():
    items = list(range(7))
    first, second = experiment.shard(items, "0/2"), experiment.shard(items, "1/2")
    assert first == [0, 2, 4, 6] and second == [1, 3, 5]
    assert sorted(first + second) == items
    assert experiment.shard(items, None) == items
    assert experiment.shard(items, "0/1") == items
    assert experiment.shard(items, "2/3") == [2, 5]


@pytest.mark.parametrize("spec", ["2/2", "0/0", "1", "a/b", "-1/2", "1/2/3", "", "1 / 2"])
def test_shard_rejects_bad_specs(spec):
    with pytest.raises(ValueError, match="shard: expected 'i/n' with 0 <= i < n"):
        experiment.shard([1, 2, 3], spec)


# -------------------------------------------------------------------------- reports


def test_seed_stats_matches_numpy():
    values = {"2": 0.85, "0": 0.8, "10": 0.9, "1": 0.82}
    stats = experiment.seed_stats(values)
    x = np.array([0.85, 0.8, 0.9, 0.82])
    np.testing.assert_allclose(stats["mean"], x.mean(), rtol=1e-12)
    np.testing.assert_allclose(stats["std"], np.std(x, ddof=1), rtol=1e-12)
    assert list(stats["per_seed"]) == ["0", "1", "2", "10"]
    assert experiment.seed_stats({"seed3": 0.7}) == {
        "mean": 0.7, "std": None, "per_seed": {"seed3": 0.7}}
    with pytest.raises(ValueError, match="empty"):
        experiment.seed_stats({})
    with pytest.raises(ValueError, match=r"values\['1'\]"):
        experiment.seed_stats({"0": 0.5, "1": math.nan})


def test_format_mean_std():
    assert experiment.format_mean_std({"mean": 0.8194, "std": 0.0042}) == "81.9 ± 0.4"
    assert experiment.format_mean_std({"mean": 0.8194, "std": None}) == "81.9"
    assert experiment.format_mean_std(None) == "—"
    assert experiment.format_mean_std({"mean": None, "std": None}) == "—"
    assert experiment.format_mean_std({"mean": 1.23456, "std": 0.01}, percent=False,
                                      digits=3) == "1.235 ± 0.010"


def test_collect_sorts_current_stale_and_missing(tmp_path):
    ledger = Ledger(tmp_path, "avmnist")
    ledger.write(_record(_key(seed=0)))
    ledger.write(_record(_key(seed=1), numerics="bf16"))            # stale
    ledger.write(_record(_key(seed=7)))                              # not expected: ignored
    ledger.write(_record(_key("late", seed=1)))
    ledger.write(_record(_key("late", seed=0)))
    ledger.write(_record(_key("peer_x", seed=0), config={"peer": True}))   # extra, current
    ledger.write(_record(_key("peer_x", seed=1), numerics="bf16"))         # extra, stale
    ledger.write(_record(_key("peer_y", seed=0)))                    # neither: ignored
    expected = [_key(seed=s) for s in range(3)] + [_key("late", seed=s) for s in range(2)]

    report = experiment.collect(ledger, expected, config_hashes=HASHES, numerics="float32",
                                extra_methods=["peer_x"])
    assert not report.complete
    assert report.missing == ["avmnist/concat/seed1", "avmnist/concat/seed2"]
    assert report.stale == ["avmnist/concat/seed1", "avmnist/peer_x/seed1"]
    assert list(report.current) == ["concat", "late", "peer_x"]
    assert [r["seed"] for r in report.current["concat"]] == [0]
    assert [r["seed"] for r in report.current["late"]] == [0, 1]
    assert [r["seed"] for r in report.current["peer_x"]] == [0]

    ledger.write(_record(_key(seed=1)))
    ledger.write(_record(_key(seed=2)))
    report = experiment.collect(ledger, expected, config_hashes=HASHES, numerics="float32")
    assert report.complete and report.missing == [] and report.stale == []
    assert [r["seed"] for r in report.current["concat"]] == [0, 1, 2]
    with pytest.raises(ValueError, match="both expected and extra"):
        experiment.collect(ledger, expected, config_hashes=HASHES, numerics="float32",
                           extra_methods=["late"])


# --------------------------------------------------------------------- environment


def test_machine_info():
    info = experiment.machine_info()
    assert info["cores"] >= 1 and info["device"] == "cpu"
    assert isinstance(info["isa"], list) and info["isa"] == sorted(info["isa"])
    assert set(info["isa"]) <= {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
    assert experiment.machine_info(device_kind="NVIDIA H100")["device"] == "NVIDIA H100"
    assert experiment.versions(["numpy", "surely-not-installed-pkg"]) == {
        "numpy": np.__version__, "surely-not-installed-pkg": None}


def test_git_commit_outside_a_repo_is_none(tmp_path):
    assert experiment.git_commit(tmp_path) is None
    assert experiment.git_commit(tmp_path / "does-not-exist") is None


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_git_commit_marks_dirty_trees_but_not_results(tmp_path):
    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
                       cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", "code.py")
    git("commit", "-q", "-m", "init")
    head = experiment.git_commit(tmp_path)
    assert head is not None and len(head) == 40 and not head.endswith("-dirty")
    experiment.write_record(_record(_key()), tmp_path / "results")
    assert experiment.git_commit(tmp_path / "results") == head
    (tmp_path / "code.py").write_text("x = 2\n")
    assert experiment.git_commit(tmp_path) == head + "-dirty"


def test_module_imports_neither_jax_nor_flax():
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('_e', {str(MODULE_PATH)!r})\n"
            "m = importlib.util.module_from_spec(spec); sys.modules['_e'] = m\n"
            "spec.loader.exec_module(m)\n"
            "print(sorted(n for n in ('jax', 'flax', 'matplotlib') if n in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_docstring_examples_run():
    results = doctest.testmod(experiment, verbose=False)
    assert results.attempted > 0 and results.failed == 0
