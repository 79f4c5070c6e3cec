"""Input checks for the library boundary (private).

Every public entry point checks its arguments here *before* any JAX computation, so a
user sees ``ValueError``/``TypeError`` naming the argument and the expected layout
instead of an XLA trace or a silent broadcast. The checks only read static information
(``shape``, ``dtype``), so they are free under ``jax.jit`` and work on tracers.

Layouts are written as space-separated axis names, e.g. ``"batch time dim"``. Sharing a
``dims`` dict between calls binds axis names across arguments::

    dims = {}
    check_array("tokens", tokens, "batch time dim", kind="float", dims=dims)
    check_array("mask", mask, "batch time", kind="bool", dims=dims)  # same batch, time
"""

from __future__ import annotations

from collections.abc import Iterable, MutableMapping
from typing import Any

import numpy as np

_KINDS = {
    "float": ("floating", "a floating-point dtype (e.g. float32)"),
    "int": ("integer", "an integer dtype (e.g. int32)"),
    "bool": ("bool", "bool"),
    "number": ("number", "a numeric dtype"),
}


def _dtype_of(x: Any) -> np.dtype:
    return np.dtype(x.dtype)


def _is_kind(dtype: np.dtype, kind: str) -> bool:
    if kind == "floating":
        # bfloat16/float8 from ml_dtypes are not np.floating subclasses.
        return np.issubdtype(dtype, np.floating) or dtype.name in (
            "bfloat16", "float8_e4m3fn", "float8_e5m2", "float16")
    if kind == "integer":
        return np.issubdtype(dtype, np.integer)
    if kind == "bool":
        return dtype == np.bool_
    if kind == "number":
        return _is_kind(dtype, "floating") or np.issubdtype(dtype, np.integer)
    raise AssertionError(kind)


def format_layout(axes: list[str], dims: MutableMapping[str, int] | None = None) -> str:
    """``["batch", "time"]`` -> ``"[batch, time]"`` (with bound sizes, ``[batch=2, time]``)."""
    dims = dims or {}
    parts = []
    for a in axes:
        parts.append(f"{a}={dims[a]}" if a in dims else a)
    return "[" + ", ".join(parts) + "]"


def check_array(
    name: str,
    x: Any,
    layout: str | None = None,
    *,
    kind: str | None = None,
    dims: MutableMapping[str, int] | None = None,
    allow_empty: bool = True,
) -> None:
    """Checks that ``x`` is an array with the given layout and dtype kind.

    Args:
      name: the argument's name as the user wrote it (used in messages).
      x: a numpy array, a ``jax.Array`` or a tracer.
      layout: space-separated axis names (``"batch time dim"``); its length is the
        required rank. An axis name that is an integer literal (``"batch 3"``) requires
        that size. Axis names already in ``dims`` must match; new ones are bound.
      kind: ``"float"``, ``"int"``, ``"bool"`` or ``"number"``.
      dims: shared axis bindings (updated in place).
      allow_empty: if False, a zero-size axis raises ``ValueError``.

    Raises:
      TypeError: ``x`` is not an array, or has the wrong dtype kind.
      ValueError: ``x`` has the wrong rank or a size that disagrees with ``dims``.
    """
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        expected = f" with shape {format_layout(layout.split(), dims)}" if layout else ""
        raise TypeError(
            f"{name}: expected an array{expected}, got {type(x).__name__}.")
    if kind is not None:
        np_kind, desc = _KINDS[kind]
        dtype = _dtype_of(x)
        if not _is_kind(dtype, np_kind):
            raise TypeError(f"{name}: expected {desc}, got dtype {dtype}.")
    if layout is None:
        return
    axes = layout.split()
    shape = tuple(x.shape)
    if len(shape) != len(axes):
        raise ValueError(
            f"{name}: expected rank {len(axes)} with shape {format_layout(axes, dims)}, "
            f"got rank {len(shape)} with shape {shape}.")
    if dims is None:
        dims = {}
    for axis, size in zip(axes, shape, strict=True):
        if axis.isdigit():
            want = int(axis)
        elif axis in dims:
            want = dims[axis]
        else:
            dims[axis] = size
            want = size
        if size != want:
            raise ValueError(
                f"{name}: expected shape {format_layout(axes, dims)}, got {shape} "
                f"(axis '{axis}' should be {want}, got {size}).")
        if not allow_empty and size == 0:
            raise ValueError(f"{name}: axis '{axis}' is empty in shape {shape}.")


