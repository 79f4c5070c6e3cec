"""fit(compute_dtype=jnp.bfloat16): bfloat16 compute, float32 master weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_training_loop import BATCH, make_data, make_model, params_of

from lepton_mm.data import ArrayDataset
from lepton_mm.models import Classification
from lepton_mm.training import (
    CheckpointMismatchError,
    OptimizerConfig,
    fit,
    make_optimizer,
    read_log,
)
from lepton_mm.training.loop import TrainState, make_train_step

OPT = OptimizerConfig(learning_rate=0.02)


def _fit(workdir, epochs=3, **kw):
    model = make_model(0)
    result = fit(model, Classification(3), make_data(), workdir=workdir, epochs=epochs,
                 batch_size=BATCH, eval_data=make_data(12, seed=1), optimizer=OPT, seed=0,
                 **kw)
    return model, result


def _program(compute_dtype):
    """The train step's StableHLO text at ``compute_dtype``."""
    model = make_model(0)
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.as_pure(params), nnx.as_pure(rest)
    tx = make_optimizer(OPT)
    step = make_train_step(graphdef, tx, Classification(3), compute_dtype=compute_dtype)
    batch = next(iter(ArrayDataset(make_data()).batches(BATCH, seed=0, epoch=0)))
    state = TrainState(params, rest, tx.init(params))
    return step.lower(state, batch, jnp.int32(0)).as_text()


def _heavy_ops(text):
    """The operand types of every convolution and dot in a StableHLO module."""
    return [line for line in text.splitlines()
            if "stablehlo.convolution" in line or "stablehlo.dot_general" in line]


def test_the_bfloat16_step_multiplies_in_bfloat16_and_float32_stays_float32():
    low, full = _heavy_ops(_program(jnp.bfloat16)), _heavy_ops(_program(None))
    assert len(low) == len(full) > 0
    # The encoders' matmuls take bfloat16 operands (layers fed by float32 statistics,
    # e.g. after batch norm, may stay float32); nothing is bfloat16 without it.
    assert sum("xbf16>, tensor<" in line for line in low) >= 4
    assert not any("bf16" in line for line in full)


def test_bfloat16_training_keeps_float32_weights_and_tracks_float32(tmp_path):
    low_model, low = _fit(tmp_path / "bf16", compute_dtype=jnp.bfloat16)
    full_model, full = _fit(tmp_path / "f32")
    for leaf in jax.tree.leaves(nnx.state(low_model)):  # master weights and statistics
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert leaf.dtype == jnp.float32
    low_loss = [r["loss"] for r in read_log(tmp_path / "bf16" / "log.jsonl")
                if r["kind"] == "step"]
    full_loss = [r["loss"] for r in read_log(tmp_path / "f32" / "log.jsonl")
                 if r["kind"] == "step"]
    assert all(np.isfinite(low_loss)) and low_loss[-1] < low_loss[0]
    # The same training up to bfloat16 rounding: close, not identical.
    np.testing.assert_allclose(low_loss, full_loss, rtol=0.05)
    assert low_loss != full_loss
    assert not all(np.array_equal(a, b) for a, b in zip(
        params_of(low_model), params_of(full_model), strict=True))
    assert low.history[-1]["eval"]["accuracy"] == pytest.approx(
        full.history[-1]["eval"]["accuracy"], abs=0.2)


def test_compute_dtype_is_part_of_the_run_and_checked(tmp_path):
    _fit(tmp_path / "run", epochs=1, compute_dtype=jnp.bfloat16)
    with pytest.raises(CheckpointMismatchError, match="compute_dtype"):
        _fit(tmp_path / "run", epochs=2)  # float32 now: not the same run
    _, resumed = _fit(tmp_path / "run", epochs=2, compute_dtype="bfloat16")
    assert resumed.resumed_from is not None
    with pytest.raises(ValueError, match="compute_dtype: float16 needs loss scaling"):
        _fit(tmp_path / "x", compute_dtype=jnp.float16)
    with pytest.raises(ValueError, match="compute_dtype: expected None"):
        _fit(tmp_path / "x", compute_dtype=jnp.int8)
    with pytest.raises(TypeError, match="compute_dtype: expected None or jnp.bfloat16"):
        _fit(tmp_path / "x", compute_dtype=object())
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())
