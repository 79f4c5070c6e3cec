"""Adversarial robustness: FGSM and PGD on a batch's continuous inputs, robust accuracy.

Worst-case perturbations of the continuous modalities of a lepton_mm batch (image
pixels ``[batch, height, width, channels]``, log-mel features ``[batch, time, mels]``
with their frame mask), within an L∞ or L2 ball of radius ``eps`` around the clean
input:

* ``fgsm`` takes one signed (L∞) or normalised (L2) gradient step of size ``eps``;
* ``pgd`` takes ``steps`` such steps of size ``step_size``, projecting back into the
  ball (and an optional valid range) after each, from the clean input or, given a
  ``key``, from a uniformly random point of the ball;
* ``model_loss`` turns a model into the loss they maximise (softmax cross-entropy on
  ``batch["label"]`` by default, the model in eval mode), through
  ``lepton_mm.functional``;
* ``robust_accuracy`` is a classifier's accuracy on a dataset under PGD (or FGSM), for
  each radius of a sweep: one for every attacked modality, or one per modality.

What is never perturbed: modalities not attacked, padded frames (a tuple input's bool
mask ``[batch, time]`` False), absent examples (``batch["present"][m]`` False, see
``lepton_mm.robustness.mark_absent``) and padding rows (``batch["valid"]`` False):
their values in the output are bit-identical to the input's. The budget is per example
and per modality: ``||x_adv[m][i] - x[m][i]|| <= eps[m]`` for every attacked ``m`` and
example ``i`` (norms over the perturbable values), so modalities on different scales can
get different radii (``eps={"image": 8 / 255, "audio": 0.5}``).

``fgsm`` and ``pgd`` are pure functions: ``jax.grad`` is taken with respect to the
attacked inputs only, the loop is a ``lax.fori_loop``, and they run under ``jax.jit``
(``eps``, ``step_size`` and ``key`` may be traced; ``steps``, ``norm``, ``modalities``
and ``clip`` are Python values). Calls with the same model structure (or the same
``loss_fn`` object), modalities, norm and clip reuse one compiled program, whatever
``eps``, ``steps`` and the parameters. Inside a differentiated function (adversarial
training) the perturbation is a constant: parameter gradients are those of the loss at
the adversarial input, never through the attack's iterations.

References:
  Goodfellow, Shlens and Szegedy, "Explaining and Harnessing Adversarial Examples",
  ICLR 2015 (FGSM). Madry, Makelov, Schmidt, Tsipras and Vladu, "Towards Deep Learning
  Models Resistant to Adversarial Attacks", ICLR 2018 (PGD with a random start; the
  default step size ``2.5 * eps / steps``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lepton_mm._validation import check_frame_mask, check_key, check_positive_int
from lepton_mm.functional import functional
from lepton_mm.types import RESERVED_KEYS

__all__ = ["NORMS", "fgsm", "model_loss", "pgd", "robust_accuracy"]

Array = jax.Array
LossFn = Callable[[Mapping[str, Any]], Array]

#: The perturbation norms ``fgsm``, ``pgd`` and ``robust_accuracy`` accept.
NORMS = ("linf", "l2")



# ------------------------------------------------------------------------ the loss


def model_loss(model: nnx.Module, *, task: Any = None) -> LossFn:
    """The loss an attack maximises, from a model: ``batch -> float32 scalar``.

    ``loss_fn(batch) = task.loss(model(batch), batch, valid)`` with the model in eval
    mode (dropout off, batch norm on its running statistics) through
    ``lepton_mm.functional.functional``, and ``valid = batch["valid"]`` (all True when
    absent), so padding rows contribute nothing. The model's parameters are read when
    ``model_loss`` is called: call it inside a jitted train step on the traced model to
    attack the current parameters. ``fgsm`` and ``pgd`` recognise such a loss and
    compile the attack once per model structure, not once per call.

    Args:
      model: a Flax NNX module mapping a batch dict to outputs, e.g. a
        ``MultimodalClassifier`` with class logits ``[batch, num_classes]``; left
        unchanged (its train/eval mode included).
      task: a ``lepton_mm.models.tasks`` task (a hashable object with ``loss(outputs,
        batch, valid)``); default softmax cross-entropy on integer ``batch["label"]``
        (``Classification`` with the number of classes read from the logits).

    Returns:
      ``loss_fn(batch) -> float32 []``, pure (``jax.grad`` and ``jax.jit`` apply).

    Raises:
      TypeError: ``model`` is not an NNX module, or ``task`` has no ``loss`` method.
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model: expected a flax.nnx.Module, got {type(model).__name__}.")
    if task is not None and not callable(getattr(task, "loss", None)):
        raise TypeError(f"task: expected a lepton_mm.models.tasks task with a "
                        f"loss(outputs, batch, valid) method, got {type(task).__name__}.")
    try:
        hash(task)
    except TypeError:
        raise TypeError(f"task: expected a hashable task (e.g. a frozen dataclass such as "
                        f"lepton_mm.models.tasks.Classification), got "
                        f"{type(task).__name__}.") from None
    graphdef, state = nnx.split(model)
    return _BoundLoss(_ModelObjective(graphdef, task), nnx.as_pure(state),
                      getattr(model, "modalities", None))


