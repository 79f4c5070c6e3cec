"""Test configuration: make JAX strict so silent broadcasts fail loudly; compile fast."""

import importlib.util
import os
import sys
from pathlib import Path

# Most of the suite's time is XLA compiling small programs, and LLVM's optimisation
# passes are most of that: at level 0 three of our test files took 196 s instead of
# 387 s (2-core CPU, same load), with the same results. Set before JAX starts its
# backend; subprocesses that tests spawn inherit it. An explicit level in XLA_FLAGS wins.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax
import pytest

# What the reliability tests (test_bad_inputs.py, test_faults.py) measured: filled in
# through the ``reliability_report`` fixture, printed at the end of the run.
_RELIABILITY = pytest.StashKey[dict]()

jax.config.update("jax_numpy_rank_promotion", "raise")
# Tests compare against float32/float64 references: on GPUs, where float32 matmuls default
# to TF32, ask for full precision so tolerances mean the same on every platform.
jax.config.update("jax_default_matmul_precision", "highest")


ROOT = Path(__file__).resolve().parents[1]


def _script(name):
    """``experiments/<name>.py`` imported as a fresh module (scripts are not a package;
    ``experiments/`` goes on ``sys.path`` so that scripts can import each other)."""
    module_name = f"_lepton_script_{name}"
    spec = importlib.util.spec_from_file_location(module_name,
                                                  ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses resolve annotations through sys.modules
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "experiments"))
    return module


@pytest.fixture(scope="module")
def avmnist():
    """``experiments/avmnist.py`` as a module."""
    return _script("avmnist")


@pytest.fixture(scope="module")
def smoke():
    """``experiments/smoke.py`` as a module."""
    return _script("smoke")


@pytest.fixture(scope="module")
def load_script():
    """``load_script(name)``: ``experiments/<name>.py`` as a fresh module."""
    return _script


@pytest.fixture
def key():
    """A fresh, fixed PRNG key for each test."""
    return jax.random.key(0)


@pytest.fixture(scope="session")
def reliability_report(request):
    """A dict of ``{title: lines}`` shown in the terminal summary ("reliability")."""
    return request.config.stash.setdefault(_RELIABILITY, {})


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    del exitstatus
    report = config.stash.get(_RELIABILITY, None)
    if not report:
        return
    terminalreporter.section("reliability")
    for title, lines in report.items():
        terminalreporter.write_line(f"{title}:")
        for line in lines:
            terminalreporter.write_line(f"  {line}")
