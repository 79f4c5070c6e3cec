"""The run ledger: one small committed JSON record per finished experiment run.

Each run is identified by a ``RunKey`` and stored at
``<root>/<experiment>/<method>/seed<k>.json`` (``seed<k>-data<d>.json`` when the data seed
is not 0). A record holds the run's metrics together with everything needed to judge
whether it is still valid: the config and its ``config_hash``, the ``numerics``
label (e.g. ``"float32"``), the machine, package versions and git commit. A record is
*current* when its config hash and numerics equal what the experiment expects now, and
*stale* otherwise; ``Ledger.todo`` lists the runs to (re)do and ``collect``
gathers the current ones for a results table.

Writes are atomic (temp file in the same directory, ``fsync``, ``os.replace``), so an
interrupted run or two concurrent writers never leave a half-written record.

This module imports only the standard library and numpy: it is safe to use from
launchers and report scripts that must not start JAX.

Examples:
  >>> key = RunKey(experiment="avmnist", method="concat", seed=1, data_seed=2)
  >>> key.label()
  'avmnist/concat/seed1-data2'
  >>> shard(["a", "b", "c", "d", "e"], "1/2")
  ['b', 'd']
  >>> format_mean_std(seed_stats({"0": 0.815, "1": 0.823}))
  '81.9 ± 0.6'
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: The numerics version of records: bumped whenever a change to encoders, fusion layers,
#: initialisation, data construction or the training loop can change trained numbers,
#: so that records made before it are reported stale and never mixed into a table.
#: History: "2026.12.1": slice-based im2col and a direct first convolution in the CNN
#: encoders, LowRankFusion initialised as MultiBench's Xavier-normal, AV-MNIST PCA fitted
#: on the training split only.
#: Not bumped for changes of float rounding alone (the same function computed in another
#: order, e.g. the first conv layer's kernel gradient as per-phase matmuls, 2026-12-07):
#: a record stays comparable in distribution, and is bit-reproducible from its command
#: on its ``git_commit`` and CPU kind (XLA compiles different code for AVX2 and AVX-512
#: anyway), not necessarily on a later commit.
NUMERICS = "2026.12.1"

__all__ = [
    "NUMERICS",
    "REQUIRED_KEYS",
    "Ledger",
    "LedgerReport",
    "RunKey",
    "collect",
    "config_hash",
    "format_mean_std",
    "git_commit",
    "machine_info",
    "make_record",
    "peak_rss_mb",
    "read_record",
    "record_status",
    "reset_peak_rss",
    "seed_stats",
    "shard",
    "versions",
    "write_json",
    "write_record",
    "write_text",
]

#: The keys every record holds (``write_record`` and ``read_record`` check them).
REQUIRED_KEYS = (
    "experiment", "method", "seed", "data_seed", "command", "config", "config_hash",
    "numerics", "metrics", "robustness", "params", "seconds_per_epoch", "peak_rss_mb",
    "machine", "versions", "git_commit",
)

_EXPERIMENT_RE = re.compile(r"[a-z0-9_]+")
_METHOD_RE = re.compile(r"[^/\\\s]+")
_SHARD_RE = re.compile(r"(\d+)/(\d+)")
_ISA_FLAGS = ("amx_bf16", "amx_tile", "avx2", "avx512_bf16", "avx512f")
_DEFAULT_PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "lepton_mm")

# --------------------------------------------------------------------------- run keys


def _check_seed(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"RunKey: {name} must be an int >= 0, got {value!r}")


@dataclasses.dataclass(frozen=True)
class RunKey:
    """Identifies one run: which experiment, which method, which seeds.

    Attributes:
      experiment: the experiment's name, ``[a-z0-9_]+`` (e.g. ``"avmnist"``).
      method: the method's name (e.g. ``"concat"``, ``"concat+mdrop"``); no ``/``,
        backslash or whitespace, and not ``"."`` or ``".."``.
      seed: the model/training seed, ``>= 0``.
      data_seed: the data (split/noise) seed, ``>= 0``; 0 is omitted from file names.
    """

    experiment: str
    method: str
    seed: int
    data_seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.experiment, str) or not _EXPERIMENT_RE.fullmatch(self.experiment):
            raise ValueError(
                f"RunKey: experiment must match [a-z0-9_]+, got {self.experiment!r}")
        if (not isinstance(self.method, str) or not _METHOD_RE.fullmatch(self.method)
                or self.method in (".", "..")):
            raise ValueError(
                "RunKey: method must be non-empty without '/', '\\' or whitespace "
                f"(and not '.' or '..'), got {self.method!r}")
        _check_seed("seed", self.seed)
        _check_seed("data_seed", self.data_seed)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> RunKey:
        """The key a record was written under.

        Args:
          record: a mapping with ``experiment``, ``method``, ``seed`` and ``data_seed``.

        Returns:
          The ``RunKey``.
        """
        missing = [k for k in ("experiment", "method", "seed", "data_seed") if k not in record]
        if missing:
            raise ValueError(f"RunKey.from_record: record lacks {missing}")
        return cls(experiment=record["experiment"], method=record["method"],
                   seed=record["seed"], data_seed=record["data_seed"])

    def file_name(self) -> str:
        """``seed<k>.json``, or ``seed<k>-data<d>.json`` when ``data_seed`` is not 0.

        Returns:
          The record's file name.
        """
        return f"{self._seed_part()}.json"

    def record_path(self, root: str | os.PathLike[str]) -> Path:
        """Where this run's record lives under the results directory ``root``.

        Args:
          root: the results directory (e.g. ``Path("results")``).

        Returns:
          ``root/experiment/method/seed<k>[-data<d>].json``.
        """
        return Path(root) / self.experiment / self.method / self.file_name()

    def label(self) -> str:
        """A short human-readable name, e.g. ``"avmnist/concat/seed0-data2"``.

        Returns:
          ``experiment/method/seed<k>[-data<d>]``.
        """
        return f"{self.experiment}/{self.method}/{self._seed_part()}"

    def _seed_part(self) -> str:
        suffix = f"-data{self.data_seed}" if self.data_seed else ""
        return f"seed{self.seed}{suffix}"


# ------------------------------------------------------------------------------ JSON


def _jsonable(value: Any, path: str) -> Any:
    """``value`` as plain JSON types (tuples become lists), or an error naming ``path``."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{path} must be finite, got {value!r}")
        return float(value)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{path} has a non-string key {k!r} ({type(k).__name__}); "
                                "JSON object keys must be str")
            out[k] = _jsonable(v, f"{path}[{k!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{path}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"{path} is not JSON-serialisable: {type(value).__name__} {value!r} "
                    "(use None, bool, int, float, str, list/tuple or a str-keyed mapping)")


