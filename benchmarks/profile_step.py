"""Where a train step's time goes: a ``jax.profiler`` trace of ``run.py``'s step, per HLO op.

    python benchmarks/profile_step.py                        # concat, batch 128
    python benchmarks/profile_step.py --model cross_attention --json /tmp/p.json
    python benchmarks/profile_step.py --batch-size 40 --trace-dir /tmp/trace_b40
    python benchmarks/profile_step.py --quick --steps 2      # tiny models (the test)

Builds the step ``benchmarks/run.py`` times for its ``train_step_*`` pairs (its model
builder, its Adam step over the split state, its random batch), compiles it, warms it
up, times ``--steps`` calls without the profiler (blocking on the whole state, as
``run.py`` does), then traces ``--steps`` more calls with ``jax.profiler.trace``.

The trace is parsed with ``jax.profiler.ProfileData``: every XLA:CPU thunk of the
step's module is an event on the ``/host:CPU`` plane carrying ``hlo_op`` (the HLO
instruction's name in the optimised module), ``hlo_module`` and ``run_id`` (one per
call). Each op is matched to the compiled module's text (``compiled.as_text()``) to get
its opcodes (a fusion's: those of its fused computation) and its JAX ``op_name``, and
put in one category:

* ``matmul``: a dot or convolution, alone or fused with layout ops only (most of
  YNNPACK's ``ynn_fusion``s);
* ``matmul + fused ops``: a dot or convolution with arithmetic or reductions fused in
  (YNNPACK fuses an attention score dot with its softmax, for example);
* ``optimizer update``: any other op of the update phase (below): Adam's moments and
  the parameter update;
* ``gather/scatter/dynamic-slice``: the gather-style im2col and its scatter-add gradient;
* ``reduce``: reductions, reduce-window, select-and-scatter (batch-norm statistics,
  max pooling and its gradient, the loss, bias gradients);
* ``slice/pad/concatenate``: fusions of slices, pads and concatenations with layout ops
  only: the shifted-slice im2col (slices stacked by a concatenate), padding;
* ``elementwise on slices``: slices, pads or concatenations with arithmetic fused in
  (the first conv layer as multiply-adds of shifted slices, and its gradient);
* ``copy/transpose``: copies, transposes and layout changes only;
* ``elementwise``: the remaining fusions (batch-norm normalisation, ReLU, masks);
* ``other``: anything else (custom calls, control flow, ops not found in the text).

Categories are checked in that order, so a fusion lands in the first one it matches.
Each op also gets a phase from its JAX ``op_name`` (``phase``, ``hlo_ops``): ``forward``
(``jvp(``), ``backward`` (``transpose(``), ``update`` (the rest of the step function:
the optimizer) or ``other`` (no JAX op: parameter copies). Shares are of the summed op
time: XLA:CPU runs independent thunks concurrently on its threads, so that sum can
exceed the step's wall time (``concurrency`` = op time / traced wall time);
``idle_ms_per_step`` is the traced time in which no op of the step ran (dispatch,
executor bookkeeping, waiting for a CPU).

Prints a table; ``--json`` writes everything, with the machine (CPU model, ISA flags)
and the load. The raw trace stays in ``--trace-dir`` (default: a new temporary folder)
for TensorBoard's profile plugin (``tensorboard --logdir DIR``) or, with
``--perfetto``, as ``perfetto_trace.json.gz`` for https://ui.perfetto.dev; the compiled
module's text is saved beside it as ``hlo.txt``, to look the ops up.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import run  # noqa: E402  (benchmarks/run.py: the models, the step, the batch)

CATEGORIES = ("matmul", "matmul + fused ops", "optimizer update",
              "gather/scatter/dynamic-slice", "reduce", "slice/pad/concatenate",
              "elementwise on slices", "copy/transpose", "elementwise", "other")
PHASES = ("forward", "backward", "update", "other")
_MATMUL = {"dot", "convolution"}
_GATHER = {"gather", "scatter", "dynamic-slice", "dynamic-update-slice"}
_REDUCE = {"reduce", "reduce-window", "select-and-scatter"}
_SLICE = {"slice", "pad", "concatenate"}
_LAYOUT = {"copy", "transpose", "bitcast", "reshape", "broadcast", "parameter", "constant",
           "tuple", "get-tuple-element", "iota"}
_CONTROL = {"while", "conditional", "call", "custom-call", "sort", "rng",
            "rng-bit-generator", "all-reduce", "infeed", "outfeed"}
#: An op without a JAX op_name takes the phase of its operands, in this priority.
_PHASE_RANK = {"update": 3, "backward": 2, "forward": 1, "other": 0}

_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+) = .*? ([a-z][a-z0-9\-]*)\((.*)$")
_NAME = re.compile(r"%([\w.\-]+)")
_CALLS = re.compile(r"calls=%([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="((?:[^"\\]|\\.)*)"')


# ----------------------------------------------------------------------------------------
# The compiled module: what each HLO op is.


def phase(op_name: str) -> str:
    """``forward`` / ``backward`` / ``update`` / ``other`` from a JAX ``op_name``: inside
    ``value_and_grad`` ops are named ``jit(f)/jvp(...)/...`` (forward) or
    ``jit(f)/transpose(jvp(...))/...`` (backward); the rest of the step function (the
    optimizer) is ``jit(f)/...``; parameter copies carry no JAX op."""
    if "transpose(" in op_name:
        return "backward"
    if "jvp(" in op_name:
        return "forward"
    if op_name.startswith("jit("):
        return "update"
    return "other"


def hlo_ops(hlo_text: str) -> dict[str, dict[str, Any]]:
    """Every instruction of an HLO module's text (``compiled.as_text()``).

    Returns ``{name: {"opcode", "opcodes", "op_name", "phase"}}``: ``opcodes`` are a
    fusion's fused opcodes (the instruction's own otherwise), ``op_name`` the JAX op of
    its metadata (a fusion without one: the most frequent in its fused computation;
    ``""`` if none). ``phase``: the latest of the phases of those op names (update >
    backward > forward, since a fusion that recomputes forward values inside the
    backward pass is backward work); an op with no JAX op (XLA's rewrites, such as the
    kernel gradient of a strided first layer) takes the latest phase of its operands.
    """
    computations: dict[str, dict[str, Any]] = {}
    instructions: dict[str, dict[str, Any]] = {}
    current: dict[str, Any] | None = None
    for line in hlo_text.splitlines():
        if current is None:
            match = _COMPUTATION.match(line)
            if match:
                current = computations[match.group(1)] = {"opcodes": set(), "op_names": []}
            continue
        if line.startswith("}"):
            current = None
            continue
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, opcode, rest = match.groups()
        op_name = _OP_NAME.search(line)
        op_name = op_name.group(1) if op_name else ""
        current["opcodes"].add(opcode)
        if op_name:
            current["op_names"].append(op_name)
        calls = _CALLS.search(rest)
        instructions[name] = {"opcode": opcode, "op_name": op_name,
                              "calls": calls.group(1) if calls else None,
                              "operands": _NAME.findall(rest)}
    for info in instructions.values():  # text order: operands come first
        fused = computations.get(info.pop("calls")) if info["opcode"] == "fusion" else None
        names = [info["op_name"]] if info["op_name"] else []
        if fused:
            info["opcodes"] = sorted(fused["opcodes"] - {"parameter", "constant"}
                                     or {"fusion"})
            names += fused["op_names"]
            if not info["op_name"] and fused["op_names"]:
                info["op_name"] = Counter(fused["op_names"]).most_common(1)[0][0]
        else:
            info["opcodes"] = [info["opcode"]]
        phases = [phase(n) for n in names] or [
            instructions[o]["phase"] for o in info["operands"] if o in instructions
            and "phase" in instructions[o]]
        info["phase"] = max(phases, key=_PHASE_RANK.__getitem__, default="other")
    for info in instructions.values():
        del info["operands"]
    return instructions


def category(info: dict[str, Any] | None) -> str:
    """The category of one HLO op (an ``hlo_ops`` entry; ``None``: not in the module).

    The first that matches: a dot or convolution (``matmul + fused ops`` when other
    arithmetic is fused with it, e.g. YNNPACK's dot + softmax); else the optimizer's phase; else a
    gather, scatter or dynamic slice; else a reduction; else slices, pads or
    concatenations, alone with layout ops or with arithmetic fused in (``elementwise
    on slices``, e.g. a first conv layer computed as multiply-adds of shifted slices);
    else only layout ops; else control flow or custom calls; else elementwise.
    """
    if info is None:
        return "other"
    ops = set(info["opcodes"])
    if ops & _MATMUL:
        return "matmul" if ops <= _MATMUL | _LAYOUT else "matmul + fused ops"
    if info["phase"] == "update":
        return "optimizer update"
    if ops & _GATHER:
        return "gather/scatter/dynamic-slice"
    if ops & _REDUCE:
        return "reduce"
    if ops & _SLICE:
        return "slice/pad/concatenate" if ops <= _SLICE | _LAYOUT else "elementwise on slices"
    if ops <= _LAYOUT:
        return "copy/transpose"
    if ops & _CONTROL:
        return "other"
    return "elementwise"


# ----------------------------------------------------------------------------------------
# The trace.


def op_events(xplane: Path, module: str) -> list[dict[str, Any]]:
    """The XLA:CPU op events of ``module`` in one ``*.xplane.pb`` file."""
    data = jax.profiler.ProfileData.from_file(str(xplane))
    events = []
    for plane in data.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        for line in plane.lines:
            for event in line.events:
                stats = dict(event.stats)
                if stats.get("hlo_module") != module or "hlo_op" not in stats:
                    continue
                events.append({"op": stats["hlo_op"], "run_id": stats.get("run_id"),
                               "thread": line.name, "start_ns": event.start_ns,
                               "duration_ns": event.duration_ns})
    return events


def _union_ns(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def aggregate(events: list[dict[str, Any]], ops: dict[str, dict[str, Any]], *,
              top: int = 20) -> dict[str, Any]:
    """Per-op, per-category and per-phase time of the traced steps (``events`` from
    ``op_events``; one ``run_id`` per step)."""
    steps: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for event in events:
        steps[event["run_id"]].append(event)
    n = len(steps)
    if n == 0:
        raise RuntimeError("the trace holds no op event of the step's module")
    spans, busy = [], []
    for step_events in steps.values():
        intervals = [(e["start_ns"], e["start_ns"] + e["duration_ns"]) for e in step_events]
        spans.append(max(b for _, b in intervals) - min(a for a, _ in intervals))
        busy.append(_union_ns(intervals))
    per_op: dict[str, dict[str, Any]] = {}
    for event in events:
        entry = per_op.setdefault(event["op"], {"ns": 0.0, "calls": 0})
        entry["ns"] += event["duration_ns"]
        entry["calls"] += 1
    total_ns = sum(e["ns"] for e in per_op.values())
    by_category = dict.fromkeys(CATEGORIES, 0.0)
    by_phase = dict.fromkeys(PHASES, 0.0)
    rows = []
    for name, entry in per_op.items():
        info = ops.get(name)
        cat = category(info)
        ph = info["phase"] if info else "other"
        by_category[cat] += entry["ns"]
        by_phase[ph] += entry["ns"]
        rows.append({"op": name, "category": cat, "phase": ph,
                     "opcodes": info["opcodes"] if info else [],
                     "jax_op": info["op_name"] if info else "",
                     "calls_per_step": entry["calls"] / n,
                     "ms_per_step": entry["ns"] / n / 1e6,
                     "share": entry["ns"] / total_ns})
    rows.sort(key=lambda r: -r["ms_per_step"])
    ms = lambda ns: ns / n / 1e6
    traced_wall = statistics.median(spans) / 1e6
    op_ms = ms(total_ns)
    return {
        "steps_traced": n,
        "ops_in_module": len(ops),
        "ops_executed": len(per_op),
        "op_time_ms_per_step": op_ms,
        "traced_wall_ms_per_step": traced_wall,
        "concurrency": op_ms / traced_wall if traced_wall else None,
        "idle_ms_per_step": statistics.median(s - b for s, b in zip(spans, busy,
                                                                     strict=True)) / 1e6,
        "categories": {c: {"ms_per_step": ms(v), "share": v / total_ns}
                       for c, v in by_category.items()},
        "phases": {p: {"ms_per_step": ms(v), "share": v / total_ns}
                   for p, v in by_phase.items()},
        "top_ops": rows[:top],
    }


# ----------------------------------------------------------------------------------------
# Running the step.


def machine() -> dict[str, Any]:
    """The CPU (model, the ISA flags that pick XLA:CPU's kernels), threads and load."""
    isa = run._isa()
    return {
        "cpu_model": run._cpu_model(),
        "isa": isa,
        "avx2": bool(isa and isa["avx2"]),
        "avx512f": bool(isa and isa["avx512f"]),
        "amx": bool(isa and isa["amx_tile"]),
        "cpu_affinity": run._threads(),
        "xla_flags": os.environ.get("XLA_FLAGS"),
        "jax_devices": [str(d) for d in jax.devices()],
        "versions": {d: run._version(d) for d in ("jax", "jaxlib", "flax", "optax")},
        "git_commit": run._git_commit(),
    }


def _newest_xplane(trace_dir: Path, before: set[Path]) -> Path:
    files = set(trace_dir.glob("plugins/profile/*/*.xplane.pb")) - before
    if not files:
        raise RuntimeError(f"jax.profiler.trace wrote no .xplane.pb under {trace_dir}")
    return max(files, key=lambda p: p.stat().st_mtime)


def profile(model: str, config: dict[str, Any], *, batch_size: int, steps: int,
            warmup: int, trace_dir: Path, top: int = 20, bf16: bool = False,
            perfetto: bool = False) -> dict[str, Any]:
    """Times ``steps`` calls of ``run.py``'s train step, then traces ``steps`` more and
    aggregates the trace (``aggregate``)."""
    step, state = run.lepton_train_step(run.build_lepton_model(model, config),
                                        jnp.bfloat16 if bf16 else None)
    batch = {k: jnp.asarray(v) for k, v in run._train_batch(config, batch_size).items()}
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    text = compiled.as_text()
    module = re.match(r"HloModule ([\w.\-]+)", text).group(1)
    ops = hlo_ops(text)
    (trace_dir / "hlo.txt").write_text(text)
    holder = {"state": state}

    def call() -> float:
        begin = time.perf_counter()
        holder["state"], loss = compiled(holder["state"], batch)
        jax.block_until_ready((holder["state"], loss))  # the whole state, as run.py
        return time.perf_counter() - begin

    for _ in range(warmup):
        call()
    load_start = run._load()
    times = [call() for _ in range(steps)]
    before = set(trace_dir.glob("plugins/profile/*/*.xplane.pb"))
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0  # XLA's op events need only the host tracer
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=perfetto,
                            profiler_options=options):
        traced = [call() for _ in range(steps)]
    xplane = _newest_xplane(trace_dir, before)
    result = aggregate(op_events(xplane, module), ops, top=top)
    if result["steps_traced"] != steps:
        raise RuntimeError(f"traced {steps} steps, found {result['steps_traced']} run ids")
    return {
        "model": model, "batch_size": batch_size,
        "dtype": "bfloat16 compute, float32 master weights" if bf16 else "float32",
        "quick": config["quick"], "hlo_module": module, "compile_s": compile_s,
        "warmup": warmup, "steps": steps,
        "wall_ms_per_step": {"median": 1e3 * statistics.median(times),
                             "min": 1e3 * min(times), "times_ms": [1e3 * t for t in times]},
        "profiled_wall_ms_per_step": 1e3 * statistics.median(traced),
        "load_avg_1m": [load_start, run._load()],
        "trace_dir": str(trace_dir), "xplane": str(xplane),
        **result,
    }


def format_table(result: dict[str, Any]) -> str:
    m = result["machine"]
    isa = ", ".join(f for f in ("avx2", "avx512f", "amx") if m[f]) or "none of avx2/avx512f/amx"
    wall = result["wall_ms_per_step"]
    lines = [
        f"{result['model']}, batch {result['batch_size']}, {result['dtype']}"
        f"{' (quick sizes)' if result['quick'] else ''}: {m['cpu_model']} ({isa}), "
        f"{m['cpu_affinity']} CPUs, load {result['load_avg_1m'][0]} -> "
        f"{result['load_avg_1m'][1]}",
        f"wall {wall['median']:.1f} ms/step (min {wall['min']:.1f}) without the profiler, "
        f"{result['profiled_wall_ms_per_step']:.1f} under it; traced: "
        f"{result['traced_wall_ms_per_step']:.1f} ms from first to last op, "
        f"op time {result['op_time_ms_per_step']:.1f} ms (concurrency "
        f"{result['concurrency']:.2f}), no op running {result['idle_ms_per_step']:.1f} ms; "
        f"{result['ops_executed']} ops",
        "",
        f"{'category':<30} {'ms/step':>9} {'share':>7}",
    ]
    for name, c in sorted(result["categories"].items(), key=lambda kv: -kv[1]["share"]):
        lines.append(f"{name:<30} {c['ms_per_step']:>9.2f} {100 * c['share']:>6.1f}%")
    lines.append("")
    lines.append(f"{'phase':<30} {'ms/step':>9} {'share':>7}")
    for name, c in result["phases"].items():
        lines.append(f"{name:<30} {c['ms_per_step']:>9.2f} {100 * c['share']:>6.1f}%")
    lines.append("")
    lines.append(f"{'top op':<34} {'category':<29} {'phase':<8} {'ms/step':>8} "
                 f"{'share':>6}  jax op")
    for r in result["top_ops"]:
        jax_op = r["jax_op"].split("/")[-1] if r["jax_op"] else ""
        lines.append(f"{r['op'][:34]:<34} {r['category']:<29} {r['phase']:<8} "
                     f"{r['ms_per_step']:>8.2f} {100 * r['share']:>5.1f}%  {jax_op}")
    lines.append("")
    lines.append(f"trace: {result['trace_dir']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="concat", choices=run.TRAIN_MODELS)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="default: run.py's (128; --quick: its quick size)")
    parser.add_argument("--steps", type=int, default=10, help="timed and traced steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--top", type=int, default=20, help="ops listed")
    parser.add_argument("--quick", action="store_true", help="run.py's tiny models")
    parser.add_argument("--bf16", action="store_true",
                        help="bfloat16 compute (run.py's train_step_*_bf16 step)")
    parser.add_argument("--trace-dir", type=Path, help="default: a new temporary folder")
    parser.add_argument("--perfetto", action="store_true",
                        help="also write perfetto_trace.json.gz in the trace folder")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--no-tune-allocator", action="store_true",
                        help="leave glibc malloc at its defaults (run.py's tune_allocator)")
    args = parser.parse_args(argv)

    tuned = not args.no_tune_allocator and run.tune_allocator()
    config = run.QUICK if args.quick else run.FULL
    batch_size = config["batch_size"] if args.batch_size is None else args.batch_size
    trace_dir = args.trace_dir or Path(tempfile.mkdtemp(prefix="profile_step_"))
    trace_dir.mkdir(parents=True, exist_ok=True)
    result = profile(args.model, config, batch_size=batch_size, steps=args.steps,
                     warmup=args.warmup, trace_dir=trace_dir, top=args.top,
                     bf16=args.bf16, perfetto=args.perfetto)
    result["machine"] = {**machine(), "allocator_tuned": tuned}
    result["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    print(format_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
