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


_GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not _GLIBC, reason="malloc_trim is glibc-only")
def test_release_free_memory_returns_freed_heap_pages_and_keeps_live_data():
    # 2 000 blocks of 64 KiB (below glibc's mmap threshold: they come from the heap);
    # freeing every other one leaves ~64 MB of holes that glibc keeps in RSS (the live
    # blocks between them stop the heap top from shrinking) until malloc_trim.
    code = (
        "import ctypes, ctypes.util\n"
        "from lepton_mm.training.allocator import release_free_memory\n"
        "libc = ctypes.CDLL(ctypes.util.find_library('c'))\n"
        "libc.malloc.restype = ctypes.c_void_p\n"
        "libc.malloc.argtypes = [ctypes.c_size_t]\n"
        "libc.free.argtypes = [ctypes.c_void_p]\n"
        "def rss():\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith('VmRSS'):\n"
        "            return int(line.split()[1]) * 1024\n"
        "n = 64 * 1024\n"
        "blocks = [libc.malloc(n) for _ in range(2000)]\n"
        "for i, p in enumerate(blocks):\n"
        "    ctypes.memset(p, i % 251, n)\n"
        "for p in blocks[::2]:\n"
        "    libc.free(p)\n"
        "held = rss()\n"
        "assert release_free_memory() is True\n"
        "released = held - rss()\n"
        "for i, p in list(enumerate(blocks))[1::2]:\n"
        "    assert ctypes.string_at(p, n) == bytes([i % 251]) * n\n"
        "print(released)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) > 40 * 2**20  # of the ~64 MB freed


def test_fit_releases_free_memory_after_each_compilation_and_only_inside_fit(
        tmp_path, monkeypatch):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from lepton_mm.models import Classification
    from lepton_mm.training import allocator, loop

    calls = []
    monkeypatch.setattr(allocator, "release_free_memory", lambda: calls.append(1) or True)

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(3, 2, rngs=rngs)

        def __call__(self, batch):
            return self.linear(batch["x"])

    rng = np.random.default_rng(0)
    data = {"x": rng.normal(size=(10, 3)).astype(np.float32),
            "label": rng.integers(0, 2, 10).astype(np.int32)}
    loop._clear_compiled_steps()
    result = loop.fit(Model(nnx.Rngs(0)), Classification(2), data, eval_data=data,
                      epochs=2, batch_size=4, workdir=tmp_path, progress=False)
    assert result.num_compilations == {"train_step": 1, "eval_step": 1}
    assert len(calls) >= 2  # the train and eval steps (small helpers may compile too)
    calls.clear()
    jax.jit(lambda x: x * 3 + 1)(jnp.arange(7.0)).block_until_ready()  # outside fit
    assert calls == []
