"""Run logs: one JSON object per line in ``workdir/log.jsonl``, curves, optional TensorBoard.

Each line is a record with a ``"kind"`` (``"step"`` or ``"epoch"``) and a ``"step"``
(the number of optimiser steps taken so far). On resume the log is cut back to the
restored step, so a resumed run's log equals an uninterrupted run's (up to wall times).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

LOG_NAME = "log.jsonl"
CURVES_NAME = "curves.png"


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # "nan", "inf": JSON has no literal for them
    return value


def read_log(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Reads a ``log.jsonl``; a truncated last line (from a crash) is skipped.

    Args:
      path: the ``log.jsonl`` file (a missing file reads as no records).

    Returns:
      The records in order, one dict per line.
    """
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _tensorboard_writer(logdir: Path) -> Any | None:
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(logdir))


class RunLogger:
    """Appends JSON lines to ``workdir/log.jsonl`` (and TensorBoard scalars if available).

    Args:
      workdir: the run directory.
      resume_step: keep only existing records with ``step <= resume_step`` (the restored
        checkpoint); ``None`` starts a fresh log.
      tensorboard: write TensorBoard event files to ``workdir/tensorboard`` — ``None``
        (default) when ``tensorboardX`` is importable, ``False`` never.
      enabled: False turns every method into a no-op (non-primary processes).
    """

    def __init__(self, workdir: str | os.PathLike[str], *, resume_step: int | None = None,
                 tensorboard: bool | None = None, enabled: bool = True):
        self.path = Path(workdir) / LOG_NAME
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [] if resume_step is None else [
            r for r in read_log(self.path) if int(r.get("step", 0)) <= resume_step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)
        self._file = self.path.open("a")
        if tensorboard is not False:
            self._tb = _tensorboard_writer(Path(workdir) / "tensorboard")
            if tensorboard and self._tb is None:
                raise ImportError("tensorboard=True needs the tensorboardX package.")

    def log(self, record: Mapping[str, Any]) -> None:
        """Writes one record (flushed, so a killed run keeps its log)."""
        if not self.enabled:
            return
        record = _jsonable(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = int(record.get("step", 0))
            prefix = record.get("kind", "log")
            for name, value in _flatten(record):
                if isinstance(value, (int, float)) and not isinstance(value, bool) \
                        and name not in ("step", "epoch"):
                    self._tb.add_scalar(f"{prefix}/{name}", value, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _flatten(record: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for k, v in record.items():
        if isinstance(v, Mapping):
            yield from _flatten(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}", v


def plot_curves(records: Iterable[Mapping[str, Any]] | str | os.PathLike[str],
                path: str | os.PathLike[str]) -> Path:
    """Plots training loss per step and per-epoch metrics to a PNG (matplotlib, Agg).

    Args:
      records: log records, or the path of a ``log.jsonl``.
      path: where to write the figure.

    Returns:
      ``path`` as a ``Path``.
    """
    # An Agg canvas on a bare Figure: no pyplot state, so a notebook's backend is left alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if isinstance(records, (str, os.PathLike)):
        records = read_log(records)
    records = list(records)
    steps = [r for r in records if r.get("kind") == "step"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    metric_names = sorted({k for r in epochs for k in r.get("eval", {})})
    ncols = 1 + len(metric_names)
    fig = Figure(figsize=(4 * ncols, 3.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)
    ax = axes[0, 0]
    ax.plot([r["step"] for r in steps], [_num(r.get("loss")) for r in steps],
            lw=0.8, alpha=0.6, label="train loss (step)")
    if epochs:
        ax.plot([r["step"] for r in epochs], [_num(r.get("train_loss")) for r in epochs],
                "o-", label="train loss (epoch)")
        if any("loss" in r.get("eval", {}) for r in epochs):
            ax.plot([r["step"] for r in epochs],
                    [_num(r.get("eval", {}).get("loss")) for r in epochs], "s-",
                    label="eval loss")
    ax.set_xlabel("step")
    ax.set_title("loss")
    ax.legend(fontsize=7)
    for ax, name in zip(axes[0, 1:], metric_names, strict=True):
        ax.plot([r["step"] for r in epochs], [_num(r.get("eval", {}).get(name))
                                              for r in epochs], "o-")
        ax.set_xlabel("step")
        ax.set_title(f"eval {name}")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    return path


def _num(value: Any) -> float:
    if value is None:
        return float("nan")
    return float(value)
