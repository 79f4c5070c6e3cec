"""fit(loggers=...): every logger receives exactly the records of log.jsonl, across a
crash and a resume; TensorBoard, W&B (offline) and MLflow hold them afterwards (each
read back with its own format), and bad ``loggers`` fail before training."""

import glob
import json
import re
import struct
import sys

import numpy as np
import pytest
from test_training_loop import BATCH, make_data, make_model

from lepton_mm.models import Classification
from lepton_mm.training import (
    JsonlLogger,
    MlflowLogger,
    OptimizerConfig,
    TensorBoardLogger,
    WandbLogger,
    fit,
    loop,
    read_log,
    scalar_metrics,
)

OPTIMIZER = OptimizerConfig(learning_rate=0.03)
# Not test_training_loop's fusion width: sharing its compiled steps (cached by model
# graph) would change the compile counts it checks when both files run in one process.
FUSION_DIM = 4
CRASH_STEP = 5  # 3 steps per epoch, checkpoints at steps 2, 3, 4 and 6: resumes from 4


class Crash(Exception):
    pass


class Recorder:
    """A logger that keeps what it is given; ``crash_at``: raise at that step's record."""

    def __init__(self, crash_at=None):
        self.crash_at = crash_at
        self.starts, self.records, self.closes = [], [], 0

    def start(self, workdir, *, resume_step, config):
        self.starts.append((workdir, resume_step, config))

    def log(self, record):
        self.records.append(record)
        if record["kind"] == "step" and record["step"] == self.crash_at:
            raise Crash(f"killed at step {self.crash_at}")

    def close(self):
        self.closes += 1


def train(workdir, loggers=(), **kw):
    kw = {"epochs": 2, "batch_size": BATCH, "optimizer": OPTIMIZER, "checkpoint_every": 2,
          **kw}
    return fit(make_model(fusion_dim=FUSION_DIM), Classification(3), make_data(),
               eval_data=make_data(12, seed=1), workdir=workdir, loggers=loggers, **kw)


def crash_then_resume(workdir, *loggers, first_kw=None):
    """Trains with ``loggers`` (then a ``Recorder``) until the record of step 5, which
    comes after the checkpoint of step 4, is logged; then runs again, which resumes.

    Returns:
      (first attempt's Recorder, its log.jsonl, second attempt's Recorder, final log)
    """
    first = Recorder(crash_at=CRASH_STEP)
    with pytest.raises(Crash):
        train(workdir, [*loggers, first], **(first_kw or {}))
    first_log = read_log(workdir / "log.jsonl")
    second = Recorder()
    train(workdir, [*loggers, second])
    return first, first_log, second, read_log(workdir / "log.jsonl")


def expected_scalars(records):
    """{(name, step): value} of every numeric scalar the metric backends must hold."""
    return {(name, r["step"]): value for r in records
            for name, value in scalar_metrics(r).items()}


def test_a_logger_receives_exactly_the_log_records_across_a_resume(tmp_path):
    first, first_log, second, final_log = crash_then_resume(tmp_path)
    # The first attempt: everything log.jsonl got, up to the record that crashed it.
    assert first.records == first_log
    assert first_log[-1] == {**first_log[-1], "kind": "step", "step": CRASH_STEP}
    assert [s[1] for s in first.starts] == [None] and first.closes == 1
    # The resumed attempt starts at the checkpoint (step 4): log.jsonl is cut back to it,
    # and the logger is told so and receives only the records after it.
    (workdir, resume_step, config), = second.starts
    assert (workdir, resume_step, second.closes) == (tmp_path, 4, 1)
    assert config["batch_size"] == BATCH and config["seed"] == 0
    assert second.records and all(r["step"] > 4 for r in second.records)
    assert final_log == [r for r in first.records if r["step"] <= 4] + second.records
    assert [(r["kind"], r["step"]) for r in final_log] == [
        ("step", 1), ("step", 2), ("step", 3), ("epoch", 3), ("step", 4), ("step", 5),
        ("step", 6), ("epoch", 6)]
    assert set(final_log[-1]) == {"kind", "step", "epoch", "train_loss", "skipped_steps",
                                  "eval", "wall_time"}