@dataclasses.dataclass(frozen=True)
class _ModelObjective:
    """``(state, batch) -> loss`` for one model structure: hashable, so a static jit
    argument, and the attack compiles once per structure and task."""

    graphdef: Any
    task: Any

    def outputs(self, state: Any, batch: Mapping[str, Any]) -> Array:
        apply, variables = functional(nnx.merge(self.graphdef, state))
        return apply(variables, batch)  # eval mode

    def __call__(self, state: Any, batch: Mapping[str, Any]) -> Array:
        from lepton_mm.models.tasks import Classification

        outputs = self.outputs(state, batch)
        valid = batch.get("valid")
        if valid is None:
            valid = jnp.ones(outputs.shape[:1], bool)
        task = self.task
        if task is None:
            if outputs.ndim != 2:
                raise ValueError(f"model: the default loss needs class logits [batch, "
                                 f"num_classes], got shape {outputs.shape}; pass task=.")
            task = Classification(int(outputs.shape[-1]))
        return task.loss(outputs, batch, valid)


class _BoundLoss:
    """What ``model_loss`` returns: an objective and the model's state at that time."""

    def __init__(self, objective: _ModelObjective, state: Any,
                 modalities: Sequence[str] | None):
        self.objective, self.state, self.modalities = objective, state, modalities

    def __call__(self, batch: Mapping[str, Any]) -> Array:
        return _evaluate(self.objective, self.state, _arrays(batch))


@functools.partial(jax.jit, static_argnames="objective")
def _evaluate(objective: _ModelObjective, state: Any, batch: Mapping[str, Any]) -> Array:
    return objective(state, batch)


class _ByIdentity:
    """A user's ``loss_fn`` as a static jit argument, hashed and compared by identity."""

    def __init__(self, fn: LossFn):
        self.fn = fn

    def __call__(self, state: Any, batch: Mapping[str, Any]) -> Array:
        del state
        return self.fn(batch)

    def __hash__(self) -> int:
        return id(self.fn)

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, _ByIdentity) and other.fn is self.fn


# ----------------------------------------------------------------------- validation


def _is_tracer(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def _check_norm(norm: Any) -> str:
    if norm not in NORMS:
        raise ValueError(f"norm: expected one of {list(NORMS)}, got {norm!r}.")
    return norm


def _check_radius(name: str, value: Any, *, positive: bool = False) -> None:
    """A finite number >= 0 (> 0 with ``positive``); traced values are not read."""
    if _is_tracer(value):
        return
    if isinstance(value, bool) or not (isinstance(value, (int, float, np.number)) or (
            hasattr(value, "shape") and np.shape(value) == ())):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}.")
    v = float(value)
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        want = "> 0" if positive else ">= 0"
        raise ValueError(f"{name}: expected a finite number {want}, got {value!r}.")


def _per_modality(name: str, value: Any, names: tuple[str, ...], *,
                  positive: bool = False) -> dict[str, Any]:
    """A number or a mapping modality -> number, as ``{m: value}`` over ``names``."""
    if isinstance(value, Mapping):
        missing = [m for m in names if m not in value]
        extra = sorted(set(value) - set(names), key=str)
        if missing or extra:
            raise ValueError(f"{name}: expected a number or one entry per attacked "
                             f"modality {list(names)}; missing {missing}, unexpected "
                             f"{extra}.")
        out = {m: value[m] for m in names}
    else:
        out = dict.fromkeys(names, value)
    for m, v in out.items():
        _check_radius(name if not isinstance(value, Mapping) else f"{name}[{m!r}]", v,
                      positive=positive)
    return out


