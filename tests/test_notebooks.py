"""The notebooks in notebooks/ run top to bottom, and are committed small, with outputs.

Execution: each notebook runs in a fresh Jupyter kernel with ``LEPTON_MM_QUICK=1`` (its
first cell reads it and shrinks data and epochs) and any cell error fails the test. The
notebook is executed in memory, with a temporary working directory, so the committed
file is never rewritten. The kernel is *this* interpreter: the test writes a throwaway
kernelspec whose command is ``sys.executable -m ipykernel_launcher`` and starts the kernel
from it, so neither a user's nor the system's "python3" kernelspec (which may point at
another Python) is ever used, and nothing needs installing first. Quick mode also lowers
XLA's CPU optimisation level: these notebooks spend most of their time compiling.

Committed files: each has outputs from one top-to-bottom run (saved in full mode), no
error outputs, no image over 150 KB and a total size under 1 MB.
"""

import base64
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
IDS = [p.stem for p in NOTEBOOKS]
MAX_IMAGE_BYTES = 150_000
MAX_NOTEBOOK_BYTES = 1_000_000
CELL_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def kernel_spec_dir(tmp_path_factory):
    """A kernelspec folder holding "python3", which runs ``sys.executable``."""
    from ipykernel.kernelspec import write_kernel_spec

    kernels = tmp_path_factory.mktemp("kernels")
    write_kernel_spec(path=kernels / "python3")
    return kernels


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_runs_in_quick_mode(path, kernel_spec_dir, tmp_path, monkeypatch):
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    monkeypatch.setenv("LEPTON_MM_QUICK", "1")
    flags = os.environ.get("XLA_FLAGS", "")
    monkeypatch.setenv("XLA_FLAGS", f"{flags} --xla_backend_optimization_level=0".strip())
    spec_manager = KernelSpecManager(kernel_dirs=[str(kernel_spec_dir)])
    assert spec_manager.get_kernel_spec("python3").argv[0] == sys.executable
    manager = AsyncKernelManager(kernel_name="python3", kernel_spec_manager=spec_manager)

    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook, km=manager, kernel_name="python3", timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, naming the cell, on any error


def _images(notebook):
    for index, cell in enumerate(notebook.cells):
        for output in cell.get("outputs", []):
            for mime, data in output.get("data", {}).items():
                if mime.startswith("image/") and mime != "image/svg+xml":
                    yield index, mime, len(base64.b64decode(data))
                elif mime == "image/svg+xml":
                    yield index, mime, len(data.encode())


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_committed_notebook_has_outputs_and_is_small(path):
    size = path.stat().st_size
    assert size < MAX_NOTEBOOK_BYTES, f"{path.name}: {size} bytes (limit {MAX_NOTEBOOK_BYTES})"
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)

    code = [c for c in notebook.cells if c.cell_type == "code" and c.source.strip()]
    assert code, f"{path.name} has no code"
    assert "LEPTON_MM_QUICK" in code[0].source, (
        f"{path.name}: the first code cell should read LEPTON_MM_QUICK (quick mode)")
    counts = [c.execution_count for c in code]
    assert counts == list(range(1, len(code) + 1)), (
        f"{path.name}: not saved from one top-to-bottom run (execution counts {counts})")
    assert any(c.outputs for c in code), f"{path.name} was committed without outputs"
    errors = [i for i, c in enumerate(notebook.cells)
              for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, f"{path.name}: error outputs in cells {errors}"
    text = "".join(o.get("text", "") for c in code for o in c.outputs)
    assert "quick mode: True" not in text, f"{path.name}: outputs saved in quick mode"

    images = list(_images(notebook))
    assert images, f"{path.name} has no figures"
    large = [(i, mime, n) for i, mime, n in images if n > MAX_IMAGE_BYTES]
    assert not large, f"{path.name}: images over {MAX_IMAGE_BYTES} bytes: {large}"
