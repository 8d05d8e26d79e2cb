"""The daemon end to end: live and study sources through the shipped models into the outbox, the budget
controller against a deliberately slow engine, the watchdog against a stuck or crashed stage, `status`, and a
clean SIGTERM stop of the real `edge-runtime run` process."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from conftest import CR_CHEST, REPO, needs_shared
from mqtt_helpers import Broker, free_port, needs_mosquitto, wait_until

from edge_runtime.cli import status_report
from edge_runtime.config import load_config
from edge_runtime.errors import EdgeError
from edge_runtime.service import Service


def write_config(tmp_path: Path, sources: str, extra: str = "", stall_timeout_s: float = 20.0, metrics_port: int = 0) -> Path:
    path = tmp_path / "edge.toml"
    path.write_text(
        f'[device]\nid = "test-scanner"\nsite = "test-clinic"\nstate_dir = "{tmp_path / "state"}"\n\n'
        '[engine]\nkind = "onnxruntime"\nthreads = 1\nwarmup_runs = 1\n\n'
        f"[service]\nmetrics_port = {metrics_port}\nstall_timeout_s = {stall_timeout_s}\nstop_timeout_s = 10\n\n"
        + extra + "\n" + sources
    )
    return path


# A finding per frame: these tests are about per-frame findings, the budget and the outbox (exams: test_exams.py).
PHANTOM = '[[sources]]\nname = "probe"\nkind = "phantom"\nmodel = "fetal-head"\nfps = 30\nresults = "frame"\n'


def folder_source(inbox: Path) -> str:
    return f'[[sources]]\nname = "xray"\nkind = "dicom-folder"\nmodel = "cxr-pneumonia"\ninbox = "{inbox}"\n'


def outbox_rows(state: Path) -> list[dict]:
    conn = sqlite3.connect(state / "outbox.sqlite")
    try:
        return [json.loads(p) for (p,) in conn.execute("SELECT payload FROM findings ORDER BY seq")]
    finally:
        conn.close()


def sample(service: Service, name: str, **labels) -> float:
    return service.metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
def running():
    """Start a Service from a config file; always stopped at the end."""
    started: list[Service] = []

    def start(config_path: Path) -> Service:
        service = Service(load_config(config_path))
        started.append(service)
        service.start()
        return service

    yield start
    for service in started:
        if not service.stop_event.is_set():
            service.stop()


def test_phantom_findings_are_committed_with_latency_breakdown(tmp_path, running):
    service = running(write_config(tmp_path, PHANTOM))
    assert service.ready.is_set()
    wait_until(lambda: sample(service, "edge_findings_total", model="fetal-head", priority="routine") >= 20, 30,
               what="20 fetal-head findings")
    assert service.stop() == 0
    rows = outbox_rows(tmp_path / "state")
    assert len(rows) >= 20
    f = rows[-1]
    assert f["model"]["name"] == "fetal-head" and f["source"] == {"kind": "phantom", "name": "probe"}
    assert f["device_id"] == "test-scanner" and f["site"] == "test-clinic"
    assert set(f["latency_ms"]) >= {"capture_to_result", "preprocess", "inference", "postprocess"}
    assert f["budget_ms"] > 0 and isinstance(f["budget_met"], bool)
    assert [r["seq"] for r in rows] == sorted({r["seq"] for r in rows})  # the outbox numbers them, no gaps reused
    hcs = [r["result"]["measurements"].get("head_circumference_mm") for r in rows if r["result"].get("measurements")]
    assert hcs and all(h is None or 100 < h < 400 for h in hcs)
    assert sample(service, "edge_frames_in_total", source="probe") >= len(rows)


def slowed_fp32(service: Service, seconds: float):
    """Make the FP32 engine of fetal-head slower by `seconds` per inference; returns the function that undoes it."""
    fp32 = service.runners["fetal-head"].get("fp32").engine
    fast_run = fp32.run_all  # gated models (issue 13) run every output: the features feed the scope gate

    def slow_run(x):  # a board whose FP32 path cannot keep up
        time.sleep(seconds)
        return fast_run(x)

    fp32.run_all = slow_run
    return lambda: setattr(fp32, "run_all", fast_run)


def failed_rounds(budget, level: int) -> int:
    return sum(1 for r in list(budget.rounds) if r.level == level and r.result == "failed")


# The test is about the controller's decisions, not about how fast this machine is today: a budget far above what
# FP32 needs even on a 2-core machine shared with busy loops and other test suites (p95 up to about 500 ms from
# capture to result at 30 fps with a load average of 7.5; 10 fps leaves no queueing), and a slowdown well past it.
SLOW_BUDGET = PHANTOM.replace("fps = 30", "fps = 10\nbudget_ms = 1000")
SLOWDOWN_S = 1.2


def test_slow_engine_steps_down_to_the_int8_variant_and_stays(tmp_path, running):
    service = running(write_config(tmp_path, SLOW_BUDGET))
    runner = service.runners["fetal-head"]
    assert runner.order[0] == "fp32" and any("int8" in v for v in runner.order[1:]), runner.order
    budget = service.budgets["probe"]
    wait_until(lambda: sample(service, "edge_findings_total", model="fetal-head", priority="routine") >= 30, 30,
               what="30 findings at full speed")
    assert budget.index == 0, budget.switches  # without the slowdown, FP32 holds the budget
    slowed_fp32(service, SLOWDOWN_S)
    wait_until(lambda: budget.index >= 1, 60, what="a step down")
    assert "int8" in budget.level.variant
    assert budget.switches[0].reason.startswith("p95") and "over budget" in budget.switches[0].reason
    assert sample(service, "edge_variant_switches_total", model="fetal-head", source="probe", direction="down") >= 1
    wait_until(lambda: any(r["model"]["precision"] == "int8" for r in outbox_rows(tmp_path / "state")), 15,
               what="an int8 finding")
    # INT8 has headroom, so FP32 is probed under the load of now, twice (the second after a doubled back-off):
    # 1200+ ms does not fit under 700 ms (0.7 x budget), so it is never stepped up to.
    wait_until(lambda: failed_rounds(budget, 0) >= 2 or any(s.to_level == 0 for s in list(budget.switches)), 60,
               what="two failed probe rounds of FP32")
    assert all(s.to_level >= 1 for s in budget.switches), [s.reason for s in budget.switches]
    assert budget.backoff_s[0] >= 4 * budget.dwell_s
    assert sample(service, "edge_budget_probe_rounds_total", model="fetal-head", source="probe", result="failed") >= 2
    assert sample(service, "edge_budget_probes_total", model="fetal-head", source="probe") >= 4
    # Frames captured while a 1.2 s probe ran were skipped, not committed late behind it.
    assert sample(service, "edge_frames_probe_skipped_total", model="fetal-head", source="probe") >= 1
    # The probes' results are discarded: after the step down every committed finding is INT8.
    precisions = [r["model"]["precision"] for r in outbox_rows(tmp_path / "state")]
    assert "fp32" not in precisions[precisions.index("int8"):]


def test_a_probe_that_fits_under_the_current_load_steps_back_up(tmp_path, running):
    service = running(write_config(tmp_path, SLOW_BUDGET))
    budget = service.budgets["probe"]
    wait_until(lambda: sample(service, "edge_findings_total", model="fetal-head", priority="routine") >= 20, 30,
               what="20 findings at full speed")
    restore = slowed_fp32(service, SLOWDOWN_S)
    wait_until(lambda: budget.index >= 1, 60, what="a step down")
    wait_until(lambda: failed_rounds(budget, 0) >= 1, 60, what="a failed probe round of FP32")
    assert budget.index >= 1
    restore()  # the neighbour that slowed FP32 down has gone
    wait_until(lambda: budget.index == 0, 60, what="a step back up to FP32")
    up = budget.switches[-1]
    assert up.to_level == 0 and up.reason.startswith("probe p95"), [s.reason for s in budget.switches]
    assert sample(service, "edge_variant_switches_total", model="fetal-head", source="probe", direction="up") >= 1
    assert sample(service, "edge_budget_probe_rounds_total", model="fetal-head", source="probe", result="passed") >= 1
    seen = len(outbox_rows(tmp_path / "state"))
    wait_until(lambda: any(r["model"]["precision"] == "fp32" for r in outbox_rows(tmp_path / "state")[seen:]), 30,
               what="an FP32 finding after the step up")


class NotifySocket:
    """What systemd sees: a datagram socket at $NOTIFY_SOCKET."""

    def __init__(self, monkeypatch) -> None:
        self.dir = tempfile.mkdtemp(prefix="notify-", dir="/tmp")  # AF_UNIX paths are short
        self.path = os.path.join(self.dir, "sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.05)
        monkeypatch.setenv("NOTIFY_SOCKET", self.path)

    def messages(self) -> list[str]:
        out = []
        while True:
            try:
                out.append(self.sock.recv(4096).decode())
            except (socket.timeout, BlockingIOError):
                return out

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def test_watchdog_is_withheld_while_inference_is_stuck(tmp_path, running, monkeypatch):
    notify = NotifySocket(monkeypatch)
    try:
        service = running(write_config(tmp_path, PHANTOM, stall_timeout_s=0.5))
        assert any(m.startswith("READY=1") for m in notify.messages())  # only once models are warm
        assert service.supervise_once() == []
        assert "WATCHDOG=1" in notify.messages()

        engines = [p.engine for p in service.runners["fetal-head"].predictors.values()]
        fast_runs, release = [e.run_all for e in engines], threading.Event()
        stuck = threading.Event()

        def hung(fast_run):
            def hung_run(x):
                stuck.set()
                release.wait(30)
                return fast_run(x)
            return hung_run

        for engine, fast_run in zip(engines, fast_runs):  # whichever variant the budget has chosen by now
            engine.run_all = hung(fast_run)
        assert stuck.wait(10)
        time.sleep(0.7)
        assert service.supervise_once() == ["probe"]
        assert "WATCHDOG=1" not in notify.messages()  # systemd's WatchdogSec runs out and restarts us
        assert sample(service, "edge_stage_stalled", stage="probe") == 1

        for engine, fast_run in zip(engines, fast_runs):
            engine.run_all = fast_run
        release.set()
        wait_until(lambda: service.progress["probe"].busy_since is None, 10, what="the stage to move again")
        assert service.supervise_once() == []
        assert "WATCHDOG=1" in notify.messages()
    finally:
        notify.close()


def test_a_crashed_worker_stops_the_watchdog(tmp_path, running, monkeypatch):
    notify = NotifySocket(monkeypatch)
    try:
        service = running(write_config(tmp_path, PHANTOM, stall_timeout_s=0.5))
        def broken(x):
            raise RuntimeError("driver fault")

        for predictor in service.runners["fetal-head"].predictors.values():
            predictor.engine.run = predictor.engine.run_all = broken
        wait_until(lambda: not service.threads[0].is_alive(), 10, what="the worker to die")
        notify.messages()
        assert service.supervise_once() == ["probe"]
        assert "WATCHDOG=1" not in notify.messages()
    finally:
        notify.close()


@needs_shared
def test_study_committed_before_a_crash_gives_no_second_finding(tmp_path, running):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    shutil.copy(CR_CHEST, inbox / "chest.dcm")
    config = write_config(tmp_path, folder_source(inbox))
    service = running(config)
    wait_until(lambda: (tmp_path / "inbox-done" / "chest.dcm").exists(), 60, what="chest.dcm in done/")
    assert service.stop() == 0
    first = outbox_rows(tmp_path / "state")
    assert len(first) == 1 and first[0]["model"]["name"] == "cxr-pneumonia"
    assert first[0]["study"]["modality"] == "CR" and first[0]["result"]["label"] in ("normal", "pneumonia")

    # A crash between the commit and the move leaves the same file in the inbox: it is retried, not re-counted.
    shutil.copy(CR_CHEST, inbox / "chest-again.dcm")
    service = running(config)
    wait_until(lambda: (tmp_path / "inbox-done" / "chest-again.dcm").exists(), 60, what="the retried file in done/")
    assert service.stop() == 0
    assert [r["finding_id"] for r in outbox_rows(tmp_path / "state")] == [first[0]["finding_id"]]


@needs_shared
def test_out_of_scope_study_is_committed_as_not_assessed_and_moved_to_done(tmp_path, running):
    """Issue 13: an extremity CR through the chest model is handled, not broken: a finding with
    result.assessed=false and the reason, routine, and the file in done/ (not quarantine/)."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    shutil.copy(CR_CHEST.with_name("RG3_UNCR.dcm"), inbox / "hand.dcm")
    service = running(write_config(tmp_path, folder_source(inbox)))
    wait_until(lambda: (tmp_path / "inbox-done" / "hand.dcm").exists(), 60, what="hand.dcm in done/")
    assert service.stop() == 0
    (row,) = outbox_rows(tmp_path / "state")
    assert row["result"]["assessed"] is False and row["priority"] == "routine"
    assert "BodyPartExamined is EXTREMITY" in row["result"]["reason"] and "label" not in row["result"]
    quarantine = tmp_path / "inbox-quarantine"
    assert not quarantine.exists() or not [p for p in quarantine.iterdir() if not p.name.startswith(".")]


