"""``MultimodalClassifier``: encoders by modality name → fusion layer → head.

The batch format (shared by every model, task and the training loop)
--------------------------------------------------------------------
A batch is a plain ``dict`` (a pytree), one leading ``batch`` axis on every array::

    {
      "image": images,                 # modality name → that encoder's positional
      "audio": (log_mel, frame_mask),  #   input(s): one array, or a tuple of arrays
      "text": (token_ids, token_mask), #   passed as encoder(*inputs)
      "label": labels,                 # the task's target (see lepton_mm.models.tasks)
      "present": {"audio": bool [batch], ...},  # optional, per modality
      "valid": bool [batch],           # optional; added by the training loop's batching
    }

* ``"label"``, ``"present"`` and ``"valid"`` are reserved; every other key is a modality.
  Keys the model has no encoder for are ignored, so one tri-modal dataset also feeds
  unimodal and bimodal baselines.
* ``present[m]`` False marks modality ``m`` absent for that example: the encoder still
  runs (shapes stay static), then its ``EncoderOutput.mask`` row is AND-ed with the
  flag, its tokens and pooled vector are zeroed, and the fusion layer's masking does
  the rest. A modality missing from ``"present"`` is present everywhere.
* ``valid`` False marks a padding row (the last, partial batch is padded to a fixed
  size so nothing recompiles); models ignore it, losses and metrics weight by it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import FrozenDict

from lepton_mm import fusion as fusion_lib
from lepton_mm._validation import check_array, check_positive_int
from lepton_mm.types import RESERVED_KEYS, EncoderOutput

Array = jax.Array



def _check_modality_names(what: str, names: Any) -> tuple[str, ...]:
    names = tuple(names)
    if not names:
        raise ValueError(f"{what}: expected at least one modality, got none.")
    for m in names:
        if not isinstance(m, str) or not m:
            raise TypeError(f"{what}: modality names must be non-empty str, got {m!r}.")
        if m in RESERVED_KEYS:
            raise ValueError(
                f"{what}: {m!r} is a reserved batch key ({list(RESERVED_KEYS)}), not a "
                "modality name.")
    return tuple(sorted(names))


def check_batch(batch: Any, modalities: tuple[str, ...], *, who: str = "model") -> int:
    """Checks that ``batch`` holds every modality in ``modalities``; returns the batch size.

    Only static information (keys, shapes, dtypes) is read, so this is free under jit.

    Raises:
      TypeError: ``batch`` is not a mapping, or ``present`` is malformed.
      ValueError: a modality is missing, or ``present``/``valid`` have the wrong shape.
    """
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"batch: expected a dict modality name -> encoder inputs (plus 'label', "
            f"'present', 'valid'), got {type(batch).__name__}.")
    missing = [m for m in modalities if m not in batch]
    if missing:
        keys = sorted(k for k in batch if k not in RESERVED_KEYS)
        raise ValueError(
            f"batch: missing modality {missing[0]!r}, which the {who} needs (it encodes "
            f"{list(modalities)}; the batch has {keys}). Mark absent examples with "
            f"batch['present'][{missing[0]!r}] = False instead of leaving the modality out.")
    sizes = {}
    for m in modalities:
        leaves = jax.tree_util.tree_leaves(batch[m])
        if not leaves:
            raise ValueError(f"batch[{m!r}]: expected an array or a tuple of arrays, got "
                             f"{batch[m]!r}.")
        for leaf in leaves:
            check_array(f"batch[{m!r}]", leaf)
            if leaf.ndim == 0:
                raise ValueError(f"batch[{m!r}]: expected a leading batch axis, got a scalar.")
            sizes.setdefault(leaf.shape[0], m)
    if len(sizes) > 1:
        raise ValueError(
            f"batch: modalities disagree on the batch size: "
            f"{ {m: n for n, m in sizes.items()} }.")
    (size,) = sizes
    present = batch.get("present")
    if present is not None:
        if not isinstance(present, Mapping):
            raise TypeError(
                f"batch['present']: expected a dict modality -> bool [batch], got "
                f"{type(present).__name__}.")
        for m, flags in present.items():
            check_array(f"batch['present'][{m!r}]", flags, str(size), kind="bool")
    if batch.get("valid") is not None:
        check_array("batch['valid']", batch["valid"], str(size), kind="bool")
    return size


def _call_encoder(encoder: nnx.Module, inputs: Any) -> Any:
    if isinstance(inputs, (tuple, list)):
        return encoder(*inputs)
    return encoder(inputs)


def apply_presence(out: EncoderOutput, present: Array | None) -> EncoderOutput:
    """Marks the examples where a modality is absent in its encoder's output.

    This is how ``MultimodalClassifier`` applies ``batch["present"][m]``: the flag is
    AND-ed into every row of the mask, and the tokens at now-invalid positions and the
    pooled vectors of absent examples become zero. Zeroing is a selection
    (``jnp.where``), not a product, so NaN or Inf in an absent example cannot leak into
    the result or its gradients. The fusion layers' masking does the rest.

    Args:
      out: an encoder's output: tokens ``[batch, time, dim]``, bool mask
        ``[batch, time]``, pooled ``[batch, dim]``.
      present: bool ``[batch]``, False where the modality is absent; ``None`` means
        present everywhere.

    Returns:
      ``out`` itself when ``present`` is None, else a new ``EncoderOutput`` with mask
      ``out.mask & present[:, None]`` and zeros where that mask (tokens) or
      ``present`` (pooled) is False.
    """
    if present is None:
        return out
    mask = out.mask & present[:, None]
    tokens = jnp.where(mask[..., None], out.tokens, jnp.zeros((), out.tokens.dtype))
    pooled = jnp.where(present[:, None], out.pooled, jnp.zeros((), out.pooled.dtype))
    return EncoderOutput(tokens=tokens, mask=mask, pooled=pooled)


def encode_modalities(encoders: Mapping[str, nnx.Module], batch: Mapping[str, Any],
                      modalities: tuple[str, ...]) -> dict[str, EncoderOutput]:
    """Runs each encoder on its modality of ``batch`` and applies ``batch['present']``.

    The encoding half of ``MultimodalClassifier`` (and ``TwoTower``): for each ``m`` in
    ``modalities``, ``encoders[m](*batch[m])`` (or ``encoders[m](batch[m])`` for a
    single array), checked by ``EncoderOutput.validate``, then ``apply_presence`` with
    ``batch["present"][m]`` when the batch has that flag. Nothing is checked about the
    batch itself; ``MultimodalClassifier.check_batch`` does that.

    Args:
      encoders: modality name → encoder module returning an ``EncoderOutput``.
      batch: a batch dict (``lepton_mm.models``): modality name → that encoder's input(s)
        with a leading ``[batch]`` axis, plus an optional ``"present"``.
      modalities: the modalities to encode; each must be a key of ``encoders`` and of
        ``batch``.

    Returns:
      ``{m: EncoderOutput}`` for ``m`` in ``modalities``: tokens ``[batch, time, dim]``,
      mask ``[batch, time]``, pooled ``[batch, dim]``, with absence applied.

    Raises:
      TypeError: an encoder does not return an ``EncoderOutput``.
    """
    present = batch.get("present") or {}
    outputs = {}
    for m in modalities:
        out = _call_encoder(encoders[m], batch[m])
        if not isinstance(out, EncoderOutput):
            raise TypeError(
                f"encoders[{m!r}] returned {type(out).__name__}; encoders must return an "
                "EncoderOutput(tokens, mask, pooled).")
        outputs[m] = apply_presence(out.validate(m), present.get(m))
    return outputs


class PooledFusion(nnx.Module):
    """The unimodal "fusion": passes the single modality's pooled features through.

    Lets a unimodal baseline use exactly the classifier code path of a fused model.
    Absent examples get the zero vector. It has no parameters.

    Args:
      dims: ``{modality: dim}`` with exactly one entry (``dim`` may be None if unknown).
      out_dim: must equal that ``dim`` when given (the layer does not project).
      rngs: accepted (and ignored) for the ``lepton_mm.fusion.build`` signature.
    """

    def __init__(self, dims: Mapping[str, int | None], out_dim: int | None = None, *,
                 rngs: nnx.Rngs | None = None):
        del rngs
        if not isinstance(dims, Mapping) or len(dims) != 1:
            raise ValueError(
                f"dims: PooledFusion takes exactly one modality, got "
                f"{sorted(dims) if isinstance(dims, Mapping) else dims!r}; use a fusion "
                "layer from lepton_mm.fusion for several.")
        ((modality, dim),) = dims.items()
        self.modalities = (modality,)
        if dim is not None:
            dim = check_positive_int(f"dims[{modality!r}]", dim)
        self.dims = FrozenDict({modality: dim})
        if out_dim is not None and dim is not None and out_dim != dim:
            raise ValueError(
                f"out_dim: PooledFusion passes features through unchanged, so out_dim must "
                f"equal dims[{modality!r}]={dim}, got {out_dim}.")
        self.out_dim = dim if dim is not None else out_dim

    def __call__(self, inputs: Mapping[str, EncoderOutput]) -> Array:
        """Passes the single modality's pooled features through.

        Args:
          inputs: ``{modality: EncoderOutput}`` with the one modality of ``dims``.

        Returns:
          float ``[batch, dim]``: the pooled features, zeros where the modality is absent.
        """
        (m,) = self.modalities
        if m not in inputs:
            raise ValueError(f"inputs: missing modality {m!r}.")
        x = inputs[m]
        return jnp.where(x.present[:, None], x.pooled, jnp.zeros((), x.pooled.dtype))


class MultimodalClassifier(nnx.Module):
    """Late-fusion model: ``head(fusion({m: encoders[m](batch[m]) for m in encoders}))``.

    Each encoder is applied to its modality's inputs (see the module docstring for the
    batch format); its ``EncoderOutput`` has its mask AND-ed with ``batch['present'][m]``
    so absent examples reach the fusion layer as all-False mask rows. With a single
    encoder and ``fusion=None`` the pooled features go straight to the head
    (``PooledFusion``), so unimodal baselines share this code path.

    Args:
      encoders: modality name → encoder module returning ``EncoderOutput``.
      fusion: a fusion layer (``lepton_mm.fusion.build(...)``) mapping
        ``{m: EncoderOutput}`` → ``[batch, fused_dim]``; ``None`` for one modality.
      head: module mapping ``[batch, fused_dim]`` → the task's outputs (e.g. an
        ``nnx.Linear`` to class logits).

    Attributes:
      modalities: sorted modality names.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from lepton_mm.encoders import ImageCNN
      >>> rngs = nnx.Rngs(0)
      >>> model = MultimodalClassifier(
      ...     {"image": ImageCNN(1, dim=8, widths=(4,), rngs=rngs)},
      ...     fusion=None, head=nnx.Linear(8, 3, rngs=rngs))
      >>> model({"image": jnp.zeros((2, 8, 8, 1))}).shape
      (2, 3)
    """

    def __init__(self, encoders: Mapping[str, nnx.Module], fusion: nnx.Module | None,
                 head: nnx.Module):
        if not isinstance(encoders, Mapping):
            raise TypeError(
                f"encoders: expected a mapping modality name -> encoder, got "
                f"{type(encoders).__name__}.")
        self.modalities = _check_modality_names("encoders", encoders)
        for m in self.modalities:
            if not callable(encoders[m]):
                raise TypeError(f"encoders[{m!r}]: expected a module, got "
                                f"{type(encoders[m]).__name__}.")
        if fusion is None:
            if len(self.modalities) != 1:
                raise ValueError(
                    f"fusion: required for {len(self.modalities)} modalities "
                    f"{list(self.modalities)}; build one with lepton_mm.fusion.build.")
            (m,) = self.modalities
            dim = getattr(encoders[m], "dim", None)
            fusion = PooledFusion({m: dim if isinstance(dim, int) else None})
        fusion_modalities = getattr(fusion, "modalities", None)
        if fusion_modalities is not None and tuple(sorted(fusion_modalities)) != \
                self.modalities:
            raise ValueError(
                f"fusion: built for modalities {sorted(fusion_modalities)}, but the "
                f"encoders are for {list(self.modalities)}.")
        if not callable(head):
            raise TypeError(f"head: expected a module, got {type(head).__name__}.")
        self.encoders = nnx.Dict({m: encoders[m] for m in self.modalities})
        self.fusion = fusion
        self.head = head

    def check_batch(self, batch: Mapping[str, Any]) -> int:
        """Raises a clear error if ``batch`` lacks a modality; returns the batch size."""
        return check_batch(batch, self.modalities, who=type(self).__name__)

    def encode(self, batch: Mapping[str, Any]) -> dict[str, EncoderOutput]:
        """``{modality: EncoderOutput}`` with ``batch['present']`` applied to the masks."""
        self.check_batch(batch)
        return encode_modalities(self.encoders, batch, self.modalities)

    def __call__(self, batch: Mapping[str, Any], *, modality_dropout: float = 0.0,
                 key: Array | None = None) -> Array:
        """Encodes, fuses and applies the head.

        Args:
          batch: the batch dict (module docstring); only the modalities are read.
          modality_dropout: rate at which whole modalities are dropped per example
            (``lepton_mm.fusion.modality_dropout``; at least one modality is kept).
            Use during training only.
          key: PRNG key for modality dropout; required when ``modality_dropout > 0``.

        Returns:
          The head's output, e.g. float ``[batch, num_classes]`` logits.
        """
        encoded = self.encode(batch)
        if modality_dropout:
            if key is None:
                raise ValueError("key: modality_dropout > 0 needs a PRNG key.")
            encoded = dict(fusion_lib.modality_dropout(encoded, modality_dropout, key=key))
        return self.head(self.fusion(encoded))


def build_classifier(encoders: Mapping[str, nnx.Module], fusion: str | None, *,
                     num_outputs: int, fusion_dim: int | None = None, rngs: nnx.Rngs,
                     **fusion_kwargs: Any) -> MultimodalClassifier:
    """Builds a ``MultimodalClassifier`` with a registry fusion and a linear head.

    Args:
      encoders: modality name → encoder; each must expose its token size as ``.dim``.
      fusion: a name in ``lepton_mm.fusion.FUSIONS``, or ``None``/``"pooled"`` for the
        unimodal pass-through (one encoder only).
      num_outputs: head output size (classes, labels, or 1 for regression/binary).
      fusion_dim: fused feature size (``out_dim`` of the fusion layer); required for a
        registry fusion.
      rngs: parameter initialisation (and dropout) randomness.
      **fusion_kwargs: the fusion layer's own hyperparameters.

    Returns:
      The model, in training mode.

    Raises:
      ValueError: unknown fusion name (listing the known ones), bad sizes.
    """
    modalities = _check_modality_names("encoders", encoders)
    dims = {}
    for m in modalities:
        dim = getattr(encoders[m], "dim", None)
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise ValueError(f"encoders[{m!r}]: expected a `.dim` int attribute (the "
                             f"EncoderOutput feature size), got {dim!r}.")
        dims[m] = dim
    num_outputs = check_positive_int("num_outputs", num_outputs)
    if fusion in (None, "pooled"):
        layer: nnx.Module = PooledFusion(dims, fusion_dim)
    else:
        if fusion not in fusion_lib.FUSIONS:
            raise ValueError(f"Unrecognized fusion: {fusion!r}. Known fusions: "
                             f"{sorted(fusion_lib.FUSIONS)} (or 'pooled' for one modality).")
        if fusion_dim is None:
            raise ValueError(f"fusion_dim: required for fusion {fusion!r}.")
        layer = fusion_lib.build(fusion, dims, check_positive_int("fusion_dim", fusion_dim),
                                 rngs=rngs, **fusion_kwargs)
    head = nnx.Linear(layer.out_dim, num_outputs, rngs=rngs)
    return MultimodalClassifier(encoders, layer, head)
