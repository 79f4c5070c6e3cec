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
"""

from __future__ import annotations

import ctypes
import ctypes.util

__all__ = ["tune_glibc_malloc"]

# glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


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
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = ((_M_ARENA_MAX, 1), (_M_TRIM_THRESHOLD, 2**31 - 1),
                (_M_MMAP_THRESHOLD, 2**31 - 1), (_M_TOP_PAD, int(top_pad)))
    return all(mallopt(key, value) == 1 for key, value in settings)
