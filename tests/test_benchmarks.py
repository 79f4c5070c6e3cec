"""Smoke test of benchmarks/run.py: the suite runs in --quick mode and writes valid JSON.

Benchmarks are not tests: nothing here looks at a timing. Without torch (as in CI) the
PyTorch / sentence-transformers sides are skipped with a recorded reason.
"""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAIRS = ("train_step_concat", "train_step_low_rank", "train_step_cross_attention",
         "log_mel", "sentence_encoder")
MODELS = ("concat", "low_rank", "cross_attention")


def _positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_quick_suite_writes_the_expected_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ratio" in proc.stdout and "train_step_concat" in proc.stdout  # the table

    results = json.loads(out.read_text())
    meta = results["meta"]
    assert meta["quick"] is True
    assert meta["cpu_count"] >= 1 and meta["cpu_model"]
    assert meta["versions"]["jax"] and meta["versions"]["flax"]
    assert "jax_devices" in meta["threads"]

    has_torch = importlib.util.find_spec("torch") is not None
    for pair in PAIRS:
        r = results[pair]
        assert "ratio" in r, pair
        if "skipped" in r:  # only the sentence encoder, when its weights are missing
            assert pair == "sentence_encoder"
            continue
        assert _positive(r["lepton_mm"]["throughput"]["median"]), pair
        assert len(r["lepton_mm"]["times_s"]) >= 5, pair
        alt = r["alternative"]
        if "skipped" in alt:
            assert r["ratio"] is None and alt["skipped"], pair
        else:
            assert _positive(r["ratio"]) and len(alt["times_s"]) >= 5, pair
    for name in MODELS:
        r = results[f"train_step_{name}"]
        assert r["dtype"] == "float32" and r["optimizer"].startswith("adam")
        if has_torch:  # the twins must be the same model
            assert r["params"]["lepton_mm"] == r["params"]["pytorch"]
    if has_torch:
        assert results["train_step_concat"]["ratio"] is not None
    if "max_abs_db_diff_within_80db" in results["log_mel"]:
        assert results["log_mel"]["max_abs_db_diff_within_80db"] < 0.1

    roofline = results["roofline"]
    assert _positive(roofline["peak_gflops"])
    for name in MODELS:
        assert _positive(results["compile_s"][name])
        model = roofline["models"][name]
        assert _positive(model["flops_per_step"]) and _positive(model["fraction_of_peak"])

    memory = results["memory"]
    assert memory["steps"] >= 1 and "method" in memory
    assert _positive(memory["concat"]["lepton_mm"]["peak_rss_mb"])
    if has_torch:
        assert _positive(memory["concat"]["pytorch"]["peak_rss_mb"])
    else:
        assert memory["concat"]["pytorch"]["skipped"]
