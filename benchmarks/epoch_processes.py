"""One AV-MNIST epoch per framework, each side in a process of its own.

``benchmarks/run.py``'s ``epoch_avmnist`` runs both sides in one process, one after the
other. Measured on 2026-12-07 (2-core AMD EPYC, quiet) that protocol slows the PyTorch
loop by a third (96-102 s per epoch there against 64-75 s in a process of its own) while
lepton_mm's epoch barely moves, so its ratio (1.12x) flatters lepton_mm. A user runs one
framework per process; this script measures that: each side is a fresh interpreter that
builds the data (``make_data``, not timed), warms up on two batches (lepton_mm compiles
there) and times one epoch of batch ``--batch-size`` with the validation pass, as
``epoch_avmnist`` does. Sides alternate A B B A. Both processes tune glibc malloc (as
``run.py`` and the experiment scripts do) and use every CPU of the affinity mask.
``--steps-per-call K`` adds a third side, lepton_mm's ``fit(steps_per_call=K)`` (K steps
per compiled call), in the order A B C C B A.

    python benchmarks/epoch_processes.py --repeats 2 --json benchmarks/results/X.json
    python benchmarks/epoch_processes.py --repeats 2 --steps-per-call 8
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from lepton_mm.experiment import machine_info

ROOT = Path(__file__).resolve().parents[1]
PEER = ROOT / "benchmarks" / "peers" / "multibench_avmnist.py"


def one_side(side: str, batch_size: int, steps_per_call: int = 1,
             num_train: int | None = None, num_val: int | None = None) -> dict:
    """Runs in the child: one warm-up and one timed epoch of ``side`` (``num_train`` /
    ``num_val``: the first examples only, for tests; default the full split)."""
    from lepton_mm.training import tune_glibc_malloc

    tune_glibc_malloc()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import run as bench  # imports JAX: make_data needs it on both sides anyway

    from lepton_mm.recipes import avmnist

    sizes = {k: v for k, v in (("num_train", num_train), ("num_val", num_val))
             if v is not None}
    config = avmnist.AVMNISTConfig(methods=("concat",), seeds=(0,), robustness=False,
                                   progress=False, **sizes)
    data = avmnist.make_data(config)
    warm = {"train": bench._head(data["train"], 2 * batch_size), "val": data["val"]}
    if side.startswith("lepton_mm"):
        k = steps_per_call if side != "lepton_mm" else 1
        cold = bench._lepton_epoch(avmnist, config, warm, batch_size, k)
        timed = bench._lepton_epoch(avmnist, config, data, batch_size, k)
        seconds, extra = timed["seconds"], {"cold_compile_s": cold["compile_s"],
                                            "compile_s": timed["compile_s"],
                                            "val_accuracy": timed["val_accuracy"]}
    else:
        import torch

        torch.set_num_threads(len(os.sched_getaffinity(0)))
        spec = importlib.util.spec_from_file_location("_peer_avmnist", PEER)
        peer = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(peer)
        kw = {"method": "concat", "batch_size": batch_size, "epochs": 1,
              "include_validation": True}
        peer.epoch_throughput(warm, **kw)
        start = time.perf_counter()
        peer.epoch_throughput(data, **kw)
        seconds = time.perf_counter() - start
        extra = {"torch_num_threads": torch.get_num_threads()}
    n = len(data["train"]["label"])
    return {"side": side, "seconds": seconds, "examples_per_s": n / seconds,
            "load_avg_1m": os.getloadavg()[0], **extra}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2, help="epochs per side")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--steps-per-call", type=int, default=None, metavar="K",
                        help="also time fit(steps_per_call=K) as a third side")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--num-train", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--num-val", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side:  # the child
        print(json.dumps(one_side(args.side, args.batch_size, args.steps_per_call or 1,
                                  args.num_train, args.num_val)))
        return 0
    if args.batch_size < 1 or args.repeats < 1:
        parser.error("--batch-size and --repeats: expected positive integers")
    if args.steps_per_call is not None and args.steps_per_call < 2:
        parser.error("--steps-per-call: expected an integer >= 2")
    order = ["lepton_mm", "pytorch"]
    if args.steps_per_call:
        order.append(f"lepton_mm_k{args.steps_per_call}")
    runs: dict[str, list[dict]] = {side: [] for side in order}
    for i in range(args.repeats):
        for side in order if i % 2 == 0 else order[::-1]:  # A B B A (A B C C B A)
            proc = subprocess.run(
                [sys.executable, __file__, "--side", side, "--batch-size",
                 str(args.batch_size), "--steps-per-call", str(args.steps_per_call or 1)],
                capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                sys.exit(f"{side} failed:\n{proc.stderr[-3000:]}")
            runs[side].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"{side:9s} {runs[side][-1]['seconds']:7.1f} s  "
                  f"{runs[side][-1]['examples_per_s']:6.1f} examples/s", flush=True)
    ours = [r["seconds"] for r in runs["lepton_mm"]]
    theirs = [r["seconds"] for r in runs["pytorch"]]
    result = {
        "batch_size": args.batch_size, "repeats": args.repeats,
        "cpu": machine_info(), "runs": runs,
        "ratio": statistics.median(theirs) / statistics.median(ours),
        "ratio_paired": [b / a for a, b in zip(ours, theirs, strict=True)],
        "definition": "lepton_mm examples/s over PyTorch examples/s, medians; each epoch "
                      "in a fresh process after a two-batch warm-up; validation included"}
    if args.steps_per_call:
        chunked = [r["seconds"] for r in runs[order[2]]]
        result["steps_per_call"] = args.steps_per_call
        result["ratio_steps_per_call"] = statistics.median(theirs) / statistics.median(chunked)
        result["speedup_steps_per_call"] = [a / c for a, c in zip(ours, chunked, strict=True)]
        print(f"fit(steps_per_call={args.steps_per_call}) vs fit: "
              f"{[round(x, 3) for x in result['speedup_steps_per_call']]}")
    print(f"ratio {result['ratio']:.2f}x (paired {[round(r, 2) for r in result['ratio_paired']]})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