def edge_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_runtime", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


@needs_shared
def test_run_quarantines_bad_input_reports_status_and_stops_cleanly_on_sigterm(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "truncated.dcm").write_bytes(CR_CHEST.read_bytes()[:4096])
    (inbox / "notes.dcm").write_bytes(b"not a dicom file")
    port = free_port()
    config = write_config(tmp_path, PHANTOM + "\n" + folder_source(inbox), metrics_port=port)
    proc = subprocess.Popen([sys.executable, "-m", "edge_runtime", "--config", str(config), "run"], cwd=REPO,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        quarantine = tmp_path / "inbox-quarantine"
        wait_until(lambda: (quarantine / "notes.dcm.reason.txt").exists() and (quarantine / "truncated.dcm.reason.txt").exists(),
                   90, what="both bad files quarantined")
        assert "DICOM" in (quarantine / "notes.dcm.reason.txt").read_text()
        # The daemon goes on: a good study dropped after the bad ones is processed.
        shutil.copy(CR_CHEST, inbox / "chest.dcm.part")
        os.rename(inbox / "chest.dcm.part", inbox / "chest.dcm")
        wait_until(lambda: (tmp_path / "inbox-done" / "chest.dcm").exists(), 60, what="chest.dcm in done/")
        assert proc.poll() is None

        status = edge_cli("--config", str(config), "status", "--json")
        assert status.returncode == 0, status.stderr
        report = json.loads(status.stdout)
        assert report["ready"] is True and report["link_up"] is False
        assert report["sources"]["xray"]["quarantined"] == 2 and report["sources"]["xray"]["errors"] == 2
        assert report["sources"]["probe"]["frames_in"] > 0
        assert report["models"]["fetal-head"]["p50_ms"] > 0
        assert report["models"]["cxr-pneumonia"]["findings"]
        assert report["outbox"]["delivered"] == 0 and report["uplink"] == {}  # no broker configured
        table = edge_cli("--config", str(config), "status")
        assert table.returncode == 0 and "fetal-head" in table.stdout and "xray" in table.stdout

        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-2000:]
    assert "quarantined notes.dcm" in err and "Traceback" not in err
    rows = outbox_rows(tmp_path / "state")
    assert sum(r["model"]["name"] == "cxr-pneumonia" for r in rows) == 1
    assert sum(r["model"]["name"] == "fetal-head" for r in rows) > 10

    gone = edge_cli("--config", str(config), "status")
    assert gone.returncode != 0 and len(gone.stderr.strip().splitlines()) == 1 and "no daemon" in gone.stderr


