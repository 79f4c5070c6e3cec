"""lepton_mm.alignment's host-side evaluation helpers against hand-computed values:
paired_class_recall, chance_paired_class_recall, zero_shot_accuracy, embed_in_batches."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lepton_mm.alignment import (
    chance_paired_class_recall,
    class_recall_at_k,
    embed_in_batches,
    paired_class_recall,
    zero_shot_accuracy,
)

# Four examples, two classes, unit vectors: the similarities are the dot products.
LABELS = np.array([0, 0, 1, 1], np.int32)
IMAGE = np.array([[1, 0], [0, 1], [1, 0], [-1, 0]], np.float32)
AUDIO = np.array([[0, 1], [-1, 0], [1, 0], [0, -1]], np.float32)
# By hand (rank = other-class items scoring at least the best same-class one):
#   image -> audio: ranks [2, 0, 0, 2]  (image 0 ties audio 3 at 0 and trails audio 2)
#   audio -> image: ranks [0, 1, 1, 1]  (audio 2 ties image 0 at 1: ties go against it)
EXPECTED = {"image_to_audio": {"recall@1": 0.5, "recall@2": 0.5, "recall@3": 1.0},
            "audio_to_image": {"recall@1": 0.25, "recall@2": 1.0, "recall@3": 1.0}}


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_paired_class_recall_by_hand_in_any_chunking(chunk):
    out = paired_class_recall({"image": IMAGE, "audio": AUDIO}, LABELS, (1, 2, 3),
                              chunk=chunk)
    assert out == EXPECTED
    assert list(out) == ["image_to_audio", "audio_to_image"]
    assert list(out["image_to_audio"]) == ["recall@1", "recall@2", "recall@3"]


def test_paired_class_recall_follows_the_mapping_order_and_class_recall_at_k():
    out = paired_class_recall({"audio": AUDIO, "image": IMAGE}, LABELS, (2, 1))
    assert list(out) == ["audio_to_image", "image_to_audio"]
    assert list(out["audio_to_image"]) == ["recall@2", "recall@1"]
    assert out["audio_to_image"]["recall@1"] == 0.25
    # the same numbers as the jitted whole-gallery metric, on random data, chunked
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 37, 5)).astype(np.float32)
    labels = rng.integers(0, 4, 37).astype(np.int32)
    out = paired_class_recall({"x": a, "y": b}, labels, (1, 3), chunk=8)
    for k in (1, 3):
        assert out["x_to_y"][f"recall@{k}"] == pytest.approx(
            float(class_recall_at_k(a, b, labels, labels, k=k)))
        assert out["y_to_x"][f"recall@{k}"] == pytest.approx(
            float(class_recall_at_k(b, a, labels, labels, k=k)))


def test_paired_class_recall_rejects_bad_arguments():
    with pytest.raises(ValueError, match="two modalities"):
        paired_class_recall({"image": IMAGE}, LABELS, (1,))
    with pytest.raises(ValueError, match="ks"):
        paired_class_recall({"image": IMAGE, "audio": AUDIO}, LABELS, (0,))
    with pytest.raises(ValueError, match="ks"):
        paired_class_recall({"image": IMAGE, "audio": AUDIO}, LABELS, ())
    with pytest.raises(ValueError, match="chunk"):
        paired_class_recall({"image": IMAGE, "audio": AUDIO}, LABELS, (1,), chunk=0)


def test_chance_paired_class_recall_by_hand():
    # n = 4 items, class 0 has 3 of them, class 1 one.
    # k=1: a query of class 0 hits with p = 3/4, of class 1 with 1/4: (3 * 3/4 + 1/4) / 4.
    # k=2: class 0 always hits; class 1 misses with C(3,2)/C(4,2) = 1/2: (3 + 1/2) / 4.
    out = chance_paired_class_recall(("image", "audio"), np.array([0, 0, 0, 1]), (1, 2))
    row = {"recall@1": 0.625, "recall@2": 0.875}
    assert out == {"image_to_audio": row, "audio_to_image": row}
    assert out["image_to_audio"] is not out["audio_to_image"]  # independent dicts
    with pytest.raises(ValueError, match="two names"):
        chance_paired_class_recall(("image",), LABELS, (1,))
    with pytest.raises(ValueError, match="at most the gallery size"):
        chance_paired_class_recall(("image", "audio"), LABELS, (5,))


def test_zero_shot_accuracy_by_hand():
    x = np.array([[1.0, 0.2], [-0.1, -1.0], [0.5, 0.4]], np.float32)
    labels = np.array([0, 1, 1])
    # one prompt per class: x0 -> 0 (right), x1 -> 1 (right), x2 -> 0 (wrong)
    assert zero_shot_accuracy(x, labels, np.array([[1, 0], [0, -1]], np.float32)) == 2 / 3
    # ensemble: class 0 = mean of [1, 0], [0, 1]; class 1 = its opposite; the same calls
    ensemble = np.array([[[1, 0], [0, 1]], [[-1, 0], [0, -1]]], np.float32)
    assert zero_shot_accuracy(x, labels, ensemble) == 2 / 3
    assert zero_shot_accuracy(x, np.array([0, 1, 0]), ensemble) == 1.0
    assert isinstance(zero_shot_accuracy(x, labels, ensemble), float)
    with pytest.raises(ValueError, match="labels"):
        zero_shot_accuracy(x, labels[:2], ensemble)


class _Toy(nnx.Module):
    """``embed((x, scale)) = dropout(x @ w) * scale``: dropout tells eval from train."""

    def __init__(self):
        self.w = nnx.Param(jnp.array([[1.0, 2.0], [3.0, 4.0]]))
        self.dropout = nnx.Dropout(0.9, rngs=nnx.Rngs(0))

    def embed(self, inputs):
        x, scale = inputs
        return self.dropout(x @ self.w[...]) * scale[:, None]


@pytest.mark.parametrize("batch_size", [1, 2, 5, 8])
def test_embed_in_batches_by_hand(batch_size):
    model = _Toy()
    x = np.array([[1, 0], [0, 1], [1, 1], [2, 0], [0, -1]], np.float32)
    scale = np.array([1, 1, 2, 1, 3], np.float32)
    out = embed_in_batches(model, "embed", (x, scale), batch_size)
    # rows of w: [1, 2] and [3, 4]; no dropout (eval mode), padding cut off
    expected = [[1, 2], [3, 4], [8, 12], [2, 4], [-9, -12]]
    assert isinstance(out, np.ndarray) and out.shape == (5, 2)
    np.testing.assert_array_equal(out, np.array(expected, np.float32))
    assert model.dropout.deterministic is False  # the caller's model stays in train mode


def test_embed_in_batches_rejects_bad_arguments():
    x = np.ones((3, 2), np.float32)
    with pytest.raises(ValueError, match="batch_size"):
        embed_in_batches(_Toy(), "embed", (x, np.ones(3, np.float32)), 0)
    with pytest.raises(ValueError, match="same positive length"):
        embed_in_batches(_Toy(), "embed", (x, np.ones(2, np.float32)), 2)
    with pytest.raises(ValueError, match="same positive length"):
        embed_in_batches(_Toy(), "embed", (x[:0], np.ones(0, np.float32)), 2)
