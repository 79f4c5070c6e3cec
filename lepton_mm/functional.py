"""Any lepton_mm module as a pure function: explicit variables, dropout key, train/eval.

Encoders, fusion layers and models are Flax NNX modules. Inside ``nnx.jit`` /
``nnx.grad`` or ``fit`` they are called directly; from plain JAX (``jax.grad``,
``jax.jit``, ``jax.vmap``) or Linen, call them through this module, the one documented
way that works everywhere::

    apply, variables = functional(layer)                      # layer: any nnx.Module
    y = apply(variables, inputs)                               # eval mode, no key needed
    y = apply(variables, inputs, train=True, key=dropout_key)  # train mode: dropout on
    grads = jax.grad(lambda p: apply({**variables, "params": p}, inputs, train=True,
                                     key=k).sum())(variables["params"])
    y, variables = apply(variables, batch, train=True, key=k, mutable=True)  # BatchNorm

    linen_layer = to_linen(build, "cross_attention", dims, 64)  # a flax.linen.Module
    lv = linen_layer.init({"params": k0}, inputs)                # eval-mode init
    y = linen_layer.apply(lv, inputs, train=True, rngs={"dropout": k1},
                          mutable=["batch_stats"])[0]

Rules, the same in both: eval mode (the default) is deterministic and needs no key
(dropout off, batch norm on its running statistics); train mode needs a dropout key
whenever the module has dropout, and a missing key is a ``ValueError`` naming the
module, never a fixed mask; every dropout layer draws from one stream seeded by that
key, so the same key gives the same masks and another key other masks. In train mode
batch norm uses batch statistics and updates its running ones: ask for them back
(``mutable=True`` here, ``mutable=["batch_stats"]`` in Linen) or it is an error, as in
Linen. The module passed in is never modified.

``variables`` is ``{"params": nnx.State of the nnx.Param leaves, "batch_stats":
nnx.State of the nnx.BatchStat leaves}`` holding plain arrays (a pytree for optax,
``jax.grad`` and ``jax.vmap``); other non-random state (e.g. frozen tables kept as
``nnx.Variable``) stays inside ``apply`` as a constant.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
from flax import linen, nnx

__all__ = ["NNXLinen", "functional", "to_linen"]

Apply = Callable[..., Any]


def _dropouts(module: nnx.Module) -> list[nnx.Dropout]:
    return [m for _, m in nnx.iter_modules(module)
            if isinstance(m, nnx.Dropout) and float(m.rate) > 0]


def _has_batch_stats(module: nnx.Module) -> bool:
    return bool(jax.tree.leaves(nnx.state(module, nnx.BatchStat)))


def _set_mode(module: nnx.Module, train: bool, key: Any, who: str) -> None:
    """Train/eval mode on a module made inside the current trace; dropout from ``key``."""
    if not isinstance(train, bool):
        raise TypeError(f"train: expected True or False, got {train!r}.")
    if train:
        module.train()
    else:
        module.eval()
    dropouts = _dropouts(module)
    if train and dropouts:
        if key is None:
            raise ValueError(
                f"key: {who} has {len(dropouts)} dropout layer(s); train=True needs a "
                "dropout key (e.g. key=jax.random.key(step)), or use train=False.")
        stream = nnx.Rngs(dropout=key).dropout  # one stream: masks follow from the key
        for d in dropouts:
            d.rngs = stream


def functional(module: nnx.Module, *, method: str = "__call__") -> tuple[Apply, dict]:
    """Splits a module into a pure ``apply`` function and its ``variables``.

    Args:
      module: any Flax NNX module (a lepton_mm encoder, fusion layer or model); left
        unchanged.
      method: the method ``apply`` calls (e.g. ``"embed_a"`` of a ``TwoTower``).

    Returns:
      ``(apply, variables)``. ``apply(variables, *args, train=False, key=None,
      mutable=False, **kwargs)`` runs ``method`` on a copy made from ``variables``
      and returns its output, or ``(output, new variables)`` with ``mutable=True``;
      pure, so it works under ``jax.grad``, ``jax.jit`` and ``jax.vmap``.

    Raises (from ``apply``):
      ValueError: ``train=True`` without ``key`` on a module with dropout; ``train=True``
        on a module with batch norm without ``mutable=True``; ``variables`` without
        ``"params"`` or ``"batch_stats"``.
      TypeError: ``train`` is not a bool.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from lepton_mm import EncoderOutput
      >>> from lepton_mm.fusion import build
      >>> layer = build("concat", {"a": 3, "b": 2}, 4, hidden=(8,), dropout=0.5,
      ...               rngs=nnx.Rngs(0))
      >>> apply, variables = functional(layer)
      >>> xs = {"a": EncoderOutput.from_tokens(jnp.ones((2, 5, 3))),
      ...       "b": EncoderOutput.from_tokens(jnp.ones((2, 1, 2)))}
      >>> apply(variables, xs).shape
      (2, 4)
      >>> g = jax.grad(lambda p: apply({**variables, "params": p}, xs, train=True,
      ...                              key=jax.random.key(1)).sum())(variables["params"])
    """
    if not isinstance(module, nnx.Module):
        raise TypeError(f"module: expected a flax.nnx.Module, got {type(module).__name__}.")
    if not callable(getattr(module, method, None)):
        raise ValueError(f"method: {type(module).__name__} has no method {method!r}.")
    # Random state is carried as a constant only to fill the graph: nothing draws from
    # it (eval mode draws nothing; train mode's dropout draws from ``key``).
    graphdef, params, stats, rngs, other = nnx.split(
        module, nnx.Param, nnx.BatchStat, nnx.RngState, ...)
    rngs, other = nnx.as_pure(rngs), nnx.as_pure(other)
    has_stats, who = _has_batch_stats(module), type(module).__name__

    def apply(variables: dict, *args: Any, train: bool = False, key: Any = None,
              mutable: bool = False, **kwargs: Any) -> Any:
        if not isinstance(variables, dict) or {"params", "batch_stats"} - set(variables):
            raise ValueError("variables: expected the dict functional() returned, with "
                             "'params' and 'batch_stats'.")
        if train and has_stats and not mutable:
            raise ValueError(f"mutable: {who} has batch norm, whose running statistics "
                             "train=True updates; pass mutable=True to get them back "
                             "(apply then returns (output, variables)).")
        copy = nnx.merge(graphdef, variables["params"], variables["batch_stats"], rngs,
                         other)
        _set_mode(copy, train, key, who)
        out = getattr(copy, method)(*args, **kwargs)
        if not mutable:
            return out
        return out, {"params": nnx.as_pure(nnx.state(copy, nnx.Param)),
                     "batch_stats": nnx.as_pure(nnx.state(copy, nnx.BatchStat))}

    variables = {"params": nnx.as_pure(params), "batch_stats": nnx.as_pure(stats)}
    return apply, variables


class NNXLinen(linen.Module):
    """A lepton_mm (NNX) module as a Linen module, with Linen's conventions.

    ``factory(rngs=nnx.Rngs(...))`` builds the NNX module; its parameters live in the
    ``"params"`` collection and its batch-norm statistics in ``"batch_stats"``. Call
    with ``train=False`` (default; deterministic, no rng needed) or ``train=True``
    (needs ``rngs={"dropout": key}`` when the module has dropout: a clear
    ``ValueError`` otherwise, never a fixed mask; with batch norm, apply with
    ``mutable=["batch_stats"]``). ``init`` runs in eval mode unless ``train=True``.

    Attributes:
      factory: builds the NNX module from ``rngs=`` (see ``to_linen``).
      method: the NNX module's method to call.
    """

    factory: Callable[..., nnx.Module]
    method: str = "__call__"

    @linen.compact
    def __call__(self, *args: Any, train: bool = False, **kwargs: Any) -> Any:
        """Runs the NNX module's ``method`` in train or eval mode.

        Args:
          *args: the NNX method's positional arguments.
          **kwargs: the NNX method's keyword arguments.
          train: train mode (dropout from the ``"dropout"`` rng, batch statistics).

        Returns:
          The NNX method's output.

        Raises:
          ValueError: train mode without a dropout rng (module with dropout) or without
            mutable ``batch_stats`` (module with batch norm).
        """
        abstract = nnx.eval_shape(lambda: self.factory(rngs=nnx.Rngs(0)))
        graphdef, _, _, _, other_shape = nnx.split(
            abstract, nnx.Param, nnx.BatchStat, nnx.RngState, ...)
        if jax.tree.leaves(other_shape):
            raise ValueError(f"{type(abstract).__name__} holds state that is neither a "
                             "parameter nor a batch statistic; use functional() instead.")

        def build(rng: Any) -> nnx.Module:
            return self.factory(rngs=nnx.Rngs(rng))

        params = self.param("nnx", lambda rng: nnx.to_pure_dict(
            nnx.state(build(rng), nnx.Param)))
        stats = self.variable("batch_stats", "nnx", lambda: nnx.to_pure_dict(
            nnx.state(build(jax.random.key(0)), nnx.BatchStat)))
        _, p_state, s_state, rng_state, other = nnx.split(
            abstract, nnx.Param, nnx.BatchStat, nnx.RngState, ...)
        nnx.replace_by_pure_dict(p_state, params)
        nnx.replace_by_pure_dict(s_state, stats.value)
        rng_state = jax.tree.map(_fill_rng, nnx.as_pure(rng_state))
        copy = nnx.merge(graphdef, nnx.as_pure(p_state), nnx.as_pure(s_state), rng_state,
                         nnx.as_pure(other))
        who = type(copy).__name__
        if train and _dropouts(copy) and not self.has_rng("dropout"):
            raise ValueError(f"rngs: {who} has dropout; apply(..., train=True) needs "
                             "rngs={'dropout': key} (or train=False).")
        if train and _has_batch_stats(copy) and not self.is_mutable_collection("batch_stats"):
            raise ValueError(f"mutable: {who} has batch norm; apply(..., train=True) needs "
                             "mutable=['batch_stats'].")
        _set_mode(copy, train, self.make_rng("dropout") if train and _dropouts(copy)
                  else None, who)
        out = getattr(copy, self.method)(*args, **kwargs)
        if train and self.is_mutable_collection("batch_stats") and not self.is_initializing():
            stats.value = nnx.to_pure_dict(nnx.state(copy, nnx.BatchStat))
        return out


def _fill_rng(leaf: Any) -> Any:
    """A concrete stand-in for an abstract RNG leaf (never drawn from: see above)."""
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return jax.random.key(0)
    return jax.numpy.zeros(leaf.shape, leaf.dtype)


def to_linen(factory: Callable[..., nnx.Module], *args: Any, method: str = "__call__",
             **kwargs: Any) -> NNXLinen:
    """``factory(*args, **kwargs, rngs=...)`` as a Linen module (``NNXLinen``).

    Args:
      factory: a module class or builder taking ``rngs=``, e.g. ``CrossAttentionFusion``
        or ``lepton_mm.fusion.build``.
      *args: its other positional arguments.
      **kwargs: its other keyword arguments.
      method: the method the Linen module calls.

    Returns:
      An unbound ``NNXLinen``; ``init`` / ``apply`` it as any Linen module.
    """
    return NNXLinen(functools.partial(factory, *args, **kwargs), method=method)
