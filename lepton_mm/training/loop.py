"""The training loop: ``fit`` with exact resume, early stopping and best-checkpoint
selection, plus ``evaluate`` and ``predict``, over any batch source
(``lepton_mm.data.BatchSource``: ``ArrayDataset``, ``BucketedDataset``, your own).

Steps are plain ``jax.jit`` functions over the state from ``nnx.split`` (graphdef
closed over, ``(params, rest, opt_state)`` passed in and donated). On the quick smoke
model (2 CPU cores, batch 32) a step took 2.8 ms this way against 6.1 ms with
``nnx.jit`` + ``nnx.Optimizer`` (3.9 ms in its ``graph=False`` tree mode); at batch 128,
14.2 vs 17.7 (15.1) ms: the gap is per-call Python overhead (``experiments/smoke.py
--compare-steps``). A functional step also makes "skip a non-finite update", sharding
and checkpointing plain pytree operations.

Every batch has the same size: a source fills its partial batches up with repeats of
real examples whose ``batch["valid"]`` is False, so neither step recompiles (a
``BucketedDataset`` compiles once per length bucket) and losses/metrics (weighted by
``valid``) are unbiased. Batch-norm statistics in training do see the repeated rows
(they are real examples, so the bias is small). Compiled steps are cached across calls
(keyed by the model's graph, the optax transformation, the task and the mesh), so
``fit`` over folds or seeds of one model compiles once.

Randomness comes from one integer ``seed``: the caller builds the model with
``seed_rngs(seed)`` (initialisation; dropout streams live in the model state and are
checkpointed), epoch ``e`` is shuffled by ``numpy.random.default_rng([seed, e, 0])``,
and modality dropout at step ``s`` uses ``fold_in(fold_in(key(seed), 1), s)``. A batch
source's epoch is a function of ``(seed, epoch)`` too, so the data-iterator position
``(epoch, batch_index)`` is all the loop must save to resume exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
import numbers
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from lepton_mm.data.batching import ArrayDataset, BatchSource, epoch_permutation
from lepton_mm.training import sharding as sharding_lib
from lepton_mm.training.allocator import release_memory_after_compiles
from lepton_mm.training.checkpoint import Checkpointer, CheckpointMismatchError, model_fingerprint
from lepton_mm.training.loggers import Logger, _check_loggers, _Loggers
from lepton_mm.training.logging import CURVES_NAME, LOG_NAME, JsonlLogger, plot_curves
from lepton_mm.training.optim import OptimizerConfig, count_params, make_optimizer
from lepton_mm.types import RESERVED_KEYS

# ``ArrayDataset`` and ``epoch_permutation`` live in ``lepton_mm.data.batching``; they are
# imported here so that ``lepton_mm.training.loop.ArrayDataset`` keeps working.
__all__ = ["ArrayDataset", "FitResult", "TrainState", "epoch_permutation", "evaluate", "fit",
           "make_eval_step", "make_train_step", "predict", "seed_rngs"]

Array = jax.Array

_MODALITY_DROPOUT_TAG = 1
# fold_in tag of the augmentation / adversary keys under key(seed).
_AUGMENT_TAG = 2
_NAN_POLICIES = ("raise", "skip")
# fit reads step statistics back every this many steps (and at checkpoints, epoch ends).
_SYNC_EVERY = 50
# Config fields that must match to resume a run (others, e.g. epochs, may change).
_RESUME_KEYS = ("task", "optimizer", "batch_size", "seed", "modality_dropout",
                "num_train_examples", "nan_policy", "augment", "adversary",
                "compute_dtype", "strategy")


def seed_rngs(seed: int) -> nnx.Rngs:
    """The ``nnx.Rngs`` to build a model with, derived from the run's integer ``seed``.

    Parameter initialisation uses the ``params`` stream and dropout the ``dropout``
    stream (forked into each dropout layer, whose state is checkpointed).

    Args:
      seed: the run's integer seed.

    Returns:
      ``nnx.Rngs`` with ``params`` and ``dropout`` streams folded from ``seed``.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed: expected an int, got {type(seed).__name__}.")
    root = jax.random.key(int(seed))
    return nnx.Rngs(params=jax.random.fold_in(root, 0), dropout=jax.random.fold_in(root, 1))


# ---------------------------------------------------------------------------- sources

def _as_source(data: Any, name: str) -> BatchSource:
    """``data`` as a batch source: a source as is, a dict of arrays as an ``ArrayDataset``."""
    if isinstance(data, BatchSource):
        return data
    if isinstance(data, Mapping):
        try:
            return ArrayDataset(data)
        except (ValueError, TypeError) as e:  # name the argument, not ArrayDataset's
            raise type(e)(name + str(e).removeprefix("arrays")) from None
    raise TypeError(f"{name}: expected a batch source (lepton_mm.data.BatchSource: "
                    f"ArrayDataset, BucketedDataset, ...: len(), num_batches(), "
                    f"batches()) or a dict of arrays, got {type(data).__name__}.")


def _take_rows(batch: Any, rows: slice | None) -> Any:
    return batch if rows is None else jax.tree.map(lambda a: a[rows], batch)


# ------------------------------------------------------------------------------ steps


class _TraceCount:
    """Counts how often a jitted function is traced (= compiled, for fixed options)."""

    def __init__(self):
        self.count = 0

    def wrap(self, fn: Any) -> Any:
        def call(*args):
            return fn(*args)

        call.traces = self
        call.lower = fn.lower  # e.g. ``step.lower(*args).as_text()``: the program
        return call


class TrainState(NamedTuple):
    """What the train step updates: pure ``nnx.State``s, the optax state and a training
    strategy's state.

    Attributes:
      params: ``nnx.State`` of the ``nnx.Param`` arrays.
      rest: ``nnx.State`` of the other variables (batch stats, RNG keys and counts).
      opt_state: the optax state.
      strategy: the state of a stateful training strategy (a pytree of arrays from its
        ``init_state``, e.g. ``lepton_mm.balance.PMR``'s prototypes), or ``None``
        (no strategy, or a stateless one: no leaves, so the step's program is the same
        as without the field).
    """

    params: Any  # nnx.State of arrays: the nnx.Param variables
    rest: Any  # nnx.State of arrays: batch stats, RNG stream keys and counts, ...
    opt_state: Any
    strategy: Any = None  # pytree of arrays from strategy.init_state, or None


def _call_model(model: Any, batch: Mapping[str, Any], rate: float, key: Array | None) -> Any:
    if rate:
        return model(batch, modality_dropout=rate, key=key)
    return model(batch)


