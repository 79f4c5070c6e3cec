"""Checkpoints with Orbax: everything needed to resume a run exactly, in one place.

Layout of ``workdir/checkpoints/<step>/`` (one Orbax ``CheckpointManager`` step)::

    model/   StandardSave: the whole NNX model state (``nnx.state(model)``) as a nested
             dict with str keys: parameters, batch statistics, RNG stream keys (as raw
             ``key_data``) and counters
    train/   StandardSave: {"opt_state": {"000000": leaf, ...}} the optimiser state's
             leaves in ``jax.tree.leaves`` order (its structure comes from ``tx.init``),
             and for a run with a stateful training strategy (``fit(strategy=...)``
             with ``init_state``) {"strategy_state": {"000000": leaf, ...}} likewise
             (its structure comes from the strategy's ``init_state``)
    meta/    JsonSave: step, data-iterator position (epoch, batch_index), loop state
             (best metric and step, patience counter, history, epoch accumulators), the
             run config, and the model fingerprint

Orbax writes each step to a temporary directory and renames it when complete, so a
crash mid-save leaves only a temporary directory, which is ignored (and cleaned up by
the next run). A save that fails (disk full, read-only directory) raises ``OSError``
naming the directory and the intact previous step, and leaves no partial step behind.
The manager keeps the last ``max_to_keep`` steps plus the best one.

Integrity: Orbax (OCDBT) does not notice a flipped bit in array data, nor a flipped
digit in the JSON metadata (both restore silently wrong values). So ``meta`` also holds
the sha256 of every saved array (dtype, shape and bytes) and of the metadata itself,
written in the same atomic step; ``restore`` and ``read_meta`` verify them and raise
``CheckpointCorruptError`` naming the step's directory (as they do for any file Orbax
cannot read), so a corrupt checkpoint never yields partially or wrongly restored state.

``model_fingerprint`` (every variable's path, type, shape and dtype, plus their hash)
guards against restoring a different model: ``Checkpointer.check_model`` reads only the
small JSON and raises ``CheckpointMismatchError`` naming the workdir and the first
differences, before any array is touched. ``load_model`` restores into a model built
with ``nnx.eval_shape`` (abstract arrays with the target shardings), so parameters are
allocated once, directly from the checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from orbax.checkpoint import checkpoint_managers as ocp_policies

CHECKPOINT_DIR = "checkpoints"
_ITEMS = ("model", "train", "meta")


class CheckpointMismatchError(ValueError):
    """A workdir's checkpoint does not belong to the model (or config) being restored."""


class CheckpointCorruptError(ValueError):
    """A checkpoint's files cannot be read, or fail their sha256 integrity check."""


_INTEGRITY = "integrity"


# --------------------------------------------------------------------------- state trees


def _path_str(path: Sequence[Any]) -> str:
    return "/".join(str(p) for p in path)


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _flat(state: nnx.State) -> list[tuple[tuple[Any, ...], Any]]:
    """``[(path, leaf)]`` of a state whose leaves are Variables or raw arrays."""
    out = []
    for path, leaf in nnx.to_flat_state(state):
        if isinstance(leaf, nnx.Variable):
            leaf = leaf.get_value()
        out.append((tuple(path), leaf))
    return out


def model_fingerprint(model_or_state: nnx.Module | nnx.State) -> dict[str, Any]:
    """Describes a model's state: ``{"hash": str, "variables": [[path, type, shape, dtype]]}``.

    Works on concrete models and on ``nnx.eval_shape`` ones (nothing is computed).
    Two models have the same fingerprint iff their variables have the same paths,
    variable types, shapes and dtypes.

    Args:
      model_or_state: an ``nnx.Module`` (concrete or abstract) or its ``nnx.State``.

    Returns:
      ``{"hash": str, "variables": [[path, type, shape, dtype], ...]}``.
    """
    state = (nnx.state(model_or_state) if isinstance(model_or_state, nnx.Module)
             else model_or_state)
    entries = []
    for path, var in nnx.to_flat_state(state):
        value = var.get_value() if isinstance(var, nnx.Variable) else var
        kind = type(var).__name__ if isinstance(var, nnx.Variable) else "Array"
        entries.append([_path_str(path), kind, list(np.shape(value)), str(value.dtype)])
    entries.sort()
    digest = hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]
    return {"hash": digest, "variables": entries}


