"""Training objectives: what a model's outputs mean, their loss and their metrics.

A task is a small frozen dataclass (hashable, so a static ``jit`` argument) with

* ``loss(outputs, batch, valid) -> float32 scalar``: the mean per-example loss over the
  rows where ``valid`` (bool ``[batch]``) is True; padding rows never contribute, even
  if they hold NaN;
* ``metrics(outputs, batch, valid) -> {name: float32 scalar}`` over the valid rows
  (computed by the training loop once over a whole evaluation set, so metrics that do
  not decompose over batches, like F1 or Pearson's r, are exact);
* ``check_batch(batch)``: raises a clear error if the target is missing or malformed;
* ``metric_names``, ``default_monitor``, ``default_mode``.

The target is ``batch["label"]`` (see ``lepton_mm.models`` for the batch format).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lepton_mm import alignment
from lepton_mm import metrics as metrics_lib
from lepton_mm._validation import check_array, check_positive_int
from lepton_mm.models.two_tower import TwoTowerOutput

Array = jax.Array


def masked_mean(per_example: Array, valid: Array) -> Array:
    """float32 mean of ``per_example`` (``[batch]``) over rows where ``valid``; 0 if none."""
    per_example = per_example.astype(jnp.float32)
    total = jnp.sum(jnp.where(valid, per_example, 0.0))
    return total / jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)


def _select(values: Array, valid: Array) -> Array:
    """``values`` with invalid rows replaced by zeros (so their gradient is zero, not NaN)."""
    valid = valid.reshape(valid.shape + (1,) * (values.ndim - 1))
    return jnp.where(valid, values, jnp.zeros((), values.dtype))


def _label(batch: Mapping[str, Any], task: str) -> Any:
    if not isinstance(batch, Mapping) or "label" not in batch:
        keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise ValueError(f"batch: the {task} task needs batch['label'], got keys {keys}.")
    return batch["label"]


def _squeeze_scores(name: str, outputs: Array) -> Array:
    """``[batch]`` or ``[batch, 1]`` → float32 ``[batch]``."""
    if outputs.ndim == 2 and outputs.shape[1] == 1:
        outputs = outputs[:, 0]
    check_array(name, outputs, "batch", kind="float")
    return outputs.astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class Classification:
    """Multi-class classification: softmax cross-entropy on integer labels.

    ``outputs``: float ``[batch, num_classes]`` logits; ``batch["label"]``: int
    ``[batch]`` in ``[0, num_classes)``. Metrics: ``accuracy`` and macro-averaged
    ``f1``.

    Attributes:
      num_classes: number of classes.
      label_smoothing: mass moved uniformly to all classes, in ``[0, 1)``.
    """

    num_classes: int
    label_smoothing: float = 0.0

    metric_names: ClassVar[tuple[str, ...]] = ("loss", "accuracy", "f1")
    default_monitor: ClassVar[str] = "accuracy"
    default_mode: ClassVar[str] = "max"

    def __post_init__(self):
        check_positive_int("num_classes", self.num_classes)
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing: expected a number in [0, 1), got "
                             f"{self.label_smoothing!r}.")

    def check_batch(self, batch: Mapping[str, Any]) -> None:
        """Checks ``batch['label']``: int ``[batch]``; host (numpy) labels must also lie in
        ``[0, num_classes)`` (device arrays are not read back)."""
        labels = _label(batch, "classification")
        check_array("batch['label']", labels, "batch", kind="int")
        if isinstance(labels, np.ndarray) and labels.size and (
                labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(
                f"batch['label']: expected class ids in [0, {self.num_classes}), got values "
                f"in [{labels.min()}, {labels.max()}].")

    def _check(self, outputs: Array, labels: Array) -> None:
        dims = {"classes": self.num_classes}
        check_array("outputs", outputs, "batch classes", kind="float", dims=dims)
        check_array("batch['label']", labels, "batch", kind="int", dims=dims)

    def loss(self, outputs: Array, batch: Mapping[str, Any], valid: Array) -> Array:
        labels = _label(batch, "classification")
        self._check(outputs, labels)
        logits = _select(outputs.astype(jnp.float32), valid)
        if self.label_smoothing:
            targets = optax.smooth_labels(
                jax.nn.one_hot(labels, self.num_classes), self.label_smoothing)
            per_example = optax.softmax_cross_entropy(logits, targets)
        else:
            per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return masked_mean(per_example, valid)

    def metrics(self, outputs: Array, batch: Mapping[str, Any],
                valid: Array) -> dict[str, Array]:
        labels = _label(batch, "classification")
        self._check(outputs, labels)
        predictions = jnp.argmax(outputs, axis=-1)
        _, _, f1 = metrics_lib.precision_recall_f1(
            predictions, labels, num_classes=self.num_classes, average="macro", valid=valid)
        return {"accuracy": metrics_lib.accuracy(outputs, labels, valid=valid), "f1": f1}


@dataclasses.dataclass(frozen=True)
class Binary:
    """Binary classification: sigmoid cross-entropy on one logit per example.

    ``outputs``: float ``[batch]`` or ``[batch, 1]`` logits; ``batch["label"]``: bool,
    int or float ``[batch]`` in {0, 1}. Metrics: ``accuracy``, ``precision``,
    ``recall``, ``f1`` of the positive class (threshold: logit 0).
    """

    metric_names: ClassVar[tuple[str, ...]] = ("loss", "accuracy", "precision", "recall",
                                               "f1")
    default_monitor: ClassVar[str] = "accuracy"
    default_mode: ClassVar[str] = "max"

    def check_batch(self, batch: Mapping[str, Any]) -> None:
        check_array("batch['label']", _label(batch, "binary"), "batch")

    def loss(self, outputs: Array, batch: Mapping[str, Any], valid: Array) -> Array:
        logits = _select(_squeeze_scores("outputs", outputs), valid)
        labels = _label(batch, "binary")
        check_array("batch['label']", labels, str(logits.shape[0]))
        per_example = optax.sigmoid_binary_cross_entropy(
            logits, _select(labels.astype(jnp.float32), valid))
        return masked_mean(per_example, valid)

    def metrics(self, outputs: Array, batch: Mapping[str, Any],
                valid: Array) -> dict[str, Array]:
        logits = _squeeze_scores("outputs", outputs)
        labels = _label(batch, "binary").astype(jnp.int32)
        predictions = (logits > 0).astype(jnp.int32)
        precision, recall, f1 = metrics_lib.precision_recall_f1(
            predictions, labels, num_classes=2, average=None, valid=valid)
        return {"accuracy": metrics_lib.accuracy(predictions, labels, valid=valid),
                "precision": precision[1], "recall": recall[1], "f1": f1[1]}


@dataclasses.dataclass(frozen=True)
class MultiLabel:
    """Multi-label classification: independent sigmoid cross-entropy per label.

    ``outputs``: float ``[batch, num_labels]`` logits; ``batch["label"]``: bool/int/float
    ``[batch, num_labels]`` in {0, 1}. The loss averages over labels, then examples.
    Metrics: ``accuracy`` (per label, i.e. 1 - Hamming loss), ``subset_accuracy`` (all
    labels right) and micro-averaged ``f1``.

    Attributes:
      num_labels: number of labels.
    """

    num_labels: int

    metric_names: ClassVar[tuple[str, ...]] = ("loss", "accuracy", "subset_accuracy", "f1")
    default_monitor: ClassVar[str] = "f1"
    default_mode: ClassVar[str] = "max"

    def __post_init__(self):
        check_positive_int("num_labels", self.num_labels)

    def check_batch(self, batch: Mapping[str, Any]) -> None:
        check_array("batch['label']", _label(batch, "multi-label"), f"batch {self.num_labels}")

    def _check(self, outputs: Array, labels: Array) -> None:
        dims = {"labels": self.num_labels}
        check_array("outputs", outputs, "batch labels", kind="float", dims=dims)
        check_array("batch['label']", labels, "batch labels", dims=dims)

    def loss(self, outputs: Array, batch: Mapping[str, Any], valid: Array) -> Array:
        labels = _label(batch, "multi-label")
        self._check(outputs, labels)
        per_label = optax.sigmoid_binary_cross_entropy(
            _select(outputs.astype(jnp.float32), valid),
            _select(labels.astype(jnp.float32), valid))
        return masked_mean(jnp.mean(per_label, axis=1), valid)

    def metrics(self, outputs: Array, batch: Mapping[str, Any],
                valid: Array) -> dict[str, Array]:
        labels = _label(batch, "multi-label")
        self._check(outputs, labels)
        int_labels = labels.astype(jnp.int32)
        correct = (outputs > 0).astype(jnp.int32) == int_labels
        return {
            "accuracy": masked_mean(jnp.mean(correct.astype(jnp.float32), axis=1), valid),
            "subset_accuracy": masked_mean(jnp.all(correct, axis=1), valid),
            "f1": metrics_lib.multilabel_f1(outputs.astype(jnp.float32), int_labels,
                                            average="micro", valid=valid),
        }


@dataclasses.dataclass(frozen=True)
class Regression:
    """Scalar regression (e.g. MOSI/MOSEI sentiment in [-3, 3]) with an L1 or MSE loss.

    ``outputs``: float ``[batch]`` or ``[batch, 1]``; ``batch["label"]``: float
    ``[batch]``. Metrics: ``mae``, ``mse``, ``pearson`` and, with ``mosi=True``, the
    MOSI/MMSA metrics ``acc2`` (sign agreement, zero targets excluded), ``f1_mosi``
    (its weighted F1) and ``acc7`` (agreement of ``round(clip(x, -3, 3))``).

    Attributes:
      loss_type: ``"l1"`` (MulT/MISA convention) or ``"mse"``.
      mosi: also report ``acc2``, ``f1_mosi`` and ``acc7``.
    """

    loss_type: str = "l1"
    mosi: bool = False

    default_monitor: ClassVar[str] = "mae"
    default_mode: ClassVar[str] = "min"

    def __post_init__(self):
        if self.loss_type not in ("l1", "mse"):
            raise ValueError(f"loss_type: expected 'l1' or 'mse', got {self.loss_type!r}.")

    @property
    def metric_names(self) -> tuple[str, ...]:  # type: ignore[override]
        base = ("loss", "mae", "mse", "pearson")
        return (*base, "acc2", "f1_mosi", "acc7") if self.mosi else base

    def check_batch(self, batch: Mapping[str, Any]) -> None:
        labels = _label(batch, "regression")
        if labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        check_array("batch['label']", labels, "batch", kind="float")

    def _scores(self, outputs: Array, batch: Mapping[str, Any]) -> tuple[Array, Array]:
        predictions = _squeeze_scores("outputs", outputs)
        labels = _squeeze_scores("batch['label']", _label(batch, "regression"))
        check_array("batch['label']", labels, str(predictions.shape[0]))
        return predictions, labels

    def loss(self, outputs: Array, batch: Mapping[str, Any], valid: Array) -> Array:
        predictions, labels = self._scores(outputs, batch)
        error = _select(predictions - labels, valid)
        per_example = jnp.abs(error) if self.loss_type == "l1" else error * error
        return masked_mean(per_example, valid)

    def metrics(self, outputs: Array, batch: Mapping[str, Any],
                valid: Array) -> dict[str, Array]:
        predictions, labels = self._scores(outputs, batch)
        error = predictions - labels
        out = {
            "mae": metrics_lib.mae(predictions, labels, valid=valid),
            "mse": masked_mean(error * error, valid),
            "pearson": metrics_lib.pearson(predictions, labels, valid=valid),
        }
        if self.mosi:
            out["acc2"] = metrics_lib.mosi_acc2(predictions, labels, valid=valid)
            out["f1_mosi"] = metrics_lib.mosi_f1(predictions, labels, valid=valid)
            out["acc7"] = metrics_lib.mosi_acc7(predictions, labels, valid=valid)
        return out


@dataclasses.dataclass(frozen=True)
class Contrastive:
    """Contrastive alignment of ``TwoTower`` embeddings; row ``i`` of a and b match.

    ``"sigmoid"``: ``lepton_mm.alignment.sigmoid_loss`` (SigLIP, with the model's scale
    and bias); ``"softmax"``: ``lepton_mm.alignment.clip_loss`` (CLIP; the bias is not
    used). Only pairs of valid rows enter; no label is needed. Metrics: ``recall@k``
    in both directions for each ``k`` in ``ks``, and their mean ``recall``.

    Attributes:
      kind: ``"sigmoid"`` or ``"softmax"``.
      ks: the ``k`` of the recall@k metrics.
    """

    kind: str = "sigmoid"
    ks: tuple[int, ...] = (1, 5)

    default_monitor: ClassVar[str] = "recall"
    default_mode: ClassVar[str] = "max"

    def __post_init__(self):
        if self.kind not in ("sigmoid", "softmax"):
            raise ValueError(f"kind: expected 'sigmoid' or 'softmax', got {self.kind!r}.")
        object.__setattr__(self, "ks", tuple(check_positive_int("ks", k) for k in self.ks))

    @property
    def metric_names(self) -> tuple[str, ...]:  # type: ignore[override]
        names = ["loss", "recall"]
        for k in self.ks:
            names += [f"a_to_b_recall@{k}", f"b_to_a_recall@{k}"]
        return tuple(names)

    def check_batch(self, batch: Mapping[str, Any]) -> None:
        del batch

    @staticmethod
    def _check(outputs: Any) -> TwoTowerOutput:
        if not isinstance(outputs, TwoTowerOutput):
            raise TypeError(f"outputs: the contrastive task needs a TwoTowerOutput, got "
                            f"{type(outputs).__name__}.")
        dims: dict[str, int] = {}
        check_array("outputs.a", outputs.a, "batch dim", kind="float", dims=dims)
        check_array("outputs.b", outputs.b, "batch dim", kind="float", dims=dims)
        return outputs

    def loss(self, outputs: TwoTowerOutput, batch: Mapping[str, Any],
             valid: Array) -> Array:
        del batch
        out = self._check(outputs)
        if self.kind == "sigmoid":
            return alignment.sigmoid_loss(out.a, out.b, logit_scale=out.scale,
                                          logit_bias=out.bias, mask=valid)
        return alignment.clip_loss(out.a, out.b, logit_scale=out.scale, mask=valid)

    def metrics(self, outputs: TwoTowerOutput, batch: Mapping[str, Any],
                valid: Array) -> dict[str, Array]:
        del batch
        out = self._check(outputs)
        sim = out.a @ out.b.T
        result = {}
        for k in self.ks:
            result[f"a_to_b_recall@{k}"] = metrics_lib.recall_at_k(sim, k=k, valid=valid)
            result[f"b_to_a_recall@{k}"] = metrics_lib.recall_at_k(sim.T, k=k, valid=valid)
        result["recall"] = jnp.mean(jnp.stack(list(result.values())))
        return result


#: Task name → task class, for configs that name their task.
TASKS = {"classification": Classification, "binary": Binary, "multilabel": MultiLabel,
         "regression": Regression, "contrastive": Contrastive}
