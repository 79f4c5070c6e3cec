"""Parameterised pieces of a two-tower model: projection heads and the learned temperature.

``ProjectionHead`` maps one modality's features into the shared embedding space;
``LogitScale`` holds the learned temperature (and SigLIP's bias) whose values the pure
losses in ``lepton_mm.alignment.losses`` take.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lepton_mm._validation import check_array, check_positive_int
from lepton_mm.alignment.losses import _l2_normalize

Array = jax.Array


def _hidden_sizes(hidden: int | Sequence[int] | None) -> tuple[int, ...]:
    if hidden is None:
        return ()
    if isinstance(hidden, int) and not isinstance(hidden, bool):
        return (check_positive_int("hidden", hidden),)
    if isinstance(hidden, Sequence) and not isinstance(hidden, str):
        return tuple(check_positive_int(f"hidden[{i}]", h) for i, h in enumerate(hidden))
    raise TypeError(f"hidden: expected None, an int or a sequence of ints, got {hidden!r}.")


class ProjectionHead(nnx.Module):
    """Linear map or MLP into a shared embedding space, optionally L2-normalised.

    ``hidden=None`` gives one ``Linear(in_dim, out_dim)``; ``hidden=512`` or
    ``hidden=(512, 512)`` gives an MLP ``Linear → GELU → dropout → ... → Linear`` (exact
    GELU). With ``hidden=None`` the dropout, if any, is applied to the input. The output
    is L2-normalised over its last axis (in float32) when ``normalize``; a zero vector
    stays zero instead of becoming NaN.

    Args:
      in_dim: input feature size.
      out_dim: size of the shared space.
      rngs: ``nnx.Rngs`` for initialisation (``params``) and, in training mode, dropout.
      hidden: ``None``, an int, or a sequence of ints: the MLP's hidden sizes.
      dropout: dropout rate in ``[0, 1)``. Active after ``model.train()`` (the default
        mode), disabled by ``model.eval()``.
      normalize: L2-normalise the output.
      dtype: compute dtype of the linear layers (parameters stay float32).

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> head = ProjectionHead(6, 4, hidden=8, rngs=nnx.Rngs(0))
      >>> z = head(jnp.ones((2, 5, 6)))
      >>> z.shape, bool(jnp.allclose(jnp.linalg.norm(z, axis=-1), 1.0))
      ((2, 5, 4), True)
    """

    def __init__(self, in_dim: int, out_dim: int, *, rngs: nnx.Rngs,
                 hidden: int | Sequence[int] | None = None, dropout: float = 0.0,
                 normalize: bool = True, dtype: jnp.dtype | None = None):
        self.in_dim = check_positive_int("in_dim", in_dim)
        self.out_dim = check_positive_int("out_dim", out_dim)
        self.hidden = _hidden_sizes(hidden)
        if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a rate in [0, 1), got {dropout!r}.")
        self.normalize = bool(normalize)
        sizes = (self.in_dim, *self.hidden, self.out_dim)
        self.layers = nnx.List([
            nnx.Linear(i, o, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
            for i, o in itertools.pairwise(sizes)])
        self.dropout = nnx.Dropout(float(dropout), rngs=rngs)

    def __call__(self, x: Array, *, rngs: nnx.Rngs | None = None) -> Array:
        """Projects ``x``.

        Args:
          x: float ``[batch, in_dim]`` or ``[batch, time, in_dim]``.
          rngs: dropout randomness in training mode; defaults to the stream given at
            construction.

        Returns:
          ``[batch, out_dim]`` or ``[batch, time, out_dim]``; unit-norm rows (float32) if
          ``normalize``, else in the compute dtype.
        """
        check_array("x", x, kind="float")
        if x.ndim not in (2, 3) or x.shape[-1] != self.in_dim:
            raise ValueError(f"x: expected shape [batch, in_dim={self.in_dim}] or [batch, "
                             f"time, in_dim={self.in_dim}], got {tuple(x.shape)}.")
        if not self.hidden:
            x = self.dropout(x, rngs=rngs)
        for layer in self.layers[:-1]:
            x = self.dropout(jax.nn.gelu(layer(x), approximate=False), rngs=rngs)
        x = self.layers[-1](x)
        return _l2_normalize(x) if self.normalize else x


class LogitScale(nnx.Module):
    """Learned temperature (and optional bias) for contrastive and sigmoid losses.

    The scale is stored as its logarithm, ``log_scale`` (float32), and read as
    ``t = exp(clip(log_scale, 0, log(max_scale)))``: the CLIP/TorchMultimodal
    parametrisation, whose clamp keeps ``t`` in ``[1, max_scale]`` (the gradient is zero
    outside that range). The bias, if any, is a plain float32 parameter.

    * CLIP: ``LogitScale()`` (``t = 1/0.07``, no bias).
    * SigLIP: ``LogitScale(init_scale=10.0, init_bias=-10.0)`` (``t' = log 10``,
      ``b = −10``).

    Args:
      init_scale: initial ``t`` (not its log), in ``[1, max_scale]``.
      init_bias: initial bias, or ``None`` for no bias parameter.
      max_scale: upper clamp of ``t`` (CLIP uses 100).
      rngs: accepted for a uniform constructor signature; unused (the initial values
        are deterministic).

    Examples:
      >>> scale, bias = LogitScale(init_scale=10.0, init_bias=-10.0)()
      >>> round(float(scale), 4), float(bias)
      (10.0, -10.0)
      >>> LogitScale()()[1] is None
      True

    References:
      Radford et al., "Learning Transferable Visual Models From Natural Language
      Supervision", ICML 2021. https://arxiv.org/abs/2103.00020
      Zhai et al., "Sigmoid Loss for Language Image Pre-Training", ICCV 2023.
      https://arxiv.org/abs/2303.15343
    """

    def __init__(self, *, init_scale: float = 1.0 / 0.07, init_bias: float | None = None,
                 max_scale: float = 100.0, rngs: nnx.Rngs | None = None):
        del rngs
        for name, value in (("init_scale", init_scale), ("max_scale", max_scale)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name}: expected a float, got {value!r}.")
        if not max_scale >= 1.0:
            raise ValueError(f"max_scale: expected a float >= 1, got {max_scale!r}.")
        if not 1.0 <= init_scale <= max_scale:
            raise ValueError(
                f"init_scale: expected a float in [1, max_scale={max_scale}], got "
                f"{init_scale!r} (the clamp would override it).")
        if init_bias is not None and (
                isinstance(init_bias, bool) or not isinstance(init_bias, (int, float))):
            raise TypeError(f"init_bias: expected a float or None, got {init_bias!r}.")
        self.max_log_scale = math.log(max_scale)
        self.log_scale = nnx.Param(jnp.asarray(math.log(init_scale), dtype=jnp.float32))
        self.bias = (None if init_bias is None
                     else nnx.Param(jnp.asarray(init_bias, dtype=jnp.float32)))

    def __call__(self) -> tuple[Array, Array | None]:
        """Reads the clamped temperature and the bias.

        Returns:
          ``(scale, bias)``: float32 scalars, ``scale = exp(clip(log_scale, 0,
          log(max_scale)))``; ``bias`` is ``None`` when the holder has none.
        """
        scale = jnp.exp(jnp.clip(self.log_scale[...], 0.0, self.max_log_scale))
        return scale, (None if self.bias is None else self.bias[...])
