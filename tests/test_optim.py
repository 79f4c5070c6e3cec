"""Tests for lepton_mm.training.optim: schedules, freezing, weight decay, clipping."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lepton_mm.training import optim as optim_module
from lepton_mm.training.optim import (
    DEFAULT_NO_DECAY,
    OptimizerConfig,
    count_params,
    learning_rate_schedule,
    make_optimizer,
    param_path,
    trainable_mask,
)


class _Tower(nnx.Module):
    def __init__(self, rngs):
        self.encoders = nnx.Dict({"text": nnx.Linear(3, 4, rngs=rngs)})
        self.embed = nnx.Embed(5, 3, rngs=rngs)
        self.norm = nnx.LayerNorm(4, rngs=rngs)
        self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(self.norm(self.encoders["text"](x)))


def _paths(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {param_path(p): np.asarray(x) for p, x in leaves}


def _loss(model, x):
    return jnp.mean(model(x) ** 2)


# --- schedules -------------------------------------------------------------------------

def test_constant_schedule_with_warmup():
    schedule = learning_rate_schedule(OptimizerConfig(learning_rate=0.2, warmup_steps=4))
    got = [float(schedule(s)) for s in (0, 1, 2, 4, 100)]
    np.testing.assert_allclose(got, [0.0, 0.05, 0.1, 0.2, 0.2], rtol=1e-6)


def test_cosine_schedule_hand_values_and_optax_agreement():
    config = OptimizerConfig(learning_rate=1.0, schedule="cosine", warmup_steps=10,
                             total_steps=110, min_learning_rate=0.1)
    schedule = jax.jit(learning_rate_schedule(config))
    # warmup halfway, peak, cosine midpoint (0.1 + 0.9 / 2), end, after the end.
    got = [float(schedule(s)) for s in (0, 5, 10, 60, 110, 500)]
    np.testing.assert_allclose(got, [0.0, 0.5, 1.0, 0.55, 0.1, 0.1], rtol=1e-6, atol=1e-7)
    reference = optax.warmup_cosine_decay_schedule(0.0, 1.0, 10, 110, end_value=0.1)
    steps = jnp.arange(0, 130)
    np.testing.assert_allclose(jax.vmap(schedule)(steps), jax.vmap(reference)(steps),
                               rtol=1e-5, atol=1e-6)


def test_step_schedule_boundaries_and_floor():
    config = OptimizerConfig(learning_rate=1.0, schedule="step", decay_steps=(3, 5, 7),
                             decay_factor=0.1, min_learning_rate=0.005)
    schedule = learning_rate_schedule(config)
    got = [float(schedule(s)) for s in range(9)]
    np.testing.assert_allclose(got, [1, 1, 1, 0.1, 0.1, 0.01, 0.01, 0.005, 0.005],
                               rtol=1e-6)


def test_optimizer_uses_schedule():
    config = OptimizerConfig(name="sgd", momentum=0.0, learning_rate=1.0, warmup_steps=2)
    tx = make_optimizer(config)
    params = {"w": jnp.zeros(())}
    state = tx.init(params)
    got = []
    for _ in range(3):
        updates, state = tx.update({"w": jnp.ones(())}, state, params)
        got.append(float(updates["w"]))
    np.testing.assert_allclose(got, [0.0, -0.5, -1.0])


# --- freezing --------------------------------------------------------------------------

def test_frozen_params_unchanged_with_nnx_optimizer():
    model = _Tower(nnx.Rngs(0))
    config = OptimizerConfig(name="adamw", learning_rate=0.1, weight_decay=0.1,
                             freeze=(r"^encoders/text/",), clip_norm=1.0)
    optimizer = nnx.Optimizer(model, make_optimizer(config), wrt=nnx.Param)
    before = _paths(nnx.state(model, nnx.Param))

    @nnx.jit
    def step(model, optimizer, x):
        grads = nnx.grad(_loss)(model, x)
        optimizer.update(model, grads)

    x = jax.random.normal(jax.random.key(1), (8, 3))
    for _ in range(3):
        step(model, optimizer, x)
    after = _paths(nnx.state(model, nnx.Param))
    for path in before:
        changed = not np.array_equal(before[path], after[path])
        # The embedding gets no gradient (unused) but is decayed.
        assert changed == (not path.startswith("encoders/text/")), path


def test_frozen_params_unchanged_with_plain_jit_over_split():
    model = _Tower(nnx.Rngs(0))
    config = OptimizerConfig(name="sgd", learning_rate=0.1, freeze=("^head/",))
    tx = make_optimizer(config)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x):
        grads = jax.grad(lambda p: _loss(nnx.merge(graphdef, p, rest), x))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    x = jax.random.normal(jax.random.key(1), (8, 3))
    before = _paths(params)
    for _ in range(3):
        params, opt_state = step(params, opt_state, x)
    after = _paths(params)
    for path in before:
        changed = not np.array_equal(before[path], after[path])
        expected = not path.startswith("head/") and not path.startswith("embed/")
        assert changed == expected, path


def test_trainable_mask_and_param_path_agree_on_variables_and_arrays():
    model = _Tower(nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    config = OptimizerConfig(freeze=("^encoders/",))
    mask = trainable_mask(state, config)
    assert mask["encoders"]["text"]["kernel"] is False
    assert mask["head"]["kernel"] is True
    assert _paths(state).keys() == _paths(nnx.as_pure(state)).keys()
    assert "encoders/text/kernel" in _paths(state)
    assert param_path((jax.tree_util.SequenceKey(2), jax.tree_util.GetAttrKey("w"))) == "2/w"


def test_count_params():
    model = _Tower(nnx.Rngs(0))
    expected = 3 * 4 + 4 + 5 * 3 + 4 + 4 + 4 * 2 + 2
    assert count_params(model) == expected
    assert count_params(nnx.state(model, nnx.Param)) == expected
    assert count_params({"a": np.zeros((2, 3)), "b": None}) == 6


# --- weight decay ----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["adamw", "adam", "sgd"])
def test_weight_decay_skips_biases_and_norms(name):
    model = _Tower(nnx.Rngs(0))
    lr, wd = 0.1, 0.3
    config = OptimizerConfig(name=name, learning_rate=lr, weight_decay=wd, momentum=0.0)
    tx = make_optimizer(config)
    params = nnx.state(model, nnx.Param)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
    updates, params = _paths(updates), _paths(params)
    for path, update in updates.items():
        if path.endswith(("bias", "scale")):
            np.testing.assert_array_equal(update, 0, err_msg=path)
        elif name != "adam":
            # adamw: decoupled -lr*wd*w; sgd: L2 gradient wd*w times -lr.
            np.testing.assert_allclose(update, -lr * wd * params[path], rtol=1e-6,
                                       err_msg=path)
        else:
            # adam normalises the L2 gradient: -lr * sign(w) (up to eps).
            np.testing.assert_allclose(update, -lr * np.sign(params[path]), rtol=1e-4,
                                       err_msg=path)


def test_default_no_decay_patterns():
    config = OptimizerConfig()
    assert config.no_decay == DEFAULT_NO_DECAY
    params = {"norm": {"scale": jnp.ones(2)}, "logit_scale": jnp.ones(()),
              "embed": {"embedding": jnp.ones((3, 2))}, "layer_scale_kernel": jnp.ones(2)}
    tx = make_optimizer(OptimizerConfig(name="adamw", learning_rate=1.0, weight_decay=0.5))
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    assert float(jnp.abs(updates["norm"]["scale"]).sum()) == 0
    assert float(updates["logit_scale"]) == 0
    np.testing.assert_allclose(updates["embed"]["embedding"], -0.5)
    np.testing.assert_allclose(updates["layer_scale_kernel"], -0.5)


# --- clipping and momentum -------------------------------------------------------------

def test_clipping_caps_global_norm():
    tx = make_optimizer(OptimizerConfig(name="sgd", momentum=0.0, learning_rate=1.0,
                                        clip_norm=1.0))
    params = {"a": jnp.zeros(2), "b": jnp.zeros(1)}
    grads = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([4.0])}  # global norm 5
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["a"], [-0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(updates["b"], [-0.8], rtol=1e-6)
    small = {"a": jnp.array([0.3, 0.0]), "b": jnp.array([0.4])}  # norm 0.5: untouched
    updates, _ = tx.update(small, tx.init(params), params)
    np.testing.assert_allclose(updates["a"], [-0.3, 0.0], rtol=1e-6)


def test_frozen_gradients_do_not_count_towards_clipping():
    tx = make_optimizer(OptimizerConfig(name="sgd", momentum=0.0, learning_rate=1.0,
                                        clip_norm=10.0, freeze=("^frozen$",)))
    params = {"frozen": jnp.zeros(1), "a": jnp.zeros(2)}
    grads = {"frozen": jnp.array([100.0]), "a": jnp.array([3.0, 4.0])}
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["a"], [-3.0, -4.0])
    np.testing.assert_array_equal(updates["frozen"], [0.0])


@pytest.mark.parametrize(("nesterov", "expected"), [(False, [-0.1, -0.29]),
                                                     (True, [-0.19, -0.461])])
def test_sgd_momentum_two_steps_by_hand(nesterov, expected):
    # trace_1 = g_1 = 1; trace_2 = g_2 + 0.9 * trace_1 = 2.9.
    # heavy ball: u_t = -lr * trace_t; Nesterov: u_t = -lr * (g_t + 0.9 * trace_t).
    tx = make_optimizer(OptimizerConfig(name="sgd", learning_rate=0.1, momentum=0.9,
                                        nesterov=nesterov))
    params = {"w": jnp.zeros(())}
    state = tx.init(params)
    got = []
    for g in (1.0, 2.0):
        updates, state = tx.update({"w": jnp.asarray(g)}, state, params)
        got.append(float(updates["w"]))
    np.testing.assert_allclose(got, expected, rtol=1e-6)


# --- config validation -----------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "field"), [
    ({"name": "lamb"}, "name"),
    ({"schedule": "linear"}, "schedule"),
    ({"learning_rate": -1.0}, "learning_rate"),
    ({"learning_rate": float("nan")}, "learning_rate"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"momentum": 1.0}, "momentum"),
    ({"b2": 1.5}, "b2"),
    ({"eps": 0.0}, "eps"),
    ({"nesterov": True, "momentum": 0.0}, "nesterov"),
    ({"schedule": "cosine"}, "total_steps"),
    ({"schedule": "cosine", "total_steps": 10, "warmup_steps": 10}, "warmup_steps"),
    ({"warmup_steps": 20, "total_steps": 10}, "warmup_steps"),
    ({"warmup_steps": -1}, "warmup_steps"),
    ({"total_steps": 0}, "total_steps"),
    ({"schedule": "step"}, "decay_steps"),
    ({"schedule": "step", "decay_steps": (5, 5)}, "decay_steps"),
    ({"schedule": "step", "decay_steps": (2,), "warmup_steps": 3}, "decay_steps"),
    ({"decay_steps": (5,)}, "decay_steps"),
    ({"schedule": "step", "decay_steps": (5,), "decay_factor": 0.0}, "decay_factor"),
    ({"min_learning_rate": 1.0, "learning_rate": 0.1}, "min_learning_rate"),
    ({"clip_norm": 0.0}, "clip_norm"),
    ({"freeze": ("(",)}, "freeze"),
    ({"no_decay": ("[",)}, "no_decay"),
    ({"lr_multipliers": {"(": 0.1}}, "lr_multipliers"),
    ({"lr_multipliers": {"^a/": -0.1}}, "lr_multipliers"),
    ({"lr_multipliers": {"^a/": float("inf")}}, "lr_multipliers"),
])
def test_bad_config_raises_naming_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"OptimizerConfig\.{field}\b"):
        OptimizerConfig(**kwargs)


def test_config_is_hashable_and_lists_become_tuples():
    config = OptimizerConfig(freeze=["^a/"], schedule="step", decay_steps=[3])
    assert config.freeze == ("^a/",) and config.decay_steps == (3,)
    assert hash(config) == hash(OptimizerConfig(freeze=("^a/",), schedule="step",
                                                decay_steps=(3,)))
    with pytest.raises(TypeError, match="OptimizerConfig.freeze"):
        OptimizerConfig(freeze="^a/")
    with pytest.raises(TypeError, match="config"):
        make_optimizer({"name": "adam"})


# --- per-parameter learning rates ------------------------------------------------------


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_lr_multiplier_equals_training_with_the_scaled_rate(name):
    """A parameter with factor f follows exactly the trajectory of a run at f * lr (weight
    decay, momentum and the schedule included); the others are untouched by the factor."""
    rng = np.random.default_rng(0)
    params = {"text": {"kernel": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)},
              "head": {"kernel": jnp.asarray(rng.normal(size=(2,)), jnp.float32)}}
    grads = [jax.tree.map(lambda x, i=i: jnp.sin(x * (i + 1)), params) for i in range(3)]
    common = {"name": name, "weight_decay": 0.1, "warmup_steps": 2}

    def run(config):
        tx, p = make_optimizer(config), params
        state = tx.init(p)
        for g in grads:
            updates, state = tx.update(g, state, p)
            p = optax.apply_updates(p, updates)
        return p

    mixed = run(OptimizerConfig(learning_rate=0.1, **common,
                                lr_multipliers={"^text/": 0.25, "text": 9.0}))
    slow = run(OptimizerConfig(learning_rate=0.025, **common))
    plain = run(OptimizerConfig(learning_rate=0.1, **common))
    np.testing.assert_allclose(mixed["text"]["kernel"], slow["text"]["kernel"], rtol=1e-6)
    np.testing.assert_array_equal(mixed["head"]["kernel"], plain["head"]["kernel"])
    assert not np.allclose(mixed["text"]["kernel"], plain["text"]["kernel"])


def test_lr_multipliers_compose_with_freezing_and_are_hashable():
    config = OptimizerConfig(learning_rate=0.1, freeze=("^head/",),
                             lr_multipliers=[("^text/", 0.0)])
    assert config.lr_multipliers == (("^text/", 0.0),)
    assert hash(config) == hash(OptimizerConfig(learning_rate=0.1, freeze=("^head/",),
                                                lr_multipliers={"^text/": 0.0}))
    params = {"text": {"kernel": jnp.ones(2)}, "head": {"kernel": jnp.ones(2)},
              "other": {"kernel": jnp.ones(2)}}
    tx = make_optimizer(config)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    assert float(jnp.abs(updates["text"]["kernel"]).max()) == 0.0  # factor 0
    assert float(jnp.abs(updates["head"]["kernel"]).max()) == 0.0  # frozen
    assert float(jnp.abs(updates["other"]["kernel"]).min()) > 0.0
    with pytest.raises(TypeError, match="OptimizerConfig.lr_multipliers"):
        OptimizerConfig(lr_multipliers=("^a/", 0.1))


def test_docstring_examples():
    results = doctest.testmod(optim_module, optionflags=doctest.ELLIPSIS)
    assert results.attempted > 0 and results.failed == 0
