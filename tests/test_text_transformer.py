"""Tests for lepton_mm/encoders/text_transformer.py (small random configs, CPU)."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lepton_mm.encoders import text_transformer
from lepton_mm.encoders.text_transformer import TextTransformer
from lepton_mm.types import EncoderOutput

VOCAB, DIM, MAX_LEN = 50, 16, 12


def make_model(seed=0, **kwargs):
    config = dict(dim=DIM, num_layers=2, num_heads=4, mlp_dim=32, max_len=MAX_LEN)
    config.update(kwargs)
    return TextTransformer(VOCAB, rngs=nnx.Rngs(seed), **config)


@nnx.jit
def forward(model, ids, mask):
    """Jitted call: one compile per shape is much cheaper than op-by-op eager dispatch."""
    return model(ids, mask)


def random_batch(seed=0, batch=3, time=7):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, (batch, time)).astype(np.int32)
    lengths = rng.integers(1, time + 1, batch)
    lengths[0] = time
    mask = np.arange(time)[None, :] < lengths[:, None]
    return jnp.asarray(ids), jnp.asarray(mask)


def test_shapes_dtypes_and_masked_tokens_zero():
    model = make_model()
    model.eval()
    ids, mask = random_batch()
    out = forward(model, ids, mask)
    assert isinstance(out, EncoderOutput)
    out.validate()
    assert out.tokens.shape == (3, 7, DIM) and out.tokens.dtype == jnp.float32
    assert out.pooled.shape == (3, DIM) and out.pooled.dtype == jnp.float32
    np.testing.assert_array_equal(out.mask, mask)
    np.testing.assert_array_equal(np.asarray(out.tokens)[~np.asarray(mask)], 0.0)
    expected = np.asarray(out.tokens).sum(1) / np.asarray(mask).sum(1, keepdims=True)
    np.testing.assert_allclose(out.pooled, expected, rtol=1e-5, atol=1e-6)
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(p.dtype == jnp.float32 for p in params)


def test_padding_does_not_change_outputs():
    model = make_model()
    model.eval()
    ids, mask = random_batch(time=5)
    mask = jnp.ones_like(mask)
    out = forward(model, ids, mask)
    # Pad to 9 with arbitrary ids, including ones far outside the vocabulary.
    pad_ids = jnp.array([[3, -7, 10**6, 49]] * 3, dtype=jnp.int32)
    padded = forward(model, jnp.concatenate([ids, pad_ids], axis=1),
                   jnp.concatenate([mask, jnp.zeros((3, 4), bool)], axis=1))
    np.testing.assert_allclose(padded.pooled, out.pooled, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(padded.tokens[:, :5], out.tokens, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(padded.tokens[:, 5:], 0.0)


def test_batch_independence():
    model = make_model()
    model.eval()
    ids, mask = random_batch(batch=4)
    together = forward(model, ids, mask).pooled
    for i in range(4):
        alone = forward(model, ids[i:i + 1], mask[i:i + 1]).pooled
        np.testing.assert_allclose(alone[0], together[i], rtol=1e-5, atol=1e-5)


def test_fully_masked_row_gives_zeros_not_nan():
    model = make_model()
    model.eval()
    ids, mask = random_batch()
    mask = mask.at[1].set(False)
    out = forward(model, ids, mask)
    assert np.isfinite(np.asarray(out.tokens)).all()
    np.testing.assert_array_equal(out.pooled[1], 0.0)
    np.testing.assert_array_equal(out.tokens[1], 0.0)
    assert np.abs(np.asarray(out.pooled[0])).max() > 0


def test_jit_matches_eager():
    model = make_model()
    model.eval()
    ids, mask = random_batch()
    segments = (jnp.arange(7)[None, :] >= 3).astype(jnp.int32) * jnp.ones((3, 1), jnp.int32)
    eager = model(ids, mask, segment_ids=segments)

    @nnx.jit
    def forward_segments(model, ids, mask, segments):
        return model(ids, mask, segment_ids=segments)

    jitted = forward_segments(model, ids, mask, segments)
    np.testing.assert_allclose(jitted.tokens, eager.tokens, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jitted.pooled, eager.pooled, rtol=1e-5, atol=1e-5)


def test_segment_ids_change_output_and_default_to_zero():
    model = make_model()
    model.eval()
    ids, mask = random_batch()
    default = model(ids, mask).pooled
    zeros = model(ids, mask, segment_ids=jnp.zeros_like(ids)).pooled
    ones = model(ids, mask, segment_ids=jnp.ones_like(ids)).pooled
    np.testing.assert_array_equal(default, zeros)
    assert np.abs(np.asarray(ones - zeros)).max() > 1e-4


def test_grads_finite_for_all_params():
    model = make_model()
    ids, mask = random_batch()
    mask = mask.at[2].set(False)  # a fully masked row must not poison the gradients

    def loss_fn(model):
        out = model(ids, mask, rngs=nnx.Rngs(dropout=1))
        return jnp.sum(out.pooled ** 2) + jnp.sum(out.tokens)

    grads = nnx.jit(nnx.grad(loss_fn))(model)
    leaves = jax.tree.leaves_with_path(nnx.state(grads, nnx.Param))
    assert len(leaves) == 5 + 2 * 16  # 3 embeddings + norm; per block 8 attn + 8 other
    for path, g in leaves:
        assert np.isfinite(np.asarray(g)).all(), jax.tree_util.keystr(path)
    assert np.abs(np.asarray(grads.layers[0].attention.query.kernel[...])).max() > 0


def test_dropout_in_train_mode_only():
    model = make_model(dropout=0.3, attention_dropout=0.3)
    ids, mask = random_batch()
    a, b = model(ids, mask).pooled, model(ids, mask).pooled  # train mode: constructor stream
    assert np.abs(np.asarray(a - b)).max() > 1e-4
    c = model(ids, mask, rngs=nnx.Rngs(dropout=5)).pooled
    d = model(ids, mask, rngs=nnx.Rngs(dropout=5)).pooled
    np.testing.assert_array_equal(c, d)  # explicit rngs: reproducible
    model.eval()
    e, f = model(ids, mask).pooled, model(ids, mask).pooled
    np.testing.assert_array_equal(e, f)
    assert np.abs(np.asarray(a - e)).max() > 1e-4
    model.train()
    assert np.abs(np.asarray(model(ids, mask).pooled - e)).max() > 1e-4


def test_bfloat16_compute_close_to_float32():
    ids, mask = random_batch()
    ref = make_model()
    ref.eval()
    low = make_model(dtype=jnp.bfloat16)
    low.eval()
    out = forward(low, ids, mask)
    assert out.tokens.dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(low, nnx.Param)))
    np.testing.assert_allclose(out.pooled, forward(ref, ids, mask).pooled, atol=0.1)


@pytest.mark.parametrize(
    "ids, mask, error, match",
    [
        (np.zeros((2, 4), np.float32), np.ones((2, 4), bool), TypeError, "token_ids"),
        (np.zeros((4,), np.int32), np.ones((4,), bool), ValueError, "token_ids"),
        ([[1, 2]], np.ones((1, 2), bool), TypeError, "token_ids"),
        (np.zeros((2, 4), np.int32), np.ones((2, 5), bool), ValueError,
         r"mask: expected shape \[batch=2, time=4\]"),
        (np.zeros((2, 4), np.int32), np.ones((2, 4), np.int32), TypeError, "mask"),
        (np.zeros((2, MAX_LEN + 1), np.int32), np.ones((2, MAX_LEN + 1), bool), ValueError,
         "max_len"),
        (np.full((1, 3), VOCAB, np.int32), np.ones((1, 3), bool), ValueError, "token_ids"),
        (np.full((1, 3), -1, np.int32), np.ones((1, 3), bool), ValueError, "token_ids"),
    ],
)
def test_bad_inputs_raise_naming_the_argument(ids, mask, error, match):
    model = make_model()
    with pytest.raises(error, match=match):
        model(ids, mask)


def test_bad_segment_ids_and_config():
    model = make_model()
    ids, mask = random_batch()
    with pytest.raises(TypeError, match="segment_ids"):
        model(ids, mask, segment_ids=jnp.zeros(ids.shape, jnp.float32))
    with pytest.raises(ValueError, match="segment_ids"):
        model(ids, mask, segment_ids=jnp.full(ids.shape, 2, jnp.int32))
    with pytest.raises(ValueError, match="num_heads"):
        make_model(num_heads=3)
    with pytest.raises(ValueError, match="dropout"):
        make_model(dropout=1.0)


def test_docstring_examples():
    result = doctest.testmod(text_transformer, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
