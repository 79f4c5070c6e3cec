"""Method-specific tests of the attention-based fusion layers.

EarlyTransformerFusion, CrossAttentionFusion (MulT) and BottleneckFusion (MBT). The
generic contract (registry, errors, dict order, defaults) lives in
test_fusion_contract.py. Compilation dominates the run time, so models are tiny, every
forward pass goes through one shared ``nnx.jit``, and tests share configurations and
input shapes so that they reuse compilations.
"""

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings

from lepton_mm.fusion import _transformer as tfm
from lepton_mm.fusion.bottleneck import BottleneckFusion
from lepton_mm.fusion.cross_attention import CrossAttentionFusion
from lepton_mm.fusion.early_transformer import EarlyTransformerFusion
from lepton_mm.types import EncoderOutput

DIMS3 = {"audio": 6, "image": 8, "text": 5}
DIMS2 = {"audio": 6, "text": 5}
LENGTHS = {"audio": 4, "image": 2, "text": 3}  # unaligned on purpose
BATCH = 3
OUT = 3
TINY = {"width": 8, "num_heads": 2, "num_layers": 1, "mlp_dim": 16}

# name -> (class, hyperparameters).
CONFIGS = {
    "early": (EarlyTransformerFusion, TINY),
    "early_cls": (EarlyTransformerFusion,
                  {**TINY, "pool": "cls", "position_embedding": "learned", "max_len": 8}),
    "mult": (CrossAttentionFusion, {**TINY, "kernel_size": 3}),
    "mbt": (BottleneckFusion, {**TINY, "num_layers": 2, "fusion_layer": 0,
                               "num_bottlenecks": 2, "position_embedding": "learned",
                               "max_len": 8}),
}
MAIN = ["early", "mult", "mbt"]

_forward = nnx.jit(lambda layer, inputs: layer(inputs))


@pytest.fixture(autouse=True, scope="module")
def _full_precision_matmuls():
    """GPUs default to TF32 float32 matmuls (~1e-3 relative error), which would swamp the
    1e-5 comparisons between differently shaped but equivalent computations (padding,
    jit vs eager). CPUs compute float32 matmuls exactly either way."""
    with jax.default_matmul_precision("highest"):
        yield


def _layer(config, dims=DIMS2, **overrides):
    cls, kw = CONFIGS[config]
    layer = cls(dims, OUT, rngs=nnx.Rngs(0), **{**kw, **overrides})
    layer.eval()
    return layer


def _inputs(seed=0, dims=DIMS2, lengths=LENGTHS, masks=None):
    """Random inputs; by default the last token of example 1 is padding."""
    rng = np.random.default_rng(seed)
    out = {}
    for m, d in dims.items():
        t = lengths[m]
        tokens = rng.normal(size=(BATCH, t, d)).astype(np.float32)
        if masks is None:
            mask = np.ones((BATCH, t), bool)
            mask[1, t - 1] = False
        else:
            mask = masks[m]
        out[m] = EncoderOutput.from_tokens(jnp.asarray(tokens), jnp.asarray(mask))
    return out


def _absent(inputs, modality, example, fill=np.nan):
    x = inputs[modality]
    return {**inputs, modality: EncoderOutput(x.tokens.at[example].set(fill),
                                              x.mask.at[example].set(False),
                                              x.pooled.at[example].set(fill))}


def _poison(inputs, fill):
    """Writes ``fill`` into every masked token and into ``pooled`` of absent rows."""
    return {m: EncoderOutput(jnp.where(x.mask[..., None], x.tokens, fill), x.mask,
                             jnp.where(x.present[:, None], x.pooled, fill))
            for m, x in inputs.items()}


def _pad(x, extra, front=False):
    """Adds ``extra`` masked NaN positions at the end (or the front) of the sequence."""
    batch, _, dim = x.tokens.shape
    tokens = jnp.full((batch, extra, dim), jnp.nan, x.tokens.dtype)
    mask = jnp.zeros((batch, extra), bool)
    t = (tokens, x.tokens) if front else (x.tokens, tokens)
    k = (mask, x.mask) if front else (x.mask, mask)
    return EncoderOutput(jnp.concatenate(t, axis=1), jnp.concatenate(k, axis=1), x.pooled)


