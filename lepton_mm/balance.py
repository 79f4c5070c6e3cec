"""Balanced multimodal learning: keeping a fused model from leaning on one modality.

Trained jointly, a fused classifier often learns the easier modality and under-trains
the other (on AV-MNIST ``concat`` leans on the image). The methods here act on the
train step and go to ``fit(..., strategy=...)``:

* ``OGMGE``: On-the-fly Gradient Modulation with Generalisation Enhancement (Peng et
  al., "Balanced Multimodal Learning via On-the-fly Gradient Modulation", CVPR 2022):
  each step measures how much better each modality alone explains the labels and damps
  the gradient of the dominant modality's encoder, adding Gaussian noise to keep SGD's
  generalisation.

Pure functions do the arithmetic and can be used in any train step:
``label_scores`` (each modality's confidence in the true label with the others marked
absent) and ``ogm_ge_coefficients`` (the paper's Eq. 9-10).

A strategy is any object with ``modulate(model, batch, grads, key) -> (grads,
metrics)``, called inside the compiled step after the gradient and before the optimiser:
``model`` at the step's parameters, ``grads`` an ``nnx.State`` of float32 arrays like
the model's ``nnx.Param`` state, ``metrics`` a dict of float32 scalars that ``fit``
logs with each step. It must be hashable with a stable ``repr`` (a frozen dataclass):
``fit`` stores the ``repr`` to resume the same run.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from lepton_mm.types import RESERVED_KEYS

Array = jax.Array

__all__ = ["OGMGE", "label_scores", "ogm_ge_coefficients"]


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
    size = labels.shape[0]
    given = batch.get("present") or {}
    out = {}
    for u in modalities:
        own = jnp.ones((size,), bool) if given.get(u) is None else jnp.asarray(given[u])
        present = {m: own if m == u else jnp.zeros((size,), bool)
                   for m in batch if m not in RESERVED_KEYS}
        logits = model({**batch, "present": present}).astype(jnp.float32)
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
    ``noise`` is on. Fusion and head gradients are left alone. Logged per step:
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
        if self.modalities is not None:
            if isinstance(self.modalities, str) or not all(
                    isinstance(m, str) for m in self.modalities):
                raise TypeError(f"modalities: expected a tuple of modality names, got "
                                f"{self.modalities!r}.")
            if len(set(self.modalities)) < 2:
                raise ValueError(f"modalities: expected two or more distinct names, got "
                                 f"{self.modalities!r}.")
            object.__setattr__(self, "modalities", tuple(self.modalities))
        for name in ("start_step", "end_step"):
            value = getattr(self, name)
            if value is None and name == "end_step":
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise ValueError(f"{name}: expected an int >= 0, got {value!r}.")
        if self.end_step is not None and self.end_step <= self.start_step:
            raise ValueError(f"end_step: expected > start_step ({self.start_step}), got "
                             f"{self.end_step}.")

    def check(self, model: Any) -> None:
        """Errors before any compilation: the model must have the balanced encoders."""
        encoders = getattr(model, "encoders", None)
        if not isinstance(encoders, Mapping) and not hasattr(encoders, "keys"):
            raise TypeError(f"strategy: OGMGE needs a model with an `encoders` dict "
                            f"(MultimodalClassifier), got {type(model).__name__}.")
        names = self._names(model)
        missing = [m for m in names if m not in encoders]
        if missing:
            raise ValueError(f"strategy: OGMGE modalities {missing} are not encoders of the "
                             f"model (it has {sorted(encoders)}).")
        if len(names) < 2:
            raise ValueError(f"strategy: OGMGE needs two or more modalities, the model "
                             f"has {names}.")

    def _names(self, model: Any) -> list[str]:
        return sorted(self.modalities) if self.modalities else sorted(model.encoders)

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


def _encoder_of(path: Sequence[Any]) -> str | None:
    """The modality whose encoder holds a parameter: ``encoders/<u>/...`` -> ``u``."""
    keys = [getattr(p, "key", getattr(p, "name", None)) for p in path]
    if len(keys) >= 2 and keys[0] == "encoders":
        return keys[1]
    return None


def _path_text(path: Sequence[Any]) -> str:
    return "/".join(str(getattr(p, "key", getattr(p, "name", p))) for p in path)


def _positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(
            value) or value <= 0:
        raise ValueError(f"{name}: expected a finite number > 0, got {value!r}.")
    return float(value)