def test_run_without_sources_is_a_one_line_error(tmp_path):
    config = write_config(tmp_path, "")
    result = edge_cli("--config", str(config), "run")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "sources" in result.stderr


@needs_mosquitto
def test_findings_reach_a_collector_when_the_broker_appears(tmp_path, running):
    from edge_runtime.collector import Collector

    broker = Broker(tmp_path / "broker")
    mqtt = (f'[mqtt]\nbroker = "{broker.url}"\nreconnect_min_s = 0.2\nreconnect_max_s = 0.5\n'
            "telemetry_interval_s = 0\n")
    port = free_port()
    service = running(write_config(tmp_path, PHANTOM, extra=mqtt, metrics_port=port))
    wait_until(lambda: sample(service, "edge_findings_total", model="fetal-head", priority="routine") >= 30, 30,
               what="a backlog while offline")
    assert service.uplink.connected is False
    broker.start()
    collector = Collector(broker.url, tmp_path / "hub.sqlite", client_id="hub-test").start()
    try:
        assert collector.subscribed.wait(15)
        wait_until(lambda: service.uplink.connected, 15, what="the uplink to connect")
        wait_until(lambda: sample(service, "edge_outbox_delivered_total") >= 30, 30, what="the backlog to drain")
        service.supervise_once()
        assert sample(service, "edge_link_up") == 1
        assert sample(service, "edge_uplink_acked_total") >= 30
        report = status_report(f"http://127.0.0.1:{port}/metrics")
        assert report["link_up"] and report["uplink"]["acked"] >= 30 and report["outbox"]["delivered"] >= 30
        assert service.stop() == 0
        conn = sqlite3.connect(tmp_path / "state" / "outbox.sqlite")
        delivered = {fid for (fid,) in conn.execute("SELECT finding_id FROM findings WHERE state != 0")}
        committed = {fid for (fid,) in conn.execute("SELECT finding_id FROM findings")}
        conn.close()
        # Every finding the broker acknowledged reaches the subscribed collector.
        wait_until(lambda: collector.stats()["stored"] >= len(delivered), 15, what="the collector to store the delivered")
    finally:
        collector.stop()
        broker.stop()
    hub = sqlite3.connect(tmp_path / "hub.sqlite")
    received = {fid for (fid,) in hub.execute("SELECT finding_id FROM findings")}
    hub.close()
    assert delivered <= received <= committed and len(delivered) >= 30