def make_train_step(graphdef: Any, tx: optax.GradientTransformation, task: Any, *,
                    modality_dropout: float = 0.0, seed: int = 0,
                    mesh: Any = None, augment: Callable[..., Any] | None = None,
                    adversary: Callable[..., Any] | None = None,
                    compute_dtype: Any = None, strategy: Any = None,
                    steps_per_call: int = 1, thread_alive: bool = True) -> Any:
    """The compiled train step ``(state, batch, step[, alive]) -> (state, stats)``.

    ``stats`` holds float32 ``loss`` and ``grad_norm``, bool ``finite`` and ``alive``
    and int32 ``num_valid`` (the batch's valid rows); when the loss or the gradient is
    not finite the returned state is the input state (the update is skipped). The
    optional bool scalar ``alive`` (default True) gates every update: with ``alive``
    False the state passes through unchanged, and ``stats["alive"]`` is ``alive &
    finite``. Threading it from step to step lets a caller queue steps without reading
    each one's statistics back and still stop exactly at the first non-finite step
    (``fit`` does this). ``state`` is donated.

    The compiled function is shared by every call with an equal graph, the same ``tx``
    object, an equal task, rate and mesh (the seed is an input, not a constant), so
    training the same model again (other folds, other seeds) does not recompile.

    Args:
      graphdef: the model's ``nnx.GraphDef`` (from ``nnx.split``).
      tx: the optax transformation.
      task: a task from ``lepton_mm.models`` (its ``loss`` is minimised).
      modality_dropout: rate of whole-modality dropout at train time.
      seed: the run's seed (modality dropout keys are folded from it and the step).
      mesh: ``None`` or a mesh with a ``data`` axis (batch sharded, state replicated).
      augment: ``(batch, key) -> batch`` applied to every training batch inside the step
        (e.g. a ``lepton_mm.augment.Augmenter``); its key is
        ``fold_in(fold_in(fold_in(key(seed), 2), step), 0)``.
      adversary: ``(model, batch, key) -> batch`` applied after ``augment`` with the
        model at the step's current parameters (e.g. PGD from
        ``lepton_mm.adversarial``: adversarial training); key as above with ``1``.
      compute_dtype: ``None`` (float32 throughout) or ``jnp.bfloat16``: mixed precision.
        The forward and backward pass run on bfloat16 copies of the float parameters
        and float inputs; batch statistics stay float32, and so does what a layer
        computes from them (normalisation, as in AMP's float32 op lists); the outputs
        are cast to float32 for the loss; the gradients arrive in float32 and update
        the float32 parameters (master weights). bfloat16 has float32's exponent range,
        so no loss scaling is needed.
      strategy: a training strategy with either or both of two methods (see
        ``lepton_mm.balance``). ``loss(forward, task, batch, outputs, loss, key, step)
        -> (objective, metrics)`` replaces the task's loss as what is differentiated
        (e.g. ``GradientBlending``): ``forward(batch) -> outputs`` runs the model at
        the parameters being differentiated (train mode, float32 outputs; its passes
        do not move batch statistics), ``outputs`` and ``loss`` are the step's own;
        key as above with ``3``. ``modulate(model, batch, grads, key, step) -> (grads,
        metrics)`` (e.g. ``OGMGE``) acts on the gradient before the optimiser, with the
        model at the step's parameters; key as above with ``2``. ``stats["loss"]`` stays
        the task's loss; ``stats["strategy"]`` holds the metrics (float32 scalars).
        A stateful strategy (one with ``init_state``) takes its state as a last
        argument of each method and returns the new state as a third element; the
        step carries it in ``state.strategy`` (skipped steps leave it unchanged).
      steps_per_call: K > 1 compiles K consecutive steps into one call (a ``lax.scan``;
        one device only): ``batch`` then holds K batches stacked on a new leading axis
        (each leaf ``[K, batch, ...]``), ``step`` is the first one's number, and every
        leaf of ``stats`` has a leading axis of K. The same K updates as K single
        calls (tested equal), with one dispatch, one argument flattening and one
        host-to-device copy per K steps instead of per step.
      thread_alive: with K > 1, each step's ``alive`` is the previous step's
        ``stats["alive"]`` (the first non-finite step freezes the remaining ones, as
        ``fit``'s ``nan_policy="raise"`` threads it between calls); ``False``: the
        given ``alive`` for all K (``nan_policy="skip"``).

    Returns:
      The jitted step function; its ``traces.count`` counts the compilations.
    """
    steps_per_call = _check_int("steps_per_call", steps_per_call, minimum=1)
    if steps_per_call > 1 and mesh is not None:
        raise ValueError(f"steps_per_call: {steps_per_call} steps per call run on one "
                         f"device only (mesh=None); got a mesh.")
    compiled = _cached_train_step(graphdef, tx, task, float(modality_dropout), mesh,
                                  augment, adversary, _dtype_name(compute_dtype), strategy,
                                  steps_per_call, bool(thread_alive) and steps_per_call > 1)
    # As raw key data: a typed key cannot be put on a multi-process mesh.
    root = jax.random.key(seed)
    md_key = jax.random.key_data(jax.random.fold_in(root, _MODALITY_DROPOUT_TAG))
    aug_key = jax.random.key_data(jax.random.fold_in(root, _AUGMENT_TAG))
    alive_true = jnp.asarray(True)
    if mesh is not None:
        md_key, aug_key, alive_true = jax.device_put((md_key, aug_key, alive_true),
                                                     sharding_lib.replicated(mesh))

    def with_alive(state, batch, step, alive=None):
        return compiled(state, batch, step, alive_true if alive is None else alive, md_key,
                        aug_key)

    with_alive.traces = compiled.traces
    # The program for given arguments, e.g. ``step.lower(state, batch, 0).as_text()``.
    with_alive.lower = lambda state, batch, step, alive=None: compiled.lower(
        state, batch, step, alive_true if alive is None else alive, md_key, aug_key)
    return with_alive


