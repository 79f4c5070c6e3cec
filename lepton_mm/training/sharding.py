"""Data parallelism with ``jax.sharding``: one ``data`` mesh axis, batch sharded, params
replicated; and multi-host start-up with ``jax.distributed.initialize``.

Single host: ``mesh = make_mesh()`` spans all local devices; ``fit(..., mesh="auto")``
does this. Multi-host: every process calls ``initialize_distributed`` first, then builds
the same global mesh over ``jax.devices()``; each process feeds its slice of the global
batch (``process_batch_slice``) and ``shard_batch`` assembles the global array.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis ``"data"`` over ``devices``.

    Args:
      devices: the devices to use; all devices of every process when ``None``.

    Returns:
      A ``Mesh`` with the single axis ``"data"``.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("devices: expected at least one device.")
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def resolve_mesh(mesh: Mesh | str | None) -> Mesh | None:
    """``None`` → no sharding; ``"auto"`` → ``make_mesh()``; a ``Mesh`` → itself.

    Raises:
      ValueError: an unknown string, or a mesh without a ``"data"`` axis.
    """
    if mesh is None:
        return None
    if isinstance(mesh, str):
        if mesh != "auto":
            raise ValueError(f"mesh: expected None, 'auto' or a jax.sharding.Mesh, got "
                             f"{mesh!r}.")
        return make_mesh()
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh: expected None, 'auto' or a jax.sharding.Mesh, got "
                        f"{type(mesh).__name__}.")
    if DATA_AXIS not in mesh.axis_names:
        raise ValueError(f"mesh: needs a {DATA_AXIS!r} axis, got axes {mesh.axis_names}.")
    return mesh


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Shards the leading (batch) axis over ``"data"``; other axes replicated.

    Args:
      mesh: a mesh with a ``"data"`` axis.

    Returns:
      ``NamedSharding(mesh, PartitionSpec("data"))``.
    """
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (parameters, optimiser state).

    Args:
      mesh: the mesh.

    Returns:
      ``NamedSharding(mesh, PartitionSpec())``.
    """
    return NamedSharding(mesh, PartitionSpec())


def check_batch_size(batch_size: int, mesh: Mesh | None) -> None:
    """Raises unless ``batch_size`` splits evenly over the mesh's data axis and processes."""
    if mesh is None:
        return
    n = mesh.shape[DATA_AXIS]
    if batch_size % n:
        raise ValueError(f"batch_size: {batch_size} does not split over the {n} devices of "
                         f"the mesh's {DATA_AXIS!r} axis; use a multiple of {n}.")
    if batch_size % jax.process_count():
        raise ValueError(f"batch_size: {batch_size} does not split over "
                         f"{jax.process_count()} processes.")


def process_batch_slice(batch_size: int) -> slice:
    """The rows of a global batch that this process feeds (all rows on one process)."""
    per = batch_size // jax.process_count()
    start = jax.process_index() * per
    return slice(start, start + per)


def shard_batch(batch: Any, mesh: Mesh | None, *, global_batch_size: int | None = None) -> Any:
    """Puts a host batch (pytree of numpy arrays) on the devices.

    Args:
      batch: on one process, the whole global batch; on several, this process's rows
        (``process_batch_slice``).
      mesh: the mesh, or ``None`` for the default device.
      global_batch_size: the global batch size (needed with several processes).

    Returns:
      A pytree of ``jax.Array`` sharded along ``"data"``.
    """
    if mesh is None:
        return jax.device_put(batch)
    sharding = data_sharding(mesh)
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)

    def put(x):
        x = np.asarray(x)
        shape = (global_batch_size, *x.shape[1:])
        return jax.make_array_from_process_local_data(sharding, x, shape)

    return jax.tree.map(put, batch)


def replicate(tree: Any, mesh: Mesh | None) -> Any:
    """Copies every array of ``tree`` to all devices of ``mesh`` (no-op for ``None``)."""
    if mesh is None:
        return tree
    return jax.device_put(tree, replicated(mesh))


def to_host(x: Any) -> Any:
    """Fetches a (possibly multi-process sharded) pytree of arrays as numpy arrays."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(x, tiled=True)
    return jax.tree.map(np.asarray, x)


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None, *,
                           local_device_ids: Sequence[int] | None = None) -> None:
    """Starts multi-process JAX (``jax.distributed.initialize``); call before any JAX op.

    Arguments left ``None`` come from the environment variables
    ``LEPTON_COORDINATOR_ADDRESS`` (``host:port`` of process 0),
    ``LEPTON_NUM_PROCESSES`` and ``LEPTON_PROCESS_ID``; when those are unset too, JAX's
    own auto-detection (SLURM, TPU pods, ...) applies. On CPU, cross-process collectives
    use gloo (``jax_cpu_collectives_implementation``) when this JAX offers it.

    Args:
      coordinator_address: ``host:port`` of process 0's coordinator.
      num_processes: how many processes take part.
      process_id: this process's index in ``[0, num_processes)``.
      local_device_ids: restrict this process to these local devices.

    Raises:
      ValueError: an environment variable is not an integer.
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("LEPTON_COORDINATOR_ADDRESS")
    if num_processes is None and env.get("LEPTON_NUM_PROCESSES"):
        num_processes = _env_int("LEPTON_NUM_PROCESSES")
    if process_id is None and env.get("LEPTON_PROCESS_ID"):
        process_id = _env_int("LEPTON_PROCESS_ID")
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, ValueError):
        pass
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               local_device_ids=local_device_ids)


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}: expected an integer, got {value!r}.") from None
