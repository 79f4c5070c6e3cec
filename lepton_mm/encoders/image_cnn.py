"""A small configurable CNN image encoder (LeNet-style), e.g. for AV-MNIST.

References:
  Liang et al., "MultiBench: Multiscale Benchmarks for Multimodal Representation
  Learning", NeurIPS 2021 (``unimodals/common_models.py``, class ``LeNet``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lepton_mm._validation import check_positive_int
from lepton_mm.encoders._conv import (
    BN_EPSILON,
    BN_MOMENTUM,
    check_float_input,
    check_widths,
    conv_block,
    conv_kernel_init,
    per_layer,
    to_channels_first,
)
from lepton_mm.types import EncoderOutput

Array = jax.Array

_DTYPE_HINT = ("Convert images to float in [0, 1] first, e.g. "
               "images.astype(np.float32) / 255 for uint8 pixels.")


class ImageCNN(nnx.Module):
    """Stack of conv blocks whose final feature map becomes a sequence of tokens.

    Block ``i``: ``kernel_sizes[i]`` x ``kernel_sizes[i]`` convolution with "same"
    zero padding (``widths[i-1] -> widths[i]``; no bias when ``batch_norm``, as the norm
    adds one), batch norm, ReLU, ``pool[i]`` x ``pool[i]`` max pooling (stride = window,
    partial windows dropped as in PyTorch; 1 = no pooling), then dropout. The final
    ``[h, w, widths[-1]]`` map is flattened row-major into ``h * w`` tokens and, only
    when ``dim != widths[-1]``, linearly projected to ``dim``.

    Convolution kernels use He-uniform initialisation and batch norm uses momentum 0.9
    (PyTorch's 0.1) and epsilon 1e-5, matching MultiBench. The module starts in
    training mode, like every NNX module: call ``model.eval()`` for inference (running
    batch-norm statistics, no dropout) and ``model.train()`` to switch back.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> model = ImageCNN.lenet(rngs=nnx.Rngs(0))
      >>> model.eval()
      >>> out = model(jnp.zeros((2, 28, 28, 1)))
      >>> out.tokens.shape, out.mask.shape, out.pooled.shape
      ((2, 1, 48), (2, 1), (2, 48))
    """

    def __init__(
        self,
        in_channels: int,
        *,
        dim: int,
        rngs: nnx.Rngs,
        widths: Sequence[int] = (32, 64, 128),
        kernel_sizes: int | Sequence[int] = 3,
        pool: int | Sequence[int] = 2,
        batch_norm: bool = True,
        dropout: float = 0.0,
        dtype: Any = None,
    ):
        """Builds the encoder.

        The defaults suit small images: three blocks of widths 32, 64, 128, each halving
        the resolution, so a 28x28 image gives 3x3 = 9 tokens and a 32x32 one 16.

        Args:
          in_channels: channels of the input images (1 for MNIST, 3 for RGB).
          dim: size of each output token. If it differs from ``widths[-1]`` a linear
            projection is added; otherwise the feature map is used as is.
          rngs: parameter initialisation and the dropout stream.
          widths: output channels of each conv block; its length is the depth.
          kernel_sizes: square kernel size, one for all blocks or one per block.
          pool: max-pooling window and stride, one for all blocks or one per block.
          batch_norm: batch norm after every convolution (and no conv bias).
          dropout: dropout rate after every block (training mode only).
          dtype: computation dtype (e.g. ``jnp.bfloat16``); parameters stay float32.
        """
        self.in_channels = check_positive_int("in_channels", in_channels)
        self.dim = check_positive_int("dim", dim)
        self.widths = check_widths(widths)
        depth = len(self.widths)
        self.kernel_sizes = per_layer("kernel_sizes", kernel_sizes, depth)
        self.pool = per_layer("pool", pool, depth)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a rate in [0, 1), got {dropout!r}.")
        self.batch_norm = bool(batch_norm)

        ins = (self.in_channels, *self.widths[:-1])
        self.convs = nnx.List([
            nnx.Conv(c_in, c_out, (k, k), padding="SAME", use_bias=not self.batch_norm,
                     kernel_init=conv_kernel_init, dtype=dtype, rngs=rngs)
            for c_in, c_out, k in zip(ins, self.widths, self.kernel_sizes, strict=True)
        ])
        self.norms = nnx.List([
            nnx.BatchNorm(c, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=dtype,
                          rngs=rngs)
            for c in self.widths
        ]) if self.batch_norm else None
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None
        self.proj = (nnx.Linear(self.widths[-1], self.dim, dtype=dtype, rngs=rngs)
                     if self.dim != self.widths[-1] else None)

    @classmethod
    def lenet(
        cls,
        in_channels: int = 1,
        *,
        channels: int = 6,
        additional_layers: int = 3,
        dim: int | None = None,
        dropout: float = 0.0,
        dtype: Any = None,
        rngs: nnx.Rngs,
    ) -> ImageCNN:
        """MultiBench's ``LeNet(in_channels, channels, additional_layers)``.

        A 5x5 conv to ``channels``, then ``additional_layers`` 3x3 convs each doubling
        the width, every conv bias-free and followed by batch norm, ReLU and 2x2 max
        pooling. The defaults are the AV-MNIST image encoder: widths 6, 12, 24, 48; a
        28x28 image gives one 48-dim token (28 -> 14 -> 7 -> 3 -> 1). It has
        ``sum(k_i^2 * c_{i-1} * c_i) + 2 * sum(c_i)`` = 13,938 parameters.

        Args:
          in_channels: image channels.
          channels: width of the first block.
          additional_layers: number of 3x3 blocks after the first.
          dim: token size; defaults to the last width, ``channels * 2**additional_layers``
            (no projection).
          dropout: dropout after every block (MultiBench uses none).
          dtype: computation dtype.
          rngs: parameter initialisation and the dropout stream.

        Returns:
          An ``ImageCNN`` in training mode.
        """
        channels = check_positive_int("channels", channels)
        if isinstance(additional_layers, bool) or not isinstance(
                additional_layers, int) or additional_layers < 0:
            raise ValueError(
                f"additional_layers: expected an int >= 0, got {additional_layers!r}.")
        widths = tuple(channels * 2**i for i in range(additional_layers + 1))
        return cls(
            in_channels, dim=widths[-1] if dim is None else dim, rngs=rngs, widths=widths,
            kernel_sizes=(5,) + (3,) * additional_layers, pool=2, batch_norm=True,
            dropout=dropout, dtype=dtype)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Feature-map size ``(h, w)`` for an input of ``height`` x ``width``.

        The number of tokens is ``h * w``; zero means the image is too small.
        """
        for p in self.pool:
            height, width = height // p, width // p
        return height, width

    def __call__(self, images: Array, *, rngs: nnx.Rngs | None = None) -> EncoderOutput:
        """Encodes a batch of images.

        Args:
          images: float ``[batch, height, width, channels]``, values typically in
            [0, 1] (or normalised). Each side must be at least the product of the
            pooling windows (16 for the LeNet config).
          rngs: dropout randomness for this call; the stream given at construction is
            used when omitted. Ignored in eval mode or without dropout.

        Returns:
          ``EncoderOutput`` with tokens float ``[batch, h * w, dim]`` (the final feature
          map, row-major), mask bool ``[batch, h * w]`` all True, and pooled float
          ``[batch, dim]``, the mean of the tokens.

        Raises:
          TypeError: ``images`` is not a float array (convert integer pixels first).
          ValueError: wrong rank or channel count, or the images are too small.
        """
        dims = {"channels": self.in_channels}
        check_float_input("images", images, "batch height width channels", dims,
                          _DTYPE_HINT)
        height, width = images.shape[1:3]
        h, w = self.output_size(height, width)
        if h == 0 or w == 0:
            need = 1
            for p in self.pool:
                need *= p
            raise ValueError(
                f"images: height and width must be at least {need} (the product of the "
                f"pooling windows {self.pool}), got {height}x{width}.")

        tokens = self._feature_map(images, rngs=rngs, fused=True)
        tokens = tokens.reshape(tokens.shape[0], h * w, tokens.shape[-1])
        if self.proj is not None:
            tokens = self.proj(tokens)
        mask = jnp.ones(tokens.shape[:2], dtype=bool)
        return EncoderOutput(tokens=tokens, mask=mask, pooled=jnp.mean(tokens, axis=1))

    def _feature_map(self, images: Array, *, rngs: nnx.Rngs | None, fused: bool) -> Array:
        """The last block's output ``[batch, h, w, widths[-1]]`` (no projection).

        ``fused=True`` (what ``__call__`` uses) runs each block as one
        ``_conv.conv_block`` on ``[channels, height, width, batch]`` activations;
        ``fused=False`` is the layer-by-layer reference (``nnx.Conv``, batch norm, ReLU,
        ``nnx.max_pool``) it is tested against. Both compute the same function, the
        same batch-norm updates and the same dropout masks.
        """
        if fused:
            x = to_channels_first(images)  # [channels, height, width, batch]
            for i, conv in enumerate(self.convs):
                norm = self.norms[i] if self.norms is not None else None
                p = self.pool[i]
                x, _ = conv_block(x, conv, norm, pool=(p, p), floor=True, dtype=conv.dtype)
                if self.dropout is not None:  # masks drawn as in the reference layout
                    x = jnp.transpose(self.dropout(jnp.transpose(x, (3, 1, 2, 0)), rngs=rngs),
                                      (3, 1, 2, 0))
            return jnp.transpose(x, (3, 1, 2, 0))
        x = images
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if self.norms is not None:
                x = self.norms[i](x)
            x = jax.nn.relu(x)
            p = self.pool[i]
            if p > 1:
                x = nnx.max_pool(x, (p, p), strides=(p, p), padding="VALID")
            if self.dropout is not None:
                x = self.dropout(x, rngs=rngs)
        return x