@needs_shared
def test_a_full_store_keeps_the_study_in_the_inbox_and_retries_it(tmp_path, running, caplog):
    from edge_runtime.outbox import OutboxFull

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    service = running(write_config(tmp_path, folder_source(inbox)))
    service.folders["xray"].retry_s = 0.3
    real_commit, full = service.outbox.commit, threading.Event()
    full.set()

    def commit(finding, source_item=None):
        if full.is_set():
            raise OutboxFull(str(service.outbox.path), "database or disk is full")
        return real_commit(finding, source_item=source_item)

    service.outbox.commit = commit
    shutil.copy(CR_CHEST, inbox / "chest.dcm")
    wait_until(lambda: sample(service, "edge_outbox_full_total") >= 2, 60, what="two refused commits (a retry)")
    assert (inbox / "chest.dcm").exists()
    assert not [p for p in (tmp_path / "inbox-quarantine").iterdir() if not p.name.startswith(".")]
    assert any("disk is full" in r.getMessage() and "retried" in r.getMessage() for r in caplog.records)
    full.clear()  # space comes back
    wait_until(lambda: (tmp_path / "inbox-done" / "chest.dcm").exists(), 60, what="chest.dcm in done/")
    assert service.stop() == 0
    assert len(outbox_rows(tmp_path / "state")) == 1