def _train_step_fn(graphdef: Any, tx: optax.GradientTransformation, task: Any,
                   modality_dropout: float, mesh: Any, augment: Any = None,
                   adversary: Any = None, compute_dtype: str | None = None,
                   strategy: Any = None, steps_per_call: int = 1,
                   thread_alive: bool = True) -> Any:
    """The jitted ``(state, batch, step, alive, md_key_data, aug_key_data) -> (state,
    stats)``.

    With ``steps_per_call`` K > 1 it runs K steps in one call (``lax.scan``): every
    leaf of ``batch`` has a leading axis of K, ``step`` is the first step's number and
    every leaf of ``stats`` gets a leading axis of K. ``thread_alive``: each step's
    ``alive`` is the previous one's ``stats["alive"]`` (``fit``'s ``nan_policy="raise"``:
    the first non-finite step freezes the rest), else the ``alive`` given, for all K.
    """
    low = None if compute_dtype is None else jnp.dtype(compute_dtype)
    strategy_loss = getattr(strategy, "loss", None)
    strategy_modulate = getattr(strategy, "modulate", None)
    stateful = _is_stateful(strategy)

    def step_fn(state: TrainState, batch: Mapping[str, Any], step: Array, alive: Array,
                md_key_data: Array, aug_key_data: Array):
        traced.count += 1
        key = jax.random.fold_in(jax.random.wrap_key_data(md_key_data), step)
        aug_key = jax.random.fold_in(jax.random.wrap_key_data(aug_key_data), step)
        if augment is not None:
            batch = augment(batch, jax.random.fold_in(aug_key, 0))
        if adversary is not None:  # attacks the current parameters; no gradient flows
            attacked = adversary(nnx.merge(graphdef, state.params, state.rest), batch,
                                 jax.random.fold_in(aug_key, 1))
            batch = jax.lax.stop_gradient(attacked)

        def loss_fn(params):
            if low is None:
                model = nnx.merge(graphdef, params, state.rest)
                outputs = _call_model(model, batch, modality_dropout, key)
                forward = model
            else:  # mixed precision: low-precision copies in, float32 out
                model = nnx.merge(graphdef, _cast_floats(params, low), state.rest)
                outputs = _cast_floats(_call_model(model, _cast_inputs(batch, low),
                                                   modality_dropout, key), jnp.float32)
                forward = _LowPrecisionForward(model, low)
            loss = task.loss(outputs, batch, batch["valid"])
            # The state after the step's own forward pass: a strategy's extra passes
            # below (other presence masks) neither move batch statistics nor RNG counts.
            _, _, new_rest = nnx.split(model, nnx.Param, ...)
            new_rest = nnx.as_pure(new_rest)
            if low is not None:  # stored at the state's own precision
                new_rest = jax.tree.map(lambda n, o: n.astype(o.dtype), new_rest,
                                        state.rest)
            objective, extra, carried = loss, {}, state.strategy
            if strategy_loss is not None:  # e.g. Gradient Blending (lepton_mm.balance)
                args = (forward, task, batch, outputs, loss, jax.random.fold_in(aug_key, 3),
                        step)
                if stateful:  # e.g. PMR's prototypes
                    objective, extra, carried = strategy_loss(*args, carried)
                else:
                    objective, extra = strategy_loss(*args)
            return objective, (loss, new_rest, extra, carried)

        (objective, (loss, new_rest, extra, carried)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(state.params)
        extra = dict(extra)
        if strategy_modulate is not None:  # e.g. gradient modulation (lepton_mm.balance)
            args = (nnx.merge(graphdef, state.params, state.rest), batch, grads,
                    jax.random.fold_in(aug_key, 2), step)
            if stateful:
                grads, more, carried = strategy_modulate(*args, carried)
            else:
                grads, more = strategy_modulate(*args)
            extra.update(more)
        updates, new_opt = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(objective) & jnp.isfinite(grad_norm)
        apply = finite & alive
        new_state = TrainState(new_params, new_rest, new_opt, carried)
        new_state = jax.tree.map(lambda n, o: jnp.where(apply, n, o), new_state, state)
        return new_state, {"loss": loss, "grad_norm": grad_norm, "finite": finite,
                           "alive": apply,
                           "num_valid": jnp.sum(batch["valid"], dtype=jnp.int32),
                           "strategy": {k: jnp.asarray(v, jnp.float32)
                                        for k, v in extra.items()}}

    traced = _TraceCount()
    fn = step_fn
    if steps_per_call > 1:
        def fn(state: TrainState, batches: Mapping[str, Any], step: Array, alive: Array,
               md_key_data: Array, aug_key_data: Array):
            """``steps_per_call`` steps over ``batches`` (leading axis: the step)."""
            def body(carry, batch):
                state, step, alive = carry
                state, stats = step_fn(state, batch, step, alive, md_key_data,
                                       aug_key_data)
                return (state, step + 1, stats["alive"] if thread_alive else alive), stats

            (state, _, _), stats = jax.lax.scan(body, (state, step, alive), batches)
            return state, stats
    if mesh is None:
        return traced.wrap(jax.jit(fn, donate_argnums=0))
    rep, data = sharding_lib.replicated(mesh), sharding_lib.data_sharding(mesh)
    return traced.wrap(jax.jit(fn, donate_argnums=0,
                               in_shardings=(rep, data, rep, rep, rep, rep),
                               out_shardings=(rep, rep)))


class _LowPrecisionForward:
    """A strategy's ``forward`` under mixed precision: the model on low-precision inputs,
    float32 outputs; ``encode`` likewise, where the model has one (a classifier's
    ``{modality: EncoderOutput}``, e.g. for ``lepton_mm.balance.PMR``'s features)."""

    def __init__(self, model: Any, low: Any):
        self.model, self.low = model, low
        if hasattr(model, "encoders"):
            self.encoders = model.encoders

    def __call__(self, batch: Mapping[str, Any]) -> Any:
        return _cast_floats(self.model(_cast_inputs(batch, self.low)), jnp.float32)

    def encode(self, batch: Mapping[str, Any]) -> Any:
        return _cast_floats(self.model.encode(_cast_inputs(batch, self.low)), jnp.float32)


def _is_stateful(strategy: Any) -> bool:
    """Whether a training strategy carries state through the steps (has ``init_state``)."""
    return callable(getattr(strategy, "init_state", None))


def _dtype_name(compute_dtype: Any) -> str | None:
    """``compute_dtype`` checked: None (float32) or ``"bfloat16"``."""
    if compute_dtype is None:
        return None
    try:
        dtype = jnp.dtype(compute_dtype)
    except TypeError:
        raise TypeError(f"compute_dtype: expected None or jnp.bfloat16, got "
                        f"{compute_dtype!r}.") from None
    if dtype == jnp.float32:
        return None
    if dtype == jnp.float16:
        raise ValueError("compute_dtype: float16 needs loss scaling, which fit does not "
                         "do; use jnp.bfloat16 (float32's exponent range: no scaling).")
    if dtype != jnp.bfloat16:
        raise ValueError(f"compute_dtype: expected None (float32) or jnp.bfloat16, got "
                         f"{dtype}.")
    return "bfloat16"


def _cast_floats(tree: Any, dtype: Any) -> Any:
    """Every floating-point array of ``tree`` as ``dtype``; other leaves unchanged."""
    return jax.tree.map(lambda x: x.astype(dtype) if hasattr(x, "dtype") and jnp.issubdtype(
        x.dtype, jnp.floating) else x, tree)


def _cast_inputs(batch: Mapping[str, Any], dtype: Any) -> dict[str, Any]:
    """The batch with its modalities' float inputs as ``dtype`` (labels, ``valid`` and
    ``present`` as they are)."""
    return {k: v if k in RESERVED_KEYS else _cast_floats(v, dtype)
            for k, v in batch.items()}


def make_eval_step(graphdef: Any, *, mesh: Any = None) -> Any:
    """The compiled prediction step ``(params, rest, batch) -> outputs`` (eval mode).

    Args:
      graphdef: the model's ``nnx.GraphDef``.
      mesh: ``None`` or a mesh with a ``data`` axis.

    Returns:
      The jitted prediction function.
    """

    def predict(params, rest, batch):
        traced.count += 1
        return nnx.merge(graphdef, params, rest)(batch)

    traced = _TraceCount()
    if mesh is None:
        return traced.wrap(jax.jit(predict))
    rep, data = sharding_lib.replicated(mesh), sharding_lib.data_sharding(mesh)
    return traced.wrap(jax.jit(predict, in_shardings=(rep, rep, data)))


def _metrics_fn(task: Any, n: int) -> Any:
    """Jitted ``(outputs, target) -> {metric: value}`` over all ``n`` examples."""

    def metrics(outputs, target):
        valid = jnp.ones((n,), bool)
        values = dict(task.metrics(outputs, target, valid))
        values["loss"] = task.loss(outputs, target, valid)
        return values

    return jax.jit(metrics)


def _cached(fn: Any) -> Any:
    """``fn`` memoised on its (hashable) arguments; unhashable ones bypass the cache."""
    cached = functools.lru_cache(maxsize=32)(fn)

    def call(*args):
        try:
            return cached(*args)
        except TypeError:  # an unhashable task or graph: build afresh
            return fn(*args)

    call.cache_clear = cached.cache_clear
    return call


# ``evaluate`` / ``predict`` called repeatedly on one model (sweeps, notebooks) reuse
# their compiled steps: a new ``jax.jit`` wrapper per call would retrace and recompile every time.
_cached_eval_step = _cached(lambda graphdef, mesh: make_eval_step(graphdef, mesh=mesh))
_cached_metrics = _cached(_metrics_fn)
# ``fit`` over folds or seeds of one model (and ``make_train_step`` callers) likewise.
_cached_train_step = _cached(_train_step_fn)
# One transformation object per optimiser config, so that the train step cache hits.
_cached_optimizer = _cached(make_optimizer)


def _clear_compiled_steps() -> None:
    """Empties the step caches above, so that the next ``fit`` / ``evaluate`` compiles
    afresh (tests that count compilations use it: an earlier test in the same process
    may have compiled the same model already)."""
    for cache in (_cached_eval_step, _cached_metrics, _cached_train_step, _cached_optimizer):
        cache.cache_clear()


class _Evaluator:
    """Runs the eval step over a batch source; the task's metrics over all its examples."""

    def __init__(self, graphdef: Any, task: Any, data: BatchSource, batch_size: int,
                 mesh: Any):
        self.task, self.data, self.batch_size, self.mesh = task, data, batch_size, mesh
        self.predict = _cached_eval_step(graphdef, mesh)
        # Every process reads whole batches (their valid rows and labels are needed on
        # every process) and feeds its own rows.
        self.rows = (sharding_lib.process_batch_slice(batch_size)
                     if jax.process_count() > 1 else None)

    def outputs(self, params: Any, rest: Any) -> tuple[Any, dict[str, Any]]:
        """(outputs, ``{"label": ...}`` or ``{}``) of every valid row, in the source's
        unshuffled order."""
        chunks, labels, valid = [], [], []
        for batch in self.data.batches(self.batch_size, seed=0, epoch=0, shuffle=False):
            valid.append(np.asarray(batch["valid"], bool))
            if "label" in batch:
                labels.append(batch["label"])
            local = sharding_lib.shard_batch(_take_rows(batch, self.rows), self.mesh,
                                             global_batch_size=self.batch_size)
            chunks.append(sharding_lib.to_host(self.predict(params, rest, local)))
        keep = np.concatenate(valid)
        if int(keep.sum()) != len(self.data):
            raise ValueError(f"data: its batches hold {int(keep.sum())} valid rows, but "
                             f"len(data) is {len(self.data)}.")

        def pick(*xs):
            return xs[0] if np.ndim(xs[0]) == 0 else np.concatenate(xs)[keep]

        target = {"label": jax.tree.map(pick, *labels)} if labels else {}
        return jax.tree.map(pick, *chunks), target

    def __call__(self, params: Any, rest: Any) -> dict[str, float]:
        outputs, target = self.outputs(params, rest)
        values = _cached_metrics(self.task, len(self.data))(outputs, target)
        return {k: float(v) for k, v in sorted(values.items())}


def _evaluator(model: nnx.Module, task: Any, data: Any, batch_size: int,
               mesh: Any) -> tuple[_Evaluator, Any, Any]:
    """The evaluator of ``model`` (eval mode) over ``data``, and its (params, rest)."""
    data = _as_source(data, "data")
    mesh = sharding_lib.resolve_mesh(mesh)
    sharding_lib.check_batch_size(batch_size, mesh)
    graphdef_eval, params, rest = _split_eval(model)
    params, rest = sharding_lib.replicate((params, rest), mesh)
    return _Evaluator(graphdef_eval, task, data, batch_size, mesh), params, rest


def evaluate(model: nnx.Module, task: Any, data: BatchSource | Mapping[str, Any], *,
             batch_size: int = 256, mesh: Any = None) -> dict[str, float]:
    """The task's metrics (and ``loss``) of ``model`` in eval mode over all of ``data``.

    Metrics are computed once over the whole dataset (not averaged over batches), so
    F1, Pearson's r and retrieval recall are exact. The model's mode is left unchanged.

    Args:
      model: the model to evaluate.
      task: a task from ``lepton_mm.models``.
      data: a batch source (``ArrayDataset``, ``BucketedDataset``, ...) or a dict of
        arrays with a shared leading axis.
      batch_size: evaluation batch size (partial batches are padded and masked).
      mesh: ``None``, ``"auto"`` or a mesh with a ``data`` axis.

    Returns:
      ``{metric name: float}``, including ``loss``.
    """
    evaluator, params, rest = _evaluator(model, task, data, batch_size, mesh)
    return evaluator(params, rest)


def predict(model: nnx.Module, data: BatchSource | Mapping[str, Any], *,
            batch_size: int = 256, mesh: Any = None) -> Any:
    """``model``'s eval-mode outputs for every example of ``data``.

    The rows come in the order of the source's unshuffled batches: the example order
    for a dict of arrays or an ``ArrayDataset``; bucket by bucket for a
    ``BucketedDataset`` (its ``batch_indices(..., shuffle=False)`` says which example
    each row is). The model's mode is left unchanged; the compiled step is reused by
    later calls on the same model.

    Args:
      model: the model.
      data: a batch source or a dict of arrays with a shared leading axis.
      batch_size: rows per compiled call (partial batches are padded).
      mesh: ``None``, ``"auto"`` or a mesh with a ``data`` axis.

    Returns:
      The model's outputs as numpy arrays with a leading axis of ``len(data)``, e.g.
      float32 logits ``[n, num_classes]`` (scalar outputs, such as a ``TwoTower``'s
      scale, as they are).

    Examples:
      >>> import numpy as np
      >>> from flax import nnx
      >>> from lepton_mm.encoders import ImageCNN
      >>> from lepton_mm.models import build_classifier
      >>> model = build_classifier({"image": ImageCNN(1, dim=4, widths=(2,),
      ...                                             rngs=nnx.Rngs(0))}, None,
      ...                          num_outputs=3, rngs=nnx.Rngs(0))
      >>> predict(model, {"image": np.zeros((5, 8, 8, 1), np.float32)}, batch_size=4).shape
      (5, 3)
    """
    evaluator, params, rest = _evaluator(model, None, data, batch_size, mesh)
    return evaluator.outputs(params, rest)[0]


def _split_eval(model: nnx.Module) -> tuple[Any, Any, Any]:
    """Eval-mode graphdef and the pure (params, rest), leaving the model's mode as is."""
    copy = nnx.clone(model)
    copy.eval()
    graphdef, params, rest = nnx.split(copy, nnx.Param, ...)
    return graphdef, nnx.as_pure(params), nnx.as_pure(rest)


# -------------------------------------------------------------------------------- fit


@dataclasses.dataclass(frozen=True)
class FitResult:
    """What ``fit`` returns.

    Attributes:
      history: one dict per completed epoch: ``epoch`` (1-based), ``step``,
        ``train_loss``, ``skipped_steps`` and ``eval`` (metrics, if ``eval_data``).
      best_metrics: eval metrics of the selected checkpoint (last epoch's training loss
        as ``{"train_loss": ...}`` without ``eval_data``).
      best_step: the step of the selected checkpoint; the model ends with its state.
      final_params_path: that checkpoint's directory.
      step: the number of optimiser steps taken (including skipped ones).
      stopped_early: early stopping ended training.
      resumed_from: the checkpoint step this call resumed from, or None.
      num_params: number of trainable scalars (``nnx.Param``).
      num_compilations: how many times each step was compiled by this call.
      strategy_state: a stateful strategy's state after the last step (numpy arrays in
        the structure of its ``init_state``, e.g. ``PMR``'s prototypes), else ``None``.
    """

    history: tuple[dict[str, Any], ...]
    best_metrics: dict[str, float]
    best_step: int
    final_params_path: str
    step: int
    stopped_early: bool
    resumed_from: int | None
    num_params: int
    num_compilations: dict[str, int]
    strategy_state: Any = None


def _task_config(task: Any) -> dict[str, Any]:
    fields = dataclasses.asdict(task) if dataclasses.is_dataclass(task) else {}
    return {"type": type(task).__name__, **{k: _plain(v) for k, v in fields.items()}}


def _saved_setting(saved: Mapping[str, Any], key: str) -> Any:
    """``saved[key]`` of a checkpoint's run config, as this version would write it.

    Optimiser fields added after the checkpoint was written (absent from it) take their
    defaults, which reproduce the old behaviour, so such runs still resume. (A run with
    a raw optax transformation stores its ``optimizer_name``, a str, instead.)
    """
    value = saved.get(key)
    if key == "optimizer" and isinstance(value, Mapping):
        defaults = _plain(dataclasses.asdict(OptimizerConfig()))
        value = {**{k: v for k, v in defaults.items() if k not in value}, **value}
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _check_task(task: Any) -> None:
    for attr in ("loss", "metrics", "check_batch", "metric_names"):
        if not hasattr(task, attr):
            raise TypeError(f"task: expected a task (lepton_mm.models.tasks), got "
                            f"{type(task).__name__} without `{attr}`.")


def _check_int(name: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}.")
    return int(value)


def _is_better(value: float, best: float | None, mode: str) -> bool:
    if math.isnan(value):
        return False
    if best is None:
        return True
    return value > best if mode == "max" else value < best


def _check_batch_for_model(model: nnx.Module, batch: Mapping[str, Any]) -> None:
    check = getattr(model, "check_batch", None)
    if check is not None:
        check(batch)
        return
    for m in getattr(model, "modalities", ()):
        if m not in batch:
            raise ValueError(f"batch: missing modality {m!r}, which the model needs "
                             f"({list(model.modalities)}).")


def _check_workdir(workdir: Any) -> Path:
    if not isinstance(workdir, (str, os.PathLike)):
        raise TypeError(f"workdir: expected a str or os.PathLike, got "
                        f"{type(workdir).__name__}.")
    path = Path(workdir).absolute()  # Orbax refuses relative checkpoint paths
    if path.exists() and not path.is_dir():
        raise ValueError(f"workdir: {path} exists and is not a directory.")
    return path


def _signature(batch: Mapping[str, Any]) -> Any:
    """What the abstract check depends on: tree structure, per-example shapes, dtypes."""
    leaves, treedef = jax.tree.flatten(batch)
    return treedef, tuple((np.shape(x)[1:], np.dtype(x.dtype)) for x in leaves)


def _full_signature(batch: Mapping[str, Any]) -> Any:
    """Tree structure, whole shapes and dtypes: batches stack into one call iff equal."""
    leaves, treedef = jax.tree.flatten(batch)
    return treedef, tuple((np.shape(x), np.dtype(x.dtype)) for x in leaves)


def _check_traces(model: nnx.Module, task: Any, sample: Mapping[str, Any],
                  modality_dropout: float) -> None:
    """Traces the model and the task's loss on ``sample`` abstractly (``jax.eval_shape``:
    nothing is compiled or computed), so dtype and shape errors that only the encoders
    can see (e.g. integer images) surface before the first train step is compiled."""
    graphdef, state = nnx.split(model)
    batch = {**sample, "valid": np.ones(len(jax.tree.leaves(sample)[0]), bool)}

    def loss(state, batch):
        outputs = _call_model(nnx.merge(graphdef, state), batch, modality_dropout,
                              jax.random.key(0))
        return task.loss(outputs, batch, batch["valid"])

    jax.eval_shape(loss, state, batch)


def _check_optimizer(optimizer: Any, optimizer_name: Any) -> tuple[Any, Any]:
    """(the optax transformation, the run config's ``optimizer`` entry)."""
    if isinstance(optimizer, optax.GradientTransformation):
        if not isinstance(optimizer_name, str) or not optimizer_name.strip():
            raise ValueError(
                "optimizer_name: a raw optax transformation needs a stable name (e.g. "
                "optimizer_name='adamw-lr1e-3'): resuming compares it with the "
                f"checkpoint's, as it compares an OptimizerConfig; got {optimizer_name!r}.")
        return optimizer, optimizer_name
    if optimizer_name is not None:
        raise ValueError("optimizer_name: only for a raw optax transformation (an "
                         "OptimizerConfig is stored by its fields).")
    optimizer = OptimizerConfig() if optimizer is None else optimizer
    if not isinstance(optimizer, OptimizerConfig):
        raise TypeError(f"optimizer: expected an OptimizerConfig or an "
                        f"optax.GradientTransformation, got {type(optimizer).__name__}.")
    return _cached_optimizer(optimizer), _plain(dataclasses.asdict(optimizer))


def _first_rows(data: BatchSource) -> dict[str, Any]:
    """The first (up to) two examples of ``data``'s unshuffled first batch, no "valid"."""
    n = min(2, len(data))
    batch = dict(next(iter(data.batches(n, seed=0, epoch=0, shuffle=False))))
    del batch["valid"]
    return batch


def _hook_name(name: str, hook: Any, params: int) -> str | None:
    """The stable name of an ``augment`` / ``adversary`` hook, stored for resuming.

    A dataclass (e.g. ``Augmenter(...)``) is its ``repr`` and a ``functools.partial``
    its function's name with the bound arguments, so a changed setting is a different
    hook; a plain function or lambda is its qualified name only (its closure is not
    seen). Memory addresses (``<function f at 0x...>``) are dropped: the same hook in a
    new process has the same name.
    """
    if hook is None:
        return None
    if not callable(hook):
        raise TypeError(f"{name}: expected a callable taking {params} arguments, got "
                        f"{type(hook).__name__}.")
    if dataclasses.is_dataclass(hook):
        text = repr(hook)
    elif isinstance(hook, functools.partial):
        words = [_qualified_name(hook.func), *map(repr, hook.args),
                 *(f"{k}={v!r}" for k, v in sorted(hook.keywords.items()))]
        text = f"partial({', '.join(words)})"
    else:
        text = _qualified_name(hook)
    return re.sub(r" at 0x[0-9a-fA-F]+", "", text)


def _strategy_name(strategy: Any) -> str | None:
    """A training strategy's stored name (its ``repr``), after checking its interface."""
    if strategy is None:
        return None
    if not (callable(getattr(strategy, "modulate", None))
            or callable(getattr(strategy, "loss", None))):
        raise TypeError(f"strategy: expected an object with a modulate(model, batch, grads, "
                        f"key, step) or a loss(forward, task, batch, outputs, loss, key, "
                        f"step) method (e.g. lepton_mm.balance.OGMGE), got "
                        f"{type(strategy).__name__}.")
    try:
        hash(strategy)
    except TypeError:
        raise TypeError(f"strategy: expected a hashable strategy (a frozen dataclass), got "
                        f"{type(strategy).__name__}.") from None
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(strategy))


