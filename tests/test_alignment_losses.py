"""Tests for lepton_mm.alignment.losses against straightforward numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

from lepton_mm.alignment import cca_loss, clip_loss, sigmoid_loss

# ----------------------------------------------------------------- numpy references


def _np_normalize(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _np_clip(za, zb, t, mask=None):
    """Mean of the two cross-entropies, one example at a time, over valid examples."""
    keep = np.ones(len(za), bool) if mask is None else np.asarray(mask)
    a, b = _np_normalize(za)[keep], _np_normalize(zb)[keep]
    logits = t * a @ b.T
    rows = [-(logits[i] - scipy.special.logsumexp(logits[i]))[i] for i in range(len(a))]
    cols = [-(logits[:, j] - scipy.special.logsumexp(logits[:, j]))[j] for j in range(len(a))]
    return 0.5 * np.mean(rows) + 0.5 * np.mean(cols)


def _np_sigmoid(za, zb, t, bias, mask=None):
    """−(1/B) Σ_i Σ_j log σ(z_ij (t <x_i, y_j> + b)), as an explicit double loop."""
    keep = np.ones(len(za), bool) if mask is None else np.asarray(mask)
    a, b = _np_normalize(za)[keep], _np_normalize(zb)[keep]
    total = 0.0
    for i in range(len(a)):
        for j in range(len(b)):
            z = 1.0 if i == j else -1.0
            total += -np.log(scipy.special.expit(z * (t * a[i] @ b[j] + bias)))
    return total / len(a)


def _np_canonical_correlations(za, zb, eps):
    """Textbook CCA in float64: singular values of Σaa^{-1/2} Σab Σbb^{-1/2}."""
    a = np.asarray(za, np.float64) - np.mean(za, axis=0)
    b = np.asarray(zb, np.float64) - np.mean(zb, axis=0)
    n = len(a)
    saa = a.T @ a / (n - 1) + eps * np.eye(a.shape[1])
    sbb = b.T @ b / (n - 1) + eps * np.eye(b.shape[1])
    sab = a.T @ b / (n - 1)

    def inv_sqrt(s):
        w, v = np.linalg.eigh(s)
        return (v / np.sqrt(w)) @ v.T

    return np.linalg.svd(inv_sqrt(saa) @ sab @ inv_sqrt(sbb), compute_uv=False)


def _pair(seed, batch=6, dim=5):
    rng = np.random.default_rng(seed)
    za = rng.normal(size=(batch, dim)).astype(np.float32)
    zb = (za + rng.normal(size=(batch, dim))).astype(np.float32)
    return za, zb


# -------------------------------------------------------------------------------- CLIP


@pytest.mark.parametrize("t", [1.0, 14.3, 100.0])
def test_clip_matches_numpy(t):
    za, zb = _pair(0)
    got = jax.jit(lambda a, b: clip_loss(a, b, logit_scale=t))(za, zb)
    np.testing.assert_allclose(got, _np_clip(za, zb, t), rtol=1e-5, atol=1e-6)


def test_clip_aligned_orthonormal_is_near_zero_and_chance_is_log_batch():
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(8, 8)))
    z = q[:5].astype(np.float32)  # 5 orthonormal rows
    assert float(clip_loss(z, 3.0 * z, logit_scale=100.0)) < 1e-6
    np.testing.assert_allclose(clip_loss(z, z, logit_scale=0.0), np.log(5), rtol=1e-6)
    # Closed form for orthonormal pairs: log(1 + (B − 1) e^{−t}).
    np.testing.assert_allclose(clip_loss(z, z, logit_scale=2.0), np.log1p(4 * np.exp(-2.0)),
                               rtol=1e-6)


def test_clip_is_invariant_to_input_scale():
    za, zb = _pair(2)
    base = clip_loss(za, zb, logit_scale=10.0)
    np.testing.assert_allclose(clip_loss(7.0 * za, 0.01 * zb, logit_scale=10.0), base,
                               rtol=1e-6)


def test_clip_mask_equals_unpadded_batch_and_padding_never_leaks():
    za, zb = _pair(3, batch=5)
    pad = np.full((3, za.shape[1]), np.nan, np.float32)
    za_p, zb_p = np.concatenate([za, pad]), np.concatenate([zb, -pad])
    mask = np.arange(8) < 5
    f = lambda a, b, t, m: clip_loss(a, b, logit_scale=t, mask=m)
    value, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(za_p, zb_p, 5.0, mask)
    ref_value, ref_grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)),
                                   static_argnums=3)(za, zb, 5.0, None)
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    np.testing.assert_allclose(value, _np_clip(za_p, zb_p, 5.0, mask), rtol=1e-5)
    for g, ref in zip(grads[:2], ref_grads[:2], strict=True):
        np.testing.assert_allclose(g[:5], ref, rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(g[5:], 0.0)
    np.testing.assert_allclose(grads[2], ref_grads[2], rtol=1e-5)


def test_clip_all_masked_is_zero_with_finite_gradients():
    za, zb = _pair(4)
    mask = np.zeros(len(za), bool)
    value, grads = jax.jit(jax.value_and_grad(
        lambda a, b: clip_loss(a, b, logit_scale=10.0, mask=mask), argnums=(0, 1)))(za, zb)
    assert float(value) == 0.0
    assert all(np.all(g == 0) for g in grads)


def test_clip_zero_vectors_and_bfloat16_are_finite():
    za, zb = _pair(5)
    za[0] = 0.0
    value, grads = jax.jit(jax.value_and_grad(
        lambda a, b: clip_loss(a, b, logit_scale=10.0), argnums=(0, 1)))(
            jnp.asarray(za, jnp.bfloat16), jnp.asarray(zb))
    assert value.dtype == jnp.float32 and np.isfinite(value)
    assert grads[0].dtype == jnp.bfloat16
    assert all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in grads)


# ------------------------------------------------------------------------------ SigLIP


@pytest.mark.parametrize(("t", "bias"), [(10.0, -10.0), (1.0, 0.0), (37.0, 2.5)])
def test_sigmoid_matches_numpy(t, bias):
    za, zb = _pair(6)
    got = jax.jit(lambda a, b: sigmoid_loss(a, b, logit_scale=t, logit_bias=bias))(za, zb)
    np.testing.assert_allclose(got, _np_sigmoid(za, zb, t, bias), rtol=1e-5)


def test_sigmoid_closed_form_at_orthonormal_pairs():
    z = np.eye(6, 4, dtype=np.float32)[:4]
    for t, b in [(10.0, -10.0), (3.0, 1.0)]:
        want = -np.log(scipy.special.expit(t + b)) - 3 * np.log(scipy.special.expit(-b))
        np.testing.assert_allclose(sigmoid_loss(z, z, logit_scale=t, logit_bias=b), want,
                                   rtol=1e-6)


def test_sigmoid_mask_equals_unpadded_batch():
    za, zb = _pair(7, batch=4)
    pad = np.full((2, za.shape[1]), np.inf, np.float32)
    mask = np.array([True, True, True, True, False, False])
    f = lambda a, b, t, bias, m: sigmoid_loss(a, b, logit_scale=t, logit_bias=bias, mask=m)
    args = (np.concatenate([za, pad]), np.concatenate([zb, pad]), 9.0, -4.0, mask)
    value, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))(*args)
    ref_value, ref_grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)),
                                   static_argnums=4)(za, zb, 9.0, -4.0, None)
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    np.testing.assert_allclose(value, _np_sigmoid(za, zb, 9.0, -4.0), rtol=1e-5)
    np.testing.assert_allclose(grads[0][:4], ref_grads[0], rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(grads[1][4:], 0.0)
    np.testing.assert_allclose(grads[2:], ref_grads[2:], rtol=1e-5)


def test_sigmoid_gradient_matches_finite_differences():
    za, zb = _pair(8)
    f = lambda t, b: sigmoid_loss(za, zb, logit_scale=t, logit_bias=b)
    dt, db = jax.jit(jax.grad(f, argnums=(0, 1)))(4.0, -1.0)
    h = 1e-4
    fd_t = (_np_sigmoid(za, zb, 4.0 + h, -1.0) - _np_sigmoid(za, zb, 4.0 - h, -1.0)) / (2 * h)
    fd_b = (_np_sigmoid(za, zb, 4.0, -1.0 + h) - _np_sigmoid(za, zb, 4.0, -1.0 - h)) / (2 * h)
    np.testing.assert_allclose([dt, db], [fd_t, fd_b], rtol=1e-4)


# ------------------------------------------------------------------------- Validation


@pytest.mark.parametrize("loss", ["clip", "sigmoid"])
def test_contrastive_losses_reject_bad_input(loss):
    kw = {"logit_scale": 10.0} | ({"logit_bias": 0.0} if loss == "sigmoid" else {})
    fn = {"clip": clip_loss, "sigmoid": sigmoid_loss}[loss]
    za, zb = _pair(9)
    with pytest.raises(ValueError, match=r"zb: expected shape \[batch=6, dim=5\]"):
        fn(za, zb[:4], **kw)
    with pytest.raises(ValueError, match="zb: expected shape"):
        fn(za, zb[:, :3], **kw)
    with pytest.raises(ValueError, match="za: expected rank 2"):
        fn(za[None], zb, **kw)
    with pytest.raises(ValueError, match="mask: expected shape"):
        fn(za, zb, mask=np.ones(5, bool), **kw)
    with pytest.raises(TypeError, match="mask: expected bool"):
        fn(za, zb, mask=np.ones(6, np.int32), **kw)
    with pytest.raises(TypeError, match="za: expected a floating-point dtype"):
        fn(za.astype(np.int32), zb, **kw)
    with pytest.raises(ValueError, match="logit_scale: expected rank 0"):
        fn(za, zb, **(kw | {"logit_scale": jnp.ones(2)}))
    with pytest.raises(TypeError, match="za: expected an array"):
        fn(za.tolist(), zb, **kw)


# -------------------------------------------------------------------------------- CCA


def _cca_data(n=4000, seed=0):
    """Views sharing 3 latents with known noise: canonical correlations in closed form.

    a_i = s_i + σa_i·noise, b_i = s_i + σb_i·noise for i < 3 (unit-variance latent s),
    b also has one pure-noise dim; both views are then mixed by invertible matrices,
    which leaves canonical correlations unchanged: ρ_i = 1/√((1 + σa_i²)(1 + σb_i²)).
    """
    rng = np.random.default_rng(seed)
    sa, sb = np.array([0.2, 0.7, 1.5]), np.array([0.3, 0.5, 1.0])
    s = rng.normal(size=(n, 3))
    a = s + sa * rng.normal(size=(n, 3))
    b = np.concatenate([s + sb * rng.normal(size=(n, 3)), rng.normal(size=(n, 1))], axis=1)
    mix_a = np.linalg.qr(rng.normal(size=(3, 3)))[0] * np.array([0.5, 1.0, 2.0])
    mix_b = np.linalg.qr(rng.normal(size=(4, 4)))[0] * np.array([1.0, 0.7, 1.5, 2.0])
    rho = 1.0 / np.sqrt((1 + sa**2) * (1 + sb**2))
    return (a @ mix_a + 3.0).astype(np.float32), (b @ mix_b - 1.0).astype(np.float32), rho


def test_cca_matches_numpy_and_known_correlations():
    za, zb, rho = _cca_data()
    eps = 1e-4
    reference = _np_canonical_correlations(za, zb, eps)
    loss = jax.jit(lambda a, b: cca_loss(a, b, eps=eps))(za, zb)
    np.testing.assert_allclose(-loss, reference.sum(), rtol=1e-4)
    np.testing.assert_allclose(-loss, rho.sum(), atol=0.05)  # population value
    np.testing.assert_allclose(reference, rho, atol=0.03)
    for k in (1, 2):
        np.testing.assert_allclose(-cca_loss(za, zb, eps=eps, top_k=k), reference[:k].sum(),
                                   rtol=1e-4)


def test_cca_is_symmetric_and_affine_invariant():
    za, zb, _ = _cca_data(n=500, seed=1)
    base = cca_loss(za, zb, eps=1e-6)
    np.testing.assert_allclose(cca_loss(zb, za, eps=1e-6), base, rtol=1e-4)
    np.testing.assert_allclose(cca_loss(10.0 * za - 4.0, zb, eps=1e-6), base, rtol=1e-4)


def test_cca_gradient_matches_numpy_finite_differences():
    za, zb, _ = _cca_data(n=64, seed=2)
    eps = 1e-3
    grad_a = jax.jit(jax.grad(lambda a: cca_loss(a, zb, eps=eps)))(za)
    direction = np.random.default_rng(3).normal(size=za.shape)
    h = 1e-5
    f = lambda a: -_np_canonical_correlations(a, zb, eps).sum()
    fd = (f(za + h * direction) - f(za - h * direction)) / (2 * h)
    np.testing.assert_allclose(np.sum(np.asarray(grad_a) * direction), fd, rtol=2e-3)


@pytest.mark.parametrize("case", ["identical", "batch_lt_dim", "constant_column", "top_k"])
def test_cca_gradients_are_finite_in_degenerate_cases(case):
    rng = np.random.default_rng(4)
    za = rng.normal(size=(32, 4)).astype(np.float32)
    zb = rng.normal(size=(32, 4)).astype(np.float32)
    top_k = None
    if case == "identical":  # every canonical correlation is 1: repeated eigenvalues
        zb = za.copy()
    elif case == "batch_lt_dim":  # rank-deficient covariances, eps-degenerate null space
        za, zb = rng.normal(size=(3, 6)).astype(np.float32), zb[:3]
    elif case == "constant_column":
        za[:, 1] = 5.0
    else:
        top_k, zb = 2, za @ rng.normal(size=(4, 4)).astype(np.float32)
    value, grads = jax.jit(jax.value_and_grad(
        lambda a, b: cca_loss(a, b, top_k=top_k), argnums=(0, 1)))(za, zb)
    assert np.isfinite(value) and value <= 0.0
    assert all(np.all(np.isfinite(g)) for g in grads)


def test_cca_rejects_bad_input():
    za, zb = _pair(10)
    with pytest.raises(ValueError, match="zb: expected shape"):
        cca_loss(za, zb[:3])
    with pytest.raises(ValueError, match="batch >= 2"):
        cca_loss(za[:1], zb[:1])
    with pytest.raises(ValueError, match="eps: expected a positive float"):
        cca_loss(za, zb, eps=0.0)
    with pytest.raises(ValueError, match="top_k: expected at most"):
        cca_loss(za, zb[:, :2], top_k=3)
    with pytest.raises(ValueError, match="top_k: expected a positive integer"):
        cca_loss(za, zb, top_k=0)
    with pytest.raises(ValueError, match="za: expected rank 2"):
        cca_loss(za[0], zb)
