"""Data parallelism: 8 CPU devices in one process, and two processes on localhost.

Both need JAX configured before it starts (device count, distributed runtime), so each
runs in fresh subprocesses; the tests compare their results.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

COMMON = textwrap.dedent('''
    import json, sys
    import numpy as np
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from lepton_mm.encoders import ImageCNN
    from lepton_mm.models import Classification, build_classifier
    from lepton_mm.types import EncoderOutput
    from lepton_mm.training import OptimizerConfig, fit, seed_rngs

    class Frames(nnx.Module):
        def __init__(self, features, dim, rngs):
            self.dim = dim
            self.proj = nnx.Linear(features, dim, rngs=rngs)

        def __call__(self, x, mask):
            return EncoderOutput.from_tokens(jnp.tanh(self.proj(x)), mask)

    def make_data(n, seed):
        rng = np.random.default_rng(seed)
        y = rng.integers(0, 3, n)
        return {"image": (rng.normal(size=(n, 8, 8, 1)) + y[:, None, None, None]
                          ).astype(np.float32),
                "audio": ((rng.normal(size=(n, 5, 3)) - y[:, None, None]).astype(np.float32),
                          np.arange(5)[None] < rng.integers(1, 6, n)[:, None]),
                "label": y.astype(np.int32),
                "present": {"audio": rng.random(n) > 0.25}}

    def make_model():
        rngs = seed_rngs(0)
        encoders = {"image": ImageCNN(1, dim=6, widths=(4,), rngs=rngs),
                    "audio": Frames(3, 5, rngs)}
        return build_classifier(encoders, "concat", num_outputs=3, fusion_dim=6, rngs=rngs)

    def train(workdir, mesh):
        model = make_model()
        result = fit(model, Classification(3), make_data(40, 0), eval_data=make_data(16, 1),
                     workdir=workdir, epochs=2, batch_size=8, seed=0, mesh=mesh,
                     optimizer=OptimizerConfig(learning_rate=0.02), modality_dropout=0.2)
        params = [np.asarray(jax.device_get(x)).tolist() for x in
                  jax.tree.leaves(nnx.as_pure(nnx.state(model, nnx.Param)))]
        return params, result
''')

EIGHT_DEVICES = COMMON + textwrap.dedent('''
    from lepton_mm.training import make_mesh, make_train_step, shard_batch
    from lepton_mm.training import make_optimizer, TrainState
    from lepton_mm.training.loop import ArrayDataset

    assert jax.device_count() == 8, jax.devices()
    out = {}
    # 1. the step itself: sharded over 8 devices vs one device, same batches
    data = ArrayDataset(make_data(40, 0))
    mesh = make_mesh()
    tx = make_optimizer(OptimizerConfig(learning_rate=0.02))
    task = Classification(3)
    finals = {}
    for name, m in (("single", None), ("sharded", mesh)):
        model = make_model()
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        params, rest = nnx.as_pure(params), nnx.as_pure(rest)
        state = TrainState(params, rest, tx.init(params))
        if m is not None:
            state = jax.device_put(state, jax.sharding.NamedSharding(
                m, jax.sharding.PartitionSpec()))
        step_fn = make_train_step(graphdef, tx, task, modality_dropout=0.2, mesh=m)
        for i, batch in enumerate(data.batches(8, seed=0, epoch=0)):
            device_batch = shard_batch(batch, m, global_batch_size=8)
            if m is not None:
                leaf = device_batch["image"]
                out["batch_shards"] = len(leaf.addressable_shards)
                out["shard_rows"] = leaf.addressable_shards[0].data.shape[0]
            state, stats = step_fn(state, device_batch, jnp.int32(i))
        finals[name] = [np.asarray(x) for x in jax.tree.leaves(state.params)]
        if m is not None:
            out["param_sharding_replicated"] = all(
                x.sharding.is_fully_replicated for x in jax.tree.leaves(state.params))
    out["step_max_abs_diff"] = max(float(np.max(np.abs(a - b))) for a, b in
                                   zip(finals["single"], finals["sharded"]))
    # 2. the whole fit loop with mesh="auto" (checkpoints, eval, best restore)
    params, result = train(sys.argv[1] + "/auto", "auto")
    out["fit_params"] = params
    out["fit_metrics"] = result.best_metrics
    params, result = train(sys.argv[1] + "/single", None)
    out["fit_params_single"] = params
    out["fit_metrics_single"] = result.best_metrics
    with open(sys.argv[2], "w") as f:
        json.dump(out, f)
''')

MULTI_PROCESS = COMMON + textwrap.dedent('''
    from lepton_mm.training import initialize_distributed
    initialize_distributed()  # from LEPTON_COORDINATOR_ADDRESS / _NUM_PROCESSES / _PROCESS_ID
    assert jax.process_count() == 2 and jax.device_count() == 2
    params, result = train(sys.argv[1], "auto")
    with open(sys.argv[2], "w") as f:
        json.dump({"params": params, "metrics": result.best_metrics,
                   "process": jax.process_index()}, f)
''')

SINGLE = COMMON + textwrap.dedent('''
    params, result = train(sys.argv[1], None)
    with open(sys.argv[2], "w") as f:
        json.dump({"params": params, "metrics": result.best_metrics}, f)
''')


def _env(**extra):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env.update(JAX_PLATFORMS="cpu", **extra)
    return env


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _assert_close(a, b, rtol=1e-5, atol=1e-6):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_data_parallel_on_eight_cpu_devices_equals_one_device(tmp_path):
    script = tmp_path / "eight.py"
    script.write_text(EIGHT_DEVICES)
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), str(out)],
                          env=_env(JAX_NUM_CPU_DEVICES="8"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["batch_shards"] == 8 and result["shard_rows"] == 1
    assert result["param_sharding_replicated"]
    assert result["step_max_abs_diff"] < 1e-5
    _assert_close(result["fit_params"], result["fit_params_single"])
    for k, v in result["fit_metrics_single"].items():
        assert result["fit_metrics"][k] == pytest.approx(v, rel=1e-4, abs=1e-5), k


@pytest.mark.slow
def test_two_processes_on_localhost_match_one_process(tmp_path):
    multi, single = tmp_path / "multi.py", tmp_path / "single.py"
    multi.write_text(MULTI_PROCESS)
    single.write_text(SINGLE)
    address = f"localhost:{_free_port()}"
    procs = [subprocess.Popen(
        [sys.executable, str(multi), str(tmp_path / "shared"), str(tmp_path / f"p{i}.json")],
        env=_env(LEPTON_COORDINATOR_ADDRESS=address, LEPTON_NUM_PROCESSES="2",
                 LEPTON_PROCESS_ID=str(i)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    reference = subprocess.run([sys.executable, str(single), str(tmp_path / "ref"),
                                str(tmp_path / "ref.json")], env=_env(),
                               capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr[-4000:]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            p.kill()
            logs.append(p.communicate()[0])
    if any(p.returncode != 0 for p in procs):
        tail = "\n".join(log.strip().splitlines()[-1] if log.strip() else "" for log in logs)
        if "gloo" in tail.lower() or "collective" in tail.lower() or "distributed" in tail:
            pytest.skip(f"two-process CPU JAX unavailable here: {tail}")
        raise AssertionError("\n----\n".join(log[-3000:] for log in logs))
    ref = json.loads((tmp_path / "ref.json").read_text())
    for i in range(2):
        got = json.loads((tmp_path / f"p{i}.json").read_text())
        assert got["process"] == i
        _assert_close(got["params"], ref["params"])
        for k, v in ref["metrics"].items():
            assert got["metrics"][k] == pytest.approx(v, rel=1e-4, abs=1e-5), k
    assert (tmp_path / "shared" / "checkpoints").is_dir()
