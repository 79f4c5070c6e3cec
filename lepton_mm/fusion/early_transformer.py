"""Early fusion with one joint Transformer over the tokens of every modality."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from lepton_mm._validation import check_positive_int
from lepton_mm.fusion import _transformer as tfm
from lepton_mm.fusion.base import FusionLayer, register
from lepton_mm.types import EncoderOutput, masked_mean

Array = jax.Array

_POOLS = ("mean", "cls")


@register("early_transformer")
class EarlyTransformerFusion(FusionLayer):
    """Single-stream early fusion: one Transformer over all modalities' tokens at once.

    Each modality's tokens are projected to ``width`` and tagged with a learned modality-type
    embedding and a position embedding (positions count that modality's valid tokens);
    the sequences are concatenated along time, with their masks, and encoded by one
    pre-LayerNorm Transformer, so every token attends to every valid token of every
    modality. The sequence is pooled (masked mean, or a learned CLS token) and a Linear
    maps it to ``out_dim``. This is the "single-stream" / early-concatenation design
    (VisualBERT, VATT's shared backbone, the "vanilla self-attention" baseline of MBT); the
    encoder itself follows Vaswani et al. (2017).

    Shapes: ``inputs[m]`` has tokens ``[batch, time_m, dims[m]]`` (``time_m`` may differ
    between modalities); the joint sequence has ``sum_m time_m`` (+1 with a CLS token)
    positions; the output is float32 ``[batch, out_dim]``.

    Missing modalities: an absent modality (all-False mask row) contributes no keys and
    no pooled tokens, so the output does not depend on its tokens or pooled vector. With
    ``pool="mean"`` an example with no modality present gets ``Linear(0)`` (the bias);
    with ``pool="cls"`` it gets the CLS token's path alone. Masked tokens of a present
    modality are likewise ignored (zeroed before any matmul, never attended to).

    Note that mean pooling over the joint sequence weights modalities by their number of
    valid tokens.

    Args:
      dims: modality name → feature size of that modality's tokens.
      out_dim: output size.
      rngs: initialisation and (in training mode) default dropout randomness.
      width: width of the joint Transformer.
      num_layers: Transformer blocks.
      num_heads: attention heads; must divide ``width``.
      mlp_dim: hidden size of each block's MLP; ``None`` means ``4 * width``.
      dropout: dropout on the embeddings, residual branches and MLP hidden layer.
      attention_dropout: dropout on attention probabilities.
      pool: ``"mean"`` (masked mean of the final tokens) or ``"cls"`` (a learned token
        prepended to the joint sequence).
      position_embedding: ``"sinusoidal"``, ``"learned"`` (per modality, ``max_len``
        positions) or ``"none"``.
      max_len: longest sequence per modality for ``position_embedding="learned"``.
      dtype: compute dtype of the dense layers (attention softmax and LayerNorm are
        always float32; the output is float32).

    References:
      Vaswani et al., "Attention Is All You Need", NeurIPS 2017.
      Li et al., "VisualBERT: A Simple and Performant Baseline for Vision and Language",
      2019. https://arxiv.org/abs/1908.03557

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from lepton_mm.types import EncoderOutput
      >>> fusion = EarlyTransformerFusion({"audio": 8, "text": 6}, 4, rngs=nnx.Rngs(0),
      ...                                 width=16, num_layers=1)
      >>> fusion.eval()
      >>> out = fusion({"audio": EncoderOutput.from_tokens(jnp.ones((2, 5, 8))),
      ...               "text": EncoderOutput.from_tokens(jnp.ones((2, 3, 6)))})
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
        num_heads: int = 2,
        mlp_dim: int | None = None,
        dropout: float = 0.1,
        attention_dropout: float = 0.1,
        pool: str = "mean",
        position_embedding: str = "sinusoidal",
        max_len: int = 512,
        dtype: jnp.dtype = jnp.float32,
    ):
        super().__init__(dims, out_dim)
        self.width = check_positive_int("width", width)
        self.num_layers = check_positive_int("num_layers", num_layers)
        self.num_heads = check_positive_int("num_heads", num_heads)
        tfm.check_heads("width", width, num_heads)
        self.mlp_dim = check_positive_int("mlp_dim", 4 * width if mlp_dim is None else mlp_dim)
        self.dropout_rate = tfm.check_rate("dropout", dropout)
        self.attention_dropout_rate = tfm.check_rate("attention_dropout", attention_dropout)
        if pool not in _POOLS:
            raise ValueError(f"pool: expected one of {_POOLS}, got {pool!r}.")
        self.pool = pool

        self.projections = nnx.Dict({
            m: nnx.Linear(self.dims[m], width, dtype=dtype, kernel_init=tfm.KERNEL_INIT,
                          rngs=rngs)
            for m in self.modalities
        })
        self.modality_embedding = nnx.Param(
            tfm.EMBED_INIT(rngs.params(), (len(self.modalities), width), jnp.float32))
        self.positions = nnx.Dict({
            m: tfm.PositionEmbedding(position_embedding, width, max_len=max_len, rngs=rngs)
            for m in self.modalities
        })
        self.cls_token = (nnx.Param(tfm.EMBED_INIT(rngs.params(), (width,), jnp.float32))
                          if pool == "cls" else None)
        self.embed_dropout = nnx.Dropout(dropout, rngs=rngs)
        self.encoder = tfm.TransformerStack(
            num_layers, width, num_heads, self.mlp_dim, dropout=dropout,
            attention_dropout=attention_dropout, dtype=dtype, rngs=rngs)
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
        type_table = self.modality_embedding[...]
        seqs, masks = [], []
        for i, (m, x) in enumerate(zip(self.modalities, xs, strict=True)):
            tokens = jnp.where(x.mask[..., None], x.tokens, 0)
            h = self.projections[m](tokens).astype(jnp.float32)
            h = h + self.positions[m](x.mask, name=f"inputs[{m!r}]")
            h = h + type_table[i][None, None, :]
            seqs.append(jnp.where(x.mask[..., None], h, 0.0))
            masks.append(x.mask)
        if self.cls_token is not None:
            batch = xs[0].batch_size
            seqs.insert(0, jnp.broadcast_to(self.cls_token[...][None, None, :],
                                            (batch, 1, self.width)))
            masks.insert(0, jnp.ones((batch, 1), bool))
        h = self.embed_dropout(jnp.concatenate(seqs, axis=1), rngs=rngs)
        mask = jnp.concatenate(masks, axis=1)
        h = self.encoder(h, mask, rngs=rngs)
        pooled = h[:, 0] if self.cls_token is not None else masked_mean(h, mask)
        return self.head(pooled).astype(jnp.float32)
