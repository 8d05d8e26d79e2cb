"""benchmarks/hub.py runs end to end, small: every row stored and the numbers it reports are there."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mqtt_helpers import REPO, needs_mosquitto
from pg_helpers import needs_postgres

pytestmark = [needs_mosquitto, needs_postgres, pytest.mark.slow]


def test_hub_benchmark_quick_run():
    out = subprocess.run([sys.executable, "-m", "benchmarks.hub", "--collectors", "2", "--findings", "600",
                          "--rate", "300", "--seconds", "1", "--devices", "5", "--json"],
                         cwd=REPO, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    runs = {r["phase"]: r for r in result["runs"]}
    assert runs["saturation"]["stored"] == 600 and runs["offered"]["stored"] == 300
    assert sum(runs["saturation"]["share"]) == 600 and len(runs["saturation"]["share"]) == 2
    for r in runs.values():
        assert r["steady_per_s"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"] <= r["max_ms"]
        assert r["cpu_us_per_finding"]["collectors"] > 0
    assert result["settings"]["postgres_fsync"] is True
