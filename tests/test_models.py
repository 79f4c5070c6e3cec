"""lepton_mm.models: MultimodalClassifier, PooledFusion, TwoTower and the tasks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lepton_mm.encoders import ImageCNN
from lepton_mm.fusion import ConcatFusion
from lepton_mm.models import (
    Binary,
    Classification,
    Contrastive,
    MultiLabel,
    MultimodalClassifier,
    PooledFusion,
    Regression,
    TwoTower,
    TwoTowerOutput,
    apply_presence,
    build_classifier,
    encode_modalities,
)
from lepton_mm.types import EncoderOutput

B = 4


class Frames(nnx.Module):
    """A tiny sequence encoder: ([batch, time, features], mask) -> EncoderOutput."""

    def __init__(self, features, dim, rngs):
        self.dim = dim
        self.proj = nnx.Linear(features, dim, rngs=rngs)

    def __call__(self, x, mask):
        return EncoderOutput.from_tokens(jnp.tanh(self.proj(x)), mask)


def _batch(seed=0, n=B):
    rng = np.random.default_rng(seed)
    return {
        "image": jnp.asarray(rng.normal(size=(n, 8, 8, 1)), jnp.float32),
        "audio": (jnp.asarray(rng.normal(size=(n, 5, 3)), jnp.float32),
                  jnp.asarray(np.arange(5)[None] < rng.integers(1, 6, n)[:, None])),
        "label": jnp.asarray(rng.integers(0, 3, n), jnp.int32),
    }


def _model(seed=0, fusion="concat"):
    rngs = nnx.Rngs(seed)
    encoders = {"image": ImageCNN(1, dim=6, widths=(4,), rngs=rngs),
                "audio": Frames(3, 5, rngs)}
    model = build_classifier(encoders, fusion, num_outputs=3, fusion_dim=7, rngs=rngs)
    model.eval()
    return model


# ----------------------------------------------------------------- MultimodalClassifier


def test_classifier_output_shape_and_sorted_modalities():
    model = _model()
    assert model.modalities == ("audio", "image")
    assert model(_batch()).shape == (B, 3)


def test_absent_examples_ignore_that_modality():
    model = _model()
    batch = _batch()
    present = jnp.array([True, False, True, False])
    batch["present"] = {"audio": present}
    logits = model(batch)
    other = dict(batch, audio=(batch["audio"][0] * 100 + 7, batch["audio"][1]))
    logits_other = model(other)
    np.testing.assert_array_equal(logits[~present], logits_other[~present])
    assert not np.allclose(logits[present], logits_other[present])
    encoded = model.encode(batch)
    assert not bool(jnp.any(encoded["audio"].mask[~present]))
    np.testing.assert_array_equal(encoded["audio"].pooled[~present], 0.0)


def test_absent_rows_may_hold_nan():
    model = _model()
    batch = _batch()
    image = batch["image"].at[1].set(jnp.nan)
    batch = dict(batch, image=image, present={"image": jnp.array([True, False, True, True])})
    assert bool(jnp.all(jnp.isfinite(model(batch))))


def test_apply_presence_and_encode_modalities_are_the_models_encoding():
    tokens = jnp.arange(12, dtype=jnp.float32).reshape(2, 3, 2)
    mask = jnp.array([[True, True, False], [True, False, True]])
    out = EncoderOutput(tokens, mask, jnp.array([[1.0, 2.0], [jnp.nan, 4.0]]))
    assert apply_presence(out, None) is out
    got = apply_presence(out, jnp.array([True, False]))
    np.testing.assert_array_equal(got.mask, [[True, True, False], [False, False, False]])
    np.testing.assert_array_equal(got.tokens, [[[0, 1], [2, 3], [0, 0]], [[0, 0]] * 3])
    np.testing.assert_array_equal(got.pooled, [[1.0, 2.0], [0.0, 0.0]])  # NaN selected away
    model = _model()
    batch = dict(_batch(), present={"audio": jnp.array([True, False, True, False])})
    encoded = encode_modalities(model.encoders, batch, model.modalities)
    reference = model.encode(batch)
    assert set(encoded) == {"audio", "image"}
    for m in model.modalities:
        for a, b in zip(encoded[m], reference[m], strict=True):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(model.head(model.fusion(encoded)), model(batch))


def test_unimodal_baseline_uses_pooled_features():
    rngs = nnx.Rngs(0)
    encoder = Frames(3, 5, rngs)
    head = nnx.Linear(5, 3, rngs=rngs)
    model = MultimodalClassifier({"audio": encoder}, None, head)
    assert isinstance(model.fusion, PooledFusion)
    batch = _batch()
    batch["present"] = {"audio": jnp.array([True, True, False, True])}
    pooled = encoder(*batch["audio"]).pooled
    expected = head(jnp.where(batch["present"]["audio"][:, None], pooled, 0.0))
    np.testing.assert_allclose(model(batch), expected, rtol=1e-6)
    # the tri-modal batch feeds the unimodal model: other modalities are ignored
    assert build_classifier({"audio": Frames(3, 5, rngs)}, None, num_outputs=2,
                            rngs=rngs)(batch).shape == (B, 2)


def test_missing_modality_raises_before_compute():
    model = _model()
    batch = _batch()
    del batch["audio"]
    with pytest.raises(ValueError, match=r"missing modality 'audio'.*present"):
        model(batch)


def test_bad_present_flags_raise():
    model = _model()
    batch = dict(_batch(), present={"audio": jnp.ones((B + 1,), bool)})
    with pytest.raises(ValueError, match=r"present.*audio"):
        model(batch)


def test_constructor_errors():
    rngs = nnx.Rngs(0)
    enc = {"image": ImageCNN(1, dim=6, widths=(4,), rngs=rngs), "audio": Frames(3, 5, rngs)}
    with pytest.raises(ValueError, match="Unrecognized fusion: 'nope'.*concat"):
        build_classifier(enc, "nope", num_outputs=3, fusion_dim=4, rngs=rngs)
    with pytest.raises(ValueError, match="fusion: required for 2 modalities"):
        MultimodalClassifier(enc, None, nnx.Linear(4, 3, rngs=rngs))
    other = ConcatFusion({"image": 6, "text": 5}, 4, rngs=rngs)
    with pytest.raises(ValueError, match="built for modalities"):
        MultimodalClassifier(enc, other, nnx.Linear(4, 3, rngs=rngs))
    with pytest.raises(ValueError, match="reserved"):
        MultimodalClassifier({"label": Frames(3, 5, rngs)}, None, nnx.Linear(5, 3, rngs=rngs))


def test_modality_dropout_keeps_one_and_is_keyed():
    model = _model()
    batch = _batch()
    key = jax.random.key(3)
    a = model(batch, modality_dropout=0.9, key=key)
    b = model(batch, modality_dropout=0.9, key=key)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, model(batch))
    with pytest.raises(ValueError, match="needs a PRNG key"):
        model(batch, modality_dropout=0.5)


def test_classifier_gradients_flow_to_every_encoder():
    model = _model()
    batch = _batch()

    def loss(m):
        return Classification(3).loss(m(batch), batch, jnp.ones((B,), bool))

    grads = nnx.grad(loss)(model)
    for name in ("audio", "image"):
        leaves = jax.tree.leaves(nnx.state(grads["encoders"][name], nnx.Param))
        assert any(float(jnp.abs(g).max()) > 0 for g in leaves), name


# ---------------------------------------------------------------------------- TwoTower


def _two_tower(**kw):
    rngs = nnx.Rngs(0)
    return TwoTower(Frames(3, 5, rngs), ImageCNN(1, dim=6, widths=(4,), rngs=rngs),
                    nnx.Linear(5, 4, rngs=rngs), nnx.Linear(6, 4, rngs=rngs),
                    modalities=("audio", "image"), **kw)


def test_two_tower_normalised_float32_embeddings():
    out = _two_tower()(_batch())
    assert isinstance(out, TwoTowerOutput)
    for emb in (out.a, out.b):
        assert emb.dtype == jnp.float32 and emb.shape == (B, 4)
        np.testing.assert_allclose(jnp.linalg.norm(emb, axis=-1), 1.0, rtol=1e-5)
    assert out.scale.dtype == jnp.float32 and out.bias.dtype == jnp.float32
    np.testing.assert_allclose(out.scale, 10.0, rtol=1e-6)
    np.testing.assert_allclose(out.bias, -10.0)
    assert out.logits().shape == (B, B)


def test_two_tower_scale_is_log_parametrised_and_clamped():
    model = _two_tower(max_scale=50.0)
    model.logit_scale[...] = jnp.float32(10.0)  # exp(10) >> 50
    assert float(model.scale) == pytest.approx(50.0)
    model.logit_scale[...] = jnp.float32(math.log(3.0))
    assert float(model.scale) == pytest.approx(3.0)

    def loss(m):
        return Contrastive().loss(m(_batch()), {}, jnp.ones((B,), bool))

    grads = nnx.grad(loss)(model)
    assert float(jnp.abs(grads["logit_scale"][...])) > 0
    assert float(jnp.abs(grads["logit_bias"][...])) > 0
    with pytest.raises(ValueError, match="init_scale"):
        _two_tower(init_scale=1000.0)


# ------------------------------------------------------------------------------ tasks


def _valid(n, k):
    return jnp.arange(n) < k


def test_classification_loss_matches_optax_and_ignores_padding():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
    labels = jnp.array([0, 2, 1, 1, 0, 2], jnp.int32)
    valid = _valid(6, 4)
    padded = logits.at[4:].set(jnp.nan)
    task = Classification(3)
    expected = optax.softmax_cross_entropy_with_integer_labels(logits[:4], labels[:4]).mean()
    np.testing.assert_allclose(task.loss(padded, {"label": labels}, valid), expected,
                               rtol=1e-6)
    grad = jax.grad(lambda x: task.loss(x, {"label": labels}, valid))(padded)
    assert bool(jnp.all(jnp.isfinite(grad)))
    m = task.metrics(logits, {"label": labels}, valid)
    m4 = task.metrics(logits[:4], {"label": labels[:4]}, jnp.ones(4, bool))
    assert set(m) == {"accuracy", "f1"}
    for k in m:
        np.testing.assert_allclose(m[k], m4[k])
    smooth = Classification(3, label_smoothing=0.1).loss(logits, {"label": labels},
                                                         _valid(6, 6))
    assert float(smooth) != pytest.approx(float(task.loss(logits, {"label": labels},
                                                          _valid(6, 6))))
    with pytest.raises(ValueError, match="batch\\['label'\\]"):
        task.loss(logits, {}, valid)


def test_binary_task():
    logits = jnp.array([2.0, -1.0, 0.5, -3.0, 9.0])
    labels = jnp.array([1, 0, 0, 1, 1])
    valid = _valid(5, 4)
    task = Binary()
    expected = optax.sigmoid_binary_cross_entropy(logits[:4], labels[:4].astype(float))
    np.testing.assert_allclose(task.loss(logits[:, None], {"label": labels}, valid),
                               expected.mean(), rtol=1e-6)
    m = task.metrics(logits, {"label": labels}, valid)
    # predictions [1, 0, 1, 0] vs labels [1, 0, 0, 1]: tp=1, fp=1, fn=1
    np.testing.assert_allclose([m["accuracy"], m["precision"], m["recall"], m["f1"]],
                               [0.5, 0.5, 0.5, 0.5])


def test_multilabel_task():
    logits = jnp.array([[1.0, -1.0], [1.0, 1.0], [-5.0, 5.0]])
    labels = jnp.array([[1, 0], [0, 1], [1, 1]])
    valid = _valid(3, 2)
    task = MultiLabel(2)
    m = task.metrics(logits, {"label": labels}, valid)
    np.testing.assert_allclose(m["accuracy"], 0.75)
    np.testing.assert_allclose(m["subset_accuracy"], 0.5)
    np.testing.assert_allclose(m["f1"], 0.8, rtol=1e-6)  # tp=2, fp=1, fn=0
    per = optax.sigmoid_binary_cross_entropy(logits[:2], labels[:2].astype(float))
    np.testing.assert_allclose(task.loss(logits, {"label": labels}, valid), per.mean(),
                               rtol=1e-6)


def test_regression_task_l1_mse_and_mosi_metrics():
    pred = jnp.array([0.5, -1.0, 2.9, 0.0, 100.0])
    target = jnp.array([1.0, -2.0, 3.0, -0.2, 0.0])
    valid = _valid(5, 4)
    batch = {"label": target}
    np.testing.assert_allclose(Regression("l1").loss(pred, batch, valid),
                               np.mean([0.5, 1.0, 0.1, 0.2]), rtol=1e-6)
    np.testing.assert_allclose(Regression("mse").loss(pred[:, None], batch, valid),
                               np.mean([0.25, 1.0, 0.01, 0.04]), rtol=1e-6)
    m = Regression(mosi=True).metrics(pred, batch, valid)
    assert set(m) == {"mae", "mse", "pearson", "acc2", "f1_mosi", "acc7"}
    assert set(m) | {"loss"} == set(Regression(mosi=True).metric_names)
    np.testing.assert_allclose(m["mae"], 0.45, rtol=1e-6)
    with pytest.raises(ValueError, match="loss_type"):
        Regression("huber")


def test_contrastive_task_on_two_tower_outputs():
    a = jnp.eye(3, 4)
    out = TwoTowerOutput(a=a, b=a, scale=jnp.float32(10.0), bias=jnp.float32(-10.0))
    task = Contrastive()
    expected = -(jax.nn.log_sigmoid(0.0) + 2 * jax.nn.log_sigmoid(10.0))
    np.testing.assert_allclose(task.loss(out, {}, jnp.ones(3, bool)), expected, rtol=1e-5)
    m = task.metrics(out, {}, jnp.ones(3, bool))
    assert m["a_to_b_recall@1"] == 1.0 and m["recall"] == 1.0
    assert set(m) | {"loss"} == set(task.metric_names)
    clip = Contrastive(kind="softmax").loss(out, {}, jnp.ones(3, bool))
    assert 0.0 <= float(clip) < 1e-3
    with pytest.raises(TypeError, match="TwoTowerOutput"):
        task.loss(jnp.zeros((3, 3)), {}, jnp.ones(3, bool))