def _close(a, b, **kw):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5, **kw)


def _differ(a, b):
    return not np.allclose(np.asarray(a), np.asarray(b), atol=1e-5)


# ----------------------------------------------------------------- building blocks


def test_attention_ignores_masked_keys_and_zeroes_queries_without_keys():
    attn = tfm.MultiHeadAttention(4, 2, attention_dropout=0.0, dtype=jnp.float32,
                                  rngs=nnx.Rngs(0))
    x = jnp.ones((2, 3, 4))
    context = jnp.arange(40.0).reshape(2, 5, 4) / 40
    mask = jnp.array([[True, True, False, False, False], [False] * 5])
    out = attn(x, context, mask)
    _close(attn(x, context.at[:, 2:].set(jnp.nan), mask), out)
    np.testing.assert_array_equal(out[1], 0.0)
    assert float(jnp.abs(out[0]).max()) > 0


def test_sinusoidal_embedding_positions_and_last_valid():
    emb = tfm.sinusoidal_embedding(jnp.array([[0, 3]]), 6)
    freqs = np.exp(-np.log(10000.0) / 2 * np.arange(3))
    np.testing.assert_allclose(emb[0, 1], np.concatenate([np.sin(3 * freqs),
                                                          np.cos(3 * freqs)]), rtol=1e-6)
    assert tfm.sinusoidal_embedding(jnp.array([1]), 5).shape == (1, 5)
    mask = jnp.array([[False, True, False, True, True], [True, True, False, False, False]])
    np.testing.assert_array_equal(tfm.valid_positions(mask), [[0, 0, 0, 1, 2],
                                                              [0, 1, 1, 1, 1]])
    x = jnp.arange(10.0).reshape(2, 5, 1)
    np.testing.assert_array_equal(tfm.last_valid(x, mask), [[4.0], [6.0]])
    np.testing.assert_array_equal(tfm.last_valid(x, jnp.zeros((2, 5), bool)), [[0.0], [0.0]])


# ------------------------------------------------------------------ every method


@pytest.mark.parametrize("config", sorted(CONFIGS))
@settings(max_examples=8, deadline=None)
@given(bits=st.lists(st.booleans(), min_size=BATCH * 9, max_size=BATCH * 9),
       absent=st.lists(st.booleans(), min_size=BATCH * 3, max_size=BATCH * 3),
       fill=st.sampled_from([np.nan, np.inf, -1e6]), seed=st.integers(0, 2**16))
def test_masked_and_absent_values_never_matter(config, bits, absent, fill, seed):
    """Three unaligned modalities, arbitrary mask patterns (absent rows included)."""
    layer = _layer(config, DIMS3)
    masks, start = {}, 0
    for j, m in enumerate(sorted(DIMS3)):
        t = LENGTHS[m]
        mask = np.array(bits[start:start + BATCH * t]).reshape(BATCH, t)
        mask[np.array(absent[j::3])] = False
        masks[m] = mask
        start += BATCH * t
    inputs = _inputs(seed, DIMS3, masks=masks)
    base = _forward(layer, inputs)
    assert base.shape == (BATCH, OUT) and base.dtype == jnp.float32
    assert np.isfinite(np.asarray(base)).all()
    _close(_forward(layer, _poison(inputs, fill)), base)
    rng = np.random.default_rng(seed + 1)
    other = {m: EncoderOutput(
        jnp.where(x.mask[..., None], x.tokens, 10 * rng.normal(size=x.tokens.shape)),
        x.mask, jnp.where(x.present[:, None], x.pooled, 5.0)) for m, x in inputs.items()}
    _close(_forward(layer, other), base)


@pytest.mark.parametrize("config", MAIN)
def test_padding_anywhere_is_invariant(config):
    layer = _layer(config)
    inputs = _inputs()
    base = _forward(layer, inputs)
    back = _forward(layer, {m: _pad(x, 2) for m, x in inputs.items()})
    front = _forward(layer, {m: _pad(x, 2, front=True) for m, x in inputs.items()})
    assert np.isfinite(np.asarray(back)).all()
    _close(back, base)
    _close(front, base)


