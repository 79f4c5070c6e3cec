"""Evaluation metrics as pure, jit-safe functions of arrays.

Every metric takes an optional bool ``valid`` ``[batch]`` mask: examples where it is
False (the padding of a fixed-size last batch) are ignored, so the metric of a padded
batch with its mask equals the metric of the unpadded batch. Each metric is already
wrapped in ``jax.jit`` (one compilation per input shape) with its keyword-only
hyperparameters (``num_classes``, ``average``, ``k``, ``exclude_zero``) static, and can
be called inside another jitted function.

Conventions:
  * Classification follows scikit-learn: confusion-matrix rows are true classes and
    columns predictions; precision/recall/F1 use ``zero_division=0`` and macro averages
    run over all ``num_classes`` classes (sklearn with ``labels=range(num_classes)``).
  * A mean over no valid examples (accuracy, MAE, ...) is NaN, like ``jnp.mean([])``;
    a Pearson correlation with zero variance is NaN, like ``scipy.stats.pearsonr``.
  * Results are float32 scalars (or ``[num_classes]`` arrays for ``average=None``).

References:
  MOSI/MOSEI metrics follow MMSA (``thuiar/MMSA``, ``utils/metricsTop.py``):
  Zadeh et al., "Multimodal Sentiment Intensity Analysis in Videos", 2016.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lepton_mm._validation import check_array, check_positive_int

__all__ = [
    "accuracy",
    "confusion_matrix",
    "mae",
    "mosi_acc2",
    "mosi_acc7",
    "mosi_f1",
    "multilabel_f1",
    "pearson",
    "precision_recall_f1",
    "recall_at_k",
]

Array = jax.Array

_AVERAGES = ("macro", "weighted", None)


def _valid(valid: Array | None, n: int, dims: dict[str, int]) -> Array:
    if valid is None:
        return jnp.ones((n,), bool)
    check_array("valid", valid, "batch", kind="bool", dims=dims)
    return jnp.asarray(valid)


def _masked_mean(values: Array, valid: Array) -> Array:
    """Mean of float ``[batch]`` values over valid rows; NaN if there are none."""
    values = jnp.where(valid, values, 0.0)
    return jnp.sum(values) / jnp.sum(valid, dtype=jnp.float32)


def _masked_fraction(hits: Array, valid: Array) -> Array:
    """Fraction of valid rows where bool ``hits`` is True (exact integer counts)."""
    count = jnp.sum(hits & valid, dtype=jnp.int32)
    return count.astype(jnp.float32) / jnp.sum(valid, dtype=jnp.int32).astype(jnp.float32)


def _safe_div(num: Array, den: Array) -> Array:
    """``num / den`` with 0 where ``den == 0`` (sklearn's ``zero_division=0``)."""
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1), 0.0)


@jax.jit
def accuracy(logits_or_preds: Array, labels: Array, *, valid: Array | None = None) -> Array:
    """Fraction of examples whose prediction equals the label.

    Args:
      logits_or_preds: float ``[batch, num_classes]`` logits (argmax is taken) or int
        ``[batch]`` predicted classes.
      labels: int ``[batch]`` true classes.
      valid: optional bool ``[batch]``; False rows are ignored.

    Returns:
      float32 scalar in ``[0, 1]``; NaN if no example is valid.

    Examples:
      >>> import jax.numpy as jnp
      >>> logits = jnp.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
      >>> float(accuracy(logits, jnp.array([0, 1, 1])))
      0.6666666865348816
      >>> float(accuracy(jnp.array([0, 1, 0]), jnp.array([0, 1, 1]),
      ...                valid=jnp.array([True, True, False])))
      1.0
    """
    dims: dict[str, int] = {}
    check_array("labels", labels, "batch", kind="int", dims=dims)
    if getattr(logits_or_preds, "ndim", None) == 2:
        check_array("logits_or_preds", logits_or_preds, "batch classes", kind="float",
                    dims=dims)
        preds = jnp.argmax(logits_or_preds, axis=-1)
    else:
        check_array("logits_or_preds", logits_or_preds, "batch", kind="int", dims=dims)
        preds = logits_or_preds
    valid = _valid(valid, dims["batch"], dims)
    return _masked_fraction(preds == labels, valid)