def _modality_names(batch: Mapping[str, Any]) -> list[str]:
    return sorted(k for k in batch if k not in RESERVED_KEYS)


def _features(batch: Mapping[str, Any], m: str) -> tuple[Any, Any]:
    """``(float features, bool frame mask or None)`` of modality ``m``, or None."""
    value = batch[m]
    if isinstance(value, (tuple, list)):
        if not value:
            return None, None
        x, rest = value[0], value[1:]
        mask = rest[0] if rest else None
    else:
        x, mask = value, None
    if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.floating) or (
            len(x.shape) < 1):
        return None, None
    if mask is not None:  # padded frames are never perturbed: a bad mask is an error
        check_frame_mask(f"batch[{m!r}][1]", mask, x, f"batch[{m!r}][0]")
    return x, mask


def _resolve_modalities(batch: Any, modalities: Any,
                        model_modalities: Sequence[str] | None) -> tuple[str, ...]:
    """The attacked modalities, sorted, after checking each against batch and model."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch: expected a dict modality name -> inputs (plus 'label', "
                        f"'present', 'valid'), got {type(batch).__name__}.")
    known = _modality_names(batch)
    if model_modalities is not None:
        known = [m for m in known if m in model_modalities]
    if modalities is None:
        names = [m for m in known if _features(batch, m)[0] is not None]
        if not names:
            raise ValueError(f"modalities: the batch has no continuous (float) modality "
                             f"to attack among {known}.")
        return tuple(names)
    names = [modalities] if isinstance(modalities, str) else list(modalities)
    if not names:
        raise ValueError("modalities: expected at least one modality name, got none.")
    for m in names:
        if not isinstance(m, str):
            raise TypeError(f"modalities: expected modality names (str), got {m!r}.")
        if m in RESERVED_KEYS:
            raise ValueError(f"modalities: {m!r} is a reserved batch key, not a modality.")
        if m not in batch:
            raise ValueError(f"modalities: the batch has no modality {m!r}; it has "
                             f"{_modality_names(batch)}.")
        if model_modalities is not None and m not in model_modalities:
            raise ValueError(f"modalities: the model has no encoder for {m!r}; it encodes "
                             f"{sorted(model_modalities)}.")
        if _features(batch, m)[0] is None:
            value = batch[m]
            first = value[0] if isinstance(value, (tuple, list)) and value else value
            dtype = getattr(first, "dtype", type(first).__name__)
            raise TypeError(f"modalities: {m!r} is not a continuous input (its features "
                            f"have dtype {dtype}); only float arrays, or a tuple (float "
                            f"features, bool mask), can be perturbed.")
    if len(set(names)) != len(names):
        raise ValueError(f"modalities: repeated names in {names}.")
    return tuple(sorted(names))


def _check_clip(clip: Any, names: tuple[str, ...]) -> tuple[tuple[str, float, float], ...]:
    if clip is None:
        return ()
    if not isinstance(clip, Mapping):
        raise TypeError(f"clip: expected a dict modality -> (low, high), got "
                        f"{type(clip).__name__}.")
    out = []
    for m, bounds in clip.items():
        if m not in names:
            raise ValueError(f"clip: {m!r} is not an attacked modality ({list(names)}).")
        try:
            lo, hi = (float(b) for b in bounds)
        except (TypeError, ValueError):
            raise TypeError(f"clip[{m!r}]: expected (low, high) numbers, got "
                            f"{bounds!r}.") from None
        if not lo <= hi:
            raise ValueError(f"clip[{m!r}]: expected low <= high, got ({lo}, {hi}).")
        out.append((m, lo, hi))
    return tuple(out)


def _resolve_loss(loss_fn: Any) -> tuple[Any, Any, Sequence[str] | None]:
    """``(static objective(state, batch), state, model modalities or None)``."""
    if isinstance(loss_fn, nnx.Module):
        loss_fn = model_loss(loss_fn)
    if isinstance(loss_fn, _BoundLoss):
        return loss_fn.objective, loss_fn.state, loss_fn.modalities
    if not callable(loss_fn):
        raise TypeError(f"loss_fn: expected a function batch -> scalar loss or an "
                        f"nnx.Module, got {type(loss_fn).__name__}.")
    return _ByIdentity(loss_fn), None, None


# --------------------------------------------------------------------- the attack


def _expand(flags: Array, ndim: int) -> Array:
    return flags.reshape(flags.shape + (1,) * (ndim - flags.ndim))


def _sum_per_example(x: Array) -> Array:
    return jnp.sum(x, axis=tuple(range(1, x.ndim)), keepdims=True)


def _l2(x: Array) -> Array:
    """Per-example L2 norm in float32, ``[batch, 1, ..., 1]``."""
    return jnp.sqrt(_sum_per_example(jnp.square(x.astype(jnp.float32))))


def _replace(batch: Mapping[str, Any], new: Mapping[str, Array]) -> dict[str, Any]:
    out = dict(batch)
    for m, x in new.items():
        value = batch[m]
        out[m] = (type(value)((x, *value[1:])) if isinstance(value, (tuple, list)) else x)
    return out


def _arrays(batch: Mapping[str, Any]) -> dict[str, Any]:
    """``batch`` without entries that are not arrays (e.g. None), for ``jax.jit``."""
    return {k: v for k, v in batch.items() if v is not None}


def _attack(loss_fn: LossFn, batch: Mapping[str, Any], eps: Mapping[str, Any],
            step_size: Mapping[str, Any], key: Array | None, *, names: tuple[str, ...],
            norm: str, steps: int, clip: tuple[tuple[str, float, float], ...]
            ) -> dict[str, Any]:
    """The shared FGSM/PGD loop (arguments already checked)."""
    x0, allow = {}, {}
    present = batch.get("present") or {}
    valid = batch.get("valid")
    for m in names:
        x, frames = _features(batch, m)
        x = jnp.asarray(x)
        ok = jnp.ones(x.shape, bool)
        if frames is not None:
            ok = ok & _expand(jnp.asarray(frames), x.ndim)
        if present.get(m) is not None:
            ok = ok & _expand(jnp.asarray(present[m]), x.ndim)
        if valid is not None:
            ok = ok & _expand(jnp.asarray(valid), x.ndim)
        x0[m], allow[m] = x, ok
    eps = {m: jnp.asarray(eps[m], jnp.float32) for m in names}
    step_size = {m: jnp.asarray(step_size[m], jnp.float32) for m in names}
    # A perturbation never moves a value further outside its clip range: an input
    # already outside it may stay where it is (so eps = 0 returns the input).
    bounds = {m: (jnp.minimum(lo - x0[m], 0), jnp.maximum(hi - x0[m], 0))
              for m, lo, hi in clip}

    def project(m: str, d: Array) -> Array:
        d = jnp.where(allow[m], d, jnp.zeros((), d.dtype))
        e = eps[m].astype(d.dtype)
        if norm == "linf":
            d = jnp.clip(d, -e, e)
        else:
            n = _l2(d)
            scale = jnp.where(n > eps[m], eps[m] / jnp.where(n > 0, n, 1), 1)
            d = d * scale.astype(d.dtype)
        if m in bounds:  # coordinate-wise towards 0: stays inside the ball
            d = jnp.clip(d, *bounds[m])
        return d

    def direction(m: str, g: Array) -> Array:
        g = jnp.where(allow[m], g, jnp.zeros((), g.dtype))
        if norm == "linf":
            return jnp.sign(g)
        n = _l2(g)
        return (g.astype(jnp.float32) / jnp.where(n > 0, n, 1)).astype(g.dtype)

    def objective(x: dict[str, Array]) -> Array:
        loss = loss_fn(_replace(batch, x))
        if jnp.shape(loss) != ():
            raise ValueError(f"loss_fn: expected a scalar loss, got shape "
                             f"{jnp.shape(loss)}.")
        return loss

    grad = jax.grad(objective)

    def start(m: str) -> Array:
        x = x0[m]
        if key is None:
            return jnp.zeros_like(x)
        # By the modality's name (its CRC-32), as lepton_mm.augment: attacking another
        # set of modalities never changes this one's start.
        tag = zlib.crc32(m.encode("utf-8")) & 0x7FFFFFFF
        k_dir, k_rad = jax.random.split(jax.random.fold_in(key, tag))
        if norm == "linf":
            u = jax.random.uniform(k_dir, x.shape, jnp.float32, -1.0, 1.0)
            return (eps[m] * u).astype(x.dtype)
        # Uniform in the L2 ball over the perturbable values: a Gaussian direction,
        # radius eps * U^(1/d) with d the number of perturbable values of the example.
        z = jnp.where(allow[m], jax.random.normal(k_dir, x.shape, jnp.float32), 0.0)
        d = jnp.maximum(_sum_per_example(allow[m].astype(jnp.float32)), 1.0)
        u = jax.random.uniform(k_rad, d.shape, jnp.float32)
        n = _l2(z)
        return (z / jnp.where(n > 0, n, 1) * eps[m] * u ** (1.0 / d)).astype(x.dtype)

    delta = {m: project(m, start(m)) for m in names}

    def body(_, delta):
        g = grad({m: x0[m] + delta[m] for m in names})
        return {m: project(m, delta[m] + step_size[m].astype(delta[m].dtype)
                           * direction(m, g[m])) for m in names}

    delta = jax.lax.stop_gradient(jax.lax.fori_loop(0, steps, body, delta))
    out = {}
    for m in names:
        x, d = x0[m], delta[m]
        adv = jnp.where(allow[m] & (d != 0), x + d, x)  # untouched values: bit-identical
        if m in bounds:
            lo, hi = next((lo, hi) for c, lo, hi in clip if c == m)
            adv = jnp.clip(adv, jnp.minimum(lo, x), jnp.maximum(hi, x))  # rounding
        out[m] = adv
    return _replace(batch, out)


@functools.partial(jax.jit, static_argnames=("objective", "names", "norm", "clip"))
def _compiled(objective: Any, state: Any, batch: Mapping[str, Any], eps: Any,
              step_size: Any, key: Array | None, steps: Any, *, names: tuple[str, ...],
              norm: str, clip: tuple[tuple[str, float, float], ...]) -> dict[str, Array]:
    """``_attack`` compiled once per objective (model structure), modalities, norm and
    clip (``steps`` is traced: FGSM and PGD of any length share one program); returns
    only the new features, so ``batch``'s other entries are kept as objects."""
    # The perturbation is a constant to any outer differentiation (adversarial
    # training differentiates the loss at x + delta w.r.t. the parameters only).
    state, eps, step_size = jax.lax.stop_gradient((state, eps, step_size))
    adv = _attack(functools.partial(objective, state), batch, eps, step_size, key,
                  names=names, norm=norm, steps=steps, clip=clip)
    return {m: _features(adv, m)[0] for m in names}


