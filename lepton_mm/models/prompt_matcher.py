"""``PromptMatcher``: a classifier whose classes are frozen text-prompt embeddings.

One encoder (e.g. an audio CNN) and a ``ProjectionHead`` map an example into the space
of a frozen text encoder; its logit for class ``c`` is a learned scale times the cosine
with the embedding of a prompt naming ``c`` ("the spoken digit seven"). Several prompt
*templates* can be held at once; each example names the one it is scored against.
Trained with ``Classification`` on labelled examples it is a classifier over prompt
embeddings (CLIP's zero-shot head, with the image tower trained and the text side fixed):
the class set comes from text, but every class is seen with labels in training.

References:
  Radford et al., "Learning Transferable Visual Models From Natural Language
  Supervision", ICML 2021 (prompt templates, their ensemble, the learned temperature).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lepton_mm._validation import check_array
from lepton_mm.alignment import LogitScale, ProjectionHead
from lepton_mm.models.classifier import check_batch, encode_modalities

Array = jax.Array


class PromptTable(nnx.Variable):
    """Frozen prompt embeddings: an ``nnx.Variable`` that is not an ``nnx.Param``.

    Optimisers over ``nnx.Param`` (``fit``, ``nnx.Optimizer(..., wrt=nnx.Param)``) never
    change it; it is saved in checkpoints with the rest of the model state. Build it as
    any ``nnx.Variable``: ``PromptTable(value, **metadata)``, with ``value`` the float32
    ``[templates, classes, text_dim]`` prompt embeddings.
    """


class PromptMatcher(nnx.Module):
    """Encoder → ``ProjectionHead`` into a text space, scored against frozen prompts.

    ``model(batch)`` returns float32 logits ``[batch, classes]``: ``scale *
    cos(embed(batch[modality]), prompts[batch[template_key]])``, the cosine of each
    example's unit-norm embedding with the class prompts of its template. The scale is
    a ``LogitScale`` (CLIP's initial 1/0.07, learned, clamped to ``[1, 100]``).

    Args:
      encoder: the example encoder (returns an ``EncoderOutput``; its ``pooled``
        features are projected), with a ``.dim`` int attribute.
      prompts: float ``[templates, classes, text_dim]`` unit-norm prompt embeddings,
        e.g. ``SentenceEncoder.encode`` of each template filled with each class name.
      modality: the batch key of the encoder's input(s) (a tuple is passed as
        ``encoder(*x)``).
      template_key: the batch key of int ``[batch]`` template indices (rows of
        ``prompts``); optional when there is one template (then template 0).
      rngs: initialisation of the projection.

    Raises:
      ValueError: ``prompts`` is not a non-empty float ``[templates, classes, dim]``
        array, the encoder has no ``.dim``, or a name is empty.

    Examples:
      >>> import numpy as np
      >>> from flax import nnx
      >>> from lepton_mm.encoders import ImageCNN
      >>> rngs = nnx.Rngs(0)
      >>> prompts = np.eye(3, 4, dtype=np.float32)[None]  # 1 template, 3 classes, dim 4
      >>> model = PromptMatcher(ImageCNN(1, dim=8, widths=(4,), rngs=rngs), prompts,
      ...                       modality="image", rngs=rngs)
      >>> model({"image": np.ones((2, 8, 8, 1), np.float32)}).shape
      (2, 3)
    """

    def __init__(self, encoder: nnx.Module, prompts: Any, *, modality: str = "audio",
                 template_key: str = "template", rngs: nnx.Rngs):
        for name, value in (("modality", modality), ("template_key", template_key)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name}: expected a non-empty str, got {value!r}.")
        dim = getattr(encoder, "dim", None)
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise ValueError(f"encoder: expected a `.dim` int attribute, got {dim!r}.")
        prompts = np.asarray(prompts)
        if prompts.ndim != 3 or 0 in prompts.shape or not np.issubdtype(prompts.dtype,
                                                                         np.floating):
            raise ValueError(f"prompts: expected float [templates, classes, dim], got "
                             f"{prompts.dtype} {list(prompts.shape)}.")
        self.modality = modality
        self.modalities = (modality,)
        self.template_key = template_key
        self.num_templates, self.num_classes = int(prompts.shape[0]), int(prompts.shape[1])
        self.encoder = encoder
        self.projection = ProjectionHead(dim, int(prompts.shape[2]), rngs=rngs)
        self.prompts = PromptTable(jnp.asarray(prompts, jnp.float32))
        self.scale = LogitScale()

    def check_batch(self, batch: Mapping[str, Any]) -> None:
        """Checks the modality and the template indices (in range, for host arrays).

        Args:
          batch: a batch dict.

        Raises:
          ValueError: the modality is missing; template indices are missing (with
            several templates), not int ``[batch]`` or out of range.
        """
        n = check_batch(batch, self.modalities, who="PromptMatcher")
        templates = batch.get(self.template_key)
        if templates is None:
            if self.num_templates > 1:
                raise ValueError(f"batch: missing {self.template_key!r} (int [batch]), "
                                 f"needed to choose among {self.num_templates} templates.")
            return
        check_array(f"batch[{self.template_key!r}]", templates, str(n), kind="int")
        if isinstance(templates, np.ndarray) and templates.size and (
                templates.min() < 0 or templates.max() >= self.num_templates):
            raise ValueError(f"batch[{self.template_key!r}]: expected indices in [0, "
                             f"{self.num_templates}), got [{templates.min()}, "
                             f"{templates.max()}].")

    def embed(self, inputs: Any) -> Array:
        """Unit-norm embeddings in the text space.

        Args:
          inputs: the encoder's input(s) for a batch (``batch[modality]``).

        Returns:
          float32 ``[batch, text_dim]``.
        """
        out = encode_modalities({self.modality: self.encoder}, {self.modality: inputs},
                                self.modalities)[self.modality]
        return self.projection(out.pooled)

    def __call__(self, batch: Mapping[str, Any]) -> Array:
        """Scores ``batch`` against its templates' class prompts.

        Args:
          batch: a batch dict with ``batch[modality]`` and, with several templates,
            ``batch[template_key]``.

        Returns:
          float32 logits ``[batch, classes]``.
        """
        self.check_batch(batch)
        z = self.embed(batch[self.modality])
        templates = batch.get(self.template_key)
        if templates is None:
            templates = jnp.zeros(z.shape[0], jnp.int32)
        prompts = self.prompts[...][templates]  # [batch, classes, text_dim]
        scale, _ = self.scale()
        return scale * jnp.einsum("bd,bcd->bc", z, prompts)
