"""Optax optimisers from a frozen config: schedules, clipping, weight decay, freezing.

``make_optimizer(OptimizerConfig(...))`` returns one ``optax.GradientTransformation``
that works unchanged with ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` and with a plain
``jax.jit`` step over the state from ``nnx.split``. Everything that depends on *which*
parameter is being updated (freezing, no weight decay on biases and norm scales) is
decided from the parameter's path string, e.g. ``"encoders/text/layers/0/kernel"``
(see ``param_path``), by ``re.search`` with the patterns in the config, so no parameters
are needed to build the optimiser.

The update for a trainable parameter is::

    clip_by_global_norm(clip_norm)            # if clip_norm; norm over trainable params
    -> sgd / adam: add_decayed_weights(wd)     # L2: decay enters the gradient, *before*
                                                # momentum / Adam scaling (masked by no_decay)
    -> sgd(momentum, nesterov) | adam | adamw  # adamw: decoupled decay, masked by no_decay
    -> scaled by learning_rate_schedule(config)

Frozen parameters (``freeze``) get a zero update and no optimiser state.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

__all__ = [
    "DEFAULT_NO_DECAY",
    "OPTIMIZERS",
    "SCHEDULES",
    "OptimizerConfig",
    "count_params",
    "learning_rate_schedule",
    "make_optimizer",
    "param_path",
    "trainable_mask",
]

#: Names accepted by ``OptimizerConfig.name``.
OPTIMIZERS = ("adam", "adamw", "sgd")
#: Names accepted by ``OptimizerConfig.schedule``.
SCHEDULES = ("constant", "cosine", "step")

#: Default ``no_decay`` patterns: biases of every layer, the ``scale`` of LayerNorm /
#: BatchNorm / RMSNorm / GroupNorm (NNX names their parameters ``scale`` and ``bias``),
#: and learned temperatures / logit scales of contrastive heads. Embedding tables and
#: kernels *are* decayed (as in BERT and the AdamW paper).
DEFAULT_NO_DECAY = (
    r"(^|/)bias$",
    r"(^|/)scale$",
    r"(^|/)(temperature|logit_scale|logit_bias|log_scale)$",
)

_TRAIN, _FROZEN = "train", "frozen"


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Everything ``make_optimizer`` needs; hashable, so safe as a static jit argument.

    Attributes:
      name: ``"sgd"`` (heavy-ball momentum, optionally Nesterov), ``"adam"`` or
        ``"adamw"``.
      learning_rate: peak learning rate (reached after warmup).
      momentum: SGD momentum in ``[0, 1)``; 0 disables it.
      nesterov: Nesterov momentum for SGD (needs ``momentum > 0``).
      b1: Adam first-moment decay.
      b2: Adam second-moment decay.
      eps: Adam epsilon (added outside the square root).
      weight_decay: for ``"adamw"`` the decoupled decay (update ``-= lr * wd * w``); for
        ``"sgd"``/``"adam"`` classic L2 regularisation: ``wd * w`` is added to the
        gradient before momentum/Adam scaling (``optax.add_decayed_weights``). Never
        applied to parameters matching ``no_decay`` or ``freeze``.
      schedule: ``"constant"``, ``"cosine"`` (to ``min_learning_rate`` at
        ``total_steps``) or ``"step"`` (times ``decay_factor`` at each of
        ``decay_steps``). See ``learning_rate_schedule``.
      warmup_steps: linear warmup from 0 to ``learning_rate`` over this many steps.
      total_steps: length of training; required for ``"cosine"``.
      decay_steps: absolute step numbers (strictly increasing, ``>= warmup_steps``) at
        which the ``"step"`` schedule multiplies the rate by ``decay_factor``.
      decay_factor: multiplier per step decay, in ``(0, 1]``.
      min_learning_rate: end value of the cosine decay and floor of the step decays.
      clip_norm: if set, clip the global norm of the (trainable) gradients to this.
      freeze: regex patterns; a parameter whose path matches any (``re.search``) is
        frozen: zero update, no optimiser state.
      no_decay: regex patterns of parameters excluded from weight decay;
        ``DEFAULT_NO_DECAY`` (biases, norm scales, temperatures) by default.
      lr_multipliers: ``(regex, factor)`` pairs (or a dict): a parameter whose path
        matches a regex (``re.search``; the first matching pair wins) trains with
        ``factor`` times the scheduled learning rate, weight decay included (e.g.
        ``{"^encoders/text/": 0.1}`` for a pretrained tower). Factors are finite and
        ``>= 0``; unmatched parameters use factor 1.

    Raises:
      ValueError: a field is out of range or inconsistent; the message names it.

    Examples:
      >>> config = OptimizerConfig(name="adamw", learning_rate=3e-4, weight_decay=0.05,
      ...                          schedule="cosine", warmup_steps=100, total_steps=1000)
      >>> config.schedule
      'cosine'
      >>> OptimizerConfig(name="lamb")
      Traceback (most recent call last):
        ...
      ValueError: OptimizerConfig.name: unknown optimizer 'lamb'; known: adam, adamw, sgd.
    """

    name: str = "adam"
    learning_rate: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = False
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup_steps: int = 0
    total_steps: int | None = None
    decay_steps: tuple[int, ...] = ()
    decay_factor: float = 0.1
    min_learning_rate: float = 0.0
    clip_norm: float | None = None
    freeze: tuple[str, ...] = ()
    no_decay: tuple[str, ...] = DEFAULT_NO_DECAY
    lr_multipliers: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        # Lists and dicts are accepted for convenience but stored as tuples (hashability).
        multipliers = self.lr_multipliers
        if isinstance(multipliers, Mapping):
            multipliers = tuple(multipliers.items())
        if isinstance(multipliers, (str, bytes)) or not isinstance(multipliers, Sequence) \
                or any(not isinstance(pair, Sequence) or isinstance(pair, (str, bytes))
                       or len(pair) != 2 for pair in multipliers):
            raise TypeError("OptimizerConfig.lr_multipliers: expected (regex, factor) pairs "
                            f"or a dict, got {self.lr_multipliers!r}.")
        object.__setattr__(self, "lr_multipliers", tuple(tuple(p) for p in multipliers))
        for field in ("decay_steps", "freeze", "no_decay"):
            value = getattr(self, field)
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                raise TypeError(f"OptimizerConfig.{field}: expected a tuple, got {value!r}.")
            object.__setattr__(self, field, tuple(value))
        _check_config(self)


