"""Tests for lepton_mm.attribution: modality Shapley values, integrated gradients."""

import doctest
import itertools
import math

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from test_training_loop import make_data, make_model

from lepton_mm import attribution
from lepton_mm.attribution import (
    ModalityShapley,
    gradient_x_input,
    integrated_gradients,
    modality_shapley,
    shapley_weights,
)
from lepton_mm.robustness import mark_absent


def test_doctests():
    result = doctest.testmod(attribution)
    assert result.attempted > 0 and result.failed == 0


# ------------------------------------------------------------------------- Shapley


def toy_batch(n=4, present=None):
    batch = {"img": jnp.zeros((n, 3)), "aud": jnp.zeros((n, 2))}
    if present is not None:
        batch["present"] = present
    return batch


def interaction_model(a, b, c):
    """A fake model: v(S) = a*[img] + b*[aud] + c*[img and aud], per example."""

    def model(batch):
        ones = jnp.ones(batch["img"].shape[:1], bool)  # no flag: present everywhere
        img, aud = (batch.get("present", {}).get(m, ones) for m in ("img", "aud"))
        return a * img + b * aud + c * (img & aud)

    return model


def test_shapley_hand_computed_two_players():
    a = jnp.array([1.0, -2.0, 0.5, 0.0])
    b = jnp.array([3.0, 1.0, -1.0, 2.0])
    c = jnp.array([2.0, 4.0, 0.0, -6.0])
    out = jax.jit(lambda: modality_shapley(interaction_model(a, b, c), toy_batch()))()
    assert isinstance(out, ModalityShapley) and set(out.values) == {"img", "aud"}
    np.testing.assert_allclose(out.values["img"], a + c / 2, rtol=1e-6)
    np.testing.assert_allclose(out.values["aud"], b + c / 2, rtol=1e-6)
    np.testing.assert_allclose(out.base, 0.0)
    np.testing.assert_allclose(out.full, a + b + c, rtol=1e-6)
    np.testing.assert_array_equal(out.target, -1)


def test_shapley_three_players_matches_brute_force_permutations():
    # v(S) = a random set function per example; Shapley = mean marginal over orderings.
    rng = np.random.default_rng(0)
    names = ["a", "b", "c"]
    table = rng.normal(size=(8, 5)).astype(np.float32)  # [coalition, batch]
    table[0] = 0.3

    def model(batch):
        idx = sum(batch["present"][m].astype(jnp.int32) << i for i, m in enumerate(names))
        return jnp.take_along_axis(jnp.asarray(table), idx[None], axis=0)[0]

    out = modality_shapley(model, {m: jnp.zeros((5, 1)) for m in names})
    for i, m in enumerate(names):
        expected = np.zeros(5)
        for order in itertools.permutations(range(3)):
            before = sum(1 << j for j in order[:order.index(i)])
            expected += table[before | (1 << i)] - table[before]
        np.testing.assert_allclose(out.values[m], expected / 6, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sum(out.values.values()), out.full - out.base, atol=1e-5)


def test_shapley_weights_sum_to_one():
    for m in range(1, 7):
        w = shapley_weights(m)
        assert math.isclose(sum(math.comb(m - 1, s) * w[s] for s in range(m)), 1.0)


def test_example_without_a_modality_is_a_null_player():
    present = {"aud": jnp.array([True, False, True, False])}
    out = modality_shapley(interaction_model(1.0, 3.0, 2.0), toy_batch(present=present))
    np.testing.assert_array_equal(out.values["aud"], [4.0, 0.0, 4.0, 0.0])
    np.testing.assert_array_equal(out.values["img"], [2.0, 1.0, 2.0, 1.0])
    np.testing.assert_array_equal(out.full, [6.0, 1.0, 6.0, 1.0])


def test_subset_of_players_leaves_the_others_as_given():
    out = modality_shapley(interaction_model(1.0, 3.0, 2.0), toy_batch(),
                           modalities=["img"])
    assert set(out.values) == {"img"}
    np.testing.assert_allclose(out.values["img"], 3.0)  # aud stays present: 1 + 2
    np.testing.assert_allclose(out.base, 3.0)


@pytest.fixture(scope="module")
def classifier():
    model = make_model(seed=0)
    batch = make_data(10, seed=3)
    batch["present"]["audio"][:3] = [False, True, False]
    return model, batch