def describe_mismatch(saved: Mapping[str, Any], current: Mapping[str, Any],
                      *, limit: int = 5) -> str:
    """Human-readable differences between two ``model_fingerprint`` results."""
    old = {e[0]: e[1:] for e in saved.get("variables", [])}
    new = {e[0]: e[1:] for e in current.get("variables", [])}
    lines = []
    for path in sorted(set(old) | set(new)):
        if path not in new:
            lines.append(f"'{path}' is in the checkpoint but not in the model")
        elif path not in old:
            lines.append(f"'{path}' is in the model but not in the checkpoint")
        elif old[path] != new[path]:
            (k0, s0, d0), (k1, s1, d1) = old[path], new[path]
            lines.append(f"'{path}' is {k0} {tuple(s0)} {d0} in the checkpoint but "
                         f"{k1} {tuple(s1)} {d1} in the model")
    if not lines:
        return "no differences"
    more = f"; and {len(lines) - limit} more" if len(lines) > limit else ""
    return "; ".join(lines[:limit]) + more


def state_to_tree(state: nnx.State) -> dict[str, Any]:
    """A nested dict with str keys of the state's arrays; PRNG keys become ``key_data``."""
    tree: dict[str, Any] = {}
    for path, leaf in _flat(state):
        node = tree
        for p in path[:-1]:
            node = node.setdefault(str(p), {})
        node[str(path[-1])] = jax.random.key_data(leaf) if _is_key(leaf) else leaf
    return tree


def _lookup(tree: Mapping[str, Any], path: Sequence[Any]) -> Any:
    node: Any = tree
    for p in path:
        node = node[str(p)]
    return node


def _key_impl(leaf: Any) -> Any:
    try:
        return jax.random.key_impl(leaf)
    except (TypeError, AttributeError):
        return leaf.dtype._impl  # abstract key (nnx.eval_shape): no public accessor


def _abstract_tree(state: nnx.State, sharding: Callable[[Any], Any]) -> dict[str, Any]:
    """The restore target: ``ShapeDtypeStruct`` per leaf, keys as their ``key_data``."""
    tree: dict[str, Any] = {}
    for path, leaf in _flat(state):
        if _is_key(leaf):
            shaped = jax.eval_shape(jax.random.key_data, leaf)
        else:
            shaped = leaf
        node = tree
        for p in path[:-1]:
            node = node.setdefault(str(p), {})
        node[str(path[-1])] = jax.ShapeDtypeStruct(shaped.shape, shaped.dtype,
                                                   sharding=sharding(leaf))
    return tree


def tree_to_state(tree: Mapping[str, Any], like: nnx.State) -> nnx.State:
    """Inverse of ``state_to_tree``: a pure ``nnx.State`` shaped like ``like``."""
    flat = []
    for path, leaf in _flat(like):
        value = _lookup(tree, path)
        if _is_key(leaf):
            value = jax.random.wrap_key_data(value, impl=_key_impl(leaf))
        flat.append((path, value))
    return nnx.from_flat_state(flat)


def _target_sharding(leaf: Any, sharding: Any) -> Any:
    """``sharding`` if given, else the leaf's own, else the first local device."""
    if sharding is not None:
        return sharding
    own = getattr(leaf, "sharding", None)
    if own is not None:
        return own
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def all_finite(tree: Any) -> bool:
    """True iff every floating-point leaf of ``tree`` is finite.

    Checked on the host copy of each array's first local shard (the whole array when
    it is replicated, as parameters are here), so no device computation is compiled.
    """
    for x in jax.tree.leaves(tree):
        if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.floating):
            continue
        local = x.addressable_data(0) if isinstance(x, jax.Array) else x
        if not np.all(np.isfinite(np.asarray(local))):
            return False
    return True


def _array_digest(x: Any) -> str | None:
    """sha256 of an array's dtype, shape and bytes (host copy); None when this process
    does not hold the whole array (sharded across processes)."""
    if isinstance(x, jax.Array):
        if x.is_fully_addressable:
            x = np.asarray(x)
        elif x.is_fully_replicated:
            x = np.asarray(x.addressable_data(0))
        else:
            return None
    x = np.asarray(x)
    digest = hashlib.sha256(f"{x.dtype.str}{x.shape}".encode())
    digest.update(np.ascontiguousarray(x).tobytes())
    return digest.hexdigest()


