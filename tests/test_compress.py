"""lepton_mm.quantize (int8 through qwix) and lepton_mm.prune (magnitude and channel
pruning), checked against hand-computed values on tiny models."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lepton_mm import EncoderOutput, export
from lepton_mm.encoders import AudioSpectrogramCNN, ImageCNN
from lepton_mm.fusion import build
from lepton_mm.models import Classification, MultimodalClassifier, build_classifier
from lepton_mm.prune import (
    magnitude_masks,
    magnitude_pruning,
    prune_channels,
    prune_magnitude,
    weight_sparsity,
)
from lepton_mm.quantize import QuantizedConv, quantization_aware, quantize
from lepton_mm.training import fit, seed_rngs


def _randomise_norms(model, seed):
    """Non-trivial batch-norm parameters and running statistics (eval mode uses them)."""
    rng = np.random.default_rng(seed)
    for _, module in nnx.iter_modules(model):
        if hasattr(module, "mean") and hasattr(module, "var"):
            n = module.mean.shape[0]
            module.mean[...] = jnp.asarray(0.3 * rng.normal(size=n), jnp.float32)
            module.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, n), jnp.float32)
            module.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, n), jnp.float32)
            module.bias[...] = jnp.asarray(0.1 * rng.normal(size=n), jnp.float32)


def _model(seed=0):
    rngs = nnx.Rngs(seed)
    # 1x1 kernels and no pooling keep compilation short (3x3 blocks: the channel tests).
    encoders = {"image": ImageCNN(1, dim=8, widths=(4, 8), kernel_sizes=1, pool=1,
                                  rngs=rngs),
                "audio": AudioSpectrogramCNN(8, dim=8, widths=(4, 8), kernel_sizes=1,
                                             time_pool=1, rngs=rngs)}
    fusion = build("concat", {m: e.dim for m, e in encoders.items()}, 16, rngs=rngs)
    head = nnx.Sequential(jax.nn.relu, nnx.Linear(16, 3, rngs=rngs))
    model = MultimodalClassifier(encoders, fusion, head)
    _randomise_norms(model, seed + 1)
    model.eval()
    return model


def _batch(n=3, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.arange(12)[None, :] < np.array([12, 7, 3, 9, 1])[:n, None]
    return {"image": rng.normal(size=(n, 8, 8, 1)).astype(np.float32),
            "audio": (rng.normal(size=(n, 12, 8)).astype(np.float32), mask)}


@pytest.fixture(scope="module")
def model():
    return nnx.jit(_model, static_argnums=0)(0)  # one compilation, not one per init op


@pytest.fixture(scope="module")
def batch():
    return _batch()


@pytest.fixture(scope="module")
def quantized(model, batch):
    return quantize(model, batch)


_forward = nnx.jit(lambda m, b: m(b))


def _check_int8(w, qvalue, scale):
    """``qvalue``, ``scale`` are ``w``'s per-output-channel int8: ``scale = absmax / 127.5``
    over all but the last axis and ``qvalue`` a nearest level of ``w / scale`` in
    [-128, 127] (the absmax entry, at exactly +-127.5, may go either way: qwix multiplies
    by the reciprocal of the scale). Returns the dequantised float32 ``qvalue * scale``."""
    w, q = np.asarray(w, np.float64), np.asarray(qvalue)
    assert q.dtype == np.int8
    absmax = np.abs(w).max(axis=tuple(range(w.ndim - 1)), keepdims=True)
    np.testing.assert_allclose(np.asarray(scale), absmax / 127.5, rtol=1e-6)
    assert np.all(np.abs(q - np.clip(w / np.asarray(scale), -128.5, 127.5)) <= 0.5 + 1e-4)
    return (q * np.asarray(scale, np.float32)).astype(np.float32)


def _kernels(model):
    return {path: var for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
            if path[-1] == "kernel" and var[...].ndim >= 2}


# --- quantisation ------------------------------------------------------------------------

def test_int8_scales_and_values_are_per_output_channel_absmax():
    conv = nnx.Conv(3, 2, (1, 1), use_bias=False, rngs=nnx.Rngs(0))
    conv.kernel[...] = jnp.array([[1.0, 0.2], [-0.5, -0.1], [0.25, 2.55]])[None, None]
    q = QuantizedConv(conv)
    np.testing.assert_allclose(q.scale[...].ravel(), [1.0 / 127.5, 0.02], rtol=1e-6)
    # 127.5 saturates to 127; 63.75 -> 64; 31.875 -> 32; 10, -5 exact.
    np.testing.assert_array_equal(q.qvalue[...][0, 0], [[127, 10], [-64, -5], [32, 127]])
    assert q.qvalue.dtype == jnp.int8
    np.testing.assert_allclose(q.kernel[0, 0],
                               [[127 / 127.5, 0.2], [-64 / 127.5, -0.1],
                                [32 / 127.5, 127 * 0.02]], rtol=1e-6)
    x = jnp.arange(12.0).reshape(1, 2, 2, 3)
    np.testing.assert_allclose(q(x), jnp.einsum("bhwc,cd->bhwd", x, q.kernel[0, 0]),
                               rtol=1e-6)

    # A Linear layer goes through qwix: the same scales, one per output column.
    linear = nnx.Linear(2, 2, use_bias=False, rngs=nnx.Rngs(0))
    linear.kernel[...] = jnp.array([[1.0, 0.3], [-0.25, 0.6]])
    ql = quantize(linear, jnp.ones((1, 2)))
    np.testing.assert_allclose(ql.kernel.array.scale, [[1.0 / 127.5, 0.6 / 127.5]],
                               rtol=1e-6)
    np.testing.assert_array_equal(ql.kernel.array.qvalue, [[127, 64], [-32, 127]])


def _stored_int8(quantized, path):
    """The ``(qvalue, scale)`` that ``quantized`` stores for the kernel at ``path``."""
    state = dict(nnx.to_flat_state(nnx.state(quantized)))
    where = path[:-1] if (*path[:-1], "qvalue") in state else (*path, "array")
    return state[(*where, "qvalue")][...], state[(*where, "scale")][...]


def _with_int8_kernels(model, quantized, keep=lambda path: False):
    """``model`` with each kernel (but those ``keep`` names) replaced by its int8 value
    as ``quantized`` stores it, checked against the rule (``_check_int8``)."""
    reference = nnx.clone(model)
    for path, var in _kernels(reference).items():
        if not keep(path):
            var[...] = jnp.asarray(_check_int8(var[...], *_stored_int8(quantized, path)))
    return reference


def test_quantized_model_is_the_float_model_on_int8_weights(model, batch, quantized):
    assert not _kernels(quantized), "float kernels left"
    qvalues = [p for p, _ in nnx.to_flat_state(nnx.state(quantized)) if p[-1] == "qvalue"]
    assert len(qvalues) == 6  # 2 convs per encoder (QuantizedConv), fusion, head (qwix)
    reference = _with_int8_kernels(model, quantized)
    expected = _forward(reference, batch)
    np.testing.assert_allclose(_forward(quantized, batch), expected, rtol=1e-5, atol=1e-6)
    dense = _forward(model, batch)  # same graph as the reference: no new compilation
    assert 1e-4 < float(jnp.max(jnp.abs(expected - dense))) < 0.05


def test_activation_quantisation_runs_int8_matmuls(model, batch):
    def int8_dots(m):
        jaxpr = jax.make_jaxpr(lambda b: m(b))(batch)
        found = []

        def walk(jx):
            for eqn in jx.eqns:
                if eqn.primitive.name == "dot_general":
                    found.append(tuple(v.aval.dtype for v in eqn.invars))
                for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                    walk(sub)
        walk(jaxpr.jaxpr)
        return [d for d in found if d == (jnp.int8, jnp.int8)]

    assert not int8_dots(model)
    dynamic = quantize(model, batch, activations=True, keep_float=["head"])
    assert len(int8_dots(dynamic)) == 1  # the fusion layer's matmul; the head stays float
    assert list(_kernels(dynamic)) == [("head", "layers", 1, "kernel")]


def test_export_reloads_equal_and_smaller(model, batch, quantized, tmp_path):
    dense_path = export.save(model, (batch,), tmp_path / "dense")
    int8_path = export.save(quantized, (batch,), tmp_path / "int8")
    loaded = export.load(int8_path)
    np.testing.assert_allclose(loaded(batch), _forward(quantized, batch), rtol=1e-6,
                               atol=1e-6)

    def data_bytes(exported):
        return sum(int(np.prod(w["shape"])) * jnp.dtype(w["dtype"]).itemsize
                   for w in exported.manifest["weights"])

    # Hand count. Kernels: image/audio convs 1*1*1*4 + 1*1*4*8 = 36 each, fusion 16*16,
    # head 16*3: 376. Other floats: batch norm 4 * (4 + 8) per encoder, biases 16 + 3.
    # Scales: one per output channel.
    kernels, others, scales = 36 * 2 + 256 + 48, 48 * 2 + 19, (4 + 8) * 2 + 16 + 3
    assert data_bytes(export.load(dense_path)) == 4 * (kernels + others)
    assert data_bytes(loaded) == kernels + 4 * (others + scales)
    size = lambda p: (p / export.WEIGHTS_FILE).stat().st_size
    assert size(int8_path) < size(dense_path)  # the file: tensor names in its header too


def test_quantization_aware_training_simulates_the_int8_model(model, batch, quantized):
    qat = quantization_aware(model, batch)
    assert qat.head.layers[1].kernel[...].dtype == jnp.float32  # weights stay float

    @nnx.jit
    def loss_and_grads(m):
        return nnx.value_and_grad(lambda m: (jnp.sum(m(batch) ** 2), m(batch)),
                                  has_aux=True)(m)

    (_, outputs), grads = loss_and_grads(qat)
    # QAT reaches the layers qwix quantises, not the CNN encoders' convolutions: it
    # computes the float model with the fusion and head kernels at their int8 values.
    reference = _with_int8_kernels(model, quantized, keep=lambda p: p[0] == "encoders")
    np.testing.assert_allclose(outputs, _forward(reference, batch), rtol=1e-5, atol=1e-6)
    head = np.asarray(grads["head"]["layers"][1]["kernel"][...])
    assert np.all(np.isfinite(head)) and np.any(head != 0)  # straight-through gradient
    # After training, quantize converts it: here (same parameters) to the same int8.
    converted = quantize(qat, batch)
    for path in (("head", "layers", 1, "kernel"), ("fusion", "mlp", "linears", 0, "kernel"),
                 ("encoders", "audio", "convs", 1, "kernel")):
        for a, b in zip(_stored_int8(converted, path), _stored_int8(quantized, path),
                        strict=True):
            np.testing.assert_array_equal(a, b)


# --- unstructured pruning ----------------------------------------------------------------

def test_global_magnitude_masks_hand_computed():
    weights = {"a": jnp.array([[0.1, -0.5], [0.3, 0.05]]),
               "b": jnp.array([-0.2, 0.4, 1.0, -0.01])}
    masks = magnitude_masks(weights, 0.5)  # 4 of 8: |w| 0.01, 0.05, 0.1, 0.2
    np.testing.assert_array_equal(masks["a"], [[False, True], [True, False]])
    np.testing.assert_array_equal(masks["b"], [False, True, True, False])
    assert all(np.all(m) for m in jax.tree.leaves(magnitude_masks(weights, 0.0)))
    masks = jax.jit(magnitude_masks, static_argnums=1)(weights, 0.75)  # 6 of 8
    assert sum(int(m.sum()) for m in jax.tree.leaves(masks)) == 2
    np.testing.assert_array_equal(masks["b"], [False, False, True, False])


def test_one_shot_pruning_zeroes_the_globally_smallest_kernels(model, batch):
    pruned = prune_magnitude(model, 0.5)
    before, after = _kernels(model), _kernels(pruned)
    values = np.concatenate([np.abs(np.asarray(v[...])).ravel() for v in before.values()])
    assert values.size == 376
    assert weight_sparsity(pruned) == 188 / 376 and weight_sparsity(model) == 0.0
    kept = np.concatenate([np.asarray(after[p][...]).ravel() != 0 for p in before])
    assert values[kept].min() >= values[~kept].max()
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path not in before:  # biases and batch norm untouched
            other = dict(nnx.to_flat_state(nnx.state(pruned, nnx.Param)))[path]
            np.testing.assert_array_equal(var[...], other[...])
    assert _forward(pruned, batch).shape == (3, 3)  # same graph as model's: compiled


def test_gradual_schedule_is_cubic_and_pruned_weights_stay_zero():
    params = {"dense": {"kernel": jnp.arange(1.0, 37.0).reshape(6, 6), "bias": jnp.ones(6)}}
    tx = optax.chain(optax.sgd(0.1), magnitude_pruning(0.75, end_step=3, frequency=1))
    state = tx.init(params)
    step = jax.jit(tx.update)
    zeros = []
    for _ in range(6):
        grads = jax.tree.map(jnp.ones_like, params)
        updates, state = step(grads, state, params)
        previous = params["dense"]["kernel"]
        params = optax.apply_updates(params, updates)
        kernel = params["dense"]["kernel"]
        zeros.append(int((kernel == 0).sum()))
        assert np.all((previous != 0) | (kernel == 0))  # once pruned, always zero
    # s_t = 0.75 (1 - (1 - t/3)^3): 0, 0.528, 0.722, 0.75 of 36 weights -> 0, 19, 26, 27.
    assert zeros == [0, 19, 26, 27, 27, 27]
    np.testing.assert_allclose(params["dense"]["bias"], 1 - 6 * 0.1, rtol=1e-6)  # kept
    # The survivors are the largest: kernel entries 28..36 (minus the sgd steps).
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(kernel).ravel()),
                                  np.arange(27, 36))


class _Frames(nnx.Module):
    """A one-layer frame encoder: the cheapest model to train through ``fit``."""

    def __init__(self, rngs):
        self.dim = 5
        self.proj = nnx.Linear(3, 5, rngs=rngs)

    def __call__(self, x, mask):
        return EncoderOutput.from_tokens(jnp.tanh(self.proj(x)), mask)


def test_fit_prunes_on_schedule_and_fine_tunes(tmp_path):
    rngs = seed_rngs(0)
    model = build_classifier({"audio": _Frames(rngs)}, None, num_outputs=3, rngs=rngs)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 20)
    data = {"audio": ((rng.normal(size=(20, 4, 3)) - labels[:, None, None]).astype(
        np.float32), np.ones((20, 4), bool)), "label": labels.astype(np.int32)}
    before = [np.asarray(v[...]) for v in _kernels(model).values()]
    tx = optax.chain(optax.adam(0.05), magnitude_pruning(0.6, end_step=1, frequency=1))
    fit(model, Classification(3), data, workdir=tmp_path / "run", epochs=1, batch_size=8,
        optimizer=tx, optimizer_name="adam-prune0.6", seed=0)  # 3 steps
    after = [np.asarray(v[...]) for v in _kernels(model).values()]
    # 60 % of the 15 + 15 kernel entries (projection 3x5, head 5x3) are zero, the rest
    # were trained on; biases are never pruned.
    assert weight_sparsity(model) == 18 / 30
    assert all(np.all(a[a != 0] != b[a != 0]) for a, b in zip(after, before, strict=True))
    assert np.all(np.asarray(model.head.bias[...]) != 0)


# --- structured pruning ------------------------------------------------------------------

def _zero_channels(encoder, removed):
    """The dense encoder with the removed channels' filter, BN scale and bias zeroed."""
    dense = nnx.clone(encoder)
    for i, channels in removed.items():
        kernel = np.asarray(dense.convs[i].kernel[...]).copy()
        kernel[..., channels] = 0
        dense.convs[i].kernel[...] = jnp.asarray(kernel)
        for name in ("scale", "bias"):
            value = np.asarray(getattr(dense.norms[i], name)[...]).copy()
            value[channels] = 0
            getattr(dense.norms[i], name)[...] = jnp.asarray(value)
    return dense


