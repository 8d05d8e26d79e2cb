"""What this CPU can do that an engine's kernels depend on: read once from /proc/cpuinfo (Linux), named by the
capability a model variant may require (manifest `[variants.cpu_requires]`).

"vnni": 8-bit dot products accumulated in 32 bits (AVX-512 VNNI, AVX-VNNI or AMX-INT8). Without them OpenVINO's
x86 INT8 kernels multiply u8 x s8 pairs into 16 bits with saturation (vpmaddubsw), so a QDQ graph whose weights use
the full signed 8-bit range (ONNX Runtime's quantizer; NNCF instead keeps 7 bits where it must, its "overflow fix")
computes something else: measured on cxr-pneumonia's `int8-qdq` on an AVX2-only EPYC, 6 of 20 training images
pushed past its scope limit (BENCHMARKS.md, "INT8 on a CPU without VNNI").
"""
from __future__ import annotations

import functools
import platform
from pathlib import Path

CAPABILITIES = {"vnni": ("avx512_vnni", "avx_vnni", "amx_int8")}


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def missing(requirements: tuple[str, ...], flags: frozenset[str] | None = None) -> list[str]:
    """The capabilities of `requirements` this CPU lacks (unknown names count as lacking)."""
    if flags is None:
        if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
            return list(requirements)  # the capabilities named here are x86 ones
        flags = cpu_flags()
    return [r for r in requirements if not flags.intersection(CAPABILITIES.get(r, ()))]


def describe(capability: str) -> str:
    return f"{capability} ({' or '.join(CAPABILITIES.get(capability, (capability,)))})"