def _fail(field: str, message: str) -> None:
    raise ValueError(f"OptimizerConfig.{field}: {message}")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return (isinstance(value, (int, float, np.integer, np.floating))
            and not isinstance(value, bool) and math.isfinite(value))


def _check_config(c: OptimizerConfig) -> None:
    if c.name not in OPTIMIZERS:
        _fail("name", f"unknown optimizer {c.name!r}; known: {', '.join(OPTIMIZERS)}.")
    if c.schedule not in SCHEDULES:
        _fail("schedule", f"unknown schedule {c.schedule!r}; known: {', '.join(SCHEDULES)}.")
    for field in ("learning_rate", "weight_decay", "min_learning_rate"):
        value = getattr(c, field)
        if not _is_real(value) or value < 0:
            _fail(field, f"expected a finite number >= 0, got {value!r}.")
    if c.min_learning_rate > c.learning_rate:
        _fail("min_learning_rate", f"{c.min_learning_rate} exceeds learning_rate "
              f"{c.learning_rate}.")
    for field in ("momentum", "b1", "b2"):
        value = getattr(c, field)
        if not _is_real(value) or not 0 <= value < 1:
            _fail(field, f"expected a number in [0, 1), got {value!r}.")
    if not _is_real(c.eps) or c.eps <= 0:
        _fail("eps", f"expected a number > 0, got {c.eps!r}.")
    if not isinstance(c.nesterov, bool):
        _fail("nesterov", f"expected a bool, got {c.nesterov!r}.")
    if c.nesterov and c.momentum == 0:
        _fail("nesterov", "Nesterov momentum needs momentum > 0.")
    if not _is_int(c.warmup_steps) or c.warmup_steps < 0:
        _fail("warmup_steps", f"expected an integer >= 0, got {c.warmup_steps!r}.")
    if c.total_steps is not None:
        if not _is_int(c.total_steps) or c.total_steps <= 0:
            _fail("total_steps", f"expected a positive integer, got {c.total_steps!r}.")
        if c.warmup_steps > c.total_steps:
            _fail("warmup_steps", f"{c.warmup_steps} exceeds total_steps {c.total_steps}.")
    if c.schedule == "cosine":
        if c.total_steps is None:
            _fail("total_steps", "the cosine schedule needs total_steps.")
        if c.warmup_steps >= c.total_steps:
            _fail("warmup_steps", f"{c.warmup_steps} leaves no cosine decay before "
                  f"total_steps {c.total_steps}.")
    if any(not _is_int(s) for s in c.decay_steps):
        _fail("decay_steps", f"expected integers, got {c.decay_steps!r}.")
    if any(b <= a for a, b in zip(c.decay_steps[:-1], c.decay_steps[1:], strict=True)):
        _fail("decay_steps", f"must be strictly increasing, got {c.decay_steps!r}.")
    if c.decay_steps and c.decay_steps[0] < max(c.warmup_steps, 1):
        _fail("decay_steps", f"must be >= max(warmup_steps, 1) = {max(c.warmup_steps, 1)}, "
              f"got {c.decay_steps!r}.")
    if c.schedule == "step" and not c.decay_steps:
        _fail("decay_steps", "the step schedule needs at least one decay step.")
    if c.schedule != "step" and c.decay_steps:
        _fail("decay_steps", f"only used by schedule='step', got schedule={c.schedule!r}.")
    if not _is_real(c.decay_factor) or not 0 < c.decay_factor <= 1:
        _fail("decay_factor", f"expected a number in (0, 1], got {c.decay_factor!r}.")
    if c.clip_norm is not None and (not _is_real(c.clip_norm) or c.clip_norm <= 0):
        _fail("clip_norm", f"expected None or a number > 0, got {c.clip_norm!r}.")
    for pattern, factor in c.lr_multipliers:
        if not _is_real(factor) or factor < 0:
            _fail("lr_multipliers", f"factor for {pattern!r}: expected a finite number "
                  f">= 0, got {factor!r}.")
    for field in ("freeze", "no_decay", "lr_multipliers"):
        patterns = getattr(c, field)
        if field == "lr_multipliers":
            patterns = [pattern for pattern, _ in patterns]
        for pattern in patterns:
            if not isinstance(pattern, str):
                _fail(field, f"expected regex strings, got {pattern!r}.")
            try:
                re.compile(pattern)
            except re.error as e:
                _fail(field, f"invalid regex {pattern!r}: {e}.")