def _qualified_name(fn: Any) -> str:
    return getattr(fn, "__module__", "?") + "." + getattr(
        fn, "__qualname__", type(fn).__qualname__)


def _tree_spec(tree: Any) -> Any:
    """``tree`` with every leaf replaced by its ``(shape, dtype name)``."""
    return jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), tree)


def _same_spec(before: Any, after: Any) -> bool:
    """Whether two pytrees have the same structure and leaf shapes and dtypes."""
    try:
        return (jax.tree.structure(before) == jax.tree.structure(after)
                and _tree_spec(before) == _tree_spec(after))
    except (AttributeError, TypeError):
        return False


def _check_hook_output(name: str, before: Any, after: Any) -> None:
    """A hook must return a batch of the same structure, shapes and dtypes."""
    if not _same_spec(before, after):
        raise TypeError(f"{name}: must return a batch with the input's keys, shapes and "
                        "dtypes (an augmented copy of it).")


def _check_hooks(model: nnx.Module, task: Any, sample: Mapping[str, Any], augment: Any,
                 adversary: Any, strategy: Any) -> None:
    """Traces the hooks abstractly on a sample batch: errors before any compilation."""
    if augment is None and adversary is None and strategy is None:
        return
    key = jax.eval_shape(lambda: jax.random.key(0))  # abstract: compiles nothing
    # As the train step calls them: with the batch's "valid" rows.
    sample = {**sample, "valid": np.ones(len(jax.tree.leaves(sample)[0]), bool)}
    if augment is not None:
        _check_hook_output("augment", sample, _traced_hook("augment", lambda: jax.eval_shape(
            augment, sample, key)))
    if adversary is not None:
        graphdef, state = nnx.split(model)
        _check_hook_output("adversary", sample, _traced_hook("adversary", lambda: (
            jax.eval_shape(lambda s, b, k: adversary(nnx.merge(graphdef, s), b, k), state,
                           sample, key))))
    if strategy is not None:
        _check_strategy(model, task, sample, key, strategy)


