"""Attribution: how much each modality, and each input value, contributed to an output.

Two levels:

* ``modality_shapley``: exact Shapley values over the modalities, per example. The
  batch format makes "modality absent" a well-defined input (``batch["present"][m]``
  False, honoured by every fusion layer), so the value of a coalition ``S`` of
  modalities is simply the model's output with only ``S`` present. With ``M``
  modalities the exact values need the ``2^M`` coalitions' outputs; ``M`` is small
  (2-4) in multimodal models, so nothing is sampled or approximated.

* ``integrated_gradients`` and ``gradient_x_input``: attribution to the values of one
  continuous input (image pixels ``[batch, height, width, channels]``, log-mel frames
  ``[batch, time, mels]``), for a scalar-per-example function of it (e.g. the target
  logit with the other modalities held fixed). Padded positions (``mask`` False) get
  exactly 0.

All three are pure functions of their arguments (the model is copied into eval mode,
never modified) and work under ``jax.jit`` where the model or ``fn`` does.

References:
  Shapley, "A Value for n-Person Games", in Contributions to the Theory of Games II
  (Annals of Mathematics Studies 28), Princeton University Press, 1953.

  Sundararajan, Taly and Yan, "Axiomatic Attribution for Deep Networks", ICML 2017
  (integrated gradients).

  Shrikumar, Greenside, Shcherbina and Kundaje, "Not Just a Black Box: Learning
  Important Features Through Propagating Activation Differences", arXiv:1605.01713,
  2016 (gradient times input).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lepton_mm._validation import check_positive_int
from lepton_mm.types import RESERVED_KEYS

__all__ = ["MAX_MODALITIES", "ModalityShapley", "gradient_x_input", "integrated_gradients",
           "modality_shapley", "shapley_weights"]

Array = jax.Array

MAX_MODALITIES = 12
"""The most modalities ``modality_shapley`` accepts (``2^12`` forward passes)."""


class ModalityShapley(NamedTuple):
    """Per-example Shapley values of the modalities, with the two ends of the sum.

    Completeness: ``sum(values[m] for m in values) == full - base`` per example (to
    float rounding).

    Attributes:
      values: ``{modality: float32 [batch]}``, the Shapley value of each modality.
      base: float32 ``[batch]``, ``v(empty set)``: the output with every attributed
        modality absent.
      full: float32 ``[batch]``, ``v(all)``: the output with every attributed modality
        present (where the example has it).
      target: int32 ``[batch]``, the class whose logit was attributed (-1 where the
        model's output is already a scalar per example).
    """

    values: dict[str, Array]
    base: Array
    full: Array
    target: Array


# ---------------------------------------------------------------------------- Shapley


def shapley_weights(num_players: int) -> np.ndarray:
    """The Shapley weight of a coalition of each size: ``|S|! (M - |S| - 1)! / M!``.

    Args:
      num_players: ``M`` (>= 1).

    Returns:
      float64 ``[M]``: entry ``s`` is the weight of a coalition of ``s`` players (not
      containing the player being valued). ``sum_s C(M - 1, s) * w[s] == 1``.

    Examples:
      >>> shapley_weights(2).tolist()
      [0.5, 0.5]
      >>> [round(w, 4) for w in shapley_weights(3).tolist()]
      [0.3333, 0.1667, 0.3333]
    """
    m = check_positive_int("num_players", num_players)
    return np.array([math.factorial(s) * math.factorial(m - s - 1) / math.factorial(m)
                     for s in range(m)])


def _players(batch: Mapping[str, Any], modalities: Sequence[str] | None) -> tuple[str, ...]:
    known = sorted(k for k in batch if k not in RESERVED_KEYS)
    if modalities is None:
        names = known
    else:
        names = [modalities] if isinstance(modalities, str) else list(modalities)
        for m in names:
            if not isinstance(m, str) or m in RESERVED_KEYS or m not in batch:
                raise ValueError(f"modalities: unrecognized modality {m!r}. The batch has "
                                 f"modalities {known}.")
        if len(set(names)) != len(names):
            raise ValueError(f"modalities: each modality once, got {names}.")
    if not names:
        raise ValueError("modalities: no modality to attribute (the batch has none).")
    if len(names) > MAX_MODALITIES:
        raise ValueError(f"modalities: exact Shapley values need 2^M forward passes; at most "
                         f"{MAX_MODALITIES} modalities, got {len(names)}.")
    return tuple(names)


def _batch_size(batch: Mapping[str, Any], modality: str) -> int:
    leaves = jax.tree_util.tree_leaves(batch[modality])
    if not leaves or np.ndim(leaves[0]) == 0:
        raise ValueError(f"batch[{modality!r}]: expected arrays with a leading batch axis.")
    return int(np.shape(leaves[0])[0])


def _eval_forward(model: Any) -> Callable[[Mapping[str, Any]], Array]:
    """``batch -> output`` with ``model`` in eval mode, leaving ``model`` itself alone."""
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover - flax is a dependency
        nnx = None
    if nnx is not None and isinstance(model, nnx.Module):
        graphdef, state = nnx.split(model)
        copy = nnx.merge(graphdef, state)  # shares the arrays; eval() leaves model alone
        copy.eval()
        graphdef, state = nnx.split(copy)

        def forward(batch):
            return nnx.merge(graphdef, state)(batch)

        return forward
    if not callable(model):
        raise TypeError(f"model: expected a callable batch -> outputs, got "
                        f"{type(model).__name__}.")
    return model


def _coalition_forward(model: Any, batch: Mapping[str, Any], players: tuple[str, ...],
                       own: Mapping[str, Array]) -> Callable[[Array], Array]:
    """``holds -> output`` of ``model`` with only the players where ``holds`` is True.

    A ``MultimodalClassifier`` is encoded once (eval mode, each example's own
    ``present`` flags applied) and only its fusion layer and head run per coalition,
    with the absent players marked through ``apply_presence``: exactly what its
    ``__call__`` computes with those flags, since an encoder's output does not depend
    on the other modalities or on the flags. Any other model runs whole per coalition.
    """
    from lepton_mm.models.classifier import MultimodalClassifier, apply_presence

    given = batch.get("present") or {}
    forward = _eval_forward(model)
    if isinstance(model, MultimodalClassifier):
        from flax import nnx

        graphdef, state = nnx.split(model)
        copy = nnx.merge(graphdef, state)
        copy.eval()
        encoded = copy.encode(batch)

        def value(holds: Array) -> Array:
            inputs = dict(encoded)
            for i, m in enumerate(players):
                inputs[m] = apply_presence(encoded[m], own[m] & holds[i])
            return jnp.asarray(copy.head(copy.fusion(inputs))).astype(jnp.float32)

        return value

    def value(holds: Array) -> Array:
        present = dict(given)
        for i, m in enumerate(players):
            present[m] = own[m] & holds[i]
        return jnp.asarray(forward({**batch, "present": present})).astype(jnp.float32)

    return value


def modality_shapley(model: Any, batch: Mapping[str, Any], *, target: Any = None,
                     modalities: Sequence[str] | None = None) -> ModalityShapley:
    """Exact per-example Shapley values of the modalities for a model's output.

    The players are the modalities; the value of a coalition ``S`` is the model's
    output, per example, with only the modalities in ``S`` present (the others marked
    absent through ``batch["present"]``; ``v(empty set)`` has all of them absent).
    The output is the logit of ``target`` (default: the class the full model predicts).
    Modality ``i`` gets

        ``phi_i = sum_{S not containing i} |S|! (M - |S| - 1)! / M! * (v(S + i) - v(S))``

    over all ``2^(M-1)`` coalitions without ``i`` (``M`` players; ``shapley_weights``),
    so ``sum_i phi_i = v(all) - v(empty set)`` (completeness). An example whose own
    ``present[m]`` is False keeps ``m`` absent in every coalition: ``m`` is then a null
    player and its value is exactly 0.

    The ``2^M`` coalitions run inside one ``jax.lax.map`` (one trace, however many
    coalitions). A ``lepton_mm.models.MultimodalClassifier`` is encoded once and only its
    fusion layer and head run per coalition (the encoders are most of the cost: about
    ``2^M / M`` times less work); any other model runs whole per coalition. An
    ``nnx.Module`` runs in eval mode on a copy; ``model`` is not modified. Modalities
    not in ``modalities`` keep their own ``present`` flags in every coalition.

    Args:
      model: ``batch -> outputs``, JAX-traceable and honouring ``batch["present"]``
        (``lepton_mm.models.MultimodalClassifier``): float ``[batch, classes]`` logits,
        or float ``[batch]`` (a scalar per example, attributed as is).
      batch: a batch dict (``lepton_mm.models``): modality -> arrays with a leading
        ``[batch]`` axis, optionally ``"present"`` (modality -> bool ``[batch]``).
      target: the class to attribute: an int, or int ``[batch]`` (one per example).
        Default: the argmax of the full model's logits. Must be None for ``[batch]``
        outputs.
      modalities: the players, each a modality of ``batch`` (default: all of them, in
        sorted order); at most ``MAX_MODALITIES``.

    Returns:
      A ``ModalityShapley``: ``values`` ``{modality: float32 [batch]}``, ``base`` and
      ``full`` float32 ``[batch]``, ``target`` int32 ``[batch]``.

    Raises:
      ValueError: an unknown or repeated modality (naming ``modalities``); model outputs
        of another shape (naming ``model``); a ``target`` of the wrong shape or out of
        range.
      TypeError: ``batch`` is not a mapping, or ``model`` is not callable.

    Examples:
      >>> import jax.numpy as jnp
      >>> def toy(batch):  # v(S) = 1*[a] + 3*[b] + 2*[a and b]
      ...     a, b = batch["present"]["a"], batch["present"]["b"]
      ...     return 1.0 * a + 3.0 * b + 2.0 * (a & b)
      >>> out = modality_shapley(toy, {"a": jnp.zeros((1, 2)), "b": jnp.zeros((1, 2))})
      >>> float(out.values["a"][0]), float(out.values["b"][0]), float(out.full[0])
      (2.0, 4.0, 6.0)
    """
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch: expected a dict modality name -> arrays, got "
                        f"{type(batch).__name__}.")
    players = _players(batch, modalities)
    _eval_forward(model)  # a clear error for a model that is not callable
    size = _batch_size(batch, players[0])
    given = batch.get("present") or {}
    if not isinstance(given, Mapping):
        raise TypeError(f"batch['present']: expected a dict modality -> bool [batch], got "
                        f"{type(given).__name__}.")
    own = {}
    for m in players:
        flags = jnp.ones((size,), bool) if given.get(m) is None else jnp.asarray(given[m])
        if flags.shape != (size,) or flags.dtype != jnp.bool_:
            raise ValueError(f"batch['present'][{m!r}]: expected bool [batch] = ({size},), "
                             f"got {flags.dtype} {tuple(flags.shape)}.")
        own[m] = flags
    num = len(players)
    # Coalition c holds player i iff bit i of c is set: 0 is the empty set, 2^M - 1 all.
    bits = (np.arange(2 ** num)[:, None] >> np.arange(num)[None, :]) & 1
    coalitions = jnp.asarray(bits.astype(bool))  # bool [2^M, M]

    # [2^M, batch] or [2^M, batch, classes]
    outputs = jax.lax.map(_coalition_forward(model, batch, players, own), coalitions)
    if outputs.ndim == 2 and outputs.shape[1] == size:
        if target is not None:
            raise ValueError("target: the model's output is already a scalar per example "
                             "(float [batch]); leave target None.")
        values = outputs
        chosen = jnp.full((size,), -1, jnp.int32)
    elif outputs.ndim == 3 and outputs.shape[1] == size:
        classes = outputs.shape[2]
        chosen = _target(target, outputs[-1], size, classes)
        values = jnp.take_along_axis(
            outputs, jnp.broadcast_to(chosen[None, :, None], (outputs.shape[0], size, 1)),
            axis=-1)[..., 0]
    else:
        raise ValueError(f"model: expected outputs float [batch] or [batch, classes] with "
                         f"batch = {size}, got shape {tuple(outputs.shape[1:])}.")
    weights = shapley_weights(num)
    shapley = {}
    for i, m in enumerate(players):
        without = np.flatnonzero(bits[:, i] == 0)  # coalitions S not holding i
        sizes = bits[without].sum(axis=1)
        w = jnp.asarray(weights[sizes], jnp.float32)  # [2^(M-1)]
        diffs = values[without + 2 ** i] - values[without]  # [2^(M-1), batch]
        phi = jnp.einsum("s,sb->b", w, diffs)
        shapley[m] = jnp.where(own[m], phi, jnp.zeros((), jnp.float32))
    return ModalityShapley(shapley, values[0], values[-1], chosen)


def _target(target: Any, logits: Array, size: int, classes: int) -> Array:
    """The target class per example, int32 ``[batch]``."""
    if target is None:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if isinstance(target, bool):
        raise TypeError(f"target: expected an int or int [batch], got {target!r}.")
    t = jnp.asarray(target)
    if not jnp.issubdtype(t.dtype, jnp.integer):
        raise TypeError(f"target: expected an int or int [batch], got dtype {t.dtype}.")
    if t.ndim == 0:
        t = jnp.broadcast_to(t, (size,))
    if t.shape != (size,):
        raise ValueError(f"target: expected an int or int [batch] = ({size},), got shape "
                         f"{tuple(t.shape)}.")
    if not isinstance(t, jax.core.Tracer) and bool(jnp.any((t < 0) | (t >= classes))):
        raise ValueError(f"target: classes must lie in [0, {classes}), got {np.asarray(t)}.")
    return t.astype(jnp.int32)


# ------------------------------------------------------------------ input gradients


def _check_inputs(inputs: Any) -> Array:
    x = jnp.asarray(inputs)
    if x.ndim < 1 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"inputs: expected float [batch, ...], got {x.dtype} "
                         f"{tuple(x.shape)}.")
    return x


def _check_mask(mask: Any, x: Array) -> Array | None:
    """``mask`` bool ``x.shape[:k]`` broadcast to ``x.shape`` (None stays None)."""
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_ or mask.ndim < 1 or tuple(mask.shape) != tuple(
            x.shape[:mask.ndim]):
        raise ValueError(f"mask: expected bool with the leading axes of inputs "
                         f"{tuple(x.shape)} (e.g. [batch, time]), got {mask.dtype} "
                         f"{tuple(mask.shape)}.")
    mask = mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim))
    return jnp.broadcast_to(mask, x.shape)


def _per_example_grad(fn: Callable[[Array], Array], x: Array) -> Array:
    """``d fn(x)[b] / d x[b]`` for every example ``b`` (examples must not interact)."""

    def total(z):
        out = jnp.asarray(fn(z))
        if out.shape != x.shape[:1]:
            raise ValueError(f"fn: expected outputs float [batch] = {x.shape[:1]} (a scalar "
                             f"per example), got shape {tuple(out.shape)}.")
        return jnp.sum(out.astype(jnp.float32))

    return jax.grad(total)(x)


def gradient_x_input(fn: Callable[[Array], Array], inputs: Array, *,
                     mask: Array | None = None) -> Array:
    """Gradient times input: ``x * d fn(x) / d x``, per example.

    Exact for a linear ``fn`` with a zero intercept (``fn(x) = <w, x>`` gives ``x * w``);
    one backward pass. Per-example gradients come from the gradient of the batch sum,
    so ``fn`` must treat examples independently (a model in eval mode).

    Args:
      fn: ``x [batch, ...] -> float [batch]``, a scalar per example (e.g. the target
        logit with the other inputs fixed).
      inputs: float ``[batch, ...]``, e.g. images ``[batch, height, width, channels]`` or
        log-mel ``[batch, time, mels]``.
      mask: optional bool with the leading axes of ``inputs`` (e.g. ``[batch, time]``);
        False positions (padding) get attribution exactly 0.

    Returns:
      float32, the shape of ``inputs``.

    Raises:
      ValueError: ``inputs`` not float, ``mask`` of the wrong shape, or ``fn`` not
        returning ``[batch]``.

    Examples:
      >>> import jax.numpy as jnp
      >>> w = jnp.array([1.0, -2.0])
      >>> gradient_x_input(lambda x: x @ w, jnp.array([[3.0, 1.0]])).tolist()
      [[3.0, -2.0]]
    """
    x = _check_inputs(inputs)
    mask = _check_mask(mask, x)
    attr = (x.astype(jnp.float32) * _per_example_grad(fn, x).astype(jnp.float32))
    if mask is not None:
        attr = jnp.where(mask, attr, jnp.zeros((), jnp.float32))
    return attr


def integrated_gradients(fn: Callable[[Array], Array], inputs: Array, baseline: Any, *,
                         steps: int = 32, mask: Array | None = None) -> Array:
    """Integrated gradients (Sundararajan, Taly & Yan 2017), per example.

    ``IG(x) = (x - x') * integral_0^1 d fn(x' + a (x - x')) / d x da`` on the straight
    path from the baseline ``x'`` to the input ``x``, the integral by the midpoint
    Riemann sum over ``steps`` points ``a_k = (k + 1/2) / steps``, ``k = 0..steps-1``
    (one gradient each, in a ``jax.lax.scan``). Completeness: ``sum(IG(x)) ==
    fn(x) - fn(x')`` per example up to the quadrature error, which falls as
    ``O(1 / steps^2)`` for a smooth ``fn``; exact at any ``steps`` for a linear one.

    Where ``mask`` is False (padding), the path holds the input's own value (the
    effective baseline there is ``x``), so those positions contribute nothing to the
    path and get attribution exactly 0; completeness then refers to ``fn`` at the
    baseline with the padded positions left as in ``inputs``.

    Per-example gradients come from the gradient of the batch sum, so ``fn`` must
    treat examples independently (a model in eval mode).

    Args:
      fn: ``x [batch, ...] -> float [batch]``, a scalar per example (e.g. the target
        logit with the other inputs fixed).
      inputs: float ``[batch, ...]``, e.g. images ``[batch, height, width, channels]`` or
        log-mel ``[batch, time, mels]``.
      baseline: the reference input: a float scalar (e.g. 0.0) or float of the shape of
        ``inputs``.
      steps: the number of quadrature points (>= 1).
      mask: optional bool with the leading axes of ``inputs`` (e.g. ``[batch, time]``);
        False positions (padding) get attribution exactly 0.

    Returns:
      float32, the shape of ``inputs``.

    Raises:
      ValueError: ``steps`` < 1, ``baseline`` of another shape, ``inputs`` not float,
        ``mask`` of the wrong shape, or ``fn`` not returning ``[batch]``.

    Examples:
      >>> import jax.numpy as jnp
      >>> x = jnp.array([[1.0, 2.0]])
      >>> ig = integrated_gradients(lambda x: jnp.sum(x ** 2, axis=1), x, 0.0, steps=4)
      >>> ig.tolist(), float(ig.sum())
      ([[1.0, 4.0]], 5.0)
    """
    steps = check_positive_int("steps", steps)
    x = _check_inputs(inputs)
    base = jnp.asarray(baseline)
    if base.ndim == 0:
        base = jnp.broadcast_to(base, x.shape)
    elif tuple(base.shape) != tuple(x.shape):
        raise ValueError(f"baseline: expected a scalar or the shape of inputs "
                         f"{tuple(x.shape)}, got shape {tuple(base.shape)}.")
    if not jnp.issubdtype(base.dtype, jnp.floating) and not jnp.issubdtype(
            base.dtype, jnp.integer):
        raise ValueError(f"baseline: expected a float scalar or array, got {base.dtype}.")
    base = base.astype(x.dtype)
    mask = _check_mask(mask, x)
    if mask is not None:
        base = jnp.where(mask, base, x)
    delta = x - base
    alphas = (jnp.arange(steps, dtype=jnp.float32) + 0.5) / steps

    def step(total, alpha):
        point = base + alpha.astype(x.dtype) * delta
        return total + _per_example_grad(fn, point).astype(jnp.float32), None

    total, _ = jax.lax.scan(step, jnp.zeros(x.shape, jnp.float32), alphas)
    attr = delta.astype(jnp.float32) * (total / steps)
    if mask is not None:
        attr = jnp.where(mask, attr, jnp.zeros((), jnp.float32))
    return attr
