"""The shipped unit passes `systemd-analyze verify` and keeps its security exposure at or below 2.5."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "edge-runtime.service"
ANALYZE = shutil.which("systemd-analyze")
pytestmark = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed (apt-get install systemd)")


def unit_copy(tmp_path: Path) -> Path:
    """verify checks that ExecStart exists: point it at an executable that does, on a copy of the unit."""
    text = UNIT.read_text()
    assert "ExecStart=/opt/edge-runtime/venv/bin/edge-runtime " in text
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace("/opt/edge-runtime/venv/bin/edge-runtime", shutil.which("true") or "/bin/true"))
    return copy


def test_unit_verifies(tmp_path):
    r = subprocess.run([ANALYZE, "verify", str(unit_copy(tmp_path))], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr


def test_security_exposure_at_most_2_5(tmp_path):
    r = subprocess.run([ANALYZE, "security", "--offline=yes", str(unit_copy(tmp_path))], capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for edge-runtime\.service: (\d+\.\d+)", r.stdout + r.stderr)
    assert match, r.stdout[-2000:] + r.stderr
    assert float(match.group(1)) <= 2.5


def test_unit_contract():
    text = UNIT.read_text()
    for line in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "User=edge-runtime", "StateDirectory=edge-runtime",
                 "ConfigurationDirectory=edge-runtime", "DeviceAllow=char-video4linux rw", "NoNewPrivileges=yes"):
        assert line in text, line
