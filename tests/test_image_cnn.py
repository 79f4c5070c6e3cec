"""Tests for lepton_mm.encoders.image_cnn."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lepton_mm.encoders.image_cnn import ImageCNN

# Models run through nnx.jit (one compilation per shape, much cheaper on CPU than eager
# op-by-op dispatch; test_jit_matches_eager checks the two agree) on numpy test data.
_run = nnx.jit(lambda model, *args, **kwargs: model(*args, **kwargs))


def _uniform(shape, seed=0):
    return np.random.default_rng(seed).uniform(size=shape).astype(np.float32)


def _params(model):
    return jax.tree.leaves(nnx.state(model, nnx.Param))


def _n_params(model):
    return sum(p.size for p in _params(model))


def _small(dim=16, **kwargs):
    kwargs.setdefault("widths", (4, 8))
    return ImageCNN(3, dim=dim, rngs=nnx.Rngs(0), **kwargs)


def test_shapes_mask_and_pooled():
    model = _small()
    model.eval()
    out = _run(model, _uniform((2, 16, 12, 3)))
    assert out.tokens.shape == (2, 4 * 3, 16)  # 16x12 -> 8x6 -> 4x3
    assert out.mask.shape == (2, 12) and out.mask.dtype == jnp.bool_
    assert bool(jnp.all(out.mask))
    np.testing.assert_allclose(out.pooled, out.tokens.mean(axis=1), rtol=1e-6)
    assert out.validate("image") is out


def test_projection_only_when_dim_differs():
    assert _small(dim=8).proj is None
    assert _small(dim=5).proj is not None
    assert _n_params(_small(dim=5)) == _n_params(_small(dim=8)) + 8 * 5 + 5


def test_lenet_matches_multibench_shape_and_parameter_count():
    def build_and_run(**kwargs):  # shapes only; test_lenet_matches_reference_forward runs it
        model = ImageCNN.lenet(rngs=nnx.Rngs(0), **kwargs)
        model.eval()
        return model, model(jnp.zeros((3, 28, 28, 1)))

    model, out = nnx.eval_shape(build_and_run)
    assert model.widths == (6, 12, 24, 48) and model.kernel_sizes == (5, 3, 3, 3)
    assert out.tokens.shape == (3, 1, 48) and out.pooled.shape == (3, 48)
    # Bias-free convs sum(k^2 * c_in * c_out) plus batch-norm scale and bias 2 * sum(c).
    convs = 5 * 5 * 1 * 6 + 3 * 3 * (6 * 12 + 12 * 24 + 24 * 48)
    norms = 2 * (6 + 12 + 24 + 48)
    assert convs + norms == 13938
    assert _n_params(model) == 13938
    # Running statistics are state, not parameters.
    assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.BatchStat))) == 180
    # With an explicit dim a projection 48 -> dim is added.
    projected, out = nnx.eval_shape(lambda: build_and_run(dim=10))
    assert _n_params(projected) == 13938 + 48 * 10 + 10 and out.tokens.shape == (3, 1, 10)


def _reference_lenet(model, images):
    """The MultiBench LeNet forward pass written with lax primitives (eval mode)."""
    x = images
    for conv, norm, k in zip(model.convs, model.norms, model.kernel_sizes, strict=True):
        x = jax.lax.conv_general_dilated(
            x, conv.kernel[...], (1, 1), [(k // 2, k // 2)] * 2,
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        mean, var, scale, bias = (v[...].reshape(1, 1, 1, -1)
                                  for v in (norm.mean, norm.var, norm.scale, norm.bias))
        x = (x - mean) / jnp.sqrt(var + 1e-5) * scale + bias
        x = jax.nn.relu(x)
        x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1),
                                  "VALID")
    return x.reshape(x.shape[0], -1, x.shape[-1])


def test_lenet_matches_reference_forward():
    model = ImageCNN.lenet(rngs=nnx.Rngs(1))
    model.train()
    _run(model, _uniform((4, 30, 30, 1)))  # move the running statistics
    model.eval()
    images = _uniform((2, 30, 30, 1), seed=1)
    out = _run(model, images)
    assert out.tokens.shape == (2, 1, 48)  # 30 -> 15 -> 7 -> 3 -> 1 (floor)
    np.testing.assert_allclose(out.tokens, nnx.jit(_reference_lenet)(model, images),
                               rtol=1e-5, atol=1e-5)


def test_batch_independence_in_eval_mode():
    model = _small()
    model.eval()
    images = _uniform((3, 8, 8, 3))
    changed = images.copy()
    changed[1:] = 5 * _uniform((2, 8, 8, 3), seed=1) - 2
    a, b = _run(model, images), _run(model, changed)
    np.testing.assert_allclose(a.tokens[0], b.tokens[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(a.pooled[0], b.pooled[0], rtol=1e-6, atol=1e-6)
    assert not np.allclose(a.pooled[1], b.pooled[1])


def test_jit_matches_eager():
    model = _small(dropout=0.3)
    model.eval()
    images = _uniform((2, 8, 8, 3))
    eager = model(images)
    jitted = nnx.jit(lambda m, x: m(x))(model, images)
    for e, j in zip(eager, jitted, strict=True):
        np.testing.assert_allclose(e, j, rtol=1e-5, atol=1e-6)


def test_gradients_are_finite_and_nonzero():
    model = _small(dim=5)
    model.train()
    images = _uniform((4, 8, 8, 3))
    weights = _uniform((4, 5), seed=1) - 0.5

    def loss_fn(m):
        return jnp.sum(m(images).pooled * weights)

    grads = nnx.jit(nnx.grad(loss_fn))(model)
    leaves = jax.tree.leaves(grads)
    assert len(leaves) == len(_params(model))
    for g in leaves:
        assert bool(jnp.all(jnp.isfinite(g)))
        assert float(jnp.max(jnp.abs(g))) > 0


def test_train_and_eval_modes():
    model = _small(dropout=0.5)
    images = _uniform((4, 8, 8, 3))
    model.train()
    first, second = _run(model, images).pooled, _run(model, images).pooled
    assert not np.allclose(first, second)  # fresh dropout masks, batch statistics
    same_key = [_run(model, images, rngs=nnx.Rngs(dropout=7)).pooled for _ in range(2)]
    np.testing.assert_array_equal(*same_key)
    model.eval()
    evaluated = _run(model, images).pooled
    np.testing.assert_array_equal(evaluated, _run(model, images).pooled)
    assert not np.allclose(evaluated, first)


def test_batch_norm_running_statistics_update_only_in_training():
    model = _small()
    images = _uniform((4, 8, 8, 3))
    model.eval()
    _run(model, images)
    np.testing.assert_array_equal(model.norms[0].mean[...], 0)
    model.train()
    _run(model, images)
    assert float(jnp.max(jnp.abs(model.norms[0].mean[...]))) > 0


def test_without_batch_norm_convs_have_bias():
    model = _small(batch_norm=False)
    assert model.norms is None and model.convs[0].bias is not None
    model.train()
    images = _uniform((2, 8, 8, 3))
    np.testing.assert_array_equal(_run(model, images).pooled, _run(model, images).pooled)


def test_integer_images_raise_type_error_with_hint():
    model = _small()
    with pytest.raises(TypeError, match=r"images: .*float.*\[0, 1\]"):
        model(np.zeros((2, 8, 8, 3), np.uint8))


@pytest.mark.parametrize("shape", [(2, 8, 8, 1), (8, 8, 3), (2, 8, 8, 3, 1)])
def test_wrong_shape_names_images_and_expected_layout(shape):
    with pytest.raises(ValueError, match=r"images: expected .*shape \[batch.*, channels=3\]"):
        _small()(jnp.zeros(shape))


def test_non_array_raises_type_error():
    with pytest.raises(TypeError, match="images"):
        _small()([[0.0]])


def test_too_small_images_explain_minimum_size():
    model = ImageCNN.lenet(rngs=nnx.Rngs(0))
    assert _run(model, np.zeros((1, 16, 16, 1), np.float32)).tokens.shape == (1, 1, 48)
    with pytest.raises(ValueError, match=r"images: .*at least 16.*15x28"):
        model(jnp.zeros((1, 15, 28, 1)))


def test_bad_configuration_raises():
    with pytest.raises(ValueError, match="widths"):
        _small(widths=())
    with pytest.raises(ValueError, match="kernel_sizes"):
        _small(kernel_sizes=(3, 3, 3))
    with pytest.raises(ValueError, match="dropout"):
        _small(dropout=1.0)
    with pytest.raises(ValueError, match="additional_layers"):
        ImageCNN.lenet(additional_layers=-1, rngs=nnx.Rngs(0))