CINE = REPO.parent / "shared" / "data" / "dicom" / "pydicom-data" / "color3d_jpeg_baseline.dcm"


@needs_shared
def test_a_long_multi_frame_study_is_progress_and_resumes_after_a_stop(tmp_path, running):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    shutil.copy(CINE, inbox / "echo.dcm")  # 120 frames, ultrasound
    source = f'[[sources]]\nname = "us"\nkind = "dicom-folder"\nmodel = "fetal-head"\ninbox = "{inbox}"\n'
    config = write_config(tmp_path, source, stall_timeout_s=1.0)
    service = running(config)
    wait_until(lambda: sample(service, "edge_findings_total", model="fetal-head", priority="routine") >= 10, 60,
               what="the first frames of the study")
    time.sleep(1.5)  # longer than the stall timeout, in the middle of one file
    assert service.supervise_once() == []  # frame by frame is progress, not a stuck item
    assert service.stop() == 0  # stops between frames; the file goes back to the inbox
    first = outbox_rows(tmp_path / "state")
    assert 10 <= len(first) < 120 and (inbox / "echo.dcm").exists()

    service = running(config)  # the restart finishes the study without repeating a frame
    wait_until(lambda: (tmp_path / "inbox-done" / "echo.dcm").exists(), 120, what="echo.dcm in done/")
    assert service.stop() == 0
    rows = outbox_rows(tmp_path / "state")
    assert sorted(r["study"]["frame_index"] for r in rows) == list(range(120))


