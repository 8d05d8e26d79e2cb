"""What every benchmark shares: statistics, process counters, the child-process protocol and bad-input errors."""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

PROG = "edge-bench"
PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # the folder that holds benchmarks/ (a checkout or site-packages)
CHECKOUT = PACKAGE_ROOT if (PACKAGE_ROOT / "pyproject.toml").is_file() else None
# ../shared/data beside a checkout (or beside the folder edge-bench is run from, for an installed package)
DATA_CANDIDATES = (PACKAGE_ROOT.parent / "shared" / "data", Path.cwd().parent / "shared" / "data")
DEFAULT_DATA = next((p for p in DATA_CANDIDATES if p.is_dir()), None)
CINE = Path("dicom") / "pydicom-data" / "color3d_jpeg_baseline.dcm"  # 120 frames, 30 fps, JPEG baseline echo
CHEST_CR = Path("dicom") / "pydicom-data" / "RG1_J2KR.dcm"  # 1955 x 1841 CR chest, JPEG 2000


class BenchError(Exception):
    """Bad input or a missing prerequisite: one line naming the input, never a traceback."""


# ------------------------------------------------------------------ statistics
def latency_stats(samples_ms: Sequence[float]) -> dict[str, float]:
    """The fields onnxruntime_perf_test prints for a run, in ms."""
    a = np.asarray(samples_ms, dtype=np.float64)
    q = np.percentile(a, [50, 90, 95, 99, 99.9])
    return {"avg": float(a.mean()), "min": float(a.min()), "max": float(a.max()), "p50": float(q[0]),
            "p90": float(q[1]), "p95": float(q[2]), "p99": float(q[3]), "p99_9": float(q[4])}


def cdf_points(samples_ms: Sequence[float], n: int = 101) -> list[float]:
    """Latency at quantiles 0, 1/(n-1), ..., 1: enough to draw a CDF without keeping every sample."""
    if len(samples_ms) == 0:
        return []
    return [round(float(v), 4) for v in np.quantile(np.asarray(samples_ms, dtype=np.float64), np.linspace(0, 1, n))]


def summarize(values: Sequence[float | None]) -> dict[str, float] | None:
    """Median of the repeats and their spread (min, max, (max - min) / median)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return None
    med = float(np.median(vals))
    lo, hi = min(vals), max(vals)
    return {"median": med, "min": lo, "max": hi, "spread_pct": (hi - lo) / med * 100.0 if med else 0.0, "n": len(vals)}


def median_run(runs: list[dict[str, Any]], key: Callable[[dict[str, Any]], float]) -> dict[str, Any]:
    """The repeat whose `key` is the median (the lower middle for an even count): its curves go in the plots."""
    ordered = sorted(runs, key=key)
    return ordered[(len(ordered) - 1) // 2]


def clean(obj: Any) -> Any:
    """JSON-safe: NaN and infinities become null, numpy scalars plain numbers, paths strings."""
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


# ------------------------------------------------------------------ this process
def rss_mb() -> float:
    """Resident set size now (psutil when installed, else /proc, else the peak from getrusage)."""
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        pass
    value = _proc_status_kb("VmRSS")
    return value / 1024 if value is not None else peak_rss_mb()


def peak_rss_mb() -> float:
    """Peak resident set size of this process (VmHWM, else ru_maxrss: KiB on Linux)."""
    value = _proc_status_kb("VmHWM")
    if value is not None:
        return value / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _proc_status_kb(field: str) -> float | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class CpuMeter:
    """CPU% over an interval: process CPU time / wall time (100 % = one core busy; threads can exceed it)."""

    def __init__(self) -> None:
        self.cpu0, self.wall0 = cpu_seconds(), time.perf_counter()

    def percent(self) -> float:
        wall = time.perf_counter() - self.wall0
        return (cpu_seconds() - self.cpu0) / wall * 100.0 if wall > 0 else 0.0


# ------------------------------------------------------------------ child processes
def quiet_logs() -> None:
    """Children print JSON on stdout; keep the runtime's warnings short and on stderr."""
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    warnings.filterwarnings("ignore", module=r"pydicom(\..*)?")


def quiet_pydicom() -> None:
    """After pydicom is imported (it sets its own level then): no log for tolerated oddities and decoder fallbacks."""
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)


def child_main(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], dict[str, Any]],
               argv: list[str] | None = None) -> int:
    """`python -m benchmarks.<kind> ... --json`: one JSON object on stdout; expected errors as one line."""
    from edge_runtime.errors import EdgeError

    parser.add_argument("--json", action="store_true", help="print the result as one JSON line (the harness reads it)")
    args = parser.parse_args(argv)
    quiet_logs()
    try:
        result = run(args)
    except (BenchError, EdgeError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr, flush=True)
        return 2
    text = json.dumps(clean(result), allow_nan=False, separators=(",", ":") if args.json else (", ", ": "),
                      indent=None if args.json else 2)
    print(text, flush=True)
    return 0


def child_entry(build_parser: Callable[[], argparse.ArgumentParser],
                measure: Callable[[argparse.Namespace], dict[str, Any]]) -> Callable[..., int]:
    """A child module's `main(argv=None)`."""
    return lambda argv=None: child_main(build_parser(), measure, argv)


class ChildFailed(Exception):
    pass


def child_env() -> dict[str, str]:
    """Children import the same benchmarks/ and edge_runtime as the parent, wherever it was started."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_child(kind: str, args: list[str], timeout: float) -> dict[str, Any]:
    """Run `python -m benchmarks.<kind> args --json` in a fresh process; its JSON, or ChildFailed with its last words."""
    cmd = [sys.executable, "-m", f"benchmarks.{kind}", *args, "--json"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=child_env(), stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ChildFailed(f"{kind} {' '.join(args)}: no result within {timeout:.0f} s") from None
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        err = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        raise ChildFailed(f"{kind} {' '.join(args)}: exit {proc.returncode}: {err[-1] if err else 'no output'}")
    return json.loads(lines[-1])


def data_file(data: Path | None, relative: Path) -> Path | None:
    """A file of the shared data set, or None when the data (or that file) is absent."""
    if data is None:
        return None
    path = data / relative
    return path if path.is_file() else None
