"""Method-specific tests of the classic fusion layers.

Concat, late, TFN, LMF, multiplicative interactions, GMU, FiLM and attention fusion are
checked against hand-written numpy references and their defining identities; a
hypothesis property test checks missing-modality invariance for all of them. The generic
contract (shapes, jit, grads, errors) lives in test_fusion_contract.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from lepton_mm.fusion.attention import AttentionFusion
from lepton_mm.fusion.concat import ConcatFusion
from lepton_mm.fusion.film import FiLMFusion
from lepton_mm.fusion.gated import GatedFusion
from lepton_mm.fusion.late import LateFusion
from lepton_mm.fusion.multiplicative import MultiplicativeFusion
from lepton_mm.fusion.tensor import LowRankFusion, TensorFusion
from lepton_mm.types import EncoderOutput

DIMS3 = {"a": 5, "b": 3, "c": 4}
DIMS2 = {"a": 5, "b": 3}


def _inputs(dims, present, *, seed=0, times=None):
    """Random inputs; ``present`` is bool [batch, M] in sorted modality order.

    Present rows have a random token mask with at least one valid token; absent rows
    have an all-False mask and zero tokens/pooled.
    """
    rng = np.random.default_rng(seed)
    present = np.asarray(present, bool)
    batch = present.shape[0]
    out = {}
    for i, m in enumerate(sorted(dims)):
        t = 3 if times is None else times[m]
        tokens = rng.normal(size=(batch, t, dims[m])).astype(np.float32)
        mask = rng.random((batch, t)) < 0.6
        mask[np.arange(batch), rng.integers(0, t, batch)] = True
        mask &= present[:, i:i + 1]
        tokens = np.where(mask[..., None], tokens, 0).astype(np.float32)
        count = np.maximum(mask.sum(1, keepdims=True), 1)
        pooled = (tokens.sum(1) / count).astype(np.float32)
        out[m] = EncoderOutput(jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(pooled))
    return out


def _poison(inputs, rng, fill):
    """Overwrites absent rows (and invalid token positions) with ``fill`` or noise."""
    out = {}
    for m, x in inputs.items():
        tokens, mask, pooled = (np.array(v) for v in x)
        absent = ~mask.any(axis=1)
        noise_t = rng.normal(size=tokens.shape).astype(np.float32) * 1e3
        noise_p = rng.normal(size=pooled.shape).astype(np.float32) * 1e3
        if fill is not None:
            noise_t[:], noise_p[:] = fill, fill
        tokens = np.where(mask[..., None], tokens, noise_t)
        pooled = np.where(absent[:, None], noise_p, pooled)
        out[m] = EncoderOutput(jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(pooled))
    return out


def _np(x):
    return np.asarray(x, np.float64)


def _linear(layer, x):
    """numpy ``x @ kernel + bias`` of an ``nnx.Linear``."""
    return _np(x) @ _np(layer.kernel[...]) + _np(layer.bias[...])


def _pooled0(inputs, m):
    x = inputs[m]
    return np.where(np.asarray(x.present)[:, None], _np(x.pooled), 0.0)


def _softmax(a, mask):
    """Softmax over the last axis restricted to ``mask``; all-False rows give NaN."""
    a = np.where(mask, a, -np.inf)
    with np.errstate(invalid="ignore"):
        e = np.exp(a - a.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)


_run = nnx.jit(lambda layer, inputs: layer(inputs))

# Rows: all present, then each single modality absent, then one with only the first.
PRESENT3 = [[1, 1, 1], [0, 1, 1], [1, 0, 1], [1, 1, 0], [1, 0, 0]]
PRESENT3_NONE = [*PRESENT3, [0, 0, 0]]  # plus a row with nothing present


# ---------------------------------------------------------------------------- concat


def test_concat_matches_numpy_with_presence_features():
    layer = ConcatFusion(DIMS3, 4, presence_features=True, rngs=nnx.Rngs(0))
    inputs = _inputs(DIMS3, PRESENT3)
    z = np.concatenate([_pooled0(inputs, m) for m in "abc"]
                       + [np.asarray(PRESENT3, np.float64)], axis=1)
    np.testing.assert_allclose(layer.concatenated(inputs), z, rtol=1e-6)
    np.testing.assert_allclose(layer(inputs), _linear(layer.mlp.linears[0], z),
                               rtol=1e-5, atol=1e-5)
    without = ConcatFusion(DIMS3, 4, rngs=nnx.Rngs(0))
    assert without.mlp.linears[0].in_features == sum(DIMS3.values())


def test_concat_dropout_only_in_training():
    layer = ConcatFusion(DIMS3, 4, hidden=(16,), dropout=0.5, rngs=nnx.Rngs(0))
    inputs = _inputs(DIMS3, PRESENT3)
    first, second = layer(inputs), layer(inputs)
    assert not np.allclose(first, second)  # a fresh dropout mask per call
    layer.eval()
    np.testing.assert_array_equal(layer(inputs), layer(inputs))
    z = layer.concatenated(inputs)
    lin0, lin1 = layer.mlp.linears
    expected = _linear(lin1, np.maximum(_linear(lin0, z), 0))
    np.testing.assert_allclose(layer(inputs), expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ late


@pytest.mark.parametrize("combine", ["mean", "learned"])
def test_late_with_one_modality_absent_is_the_other_head(combine):
    layer = LateFusion(DIMS2, 4, combine=combine, rngs=nnx.Rngs(0))
    if combine == "learned":
        layer.logits[...] = jnp.array([0.7, -1.3])
    inputs = _inputs(DIMS2, [[1, 1], [1, 0], [0, 1], [0, 0]])
    out = np.asarray(layer(inputs))
    head_a = np.asarray(layer.heads[0](jnp.where(inputs["a"].present[:, None],
                                                 inputs["a"].pooled, 0.0)))
    head_b = np.asarray(layer.heads[1](jnp.where(inputs["b"].present[:, None],
                                                 inputs["b"].pooled, 0.0)))
    np.testing.assert_array_equal(out[1], head_a[1])
    np.testing.assert_array_equal(out[2], head_b[2])
    np.testing.assert_array_equal(out[3], np.zeros(4))
    w = [0.5, 0.5] if combine == "mean" else _softmax(np.array([0.7, -1.3]), [True, True])
    np.testing.assert_allclose(out[0], w[0] * head_a[0] + w[1] * head_b[0], rtol=1e-5)


def test_late_weights_renormalise_over_present_modalities():
    layer = LateFusion(DIMS3, 2, combine="learned", rngs=nnx.Rngs(0))
    layer.logits[...] = jnp.array([0.5, 1.0, -2.0])
    inputs = _inputs(DIMS3, PRESENT3_NONE)
    w = np.asarray(layer.weights(inputs))
    present = np.asarray(PRESENT3_NONE, bool)
    np.testing.assert_allclose(w.sum(1), present.any(1).astype(float), rtol=1e-6)
    assert np.all(w[~present] == 0)
    np.testing.assert_allclose(w[1], [0, *_softmax(np.array([1.0, -2.0]), [1, 1])],
                               rtol=1e-6)


# ---------------------------------------------------------------------------- tensor


def test_tfn_tensor_is_the_outer_product_of_one_augmented_vectors():
    dims = {"a": 3, "b": 2, "c": 4}
    layer = TensorFusion(dims, 5, modality_dim=None, rngs=nnx.Rngs(0))
    inputs = _inputs(dims, PRESENT3)
    fused = np.asarray(layer.fused_tensor(inputs))
    assert layer.tensor_size == 4 * 3 * 5
    assert fused.shape == (len(PRESENT3), 4 * 3 * 5)
    ones = np.ones((len(PRESENT3), 1))
    fa, fb, fc = (np.concatenate([ones, _pooled0(inputs, m)], 1) for m in "abc")
    expected = np.einsum("bi,bj,bk->bijk", fa, fb, fc).reshape(len(PRESENT3), -1)
    np.testing.assert_allclose(fused, expected, rtol=1e-6, atol=1e-7)
    # An absent modality contributes [1; 0]: row 1 lacks "a", so only a's index 0 is used.
    assert np.all(fused[1].reshape(4, 3, 5)[1:] == 0)
    np.testing.assert_allclose(layer(inputs), _linear(layer.mlp.linears[0], fused),
                               rtol=1e-5, atol=1e-5)


def test_tfn_projects_only_large_modalities_and_absent_skips_the_projection_bias():
    layer = TensorFusion({"a": 40, "b": 6}, 3, rngs=nnx.Rngs(0))  # modality_dim=32
    assert layer.factor_dims == {"a": 32, "b": 6}
    assert layer.projections[1] is None
    assert layer.tensor_size == 33 * 7
    inputs = _inputs({"a": 40, "b": 6}, [[1, 1], [0, 1]])
    fused = np.asarray(layer.fused_tensor(inputs)).reshape(2, 33, 7)
    za = _linear(layer.projections[0], inputs["a"].pooled)
    np.testing.assert_allclose(fused[0, 1:, 0], za[0], rtol=1e-5, atol=1e-6)
    assert np.all(fused[1, 1:] == 0)  # absent "a": [1; 0], not [1; bias]
    np.testing.assert_allclose(fused[1, 0, 1:], inputs["b"].pooled[1], rtol=1e-6)


def test_lmf_equals_tfn_with_the_reconstructed_full_weight_tensor():
    dims = {"a": 3, "b": 2, "c": 4}
    out_dim, rank = 5, 3
    lmf = LowRankFusion(dims, out_dim, rank=rank, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(0)
    for f in lmf.factors:
        f[...] = jnp.asarray(rng.normal(size=f.shape).astype(np.float32))
    lmf.bias[...] = jnp.asarray(rng.normal(size=out_dim).astype(np.float32))
    a, b, c = (_np(f[...]) for f in lmf.factors)
    w = _np(lmf.fusion_weights[...])
    full = np.einsum("r,rio,rjo,rko->ijko", w, a, b, c)  # Σ_r w_r ⊗_m W_m^(r)

    tfn = TensorFusion(dims, out_dim, modality_dim=None, rngs=nnx.Rngs(2))
    proj = tfn.mlp.linears[0]
    proj.kernel[...] = jnp.asarray(full.reshape(-1, out_dim), jnp.float32)
    proj.bias[...] = lmf.bias[...]

    inputs = _inputs(dims, PRESENT3_NONE)
    fused = _np(tfn.fused_tensor(inputs))
    reference = fused @ full.reshape(-1, out_dim) + _np(lmf.bias[...])
    np.testing.assert_allclose(lmf(inputs), reference, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(tfn(inputs), lmf(inputs), rtol=1e-4, atol=1e-4)


def _xavier_std(shape):
    """PyTorch's ``xavier_normal_`` std: fan_in = shape[1]·Π shape[2:], fan_out = shape[0]·…"""
    receptive = int(np.prod(shape[2:]))
    return np.sqrt(2.0 / (shape[1] * receptive + shape[0] * receptive))


