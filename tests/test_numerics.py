"""Numerical stability at float32 extremes, and float32 softmax under bfloat16 compute.

* The alignment losses stay finite (and scale-invariant where they should be) for
  embeddings from ~0 up to float32's maximum, with logit scales at LogitScale's clamp
  limits; so do their gradients.
* The log-mel front end stays finite for silence, full-scale clipping, denormals and
  DC, and stays float32 for bfloat16 audio.
* Under bfloat16 inputs (and ``dtype=bfloat16`` where a fusion layer has one), every
  exp / log / logistic / rsqrt of the losses and fusion layers runs in float32: the
  jaxpr is checked, not just the output dtype.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lepton_mm import EncoderOutput
from lepton_mm.alignment import LogitScale, cca_loss, clip_loss, sigmoid_loss
from lepton_mm.features import log_mel_spectrogram
from lepton_mm.fusion import FUSIONS, build

F32_MAX = float(np.finfo(np.float32).max)


def _embeddings(scale, seed=0, shape=(8, 5)):
    """Rows whose largest |entry| is ``scale`` (up to float32's max, no overflow)."""
    x = np.random.default_rng(seed).normal(size=shape)
    x = x / np.abs(x).max(axis=1, keepdims=True)
    return (x * np.float64(scale)).astype(np.float32)


CONTRASTIVE = {
    "clip": lambda a, b, t, bias: clip_loss(a, b, logit_scale=t),
    "sigmoid": lambda a, b, t, bias: sigmoid_loss(a, b, logit_scale=t, logit_bias=bias),
}


@pytest.mark.parametrize("loss", sorted(CONTRASTIVE))
def test_contrastive_losses_at_extreme_scales_and_clamp_limits(loss):
    fn = CONTRASTIVE[loss]
    value_and_grad = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
    for t in (1.0, 100.0):  # LogitScale's clamp limits (max_scale=100)
        for bias in (-10.0, 10.0):
            reference, _ = value_and_grad(_embeddings(1.0), _embeddings(1.0, 1), t, bias)
            for scale in (1e-30, 1e-3, 1e30, F32_MAX):
                za, zb = _embeddings(scale), _embeddings(scale, 1)
                value, grads = value_and_grad(za, zb, t, bias)
                assert np.isfinite(value), (scale, t, bias)
                assert all(np.all(np.isfinite(g)) for g in grads), (scale, t, bias)
                if scale >= 1e-3:  # normalised inside: the scale does not matter
                    np.testing.assert_allclose(value, reference, rtol=2e-5, err_msg=str(scale))
            # One huge row, one zero row, the rest ordinary: still finite.
            za = _embeddings(1.0)
            za[0] *= F32_MAX
            za[1] = 0.0
            value, grads = value_and_grad(za, _embeddings(1.0, 1), t, bias)
            assert np.isfinite(value) and all(np.all(np.isfinite(g)) for g in grads)


def test_logit_scale_outside_its_range_is_clamped_and_the_loss_stays_finite():
    head = LogitScale(init_scale=10.0, init_bias=-10.0)
    z = _embeddings(1.0)
    for log_scale in (-1e4, 1e4, 80.0):  # exp(80) would overflow float32 unclamped
        head.log_scale[...] = jnp.float32(log_scale)
        scale, bias = head()
        assert 1.0 <= float(scale) <= 100.0 + 1e-4
        for a, b in ((z, z), (z, -z)):  # perfectly aligned, perfectly opposed
            assert np.isfinite(clip_loss(a, b, logit_scale=scale))
            assert np.isfinite(sigmoid_loss(a, b, logit_scale=scale, logit_bias=bias))


def test_cca_at_extreme_scales():
    rng = np.random.default_rng(0)
    za = rng.normal(size=(64, 3)).astype(np.float32)
    zb = (za + rng.normal(size=(64, 3))).astype(np.float32)
    value_and_grad = jax.jit(jax.value_and_grad(cca_loss, argnums=(0, 1)))
    reference, _ = value_and_grad(1e10 * za, zb)  # ridge negligible here and above
    for scale in (1e-20, 1.0, 1e10, 1e30, F32_MAX / 8 / np.abs(za).max()):
        value, grads = value_and_grad(np.float32(scale) * za, zb)
        assert np.isfinite(value) and -3.0 <= value <= 0.0, scale
        assert all(np.all(np.isfinite(g)) for g in grads), scale
        if scale >= 1e10:
            np.testing.assert_allclose(value, reference, rtol=1e-5, err_msg=str(scale))


def test_losses_take_bfloat16_and_return_finite_float32():
    za = jnp.asarray(_embeddings(1e30), jnp.bfloat16)  # bfloat16 reaches ~3.4e38 too
    zb = jnp.asarray(_embeddings(1.0, 1), jnp.bfloat16)
    losses = {
        "clip": lambda a, b: clip_loss(a, b, logit_scale=100.0),
        "sigmoid": lambda a, b: sigmoid_loss(a, b, logit_scale=10.0, logit_bias=-10.0),
        "cca": lambda a, b: cca_loss(a, b),
    }
    for name, fn in losses.items():
        value, grads = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(za, zb)
        assert value.dtype == jnp.float32 and np.isfinite(value), name
        assert all(g.dtype == jnp.bfloat16 for g in grads), name
        assert all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in grads), name
        _assert_transcendentals_in_float32(jax.make_jaxpr(fn)(za, zb), name)


