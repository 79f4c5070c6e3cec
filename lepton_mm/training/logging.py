"""Run logs: ``workdir/log.jsonl`` (one JSON object per line), its writer, reader and curves.

Each line is a record with a ``"kind"`` (``"step"`` or ``"epoch"``) and a ``"step"``
(the number of optimiser steps taken so far). ``fit`` always writes it through a
``JsonlLogger``, and sends the same records to the loggers it is given
(``lepton_mm.training.loggers``: TensorBoard, Weights & Biases, MLflow, your own). On
resume the log is cut back to the restored step, so a resumed run's log equals an
uninterrupted run's (up to wall times).
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


def _plain(value: Any) -> Any:
    """``value`` as plain Python: dicts, lists, and 0-d arrays as Python scalars."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    return value


def _jsonable(value: Any) -> Any:
    """``_plain(value)`` with non-finite floats as strings (JSON has no literal for them)."""
    value = _plain(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # "nan", "inf", "-inf"
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


class JsonlLogger:
    """Writes each record as one JSON line to ``workdir/log.jsonl``, flushed per line.

    ``fit`` always writes its log through one of these (so never pass it in
    ``fit(loggers=...)``); it is a ``lepton_mm.training.loggers.Logger`` for use outside
    ``fit``. Non-finite floats are written as the strings ``"nan"``, ``"inf"``,
    ``"-inf"``; 0-d arrays as Python scalars.

    Example::

        logger = JsonlLogger()
        logger.start(workdir, resume_step=None, config={})
        logger.log({"kind": "step", "step": 1, "loss": 0.5})
        logger.close()
    """

    def __init__(self) -> None:
        self.path: Path | None = None
        self._file = None

    def start(self, workdir: str | os.PathLike[str], *, resume_step: int | None = None,
              config: Mapping[str, Any] | None = None) -> None:
        """Opens ``workdir/log.jsonl``, keeping only the records up to ``resume_step``.

        Args:
          workdir: the run directory (created if missing).
          resume_step: keep existing records with ``step <= resume_step`` (the restored
            checkpoint's step); ``None`` starts a fresh log.
          config: the run's settings (unused: the checkpoints store them).
        """
        del config
        self.close()
        self.path = Path(workdir) / LOG_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [] if resume_step is None else [
            r for r in read_log(self.path) if int(r.get("step", 0)) <= resume_step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)
        self._file = self.path.open("a")

    def log(self, record: Mapping[str, Any]) -> None:
        """Appends one record as a JSON line (flushed, so a killed run keeps its log).

        Args:
          record: a JSON-serialisable mapping (0-d arrays and non-finite floats are
            converted).
        """
        if self._file is None:
            raise RuntimeError("JsonlLogger.log: call start(workdir) first.")
        self._file.write(json.dumps(_jsonable(record)) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Closes the file (a no-op if it is not open)."""
        if self._file is not None:
            self._file.close()
            self._file = None


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
