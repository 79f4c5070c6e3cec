"""Opt-in host-allocator tuning for CPU training (glibc ``mallopt``).

A CPU training step allocates its large activation buffers afresh on every call. With
glibc's defaults each such buffer is served by a new ``mmap`` (blocks over the dynamic
mmap threshold, at most 32 MiB) or by a per-thread arena that is trimmed back to the OS
when freed, so every step pays a page fault, and a zeroed page, per 4 KiB touched. On a
2-core AMD EPYC VM this cost nearly as much as the arithmetic: the AV-MNIST LeNet + concat
training step (batch 128) took 188 ms with the defaults and 108 ms after
``tune_glibc_malloc()``; the same PyTorch step went from 150 ms to 99 ms
(``benchmarks/ablation.py``, docs/performance.md).

This changes a process-wide setting, so the library never calls it behind your back:
call it once, early, in a training script. lepton_mm's experiment scripts and
``benchmarks/run.py`` (for both frameworks it compares) do. Freed memory then stays in
the process (RSS no longer shrinks after a peak).

``release_free_memory()`` is the other half, and safe to call anywhere: it hands the
free pages of the heap back to the OS without changing any setting.
``release_memory_after_compiles()`` does that after every XLA compilation inside its
``with`` block (``fit`` runs in one): the compiler frees several hundred MB when it
finishes (the AV-MNIST LeNet + concat step at batch 128: RSS 950 MB after compiling,
480 MB after the release; docs/performance.md), which glibc would otherwise keep for the
rest of the run, with the first step's buffers on top.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
from collections.abc import Iterator
from typing import Any

import jax

__all__ = ["release_free_memory", "release_memory_after_compiles", "tune_glibc_malloc"]

# glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name or "libc.so.6")
    except OSError:
        return None


def tune_glibc_malloc(*, top_pad: int = 64 << 20) -> bool:
    """Makes glibc keep and reuse freed memory instead of returning it to the OS.

    Sets one malloc arena (XLA's and PyTorch's worker threads otherwise get their own,
    which are trimmed), no trimming of the heap top, no mmap threshold (large blocks
    come from the heap and are reused) and a ``top_pad`` of slack when the heap grows.
    Call it before the first training step; allocations made earlier are unaffected.

    Args:
      top_pad: bytes added to every heap extension (default 64 MiB).

    Returns:
      True if every setting was applied; False where this is not glibc (macOS,
      Windows, musl), in which case nothing changed.

    Examples:
      >>> from lepton_mm.training.allocator import tune_glibc_malloc
      >>> tune_glibc_malloc()  # doctest: +SKIP
      True
    """
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = ((_M_ARENA_MAX, 1), (_M_TRIM_THRESHOLD, 2**31 - 1),
                (_M_MMAP_THRESHOLD, 2**31 - 1), (_M_TOP_PAD, int(top_pad)))
    return all(mallopt(key, value) == 1 for key, value in settings)


def release_free_memory() -> bool:
    """Returns the free memory of glibc's heaps to the OS (``malloc_trim(0)``).

    Freed blocks inside the heap stay in the process's RSS until something trims them;
    this releases every free page of every arena (live allocations are untouched, so it
    is safe at any time, from any thread). It costs a walk over the free lists (a few
    ms for hundreds of MB), and memory released here is page-faulted in again when it is
    next used, so call it after a one-off peak (compiling, loading), not every step.

    Returns:
      True if glibc released memory, False if there was none to release or this is not
      glibc (then nothing happened).

    Examples:
      >>> from lepton_mm.training.allocator import release_free_memory
      >>> release_free_memory()  # doctest: +SKIP
      True
    """
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is None:
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim(0) == 1


# jax.monitoring's event for an XLA compilation (``jax._src.dispatch.BACKEND_COMPILE_EVENT``),
# recorded when the compiler returns, before the compiled program first runs (also when
# the program came from the persistent compilation cache).
_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def _release_after_compile(event: str, duration: float, **kwargs: Any) -> None:
    del duration, kwargs
    if event == _BACKEND_COMPILE_EVENT:
        release_free_memory()


@contextlib.contextmanager
def release_memory_after_compiles() -> Iterator[None]:
    """Within the block, ``release_free_memory()`` runs after every XLA compilation.

    A ``jax.monitoring`` listener, registered on entry and removed on exit. Compiling
    a train step makes XLA allocate and free hundreds of MB; without this glibc keeps
    them, and the first execution's buffers are allocated on top (the AV-MNIST LeNet +
    concat step at batch 128: 1.35 GB peak RSS through the first step without it).
    ``fit`` runs its whole loop inside one; use it around your own training loop.

    Returns:
      A context manager (yields None). Nesting is allowed; each exit removes the
      listener its entry added.

    Examples:
      >>> from lepton_mm.training.allocator import release_memory_after_compiles
      >>> with release_memory_after_compiles():  # doctest: +SKIP
      ...     state, loss = train_step(state, batch)  # compiles, releases, then runs
    """
    jax.monitoring.register_event_duration_secs_listener(_release_after_compile)
    try:
        yield
    finally:
        jax.monitoring.unregister_event_duration_listener(_release_after_compile)