def fgsm(loss_fn: LossFn | nnx.Module, batch: Mapping[str, Any], *,
         eps: float | Mapping[str, float], modalities: str | Sequence[str] | None = None,
         norm: str = "linf", clip: Mapping[str, tuple[float, float]] | None = None
         ) -> dict[str, Any]:
    """The fast gradient sign method: one gradient step of size ``eps`` on the inputs.

    ``x_adv = x + eps * sign(grad_x loss)`` (L∞) or ``x + eps * g / ||g||`` (L2, per
    example, the "fast gradient method"), on the perturbable values of each attacked
    modality (see the module docstring), then clipped to ``clip``. Equal to
    ``pgd(..., steps=1, step_size=eps)`` without a random start.

    Args:
      loss_fn: ``loss_fn(batch) -> scalar`` to maximise, or a model (then
        ``model_loss(model)``: softmax cross-entropy on ``batch["label"]``, eval mode).
      batch: a batch dict (``lepton_mm.models``): images float ``[batch, height, width,
        channels]``, audio ``(log_mel float [batch, time, mels], mask bool [batch,
        time])``, optional ``"present"``, ``"valid"``, ``"label"``.
      eps: the radius (>= 0) in the units of the inputs, or a dict modality -> radius.
      modalities: the modality or modalities to perturb (default: every float input of
        the batch the model, if given, encodes).
      norm: ``"linf"`` or ``"l2"`` (per example and per modality).
      clip: modality -> ``(low, high)``, e.g. ``{"image": (0.0, 1.0)}``: the
        adversarial values stay in that range (an input already outside it is never
        pushed further out).

    Returns:
      A new batch dict: the attacked modalities' features replaced by JAX arrays of the
      same shape and dtype, every other entry the same object as in ``batch``.

    Raises:
      ValueError: ``eps`` negative or not finite, unknown ``norm``, a modality the batch
        (or the model) lacks, a bad ``clip``.
      TypeError: a modality that is not continuous (e.g. int token ids), a
        ``loss_fn`` that is not callable.

    Examples:
      >>> import jax.numpy as jnp, numpy as np
      >>> w = jnp.array([[1.0, -2.0, 0.0]])
      >>> loss = lambda b: jnp.sum(b["x"] * w)
      >>> fgsm(loss, {"x": np.zeros((1, 3), np.float32)}, eps=0.5)["x"]
      Array([[ 0.5, -0.5,  0. ]], dtype=float32)
    """
    objective, state, model_modalities = _resolve_loss(loss_fn)
    norm = _check_norm(norm)
    names = _resolve_modalities(batch, modalities, model_modalities)
    eps = _per_modality("eps", eps, names)
    bounds = _check_clip(clip, names)
    new = _compiled(objective, state, _arrays(batch), eps, eps, None, 1, names=names,
                    norm=norm, clip=bounds)
    return _replace(batch, new)