def test_completeness_on_the_small_classifier(classifier):
    model, batch = classifier
    out = modality_shapley(model, batch)
    total = out.values["image"] + out.values["audio"]
    np.testing.assert_allclose(total, out.full - out.base, rtol=1e-5, atol=1e-5)
    # v(all) is the eval-mode model on the batch as given, at the predicted class.
    eval_model = make_model(seed=0)
    eval_model.eval()
    logits = np.asarray(eval_model(batch))
    np.testing.assert_array_equal(out.target, logits.argmax(-1))
    np.testing.assert_allclose(out.full, logits.max(-1), rtol=1e-5, atol=1e-6)
    none = np.asarray(eval_model(mark_absent(batch, ["image", "audio"])))
    np.testing.assert_allclose(out.base, none[np.arange(10), out.target], rtol=1e-5,
                               atol=1e-6)
    # Null player: examples without audio give it exactly 0.
    absent = ~np.asarray(batch["present"]["audio"])
    assert absent.any()
    np.testing.assert_array_equal(np.asarray(out.values["audio"])[absent], 0.0)
    assert np.all(np.asarray(out.values["audio"])[~absent] != 0.0)


def test_classifier_encoded_once_equals_whole_model_per_coalition(classifier):
    # A MultimodalClassifier is encoded once and only fused per coalition; a plain
    # callable runs whole per coalition. Same values, and far fewer encoder ops.
    model, batch = classifier
    fast = modality_shapley(model, batch)
    eval_model = make_model(seed=0)
    eval_model.eval()
    whole = modality_shapley(lambda b: eval_model(b), batch)
    for m in ("image", "audio"):
        np.testing.assert_allclose(fast.values[m], whole.values[m], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fast.base, whole.base, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(fast.target, whole.target)

    def count(jaxpr, inside):  # matmul-like ops, all of them or only inside the map
        n = 0
        for eqn in jaxpr.eqns:
            here = inside or eqn.primitive.name == "scan"
            if here and eqn.primitive.name in ("dot_general", "conv_general_dilated"):
                n += 1
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                n += count(sub, here)
        return n

    def matmuls_per_coalition(fn):
        return count(jax.make_jaxpr(fn)(batch).jaxpr, False)

    assert matmuls_per_coalition(lambda b: modality_shapley(model, b).full) < \
        matmuls_per_coalition(lambda b: modality_shapley(lambda x: eval_model(x), b).full)


def test_marked_absent_audio_gets_zero_and_model_is_untouched(classifier):
    model, batch = classifier
    before = jax.tree.leaves(model)
    out = modality_shapley(model, mark_absent(batch, "audio"), target=1)
    np.testing.assert_array_equal(out.values["audio"], 0.0)
    np.testing.assert_array_equal(out.target, 1)
    np.testing.assert_allclose(out.values["image"], out.full - out.base, rtol=1e-5,
                               atol=1e-6)
    assert all(a is b for a, b in zip(before, jax.tree.leaves(model), strict=True))


def test_explicit_target_per_example(classifier):
    model, batch = classifier
    target = np.arange(10, dtype=np.int32) % 3
    out = modality_shapley(model, batch, target=target)
    np.testing.assert_array_equal(out.target, target)
    np.testing.assert_allclose(out.values["image"] + out.values["audio"],
                               out.full - out.base, rtol=1e-5, atol=1e-5)


def test_shapley_under_jit_matches_eager(classifier):
    model, batch = classifier
    eager = modality_shapley(model, batch)
    jitted = jax.jit(lambda b: modality_shapley(model, b))(batch)
    for m in ("image", "audio"):
        np.testing.assert_allclose(jitted.values[m], eager.values[m], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(jitted.target, eager.target)


def test_shapley_bad_arguments(classifier):
    model, batch = classifier
    with pytest.raises(ValueError, match="modalities: unrecognized modality 'text'"):
        modality_shapley(model, batch, modalities=["text"])
    with pytest.raises(ValueError, match="modalities: unrecognized modality 'label'"):
        modality_shapley(model, batch, modalities=["label"])
    with pytest.raises(ValueError, match="modalities: each modality once"):
        modality_shapley(model, batch, modalities=["image", "image"])
    with pytest.raises(ValueError, match="target:"):
        modality_shapley(model, batch, target=np.zeros(3, np.int32))
    with pytest.raises(ValueError, match="target: classes must lie"):
        modality_shapley(model, batch, target=5)
    with pytest.raises(ValueError, match="target: the model's output is already"):
        modality_shapley(interaction_model(1.0, 1.0, 1.0), toy_batch(), target=0)
    with pytest.raises(TypeError, match="model:"):
        modality_shapley(3, toy_batch())
    with pytest.raises(TypeError, match="batch:"):
        modality_shapley(model, [1, 2])
    with pytest.raises(ValueError, match="model: expected outputs"):
        modality_shapley(lambda b: jnp.zeros((4, 2, 2)), toy_batch())


# ------------------------------------------------------------- integrated gradients


def smooth(x):
    """A smooth nonlinear per-example function of [batch, time, mels]."""
    return jnp.sum(jnp.tanh(2.0 * x) * jnp.cos(x), axis=(1, 2))


def test_ig_completeness_improves_with_steps():
    x = jax.random.normal(jax.random.key(0), (3, 4, 5))
    base = jnp.full(x.shape, -0.5)
    expected = np.asarray(smooth(x) - smooth(base))
    errors = {}
    for steps in (8, 64, 256):
        ig = integrated_gradients(smooth, x, base, steps=steps)
        assert ig.shape == x.shape and ig.dtype == jnp.float32
        errors[steps] = np.max(np.abs(np.asarray(ig.sum(axis=(1, 2))) - expected))
    assert errors[64] < errors[8]
    assert errors[256] < 1e-3


def test_ig_and_grad_x_input_are_exact_on_linear():
    key1, key2, key3 = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(key1, (2, 4, 4, 3))
    base = jax.random.normal(key2, x.shape)
    w = jax.random.normal(key3, x.shape[1:])

    def fn(z):
        return jnp.sum(z * w[None], axis=(1, 2, 3)) + 0.7

    for steps in (1, 5):
        ig = jax.jit(integrated_gradients, static_argnums=0,
                     static_argnames="steps")(fn, x, base, steps=steps)
        np.testing.assert_allclose(ig, (x - base) * w[None], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gradient_x_input(fn, x), x * w[None], rtol=1e-6)


def test_padded_frames_get_exactly_zero():
    x = jax.random.normal(jax.random.key(2), (2, 6, 3))
    mask = np.arange(6)[None] < np.array([[4], [6]])

    def fn(z):  # the padded frames would matter if they were not masked
        return jnp.sum(z ** 3, axis=(1, 2))

    ig = integrated_gradients(fn, x, 0.0, steps=16, mask=mask)
    gxi = gradient_x_input(fn, x, mask=mask)
    for attr in (ig, gxi):
        np.testing.assert_array_equal(np.asarray(attr)[0, 4:], 0.0)
        assert np.all(np.asarray(attr)[1] != 0.0)
    # Completeness against the baseline with padded frames left as in x.
    eff = jnp.where(mask[..., None], 0.0, x)
    np.testing.assert_allclose(ig.sum(axis=(1, 2)), fn(x) - fn(eff), rtol=1e-3, atol=1e-3)


def test_ig_through_the_classifier_image(classifier):
    _, batch = classifier
    model_eval = make_model(seed=0)
    model_eval.eval()

    def fn(images):
        return model_eval({**batch, "image": images})[:, 0]

    images = jnp.asarray(batch["image"])
    ig = integrated_gradients(fn, images, 0.0, steps=64)
    gap = fn(images) - fn(jnp.zeros_like(images))
    np.testing.assert_allclose(ig.sum(axis=(1, 2, 3)), gap, rtol=0.05, atol=0.02)


def test_ig_bad_arguments():
    x = jnp.ones((2, 3))
    def fn(z):
        return z.sum(axis=1)

    with pytest.raises(ValueError, match="steps:"):
        integrated_gradients(fn, x, 0.0, steps=0)
    with pytest.raises(ValueError, match="baseline:"):
        integrated_gradients(fn, x, jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match="mask:"):
        integrated_gradients(fn, x, 0.0, mask=np.ones((3,), bool))
    with pytest.raises(ValueError, match="mask:"):
        gradient_x_input(fn, x, mask=np.ones((2,), np.int32))
    with pytest.raises(ValueError, match="fn:"):
        integrated_gradients(lambda z: z, x, 0.0)
    with pytest.raises(ValueError, match="inputs:"):
        gradient_x_input(fn, jnp.ones((2, 3), jnp.int32))


def test_integrated_gradients_match_captum_on_a_shared_mlp():
    """Against Captum's IntegratedGradients (riemann_middle) on the same weights: the
    fixture was made once by tests/fixtures/make_captum_ig_reference.py (torch, captum)."""
    from pathlib import Path

    ref = np.load(Path(__file__).parent / "fixtures" / "captum_ig_reference.npz")
    w1, b1, w2, b2 = (jnp.asarray(ref[k], jnp.float32) for k in ("w1", "b1", "w2", "b2"))
    target = int(ref["target"])

    def fn(x):  # [batch, 6, 5] -> the target logit [batch]
        h = jnp.tanh(x.reshape(x.shape[0], -1) @ w1 + b1[None])
        return (h @ w2 + b2[None])[:, target]

    x = jnp.asarray(ref["inputs"], jnp.float32)
    for name, baseline, steps in (("ig_zero_8", 0.0, 8), ("ig_zero_64", 0.0, 64),
                                  ("ig_random_64", jnp.asarray(ref["baseline"], jnp.float32),
                                   64)):
        ours = integrated_gradients(fn, x, baseline, steps=steps)
        np.testing.assert_allclose(ours, ref[name], rtol=1e-4, atol=1e-6, err_msg=name)