def test_only_the_primary_process_logs(tmp_path, monkeypatch):
    # As on process 1 of several (the checkpointer still sees one process: a real
    # multi-process run needs more than one host).
    monkeypatch.setattr(loop, "_is_primary", lambda: False)
    recorder = Recorder()
    train(tmp_path, [recorder], epochs=1)
    assert (recorder.starts, recorder.records, recorder.closes) == ([], [], 0)
    assert not (tmp_path / "log.jsonl").exists()


def test_scalar_metrics_names_and_values():
    record = {"kind": "epoch", "step": 6, "epoch": 2, "train_loss": np.float32(0.5),
              "skipped_steps": 0, "finite": True, "eval": {"accuracy": 0.75,
                                                           "loss": float("nan")},
              "note": "text", "curve": [1.0, 2.0]}
    metrics = scalar_metrics(record)
    assert set(metrics) == {"epoch/train_loss", "epoch/skipped_steps", "epoch/eval/accuracy",
                            "epoch/eval/loss"}
    assert metrics["epoch/train_loss"] == 0.5 and metrics["epoch/eval/accuracy"] == 0.75
    assert np.isnan(metrics["epoch/eval/loss"])


def test_bad_loggers_fail_before_training(tmp_path):
    cases = [
        (["tensorbord"], ValueError, r"loggers\[0\]: unknown logger 'tensorbord'"),
        ([Recorder(), object()], TypeError, r"loggers\[1\]: expected a Logger"),
        ("wandb", TypeError, r"loggers: expected a list .* loggers=\[\.\.\.\]"),
        (Recorder(), TypeError, r"loggers: expected a list"),
        ([JsonlLogger()], ValueError, r"loggers\[0\]: fit always writes log.jsonl"),
    ]
    twice = Recorder()
    cases.append(([twice, twice], ValueError, r"loggers\[1\]: the same Recorder"))
    for loggers, error, message in cases:
        with pytest.raises(error, match=message):
            train(tmp_path, loggers)
    with pytest.raises(TypeError, match="tensorboard: expected None or a bool"):
        train(tmp_path, tensorboard="yes")
    assert list(tmp_path.iterdir()) == []  # nothing was trained, logged or checkpointed


@pytest.mark.parametrize("name, module, cls", [
    ("tensorboard", "tensorboardX", TensorBoardLogger), ("wandb", "wandb", WandbLogger),
    ("mlflow", "mlflow", MlflowLogger)])