def test_channel_pruning_equals_the_dense_model_with_those_channels_zeroed():
    encoder = ImageCNN(1, dim=8, widths=(4, 6, 8), pool=1, rngs=nnx.Rngs(0))
    _randomise_norms(encoder, 1)
    encoder.eval()
    # Make the weakest filters (by L1 norm) known: layer 0 channels 1, 2; layer 1: 0, 3, 5.
    for i, weak in ((0, [1, 2]), (1, [0, 3, 5])):
        kernel = np.asarray(encoder.convs[i].kernel[...]).copy()
        kernel[..., weak] *= 0.01
        encoder.convs[i].kernel[...] = jnp.asarray(kernel)
    pruned = prune_channels(encoder, 0.5, criterion="l1")
    assert pruned.widths == (2, 3, 8)
    assert [c.kernel.shape for c in pruned.convs] == [(3, 3, 1, 2), (3, 3, 2, 3),
                                                      (3, 3, 3, 8)]
    assert pruned.norms[0].mean.shape == (2,) and pruned.norms[0].use_running_average
    np.testing.assert_array_equal(pruned.convs[1].kernel[...],
                                  encoder.convs[1].kernel[...][:, :, [0, 3]][..., [1, 2, 4]])
    images = np.random.default_rng(2).normal(size=(2, 8, 8, 1)).astype(np.float32)
    dense = _zero_channels(encoder, {0: [1, 2], 1: [0, 3, 5]})
    # Equal up to float summation order (the matmuls add fewer exact zeros).
    np.testing.assert_allclose(_forward(pruned, images).tokens,
                               _forward(dense, images).tokens, rtol=1e-6, atol=1e-6)

    # The default importance with batch norm is its scale (the audio encoder is rebuilt
    # and run in the classifier test below; the slicing is the one checked above).
    audio = AudioSpectrogramCNN(8, dim=8, widths=(4, 8), rngs=nnx.Rngs(3))
    _randomise_norms(audio, 4)
    pruned = prune_channels(audio, 0.5)
    assert pruned.widths == (2, 8)
    scale = np.asarray(audio.norms[0].scale[...])
    np.testing.assert_array_equal(pruned.norms[0].scale[...],
                                  scale[np.sort(np.argsort(-scale)[:2])])
    assert not pruned.norms[0].use_running_average  # the original's (training) mode


