"""Where ``fit``'s log records go besides ``log.jsonl``: the ``Logger`` interface and its
TensorBoard, Weights & Biases and MLflow implementations.

``fit(..., loggers=[...])`` takes ``Logger`` objects or the names in ``LOGGERS``
(``"tensorboard"``, ``"wandb"``, ``"mlflow"``: each backend with its defaults). Every
logger receives exactly the records ``log.jsonl`` holds, in the same order, as plain
Python values: ``{"kind": "step", "step": s, "epoch": e, "loss": ..., "grad_norm": ...,
"finite": ...}`` per optimiser step and ``{"kind": "epoch", "step": s, "epoch": e,
"train_loss": ..., "skipped_steps": ..., "eval": {...}, "wall_time": ...}`` per epoch.
The metric backends log ``scalar_metrics(record)`` (``"step/loss"``,
``"epoch/eval/accuracy"``, ...) at step ``record["step"]``. Only the primary process
(``jax.process_index() == 0``) logs.

Resume: ``fit`` passes the restored checkpoint's step to ``Logger.start``. ``log.jsonl``
is cut back to it; TensorBoard hides the events past it (``purge_step``); Weights &
Biases and MLflow continue the same run (its id is kept in the workdir) and keep the
values they already hold for the steps that are done again, which are the same values,
since resuming is exact (only ``wall_time`` differs).

A backend whose package is missing fails when it is built (before any training) with an
``ImportError`` naming the extra to install, e.g. ``pip install "lepton_mm[wandb]"``.
"""

from __future__ import annotations

import importlib
import os
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol, runtime_checkable

from lepton_mm.training.logging import JsonlLogger, _plain

__all__ = ["LOGGERS", "Logger", "MlflowLogger", "TensorBoardLogger", "WandbLogger",
           "scalar_metrics"]

# The file in the workdir that keeps a backend's run id, so a resumed fit continues it.
_WANDB_ID_FILE = "wandb_run_id"
_MLFLOW_ID_FILE = "mlflow_run_id"
# MLflow limits (mlflow.utils.validation): metrics and params per log_batch call, and
# the length of a param value.
_MLFLOW_MAX_METRICS, _MLFLOW_MAX_PARAMS, _MLFLOW_MAX_PARAM_LENGTH = 1000, 100, 6000
# MlflowLogger and TensorBoardLogger write what they hold at least this often (seconds).
_FLUSH_SECS = 10.0


@runtime_checkable
class Logger(Protocol):
    """What ``fit(loggers=...)`` calls: ``start`` once, ``log`` per record, ``close``.

    ``fit`` calls ``start`` after restoring a checkpoint and before the first step,
    ``log`` with each record it appends to ``log.jsonl`` (the same records, as plain
    Python values: dicts, lists, str, int, float, bool; see the module docstring), and
    ``close`` when it returns or raises. A logger that raises stops the run. A logger
    can be started again after ``close`` (``fit`` over several seeds).

    Attributes:
      start: called once before the first step, with the workdir, the restored step
        and the run config.
      log: called with each record ``log.jsonl`` gets, in order.
      close: called once, when ``fit`` returns or raises.

    Example::

        class PrintLogger:
            def start(self, workdir, *, resume_step, config):
                print("run in", workdir, "from step", resume_step or 0)

            def log(self, record):
                print(record["step"], scalar_metrics(record))

            def close(self):
                pass

        fit(model, task, train, workdir=workdir, loggers=[PrintLogger(), "tensorboard"])
    """

    def start(self, workdir: Path, *, resume_step: int | None,
              config: Mapping[str, Any]) -> None:
        """Opens the logger for a run.

        Args:
          workdir: ``fit``'s run directory (it exists).
          resume_step: the step of the checkpoint the run resumes from: records up to
            it were logged by an earlier attempt, later ones are logged again; ``None``
            for a fresh run.
          config: the run's settings, as stored with the checkpoints (JSON-serialisable).
        """

    def log(self, record: Mapping[str, Any]) -> None:
        """Logs one record.

        Args:
          record: a ``log.jsonl`` record: ``"kind"`` and ``"step"`` keys, plain values.
        """

    def close(self) -> None:
        """Flushes and closes the logger (called once per ``start``)."""


