"""Smoke test of benchmarks/run.py: the suite runs in --quick mode and writes valid JSON.

Benchmarks are not tests: nothing here looks at a timing. ``--skip-heavy`` leaves out the
AV-MNIST epochs and torch.compile (minutes each); their keys must still be there, marked
skipped. Without torch (as in CI) the PyTorch / sentence-transformers sides are skipped
with a recorded reason.
"""

import importlib.util
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALL_MODELS = ("concat", "low_rank", "cross_attention")
# The smoke run covers one model end to end: the three models go through the same
# benchmark code (bench_train_step, roofline, ...), and compiling the other two models'
# steps cost over half of this test's time. Their PyTorch twins are checked below.
MODELS = ("concat",)
TRAIN_PAIRS = (*(f"train_step_{m}" for m in MODELS), *(f"train_step_{m}_b40" for m in MODELS))
BF16_PAIRS = ("train_step_concat_bf16",)
PAIRS = (*TRAIN_PAIRS, *BF16_PAIRS, "log_mel", "sentence_encoder")
EPOCH_PAIRS = ("epoch_avmnist", "epoch_avmnist_b128")
NOT_RUN = ("train_step_low_rank", "train_step_cross_attention_b40",
           "train_step_cross_attention_bf16")
JAX_STACK = {"jax", "jaxlib", "flax", "optax", "lepton_mm"}


def _positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_quick_suite_writes_the_expected_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--skip-heavy",
         "--only", *PAIRS, *EPOCH_PAIRS, "cold_start", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=1200, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ratio" in proc.stdout and "train_step_concat" in proc.stdout  # the table

    results = json.loads(out.read_text())
    assert not set(NOT_RUN) & set(results)  # --only: nothing else is run
    meta = results["meta"]
    assert meta["quick"] is True and meta["heavy_pairs"] is False
    assert meta["cpu_count"] >= 1 and meta["cpu_model"]
    assert meta["cpu_affinity"] >= 1
    assert meta["threads"]["xla_intra_op_threads"] == meta["cpu_affinity"]
    if meta["isa"] is not None:  # Linux: flags from /proc/cpuinfo
        assert {"avx2", "avx512f", "amx_tile", "amx_bf16"} <= set(meta["isa"])
    assert meta["versions"]["jax"] and meta["versions"]["flax"]
    assert "jax_devices" in meta["threads"]

    has_torch = importlib.util.find_spec("torch") is not None
    if has_torch:
        assert meta["threads"]["torch_num_threads"] == meta["cpu_affinity"]
        assert isinstance(meta["threads"]["torch_mkldnn_enabled"], bool)
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
    for pair in TRAIN_PAIRS:
        r = results[pair]
        assert r["dtype"] == "float32" and r["optimizer"].startswith("adam")
        assert {"ratio_eager", "ratio_compiled", "alternative_eager",
                "alternative_compiled"} <= set(r), pair
        assert _positive(r["model_flops_per_step"]), pair
        if has_torch:  # the twins must be the same model
            assert r["params"]["lepton_mm"] == r["params"]["pytorch"]
            assert _positive(r["ratio_eager"]) and r["ratio"] == r["ratio_eager"], pair
            assert r["alternative_eager"]["variant"] in r["pytorch_variants"]
            assert r["ratio_compiled"] is None  # --skip-heavy: no torch.compile
            assert r["alternative_compiled"]["skipped"]
    assert results["train_step_concat_b40"]["batch_size"] == 40
    for pair in BF16_PAIRS:  # mixed precision on both sides
        assert results[pair]["dtype"].startswith("bfloat16") and "autocast" in results[
            pair]["dtype"], pair
    if has_torch:
        assert results["train_step_concat"]["ratio"] is not None
    log_mel = results["log_mel"]
    if "max_abs_db_diff_within_80db" in log_mel:
        assert log_mel["max_abs_db_diff_within_80db"] < 0.1
        assert math.isfinite(log_mel["max_abs_db_diff"])  # unmasked, reported
        assert _positive(log_mel["ratio_per_clip"])
        assert "batch" in log_mel["alternative"]["name"]
        assert "per clip" in log_mel["alternative_per_clip"]["name"]

    for pair in EPOCH_PAIRS:  # present, skipped by --skip-heavy
        assert results[pair]["ratio"] is None and results[pair]["skipped"], pair

    roofline = results["roofline"]
    assert _positive(roofline["peak_gflops"])
    for name in MODELS:
        assert _positive(results["compile_s"][name])
        for key in (name, f"{name}_b40"):
            model = roofline["models"][key]
            assert _positive(model["flops_per_step"]) and _positive(model["fraction_of_peak"])
            # one FLOP count, the model's, for both sides and for the target check
            assert model["flops_used"]["lepton_mm"] == model["flops_used"]["pytorch"]
            assert model["flops_used"]["lepton_mm"] == model["model_flops_per_step"]
            assert model["target_met"] == (model["fraction_of_peak"] >= model["target"])

    cold = results["cold_start"]
    for key in ("train_step_concat", "sentence_encoder"):
        entry = cold[key]
        assert "ratio" in entry, key
        if "skipped" in entry:  # the sentence encoder without its weights
            assert key == "sentence_encoder"
            continue
        assert _positive(entry["lepton_mm"]["first_call_s"]), key
        if has_torch and "first_call_s" in entry["pytorch_eager"]:
            assert entry["pytorch_eager"]["jax_modules"] == [], key
            assert _positive(entry["ratio"]), key
    if has_torch:
        assert cold["train_step_concat"]["pytorch_eager"]["jax_modules"] == []

    memory = results["memory"]
    assert memory["steps"] >= 1 and "method" in memory
    concat = memory["concat"]
    assert "ratio" in concat
    assert _positive(concat["lepton_mm"]["peak_rss_mb"])
    # the second probe loads the step from the first one's compilation cache: it never
    # holds the compiler's memory
    warm = concat["lepton_mm_warm_cache"]
    assert warm["peak_rss_first_step_mb"] < concat["lepton_mm"]["peak_rss_first_step_mb"]
    if has_torch:
        assert _positive(concat["pytorch"]["peak_rss_mb"])
        assert not set(concat["pytorch"]["jax_modules"]) & JAX_STACK  # no JAX in there
        assert _positive(concat["ratio"])
        assert math.isclose(concat["ratio"], concat["lepton_mm"]["peak_rss_mb"]
                            / concat["pytorch"]["peak_rss_mb"])
    else:
        assert concat["pytorch"]["skipped"] and concat["ratio"] is None


