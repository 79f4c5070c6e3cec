"""PyTorch twins of the lepton_mm models that ``run.py`` trains side by side.

Each class mirrors one lepton_mm module layer for layer: same shapes, same parameter
count (``run.py`` asserts it), batch norm in training mode, float32. They are written
the way a PyTorch user would write them (NCHW convolutions, ``nn.BatchNorm2d``,
``nn.MaxPool2d``, ``F.scaled_dot_product_attention``), not as transliterations of the
JAX code, so the comparison is against idiomatic PyTorch.

Only imported when torch is installed (``pip install -e '.[bench]'``). Imports no JAX:
``run.py`` starts this file as a script for the PyTorch memory, cold-start and
per-process train-step probes (``python benchmarks/torch_models.py --probe
memory|cold_start|train_step SPEC.json``), so that the PyTorch process holds none of
lepton_mm's stack.
"""

from __future__ import annotations

import time

_MODULE_START = time.perf_counter()  # the cold-start probe reports its import time

import ctypes  # noqa: E402
import ctypes.util  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from timing import time_calls  # noqa: E402  (benchmarks/, even when run by path)


def _block(c_in: int, c_out: int, kernel: int, *, ceil_mode: bool) -> nn.Sequential:
    """conv ("same", no bias) -> BatchNorm2d -> ReLU -> 2x2 max pool."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(c_out, eps=1e-5, momentum=0.1),
        nn.ReLU(),
        nn.MaxPool2d(2, ceil_mode=ceil_mode),
    )


class LeNetImage(nn.Module):
    """``ImageCNN.lenet()``: widths 6, 12, 24, 48 (5x5 then 3x3), floor pooling.

    ``forward(images [b, 1, 28, 28]) -> pooled [b, 48]`` (the one remaining cell).
    """

    def __init__(self, in_channels: int = 1, channels: int = 6, additional_layers: int = 3):
        super().__init__()
        widths = [channels * 2**i for i in range(additional_layers + 1)]
        kernels = [5] + [3] * additional_layers
        self.blocks = nn.Sequential(*[
            _block(c_in, c_out, k, ceil_mode=False)
            for c_in, c_out, k in zip([in_channels, *widths[:-1]], widths, kernels,
                                      strict=True)
        ])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.blocks(images)  # [b, 48, h, w]
        return x.mean(dim=(2, 3))  # tokens are the h*w cells; pooled = their mean


class LeNetAudio(nn.Module):
    """``AudioSpectrogramCNN.lenet(64)``: widths 12 ... 384, ceil pooling on both axes.

    ``forward(log_mel [b, time, mels]) -> pooled [b, 384]``: frequency averaged after the
    last block, then time averaged (all frames valid).
    """

    def __init__(self, n_mels: int = 64, channels: int = 12, additional_layers: int = 5):
        super().__init__()
        widths = [channels * 2**i for i in range(additional_layers + 1)]
        kernels = [5] + [3] * additional_layers
        freq = n_mels
        for _ in widths:  # lepton_mm pools frequency by 2 while more than one bin is left
            if freq <= 1:
                raise ValueError("this twin assumes frequency is pooled in every block")
            freq = -(-freq // 2)
        self.blocks = nn.Sequential(*[
            _block(c_in, c_out, k, ceil_mode=True)
            for c_in, c_out, k in zip([1, *widths[:-1]], widths, kernels, strict=True)
        ])

    def forward(self, log_mel: torch.Tensor) -> torch.Tensor:
        x = self.blocks(log_mel.unsqueeze(1))  # [b, 384, time', freq']
        return x.mean(dim=3).mean(dim=2)


class ConcatFusion(nn.Module):
    """``fusion.build("concat", dims, out_dim)``: concat pooled (sorted names) -> Linear."""

    def __init__(self, dims: dict[str, int], out_dim: int):
        super().__init__()
        self.names = sorted(dims)
        self.linear = nn.Linear(sum(dims.values()), out_dim)

    def forward(self, pooled: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.linear(torch.cat([pooled[m] for m in self.names], dim=1))


class LowRankFusion(nn.Module):
    """``fusion.build("low_rank", dims, out_dim, rank=r)`` (LMF, Liu et al. 2018)."""

    def __init__(self, dims: dict[str, int], out_dim: int, rank: int = 4):
        super().__init__()
        self.names = sorted(dims)
        self.factors = nn.ParameterList([
            nn.Parameter(torch.randn(rank, dims[m] + 1, out_dim) * 0.05) for m in self.names
        ])
        self.fusion_weights = nn.Parameter(torch.randn(rank) * 0.5)
        self.bias = nn.Parameter(torch.zeros(out_dim))

    def forward(self, pooled: dict[str, torch.Tensor]) -> torch.Tensor:
        prod = None
        for factor, m in zip(self.factors, self.names, strict=True):
            z = pooled[m]
            z = torch.cat([torch.ones_like(z[:, :1]), z], dim=1)
            f = torch.einsum("bd,rdo->bro", z, factor)
            prod = f if prod is None else prod * f
        return torch.einsum("r,bro->bo", self.fusion_weights, prod) + self.bias


class AVClassifier(nn.Module):
    """Image LeNet + audio LeNet -> fusion -> Linear head (``build_classifier`` twin).

    ``image`` / ``audio``: the LeNets' ``(channels, additional_layers)``.
    """

    def __init__(self, fusion: str, *, fusion_dim: int = 64, num_classes: int = 10,
                 n_mels: int = 64, rank: int = 4, image: tuple[int, int] = (6, 3),
                 audio: tuple[int, int] = (12, 5)):
        super().__init__()
        self.image = LeNetImage(1, *image)
        self.audio = LeNetAudio(n_mels, *audio)
        dims = {"audio": audio[0] * 2**audio[1], "image": image[0] * 2**image[1]}
        if fusion == "concat":
            self.fusion = ConcatFusion(dims, fusion_dim)
        elif fusion == "low_rank":
            self.fusion = LowRankFusion(dims, fusion_dim, rank=rank)
        else:
            raise ValueError(f"Unrecognized fusion: {fusion!r}.")
        self.head = nn.Linear(fusion_dim, num_classes)

    def forward(self, images: torch.Tensor, log_mel: torch.Tensor) -> torch.Tensor:
        pooled = {"audio": self.audio(log_mel), "image": self.image(images)}
        return self.head(self.fusion(pooled))


# ----------------------------------------------------------------------------------------
# MulT (lepton_mm.fusion.CrossAttentionFusion) and the linear token "encoders".


def _valid_positions(mask: torch.Tensor) -> torch.Tensor:
    return (torch.cumsum(mask.to(torch.int32), dim=1) - 1).clamp_min(0)


def _sinusoidal(positions: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    scale = math.log(10000.0) / max(half - 1, 1)
    freqs = torch.exp(-scale * torch.arange(half, dtype=torch.float32))
    angles = positions.to(torch.float32)[..., None] * freqs
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class _Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x, context, context_mask):
        b, tq, d = x.shape
        tk = context.shape[1]
        h = self.num_heads
        context = context * context_mask[..., None]
        q = self.query(x).view(b, tq, h, d // h).transpose(1, 2)
        k = self.key(context).view(b, tk, h, d // h).transpose(1, 2)
        v = self.value(context).view(b, tk, h, d // h).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=context_mask[:, None, None, :])
        y = self.out(y.transpose(1, 2).reshape(b, tq, d))
        return y * context_mask.any(dim=1)[:, None, None]


class _Block(nn.Module):
    """Pre-LN block: x + attn(LN(x), LN_kv(context)); x + W2 gelu(W1 LN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, cross: bool):
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim, eps=1e-6)
        self.context_norm = nn.LayerNorm(dim, eps=1e-6) if cross else None
        self.attention = _Attention(dim, num_heads)
        self.mlp_norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp_in = nn.Linear(dim, mlp_dim)
        self.mlp_out = nn.Linear(mlp_dim, dim)

    def forward(self, x, mask, context=None, context_mask=None):
        h = self.attention_norm(x)
        if self.context_norm is not None:
            kv, kv_mask = self.context_norm(context), context_mask
        else:
            kv, kv_mask = h, mask
        x = x + self.attention(h, kv, kv_mask)
        return x + self.mlp_out(F.gelu(self.mlp_in(self.mlp_norm(x))))


