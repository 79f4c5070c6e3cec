"""Modality dropout: randomly mark whole modalities absent, per example, during training.

References:
  Neverova, Wolf, Taylor and Nebout, "ModDrop: Adaptive Multi-modal Gesture
  Recognition", IEEE TPAMI 2016.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from lepton_mm._validation import check_key, check_positive_int
from lepton_mm.fusion._common import check_rate
from lepton_mm.types import EncoderOutput

Array = jax.Array


def modality_dropout(
    inputs: Mapping[str, EncoderOutput],
    rate: float,
    *,
    key: Array,
    min_present: int = 1,
) -> dict[str, EncoderOutput]:
    """Drops each present modality of each example with probability ``rate``.

    A dropped modality gets an all-False mask row and zero tokens and pooled features for
    that example, i.e. it becomes absent in the sense every fusion layer understands.
    Each (example, modality) pair is dropped independently with probability ``rate``,
    except that each example always keeps ``min(min_present, number present in the
    input)`` of the modalities it had: when the independent draws would leave fewer,
    the dropped ones with the highest priority are kept again. (One uniform draw per
    pair serves as both the drop decision, ``u < rate``, and the priority, ``u``; kept
    modalities always outrank dropped ones, so the result keeps exactly
    ``max(#kept, min(min_present, #present))``.) Hence the marginal drop rate is
    slightly below ``rate`` when ``min_present`` binds. Modalities already absent stay
    untouched, and an example with fewer than ``min_present`` present modalities keeps
    them all.

    A pure function for training only: call it inside the training step with a fresh
    key (e.g. ``jax.random.fold_in(key, step)``) and skip it at evaluation. It is
    jit-safe (``rate`` and ``min_present`` are static Python numbers) and the draws do
    not depend on the order of ``inputs`` (they are made in sorted name order).

    Args:
      inputs: modality name → ``EncoderOutput``, all with the same batch size.
      rate: drop probability per modality and example, in [0, 1). 0 returns the inputs
        unchanged.
      key: a PRNG key (``jax.random.key(seed)`` or a legacy ``uint32[2]`` key).
      min_present: at least this many originally present modalities are kept per
        example (>= 1).

    Returns:
      A dict with the same keys in the same order as ``inputs``.

    Raises:
      TypeError / ValueError: bad ``rate``, ``min_present`` or ``key``, inputs that are
        not ``EncoderOutput``s, or inconsistent batch sizes.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from lepton_mm.types import EncoderOutput
      >>> xs = {m: EncoderOutput.from_tokens(jnp.ones((4, 3, 2))) for m in ("a", "b")}
      >>> out = modality_dropout(xs, 0.5, key=jax.random.key(0))
      >>> present = jnp.stack([out[m].present for m in ("a", "b")], axis=1)
      >>> bool(jnp.all(jnp.any(present, axis=1)))
      True
    """
    if not isinstance(inputs, Mapping):
        raise TypeError(f"inputs: expected a mapping modality name -> EncoderOutput, got "
                        f"{type(inputs).__name__}.")
    if not inputs:
        raise ValueError("inputs: expected at least one modality, got an empty mapping.")
    rate = check_rate("rate", rate)
    min_present = check_positive_int("min_present", min_present)
    check_key(key)
    names = sorted(inputs)
    batch = None
    for m in names:
        x = inputs[m]
        if not isinstance(x, EncoderOutput):
            raise TypeError(f"inputs[{m!r}]: expected an EncoderOutput, got "
                            f"{type(x).__name__}.")
        x.validate(f"inputs[{m!r}]")
        if batch is None:
            batch = (m, x.batch_size)
        elif x.batch_size != batch[1]:
            raise ValueError(
                f"inputs[{m!r}]: batch size {x.batch_size} differs from inputs[{batch[0]!r}]"
                f" ({batch[1]}); all modalities must share the batch size.")
    if rate == 0.0:
        return dict(inputs)

    dropped = _drop_rows(tuple(inputs[m] for m in names), key, rate, min_present)
    return {m: dropped[names.index(m)] for m in inputs}


@functools.partial(jax.jit, static_argnames=("rate", "min_present"))
def _drop_rows(xs: tuple[EncoderOutput, ...], key: Array, rate: float,
               min_present: int) -> tuple[EncoderOutput, ...]:
    """The vectorised core of ``modality_dropout`` (``xs`` in sorted name order)."""
    present = jnp.stack([x.present for x in xs], axis=1)  # [batch, M]
    u = jax.random.uniform(key, present.shape)  # priorities; u < rate means "drop"
    # rank[b, i] = how many present modalities outrank modality i (higher u; ties by
    # position), so the top-k present modalities are those with rank < k.
    idx = jnp.arange(len(xs))
    higher = (u[:, None, :] > u[:, :, None]) | (
        (u[:, None, :] == u[:, :, None]) & (idx[None, None, :] < idx[None, :, None]))
    rank = jnp.sum(higher & present[:, None, :], axis=2)
    keep = present & ((u >= rate) | (rank < min_present))
    dropped = present & ~keep
    return tuple(
        EncoderOutput(
            tokens=jnp.where(dropped[:, i, None, None], 0.0, x.tokens).astype(x.tokens.dtype),
            mask=x.mask & ~dropped[:, i, None],
            pooled=jnp.where(dropped[:, i, None], 0.0, x.pooled).astype(x.pooled.dtype),
        )
        for i, x in enumerate(xs))
