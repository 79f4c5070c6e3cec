"""Where the PyTorch twin's train step spends its time: ``torch.profiler``, per aten op.

    python benchmarks/profile_torch_step.py                      # concat, batch 128
    python benchmarks/profile_torch_step.py --batch-size 40 --json /tmp/t40.json
    python benchmarks/profile_torch_step.py --quick --steps 2    # tiny models (the test)

The PyTorch half of ``profile_step.py``: the same model (``torch_models.build_twin`` of
``run.py``'s spec), batch and Adam step as ``run.py``'s ``train_step_*`` pairs, in a
process that imports no JAX (the spec comes from a ``run.py`` child process), with
glibc's allocator tuned and intra-op threads set as ``run.py`` does for both sides.
``--optimizer`` picks Adam's implementation (``run.py`` keeps the fastest of
``torch_models.EAGER_VARIANTS`` per run; ``fused`` won the concat pairs of the
2026-12-07 run).

Times ``--steps`` steps without the profiler, then profiles ``--steps`` more. The step
is split by ``record_function`` ranges into ``forward`` (model and loss), ``backward``
(``loss.backward()``) and ``update`` (zero_grad and ``opt.step()``), and every aten op's
self CPU time (the calling thread's wall time inside the op, its intra-op threads
included) is put in its range's phase and in one category by name:

* ``convolution``: the convolutions and their gradients (oneDNN or native);
* ``matmul``: linear layers, ``mm``/``bmm``/``addmm``, attention;
* ``batch norm``: batch-norm forward and backward;
* ``pooling``: max pooling and its gradient;
* ``activation``: ReLU/GELU and their gradients (``threshold_backward``);
* ``optimizer update``: every op of the update phase;
* ``other``: the rest (the loss, copies, fills, reshapes, autograd bookkeeping).

Unlike ``profile_step.py``'s op times, these self times never overlap (one calling
thread), so they sum to at most the step's wall time; ``unattributed_ms_per_step`` is
the rest (Python, dispatch outside any op).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import torch_models  # noqa: E402
from timing import time_calls  # noqa: E402

PHASES = ("forward", "backward", "update")
CATEGORIES = ("convolution", "matmul", "batch norm", "pooling", "activation",
              "optimizer update", "other")
_PATTERNS = (("convolution", ("conv",)),
             ("batch norm", ("batch_norm",)),
             ("pooling", ("pool",)),
             ("activation", ("relu", "threshold_backward", "gelu")),
             ("matmul", ("addmm", "::mm", "bmm", "matmul", "linear", "dot_product",
                         "attention")))


def category(name: str, phase: str) -> str:
    """The category of aten op ``name`` (e.g. ``aten::convolution_backward``)."""
    if phase == "update":
        return "optimizer update"
    lowered = name.lower()
    for label, keys in _PATTERNS:
        if any(key in lowered for key in keys):
            return label
    return "other"


def twin_spec(model: str, batch_size: int | None, quick: bool) -> dict[str, Any]:
    """``run.py``'s twin spec, from a child process (this one stays free of JAX)."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import run\n"
            "config = run.QUICK if sys.argv[3] == '1' else run.FULL\n"
            "bs = None if sys.argv[4] == 'none' else int(sys.argv[4])\n"
            "print(json.dumps(run.twin_spec(config, sys.argv[2], bs)))\n")
    out = subprocess.run(
        [sys.executable, "-c", code, str(HERE), model, "1" if quick else "0",
         "none" if batch_size is None else str(batch_size)],
        capture_output=True, text=True, check=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def make_step(model_name: str, spec: dict[str, Any], optimizer: str):
    """``torch_models.train_step``'s step with its three phases marked."""
    model = torch_models.build_twin(model_name, spec)
    batch = torch_models.random_batch(spec["batch_size"], spec["audio_frames"],
                                      spec["n_mels"], spec["num_classes"])
    images = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).contiguous()
    log_mel = torch.from_numpy(batch["audio"])
    labels = torch.from_numpy(batch["label"]).long()
    opt = torch_models._adam(model, spec["lr"], optimizer)
    model.train()

    def step() -> torch.Tensor:
        with torch.profiler.record_function("update"):
            opt.zero_grad(set_to_none=True)
        with torch.profiler.record_function("forward"):
            loss = F.cross_entropy(model(images, log_mel), labels)
        with torch.profiler.record_function("backward"):
            loss.backward()
        with torch.profiler.record_function("update"):
            opt.step()
        return loss

    return step