@needs_shared
def test_an_engine_fault_on_one_study_does_not_stop_the_inbox(tmp_path, running, caplog):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    service = running(write_config(tmp_path, folder_source(inbox)))
    folder = service.folders["xray"]
    folder.retry_s = 0.0
    predictor = service.runners["cxr-pneumonia"].get("fp32")
    real_predict = predictor.predict

    def predict(frame):
        if frame.source_name == "poison.dcm":
            raise RuntimeError("device lost")
        return real_predict(frame)

    predictor.predict = predict
    shutil.copy(CR_CHEST, inbox / "poison.dcm")
    os.utime(inbox / "poison.dcm", (time.time() - 60, time.time() - 60))  # the oldest: first in line
    wait_until(lambda: (tmp_path / "inbox-quarantine" / "poison.dcm").exists(), 60, what="poison.dcm quarantined")
    reason = (tmp_path / "inbox-quarantine" / "poison.dcm.reason.txt").read_text()
    assert "3 attempts" in reason and "device lost" in reason
    assert sample(service, "edge_worker_errors_total", source="xray") == 3
    shutil.copy(CR_CHEST, inbox / "chest.dcm")
    wait_until(lambda: (tmp_path / "inbox-done" / "chest.dcm").exists(), 60, what="chest.dcm in done/")
    assert all(t.is_alive() for t in service.threads)
    assert service.stop() == 0


def test_a_capture_thread_stuck_in_the_driver_stops_the_watchdog(tmp_path, running, monkeypatch):
    notify = NotifySocket(monkeypatch)
    try:
        service = running(write_config(tmp_path, PHANTOM, stall_timeout_s=0.5))
        source, release = service.live_sources[0], threading.Event()
        real_read = source.read

        def hung_read():
            release.wait(30)  # a V4L2 read that never returns
            return real_read()

        source.read = hung_read
        wait_until(lambda: source.reading_since is not None and time.monotonic() - source.reading_since > 0.7, 10,
                   what="a capture stuck for longer than the stall timeout")
        notify.messages()
        assert service.supervise_once() == ["probe/capture"]
        assert "WATCHDOG=1" not in notify.messages()
        source.read = real_read
        release.set()
        wait_until(lambda: service.supervise_once() == [], 10, what="the capture to recover")
    finally:
        notify.close()


# ------------------------------------------------------------------ issue 11: faults a technician can see
ABSENT_VIDEO = "/dev/video9"
needs_absent_video = pytest.mark.skipif(os.path.exists(ABSENT_VIDEO), reason=f"{ABSENT_VIDEO} exists on this machine")
DEAD_VIDEO = f'[[sources]]\nname = "probe"\nkind = "video"\nmodel = "fetal-head"\ndevice = "{ABSENT_VIDEO}"\n'


@needs_absent_video
def test_a_video_source_that_never_opens_is_visible_in_status_metrics_and_doctor(tmp_path, running, caplog,
                                                                                 monkeypatch):
    import logging

    caplog.set_level(logging.INFO, logger="edge_runtime")
    inbox = tmp_path / "inbox"
    port = free_port()
    config = write_config(tmp_path, DEAD_VIDEO + "\n" + folder_source(inbox), metrics_port=port)
    notify = NotifySocket(monkeypatch)
    try:
        service = running(config)
        (ready_msg,) = [m for m in notify.messages() if m.startswith("READY=1")]
    finally:
        notify.close()
    assert "STATUS=ready in" in ready_msg and "not up: probe down" in ready_msg  # systemctl status shows it
    ready = [r for r in caplog.records if r.getMessage().startswith("ready in")]
    assert len(ready) == 1 and ready[0].levelname == "WARNING", [r.getMessage() for r in caplog.records]
    assert "up: xray (dicom-folder)" in ready[0].getMessage() and "probe down" in ready[0].getMessage()
    assert ABSENT_VIDEO in ready[0].getMessage()

    state = service.source_states()["probe"]
    assert state.state == "down" and ABSENT_VIDEO in state.reason and state.next_retry is not None
    assert sample(service, "edge_source_up", source="probe") == 0
    assert sample(service, "edge_source_up", source="xray") == 1
    assert sample(service, "edge_source_state", source="probe", kind="video", state="down", reason=state.reason) == 1

    report = status_report(f"http://127.0.0.1:{port}/metrics")
    probe = report["sources"]["probe"]  # listed although it never produced a frame
    assert probe["state"] == "down" and probe["frames_in"] == 0 and ABSENT_VIDEO in probe["reason"]
    assert probe["retry_in_s"] is not None and report["sources"]["xray"]["state"] == "up"
    table = edge_cli("--config", str(config), "status")
    assert table.returncode == 0, table.stderr
    row = next(line for line in table.stdout.splitlines() if line.startswith("probe"))
    assert "down" in row and ABSENT_VIDEO in row

    doctor = edge_cli("doctor", "--quick", "--config", str(config), timeout=120)
    assert doctor.returncode == 1, doctor.stdout
    assert "[FAIL] sources[0].device" in doctor.stdout and ABSENT_VIDEO in doctor.stdout


