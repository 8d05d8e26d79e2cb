"""The hot switch on a live source: a phantom feed through fetal-head keeps running while a new version is
installed and switched to; findings go from the old model.version to the new one between two frames."""
from __future__ import annotations

import json
import sqlite3

from mqtt_helpers import wait_until
from ota_helpers import copy_model, keypair, shipped

from edge_runtime.cli import engine_options
from edge_runtime.config import load_config
from edge_runtime.ota import bundle as bundles
from edge_runtime.ota.wiring import installer_from_config
from edge_runtime.service import Service


def versions(state) -> list[str]:
    db = state / "outbox.sqlite"
    if not db.exists():
        return []
    conn = sqlite3.connect(db, timeout=10)
    try:
        return [json.loads(p)["model"]["version"] for (p,) in conn.execute("SELECT payload FROM findings ORDER BY seq")]
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()


def test_a_live_source_switches_version_between_frames_without_a_restart(tmp_path):
    private, _ = keypair(tmp_path / "keys")
    config_path = tmp_path / "edge.toml"
    config_path.write_text(
        f'[device]\nid = "probe-1"\nsite = "ward"\nstate_dir = "{tmp_path / "state"}"\n'
        '[engine]\nkind = "onnxruntime"\nthreads = 1\nwarmup_runs = 1\n[service]\nmetrics_port = 0\n'
        '[[sources]]\nname = "probe"\nkind = "phantom"\nmodel = "fetal-head"\nfps = 15\n'
        'results = "frame"\n')  # a finding per frame, so each frame's version shows
    config = load_config(config_path)
    bundle = bundles.pack(copy_model(shipped("fetal-head"), tmp_path / "build", "1.1.0"), private,
                          tmp_path / "fetal-head-1.1.0.bundle").path
    service = Service(config)
    service.start()
    try:
        wait_until(lambda: len(versions(tmp_path / "state")) >= 5, 60, what="findings from 1.0.0")
        old_runner = service.runners["fetal-head"]
        installer = installer_from_config(config, lambda kind: engine_options(config, kind))  # no key: local install
        outcome = installer.install(bundle)
        assert outcome.result == "activated", outcome.reason
        service.ota.activated("fetal-head", "1.1.0")
        assert service.runners["fetal-head"] is not old_runner
        assert service.ota.health.watching("fetal-head") == "1.1.0"
        seen = wait_until(lambda: (v := versions(tmp_path / "state")) and v[-1] == "1.1.0" and v, 60,
                          what="findings from 1.1.0")
        first_new = seen.index("1.1.0")
        assert set(seen[:first_new]) == {"1.0.0"} and set(seen[first_new:]) == {"1.1.0"}  # one switch, no mix back
        assert not service.stop_event.is_set() and all(t.is_alive() for t in service.threads)
    finally:
        assert service.stop() == 0
    restarted = Service(config)  # a restart inside the health window keeps the new version on probation
    restarted.start()
    try:
        assert restarted.runners["fetal-head"].manifest.version == "1.1.0"
        assert restarted.ota.health.watching("fetal-head") == "1.1.0"
    finally:
        assert restarted.stop() == 0