def learning_rate_schedule(config: OptimizerConfig) -> optax.Schedule:
    """The learning rate as a function of the step count (jit-safe).

    With ``lr = learning_rate``, ``w = warmup_steps`` and ``T = total_steps``:

    * warmup (``step < w``): ``lr * step / w``, i.e. 0 at step 0;
    * ``"constant"``: ``lr``;
    * ``"cosine"``: ``min_lr + (lr - min_lr) * (1 + cos(pi * t)) / 2`` with
      ``t = clip((step - w) / (T - w), 0, 1)``: ``lr`` at ``w``, ``min_lr`` from ``T`` on;
    * ``"step"``: ``max(lr * decay_factor ** k, min_lr)``, ``k`` = number of
      ``decay_steps`` that are ``<= step`` (so the new rate applies *at* the boundary).

    Args:
      config: the optimiser config.

    Returns:
      A function ``step (int scalar) -> float32 scalar``.

    Examples:
      >>> config = OptimizerConfig(learning_rate=1.0, schedule="step", warmup_steps=2,
      ...                          decay_steps=(4, 6), decay_factor=0.5)
      >>> schedule = learning_rate_schedule(config)
      >>> [float(schedule(s)) for s in range(8)]
      [0.0, 0.5, 1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    """
    lr = float(config.learning_rate)
    min_lr = float(config.min_learning_rate)
    warmup = int(config.warmup_steps)

    if config.schedule == "constant":
        def main(step):
            return jnp.full_like(step, lr)
    elif config.schedule == "cosine":
        span = float(config.total_steps - warmup)

        def main(step):
            t = jnp.clip((step - warmup) / span, 0.0, 1.0)
            return min_lr + (lr - min_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * t))
    else:
        boundaries = np.asarray(config.decay_steps, np.float32)
        factor = float(config.decay_factor)

        def main(step):
            k = jnp.sum(step >= boundaries)
            return jnp.maximum(lr * factor ** k.astype(jnp.float32), min_lr)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        value = main(step)
        if warmup > 0:
            value = jnp.where(step < warmup, lr * step / warmup, value)
        return value.astype(jnp.float32)

    return schedule


