"""Export a model's inference function to StableHLO, and load it without the model code.

``save(model, example_inputs, path)`` writes a directory::

    path/
      manifest.json          format version, input/output structure, shapes and dtypes,
                             versions, sha256 of the two files below
      module.stablehlo       jax.export serialisation of f(weights, inputs) -> outputs
      weights.safetensors    the model state (parameters, batch-norm statistics, ...)

The function is the model's eval-mode forward pass (``model.eval()`` on a copy: no
dropout, running batch-norm statistics) traced with a *symbolic* batch dimension ``b``,
so the loaded function accepts any batch size. Weights are arguments, not constants:
the module stays small and the weights stay inspectable with any safetensors reader.

``load(path)`` needs only JAX, NumPy and safetensors: no Flax and no model class. It
verifies both checksums before parsing anything and checks each call's inputs against
the manifest before running the compiled function.

Limits: inputs and outputs are arrays or pytrees of arrays built from dicts (string
keys), lists, tuples, NamedTuples (e.g. ``lepton_mm.EncoderOutput``) and None; every
input array has the batch as its leading axis. The module runs on the platforms it was
exported for (by default the current backend's; see ``save(platforms=...)``).
"""

from __future__ import annotations

import collections
import hashlib
import importlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lepton_mm._validation import check_array

FORMAT = "lepton_mm.export"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
MODULE_FILE = "module.stablehlo"
WEIGHTS_FILE = "weights.safetensors"
BATCH_DIM = "b"

# dtypes safetensors.numpy stores natively; others (bfloat16, float8, PRNG keys) are
# stored as same-width unsigned ints and viewed back on load.
_NATIVE = {"float64", "float32", "float16", "int64", "int32", "int16", "int8", "uint64",
           "uint32", "uint16", "uint8", "bool", "complex64"}

__all__ = ["ExportedModel", "load", "save"]


# --- pytree structure as JSON ------------------------------------------------------------

class _UnsupportedTree(TypeError):
    """An input or output is not an array or a supported container."""


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(type(x), "_fields")


