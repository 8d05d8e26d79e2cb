"""glibc arena cap: counted from malloc_info's XML in a fresh interpreter (the cap is process-wide)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from edge_runtime.malloc import _glibc, limit_arenas

needs_glibc = pytest.mark.skipif(_glibc() is None, reason="glibc only: other C libraries have no malloc arenas to cap")

# 12 threads that each malloc while the others hold their allocation: glibc gives each its own arena unless capped.
CHILD = textwrap.dedent("""
    import ctypes, sys, tempfile, threading
    from edge_runtime.malloc import limit_arenas
    applied = limit_arenas(int(sys.argv[1]))
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    libc.fopen.restype = ctypes.c_void_p
    libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    barrier = threading.Barrier(12)
    def work():
        p = libc.malloc(4096)
        barrier.wait()
        libc.free(p)
    threads = [threading.Thread(target=work) for _ in range(12)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    with tempfile.NamedTemporaryFile(suffix=".xml") as f:
        fp = libc.fopen(f.name.encode(), b"w")
        libc.malloc_info(0, fp)
        libc.fclose(fp)
        heaps = open(f.name).read().count("<heap nr=")
    print(applied, heaps)
""")


def arenas_after_threads(cap: int, env: dict[str, str] | None = None) -> tuple[bool, int]:
    base = {k: v for k, v in os.environ.items() if k not in ("MALLOC_ARENA_MAX", "GLIBC_TUNABLES")}  # the CI host's own
    out = subprocess.run([sys.executable, "-c", CHILD, str(cap)], capture_output=True, text=True, check=True,
                         env={**base, **(env or {})}, timeout=60).stdout.split()
    return out[0] == "True", int(out[1])


@needs_glibc
def test_arenas_are_capped_only_when_asked():
    applied, heaps = arenas_after_threads(2)
    assert applied and heaps <= 2
    applied, heaps = arenas_after_threads(0)  # 0 = glibc's default: one arena per thread here
    assert not applied and heaps > 2


@needs_glibc
@pytest.mark.parametrize("env", [{"MALLOC_ARENA_MAX": "4"}, {"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"}],
                         ids=["MALLOC_ARENA_MAX", "GLIBC_TUNABLES"])
def test_an_operators_arena_setting_wins(env):
    applied, heaps = arenas_after_threads(2, env=env)
    assert not applied and 2 < heaps <= 4


def test_nothing_to_do_for_zero():
    assert limit_arenas(0) is False and limit_arenas(-1) is False
