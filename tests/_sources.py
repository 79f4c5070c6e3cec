"""Batch sources shared by tests: a wrapper that crashes a run mid-epoch."""

from typing import Any


class CrashAfter:
    """A ``BatchSource`` that hands out ``after`` training batches of ``source``, then
    raises ``RuntimeError("simulated crash")``: a crash mid-epoch, to test resuming.

    Only shuffled batches (training) count and crash; evaluation passes
    (``shuffle=False``) go through unchanged. Everything else is ``source``'s.
    """

    def __init__(self, source: Any, *, after: int):
        self.source = source
        self.left = after

    def __len__(self) -> int:
        return len(self.source)

    def __getattr__(self, name: str) -> Any:  # e.g. ``arrays``, for fit's checks
        return getattr(self.source, name)

    def num_batches(self, batch_size: int) -> int:
        return self.source.num_batches(batch_size)

    def batches(self, *args: Any, shuffle: bool = True, **kwargs: Any):
        for batch in self.source.batches(*args, shuffle=shuffle, **kwargs):
            if shuffle:
                if self.left == 0:
                    raise RuntimeError("simulated crash")
                self.left -= 1
            yield batch