def _check_strategy(model: nnx.Module, task: Any, sample: Mapping[str, Any], key: Any,
                    strategy: Any) -> None:
    """Traces a strategy's methods abstractly on a sample batch (see ``_check_hooks``)."""
    if hasattr(strategy, "check"):
        strategy.check(model)
    own = getattr(strategy, "task", None)  # e.g. MMPareto computes losses with its own
    if own is not None and own != task:
        raise ValueError(f"strategy: its task {own!r} differs from fit's task {task!r}; "
                         "give the strategy the task fit trains.")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.as_pure(params), nnx.as_pure(rest)
    stateful = _is_stateful(strategy)
    state = (_traced_hook("strategy", lambda: _init_strategy_state(
        strategy, graphdef, params, rest, task, sample, abstract=True)) if stateful else None)
    extra = (state,) if stateful else ()
    returns = "(scalar objective, {name: scalar}" + (", state)" if stateful else ")")
    if callable(getattr(strategy, "loss", None)):
        def objective(p, r, b, k, *s):
            forward = nnx.merge(graphdef, p, r)
            outputs = forward(b)
            return strategy.loss(forward, task, b, outputs, task.loss(outputs, b, b["valid"]),
                                 k, jnp.int32(0), *s)
        out = _traced_hook("strategy", lambda: jax.eval_shape(
            objective, params, rest, sample, key, *extra))
        if not isinstance(out, tuple) or len(out) != 2 + stateful:
            raise TypeError(f"strategy: loss must return {returns}.")
        value, metrics = out[:2]
        if getattr(value, "shape", None) != () or not _scalar_dict(metrics):
            raise TypeError(f"strategy: loss must return {returns}.")
        if stateful:
            _check_strategy_state("loss", state, out[2])
    if callable(getattr(strategy, "modulate", None)):
        out = _traced_hook("strategy", lambda: jax.eval_shape(
            lambda p, r, b, k, *s: strategy.modulate(nnx.merge(graphdef, p, r), b, p, k,
                                                     jnp.int32(0), *s),
            params, rest, sample, key, *extra))
        returns = returns.replace("scalar objective", "grads")
        if not isinstance(out, tuple) or len(out) != 2 + stateful:
            raise TypeError(f"strategy: modulate must return {returns}.")
        grads, metrics = out[:2]
        if jax.tree.structure(grads) != jax.tree.structure(params) or any(
                g.shape != p.shape or g.dtype != p.dtype
                for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(params),
                                strict=True)):
            raise TypeError("strategy: modulate must return gradients shaped like the "
                            "model's parameters.")
        if not _scalar_dict(metrics):
            raise TypeError(f"strategy: modulate must return {returns}.")
        if stateful:
            _check_strategy_state("modulate", state, out[2])


def _init_strategy_state(strategy: Any, graphdef: Any, params: Any, rest: Any, task: Any,
                         sample: Mapping[str, Any], *, abstract: bool) -> Any:
    """A stateful strategy's initial state: ``strategy.init_state(model, task, sample)``
    traced on a copy of the model (merged from ``params``, ``rest``: the caller's model
    and its RNG counts are untouched), abstractly (shapes only) or computed.

    Raises:
      TypeError: the state is not a pytree of arrays.
    """
    def init(p, r, b):
        return strategy.init_state(nnx.merge(graphdef, p, r), task, b)

    if abstract:
        state = jax.eval_shape(init, params, rest, sample)
    else:
        state = jax.jit(init)(params, rest, sample)
    if any(not hasattr(x, "shape") or not hasattr(x, "dtype") for x in jax.tree.leaves(state)):
        raise TypeError(f"strategy: init_state must return a pytree of arrays, got "
                        f"{jax.tree.map(type, state)!r}.")
    return state


def _check_strategy_state(method: str, before: Any, after: Any) -> None:
    """A stateful strategy's method must return a state like ``init_state``'s."""
    if not _same_spec(before, after):
        raise TypeError(f"strategy: {method} must return a state with init_state's "
                        f"structure, shapes and dtypes: {_tree_spec(before)!r} from "
                        "init_state.")


def _scalar_dict(metrics: Any) -> bool:
    return isinstance(metrics, Mapping) and all(
        isinstance(k, str) and getattr(v, "shape", None) == () for k, v in metrics.items())


def _state_placement(mesh: Any) -> Any:
    """Where the train state lives: replicated over ``mesh``, else the default device."""
    if mesh is not None:
        return sharding_lib.replicated(mesh)
    return jax.config.jax_default_device or jax.devices()[0]


def _traced_hook(name: str, trace: Callable[[], Any]) -> Any:
    """``trace()``; a lookup error inside a user's hook comes out named after it."""
    try:
        return trace()
    except (KeyError, IndexError, AttributeError) as error:
        raise TypeError(f"{name}: raised {type(error).__name__}({error}) on a sample batch "
                        "(the train data's first rows, with 'valid').") from error


