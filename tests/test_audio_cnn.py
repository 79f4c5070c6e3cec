"""Tests for lepton_mm.encoders.audio_cnn (and the shared masked pieces in _conv)."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from lepton_mm.encoders._conv import MaskedBatchNorm
from lepton_mm.encoders.audio_cnn import AudioSpectrogramCNN

N_MELS = 12

# Models run through nnx.jit (one compilation per shape, much cheaper on CPU than eager
# op-by-op dispatch; test_jit_matches_eager checks the two agree) on numpy test data.
_run = nnx.jit(lambda model, *args, **kwargs: model(*args, **kwargs))


def _normal(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _lengths_mask(lengths, time):
    return np.arange(time)[None, :] < np.asarray(lengths)[:, None]


def _pad(x, pad, value):
    return np.concatenate([x, np.full((x.shape[0], pad, x.shape[2]), value, x.dtype)], 1)


def _params(model):
    return jax.tree.leaves(nnx.state(model, nnx.Param))


def _stats(model):
    return jax.tree.leaves(nnx.state(model, nnx.BatchStat))


def _small(dim=6, **kwargs):
    kwargs.setdefault("widths", (4, 8))
    return AudioSpectrogramCNN(N_MELS, dim=dim, rngs=nnx.Rngs(0), **kwargs)


@functools.cache
def _trained_small_model():
    """A small model in eval mode whose batch-norm statistics are not the defaults."""
    model = _small(kernel_sizes=(5, 3))
    model.train()
    _run(model, _normal((4, 16, N_MELS), seed=1))
    model.eval()
    return model


def test_shapes_and_mask():
    model = _small()
    model.eval()
    x = _normal((2, 10, N_MELS))
    out = _run(model, x, _lengths_mask([10, 5], 10))
    assert model.output_length(10) == 3
    assert out.tokens.shape == (2, 3, 6) and out.pooled.shape == (2, 6)
    assert out.mask.dtype == jnp.bool_
    np.testing.assert_array_equal(out.mask, [[True, True, True], [True, True, False]])
    np.testing.assert_array_equal(out.tokens[1, 2], 0)
    assert out.validate("audio") is out
    assert bool(jnp.all(_run(model, x).mask))  # mask defaults to all True


def test_matches_hand_computation_for_one_block():
    # One 1x1 conv with 1 channel, no batch norm: token = mean_f maxpool(relu(w x + b)).
    model = AudioSpectrogramCNN(3, dim=1, widths=(1,), kernel_sizes=1, batch_norm=False,
                                rngs=nnx.Rngs(0))
    model.convs[0].kernel[...] = jnp.full((1, 1, 1, 1), 2.0)
    model.convs[0].bias[...] = jnp.array([-1.0])
    x = np.array([[[1.0, 0.0, 3.0], [2.0, -1.0, 0.0], [0.5, 4.0, 1.0]]], np.float32)
    out = _run(model, x, np.array([[True, True, False]]))
    h = np.maximum(2 * x[0, :2] - 1, 0)  # frames 0, 1 only
    pooled_time = h.max(axis=0)  # window {0, 1}; frame 2 is masked (window {2, pad})
    # Frequency pooled by 2 with the partial window kept: (max(f0, f1), f2).
    expected = (max(pooled_time[0], pooled_time[1]) + pooled_time[2]) / 2
    np.testing.assert_allclose(out.tokens[0, :, 0], [expected, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(out.mask, [[True, False]])
    np.testing.assert_allclose(out.pooled[0, 0], expected, rtol=1e-6)


@pytest.mark.parametrize("value", [np.nan, 1e30, -np.inf])
def test_padding_does_not_change_output_in_eval_mode(value):
    model = _trained_small_model()
    x = _normal((2, 7, N_MELS))
    ref = _run(model, x)
    out = _run(model, _pad(x, 6, value), _lengths_mask([7, 7], 13))
    np.testing.assert_allclose(out.pooled, ref.pooled, rtol=1e-5, atol=1e-5)
    n = ref.tokens.shape[1]
    np.testing.assert_allclose(out.tokens[:, :n], ref.tokens, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out.mask[:, :n], ref.mask)
    assert not bool(jnp.any(out.mask[:, n:]))
    assert bool(jnp.all(jnp.isfinite(out.tokens)))


@settings(max_examples=10, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 9), min_size=2, max_size=2),
    value=st.sampled_from([np.nan, np.inf, 1e30, 0.0, -3.0]),
    seed=st.integers(0, 2**16),
)
def test_padding_invariance_property(lengths, value, seed):
    # A fixed padded length keeps the number of distinct shapes (compilations) small.
    model = _trained_small_model()
    time = 12
    x = _normal((2, time, N_MELS), seed)
    mask = _lengths_mask(lengths, time)
    out = _run(model, np.where(mask[..., None], x, np.float32(value)), mask)
    for i, length in enumerate(lengths):
        ref = _run(model, x[i:i + 1, :length])
        n = ref.tokens.shape[1]
        np.testing.assert_allclose(out.pooled[i], ref.pooled[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out.tokens[i, :n], ref.tokens[0], rtol=1e-5, atol=1e-5)
        assert int(out.mask[i].sum()) == n


@settings(max_examples=8, deadline=None)
@given(frames=st.lists(st.booleans(), min_size=9, max_size=9), seed=st.integers(0, 2**16))
def test_masked_values_are_never_read_for_any_mask(frames, seed):
    model = _trained_small_model()
    mask = np.asarray([frames])
    x = _normal((1, 9, N_MELS), seed)
    a = _run(model, x, mask)
    b = _run(model, np.where(mask[..., None], x, np.float32(np.nan)), mask)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)


def test_padding_does_not_change_output_in_training_mode():
    # Batch statistics only count valid positions, so even training mode is exact.
    x = _normal((2, 7, N_MELS))
    unpadded, padded = _small(), _small()
    ref = _run(unpadded, x)
    out = _run(padded, _pad(x, 5, np.nan), _lengths_mask([7, 7], 12))
    np.testing.assert_allclose(out.pooled, ref.pooled, rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(padded.norms[0].mean[...]))) > 0  # statistics moved
    for a, b in zip(_stats(unpadded), _stats(padded), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_absent_example_gives_zeros():
    model = _trained_small_model()
    x = _normal((2, 8, N_MELS))
    x[1] = np.nan
    out = _run(model, x, np.array([[True] * 8, [False] * 8]))
    assert not bool(jnp.any(out.mask[1]))
    np.testing.assert_array_equal(out.tokens[1], 0)
    np.testing.assert_array_equal(out.pooled[1], 0)
    assert bool(jnp.all(jnp.isfinite(out.pooled)))
    alone = _run(model, x[:1])
    np.testing.assert_allclose(out.pooled[0], alone.pooled[0], rtol=1e-5, atol=1e-6)


def test_all_absent_batch_in_training_keeps_statistics_and_gradients_finite():
    model = _small()
    model.train()
    before = _stats(model)
    x = np.full((2, 8, N_MELS), np.nan, np.float32)
    mask = np.zeros((2, 8), bool)
    np.testing.assert_array_equal(_run(model, x, mask).pooled, 0)
    for a, b in zip(before, _stats(model), strict=True):
        np.testing.assert_array_equal(a, b)

    def loss_fn(m):
        return jnp.sum(m(x, mask).pooled)

    for g in jax.tree.leaves(nnx.jit(nnx.grad(loss_fn))(model)):
        assert bool(jnp.all(jnp.isfinite(g)))
    # Control: one valid frame is enough to move the statistics.
    x[0, 0], mask[0, 0] = 1.0, True
    _run(model, x, mask)
    assert not np.array_equal(before[0], _stats(model)[0])


def test_batch_independence_in_eval_mode():
    model = _trained_small_model()
    x = _normal((3, 10, N_MELS))
    mask = _lengths_mask([10, 6, 3], 10)
    changed_x, changed_mask = x.copy(), mask.copy()
    changed_x[1:] = _normal((2, 10, N_MELS), seed=1)
    changed_mask[1:] = True
    a, b = _run(model, x, mask), _run(model, changed_x, changed_mask)
    np.testing.assert_allclose(a.tokens[0], b.tokens[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(a.pooled[0], b.pooled[0], rtol=1e-6, atol=1e-6)
    assert not np.allclose(a.pooled[1], b.pooled[1])


def test_jit_matches_eager():
    model = _trained_small_model()
    x = _normal((2, 9, N_MELS))
    mask = _lengths_mask([9, 4], 9)
    eager = model(x, mask)
    jitted = _run(model, x, mask)
    for e, j in zip(eager, jitted, strict=True):
        np.testing.assert_allclose(e, j, rtol=1e-5, atol=1e-6)


def test_gradients_are_finite_and_nonzero():
    model = _small(dim=5)
    model.train()
    mask = _lengths_mask([9, 5, 2], 9)
    x = np.where(mask[..., None], _normal((3, 9, N_MELS)), np.float32(np.nan))
    weights = _normal((3, 5), seed=1)

    def loss_fn(m):
        return jnp.sum(m(x, mask).pooled * weights)

    grads = nnx.jit(nnx.grad(loss_fn))(model)
    leaves = jax.tree.leaves(grads)
    assert len(leaves) == len(_params(model))
    for g in leaves:
        assert bool(jnp.all(jnp.isfinite(g)))
        assert float(jnp.max(jnp.abs(g))) > 0


def test_train_and_eval_modes():
    model = _small(dropout=0.5)
    x = _normal((3, 8, N_MELS))
    model.train()
    first, second = _run(model, x).pooled, _run(model, x).pooled
    assert not np.allclose(first, second)  # the dropout stream advances
    same_key = [_run(model, x, rngs=nnx.Rngs(dropout=3)).pooled for _ in range(2)]
    np.testing.assert_array_equal(*same_key)
    model.eval()
    evaluated = _run(model, x).pooled
    np.testing.assert_array_equal(evaluated, _run(model, x).pooled)
    assert not np.allclose(evaluated, first)


def test_masked_batch_norm_matches_nnx_batch_norm_without_mask():
    x = 3 * _normal((4, 5, 3, 6)) + 1
    ours = MaskedBatchNorm(6)
    ref = nnx.BatchNorm(6, momentum=0.9, epsilon=1e-5, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(_run(ours, x), _run(ref, x), rtol=1e-4, atol=1e-4)
    assert float(jnp.max(jnp.abs(ours.mean[...]))) > 0
    np.testing.assert_allclose(ours.mean[...], ref.mean[...], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours.var[...], ref.var[...], rtol=1e-5, atol=1e-6)
    ours.eval()
    ref.eval()
    np.testing.assert_allclose(_run(ours, x), _run(ref, x), rtol=1e-5, atol=1e-5)


def test_masked_batch_norm_uses_only_valid_positions():
    x = _normal((2, 6, 4))
    full = MaskedBatchNorm(4)
    _run(full, x, _lengths_mask([6, 2], 6))
    only = MaskedBatchNorm(4)
    _run(only, np.concatenate([x[0], x[1, :2]])[None])  # the 8 valid rows
    assert float(jnp.max(jnp.abs(full.mean[...]))) > 0
    np.testing.assert_allclose(full.mean[...], only.mean[...], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(full.var[...], only.var[...], rtol=1e-5, atol=1e-6)


def test_lenet_configuration_and_parameter_count():
    # Shapes only (nnx.eval_shape): the real-valued behaviour is covered above.
    def build_and_run(**kwargs):
        model = AudioSpectrogramCNN.lenet(rngs=nnx.Rngs(0), **kwargs)
        model.eval()
        return model, model(jnp.zeros((2, 126, 64)))

    model, out = nnx.eval_shape(build_and_run)
    assert model.widths == (12, 24, 48, 96, 192, 384)
    assert model.kernel_sizes == (5, 3, 3, 3, 3, 3)
    assert model.freq_pool == (2,) * 6  # 64 mel bins -> 1 after six blocks
    # Bias-free convs 5*5*1*12 + 9 * sum(c_in * c_out), plus 2 * sum(c) norm parameters.
    widths = model.widths
    convs = 25 * 12 + 9 * sum(a * b for a, b in itertools.pairwise(widths))
    norms = 2 * sum(widths)
    assert convs + norms == 885684
    assert sum(p.size for p in _params(model)) == 885684
    assert out.tokens.shape == (2, 2, 384)  # time 126 -> 63 -> 32 -> 16 -> 8 -> 4 -> 2
    assert out.mask.shape == (2, 2) and out.pooled.shape == (2, 384)
    _, finer = nnx.eval_shape(lambda: build_and_run(time_pool=(2, 2, 2, 1, 1, 1)))
    assert finer.tokens.shape == (2, 16, 384)


def test_frequency_pools_only_while_more_than_one_bin():
    model = AudioSpectrogramCNN(5, dim=4, widths=(2, 2, 2, 2, 4), rngs=nnx.Rngs(0))
    assert model.freq_pool == (2, 2, 2, 1, 1)  # 5 -> 3 -> 2 -> 1
    model.eval()
    assert _run(model, _normal((1, 4, 5))).tokens.shape == (1, 1, 4)


def test_integer_log_mel_raises_type_error():
    with pytest.raises(TypeError, match=r"log_mel: .*float"):
        _small()(np.zeros((2, 8, N_MELS), np.int32))


@pytest.mark.parametrize("shape", [(2, 8, 13), (8, N_MELS), (2, 8, N_MELS, 1)])
def test_wrong_log_mel_shape_names_argument_and_n_mels(shape):
    with pytest.raises(ValueError, match=rf"log_mel: expected .*n_mels={N_MELS}\]"):
        _small()(np.zeros(shape, np.float32))


def test_empty_time_axis_raises():
    with pytest.raises(ValueError, match="log_mel"):
        _small()(np.zeros((2, 0, N_MELS), np.float32))


def test_bad_mask_raises_naming_mask():
    model = _small()
    x = np.zeros((2, 8, N_MELS), np.float32)
    with pytest.raises(ValueError, match=r"mask: expected shape \[batch=2, time=8\]"):
        model(x, np.ones((2, 7), bool))
    with pytest.raises(ValueError, match="mask: expected rank 2"):
        model(x, np.ones((2, 8, 1), bool))
    with pytest.raises(TypeError, match="mask: expected bool"):
        model(x, np.ones((2, 8), np.int32))


def test_bad_configuration_raises():
    with pytest.raises(ValueError, match="time_pool"):
        _small(time_pool=(2, 0))
    with pytest.raises(ValueError, match="n_mels"):
        AudioSpectrogramCNN(0, dim=4, rngs=nnx.Rngs(0))