def _digests(tree: Any) -> dict[str, str]:
    """``{keystr(path): sha256}`` of the arrays of ``tree``."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        digest = _array_digest(leaf)
        if digest is not None:
            out[jax.tree_util.keystr(path)] = digest
    return out


def _os_error_code(error: BaseException) -> int | None:
    """The errno of an I/O failure that TensorStore reports as a ``ValueError``."""
    match = re.search(r"os_error_code=(\d+)", str(error))
    return int(match.group(1)) if match else None


def _meta_digest(meta: Mapping[str, Any]) -> str:
    """sha256 of the JSON metadata as it reads back (tuples as lists, keys as str)."""
    canonical = json.dumps(json.loads(json.dumps(meta)), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


# ---------------------------------------------------------------------------- manager


@dataclasses.dataclass
class _KeepSteps:
    """Orbax preservation policy: always keep the steps in ``steps`` (the best one)."""

    steps: set[int] = dataclasses.field(default_factory=set)

    def should_preserve(self, checkpoints, *, context):
        del context
        return [c.step in self.steps for c in checkpoints]


class Checkpointer:
    """Saves and restores training checkpoints under ``workdir/checkpoints``.

    Args:
      workdir: the run directory.
      max_to_keep: how many of the latest steps to keep (the best step is kept too).
      read_only: never write or delete (for ``load_model``).

    Attributes:
      directory: ``workdir/checkpoints``.
    """

    def __init__(self, workdir: str | os.PathLike[str], *, max_to_keep: int = 2,
                 read_only: bool = False):
        if isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) \
                or max_to_keep < 1:
            raise ValueError(f"max_to_keep: expected a positive int, got {max_to_keep!r}.")
        self.workdir = Path(workdir)
        self.directory = self.workdir / CHECKPOINT_DIR
        self._best = _KeepSteps()
        policy = ocp_policies.AnyPreservationPolicy(
            [ocp_policies.LatestN(n=max_to_keep), self._best])
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=False,
            save_interval_steps=0 if read_only else 1,
            create=not read_only,
            read_only=read_only,
            cleanup_tmp_directories=not read_only,
            preservation_policy=policy,
        )
        if read_only and not self.directory.exists():
            raise FileNotFoundError(f"{self.workdir}: no checkpoints (expected "
                                    f"{self.directory}).")
        # Orbax needs absolute paths (a relative workdir failed at restore time).
        self._manager = ocp.CheckpointManager(self.directory.absolute(), options=options)

    def steps(self) -> list[int]:
        """Complete checkpoint steps, ascending (temporary directories are ignored)."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete checkpoint step, or ``None``."""
        return self._manager.latest_step()

    def step_path(self, step: int) -> Path:
        """The directory of checkpoint ``step``."""
        return self.directory / str(step)

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        """The JSON metadata of ``step`` (default: latest), integrity-checked.

        Raises:
          FileNotFoundError: no such checkpoint.
          CheckpointCorruptError: the metadata cannot be read or fails its sha256.
        """
        step = self._resolve(step)
        restored = self._read(step, ocp.args.Composite(meta=ocp.args.JsonRestore()))
        meta, _ = self._verified_meta(step, restored["meta"])
        return meta

    def _corrupt(self, step: int, what: str) -> CheckpointCorruptError:
        older = [s for s in self.steps() if s < step]
        hint = (f"Delete {self.step_path(step)} to fall back to step {older[-1]}."
                if older else "No older checkpoint exists.")
        return CheckpointCorruptError(
            f"{self.step_path(step)}: checkpoint step {step} is corrupt: {what} {hint}")

    def _read(self, step: int, args: Any) -> Any:
        """``manager.restore`` with any failure reported as corruption of ``step``."""
        try:
            return self._manager.restore(step, args=args)
        except Exception as e:  # Orbax/TensorStore/JSON errors of damaged files
            detail = " ".join(str(e).split())[:400]  # TensorStore errors span many lines
            raise self._corrupt(step, f"its files cannot be read ({type(e).__name__}: "
                                      f"{detail}).") from e

    def _verified_meta(self, step: int, raw: Mapping[str, Any]
                       ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Checks the metadata's own sha256; returns ``(meta, array digests)``.

        Checkpoints written before integrity data existed pass unchecked.
        """
        meta = dict(raw)
        integrity = meta.pop(_INTEGRITY, None)
        if integrity is None:
            return meta, {}
        if not isinstance(integrity, Mapping) or "meta" not in integrity:
            raise self._corrupt(step, "its integrity record is malformed.")
        integrity = dict(integrity)
        expected = integrity.pop("meta")
        if _meta_digest({**meta, _INTEGRITY: integrity}) != expected:
            raise self._corrupt(step, "its metadata (meta/) fails its sha256 check.")
        return meta, integrity

    def _verify_arrays(self, step: int, item: str, tree: Any,
                       integrity: Mapping[str, Any]) -> None:
        expected = integrity.get(item)
        if not expected:
            return
        got = _digests(tree)
        for key, digest in expected.items():
            if key in got and got[key] != digest:
                raise self._corrupt(step, f"array {item}{key} fails its sha256 check "
                                          "(flipped bits in the stored data?).")

    def _resolve(self, step: int | None) -> int:
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"{self.workdir}: no complete checkpoint in "
                                        f"{self.directory}.")
        elif step not in self.steps():
            raise FileNotFoundError(f"{self.workdir}: no checkpoint for step {step} "
                                    f"(have {self.steps()}).")
        return step

    def check_model(self, fingerprint: Mapping[str, Any], step: int | None = None) -> None:
        """Raises ``CheckpointMismatchError`` unless checkpoint ``step`` is of this model.

        Only the JSON metadata is read.
        """
        step = self._resolve(step)
        saved = self.read_meta(step).get("fingerprint", {})
        if saved.get("hash") != fingerprint["hash"]:
            raise CheckpointMismatchError(
                f"{self.workdir}: holds a checkpoint (step {step}) of a different model: "
                f"{describe_mismatch(saved, fingerprint)}. Use a fresh workdir, or delete "
                f"{self.directory} to start over.")

    def set_best(self, step: int | None) -> None:
        """Marks ``step`` as the best checkpoint (kept regardless of ``max_to_keep``)."""
        self._best.steps = set() if step is None else {int(step)}

    def save(self, step: int, *, model_state: nnx.State, opt_state: Any,
             meta: Mapping[str, Any], strategy_state: Any = None) -> Path:
        """Writes checkpoint ``step`` (synchronously, atomically).

        Args:
          step: the number of optimiser steps taken.
          model_state: the full model state (``nnx.state(model)``, Variables or arrays).
          opt_state: the optax state.
          meta: JSON-serialisable metadata (``step`` is added).
          strategy_state: a training strategy's state (a pytree of arrays), or ``None``
            (nothing is written for it: the checkpoint is as without the argument).

        Returns:
          The checkpoint directory.

        Raises:
          FloatingPointError: a floating-point array of the model or optimiser state is
            not finite (nothing is written).
          OSError: writing failed (e.g. disk full, read-only directory); the message
            names the directory and the previous checkpoint, which is left intact, and
            the failed step's temporary directory is removed.
        """
        model_tree = state_to_tree(model_state)
        leaves = jax.tree.leaves(opt_state)
        train = {"opt_state": {f"{i:06d}": x for i, x in enumerate(leaves)}}
        if jax.tree.leaves(strategy_state):
            train["strategy_state"] = {f"{i:06d}": x for i, x in
                                       enumerate(jax.tree.leaves(strategy_state))}
        for what, tree in (("model", model_tree), ("optimiser", train["opt_state"]),
                           ("strategy", train.get("strategy_state"))):
            if not all_finite(tree):
                raise FloatingPointError(
                    f"refusing to write checkpoint step {step} to {self.directory}: the "
                    f"{what} state holds NaN or Inf.")
        meta = {**dict(meta), "step": int(step),
                _INTEGRITY: {"model": _digests(model_tree), "train": _digests(train)}}
        meta[_INTEGRITY]["meta"] = _meta_digest(meta)
        if self._manager.latest_step() is not None and step in self.steps():
            self._manager.delete(step)  # a re-run overwrites a step it recomputed
        previous = self.latest_step()
        try:
            self._manager.save(step, args=ocp.args.Composite(
                model=ocp.args.StandardSave(model_tree),
                train=ocp.args.StandardSave(train),
                meta=ocp.args.JsonSave(meta)), force=True)
            self._manager.wait_until_finished()
        except Exception as e:  # disk full, read-only or vanished directory, ...
            self._remove_partial(step)
            kept = (f"the previous checkpoint {self.step_path(previous)} (step {previous}) "
                    "is intact" if previous is not None else "no earlier checkpoint exists")
            detail = " ".join(str(e).split())[:400]
            message = (f"saving checkpoint step {step} to {self.directory} failed "
                       f"({type(e).__name__}: {detail}); step {step} was not written "
                       f"and {kept}.")
            code = e.errno if isinstance(e, OSError) else _os_error_code(e)
            if code is None and not isinstance(e, OSError):
                raise
            raise OSError(code, message) from e
        return self.step_path(step)

    def _remove_partial(self, step: int) -> None:
        """Deletes what a failed save of ``step`` left (Orbax's temporary directory).

        Orbax saves the items in threads and a failing one does not stop the others:
        wait for them first, or they would recreate files under the removed directory.
        """
        for thread in threading.enumerate():
            if type(thread).__name__ == "_SignalingThread" and thread.is_alive():
                thread.join(timeout=30.0)
        if jax.process_index() != 0 or not self.directory.is_dir():
            return
        for path in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
            shutil.rmtree(path, ignore_errors=True)

    def restore(self, step: int | None, *, model_state: nnx.State,
                opt_state: Any | None = None, strategy_state: Any | None = None,
                sharding: Any = None) -> tuple[Any, ...]:
        """Restores checkpoint ``step`` (default: latest) into the given structures.

        Args:
          step: the step, or ``None`` for the latest.
          model_state: a state shaped like the saved one (concrete or abstract from
            ``nnx.eval_shape``); its leaves' shardings are the targets.
          opt_state: an (abstract) optax state to restore into, or ``None`` to skip it.
          strategy_state: an (abstract) training strategy state to restore into (one
            saved with ``save(strategy_state=...)``), or ``None`` to skip it.
          sharding: target sharding of every array (e.g. replicated over a mesh);
            default: each leaf's own sharding, or the first local device for abstract
            leaves that carry none.

        Returns:
          ``(model_state, opt_state, meta)``: a pure ``nnx.State`` of arrays, the optax
          state (or ``None``) and the metadata dict; with ``strategy_state`` given,
          ``(model_state, opt_state, meta, strategy_state)``.

        Raises:
          FileNotFoundError: no such checkpoint.
          CheckpointCorruptError: a file cannot be read, or an array or the metadata
            fails its sha256 check; nothing is returned.
        """
        step = self._resolve(step)
        target = _abstract_tree(model_state, lambda x: _target_sharding(x, sharding))
        args = {"model": ocp.args.StandardRestore(target), "meta": ocp.args.JsonRestore()}
        train_target = {}
        for name, like in (("opt_state", opt_state), ("strategy_state", strategy_state)):
            if like is not None and (name == "opt_state" or jax.tree.leaves(like)):
                train_target[name] = {
                    f"{i:06d}": jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                     sharding=_target_sharding(x, sharding))
                    for i, x in enumerate(jax.tree.leaves(like))}
        if train_target:
            args["train"] = ocp.args.StandardRestore(train_target)
        restored = self._read(step, ocp.args.Composite(**args))
        meta, integrity = self._verified_meta(step, restored["meta"])
        self._verify_arrays(step, "model", restored["model"], integrity)
        if train_target:
            self._verify_arrays(step, "train", restored["train"], integrity)
        state = tree_to_state(restored["model"], model_state)

        def unflatten(name, like):
            if like is None or name not in train_target:
                return like if name == "strategy_state" else None
            saved = restored["train"][name]
            leaves, treedef = jax.tree.flatten(like)
            return jax.tree.unflatten(treedef, [saved[f"{i:06d}"] for i in range(len(leaves))])

        opt = unflatten("opt_state", opt_state)
        if strategy_state is None:
            return state, opt, meta
        return state, opt, meta, unflatten("strategy_state", strategy_state)

    def close(self) -> None:
        self._manager.close()


def load_model(workdir: str | os.PathLike[str], build: Callable[[], nnx.Module], *,
               step: int | str = "best", sharding: Any = None) -> nnx.Module:
    """Builds a model from a training checkpoint, allocating its parameters once.

    ``build`` runs under ``nnx.eval_shape`` (no arrays are created); the checkpoint is
    restored straight into the abstract state with the target sharding and merged.

    Args:
      workdir: a ``fit`` run directory.
      build: a function returning the model (e.g. ``lambda: make_model(nnx.Rngs(0))``).
      step: ``"best"`` (the step ``fit`` selected), ``"latest"`` or a step number.
      sharding: where to put the arrays (default: the first local device); e.g.
        ``replicated(mesh)``.

    Returns:
      The model with the checkpoint's state, in training mode as ``build`` made it.

    Raises:
      FileNotFoundError: no such checkpoint.
      CheckpointMismatchError: the checkpoint is of a different model.
      CheckpointCorruptError: the checkpoint's files are damaged (see ``restore``).
    """
    abstract = nnx.eval_shape(build)
    graphdef, abstract_state = nnx.split(abstract)
    ckpt = Checkpointer(workdir, read_only=True)
    try:
        if step == "latest":
            number = ckpt.latest_step()
        elif step == "best":
            meta = ckpt.read_meta()
            number = meta.get("loop", {}).get("best_step", meta["step"])
        elif isinstance(step, int) and not isinstance(step, bool):
            number = step
        else:
            raise ValueError(f"step: expected 'best', 'latest' or an int, got {step!r}.")
        ckpt.check_model(model_fingerprint(abstract_state), number)
        state, _, _ = ckpt.restore(number, model_state=abstract_state, sharding=sharding)
    finally:
        ckpt.close()
    return nnx.merge(graphdef, state)
