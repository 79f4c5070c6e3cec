"""XLA CPU settings tried on the AV-MNIST train step (docs/performance.md, "tried").

    python benchmarks/xla_flags.py [--model concat] [--steps 15]

Each variant runs in a fresh process (XLA reads its flags once, at start-up): the
``benchmarks/run.py`` step (batch 128, Adam, allocator tuned), 3 warm-up steps, then the
median / min of ``--steps`` timed steps. Variants:

* ``default``: no flags;
* ``thunk_runtime_off``: ``--xla_cpu_use_thunk_runtime=false``;
* ``eigen_single_thread``: ``--xla_cpu_multi_thread_eigen=false``;
* ``fast_min_max``: ``--xla_cpu_enable_fast_min_max=true``;
* ``two_devices``: ``--xla_force_host_platform_device_count=2``, the batch sharded over
  both virtual CPU devices and the state replicated (data parallel on one machine).

Prints one JSON line per variant.
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

VARIANTS = {
    "default": "",
    "thunk_runtime_off": "--xla_cpu_use_thunk_runtime=false",
    "eigen_single_thread": "--xla_cpu_multi_thread_eigen=false",
    "fast_min_max": "--xla_cpu_enable_fast_min_max=true",
    "two_devices": "--xla_force_host_platform_device_count=2",
}


def probe(model: str, steps: int, devices: int) -> dict:
    """Times the train step in this process (flags already set by the parent)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import jax
    import jax.numpy as jnp
    import numpy as np
    import run
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    run.tune_allocator()
    batch = run._train_batch(run.FULL)
    step, state = run.lepton_train_step(run.build_lepton_model(model, run.FULL))
    if devices > 1:
        mesh = Mesh(np.array(jax.devices()[:devices]), ("data",))
        rep, data = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data"))
        state = jax.device_put(state, rep)
        batch = {k: jax.device_put(jnp.asarray(v), data) for k, v in batch.items()}
        step = jax.jit(step.__wrapped__, donate_argnums=0, in_shardings=(rep, data),
                       out_shardings=(rep, rep))
    else:
        batch = {k: jnp.asarray(v) for k, v in batch.items()}
    holder = {"state": state}

    def call() -> float:
        start = time.perf_counter()
        holder["state"], loss = step(holder["state"], batch)
        loss.block_until_ready()
        return time.perf_counter() - start

    first = call()
    for _ in range(3):
        call()
    times = [call() for _ in range(steps)]
    return {"first_call_s": round(first, 2), "median_ms": round(1e3 * statistics.median(times), 1),
            "min_ms": round(1e3 * min(times), 1), "devices": len(jax.devices())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="concat", choices=("concat", "low_rank"))
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        devices = 2 if args.probe == "two_devices" else 1
        print(json.dumps(probe(args.model, args.steps, devices)))
        return 0
    for name, flags in VARIANTS.items():
        env = {**os.environ, "XLA_FLAGS": flags}
        proc = subprocess.run(
            [sys.executable, __file__, "--probe", name, "--model", args.model,
             "--steps", str(args.steps)], env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(json.dumps({"variant": name, "error": proc.stderr.strip()[-500:]}))
            continue
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps({"variant": name, "xla_flags": flags, "model": args.model,
                          "load_avg_1m": round(os.getloadavg()[0], 2), **result}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