def _phase_of(event: Any) -> str | None:
    node = event
    while node is not None:
        if node.name in PHASES:
            return node.name
        node = node.cpu_parent
    return None


def profile(model_name: str, spec: dict[str, Any], *, optimizer: str, steps: int,
            warmup: int, top: int) -> dict[str, Any]:
    step = make_step(model_name, spec, optimizer)
    walls = time_calls(step, warmup, steps)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        traced_s = time.perf_counter() - t0
    by_phase = {p: dict.fromkeys(CATEGORIES, 0.0) for p in (*PHASES, "other")}
    ops: dict[tuple[str, str], float] = {}
    for event in prof.events():
        if event.name in PHASES or not event.name.startswith("aten::"):
            continue  # ranges, and autograd / profiler wrappers (their ops are aten::)
        phase = _phase_of(event) or "other"
        ms = event.self_cpu_time_total / 1e3 / steps
        by_phase[phase][category(event.name, phase)] += ms
        ops[(event.name, phase)] = ops.get((event.name, phase), 0.0) + ms
    attributed = sum(sum(c.values()) for c in by_phase.values())
    traced_ms = traced_s * 1e3 / steps
    return {
        "model": model_name, "batch_size": spec["batch_size"], "optimizer": optimizer,
        "threads": torch.get_num_threads(), "steps": steps,
        "wall_ms_per_step": {"median": statistics.median(walls) * 1e3,
                             "min": min(walls) * 1e3, "max": max(walls) * 1e3},
        "traced_ms_per_step": traced_ms,
        "phases": {p: {"ms_per_step": sum(c.values()),
                       "categories": {k: v for k, v in c.items() if v}}
                   for p, c in by_phase.items()},
        "categories": {k: sum(c[k] for c in by_phase.values()) for k in CATEGORIES},
        "attributed_ms_per_step": attributed,
        "unattributed_ms_per_step": traced_ms - attributed,
        "top_ops": [{"op": name, "phase": phase, "ms_per_step": ms}
                    for (name, phase), ms in sorted(ops.items(), key=lambda kv: -kv[1])[:top]],
    }


def format_table(result: dict[str, Any]) -> str:
    lines = [f"PyTorch {torch.__version__} {result['model']} batch {result['batch_size']}, "
             f"Adam {result['optimizer']}, {result['threads']} threads: "
             f"{result['wall_ms_per_step']['median']:.1f} ms/step unprofiled, "
             f"{result['traced_ms_per_step']:.1f} profiled",
             f"{'phase':10s} {'category':18s} {'ms/step':>8s}"]
    for phase, entry in result["phases"].items():
        if not entry["ms_per_step"]:
            continue
        lines.append(f"{phase:10s} {'(all)':18s} {entry['ms_per_step']:8.2f}")
        for name, ms in sorted(entry["categories"].items(), key=lambda kv: -kv[1]):
            lines.append(f"{'':10s} {name:18s} {ms:8.2f}")
    lines.append(f"{'':10s} {'unattributed':18s} {result['unattributed_ms_per_step']:8.2f}")
    lines.append("top op" + "".join(
        f"\n  {op['ms_per_step']:7.2f} ms  {op['phase']:8s} {op['op']}"
        for op in result["top_ops"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="concat",
                        choices=("concat", "low_rank", "cross_attention"))
    parser.add_argument("--batch-size", type=int, default=None,
                        help="default: run.py's (128; --quick: its quick size)")
    parser.add_argument("--optimizer", default="fused", choices=("for_loop", "foreach", "fused"))
    parser.add_argument("--steps", type=int, default=10, help="timed and profiled steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--top", type=int, default=15, help="ops listed")
    parser.add_argument("--quick", action="store_true", help="run.py's tiny models")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    tuned = torch_models._tune_glibc_malloc()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    spec = twin_spec(args.model, args.batch_size, args.quick)
    result = profile(args.model, spec, optimizer=args.optimizer, steps=args.steps,
                     warmup=args.warmup, top=args.top)
    result.update(quick=args.quick, allocator_tuned=tuned,
                  jax_modules=torch_models._jax_modules(),
                  torch_version=torch.__version__,
                  mkldnn_enabled=torch.backends.mkldnn.enabled,
                  command=" ".join([Path(sys.executable).name, *sys.argv]))
    print(format_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
