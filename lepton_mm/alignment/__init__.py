"""Cross-modal alignment: projection heads, learned temperature, alignment losses.

Losses are pure functions of two paired embedding batches (row ``i`` of each is a
match); modules hold the parameters:

- ``clip_loss``: symmetric InfoNCE (CLIP), optional padding mask.
- ``sigmoid_loss``: pairwise sigmoid loss (SigLIP), optional padding mask.
- ``cca_loss``: Deep CCA: minus the sum of canonical correlations.
- ``clip_loss_sharded``: ``clip_loss`` on a batch sharded over a mesh axis (ring, no
  gather).
- ``sigmoid_loss_sharded``: ``sigmoid_loss`` on a sharded batch (big_vision's chunked
  scheme).
- ``ProjectionHead``: Linear/MLP into the shared space, L2-normalised.
- ``LogitScale``: learned temperature (log-parametrised, clamped) and bias.
- ``CrossModalAligner``: masked cross-attention resampling a source onto a target's time.
- ``class_recall_at_k``: retrieval recall@k where a hit is any item of the query's class.
- ``zero_shot_classify``: labels from class-prompt embeddings by cosine similarity.
- ``paired_class_recall``: ``class_recall_at_k`` both ways between two modalities (+
  chance).
- ``embed_in_batches``: a model's embedding method over a whole split, fixed batches.
"""

from lepton_mm.alignment.aligner import CrossModalAligner
from lepton_mm.alignment.heads import LogitScale, ProjectionHead
from lepton_mm.alignment.losses import cca_loss, clip_loss, sigmoid_loss
from lepton_mm.alignment.retrieval import (
    chance_class_recall_at_k,
    chance_paired_class_recall,
    class_recall_at_k,
    embed_in_batches,
    first_match_rank,
    paired_class_recall,
    zero_shot_accuracy,
    zero_shot_classify,
    zero_shot_logits,
)
from lepton_mm.alignment.sharded import clip_loss_sharded, sigmoid_loss_sharded

__all__ = [
    "CrossModalAligner",
    "LogitScale",
    "ProjectionHead",
    "cca_loss",
    "chance_class_recall_at_k",
    "chance_paired_class_recall",
    "class_recall_at_k",
    "clip_loss",
    "clip_loss_sharded",
    "embed_in_batches",
    "first_match_rank",
    "paired_class_recall",
    "sigmoid_loss",
    "sigmoid_loss_sharded",
    "zero_shot_accuracy",
    "zero_shot_classify",
    "zero_shot_logits",
]