def param_path(keypath: Sequence[Any]) -> str:
    """Turns a JAX key path into the ``"a/b/0/kernel"`` string the config patterns see.

    Works for the paths of ``jax.tree_util.tree_flatten_with_path`` over an ``nnx.State``
    (of ``nnx.Variable`` objects or of raw arrays), nested dicts/lists/tuples and
    NamedTuples. The trailing ``.value`` attribute that an ``nnx.Variable`` adds when it
    is flattened is dropped, so a parameter has the same path whether the tree holds
    Variables (``nnx.state(model)``, ``nnx.split``) or raw arrays (what ``nnx.Optimizer``
    passes to ``tx.update``).

    Args:
      keypath: a tuple of ``DictKey``/``SequenceKey``/``GetAttrKey``/
        ``FlattenedIndexKey`` entries.

    Returns:
      The entries joined with ``"/"``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> tree = {"encoder": {"layers": [{"kernel": jnp.zeros(2)}]}}
      >>> [param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
      ['encoder/layers/0/kernel']
    """
    keys = list(keypath)
    if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
        keys.pop()
    parts = []
    for key in keys:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(key.name)
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            parts.append(str(key.key))
        else:
            parts.append(str(key))
    return "/".join(parts)


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _map_paths(fn: Callable[[str], Any], tree: Any) -> Any:
    """Maps ``fn(path)`` over the parameters of ``tree`` (a Variable counts as one)."""
    return jax.tree_util.tree_map_with_path(
        lambda keypath, _: fn(param_path(keypath)), tree, is_leaf=_is_variable)


def _matcher(patterns: Sequence[str]) -> Callable[[str], bool]:
    compiled = [re.compile(p) for p in patterns]
    return lambda path: any(p.search(path) for p in compiled)


def trainable_mask(params: Any, config: OptimizerConfig) -> Any:
    """True for each parameter that ``config.freeze`` leaves trainable.

    Args:
      params: a pytree of parameters (``nnx.State``, nested dicts of arrays, ...).
      config: the optimiser config.

    Returns:
      A pytree like ``params`` with a Python bool in place of each array (or of each
      ``nnx.Variable``).

    Examples:
      >>> import jax.numpy as jnp
      >>> params = {"text": {"kernel": jnp.zeros(2)}, "head": {"kernel": jnp.zeros(2)}}
      >>> trainable_mask(params, OptimizerConfig(freeze=("^text/",)))
      {'head': {'kernel': True}, 'text': {'kernel': False}}
    """
    frozen = _matcher(config.freeze)
    return _map_paths(lambda path: not frozen(path), params)


