"""Kill a training run with SIGKILL, re-run the same command, get the same result.

The run under test has every kind of state that must survive: batch-norm statistics,
dropout RNG streams, Adam moments, shuffling and modality dropout keyed by the step,
mid-epoch and epoch-end checkpoints, early-stopping bookkeeping and best-checkpoint
selection. It is killed twice (right after its first, mid-epoch checkpoint appears, and
again right after a checkpoint of a later epoch appears), a stale Orbax temporary
directory is planted as if a save had crashed, and the third invocation runs to the
end. Its final parameters must equal an uninterrupted run's bit for bit, and so must
its metrics, history and log.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

SCRIPT = textwrap.dedent('''
    import json, sys, time
    import numpy as np
    import jax
    from flax import nnx
    from lepton_mm.encoders import ImageCNN
    from lepton_mm.models import Classification, build_classifier
    from lepton_mm.types import EncoderOutput
    from lepton_mm.training import ArrayDataset, OptimizerConfig, fit, seed_rngs

    workdir, out, slow = sys.argv[1], sys.argv[2], float(sys.argv[3])

    class Frames(nnx.Module):
        def __init__(self, features, dim, rngs):
            self.dim = dim
            self.proj = nnx.Linear(features, dim, rngs=rngs)
            self.drop = nnx.Dropout(0.2, rngs=rngs)

        def __call__(self, x, mask):
            return EncoderOutput.from_tokens(self.drop(nnx.relu(self.proj(x))), mask)

    class SlowData(ArrayDataset):
        def batches(self, *args, **kwargs):
            for batch in super().batches(*args, **kwargs):
                time.sleep(slow)
                yield batch

    def data(n, seed):
        rng = np.random.default_rng(seed)
        y = rng.integers(0, 3, n)
        img = rng.normal(size=(n, 8, 8, 1)).astype(np.float32) + y[:, None, None, None]
        frames = rng.normal(size=(n, 5, 4)).astype(np.float32) - y[:, None, None]
        mask = np.arange(5)[None] < rng.integers(2, 6, n)[:, None]
        return {"image": img, "audio": (frames, mask), "label": y.astype(np.int32),
                "present": {"audio": rng.random(n) > 0.2}}

    rngs = seed_rngs(7)
    encoders = {"image": ImageCNN(1, dim=8, widths=(4,), dropout=0.1, rngs=rngs),
                "audio": Frames(4, 8, rngs)}
    model = build_classifier(encoders, "concat", num_outputs=3, fusion_dim=8, rngs=rngs)
    result = fit(model, Classification(3), SlowData(data(36, 0)),
                 eval_data=data(16, 1), workdir=workdir, epochs=4, batch_size=8, seed=7,
                 optimizer=OptimizerConfig(name="adam", learning_rate=0.01),
                 modality_dropout=0.3, checkpoint_every=2, keep_checkpoints=2,
                 monitor="loss", mode="min", early_stopping_patience=3)
    params = nnx.to_flat_state(nnx.as_pure(nnx.state(model)))
    arrays = {}
    for path, x in params:
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        arrays["/".join(map(str, path))] = np.asarray(x)
    np.savez(out, **arrays)
    summary = {"history": result.history, "best_metrics": result.best_metrics,
               "best_step": result.best_step, "step": result.step,
               "resumed_from": result.resumed_from,
               "compiles": result.num_compilations}
    with open(out + ".json", "w") as f:
        json.dump(summary, f)
''')


def _env(tmp_path):
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    # Later invocations reuse the first ones' executables: faster, and bitwise the same.
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "jax_cache")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return env


def _start(tmp_path, script, workdir, out, slow):
    return subprocess.Popen(
        [sys.executable, str(script), str(workdir), str(out), str(slow)],
        env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _steps(workdir):
    ckpts = Path(workdir) / "checkpoints"
    if not ckpts.exists():
        return []
    return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())


def _kill_when(proc, workdir, predicate, timeout=120.0):
    """SIGKILLs ``proc`` as soon as ``predicate(steps)`` holds; returns the steps then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = _steps(workdir)
        if predicate(steps):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return steps
        if proc.poll() is not None:
            raise AssertionError("the run finished before it could be killed:\n"
                                 + proc.stdout.read()[-3000:])
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("no checkpoint appeared in time:\n" + proc.stdout.read()[-3000:])


def _finish(proc, timeout=240):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]


def _log_records(workdir):
    records = [json.loads(line) for line in (Path(workdir) / "log.jsonl").read_text()
               .splitlines()]
    for r in records:
        r.pop("wall_time", None)
    return records


@pytest.mark.slow
def test_sigkill_then_rerun_matches_uninterrupted_run(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref_out, run_out = tmp_path / "ref.npz", tmp_path / "run.npz"

    reference = _start(tmp_path, script, ref_dir, ref_out, 0.0)
    victim = _start(tmp_path, script, run_dir, run_out, 0.25)
    # Kill point 1: right after the first (mid-epoch, step 2) checkpoint is committed.
    first = _kill_when(victim, run_dir, lambda s: bool(s))
    assert first and first[-1] < 20, first
    _finish(reference)

    # A crashed save leaves an Orbax temporary directory behind: it must be ignored.
    stale = run_dir / "checkpoints" / "999.orbax-checkpoint-tmp-1700000000000000"
    stale.mkdir()
    (stale / "garbage").write_text("partial")

    # Kill point 2: the re-run resumes, gets into a later epoch (past the epoch-1 end,
    # step 5), and is killed right after that checkpoint.
    victim = _start(tmp_path, script, run_dir, run_out, 0.25)
    second = _kill_when(victim, run_dir, lambda s: bool(s) and s[-1] >= 6)
    assert second[-1] > first[-1]

    final = _start(tmp_path, script, run_dir, run_out, 0.0)
    _finish(final)

    ref, run = np.load(ref_out), np.load(run_out)
    assert sorted(ref.files) == sorted(run.files)
    for name in ref.files:
        assert np.array_equal(ref[name], run[name]), name
    ref_summary = json.loads(Path(str(ref_out) + ".json").read_text())
    run_summary = json.loads(Path(str(run_out) + ".json").read_text())
    assert run_summary["resumed_from"] is not None and run_summary["resumed_from"] >= 6
    assert ref_summary["resumed_from"] is None
    for key in ("history", "best_metrics", "best_step", "step"):
        assert run_summary[key] == ref_summary[key], key
    assert ref_summary["compiles"]["train_step"] == 1  # 36 = 4 * 8 + 4: padded, no recompile
    assert _log_records(run_dir) == _log_records(ref_dir)
    assert not stale.exists()  # cleaned up by the resumed run
    assert (run_dir / "curves.png").exists()