def _check_fit_args(model, task, train_data, eval_data, *, optimizer, optimizer_name,
                    epochs, batch_size, eval_batch_size, seed, early_stopping_patience,
                    monitor, mode, modality_dropout, nan_policy, checkpoint_every,
                    keep_checkpoints, config, augment=None, adversary=None,
                    compute_dtype=None, strategy=None):
    """Validates ``fit``'s arguments (no computation); returns the data, the optax
    transformation and the run config (normalised arguments, JSON-serialisable)."""
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model: expected an nnx.Module, got {type(model).__name__}.")
    _check_task(task)
    tx, optimizer_setting = _check_optimizer(optimizer, optimizer_name)
    train_data = _as_source(train_data, "train_data")
    eval_data = None if eval_data is None else _as_source(eval_data, "eval_data")
    batch_size = _check_int("batch_size", batch_size, minimum=1)
    if checkpoint_every is not None:
        checkpoint_every = _check_int("checkpoint_every", checkpoint_every, minimum=1)
    if early_stopping_patience is not None:
        early_stopping_patience = _check_int("early_stopping_patience",
                                             early_stopping_patience, minimum=1)
        if eval_data is None:
            raise ValueError("early_stopping_patience: needs eval_data.")
    monitor = monitor or task.default_monitor
    mode = mode or task.default_mode
    if mode not in ("max", "min"):
        raise ValueError(f"mode: expected 'max' or 'min', got {mode!r}.")
    if eval_data is not None and monitor not in task.metric_names:
        raise ValueError(f"monitor: {monitor!r} is not a metric of {type(task).__name__}; "
                         f"known: {list(task.metric_names)}.")
    if nan_policy not in _NAN_POLICIES:
        raise ValueError(f"nan_policy: expected one of {list(_NAN_POLICIES)}, got "
                         f"{nan_policy!r}.")
    if isinstance(modality_dropout, bool) or not isinstance(modality_dropout,
                                                            numbers.Real):
        raise TypeError(f"modality_dropout: expected a float in [0, 1), got "
                        f"{type(modality_dropout).__name__}.")
    if not 0.0 <= modality_dropout < 1.0:
        raise ValueError(f"modality_dropout: expected a rate in [0, 1), got "
                         f"{modality_dropout!r}.")
    if modality_dropout and "modality_dropout" not in inspect.signature(
            type(model).__call__).parameters:
        raise ValueError(f"modality_dropout: {type(model).__name__} does not take a "
                         "modality_dropout argument (MultimodalClassifier does).")
    hooks = {"augment": _hook_name("augment", augment, 2),
             "adversary": _hook_name("adversary", adversary, 3),
             "strategy": _strategy_name(strategy)}
    traced, train_sample = set(), None
    for name, data in (("train_data", train_data), ("eval_data", eval_data)):
        if data is not None:
            try:
                if len(data) < 1:
                    raise ValueError("the source holds no examples.")
                sample = _first_rows(data)
                # Static checks see the whole data where the source holds it in memory
                # (e.g. every label is in range), else the first batch; the abstract
                # trace a two-example sample (once per distinct signature).
                arrays = getattr(data, "arrays", None)
                arrays = arrays if isinstance(arrays, Mapping) else sample
                _check_batch_for_model(model, arrays)
                task.check_batch(arrays)
                signature = _signature(sample)
                if signature not in traced:
                    _check_traces(model, task, sample, float(modality_dropout))
                    traced.add(signature)
                if name == "train_data":
                    train_sample = sample
            except (ValueError, TypeError) as e:
                raise type(e)(f"{name}: {e}") from None
    _check_hooks(model, task, train_sample, augment, adversary, strategy)
    run_config = {
        "task": _task_config(task), "optimizer": optimizer_setting,
        "batch_size": batch_size,
        "eval_batch_size": _check_int("eval_batch_size", eval_batch_size or batch_size,
                                      minimum=1),
        "seed": _check_int("seed", seed, minimum=0),
        "epochs": _check_int("epochs", epochs, minimum=1),
        "modality_dropout": float(modality_dropout), "nan_policy": nan_policy,
        **hooks, "compute_dtype": _dtype_name(compute_dtype),
        "early_stopping_patience": early_stopping_patience, "monitor": monitor,
        "mode": mode, "checkpoint_every": checkpoint_every,
        "keep_checkpoints": _check_int("keep_checkpoints", keep_checkpoints, minimum=1),
        "num_train_examples": len(train_data),
        "num_eval_examples": None if eval_data is None else len(eval_data),
        "user": _plain(dict(config or {})),
    }
    try:  # checkpoints store it: fail now, not at the first save
        json.dumps(run_config["user"])
    except (TypeError, ValueError) as e:
        raise TypeError(f"config: expected JSON-serialisable settings ({e}).") from None
    return train_data, eval_data, tx, run_config


