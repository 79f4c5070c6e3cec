"""Timing helpers shared by ``run.py`` and the JAX-free ``torch_models.py`` probes
(this module imports neither framework)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def time_calls(run: Callable[[], Any], warmup: int, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``run`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times
