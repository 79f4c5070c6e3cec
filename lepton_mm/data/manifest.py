"""Your own files as a batch source: a CSV or JSONL manifest, decoded through grain.

A manifest lists one example per row. Its columns are any subset of an image path, an
audio path, a text and a label (column names configurable with ``columns=``; paths
relative to the manifest's folder, absolute ones as they are)::

    image,audio,label                      {"image": "img/0.png", "text": "a cat", "label": 3}
    img/0.png,wav/0.wav,3                  {"image": "img/1.png", "text": "a dog", "label": 5}

``ManifestDataset`` decodes each row with ``load_image`` (pillow), ``load_audio``
(soundfile, librosa to resample) and your tokenizer, applies your per-example feature
functions (e.g. ``LogMelFeatures`` for audio) and batches the examples into the batch
format of ``lepton_mm.models`` (the same dict an ``ArrayDataset`` of the decoded arrays
gives, ``batch["valid"]`` marking padding rows). It is a ``BatchSource``, so
``fit(model, task, ManifestDataset(...), ...)`` trains from files as it trains from
memory. Reading runs in a `grain <https://github.com/google/grain>`_ pipeline
(``grain.MapDataset``: ``source`` → ``map`` (decode) → ``batch`` →
``to_iter_dataset(ReadOptions)`` → ``mp_prefetch``): threads, prefetching and, with
``num_workers``, worker processes.

Determinism and resuming. Epoch ``e`` visits the examples in the order
``epoch_permutation(n, seed, e)``, exactly as an ``ArrayDataset`` of the same examples
does (the last batch filled up with repeats, marked invalid), and the plan of an epoch
is computed before anything is read, so ``batches(..., start=k)`` begins at batch ``k``
without decoding the ones before it. The data-iterator position that ``fit`` saves in
its checkpoints, ``(epoch, batch_index)``, is therefore all it needs to resume
mid-epoch exactly: no grain iterator state is stored. (grain's own
``MapDataset.shuffle`` would also be deterministic, but a different permutation, so the
same seed would not give the same batches from files as from memory.) Threads and
worker processes change when examples are decoded, never what a batch holds.

Bad rows. The manifest is checked when the dataset is built: every row is parsed and
decoded once (in the same grain pipeline), so a missing or corrupt file, an audio file
at the wrong sample rate, an unparseable label, a JSONL row with an unknown or missing
key, or an example whose shape differs from the first row's raises
``ManifestRowError`` naming the manifest, the row, its line and the file. With
``on_error="skip"`` those rows are left out instead and listed in ``skipped`` (so
``len(dataset.skipped)`` counts them); since that happens once, up front, the batches
stay a function of ``(seed, epoch)``. A CSV header with an unknown or a missing column
is always an error (``ValueError`` naming the columns).

Missing modalities. By default (``missing_modality="error"``) a modality cell with no
value is a bad row like the others. With ``missing_modality="absent"`` it means the
example lacks that modality, as real multimodal data sets often do. A cell has no value
when it is empty (an empty CSV field, or ``""`` in JSONL; with ``"absent"`` an empty text
is an absent text too), JSON ``null``, or a JSONL row without the key::

    image,audio,label                      {"image": "img/2.png", "label": 1}
    img/2.png,,1                           {"image": null, "audio": "wav/3.wav", "label": 4}
    ,wav/3.wav,4

Every batch then carries ``batch["present"]`` (``{modality: bool [b]}``, one entry per
modality column), False on the rows that lack the modality, and in their place in the
modality's data a placeholder of the shape and dtype the other rows decode to (after
``features``): zeros, masks all False. The shapes stay static, so nothing recompiles,
and ``MultimodalClassifier`` zeroes what its encoder makes of the placeholder (see
``lepton_mm.models``), so the placeholder never reaches the fusion layer. The feature
functions never see a missing modality: the placeholder is built once from the first
row that has it. A value that is present is decoded and checked as always (a path to
no file is still a bad row); a missing label, or a row with no modality at all, is
still a bad row.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from lepton_mm.data.batching import (
    _check_batch_size,
    _epoch_batches,
    _tree_leaves,
    _tree_map,
)
from lepton_mm.data.files import UnreadableFileError, _size_hw, load_audio, load_image

__all__ = ["ManifestDataset", "ManifestRowError"]

#: The columns a manifest may have, by role (also the batch keys they fill).
ROLES = ("image", "audio", "text", "label")
_FILE_ROLES = ("image", "audio")
_ON_ERROR = ("raise", "skip")
_MISSING = ("error", "absent")
_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


class ManifestRowError(ValueError):
    """A manifest row that cannot be read.

    Attributes:
      manifest: the manifest's path.
      row: the row number, 1-based, counting data rows (not the CSV header or blank
        lines).
      line: the line of the manifest the row ends on, 1-based.
      reason: what is wrong, naming the file where there is one.
      file: the file that could not be read, or None.
    """

    def __init__(self, manifest: str | os.PathLike[str], row: int, line: int, reason: str,
                 file: str | os.PathLike[str] | None = None):
        self.manifest, self.row, self.line, self.reason = Path(manifest), row, line, reason
        self.file = None if file is None else Path(file)
        super().__init__(f"{self.manifest}, row {row} (line {line}): {reason}")

    def __reduce__(self) -> tuple[Any, ...]:  # crosses grain's worker processes
        return type(self), (self.manifest, self.row, self.line, self.reason, self.file)


class _Row(NamedTuple):
    """One parsed manifest row: its position and its values by role."""

    row: int
    line: int
    values: dict[str, Any]


# ---------------------------------------------------------------------------- parsing


def _check_roles(columns: Mapping[str, str] | None) -> dict[str, str] | None:
    if columns is None:
        return None
    if not isinstance(columns, Mapping) or not columns:
        raise TypeError(f"columns: expected a non-empty dict {{role: column name}} with "
                        f"roles among {list(ROLES)}, got {columns!r}.")
    unknown = sorted(set(columns) - set(ROLES))
    if unknown:
        raise ValueError(f"columns: unknown role(s) {unknown}; expected some of "
                         f"{list(ROLES)}.")
    if any(not isinstance(c, str) or not c for c in columns.values()):
        raise TypeError(f"columns: expected column names as non-empty str, got {columns!r}.")
    if len(set(columns.values())) != len(columns):
        raise ValueError(f"columns: two roles name the same column: {dict(columns)}.")
    return {r: columns[r] for r in ROLES if r in columns}


def _roles_of_header(header: Sequence[str], columns: dict[str, str] | None,
                     ignore: frozenset[str], manifest: Path) -> dict[str, str]:
    """``{role: column}`` for a CSV header; unknown or missing columns raise."""
    if columns is None:
        columns = {r: r for r in ROLES if r in header}
    missing = [c for c in columns.values() if c not in header]
    if missing:
        raise ValueError(f"{manifest}: missing required column(s) {missing} in the header "
                         f"{list(header)}.")
    unknown = [c for c in header if c not in columns.values() and c not in ignore]
    if unknown:
        raise ValueError(
            f"{manifest}: unknown column(s) {unknown} in the header; the roles are "
            f"{list(ROLES)}: map columns to them with columns={{role: column}} or list "
            f"the others in ignore_columns.")
    if not set(columns) - {"label"}:
        raise ValueError(f"{manifest}: no image, audio or text column (header "
                         f"{list(header)}).")
    return columns


def _read_csv(manifest: Path, columns: dict[str, str] | None, ignore: frozenset[str]
              ) -> tuple[dict[str, str], list[_Row | ManifestRowError]]:
    with open(manifest, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        if not header:
            raise ValueError(f"{manifest}: empty manifest (no header line).")
        if len(set(header)) != len(header):
            raise ValueError(f"{manifest}: duplicate column names in the header {header}.")
        roles = _roles_of_header(header, columns, ignore, manifest)
        position = {role: header.index(col) for role, col in roles.items()}
        out: list[_Row | ManifestRowError] = []
        for fields in reader:
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue  # blank line
            row, line = len(out) + 1, reader.line_num
            if len(fields) != len(header):
                out.append(ManifestRowError(manifest, row, line, (
                    f"expected {len(header)} fields ({', '.join(header)}), got "
                    f"{len(fields)}.")))
                continue
            values = {role: fields[i].strip() for role, i in position.items()}
            out.append(_Row(row, line, values))
    return roles, out


def _read_jsonl(manifest: Path, columns: dict[str, str] | None, ignore: frozenset[str],
                absent: bool = False) -> tuple[dict[str, str], list[_Row | ManifestRowError]]:
    """``({role: key}, rows)``; with ``absent``, a modality key a row lacks is None."""
    parsed: list[tuple[int, int, Any]] = []
    with open(manifest, encoding="utf-8") as f:
        for line, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                obj = ManifestRowError(manifest, len(parsed) + 1, line,
                                       f"not valid JSON ({e}).")
            parsed.append((len(parsed) + 1, line, obj))
    if not parsed:
        raise ValueError(f"{manifest}: empty manifest (no rows).")
    if columns is None and absent:  # the roles that are a key of any row
        keys = {k for _, _, obj in parsed if isinstance(obj, dict) for k in obj}
        columns = {r: r for r in ROLES if r in keys}
        if not set(columns) - {"label"}:
            raise ValueError(f"{manifest}: no row has an image, audio or text key (keys "
                             f"{sorted(keys)}); name the columns with columns=.")
    elif columns is None:  # the roles of the first row that is a JSON object
        first = next((obj for _, _, obj in parsed if isinstance(obj, dict)), {})
        columns = {r: r for r in ROLES if r in first}
        if not set(columns) - {"label"}:
            raise ValueError(f"{manifest}: the first row has no image, audio or text key "
                             f"(keys {sorted(first)}); name the columns with columns=.")
    out: list[_Row | ManifestRowError] = []
    for row, line, obj in parsed:
        if isinstance(obj, ManifestRowError):
            out.append(obj)
        elif not isinstance(obj, dict):
            out.append(ManifestRowError(manifest, row, line, (
                f"expected a JSON object, got {type(obj).__name__}.")))
        elif missing := [c for r, c in columns.items() if c not in obj
                         and (r == "label" or not absent)]:
            out.append(ManifestRowError(manifest, row, line, (
                f"missing required column(s) {missing} (keys {sorted(obj)}).")))
        elif unknown := sorted(k for k in obj if k not in columns.values()
                               and k not in ignore):
            out.append(ManifestRowError(manifest, row, line, (
                f"unknown column(s) {unknown}; map them with columns={{role: column}} "
                f"or list them in ignore_columns.")))
        else:
            out.append(_Row(row, line, {role: obj.get(c) for role, c in columns.items()}))
    return columns, out


def _check_values(row: _Row, manifest: Path, columns: dict[str, str],
                  classes: dict[str, int] | None, absent: bool = False) -> _Row:
    """The row with its values checked (paths and texts as str, the label as a number;
    with ``absent``, None for a modality with no value)."""
    values = dict(row.values)
    for role, value in row.values.items():
        column = columns[role]
        if value is None or (isinstance(value, str) and not value
                             and (role != "text" or absent)):
            if absent and role != "label":
                values[role] = None
                continue
            raise ManifestRowError(manifest, row.row, row.line,
                                   f"no value in column {column!r}.")
        if role == "label":
            try:
                values[role] = _parse_label(value, column, classes)
            except _LabelError as e:
                raise ManifestRowError(manifest, row.row, row.line, str(e)) from None
        elif not isinstance(value, str):
            raise ManifestRowError(manifest, row.row, row.line, (
                f"column {column!r}: expected a string, got {type(value).__name__} "
                f"{value!r}."))
    if absent and all(values[r] is None for r in values if r != "label"):
        named = ", ".join(repr(columns[r]) for r in values if r != "label")
        raise ManifestRowError(manifest, row.row, row.line, (
            f"no value in any modality column ({named}): with missing_modality='absent' "
            f"an example still needs one modality."))
    return _Row(row.row, row.line, values)


class _LabelError(ValueError):
    pass


def _parse_label(value: Any, column: str, classes: dict[str, int] | None) -> int | float:
    if classes is not None:
        if str(value) not in classes:
            raise _LabelError(f"column {column!r}: {value!r} is not one of classes "
                              f"{list(classes)}.")
        return classes[str(value)]
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        number: int | float = value
    else:
        try:
            number = int(value)
        except (TypeError, ValueError):
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise _LabelError(
                    f"column {column!r}: expected a number (or pass classes= to map "
                    f"names to class ids), got {value!r}.") from None
    if isinstance(number, float) and not math.isfinite(number):
        raise _LabelError(f"column {column!r}: expected a finite number, got {value!r}.")
    return number


# ---------------------------------------------------------------------------- decoding


@dataclasses.dataclass(frozen=True)
class _Decoder:
    """Decodes one row into an example (picklable, so grain's workers can run it)."""

    manifest: Path
    columns: dict[str, str]
    image_size: Any
    grayscale: bool
    sample_rate: int | None
    resample: bool
    tokenizer: Any
    max_text_length: int | None
    features: dict[str, Callable[[Any], Any]]
    label_dtype: Any
    # missing_modality="absent": every example gets "present"; a modality with no value
    # (None) gets placeholders[role], zeros shaped like a decoded one.
    presence: bool = False
    placeholders: dict[str, Any] = dataclasses.field(default_factory=dict)

    def path(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.manifest.parent / p

    def error(self, row: _Row, reason: str, file: Path | None = None) -> ManifestRowError:
        return ManifestRowError(self.manifest, row.row, row.line, reason, file)

    def __call__(self, item: tuple[_Row, bool]) -> dict[str, Any]:
        """``(row, valid)`` → the example dict, ``"valid"`` a bool scalar."""
        row, valid = item
        example = self.example(row)
        example["valid"] = np.bool_(valid)
        return example

    def example(self, row: _Row) -> dict[str, Any]:
        """The row's example: its decoded values, with ``presence`` placeholders for the
        modalities it lacks and ``"present"``."""
        example = {role: _tree_map(np.copy, self.placeholders[role]) if value is None
                   else self.decode(row, role) for role, value in row.values.items()}
        if self.presence:
            example["present"] = {role: np.bool_(value is not None)
                                  for role, value in row.values.items() if role != "label"}
        return example

    def decode(self, row: _Row, role: str) -> Any:
        """One value of the row, decoded (the label as an array; then ``features``)."""
        value = row.values[role]
        if role == "label":
            return np.asarray(value, self.label_dtype)
        file = self.path(value) if role in _FILE_ROLES else None
        try:
            if role == "image":
                x = load_image(file, size=self.image_size, grayscale=self.grayscale)
            elif role == "audio":
                x = self.audio(file)
            else:
                x = self.tokens(value)
        except (OSError, ValueError) as e:  # includes UnreadableFileError
            reason = str(e) if file is None or str(file) in str(e) else f"{file}: {e}"
            raise self.error(row, reason, file) from e
        feature = self.features.get(role)
        if feature is not None:
            try:
                x = feature(x)
            except (OSError, ValueError) as e:
                where = f" of {file}" if file is not None else ""
                raise self.error(row, f"features[{role!r}]{where}: {e}", file) from e
        return x

    def audio(self, file: Path) -> np.ndarray:
        import soundfile

        if not self.resample and file.is_file():
            try:
                rate = soundfile.info(str(file)).samplerate
            except (RuntimeError, OSError) as e:  # soundfile's LibsndfileError
                raise UnreadableFileError(f"cannot read audio {file}: {e}") from e
            if rate != self.sample_rate:
                raise UnreadableFileError(
                    f"audio file {file} is at {rate} Hz, expected sample_rate="
                    f"{self.sample_rate} (pass resample=True to resample it).")
        return load_audio(file, sample_rate=self.sample_rate)

    def tokens(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """``(ids int32 [max_text_length], mask bool [max_text_length])``."""
        out = self.tokenizer(text)
        if isinstance(out, Mapping):  # a Hugging Face tokenizer's BatchEncoding
            out = out["input_ids"]
        ids = np.asarray(out)
        if ids.ndim != 1 or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
            raise ValueError(f"tokenizer: expected a sequence of int token ids (or a dict "
                             f"with 'input_ids'), got {ids.dtype} {list(ids.shape)}.")
        ids = ids[:self.max_text_length].astype(np.int32)
        padded = np.zeros(self.max_text_length, np.int32)
        padded[:ids.size] = ids
        return padded, np.arange(self.max_text_length) < ids.size


def _signature(example: Mapping[str, Any]) -> dict[str, str]:
    """``{role: "dtype [shape], ..."}``: what must be equal across examples to batch (of
    the values a row has: a missing modality's placeholder is shaped like the others)."""
    return {role: ", ".join(f"{np.asarray(a).dtype} {list(np.shape(a))}"
                            for _, a in _tree_leaves(value))
            for role, value in example.items()}


@dataclasses.dataclass(frozen=True)
class _Check:
    """Validation of one row: ``(index, error or None, signature or None)``."""

    decoder: _Decoder

    def __call__(self, item: tuple[int, _Row]) -> tuple[int, Any, Any]:
        index, row = item
        try:
            return index, None, _signature({
                role: self.decoder.decode(row, role)
                for role, value in row.values.items() if value is not None})
        except ManifestRowError as e:
            return index, e, None


def _grain() -> Any:
    """``import grain`` (slow, ~1-3 s: only when data is first read).

    grain 0.2.18 reads the absl flag ``--grain_enable_multiprocess_worker_profiling``
    when worker processes start while JAX is loaded, and absl refuses to read a flag
    before ``absl.app`` parsed the command line (google/grain#1355, fixed after 0.2.18),
    so ``mp_prefetch`` fails in any plain script. The flag is marked present, keeping
    its default (False), as grain does for its debug flags in its workers.
    """
    import grain
    from absl import flags

    name = "grain_enable_multiprocess_worker_profiling"
    if not flags.FLAGS.is_parsed() and name in flags.FLAGS:
        flags.FLAGS[name].present = True
    return grain


# ----------------------------------------------------------------------------- dataset


def _check_count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}.")
    return int(value)


class ManifestDataset:
    """Examples listed in a CSV or JSONL manifest, decoded through grain. A ``BatchSource``.

    Each batch is the batch dict of ``lepton_mm.models``::

        {"image": float32 [b, h, w, c],      # load_image, then features["image"]
         "audio": features["audio"](float32 [samples]), e.g. LogMelFeatures:
                  (log_mel float32 [b, frames, mels], mask bool [b, frames]),
         "text": (ids int32 [b, max_text_length], mask bool [b, max_text_length]),
         "label": int32 [b] (float32 [b] if some label is not an integer),
         "present": {"image": bool [b], ...},  # only with missing_modality="absent"
         "valid": bool [b]}

    with the keys of the manifest's columns only, and ``b = batch_size`` (or the
    ``rows`` selected). See the module docstring for the manifest format, the order of
    the batches (that of an ``ArrayDataset`` of the same examples, from
    ``(seed, epoch)`` only: resuming mid-epoch with ``start`` is exact), how bad rows
    are reported or skipped, and examples that lack a modality: with
    ``missing_modality="absent"`` an empty modality cell gives ``present[m]`` False on
    that row and zeros (masks all False) of the usual shape in ``batch[m]``.

    Args:
      manifest: a ``.csv`` file (with a header line) or a ``.jsonl`` / ``.ndjson`` file
        (one JSON object per line).
      columns: ``{role: column name}`` for roles among ``"image"``, ``"audio"``,
        ``"text"``, ``"label"``; default: every role whose name is a column (for JSONL,
        a key of the first row).
      ignore_columns: other columns the manifest may have (e.g. an id); any other
        column is an error.
      image_size: resize images to ``(height, width)`` (see ``load_image``).
      grayscale: decode images to one channel.
      sample_rate: the audio rate in Hz; needed with an audio column.
      resample: resample audio at another rate to ``sample_rate``; False (default): a
        file at another rate is a bad row.
      tokenizer: ``text -> token ids`` (a sequence of ints, or a dict with
        ``"input_ids"``, e.g. a Hugging Face tokenizer); needed with a text column.
      max_text_length: ids are cut or zero-padded to this length; needed with a text
        column.
      features: ``{role: fn}``: per-example functions applied after decoding, e.g.
        ``{"audio": LogMelFeatures(...)}``; every example must come out with the same
        shapes. They run in grain's threads (and worker processes: they must pickle).
      classes: class names; labels are then names, mapped to their index.
      on_error: ``"raise"`` (default): a bad row raises ``ManifestRowError``;
        ``"skip"``: bad rows are left out and listed in ``skipped``.
      missing_modality: what an image, audio or text cell with no value means (empty,
        JSON null or, in JSONL, no key). ``"error"`` (default): the row is bad (see
        ``on_error``). ``"absent"``: the example lacks that modality; batches carry
        ``present`` for every modality column, False there, and the modality's data
        is a placeholder of zeros (shaped as decoded, after ``features``, from the
        first row that has the modality; ``features`` are not called on it). A
        missing label, or no modality at all, is still a bad row; JSONL columns
        default to the roles that are a key of any row.
      validate: decode every row once when building (default). False skips that pass
        (no up-front cost; a bad row then raises during ``batches``, except the first
        row with a modality that some example lacks, decoded for its placeholder);
        needs ``on_error="raise"``.
      num_workers: grain worker processes decoding batches (``mp_prefetch``); 0 decodes
        in this process. Workers start anew for each ``batches`` call of more than one
        batch (each epoch, each evaluation) and for the check when building, a few
        seconds each: worth it when decoding an epoch takes much longer than that.
      num_threads: grain reader threads per process.
      prefetch: batches read ahead per process (``ReadOptions.prefetch_buffer_size``),
        at least ``num_threads`` (or 0 with ``num_threads=0``).

    Attributes:
      manifest: the manifest's path.
      columns: ``{role: column name}`` in use.
      skipped: ``ManifestRowError`` of each row left out (``on_error="skip"``); a
        missing modality with ``missing_modality="absent"`` is not an error.
      num_absent: ``{modality: number of examples that lack it}`` for each modality
        column (all zero unless ``missing_modality="absent"``).

    Raises:
      ValueError / TypeError: a bad argument (named), a manifest that is not ``.csv`` or
        ``.jsonl``, a CSV header with unknown or missing columns, no usable row, or
        (``missing_modality="absent"``) a modality column no usable row has a value in.
      FileNotFoundError: no manifest file.
      ManifestRowError: with ``on_error="raise"``, the first bad row.

    Examples:
      >>> data = ManifestDataset("train.csv", sample_rate=8000, grayscale=True,
      ...                        features={"audio": LogMelFeatures(
      ...                            sample_rate=8000, num_samples=8000)})  # doctest: +SKIP
      >>> fit(model, Classification(10), data, workdir="runs/own")  # doctest: +SKIP
    """

    def __init__(self, manifest: str | os.PathLike[str], *,
                 columns: Mapping[str, str] | None = None,
                 ignore_columns: Sequence[str] = (),
                 image_size: int | tuple[int, int] | None = None, grayscale: bool = False,
                 sample_rate: int | None = None, resample: bool = False,
                 tokenizer: Callable[[str], Any] | None = None,
                 max_text_length: int | None = None,
                 features: Mapping[str, Callable[[Any], Any]] | None = None,
                 classes: Sequence[str] | None = None, on_error: str = "raise",
                 missing_modality: str = "error", validate: bool = True,
                 num_workers: int = 0, num_threads: int = 2, prefetch: int = 4):
        if not isinstance(manifest, (str, os.PathLike)):
            raise TypeError(f"manifest: expected a str or os.PathLike, got "
                            f"{type(manifest).__name__}.")
        path = Path(manifest).expanduser().absolute()
        kind = _FORMATS.get(path.suffix.lower())
        if kind is None:
            raise ValueError(f"manifest: expected a .csv, .jsonl or .ndjson file, got {path}.")
        if not path.is_file():
            raise FileNotFoundError(f"manifest: no such file: {path}")
        if on_error not in _ON_ERROR:
            raise ValueError(f"on_error: expected one of {list(_ON_ERROR)}, got "
                             f"{on_error!r}.")
        if missing_modality not in _MISSING:
            raise ValueError(f"missing_modality: expected one of {list(_MISSING)}, got "
                             f"{missing_modality!r}.")
        absent = missing_modality == "absent"
        if not validate and on_error == "skip":
            raise ValueError("validate: on_error='skip' needs validate=True (rows are "
                             "skipped when the dataset is built).")
        self.num_workers = _check_count("num_workers", num_workers, 0)
        self.num_threads = _check_count("num_threads", num_threads, 0)
        self.prefetch = _check_count("prefetch", prefetch, 0)
        if self.prefetch < self.num_threads or (self.num_threads and not self.prefetch):
            raise ValueError(f"prefetch: expected at least num_threads={self.num_threads} "
                             f"(and > 0 with threads), got {prefetch!r}.")
        if isinstance(ignore_columns, str) or not isinstance(ignore_columns, Sequence):
            raise TypeError(f"ignore_columns: expected a sequence of column names, got "
                            f"{ignore_columns!r}.")
        features = dict(features or {})
        if set(features) - {"image", "audio", "text"} or any(
                not callable(f) for f in features.values()):
            raise ValueError(f"features: expected {{role: callable}} with roles among "
                             f"{['image', 'audio', 'text']}, got {features!r}.")
        _size_hw(image_size)
        class_ids = None
        if classes is not None:
            if isinstance(classes, str) or not isinstance(classes, Sequence) or not classes:
                raise TypeError(f"classes: expected a non-empty sequence of names, got "
                                f"{classes!r}.")
            class_ids = {str(c): i for i, c in enumerate(classes)}
            if len(class_ids) != len(classes):
                raise ValueError(f"classes: duplicate names in {list(classes)}.")

        if kind == "csv":
            self.columns, parsed = _read_csv(path, _check_roles(columns),
                                             frozenset(ignore_columns))
        else:
            self.columns, parsed = _read_jsonl(path, _check_roles(columns),
                                               frozenset(ignore_columns), absent)
        if "audio" in self.columns:
            if sample_rate is None:
                raise ValueError(f"sample_rate: needed for the audio column "
                                 f"{self.columns['audio']!r} of {path}.")
            sample_rate = _check_count("sample_rate", sample_rate, 1)
        if "text" in self.columns:
            if tokenizer is None or not callable(tokenizer):
                raise ValueError(f"tokenizer: a callable text -> token ids is needed for "
                                 f"the text column {self.columns['text']!r} of {path}.")
            max_text_length = _check_count("max_text_length", max_text_length, 1) if (
                max_text_length is not None) else None
            if max_text_length is None:
                raise ValueError(f"max_text_length: needed for the text column "
                                 f"{self.columns['text']!r} of {path}.")
        self.manifest = path
        rows, errors = [], []
        for item in parsed:
            if isinstance(item, _Row):
                try:
                    item = _check_values(item, path, self.columns, class_ids, absent)
                except ManifestRowError as e:
                    item = e
            (rows if isinstance(item, _Row) else errors).append(item)
        if errors and on_error == "raise":
            raise errors[0]
        labels = [r.values["label"] for r in rows if "label" in r.values]
        label_dtype = np.int32 if all(isinstance(v, int) for v in labels) else np.float32
        self._decoder = _Decoder(
            manifest=path, columns=self.columns,
            image_size=image_size, grayscale=bool(grayscale),
            sample_rate=sample_rate if "audio" in self.columns else None,
            resample=bool(resample), tokenizer=tokenizer,
            max_text_length=max_text_length if "text" in self.columns else None,
            features=features, label_dtype=label_dtype, presence=absent)
        if validate:
            rows, decode_errors = self._validate(rows, on_error)
            errors += decode_errors
        errors.sort(key=lambda e: e.row)
        self.skipped: tuple[ManifestRowError, ...] = tuple(errors)
        if not rows:
            first = f" The first: {errors[0]}" if errors else ""
            raise ValueError(f"manifest: no usable row in {path} ({len(errors)} bad rows "
                             f"skipped).{first}")
        self._rows: list[_Row] = rows
        self.num_absent = {role: sum(r.values[role] is None for r in rows)
                           for role in self.columns if role != "label"}
        if any(self.num_absent.values()):
            self._decoder = dataclasses.replace(
                self._decoder, placeholders=self._placeholders())

    def __len__(self) -> int:
        return len(self._rows)

    def __repr__(self) -> str:
        absent = f", absent={self.num_absent}" if self._decoder.presence else ""
        return (f"ManifestDataset({str(self.manifest)!r}, n={len(self)}, "
                f"columns={self.columns}, skipped={len(self.skipped)}{absent})")

    def _placeholders(self) -> dict[str, Any]:
        """``{modality: zeros}`` for each modality some example lacks, shaped like the
        first example that has it (decoded once more: with ``validate=False`` a bad row
        there raises now)."""
        out = {}
        for role, count in self.num_absent.items():
            if not count:
                continue
            if count == len(self._rows):
                raise ValueError(
                    f"missing_modality: no usable row of {self.manifest} has a value in "
                    f"column {self.columns[role]!r}, so its shape is unknown; leave the "
                    f"column out (columns= without it, ignore_columns= with it) or add "
                    f"such a row.")
            row = next(r for r in self._rows if r.values[role] is not None)
            out[role] = _tree_map(np.zeros_like, self._decoder.decode(row, role))
        return out

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Example ``index`` (0-based, among the rows kept), decoded: one unbatched dict."""
        return self._decoder.example(self._rows[index])

    def row_numbers(self) -> np.ndarray:
        """The manifest row (1-based) of each example, in example order.

        Returns:
          int ``[len(self)]``.
        """
        return np.array([r.row for r in self._rows])

    def num_batches(self, batch_size: int) -> int:
        """Batches per epoch (the last one padded).

        Args:
          batch_size: rows per batch.

        Returns:
          ``ceil(len(self) / batch_size)``.
        """
        return -(-len(self) // _check_batch_size(batch_size))

    def batch_indices(self, batch_size: int, *, seed: int, epoch: int,
                      shuffle: bool = True) -> list[tuple[np.ndarray, np.ndarray]]:
        """The epoch's batches as example indices (those of ``ArrayDataset``).

        Args:
          batch_size: rows per batch.
          seed: the run seed.
          epoch: the epoch number.
          shuffle: shuffle by ``epoch_permutation``; False keeps manifest order.

        Returns:
          ``[(indices int [batch_size], valid bool [batch_size])]``, one per batch.
        """
        return _epoch_batches(len(self), batch_size, seed=seed, epoch=epoch,
                              shuffle=shuffle)

    def batches(self, batch_size: int, *, seed: int, epoch: int, shuffle: bool = True,
                start: int = 0, rows: slice | None = None) -> Iterator[dict[str, Any]]:
        """Yields the epoch's fixed-size batches from batch ``start`` on.

        The batches before ``start`` are not read. Worker processes (``num_workers``)
        start when the first batch is asked for and stop when the iteration ends (or the
        generator is closed).

        Args:
          batch_size: rows per batch.
          seed: the run seed.
          epoch: the epoch number (selects the permutation).
          shuffle: shuffle by ``epoch_permutation``; False keeps manifest order.
          start: index of the first batch (to resume mid-epoch).
          rows: the rows of each batch to return (multi-process: this process's share).

        Yields:
          The batch dict with ``batch["valid"]`` (bool ``[batch_size]``, or the rows
          selected).
        """
        plan = self.batch_indices(batch_size, seed=seed, epoch=epoch, shuffle=shuffle)
        take = np.arange(batch_size)[rows or slice(None)]
        plan = plan[_check_count("start", start, 0):]
        if not plan or not take.size:
            return
        items = [(self._rows[i], bool(v)) for idx, valid in plan
                 for i, v in zip(idx[take], valid[take], strict=True)]
        grain = _grain()
        dataset = grain.MapDataset.source(items).map(self._decoder).batch(take.size)
        # One batch (e.g. fit's first look at the data) is not worth starting workers.
        iterator = iter(self._pipeline(dataset, workers=len(plan) > 1))
        try:
            for batch in iterator:
                # Out of the workers' shared memory into plain arrays, so that grain
                # frees each block now, not at interpreter exit.
                yield _tree_map(np.array, batch) if self.num_workers > 0 else batch
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    def _pipeline(self, dataset: Any, workers: bool = True) -> Any:
        """A grain ``MapDataset`` → ``IterDataset`` with this dataset's threads, prefetch
        and (``workers``) worker processes."""
        grain = _grain()
        out = dataset.to_iter_dataset(grain.ReadOptions(
            num_threads=self.num_threads, prefetch_buffer_size=self.prefetch))
        if self.num_workers and workers:
            out = out.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=self.num_workers, per_worker_buffer_size=max(self.prefetch, 1)))
        return out

    def _shape_error(self, row: _Row, signature: dict[str, str],
                     first: dict[str, tuple[_Row, str]]) -> ManifestRowError | None:
        """The error for the first value of ``row`` whose shape differs from that of
        the first row that had the role (``first``), or None."""
        role = next((r for r in signature if r in first and signature[r] != first[r][1]),
                    None)
        if role is None:
            return None
        first_row, first_signature = first[role]
        file = self._decoder.path(row.values[role]) if role in _FILE_ROLES else None
        where = f" {file}" if file is not None else ""
        return self._decoder.error(row, (
            f"{role}{where} gives {signature[role]}, but row {first_row.row} gave "
            f"{first_signature}: every example must have one shape (image_size=, "
            f"features=)."), file)

    def _validate(self, rows: list[_Row], on_error: str
                  ) -> tuple[list[_Row], list[ManifestRowError]]:
        """Decodes every row once: (the good rows, the errors); raises the first error
        in row order with ``on_error="raise"``."""
        if not rows:
            return [], []
        grain = _grain()
        dataset = grain.MapDataset.source(list(enumerate(rows))).map(_Check(self._decoder))
        good, errors = [], []
        first: dict[str, tuple[_Row, str]] = {}  # role -> the first good row having it
        iterator = iter(self._pipeline(dataset))
        try:
            for index, error, signature in iterator:
                row = rows[index]
                if error is None:
                    error = self._shape_error(row, signature, first)
                if error is not None:
                    if on_error == "raise":
                        raise error
                    errors.append(error)
                    continue
                for role, value in signature.items():
                    first.setdefault(role, (row, value))
                good.append(row)
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()
        return good, errors


