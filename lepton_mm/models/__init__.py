"""Models (compositions of encoders, fusion layers and heads) and training tasks.

- ``MultimodalClassifier``, ``build_classifier``: encoders by modality → fusion → head.
- ``encode_modalities``, ``apply_presence``: the classifier's encoding half, for code
  that runs encoders and fusion separately.
- ``PooledFusion``: the unimodal pass-through "fusion".
- ``TwoTower``, ``TwoTowerOutput``: dual encoder for contrastive alignment.
- ``PromptMatcher``, ``PromptTable``: classifier over frozen text-prompt embeddings.
- ``Classification``, ``Binary``, ``MultiLabel``, ``Regression``, ``Contrastive``:
  objectives: ``loss(outputs, batch, valid)`` and ``metrics(outputs, batch, valid)``.

The batch format (every model, task and ``lepton_mm.training.fit`` share it)::

    {
      "image": images,                 # modality name → that encoder's input(s):
      "audio": (log_mel, frame_mask),  #   one array, or a tuple passed as encoder(*x)
      "text": (token_ids, token_mask),
      "label": labels,                 # the task's target
      "present": {"audio": bool [batch]},  # optional: False = modality absent there
      "valid": bool [batch],           # optional: False = padding row (set by fit)
    }

``"label"``, ``"present"`` and ``"valid"`` are reserved; every other key is a modality,
and keys the model has no encoder for are ignored. See ``lepton_mm.models.classifier``.
"""

from lepton_mm.models.classifier import (
    RESERVED_KEYS,
    MultimodalClassifier,
    PooledFusion,
    apply_presence,
    build_classifier,
    encode_modalities,
)
from lepton_mm.models.prompt_matcher import PromptMatcher, PromptTable
from lepton_mm.models.tasks import (
    TASKS,
    Binary,
    Classification,
    Contrastive,
    MultiLabel,
    Regression,
)
from lepton_mm.models.two_tower import TwoTower, TwoTowerOutput, l2_normalize

__all__ = [
    "RESERVED_KEYS",
    "TASKS",
    "Binary",
    "Classification",
    "Contrastive",
    "MultiLabel",
    "MultimodalClassifier",
    "PooledFusion",
    "PromptMatcher",
    "PromptTable",
    "Regression",
    "TwoTower",
    "TwoTowerOutput",
    "apply_presence",
    "build_classifier",
    "encode_modalities",
    "l2_normalize",
]