def test_lmf_init_is_multibench_xavier_normal_over_each_whole_tensor():
    rank, out_dim, dims = 4, 64, {"a": 32, "b": 7}
    lmf = LowRankFusion(dims, out_dim, rank=rank, rngs=nnx.Rngs(0))
    # Hand-computed: fan_in = 33 * 64, fan_out = 4 * 64, std = sqrt(2 / 2368) = 0.02906.
    assert _xavier_std((rank, 33, out_dim)) == pytest.approx(np.sqrt(2 / (37 * 64)))
    assert _xavier_std((rank, 33, out_dim)) == pytest.approx(0.02906, abs=1e-5)
    for factor, m in zip(lmf.factors, sorted(dims), strict=True):
        w = _np(factor[...])
        assert w.shape == (rank, dims[m] + 1, out_dim)
        std = _xavier_std(w.shape)
        # The sample std of n normals has relative spread ~1/sqrt(2n) (<1.2 % here);
        # the per-slice Glorot init this replaced was 3.3x (b) to 4.9x (a) larger.
        assert np.std(w) == pytest.approx(std, rel=0.05)
        assert abs(np.mean(w)) < 4 * std / np.sqrt(w.size)
        # Untruncated, like torch: |x| > 2 std has probability 4.6 % (0 if truncated).
        assert np.mean(np.abs(w) > 2 * std) == pytest.approx(0.0455, abs=0.02)
    np.testing.assert_array_equal(_np(lmf.bias[...]), np.zeros(out_dim))
    assert lmf.fusion_weights[...].shape == (rank,)
    # fusion_weights are drawn as [1, rank]: fan_in = rank, fan_out = 1. Too few values
    # for one layer's std, so pool 200 layers' draws.
    ws = np.stack([_np(LowRankFusion({"a": 1, "b": 1}, 1, rank=rank, rngs=nnx.Rngs(s))
                       .fusion_weights[...]) for s in range(200)])
    assert np.std(ws) == pytest.approx(np.sqrt(2 / (rank + 1)), rel=0.1)


