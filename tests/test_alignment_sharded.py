"""Tests for lepton_mm.alignment.sharded: the ring losses equal the dense ones.

The 8-device checks run in a subprocess that asks JAX for 8 CPU devices before it
initialises, so the rest of the suite keeps its single device.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from lepton_mm.alignment import clip_loss, clip_loss_sharded, sigmoid_loss, sigmoid_loss_sharded

_EIGHT_DEVICE_CHECK = r"""
import jax
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")
import json
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh
from lepton_mm.alignment import (clip_loss, clip_loss_sharded, sigmoid_loss,
                                 sigmoid_loss_sharded)

assert jax.device_count() == 8, jax.devices()
rng = np.random.default_rng(0)
batch, dim = 64, 16
za = rng.normal(size=(batch, dim)).astype(np.float32)
zb = (0.5 * za + rng.normal(size=(batch, dim))).astype(np.float32)
mask = np.arange(batch) < 53          # the last 11 rows are padding ...
za[53:], zb[53:] = np.nan, np.inf     # ... holding garbage that must not leak

def compare(dense, ring, args):
    argnums = tuple(range(len(args)))
    value, grads = jax.value_and_grad(dense, argnums)(*args)
    ring_value, ring_grads = jax.jit(jax.value_and_grad(ring, argnums))(*args)
    return {"value": [float(value), float(ring_value)],
            "finite": bool(np.isfinite(ring_value)) and all(
                bool(np.all(np.isfinite(g))) for g in ring_grads),
            "grad_err": [float(np.max(np.abs(g - r))) for g, r in zip(grads, ring_grads)],
            "grad_scale": [float(np.max(np.abs(g))) for g in grads]}

meshes = {
    "explicit_1d": jax.make_mesh((8,), ("data",)),
    "auto_2d": jax.make_mesh((2, 4), ("model", "data"), axis_types=(AxisType.Auto,) * 2),
}
out = {}
for mesh_name, mesh in meshes.items():
    m = mask if mesh_name == "explicit_1d" else None
    a, b = (za, zb) if m is not None else (za[:32], zb[:32])
    out[f"clip/{mesh_name}"] = compare(
        lambda a, b, t: clip_loss(a, b, logit_scale=t, mask=m),
        lambda a, b, t: clip_loss_sharded(a, b, logit_scale=t, mask=m, mesh=mesh),
        (a, b, jnp.float32(14.3)))
    out[f"sigmoid/{mesh_name}"] = compare(
        lambda a, b, t, bias: sigmoid_loss(a, b, logit_scale=t, logit_bias=bias, mask=m),
        lambda a, b, t, bias: sigmoid_loss_sharded(a, b, logit_scale=t, logit_bias=bias,
                                                   mask=m, mesh=mesh),
        (a, b, jnp.float32(10.0), jnp.float32(-4.0)))

# The ring really is a ring: collective permutes, no all-gather, no [B, B] matrix.
mesh = Mesh(np.array(jax.devices()), ("data",))
hlo = jax.jit(jax.grad(lambda a, b: clip_loss_sharded(a, b, logit_scale=1.0, mesh=mesh),
                       argnums=(0, 1))).lower(za, zb).compile().as_text()
out["hlo"] = {"permutes": hlo.count("collective-permute"), "gathers": hlo.count("all-gather"),
              "full_matrix": hlo.count(f"f32[{batch},{batch}]")}
try:
    clip_loss_sharded(za[:60], zb[:60], logit_scale=1.0, mesh=mesh)
    out["divisibility_error"] = None
except ValueError as e:
    out["divisibility_error"] = str(e)
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def eight_device_results():
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", _EIGHT_DEVICE_CHECK], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


@pytest.mark.parametrize("case", ["clip/explicit_1d", "clip/auto_2d", "sigmoid/explicit_1d",
                                  "sigmoid/auto_2d"])
def test_ring_equals_dense_on_eight_devices(eight_device_results, case):
    result = eight_device_results[case]
    dense, ring = result["value"]
    np.testing.assert_allclose(ring, dense, rtol=1e-5, atol=1e-5)
    assert result["finite"]
    for err, scale in zip(result["grad_err"], result["grad_scale"], strict=True):
        assert err <= 1e-5 * max(1.0, scale), result


def test_ring_uses_permutes_not_gathers(eight_device_results):
    hlo = eight_device_results["hlo"]
    assert hlo["permutes"] > 0
    assert hlo["gathers"] == 0 and hlo["full_matrix"] == 0


def test_ring_rejects_indivisible_batch(eight_device_results):
    assert "divisible by the 8 devices" in eight_device_results["divisibility_error"]


# -------------------------------------------------------------- single device, in-process


def test_single_device_ring_equals_dense():
    mesh = jax.make_mesh((1,), ("batch",))
    rng = np.random.default_rng(1)
    za, zb = rng.normal(size=(2, 6, 4)).astype(np.float32)
    mask = np.array([True] * 5 + [False])
    np.testing.assert_allclose(
        clip_loss_sharded(za, zb, logit_scale=3.0, mask=mask, mesh=mesh, axis_name="batch"),
        clip_loss(za, zb, logit_scale=3.0, mask=mask), rtol=1e-6)
    np.testing.assert_allclose(
        sigmoid_loss_sharded(za, zb, logit_scale=3.0, logit_bias=-1.0, mesh=mesh,
                             axis_name="batch"),
        sigmoid_loss(za, zb, logit_scale=3.0, logit_bias=-1.0), rtol=1e-6)


def test_sharded_losses_reject_bad_arguments():
    mesh = jax.make_mesh((1,), ("data",))
    za = np.zeros((4, 3), np.float32)
    with pytest.raises(TypeError, match="mesh: expected a jax.sharding.Mesh"):
        clip_loss_sharded(za, za, logit_scale=1.0, mesh="data")
    with pytest.raises(ValueError, match="axis_name: expected one of the mesh axes"):
        clip_loss_sharded(za, za, logit_scale=1.0, mesh=mesh, axis_name="model")
    with pytest.raises(ValueError, match="zb: expected shape"):
        sigmoid_loss_sharded(za, za[:2], logit_scale=1.0, logit_bias=0.0, mesh=mesh)
    with pytest.raises(ValueError, match="logit_bias: expected rank 0"):
        sigmoid_loss_sharded(za, za, logit_scale=1.0, logit_bias=np.zeros(4, np.float32),
                             mesh=mesh)