def _is_array(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _walk(tree: Any, where: str) -> tuple[dict, list[tuple[str, Any]]]:
    """Returns ``(structure, [(location, leaf), ...])`` in a fixed order.

    ``structure`` is JSON: ``{"type": "leaf"|"none"|"list"|"tuple"|"dict"|"namedtuple",
    ...}``. The order (dict keys sorted, NamedTuple fields in order) is this module's own,
    so flattening and rebuilding agree across processes without JAX pytree registries.
    """
    if tree is None:
        return {"type": "none"}, []
    if _is_array(tree):
        return {"type": "leaf"}, [(where, tree)]
    leaves: list[tuple[str, Any]] = []
    children = []
    if isinstance(tree, dict):
        keys = list(tree)
        if not all(isinstance(k, str) for k in keys):
            raise _UnsupportedTree(f"{where}: dict keys must be strings, got {keys!r}.")
        keys.sort()
        for key in keys:
            child, sub = _walk(tree[key], f"{where}[{key!r}]")
            children.append(child)
            leaves += sub
        return {"type": "dict", "keys": keys, "children": children}, leaves
    if _is_namedtuple(tree):
        cls = type(tree)
        for field in cls._fields:
            child, sub = _walk(getattr(tree, field), f"{where}.{field}")
            children.append(child)
            leaves += sub
        return {"type": "namedtuple", "module": cls.__module__, "name": cls.__qualname__,
                "fields": list(cls._fields), "children": children}, leaves
    if type(tree) in (list, tuple):
        for i, item in enumerate(tree):
            child, sub = _walk(item, f"{where}[{i}]")
            children.append(child)
            leaves += sub
        return {"type": type(tree).__name__, "children": children}, leaves
    raise _UnsupportedTree(
        f"{where}: unsupported type {type(tree).__name__}; exported inputs and outputs must "
        "be arrays or dicts (string keys), lists, tuples, NamedTuples or None of them.")


def _comparable(structure: dict) -> dict:
    """``structure`` without NamedTuple modules (an equivalent class may live elsewhere)."""
    out = {k: v for k, v in structure.items() if k != "module"}
    if "children" in out:
        out["children"] = [_comparable(c) for c in out["children"]]
    return out


_NAMEDTUPLE_CLASSES: dict[tuple, type] = {}


def _namedtuple_class(structure: dict) -> type:
    """lepton_mm's own NamedTuples are imported; others are recreated with
    ``collections.namedtuple`` (the user's model code is never imported)."""
    key = (structure["module"], structure["name"], tuple(structure["fields"]))
    if key not in _NAMEDTUPLE_CLASSES:
        cls = None
        if structure["module"].split(".")[0] == "lepton_mm":
            obj: Any = importlib.import_module(structure["module"])
            for part in structure["name"].split("."):
                obj = getattr(obj, part, None)
            if isinstance(obj, type) and tuple(getattr(obj, "_fields", ())) == key[2]:
                cls = obj
        if cls is None:
            cls = collections.namedtuple(structure["name"].split(".")[-1], key[2])
        _NAMEDTUPLE_CLASSES[key] = cls
    return _NAMEDTUPLE_CLASSES[key]


def _build(structure: dict, leaves: Iterator[Any]) -> Any:
    kind = structure["type"]
    if kind == "leaf":
        return next(leaves)
    if kind == "none":
        return None
    children = [_build(c, leaves) for c in structure.get("children", [])]
    if kind == "dict":
        return dict(zip(structure["keys"], children, strict=True))
    if kind == "namedtuple":
        return _namedtuple_class(structure)(*children)
    if kind == "list":
        return children
    if kind == "tuple":
        return tuple(children)
    raise ValueError(f"unknown structure type {kind!r} in the manifest.")


# --- saving ------------------------------------------------------------------------------

def _state_name(keypath: Sequence[Any]) -> str:
    keys = list(keypath)
    if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
        keys.pop()  # added by nnx.Variable
    parts = []
    for key in keys:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _shape_json(shape: Sequence[Any]) -> list:
    return [d if isinstance(d, int) else str(d) for d in shape]


def _leaf_json(where: str, aval: Any) -> dict:
    return {"path": where, "shape": _shape_json(aval.shape),
            "dtype": jnp.dtype(aval.dtype).name}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _versions() -> dict:
    import jaxlib

    import lepton_mm

    versions = {"lepton_mm": lepton_mm.__version__, "jax": jax.__version__,
                "jaxlib": jaxlib.__version__}
    try:
        import flax
        versions["flax"] = flax.__version__
    except ImportError:
        pass
    return versions


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomically(path: Path, files: dict[str, bytes], overwrite: bool) -> None:
    """Writes ``files`` into a fresh temp dir beside ``path``, then renames it to ``path``.

    A crash leaves either the old export (or nothing) at ``path``, plus at worst a
    ``.<name>.*.tmp`` directory beside it; never a half-written export.
    """
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent))
    old = None
    try:
        for name, data in files.items():
            _write(tmp / name, data)
        _fsync_dir(tmp)
        if path.exists():
            if not overwrite:
                raise FileExistsError(f"path: {path} exists; pass overwrite=True to replace.")
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=parent))
            os.rename(path, old / "export")
        try:
            os.rename(tmp, path)
        except OSError:
            if old is not None:
                os.rename(old / "export", path)  # put the previous export back
            raise
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def save(
    model: Any,
    example_inputs: Any,
    path: str | os.PathLike,
    *,
    forward: Callable[..., Any] | None = None,
    eval_mode: bool = True,
    platforms: Sequence[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Exports ``model``'s inference function and state to the directory ``path``.

    Args:
      model: an ``nnx.Module``. It is not modified (eval mode is set on a copy).
      example_inputs: the positional inputs of one call, as a tuple (or list); any other
        value is taken as the single input. Each is an array or a pytree of arrays
        (dicts, lists, tuples, NamedTuples such as ``EncoderOutput``); every array's
        leading axis is the batch, of the same size, and becomes symbolic. Only shapes
        and dtypes are used.
      path: the export directory to create.
      forward: ``forward(model, *inputs) -> outputs`` to export instead of
        ``model(*inputs)`` (e.g. ``lambda m, x: m.encode(x)``).
      eval_mode: call ``.eval()`` on the copy before tracing.
      platforms: e.g. ``("cpu", "cuda")``; default: the current backend only.
      overwrite: replace an existing export at ``path`` (atomically).

    Returns:
      ``Path(path)``.

    Raises:
      TypeError: ``model`` is not an NNX module, or an input/output is not an array or
        a supported container.
      ValueError: inputs have no common leading batch axis, or the model does not trace
        with a symbolic batch size.
      FileExistsError: ``path`` exists and ``overwrite`` is False.

    Examples:
      >>> import tempfile, jax.numpy as jnp
      >>> from flax import nnx
      >>> model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
      >>> directory = tempfile.mkdtemp()
      >>> saved = save(model, (jnp.zeros((4, 3)),), directory + "/linear")
      >>> load(saved)(jnp.ones((7, 3))).shape  # any batch size
      (7, 2)
    """
    from flax import nnx  # Only saving needs Flax.

    if not isinstance(model, nnx.Module):
        raise TypeError(f"model: expected an nnx.Module, got {type(model).__name__}.")
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"path: {path} exists; pass overwrite=True to replace.")
    if not isinstance(example_inputs, (tuple, list)) or _is_namedtuple(example_inputs):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    forward = forward if forward is not None else (lambda m, *xs: m(*xs))

    # Inputs: structure, leaves, a shared symbolic batch axis.
    in_structure, in_leaves = _walk(list(example_inputs), "example_inputs")
    if not in_leaves:
        raise ValueError("example_inputs: expected at least one array.")
    dims: dict[str, int] = {}
    for k, (where, leaf) in enumerate(in_leaves):
        if getattr(leaf, "ndim", 0) < 1:
            raise ValueError(f"{where}: expected a leading batch axis, got shape "
                             f"{tuple(leaf.shape)}.")
        own_axes = "".join(f" x{k}_{j}" for j in range(1, leaf.ndim))  # unbound
        check_array(where, leaf, "batch" + own_axes, dims=dims)
    (batch,) = jax.export.symbolic_shape(BATCH_DIM)
    in_specs = [jax.ShapeDtypeStruct((batch, *leaf.shape[1:]), leaf.dtype)
                for _, leaf in in_leaves]

    # State: a flat list of arrays named by their paths; PRNG keys travel as key data.
    copy = nnx.merge(*nnx.split(model))
    if eval_mode:
        copy.eval()
    graphdef, state = nnx.split(copy)
    flat, state_def = jax.tree_util.tree_flatten_with_path(state)
    weights_meta, arrays, used = [], {}, set()
    for i, (keypath, leaf) in enumerate(flat):
        name = _state_name(keypath) or f"leaf{i}"
        if name in used:
            name = f"{name}#{i}"
        used.add(name)
        leaf = jnp.asarray(leaf)
        impl = None
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            impl = str(jax.random.key_impl(leaf))
            leaf = jax.random.key_data(leaf)
        value = np.asarray(leaf)
        dtype = value.dtype.name
        if dtype not in _NATIVE:
            value = value.view(f"uint{8 * value.dtype.itemsize}")
        arrays[name] = np.array(value, order="C")  # (ascontiguousarray makes 0-d 1-d)
        weights_meta.append({"name": name, "shape": list(value.shape), "dtype": dtype,
                             "storage_dtype": value.dtype.name, "prng_impl": impl})
    weight_specs = [jax.ShapeDtypeStruct(tuple(m["shape"]), jnp.dtype(m["dtype"]))
                    for m in weights_meta]

    out_info: dict[str, Any] = {}

    def flat_forward(weights, inputs):
        leaves = [w if m["prng_impl"] is None else
                  jax.random.wrap_key_data(w, impl=m["prng_impl"])
                  for w, m in zip(weights, weights_meta, strict=True)]
        module = nnx.merge(graphdef, jax.tree_util.tree_unflatten(state_def, leaves))
        args = _build(in_structure, iter(inputs))
        outputs = forward(module, *args)
        out_info["structure"], out_leaves = _walk(outputs, "outputs")
        out_info["paths"] = [where for where, _ in out_leaves]
        return [jnp.asarray(leaf) for _, leaf in out_leaves]

    try:
        exported = jax.export.export(jax.jit(flat_forward), platforms=platforms)(
            weight_specs, in_specs)
    except _UnsupportedTree:
        raise
    except Exception as e:  # Shape-polymorphism and lowering errors.
        raise ValueError(
            f"model: exporting the forward pass with a symbolic batch size "
            f"'{BATCH_DIM}' failed ({type(e).__name__}: {e}). Shape code must not depend "
            "on the concrete batch size.") from e

    import safetensors.numpy

    module_bytes = bytes(exported.serialize())
    weights_bytes = safetensors.numpy.save(arrays)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_with": _versions(),
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "platforms": list(exported.platforms),
        "calling_convention_version": exported.calling_convention_version,
        "batch_dim": BATCH_DIM,
        "inputs": {
            "count": len(example_inputs),
            "structure": in_structure,
            "leaves": [_leaf_json(where.replace("example_inputs", "inputs", 1), spec)
                       for (where, _), spec in zip(in_leaves, in_specs, strict=True)],
        },
        "outputs": {
            "structure": out_info["structure"],
            "leaves": [_leaf_json(where, aval) for where, aval
                       in zip(out_info["paths"], exported.out_avals, strict=True)],
        },
        "weights": weights_meta,
        "files": {
            "module": {"name": MODULE_FILE, "sha256": _sha256(module_bytes),
                       "bytes": len(module_bytes)},
            "weights": {"name": WEIGHTS_FILE, "sha256": _sha256(weights_bytes),
                        "bytes": len(weights_bytes)},
        },
    }
    files = {MODULE_FILE: module_bytes, WEIGHTS_FILE: weights_bytes,
             MANIFEST_FILE: json.dumps(manifest, indent=1).encode()}
    _write_atomically(path, files, overwrite)
    return path


# --- loading -----------------------------------------------------------------------------

def _read_verified(path: Path, entry: dict) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: cannot read the exported file ({e}).") from e
    digest = _sha256(data)
    if digest != entry["sha256"]:
        raise ValueError(
            f"{path}: checksum mismatch, the file is corrupt or truncated ({len(data)} "
            f"bytes, sha256 {digest}; the manifest expects {entry['bytes']} bytes, "
            f"sha256 {entry['sha256']}).")
    return data


class ExportedModel:
    """A loaded export: call it like the model (``outputs = exported(*inputs)``).

    Attributes:
      path: the export directory.
      manifest: the parsed ``manifest.json``.
    """

    def __init__(self, path: Path, manifest: dict, exported: Any, weights: list) -> None:
        self.path = path
        self.manifest = manifest
        self._exported = exported
        self._weights = weights
        self._call = jax.jit(exported.call)
        self._in_structure = _comparable(manifest["inputs"]["structure"])

    def __repr__(self) -> str:
        return (f"ExportedModel({str(self.path)!r}, model_class="
                f"{self.manifest.get('model_class')!r}, inputs={self.input_signature()})")

    def input_signature(self) -> list[str]:
        """``["inputs[0]: float32[b, 3]", ...]``: what each call must pass."""
        return [f"{leaf['path']}: {leaf['dtype']}[{', '.join(map(str, leaf['shape']))}]"
                for leaf in self.manifest["inputs"]["leaves"]]

    def _check_inputs(self, inputs: tuple) -> list:
        count = self.manifest["inputs"]["count"]
        if len(inputs) != count:
            raise TypeError(f"inputs: expected {count} positional input(s) "
                            f"({'; '.join(self.input_signature())}), got {len(inputs)}.")
        structure, leaves = _walk(list(inputs), "inputs")
        if _comparable(structure) != self._in_structure:
            raise ValueError(
                "inputs: the structure differs from the exported one; expected "
                f"{'; '.join(self.input_signature())}, got "
                f"{'; '.join(where for where, _ in leaves)}.")
        dims: dict[str, int] = {}
        for (where, leaf), spec in zip(leaves, self.manifest["inputs"]["leaves"],
                                       strict=True):
            layout = " ".join("batch" if d == BATCH_DIM else str(d) for d in spec["shape"])
            check_array(where, leaf, layout, dims=dims, allow_empty=False)
            if jnp.dtype(leaf.dtype) != jnp.dtype(spec["dtype"]):
                raise TypeError(f"{where}: expected dtype {spec['dtype']}, got "
                                f"{jnp.dtype(leaf.dtype).name}.")
        return [leaf for _, leaf in leaves]

    def __call__(self, *inputs: Any) -> Any:
        """Runs the exported forward pass on the stored weights.

        Args:
          *inputs: as passed to ``save``'s ``example_inputs`` (same structure, dtypes and
            non-batch sizes; any batch size).

        Returns:
          The outputs, in the model's output structure (NamedTuples outside lepton_mm
          come back as ``collections.namedtuple`` classes with the same fields).

        Raises:
          TypeError, ValueError: inputs do not match the manifest; the message names the
            input and the expected shape/dtype.
        """
        leaves = self._check_inputs(inputs)
        outputs = self._call(self._weights, leaves)
        return _build(self.manifest["outputs"]["structure"], iter(outputs))


def load(path: str | os.PathLike) -> ExportedModel:
    """Loads an export written by ``save``; needs neither Flax nor the model's code.

    Args:
      path: the export directory.

    Returns:
      An ``ExportedModel``; call it with inputs shaped like ``save``'s example inputs.

    Raises:
      FileNotFoundError: no manifest at ``path``.
      ValueError: the manifest is invalid, a file fails its sha256 check (corrupt or
        truncated) or cannot be deserialised; the message names the file.

    Examples:
      >>> import tempfile, jax.numpy as jnp
      >>> from flax import nnx
      >>> saved = save(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), jnp.zeros((1, 3)),
      ...              tempfile.mkdtemp() + "/linear")
      >>> loaded = load(saved)
      >>> loaded.input_signature()
      ['inputs[0]: float32[b, 3]']
      >>> loaded(jnp.ones((2, 3))).shape
      (2, 2)
    """
    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path}: no lepton_mm export manifest here.")
    try:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format") != FORMAT:
            raise ValueError(f"format is {manifest.get('format')!r}, not {FORMAT!r}")
        if manifest.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(f"format_version {manifest['format_version']} is newer than "
                             f"this lepton_mm supports ({FORMAT_VERSION}); upgrade lepton_mm")
        files = manifest["files"]
        weights_meta = manifest["weights"]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{manifest_path}: not a valid lepton_mm export manifest ({e}).") from e

    module_path = path / files["module"]["name"]
    weights_path = path / files["weights"]["name"]
    module_bytes = _read_verified(module_path, files["module"])
    weights_bytes = _read_verified(weights_path, files["weights"])
    try:
        exported = jax.export.deserialize(bytearray(module_bytes))
    except Exception as e:
        raise ValueError(f"{module_path}: cannot deserialise the module ({e}).") from e

    import safetensors.numpy

    try:
        stored = safetensors.numpy.load(weights_bytes)
    except Exception as e:
        raise ValueError(f"{weights_path}: cannot read the weights ({e}).") from e
    weights = []
    for meta in weights_meta:
        value = stored.get(meta["name"])
        if value is None or list(value.shape) != meta["shape"] or (
                value.dtype.name != meta["storage_dtype"]):
            raise ValueError(f"{weights_path}: tensor {meta['name']!r} is missing or does "
                             "not match the manifest.")
        weights.append(jnp.asarray(value.view(jnp.dtype(meta["dtype"]))))
    return ExportedModel(path, manifest, exported, weights)
