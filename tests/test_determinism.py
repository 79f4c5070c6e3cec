"""Same seed, same bits: every fusion method trains identically twice on CPU.

For each name in ``FUSIONS``: a bimodal classifier (encoders with dropout, the fusion's
own dropout where it has one, modality dropout in the step) is built from one seed and
takes three optimiser steps with ``make_train_step`` (the step ``fit`` uses); a second
build from the same seed must end with bitwise-equal parameters, RNG state, optimiser
state and losses. One method is also run in a separate process, which compiles afresh.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lepton_mm import EncoderOutput
from lepton_mm.fusion import FUSIONS
from lepton_mm.models import Classification, build_classifier
from lepton_mm.training import (
    OptimizerConfig,
    TrainState,
    make_optimizer,
    make_train_step,
    seed_rngs,
)

SEED = 11
STEPS = 3
SMALL = {"width": 8, "num_layers": 1, "num_heads": 2}
FUSION_KWARGS = {"bottleneck": {**SMALL, "fusion_layer": 0}, "cross_attention": SMALL,
                 "early_transformer": SMALL}


class Frames(nnx.Module):
    def __init__(self, features, dim, rngs):
        self.dim = dim
        self.proj = nnx.Linear(features, dim, rngs=rngs)
        self.drop = nnx.Dropout(0.3, rngs=rngs)

    def __call__(self, x, mask):
        return EncoderOutput.from_tokens(self.drop(jnp.tanh(self.proj(x))), mask)


def _model(name):
    rngs = seed_rngs(SEED)
    params = inspect.signature(FUSIONS[name].__init__).parameters
    kwargs = dict(FUSION_KWARGS.get(name, {}))
    kwargs.update({k: 0.2 for k in ("dropout", "attention_dropout") if k in params})
    encoders = {"audio": Frames(3, 6, rngs), "text": Frames(4, 5, rngs)}
    return build_classifier(encoders, name, num_outputs=3, fusion_dim=6, rngs=rngs, **kwargs)


def _batches():
    rng = np.random.default_rng(SEED)
    for _ in range(STEPS):
        yield {"audio": (rng.normal(size=(8, 5, 3)).astype(np.float32),
                         np.arange(5)[None] < rng.integers(1, 6, 8)[:, None]),
               "text": (rng.normal(size=(8, 4, 4)).astype(np.float32),
                        np.arange(4)[None] < rng.integers(1, 5, 8)[:, None]),
               "label": rng.integers(0, 3, 8).astype(np.int32),
               "present": {"text": rng.random(8) > 0.3},
               "valid": np.ones(8, bool)}


def _train(name, step_fn=None):
    """Three steps from a fresh build; returns (arrays, step function)."""
    model = _model(name)
    model.train()
    # SGD with momentum (optimiser state to carry) compiles faster than Adam: the compile
    # of the transformer fusions' steps dominates this file's run time.
    tx = make_optimizer(OptimizerConfig(name="sgd", learning_rate=0.05, momentum=0.9))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.as_pure(params), nnx.as_pure(rest)
    state = TrainState(params, rest, tx.init(params))
    if step_fn is None:
        step_fn = make_train_step(graphdef, tx, Classification(3), modality_dropout=0.3,
                                  seed=SEED)
    losses = []
    for i, batch in enumerate(_batches()):
        state, stats = step_fn(state, batch, jnp.int32(i))
        losses.append(np.asarray(stats["loss"]))
    leaves = [np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(
        x.dtype, jax.dtypes.prng_key) else x) for x in jax.tree.leaves(state)]
    return {"losses": np.stack(losses), **{f"leaf{i:03d}": x for i, x in enumerate(leaves)}}, \
        step_fn


def _assert_same(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key


_RESULTS: dict[str, dict[str, np.ndarray]] = {}  # reused by the two-process test


@pytest.mark.parametrize("name", sorted(FUSIONS))
def test_same_seed_gives_identical_training_in_one_process(name):
    # The second run reuses the compiled step (compiling again is what the two-process
    # test covers): initialisation, dropout streams and execution must repeat exactly.
    first, step_fn = _train(name)
    second, _ = _train(name, step_fn)
    _assert_same(first, second)
    assert np.all(np.isfinite(first["losses"]))
    _RESULTS[name] = first


CHILD = textwrap.dedent('''
    import sys
    import jax
    jax.config.update("jax_numpy_rank_promotion", "raise")
    jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    import test_determinism
    arrays, _ = test_determinism._train(sys.argv[2])
    np.savez(sys.argv[3], **arrays)
''')


def test_same_seed_gives_identical_training_in_another_process(tmp_path):
    name = "early_transformer"  # attention, dropout in three places, LayerNorm
    out = tmp_path / "child.npz"
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(Path(__file__).parent), name, str(out)],
        env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
        timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    here = _RESULTS.get(name) or _train(name)[0]
    theirs = dict(np.load(out))
    _assert_same(here, theirs)
