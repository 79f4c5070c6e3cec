"""Cross-modal alignment: projection heads, learned temperature, alignment losses.

Losses are pure functions of two paired embedding batches (row ``i`` of each is a
match); modules hold the parameters:

  clip_loss             symmetric InfoNCE (CLIP), optional padding mask
  sigmoid_loss          pairwise sigmoid loss (SigLIP), optional padding mask
  cca_loss              Deep CCA: minus the sum of canonical correlations
  clip_loss_sharded     clip_loss on a batch sharded over a mesh axis (ring, no gather)
  sigmoid_loss_sharded  sigmoid_loss on a sharded batch (big_vision's chunked scheme)
  ProjectionHead        Linear/MLP into the shared space, L2-normalised
  LogitScale            learned temperature (log-parametrised, clamped) and bias
  CrossModalAligner     masked cross-attention resampling a source onto a target's time
"""

from lepton_mm.alignment.aligner import CrossModalAligner
from lepton_mm.alignment.heads import LogitScale, ProjectionHead
from lepton_mm.alignment.losses import cca_loss, clip_loss, sigmoid_loss
from lepton_mm.alignment.sharded import clip_loss_sharded, sigmoid_loss_sharded

__all__ = [
    "CrossModalAligner",
    "LogitScale",
    "ProjectionHead",
    "cca_loss",
    "clip_loss",
    "clip_loss_sharded",
    "sigmoid_loss",
    "sigmoid_loss_sharded",
]