def _dumps(obj: Any) -> str:
    """Canonical file text: sorted keys, 2-space indent, UTF-8, trailing newline."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"


def config_hash(config: Mapping[str, Any]) -> str:
    """A short stable hash of a JSON-like config.

    The hash is the SHA-256 of ``json.dumps(config, sort_keys=True,
    separators=(",", ":"))`` with tuples written as lists, so it does not depend on key
    order, and floats hash by their shortest round-trip ``repr``. Note that ``1`` and
    ``1.0`` are different values here.

    Args:
      config: a str-keyed mapping of None, bool, int, finite float, str, lists/tuples
        and nested mappings.

    Returns:
      The first 16 hex digits of the hash.

    Raises:
      TypeError: a value is not JSON (the message names its key path, e.g.
        ``config['optimizer']['schedule']``) or a key is not a str.
      ValueError: a float is NaN or infinite.
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"config_hash: config must be a mapping, got {type(config).__name__}")
    text = json.dumps(_jsonable(config, "config"), sort_keys=True, separators=(",", ":"),
                      allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# ----------------------------------------------------------------------- environment


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _cpuinfo_field(text: str, field: str) -> str | None:
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() == field:
            return value.strip()
    return None


def machine_info(*, device_kind: str | None = None) -> dict[str, Any]:
    """Describes the machine a run used, for the record.

    Args:
      device_kind: the accelerator's name, e.g. ``jax.devices()[0].device_kind``; None
        records ``"cpu"`` (this module does not import JAX to find out).

    Returns:
      ``{"cpu": model name, "cores": usable cores, "isa": sorted list of the vector/matrix
      extensions among avx2/avx512f/avx512_bf16/amx_bf16/amx_tile the CPU has (empty when
      unknown), "device": device_kind or "cpu", "platform": platform.platform()}``.
    """
    text = _cpuinfo()
    cpu = _cpuinfo_field(text, "model name") or platform.processor() or "unknown"
    flags = set((_cpuinfo_field(text, "flags") or "").split())
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return {
        "cpu": cpu,
        "cores": cores,
        "isa": sorted(flag for flag in _ISA_FLAGS if flag in flags),
        "device": device_kind if device_kind is not None else "cpu",
        "platform": platform.platform(),
    }


def versions(packages: Sequence[str] = _DEFAULT_PACKAGES) -> dict[str, str | None]:
    """Installed versions of ``packages`` (from package metadata; nothing is imported).

    Args:
      packages: distribution names.

    Returns:
      ``{name: version}``, with None for a package that is not installed.
    """
    out: dict[str, str | None] = {}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _git(args: Sequence[str], cwd: str | os.PathLike[str]) -> str | None:
    try:
        result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                                timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout if result.returncode == 0 else None


def _porcelain_paths(line: str) -> list[str]:
    """The path(s) of one ``git status --porcelain`` line (two for renames)."""
    paths = line[3:].split(" -> ")
    return [p[1:-1] if len(p) >= 2 and p[0] == p[-1] == '"' else p for p in paths]


def git_commit(root: str | os.PathLike[str] = ".", *,
               ignore: Sequence[str] = ("results/",)) -> str | None:
    """The checked-out commit of the repository at ``root``, marked if the tree is dirty.

    Changes under the ``ignore`` prefixes (repository-relative; tracked or untracked) do
    not count as dirty: a sweep rewrites result records as it goes, and that must not
    mark its later runs as made from uncommitted code.

    Args:
      root: a directory inside the repository.
      ignore: repository-relative path prefixes whose changes are not "dirty".

    Returns:
      ``git rev-parse HEAD``, plus ``"-dirty"`` when ``git status --porcelain`` lists
      other changes; None when ``root`` is not in a repository or git is missing. Never
      raises.
    """
    try:
        head = _git(["rev-parse", "HEAD"], root)
        if head is None or not head.strip():
            return None
        status = _git(["status", "--porcelain"], root)
    except Exception:  # documented as never raising
        return None
    if status is None:
        return head.strip()
    dirty = any(
        not all(p.startswith(tuple(ignore)) for p in _porcelain_paths(line))
        for line in status.splitlines() if line.strip())
    return head.strip() + ("-dirty" if dirty else "")


def peak_rss_mb() -> float:
    """The process's peak resident memory so far (since ``reset_peak_rss``), in MiB.

    Returns:
      ``ru_maxrss`` in MiB (Linux reports KiB, macOS bytes).
    """
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def reset_peak_rss() -> bool:
    """Resets the peak RSS (Linux: ``5`` to ``/proc/self/clear_refs``).

    Returns:
      True on success; False where unsupported (then ``peak_rss_mb`` is the peak
      over the whole process).
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# make_record's parameters shadow these names.
_machine_info, _versions, _git_commit = machine_info, versions, git_commit

# --------------------------------------------------------------------------- records


def _check_number(name: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or value < 0):
        raise ValueError(f"make_record: {name} must be a finite number >= 0, got {value!r}")


def make_record(
    key: RunKey,
    *,
    command: str,
    config: Mapping[str, Any],
    numerics: str,
    metrics: Mapping[str, Any],
    robustness: Mapping[str, Any] | None,
    params: int,
    seconds_per_epoch: float | None,
    peak_rss_mb: float,
    machine: Mapping[str, Any] | None = None,
    versions: Mapping[str, str | None] | None = None,
    git_commit: str | types.EllipsisType | None = ...,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Builds and validates a run's record.

    Args:
      key: the run.
      command: the command line that reproduces the run.
      config: the settings the result depends on (hashed into ``config_hash``).
      numerics: the numerics label (e.g. ``"float32"``, ``"bf16-compute"``); a record made
        under other numerics is stale.
      metrics: must hold ``test_accuracy`` and ``val_accuracy`` in [0, 1]; any other
        JSON values (finite floats only).
      robustness: robustness results, or None when not evaluated.
      params: the number of trainable parameters.
      seconds_per_epoch: mean wall time of a training epoch, or None (not trained here).
      peak_rss_mb: the run's peak resident memory in MiB.
      machine: defaults to ``machine_info`` (pass ``machine_info(device_kind=...)``
        on accelerators).
      versions: defaults to ``versions``.
      git_commit: defaults (``...``) to ``git_commit`` of the working directory; None
        records "unknown".
      extra: more top-level keys; they must not clash with ``REQUIRED_KEYS`` or
        ``"created"``.

    Returns:
      The record: a JSON-ready dict with ``REQUIRED_KEYS``, ``"created"`` (ISO-8601
      UTC) and the ``extra`` keys.

    Raises:
      ValueError: a metric is missing or out of range (named as
        ``metrics['test_accuracy']``), a float is not finite, a number is negative, or
        ``extra`` clashes with a reserved key.
      TypeError: a value is not JSON (named by its key path).
    """
    if not isinstance(key, RunKey):
        raise TypeError(f"make_record: key must be a RunKey, got {type(key).__name__}")
    if not isinstance(command, str):
        raise TypeError(f"make_record: command must be a str, got {type(command).__name__}")
    if not isinstance(numerics, str) or not numerics:
        raise ValueError(f"make_record: numerics must be a non-empty str, got {numerics!r}")
    if not isinstance(metrics, Mapping):
        raise TypeError(f"make_record: metrics must be a mapping, got {type(metrics).__name__}")
    metrics = _jsonable(metrics, "metrics")
    for name in ("test_accuracy", "val_accuracy"):
        value = metrics.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                0.0 <= value <= 1.0):
            raise ValueError(f"make_record: metrics[{name!r}] must be a number in [0, 1], "
                             f"got {value!r}")
        metrics[name] = float(value)
    if isinstance(params, bool) or not isinstance(params, int) or params < 0:
        raise ValueError(f"make_record: params must be an int >= 0, got {params!r}")
    _check_number("seconds_per_epoch", seconds_per_epoch, allow_none=True)
    _check_number("peak_rss_mb", peak_rss_mb)
    if git_commit is ...:
        git_commit = _git_commit()
    if git_commit is not None and not isinstance(git_commit, str):
        raise TypeError(f"make_record: git_commit must be a str or None, got {git_commit!r}")
    config = _jsonable(config, "config")
    record: dict[str, Any] = {
        "experiment": key.experiment,
        "method": key.method,
        "seed": key.seed,
        "data_seed": key.data_seed,
        "command": command,
        "config": config,
        "config_hash": config_hash(config),
        "numerics": numerics,
        "metrics": metrics,
        "robustness": _jsonable(robustness, "robustness"),
        "params": params,
        "seconds_per_epoch": None if seconds_per_epoch is None else float(seconds_per_epoch),
        "peak_rss_mb": float(peak_rss_mb),
        "machine": _jsonable(_machine_info() if machine is None else machine, "machine"),
        "versions": _jsonable(_versions() if versions is None else versions, "versions"),
        "git_commit": git_commit,
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if extra:
        clash = sorted(set(extra) & set(record))
        if clash:
            raise ValueError(f"make_record: extra keys {clash} clash with the record's own keys")
        record.update(_jsonable(extra, "extra"))
    return record


def _check_required(record: Mapping[str, Any], where: str) -> None:
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        raise ValueError(f"{where}: record lacks required keys {missing}")


def _fsync_dir(directory: Path) -> None:
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write(data: bytes, path: str | os.PathLike[str]) -> Path:
    """Writes ``data`` to ``path`` so readers see the old file or the new one, never a mix.

    A uniquely named temp file in the same directory is written, flushed, fsynced and
    renamed over ``path``; on any failure the temp file is removed and ``path`` is left
    as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.",
                                      suffix=".tmp", delete=False)
    try:
        with tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.chmod(tmp.name, 0o644)  # NamedTemporaryFile creates 0600
        os.replace(tmp.name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp.name)
        raise
    _fsync_dir(path.parent)
    return path


def write_json(obj: Any, path: str | os.PathLike[str]) -> Path:
    """Atomically writes ``obj`` as JSON (sorted keys, indent 2, trailing newline).

    Args:
      obj: a JSON value (NaN and infinities are rejected).
      path: the file to write; parent directories are created.

    Returns:
      ``path`` as a ``pathlib.Path``.
    """
    return _atomic_write(_dumps(obj).encode("utf-8"), path)


def write_text(text: str, path: str | os.PathLike[str]) -> Path:
    """Atomically writes ``text`` (UTF-8).

    Args:
      text: the file's contents.
      path: the file to write; parent directories are created.

    Returns:
      ``path`` as a ``pathlib.Path``.
    """
    return _atomic_write(text.encode("utf-8"), path)


def write_record(record: Mapping[str, Any], root: str | os.PathLike[str]) -> Path:
    """Atomically writes a record to its place under the results directory ``root``.

    The same record always gives the same bytes (sorted keys, indent 2, trailing
    newline), so re-writing an unchanged record leaves git clean.

    Args:
      record: a record from ``make_record``.
      root: the results directory.

    Returns:
      The record's path, ``RunKey.from_record(record).record_path(root)``.

    Raises:
      ValueError: the record lacks ``REQUIRED_KEYS`` (all are listed), its key is
        invalid, its ``config_hash`` does not match its ``config``, or it holds NaN.
    """
    _check_required(record, "write_record")
    key = RunKey.from_record(record)
    if record["config_hash"] != config_hash(record["config"]):
        raise ValueError(f"write_record: {key.label()}: config_hash {record['config_hash']!r} "
                         "does not match the record's config")
    return _atomic_write(_dumps(record).encode("utf-8"), key.record_path(root))


def read_record(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Reads a record.

    Args:
      path: a record file.

    Returns:
      The record.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: ``path`` (named in the message) is not valid JSON, not an object, or
        lacks ``REQUIRED_KEYS``.
    """
    text = Path(path).read_text(encoding="utf-8")
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"read_record: {path} is not valid JSON: {e}") from e
    if not isinstance(record, dict):
        raise ValueError(f"read_record: {path} holds a {type(record).__name__}, not an object")
    _check_required(record, f"read_record: {path}")
    return record


