"""A CNN over log-mel spectrograms that returns one token per (pooled) time step.

Padded frames are exactly inert: every valid output depends only on valid input frames,
so padding a clip (with any values, even NaN) leaves its tokens and pooled vector
unchanged.

References:
  Liang et al., "MultiBench: Multiscale Benchmarks for Multimodal Representation
  Learning", NeurIPS 2021 (AV-MNIST audio encoder ``LeNet(1, 12, 5)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lepton_mm._validation import check_array, check_positive_int
from lepton_mm.encoders._conv import (
    MaskedBatchNorm,
    check_float_input,
    check_widths,
    conv_block,
    conv_kernel_init,
    masked_max_pool_time,
    max_pool_ceil,
    per_layer,
    to_channels_first,
)
from lepton_mm.types import EncoderOutput

Array = jax.Array

_DTYPE_HINT = "Pass float log-mel features (e.g. float32), not integer or complex data."


class AudioSpectrogramCNN(nnx.Module):
    """2-D CNN over a log-mel spectrogram seen as a one-channel ``[time, freq]`` image.

    Block ``i``: zero the masked frames; ``kernel_sizes[i]`` x ``kernel_sizes[i]``
    convolution with "same" zero padding (no bias when ``batch_norm``); batch norm whose
    statistics use valid frames only; ReLU; max pooling by ``time_pool[i]`` along time
    and by 2 along frequency while more than one bin is left; dropout. After the last
    block the remaining frequency bins are averaged, giving one ``widths[-1]`` vector
    per pooled time step, projected to ``dim`` only when ``dim != widths[-1]``.

    Masking is exact by construction, in eval and training mode alike:
      * masked frames are replaced by zeros (``jnp.where``, so NaN/Inf cannot leak)
        before every convolution, which is what "same" padding feeds at the edges of an
        unpadded clip;
      * time pooling pads time with masked frames up to a multiple of the window,
        treats masked frames as ``-inf`` and marks an output valid iff any frame in its
        window is; windows start at frame 0, so a clip and its padded copy share them;
      * batch statistics are computed over valid positions only;
      * output tokens are zero where masked and pooled is the masked mean.
    Frequency pooling keeps partial windows (ceil), so no mel bin is dropped. An
    example whose mask is all False gives zero tokens, an all-False mask and a zero
    pooled vector.

    The module starts in training mode: call ``model.eval()`` for inference.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> model = AudioSpectrogramCNN(64, dim=32, widths=(8, 16), rngs=nnx.Rngs(0))
      >>> model.eval()
      >>> out = model(jnp.zeros((2, 100, 64)), jnp.arange(100)[None, :] < jnp.array([[100], [37]]))
      >>> out.tokens.shape, out.mask.sum(axis=1).tolist()
      ((2, 25, 32), [25, 10])
    """

    def __init__(
        self,
        n_mels: int,
        *,
        dim: int,
        rngs: nnx.Rngs,
        widths: Sequence[int] = (32, 64, 128),
        kernel_sizes: int | Sequence[int] = 3,
        time_pool: int | Sequence[int] = 2,
        batch_norm: bool = True,
        dropout: float = 0.0,
        dtype: Any = None,
    ):
        """Builds the encoder.

        The defaults (three blocks, widths 32, 64, 128, time pooled by 2 in each) turn
        ``[time, 64]`` log-mels into ``ceil(time / 8)`` tokens.

        Args:
          n_mels: number of mel bins (the last input axis).
          dim: size of each output token; a linear projection is added iff it differs
            from ``widths[-1]``.
          rngs: parameter initialisation and the dropout stream.
          widths: output channels of each conv block; its length is the depth.
          kernel_sizes: square kernel size, one for all blocks or one per block.
          time_pool: max-pooling window (= stride) along time, one for all blocks or
            one per block; 1 keeps the time resolution. The token count is
            ``ceil(time / prod(time_pool))`` (applied block by block).
          batch_norm: masked batch norm after every convolution (and no conv bias).
          dropout: dropout rate after every block (training mode only).
          dtype: computation dtype (e.g. ``jnp.bfloat16``); parameters stay float32.
        """
        self.n_mels = check_positive_int("n_mels", n_mels)
        self.dim = check_positive_int("dim", dim)
        self.widths = check_widths(widths)
        depth = len(self.widths)
        self.kernel_sizes = per_layer("kernel_sizes", kernel_sizes, depth)
        self.time_pool = per_layer("time_pool", time_pool, depth)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a rate in [0, 1), got {dropout!r}.")
        self.batch_norm = bool(batch_norm)

        freq_pool, freq = [], self.n_mels
        for _ in range(depth):
            freq_pool.append(2 if freq > 1 else 1)
            freq = -(-freq // freq_pool[-1])
        self.freq_pool = tuple(freq_pool)

        ins = (1, *self.widths[:-1])
        self.convs = nnx.List([
            nnx.Conv(c_in, c_out, (k, k), padding="SAME", use_bias=not self.batch_norm,
                     kernel_init=conv_kernel_init, dtype=dtype, rngs=rngs)
            for c_in, c_out, k in zip(ins, self.widths, self.kernel_sizes, strict=True)
        ])
        self.norms = nnx.List([MaskedBatchNorm(c, dtype=dtype) for c in self.widths]
                              ) if self.batch_norm else None
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None
        self.proj = (nnx.Linear(self.widths[-1], self.dim, dtype=dtype, rngs=rngs)
                     if self.dim != self.widths[-1] else None)

    @classmethod
    def lenet(
        cls,
        n_mels: int = 64,
        *,
        channels: int = 12,
        additional_layers: int = 5,
        dim: int | None = None,
        time_pool: int | Sequence[int] = 2,
        dropout: float = 0.0,
        dtype: Any = None,
        rngs: nnx.Rngs,
    ) -> AudioSpectrogramCNN:
        """MultiBench's AV-MNIST audio encoder ``LeNet(1, 12, 5)``, adapted to log-mels.

        A 5x5 conv to ``channels`` then ``additional_layers`` 3x3 convs doubling the
        width (12, 24, 48, 96, 192, 384 by default), each bias-free with batch norm,
        ReLU and 2x2 max pooling, as in MultiBench. Differences: frequency is pooled only
        while more than one bin is left (64 mels reach exactly 1 after six blocks; more
        mels are averaged at the end), time keeps its own pooling (``time_pool``) and
        becomes the token axis instead of being pooled away. A ``[126, 64]`` log-mel
        gives ``ceil(126 / 64) = 2`` tokens of size 384; pass e.g.
        ``time_pool=(2, 2, 2, 1, 1, 1)`` for 16 tokens. Parameters (default):
        ``25 * 1 * 12 + 9 * sum(c_{i-1} * c_i) + 2 * sum(c_i)`` = 885,684.

        Args:
          n_mels: number of mel bins.
          channels: width of the first block.
          additional_layers: number of 3x3 blocks after the first.
          dim: token size; defaults to the last width (no projection).
          time_pool: time pooling per block (one int for all).
          dropout: dropout after every block (MultiBench uses none).
          dtype: computation dtype.
          rngs: parameter initialisation and the dropout stream.

        Returns:
          An ``AudioSpectrogramCNN`` in training mode.
        """
        channels = check_positive_int("channels", channels)
        if isinstance(additional_layers, bool) or not isinstance(
                additional_layers, int) or additional_layers < 0:
            raise ValueError(
                f"additional_layers: expected an int >= 0, got {additional_layers!r}.")
        widths = tuple(channels * 2**i for i in range(additional_layers + 1))
        return cls(
            n_mels, dim=widths[-1] if dim is None else dim, rngs=rngs, widths=widths,
            kernel_sizes=(5,) + (3,) * additional_layers, time_pool=time_pool,
            batch_norm=True, dropout=dropout, dtype=dtype)

    def output_length(self, time: int) -> int:
        """Number of output tokens for ``time`` input frames."""
        for p in self.time_pool:
            time = -(-time // p)
        return time

    def __call__(
        self,
        log_mel: Array,
        mask: Array | None = None,
        *,
        rngs: nnx.Rngs | None = None,
    ) -> EncoderOutput:
        """Encodes a batch of (possibly padded) log-mel spectrograms.

        Args:
          log_mel: float ``[batch, time, n_mels]``. Values at masked frames are never
            read (they may be NaN).
          mask: bool ``[batch, time]``, True for real frames; all True when omitted.
          rngs: dropout randomness for this call; the stream given at construction is
            used when omitted. Ignored in eval mode or without dropout.

        Returns:
          ``EncoderOutput`` with tokens float ``[batch, time', dim]`` (zero where
          masked), mask bool ``[batch, time']`` (a token is valid iff its receptive
          window along time holds a valid frame) and pooled float ``[batch, dim]``, the
          masked mean of the tokens. ``time' = self.output_length(time)``.

        Raises:
          TypeError: ``log_mel`` is not float, or ``mask`` is not bool.
          ValueError: wrong rank, wrong ``n_mels``, empty axes, or a ``mask`` whose
            shape differs from ``log_mel.shape[:2]``.
        """
        dims = {"n_mels": self.n_mels}
        check_float_input("log_mel", log_mel, "batch time n_mels", dims, _DTYPE_HINT)
        if mask is not None:
            check_array("mask", mask, "batch time", kind="bool", dims=dims)

        tokens, mask = self._tokens(log_mel, mask, rngs=rngs, fused=True)
        if self.proj is not None:
            tokens = self.proj(tokens)
        return EncoderOutput.from_tokens(tokens, mask)

    def _tokens(self, log_mel: Array, mask: Array | None, *, rngs: nnx.Rngs | None,
                fused: bool) -> tuple[Array, Array]:
        """Frequency-averaged last block output ``[batch, time', widths[-1]]`` and its
        mask (no projection). ``mask`` None means every frame is real.

        ``fused=True`` (what ``__call__`` uses) runs each block as one
        ``_conv.conv_block`` on ``[channels, time, freq, batch]`` activations;
        ``fused=False`` is the layer-by-layer reference (``nnx.Conv``,
        ``MaskedBatchNorm``, ReLU, ``masked_max_pool_time``, ``max_pool_ceil``) it is
        tested against. Both compute the same function, the same batch-norm updates and
        the same dropout masks at valid positions.
        """
        if fused:
            x = to_channels_first(log_mel[..., None])  # [1, time, freq, batch]
            rows = None if mask is None else jnp.transpose(mask)  # [time, batch]
            for i, conv in enumerate(self.convs):
                norm = self.norms[i] if self.norms is not None else None
                x, rows = conv_block(
                    x, conv, norm, pool=(self.time_pool[i], self.freq_pool[i]),
                    floor=False, row_mask=rows, dtype=conv.dtype)
                if self.dropout is not None:  # masks drawn as in the reference layout
                    x = jnp.transpose(self.dropout(jnp.transpose(x, (3, 1, 2, 0)), rngs=rngs),
                                      (3, 1, 2, 0))
            mask = (jnp.ones((x.shape[3], x.shape[1]), dtype=bool) if rows is None
                    else jnp.transpose(rows))
            return jnp.transpose(jnp.mean(x, axis=2), (2, 1, 0)), mask
        if mask is None:
            mask = jnp.ones(log_mel.shape[:2], dtype=bool)
        x = log_mel[..., None]  # [batch, time, freq, 1]
        for i, conv in enumerate(self.convs):
            x = conv(jnp.where(mask[:, :, None, None], x, 0))
            if self.norms is not None:
                x = self.norms[i](x, mask[:, :, None])
            x = jax.nn.relu(x)
            x, mask = masked_max_pool_time(x, mask, self.time_pool[i])
            x = max_pool_ceil(x, axis=2, window=self.freq_pool[i])
            if self.dropout is not None:
                x = self.dropout(x, rngs=rngs)
        return jnp.mean(x, axis=2), mask  # [batch, time', widths[-1]]
