"""Test configuration: make JAX strict so silent broadcasts fail loudly; compile fast."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

# Most of the suite's time is XLA compiling small programs, and LLVM's optimisation
# passes are most of that: at level 0 three of our test files took 196 s instead of
# 387 s (2-core CPU, same load), with the same results. Set before JAX starts its
# backend; subprocesses that tests spawn inherit it. An explicit level in XLA_FLAGS wins.
# The price: level-0 code runs slower (a LeNet-sized convolution's gradient about 4x), so
# the few tests that train for hundreds of steps are marked ``optimized_xla`` and run in a
# child process at level 1 (see pytest_pyfunc_call below).
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax
import pytest

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


# Set in the child process that runs an ``optimized_xla`` test.
_CHILD = "LEPTON_MM_TEST_CHILD"


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """An ``optimized_xla`` test runs in a child pytest at XLA backend optimisation
    level 1: for a test that trains for hundreds of steps, faster code outweighs the
    slower compiles (the records test: ~30 % less CPU time than at level 0). Its
    failure, or skip, is this test's, with the child's output."""
    if pyfuncitem.get_closest_marker("optimized_xla") is None or os.environ.get(_CHILD):
        return None
    flags = re.sub(r"--xla_backend_optimization_level=\d+", "",
                   os.environ.get("XLA_FLAGS", ""))
    env = {**os.environ, _CHILD: "1",
           "XLA_FLAGS": f"{flags} --xla_backend_optimization_level=1".strip()}
    env.pop("PYTEST_XDIST_WORKER", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
         "-p", "no:xdist", pyfuncitem.nodeid],
        cwd=pyfuncitem.config.rootpath, env=env, capture_output=True, text=True,
        check=False)
    output = proc.stdout[-6000:] + proc.stderr[-3000:]
    if proc.returncode == 0 and re.search(r"\b1 skipped\b", proc.stdout):
        pytest.skip(f"in the child process: {output[-500:]}")
    if proc.returncode != 0 or not re.search(r"\b1 passed\b", proc.stdout):
        pytest.fail(f"in a child process at XLA optimisation level 1 (exit "
                    f"{proc.returncode}):\n{output}", pytrace=False)
    return True


def pytest_collection_modifyitems(config, items):
    """The longest tests (marked ``slow``) first: with several processes (pytest-xdist)
    the short ones then fill in around them instead of one long test running alone at
    the end. The order within each group is unchanged."""
    del config
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture
def key():
    """A fresh, fixed PRNG key for each test."""
    return jax.random.key(0)


@pytest.fixture
def reliability_report(request):
    """A dict of ``{title: lines}`` shown in the terminal summary ("reliability").

    It travels on the test's report (``user_properties``), so the summary is complete
    when the suite runs in several processes (pytest-xdist) as well as in one.
    """
    report = {}
    request.node.user_properties.append(("reliability", report))
    return report


# What the reliability tests (test_bad_inputs.py, test_faults.py) measured, gathered from
# their reports (in the controlling process under xdist), printed at the end of the run.
_COLLECTED: dict = {}


def pytest_runtest_logreport(report):
    if report.when != "call":
        return
    for name, value in report.user_properties:
        if name == "reliability" and value:
            _COLLECTED.update(value)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    del exitstatus, config
    if not _COLLECTED:
        return
    terminalreporter.section("reliability")
    for title, lines in _COLLECTED.items():
        terminalreporter.write_line(f"{title}:")
        for line in lines:
            terminalreporter.write_line(f"  {line}")
