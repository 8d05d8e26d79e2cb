"""Startup benchmark: how soon `edge-runtime demo` is ready, from a cold start in a fresh state directory.

The demo is the daemon (`Service`) with both shipped models, every variant loaded and warmed, and no compiled-model
cache yet (its state directory is new each time). Two numbers: the ready time the demo prints (`Service.start` to
READY, in-process: what systemd's READY=1 waits for) and the wall time from launching the command to that line
(interpreter start and imports included).

    python -m benchmarks.startup --seconds 2
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from typing import Any

from benchmarks.common import BenchError, child_env, child_entry

READY = re.compile(r"ready in ([\d.]+) s")


def measure(args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "edge_runtime", "demo", "--seconds", str(args.seconds)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(),
                            stdin=subprocess.DEVNULL)
    ready_s = launch_to_ready_s = None
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip())
        found = READY.search(line)
        if found and ready_s is None:
            launch_to_ready_s = time.perf_counter() - t0
            ready_s = float(found.group(1))
    try:
        proc.wait(args.seconds + 60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise BenchError(f"edge-runtime demo --seconds {args.seconds}: did not finish") from None
    if ready_s is None:
        err = [line for line in proc.stderr.read().splitlines() if line.strip()]
        raise BenchError(f"edge-runtime demo printed no ready time (exit {proc.returncode}): {err[-1] if err else ''}")
    return {"command": "edge-runtime demo --seconds " + str(args.seconds), "ready_s": ready_s,
            "launch_to_ready_s": launch_to_ready_s, "exit_status": proc.returncode,
            "variants": [line.strip() for line in lines if "variants" in line]}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.startup", description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=2.0, help="how long the demo runs after it is ready")
    return p


main = child_entry(build_parser, measure)

if __name__ == "__main__":
    raise SystemExit(main())