@pytest.mark.parametrize("config", MAIN)
def test_jit_equals_eager_and_batch_independence(config):
    layer = _layer(config)
    a, b = _inputs(0), _inputs(1)
    out = _forward(layer, a)
    _close(layer(a), out)
    mixed = {m: EncoderOutput(*(jnp.concatenate([xa[:1], xb[1:]])
                                for xa, xb in zip(a[m], b[m], strict=True)))
             for m in DIMS2}
    mixed_out = _forward(layer, mixed)
    _close(mixed_out[0], out[0])
    assert _differ(mixed_out[1:], out[1:])


@pytest.mark.parametrize("config", MAIN)
def test_every_parameter_gets_a_finite_nonzero_gradient_despite_nan_inputs(config):
    layer = _layer(config)
    inputs = _poison(_absent(_inputs(), "text", example=0), np.nan)
    grads = nnx.jit(nnx.grad(lambda m, x: jnp.sum(m(x) ** 2)))(layer, inputs)
    paths = jax.tree_util.tree_leaves_with_path(nnx.state(grads, nnx.Param))
    assert paths
    for path, g in paths:
        g = np.asarray(g)
        assert np.isfinite(g).all(), f"non-finite grad at {jax.tree_util.keystr(path)}"
        assert np.abs(g).max() > 0, f"zero grad at {jax.tree_util.keystr(path)}"


@pytest.mark.parametrize("config", MAIN)
def test_dropout_only_in_training_and_reproducible_with_explicit_rngs(config):
    layer = _layer(config)
    inputs = _inputs()
    evaluated = _forward(layer, inputs)
    layer.train()
    step = nnx.jit(lambda m, x, r: m(x, rngs=r))
    # RBG keys compile much faster on CPU than the default threefry ones.
    rngs = lambda seed: nnx.Rngs(dropout=jax.random.key(seed, impl="rbg"))
    one = step(layer, inputs, rngs(1))
    _close(step(layer, inputs, rngs(1)), one)
    assert _differ(one, evaluated)
    assert _differ(step(layer, inputs, rngs(2)), one)
    layer.eval()
    _close(_forward(layer, inputs), evaluated)


def test_bfloat16_compute_gives_float32_close_to_float32():
    inputs = _inputs()
    full = _forward(_layer("mbt"), inputs)
    low = _forward(_layer("mbt", dtype=jnp.bfloat16), inputs)
    assert low.dtype == jnp.float32 and np.isfinite(np.asarray(low)).all()
    np.testing.assert_allclose(low, full, atol=0.1)


@pytest.mark.parametrize(("cls", "kw", "match"), [
    (EarlyTransformerFusion, {"width": 10, "num_heads": 4}, "num_heads: must divide"),
    (EarlyTransformerFusion, {"pool": "max"}, "pool"),
    (EarlyTransformerFusion, {"dropout": 1.0}, "dropout"),
    (CrossAttentionFusion, {"kernel_size": 0}, "kernel_size"),
    (CrossAttentionFusion, {"position_embedding": "rotary"}, "position_embedding"),
    (BottleneckFusion, {"fusion_layer": 3, "num_layers": 2}, "fusion_layer"),
    (BottleneckFusion, {"num_bottlenecks": 0}, "num_bottlenecks"),
])
def test_bad_hyperparameters_raise(cls, kw, match):
    with pytest.raises(ValueError, match=match):
        cls(DIMS2, OUT, rngs=nnx.Rngs(0), **kw)


def test_learned_positions_reject_long_sequences():
    with pytest.raises(ValueError, match=r"inputs\['audio'\].*max_len=8"):
        _forward(_layer("early_cls"), _inputs(lengths={**LENGTHS, "audio": 9}))


# ----------------------------------------------------------------- early_transformer


