"""Tests for EncoderOutput, masked_mean and the boundary checks they use."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lepton_mm import EncoderOutput, masked_mean
from lepton_mm._validation import check_array, check_positive_int


def test_masked_mean_hand_computed_and_ignores_nan_padding():
    x = jnp.array([[[1.0, 2.0], [3.0, 4.0], [jnp.nan, jnp.inf]],
                   [[5.0, 6.0], [7.0, 8.0], [9.0, 10.0]]])
    mask = jnp.array([[True, True, False], [False, False, False]])
    out = masked_mean(x, mask)
    np.testing.assert_array_equal(out, [[2.0, 3.0], [0.0, 0.0]])
    grad = jax.grad(lambda v: masked_mean(v, mask).sum())(x)
    assert np.isfinite(np.asarray(grad)).all()
    np.testing.assert_array_equal(grad[0, 2], 0.0)


def test_from_tokens_zeroes_masked_tokens_and_is_a_pytree():
    tokens = jnp.arange(12.0).reshape(1, 3, 4)
    out = EncoderOutput.from_tokens(tokens, jnp.array([[True, False, True]]))
    np.testing.assert_array_equal(out.tokens[0, 1], 0.0)
    np.testing.assert_array_equal(out.pooled, [[4.0, 5.0, 6.0, 7.0]])
    assert out.batch_size == 1 and out.dim == 4
    np.testing.assert_array_equal(out.present, [True])
    leaves = jax.tree.leaves(jax.jit(lambda o: o)(out))
    assert len(leaves) == 3
    full = EncoderOutput.from_tokens(tokens)
    assert full.mask.dtype == jnp.bool_ and bool(full.mask.all())


def test_validate_names_the_argument():
    good = EncoderOutput.from_tokens(jnp.ones((2, 3, 4)))
    assert good.validate("audio") is good
    with pytest.raises(ValueError, match=r"audio\.mask: expected shape \[batch=2, time=3\]"):
        good._replace(mask=jnp.ones((2, 5), bool)).validate("audio")
    with pytest.raises(TypeError, match=r"audio\.mask: expected bool"):
        good._replace(mask=jnp.ones((2, 3))).validate("audio")
    with pytest.raises(ValueError, match=r"audio\.pooled: expected shape \[batch=2, dim=4\]"):
        good._replace(pooled=jnp.ones((2, 5))).validate("audio")


def test_check_array_messages():
    with pytest.raises(TypeError, match="x: expected an array with shape \\[batch, time\\]"):
        check_array("x", [[1, 2]], "batch time")
    with pytest.raises(ValueError, match="x: expected rank 2"):
        check_array("x", np.zeros(3), "batch time")
    with pytest.raises(TypeError, match="x: expected an integer dtype"):
        check_array("x", np.zeros((1, 2)), "batch time", kind="int")
    with pytest.raises(ValueError, match="axis 'channels' should be 3, got 1"):
        check_array("x", np.zeros((1, 1)), "batch channels", dims={"channels": 3})
    with pytest.raises(ValueError, match="axis '3' should be 3"):
        check_array("x", np.zeros((1, 2)), "batch 3")
    with pytest.raises(ValueError, match="empty"):
        check_array("x", np.zeros((0, 2)), "batch time", allow_empty=False)
    check_array("x", jnp.zeros((2,), jnp.bfloat16), "n", kind="float")
    assert check_positive_int("n", 3) == 3
    for bad in (0, -1, 2.0, True, "3"):
        with pytest.raises(ValueError, match="n: expected a positive integer"):
            check_positive_int("n", bad)