def record_status(record: Mapping[str, Any] | None, *, config_hash: str, numerics: str) -> str:
    """Whether a record is still valid for the expected config and numerics.

    Args:
      record: a record, or None when there is none.
      config_hash: the hash of the config the experiment runs now.
      numerics: the numerics label the experiment runs now.

    Returns:
      ``"missing"`` (no record), ``"current"`` (both match) or ``"stale"``.
    """
    if record is None:
        return "missing"
    if record.get("config_hash") == config_hash and record.get("numerics") == numerics:
        return "current"
    return "stale"


def _expected_hash(config_hashes: Mapping[str, str] | Callable[[RunKey], str],
                   key: RunKey) -> str:
    if callable(config_hashes):
        value = config_hashes(key)
    else:
        if key.method not in config_hashes:
            raise ValueError(f"config_hashes has no entry for method {key.method!r} "
                             f"(has {sorted(config_hashes)})")
        value = config_hashes[key.method]
    if not isinstance(value, str):
        raise TypeError(f"config_hashes gave {value!r} for {key.label()}; expected a str")
    return value


class Ledger:
    """The records of one experiment under a results directory.

    Args:
      root: the results directory (e.g. ``Path("results")``).
      experiment: the experiment's name, ``[a-z0-9_]+``.
    """

    def __init__(self, root: str | os.PathLike[str], experiment: str) -> None:
        if not isinstance(experiment, str) or not _EXPERIMENT_RE.fullmatch(experiment):
            raise ValueError(f"Ledger: experiment must match [a-z0-9_]+, got {experiment!r}")
        self.root = Path(root)
        self.experiment = experiment

    def __repr__(self) -> str:
        return f"Ledger(root={str(self.root)!r}, experiment={self.experiment!r})"

    def _check_key(self, key: RunKey) -> None:
        if key.experiment != self.experiment:
            raise ValueError(f"Ledger({self.experiment!r}): key {key.label()} belongs to "
                             f"experiment {key.experiment!r}")

    def path(self, key: RunKey) -> Path:
        """The record file of ``key``.

        Args:
          key: a run of this experiment.

        Returns:
          ``key.record_path(root)``.
        """
        self._check_key(key)
        return key.record_path(self.root)

    def load(self, key: RunKey) -> dict[str, Any] | None:
        """The record of ``key``, or None when there is none.

        Args:
          key: a run of this experiment.

        Returns:
          The record or None.

        Raises:
          ValueError: the file is not a valid record, or holds another run's key.
        """
        path = self.path(key)
        try:
            record = read_record(path)
        except FileNotFoundError:
            return None
        if RunKey.from_record(record) != key:
            raise ValueError(f"{path} holds the record of {RunKey.from_record(record).label()}")
        return record

    def status(self, key: RunKey, *, config_hash: str, numerics: str) -> str:
        """``record_status`` of ``key``'s record.

        Args:
          key: a run of this experiment.
          config_hash: the expected config hash.
          numerics: the expected numerics label.

        Returns:
          ``"missing"``, ``"current"`` or ``"stale"``.
        """
        return record_status(self.load(key), config_hash=config_hash, numerics=numerics)

    def records(self) -> list[dict[str, Any]]:
        """Every record of this experiment, sorted by (method, data_seed, seed).

        Returns:
          The records.

        Raises:
          ValueError: a file is not a valid record or is not where its key says.
        """
        records = []
        for path in sorted((self.root / self.experiment).glob("*/seed*.json")):
            record = read_record(path)
            key = RunKey.from_record(record)
            if key.record_path(self.root) != path:
                raise ValueError(f"{path} holds the record of {key.label()}")
            records.append(record)
        return sorted(records, key=lambda r: (r["method"], r["data_seed"], r["seed"]))

    def todo(self, keys: Sequence[RunKey], *,
             config_hashes: Mapping[str, str] | Callable[[RunKey], str],
             numerics: str) -> list[RunKey]:
        """The runs still to do: those whose record is missing or stale.

        Args:
          keys: the runs the experiment wants.
          config_hashes: the expected config hash per method, or a function of the key.
          numerics: the expected numerics label.

        Returns:
          The missing or stale keys, in the order of ``keys``.
        """
        return [k for k in keys
                if self.status(k, config_hash=_expected_hash(config_hashes, k),
                               numerics=numerics) != "current"]

    def write(self, record: Mapping[str, Any]) -> Path:
        """Atomically writes a record of this experiment (see ``write_record``).

        Args:
          record: a record from ``make_record``.

        Returns:
          The record's path.
        """
        if record.get("experiment") != self.experiment:
            raise ValueError(f"Ledger({self.experiment!r}).write: the record is of "
                             f"experiment {record.get('experiment')!r}")
        return write_record(record, self.root)