def test_lmf_init_std_equals_torch_xavier_normal():
    torch = pytest.importorskip("torch")
    rank, out_dim = 4, 64
    lmf = LowRankFusion({"a": 32, "b": 7}, out_dim, rank=rank, rngs=nnx.Rngs(0))
    ours = _np(lmf.factors[0][...])
    torch.manual_seed(0)
    theirs = torch.nn.init.xavier_normal_(torch.empty(rank, 33, out_dim)).numpy()
    assert np.std(ours) == pytest.approx(float(np.std(theirs)), rel=0.05)
    assert np.std(theirs) == pytest.approx(_xavier_std(theirs.shape), rel=0.05)
    w = torch.nn.init.xavier_normal_(torch.empty(1, rank))
    fan_in, fan_out = torch.nn.init._calculate_fan_in_and_fan_out(w)
    assert (fan_in, fan_out) == (rank, 1)


# -------------------------------------------------------------------- multiplicative


def _mi_reference(layer, inputs):
    """numpy f(x, z) = zᵀ W x + zᵀ U + V x + b, z the context (then the projection)."""
    z, x = _pooled0(inputs, layer.context), _pooled0(inputs, layer.other)
    W, U, V, b = (_np(p[...]) for p in (layer.W, layer.U, layer.V, layer.b))
    if layer.mode == "matrix":
        return np.einsum("bi,ijo,bj->bo", z, W, x) + z @ U + x @ V + b
    if layer.mode == "vector":
        h = (z @ W + V) * x + (z @ U + b)
    else:
        h = (z @ W + V)[:, None] * x + (z @ U + b)[:, None]
    return h if layer.out_proj is None else _linear(layer.out_proj, h)


