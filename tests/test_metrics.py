"""Tests for lepton_mm.metrics against scikit-learn, scipy and hand values."""

import doctest
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import sklearn.metrics as skm
from hypothesis import given, settings
from hypothesis import strategies as st

from lepton_mm import metrics
from lepton_mm.metrics import (
    accuracy,
    confusion_matrix,
    mae,
    mosi_acc2,
    mosi_acc7,
    mosi_f1,
    multilabel_f1,
    pearson,
    precision_recall_f1,
    recall_at_k,
)

_SETTINGS = settings(max_examples=15, deadline=None)
# Metrics compile once per input shape, so examples vary the values over a few shapes.
_SIZES = st.sampled_from([1, 6, 25])
_PAD = 3


@st.composite
def _classification(draw):
    num_classes = draw(st.sampled_from([2, 5]))
    n = draw(_SIZES)
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n).astype(np.int32)
    preds = np.where(rng.random(n) < 0.5, labels,
                     rng.integers(0, num_classes, n)).astype(np.int32)
    return num_classes, preds, labels, rng


def _pad(x, pad, fill):
    """Appends ``pad`` junk rows to ``x`` along axis 0."""
    junk = np.full((pad, *x.shape[1:]), fill, dtype=x.dtype)
    return np.concatenate([x, junk])


def _mask(n, pad):
    return jnp.asarray(np.arange(n + pad) < n)


# --- classification --------------------------------------------------------------------

@_SETTINGS
@given(_classification())
def test_classification_metrics_match_sklearn(case):
    num_classes, preds, labels, rng = case
    labels_all = list(range(num_classes))
    np.testing.assert_allclose(accuracy(preds, labels), skm.accuracy_score(labels, preds),
                               rtol=1e-6)
    logits = rng.normal(size=(len(labels), num_classes)).astype(np.float32)
    np.testing.assert_allclose(accuracy(logits, labels),
                               skm.accuracy_score(labels, logits.argmax(-1)), rtol=1e-6)
    np.testing.assert_array_equal(
        confusion_matrix(preds, labels, num_classes=num_classes),
        skm.confusion_matrix(labels, preds, labels=labels_all))
    for average in ("macro", "weighted", None):
        got = precision_recall_f1(preds, labels, num_classes=num_classes, average=average)
        want = skm.precision_recall_fscore_support(labels, preds, labels=labels_all,
                                                   average=average, zero_division=0)[:3]
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


@_SETTINGS
@given(_classification())
def test_classification_valid_mask_equals_unpadded(case):
    num_classes, preds, labels, _ = case
    pad = _PAD
    n = len(labels)
    valid = _mask(n, pad)
    # Junk rows: an out-of-range class would be ignored anyway, so use real ones.
    p_pad, l_pad = _pad(preds, pad, 0), _pad(labels, pad, num_classes - 1)
    np.testing.assert_allclose(accuracy(p_pad, l_pad, valid=valid), accuracy(preds, labels))
    np.testing.assert_array_equal(
        confusion_matrix(p_pad, l_pad, num_classes=num_classes, valid=valid),
        confusion_matrix(preds, labels, num_classes=num_classes))
    got = precision_recall_f1(p_pad, l_pad, num_classes=num_classes, valid=valid,
                              average="weighted")
    want = precision_recall_f1(preds, labels, num_classes=num_classes, average="weighted")
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_precision_recall_f1_hand_case_with_absent_class():
    # Class 2 never appears: it counts as 0 in the macro mean (sklearn labels=range(3)).
    preds, labels = jnp.array([0, 0, 1, 1]), jnp.array([0, 1, 1, 1])
    p, r, f1 = precision_recall_f1(preds, labels, num_classes=3, average=None)
    np.testing.assert_allclose(p, [0.5, 1.0, 0.0])
    np.testing.assert_allclose(r, [1.0, 2 / 3, 0.0], rtol=1e-6)
    np.testing.assert_allclose(f1, [2 / 3, 0.8, 0.0], rtol=1e-6)
    macro = precision_recall_f1(preds, labels, num_classes=3)
    np.testing.assert_allclose(macro, [0.5, 5 / 9, (2 / 3 + 0.8) / 3], rtol=1e-6)


