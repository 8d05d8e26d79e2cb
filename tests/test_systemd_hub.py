"""The hub collector's unit template passes `systemd-analyze verify`, keeps its exposure low, and runs the
collector in the shared group with a client id per instance."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "edge-hub-collector@.service"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed (apt-get install systemd)")


def instance_copy(tmp_path: Path) -> Path:
    """An instance of the template whose ExecStart exists and whose EnvironmentFile is optional here."""
    text = UNIT.read_text()
    text = text.replace("/opt/edge-runtime/venv/bin/edge-runtime", shutil.which("true") or "/bin/true")
    text = text.replace("EnvironmentFile=/etc/", "EnvironmentFile=-/etc/")
    copy = tmp_path / "edge-hub-collector@1.service"
    copy.write_text(text)
    return copy


@needs_analyze
def test_unit_verifies(tmp_path):
    r = subprocess.run([ANALYZE, "verify", str(instance_copy(tmp_path))], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr


@needs_analyze
def test_security_exposure_at_most_2_0(tmp_path):
    r = subprocess.run([ANALYZE, "security", "--offline=yes", str(instance_copy(tmp_path))], capture_output=True,
                       text=True, timeout=60)
    match = re.search(r"Overall exposure level for edge-hub-collector@1\.service: (\d+\.\d+)", r.stdout + r.stderr)
    assert match, r.stdout[-2000:] + r.stderr
    assert float(match.group(1)) <= 2.0


def test_unit_contract():
    text = UNIT.read_text()
    for line in ("--share collectors", "--client-id hub-%H-%i", "Restart=always", "RestartPreventExitStatus=2",
                 "User=edge-hub", "NoNewPrivileges=yes", "--db ${EDGE_HUB_DB}"):
        assert line in text, line