def test_channel_pruning_shrinks_a_classifier(model, batch, tmp_path):
    pruned = prune_channels(model, 0.5, modalities=["image"])
    assert pruned.encoders["image"].widths == (2, 8)
    assert pruned.encoders["audio"].widths == (4, 8)  # not selected
    assert model.encoders["image"].widths == (4, 8)  # the original is untouched
    both = prune_channels(model, 0.5)
    # Image and audio each: 1*1*1*2 + 1*1*2*8 = 18 kernel entries (was 36) and
    # 4 * (2 + 8) batch-norm values (was 48).
    dense = export.save(model, (batch,), tmp_path / "dense")
    small = export.save(both, (batch,), tmp_path / "pruned")
    count = lambda p: sum(int(np.prod(w["shape"])) for w in
                          export.load(p).manifest["weights"])
    assert count(dense) - count(small) == 2 * ((36 - 18) + (48 - 40))
    size = lambda p: (p / export.WEIGHTS_FILE).stat().st_size
    assert size(small) < size(dense)
    assert export.load(small)(batch).shape == (3, 3)


# --- bad input ---------------------------------------------------------------------------

@pytest.mark.parametrize("sparsity, error", [(1.0, ValueError), (-0.1, ValueError),
                                             (float("nan"), ValueError),
                                             ("0.5", TypeError), (True, TypeError)])