def test_a_missing_package_names_the_extra_to_install(tmp_path, monkeypatch, name, module,
                                                      cls):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` raises ImportError
    hint = f'pip install "lepton_mm[{name}]"'
    with pytest.raises(ImportError, match=f"{cls.__name__} needs the {module} package"):
        cls()
    with pytest.raises(ImportError, match=rf"loggers\[0\]: '{name}': .*" + re.escape(hint)):
        train(tmp_path, [name])
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ the real backends


def _tfrecords(path):
    """The payloads of a TFRecord file (what TensorBoard event files are)."""
    data, pos = open(path, "rb").read(), 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        yield data[pos + 12:pos + 12 + length]
        pos += 12 + length + 4


def test_tensorboard_event_files_hold_the_log_scalars(tmp_path):
    pytest.importorskip("tensorboardX")
    from tensorboardX.proto import event_pb2

    # The first attempt asks through the deprecated flag (its logger comes after the
    # Recorder, which stops the run at step 6's record), the second by name.
    first = Recorder(crash_at=CRASH_STEP + 1)
    with pytest.raises(Crash), pytest.warns(DeprecationWarning,
                                            match=re.escape("loggers=['tensorboard']")):
        train(tmp_path, [first], tensorboard=True)
    train(tmp_path, ["tensorboard"])
    final_log = read_log(tmp_path / "log.jsonl")
    files = sorted((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 2  # one per attempt, in name order as TensorBoard reads them
    # Replay them as TensorBoard does: a SessionLog.START at step p (the writer's
    # purge_step) hides every earlier event at step >= p.
    events = [[event_pb2.Event.FromString(p) for p in _tfrecords(path)] for path in files]
    # The first attempt wrote step 5, past the checkpoint (step 4) it resumed from.
    assert any(e.step == CRASH_STEP and e.summary.value for e in events[0])
    scalars = {}
    for file_events in events:
        for event in file_events:
            if event.HasField("session_log") and event.session_log.status == 1:
                scalars = {k: v for k, v in scalars.items() if k[1] < event.step}
            for value in event.summary.value:
                scalars[(value.tag, event.step)] = value.simple_value
    expected = expected_scalars(final_log)
    assert scalars.keys() == expected.keys()
    np.testing.assert_allclose([scalars[k] for k in expected], list(expected.values()),
                               rtol=1e-6)  # float32 in the event file
    assert "epoch/eval/accuracy" in {name for name, _ in expected}


def _wandb_records(path):
    """The protobuf records of a W&B ``.wandb`` transaction log (LevelDB log format:
    7-byte file header, 32 KiB blocks of [crc32 u32][length u16][type u8] chunks)."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, block, payload = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too short for a chunk header: block padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        payload = chunk if kind in (1, 2) else payload + chunk  # FULL/FIRST: new record
        if kind in (1, 4):  # FULL or LAST: complete
            yield wandb_internal_pb2.Record.FromString(payload)


def _wandb_history(run_dir):
    """(run id, [{key: value, "_step": step}]) of one offline run folder."""
    (path,) = glob.glob(str(run_dir / "run-*.wandb"))
    run_id, rows = None, []
    for record in _wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
        elif kind == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return run_id, rows


def test_wandb_offline_run_holds_the_log_scalars(tmp_path):
    wandb = pytest.importorskip("wandb")
    logger = WandbLogger(mode="offline", settings=wandb.Settings(
        console="off", x_disable_stats=True, silent=True))
    _, first_log, second, _ = crash_then_resume(tmp_path, logger)
    run_dirs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 2  # one per attempt, of the same run
    run_id = (tmp_path / "wandb_run_id").read_text()
    for run_dir, records in zip(run_dirs, (first_log, second.records), strict=True):
        found_id, rows = _wandb_history(run_dir)
        assert found_id == run_id
        got = {(k, row["_step"]): v for row in rows for k, v in row.items()
               if not k.startswith("_")}
        expected = expected_scalars(records)
        assert got.keys() == expected.keys()
        np.testing.assert_allclose([got[k] for k in expected], list(expected.values()))
    assert logger.run is None  # finished


# MLflow's SQLite store, under SQLAlchemy 2.1, warns about an option MLflow uses.
@pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")
def test_mlflow_run_holds_the_log_scalars_once(tmp_path):
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    from mlflow.tracking import MlflowClient

    *_, final_log = crash_then_resume(tmp_path, "mlflow")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("lepton_mm")
    (run,) = client.search_runs([experiment.experiment_id])  # the resume continued it
    assert run.info.run_id == (tmp_path / "mlflow_run_id").read_text()
    assert run.info.status == "FINISHED"
    assert run.data.params["batch_size"] == str(BATCH)
    assert run.data.params["optimizer/learning_rate"] == "0.03"
    got = {}
    for key in run.data.metrics:
        for metric in client.get_metric_history(run.info.run_id, key):
            assert (key, metric.step) not in got, f"{key} at step {metric.step} twice"
            got[(key, metric.step)] = metric.value
    # The re-done steps 5 and 6 were not logged twice; what is there equals log.jsonl.
    expected = expected_scalars(final_log)
    assert got.keys() == expected.keys()
    np.testing.assert_allclose([got[k] for k in expected], list(expected.values()))
