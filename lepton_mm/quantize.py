"""Post-training int8 quantisation of a trained model through qwix, and its QAT option.

``quantize(model, *example_inputs)`` returns a copy of ``model`` whose weights are
stored as int8 with one float32 scale per output channel: symmetric absmax calibration,
``scale = max|w| / 127.5`` over each output channel (qwix's int8 bound) and ``q =
round(w / scale)`` saturated to [-128, 127]. Biases, batch-norm parameters and
statistics stay float32. Where each layer goes:

* **Matmuls and einsums** (Linear layers of fusion layers, heads and encoder
  projections; attention): qwix's post-training quantisation (``qwix.PtqProvider``, via
  ``qwix.quantize_model``) replaces each kernel with a ``QArray`` (int8 ``qvalue`` +
  float32 ``scale``) and runs the matmul on it. With ``activations=True`` their inputs
  are quantised too (dynamic range: int8 per token, computed at run time; an int8 x
  int8 matmul).
* **Convolutions** (the CNN encoders' blocks, the temporal convolutions of
  ``CrossAttentionFusion``): each ``nnx.Conv`` is replaced by a ``QuantizedConv``, its
  kernel quantised by ``qwix.quantize`` (the same int8 per-channel numerics; nothing is
  rounded by hand here), stored as int8 and dequantised to float32 when it runs.
  Storage shrinks fourfold; the convolution still computes in float32 (weight-only) and
  its inputs are not quantised, with or without ``activations``.
* ``keep_float=["fusion", ...]`` leaves modules in float32, e.g. one with an op qwix
  cannot quantise (``MultiplicativeFusion``'s three-operand einsum: qwix 0.1.8 handles
  two operands only, and says so).

Why the convolutions are not qwix's (qwix 0.1.8): qwix intercepts calls of
``jax.lax.dot_general`` / ``conv_general_dilated`` / ``jnp.einsum`` and takes an
operand for a weight when it is an ``nnx.Param`` of the module whose method is running,
and only on the right-hand side. The CNN encoders run each block as one fused
computation (``lepton_mm.encoders._conv.conv_block``, see docs/performance.md) that
reads ``conv.kernel`` without calling the conv and multiplies ``kernel^T @ patches``:
the kernel is the *left* operand and the running module is the encoder, which holds no
``Param`` itself, so qwix sees two activations and would leave the kernel float32
without a word. The first block (one input channel) has no matmul at all (``k*k``
shifted multiply-adds). And where a conv is called (``nnx.Conv.__call__``: the
encoders' layer-by-layer reference path, ``CrossAttentionFusion``), qwix's PTQ
convolution needs the activations quantised to the same type as the weights: it has no
weight-only int8 convolution and refuses one.

The quantised model is an ordinary NNX module: ``lepton_mm.export.save`` writes it
(int8 tensors stay int8 in ``weights.safetensors``) and ``lepton_mm.export.load`` runs it
without its code.

Quantisation-aware training: ``quantization_aware(model, *example_inputs)`` returns a
copy whose qwix-reachable layers fake-quantise their weights (and activations) in the
forward pass with a straight-through gradient (``qwix.QtProvider``); train it with
``fit`` as usual, then ``quantize`` it. Convolutions are not fake-quantised during QAT,
for the reasons above.

References:
  Jacob et al., "Quantization and Training of Neural Networks for Efficient
  Integer-Arithmetic-Only Inference", CVPR 2018 (per-channel symmetric int8, QAT).
  qwix: https://github.com/google/qwix
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lepton_mm._validation import check_modalities
from lepton_mm.encoders.audio_cnn import AudioSpectrogramCNN
from lepton_mm.encoders.image_cnn import ImageCNN

Array = jax.Array

__all__ = ["QuantizedConv", "quantization_aware", "quantize"]

# Encoders whose fused blocks read their convs' kernels directly (qwix must stay out).
_CNN_ENCODERS = (ImageCNN, AudioSpectrogramCNN)

# nnx.Conv's configuration, which QuantizedConv keeps so that nnx.Conv.__call__ runs on it.
_CONV_CONFIG = ("kernel_shape", "in_features", "out_features", "kernel_size", "strides",
                "padding", "input_dilation", "kernel_dilation", "feature_group_count",
                "use_bias", "dtype", "param_dtype", "precision", "conv_general_dilated",
                "promote_dtype", "preferred_element_type")


def _qwix() -> Any:
    try:
        import qwix
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "lepton_mm.quantize needs qwix: pip install 'lepton_mm[quant]' (or "
            "pip install qwix).") from e
    return qwix


class QuantizedConv(nnx.Module):
    """An ``nnx.Conv`` whose kernel is stored int8, one float32 scale per output channel.

    Built from a float ``nnx.Conv`` by ``qwix.quantize`` (symmetric absmax per output
    channel: ``scale = max|w| / 127.5``, ``qvalue = round(w / scale)``). ``kernel``
    returns the dequantised float32 kernel ``qvalue * scale``, so the CNN encoders'
    fused blocks and ``nnx.Conv``'s own forward pass (``__call__``) run unchanged on it.

    Args:
      conv: the float convolution (no ``mask``).

    Attributes:
      qvalue: ``nnx.Param``, int8 ``[*kernel_size, c_in, c_out]``.
      scale: ``nnx.Param``, float32 ``[1, ..., 1, c_out]``.
      bias: the conv's float ``[c_out]`` bias, or None.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> conv = nnx.Conv(2, 3, (3, 3), rngs=nnx.Rngs(0))
      >>> q = QuantizedConv(conv)
      >>> q.qvalue.dtype, q.scale.shape
      (dtype('int8'), (1, 1, 1, 3))
      >>> bool(jnp.allclose(q(jnp.ones((1, 5, 5, 2))), conv(jnp.ones((1, 5, 5, 2))),
      ...                   atol=0.05))
      True
    """

    def __init__(self, conv: nnx.Conv):
        if not isinstance(conv, nnx.Conv):
            raise TypeError(f"conv: expected an nnx.Conv, got {type(conv).__name__}.")
        if conv.mask is not None:
            raise TypeError("conv: a masked nnx.Conv (conv.mask) is not supported.")
        kernel = conv.kernel[...]
        q = _qwix().quantize(kernel, jnp.int8, channelwise_axes=(kernel.ndim - 1,))
        self.qvalue = nnx.Param(q.qvalue)
        self.scale = nnx.Param(q.scale.astype(jnp.float32))
        self.bias = nnx.Param(conv.bias[...]) if conv.bias is not None else nnx.data(None)
        self.mask = None
        for name in _CONV_CONFIG:
            setattr(self, name, getattr(conv, name))

    @property
    def kernel(self) -> Array:
        """The dequantised kernel, float32 ``[*kernel_size, c_in, c_out]``."""
        qwix = _qwix()
        return qwix.dequantize(qwix.QArray(qvalue=self.qvalue[...], scale=self.scale[...]))

    def __call__(self, inputs: Array) -> Array:
        """``nnx.Conv``'s forward pass with the dequantised kernel.

        Args:
          inputs: float ``[batch, *spatial, c_in]`` (channels last, as ``nnx.Conv``).

        Returns:
          float ``[batch, *spatial', c_out]``.
        """
        return nnx.Conv.__call__(self, inputs)


def _check_modalities(model: nnx.Module, modalities: Sequence[str] | None) -> tuple[
        str, ...] | None:
    """``modalities`` as a tuple of names of ``model.encoders`` (None: all)."""
    if modalities is None:
        return None
    encoders = getattr(model, "encoders", None)
    if encoders is None:
        given = [modalities] if isinstance(modalities, str) else list(modalities)
        raise ValueError(f"modalities: {given} given, but the model "
                         f"({type(model).__name__}) has no .encoders by modality.")
    return check_modalities("modalities", modalities, encoders)


def _path(path: tuple) -> str:
    return "/".join(map(str, path))


def _float_prefixes(model: nnx.Module, modalities: tuple[str, ...] | None,
                    keep_float: Sequence[str]) -> tuple[str, ...]:
    """Module paths kept float32: ``keep_float`` (checked) and unselected encoders."""
    if isinstance(keep_float, str):
        keep_float = (keep_float,)
    paths = {_path(path) for path, _ in nnx.iter_modules(model)}
    for prefix in keep_float:
        if not isinstance(prefix, str) or prefix not in paths:
            shown = sorted(p for p in paths if p and p.count("/") < 2)
            raise ValueError(f"keep_float: no module at path {prefix!r}; module paths "
                             f"include {shown}.")
    out = tuple(keep_float)
    if modalities is not None:
        out += tuple(f"encoders/{m}" for m in model.encoders if m not in modalities)
    return out


def _under(path: str, prefixes: Sequence[str]) -> bool:
    return any(path == p or path.startswith(p + "/") or p == "" for p in prefixes)


def _rules(model: nnx.Module, floats: tuple[str, ...], activations: bool,
           rule_type: Any) -> list[Any]:
    """qwix rules: nothing inside a CNN encoder's own frame (its fused blocks) or under a
    float prefix; int8 weights (and activations) for every other matmul and einsum.
    Convolutions are never qwix's (``QuantizedConv`` stores them)."""
    skip = [re.escape(_path(path)) for path, module in nnx.iter_modules(model)
            if isinstance(module, _CNN_ENCODERS)]
    skip += [re.escape(p) + "(/.*)?" for p in floats]
    rules = [rule_type(module_path=pattern, weight_qtype=None) for pattern in skip]
    rules.append(rule_type(module_path=".*", op_names=("dot_general", "einsum"),
                           weight_qtype=jnp.int8, act_qtype=jnp.int8 if activations else None))
    return rules


def _checked_floats(model: Any, example_inputs: tuple[Any, ...],
                    modalities: Sequence[str] | None,
                    keep_float: Sequence[str]) -> tuple[str, ...]:
    """``quantize``'s and ``quantization_aware``'s argument checks; the float prefixes."""
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model: expected an nnx.Module, got {type(model).__name__}.")
    if not example_inputs:
        raise ValueError("example_inputs: qwix needs one call's inputs (e.g. a batch).")
    return _float_prefixes(model, _check_modalities(model, modalities), keep_float)


def _quantize_convs(model: nnx.Module, floats: tuple[str, ...]) -> None:
    """Replaces, in place, every ``nnx.Conv`` outside ``floats`` by a ``QuantizedConv``."""
    convs = [(path, module) for path, module in nnx.iter_modules(model)
             if isinstance(module, nnx.Conv) and not _under(_path(path), floats)]
    for path, conv in convs:
        parent = model
        for key in path[:-1]:
            parent = parent[key] if isinstance(parent, (nnx.List, nnx.Dict)) else getattr(
                parent, key)
        if isinstance(parent, (nnx.List, nnx.Dict)):
            parent[path[-1]] = QuantizedConv(conv)
        else:
            setattr(parent, path[-1], QuantizedConv(conv))


def quantize(
    model: nnx.Module,
    *example_inputs: Any,
    activations: bool = False,
    modalities: Sequence[str] | None = None,
    keep_float: Sequence[str] = (),
) -> nnx.Module:
    """A copy of ``model`` (e.g. a trained ``MultimodalClassifier``) with int8 weights.

    Per output channel int8 weights in every matmul and einsum qwix reaches (Linear,
    attention and fusion layers) and, through ``QuantizedConv``, in every convolution
    (module docstring: why those are a weight-only fallback). Also converts a model from
    ``quantization_aware`` after its training.

    Args:
      model: an NNX model called as ``model(*example_inputs)``. Not modified.
      *example_inputs: one call's inputs (e.g. a batch dict); the model runs once on
        them (compiled, in eval mode) while qwix finds and converts its layers. Values
        do not matter.
      activations: also quantise the inputs of the qwix-quantised matmuls to int8
        (dynamic range, per token); the convolutions stay weight-only.
      modalities: the encoders to quantise, by modality (``model.encoders``); the
        fusion layer and the head are quantised unless in ``keep_float``. Default: all.
      keep_float: module paths (``"fusion"``, ``"encoders/text"``, ``"head"``) left in
        float32 with everything under them: for a layer with an op qwix cannot
        quantise, e.g. ``MultiplicativeFusion``'s three-operand einsum.

    Returns:
      The quantised copy, in eval mode; its state holds int8 ``qvalue`` and float32
      ``scale`` arrays in place of the float kernels.

    Raises:
      TypeError: ``model`` is not an NNX module.
      ValueError: no ``example_inputs``; ``modalities`` names an encoder the model does
        not have; ``keep_float`` names no module; qwix cannot quantise an op of the
        model (the message names it and suggests ``keep_float``).
      ImportError: qwix is not installed (``pip install 'lepton_mm[quant]'``).

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from lepton_mm.encoders import ImageCNN
      >>> from lepton_mm.models import MultimodalClassifier
      >>> rngs = nnx.Rngs(0)
      >>> model = MultimodalClassifier({"image": ImageCNN(1, dim=8, widths=(4, 8),
      ...                                                 rngs=rngs)},
      ...                              fusion=None, head=nnx.Linear(8, 3, rngs=rngs))
      >>> batch = {"image": jnp.ones((2, 8, 8, 1))}
      >>> q = quantize(model, batch)
      >>> q.head.kernel.array.qvalue.dtype, q.encoders["image"].convs[1].qvalue.dtype
      (dtype('int8'), dtype('int8'))
      >>> q(batch).shape
      (2, 3)
    """
    qwix = _qwix()
    floats = _checked_floats(model, example_inputs, modalities, keep_float)
    copy = nnx.clone(model)
    copy.eval()
    _quantize_convs(copy, floats)
    provider = qwix.PtqProvider(_rules(copy, floats, activations, qwix.QuantizationRule))
    quantized = qwix.quantize_model(copy, provider, *example_inputs, skip_nnx_init=True)
    # qwix converts the weights during the model's first call; one compiled call instead
    # of an op-by-op one (the new int8 state comes out of nnx.jit with the module).
    try:
        nnx.jit(_call)(quantized, *example_inputs)
    except ValueError as e:
        if "Unsupported" not in str(e):
            raise
        raise ValueError(f"model: qwix cannot quantise an op of this model ({e}); leave "
                         "the module that holds it in float32 with keep_float=[its path], "
                         "e.g. keep_float=['fusion'].") from e
    return quantized


def _call(model: nnx.Module, *inputs: Any) -> Any:
    return model(*inputs)


def quantization_aware(
    model: nnx.Module,
    *example_inputs: Any,
    activations: bool = False,
    modalities: Sequence[str] | None = None,
    keep_float: Sequence[str] = (),
) -> nnx.Module:
    """A copy of ``model`` that trains with int8 fake quantisation (QAT, through qwix).

    The layers ``quantize`` hands to qwix (Linear and einsum) quantise and dequantise
    their weights per output channel (and, with ``activations``, their inputs per token)
    in every forward pass, with a straight-through gradient, so training adapts the
    weights to int8. Train the copy with ``fit`` (train and eval mode both simulate
    int8), then call ``quantize`` on it with the same ``modalities`` and
    ``keep_float``. Convolutions are not fake-quantised (see the module docstring).

    Args:
      model: an NNX model called as ``model(*example_inputs)``. Not modified.
      *example_inputs: one call's inputs (qwix's NNX interface asks for them; with
        dynamic-range scales nothing is run ahead of training).
      activations: also fake-quantise the matmul inputs.
      modalities: the encoders to include, by modality (default: all).
      keep_float: module paths left in float32 (as in ``quantize``).

    Returns:
      The QAT copy, in the mode ``model`` was in; its parameters are ``model``'s.

    Raises:
      TypeError: ``model`` is not an NNX module.
      ValueError: no ``example_inputs``, an unknown name in ``modalities``, or a
        ``keep_float`` path that names no module.
      ImportError: qwix is not installed.
    """
    qwix = _qwix()
    floats = _checked_floats(model, example_inputs, modalities, keep_float)
    provider = qwix.QtProvider(_rules(model, floats, activations, qwix.QtRule))
    # Nothing to convert ahead of training (dynamic-range scales): no first call.
    return qwix.quantize_model(model, provider, *example_inputs, skip_nnx_init=True)

