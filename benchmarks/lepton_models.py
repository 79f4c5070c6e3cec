"""The lepton_mm side of the train-step benchmarks: the models ``run.py`` trains.

* ``av_classifier("concat" | "low_rank")``: AV-MNIST's MultiBench LeNets (image
  ``ImageCNN.lenet()`` on 28x28x1, audio ``AudioSpectrogramCNN.lenet(64)`` on a
  ``[time, 64]`` log-mel) -> fusion to 100 -> ``Linear(100, 10)``, built with
  ``lepton_mm.models.build_classifier``.
* ``attention_classifier()``: linear token "encoders" (4x4 image patches -> 49 tokens,
  one token per log-mel frame) -> MulT ``CrossAttentionFusion`` -> ``Linear(100, 10)``;
  the encoders are deliberately trivial so the step measures the attention layers.

``torch_models.py`` holds the PyTorch twins.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lepton_mm.encoders import AudioSpectrogramCNN, ImageCNN
from lepton_mm.models import build_classifier
from lepton_mm.types import EncoderOutput

#: MulT hyperparameters of the attention pair (CrossAttentionFusion's defaults, dropout
#: off on both sides so both frameworks do the same arithmetic).
ATTENTION_KWARGS = {"width": 32, "num_layers": 2, "num_self_layers": 1, "num_heads": 2,
                    "dropout": 0.0, "attention_dropout": 0.0}
FUSION_DIM = 100  # experiments/avmnist.py: the fused layer of MultiBench's AV-MNIST head
NUM_CLASSES = 10
LOW_RANK = 4


class PatchTokens(nnx.Module):
    """Image ``[b, h, w, 1]`` -> non-overlapping ``patch`` x ``patch`` patches -> Linear."""

    def __init__(self, patch: int, dim: int, *, rngs: nnx.Rngs):
        self.patch = patch
        self.dim = dim
        self.linear = nnx.Linear(patch * patch, dim, rngs=rngs)

    def __call__(self, images: jax.Array) -> EncoderOutput:
        b, h, w, _ = images.shape
        p = self.patch
        x = images.reshape(b, h // p, p, w // p, p).transpose(0, 1, 3, 2, 4)
        return EncoderOutput.from_tokens(self.linear(x.reshape(b, (h // p) * (w // p), p * p)))


class FrameTokens(nnx.Module):
    """Log-mel ``[b, time, mels]`` -> one ``Linear(mels, dim)`` token per frame."""

    def __init__(self, n_mels: int, dim: int, *, rngs: nnx.Rngs):
        self.dim = dim
        self.linear = nnx.Linear(n_mels, dim, rngs=rngs)

    def __call__(self, log_mel: jax.Array) -> EncoderOutput:
        return EncoderOutput.from_tokens(self.linear(log_mel))


def av_classifier(fusion: str, *, n_mels: int = 64, image: tuple[int, int] = (6, 3),
                  audio: tuple[int, int] = (6, 5), rngs: nnx.Rngs) -> nnx.Module:
    """AV-MNIST LeNets + ``fusion`` ("concat" or "low_rank") + a 10-class head.

    ``image`` / ``audio`` are the LeNets' ``(channels, additional_layers)``; the
    defaults are MultiBench's AV-MNIST encoders (``--quick`` uses smaller ones).
    """
    encoders = {
        "image": ImageCNN.lenet(channels=image[0], additional_layers=image[1], rngs=rngs),
        "audio": AudioSpectrogramCNN.lenet(n_mels, channels=audio[0],
                                           additional_layers=audio[1], rngs=rngs),
    }
    kwargs = {"rank": LOW_RANK} if fusion == "low_rank" else {}
    return build_classifier(encoders, fusion, num_outputs=NUM_CLASSES,
                            fusion_dim=FUSION_DIM, rngs=rngs, **kwargs)


def attention_classifier(*, n_mels: int = 64, patch: int = 4,
                         attention: dict | None = None, rngs: nnx.Rngs) -> nnx.Module:
    """Linear token encoders + MulT cross-attention fusion + a 10-class head.

    ``attention``: ``CrossAttentionFusion`` hyperparameters (default
    ``ATTENTION_KWARGS``).
    """
    attention = ATTENTION_KWARGS if attention is None else attention
    width = attention["width"]
    encoders = {"image": PatchTokens(patch, width, rngs=rngs),
                "audio": FrameTokens(n_mels, width, rngs=rngs)}
    return build_classifier(encoders, "cross_attention", num_outputs=NUM_CLASSES,
                            fusion_dim=FUSION_DIM, rngs=rngs, **attention)


def param_count(model: nnx.Module) -> int:
    """Number of trainable parameters (``nnx.Param`` leaves)."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def loss_fn(model: nnx.Module, batch: dict) -> jax.Array:
    """Mean softmax cross-entropy of the model's logits against ``batch['label']``."""
    logits = model({m: v for m, v in batch.items() if m != "label"})
    labels = jax.nn.one_hot(batch["label"], logits.shape[-1], dtype=logits.dtype)
    return -jnp.mean(jnp.sum(labels * jax.nn.log_softmax(logits), axis=-1))
