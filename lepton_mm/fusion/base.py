"""The contract every fusion layer follows, and the registry of fusion layers.

A fusion layer is built as ``Fusion(dims, out_dim, *, rngs, **hyperparameters)`` where
``dims`` maps modality name → the feature size of that modality's ``EncoderOutput``, and
called as ``fusion(inputs) -> [batch, out_dim]`` with ``inputs`` a mapping from modality
name to ``EncoderOutput``. Modalities are processed in sorted name order, so parameter
trees and results never depend on dict order.

Missing modalities: an example whose mask row for a modality is all False has that
modality absent; its output must not depend on that modality's tokens or pooled values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import FrozenDict

from lepton_mm._validation import check_array
from lepton_mm.types import EncoderOutput

#: Registry name → fusion layer class (filled by ``register``).
FUSIONS: dict[str, type[FusionLayer]] = {}

_T = TypeVar("_T", bound=type)


def register(name: str) -> Callable[[_T], _T]:
    """Class decorator adding a fusion layer to ``FUSIONS`` under ``name``.

    Args:
      name: the registry name (``build(name, ...)`` then constructs the class).

    Returns:
      A decorator that registers the class, sets ``cls.name`` and returns the class.

    Raises:
      ValueError: ``name`` is already registered.
    """

    def wrap(cls: _T) -> _T:
        if name in FUSIONS:
            raise ValueError(f"fusion name {name!r} is already registered.")
        FUSIONS[name] = cls
        cls.name = name
        return cls

    return wrap


def build(name: str, dims: Mapping[str, int], out_dim: int, *, rngs: nnx.Rngs,
          **kwargs: Any) -> FusionLayer:
    """Builds the fusion layer registered as ``name``.

    Args:
      name: a key of ``FUSIONS`` (e.g. ``"concat"``, ``"low_rank"``).
      dims: modality name → feature dim of that modality's ``EncoderOutput``.
      out_dim: size of the fused output.
      rngs: parameter initialisation (and dropout) randomness.
      **kwargs: the layer's own hyperparameters.

    Returns:
      The layer, mapping ``{modality: EncoderOutput}`` → float ``[batch, out_dim]``.

    Raises:
      ValueError: unknown ``name`` (the message lists the known names).
    """
    if name not in FUSIONS:
        raise ValueError(f"Unrecognized fusion: {name!r}. Known fusions: {sorted(FUSIONS)}.")
    return FUSIONS[name](dims, out_dim, rngs=rngs, **kwargs)


class FusionLayer(nnx.Module):
    """Base class: validates ``dims`` at construction and inputs at call time.

    Subclasses call ``super().__init__(dims, out_dim)`` first, then read
    ``self.modalities`` (sorted names) and ``self.dims`` (name → dim), and begin
    ``__call__`` with ``xs = self.check_inputs(inputs)`` (a tuple of ``EncoderOutput`` in
    ``self.modalities`` order).

    Attributes:
      name: the registry name (set by ``register``).
      modalities: tuple of modality names, sorted.
      dims: dict modality → feature dim.
      out_dim: output size.
    """

    name: str = "fusion"
    min_modalities: int = 2
    max_modalities: int | None = None

    def __init__(self, dims: Mapping[str, int], out_dim: int):
        if not isinstance(dims, Mapping):
            raise TypeError(
                f"dims: expected a mapping modality name -> feature dim, got "
                f"{type(dims).__name__}.")
        for m, d in dims.items():
            if not isinstance(m, str):
                raise TypeError(f"dims: modality names must be str, got {m!r}.")
            if isinstance(d, bool) or not isinstance(d, int) or d <= 0:
                raise ValueError(f"dims[{m!r}]: expected a positive int, got {d!r}.")
        n = len(dims)
        cls = type(self).__name__
        if n < self.min_modalities:
            raise ValueError(
                f"dims: {cls} needs at least {self.min_modalities} modalities, got {n} "
                f"({sorted(dims)}).")
        if self.max_modalities is not None and n > self.max_modalities:
            raise ValueError(
                f"dims: {cls} is defined for at most {self.max_modalities} modalities, "
                f"got {n} ({sorted(dims)}).")
        if isinstance(out_dim, bool) or not isinstance(out_dim, int) or out_dim <= 0:
            raise ValueError(f"out_dim: expected a positive int, got {out_dim!r}.")
        self.modalities = tuple(sorted(dims))
        # Hashable, so the module graph can be a static jit argument (cache hits).
        self.dims = FrozenDict({m: int(dims[m]) for m in self.modalities})
        self.out_dim = int(out_dim)

    def check_inputs(self, inputs: Mapping[str, EncoderOutput]) -> tuple[EncoderOutput, ...]:
        """Validates ``inputs`` against the constructor's ``dims``.

        Args:
          inputs: modality name → ``EncoderOutput`` with tokens ``[batch, time_m, dim_m]``,
            mask ``[batch, time_m]`` and pooled ``[batch, dim_m]``; ``time_m`` may differ
            between modalities, ``batch`` may not.

        Returns:
          The outputs as a tuple in ``self.modalities`` order.

        Raises:
          ValueError: a missing or unexpected modality, or tokens / mask / pooled of the
            wrong shape (the message names the modality and the expected shape).
          TypeError: ``inputs`` is not a mapping, a value is not an ``EncoderOutput``, or
            an array has the wrong dtype.
        """
        if not isinstance(inputs, Mapping):
            raise TypeError(
                f"inputs: expected a mapping modality name -> EncoderOutput, got "
                f"{type(inputs).__name__}.")
        missing = [m for m in self.modalities if m not in inputs]
        if missing:
            raise ValueError(
                f"inputs: missing modality {missing[0]!r}; {type(self).__name__} was built "
                f"for {list(self.modalities)} (mark an absent modality with an all-False "
                "mask row instead of leaving it out).")
        extra = sorted(set(inputs) - set(self.modalities))
        if extra:
            raise ValueError(
                f"inputs: unexpected modality {extra[0]!r}; {type(self).__name__} was built "
                f"for {list(self.modalities)}.")
        batch: dict[str, int] = {}
        out = []
        for m in self.modalities:
            x = inputs[m]
            if not isinstance(x, EncoderOutput):
                raise TypeError(
                    f"inputs[{m!r}]: expected an EncoderOutput, got {type(x).__name__}.")
            dims = {"dim": self.dims[m]}
            if batch:
                dims["batch"] = batch["batch"]
            try:
                check_array(f"inputs[{m!r}].tokens", x.tokens, "batch time dim",
                            kind="float", dims=dims)
                check_array(f"inputs[{m!r}].mask", x.mask, "batch time", kind="bool",
                            dims=dims)
                check_array(f"inputs[{m!r}].pooled", x.pooled, "batch dim", kind="float",
                            dims=dims)
            except ValueError as e:
                if batch and "'batch'" in str(e):
                    raise ValueError(
                        f"{e} All modalities must share the batch size "
                        f"({batch['batch']}, from {self.modalities[0]!r}).") from None
                raise
            batch.setdefault("batch", dims["batch"])
            out.append(x)
        return tuple(out)

    def presence(self, xs: tuple[EncoderOutput, ...]) -> jax.Array:
        """bool ``[batch, num_modalities]``: True where a modality is present."""
        return jnp.stack([x.present for x in xs], axis=1)