# ---------------------------------------------------------------------------- sweeps


def shard(items: Sequence[Any], spec: str | None) -> list[Any]:
    """Every ``n``-th item starting at ``i``, for splitting a sweep over ``n`` workers.

    Args:
      items: the work list.
      spec: ``"i/n"`` with ``0 <= i < n`` (0-based), or None for all items.

    Returns:
      ``list(items)[i::n]``; the shards ``0/n`` ... ``n-1/n`` partition ``items``.

    Raises:
      ValueError: ``spec`` is malformed.
    """
    if spec is None:
        return list(items)
    match = _SHARD_RE.fullmatch(spec.strip()) if isinstance(spec, str) else None
    if match is None or not int(match[1]) < int(match[2]):
        raise ValueError(f"shard: expected 'i/n' with 0 <= i < n, got {spec!r}")
    return list(items)[int(match[1])::int(match[2])]


# --------------------------------------------------------------------------- reports


def _natural_key(text: str) -> tuple[Any, ...]:
    """``"seed10"`` sorts after ``"seed2"``: digit runs compare as numbers."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part)
                 for part in re.split(r"(\d+)", text) if part)


def seed_stats(values: Mapping[str, float]) -> dict[str, Any]:
    """Mean and spread of one metric over seeds.

    Args:
      values: ``{seed name: value}``, e.g. ``{"0": 0.81, "1": 0.82}``; at least one.

    Returns:
      ``{"mean": float, "std": sample std (ddof=1) or None for one value, "per_seed":
      values with keys in numeric order}``.

    Raises:
      ValueError: ``values`` is empty or holds a non-finite number.
    """
    if not values:
        raise ValueError("seed_stats: values is empty")
    per_seed = {str(k): values[k] for k in sorted(values, key=lambda k: _natural_key(str(k)))}
    for k, v in per_seed.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"seed_stats: values[{k!r}] must be a finite number, got {v!r}")
    x = np.asarray(list(per_seed.values()), dtype=np.float64)
    return {"mean": float(x.mean()), "std": float(x.std(ddof=1)) if x.size > 1 else None,
            "per_seed": per_seed}


def format_mean_std(stats: Mapping[str, Any] | None, *, percent: bool = True,
                    digits: int = 1, scale: float | None = None) -> str:
    """``"81.9 ± 0.4"`` for a results table.

    Args:
      stats: from ``seed_stats``, or None.
      percent: multiply by 100.
      digits: decimals.
      scale: multiply by this instead (e.g. ``1e-3`` for thousands; None: 100 with
        ``percent``, else 1).

    Returns:
      ``"mean ± std"``; just ``"mean"`` when std is None; ``"—"`` when ``stats`` or its
      mean is None.

    Examples:
      >>> format_mean_std({"mean": 0.8192, "std": 0.0041})
      '81.9 ± 0.4'
      >>> format_mean_std({"mean": 20480.0, "std": None}, digits=1, scale=1e-3)
      '20.5'
    """
    if stats is None or stats.get("mean") is None:
        return "—"
    if scale is None:
        scale = 100.0 if percent else 1.0
    text = f"{stats['mean'] * scale:.{digits}f}"
    if stats.get("std") is not None:
        text += f" ± {stats['std'] * scale:.{digits}f}"
    return text


@dataclasses.dataclass(frozen=True)
class LedgerReport:
    """What ``collect`` found.

    Attributes:
      current: method -> its current records, sorted by (data_seed, seed); every
        expected method and extra method has an entry (possibly empty).
      stale: labels of records that exist but do not match (sorted).
      missing: labels of expected runs with no current record (stale ones included), in
        the order they were expected.
      complete: True when nothing is missing.
    """

    current: dict[str, list[dict[str, Any]]]
    stale: list[str]
    missing: list[str]
    complete: bool


def collect(ledger: Ledger, expected: Sequence[RunKey], *,
            config_hashes: Mapping[str, str] | Callable[[RunKey], str], numerics: str,
            extra_methods: Sequence[str] = ()) -> LedgerReport:
    """Sorts an experiment's records into current, stale and missing, for a report.

    Rules:

    * An expected key's record is current when its ``config_hash`` equals the expected
      hash (``config_hashes``) and its ``numerics`` equal ``numerics``.
    * Records of expected methods whose keys are not expected (e.g. more seeds) are
      ignored, so a table reports exactly the runs asked for.
    * Methods in ``extra_methods`` (rows this experiment does not produce, e.g. a peer
      library's numbers) have no expected config: all their records are collected, and
      one is current when its ``numerics`` equal ``numerics``, whatever its config hash.
      They are never missing.
    * Records of any other method are ignored.

    Args:
      ledger: the experiment's ledger.
      expected: the runs the report needs.
      config_hashes: the expected config hash per method, or a function of the key.
      numerics: the expected numerics label.
      extra_methods: methods to collect without an expected config.

    Returns:
      A ``LedgerReport``.

    Raises:
      ValueError: ``expected`` repeats a key or holds another experiment's key, or a
        method is both expected and extra.
    """
    wanted: dict[RunKey, None] = {}
    for key in expected:
        ledger._check_key(key)
        if key in wanted:
            raise ValueError(f"collect: expected lists {key.label()} twice")
        wanted[key] = None
    methods = list(dict.fromkeys(k.method for k in wanted))
    both = sorted(set(methods) & set(extra_methods))
    if both:
        raise ValueError(f"collect: methods {both} are both expected and extra_methods")

    on_disk = {RunKey.from_record(r): r for r in ledger.records()}
    current: dict[str, list[dict[str, Any]]] = {m: [] for m in (*methods, *extra_methods)}
    stale, missing = [], []
    for key in wanted:
        status = record_status(on_disk.get(key), config_hash=_expected_hash(config_hashes, key),
                               numerics=numerics)
        if status == "current":
            current[key.method].append(on_disk[key])
        else:
            missing.append(key.label())
            if status == "stale":
                stale.append(key.label())
    for key, record in on_disk.items():
        if key.method in extra_methods:
            if record["numerics"] == numerics:
                current[key.method].append(record)
            else:
                stale.append(key.label())
    for records in current.values():
        records.sort(key=lambda r: (r["data_seed"], r["seed"]))
    return LedgerReport(current=current, stale=sorted(stale, key=_natural_key),
                        missing=missing, complete=not missing)