@functools.partial(jax.jit, static_argnames=("num_classes",))
def confusion_matrix(preds: Array, labels: Array, *, num_classes: int,
                     valid: Array | None = None) -> Array:
    """Counts of (true class, predicted class) pairs.

    Args:
      preds: int ``[batch]`` predicted classes.
      labels: int ``[batch]`` true classes.
      num_classes: number of classes ``C``; examples whose label or prediction is
        outside ``[0, C)`` are not counted (like sklearn's ``labels=range(C)``).
      valid: optional bool ``[batch]``; False rows are ignored.

    Returns:
      int32 ``[C, C]``: entry ``[i, j]`` counts examples of true class ``i`` predicted as
      ``j`` (rows = truth, columns = prediction, as in sklearn).

    Examples:
      >>> import jax.numpy as jnp
      >>> confusion_matrix(jnp.array([0, 1, 1, 2]), jnp.array([0, 1, 2, 2]),
      ...                  num_classes=3).tolist()
      [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    """
    num_classes = check_positive_int("num_classes", num_classes)
    dims: dict[str, int] = {}
    check_array("preds", preds, "batch", kind="int", dims=dims)
    check_array("labels", labels, "batch", kind="int", dims=dims)
    valid = _valid(valid, dims["batch"], dims)
    true_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.int32) * valid[:, None]
    pred_hot = jax.nn.one_hot(preds, num_classes, dtype=jnp.int32)
    return jnp.einsum("ni,nj->ij", true_hot, pred_hot, preferred_element_type=jnp.int32)


def _prf_from_counts(tp: Array, pred_count: Array, true_count: Array, average: str | None
                     ) -> tuple[Array, Array, Array]:
    tp, pred_count, true_count = (a.astype(jnp.float32) for a in (tp, pred_count,
                                                                   true_count))
    precision = _safe_div(tp, pred_count)
    recall = _safe_div(tp, true_count)
    f1 = _safe_div(2 * tp, pred_count + true_count)  # = 2pr / (p + r), 0 when undefined
    if average is None:
        return precision, recall, f1
    if average == "macro":
        weights = jnp.full(tp.shape, 1.0 / tp.shape[0])
    else:
        weights = _safe_div(true_count, jnp.sum(true_count))
    return tuple(jnp.sum(weights * m) for m in (precision, recall, f1))


def _check_average(average: str | None, allowed: tuple) -> None:
    if average not in allowed:
        raise ValueError(f"average: expected one of {allowed}, got {average!r}.")


@functools.partial(jax.jit, static_argnames=("num_classes", "average"))
def precision_recall_f1(preds: Array, labels: Array, *, num_classes: int,
                        average: str | None = "macro", valid: Array | None = None
                        ) -> tuple[Array, Array, Array]:
    """Precision, recall and F1 of multi-class predictions (sklearn conventions).

    A class with no predicted (no true) examples has precision (recall) 0, and F1 is 0
    when precision and recall are both 0 (sklearn's ``zero_division=0``).

    Args:
      preds: int ``[batch]`` predicted classes.
      labels: int ``[batch]`` true classes.
      num_classes: number of classes ``C``.
      average: ``"macro"`` (unweighted mean over all ``C`` classes, absent ones
        included), ``"weighted"`` (mean weighted by each class's true count) or
        ``None`` (per-class values).
      valid: optional bool ``[batch]``; False rows are ignored.

    Returns:
      ``(precision, recall, f1)``: float32 scalars, or ``[C]`` arrays if ``average`` is
      None.

    Examples:
      >>> import jax.numpy as jnp
      >>> p, r, f1 = precision_recall_f1(jnp.array([0, 1, 1, 1]), jnp.array([0, 1, 0, 1]),
      ...                                num_classes=2, average=None)
      >>> p.tolist(), r.tolist()
      ([1.0, 0.6666666865348816], [0.5, 1.0])
    """
    _check_average(average, _AVERAGES)
    cm = confusion_matrix(preds, labels, num_classes=num_classes, valid=valid)
    return _prf_from_counts(jnp.diagonal(cm), jnp.sum(cm, axis=0), jnp.sum(cm, axis=1),
                            average)


@functools.partial(jax.jit, static_argnames=("average",))
def multilabel_f1(logits: Array, labels: Array, *, threshold: float = 0.0,
                  average: str = "micro", valid: Array | None = None) -> Array:
    """F1 of multi-label predictions ``logits > threshold`` against 0/1 labels.

    Args:
      logits: float ``[batch, num_labels]`` scores (logits: the default threshold 0
        is probability 0.5).
      labels: bool or int (0/1) ``[batch, num_labels]``.
      threshold: a label is predicted where ``logits > threshold``.
      average: ``"micro"`` (F1 of the pooled counts over all labels) or ``"macro"``
        (mean of per-label F1, a label with no true and no predicted positive scoring
        0 as in sklearn's ``zero_division=0``).
      valid: optional bool ``[batch]``; False rows are ignored.

    Returns:
      float32 scalar.

    Examples:
      >>> import jax.numpy as jnp
      >>> logits = jnp.array([[1.0, -1.0], [1.0, 1.0]])
      >>> labels = jnp.array([[1, 0], [0, 1]])
      >>> float(multilabel_f1(logits, labels))  # tp=2, fp=1, fn=0
      0.800000011920929
    """
    _check_average(average, ("micro", "macro"))
    dims: dict[str, int] = {}
    check_array("logits", logits, "batch labels", kind="float", dims=dims)
    check_array("labels", labels, "batch labels", dims=dims)
    if not (jnp.issubdtype(labels.dtype, jnp.integer) or labels.dtype == jnp.bool_):
        raise TypeError(f"labels: expected bool or int 0/1 labels, got dtype {labels.dtype}.")
    valid = _valid(valid, dims["batch"], dims)[:, None]
    pred = (logits > threshold) & valid
    true = (labels != 0) & valid
    tp = jnp.sum(pred & true, axis=0)
    pred_count, true_count = jnp.sum(pred, axis=0), jnp.sum(true, axis=0)
    if average == "micro":
        tp, pred_count, true_count = jnp.sum(tp), jnp.sum(pred_count), jnp.sum(true_count)
        return _prf_from_counts(tp, pred_count, true_count, None)[2]
    return _prf_from_counts(tp, pred_count, true_count, "macro")[2]


