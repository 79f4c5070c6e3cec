"""Fusion layers: every classic multimodal fusion method as a Flax NNX module.

All layers share one contract (see ``lepton_mm.fusion.base``): build with
``Fusion(dims, out_dim, *, rngs, **hyperparameters)``, call with a mapping modality name →
``EncoderOutput``, get ``[batch, out_dim]``. ``FUSIONS`` maps registry names to classes and
``build(name, dims, out_dim, *, rngs, **kw)`` constructs one by name.
"""

from lepton_mm.fusion.attention import AttentionFusion
from lepton_mm.fusion.base import FUSIONS, FusionLayer, build, register
from lepton_mm.fusion.bottleneck import BottleneckFusion
from lepton_mm.fusion.concat import ConcatFusion
from lepton_mm.fusion.cross_attention import CrossAttentionFusion
from lepton_mm.fusion.dropout import modality_dropout
from lepton_mm.fusion.early_transformer import EarlyTransformerFusion
from lepton_mm.fusion.film import FiLMFusion
from lepton_mm.fusion.gated import GatedFusion
from lepton_mm.fusion.late import LateFusion
from lepton_mm.fusion.multiplicative import MultiplicativeFusion
from lepton_mm.fusion.tensor import LowRankFusion, TensorFusion

__all__ = [
    "FUSIONS",
    "AttentionFusion",
    "BottleneckFusion",
    "ConcatFusion",
    "CrossAttentionFusion",
    "EarlyTransformerFusion",
    "FiLMFusion",
    "FusionLayer",
    "GatedFusion",
    "LateFusion",
    "LowRankFusion",
    "MultiplicativeFusion",
    "TensorFusion",
    "build",
    "modality_dropout",
    "register",
]