def pgd(loss_fn: LossFn | nnx.Module, batch: Mapping[str, Any], *,
        eps: float | Mapping[str, float], steps: int,
        step_size: float | Mapping[str, float] | None = None,
        modalities: str | Sequence[str] | None = None, norm: str = "linf",
        clip: Mapping[str, tuple[float, float]] | None = None,
        key: Array | None = None) -> dict[str, Any]:
    """Projected gradient descent (ascent on the loss) inside an L∞ or L2 ball.

    From the clean input (or, given ``key``, a uniformly random point of the ball),
    ``steps`` times: ``delta += step_size * sign(g)`` (L∞) or ``step_size * g / ||g||``
    (L2, per example), then ``delta`` is projected onto the ``eps``-ball and into
    ``clip``. Padded frames, absent examples and padding rows are never perturbed. The
    last iterate is returned (as in Madry et al.).

    Args:
      loss_fn: ``loss_fn(batch) -> scalar`` to maximise, or a model (then
        ``model_loss(model)``). A plain function is compiled once per function object:
        reuse one object across calls (a new lambda per call compiles again).
      batch: a batch dict, as for ``fgsm``.
      eps: the radius (>= 0), or a dict modality -> radius.
      steps: number of gradient steps (>= 1).
      step_size: size of each step (> 0), or a dict modality -> size; default
        ``2.5 * eps / steps``.
      modalities: the modality or modalities to perturb (default: every float input).
      norm: ``"linf"`` or ``"l2"``.
      clip: modality -> ``(low, high)`` valid range, as for ``fgsm``.
      key: a PRNG key for a random start inside the ball (modality ``m`` draws with
        ``fold_in(key, crc32(m))``, so the set of attacked modalities never changes
        one's start); None starts at the clean input. The same key gives the same
        result.

    Returns:
      A new batch dict with the attacked features replaced, as for ``fgsm``.

    Raises:
      ValueError: ``eps`` negative, ``steps`` < 1, ``step_size`` <= 0, unknown
        ``norm``, a modality the batch (or the model) lacks, a bad ``clip``.
      TypeError: a modality that is not continuous, a ``loss_fn`` that is not callable.

    Examples:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> loss = lambda b: -jnp.sum((b["x"] - 0.3) ** 2)  # maximal at x = 0.3
      >>> x = {"x": np.zeros((1, 2), np.float32)}
      >>> adv = pgd(loss, x, eps=1.0, steps=20, step_size=0.05)["x"]
      >>> bool(jnp.allclose(adv, 0.3, atol=0.05)), fgsm(loss, x, eps=1.0)["x"].tolist()
      (True, [[1.0, 1.0]])
    """
    objective, state, model_modalities = _resolve_loss(loss_fn)
    norm = _check_norm(norm)
    steps = check_positive_int("steps", steps)
    names = _resolve_modalities(batch, modalities, model_modalities)
    eps = _per_modality("eps", eps, names)
    if step_size is None:
        step_size = {m: 2.5 * e / steps for m, e in eps.items()}
    else:
        step_size = _per_modality("step_size", step_size, names, positive=True)
    bounds = _check_clip(clip, names)
    key = None if key is None else check_key(key)
    new = _compiled(objective, state, _arrays(batch), eps, step_size, key, steps,
                    names=names, norm=norm, clip=bounds)
    return _replace(batch, new)


