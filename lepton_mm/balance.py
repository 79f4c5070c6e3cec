"""Balanced multimodal learning: keeping a fused model from leaning on one modality.

Trained jointly, a fused classifier often learns the easier modality and under-trains
the other (on AV-MNIST ``concat`` leans on the image). The methods here act on the
train step and go to ``fit(..., strategy=...)``:

* ``OGMGE``: On-the-fly Gradient Modulation with Generalisation Enhancement (Peng et
  al., "Balanced Multimodal Learning via On-the-fly Gradient Modulation", CVPR 2022):
  each step measures how much better each modality alone explains the labels and damps
  the gradient of the dominant modality's encoder, adding Gaussian noise to keep SGD's
  generalisation.

* ``GradientBlending``: Gradient Blending (Wang, Tran & Feiszli, "What Makes
  Training Multi-Modal Classification Networks Hard?", CVPR 2020): the loss becomes a
  weighted sum of the fused loss and each modality's own loss, the weights chosen from
  each head's overfitting-to-generalisation ratio (``gradient_blending_weights``,
  measured with ``head_losses`` on a pilot run: the paper's offline G-Blend).

* ``MMPareto``: Multimodal Pareto (Wei & Hu, "MMPareto: Boosting Multimodal Learning
  with Innocent Unimodal Assistance", ICML 2024): each modality's own loss assists its
  encoder, its gradient merged with the fused loss's gradient by a conflict-free
  (Pareto) combination whose norm is that of their sum.

* ``MSLR``: Modality-Specific Learning Rates (Yao & Mihalcea, "Modality-specific
  Learning Rates for Effective Multimodal Additive Late-fusion", Findings of ACL 2022),
  the fixed-rate form: each modality encoder's gradient times a fixed factor (a true
  per-modality learning rate with SGD only; see the class for Adam).

* ``PMR``: Prototypical Modal Rebalance (Fan et al., "PMR: Prototypical Modal Rebalance
  for Multimodal Learning", CVPR 2023): class prototypes in each encoder's feature
  space give a classifier per modality; the slower modality's encoder gets that
  classifier's cross-entropy, the dominant one an entropy regulariser. A stateful
  strategy: the prototypes (``PMRState``) are carried by ``fit`` through the steps and
  checkpointed.

Pure functions do the arithmetic and can be used in any train step:
``label_scores`` (each modality's confidence in the true label with the others marked
absent), ``ogm_ge_coefficients`` (OGM-GE's Eq. 9-10), ``unimodal_losses``,
``gradient_blending_weights`` (G-Blend's Proposition 1 with Eq. 6-7's estimates),
``pareto_combine`` (MMPareto's combination of two gradients) and PMR's
``prototype_logits``, ``class_means``, ``update_prototypes`` and ``pmr_coefficients``.
To measure imbalance after training: ``head_losses`` (each modality's own loss) and
``linear_probe`` (how much label information one encoder of a fused model carries, by
a logistic-regression probe on its pooled features).

A strategy is any object with either or both of two methods, called inside the
compiled step. ``loss(forward, task, batch, outputs, loss, key, step) -> (objective,
metrics)`` returns what is differentiated in place of the task's loss; ``forward(batch)
-> outputs`` runs the model at the parameters being differentiated (its passes leave
batch statistics alone). ``modulate(model, batch, grads, key, step) -> (grads,
metrics)`` acts after the gradient and before the optimiser: ``model`` at the step's
parameters, ``grads`` an ``nnx.State`` of float32 arrays like the model's ``nnx.Param``
state. ``metrics`` are dicts of float32 scalars that ``fit`` logs with each step. A
strategy must be hashable with a stable ``repr`` (a frozen dataclass): ``fit`` stores
the ``repr`` to resume the same run. A stateful strategy also has ``init_state(model,
task, batch) -> state`` (a pytree of arrays); its ``loss`` and ``modulate`` then take
the state as a last argument and return the new state as a third element, and ``fit``
carries it through the compiled steps and its checkpoints (``PMR``).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lepton_mm._validation import check_modalities
from lepton_mm.types import RESERVED_KEYS

Array = jax.Array

__all__ = ["FUSED", "MSLR", "OGMGE", "PMR", "GradientBlending", "MMPareto", "PMRState",
           "class_means", "gradient_blending_weights", "head_losses", "label_scores",
           "linear_probe", "ogm_ge_coefficients", "pareto_combine", "pmr_coefficients",
           "prototype_logits", "unimodal_losses", "update_prototypes"]

FUSED = "fused"
"""The name of the fused model's own head in Gradient Blending's weights and losses."""


def label_scores(model: Any, batch: Mapping[str, Any], modalities: Sequence[str]) -> dict[
        str, Array]:
    """Each modality's softmax probability of the true label, the others marked absent.

    The unimodal score of OGM-GE (Peng et al. 2022, Eq. 8: ``s_i^u = softmax(W^u
    phi^u(x_i^u) + b/2)_{y_i}``), for any fusion: instead of splitting a linear head's
    weights by modality, the model runs with only modality ``u`` present (the others
    marked absent through ``batch["present"]``, which every fusion layer honours). For
    a ``concat`` fusion with a linear head this is the paper's score with the full bias
    ``b`` in place of ``b / 2``.

    Args:
      model: a classifier ``model(batch) -> logits [batch, classes]`` that honours
        ``batch["present"]`` (``lepton_mm.models.MultimodalClassifier``).
      batch: a batch dict with int ``"label"`` ``[batch]``.
      modalities: the modalities to score (each a key of ``batch``).

    Returns:
      ``{u: float32 [batch]}``, each in ``[0, 1]``; an example that lacks ``u`` scores 0.
    """
    labels = batch["label"]
    out = {}
    for u in modalities:
        only, own = _only(batch, u)
        logits = model(only).astype(jnp.float32)
        prob = jnp.take_along_axis(jax.nn.softmax(logits, axis=-1),
                                   labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
        out[u] = jnp.where(own, prob, 0.0)
    return out


def ogm_ge_coefficients(scores: Mapping[str, Array], *, alpha: float,
                        valid: Array | None = None) -> tuple[dict[str, Array],
                                                             dict[str, Array]]:
    """OGM's modulation coefficients (Peng et al. 2022, Eq. 9-10).

    ``rho^u = sum_i s_i^u / sum_i s_i^v`` over the batch's valid rows (Eq. 9; with more
    than two modalities the denominator is the mean of the others' sums), and ``k^u = 1
    - tanh(alpha * rho^u)`` where ``rho^u > 1``, else 1 (Eq. 10): only the dominant
    modality is slowed, the more the larger its lead.

    Args:
      scores: ``{u: float [batch]}`` from ``label_scores`` (two or more modalities).
      alpha: the modulation strength (> 0).
      valid: optional bool ``[batch]``; rows where it is False are left out.

    Returns:
      ``(coefficients, ratios)``: ``{u: float32 scalar}`` each, ``k^u`` in ``(0, 1]``
      and ``rho^u`` (> 0).

    Examples:
      >>> import jax.numpy as jnp
      >>> k, rho = ogm_ge_coefficients({"a": jnp.array([0.9, 0.7]),
      ...                               "v": jnp.array([0.3, 0.5])}, alpha=0.5)
      >>> round(float(rho["a"]), 3), round(float(k["a"]), 4), float(k["v"])
      (2.0, 0.2384, 1.0)
    """
    names = sorted(scores)
    if len(names) < 2:
        raise ValueError(f"scores: expected two or more modalities, got {names}.")
    alpha = _positive("alpha", alpha)
    sums = {}
    for u in names:
        s = jnp.asarray(scores[u], jnp.float32)
        if valid is not None:
            s = jnp.where(jnp.asarray(valid), s, 0.0)
        sums[u] = jnp.sum(s)
    ratios, coefficients = {}, {}
    for u in names:
        others = sum(sums[v] for v in names if v != u) / (len(names) - 1)
        rho = sums[u] / jnp.maximum(others, jnp.finfo(jnp.float32).tiny)
        ratios[u] = rho
        coefficients[u] = jnp.where(rho > 1, 1 - jnp.tanh(alpha * rho), 1.0)
    return coefficients, ratios


@dataclasses.dataclass(frozen=True)
class OGMGE:
    """On-the-fly Gradient Modulation with Generalisation Enhancement (Peng et al. 2022).

    Each step: the unimodal scores ``s^u`` (``label_scores``), the ratios ``rho^u`` and
    coefficients ``k^u`` (``ogm_ge_coefficients``, Eq. 9-10); then the gradient of every
    parameter of modality ``u``'s encoder (``model.encoders[u]``) becomes ``k^u * g +
    h`` with ``h ~ N(0, std(g)^2)`` per parameter array (Generalisation Enhancement, Eq.
    13; the standard deviation of the array's gradient, as the authors' code does) when
    ``noise`` is on. Fusion and head gradients are left alone. Unlike the authors' code,
    which modulates only the 4-D convolution kernels of its ResNet encoders (not their
    biases or batch-norm scales), every parameter array of the encoder is modulated, so
    the rule also applies to encoders without convolutions. Logged per step:
    ``ogm/ratio_<u>`` and ``ogm/coeff_<u>``. Cost: one extra forward pass (no
    backward) per balanced modality per step.

    Attributes:
      alpha: modulation strength (> 0); larger damps the dominant modality more.
      modalities: the modalities to balance (default: every encoder of the model).
      noise: add the Generalisation Enhancement noise (OGM-GE); False gives plain OGM.
      start_step, end_step: modulate only at steps ``start_step <= step < end_step``
        (the paper modulates during an early span of training); ``end_step`` None: to
        the end.
    """

    alpha: float
    modalities: tuple[str, ...] | None = None
    noise: bool = True
    start_step: int = 0
    end_step: int | None = None

    def __post_init__(self):
        _positive("alpha", self.alpha)
        object.__setattr__(self, "modalities", _modality_names(self.modalities, least=2))
        _check_steps(self, ("start_step", "end_step"))

    def check(self, model: Any) -> None:
        """Errors before any compilation: the model must have the balanced encoders."""
        _check_encoders(model, "OGMGE", "modalities", self.modalities or ())
        names = self._names(model)
        if len(names) < 2:
            raise ValueError(f"strategy: OGMGE needs two or more modalities, the model "
                             f"has {names}.")

    def _names(self, model: Any) -> list[str]:
        return sorted(self.modalities or model.encoders)

    def modulate(self, model: Any, batch: Mapping[str, Any], grads: Any, key: Array,
                 step: Array) -> tuple[Any, dict[str, Array]]:
        """``(modulated grads, metrics)`` for one step (see the class docstring).

        Args:
          model: the model at the step's parameters (train mode).
          batch: the step's batch (with ``"valid"``).
          grads: the loss's gradient, an ``nnx.State`` like the model's parameters.
          key: this step's PRNG key (for the noise).
          step: int32 scalar, the number of steps taken before this one.

        Returns:
          The gradient to apply and ``{"ogm/ratio_<u>", "ogm/coeff_<u>"}``.
        """
        names = self._names(model)
        scores = jax.lax.stop_gradient(label_scores(model, batch, names))
        coefficients, ratios = ogm_ge_coefficients(scores, alpha=self.alpha,
                                                   valid=batch.get("valid"))
        active = step >= self.start_step
        if self.end_step is not None:
            active = active & (step < self.end_step)

        def modulate(path, g):
            owner = _encoder_of(path)
            if owner not in coefficients:
                return g
            new = coefficients[owner] * g
            if self.noise:
                leaf_key = jax.random.fold_in(key, zlib.crc32(_path_text(path).encode()))
                new = new + jnp.std(g) * jax.random.normal(leaf_key, g.shape, g.dtype)
            return jnp.where(active, new, g)

        out = jax.tree_util.tree_map_with_path(modulate, grads)
        metrics = {**{f"ogm/ratio_{u}": r for u, r in ratios.items()},
                   **{f"ogm/coeff_{u}": jnp.where(active, c, 1.0)
                      for u, c in coefficients.items()}}
        return out, metrics


def _only(batch: Mapping[str, Any], modality: str) -> tuple[dict[str, Any], Array]:
    """``batch`` with only ``modality`` present, and where it was present (bool [batch])."""
    size = batch["label"].shape[0] if "label" in batch else jax.tree.leaves(
        batch[modality])[0].shape[0]
    given = batch.get("present") or {}
    own = jnp.ones((size,), bool) if given.get(modality) is None else jnp.asarray(
        given[modality])
    present = {m: own if m == modality else jnp.zeros((size,), bool)
               for m in batch if m not in RESERVED_KEYS}
    return {**batch, "present": present}, own


def unimodal_losses(forward: Any, task: Any, batch: Mapping[str, Any],
                    modalities: Sequence[str]) -> dict[str, Array]:
    """Each modality's own loss: the task's loss of the model with only it present.

    The unimodal heads of Gradient Blending (Wang et al. 2020, Fig. 4) without extra
    parameters: the fused model's head, fed by one encoder with the others marked
    absent through ``batch["present"]`` (which every fusion layer honours). Rows where
    the modality itself is absent, or that are not ``batch["valid"]``, are left out.

    Args:
      forward: ``batch -> outputs``, the model (or ``fit``'s ``forward``).
      task: a task from ``lepton_mm.models`` (``task.loss(outputs, batch, valid)``).
      batch: a batch dict with ``"label"`` (and optionally ``"present"``, ``"valid"``).
      modalities: the modalities to score.

    Returns:
      ``{u: float32 scalar}``.
    """
    valid = batch.get("valid")
    out = {}
    for u in modalities:
        only, own = _only(batch, u)
        rows = own if valid is None else own & jnp.asarray(valid)
        out[u] = jnp.asarray(task.loss(forward(only), only, rows), jnp.float32)
    return out


def gradient_blending_weights(before: Mapping[str, tuple[float, float]],
                              after: Mapping[str, tuple[float, float]]) -> dict[str, float]:
    """Gradient Blending's weights from each head's losses at two points of a pilot run.

    Wang, Tran & Feiszli (CVPR 2020), Proposition 1: ``w_k = (1/Z) <grad L*, v_k> /
    sigma_k^2`` with ``Z = sum_k <grad L*, v_k> / (2 sigma_k^2)``, estimated (Sec. 3.3,
    Eq. 6-7) between epochs ``n`` and ``n + dn`` by the generalisation gain ``dG_k =
    L^V_n - L^V_{n+dn}`` and the overfitting growth ``dO_k = O_{n+dn} - O_n``, ``O =
    L^V - L^T``: ``w_k = (dG_k / dO_k^2) / Z``, ``Z = sum_k dG_k / (2 dO_k^2)``. The
    weights therefore sum to 2 (the paper's normalisation); only their ratios and the
    learning rate's scale matter. Two choices of ours where the estimate breaks down:
    a head whose validation loss did not fall (``dG_k <= 0``) gets weight 0, and
    ``dO_k^2`` is floored at ``1e-12``.

    Args:
      before: ``{head: (train_loss, validation_loss)}`` at epoch ``n`` (``FUSED`` and
        modality names, from ``head_losses``).
      after: the same at epoch ``n + dn``, for the same heads.

    Returns:
      ``{head: weight}``, each ``>= 0``.

    Raises:
      ValueError: the heads differ, a loss is not finite, or no head's validation loss
        fell.

    Examples:
      >>> w = gradient_blending_weights({"a": (1.0, 1.2), "b": (1.0, 1.1)},
      ...                               {"a": (0.5, 0.9), "b": (0.8, 1.0)})
      >>> {k: round(v, 4) for k, v in w.items()}
      {'a': 0.8571, 'b': 1.1429}
    """
    if not isinstance(before, Mapping) or not isinstance(after, Mapping):
        raise TypeError("before, after: expected {head: (train_loss, validation_loss)} "
                        "mappings.")
    if set(before) != set(after) or not before:
        raise ValueError(f"before, after: expected the same heads, got {sorted(before)} "
                         f"and {sorted(after)}.")
    ratios = {}
    for k in sorted(before):
        pair = []
        for name, losses in (("before", before[k]), ("after", after[k])):
            try:
                train, val = (float(x) for x in losses)
            except (TypeError, ValueError):
                raise ValueError(f"{name}[{k!r}]: expected (train_loss, validation_loss), "
                                 f"got {losses!r}.") from None
            if not (math.isfinite(train) and math.isfinite(val)):
                raise ValueError(f"{name}[{k!r}]: expected finite losses, got {losses!r}.")
            pair.append((train, val))
        (train_n, val_n), (train_m, val_m) = pair
        gain = val_n - val_m
        growth = (val_m - train_m) - (val_n - train_n)
        ratios[k] = max(gain, 0.0) / max(growth * growth, 1e-12)
    z = sum(ratios.values()) / 2
    if z <= 0:
        raise ValueError("before, after: no head's validation loss fell between the two "
                         "points; train the pilot longer or measure earlier.")
    return {k: r / z for k, r in ratios.items()}


def head_losses(model: Any, task: Any, data: Mapping[str, Any], *,
                modalities: Sequence[str] | None = None,
                batch_size: int = 256) -> dict[str, float]:
    """The loss of each Gradient Blending head over ``data``, the model in eval mode.

    ``FUSED``: the model with every modality present; ``u``: with only ``u`` present
    (``lepton_mm.robustness.mark_absent`` on the others). Call it on the training and
    the validation arrays at two epochs of a pilot run and pass the results to
    ``gradient_blending_weights``.

    Args:
      model: a ``MultimodalClassifier`` (or any model with ``encoders``).
      task: its task.
      data: a dict of arrays with a shared leading axis (a batch dict).
      modalities: the modalities to score (default: every encoder).
      batch_size: evaluation batch size.

    Returns:
      ``{FUSED: loss, u: loss, ...}`` as floats.
    """
    from lepton_mm.robustness import mark_absent
    from lepton_mm.training import evaluate

    names = sorted(modalities) if modalities else sorted(model.encoders)
    out = {FUSED: float(evaluate(model, task, data, batch_size=batch_size)["loss"])}
    for u in names:
        others = [m for m in data if m not in RESERVED_KEYS and m != u]
        out[u] = float(evaluate(model, task, mark_absent(data, others) if others else data,
                                batch_size=batch_size)["loss"])
    return out


@dataclasses.dataclass(frozen=True)
class GradientBlending:
    """Gradient Blending (Wang, Tran & Feiszli, CVPR 2020): a weighted multi-head loss.

    The objective is ``w_fused * L_fused + sum_u w_u * L_u`` (the paper's Eq. 4-5): the
    fused model's loss plus each modality's own loss (``unimodal_losses``: the same head
    fed by that modality alone, in place of the paper's extra per-modality classifier
    heads). Weights come from ``gradient_blending_weights`` on a pilot run (offline
    G-Blend) or are set by hand. Logged per step: ``gblend/loss_<head>``. Cost: one
    extra forward and backward pass per weighted modality per step.

    Attributes:
      weights: ``{head: weight >= 0}`` over ``FUSED`` and modality names, at least one
        > 0 (a mapping is accepted and stored as sorted ``(head, weight)`` pairs).
    """

    weights: Any

    def __post_init__(self):
        pairs = []
        for k, v in _named_values("weights", self.weights, "head", "weight"):
            if (isinstance(v, bool) or not isinstance(v, numbers.Real)
                    or not math.isfinite(v) or v < 0):
                raise ValueError(f"weights[{k!r}]: expected a finite number >= 0, got {v!r}.")
            pairs.append((k, float(v)))
        pairs = tuple(pairs)
        if all(v == 0 for _, v in pairs):
            raise ValueError("weights: expected at least one weight > 0, got all 0.")
        object.__setattr__(self, "weights", pairs)

    def check(self, model: Any) -> None:
        """Errors before any compilation: each weighted head must be a modality of the
        model (or ``FUSED``)."""
        _check_encoders(model, "GradientBlending", "heads", [k for k, _ in self.weights],
                        also=(FUSED,))

    def loss(self, forward: Any, task: Any, batch: Mapping[str, Any], outputs: Any,
             loss: Array, key: Array, step: Array) -> tuple[Array, dict[str, Array]]:
        """``(blended objective, metrics)`` for one step (see the class docstring).

        Args:
          forward: ``batch -> outputs``, the model at the parameters differentiated.
          task: the task.
          batch: the step's batch (with ``"valid"``).
          outputs: the step's fused outputs (unused: ``loss`` is their loss).
          loss: float32 scalar, the task's loss of the step's fused outputs.
          key: a PRNG key (unused: the blend is deterministic).
          step: int32 scalar (unused).

        Returns:
          The objective and ``{"gblend/loss_<head>": loss}``.
        """
        del outputs, key, step
        weights = dict(self.weights)
        modalities = [k for k in weights if k != FUSED and weights[k] > 0]
        losses = {FUSED: jnp.asarray(loss, jnp.float32),
                  **unimodal_losses(forward, task, batch, modalities)}
        objective = sum(weights.get(k, 0.0) * v for k, v in losses.items())
        return objective, {f"gblend/loss_{k}": v for k, v in losses.items()}


def pareto_combine(g_m: Any, g_u: Any) -> tuple[Any, Array, Array]:
    """MMPareto's combination of a multimodal and a unimodal gradient.

    With ``cos = <g_m, g_u> / (||g_m|| ||g_u||)`` (0 when either is zero):

    * no conflict (``cos >= 0``): ``h = (g_m + g_u) / 2``, i.e. ``alpha = 1/2``;
    * conflict (``cos < 0``): the two-task MGDA min-norm point of the segment between
      them, ``alpha = clip(<g_u - g_m, g_u> / ||g_m - g_u||^2, 0, 1)`` and ``h = alpha
      g_m + (1 - alpha) g_u``, whose inner product with each gradient is ``||h||^2 >= 0``
      (a direction that does not increase either loss to first order);

    then the magnitude is rescaled to that of the plain sum: ``direction = ||g_m + g_u||
    h / ||h||`` (0 where ``h`` is 0 up to float32 rounding: exactly opposite gradients).
    Without conflict this is ``g_m + g_u`` itself. The inner products and norms run
    over all leaves together (one vector: in ``MMPareto``, a whole encoder), accumulated
    in float32.

    Args:
      g_m: the multimodal loss's gradient: an array or a pytree of arrays.
      g_u: the unimodal loss's gradient, with ``g_m``'s structure and shapes.

    Returns:
      ``(direction, alpha, cos)``: ``direction`` like ``g_m`` (its dtypes), ``alpha``
      (the weight of ``g_m`` in ``h``, in ``[0, 1]``) and ``cos`` float32 scalars.

    Raises:
      ValueError: the structures or shapes differ, or there are no arrays.

    Examples:
      >>> import jax.numpy as jnp
      >>> d, alpha, cos = pareto_combine(jnp.array([1.0, 0.0]), jnp.array([-1.0, 1.0]))
      >>> round(float(alpha), 4), round(float(cos), 4)  # alpha = 3/5
      (0.6, -0.7071)
      >>> [round(float(x), 4) for x in d]  # (0.2, 0.4) rescaled to ||(0, 1)|| = 1
      [0.4472, 0.8944]
      >>> d, alpha, _ = pareto_combine(jnp.array([1.0, 0.0]), jnp.array([1.0, 1.0]))
      >>> float(alpha), [float(x) for x in d]  # no conflict: the sum
      (0.5, [2.0, 1.0])
    """
    leaves_m, tree_m = jax.tree.flatten(g_m)
    leaves_u, tree_u = jax.tree.flatten(g_u)
    if tree_m != tree_u:
        raise ValueError(f"g_u: expected the structure of g_m ({tree_m}), got {tree_u}.")
    if not leaves_m:
        raise ValueError("g_m: expected at least one array, got none.")
    for i, (m, u) in enumerate(zip(leaves_m, leaves_u, strict=True)):
        if jnp.shape(m) != jnp.shape(u):
            raise ValueError(f"g_u: leaf {i} has shape {jnp.shape(u)}, g_m's has "
                             f"{jnp.shape(m)}.")
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    m32, u32 = [f32(m) for m in leaves_m], [f32(u) for u in leaves_u]
    dot = lambda xs, ys: sum(jnp.sum(x * y) for x, y in zip(xs, ys, strict=True))
    mm, uu, mu = dot(m32, m32), dot(u32, u32), dot(m32, u32)
    norms = jnp.sqrt(mm) * jnp.sqrt(uu)
    cos = jnp.where(norms > 0, mu / jnp.where(norms > 0, norms, 1.0), 0.0)
    gap = mm + uu - 2 * mu  # ||g_m - g_u||^2 (> 0 under conflict)
    min_norm = jnp.clip((uu - mu) / jnp.where(gap > 0, gap, 1.0), 0.0, 1.0)
    alpha = jnp.where(cos < 0, min_norm, 0.5)
    h = [alpha * m + (1 - alpha) * u for m, u in zip(m32, u32, strict=True)]
    h_norm = jnp.sqrt(dot(h, h))
    target = jnp.sqrt(sum(jnp.sum(jnp.square(m + u)) for m, u in zip(m32, u32, strict=True)))
    # Exactly opposite gradients leave h as rounding error: no direction to rescale.
    tiny = 8 * jnp.finfo(jnp.float32).eps * (jnp.sqrt(mm) + jnp.sqrt(uu))
    live = h_norm > tiny
    scale = jnp.where(live, target / jnp.where(live, h_norm, 1.0), 0.0)
    out = [(scale * x).astype(jnp.result_type(m)) for x, m in zip(h, leaves_m, strict=True)]
    return jax.tree.unflatten(tree_m, out), alpha, cos


@dataclasses.dataclass(frozen=True)
class MMPareto:
    """Multimodal Pareto (Wei & Hu, ICML 2024): unimodal assistance without conflict.

    The objective is the fused (multimodal) loss plus each balanced modality's own
    loss. Our models have no per-modality heads, so modality ``u``'s loss is the fused
    model's with only ``u`` present (``unimodal_losses``, as in ``GradientBlending``),
    and it trains only ``u``'s encoder: fusion and head parameters keep the multimodal
    gradient ``g_m`` alone (the paper's multimodal head likewise gets only ``g_m``).
    For each balanced modality ``u``, over the whole parameter vector of
    ``model.encoders[u]`` (all its arrays flattened together), with ``g_m`` the fused
    loss's gradient (``modulate``'s ``grads``) and ``g_u`` that of ``u``'s loss, the
    update is ``gamma * pareto_combine(g_m, g_u)[0]``: the sum ``g_m + g_u`` where
    ``cos(g_m, g_u) >= 0``, else the min-norm (MGDA) point ``alpha g_m + (1 - alpha)
    g_u`` rescaled to the norm ``||g_m + g_u||`` (the paper's "magnitude" step: a
    direction common to both losses with the sum's larger magnitude).

    Which forms are implemented (the paper's own Algorithm 1 could not be checked line
    by line; these follow the authors' released code, GeWu-Lab/MMPareto_ICML2024
    ``code/MMPareto.py``, with two deliberate differences): weights 1/2 each without
    conflict, the two-task min-norm solution with conflict, then ``2 h`` scaled up to
    ``||g_m + g_u||`` where shorter, times ``gamma`` (1.5 in that code). Over a whole
    encoder ``||2 h|| <= ||g_m + g_u||`` always (the min-norm point is no longer than
    the midpoint), so this is exactly ``pareto_combine``'s rescaling. Differences: (1)
    that code rescales each parameter tensor separately (with the weights still from the
    whole encoder), which can tilt the direction; here the rescaling is over the whole
    encoder, which keeps it a common descent direction; (2) it treats ``cos == 0`` as a
    conflict; here it is not, so that a zero ``g_u`` (no row of the batch has ``u``)
    leaves ``g_m`` rather than a zero step. The magnitude argument is SGD's (that code
    trains with SGD, momentum 0.9); under Adam a constant ``gamma`` cancels.

    Logged per step: ``mmpareto/cos_<u>``, ``mmpareto/alpha_<u>`` (0.5 without
    conflict) and ``mmpareto/loss_<u>``. Cost: one extra forward and backward pass per
    balanced modality per step, in float32 even under ``fit``'s ``compute_dtype``.

    Attributes:
      task: the task given to ``fit`` (``task.loss(outputs, batch, valid)``): the
        ``modulate`` hook is not passed one. Tasks are frozen dataclasses, so the
        strategy stays hashable.
      modalities: the modalities whose encoders get assistance (default: every encoder
        of the model).
      gamma: a constant factor on the combined encoder gradients (> 0; 1 keeps
        ``||g_m + g_u||``).
    """

    task: Any
    modalities: tuple[str, ...] | None = None
    gamma: float = 1.0

    def __post_init__(self):
        if not callable(getattr(self.task, "loss", None)):
            raise TypeError(f"task: expected a task with a loss(outputs, batch, valid) "
                            f"method (e.g. lepton_mm.models.Classification), got "
                            f"{self.task!r}.")
        try:
            hash(self.task)
        except TypeError:
            raise TypeError(f"task: expected a hashable task (a frozen dataclass), got "
                            f"{type(self.task).__name__}.") from None
        object.__setattr__(self, "modalities", _modality_names(self.modalities, least=1))
        _positive("gamma", self.gamma)

    def check(self, model: Any) -> None:
        """Errors before any compilation: the model must have the assisted encoders."""
        _check_encoders(model, "MMPareto", "modalities", self.modalities or ())

    def _names(self, model: Any) -> list[str]:
        return sorted(self.modalities or model.encoders)

    def modulate(self, model: Any, batch: Mapping[str, Any], grads: Any, key: Array,
                 step: Array) -> tuple[Any, dict[str, Array]]:
        """``(combined grads, metrics)`` for one step (see the class docstring).

        Args:
          model: the model at the step's parameters (train mode); its state changes in
            the unimodal passes (batch statistics, RNG counts) are discarded.
          batch: the step's batch (with ``"valid"``).
          grads: the fused loss's gradient ``g_m``, an ``nnx.State`` like the model's
            parameters.
          key: a PRNG key (unused: the combination is deterministic).
          step: int32 scalar (unused).

        Returns:
          The gradient to apply and ``{"mmpareto/cos_<u>", "mmpareto/alpha_<u>",
          "mmpareto/loss_<u>"}``.
        """
        from flax import nnx

        del key, step
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        params, rest = nnx.as_pure(params), nnx.as_pure(rest)
        flat = jax.tree_util.tree_flatten_with_path(grads)[0]
        combined, metrics = {}, {}
        for u in self._names(model):
            def own_loss(p, u=u):
                return unimodal_losses(nnx.merge(graphdef, p, rest), self.task, batch,
                                       [u])[u]

            loss_u, full = jax.value_and_grad(own_loss)(params)
            g_u = {_param_key(p): g for p, g in jax.tree_util.tree_flatten_with_path(
                full)[0] if _encoder_of(p) == u}
            g_m = {_param_key(p): g for p, g in flat if _encoder_of(p) == u}
            if not g_m:
                raise ValueError(f"strategy: MMPareto found no parameters of "
                                 f"encoders/{u} in the gradient.")
            if set(g_m) != set(g_u):
                raise ValueError(f"grads: expected the parameters of encoders/{u} of the "
                                 f"model, got {sorted(g_m)}.")
            direction, alpha, cos = pareto_combine(g_m, g_u)
            combined.update(direction)
            metrics.update({f"mmpareto/cos_{u}": cos, f"mmpareto/alpha_{u}": alpha,
                            f"mmpareto/loss_{u}": loss_u})

        def pick(path, g):
            new = combined.get(_param_key(path))
            return g if new is None else (self.gamma * new).astype(g.dtype)

        return jax.tree_util.tree_map_with_path(pick, grads), metrics


@dataclasses.dataclass(frozen=True)
class MSLR:
    """Modality-Specific Learning Rates (Yao & Mihalcea, Findings of ACL 2022), fixed.

    Each modality encoder's gradient is multiplied by its factor (``model.encoders[u]``'s
    parameters); fusion and head gradients, and encoders without a factor, are left
    alone. The paper gives each modality the learning rate that suits its unimodal model
    (its encoders train at very different rates) and studies three ways of setting them;
    only fixed rates are implemented here (the paper's other strategies, whose rules could
    not be checked, are not).

    What a gradient factor amounts to depends on the optimiser. With plain SGD, with or
    without momentum, and no clipping or weight decay, a factor ``s`` on the gradient is
    exactly a learning rate ``s * lr`` for those parameters (the updates are linear in
    the gradient). With L2 weight decay (``"sgd"``/``"adam"``'s ``weight_decay``) the
    decay term is not scaled, and with ``clip_norm`` the factor changes the global norm.
    With Adam or AdamW (``OptimizerConfig``'s default) it is almost no change at all:
    Adam divides by the gradient's running RMS, so a constant factor cancels except
    against ``eps``. For a true per-modality learning rate under any optimiser use
    ``OptimizerConfig(lr_multipliers=MSLR(...).lr_multipliers())``, which scales the
    optimiser's updates instead. Which optimiser the paper used could not be checked.

    Logged per step: nothing (the factors are constant). Cost: negligible.

    Attributes:
      scales: ``{modality: factor}``, each factor finite and > 0, at least one (a
        mapping is accepted and stored as sorted ``(modality, factor)`` pairs).
    """

    scales: Any

    def __post_init__(self):
        pairs = tuple((k, _positive(f"scales[{k!r}]", v))
                      for k, v in _named_values("scales", self.scales, "modality", "factor"))
        object.__setattr__(self, "scales", pairs)

    def check(self, model: Any) -> None:
        """Errors before any compilation: each scaled modality must be an encoder."""
        _check_encoders(model, "MSLR", "scales", [k for k, _ in self.scales])

    def lr_multipliers(self) -> dict[str, float]:
        """The same factors as ``OptimizerConfig.lr_multipliers`` (``{"^encoders/<u>/":
        factor}``): per-modality learning rates for any optimiser, Adam included.

        Examples:
          >>> MSLR({"image": 0.5, "audio": 2.0}).lr_multipliers()
          {'^encoders/audio/': 2.0, '^encoders/image/': 0.5}
        """
        return {f"^encoders/{re.escape(u)}/": s for u, s in self.scales}

    def modulate(self, model: Any, batch: Mapping[str, Any], grads: Any, key: Array,
                 step: Array) -> tuple[Any, dict[str, Array]]:
        """``(scaled grads, {})`` for one step (see the class docstring).

        Args:
          model: unused (the factors are fixed).
          batch: unused.
          grads: the loss's gradient, an ``nnx.State`` like the model's parameters.
          key: a PRNG key (unused).
          step: int32 scalar (unused).

        Returns:
          The gradient with each scaled encoder's arrays times its factor, and ``{}``.
        """
        del model, batch, key, step
        scales = dict(self.scales)

        def scale(path, g):
            factor = scales.get(_encoder_of(path))
            return g if factor is None else g * jnp.asarray(factor, g.dtype)

        return jax.tree_util.tree_map_with_path(scale, grads), {}


def prototype_logits(features: Array, prototypes: Array) -> Array:
    """The prototype classifier's logits: minus each example's Euclidean distance to
    each class prototype.

    PMR's non-parametric classifier (Fan et al. 2023, Sec. 3): ``p(y = k | z_i) =
    softmax_k(-d(z_i, c_k))`` with ``d`` the Euclidean distance (not squared, as the
    authors' code computes it). The distance is computed from the differences (no
    ``||z||^2 - 2 z.c + ||c||^2`` cancellation), and its gradient at zero distance is 0
    rather than NaN.

    Args:
      features: float ``[batch, dim]``: a modality encoder's features ``z_i``.
      prototypes: float ``[classes, dim]``: the class prototypes ``c_k``.

    Returns:
      float32 ``[batch, classes]``: ``-||z_i - c_k||_2``.

    Examples:
      >>> import jax.numpy as jnp
      >>> logits = prototype_logits(jnp.array([[3.0, 4.0]]),
      ...                           jnp.array([[0.0, 0.0], [3.0, 2.0]]))
      >>> logits.tolist()
      [[-5.0, -2.0]]
    """
    z = jnp.asarray(features, jnp.float32)
    c = jnp.asarray(prototypes, jnp.float32)
    if z.ndim != 2 or c.ndim != 2 or z.shape[-1] != c.shape[-1]:
        raise ValueError(f"features, prototypes: expected [batch, dim] and [classes, dim], "
                         f"got {z.shape} and {c.shape}.")
    squared = jnp.sum(jnp.square(z[:, None, :] - c[None, :, :]), axis=-1)
    positive = squared > 0
    return -jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def class_means(features: Array, labels: Array, rows: Array, *,
                num_classes: int) -> tuple[Array, Array]:
    """Each class's mean feature vector over the selected rows of a batch.

    PMR's prototype (Fan et al. 2023, Sec. 3): ``c_k = (1 / N_k) sum_{i: y_i = k}
    z_i``, here over one batch's rows where ``rows`` is True.

    Args:
      features: float ``[batch, dim]``.
      labels: int ``[batch]`` in ``[0, num_classes)``.
      rows: bool ``[batch]``: the rows to average (e.g. valid and modality present);
        the features of other rows are never read (NaN there does not leak).
      num_classes: the number of classes.

    Returns:
      ``(means, counts)``: float32 ``[classes, dim]`` (zeros for a class without rows)
      and float32 ``[classes]`` (the number of rows of each class).

    Examples:
      >>> import jax.numpy as jnp
      >>> means, counts = class_means(jnp.array([[1.0], [3.0], [5.0], [9.0]]),
      ...                             jnp.array([0, 0, 1, 1]),
      ...                             jnp.array([True, True, True, False]), num_classes=3)
      >>> means[:, 0].tolist(), counts.tolist()
      ([2.0, 5.0, 0.0], [2.0, 1.0, 0.0])
    """
    z = jnp.asarray(features, jnp.float32)
    rows = jnp.asarray(rows, bool)
    onehot = (jnp.asarray(labels)[:, None] == jnp.arange(num_classes)[None, :]) & rows[:, None]
    onehot = onehot.astype(jnp.float32)
    counts = jnp.sum(onehot, axis=0)
    sums = onehot.T @ jnp.where(rows[:, None], z, 0.0)
    return sums / jnp.maximum(counts, 1.0)[:, None], counts


def update_prototypes(prototypes: Array, seen: Array, features: Array, labels: Array,
                      rows: Array, *, momentum: float) -> tuple[Array, Array]:
    """One step of PMR's prototypes as a per-step exponential moving average.

    For each class ``k`` with rows in the batch (``class_means``: mean ``m_k``): ``c_k <-
    momentum * c_k + (1 - momentum) * m_k`` if ``k`` was seen before, else ``c_k <-
    m_k``; classes without rows keep ``c_k``. (The paper recomputes the class means over
    part of the training set once per epoch and blends them with the previous epoch's
    by a momentum; see ``PMR`` for why a per-step average is used here.)

    Args:
      prototypes: float32 ``[classes, dim]``.
      seen: bool ``[classes]``: which classes have a prototype yet.
      features: float ``[batch, dim]`` (treated as constants: no gradient is wanted).
      labels: int ``[batch]``.
      rows: bool ``[batch]``: the rows that count.
      momentum: the old prototype's weight, in ``[0, 1)``.

    Returns:
      ``(prototypes, seen)`` after the step.

    Examples:
      >>> import jax.numpy as jnp
      >>> c, seen = jnp.array([[0.0], [10.0]]), jnp.array([False, True])
      >>> c, seen = update_prototypes(c, seen, jnp.array([[2.0], [4.0]]),
      ...                             jnp.array([0, 1]), jnp.array([True, True]),
      ...                             momentum=0.75)
      >>> c[:, 0].tolist(), seen.tolist()  # class 0 first seen; 0.75 * 10 + 0.25 * 4
      ([2.0, 8.5], [True, True])
    """
    momentum = _momentum(momentum)
    c = jnp.asarray(prototypes, jnp.float32)
    means, counts = class_means(jax.lax.stop_gradient(features), labels, rows,
                                num_classes=c.shape[0])
    has = counts > 0
    blended = momentum * c + (1.0 - momentum) * means
    new = jnp.where(has[:, None], jnp.where(jnp.asarray(seen)[:, None], blended, means), c)
    return new, jnp.asarray(seen) | has


def pmr_coefficients(scores: Mapping[str, Array], *, alpha: float, mu: float,
                     rows: Mapping[str, Array] | None = None) -> tuple[
                         dict[str, Array], dict[str, Array], dict[str, Array]]:
    """PMR's imbalance ratios and the coefficients of its two loss terms.

    With ``S^u`` the mean of ``s_i^u`` (the prototype classifier's probability of the
    true label) over the batch's rows, the imbalance ratio is ``rho^u = S^u / S^v``
    (Fan et al. 2023, Sec. 3: a ratio of sums over the batch, the same thing when every
    example has every modality; with missing modalities each mean runs over the rows
    where that modality is present, so an absent modality does not count as a wrong
    answer). With more than two modalities ``S^v`` is the mean of the others' means.
    The slower modality (``rho^u < 1``)
    gets the prototypical cross-entropy with ``beta^u = alpha * clip(1 / rho^u - 1, 0,
    1)``; the dominant one (``rho^u > 1``) gets the entropy regulariser with ``gamma^u =
    mu * clip(rho^u - 1, 0, 1)``. With two modalities ``beta`` of the slower one and
    ``gamma`` of the dominant one are both driven by ``clip(rho - 1, 0, 1)`` of the
    dominant one, the form of BalanceMM's PMR (GeWu-Lab/BalanceBenchmark
    ``PMR_trainer.py``); the authors' released code instead switches the slower
    modality's weight between 0 and ``alpha``.

    Args:
      scores: ``{u: float [batch]}``, each in ``[0, 1]`` (two or more modalities).
      alpha: the prototypical cross-entropy's scale (> 0).
      mu: the entropy regulariser's scale (>= 0; 0 turns it off).
      rows: optional ``{u: bool [batch]}``: the rows of each modality's mean (e.g. valid
        and present); default: every row.

    Returns:
      ``(betas, gammas, ratios)``: ``{u: float32 scalar}`` each.

    Examples:
      >>> import jax.numpy as jnp
      >>> beta, gamma, rho = pmr_coefficients({"a": jnp.array([0.6, 0.6]),
      ...                                      "v": jnp.array([0.4, 0.4])},
      ...                                     alpha=1.0, mu=0.1)
      >>> [round(float(x), 4) for x in (rho["a"], beta["v"], gamma["a"], beta["a"],
      ...                                gamma["v"])]
      [1.5, 0.5, 0.05, 0.0, 0.0]
    """
    names = sorted(scores)
    if len(names) < 2:
        raise ValueError(f"scores: expected two or more modalities, got {names}.")
    alpha = _positive("alpha", alpha)
    mu = _non_negative("mu", mu)
    sums = {}
    for u in names:
        s = jnp.asarray(scores[u], jnp.float32)
        r = jnp.ones(s.shape, bool) if rows is None else jnp.asarray(rows[u], bool)
        sums[u] = jnp.sum(jnp.where(r, s, 0.0)) / jnp.maximum(jnp.sum(r), 1).astype(
            jnp.float32)
    tiny = jnp.finfo(jnp.float32).tiny
    betas, gammas, ratios = {}, {}, {}
    for u in names:
        others = sum(sums[v] for v in names if v != u) / (len(names) - 1)
        ratios[u] = sums[u] / jnp.maximum(others, tiny)
        betas[u] = alpha * jnp.clip((others - sums[u]) / jnp.maximum(sums[u], tiny), 0, 1)
        gammas[u] = mu * jnp.clip((sums[u] - others) / jnp.maximum(others, tiny), 0, 1)
    return betas, gammas, ratios


class PMRState(NamedTuple):
    """``PMR``'s state, carried by ``fit`` through the steps and checkpointed.

    Attributes:
      prototypes: ``{modality: float32 [classes, dim]}``: each class's prototype in that
        modality encoder's feature space.
      seen: ``{modality: bool [classes]}``: which classes have a prototype yet.
    """

    prototypes: dict[str, Array]  # {u: float32 [classes, dim_u]}
    seen: dict[str, Array]  # {u: bool [classes]}


@dataclasses.dataclass(frozen=True)
class PMR:
    """Prototypical Modal Rebalance (Fan et al., "PMR: Prototypical Modal Rebalance for
    Multimodal Learning", CVPR 2023).

    Each balanced modality ``u`` has class prototypes ``c_k^u`` in its encoder's feature
    space (``z_i^u``: ``model.encoders[u]``'s pooled features, as the classifier computes
    them) and with them a non-parametric classifier ``p^u(k | z_i) = softmax_k(-d(z_i^u,
    c_k^u))`` (``prototype_logits``), which measures how far that modality alone has
    learned, free of the fusion layer and of the other modalities. Each step:

    * the prototypical cross-entropy ``L_PCE^u = -(1/N) sum_i log p^u(y_i | z_i)``;
    * the prototypical entropy ``H^u = -(1/N) sum_i sum_k p^u(k | z_i) log p^u(k | z_i)``;
    * the imbalance ratio ``rho^u = sum_i p^u(y_i | z_i) / sum_i p^v(y_i | z_i)`` (with
      missing modalities: of the means over the rows where each is present) and the
      coefficients ``beta^u``, ``gamma^u`` (``pmr_coefficients``);
    * the objective ``L_fused + sum_u beta^u L_PCE^u - sum_u gamma^u H^u``: the slower
      modality's encoder is pulled towards its prototypes (its features cluster by
      class faster) and the dominant one's prototype distribution is kept from
      converging early (its entropy is raised), the paper's PER, which it applies only
      in the early epochs (``entropy_end_step``).

    The sums run over the batch's valid rows where the modality is present. Gradients
    reach only the encoders (the prototypes are constants, as are the coefficients).
    The formulas follow the paper's Sec. 3 as summarised above (its equation numbers
    could not be checked here, so they are written out in full); the coefficient form
    follows BalanceMM's implementation (see ``pmr_coefficients``).

    Deviations, and why:

    * Prototypes: the paper recomputes the class means once per epoch over part of the
      training set (the authors' code: a tenth of it, in eval mode, blended with the
      previous epoch's prototypes by a momentum). Here ``fit`` has no pass over the data
      outside the train step, so the prototypes are an exponential moving average of
      each batch's class means (``update_prototypes``, weight ``momentum`` on the old
      value), updated inside the compiled step from the step's own train-mode features
      (at the parameters before the update; the step's losses use the prototypes from
      before it). The state is then a function of the steps taken, which keeps
      resuming exact; ``momentum`` near 1 averages over about ``1 / (1 - momentum)``
      batches, as an epoch's mean would over many.
    * Until every class has a prototype in every balanced modality (``pmr/ready``), the
      two terms are off: a zero prototype is no class mean.
    * More than two modalities: ``rho^u`` against the mean of the others (the paper has
      two).
    * The features come from an extra pass of the encoders (``forward.encode``), not
      from the fused pass; with dropout they see other masks, and modality dropout
      (``fit(modality_dropout=...)``) does not apply to them.

    Logged per step: ``pmr/ratio_<u>``, ``pmr/beta_<u>`` and ``pmr/gamma_<u>`` (the
    applied coefficients: 0 when off), ``pmr/pce_<u>``, ``pmr/entropy_<u>`` and
    ``pmr/ready``. Cost: one extra encoder pass per step (its backward included).

    Attributes:
      alpha: the prototypical cross-entropy's scale (> 0).
      mu: the entropy regulariser's scale (>= 0; 0, the default, leaves it out).
      momentum: the old prototype's weight in each step's average, in ``[0, 1)``.
      modalities: the modalities to balance (default: every encoder; two or more).
      start_step, end_step: apply the two terms only at steps ``start_step <= step <
        end_step`` (``end_step`` None: to the end); the prototypes are updated at every
        step.
      entropy_end_step: apply the entropy term only before this step (None: whenever
        the cross-entropy term applies); the paper keeps it to the first epochs.
    """

    alpha: float
    mu: float = 0.0
    momentum: float = 0.9
    modalities: tuple[str, ...] | None = None
    start_step: int = 0
    end_step: int | None = None
    entropy_end_step: int | None = None

    def __post_init__(self):
        _positive("alpha", self.alpha)
        _non_negative("mu", self.mu)
        _momentum(self.momentum)
        object.__setattr__(self, "modalities", _modality_names(self.modalities, least=2))
        _check_steps(self, ("start_step", "end_step", "entropy_end_step"))

    def check(self, model: Any) -> None:
        """Errors before any compilation: the model must have the balanced encoders and
        an ``encode`` method (``MultimodalClassifier``)."""
        _check_encoders(model, "PMR", "modalities", self.modalities or ())
        names = self._names(model)
        if len(names) < 2:
            raise ValueError(f"strategy: PMR needs two or more modalities, the model has "
                             f"{names}.")
        if not callable(getattr(model, "encode", None)):
            raise TypeError(f"strategy: PMR needs a model with an encode(batch) method "
                            f"(MultimodalClassifier), got {type(model).__name__}.")

    def _names(self, model: Any) -> list[str]:
        return sorted(self.modalities or model.encoders)

    def init_state(self, model: Any, task: Any, batch: Mapping[str, Any]) -> PMRState:
        """Zero prototypes, none seen: ``[classes, dim]`` per balanced modality.

        Args:
          model: the model (``fit`` passes a copy, traced: only shapes are read).
          task: the task; a classification task with ``num_classes``.
          batch: a sample batch (the first training examples).

        Returns:
          The initial ``PMRState``.
        """
        classes = getattr(task, "num_classes", None)
        if isinstance(classes, bool) or not isinstance(classes, numbers.Integral):
            raise TypeError(f"strategy: PMR needs a classification task with num_classes "
                            f"(lepton_mm.models.Classification), got {task!r}.")
        labels = batch.get("label")
        if labels is None or jnp.ndim(labels) != 1 or not jnp.issubdtype(
                jnp.asarray(labels).dtype, jnp.integer):
            raise TypeError("strategy: PMR needs integer class labels batch['label'] "
                            "[batch].")
        encoded = model.encode(batch)
        names = self._names(model)
        return PMRState(
            prototypes={u: jnp.zeros((int(classes), encoded[u].pooled.shape[-1]),
                                     jnp.float32) for u in names},
            seen={u: jnp.zeros((int(classes),), bool) for u in names})

    def loss(self, forward: Any, task: Any, batch: Mapping[str, Any], outputs: Any,
             loss: Array, key: Array, step: Array,
             state: PMRState) -> tuple[Array, dict[str, Array], PMRState]:
        """``(objective, metrics, new state)`` for one step (see the class docstring).

        Args:
          forward: the model at the parameters differentiated, with ``encode(batch) ->
            {modality: EncoderOutput}``.
          task: the task (unused: ``loss`` is its loss of the fused outputs).
          batch: the step's batch (with ``"valid"`` and ``"label"``).
          outputs: the step's fused outputs (unused).
          loss: float32 scalar, the task's loss of the fused outputs.
          key: a PRNG key (unused: PMR is deterministic).
          step: int32 scalar, the number of steps taken before this one.
          state: the ``PMRState`` before this step.

        Returns:
          The objective, ``{"pmr/...": scalar}`` and the ``PMRState`` after this step.
        """
        del task, outputs, key
        names = sorted(state.prototypes)
        encoded = forward.encode(batch)
        labels = jnp.asarray(batch["label"]).astype(jnp.int32)
        size = labels.shape[0]
        valid = jnp.asarray(batch["valid"], bool) if batch.get("valid") is not None \
            else jnp.ones((size,), bool)
        present = batch.get("present") or {}
        pce, entropy, scores, rows, features = {}, {}, {}, {}, {}
        for u in names:
            z = jnp.asarray(encoded[u].pooled, jnp.float32)
            own = present.get(u)
            r = valid if own is None else valid & jnp.asarray(own, bool)
            logp = jax.nn.log_softmax(prototype_logits(z, state.prototypes[u]), axis=-1)
            true = jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
            n = jnp.maximum(jnp.sum(r), 1).astype(jnp.float32)
            pce[u] = -jnp.sum(jnp.where(r, true, 0.0)) / n
            entropy[u] = -jnp.sum(jnp.where(r, jnp.sum(jnp.exp(logp) * logp, -1), 0.0)) / n
            scores[u] = jnp.where(r, jnp.exp(true), 0.0)
            rows[u], features[u] = r, z
        betas, gammas, ratios = pmr_coefficients(jax.lax.stop_gradient(scores),
                                                 alpha=self.alpha, mu=self.mu, rows=rows)
        ready = jnp.all(jnp.stack([jnp.all(state.seen[u]) for u in names]))
        active = ready & (step >= self.start_step)
        if self.end_step is not None:
            active = active & (step < self.end_step)
        entropy_on = active
        if self.entropy_end_step is not None:
            entropy_on = entropy_on & (step < self.entropy_end_step)
        betas = {u: jnp.where(active, b, 0.0) for u, b in betas.items()}
        gammas = {u: jnp.where(entropy_on, g, 0.0) for u, g in gammas.items()}
        objective = jnp.asarray(loss, jnp.float32) + sum(
            betas[u] * pce[u] - gammas[u] * entropy[u] for u in names)
        prototypes, seen = {}, {}
        for u in names:
            prototypes[u], seen[u] = update_prototypes(
                state.prototypes[u], state.seen[u], features[u], labels, rows[u],
                momentum=self.momentum)
        metrics = {"pmr/ready": ready.astype(jnp.float32)}
        for u in names:
            metrics.update({f"pmr/ratio_{u}": ratios[u], f"pmr/beta_{u}": betas[u],
                            f"pmr/gamma_{u}": gammas[u], f"pmr/pce_{u}": pce[u],
                            f"pmr/entropy_{u}": entropy[u]})
        return objective, metrics, PMRState(prototypes, seen)


def linear_probe(model: Any, train: Mapping[str, Any], test: Mapping[str, Any], *,
                 modality: str, num_classes: int, steps: int = 200, l2: float = 1e-3,
                 batch_size: int = 256) -> dict[str, float | int]:
    """How much label information one encoder of a fused model carries: a linear probe.

    The pooled features of ``model.encoders[modality]`` (run as the classifier runs it,
    ``lepton_mm.models.encode_modalities``, on an eval-mode copy: ``nnx.clone``, so the
    caller's model and its mode are untouched) are extracted for every example of
    ``train`` and ``test`` in jitted batches, standardised with the training rows' mean
    and standard deviation (a feature whose std is below ``1e-6`` is only centred), and
    a multinomial logistic regression ``softmax(x W + b)`` is fitted on the training
    rows by full-batch L-BFGS (``optax.lbfgs`` with its zoom line search, from ``W = 0,
    b = 0``; at most ``steps`` iterations, stopping early once the gradient's norm is
    below ``1e-6``) on the mean cross-entropy plus ``l2 / 2 * ||W||^2`` (the bias is not
    penalised). The fit has no randomness, so a call is deterministic on a given device.

    Linear probes of each encoder are a common way, in the balanced multimodal learning
    literature, to show that jointly trained fused models under-train the weaker
    modality's encoder; a gap between modalities' probe accuracies measures the
    imbalance inside the fused model (unlike ``label_scores``, it does not go through
    the fusion layer or the head).

    Examples where ``present[modality]`` is False (or, for a batch dict that has one,
    ``valid`` is False) are left out of the standardisation, the fit and both scores.

    Args:
      model: a ``lepton_mm.models.MultimodalClassifier`` (any ``nnx.Module`` with an
        ``encoders`` mapping of modules returning ``EncoderOutput`` with pooled
        ``[batch, dim]``).
      train: the probe's training data: a dict of arrays in the batch format with a
        shared leading axis ``[n, ...]``: ``batch[modality]`` (an array or a tuple such
        as ``(log_mel, mask)``), int ``"label"`` ``[n]`` and optionally ``"present"``
        (``{modality: bool [n]}``) and ``"valid"`` (bool ``[n]``).
      test: the held-out data to score, in the same format.
      modality: the encoder to probe (a key of ``model.encoders``).
      num_classes: the number of classes (labels in ``[0, num_classes)``).
      steps: the most L-BFGS iterations (> 0).
      l2: the weight decay on ``W`` (> 0; keeps separable features' fit finite).
      batch_size: rows per compiled feature-extraction call (the last batch is padded).

    Returns:
      ``{"train_accuracy": float, "test_accuracy": float, "dim": int, "num_train": int,
      "num_test": int}``: accuracies of the fitted probe over the present rows of each
      split (``test_accuracy`` is NaN when ``test`` has none), the pooled feature size,
      and the number of present rows used from each split.

    Raises:
      ValueError: ``modality`` is not one of the model's encoders or missing from a
        split, a label is out of range, or ``train`` has no present row.
    """
    import optax
    from flax import nnx

    from lepton_mm._validation import check_positive_int
    from lepton_mm.models import encode_modalities

    encoders = getattr(model, "encoders", None)
    if encoders is None:
        raise TypeError(f"model: expected a model with an `encoders` mapping, got "
                        f"{type(model).__name__}.")
    if modality not in encoders:
        raise ValueError(f"modality: {modality!r} is not one of the model's encoders "
                         f"{sorted(encoders)}.")
    num_classes = check_positive_int("num_classes", num_classes)
    steps = check_positive_int("steps", steps)
    batch_size = check_positive_int("batch_size", batch_size)
    l2 = _positive("l2", l2)

    copy = nnx.clone(model)
    copy.eval()
    graphdef, state = nnx.split(copy)

    @jax.jit
    def pooled(state, inputs):
        encs = nnx.merge(graphdef, state).encoders
        return encode_modalities(encs, {modality: inputs}, (modality,))[modality].pooled

    def features(name, data):
        if not isinstance(data, Mapping) or modality not in data or "label" not in data:
            raise ValueError(f"{name}: expected a batch dict with {modality!r} and 'label', "
                             f"got keys {sorted(data) if isinstance(data, Mapping) else data!r}.")
        inputs = jax.tree.map(np.asarray, data[modality])
        labels = np.asarray(data["label"])
        n = labels.shape[0]
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{name}['label']: expected int [n], got {labels.dtype} "
                             f"{labels.shape}.")
        keep = np.ones(n, bool)
        flags = (data.get("present") or {}).get(modality)
        if flags is not None:
            keep &= np.asarray(flags, bool)
        if data.get("valid") is not None:
            keep &= np.asarray(data["valid"], bool)
        if keep.any() and (labels[keep].min() < 0 or labels[keep].max() >= num_classes):
            raise ValueError(f"{name}['label']: expected labels in [0, {num_classes}), got "
                             f"[{labels[keep].min()}, {labels[keep].max()}].")
        size = min(batch_size, n)
        chunks = []
        for start in range(0, n, size):
            rows = np.minimum(np.arange(start, start + size), n - 1)  # pad by repeating
            out = pooled(state, jax.tree.map(lambda a, rows=rows: a[rows], inputs))
            chunks.append(np.asarray(out, np.float32)[:min(size, n - start)])
        x = np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)
        return x[keep], labels[keep].astype(np.int32)

    x_train, y_train = features("train", train)
    x_test, y_test = features("test", test)
    if len(y_train) == 0:
        raise ValueError(f"train: no example has modality {modality!r} present.")
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std = np.where(std < 1e-6, 1.0, std)
    x_train = jnp.asarray((x_train - mean) / std)
    dim = x_train.shape[1]

    def loss_fn(p):
        logits = x_train @ p["w"] + p["b"][None]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y_train).mean()
        return ce + 0.5 * l2 * jnp.sum(p["w"] ** 2)

    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss_fn)

    @jax.jit
    def fit(p):
        def step(carry):
            p, opt = carry
            value, grad = value_and_grad(p, state=opt)
            updates, opt = solver.update(grad, opt, p, value=value, grad=grad,
                                         value_fn=loss_fn)
            return optax.apply_updates(p, updates), opt

        def going(carry):
            _, opt = carry
            count = optax.tree_utils.tree_get(opt, "count")
            norm = optax.tree_utils.tree_norm(optax.tree_utils.tree_get(opt, "grad"))
            return (count == 0) | ((count < steps) & (norm >= 1e-6))

        return jax.lax.while_loop(going, step, (p, solver.init(p)))[0]

    params = fit({"w": jnp.zeros((dim, num_classes), jnp.float32),
                  "b": jnp.zeros((num_classes,), jnp.float32)})

    def accuracy(x, y):
        if len(y) == 0:
            return float("nan")
        w, b = np.asarray(params["w"]), np.asarray(params["b"])
        logits = np.asarray(x, np.float32) @ w + b[None]
        return float(np.mean(np.argmax(logits, axis=-1) == y))

    return {"train_accuracy": accuracy(x_train, y_train),
            "test_accuracy": accuracy((x_test - mean) / std, y_test),
            "dim": int(dim), "num_train": len(y_train), "num_test": len(y_test)}


def _named_values(field: str, value: Any, key: str, what: str) -> list[tuple[str, Any]]:
    """A ``{name: value}`` field (a mapping or ``(name, value)`` pairs) as sorted pairs,
    checked: at least one, names are str, each once. Values are the caller's to check."""
    items = value.items() if isinstance(value, Mapping) else value
    try:
        pairs = [(k, v) for k, v in items]
    except (TypeError, ValueError):
        raise TypeError(f"{field}: expected {{{key}: {what}}}, got {value!r}.") from None
    if not pairs:
        raise ValueError(f"{field}: expected {{{key}: {what}}} with at least one {key}, got "
                         f"{value!r}.")
    if not all(isinstance(k, str) for k, _ in pairs):
        raise TypeError(f"{field}: expected {key} names as keys, got {value!r}.")
    if len({k for k, _ in pairs}) != len(pairs):
        raise ValueError(f"{field}: expected each {key} once, got {value!r}.")
    return sorted(pairs)


def _modality_names(value: Any, *, least: int) -> tuple[str, ...] | None:
    """A strategy's ``modalities`` field checked: None, or ``least`` or more distinct
    names, as a tuple."""
    if value is None:
        return None
    if isinstance(value, str) or not all(isinstance(m, str) for m in value):
        raise TypeError(f"modalities: expected a tuple of modality names, got {value!r}.")
    value = tuple(value)
    if len(value) < least or len(set(value)) != len(value):
        words = {1: "one", 2: "two"}.get(least, str(least))
        raise ValueError(f"modalities: expected {words} or more distinct names, got "
                         f"{value!r}.")
    return value


def _check_encoders(model: Any, strategy: str, what: str, names: Sequence[str], *,
                    also: Sequence[str] = ()) -> None:
    """Checks that ``model`` has ``encoders`` and that every one of ``names`` (a
    strategy's ``what``) is among them or ``also``; the errors name the strategy."""
    encoders = getattr(model, "encoders", None)
    if encoders is None or not hasattr(encoders, "keys"):
        raise TypeError(f"strategy: {strategy} needs a model with an `encoders` dict "
                        f"(MultimodalClassifier), got {type(model).__name__}.")
    check_modalities(f"strategy: {strategy} {what}", names, [*encoders, *also])


def _encoder_of(path: Sequence[Any]) -> str | None:
    """The modality whose encoder holds a parameter: ``encoders/<u>/...`` -> ``u``."""
    keys = [getattr(p, "key", getattr(p, "name", None)) for p in path]
    if len(keys) >= 2 and keys[0] == "encoders":
        return keys[1]
    return None


def _path_text(path: Sequence[Any]) -> str:
    return "/".join(str(getattr(p, "key", getattr(p, "name", p))) for p in path)


def _param_key(path: Sequence[Any]) -> tuple[str, ...]:
    """A parameter's path as names, the same for a tree of arrays or of ``nnx.Variable``
    objects (which add a trailing ``.value``)."""
    names = tuple(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p))))
                  for p in path)
    return names[:-1] if names and names[-1] == "value" else names


def _check_steps(strategy: Any, names: Sequence[str]) -> None:
    """A strategy's step fields checked: ``start_step`` an int >= 0, the others None or
    an int >= 0, and ``end_step`` (if given) > ``start_step``."""
    for name in names:
        value = getattr(strategy, name)
        if value is None and name != "start_step":
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"{name}: expected an int >= 0, got {value!r}.")
    end, start = getattr(strategy, "end_step", None), strategy.start_step
    if end is not None and end <= start:
        raise ValueError(f"end_step: expected > start_step ({start}), got {end}.")


def _non_negative(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(
            value) or value < 0:
        raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}.")
    return float(value)


def _momentum(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
            0 <= value < 1):
        raise ValueError(f"momentum: expected a number in [0, 1), got {value!r}.")
    return float(value)


def _positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(
            value) or value <= 0:
        raise ValueError(f"{name}: expected a finite number > 0, got {value!r}.")
    return float(value)