def _check_regression(pred: Array, target: Array, valid: Array | None) -> Array:
    dims: dict[str, int] = {}
    check_array("pred", pred, "batch", kind="float", dims=dims)
    check_array("target", target, "batch", kind="number", dims=dims)
    return _valid(valid, dims["batch"], dims)


@jax.jit
def mae(pred: Array, target: Array, *, valid: Array | None = None) -> Array:
    """Mean absolute error.

    Args:
      pred: float ``[batch]`` predictions (squeeze a ``[batch, 1]`` head output first).
      target: float ``[batch]`` targets.
      valid: optional bool ``[batch]``; False rows are ignored.

    Returns:
      float32 scalar; NaN if no example is valid.

    Examples:
      >>> import jax.numpy as jnp
      >>> float(mae(jnp.array([1.0, 2.0, 9.0]), jnp.array([2.0, 2.0, 0.0]),
      ...           valid=jnp.array([True, True, False])))
      0.5
    """
    valid = _check_regression(pred, target, valid)
    error = jnp.abs(pred.astype(jnp.float32) - target.astype(jnp.float32))
    return _masked_mean(error, valid)


@jax.jit
def pearson(pred: Array, target: Array, *, valid: Array | None = None) -> Array:
    """Pearson correlation coefficient between predictions and targets.

    Args:
      pred: float ``[batch]``.
      target: float ``[batch]``.
      valid: optional bool ``[batch]``; False rows are ignored.

    Returns:
      float32 scalar in ``[-1, 1]``; NaN if either input has zero variance over the
      valid rows (including fewer than two valid rows), as ``scipy.stats.pearsonr``.

    Examples:
      >>> import jax.numpy as jnp
      >>> round(float(pearson(jnp.array([1.0, 2.0, 3.0]), jnp.array([2.0, 4.0, 7.0]))), 4)
      0.9934
    """
    valid = _check_regression(pred, target, valid)
    x = pred.astype(jnp.float32)
    y = target.astype(jnp.float32)
    n = jnp.sum(valid, dtype=jnp.float32)
    x = jnp.where(valid, x - jnp.sum(jnp.where(valid, x, 0)) / n, 0.0)
    y = jnp.where(valid, y - jnp.sum(jnp.where(valid, y, 0)) / n, 0.0)
    # Normalise before the products so large values cannot overflow float32.
    x = x / jnp.max(jnp.abs(x))
    y = y / jnp.max(jnp.abs(y))
    r = jnp.sum(x * y) / jnp.sqrt(jnp.sum(x * x) * jnp.sum(y * y))
    return jnp.clip(r, -1.0, 1.0)


def _mosi_binary(pred: Array, target: Array, exclude_zero: bool, valid: Array | None
                 ) -> tuple[Array, Array, Array]:
    valid = _check_regression(pred, target, valid)
    if exclude_zero:
        valid = valid & (target != 0)
        return (pred > 0).astype(jnp.int32), (target > 0).astype(jnp.int32), valid
    return (pred >= 0).astype(jnp.int32), (target >= 0).astype(jnp.int32), valid