def test_metrics_jit_with_static_hyperparameters():
    preds, labels = jnp.array([0, 2, 1]), jnp.array([0, 1, 1])
    valid = jnp.array([True, True, False])
    jitted = jax.jit(functools.partial(precision_recall_f1, num_classes=3))  # nested jit
    np.testing.assert_allclose(jitted(preds, labels, valid=valid),
                               precision_recall_f1(preds, labels, num_classes=3,
                                                   valid=valid))
    assert float(jax.jit(accuracy)(preds, labels, valid=valid)) == 0.5
    recall = jax.jit(recall_at_k, static_argnames="k")
    assert float(recall(jnp.eye(3), k=1)) == 1.0


@_SETTINGS
@given(_SIZES, st.sampled_from([2, 5]), st.integers(0, 2**31 - 1),
       st.sampled_from(["micro", "macro"]))
def test_multilabel_f1_matches_sklearn(n, num_labels, seed, average):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, (n, num_labels)).astype(np.int32)
    logits = rng.normal(size=(n, num_labels)).astype(np.float32)
    want = skm.f1_score(labels, (logits > 0.3).astype(int), average=average,
                        zero_division=0)
    got = multilabel_f1(logits, labels, threshold=0.3, average=average)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    valid = _mask(n, _PAD)
    padded = multilabel_f1(_pad(logits, _PAD, 5.0), _pad(labels, _PAD, 0), threshold=0.3,
                           average=average, valid=valid)
    np.testing.assert_allclose(padded, got, rtol=1e-6)


# --- regression ------------------------------------------------------------------------

@_SETTINGS
@given(st.sampled_from([3, 6, 25]), st.integers(0, 2**31 - 1))
def test_regression_metrics_match_sklearn_and_scipy(n, seed):
    pad = _PAD
    rng = np.random.default_rng(seed)
    target = rng.normal(size=n).astype(np.float32) * 2
    pred = (target + rng.normal(size=n)).astype(np.float32)
    np.testing.assert_allclose(mae(pred, target), skm.mean_absolute_error(target, pred),
                               rtol=1e-5)
    np.testing.assert_allclose(pearson(pred, target),
                               scipy.stats.pearsonr(pred, target).statistic,
                               rtol=1e-4, atol=1e-5)
    valid = _mask(n, pad)
    p_pad, t_pad = _pad(pred, pad, np.nan), _pad(target, pad, 100.0)
    for metric in (mae, pearson, mosi_acc2, mosi_acc7, mosi_f1):
        np.testing.assert_allclose(metric(p_pad, t_pad, valid=valid),
                                   metric(pred, target), rtol=1e-6, err_msg=metric.__name__)


def test_pearson_degenerate_cases_are_nan():
    assert np.isnan(pearson(jnp.ones(4), jnp.arange(4.0)))
    assert np.isnan(pearson(jnp.ones(1), jnp.ones(1)))
    assert np.isnan(mae(jnp.ones(2), jnp.ones(2), valid=jnp.zeros(2, bool)))
    # Large values do not overflow float32.
    x = jnp.array([1e30, 2e30, 3e30])
    np.testing.assert_allclose(pearson(x, -x), -1.0, rtol=1e-6)


