"""Tests for lepton_mm.fusion.modality_dropout."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lepton_mm.fusion import modality_dropout
from lepton_mm.types import EncoderOutput


def _inputs(names, batch, present=None, *, dim=2, time=3, fill=1.0, dtype=jnp.float32):
    """``present``: bool [batch, len(names)] (all True if omitted); absent rows hold fill."""
    present = (np.ones((batch, len(names)), bool) if present is None
               else np.asarray(present, bool))
    out = {}
    for i, m in enumerate(names):
        mask = np.repeat(present[:, i:i + 1], time, axis=1)
        tokens = np.where(mask[..., None], i + 1.0, fill)
        tokens = np.broadcast_to(tokens, (batch, time, dim))
        pooled = np.where(present[:, i:i + 1], i + 1.0, fill) * np.ones((batch, dim))
        out[m] = EncoderOutput(jnp.asarray(tokens, dtype), jnp.asarray(mask),
                               jnp.asarray(pooled, dtype))
    return out


def _present(out, names):
    return np.stack([np.asarray(out[m].present) for m in names], axis=1)


def test_empirical_drop_rate_matches_rate(key):
    names = ("a", "b", "c", "d")
    out = modality_dropout(_inputs(names, 4000), 0.3, key=key)
    dropped = ~_present(out, names)
    # min_present=1 binds only when all four would drop (p = 0.3**4), lowering the
    # rate by 0.3**4 / 4 = 0.002.
    assert abs(dropped.mean() - 0.298) < 0.012
    assert abs(dropped[:, 0].mean() - 0.298) < 0.025  # each modality independently


def test_marginal_rate_when_min_present_binds(key):
    # Two modalities, rate 0.5: both draw "drop" with p = 0.25 and then the one with the
    # higher priority is kept, so each is dropped with p = 0.5 - 0.25 / 2 = 0.375.
    out = modality_dropout(_inputs(("a", "b"), 8000), 0.5, key=key)
    dropped = ~_present(out, ("a", "b"))
    np.testing.assert_allclose(dropped.mean(axis=0), [0.375, 0.375], atol=0.015)
    assert not np.any(dropped.all(axis=1))


@pytest.mark.parametrize("min_present", [1, 2, 3])
def test_always_keeps_min_present(key, min_present):
    names = ("a", "b", "c", "d")
    out = modality_dropout(_inputs(names, 500), 0.9, key=key, min_present=min_present)
    kept = _present(out, names).sum(axis=1)
    assert kept.min() == min_present  # the high rate makes the floor bind


def test_examples_already_missing_modalities(key):
    names = ("a", "b", "c")
    present = np.array([[1, 1, 1], [1, 0, 0], [0, 0, 0], [0, 1, 1]] * 50, bool)
    inputs = _inputs(names, len(present), present, fill=np.nan)
    out = modality_dropout(inputs, 0.95, key=key, min_present=2)
    after = _present(out, names)
    assert not np.any(after & ~present)  # absent stays absent
    np.testing.assert_array_equal(after.sum(1), np.minimum(present.sum(1), 2))
    # Already-absent rows are left untouched (their NaN values included).
    for m in names:
        np.testing.assert_array_equal(out[m].tokens[2], inputs[m].tokens[2])


def test_dropped_rows_are_zeroed_and_masked(key):
    names = ("a", "b")
    inputs = _inputs(names, 64)
    out = modality_dropout(inputs, 0.5, key=key)
    for m in names:
        x = out[m]
        dropped = ~np.asarray(x.present)
        assert dropped.any()
        assert np.all(np.asarray(x.tokens)[dropped] == 0)
        assert np.all(np.asarray(x.pooled)[dropped] == 0)
        np.testing.assert_array_equal(x.tokens[~dropped], inputs[m].tokens[~dropped])
        np.testing.assert_array_equal(x.pooled[~dropped], inputs[m].pooled[~dropped])


def test_deterministic_given_key_and_jit_safe(key):
    names = ("a", "b", "c")
    inputs = _inputs(names, 32)
    a = modality_dropout(inputs, 0.4, key=key)
    b = modality_dropout(inputs, 0.4, key=key)
    jitted = jax.jit(functools.partial(modality_dropout, rate=0.4, min_present=1))
    c = jitted(inputs, key=key)
    other = modality_dropout(inputs, 0.4, key=jax.random.key(1))
    for m in names:
        for x, y, z in zip(a[m], b[m], c[m], strict=True):
            np.testing.assert_array_equal(x, y)
            np.testing.assert_array_equal(x, z)
    assert not np.array_equal(_present(a, names), _present(other, names))


def test_legacy_uint32_key_is_accepted():
    out = modality_dropout(_inputs(("a", "b"), 4), 0.5, key=jax.random.PRNGKey(0))
    assert set(out) == {"a", "b"}


def test_rate_zero_is_the_identity(key):
    present = np.array([[1, 0], [1, 1]], bool)
    inputs = _inputs(("a", "b"), 2, present, fill=np.nan)
    out = modality_dropout(inputs, 0.0, key=key)
    for m in inputs:
        for x, y in zip(out[m], inputs[m], strict=True):
            np.testing.assert_array_equal(x, y)


def test_keys_keep_input_order_and_draws_do_not_depend_on_it(key):
    inputs = _inputs(("b", "c", "a"), 16)
    out = modality_dropout(inputs, 0.5, key=key)
    assert list(out) == ["b", "c", "a"]
    reordered = modality_dropout(dict(sorted(inputs.items())), 0.5, key=key)
    assert list(reordered) == ["a", "b", "c"]
    for m in inputs:
        np.testing.assert_array_equal(out[m].mask, reordered[m].mask)


def test_dtypes_are_preserved(key):
    out = modality_dropout(_inputs(("a", "b"), 8, dtype=jnp.bfloat16), 0.5, key=key)
    assert out["a"].tokens.dtype == jnp.bfloat16 and out["a"].pooled.dtype == jnp.bfloat16
    assert out["a"].mask.dtype == jnp.bool_


def test_bad_arguments(key):
    inputs = _inputs(("a", "b"), 4)
    with pytest.raises(ValueError, match=r"rate.*\[0, 1\)"):
        modality_dropout(inputs, 1.0, key=key)
    with pytest.raises(ValueError, match="rate"):
        modality_dropout(inputs, -0.1, key=key)
    with pytest.raises(TypeError, match="rate"):
        modality_dropout(inputs, "0.5", key=key)
    with pytest.raises(ValueError, match="min_present"):
        modality_dropout(inputs, 0.5, key=key, min_present=0)
    with pytest.raises(TypeError, match="key"):
        modality_dropout(inputs, 0.5, key=0)
    with pytest.raises(ValueError, match="key"):
        modality_dropout(inputs, 0.5, key=jax.random.split(key, 2))
    short = _inputs(("b",), 3)
    with pytest.raises(ValueError, match="batch size"):
        modality_dropout({**inputs, **short}, 0.5, key=key)
    with pytest.raises(TypeError, match=r"inputs\['a'\]"):
        modality_dropout({**inputs, "a": inputs["a"].tokens}, 0.5, key=key)
    with pytest.raises(TypeError, match="inputs"):
        modality_dropout([inputs["a"]], 0.5, key=key)
