"""tune_glibc_malloc applies its settings (in a subprocess: they are process-wide)."""

import platform
import subprocess
import sys

import pytest


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="mallopt tuning is glibc-only")
def test_tune_glibc_malloc_applies_and_memory_still_works():
    code = ("import numpy as np\n"
            "from lepton_mm.training.allocator import tune_glibc_malloc\n"
            "assert tune_glibc_malloc() is True\n"
            "for _ in range(3):\n"
            "    a = np.ones(50_000_000 // 8); assert a.sum() == a.size; del a\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
