"""Model updates on a running daemon, with a private Mosquitto: a signed bundle published in chunks is
installed and used (findings show the new model.version) without a restart; a tampered bundle and one whose
self-test fails are refused while the old version keeps running; the health rule and a version that does not
load roll back; a daemon SIGKILLed half-way through receiving (or in the self-test) finishes after a restart."""
from __future__ import annotations

import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import CR_CHEST, REPO, needs_shared
from mqtt_helpers import Broker, Capture, free_port, needs_mosquitto, wait_until
from ota_helpers import copy_model, keypair, rewrite, shipped

from edge_runtime.cli import render_status, status_report
from edge_runtime.config import load_config
from edge_runtime.ota import bundle as bundles
from edge_runtime.ota.store import ModelStore
from edge_runtime.service import Service

pytestmark = [needs_shared, needs_mosquitto]
MODEL = "cxr-pneumonia"  # bundles of it as 2.x versions: newer than the shipped one (1.1.0), so installs upgrade


@pytest.fixture
def broker(tmp_path):
    b = Broker(tmp_path / "broker").start()
    yield b
    b.stop()


@pytest.fixture
def site(tmp_path, broker):
    """Keys, a config with models.public_key and the broker, and the shipped version installed signed (with a
    key configured every model that runs must be signed: provisioning installs the shipped one's bundle)."""
    private, public = keypair(tmp_path / "keys")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    metrics = free_port()
    config = tmp_path / "edge.toml"
    config.write_text(
        f'[device]\nid = "scanner-1"\nsite = "clinic"\nstate_dir = "{tmp_path / "state"}"\n\n'
        '[engine]\nkind = "onnxruntime"\nthreads = 1\nwarmup_runs = 1\n\n'
        f'[models]\npublic_key = "{public}"\nhealth_max_errors = 2\n\n'
        f"[service]\nmetrics_port = {metrics}\nstop_timeout_s = 10\n\n"
        f'[mqtt]\nbroker = "{broker.url}"\nrequire_receipts = false\nrequire_subscriber = false\n'
        "telemetry_interval_s = 0\nreconnect_min_s = 0.05\nreconnect_max_s = 0.5\n\n"
        f'[[sources]]\nname = "xray"\nkind = "dicom-folder"\nmodel = "{MODEL}"\ninbox = "{inbox}"\n')
    s = {"tmp": tmp_path, "private": private, "public": public, "config": config, "inbox": inbox,
         "metrics": metrics, "broker": broker, "n": 0}
    assert edge(s, "install", str(bundle_of(s, "2.0.0"))).returncode == 0
    return s


def bundle_of(site, version: str, vectors: bytes | None = None) -> Path:
    site["n"] += 1
    folder = copy_model(shipped(MODEL), site["tmp"] / f"build-{site['n']}", version)
    return bundles.pack(folder, site["private"], site["tmp"] / f"{MODEL}-{version}-{site['n']}.bundle",
                        vectors=vectors).path