@pytest.mark.parametrize("mode", ["matrix", "vector", "scalar"])
@pytest.mark.parametrize("context", [None, "b"])
def test_multiplicative_matches_numpy(mode, context):
    layer = MultiplicativeFusion(DIMS2, 4, mode=mode, context=context, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    for p in (layer.V, layer.b):  # move off the ones/zeros init so every term counts
        p[...] = jnp.asarray(rng.normal(size=p.shape).astype(np.float32))
    assert layer.context == (context or "a")
    inputs = _inputs(DIMS2, [[1, 1], [1, 0], [0, 1], [0, 0]])
    inner = layer.interaction(inputs)
    d_other = DIMS2[layer.other]
    assert inner.shape == ((4, 4) if mode == "matrix" else (4, d_other))
    out = layer(inputs)
    assert out.shape == (4, 4)
    np.testing.assert_allclose(out, _mi_reference(layer, inputs), rtol=1e-5, atol=1e-5)


def test_multiplicative_vector_output_is_the_interaction_when_sizes_agree():
    layer = MultiplicativeFusion({"a": 5, "b": 4}, 4, mode="vector", rngs=nnx.Rngs(0))
    assert layer.out_proj is None
    inputs = _inputs({"a": 5, "b": 4}, [[1, 1], [0, 1]])
    # V starts at ones and b at zeros: with the context absent, the input x passes through.
    np.testing.assert_allclose(layer(inputs)[1], inputs["b"].pooled[1], rtol=1e-6)


def test_multiplicative_is_only_defined_for_two_modalities():
    with pytest.raises(ValueError, match="at most 2 modalities"):
        MultiplicativeFusion(DIMS3, 4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="context"):
        MultiplicativeFusion(DIMS2, 4, context="z", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="mode"):
        MultiplicativeFusion(DIMS2, 4, mode="tensor", rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------- gated


def test_gated_with_one_modality_present_is_that_branch():
    layer = GatedFusion(DIMS3, 4, rngs=nnx.Rngs(0))
    inputs = _inputs(DIMS3, [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]])
    out = np.asarray(layer(inputs))
    for i, m in enumerate("abc"):
        branch = jnp.tanh(layer.branches[i](inputs[m].pooled))
        np.testing.assert_array_equal(out[i], np.asarray(branch)[i])
    np.testing.assert_array_equal(out[3], np.zeros(4))
    gates = np.asarray(layer.gates(inputs))
    np.testing.assert_array_equal(gates[:3], np.eye(3)[:, :, None] * np.ones((1, 1, 4)))


def test_gated_two_modalities_is_the_papers_sigmoid_gate():
    layer = GatedFusion(DIMS2, 4, hidden_dim=6, rngs=nnx.Rngs(0))
    assert layer.out_proj is not None
    inputs = _inputs(DIMS2, [[1, 1], [1, 1], [0, 1]])
    za, zb = _pooled0(inputs, "a"), _pooled0(inputs, "b")
    ha, hb = np.tanh(_linear(layer.branches[0], za)), np.tanh(_linear(layer.branches[1], zb))
    k, c = _np(layer.gate.kernel[...]), _np(layer.gate.bias[...])
    # GMU: s = σ(W_s [z_a; z_b]), h = s h_a + (1 - s) h_b, with W_s = W_g,a - W_g,b.
    s = 1 / (1 + np.exp(-(np.concatenate([za, zb], 1) @ (k[:, :6] - k[:, 6:])
                           + (c[:6] - c[6:]))))
    h = s * ha + (1 - s) * hb
    out = np.asarray(layer(inputs))
    np.testing.assert_allclose(out[:2], _linear(layer.out_proj, h)[:2], rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(out[2], _linear(layer.out_proj, hb)[2], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------- attention


def test_attention_weights_sum_to_one_over_present_and_match_numpy():
    layer = AttentionFusion(DIMS3, 4, projection_dim=6, rngs=nnx.Rngs(0))
    present = np.asarray(PRESENT3_NONE, bool)
    inputs = _inputs(DIMS3, present)
    alpha = np.asarray(layer.attention_weights(inputs))
    np.testing.assert_allclose(alpha.sum(1), present.any(1).astype(float), rtol=1e-6)
    assert np.all(alpha[~present] == 0) and np.all(alpha[present] > 0)

    zs = [_pooled0(inputs, m) for m in "abc"]
    scores = _linear(layer.attention, np.concatenate(zs, 1))
    expected_alpha = np.nan_to_num(_softmax(scores, present))
    np.testing.assert_allclose(alpha, expected_alpha, rtol=1e-5, atol=1e-6)
    projected = np.stack([_linear(p, z) for p, z in zip(layer.projections, zs, strict=True)],
                         axis=1)
    h = np.sum(expected_alpha[:, :, None] * projected, axis=1)
    np.testing.assert_allclose(layer(inputs), _linear(layer.out_proj, h), rtol=1e-5,
                               atol=1e-5)
    # One modality present: its projection, exactly weighted by 1.
    np.testing.assert_allclose(h[4], projected[4, 0], rtol=1e-6)


# ------------------------------------------------------------------------------ film


def test_film_with_zero_generators_is_the_identity_on_the_target():
    layer = FiLMFusion(DIMS3, 4, rngs=nnx.Rngs(0))
    assert layer.conditioning == {"a": ("b", "c")}
    for gen in layer.generators:
        gen.kernel[...] = jnp.zeros_like(gen.kernel[...])
        gen.bias[...] = jnp.zeros_like(gen.bias[...])
    inputs = _inputs(DIMS3, PRESENT3)
    np.testing.assert_array_equal(layer.modulate(inputs)["a"], inputs["a"].tokens)
    np.testing.assert_allclose(layer(inputs), _linear(layer.out_proj, _pooled0(inputs, "a")),
                               rtol=1e-5, atol=1e-6)


def test_film_matches_numpy_with_absent_conditioners_as_identity():
    conditioning = {"a": ("b", "c"), "b": "c"}
    layer = FiLMFusion(DIMS3, 4, conditioning=conditioning, rngs=nnx.Rngs(0))
    assert layer.targets == ("a", "b") and layer.pairs == (("a", "b"), ("a", "c"),
                                                           ("b", "c"))
    inputs = _inputs(DIMS3, PRESENT3, times={"a": 4, "b": 2, "c": 3})
    pooled = []
    for t in layer.targets:
        delta = np.zeros((len(PRESENT3), 2 * DIMS3[t]))
        for (tt, c), gen in zip(layer.pairs, layer.generators, strict=True):
            if tt == t:
                present = np.asarray(inputs[c].present)[:, None]
                delta += np.where(present, _linear(gen, _pooled0(inputs, c)), 0.0)
        gamma, beta = 1 + delta[:, :DIMS3[t]], delta[:, DIMS3[t]:]
        mask = np.asarray(inputs[t].mask)
        mod = np.where(mask[..., None], gamma[:, None] * _np(inputs[t].tokens)
                       + beta[:, None], 0.0)
        np.testing.assert_allclose(layer.modulate(inputs)[t], mod, rtol=1e-5, atol=1e-6)
        pooled.append(mod.sum(1) / np.maximum(mask.sum(1, keepdims=True), 1))
    expected = _linear(layer.out_proj, np.concatenate(pooled, 1))
    np.testing.assert_allclose(layer(inputs), expected, rtol=1e-5, atol=1e-5)
    # Row 3 lacks "c", so "b" conditions "a" alone and "b" itself is unmodulated.
    gamma_b, beta_b = layer.film_parameters(inputs)["b"]
    np.testing.assert_array_equal(gamma_b[3], np.ones(3))
    np.testing.assert_array_equal(beta_b[3], np.zeros(3))


@pytest.mark.parametrize("conditioning, match", [
    ({"a": "z"}, "unknown modality 'z'"),
    ({"a": ("a", "b", "c")}, "cannot condition itself"),
    ({"a": "b"}, "modality 'c' is neither"),
    ({"a": ()}, "at least one conditioner"),
    ({}, "non-empty mapping"),
])
def test_film_rejects_bad_conditioning(conditioning, match):
    with pytest.raises(ValueError, match=match):
        FiLMFusion(DIMS3, 4, conditioning=conditioning, rngs=nnx.Rngs(0))


# ------------------------------------------------------- missing-modality invariance


@functools.cache
def _property_layers():
    """name → (dims, layer in eval mode); built once, non-default hyperparameters."""
    rngs = nnx.Rngs(0)
    layers = {
        "concat": (DIMS3, ConcatFusion(DIMS3, 3, hidden=(6,), dropout=0.3,
                                       presence_features=True, rngs=rngs)),
        "late": (DIMS3, LateFusion(DIMS3, 3, hidden=(4,), dropout=0.2, combine="learned",
                                   rngs=rngs)),
        "tensor": (DIMS3, TensorFusion(DIMS3, 3, modality_dim=3, hidden=(4,), dropout=0.1,
                                       rngs=rngs)),
        "low_rank": (DIMS3, LowRankFusion(DIMS3, 3, rank=2, rngs=rngs)),
        "gated": (DIMS3, GatedFusion(DIMS3, 3, hidden_dim=4, rngs=rngs)),
        "film": (DIMS3, FiLMFusion(DIMS3, 3, conditioning={"a": ("b", "c"), "b": "c"},
                                   rngs=rngs)),
        "attention": (DIMS3, AttentionFusion(DIMS3, 3, projection_dim=5, rngs=rngs)),
    }
    for mode in ("matrix", "vector", "scalar"):
        layers[f"multiplicative_{mode}"] = (
            DIMS2, MultiplicativeFusion(DIMS2, 3, mode=mode, rngs=rngs))
    for _, layer in layers.values():
        layer.eval()
    return layers


@pytest.mark.parametrize("name", [
    "concat", "late", "tensor", "low_rank", "gated", "film", "attention",
    "multiplicative_matrix", "multiplicative_vector", "multiplicative_scalar"])
@settings(max_examples=10, deadline=None)
@given(batch=st.sampled_from([1, 4]), time=st.sampled_from([1, 3]),
       seed=st.integers(0, 2**31 - 1), nan=st.booleans())
def test_absent_modalities_never_influence_the_output(name, batch, time, seed, nan):
    dims, layer = _property_layers()[name]
    rng = np.random.default_rng(seed)
    present = rng.random((batch, len(dims))) < 0.5
    times = {m: time + i for i, m in enumerate(sorted(dims))}
    inputs = _inputs(dims, present, seed=seed, times=times)
    poisoned = _poison(inputs, rng, np.nan if nan else None)
    clean = np.asarray(_run(layer, inputs))
    assert clean.shape == (batch, 3) and np.isfinite(clean).all()
    np.testing.assert_array_equal(np.asarray(_run(layer, poisoned)), clean)


def _loss(layer, values, masks):
    """Sum of squared outputs; ``values``: modality → (tokens, pooled)."""
    inputs = {m: EncoderOutput(t, masks[m], p) for m, (t, p) in values.items()}
    return jnp.sum(layer(inputs) ** 2)


_grads = nnx.jit(nnx.grad(_loss, argnums=(0, 1)))


def test_gradients_stay_finite_with_nan_in_absent_rows():
    present = [[1, 1, 1], [0, 1, 1], [1, 0, 0], [0, 0, 0]]
    for name, (dims, layer) in _property_layers().items():
        rows = np.asarray(present)[:, :len(dims)]
        inputs = _poison(_inputs(dims, rows), np.random.default_rng(0), np.nan)
        values = {m: (x.tokens, x.pooled) for m, x in inputs.items()}
        masks = {m: x.mask for m, x in inputs.items()}
        param_grads, input_grads = _grads(layer, values, masks)
        for path, g in jax.tree_util.tree_leaves_with_path((param_grads, input_grads)):
            assert np.isfinite(np.asarray(g)).all(), f"{name}: non-finite gradient at {path}"
        for m, (g_tokens, g_pooled) in input_grads.items():  # nothing reaches absent rows
            absent = ~np.asarray(inputs[m].present)
            assert np.all(np.asarray(g_pooled)[absent] == 0), name
            assert np.all(np.asarray(g_tokens)[absent] == 0), name
