"""What each train-step optimisation buys, measured in one process (docs/performance.md).

    python benchmarks/ablation.py [--model concat] [--repeats 10]
    python benchmarks/ablation.py --no-tune-allocator   # the same with glibc defaults

Variants of the AV-MNIST train step (batch 128), timed interleaved after warm-up:

* ``reference``: the encoders' layer-by-layer path (``nnx.Conv`` = ``lax.conv``,
  batch norm, ReLU, window pooling), jitted over the split state.
* ``fused``: the default path (``lepton_mm.encoders._conv.conv_block``), same step.
* ``fused_nnx_jit``: the default path under ``nnx.jit`` + ``nnx.Optimizer`` (the
  straightforward NNX step) instead of ``jax.jit`` over ``nnx.split`` state.
* ``pytorch``: the PyTorch twin, when torch is installed.

Prints one JSON line per variant: compile seconds and median / min / max step seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax.numpy as jnp
import optax
import run
from flax import nnx


def _nnx_jit_step(model):
    opt = nnx.Optimizer(model, optax.adam(run.LEARNING_RATE), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, batch):
        loss, grads = nnx.value_and_grad(run.lepton_models.loss_fn)(model, batch)
        opt.update(model, grads)
        return loss

    return lambda batch: step(model, opt, batch)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="concat", choices=("concat", "low_rank"))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-tune-allocator", action="store_true")
    args = parser.parse_args(argv)
    tuned = not args.no_tune_allocator and run.tune_allocator()
    config = run.FULL
    batch = run._train_batch(config)
    jax_batch = {k: jnp.asarray(v) for k, v in batch.items()}
    sides, compile_s = {}, {}

    def add_jax(name, build):
        step, state = run.lepton_train_step(build())
        start = time.perf_counter()
        step.lower(state, jax_batch).compile()
        compile_s[name] = time.perf_counter() - start
        holder = {"state": state}

        def call():
            holder["state"], loss = step(holder["state"], jax_batch)
            loss.block_until_ready()

        sides[name] = call

    with run._reference_encoders():
        add_jax("reference", lambda: run.build_lepton_model(args.model, config))
    add_jax("fused", lambda: run.build_lepton_model(args.model, config))
    nnx_step = _nnx_jit_step(run.build_lepton_model(args.model, config))
    start = time.perf_counter()
    nnx_step(jax_batch).block_until_ready()
    compile_s["fused_nnx_jit"] = time.perf_counter() - start  # includes one step
    sides["fused_nnx_jit"] = lambda: nnx_step(jax_batch).block_until_ready()
    torch = run._torch()
    if not isinstance(torch, str):
        sides["pytorch"] = run.torch_train_step(
            torch, run.build_torch_model(torch, args.model, config), batch)
    load = os.getloadavg()[0]
    times = run.interleave(sides, warmup=2, repeats=args.repeats)
    for name, ts in times.items():
        print(json.dumps({
            "variant": name, "model": args.model, "allocator_tuned": tuned,
            "compile_s": round(compile_s[name], 2) if name in compile_s else None,
            "median_s": round(statistics.median(ts), 4), "min_s": round(min(ts), 4),
            "max_s": round(max(ts), 4), "load_avg_1m": [load, os.getloadavg()[0]],
        }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