def test_log_mel_extremes_are_finite():
    n = 8000
    t = np.arange(n)
    cases = {
        "silence": np.zeros(n),
        "full-scale clipping": np.sign(np.sin(2 * np.pi * 440 * t / 8000)),
        "alternating +-1 (Nyquist)": np.where(t % 2 == 0, 1.0, -1.0),
        "DC at +1": np.ones(n),
        "impulses": (t % 1000 == 0).astype(float),
        "denormals": np.full(n, 1e-45),
        "loud (1e15)": 1e15 * np.sin(t * 0.1),
    }
    f = jax.jit(lambda w: log_mel_spectrogram(w, 8000, n_fft=256, hop_length=64, n_mels=40))
    for name, wave in cases.items():
        for dtype in (np.float32, jnp.bfloat16):
            if dtype is jnp.bfloat16 and name in ("denormals", "loud (1e15)"):
                continue  # not representable the same way in bfloat16
            out = f(jnp.asarray(wave.astype(np.float32), dtype))
            assert out.dtype == jnp.float32, name
            assert np.all(np.isfinite(np.asarray(out))), (name, dtype)
            assert np.all(np.asarray(out) >= -100.0), name


# ------------------------------------------------------------------ float32 softmax

_TRANSCENDENTAL = {"exp", "exp2", "log", "log1p", "logistic", "rsqrt", "erf_inv", "tanh"}
# tanh and erf inside bfloat16 MLP activations are fine; softmax, sigmoid gates,
# log-sum-exp and normalisation are not: those are what the list above catches.
_ALLOWED_LOW_PRECISION = {"tanh"}


def _eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _eqns(inner)


def _assert_transcendentals_in_float32(closed_jaxpr, what):
    seen = 0
    for eqn in _eqns(closed_jaxpr.jaxpr):
        name = eqn.primitive.name
        if name in _TRANSCENDENTAL and name not in _ALLOWED_LOW_PRECISION:
            seen += 1
            dtypes = {str(v.aval.dtype) for v in eqn.invars if hasattr(v.aval, "dtype")}
            assert dtypes == {"float32"}, f"{what}: {name} runs in {dtypes}"
    return seen


def _bf16_inputs(dims, batch=3):
    rng = np.random.default_rng(0)
    out = {}
    for m, d in dims.items():
        tokens = jnp.asarray(rng.normal(size=(batch, 4, d)), jnp.bfloat16)
        mask = jnp.asarray(np.arange(4)[None] < np.array([4, 2, 0])[:, None])
        out[m] = EncoderOutput(tokens, mask, jnp.mean(tokens, axis=1))
    return out


@pytest.mark.parametrize("name", sorted(FUSIONS))
def test_fusion_softmax_and_norms_run_in_float32_under_bfloat16(name):
    cls = FUSIONS[name]
    dims = {"audio": 6, "image": 8} if cls.max_modalities == 2 else \
        {"audio": 6, "image": 8, "text": 4}
    kwargs = {"dtype": jnp.bfloat16} if "dtype" in inspect.signature(cls.__init__).parameters \
        else {}
    layer = nnx.eval_shape(lambda: build(name, dims, 4, rngs=nnx.Rngs(0), **kwargs))
    layer.eval()
    graphdef, state = nnx.split(layer)
    inputs = _bf16_inputs(dims)
    jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(state, inputs)
    seen = _assert_transcendentals_in_float32(jaxpr, name)
    if name in ("attention", "bottleneck", "cross_attention", "early_transformer", "gated"):
        assert seen, f"{name}: no softmax found in the jaxpr"
    (out,) = jaxpr.out_avals
    assert out.dtype == jnp.float32, out


def test_the_jaxpr_check_catches_a_bfloat16_softmax():
    jaxpr = jax.make_jaxpr(jax.nn.softmax)(jnp.ones(3, jnp.bfloat16))
    with pytest.raises(AssertionError, match="exp runs in {'bfloat16'}"):
        _assert_transcendentals_in_float32(jaxpr, "softmax")