def test_mosi_metrics_follow_mmsa():
    pred = np.array([0.5, -1.0, 0.0, -0.1, 2.4, -3.6, 0.0], np.float32)
    target = np.array([1.0, 0.5, 0.0, 0.0, 3.0, -2.5, -0.2], np.float32)
    # MMSA Non0_acc_2: drop target == 0, compare > 0.
    keep = target != 0
    want2 = skm.accuracy_score(target[keep] > 0, pred[keep] > 0)
    np.testing.assert_allclose(mosi_acc2(pred, target), want2, rtol=1e-6)
    np.testing.assert_allclose(mosi_f1(pred, target),
                               skm.f1_score(target[keep] > 0, pred[keep] > 0,
                                            average="weighted"), rtol=1e-6)
    # MMSA Has0_acc_2: all rows, compare >= 0.
    np.testing.assert_allclose(mosi_acc2(pred, target, exclude_zero=False),
                               skm.accuracy_score(target >= 0, pred >= 0), rtol=1e-6)
    # Acc-7: round(clip(x, -3, 3)), half to even (-2.5 -> -2; -3.6 -> -3).
    want7 = skm.accuracy_score(np.round(np.clip(target, -3, 3)),
                               np.round(np.clip(pred, -3, 3)))
    np.testing.assert_allclose(mosi_acc7(pred, target), want7, rtol=1e-6)
    assert float(mosi_acc7(jnp.array([0.5, 2.5]), jnp.array([0.0, 2.0]))) == 1.0


# --- retrieval -------------------------------------------------------------------------

def _recall_reference(sim, k):
    n = sim.shape[0]
    hits = [np.sum(np.delete(sim[i], i) >= sim[i, i]) < k for i in range(n)]
    return np.mean(hits)


@_SETTINGS
@given(_SIZES, st.sampled_from([1, 5]), st.integers(0, 2**31 - 1))
def test_recall_at_k_reference_and_mask(n, k, seed):
    pad = _PAD
    rng = np.random.default_rng(seed)
    sim = rng.integers(0, 4, (n, n)).astype(np.float32)  # many ties
    np.testing.assert_allclose(recall_at_k(sim, k=k), _recall_reference(sim, k),
                               rtol=1e-6)
    padded = np.full((n + pad, n + pad), 10.0, np.float32)  # junk that would win
    padded[:n, :n] = sim
    np.testing.assert_allclose(recall_at_k(padded, k=k, valid=_mask(n, pad)),
                               recall_at_k(sim, k=k), rtol=1e-6)


def test_recall_at_k_ties_count_against_the_correct_item():
    assert float(recall_at_k(jnp.zeros((3, 3)), k=2)) == 0.0
    assert float(recall_at_k(jnp.zeros((3, 3)), k=3)) == 1.0


# --- input checks ----------------------------------------------------------------------

@pytest.mark.parametrize(("call", "error", "name"), [
    (lambda: accuracy(jnp.zeros(3), jnp.zeros(3, int)), TypeError, "logits_or_preds"),
    (lambda: accuracy(jnp.zeros((3, 2)), jnp.zeros(4, int)), ValueError, "logits_or_preds"),
    (lambda: accuracy(jnp.zeros(3, int), jnp.zeros(3, int), valid=jnp.ones(3)),
     TypeError, "valid"),
    (lambda: accuracy(jnp.zeros(3, int), jnp.zeros(3, int), valid=jnp.ones(2, bool)),
     ValueError, "valid"),
    (lambda: confusion_matrix(jnp.zeros(3, int), jnp.zeros(3, int), num_classes=0),
     ValueError, "num_classes"),
    (lambda: precision_recall_f1(jnp.zeros(3, int), jnp.zeros(3, int), num_classes=2,
                                 average="micro"), ValueError, "average"),
    (lambda: mae(jnp.zeros((3, 1)), jnp.zeros((3, 1))), ValueError, "pred"),
    (lambda: pearson(jnp.zeros(3), jnp.zeros(4)), ValueError, "target"),
    (lambda: recall_at_k(jnp.zeros((3, 4)), k=1), ValueError, "similarity"),
    (lambda: recall_at_k(jnp.zeros((3, 3)), k=0), ValueError, "k"),
    (lambda: multilabel_f1(jnp.zeros((2, 2)), jnp.zeros((2, 2))), TypeError, "labels"),
])
def test_bad_inputs_raise_naming_argument(call, error, name):
    with pytest.raises(error, match=rf"^{name}\b"):
        call()


def test_docstring_examples():
    results = doctest.testmod(metrics, optionflags=doctest.ELLIPSIS)
    assert results.attempted > 0 and results.failed == 0
