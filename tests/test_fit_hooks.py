"""fit(augment=..., adversary=..., strategy=...): hooks inside the compiled train step,
seeded by (seed, step), checked before compilation, stored for exact resume; a stateful
strategy's state carried through the steps and checkpoints."""

import dataclasses
import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_training_loop import BATCH, make_data, make_model, params_of

from lepton_mm.adversarial import model_loss, pgd
from lepton_mm.augment import Augmenter, ImageAugment
from lepton_mm.models import Classification
from lepton_mm.training import (
    Checkpointer,
    CheckpointMismatchError,
    OptimizerConfig,
    fit,
    read_log,
)
from lepton_mm.training.loop import _hook_name

OPT = OptimizerConfig(learning_rate=0.02)


def _fit(workdir, data=None, epochs=2, **kw):
    model = make_model(0)
    result = fit(model, Classification(3), make_data() if data is None else data,
                 workdir=workdir, epochs=epochs, batch_size=BATCH, optimizer=OPT, seed=0, **kw)
    return model, result


def _zero_image(batch, key):
    del key
    return {**batch, "image": jnp.zeros_like(batch["image"])}


def _identity(batch, key):
    del key
    return batch


def test_augment_is_applied_in_the_step_and_nothing_else_changes(tmp_path):
    plain, _ = _fit(tmp_path / "plain")
    same, _ = _fit(tmp_path / "identity", augment=_identity)
    for a, b in zip(params_of(plain), params_of(same), strict=True):
        np.testing.assert_array_equal(a, b)  # the hook takes no randomness from others
    # An augmentation equals training on the augmented data without one (independent
    # reference: the data zeroed up front).
    zeroed, _ = _fit(tmp_path / "zeroed", augment=_zero_image)
    data = make_data()
    reference, _ = _fit(tmp_path / "reference", data={**data, "image": 0 * data["image"]})
    for a, b in zip(params_of(zeroed), params_of(reference), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not all(np.allclose(a, b) for a, b in zip(params_of(zeroed), params_of(plain),
                                                   strict=True))


def test_random_augmentation_resumes_exactly_and_is_part_of_the_run(tmp_path):
    augment = Augmenter({"image": ImageAugment(max_shift=2, noise_std=0.3)})
    straight, _ = _fit(tmp_path / "straight", augment=augment)
    meta = Checkpointer(tmp_path / "straight", read_only=True).read_meta()
    assert meta["config"]["augment"] == repr(augment)
    _fit(tmp_path / "resumed", epochs=1, augment=augment)
    resumed, _ = _fit(tmp_path / "resumed", epochs=2, augment=augment)
    for a, b in zip(params_of(straight), params_of(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    plain, _ = _fit(tmp_path / "plain")
    assert not all(np.allclose(a, b) for a, b in zip(params_of(straight), params_of(plain),
                                                     strict=True))
    with pytest.raises(CheckpointMismatchError, match="augment"):
        _fit(tmp_path / "resumed", epochs=3)  # same workdir, no augmentation now


def test_adversarial_training_runs_and_differs_from_clean(tmp_path):
    def adversary(model, batch, key):
        return pgd(model_loss(model), batch, eps=0.5, steps=2, modalities="image", key=key)

    attacked, _ = _fit(tmp_path / "adv", epochs=1, adversary=adversary)
    assert all(np.all(np.isfinite(p)) for p in params_of(attacked))
    identity, _ = _fit(tmp_path / "adv_identity", epochs=1,
                       adversary=lambda m, b, k: b)
    clean, _ = _fit(tmp_path / "clean", epochs=1)
    for a, b in zip(params_of(identity), params_of(clean), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not all(np.allclose(a, b) for a, b in zip(params_of(attacked), params_of(clean),
                                                     strict=True))


def test_bad_hooks_fail_before_compute(tmp_path):
    with pytest.raises(TypeError, match="augment: expected a callable"):
        _fit(tmp_path / "a", augment="flip")
    with pytest.raises(TypeError, match="augment: must return a batch"):
        _fit(tmp_path / "b", augment=lambda b, k: {"image": b["image"]})
    with pytest.raises(TypeError, match="adversary: must return a batch"):
        _fit(tmp_path / "c", adversary=lambda m, b, k: {**b, "image": b["image"][:, :4]})
    assert not any((tmp_path / d).exists() and any((tmp_path / d).iterdir())
                   for d in "abc")
    jax.clear_caches()


def _scaled(batch, key, *, factor):
    del key
    return {**batch, "image": factor * batch["image"]}


def _my_transform(x, key):
    del key
    return x


def test_hook_names_see_settings_and_are_stable_across_processes():
    """What a checkpoint stores to refuse resuming with another hook: a partial's bound
    settings count; no memory address (a new process names the same hook the same)."""
    a = _hook_name("augment", functools.partial(_scaled, factor=0.5), 2)
    assert a != _hook_name("augment", functools.partial(_scaled, factor=0.25), 2)
    assert "factor=0.5" in a and "0x" not in a
    wrapped = Augmenter(transforms=(("image", _my_transform),))
    name = _hook_name("augment", wrapped, 2)
    assert "_my_transform" in name and "0x" not in name
    code = ("import sys; sys.path.insert(0, 'tests'); import test_fit_hooks as t; "
            "from lepton_mm.augment import Augmenter; "
            "print(t._hook_name('augment', Augmenter(transforms=(('image', "
            "t._my_transform),)), 2))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={"JAX_PLATFORMS": "cpu", "PATH": ""})
    assert out.stdout.strip() == name


def test_hooks_see_valid_and_their_lookup_errors_are_named(tmp_path):
    seen = []

    def needs_valid(batch, key):
        seen.append(batch["valid"].shape)  # the train step passes "valid" too
        return batch

    _fit(tmp_path / "ok", epochs=1, augment=needs_valid)
    assert len(seen) >= 2 and all(len(s) == 1 for s in seen)  # the check, then the step
    with pytest.raises(TypeError, match=r"augment: raised KeyError\('depth'\)"):
        _fit(tmp_path / "bad", augment=lambda b, k: {**b, "image": b["depth"]})


@dataclasses.dataclass(frozen=True)
class _Counting:
    """A stateful strategy that changes nothing: its state counts the applied steps and
    sums their losses (loss hook), then doubles the count (modulate hook)."""

    double: bool = False

    def init_state(self, model, task, batch):
        del model, task, batch
        return {"steps": jnp.zeros((), jnp.float32), "loss_sum": jnp.zeros((), jnp.float32)}

    def loss(self, forward, task, batch, outputs, loss, key, step, state):
        new = {"steps": state["steps"] + 1, "loss_sum": state["loss_sum"] + loss}
        return loss, {"count": new["steps"]}, new

    def modulate(self, model, batch, grads, key, step, state):
        if not self.double:
            return grads, {}, state
        return grads, {}, {**state, "steps": 2 * state["steps"]}


def test_a_stateful_strategy_is_carried_through_the_steps_and_resumes_exactly(tmp_path):
    plain, _ = _fit(tmp_path / "plain")
    counted, result = _fit(tmp_path / "counted", strategy=_Counting())
    for a, b in zip(params_of(plain), params_of(counted), strict=True):
        np.testing.assert_array_equal(a, b)  # the state leaves the training alone
    losses = [r["loss"] for r in read_log(tmp_path / "counted" / "log.jsonl")
              if r["kind"] == "step"]
    assert float(result.strategy_state["steps"]) == result.step == len(losses) == 6
    assert float(result.strategy_state["loss_sum"]) == pytest.approx(sum(losses), rel=1e-6)
    _fit(tmp_path / "resumed", epochs=1, strategy=_Counting())
    _, again = _fit(tmp_path / "resumed", epochs=2, strategy=_Counting())
    assert again.resumed_from == 3
    for a, b in zip(jax.tree.leaves(result.strategy_state),
                    jax.tree.leaves(again.strategy_state), strict=True):
        np.testing.assert_array_equal(a, b)
    # loss's new state goes to modulate: x -> 2 (x + 1) six times from 0.
    _, doubled = _fit(tmp_path / "doubled", strategy=_Counting(double=True))
    assert float(doubled.strategy_state["steps"]) == 2 ** 7 - 2
    # A skipped (non-finite) step leaves the state as it was: one NaN example spoils
    # each batch it is in (in padding too).
    data = make_data()
    data["image"][0] = np.nan
    _, skipping = _fit(tmp_path / "nan", data=data, nan_policy="skip", strategy=_Counting())
    skipped = sum(h["skipped_steps"] for h in skipping.history)
    assert 2 <= skipped < 6 and float(skipping.strategy_state["steps"]) == 6 - skipped


@dataclasses.dataclass(frozen=True)
class _Forgetful(_Counting):
    """Returns no state from loss (a stateless signature on a stateful strategy)."""

    def loss(self, forward, task, batch, outputs, loss, key, step, state):
        return loss, {}


@dataclasses.dataclass(frozen=True)
class _Reshaping(_Counting):
    """Returns a state of another shape from loss."""

    def loss(self, forward, task, batch, outputs, loss, key, step, state):
        return loss, {}, {**state, "steps": jnp.zeros((2,), jnp.float32)}


def test_bad_stateful_strategies_fail_before_compute(tmp_path):
    with pytest.raises(TypeError, match=r"strategy: loss must return \(scalar objective, "
                                        r"\{name: scalar\}, state\)"):
        _fit(tmp_path / "a", strategy=_Forgetful())
    with pytest.raises(TypeError, match="strategy: loss must return a state with "
                                        "init_state's structure, shapes and dtypes"):
        _fit(tmp_path / "b", strategy=_Reshaping())
    assert not any((tmp_path / d).exists() and any((tmp_path / d).iterdir()) for d in "ab")