def scalar_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """The numeric scalars of a log record, named ``"{kind}/{key}"``, for metric backends.

    Nested keys are joined with ``/`` (``"epoch/eval/accuracy"``); the x axes ``step``
    and ``epoch``, booleans, strings and lists are left out; NaN and infinities are kept.

    Args:
      record: a ``log.jsonl`` record, e.g. ``{"kind": "epoch", "step": 6, "epoch": 2,
        "train_loss": 0.4, "eval": {"accuracy": 0.8}}``.

    Returns:
      ``{name: value}``, e.g. ``{"epoch/train_loss": 0.4, "epoch/eval/accuracy": 0.8}``.

    Examples:
      >>> scalar_metrics({"kind": "epoch", "step": 6, "epoch": 2, "train_loss": 0.4,
      ...                 "finite": True, "eval": {"accuracy": 0.8}})
      {'epoch/train_loss': 0.4, 'epoch/eval/accuracy': 0.8}
    """
    prefix = str(record.get("kind", "log"))
    out = {}
    for name, value in _flatten(_plain(record)):
        if name in ("kind", "step", "epoch") or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out[f"{prefix}/{name}"] = float(value)
    return out


def _flatten(record: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for k, v in record.items():
        if isinstance(v, Mapping):
            yield from _flatten(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}", v


def _require(module: str, extra: str, who: str) -> ModuleType:
    """Imports ``module``, or fails with the ``pip install`` line that brings it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{who} needs the {module} package: "
                          f'pip install "lepton_mm[{extra}]"') from e


class TensorBoardLogger:
    """TensorBoard event files with every numeric scalar of the log (tensorboardX).

    Tags are ``scalar_metrics`` names (``"step/loss"``, ``"epoch/eval/accuracy"``) at
    global step ``record["step"]``; view them with ``tensorboard --logdir WORKDIR`` (the
    ``tensorboard`` package). Each start opens a new event file whose writer starts with
    ``purge_step = resume_step + 1`` (1 for a fresh run): TensorBoard hides what earlier
    attempts wrote past the restored checkpoint, as ``log.jsonl`` is cut back, and shows
    the steps done again instead. Events are flushed every 10 s and at ``close``.

    Args:
      logdir: where the event files go; ``None``: ``workdir/tensorboard``.

    Raises:
      ImportError: ``tensorboardX`` is missing (``pip install "lepton_mm[tensorboard]"``).
    """

    def __init__(self, *, logdir: str | os.PathLike[str] | None = None):
        self._tbx = _require("tensorboardX", "tensorboard", "TensorBoardLogger")
        self.logdir = None if logdir is None else Path(logdir)
        self._writer = None

    def start(self, workdir: Path, *, resume_step: int | None = None,
              config: Mapping[str, Any] | None = None) -> None:
        """Opens an event file in ``logdir`` (see ``Logger.start``).

        Args:
          workdir: the run directory (``logdir``'s default parent).
          resume_step: the restored checkpoint's step (``None``: 0); events of earlier
            attempts past it are purged.
          config: unused.
        """
        del config
        self.close()
        logdir = self.logdir if self.logdir is not None else Path(workdir) / "tensorboard"
        start = 0 if resume_step is None else resume_step
        # The file name holds the second it was opened: the suffix keeps two attempts
        # within one second apart, in order (TensorBoard reads files in name order).
        self._writer = self._tbx.SummaryWriter(
            str(logdir), purge_step=start + 1, flush_secs=_FLUSH_SECS,
            filename_suffix=f".from{start:010d}")

    def log(self, record: Mapping[str, Any]) -> None:
        """Adds ``scalar_metrics(record)`` at step ``record["step"]``.

        Args:
          record: a ``log.jsonl`` record.
        """
        step = int(record.get("step", 0))
        for name, value in scalar_metrics(record).items():
            self._writer.add_scalar(name, value, step)

    def close(self) -> None:
        """Flushes and closes the event file."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


_WANDB_MODES = ("online", "offline", "disabled")


class WandbLogger:
    """A Weights & Biases run with every numeric scalar of the log, and the run config.

    ``wandb.log(scalar_metrics(record), step=record["step"])`` per record; the run's
    config is ``fit``'s run config. Offline (the default unless ``$WANDB_MODE`` says
    otherwise) the run is written under ``dir/wandb/offline-run-*``, for a later
    ``wandb sync``. The run id is kept in ``workdir/wandb_run_id``: a resumed ``fit``
    continues the same run (``resume="allow"``). Online, records of steps W&B already
    holds are not sent again (W&B would drop each with a warning); offline, the resumed
    attempt writes a new ``offline-run-*`` folder with the same id, from the restored
    step on, and ``wandb sync`` sends both to the one run. Each start creates its own run
    (``reinit="create_new"``), so a run you started yourself is left alone.

    Args:
      project: the W&B project.
      name: the run's display name (``None``: W&B picks one).
      mode: ``"offline"``, ``"online"`` or ``"disabled"``; ``None``: ``$WANDB_MODE``,
        else ``"offline"`` (nothing leaves the machine unless you ask).
      dir: the folder W&B writes its ``wandb/`` folder into; ``None``: the workdir.
      **init_kwargs: more ``wandb.init`` arguments (``entity``, ``group``, ``tags``,
        ``settings``, ...).

    Raises:
      ImportError: ``wandb`` is missing (``pip install "lepton_mm[wandb]"``).
      ValueError: an unknown ``mode``.
    """

    def __init__(self, *, project: str = "lepton_mm", name: str | None = None,
                 mode: str | None = None, dir: str | os.PathLike[str] | None = None,
                 **init_kwargs: Any):
        self._wandb = _require("wandb", "wandb", "WandbLogger")
        if mode is not None and mode not in _WANDB_MODES:
            raise ValueError(f"mode: expected one of {_WANDB_MODES} or None, got {mode!r}.")
        taken = {"project", "name", "mode", "dir", "id", "resume", "config", "reinit"}
        if taken & init_kwargs.keys():
            raise TypeError(f"init_kwargs: {sorted(taken & init_kwargs.keys())} are set "
                            f"by WandbLogger (its own arguments, or the run's id and "
                            f"config, which fit provides).")
        self.project, self.name, self.mode = project, name, mode
        self.dir = None if dir is None else Path(dir)
        self.init_kwargs = init_kwargs
        self.run = None
        self._first_step = 0

    def start(self, workdir: Path, *, resume_step: int | None = None,
              config: Mapping[str, Any] | None = None) -> None:
        """Starts (or, resuming, continues) the run (see ``Logger.start``).

        Args:
          workdir: the run directory: ``wandb_run_id`` and, by default, ``wandb/``.
          resume_step: not ``None``: continue the run whose id ``workdir`` keeps.
          config: the run config, W&B's ``run.config``.
        """
        self.close()
        workdir = Path(workdir)
        id_file = workdir / _WANDB_ID_FILE
        run_id = None
        if resume_step is not None and id_file.exists():
            run_id = id_file.read_text().strip() or None
        root = self.dir if self.dir is not None else workdir
        root.mkdir(parents=True, exist_ok=True)
        mode = self.mode or os.environ.get("WANDB_MODE") or "offline"
        self.run = self._wandb.init(
            project=self.project, name=self.name, mode=mode, dir=str(root), id=run_id,
            resume="allow" if run_id else None, reinit="create_new",
            config=None if run_id else dict(config or {}), **self.init_kwargs)
        if run_id is not None:
            self.run.config.update(dict(config or {}), allow_val_change=True)
        id_file.write_text(self.run.id)
        # W&B keeps one history row per step, in increasing order: records of steps it
        # already holds (a resumed run) would be dropped with a warning each.
        self._first_step = self.run.step if run_id else 0

    def log(self, record: Mapping[str, Any]) -> None:
        """Logs ``scalar_metrics(record)`` at step ``record["step"]``.

        Args:
          record: a ``log.jsonl`` record.
        """
        step = int(record.get("step", 0))
        metrics = scalar_metrics(record)
        if metrics and step >= self._first_step:
            self.run.log(metrics, step=step)

    def close(self) -> None:
        """Finishes the run (offline: completes its files)."""
        if self.run is not None:
            self.run.finish()
            self.run = None


class MlflowLogger:
    """An MLflow run with every numeric scalar of the log as a metric, the config as params.

    By default the tracking store is the SQLite file ``workdir/mlflow.db``, MLflow's
    local backend (its ``file:`` store is in maintenance mode and refuses to start
    without ``MLFLOW_ALLOW_FILE_STORE=true``): ``MlflowClient(URI)`` reads it and
    ``mlflow ui --backend-store-uri URI`` (the full ``mlflow`` package) shows it, with
    ``URI = "sqlite:///WORKDIR/mlflow.db"``. Metrics are sent in batches: at
    each epoch record, every 10 s and at ``close``. The config (flattened to ``"a/b"``
    keys) is logged as params when the run is created. The run id is kept in
    ``workdir/mlflow_run_id``: a resumed ``fit`` continues the same run and skips the
    metric values it already holds (MLflow would otherwise keep both copies).

    Args:
      tracking_uri: an MLflow tracking URI (``"sqlite:///path.db"``, ``"http://host"``,
        ``"file:///path"``); ``None``: ``sqlite:///WORKDIR/mlflow.db``.
      experiment: the experiment's name (created if missing).
      run_name: the run's name (``None``: MLflow picks one).

    Raises:
      ImportError: ``mlflow`` (or, for a SQLite store, ``sqlalchemy``/``alembic``) is
        missing (``pip install "lepton_mm[mlflow]"``).
    """

    def __init__(self, *, tracking_uri: str | None = None, experiment: str = "lepton_mm",
                 run_name: str | None = None):
        _require("mlflow", "mlflow", "MlflowLogger")
        if tracking_uri is None or tracking_uri.startswith("sqlite:"):
            for module in ("sqlalchemy", "alembic"):
                _require(module, "mlflow", "MlflowLogger (SQLite store)")
        self._tracking = importlib.import_module("mlflow.tracking")
        self._entities = importlib.import_module("mlflow.entities")
        self.tracking_uri, self.experiment, self.run_name = tracking_uri, experiment, run_name
        self.client = None
        self.run_id: str | None = None
        self._last_step: dict[str, int] = {}
        self._pending: list[Any] = []
        self._flushed_at = 0.0

    def start(self, workdir: Path, *, resume_step: int | None = None,
              config: Mapping[str, Any] | None = None) -> None:
        """Creates (or, resuming, reopens) the run (see ``Logger.start``).

        Args:
          workdir: the run directory: ``mlflow_run_id`` and, by default, ``mlflow.db``.
          resume_step: not ``None``: continue the run whose id ``workdir`` keeps.
          config: the run config, logged as params of a new run.
        """
        self.close()
        workdir = Path(workdir).resolve()
        uri = self.tracking_uri or f"sqlite:///{workdir / 'mlflow.db'}"
        client = self._tracking.MlflowClient(tracking_uri=uri)
        id_file = workdir / _MLFLOW_ID_FILE
        run = None
        if resume_step is not None and id_file.exists():
            run = self._existing_run(client, id_file.read_text().strip())
        if run is None:
            experiment = client.get_experiment_by_name(self.experiment)
            if experiment is not None:
                experiment_id = experiment.experiment_id
            else:
                experiment_id = client.create_experiment(
                    self.experiment, artifact_location=None if self.tracking_uri
                    else (workdir / "mlartifacts").as_uri())
            run = client.create_run(experiment_id, run_name=self.run_name,
                                    tags={"lepton_mm.workdir": str(workdir)})
            self._last_step = {}
            params = [self._entities.Param(k, str(v)[:_MLFLOW_MAX_PARAM_LENGTH])
                      for k, v in _flatten(_plain(dict(config or {})))]
            for i in range(0, len(params), _MLFLOW_MAX_PARAMS):
                client.log_batch(run.info.run_id, params=params[i:i + _MLFLOW_MAX_PARAMS])
        else:
            client.update_run(run.info.run_id, status="RUNNING")
            self._last_step = {key: max(m.step for m in client.get_metric_history(
                run.info.run_id, key)) for key in run.data.metrics}
        id_file.write_text(run.info.run_id)
        self.client, self.run_id = client, run.info.run_id
        self._pending, self._flushed_at = [], time.monotonic()

    @staticmethod
    def _existing_run(client: Any, run_id: str) -> Any:
        try:
            return client.get_run(run_id) if run_id else None
        except Exception:  # any store error: the run is gone; start a new one
            return None

    def log(self, record: Mapping[str, Any]) -> None:
        """Queues ``scalar_metrics(record)`` at step ``record["step"]``.

        Args:
          record: a ``log.jsonl`` record; an epoch record sends the queue.
        """
        step = int(record.get("step", 0))
        stamp = int(time.time() * 1000)
        for name, value in scalar_metrics(record).items():
            if step > self._last_step.get(name, -1):
                self._pending.append(self._entities.Metric(name, value, stamp, step))
        if (record.get("kind") == "epoch" or len(self._pending) >= _MLFLOW_MAX_METRICS
                or time.monotonic() - self._flushed_at >= _FLUSH_SECS):
            self._flush()

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        for i in range(0, len(pending), _MLFLOW_MAX_METRICS):
            self.client.log_batch(self.run_id, metrics=pending[i:i + _MLFLOW_MAX_METRICS])
        self._flushed_at = time.monotonic()

    def close(self) -> None:
        """Sends what is queued and marks the run finished."""
        if self.client is not None:
            try:
                self._flush()
            finally:
                self.client.set_terminated(self.run_id)
                self.client, self.run_id = None, None


#: The loggers ``fit(loggers=...)`` builds from a name, with their default settings.
LOGGERS: dict[str, type] = {"tensorboard": TensorBoardLogger, "wandb": WandbLogger,
                            "mlflow": MlflowLogger}


def _check_loggers(loggers: Sequence[Logger | str] | None, *,
                   tensorboard: bool | None = None, stacklevel: int = 3) -> tuple[Logger, ...]:
    """``fit``'s ``loggers`` (and deprecated ``tensorboard``) as built ``Logger`` objects."""
    names = ", ".join(repr(n) for n in LOGGERS)
    loggers = () if loggers is None else loggers
    if isinstance(loggers, (str, bytes)) or isinstance(loggers, Logger) \
            or not isinstance(loggers, Iterable):
        raise TypeError(f"loggers: expected a list of Logger objects or names ({names}), "
                        f"got {type(loggers).__name__} {loggers!r}; write loggers=[...].")
    built: list[Logger] = []
    for i, item in enumerate(loggers):
        if isinstance(item, str):
            if item not in LOGGERS:
                raise ValueError(f"loggers[{i}]: unknown logger {item!r}; expected one of "
                                 f"{names} or a Logger object.")
            try:
                built.append(LOGGERS[item]())
            except ImportError as e:
                raise ImportError(f"loggers[{i}]: {item!r}: {e}") from e
        elif isinstance(item, JsonlLogger):
            raise ValueError(f"loggers[{i}]: fit always writes log.jsonl; leave the "
                             f"JsonlLogger out.")
        elif isinstance(item, Logger):
            if any(item is other for other in built):
                raise ValueError(f"loggers[{i}]: the same {type(item).__name__} object is "
                                 f"given twice.")
            built.append(item)
        else:
            raise TypeError(f"loggers[{i}]: expected a Logger (an object with start, log "
                            f"and close methods) or one of {names}, got "
                            f"{type(item).__name__}.")
    has_tensorboard = any(isinstance(b, TensorBoardLogger) for b in built)
    if tensorboard is True:
        warnings.warn("fit(tensorboard=True) is deprecated: use loggers=['tensorboard'].",
                      DeprecationWarning, stacklevel=stacklevel)
        if not has_tensorboard:
            try:
                built.append(TensorBoardLogger())
            except ImportError as e:
                raise ImportError(f"tensorboard: {e}") from e
    elif tensorboard is False:
        if has_tensorboard:
            raise ValueError("tensorboard: False contradicts the TensorBoard logger in "
                             "loggers; leave tensorboard out.")
    elif tensorboard is not None:
        raise TypeError(f"tensorboard: expected None or a bool (deprecated: use "
                        f"loggers=['tensorboard']), got {tensorboard!r}.")
    return tuple(built)


class _Loggers:
    """``fit``'s loggers as one: ``log.jsonl`` first, then the others, in order."""

    def __init__(self, loggers: Sequence[Logger]):
        self.loggers = tuple(loggers)
        self._started: list[Logger] = []

    def start(self, workdir: Path, *, resume_step: int | None,
              config: Mapping[str, Any]) -> None:
        for logger in self.loggers:
            try:
                logger.start(workdir, resume_step=resume_step, config=config)
            except BaseException:
                self.close()
                raise
            self._started.append(logger)

    def log(self, record: Mapping[str, Any]) -> None:
        for logger in self._started:
            logger.log(_plain(record))  # a fresh copy each: one cannot change another's

    def close(self) -> None:
        """Closes every started logger, then raises the first error any of them raised."""
        started, self._started = self._started, []
        error = None
        for logger in started:
            try:
                logger.close()
            except Exception as e:  # close the others first
                error = error or e
        if error is not None:
            raise error
