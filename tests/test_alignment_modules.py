"""Tests for the NNX modules of lepton_mm.alignment: heads, temperature and aligner."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lepton_mm.alignment import CrossModalAligner, LogitScale, ProjectionHead, clip_loss
from lepton_mm.types import EncoderOutput

# Jitted calls: one compile instead of op-by-op dispatch keeps the file fast.
_apply = nnx.jit(lambda module, *args: module(*args))

# ----------------------------------------------------------------------- ProjectionHead


@pytest.mark.parametrize("hidden", [None, 16, (16, 8)])
def test_projection_head_outputs_unit_norm(hidden, key):
    head = ProjectionHead(6, 4, hidden=hidden, rngs=nnx.Rngs(0))
    assert len(head.layers) == 1 + (0 if hidden is None else len(np.atleast_1d(hidden)))
    for shape in [(3, 6), (3, 5, 6)]:
        z = _apply(head, jax.random.normal(key, shape))
        assert z.shape == (*shape[:-1], 4) and z.dtype == jnp.float32
        np.testing.assert_allclose(jnp.linalg.norm(z, axis=-1), 1.0, rtol=1e-5)


def test_projection_head_linear_matches_manual_and_unnormalised():
    head = ProjectionHead(3, 2, normalize=False, rngs=nnx.Rngs(1))
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    want = x @ np.asarray(head.layers[0].kernel[...]) + np.asarray(head.layers[0].bias[...])
    with jax.default_matmul_precision("float32"):  # no TF32 on GPUs
        np.testing.assert_allclose(head(x), want, rtol=1e-5)


def test_projection_head_zero_output_is_finite_with_finite_gradients():
    head = ProjectionHead(3, 2, rngs=nnx.Rngs(2))
    head.layers[0].kernel[...] = jnp.zeros((3, 2))
    head.layers[0].bias[...] = jnp.zeros((2,))
    x = jnp.ones((2, 3))
    np.testing.assert_array_equal(head(x), 0.0)
    grads = nnx.grad(lambda m: jnp.sum(m(x)))(head)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_projection_head_dropout_train_and_eval():
    head = ProjectionHead(8, 8, hidden=64, dropout=0.5, normalize=False, rngs=nnx.Rngs(3))
    x = jnp.ones((4, 8))
    head.eval()
    np.testing.assert_array_equal(head(x), head(x))
    head.train()
    a, b = head(x, rngs=nnx.Rngs(dropout=0)), head(x, rngs=nnx.Rngs(dropout=1))
    assert not np.allclose(a, b)


def test_projection_head_rejects_bad_input():
    head = ProjectionHead(6, 4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"x: expected shape \[batch, in_dim=6\]"):
        head(jnp.ones((2, 5)))
    with pytest.raises(ValueError, match=r"x: expected shape \[batch, in_dim=6\]"):
        head(jnp.ones((1, 2, 3, 6)))
    with pytest.raises(TypeError, match="x: expected a floating-point dtype"):
        head(jnp.ones((2, 6), jnp.int32))
    with pytest.raises(ValueError, match="hidden"):
        ProjectionHead(6, 4, hidden=(8, 0), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="dropout"):
        ProjectionHead(6, 4, dropout=1.0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="out_dim"):
        ProjectionHead(6, 0, rngs=nnx.Rngs(0))


# --------------------------------------------------------------------------- LogitScale


def test_logit_scale_inits():
    scale, bias = LogitScale()()
    np.testing.assert_allclose(scale, 1 / 0.07, rtol=1e-6)
    assert bias is None
    module = LogitScale(init_scale=10.0, init_bias=-10.0)
    np.testing.assert_allclose(module.log_scale[...], math.log(10.0), rtol=1e-6)
    scale, bias = module()
    np.testing.assert_allclose([scale, bias], [10.0, -10.0], rtol=1e-6)
    assert module.log_scale[...].dtype == jnp.float32 and bias.dtype == jnp.float32


def test_logit_scale_clamps_to_one_and_max_scale():
    module = LogitScale(max_scale=100.0)
    module.log_scale[...] = jnp.float32(math.log(1000.0))
    np.testing.assert_allclose(module()[0], 100.0, rtol=1e-6)
    grad = nnx.grad(lambda m: m()[0])(module)
    assert float(grad["log_scale"][...]) == 0.0  # clamped: no gradient pushes it further
    module.log_scale[...] = jnp.float32(-1.0)
    np.testing.assert_allclose(module()[0], 1.0)
    module.log_scale[...] = jnp.float32(1.0)
    grad = nnx.grad(lambda m: m()[0])(module)
    np.testing.assert_allclose(grad["log_scale"][...], math.e, rtol=1e-6)  # d e^x/dx


def test_logit_scale_rejects_bad_values():
    with pytest.raises(ValueError, match="init_scale"):
        LogitScale(init_scale=0.5)
    with pytest.raises(ValueError, match="init_scale"):
        LogitScale(init_scale=200.0)
    with pytest.raises(ValueError, match="max_scale"):
        LogitScale(max_scale=0.0)
    with pytest.raises(TypeError, match="init_bias"):
        LogitScale(init_bias="-10")


def test_two_tower_training_reduces_clip_loss(key):
    ka, kb, kn = jax.random.split(key, 3)
    latent = jax.random.normal(ka, (16, 4))
    xa = latent @ jax.random.normal(kb, (4, 10))
    xb = latent @ jax.random.normal(kn, (4, 7))

    class TwoTower(nnx.Module):
        def __init__(self, rngs):
            self.a = ProjectionHead(10, 8, hidden=16, rngs=rngs)
            self.b = ProjectionHead(7, 8, rngs=rngs)
            self.scale = LogitScale(init_scale=10.0)

        def __call__(self, xa, xb):
            return clip_loss(self.a(xa), self.b(xb), logit_scale=self.scale()[0])

    model = TwoTower(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: m(xa, xb))(model)
        optimizer.update(model, grads)
        return loss

    first = float(step(model, optimizer))
    for _ in range(30):
        last = float(step(model, optimizer))
    assert last < 0.5 * first


# -------------------------------------------------------------------- CrossModalAligner


def _inputs(key, batch=3, time_t=4, time_s=5, dim_t=6, dim_s=7):
    kt, ks = jax.random.split(key)
    target = EncoderOutput.from_tokens(
        jax.random.normal(kt, (batch, time_t, dim_t)),
        jnp.arange(time_t)[None, :] < jnp.array([4, 2, 3])[:, None])
    source_mask = jnp.arange(time_s)[None, :] < jnp.array([5, 3, 0])[:, None]  # 3rd absent
    source = EncoderOutput.from_tokens(jax.random.normal(ks, (batch, time_s, dim_s)),
                                       source_mask)
    return target, source


def test_aligner_matches_numpy_attention(key):
    target, source = _inputs(key)
    aligner = CrossModalAligner(6, 7, dim=8, num_heads=2, rngs=nnx.Rngs(0))
    with jax.default_matmul_precision("float32"):  # no TF32 on GPUs
        out = _apply(aligner, target, source)
    p = {name: (np.asarray(getattr(aligner, name).kernel[...], np.float64),
                np.asarray(getattr(aligner, name).bias[...], np.float64))
         for name in ("query", "key", "value", "output")}
    lin = lambda name, x: x @ p[name][0] + p[name][1]
    for i in range(2):  # examples with a present source
        tq, ts = int(target.mask[i].sum()), int(source.mask[i].sum())
        x = np.asarray(target.tokens[i, :tq], np.float64)
        y = np.asarray(source.tokens[i, :ts], np.float64)
        q, k, v = lin("query", x), lin("key", y), lin("value", y)
        heads = []
        for h in range(2):
            s = slice(4 * h, 4 * h + 4)
            logits = q[:, s] @ k[:, s].T / 2.0
            w = np.exp(logits - logits.max(axis=1, keepdims=True))
            heads.append((w / w.sum(axis=1, keepdims=True)) @ v[:, s])
        want = lin("output", np.concatenate(heads, axis=1))
        np.testing.assert_allclose(out.tokens[i, :tq], want, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(out.tokens[i, tq:], 0.0)
        np.testing.assert_allclose(out.pooled[i], want.mean(axis=0), rtol=1e-4, atol=1e-5)


def test_aligner_masks_and_absent_source(key):
    target, source = _inputs(key)
    out = _apply(CrossModalAligner(6, 7, dim=8, num_heads=4, rngs=nnx.Rngs(0)), target, source)
    assert out.tokens.shape == (3, 4, 8) and out.pooled.shape == (3, 8)
    np.testing.assert_array_equal(out.mask, target.mask & source.present[:, None])
    assert not out.mask[2].any()
    np.testing.assert_array_equal(out.tokens[2], 0.0)
    np.testing.assert_array_equal(out.pooled[2], 0.0)


def test_aligner_nan_in_masked_positions_does_not_leak(key):
    target, source = _inputs(key)
    aligner = CrossModalAligner(6, 7, dim=8, num_heads=2, rngs=nnx.Rngs(0))
    clean = _apply(aligner, target, source)
    poison = lambda e: e._replace(tokens=jnp.where(e.mask[..., None], e.tokens, jnp.nan),
                                  pooled=jnp.where(e.present[:, None], e.pooled, jnp.nan))
    dirty_target, dirty_source = poison(target), poison(source)

    @nnx.jit
    def loss_and_grads(model, t, s):
        return nnx.value_and_grad(lambda m: jnp.sum(m(t, s).pooled ** 2))(model)

    out = _apply(aligner, dirty_target, dirty_source)
    np.testing.assert_array_equal(out.tokens, clean.tokens)
    np.testing.assert_array_equal(out.pooled, clean.pooled)
    loss, grads = loss_and_grads(aligner, dirty_target, dirty_source)
    clean_loss, clean_grads = loss_and_grads(aligner, target, source)
    np.testing.assert_allclose(loss, clean_loss, rtol=1e-6)
    for g, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(clean_grads), strict=True):
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-7)


def test_aligner_rejects_bad_input(key):
    target, source = _inputs(key)
    aligner = CrossModalAligner(6, 7, dim=8, num_heads=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="source.tokens: expected feature size"):
        aligner(target, target)
    with pytest.raises(ValueError, match="source.tokens: expected batch=3"):
        aligner(target, EncoderOutput.from_tokens(source.tokens[:2], source.mask[:2]))
    with pytest.raises(TypeError, match="target: expected an EncoderOutput"):
        aligner(target.tokens, source)
    with pytest.raises(ValueError, match="target.mask"):
        aligner(target._replace(mask=target.mask[:, :2]), source)
    with pytest.raises(ValueError, match="num_heads: must divide"):
        CrossModalAligner(6, 7, dim=8, num_heads=3, rngs=nnx.Rngs(0))
