"""The AV-MNIST train step with the CNN encoders' conv path against a previous one, A/B.

    python benchmarks/im2col.py [--methods concat,audio_only,image_only] [--batch-sizes 40,128]
    python benchmarks/im2col.py --against first-layer-conv-grad --methods concat,audio_only
    python benchmarks/im2col.py --against first-layer-phase-matmuls --methods concat

``slices`` is the library's path (``lepton_mm.encoders._conv``: patches from shifted
slices, the first layer as direct multiply-adds whose kernel gradient is a banded matmul,
``_single_channel_kernel_grad``). ``--against`` picks the previous path patched in for
the comparison:
``gather`` (default: one gather in pooling-phase order, ``conv_patches``, whose gradient
is a scatter-add), ``first-layer-conv-grad`` (the library's path with the first
layer's kernel gradient from XLA's convolution gradient on the ``[batch, h, w, 1]``
layout, as before 2026-12-07) or ``first-layer-phase-matmuls`` (that kernel gradient as
one im2col matmul per pooling phase, as until the banded matmuls replaced it). Each variant is the
``experiments/avmnist.py`` model and SGD recipe under ``make_train_step`` (the step
``fit`` runs), on 20 real batches; the variants alternate A B B A over 4 rounds after
compilation and the best round's mean step time is printed with the compile time and
the last loss (the two paths differ only by float rounding). Numbers in
docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _gather_paths(conv):
    """The previous (gather) implementations of the two functions ``conv_block`` calls."""
    import jax
    import jax.numpy as jnp

    def phase_ordered(x, kernel, kernel_size, pool):
        _, h, w, b = x.shape
        h2, w2 = conv._phase_grid(h, w, pool)
        y = jax.lax.dot_general(kernel, conv.conv_patches(x, kernel_size, pool),
                                (((0,), (0,)), ((), ())),
                                preferred_element_type=jnp.float32)
        return y.reshape(kernel.shape[1], pool[0] * pool[1], h2, w2, b)

    def single_channel(x, kernel, kernel_size, pool):
        return phase_ordered(x[None], kernel, kernel_size, pool)

    return phase_ordered, single_channel


def _conv_grad_first_layer(conv):
    """The library's path with the previous first-layer backward (XLA's conv gradient)."""
    import functools

    import jax
    import jax.numpy as jnp

    @functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
    def single_channel(x, kernel, kernel_size, pool):
        return conv._single_channel_direct(conv._pad_single(x, kernel_size, pool), kernel,
                                           kernel_size, pool,
                                           conv._phase_grid(x.shape[0], x.shape[1], pool))

    def fwd(x, kernel, kernel_size, pool):
        return single_channel(x, kernel, kernel_size, pool), (x, kernel)

    def bwd(kernel_size, pool, res, g):
        x, kernel = res
        (kh, kw), (ph, pw) = kernel_size, pool
        h, w, b = x.shape
        c_out = kernel.shape[1]
        h2, w2 = conv._phase_grid(h, w, pool)
        g = g.reshape(c_out, ph, pw, h2, w2, b).transpose(5, 3, 1, 4, 2, 0)
        g = g.reshape(b, h2 * ph, w2 * pw, c_out)

        def conv_nhwc(xp, k):
            return jax.lax.conv_general_dilated(
                xp, k.reshape(kh, kw, 1, c_out), (1, 1), "VALID",
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                preferred_element_type=jnp.float32)

        xp = jnp.transpose(conv._pad_single(x, kernel_size, pool), (2, 0, 1))[..., None]
        _, vjp = jax.vjp(conv_nhwc, xp.astype(jnp.float32), kernel.astype(jnp.float32))
        dxp, dk = vjp(g)
        (top, _), (left, _) = conv.same_padding(kh), conv.same_padding(kw)
        dx = jnp.transpose(dxp[..., 0], (1, 2, 0))[top:top + h, left:left + w]
        return dx.astype(x.dtype), dk.astype(kernel.dtype)

    single_channel.defvjp(fwd, bwd)
    return conv._conv_phase_ordered, single_channel


def _phase_matmuls_first_layer(conv):
    """The library's path with the previous first-layer kernel gradient (before
    2026-12-07 evening): per pooling phase, the ``k_h * k_w`` shifted windows stacked
    (im2col) and one matmul against that phase's cotangent."""
    import functools

    import jax
    import jax.numpy as jnp

    def kernel_grad(xp, g, kernel_size, pool):
        (kh, kw), (ph, pw) = kernel_size, pool
        c_out, _, h2, w2, b = g.shape
        dk = None
        for a in range(ph):
            for d in range(pw):
                windows = jnp.stack([jax.lax.slice(
                    xp, (a + i, d + j, 0),
                    (a + i + (h2 - 1) * ph + 1, d + j + (w2 - 1) * pw + 1, b),
                    (ph, pw, 1)) for i in range(kh) for j in range(kw)])
                term = jax.lax.dot_general(
                    windows.reshape(kh * kw, -1), g[:, a * pw + d].reshape(c_out, -1),
                    (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
                dk = term if dk is None else dk + term
        return dk

    library = conv._conv_single_channel  # main() patches the module's name

    @functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
    def single_channel(x, kernel, kernel_size, pool):
        return library(x, kernel, kernel_size, pool)

    def fwd(x, kernel, kernel_size, pool):
        return single_channel(x, kernel, kernel_size, pool), (x, kernel)

    def bwd(kernel_size, pool, res, g):
        x, kernel = res
        dx, _ = conv._conv_single_channel_bwd(kernel_size, pool, res, g)  # its dk: unused
        xp = conv._pad_single(x, kernel_size, pool).astype(jnp.float32)
        dk = kernel_grad(xp, g.astype(jnp.float32), kernel_size, pool)
        return dx, dk.astype(kernel.dtype)

    single_channel.defvjp(fwd, bwd)
    return conv._conv_phase_ordered, single_channel


PREVIOUS = {"gather": _gather_paths, "first-layer-conv-grad": _conv_grad_first_layer,
            "first-layer-phase-matmuls": _phase_matmuls_first_layer}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="concat,audio_only,image_only")
    parser.add_argument("--batch-sizes", default="40,128")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--against", default="gather", choices=sorted(PREVIOUS))
    args = parser.parse_args(argv)

    from lepton_mm.training import tune_glibc_malloc

    tuned = tune_glibc_malloc()
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import lepton_mm.encoders._conv as conv
    from lepton_mm.experiment import machine_info
    from lepton_mm.models import Classification
    from lepton_mm.recipes import avmnist
    from lepton_mm.training import ArrayDataset, OptimizerConfig, make_optimizer, seed_rngs
    from lepton_mm.training.loop import TrainState, make_train_step

    library = (conv._conv_phase_ordered, conv._conv_single_channel)
    paths = {"slices": library, args.against: PREVIOUS[args.against](conv)}
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    config = avmnist.AVMNISTConfig(num_train=max(sizes) * args.steps, num_val=40,
                                   num_test=40, progress=False)
    data = ArrayDataset(avmnist.make_data(config)["train"])
    sgd = OptimizerConfig(name="sgd", learning_rate=config.learning_rate,
                          momentum=config.momentum, weight_decay=config.weight_decay)
    meta = {**machine_info(), "allocator_tuned": tuned, "jax": jax.__version__,
            "against": args.against, "load_avg_1m": os.getloadavg()[0]}
    print(json.dumps({"meta": meta}), flush=True)
    for method in args.methods.split(","):
        for bs in sizes:
            batches = [jax.device_put(b) for b in data.batches(bs, seed=0, epoch=0)]
            batches = batches[:args.steps]
            runs = {}
            for name, (phase, single) in paths.items():
                conv._conv_phase_ordered, conv._conv_single_channel = phase, single
                model = avmnist.build_model(config, method, seed_rngs(0))
                model.train()
                graphdef, params, rest = nnx.split(model, nnx.Param, ...)
                params, rest = nnx.as_pure(params), nnx.as_pure(rest)
                # A transformation of its own per variant: make_train_step caches the
                # compiled step by (graph, transformation, task), which would reuse the
                # other variant's program.
                tx = make_optimizer(sgd)
                state = TrainState(params, rest, tx.init(params))
                step = make_train_step(graphdef, tx, Classification(10))
                start = time.perf_counter()
                state, stats = step(state, batches[0], jnp.int32(0))
                jax.block_until_ready(state)
                runs[name] = {"step": step, "state": state, "times": [],
                              "compile_s": time.perf_counter() - start}
            conv._conv_phase_ordered, conv._conv_single_channel = library
            order = list(paths)
            for round_ in range(4):
                for name in order if round_ % 2 == 0 else order[::-1]:
                    run = runs[name]
                    state = run["state"]
                    start = time.perf_counter()
                    for i, batch in enumerate(batches):
                        state, stats = run["step"](state, batch, jnp.int32(i))
                    jax.block_until_ready(state)
                    run["times"].append((time.perf_counter() - start) / len(batches))
                    run["state"], run["loss"] = state, float(stats["loss"])
            line = {"method": method, "batch_size": bs}
            for name, run in runs.items():
                line[name] = {"ms_per_step": round(1000 * min(run["times"]), 1),
                              "compile_s": round(run["compile_s"], 1),
                              "last_loss": round(run["loss"], 5)}
            line["speedup"] = round(line[args.against]["ms_per_step"] /
                                    line["slices"]["ms_per_step"], 2)
            print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
