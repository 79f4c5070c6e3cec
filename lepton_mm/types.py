"""Core types shared by every part of the library.

``EncoderOutput`` is the one interface between encoders and fusion layers: any fusion
layer accepts any encoder's output.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lepton_mm._validation import check_array

Array = jax.Array

#: Batch keys that are not modalities: ``label``, ``present`` (per-modality presence),
#: ``valid`` (padding rows).
RESERVED_KEYS = ("label", "present", "valid")


def masked_mean(x: Array, mask: Array) -> Array:
    """Mean of ``x`` over its second axis, counting only positions where ``mask`` is True.

    Args:
      x: float ``[batch, time, dim]``.
      mask: bool ``[batch, time]`` (True = valid).

    Returns:
      float ``[batch, dim]``. Rows whose mask is all False give zeros (not NaN), and
      masked positions never influence the result, even if they hold NaN or Inf.

    Examples:
      >>> import jax.numpy as jnp
      >>> x = jnp.array([[[1.0], [3.0], [100.0]]])
      >>> masked_mean(x, jnp.array([[True, True, False]])).tolist()
      [[2.0]]
    """
    dims: dict[str, int] = {}
    check_array("x", x, "batch time dim", kind="float", dims=dims)
    check_array("mask", mask, "batch time", kind="bool", dims=dims)
    total = jnp.sum(jnp.where(mask[..., None], x, 0), axis=1)
    count = jnp.sum(mask, axis=1, dtype=x.dtype)[:, None]
    return total / jnp.maximum(count, 1)


class EncoderOutput(NamedTuple):
    """What every encoder returns and every fusion layer consumes.

    A NamedTuple, hence a JAX pytree: it passes through ``jax.jit``, ``jax.vmap`` and
    ``nnx.grad`` unchanged.

    Attributes:
      tokens: float ``[batch, time, dim]``: a sequence of feature vectors (image
        patches/feature-map cells, text tokens, spectrogram frames).
      mask: bool ``[batch, time]``: True where a token is valid. A row that is all False
        means the modality is absent for that example.
      pooled: float ``[batch, dim]``: one vector per example, the masked mean of
        ``tokens`` unless the encoder documents otherwise; zeros for absent examples.
    """

    tokens: Array
    mask: Array
    pooled: Array

    @classmethod
    def from_tokens(cls, tokens: Array, mask: Array | None = None) -> EncoderOutput:
        """Builds an output whose ``pooled`` is the masked mean of ``tokens``.

        Args:
          tokens: float ``[batch, time, dim]``.
          mask: bool ``[batch, time]``; all True when omitted.

        Returns:
          An ``EncoderOutput`` with ``pooled = masked_mean(tokens, mask)`` and masked
          token positions set to zero.
        """
        check_array("tokens", tokens, "batch time dim", kind="float")
        if mask is None:
            mask = jnp.ones(tokens.shape[:2], dtype=bool)
        check_array("mask", mask, f"{tokens.shape[0]} {tokens.shape[1]}", kind="bool")
        tokens = jnp.where(mask[..., None], tokens, 0)
        return cls(tokens=tokens, mask=mask, pooled=masked_mean(tokens, mask))

    @property
    def batch_size(self) -> int:
        """Number of examples (the leading axis)."""
        return self.tokens.shape[0]

    @property
    def dim(self) -> int:
        """Feature size of ``tokens`` and ``pooled``."""
        return self.tokens.shape[-1]

    @property
    def present(self) -> Array:
        """bool ``[batch]``: True where the modality is present (any valid token)."""
        return jnp.any(self.mask, axis=1)

    def validate(self, name: str = "EncoderOutput") -> EncoderOutput:
        """Checks shapes and dtypes; returns ``self``. Raises naming ``name``.

        Args:
          name: how to call this output in error messages (e.g. the modality name).

        Returns:
          ``self``, unchanged.
        """
        dims: dict[str, int] = {}
        check_array(f"{name}.tokens", self.tokens, "batch time dim", kind="float", dims=dims)
        check_array(f"{name}.mask", self.mask, "batch time", kind="bool", dims=dims)
        check_array(f"{name}.pooled", self.pooled, "batch dim", kind="float", dims=dims)
        return self