def count_params(tree: Any) -> int:
    """Total number of scalars in a pytree of arrays (or of an NNX module's parameters).

    Args:
      tree: an ``nnx.Module`` (its ``nnx.Param`` variables are counted), an
        ``nnx.State`` or any pytree whose leaves are arrays. Non-array leaves count 0.

    Returns:
      The sum of the leaves' sizes.

    Examples:
      >>> import jax.numpy as jnp
      >>> count_params({"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros(4)})
      16
    """
    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree, nnx.Param)
    return int(sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree)
                   if hasattr(leaf, "shape")))


def _base_optimizer(config: OptimizerConfig, schedule: optax.Schedule,
                    decay_mask: Callable[[Any], Any]) -> optax.GradientTransformation:
    if config.name == "adamw":
        return optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                           weight_decay=config.weight_decay, mask=decay_mask)
    if config.name == "adam":
        tx = optax.adam(schedule, b1=config.b1, b2=config.b2, eps=config.eps)
    else:
        tx = optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.nesterov)
    if config.weight_decay > 0:
        tx = optax.chain(
            optax.masked(optax.add_decayed_weights(config.weight_decay), decay_mask), tx)
    return tx


def _scale_by_path(multipliers: tuple[tuple[str, float], ...]
                   ) -> optax.GradientTransformation:
    """Multiplies each parameter's final update by its path's factor (first match).

    Every base optimiser here ends by scaling with the learning rate (decoupled decay
    included), so this equals training those parameters with ``factor * lr``.
    """
    compiled = [(re.compile(pattern), float(factor)) for pattern, factor in multipliers]

    def factor_of(path: str) -> float:
        return next((f for p, f in compiled if p.search(path)), 1.0)

    def update(updates, state, params=None):
        del params
        scaled = jax.tree_util.tree_map_with_path(
            lambda keypath, u: u if (f := factor_of(param_path(keypath))) == 1.0
            else u * jnp.asarray(f, u.dtype), updates)
        return scaled, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    """Builds the Optax transformation described by ``config``.

    Decisions are made from parameter paths (``param_path``) each time ``init`` or
    ``update`` sees the tree, so the same transformation serves any model. Gradient
    clipping sits inside the trainable partition: frozen parameters' gradients neither
    count towards the global norm nor receive updates.

    Args:
      config: the optimiser config.

    Returns:
      An ``optax.GradientTransformation``; use it with ``nnx.Optimizer(model, tx,
      wrt=nnx.Param)`` or with ``tx.init``/``tx.update`` on the parameter state.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> params = {"kernel": jnp.ones(2), "bias": jnp.ones(2)}
      >>> tx = make_optimizer(OptimizerConfig(name="adamw", learning_rate=0.1,
      ...                                     weight_decay=0.5))
      >>> zeros = {"kernel": jnp.zeros(2), "bias": jnp.zeros(2)}
      >>> updates, _ = tx.update(zeros, tx.init(params), params)
      >>> round(float(updates["kernel"][0]), 6)  # -lr * wd * w
      -0.05
      >>> float(jnp.abs(updates["bias"]).max())  # biases are not decayed
      0.0
    """
    if not isinstance(config, OptimizerConfig):
        raise TypeError(f"config: expected an OptimizerConfig, got {type(config).__name__}.")
    no_decay = _matcher(config.no_decay)
    frozen = _matcher(config.freeze)

    def decay_mask(params):
        return _map_paths(lambda path: not no_decay(path), params)

    parts = []
    if config.clip_norm is not None:
        parts.append(optax.clip_by_global_norm(config.clip_norm))
    parts.append(_base_optimizer(config, learning_rate_schedule(config), decay_mask))
    if config.lr_multipliers:
        parts.append(_scale_by_path(config.lr_multipliers))
    tx = optax.chain(*parts) if len(parts) > 1 else parts[0]
    if not config.freeze:
        return tx

    def labels(params):
        return _map_paths(lambda path: _FROZEN if frozen(path) else _TRAIN, params)

    return optax.multi_transform({_TRAIN: tx, _FROZEN: optax.set_to_zero()}, labels)