@needs_absent_video
@needs_mosquitto
def test_a_source_down_longer_than_the_alarm_time_raises_an_alarm_on_the_telemetry_topic(tmp_path, running, caplog):
    from mqtt_helpers import Capture

    broker = Broker(tmp_path / "broker").start()
    capture = Capture(broker.port, topic="edge/v1/+/+/telemetry")
    try:
        mqtt = f'[mqtt]\nbroker = "{broker.url}"\ntelemetry_interval_s = 0.3\nreconnect_min_s = 0.2\n'
        config = write_config(tmp_path, DEAD_VIDEO, extra=mqtt)
        config.write_text(config.read_text().replace("stop_timeout_s = 10\n",
                                                     "stop_timeout_s = 10\nsource_down_alarm_s = 1\n"))
        service = running(config)
        assert service.current_alarms() == []  # down, but not yet for long enough
        wait_until(lambda: service.current_alarms(), 15, what="the source-down alarm")
        service.supervise_once()
        assert any(r.levelname == "ERROR" and "ALARM: source probe down" in r.getMessage() for r in caplog.records)

        def alarmed() -> list[dict]:
            bodies = [json.loads(p) for p in capture.payloads("/telemetry")]
            return [a for b in bodies for a in b.get("alarms", [])]

        alarm = wait_until(alarmed, 20, what="an alarm in a telemetry message")[-1]
        assert alarm["kind"] == "source_down" and alarm["source"] == "probe" and alarm["down_s"] >= 1
        assert ABSENT_VIDEO in alarm["reason"]
    finally:
        capture.close()
        broker.stop()


def test_a_second_daemon_on_the_same_state_directory_exits_2_naming_the_pid(tmp_path, running):
    port = free_port()
    config = write_config(tmp_path, PHANTOM, metrics_port=port)
    running(config)
    other = tmp_path / "other.toml"  # the same state directory, another metrics port
    other.write_text(config.read_text().replace(f"metrics_port = {port}", f"metrics_port = {free_port()}"))
    second = edge_cli("run", "--config", str(other))
    assert second.returncode == 2, second.stderr
    (line,) = second.stderr.strip().splitlines()
    assert str(tmp_path / "state") in line and f"pid {os.getpid()}" in line and "already in use" in line
    # Reading tools keep working beside the daemon; check says the ports are the daemon's, not problems.
    assert edge_cli("status", "--config", str(config)).returncode == 0
    doctor = edge_cli("doctor", "--quick", "--config", str(config), timeout=120)
    assert doctor.returncode == 0 and f"pid {os.getpid()}" in doctor.stdout, doctor.stdout
    check = edge_cli("check", "--config", str(config))
    assert check.returncode == 0, check.stdout
    assert f"127.0.0.1:{port} is held by the running daemon (pid {os.getpid()})" in check.stdout


def test_a_taken_metrics_port_is_named(tmp_path, running):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(EdgeError, match=rf"service.metrics_port.*127\.0\.0\.1:{port}.*already in use"):
            running(write_config(tmp_path, PHANTOM, metrics_port=port))