def fit(
    model: nnx.Module,
    task: Any,
    train_data: BatchSource | Mapping[str, Any],
    *,
    workdir: str | Path,
    eval_data: BatchSource | Mapping[str, Any] | None = None,
    optimizer: OptimizerConfig | optax.GradientTransformation | None = None,
    optimizer_name: str | None = None,
    epochs: int = 1,
    batch_size: int = 32,
    eval_batch_size: int | None = None,
    seed: int = 0,
    early_stopping_patience: int | None = None,
    monitor: str | None = None,
    mode: str | None = None,
    modality_dropout: float = 0.0,
    augment: Callable[[Mapping[str, Any], Array], Mapping[str, Any]] | None = None,
    adversary: Callable[[nnx.Module, Mapping[str, Any], Array], Mapping[str, Any]] | None
    = None,
    nan_policy: str = "raise",
    compute_dtype: Any = None,
    strategy: Any = None,
    checkpoint_every: int | None = None,
    keep_checkpoints: int = 2,
    mesh: Any = None,
    steps_per_call: int = 1,
    progress: bool | None = None,
    loggers: Sequence[Logger | str] | None = (),
    tensorboard: bool | None = None,
    config: Mapping[str, Any] | None = None,
) -> FitResult:
    """Trains ``model`` on ``task``; resumes from ``workdir`` if it holds a checkpoint.

    Re-running the same call on the same ``workdir`` continues from the latest
    complete checkpoint and ends with exactly the parameters and metrics of an
    uninterrupted run. At the end the model holds the best checkpoint's state (by
    ``monitor`` on ``eval_data``; the last one without ``eval_data``) and is in eval mode.

    Logging: ``workdir/log.jsonl`` always gets one JSON record per optimiser step
    (``{"kind": "step", "step", "epoch", "loss", "grad_norm", "finite"}``) and one per
    epoch (``{"kind": "epoch", "step", "epoch", "train_loss", "skipped_steps", "eval",
    "wall_time"}``), and ``curves.png`` is drawn from it at the end. Each of ``loggers``
    receives exactly these records: ``"tensorboard"`` (event files in
    ``workdir/tensorboard``), ``"wandb"`` (an offline Weights & Biases run in
    ``workdir/wandb``), ``"mlflow"`` (an MLflow run in ``workdir/mlflow.db``), or any
    ``lepton_mm.training.loggers.Logger``; only the primary process logs. On resume
    ``log.jsonl`` is cut back to the restored step and the loggers are told that step
    (TensorBoard purges later events; W&B and MLflow continue the same run).

    Args:
      model: an NNX model called as ``model(batch)`` (``MultimodalClassifier``,
        ``TwoTower``), built with ``seed_rngs(seed)`` for full reproducibility.
      task: a ``lepton_mm.models.tasks`` task (loss and metrics).
      train_data: a batch source (``lepton_mm.data.BatchSource``: ``ArrayDataset``,
        ``BucketedDataset``, ...) or a dict of arrays in the batch format.
      workdir: run directory: ``checkpoints/``, ``log.jsonl``, ``curves.png``.
      eval_data: evaluated after every epoch; drives early stopping and best selection.
      optimizer: an ``OptimizerConfig`` (default: Adam, lr 1e-3) or any
        ``optax.GradientTransformation`` over the ``nnx.Param`` state (e.g. an
        ``optax.multi_transform`` of per-group rates); pass the same object again to
        reuse the compiled step.
      optimizer_name: required with a raw transformation, forbidden otherwise: the
        stable name stored for it in the run config (resuming needs the same name).
      epochs: number of passes over ``train_data``.
      batch_size: global batch size (a multiple of the mesh's device count).
      eval_batch_size: defaults to ``batch_size``.
      seed: the one integer behind shuffling, modality dropout (and, via
        ``seed_rngs``, initialisation and dropout).
      early_stopping_patience: stop after this many epochs without improvement of
        ``monitor`` (needs ``eval_data``); ``None`` never stops early.
      monitor: eval metric for early stopping and best selection (default: the task's
        ``default_monitor``, e.g. ``"accuracy"``); ``"loss"`` works for every task.
      mode: ``"max"`` or ``"min"`` (default: the task's ``default_mode``).
      modality_dropout: rate for ``lepton_mm.fusion.modality_dropout`` in training.
      augment: ``(batch, key) -> batch``, applied to every training batch inside the
        compiled step, e.g. a ``lepton_mm.augment.Augmenter`` (never to evaluation);
        the key follows from ``seed`` and the step, so resuming stays exact. Its
        ``repr`` (dataclass) or qualified name is stored and must match to resume.
      adversary: ``(model, batch, key) -> batch`` applied after ``augment`` to the model
        at the current parameters: adversarial training, e.g. ``functools.partial(
        attack, eps=0.1)`` with ``def attack(m, b, k, *, eps): return
        lepton_mm.adversarial.pgd(model_loss(m, task=task), b, eps=eps, steps=...,
        key=k)`` (``task``: the task trained on; a partial's settings are stored, a
        lambda's are not). The attacked batch is a constant for the gradient.
      nan_policy: ``"raise"``: stop at a non-finite loss or gradient with
        ``FloatingPointError`` naming the step and the last good checkpoint;
        ``"skip"``: skip that update and go on (counted in ``skipped_steps``).
      strategy: a training strategy applied to each step's loss or gradient, e.g.
        ``lepton_mm.balance.OGMGE(alpha=0.5)`` (balanced multimodal learning); its
        per-step metrics go into the step records of ``log.jsonl``. Part of the run: a
        resume with another strategy is refused. A stateful strategy (with
        ``init_state``, e.g. ``lepton_mm.balance.PMR``) has its state initialised from
        the model, the task and the first training examples, carried through the
        compiled steps, checkpointed and restored (resuming stays exact); the final
        state is ``FitResult.strategy_state``.
      compute_dtype: ``None`` (float32) or ``jnp.bfloat16``: mixed-precision training.
        The train step runs the model on bfloat16 copies of the parameters and float
        inputs (batch statistics and normalisation stay float32) and updates float32
        master weights (see ``make_train_step``); evaluation and the returned model
        stay float32. Worth it
        where bfloat16 matmuls are fast (GPU, TPU; on CPU only with AMX, and XLA:CPU
        reaches those kernels for few ops: see docs/performance.md).
      checkpoint_every: also checkpoint every this many steps (always at epoch ends).
      keep_checkpoints: how many latest checkpoints to keep (plus the best).
      mesh: ``None`` (one device), ``"auto"`` (data parallel over all devices) or a
        ``jax.sharding.Mesh`` with a ``"data"`` axis.
      steps_per_call: run this many consecutive training steps per compiled call (a
        ``lax.scan``; ``make_train_step``), one device only: one dispatch and one
        host-to-device copy per call instead of per step, for accelerators where a
        small step is shorter than its dispatch. The updates, logs and checkpoints are
        those of single steps (tested bit-equal on CPU; steps that do not fill a call,
        at an epoch's end or before a ``checkpoint_every`` checkpoint, run singly), so
        it is not part of the run: a run may resume with another value. On 2 CPU cores
        it saves ~1.7 ms of host CPU per step but no measurable wall time
        (docs/performance.md); default 1.
      progress: tqdm progress bar; ``None``: only when stdout is a terminal.
      loggers: where the log records go besides ``log.jsonl`` (``None``: nowhere else):
        ``Logger`` objects (``TensorBoardLogger(...)``, ``WandbLogger(project=...,
        mode="online")``, ``MlflowLogger(tracking_uri=...)``, your own) or the names
        ``"tensorboard"``, ``"wandb"``, ``"mlflow"`` for those with default settings
        (``lepton_mm.training.loggers``).
      tensorboard: deprecated: ``True`` is ``loggers=["tensorboard"]`` (with a
        ``DeprecationWarning``); ``None`` and ``False`` write no event files unless
        ``loggers`` asks for them.
      config: extra JSON-serialisable settings stored with the checkpoints.

    Returns:
      A ``FitResult``.

    Raises:
      ValueError / TypeError: bad arguments, unknown names, data that is not a batch
        source, a raw transformation without ``optimizer_name``, a batch without a
        modality the model needs, data the model or task cannot take (found by tracing the model
        and loss abstractly on two examples: dtypes, shapes; class labels out of range)
        — all before any compilation. Messages start with the argument's name.
      ImportError: a logger's package is missing (the message names the extra to
        install, e.g. ``pip install "lepton_mm[wandb]"``), before any training.
      CheckpointMismatchError: ``workdir`` holds a checkpoint of a different model (or
        of a run with a different task, optimizer, batch size, seed, ...).
      CheckpointCorruptError: the checkpoint to resume from is damaged (named).
      FloatingPointError: non-finite loss or gradient with ``nan_policy="raise"``.
      OSError: a checkpoint could not be written (disk full, read-only); the previous
        one is intact and re-running resumes from it.
    """
    # ---- validate everything before any computation
    workdir = _check_workdir(workdir)
    train_data, eval_data, tx, run_config = _check_fit_args(
        model, task, train_data, eval_data, optimizer=optimizer,
        optimizer_name=optimizer_name, epochs=epochs,
        batch_size=batch_size, eval_batch_size=eval_batch_size, seed=seed,
        early_stopping_patience=early_stopping_patience, monitor=monitor, mode=mode,
        modality_dropout=modality_dropout, nan_policy=nan_policy,
        checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints, config=config,
        augment=augment, adversary=adversary, compute_dtype=compute_dtype,
        strategy=strategy)
    extra_loggers = _check_loggers(loggers, tensorboard=tensorboard)
    batch_size, eval_batch_size = run_config["batch_size"], run_config["eval_batch_size"]
    monitor, mode = run_config["monitor"], run_config["mode"]
    checkpoint_every = run_config["checkpoint_every"]
    epochs, seed = run_config["epochs"], run_config["seed"]
    early_stopping_patience = run_config["early_stopping_patience"]
    mesh = sharding_lib.resolve_mesh(mesh)
    steps_per_call = _check_int("steps_per_call", steps_per_call, minimum=1)
    if steps_per_call > 1 and mesh is not None:
        raise ValueError(f"steps_per_call: {steps_per_call} steps per call run on one "
                         f"device only; got a mesh ({mesh.shape}). Use steps_per_call=1 "
                         f"with a mesh.")
    sharding_lib.check_batch_size(batch_size, mesh)
    sharding_lib.check_batch_size(eval_batch_size, mesh)
    fingerprint = model_fingerprint(model)
    primary = _is_primary()

    ckpt = Checkpointer(workdir, max_to_keep=run_config["keep_checkpoints"])
    latest = ckpt.latest_step()
    meta: dict[str, Any] | None = None
    if latest is not None:
        ckpt.check_model(fingerprint, latest)
        meta = ckpt.read_meta(latest)
        saved = meta.get("config", {})
        for key in _RESUME_KEYS:
            if _saved_setting(saved, key) != run_config[key]:
                ckpt.close()
                raise CheckpointMismatchError(
                    f"{workdir}: holds a checkpoint (step {latest}) of a run with a "
                    f"different {key}: {saved.get(key)!r} there, {run_config[key]!r} now. "
                    f"Use a fresh workdir to change it.")

    # ---- state
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.as_pure(params), nnx.as_pure(rest)
    graphdef_eval, _, _ = _split_eval(model)
    opt_state = jax.eval_shape(tx.init, params) if meta else jax.jit(tx.init)(params)
    strategy_state = None
    if _is_stateful(strategy):  # e.g. PMR's prototypes: carried by the step, checkpointed
        sample = _first_rows(train_data)
        sample["valid"] = np.ones(len(jax.tree.leaves(sample)[0]), bool)
        strategy_state = _init_strategy_state(strategy, graphdef, params, rest, task,
                                              sample, abstract=meta is not None)
    state = TrainState(params, rest, opt_state, strategy_state)
    loop = {"epoch": 0, "batch_index": 0, "best_value": None, "best_step": None,
            "bad_epochs": 0, "stopped_early": False, "loss_sum": 0.0, "loss_count": 0,
            "skipped": 0, "history": []}
    step = 0
    if meta is not None:
        target_sharding = sharding_lib.replicated(mesh) if mesh is not None else None
        model_state, opt_state, meta, *restored = ckpt.restore(
            latest, model_state=nnx.merge_state(params, rest), opt_state=opt_state,
            strategy_state=strategy_state, sharding=target_sharding)
        params, rest = _split_like(model_state, params, rest)
        state = TrainState(params, rest, opt_state, *restored)
        loop.update(meta["loop"])
        step = int(meta["step"])
        ckpt.set_best(loop["best_step"])
    # The steps donate the state: copy it so the caller's arrays stay valid. Placed
    # explicitly (committed) on a fresh start as after a restore, so a resumed run
    # reuses the compiled steps instead of compiling them again for the other placement.
    state = jax.device_put(state, _state_placement(mesh), may_alias=False)

    train_step = make_train_step(graphdef, tx, task, modality_dropout=modality_dropout,
                                 seed=seed, mesh=mesh, augment=augment, adversary=adversary,
                                 compute_dtype=run_config["compute_dtype"],
                                 strategy=strategy)
    chunk_step = None if steps_per_call == 1 else make_train_step(
        graphdef, tx, task, modality_dropout=modality_dropout, seed=seed, mesh=mesh,
        augment=augment, adversary=adversary, compute_dtype=run_config["compute_dtype"],
        strategy=strategy, steps_per_call=steps_per_call,
        thread_alive=nan_policy == "raise")
    evaluator = None if eval_data is None else _Evaluator(
        graphdef_eval, task, eval_data, eval_batch_size, mesh)
    # compilations by this call (the compiled steps are shared between calls)
    def train_traces() -> int:
        return train_step.traces.count + (0 if chunk_step is None
                                          else chunk_step.traces.count)

    traces_before = (train_traces(),
                     0 if evaluator is None else evaluator.predict.traces.count)
    logger = _Loggers([JsonlLogger(), *extra_loggers] if primary else [])
    try:
        logger.start(workdir, resume_step=step if meta else None, config=run_config)
    except BaseException:
        ckpt.close()
        raise
    steps_per_epoch = train_data.num_batches(batch_size)
    rows = sharding_lib.process_batch_slice(batch_size) if jax.process_count() > 1 else None
    show = sys.stdout.isatty() if progress is None else bool(progress)
    bar = tqdm(total=steps_per_epoch * epochs, initial=step, disable=not show or not primary,
               dynamic_ncols=True, leave=False)

    def last_good() -> str:
        good = ckpt.latest_step()
        return (f"Last good checkpoint: {ckpt.step_path(good)} (step {good})"
                if good is not None else "No checkpoint was written yet")

    def save(position_epoch: int, position_batch: int, metrics=None) -> None:
        meta_out = {
            "config": run_config, "fingerprint": fingerprint,
            "loop": {**loop, "epoch": position_epoch, "batch_index": position_batch},
            "metrics": metrics,
        }
        full = nnx.merge_state(state.params, state.rest)
        ckpt.save(step, model_state=full, opt_state=state.opt_state, meta=meta_out,
                  strategy_state=state.strategy)

    # Steps are queued without reading their statistics back (a host sync per step
    # costs ~10 % at batch 40 on 2 CPU cores); ``drain`` reads the queue every
    # ``_SYNC_EVERY`` steps, before each checkpoint and at each epoch end. With
    # nan_policy "raise" the device-side ``alive`` flag freezes the state at the first
    # non-finite step, so the error is raised with exactly the state of a per-step check.
    alive = jax.device_put(jnp.asarray(True), _state_placement(mesh))
    # (step, epoch, batch index, stats, index of the step in a K-step call or None)
    pending: list[tuple[int, int, int, Any, int | None]] = []

    def drain() -> None:
        unique = {id(p[3]): p[3] for p in pending}  # a K-step call's stats once
        fetched = dict(zip(unique, jax.device_get(list(unique.values())), strict=True))
        queued = list(pending)
        pending.clear()
        for at, ep, bi, stats_ref, j in queued:
            stats = fetched[id(stats_ref)]
            if j is not None:
                stats = jax.tree.map(lambda a, j=j: a[j], stats)
            loss, n_valid = float(stats["loss"]), int(stats["num_valid"])
            if not bool(stats["finite"]):
                if nan_policy == "raise":
                    raise FloatingPointError(
                        f"fit: non-finite loss ({loss}) or gradient norm "
                        f"({float(stats['grad_norm'])}) at step {at} (epoch {ep + 1}, "
                        f"batch {bi + 1}); the update was not applied and training "
                        f"stopped. {last_good()}.")
                loop["skipped"] += 1
            else:
                loop["loss_sum"] += loss * n_valid
                loop["loss_count"] += n_valid
            logger.log({"kind": "step", "step": at, "epoch": ep + 1, "loss": loss,
                        "grad_norm": float(stats["grad_norm"]),
                        "finite": bool(stats["finite"]),
                        **{k: float(v) for k, v in stats["strategy"].items()}})
            bar.set_postfix(epoch=ep + 1, loss=f"{loss:.4f}", refresh=False)

    start_time = time.perf_counter()
    # XLA's compiler frees hundreds of MB when it finishes; hand them back before the
    # compiled step first runs instead of keeping them for the whole run.
    compile_memory = release_memory_after_compiles()
    compile_memory.__enter__()
    try:
        epoch = int(loop["epoch"])
        while epoch < epochs and not loop["stopped_early"]:
            start, loop["batch_index"] = int(loop["batch_index"]), 0
            queued_batches: list[tuple[int, Any]] = []  # host batches of the next call
            for bi, batch in enumerate(train_data.batches(
                    batch_size, seed=seed, epoch=epoch, start=start, rows=rows), start):
                queued_batches.append((bi, batch))
                after = step + len(queued_batches)
                checkpoint_now = (checkpoint_every and after % checkpoint_every == 0
                                  and bi + 1 < steps_per_epoch)
                if not (len(queued_batches) == steps_per_call or checkpoint_now
                        or bi + 1 == steps_per_epoch):
                    continue
                if len(queued_batches) == steps_per_call > 1 and len(
                        {_full_signature(b) for _, b in queued_batches}) == 1:
                    stacked = jax.tree.map(lambda *xs: np.stack(xs),
                                           *[b for _, b in queued_batches])
                    state, stats = chunk_step(state, jax.device_put(stacked),
                                              jnp.asarray(step, jnp.int32), alive)
                    if nan_policy == "raise":
                        alive = stats["alive"][-1]  # a non-finite step freezes the state
                    for j, (qi, _) in enumerate(queued_batches):
                        pending.append((step + j + 1, epoch, qi, stats, j))
                    step += len(queued_batches)
                else:  # one step per call (also a short or mixed-shape group)
                    for qi, qbatch in queued_batches:
                        device_batch = sharding_lib.shard_batch(
                            qbatch, mesh, global_batch_size=batch_size)
                        state, stats = train_step(state, device_batch,
                                                  jnp.asarray(step, jnp.int32), alive)
                        if nan_policy == "raise":
                            alive = stats["alive"]  # a non-finite step freezes the state
                        step += 1
                        pending.append((step, epoch, qi, stats, None))
                bar.update(len(queued_batches))
                queued_batches.clear()
                if (checkpoint_now or len(pending) >= _SYNC_EVERY
                        or bi + 1 == steps_per_epoch):
                    drain()
                if checkpoint_now:
                    save(epoch, bi + 1)
            # ---- epoch end
            record: dict[str, Any] = {
                "epoch": epoch + 1, "step": step,
                "train_loss": loop["loss_sum"] / max(loop["loss_count"], 1),
                "skipped_steps": loop["skipped"],
            }
            if evaluator is not None:
                metrics = evaluator(state.params, state.rest)
                record["eval"] = metrics
                value = metrics[monitor]
                if _is_better(value, loop["best_value"], mode):
                    loop["best_value"], loop["best_step"], loop["bad_epochs"] = (
                        value, step, 0)
                else:
                    loop["bad_epochs"] += 1
                    if (early_stopping_patience is not None
                            and loop["bad_epochs"] >= early_stopping_patience):
                        loop["stopped_early"] = True
            else:
                loop["best_step"] = step
                loop["best_value"] = record["train_loss"]
            loop["history"] = [*loop["history"], record]
            loop["loss_sum"], loop["loss_count"], loop["skipped"] = 0.0, 0, 0
            logger.log({"kind": "epoch", **record,
                        "wall_time": time.perf_counter() - start_time})
            if show and primary:
                bar.write(_epoch_line(record, monitor))
            epoch += 1
            ckpt.set_best(loop["best_step"])
            save(epoch, 0, record.get("eval"))
        # ---- restore the best checkpoint
        best_step = loop["best_step"] if loop["best_step"] is not None else step
        if best_step != step:
            model_state, _, _ = ckpt.restore(
                best_step, model_state=nnx.merge_state(state.params, state.rest),
                sharding=sharding_lib.replicated(mesh) if mesh is not None else None)
            params, rest = _split_like(model_state, state.params, state.rest)
            state = TrainState(params, rest, state.opt_state, state.strategy)
        history = tuple(loop["history"])
        best_record = next((r for r in history if r["step"] == best_step), None)
        if best_record is not None and "eval" in best_record:
            best_metrics = dict(best_record["eval"])
        else:
            best_metrics = {"train_loss": history[-1]["train_loss"]} if history else {}
        path = str(ckpt.step_path(best_step))
    finally:
        compile_memory.__exit__(None, None, None)
        bar.close()
        logger.close()
        ckpt.close()
        nnx.update(model, state.params, state.rest)
        model.eval()
    if primary:
        plot_curves(workdir / LOG_NAME, workdir / CURVES_NAME)
    return FitResult(
        history=history, best_metrics=best_metrics, best_step=best_step,
        final_params_path=path, step=step, stopped_early=bool(loop["stopped_early"]),
        resumed_from=latest, num_params=count_params(state.params),
        num_compilations={
            "train_step": train_traces() - traces_before[0],
            "eval_step": (0 if evaluator is None
                          else evaluator.predict.traces.count - traces_before[1])},
        strategy_state=jax.device_get(state.strategy))


def _is_primary() -> bool:
    """Whether this is the process that logs and draws curves (process 0)."""
    return jax.process_index() == 0


def _split_like(full: nnx.State, params_like: nnx.State,
                rest_like: nnx.State) -> tuple[nnx.State, nnx.State]:
    """Splits a full pure state into the (params, rest) partition of the given states."""
    flat = dict(nnx.to_flat_state(full))

    def pick(like):
        return nnx.from_flat_state([(p, flat[p]) for p, _ in nnx.to_flat_state(like)])

    return pick(params_like), pick(rest_like)


def _epoch_line(record: Mapping[str, Any], monitor: str) -> str:
    text = f"epoch {record['epoch']}  step {record['step']}  " \
           f"train_loss {record['train_loss']:.4f}"
    if "eval" in record:
        text += f"  eval_{monitor} {record['eval'][monitor]:.4f}"
    return text