@pytest.mark.slow
def _run_suite(tmp_path, *args, timeout=600):
    """``run.py --quick --no-memory ARGS --json``: the JSON it wrote."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--no-memory",
         *args, "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_processes_time_each_framework_in_a_fresh_process(tmp_path):
    """--processes: each framework alone in a fresh process; that ratio is the headline."""
    if importlib.util.find_spec("torch") is None:
        return
    entry = _run_suite(tmp_path, "--skip-heavy", "--only", "train_step_concat_b40",
                       "--processes", "1")["train_step_concat_b40"]
    procs = entry["processes"]
    assert procs["peer"] == "eager" and procs["ratio_compiled"] is None  # --skip-heavy
    ours, theirs = procs["lepton_mm"]["times_s"], procs["pytorch_eager"]["times_s"]
    assert len(ours) == len(theirs) == 5 and all(map(_positive, ours + theirs))
    assert math.isclose(procs["ratio"], statistics.median(theirs) / statistics.median(ours),
                        rel_tol=1e-5)  # the children's times are rounded to 1 us
    (record,) = procs["rounds"]
    assert record["order"] == ["lepton_mm", "pytorch"]
    assert record["pytorch"]["jax_modules"] == [] and record["lepton_mm"]["torch_modules"] == []
    assert record["pytorch"]["eager"] in record["pytorch"]["variants"]
    (paired,) = procs["ratio_paired"]  # one round: that round's medians, unrounded
    assert math.isclose(paired, procs["ratio"], rel_tol=1e-4)
    assert entry["ratio"] == procs["ratio"] and entry["protocol"].startswith("per process")
    assert _positive(entry["ratio_in_process"]) and entry["ratio_in_process"] == entry[
        "ratio_eager"]


def test_epoch_processes_time_each_framework_in_a_fresh_process(tmp_path):
    """The epoch pair with --processes: fresh-process epochs, whose ratio is the headline."""
    if importlib.util.find_spec("torch") is None:
        return
    entry = _run_suite(tmp_path, "--only", "epoch_avmnist", "--epoch-batch-sizes", "40",
                       "--processes", "1", timeout=900)["epoch_avmnist"]
    procs = entry["processes"]
    (ours,), (theirs,) = procs["rounds"]["lepton_mm"], procs["rounds"]["pytorch"]
    assert ours["side"] == "lepton_mm" and theirs["side"] == "pytorch"
    # the children trained the quick subset, not the full split
    assert math.isclose(ours["examples_per_s"] * ours["seconds"], entry["train_examples"],
                        rel_tol=1e-6) and entry["train_examples"] == 2000
    assert _positive(ours["cold_compile_s"]) and 0 <= ours["val_accuracy"] <= 1
    assert math.isclose(procs["ratio"], theirs["seconds"] / ours["seconds"], rel_tol=1e-9)
    assert entry["ratio"] == procs["ratio"] and entry["protocol"].startswith("per process")
    assert _positive(entry["ratio_in_process"])
    assert entry["ratio_in_process"] == pytest.approx(
        entry["alternative"]["median_s"] / entry["lepton_mm"]["median_s"], rel=1e-6)


def test_pytorch_twins_have_the_benchmark_models_parameter_counts():
    """run.py compares each lepton_mm model with a PyTorch twin: same parameter count
    for all three models (the quick smoke run above trains only concat)."""
    if importlib.util.find_spec("torch") is None:
        return
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import lepton_models
        import run
        import torch_models
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    for name in ALL_MODELS:
        ours = lepton_models.param_count(run.build_lepton_model(name, run.QUICK))
        twin = torch_models.param_count(torch_models.build_twin(name,
                                                                run.twin_spec(run.QUICK, name)))
        assert ours == twin > 0, name


def test_pytorch_probe_imports_no_jax(tmp_path):
    """The PyTorch probe process (torch_models.py) holds none of the JAX stack."""
    if importlib.util.find_spec("torch") is None:
        return
    spec = {"model": "concat", "n_mels": 8, "audio_frames": 16, "batch_size": 4,
            "fusion_dim": 100, "num_classes": 10, "rank": 4, "image": [2, 1],
            "audio": [4, 2], "attention": {}, "lr": 1e-3, "threads": 1, "steps": 1,
            "variant": {"optimizer": "for_loop", "channels_last": False}}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    code = ("import runpy, sys; sys.argv = [sys.argv[1], '--probe', 'memory', sys.argv[2]]\n"
            "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "stack = {'jax', 'jaxlib', 'flax', 'optax', 'lepton_mm'}\n"
            "loaded = sorted(stack & {m.split('.')[0] for m in sys.modules})\n"
            "assert not loaded, loaded\n")
    proc = subprocess.run(
        [sys.executable, "-c", code, str(ROOT / "benchmarks" / "torch_models.py"), str(path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["jax_modules"] == [] and _positive(result["peak_rss_mb"])


def test_profile_step_quick_writes_shares_and_top_ops(tmp_path):
    """benchmarks/profile_step.py traces run.py's step and splits its op time by category."""
    out, trace = tmp_path / "profile.json", tmp_path / "trace"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "profile_step.py"), "--quick",
         "--steps", "2", "--warmup", "1", "--trace-dir", str(trace), "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "category" in proc.stdout and "top op" in proc.stdout  # the table

    result = json.loads(out.read_text())
    assert result["model"] == "concat" and result["quick"] is True
    assert result["steps_traced"] == 2  # one run id per traced call
    assert _positive(result["wall_ms_per_step"]["median"])
    shares = {name: c["share"] for name, c in result["categories"].items()}
    assert math.isclose(sum(shares.values()), 1.0, abs_tol=1e-6)
    assert math.isclose(sum(p["share"] for p in result["phases"].values()), 1.0,
                        abs_tol=1e-6)
    # The concat step has convolutions and dots, and an Adam update outside the gradient.
    assert shares["matmul"] + shares["matmul + fused ops"] > 0
    assert shares["optimizer update"] > 0
    top = result["top_ops"]
    assert top and all(_positive(op["ms_per_step"]) for op in top)
    # Every traced op was found in the compiled module's text (names match).
    assert all(op["opcodes"] for op in top)
    assert {"avx2", "avx512f", "amx"} <= set(result["machine"]) and result["machine"][
        "cpu_model"]
    assert list(trace.glob("plugins/profile/*/*.xplane.pb"))  # the raw trace is kept


@pytest.mark.slow
def test_profile_torch_step_quick_splits_the_twin_step_by_phase(tmp_path):
    """benchmarks/profile_torch_step.py profiles the PyTorch twin's step, JAX-free."""
    pytest.importorskip("torch")
    out = tmp_path / "torch_profile.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "profile_torch_step.py"), "--quick",
         "--steps", "2", "--warmup", "1", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["jax_modules"] == []  # the profiled process holds no JAX
    phases = result["phases"]
    # a LeNet step: convolutions forward and backward, batch norm, pooling, an update
    for phase in ("forward", "backward"):
        cats = phases[phase]["categories"]
        assert _positive(cats["convolution"]) and _positive(cats["batch norm"]), phase
        assert _positive(cats["pooling"]), phase
    assert set(phases["update"]["categories"]) == {"optimizer update"}
    # one calling thread: self times never overlap, so they fit in the traced time
    attributed = sum(p["ms_per_step"] for p in phases.values())
    assert math.isclose(attributed, result["attributed_ms_per_step"], rel_tol=1e-9)
    assert attributed <= result["traced_ms_per_step"] * 1.001
    assert math.isclose(sum(result["categories"].values()), attributed, rel_tol=1e-9)