def test_early_transformer_mixes_modalities_and_cls_handles_all_absent():
    layer = _layer("early_cls", DIMS3)
    inputs = _inputs(dims=DIMS3)
    base = _forward(layer, inputs)
    text = inputs["text"]
    assert _differ(_forward(layer, {**inputs, "text": EncoderOutput.from_tokens(
        text.tokens + 1.0, text.mask)}), base)
    none = {m: EncoderOutput.from_tokens(x.tokens, jnp.zeros_like(x.mask))
            for m, x in inputs.items()}
    out = _forward(layer, none)
    # Nothing present: only the CLS path remains, the same for every example.
    assert np.isfinite(np.asarray(out)).all()
    _close(out, jnp.broadcast_to(out[:1], out.shape))


# ------------------------------------------------------------------ cross_attention


_cross = nnx.jit(lambda layer, inputs: layer._cross_sequences(layer.check_inputs(inputs)))
_fuse = nnx.jit(lambda layer, cross, masks: layer._fuse(cross, masks))


def test_mult_cross_branches_are_pairwise():
    layer = _layer("mult", DIMS3)
    inputs = _inputs(dims=DIMS3)
    base = _cross(layer, inputs)
    assert set(base) == {(t, s) for t in DIMS3 for s in DIMS3 if s != t}
    for t, s in base:
        assert base[t, s].shape == (BATCH, LENGTHS[t], 8)
    audio = inputs["audio"]
    changed = _cross(layer, {**inputs, "audio": EncoderOutput.from_tokens(
        audio.tokens * 2.0, audio.mask)})
    for (t, s), h in base.items():
        assert _differ(changed[t, s], h) == ("audio" in (t, s)), (t, s)


def test_mult_absent_source_equals_zeroed_cross_branches():
    layer = _layer("mult", DIMS3)
    inputs = _inputs(dims=DIMS3)
    absent = _absent(inputs, "image", example=0)
    cross = dict(_cross(layer, inputs))
    for t in layer.modalities:
        if t != "image":
            assert float(jnp.abs(cross[t, "image"][0]).max()) > 0
            cross[t, "image"] = cross[t, "image"].at[0].set(0.0)
    expected = _fuse(layer, cross, tuple(absent[m].mask for m in layer.modalities))
    _close(_forward(layer, absent), expected)
    assert _differ(_forward(layer, inputs)[0], expected[0])


# ------------------------------------------------------------------------ bottleneck


_cls_states = nnx.jit(lambda layer, inputs: layer._cls_states(layer.check_inputs(inputs)))


def _change_text(inputs):
    text = inputs["text"]
    return {**inputs, "text": EncoderOutput.from_tokens(1.0 - 3.0 * text.tokens, text.mask)}


@pytest.mark.parametrize("fusion_layer", [2, 1])
def test_mbt_without_two_fusion_layers_modalities_stay_independent(fusion_layer):
    # fusion_layer=2: no fusion layer. fusion_layer=1: the only fusion layer writes the
    # bottleneck but no later layer reads it.
    layer = _layer("mbt", fusion_layer=fusion_layer)
    assert (layer.bottleneck is None) == (fusion_layer == 2)
    inputs = _inputs()
    (audio, text), (audio2, text2) = (_cls_states(layer, inputs),
                                      _cls_states(layer, _change_text(inputs)))
    _close(audio2, audio)
    assert _differ(text2, text)


def test_mbt_bottleneck_carries_information_between_modalities():
    layer = _layer("mbt")
    inputs = _inputs()
    audio, _ = _cls_states(layer, inputs)
    audio2, _ = _cls_states(layer, _change_text(inputs))
    assert _differ(audio2, audio)
    # ...but not from an example where text is absent.
    gone = _absent(inputs, "text", example=0)
    audio3, _ = _cls_states(layer, gone)
    audio4, _ = _cls_states(layer, _absent(_change_text(inputs), "text", example=0))
    _close(audio4[0], audio3[0])
    assert _differ(audio3[0], audio[0])


def test_mbt_output_is_linear_head_of_mean_over_present_cls():
    layer = _layer("mbt")
    inputs = _absent(_inputs(), "audio", example=2)
    audio, text = (np.asarray(s) for s in _cls_states(layer, inputs))
    present = np.asarray(inputs["audio"].present)[:, None]
    mean = np.where(present, (audio + text) / 2, text)
    _close(_forward(layer, inputs), layer.head(jnp.asarray(mean)))
