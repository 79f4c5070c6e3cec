"""Several training steps per compiled call (``steps_per_call``, a ``lax.scan``): the
same updates, statistics, logs, checkpoints and resumes as one step per call."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _sources import CrashAfter
from flax import nnx
from test_training_loop import make_data, make_model, params_of, token_data, token_model

from lepton_mm.data import BucketedDataset
from lepton_mm.models import Classification
from lepton_mm.training import (
    ArrayDataset,
    Checkpointer,
    OptimizerConfig,
    epoch_permutation,
    fit,
    make_optimizer,
    read_log,
)
from lepton_mm.training.loop import TrainState, make_train_step

BATCH = 8


def _steps(records):
    return [r for r in records if r["kind"] == "step"]


def _plain(leaf):
    return jax.random.key_data(leaf) if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key) \
        else leaf


def _assert_same_params(a, b):
    for x, y in zip(params_of(a), params_of(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_k_steps_in_one_call_equal_k_single_calls():
    model = make_model()
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.as_pure(params), nnx.as_pure(rest)
    tx = make_optimizer(OptimizerConfig(learning_rate=0.05))
    task = Classification(3)
    source = ArrayDataset(make_data(32))
    batches = [dict(b) for b in source.batches(BATCH, seed=0, epoch=0)]
    assert len(batches) == 4

    def fresh():
        return jax.tree.map(lambda a: jnp.array(a, copy=True),
                            TrainState(params, rest, tx.init(params)))

    one = make_train_step(graphdef, tx, task, seed=3, modality_dropout=0.3)
    many = make_train_step(graphdef, tx, task, seed=3, modality_dropout=0.3,
                           steps_per_call=4)
    state, singles = fresh(), []
    for i, b in enumerate(batches):
        state, stats = one(state, b, jnp.asarray(5 + i, jnp.int32))
        singles.append(stats)
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *batches)
    chunk_state, chunk_stats = many(fresh(), stacked, jnp.asarray(5, jnp.int32))
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(chunk_state), strict=True):
        np.testing.assert_array_equal(_plain(a), _plain(b))  # bit-equal, RNG streams included
    assert chunk_stats["loss"].shape == (4,)
    for i, stats in enumerate(singles):
        for key in ("loss", "grad_norm", "finite", "alive", "num_valid"):
            np.testing.assert_array_equal(chunk_stats[key][i], stats[key])
    # the steps' numbers matter (dropout keys): starting at another step differs
    other, _ = many(fresh(), stacked, jnp.asarray(6, jnp.int32))
    assert not all(np.array_equal(_plain(a), _plain(b)) for a, b in
                   zip(jax.tree.leaves(other), jax.tree.leaves(chunk_state), strict=True))


def test_fit_with_k_steps_per_call_equals_one_step_per_call(tmp_path):
    # 44 examples, batch 8: 6 batches an epoch; with K = 4 and a checkpoint every 5 steps
    # the calls are [4, 1 (checkpoint), 1 (epoch end)] then [4 (checkpoint), 2 singles]
    kw = {"eval_data": make_data(12, seed=1), "epochs": 2, "batch_size": BATCH,
          "checkpoint_every": 5, "keep_checkpoints": 10, "modality_dropout": 0.2,
          "optimizer": OptimizerConfig(learning_rate=0.02)}
    data = make_data(44)
    reference, chunked = make_model(), make_model()
    ref = fit(reference, Classification(3), data, workdir=tmp_path / "k1", **kw)
    got = fit(chunked, Classification(3), data, workdir=tmp_path / "k4", steps_per_call=4,
              **kw)
    _assert_same_params(chunked, reference)
    assert got.history == ref.history and got.step == ref.step == 12
    assert _steps(read_log(tmp_path / "k4" / "log.jsonl")) == \
        _steps(read_log(tmp_path / "k1" / "log.jsonl"))
    for workdir in ("k1", "k4"):
        ckpt = Checkpointer(tmp_path / workdir, read_only=True)
        assert ckpt.steps() == [5, 6, 10, 12]
        ckpt.close()


def test_interrupted_chunked_run_resumes_exactly_with_another_k(tmp_path):
    arrays, lengths = token_data()
    bounds = (4, 8, 20)

    def source():
        return BucketedDataset(arrays, {"text": lengths}, bucket_bounds=bounds)

    kw = {"epochs": 2, "batch_size": 4, "seed": 2, "checkpoint_every": 2,
          "keep_checkpoints": 20, "optimizer": OptimizerConfig(learning_rate=0.03)}
    steps_per_epoch = source().num_batches(4)
    reference = token_model()
    uninterrupted = fit(reference, Classification(3), source(), workdir=tmp_path / "ref",
                        **kw)
    # buckets of mixed sequence lengths: a call stacks only batches of one shape
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(token_model(), Classification(3), CrashAfter(source(), after=steps_per_epoch + 3),
            workdir=tmp_path / "run", steps_per_call=3, **kw)
    resumed_model = token_model()
    resumed = fit(resumed_model, Classification(3), source(), workdir=tmp_path / "run",
                  steps_per_call=2, **kw)
    assert steps_per_epoch < resumed.resumed_from < 2 * steps_per_epoch
    assert resumed.history == uninterrupted.history
    _assert_same_params(resumed_model, reference)
    assert _steps(read_log(tmp_path / "run" / "log.jsonl")) == \
        _steps(read_log(tmp_path / "ref" / "log.jsonl"))


def test_non_finite_step_inside_a_call_stops_or_skips_as_single_steps_do(tmp_path):
    data = make_data(44)
    bad = int(epoch_permutation(44, 0, 0)[BATCH])  # in batch 2 of epoch 0
    data["image"][bad] = np.nan
    models = {}
    for k in (1, 4):
        models[k] = make_model()
        with pytest.raises(FloatingPointError,
                           match=r"at step 2 \(epoch 1, batch 2\).*No checkpoint"):
            fit(models[k], Classification(3), data, workdir=tmp_path / f"raise{k}",
                batch_size=BATCH, steps_per_call=k)
    # the state stopped at step 1 in both: the call's later steps were not applied
    _assert_same_params(models[4], models[1])

    skipped = {}
    for k in (1, 4):
        models[k] = make_model()
        skipped[k] = fit(models[k], Classification(3), data, workdir=tmp_path / f"skip{k}",
                         epochs=2, batch_size=BATCH, nan_policy="skip", steps_per_call=k)
    assert [r["skipped_steps"] for r in skipped[4].history] == \
        [r["skipped_steps"] for r in skipped[1].history]
    assert skipped[1].history[0]["skipped_steps"] >= 1
    _assert_same_params(models[4], models[1])


@pytest.mark.parametrize("kwargs, match", [
    ({"steps_per_call": 0}, r"steps_per_call: expected an int >= 1, got 0"),
    ({"steps_per_call": 2.0}, r"steps_per_call: expected an int >= 1"),
    ({"steps_per_call": 2, "mesh": "auto"}, r"steps_per_call: 2 steps per call run on "
                                            r"one device only"),
])
def test_bad_steps_per_call_fails_before_compute(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit(make_model(), Classification(3), make_data(), workdir=tmp_path,
            batch_size=BATCH, **kwargs)
    assert not (tmp_path / "checkpoints").exists()