@needs_shared
def test_studies_in_inbox_subfolders_are_processed_with_one_info_line_each(tmp_path, running, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="edge_runtime")
    inbox = tmp_path / "inbox"
    (inbox / "2026-12-01" / "room-2").mkdir(parents=True)
    shutil.copy(CR_CHEST, inbox / "2026-12-01" / "room-2" / "chest.dcm")
    service = running(write_config(tmp_path, folder_source(inbox)))
    wait_until(lambda: (tmp_path / "inbox-done" / "chest.dcm").exists(), 60, what="the nested chest.dcm in done/")
    assert service.stop() == 0
    (row,) = outbox_rows(tmp_path / "state")
    lines = [r for r in caplog.records if "chest.dcm ->" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelname == "INFO"
    text = lines[0].getMessage()
    assert text.startswith("xray: chest.dcm -> cxr-pneumonia: ") and row["result"]["label"] in text
    assert row["priority"] in text and text.endswith(" ms")
    assert any(r.getMessage().startswith("stopped in") for r in caplog.records)


def _ctrl_c_as_at_a_terminal() -> None:
    """A suite started in the background of a non-interactive shell inherits SIGINT as ignored, and Python then
    never raises KeyboardInterrupt: give the child the default disposition, as a terminal's Ctrl-C finds it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@needs_absent_video
def test_run_logs_only_json_lifecycle_at_info_and_status_watch_redraws(tmp_path):
    port = free_port()
    config = write_config(tmp_path, PHANTOM + "\n" + DEAD_VIDEO.replace('"probe"', '"grabber"'), metrics_port=port)
    config.write_text(config.read_text().replace("stop_timeout_s = 10\n", 'stop_timeout_s = 10\nlog_format = "json"\n'))
    proc = subprocess.Popen([sys.executable, "-m", "edge_runtime", "run", "--config", str(config)], cwd=REPO,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watch_out = tmp_path / "watch.txt"
    try:
        url = f"http://127.0.0.1:{port}/metrics"

        def ready() -> bool:
            try:
                return status_report(url)["ready"] and bool(status_report(url)["models"])
            except OSError:
                return False

        wait_until(ready, 90, what="the daemon to be ready with a finding")
        with open(watch_out, "w") as out:
            watch = subprocess.Popen([sys.executable, "-m", "edge_runtime", "status", "--watch", "--interval", "0.2",
                                      "--config", str(config)], cwd=REPO, stdout=out, stderr=subprocess.PIPE, text=True,
                                     preexec_fn=_ctrl_c_as_at_a_terminal)
            wait_until(lambda: watch_out.read_text().count("edge-runtime ready") >= 2, 30, what="two redraws")
            watch.send_signal(signal.SIGINT)
            assert watch.wait(30) == 0 and "Traceback" not in watch.stderr.read()
        shown = watch_out.read_text()
        # The operating point as the demo shows it (which one depends on how busy this machine is).
        assert re.search(r"fetal-head .* (fp32|int8\S*) @ (every frame|[\d.]+/s) ", shown), shown
        assert "exact, over each model's recent findings" in shown
        model = status_report(url)["models"]["fetal-head"]
        assert model["percentiles"] == "exact, recent findings"
        assert model["p50_ms"] <= model["p99_ms"] <= model["max_ms"]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-2000:]
    entries = [json.loads(line) for line in err.splitlines()]  # every line is JSON: OpenCV's own lines silenced
    messages = [(e["level"], e["msg"]) for e in entries]
    assert any(level == "info" and m.startswith("starting edge-runtime") for level, m in messages), messages
    assert any(level == "warning" and m.startswith("ready in") and "grabber down" in m for level, m in messages)
    assert ("info", "stopping (SIGTERM)") in messages
    assert any(level == "info" and m.startswith("stopped in") for level, m in messages)


def test_each_study_source_gets_its_own_decode_worker(tmp_path):
    """One worker shared by two inboxes would leave the second source waiting, busy as the watchdog sees it, for as
    long as the first one's study takes: the pool has at least one worker per study source."""
    two = folder_source(tmp_path / "a") + folder_source(tmp_path / "b").replace('name = "xray"', 'name = "xray-2"')
    service = Service(load_config(write_config(tmp_path, two)))
    assert service.decoder.size == 2
    one = Service(load_config(write_config(tmp_path, folder_source(tmp_path / "a"))))
    assert one.decoder.size == 1