def edge(site, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_runtime", "--config", str(site["config"]), "models", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=120, stdin=subprocess.DEVNULL)


def publish(site, bundle: Path, chunk: int = 1 << 20, device: bool = True) -> None:
    args = ["publish", str(bundle), "--chunk-bytes", str(chunk)] + (["--device", "scanner-1"] if device else [])
    p = edge(site, *args)
    assert p.returncode == 0, p.stderr


def raw_publish(site, data: bytes, topic: str, chunk: int = 1 << 20) -> None:
    """What an attacker or a broken hub could send: no verification on the way."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from edge_runtime.ota.chunks import split

    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", site["broker"].port, 30)
    client.loop_start()
    try:
        for info in [client.publish(topic, p, qos=1) for p in split(data, chunk)]:
            info.wait_for_publish(30)
            assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


def drop_study(site) -> str:
    """A new chest CR in the inbox (a fresh SOP Instance UID, so it is not a byte-identical repeat)."""
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(CR_CHEST)
    ds.SOPInstanceUID = generate_uid()
    site["n"] += 1
    name = f"chest-{site['n']}.dcm"
    tmp = site["tmp"] / name
    ds.save_as(tmp)
    os.replace(tmp, site["inbox"] / name)
    return name


def findings(site) -> list[dict]:
    db = site["tmp"] / "state" / "outbox.sqlite"
    if not db.exists():
        return []
    conn = sqlite3.connect(db, timeout=10)
    try:
        return [json.loads(p) for (p,) in conn.execute("SELECT payload FROM findings ORDER BY seq")]
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()


def finding_for(site, name: str) -> dict:
    return wait_until(lambda: next((f for f in findings(site) if f["source"]["name"] == name), None), 90,
                      what=f"a finding for {name}")


def status_messages(capture: Capture) -> list[dict]:
    return [json.loads(p) for p in capture.payloads("/models/status")]


def last_event(capture: Capture, result: str, version: str | None = None) -> dict:
    def found():
        for m in reversed(status_messages(capture)):
            e = m["event"]
            if e.get("result") == result and (version is None or e.get("version") == version):
                return m
        return None
    return wait_until(found, 120, interval=0.1, what=f"a status event {result} {version}")


@pytest.fixture
def daemon(site):
    started: list[Service] = []

    def start() -> Service:
        service = Service(load_config(site["config"]))
        started.append(service)
        service.start()
        return service

    yield start
    for service in started:
        if not service.stop_event.is_set():
            service.stop()


def test_a_published_bundle_is_used_without_a_restart_and_bad_ones_are_refused(site, daemon):
    capture = Capture(site["broker"].port, "edge/v1/#")
    try:
        service = daemon()
        first = finding_for(site, drop_study(site))
        assert first["model"]["version"] == "2.0.0"

        publish(site, bundle_of(site, "2.1.0"), chunk=1 << 20)  # ~5.6 MB: 6 messages
        status = last_event(capture, "activated", "2.1.0")
        wait_until(lambda: service.runners[MODEL].manifest.version == "2.1.0", 60, what="the switch to 2.1.0")
        assert status["models"][MODEL]["active"] == "2.1.0" and status["models"][MODEL]["previous"] == "2.0.0"
        assert "self-test passed: fp32 on onnxruntime" in status["event"]["reason"]
        for variant in service.runners[MODEL].predictors:  # every variant the daemon runs was self-tested
            assert f"{variant} on onnxruntime" in status["event"]["reason"]
        second = finding_for(site, drop_study(site))
        assert second["model"]["version"] == "2.1.0"
        assert service.ready.is_set() and not service.stop_event.is_set()  # no restart

        # A changed file (signature still good, sha256 in the manifest not) -> refused, 2.1.0 keeps running.
        def flip(items):
            return [(i, d[:100] + bytes([d[100] ^ 0xFF]) + d[101:] if i.name.endswith("fp32.onnx") else d)
                    for i, d in items]
        tampered = rewrite(bundle_of(site, "2.2.0"), site["tmp"] / "tampered.bundle", flip)
        raw_publish(site, tampered.read_bytes(), "edge/v1/clinic/models/bundle")  # the site topic
        refused = last_event(capture, "refused", "2.2.0")
        assert "changed file: cxr-pneumonia-fp32.onnx" in refused["event"]["reason"]
        assert "\n" not in refused["event"]["reason"]

        # Expected outputs that this device does not reproduce -> the self-test fails, 2.1.0 keeps running.
        good = bundle_of(site, "2.3.0")
        vb = bundles.verify(good, site["public"])
        dest = site["tmp"] / "vectors"
        bundles.unpack(vb, dest)
        with np.load(dest / "selftest.npz") as z:
            arrays = {k: (z[k] + 0.5 if k.startswith("out_") else z[k]) for k in z.files}
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        publish(site, bundle_of(site, "2.3.0", vectors=buf.getvalue()))
        failed = last_event(capture, "failed", "2.3.0")
        assert "self-test failed" in failed["event"]["reason"]
        assert failed["models"][MODEL]["active"] == "2.1.0"
        assert service.runners[MODEL].manifest.version == "2.1.0"
        third = finding_for(site, drop_study(site))
        assert third["model"]["version"] == "2.1.0"

        report = status_report(f"http://127.0.0.1:{site['metrics']}/metrics")
        assert report["model_updates"][MODEL]["active"] == "2.1.0"
        assert report["model_updates"][MODEL]["result"] == "failed"
        line = next(t for t in render_status(report) if t.startswith(f"model {MODEL}:"))
        assert "active 2.1.0, previous 2.0.0" in line and "last failed 2.3.0: self-test failed" in line, line
        retained = [r for t, _, r in capture.messages if t.endswith("/models/status")]
        assert retained  # published with retain (the capture was subscribed before: it sees retain=False
        # on live delivery, so check the broker kept one for a newcomer instead)
        late = Capture(site["broker"].port, "edge/v1/clinic/scanner-1/models/status")
        try:
            got = wait_until(lambda: late.messages, 10, what="the retained status")
            assert got[0][2] is True and json.loads(got[0][1])["models"][MODEL]["active"] == "2.1.0"
        finally:
            late.close()
    finally:
        capture.close()


def test_health_rule_rolls_a_new_version_back_and_a_version_that_does_not_load_is_not_kept(site, daemon):
    service = daemon()
    assert edge(site, "install", str(bundle_of(site, "2.1.0"))).returncode == 0  # by hand, daemon running

    def switched() -> bool:  # the supervisor notices the new link and the agent switches to it
        service.supervise_once()
        return service.runners[MODEL].manifest.version == "2.1.0"
    wait_until(switched, 60, interval=0.2, what="the switch to the version installed by hand")
    assert service.ota.health.watching(MODEL) == "2.1.0"  # on probation like one from the hub

    def broken(frame):
        raise RuntimeError("engine fault on the new version")
    service.runners[MODEL].predictors[service.runners[MODEL].order[0]].predict = broken
    for _ in range(2):
        drop_study(site)
    def rolled() -> bool:
        service.supervise_once()
        return service.runners[MODEL].manifest.version == "2.0.0"
    wait_until(rolled, 120, interval=0.5, what="the rollback to 2.0.0")
    st = ModelStore(site["tmp"] / "state").state(MODEL)
    assert st.active == "2.0.0" and "2.1.0" in st.rolled_back and "2 worker errors" in st.last["reason"]
    assert service.ready.is_set()
    service.stop()

    # A version whose file was damaged on disk does not load at start-up: rolled back, the daemon starts.
    assert edge(site, "install", str(bundle_of(site, "2.2.0"))).returncode == 0
    onnx = site["tmp"] / "state" / "models" / "versions" / MODEL / "2.2.0" / "cxr-pneumonia-fp32.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-10])
    service = daemon()
    assert service.runners[MODEL].manifest.version == "2.0.0"
    st = ModelStore(site["tmp"] / "state").state(MODEL)
    assert "failed to load at start-up" in st.last["reason"] and "sha256 mismatch" in st.last["reason"]


def test_a_daemon_killed_half_way_through_receiving_a_bundle_finishes_it_after_a_restart(site):
    halt = "receiving-half"  # the other steps: tests/test_ota_install.py kills the same Installer at each
    def run(env_halt: str | None) -> subprocess.Popen:
        env = dict(os.environ)
        env.pop("EDGE_RUNTIME_OTA_HALT", None)
        if env_halt:
            env["EDGE_RUNTIME_OTA_HALT"] = env_halt
        return subprocess.Popen([sys.executable, "-m", "edge_runtime", "--config", str(site["config"]), "run"],
                                cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)

    def ready(proc) -> bool:
        assert proc.poll() is None, proc.stderr.read()
        try:
            return status_report(f"http://127.0.0.1:{site['metrics']}/metrics")["ready"]
        except OSError:
            return False

    proc = run(halt)
    try:
        wait_until(lambda: ready(proc), 90, interval=0.2, what="the daemon ready")
        publish(site, bundle_of(site, "2.1.0"), chunk=512 << 10)  # 11 messages
        assert proc.wait(120) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    store = ModelStore(site["tmp"] / "state")
    assert store.linked_version(MODEL) == "2.0.0"  # still the old version, whole
    held = [p for d in store.incoming_dir.iterdir() if d.is_dir() for p in d.glob("*.part")]
    assert 0 < len(held) < 11  # half a bundle on disk
    proc = run(None)
    try:
        # The rest of the chunks were queued by the broker for the device's persistent session.
        wait_until(lambda: store.linked_version(MODEL) == "2.1.0", 120, interval=0.2, what="2.1.0 active")
        name = drop_study(site)
        wait_until(lambda: next((f for f in findings(site) if f["source"]["name"] == name), None), 90,
                   what="a finding after the restart")
        assert next(f for f in findings(site) if f["source"]["name"] == name)["model"]["version"] == "2.1.0"
        assert not any(store.jobs_dir.iterdir()) and not any(store.staging_dir.iterdir())
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stderr.close()
