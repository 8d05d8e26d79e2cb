"""`edge-runtime demo`, the README's main command: the daemon on its embedded default, offline then draining."""
from __future__ import annotations

import re
import subprocess
import sys

from conftest import REPO, SHARED_DATA
from mqtt_helpers import needs_mosquitto


@needs_mosquitto
def test_demo_runs_the_daemon_queues_offline_then_drains_with_nothing_lost():
    result = subprocess.run([sys.executable, "-m", "edge_runtime", "demo", "--seconds", "8"], cwd=REPO,
                            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    out = result.stdout
    assert result.returncode == 0, result.stderr[-2000:] + out[-2000:]
    assert "ready in" in out and "Summary" in out and "Traceback" not in result.stderr
    lines = out.splitlines()
    offline = [line for line in lines if line.startswith("t=") and "link down" in line]
    online = [line for line in lines if line.startswith("t=") and "link up" in line]
    assert offline and online, out  # it starts offline, then the local broker appears
    assert "Mosquitto started" in out
    summary = out[out.index("Summary"):]
    assert "stopped cleanly: yes" in summary
    # The sweeping phantom's first head is an exam (closed by the lift or flushed by the stop), measured against
    # the phantom's truth, and the per-frame results stayed on the device.
    assert re.search(r"exams: [1-9]\d* found", summary), summary
    assert "vs the phantom's" in summary and "kept on the device" in summary and "over MQTT: " in summary
    assert ", 0 lost" in summary
    if (SHARED_DATA / "dicom" / "pydicom-data" / "RG1_J2KR.dcm").exists():
        assert "cxr-pneumonia: " in summary and "priority" in summary


def test_demo_never_touches_the_configured_state_directory(tmp_path):
    state = tmp_path / "state"
    config = tmp_path / "edge.toml"
    config.write_text(f'[device]\nid = "clinic-scanner"\nstate_dir = "{state}"\n\n[engine]\nthreads = 1\n')
    result = subprocess.run([sys.executable, "-m", "edge_runtime", "--config", str(config), "demo", "--seconds", "2"],
                            cwd=REPO, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Summary" in result.stdout
    assert not state.exists()  # a real device's outbox is never drained into, or filled by, the demo
