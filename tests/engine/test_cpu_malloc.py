"""The glibc malloc settings the CPU engine applies (engine/cpu_malloc.py), run in a fresh process
each so that the test process keeps glibc's defaults."""
import subprocess
import sys

import pytest

from pagedllm.engine import cpu_malloc


def run(code: str, env_extra: dict) -> str:
    import os
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout


MALLINFO = (
    "import ctypes, ctypes.util\n"
    "libc = ctypes.CDLL(ctypes.util.find_library('c'))\n"
    "libc.malloc.restype = ctypes.c_void_p\n"
    "libc.free.argtypes = [ctypes.c_void_p]\n"
    "class Info(ctypes.Structure):\n"
    "    _fields_ = [(n, ctypes.c_size_t) for n in ('arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks',"
    " 'fsmblks', 'uordblks', 'fordblks', 'keepcost')]\n"
    "libc.mallinfo2.restype = Info\n"
    "import pagedllm.engine.cpu_malloc as m\n"
    "print(APPLY and m.keep_freed_memory() and m.keep_freed_memory())\n"
    "before = libc.mallinfo2()\n"
    "p = libc.malloc(16 << 20)\n"
    "print(libc.mallinfo2().hblks - before.hblks)\n"  # 1: the block was mmap'd; 0: it came from the heap
    "libc.free(p)\n"
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_large_blocks_come_from_the_heap():
    assert run("APPLY = True\n" + MALLINFO, {}).split() == ["True", "0"]
    # The control: glibc's defaults map a fresh 16 MiB block (and unmap it on free).
    assert run("APPLY = False\n" + MALLINFO, {}).split() == ["False", "1"]


def test_the_users_own_settings_win():
    out = run("from pagedllm.engine.cpu_malloc import keep_freed_memory; print(keep_freed_memory())",
              {"MALLOC_TRIM_THRESHOLD_": "131072"})
    assert out.strip() == "False"


def test_thresholds_fit_glibc_limits():
    # mallopt takes an int, and glibc refuses an mmap threshold above 32 MiB on 64-bit systems.
    assert cpu_malloc.MMAP_THRESHOLD <= 32 << 20 and cpu_malloc.TRIM_THRESHOLD < 2 ** 31
