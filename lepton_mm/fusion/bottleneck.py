"""Fusion through a few shared bottleneck tokens (MBT)."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from lepton_mm._validation import check_positive_int
from lepton_mm.fusion import _transformer as tfm
from lepton_mm.fusion.base import FusionLayer, register
from lepton_mm.types import EncoderOutput

Array = jax.Array


@register("bottleneck")
class BottleneckFusion(FusionLayer):
    """Multimodal Bottleneck Transformer (MBT): modalities exchange information only
    through a few shared tokens.

    Following Nagrani et al. (2021) and scenic's ``projects/mbt/model.py``:

    1. Each modality's tokens are projected to ``width``, get a position embedding
       (positions count that modality's valid tokens) and a learned per-modality CLS
       token (zero-initialised, as in MBT) in front: ``[batch, 1 + time_m, width]``.
    2. Each modality has its own stack of ``num_layers`` pre-LayerNorm Transformer blocks
       (separate weights). Layers ``0 .. fusion_layer-1`` are unimodal.
    3. From layer ``fusion_layer`` on, ``num_bottlenecks`` bottleneck tokens (one learned
       initial value shared by all modalities) are appended to every modality's
       sequence; each modality's block updates its own copy, and after the layer the
       bottleneck becomes the mean of those copies over the modalities *present* in that
       example. ``fusion_layer=0`` fuses from the start; ``fusion_layer=num_layers``
       means no fusion at all (independent per-modality encoders: late fusion).
       Information reaches another modality's CLS only from the *second* fusion layer
       on (the first writes the bottleneck, the next reads it), so fusion needs
       ``num_layers - fusion_layer >= 2``; scenic's MBT configs use ``fusion_layer=8`` of 12.
    4. Each CLS token goes through a shared final LayerNorm; the output is
       ``Linear(mean over present modalities of CLS)`` → float32 ``[batch, out_dim]``.
       With MBT's single shared output projection this equals MBT's average of
       per-modality CLS logits whenever at least one modality is present.

    Missing modalities: an absent modality (all-False mask row) neither writes into the
    bottleneck average (the mean is over present modalities; with none present the
    bottleneck keeps its previous value) nor contributes a CLS vector to the output mean,
    so the output does not depend on its tokens or pooled vector (``pooled`` is never
    used). An example with no modality present gets ``Linear(0)`` (the bias). Masked
    tokens of a present modality are zeroed before any matmul and never attended to.

    Differences from scenic's MBT: the output is MBT's ``classifier="token"`` variant
    (scenic also offers global average pooling); a position embedding that counts valid
    tokens (MBT: learned, ``position_embedding="learned"`` here); padding masks and
    presence-aware averaging; an output projection that is not zero-initialised; no
    stochastic depth or encoder sharing.

    Args:
      dims: modality name → feature size of that modality's tokens.
      out_dim: output size.
      rngs: initialisation and (in training mode) default dropout randomness.
      width: Transformer width (shared by all modalities and the bottleneck).
      num_layers: blocks per modality.
      fusion_layer: index of the first fusion layer, in ``[0, num_layers]`` (see 3).
      num_bottlenecks: number of bottleneck tokens (MBT: 4).
      num_heads: attention heads; must divide ``width``.
      mlp_dim: hidden size of each block's MLP; ``None`` means ``4 * width``.
      dropout: dropout on the embeddings, residual branches and MLP hidden layer.
      attention_dropout: dropout on attention probabilities.
      position_embedding: ``"sinusoidal"``, ``"learned"`` (``max_len`` positions per
        modality) or ``"none"``.
      max_len: longest sequence per modality for ``position_embedding="learned"``.
      dtype: compute dtype of the dense layers (attention softmax and LayerNorm are
        always float32; the output is float32).

    References:
      Nagrani, Yang, Arnab, Jansen, Schmid and Sun, "Attention Bottlenecks for
      Multimodal Fusion", NeurIPS 2021. https://arxiv.org/abs/2107.00135

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from lepton_mm.types import EncoderOutput
      >>> fusion = BottleneckFusion({"audio": 8, "video": 6}, 4, rngs=nnx.Rngs(0),
      ...                           width=16, num_layers=3, fusion_layer=1)
      >>> fusion.eval()
      >>> out = fusion({"audio": EncoderOutput.from_tokens(jnp.ones((2, 5, 8))),
      ...               "video": EncoderOutput.from_tokens(jnp.ones((2, 3, 6)))})
      >>> out.shape
      (2, 4)
    """

    def __init__(
        self,
        dims: Mapping[str, int],
        out_dim: int,
        *,
        rngs: nnx.Rngs,
        width: int = 64,
        num_layers: int = 2,
        fusion_layer: int = 0,
        num_bottlenecks: int = 4,
        num_heads: int = 2,
        mlp_dim: int | None = None,
        dropout: float = 0.1,
        attention_dropout: float = 0.1,
        position_embedding: str = "sinusoidal",
        max_len: int = 512,
        dtype: jnp.dtype = jnp.float32,
    ):
        super().__init__(dims, out_dim)
        self.width = check_positive_int("width", width)
        self.num_layers = check_positive_int("num_layers", num_layers)
        if (isinstance(fusion_layer, bool) or not isinstance(fusion_layer, int)
                or not 0 <= fusion_layer <= num_layers):
            raise ValueError(
                f"fusion_layer: expected an int in [0, num_layers={num_layers}], got "
                f"{fusion_layer!r}.")
        self.fusion_layer = fusion_layer
        self.num_bottlenecks = check_positive_int("num_bottlenecks", num_bottlenecks)
        self.num_heads = check_positive_int("num_heads", num_heads)
        tfm.check_heads("width", width, num_heads)
        self.mlp_dim = check_positive_int("mlp_dim", 4 * width if mlp_dim is None else mlp_dim)
        self.dropout_rate = tfm.check_rate("dropout", dropout)
        self.attention_dropout_rate = tfm.check_rate("attention_dropout", attention_dropout)

        self.projections = nnx.Dict({
            m: nnx.Linear(self.dims[m], width, dtype=dtype, kernel_init=tfm.KERNEL_INIT,
                          rngs=rngs)
            for m in self.modalities
        })
        self.positions = nnx.Dict({
            m: tfm.PositionEmbedding(position_embedding, width, max_len=max_len, rngs=rngs)
            for m in self.modalities
        })
        # One CLS token per modality, rows in self.modalities order.
        self.cls_tokens = nnx.Param(jnp.zeros((len(self.modalities), width), jnp.float32))
        self.bottleneck = (
            nnx.Param(tfm.EMBED_INIT(rngs.params(), (num_bottlenecks, width), jnp.float32))
            if fusion_layer < num_layers else None)
        self.embed_dropout = nnx.Dropout(dropout, rngs=rngs)
        self.encoders = nnx.Dict({
            m: nnx.List([
                tfm.TransformerBlock(width, num_heads, self.mlp_dim, dropout=dropout,
                                     attention_dropout=attention_dropout, dtype=dtype,
                                     rngs=rngs)
                for _ in range(num_layers)
            ])
            for m in self.modalities
        })
        self.final_norm = nnx.LayerNorm(width, dtype=jnp.float32, rngs=rngs)
        self.head = nnx.Linear(width, out_dim, dtype=dtype, rngs=rngs)

    def __call__(self, inputs: Mapping[str, EncoderOutput], *,
                 rngs: nnx.Rngs | None = None) -> Array:
        """Fuses ``inputs`` (modality → ``EncoderOutput``) into float32 ``[batch, out_dim]``.

        Args:
          inputs: one ``EncoderOutput`` per modality of ``dims``.
          rngs: dropout randomness in training mode; defaults to the construction stream.

        Returns:
          float32 ``[batch, out_dim]``, the fused representation.
        """
        xs = self.check_inputs(inputs)
        cls = jnp.stack(self._cls_states(xs, rngs=rngs), axis=1)  # [batch, M, width]
        present = self.presence(xs)
        total = jnp.sum(jnp.where(present[..., None], cls, 0.0), axis=1)
        count = jnp.sum(present, axis=1, dtype=jnp.float32)[:, None]
        return self.head(total / jnp.maximum(count, 1.0)).astype(jnp.float32)

    def _cls_states(self, xs: tuple[EncoderOutput, ...], *,
                    rngs: nnx.Rngs | None = None) -> list[Array]:
        """Steps 1-3 and the final LayerNorm: each modality's CLS state, float32
        ``[batch, width]``, in ``self.modalities`` order (absent ones included)."""
        batch = xs[0].batch_size
        cls_table = self.cls_tokens[...]
        seqs, masks = [], []
        for i, (m, x) in enumerate(zip(self.modalities, xs, strict=True)):
            tokens = jnp.where(x.mask[..., None], x.tokens, 0)
            h = self.projections[m](tokens).astype(jnp.float32)
            h = h + self.positions[m](x.mask, name=f"inputs[{m!r}]")
            h = jnp.where(x.mask[..., None], h, 0.0)
            cls = jnp.broadcast_to(cls_table[i][None, None, :], (batch, 1, self.width))
            seqs.append(self.embed_dropout(jnp.concatenate([cls, h], axis=1), rngs=rngs))
            masks.append(jnp.concatenate([jnp.ones((batch, 1), bool), x.mask], axis=1))

        present = self.presence(xs)  # [batch, M]
        any_present = jnp.any(present, axis=1)[:, None, None]
        count = jnp.sum(present, axis=1, dtype=jnp.float32)[:, None, None]
        bottleneck = None
        if self.bottleneck is not None:
            bottleneck = jnp.broadcast_to(self.bottleneck[...][None],
                                          (batch, self.num_bottlenecks, self.width))
        bottleneck_mask = jnp.ones((batch, self.num_bottlenecks), bool)
        for layer in range(self.num_layers):
            blocks = [self.encoders[m][layer] for m in self.modalities]
            if layer < self.fusion_layer:
                seqs = [block(h, mask, rngs=rngs)
                        for block, h, mask in zip(blocks, seqs, masks, strict=True)]
                continue
            total = jnp.zeros_like(bottleneck)
            updated = []
            for i, (block, h, mask) in enumerate(zip(blocks, seqs, masks, strict=True)):
                time = h.shape[1]
                out = block(jnp.concatenate([h, bottleneck], axis=1),
                            jnp.concatenate([mask, bottleneck_mask], axis=1), rngs=rngs)
                updated.append(out[:, :time])
                total = total + jnp.where(present[:, i, None, None], out[:, time:], 0.0)
            seqs = updated
            bottleneck = jnp.where(any_present, total / jnp.maximum(count, 1.0), bottleneck)
        return [self.final_norm(h[:, 0]) for h in seqs]
