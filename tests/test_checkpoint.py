"""lepton_mm.training.checkpoint: Orbax round trips, retention, atomicity, guards."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lepton_mm.training import OptimizerConfig, make_optimizer
from lepton_mm.training.checkpoint import (
    Checkpointer,
    CheckpointMismatchError,
    load_model,
    model_fingerprint,
)


class Net(nnx.Module):
    """Params, batch stats, a dropout RNG stream and a list (int path keys)."""

    def __init__(self, rngs, width=4):
        self.layers = nnx.List([nnx.Linear(3, width, rngs=rngs),
                                nnx.Linear(width, 2, rngs=rngs)])
        self.norm = nnx.BatchNorm(width, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        return self.layers[1](self.drop(self.norm(self.layers[0](x))))


def _trained_state(seed=0):
    model = Net(nnx.Rngs(seed))
    model(jnp.ones((5, 3)))  # moves batch stats and the dropout counter
    tx = make_optimizer(OptimizerConfig(name="adamw", freeze=("^layers/1/bias$",),
                                        clip_norm=1.0))
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    opt_state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, opt_state = tx.update(grads, opt_state, params)
    return model, tx, opt_state


def _leaves(tree):
    out = []
    for x in jax.tree.leaves(tree):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        out.append(np.asarray(x))
    return out


def test_round_trip_is_bitwise_including_rng_keys_and_opt_state(tmp_path):
    model, tx, opt_state = _trained_state()
    state = nnx.as_pure(nnx.state(model))
    ckpt = Checkpointer(tmp_path)
    path = ckpt.save(7, model_state=state, opt_state=opt_state,
                     meta={"loop": {"epoch": 1, "batch_index": 2}})
    assert path == tmp_path / "checkpoints" / "7" and path.is_dir()
    other, _, _ = _trained_state(seed=1)
    target = nnx.as_pure(nnx.state(other))
    abstract_opt = jax.eval_shape(tx.init, nnx.as_pure(nnx.state(other, nnx.Param)))
    restored, opt, meta = ckpt.restore(None, model_state=target, opt_state=abstract_opt)
    assert meta["step"] == 7 and meta["loop"] == {"epoch": 1, "batch_index": 2}
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(_leaves(restored), _leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)
    assert jax.tree.structure(opt) == jax.tree.structure(opt_state)
    for a, b in zip(_leaves(opt), _leaves(opt_state), strict=True):
        np.testing.assert_array_equal(a, b)
    keys = [x for x in jax.tree.leaves(restored)
            if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)]
    assert keys, "the dropout stream's key must come back as a typed key"
    ckpt.close()


def test_keeps_the_last_k_and_the_best(tmp_path):
    model, _, opt_state = _trained_state()
    state = nnx.as_pure(nnx.state(model))
    ckpt = Checkpointer(tmp_path, max_to_keep=2)
    for step in range(1, 6):
        if step == 2:
            ckpt.set_best(2)
        ckpt.save(step, model_state=state, opt_state=opt_state, meta={})
    assert ckpt.steps() == [2, 4, 5]
    ckpt.set_best(4)
    ckpt.save(6, model_state=state, opt_state=opt_state, meta={})
    assert ckpt.steps() == [4, 5, 6]
    ckpt.close()


def test_partial_checkpoint_is_ignored_and_cleaned_up(tmp_path):
    model, _, opt_state = _trained_state()
    state = nnx.as_pure(nnx.state(model))
    ckpt = Checkpointer(tmp_path)
    ckpt.save(3, model_state=state, opt_state=opt_state, meta={})
    ckpt.close()
    stale = tmp_path / "checkpoints" / "8.orbax-checkpoint-tmp-1700000000000000"
    stale.mkdir()
    (stale / "half_written").write_bytes(b"\0" * 10)
    reopened = Checkpointer(tmp_path)
    assert reopened.latest_step() == 3 and reopened.steps() == [3]
    reopened.save(4, model_state=state, opt_state=opt_state, meta={})
    assert not stale.exists()  # Orbax's clean-up (started on open) is done by then
    reopened.close()


def test_never_writes_non_finite_params(tmp_path):
    model, _, opt_state = _trained_state()
    state = nnx.as_pure(nnx.state(model))
    state["layers"][0]["kernel"] = state["layers"][0]["kernel"].at[0, 0].set(jnp.inf)
    ckpt = Checkpointer(tmp_path)
    with pytest.raises(FloatingPointError, match="step 4.*NaN or Inf"):
        ckpt.save(4, model_state=state, opt_state=opt_state, meta={})
    assert ckpt.steps() == []
    ckpt.close()


def test_mismatched_model_fails_naming_workdir_and_difference(tmp_path):
    model, _, opt_state = _trained_state()
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, model_state=nnx.state(model), opt_state=opt_state,
              meta={"fingerprint": model_fingerprint(model)})
    ckpt.check_model(model_fingerprint(Net(nnx.Rngs(5))))  # same architecture: fine
    wider = Net(nnx.Rngs(0), width=6)
    with pytest.raises(CheckpointMismatchError,
                       match=rf"{tmp_path}: .*different model: 'layers/0/bias' is "
                             r"Param \(4,\) float32 in the checkpoint but Param \(6,\)"):
        ckpt.check_model(model_fingerprint(wider))
    ckpt.close()
    with pytest.raises(CheckpointMismatchError, match="different model"):
        load_model(tmp_path, lambda: Net(nnx.Rngs(0), width=6), step=1)


def test_fingerprint_of_abstract_and_concrete_models_agree():
    concrete = model_fingerprint(Net(nnx.Rngs(0)))
    abstract = model_fingerprint(nnx.eval_shape(lambda: Net(nnx.Rngs(1))))
    assert concrete == abstract
    assert ["layers/0/kernel", "Param", [3, 4], "float32"] in concrete["variables"]
    assert model_fingerprint(Net(nnx.Rngs(0), width=5))["hash"] != concrete["hash"]


def test_load_model_builds_abstractly_and_allocates_once(tmp_path):
    model, _, opt_state = _trained_state()
    ckpt = Checkpointer(tmp_path)
    ckpt.save(2, model_state=nnx.state(model), opt_state=opt_state,
              meta={"fingerprint": model_fingerprint(model), "loop": {"best_step": 2}})
    ckpt.close()
    traced = []

    def build():
        traced.append(isinstance(jnp.zeros(()), jax.core.Tracer))
        return Net(nnx.Rngs(123))

    expected = _leaves(nnx.state(model))
    del model
    n_state = len(expected)
    before = {id(x) for x in jax.live_arrays()}
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    loaded = load_model(tmp_path, build, sharding=sharding)
    assert traced == [True]  # the constructor ran under nnx.eval_shape only
    new = [x for x in jax.live_arrays() if id(x) not in before]
    state_arrays = jax.tree.leaves(nnx.state(loaded))
    assert len(new) <= n_state  # no second copy of the parameters stays alive
    for x in state_arrays:
        assert x.sharding == sharding
    for a, b in zip(_leaves(nnx.state(loaded)), expected, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(FileNotFoundError, match="no checkpoint for step 9"):
        load_model(tmp_path, build, step=9)


def test_load_model_accepts_a_relative_workdir(tmp_path, monkeypatch):
    model, _, opt_state = _trained_state()
    ckpt = Checkpointer(tmp_path / "run")
    ckpt.save(2, model_state=nnx.state(model), opt_state=opt_state,
              meta={"fingerprint": model_fingerprint(model), "loop": {"best_step": 2}})
    ckpt.close()
    monkeypatch.chdir(tmp_path)  # Orbax refused relative paths at restore time
    loaded = load_model("run", lambda: Net(nnx.Rngs(123)))
    for a, b in zip(_leaves(nnx.state(loaded)), _leaves(nnx.state(model)), strict=True):
        np.testing.assert_array_equal(a, b)
