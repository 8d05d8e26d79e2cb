"""Machine metadata: what a number was measured on, so results from two boards can be compared honestly."""
from __future__ import annotations

import os
import platform
import shutil
import socket
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks.common import CHECKOUT

# Instruction sets that decide engine speed (VNNI/AMX int8, bf16, NEON dot product on Arm).
CPU_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
             "avx_vnni", "amx_tile", "amx_int8", "amx_bf16", "amx_fp16", "asimd", "asimddp", "sve", "bf16", "i8mm")
PACKAGES = ("edge-runtime", "numpy", "onnxruntime", "onnxruntime-gpu", "openvino", "opencv-python-headless", "pydicom",
            "pylibjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle", "python-gdcm", "imagecodecs", "pillow", "paho-mqtt",
            "prometheus-client", "matplotlib", "psutil")


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None


def _run(cmd: list[str], timeout: float = 10.0) -> str | None:
    if shutil.which(cmd[0]) is None and not Path(cmd[0]).is_file():
        return None
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (proc.stdout + proc.stderr).strip() or None


def cpu_info() -> dict[str, Any]:
    text = _read("/proc/cpuinfo") or ""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    model = fields.get("model name") or fields.get("Model") or platform.processor() or platform.machine()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    return {
        "model": model, "architecture": platform.machine(), "logical_cpus": os.cpu_count(), "usable_cpus": usable,
        "flags": [f for f in CPU_FLAGS if f in flags],
        "cgroup_cpu_max": _read("/sys/fs/cgroup/cpu.max"),
        "governor": _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"),
        "max_mhz": _khz_to_mhz(_read("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")),
    }


def _khz_to_mhz(value: str | None) -> float | None:
    try:
        return int(value) / 1000 if value else None
    except ValueError:
        return None


def memory_mb() -> float | None:
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 1024
    return None


def os_info() -> dict[str, Any]:
    pretty = None
    for line in (_read("/etc/os-release") or "").splitlines():
        if line.startswith("PRETTY_NAME="):
            pretty = line.split("=", 1)[1].strip('"')
    return {"name": pretty or platform.platform(), "kernel": platform.release(), "python": platform.python_version(),
            "python_implementation": platform.python_implementation()}


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def git_revision() -> dict[str, Any] | None:
    where = CHECKOUT or Path.cwd()  # an installed package: the checkout it is run from, if any
    if not (where / ".git").exists():
        return None
    rev = _run(["git", "-C", str(where), "rev-parse", "HEAD"])
    status = _run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"])
    return {"revision": rev, "dirty": bool(status)} if rev else None


def jetson() -> dict[str, Any] | None:
    """Power mode and clocks decide a Jetson's numbers: nvpmodel -q and jetson_clocks --show when present."""
    release = _read("/etc/nv_tegra_release")
    if release is None and shutil.which("nvpmodel") is None:
        return None
    return {"l4t_release": release, "nvpmodel": _run(["nvpmodel", "-q"]), "jetson_clocks": _run(["jetson_clocks", "--show"])}


def engine_devices() -> dict[str, Any]:
    """Devices each engine sees, and OpenVINO's CPU default precision (bf16 on AMX/AVX512-BF16 CPUs)."""
    from edge_runtime.engines import KINDS, available_devices

    out: dict[str, Any] = {}
    for kind in KINDS:
        try:
            out[kind] = available_devices(kind)
        except Exception as exc:  # noqa: BLE001 - an engine missing or broken is a fact to record, not a failure
            out[kind] = f"unavailable: {exc}"
    try:
        import openvino as ov

        core = ov.Core()
        out["openvino_cpu_default_precision"] = str(core.get_property("CPU", "INFERENCE_PRECISION_HINT")).split("'")[1]
        out["openvino_cpu_name"] = core.get_property("CPU", "FULL_DEVICE_NAME")
    except Exception:  # noqa: BLE001
        pass
    return out


def collect() -> dict[str, Any]:
    from edge_runtime.local_broker import find_mosquitto

    mosquitto = find_mosquitto()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "collected_at": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "hostname": socket.gethostname(), "cpu": cpu_info(), "memory_mb": memory_mb(), "os": os_info(),
        "packages": package_versions(), "git": git_revision(), "jetson": jetson(), "engines": engine_devices(),
        "mosquitto": (_run([mosquitto, "-h"]) or "").splitlines()[0] if mosquitto else None,
        "load_average_at_start": list(load) if load else None, "executable": sys.executable,
    }