def check_positive_int(name: str, value: Any) -> int:
    """Returns ``value`` if it is a positive Python int, else raises naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}.")
    return int(value)


def check_frame_mask(name: str, mask: Any, x: Any, data_name: str) -> None:
    """Checks a frame mask: bool ``[batch, time]``, the first two axes of ``x``.

    Args:
      name: the mask's name, for messages.
      mask: the mask.
      x: the data it masks, ``[batch, time, ...]``.
      data_name: the data's name, for messages.

    Raises:
      TypeError: not a bool array.
      ValueError: its shape is not ``x.shape[:2]``.
    """
    check_array(name, mask, kind="bool")
    if tuple(mask.shape) != tuple(x.shape[:2]):
        raise ValueError(f"{name}: expected bool [batch, time] = {tuple(x.shape[:2])} (the "
                         f"first two axes of {data_name}), got shape {tuple(mask.shape)}.")


def check_key(key: Any, name: str = "key") -> Any:
    """A single typed PRNG key from a typed key or legacy ``uint32 [2]`` key data.

    Args:
      key: ``jax.random.key(seed)`` (shape ``()``) or ``jax.random.PRNGKey(seed)``.
      name: the argument's name, for messages.

    Returns:
      The typed key (legacy key data wrapped).

    Raises:
      TypeError: not a key, or an array of another dtype / shape.
      ValueError: a typed key array with more than one key.
    """
    import jax

    if not hasattr(key, "dtype") or not hasattr(key, "shape"):
        raise TypeError(f"{name}: expected a PRNG key (jax.random.key(seed)), got "
                        f"{type(key).__name__}.")
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ValueError(f"{name}: expected a single PRNG key (shape ()), got a key "
                             f"array of shape {key.shape} (split it and pass one key).")
        return key
    if np.dtype(key.dtype) == np.uint32 and tuple(key.shape) == (2,):
        return jax.random.wrap_key_data(key)
    raise TypeError(f"{name}: expected a PRNG key (jax.random.key(seed) or a uint32[2] "
                    f"legacy key), got dtype {np.dtype(key.dtype)} shape {tuple(key.shape)}.")


def check_ids_in_range(name: str, ids: Any, mask: Any, upper: int) -> None:
    """Raises if a concrete ``ids`` has a valid-position entry outside ``[0, upper)``."""
    import jax

    if isinstance(ids, jax.core.Tracer) or isinstance(mask, jax.core.Tracer):
        return
    ids = np.asarray(ids)
    valid = ids[np.asarray(mask)]
    if valid.size and (valid.min() < 0 or valid.max() >= upper):
        raise ValueError(
            f"{name}: ids must lie in [0, {upper}) at valid positions, got values in "
            f"[{valid.min()}, {valid.max()}].")


def check_modalities(name: str, modalities: str | Iterable[Any],
                     known: Iterable[str]) -> tuple[str, ...]:
    """The modality names in ``modalities``, if each is one of ``known``.

    The one check that a user-given modality exists (in a model's ``encoders``, an
    environment's observations, ...); its message names the argument, every unknown
    name and the known ones: ``modalities: unknown modality 'text'. Known: ['audio',
    'image'].``

    Args:
      name: the argument's name as the user wrote it (used in messages).
      modalities: modality names; a single str is one name.
      known: the valid names (e.g. ``model.encoders``, a mapping's keys).

    Returns:
      The names as a tuple, in the given order.

    Raises:
      TypeError: a name is not a str.
      ValueError: a name is not one of ``known``.
    """
    names = (modalities,) if isinstance(modalities, str) else tuple(modalities)
    for m in names:
        if not isinstance(m, str):
            raise TypeError(f"{name}: expected modality names (str), got {m!r}.")
    known = sorted(known)
    unknown = list(dict.fromkeys(m for m in names if m not in known))
    if unknown:
        which = (f"modality {unknown[0]!r}" if len(unknown) == 1
                 else f"modalities {unknown}")
        raise ValueError(f"{name}: unknown {which}. Known: {known}.")
    return names