# --------------------------------------------------------------------- evaluation


def robust_accuracy(model: nnx.Module, data: Mapping[str, Any], *,
                    eps_values: Sequence[float | Mapping[str, float]], batch_size: int,
                    modalities: str | Sequence[str] | None = None, norm: str = "linf",
                    steps: int = 10,
                    step_size: float | Mapping[str, float] | None = None,
                    clip: Mapping[str, tuple[float, float]] | None = None,
                    key: Array | None = None, attack: str = "pgd") -> np.ndarray:
    """A classifier's accuracy under a PGD (or FGSM) attack, for each radius of a sweep.

    For each entry of ``eps_values``, every example of ``data`` is attacked by ``pgd``
    (or ``fgsm``) with ``model_loss(model)`` (cross-entropy on its label, model in eval
    mode) on ``modalities`` and classified by ``argmax`` of the model's logits. An entry
    is one radius for every attacked modality, or a dict modality -> radius that gives
    each its own, in its own units (``{"image": 0.03, "audio": 0.01}``: pixels in [0, 1]
    and a standardised log-mel are attacked at once, each within its own ball). An entry
    whose radii are all 0 is the clean accuracy (no attack is run); a radius of 0 for
    one modality leaves it untouched while the others are attacked. Examples are
    processed ``batch_size`` at a time, the last chunk padded with repeats marked
    invalid (never perturbed, never counted), with the programs compiled once for the
    whole sweep (and shared with ``pgd`` and ``fgsm`` on the same model structure,
    modalities, norm and clip). The model is captured when called (its parameters and
    mode are left unchanged).

    Args:
      model: a classifier (e.g. ``MultimodalClassifier``) whose output is class logits
        float ``[batch, num_classes]``.
      data: a batch dict of ``n >= 1`` examples (numpy or JAX arrays) with every
        modality the model encodes and ``"label"``: int ``[n]``; optional
        ``"present"`` and ``"valid"`` (rows with ``valid`` False are not counted).
      eps_values: the sweep: each entry a radius (>= 0, in the units of the inputs)
        for every attacked modality, or a dict naming every attacked modality and no
        other -> its radius (>= 0, in that modality's units); entries of both forms
        may be mixed.
      batch_size: examples per attacked chunk.
      modalities: the modality or modalities to perturb (default: every float input
        the model encodes).
      norm: ``"linf"`` or ``"l2"`` (per example and per modality).
      steps: PGD steps per attack (>= 1); unused by FGSM (one step).
      step_size: the PGD step size (> 0) for every radius, or a dict attacked
        modality -> step size; default ``2.5 * eps / steps`` for each radius (per
        modality). Not accepted with FGSM (its step is ``eps``).
      clip: modality -> ``(low, high)`` valid range, as for ``pgd`` (attacked
        modalities only).
      key: a PRNG key for PGD's random start (chunk ``c`` uses ``fold_in(key, c)``, so
        results depend on ``batch_size``); None starts at the clean input. Unused by
        FGSM (no random start).
      attack: ``"pgd"`` or ``"fgsm"`` (one gradient step of size ``eps`` from the clean
        input: ``fgsm``).

    Returns:
      numpy float64 ``[len(eps_values)]``: the accuracy at each entry of the sweep.

    Raises:
      ValueError: an ``eps_values`` entry negative, or a dict entry missing an
        attacked modality or naming another (the error names ``eps_values[i]``),
        ``steps`` or ``batch_size`` < 1, ``step_size`` <= 0 (or given with FGSM),
        unknown ``norm`` or ``attack``, a modality the model or data lacks, no labels.
      TypeError: ``model`` is not an NNX module, a modality that is not continuous,
        ``eps_values`` not a sequence (a single dict: wrap it in a list).

    Examples:
      >>> import jax.numpy as jnp, numpy as np
      >>> from flax import nnx
      >>> class Linear(nnx.Module):  # logits [0, sum(image) + sum(audio)]
      ...     modalities = ("audio", "image")
      ...     def __call__(self, batch):
      ...         s = batch["image"].sum((1, 2)) + batch["audio"].sum(1)
      ...         return jnp.stack([jnp.zeros_like(s), s], -1)
      >>> data = {"image": np.full((2, 2, 2), 0.1, np.float32),  # 4 values: s = 0.4
      ...         "audio": np.zeros((2, 3), np.float32), "label": np.ones(2, np.int32)}
      >>> robust_accuracy(Linear(), data, batch_size=2, eps_values=[
      ...     0.0, 0.05, {"image": 0.05, "audio": 0.1}, {"image": 0.0, "audio": 0.2}])
      array([1., 1., 0., 0.])
    """
    from lepton_mm._validation import check_array
    from lepton_mm.models.classifier import check_batch

    if not isinstance(model, nnx.Module):
        raise TypeError(f"model: expected a flax.nnx.Module, got {type(model).__name__}.")
    if attack not in ("pgd", "fgsm"):
        raise ValueError(f"attack: expected 'pgd' or 'fgsm', got {attack!r}.")
    norm = _check_norm(norm)
    steps = check_positive_int("steps", steps)
    batch_size = check_positive_int("batch_size", batch_size)
    model_modalities = getattr(model, "modalities", None)
    names = _resolve_modalities(data, modalities, model_modalities)
    if isinstance(eps_values, (str, Mapping)) or not hasattr(eps_values, "__iter__"):
        hint = " (one dict of radii is one entry: wrap it in a list)" if isinstance(
            eps_values, Mapping) else ""
        raise TypeError(f"eps_values: expected a sequence of radii (numbers or dicts "
                        f"modality -> radius){hint}, got {type(eps_values).__name__}.")
    eps_values = list(eps_values)
    if not eps_values:
        raise ValueError("eps_values: expected at least one radius, got none.")
    # Python floats, one dict structure: every entry reuses one compiled program.
    sweep = [{m: float(e) for m, e in _per_modality(f"eps_values[{i}]", value,
                                                    names).items()}
             for i, value in enumerate(eps_values)]
    if step_size is not None:
        if attack == "fgsm":
            raise ValueError("step_size: FGSM takes one step of size eps; expected None.")
        step_size = {m: float(s) for m, s in _per_modality("step_size", step_size, names,
                                                           positive=True).items()}
    bounds = _check_clip(clip, names)
    key = None if key is None else check_key(key)
    n = check_batch(data, model_modalities or tuple(names), who=type(model).__name__)
    if n == 0:
        raise ValueError("data: expected at least one example, got 0.")
    if "label" not in data:
        raise ValueError("data: expected a 'label' entry (int [n]) to compute accuracy.")
    check_array("data['label']", data["label"], str(n), kind="int")

    loss = model_loss(model)
    valid = np.ones(n, bool) if data.get("valid") is None else np.asarray(data["valid"])
    total = max(int(valid.sum()), 1)
    chunks = []
    for c, i in enumerate(range(0, n, batch_size)):
        rows = np.arange(i, i + batch_size) % n  # pad with repeats, marked invalid
        chunk = jax.tree.map(lambda a, r=rows: a[r], _arrays(data))
        chunk["valid"] = valid[rows] & (np.arange(i, i + batch_size) < n)
        chunks.append((chunk, None if key is None or attack == "fgsm"
                       else jax.random.fold_in(key, c)))
    out = []
    for eps in sweep:
        if attack == "fgsm":  # as fgsm(): one step of size eps, no random start
            step, count = eps, 1
        else:
            step = step_size or {m: 2.5 * e / steps for m, e in eps.items()}
            count = steps
        hits = []
        for chunk, k in chunks:
            if any(eps.values()):
                chunk = _replace(chunk, _compiled(
                    loss.objective, loss.state, chunk, eps, step, k, count, names=names,
                    norm=norm, clip=bounds))
            hits.append(_count_correct(loss.objective, loss.state, chunk))
        out.append(float(sum(int(h) for h in hits)) / total)
    return np.asarray(out, np.float64)


@functools.partial(jax.jit, static_argnames="objective")
def _count_correct(objective: _ModelObjective, state: Any, batch: Mapping[str, Any]
                   ) -> Array:
    predictions = jnp.argmax(objective.outputs(state, batch), axis=-1)
    return jnp.sum((predictions == batch["label"]) & batch["valid"])