def test_sparsity_outside_0_1_is_refused(model, sparsity, error):
    for call in (lambda: prune_magnitude(model, sparsity),
                 lambda: prune_channels(model, sparsity),
                 lambda: magnitude_masks({"w": jnp.ones(3)}, sparsity),
                 lambda: magnitude_pruning(sparsity, end_step=10)):
        with pytest.raises(error, match="sparsity"):
            call()


def test_bad_arguments_are_named(model, batch):
    with pytest.raises(ValueError, match="modalities: unknown modality 'text'"):
        prune_channels(model, 0.5, modalities=["text"])
    with pytest.raises(ValueError, match="modalities: unknown modality 'video'"):
        quantize(model, batch, modalities=["video"])
    with pytest.raises(ValueError, match=r"modalities: unknown modalities \['text', 'video'\]\. "
                                         r"Known: \['audio', 'image'\]\.$"):
        prune_channels(model, 0.5, modalities=["image", "text", "video", "text"])
    with pytest.raises(ValueError, match="criterion"):
        prune_channels(model, 0.5, criterion="l2")
    no_norm = ImageCNN(1, dim=4, widths=(2, 4), batch_norm=False, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="criterion: 'bn_scale' needs batch norm"):
        prune_channels(no_norm, 0.5, criterion="bn_scale")
    text = MultimodalClassifier({"text": nnx.Linear(4, 8, rngs=nnx.Rngs(0))},
                                fusion=None, head=nnx.Linear(8, 2, rngs=nnx.Rngs(0)))
    with pytest.raises(TypeError, match=r"modalities: encoders\['text'\].*Linear"):
        prune_channels(text, 0.5, modalities=["text"])
    with pytest.raises(TypeError, match="model: no encoder supports structured"):
        prune_channels(text, 0.5)
    no_norm.convs[0] = QuantizedConv(no_norm.convs[0])
    with pytest.raises(TypeError, match="prune before quantising"):
        prune_channels(no_norm, 0.5)
    with pytest.raises(ValueError, match="end_step"):
        magnitude_pruning(0.5, end_step=3, begin_step=5)
    with pytest.raises(ValueError, match="frequency"):
        magnitude_pruning(0.5, end_step=3, frequency=0)
    with pytest.raises(ValueError, match="initial_sparsity"):
        magnitude_pruning(0.5, end_step=3, initial_sparsity=0.6)
    with pytest.raises(ValueError, match="example_inputs"):
        quantize(model)
    with pytest.raises(ValueError, match="keep_float: no module at path 'fusoin'"):
        quantize(model, batch, keep_float=["fusoin"])