class _Stack(nn.Module):
    def __init__(self, layers: int, dim: int, num_heads: int, mlp_dim: int, cross: bool):
        super().__init__()
        self.layers = nn.ModuleList(
            [_Block(dim, num_heads, mlp_dim, cross) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x, mask, context=None, context_mask=None):
        for layer in self.layers:
            x = layer(x, mask, context, context_mask)
        return self.norm(x)


def _last_valid(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    index = torch.where(mask, torch.arange(mask.shape[1])[None, :], 0).amax(dim=1)
    picked = x[torch.arange(x.shape[0]), index]
    return picked * mask.any(dim=1)[:, None]


class CrossAttentionFusion(nn.Module):
    """``fusion.build("cross_attention", dims, out_dim, ...)`` with dropout off.

    Conv1d projection (no bias) * sqrt(width) + sinusoidal positions; a cross-modal
    stack per (target, source) pair; a self-attention stack per target over the
    concatenated branches; the last valid token; MulT's residual output block.
    """

    def __init__(self, dims: dict[str, int], out_dim: int, *, width: int = 32,
                 num_layers: int = 2, num_self_layers: int = 1, num_heads: int = 2,
                 mlp_dim: int | None = None, kernel_size: int = 1):
        super().__init__()
        self.names = sorted(dims)
        self.width = width
        mlp_dim = 4 * width if mlp_dim is None else mlp_dim
        others = len(self.names) - 1
        self.projections = nn.ModuleDict({
            m: nn.Conv1d(dims[m], width, kernel_size, padding=kernel_size // 2, bias=False)
            for m in self.names
        })
        self.cross = nn.ModuleDict({
            t: nn.ModuleDict({s: _Stack(num_layers, width, num_heads, mlp_dim, True)
                              for s in self.names if s != t})
            for t in self.names
        })
        self.self_attention = nn.ModuleDict({
            t: _Stack(num_self_layers, others * width, num_heads, others * mlp_dim, False)
            for t in self.names
        })
        combined = len(self.names) * others * width
        self.head_in = nn.Linear(combined, combined)
        self.head_hidden = nn.Linear(combined, combined)
        self.head_out = nn.Linear(combined, out_dim)

    def forward(self, tokens: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]):
        embedded = {}
        for m in self.names:
            x = tokens[m] * masks[m][..., None]
            h = self.projections[m](x.transpose(1, 2)).transpose(1, 2) * math.sqrt(self.width)
            h = h + _sinusoidal(_valid_positions(masks[m]), self.width)
            embedded[m] = h * masks[m][..., None]
        pooled = []
        for t in self.names:
            branches = []
            for s in self.names:
                if s == t:
                    continue
                h = self.cross[t][s](embedded[t], masks[t], embedded[s], masks[s])
                branches.append(h * masks[s].any(dim=1)[:, None, None])
            h = self.self_attention[t](torch.cat(branches, dim=-1), masks[t])
            pooled.append(_last_valid(h, masks[t]))
        h = torch.cat(pooled, dim=-1)
        return self.head_out(h + self.head_hidden(F.relu(self.head_in(h))))


class AttentionClassifier(nn.Module):
    """Linear token "encoders" -> MulT fusion -> Linear head.

    Image ``[b, 1, 28, 28]`` -> 4x4 patches -> 49 tokens via ``Linear(16, width)``;
    log-mel ``[b, time, mels]`` -> one token per frame via ``Linear(mels, width)``.
    """

    def __init__(self, *, width: int = 32, n_mels: int = 64, patch: int = 4,
                 fusion_dim: int = 64, num_classes: int = 10, **fusion_kwargs):
        super().__init__()
        self.patch = patch
        self.image = nn.Linear(patch * patch, width)
        self.audio = nn.Linear(n_mels, width)
        self.fusion = CrossAttentionFusion({"audio": width, "image": width}, fusion_dim,
                                           width=width, **fusion_kwargs)
        self.head = nn.Linear(fusion_dim, num_classes)

    def forward(self, images: torch.Tensor, log_mel: torch.Tensor) -> torch.Tensor:
        b, _, hgt, wid = images.shape
        p = self.patch
        patches = images.reshape(b, hgt // p, p, wid // p, p).permute(0, 1, 3, 2, 4)
        patches = patches.reshape(b, (hgt // p) * (wid // p), p * p)
        tokens = {"audio": self.audio(log_mel), "image": self.image(patches)}
        masks = {m: torch.ones(t.shape[:2], dtype=torch.bool) for m, t in tokens.items()}
        return self.head(self.fusion(tokens, masks))


def param_count(model: nn.Module) -> int:
    """Trainable parameters (BatchNorm running statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------
# Train steps, variants and the JAX-free probes ``run.py`` starts as subprocesses.

#: The eager PyTorch variants ``run.py`` tries before timing a pair; the fastest is
#: timed against lepton_mm (and, compiled, becomes the ``torch.compile`` peer).
#: ``for_loop`` is ``torch.optim.Adam``'s default on CPU tensors (one tensor at a time).
EAGER_VARIANTS: dict[str, dict] = {
    "for_loop": {"optimizer": "for_loop", "channels_last": False},
    "foreach": {"optimizer": "foreach", "channels_last": False},
    "fused": {"optimizer": "fused", "channels_last": False},
    "fused_channels_last": {"optimizer": "fused", "channels_last": True},
}


def random_batch(batch_size: int, frames: int, n_mels: int, num_classes: int = 10,
                 seed: int = 0) -> dict[str, np.ndarray]:
    """The benchmark's random batch (``run.py`` asserts its own copy is identical)."""
    rng = np.random.default_rng(seed)
    return {
        "image": rng.random((batch_size, 28, 28, 1), dtype=np.float32),
        "audio": rng.standard_normal((batch_size, frames, n_mels), dtype=np.float32) * 10
        - 40,
        "label": rng.integers(0, num_classes, batch_size).astype(np.int32),
    }


def build_twin(name: str, spec: dict) -> nn.Module:
    """The twin of ``run.py``'s model ``name`` from a plain (JSON) spec, seed 0.

    ``spec``: ``n_mels``, ``fusion_dim``, ``num_classes``, ``rank``, ``image`` /
    ``audio`` (the LeNets' ``[channels, additional_layers]``) and ``attention``
    (``CrossAttentionFusion`` hyperparameters, dropout off).
    """
    torch.manual_seed(0)
    if name == "cross_attention":
        attention = spec["attention"]
        if attention["dropout"] or attention["attention_dropout"]:
            raise ValueError("the PyTorch MulT twin has no dropout; benchmark with it off.")
        kwargs = {k: v for k, v in attention.items()
                  if k not in ("width", "dropout", "attention_dropout")}
        return AttentionClassifier(width=attention["width"], n_mels=spec["n_mels"],
                                   fusion_dim=spec["fusion_dim"],
                                   num_classes=spec["num_classes"], **kwargs)
    return AVClassifier(name, fusion_dim=spec["fusion_dim"], num_classes=spec["num_classes"],
                        n_mels=spec["n_mels"], rank=spec["rank"], image=tuple(spec["image"]),
                        audio=tuple(spec["audio"]))


def _adam(model: nn.Module, lr: float, optimizer: str) -> torch.optim.Optimizer:
    kwargs = {"for_loop": {"foreach": False}, "foreach": {"foreach": True},
              "fused": {"fused": True}}[optimizer]
    return torch.optim.Adam(model.parameters(), lr=lr, **kwargs)


def train_step(model: nn.Module, batch: dict[str, np.ndarray], *, lr: float,
               optimizer: str = "for_loop", channels_last: bool = False,
               compiled: bool = False, autocast: bool = False):
    """One training step as a PyTorch user writes it: zero_grad, forward,
    cross-entropy, backward, Adam. Returns ``step() -> loss``.

    ``optimizer``: Adam's implementation (``for_loop``: the CPU default, ``foreach``,
    ``fused``); ``channels_last``: model and images in NHWC memory format (the convs'
    oneDNN path); ``compiled``: the whole step under ``torch.compile`` (inductor,
    static shapes; compiles on the first call); ``autocast``: the forward and the loss
    under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (mixed precision; float32
    parameters and optimizer).
    """
    images = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).contiguous()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    log_mel = torch.from_numpy(batch["audio"])
    labels = torch.from_numpy(batch["label"]).long()
    opt = _adam(model, lr, optimizer)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(model(images, log_mel), labels)
        loss.backward()
        opt.step()
        return loss

    if compiled:
        torch._dynamo.reset()  # each compiled pair starts from empty dynamo caches
        return torch.compile(step, dynamic=False)
    return step


def flop_count(model: nn.Module, batch: dict[str, np.ndarray]) -> float:
    """``torch.utils.flop_counter``'s count of one forward + backward (matmuls and
    convolutions only; the optimizer and elementwise ops are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    images = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).contiguous()
    log_mel = torch.from_numpy(batch["audio"])
    labels = torch.from_numpy(batch["label"]).long()
    model.train()
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(images, log_mel), labels).backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def _jax_modules() -> list[str]:
    """Top-level JAX-stack modules loaded in this process (the probes assert none)."""
    return sorted({m.split(".")[0] for m in sys.modules
                   if m.split(".")[0] in ("jax", "jaxlib", "flax", "optax", "lepton_mm")})


def _peak_rss_kib() -> float:
    """``VmHWM`` (this address space's peak RSS) in KiB; see ``run._peak_rss_kib``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1])
    except OSError:
        pass
    import resource

    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_probe(spec: dict) -> dict:
    """Peak RSS of building the twin and running 1 + ``steps`` eager steps (the memory
    half of ``run.py``'s ``memory`` entry; glibc's default allocator)."""
    kib = _peak_rss_kib
    batch = random_batch(spec["batch_size"], spec["audio_frames"], spec["n_mels"],
                         spec["num_classes"])
    run = train_step(build_twin(spec["model"], spec), batch, lr=spec["lr"],
                     **spec.get("variant", {}))
    before = kib()
    run()
    first = kib()
    reset = _reset_peak_rss()
    for _ in range(spec["steps"]):
        run()
    out = {"peak_rss_mb": max(first, kib()) / 1024, "rss_before_steps_mb": before / 1024,
           "peak_rss_first_step_mb": first / 1024}
    if reset:
        out["peak_rss_steady_steps_mb"] = kib() / 1024
    return out


def cold_start(spec: dict) -> dict:
    """First call of a fresh process: ``train_step`` (build the twin, first step:
    compile + first batch under ``compiled``) or ``sentence_encoder`` (load the
    model, encode the first batch)."""
    t0 = time.perf_counter()
    if spec["kind"] == "train_step":
        batch = random_batch(spec["batch_size"], spec["audio_frames"], spec["n_mels"],
                             spec["num_classes"])
        model = build_twin(spec["model"], spec)
        run = train_step(model, batch, lr=spec["lr"], **spec.get("variant", {}))
        t1 = time.perf_counter()
        run()
        t2 = time.perf_counter()
        run()
        t3 = time.perf_counter()
        return {"setup_s": t1 - t0, "first_call_s": t2 - t1, "second_call_s": t3 - t2}
    from sentence_transformers import SentenceTransformer

    texts = spec["texts"]
    t_import = time.perf_counter()
    model = SentenceTransformer(spec["model_folder"], device="cpu")
    t1 = time.perf_counter()
    model.encode(texts, batch_size=len(texts), convert_to_numpy=True)
    t2 = time.perf_counter()
    model.encode(texts, batch_size=len(texts), convert_to_numpy=True)
    t3 = time.perf_counter()
    return {"library_import_s": t_import - t0, "setup_s": t1 - t0, "first_call_s": t2 - t1,
            "second_call_s": t3 - t2}


def _tune_glibc_malloc(top_pad: int = 64 << 20) -> bool:
    """``lepton_mm.training.allocator.tune_glibc_malloc``, repeated here because
    importing ``lepton_mm.training`` imports JAX: one malloc arena, no heap trimming, no
    mmap threshold, ``top_pad`` bytes of slack. False where this is not glibc."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # M_ARENA_MAX, M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_TOP_PAD (malloc.h)
    settings = ((-8, 1), (-1, 2**31 - 1), (-3, 2**31 - 1), (-2, int(top_pad)))
    return all(mallopt(key, value) == 1 for key, value in settings)




def _timed(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "times_s": [round(t, 6) for t in times]}


def train_step_probe(spec: dict) -> dict:
    """The PyTorch side of one of ``run.py``'s train-step pairs, alone in this process.

    As ``run.py``'s in-process ``_torch_sides``: every ``EAGER_VARIANTS`` entry (no
    channels_last for cross_attention) runs 2 warm-up and ``variant_repeats`` timed
    steps and the fastest is kept (a variant that fails is recorded with its error);
    then ``warmup`` untimed and ``repeats`` timed steps of it. With ``compile``, that
    variant's whole step under ``torch.compile`` too: the first call (compilation and
    one step) is ``compile_s``, then ``warmup`` + ``repeats`` as eager. ``autocast``:
    bfloat16 autocast on every run.
    """
    name, autocast = spec["model"], bool(spec.get("autocast", False))
    batch = random_batch(spec["batch_size"], spec["audio_frames"], spec["n_mels"],
                         spec["num_classes"])
    variants: dict[str, dict] = {}
    best, best_run = None, None
    for label, variant in EAGER_VARIANTS.items():
        if variant["channels_last"] and name == "cross_attention":
            variants[label] = {**variant, "skipped": "no 4-d activations"}
            continue
        try:
            run = train_step(build_twin(name, spec), batch, lr=spec["lr"],
                             autocast=autocast, **variant)
            variants[label] = {**variant,
                               **_timed(time_calls(run, 2, spec["variant_repeats"]))}
        except Exception as err:  # a variant this build cannot run is reported
            variants[label] = {**variant, "error": f"{type(err).__name__}: {err}"[:2000]}
            continue
        if best is None or variants[label]["median_s"] < variants[best]["median_s"]:
            best, best_run = label, run
        run = None  # only the fastest variant's model and optimizer stay alive
    if best is None:
        raise RuntimeError(f"{name}: no eager PyTorch variant ran: {variants}")
    out = {"variants": variants, "eager": best, "autocast": autocast,
           "pytorch_eager": {"variant": best, **_timed(
               time_calls(best_run, spec["warmup"], spec["repeats"]))}}
    del best_run
    if not spec.get("compile"):
        return out
    compiled: dict = {"variant": best, **EAGER_VARIANTS[best], "mode": "default",
                      "dynamic": False, "backend": "inductor"}
    try:
        run = train_step(build_twin(name, spec), batch, lr=spec["lr"], compiled=True,
                         autocast=autocast, **EAGER_VARIANTS[best])
        start = time.perf_counter()
        run()
        compiled["compile_s"] = time.perf_counter() - start  # the first call
        compiled.update(_timed(time_calls(run, spec["warmup"], spec["repeats"])))
    except Exception as err:  # e.g. no C++ compiler: recorded, the eager side stands
        compiled["error"] = f"{type(err).__name__}: {err}"[:2000]
    out["pytorch_compiled"] = compiled
    return out


PROBES = {"memory": memory_probe, "cold_start": cold_start, "train_step": train_step_probe}


def _probe_main(argv: list[str]) -> int:
    """``python torch_models.py --probe memory|cold_start|train_step SPEC.json``: runs
    the probe in this fresh, JAX-free process and prints one JSON line (``jax_modules``:
    the JAX stack's modules loaded here; must be empty, asserted). ``tune_allocator`` in
    the spec: glibc malloc tuned first, as ``run.py`` tunes its own process."""
    import json

    import_start = time.perf_counter()
    if len(argv) != 4 or argv[1] != "--probe" or argv[2] not in PROBES:
        print(_probe_main.__doc__, file=sys.stderr)
        return 2
    kind, path = argv[2], argv[3]
    with open(path) as f:
        spec = json.load(f)
    tuned = bool(spec.get("tune_allocator")) and _tune_glibc_malloc()
    torch.set_num_threads(spec["threads"])
    out = PROBES[kind](spec)
    out["allocator_tuned"] = tuned
    out["jax_modules"] = _jax_modules()
    out["torch_num_threads"] = torch.get_num_threads()
    out["imports_s"] = import_start - _MODULE_START
    print(json.dumps(out))
    if out["jax_modules"]:
        print(f"the PyTorch probe imported {out['jax_modules']}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(_probe_main(sys.argv))