@functools.partial(jax.jit, static_argnames=("exclude_zero",))
def mosi_acc2(pred: Array, target: Array, *, exclude_zero: bool = True,
              valid: Array | None = None) -> Array:
    """Binary sentiment accuracy on CMU-MOSI/MOSEI regression outputs (MMSA convention).

    * ``exclude_zero=True`` (MMSA's ``Non0_acc_2``, the number most papers report as
      Acc-2): examples whose *target* is exactly 0 are dropped; the classes are
      positive (``> 0``) vs negative (``< 0``); a prediction of exactly 0 counts as
      negative.
    * ``exclude_zero=False`` (MMSA's ``Has0_acc_2``): all examples; the classes are
      non-negative (``>= 0``) vs negative.

    Args:
      pred: float ``[batch]`` predicted sentiment (in ``[-3, 3]`` for MOSI).
      target: float ``[batch]`` annotated sentiment.
      exclude_zero: which convention, as above.
      valid: optional bool ``[batch]``; False rows are ignored.

    Returns:
      float32 scalar; NaN if no example is counted.

    Examples:
      >>> import jax.numpy as jnp
      >>> pred, target = jnp.array([0.5, -1.0, 0.2, -0.1]), jnp.array([1.0, -2.0, 0.0, 0.0])
      >>> float(mosi_acc2(pred, target)), float(mosi_acc2(pred, target, exclude_zero=False))
      (1.0, 0.75)
    """
    p, t, valid = _mosi_binary(pred, target, exclude_zero, valid)
    return _masked_fraction(p == t, valid)


@functools.partial(jax.jit, static_argnames=("exclude_zero",))
def mosi_f1(pred: Array, target: Array, *, exclude_zero: bool = True,
            valid: Array | None = None) -> Array:
    """Support-weighted binary F1 with the classes of ``mosi_acc2`` (MMSA's F1_score).

    Args:
      pred: float ``[batch]`` predicted sentiment.
      target: float ``[batch]`` annotated sentiment.
      exclude_zero: as in ``mosi_acc2``.
      valid: optional bool ``[batch]``; False rows are ignored.

    Returns:
      float32 scalar (sklearn's ``f1_score(average="weighted")``).

    Examples:
      >>> import jax.numpy as jnp
      >>> float(mosi_f1(jnp.array([0.5, -1.0]), jnp.array([1.0, -2.0])))
      1.0
    """
    p, t, valid = _mosi_binary(pred, target, exclude_zero, valid)
    return precision_recall_f1(p, t, num_classes=2, average="weighted", valid=valid)[2]


@jax.jit
def mosi_acc7(pred: Array, target: Array, *, valid: Array | None = None) -> Array:
    """Seven-class sentiment accuracy: classes ``round(clip(x, -3, 3))`` in -3..3.

    Rounding is half-to-even (``numpy.round``, as MMSA), so 0.5 and -0.5 fall in class 0
    and 2.5 in class 2.

    Args:
      pred: float ``[batch]`` predicted sentiment.
      target: float ``[batch]`` annotated sentiment.
      valid: optional bool ``[batch]``; False rows are ignored.

    Returns:
      float32 scalar; NaN if no example is valid.

    Examples:
      >>> import jax.numpy as jnp
      >>> float(mosi_acc7(jnp.array([2.6, -0.4, 7.0]), jnp.array([3.0, 0.0, 2.0])))
      0.6666666865348816
    """
    valid = _check_regression(pred, target, valid)

    def classes(x):
        return jnp.round(jnp.clip(x.astype(jnp.float32), -3.0, 3.0))

    return _masked_fraction(classes(pred) == classes(target), valid)


@functools.partial(jax.jit, static_argnames=("k",))
def recall_at_k(similarity: Array, *, k: int, valid: Array | None = None) -> Array:
    """Retrieval recall@k for paired data: row ``i``'s correct item is column ``i``.

    Row ``i`` is a hit if fewer than ``k`` *other* valid columns score at least as high as
    ``similarity[i, i]``. Ties are thus resolved against the correct item (a pessimistic,
    order-independent rule): with all scores equal only ``k >= n`` is a hit.
    Invalid examples are dropped both as queries (rows) and as candidates (columns).

    Args:
      similarity: float ``[batch, batch]`` scores of query ``i`` against item ``j``
        (e.g. ``text_emb @ image_emb.T``); transpose it for the other direction.
      k: positive int.
      valid: optional bool ``[batch]``; False rows and columns are ignored.

    Returns:
      float32 scalar: the fraction of valid rows that are hits; NaN if none is valid.

    Examples:
      >>> import jax.numpy as jnp
      >>> sim = jnp.array([[0.9, 0.1, 0.0], [0.8, 0.5, 0.0], [0.2, 0.3, 0.1]])
      >>> float(recall_at_k(sim, k=1)), float(recall_at_k(sim, k=2))
      (0.3333333432674408, 0.6666666865348816)
    """
    k = check_positive_int("k", k)
    dims: dict[str, int] = {}
    check_array("similarity", similarity, "batch batch", kind="float", dims=dims)
    valid = _valid(valid, dims["batch"], dims)
    n = dims["batch"]
    diagonal = jnp.diagonal(similarity)[:, None]
    others = valid[None, :] & ~jnp.eye(n, dtype=bool)
    ahead = jnp.sum((similarity >= diagonal) & others, axis=1)
    return _masked_fraction(ahead < k, valid)
