"""The local view (edge_runtime/view): its endpoints on a real daemon reading a phantom, the token, feedback
through the outbox to a collector over a real Mosquitto, and streams that cannot hold anyone up."""
from __future__ import annotations

import json
import socket
import sqlite3
import stat
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import cv2
import numpy as np
import pytest

from mqtt_helpers import Broker, needs_mosquitto, wait_until
from edge_runtime.config import load_config
from edge_runtime.errors import ConfigError
from edge_runtime.findings import DeviceIdentity
from edge_runtime.live_results import FrameResult
from edge_runtime.outbox import Outbox
from edge_runtime.view.auth import load_or_create_token
from edge_runtime.view.feedback import FeedbackError, build_record
from edge_runtime.view.guidance import guidance


def write_config(tmp_path: Path, extra: str = "", view: str = "port = 0\n", sources: str | None = None) -> Path:
    path = tmp_path / "edge.toml"
    if sources is None:
        sources = ('[[sources]]\nname = "probe"\nkind = "phantom"\nmodel = "fetal-head"\nfps = 30\nsweeps = true\n'
                   'exam_gap_s = 1.5\nresults = "both"\n')
    path.write_text(
        f'[device]\nid = "view-scanner"\nsite = "view-clinic"\nstate_dir = "{tmp_path / "state"}"\n\n'
        '[engine]\nkind = "onnxruntime"\nthreads = 1\nwarmup_runs = 1\n\n'
        "[service]\nmetrics_port = 0\nstop_timeout_s = 15\n\n" + extra + f"[view]\n{view}\n" + sources)
    return path


class Client:
    def __init__(self, url: str, token: str | None) -> None:
        self.url, self.token = url.rstrip("/"), token

    def request(self, path: str, body: bytes | None = None, content_type: str = "application/json",
                token: str | None = "default", method: str | None = None):
        headers = {}
        token = self.token if token == "default" else token
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if body is not None:
            headers["Content-Type"] = content_type
        req = urllib.request.Request(self.url + path, data=body, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=20) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def json(self, path: str):
        status, _, body = self.request(path)
        assert status == 200, (path, status, body[:200])
        return json.loads(body)

    def feedback(self, finding_id: str, body) -> tuple[int, dict]:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        status, _, text = self.request(f"/api/findings/{finding_id}/feedback", raw)
        return status, json.loads(text)


@pytest.fixture
def daemon(tmp_path):
    from edge_runtime.service import Service

    service = Service(load_config(write_config(tmp_path)))
    service.start()
    try:
        assert service.view is not None, service.alarms
        yield service, Client(service.view.url, service.view.token)
    finally:
        service.stop()


def feedback_rows(state: Path) -> list[tuple[int, dict, int]]:
    conn = sqlite3.connect(f"file:{state / 'outbox.sqlite'}?mode=ro", uri=True)
    try:
        return [(seq, json.loads(p), st) for seq, p, st in
                conn.execute("SELECT seq, payload, state FROM findings WHERE seq < 0 ORDER BY seq DESC")]
    finally:
        conn.close()


# ---------------------------------------------------------------- the daemon's view
def test_every_endpoint_answers_401_without_the_token_and_healthz_needs_none(daemon, tmp_path):
    service, client = daemon
    assert client.request("/healthz", token=None)[0] == 200
    paths = ["/", "/api/status", "/api/findings", "/api/feedback", "/latest.jpg?source=probe",
             "/live.mjpeg?source=probe", "/events"]
    for path in paths:
        for token in (None, "wrong-token"):
            status, headers, body = client.request(path, token=token)
            assert status == 401, path
            assert headers.get("Content-Type", "").startswith("text/plain") and len(body.splitlines()) == 1
            assert b"--frame" not in body and b"event:" not in body and b"<html" not in body.lower()
    some_id = str(uuid.uuid4())
    status, _, _ = client.request(f"/api/findings/{some_id}/feedback", json.dumps({"verdict": "confirm"}).encode(),
                                  token=None)
    assert status == 401 and feedback_rows(tmp_path / "state") == []
    token_file = tmp_path / "state" / "view.token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600 and token_file.read_text().strip() == service.view.token


def test_a_browser_first_visit_moves_the_token_into_a_cookie(daemon):
    service, client = daemon
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", service.view.port, timeout=10)
    conn.request("GET", f"/?token={service.view.token}")
    r = conn.getresponse()
    r.read()
    assert r.status == 302 and r.getheader("Location") == "/"  # the token leaves the address bar
    cookie = r.getheader("Set-Cookie")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    conn.request("GET", "/api/status", headers={"Cookie": cookie.split(";")[0]})
    r = conn.getresponse()
    assert r.status == 200 and json.loads(r.read())["device"]["id"] == "view-scanner"
    conn.request("GET", "/", headers={"Cookie": cookie.split(";")[0]})
    r = conn.getresponse()
    assert r.status == 200 and b"<html" in r.read().lower()
    conn.close()


def test_status_pictures_findings_and_feedback_on_a_running_daemon(daemon, tmp_path):
    service, client = daemon
    wait_until(lambda: client.json("/api/status")["sources"][0]["latest"] is not None, 30, interval=0.2,
               what="a live result in the status")
    tile = client.json("/api/status")["sources"][0]
    assert tile["name"] == "probe" and tile["live"] and tile["state"] == "up" and tile["picture"]
    assert tile["level"]["variant"] and tile["budget_ms"] > 0 and tile["p99_ms"] is not None
    assert tile["guidance_state"] in ("out_of_scope", "absent", "unstable", "measured", "no_spacing", "waiting")

    # The newest picture, with its overlay: a head in view is drawn as an ellipse (green or amber).
    def head_picture():
        status, headers, body = client.request("/latest.jpg?source=probe")
        assert status == 200 and headers["Content-Type"] == "image/jpeg"
        return headers, cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)

    wait_until(lambda: any(r.detected for r in service.recent_frames("probe", 5)), 60, interval=0.1,
               what="a frame with a head")
    headers, img = head_picture()
    assert abs(float(headers["X-Capture-Time"]) - time.time()) < 30 and int(headers["X-Frame-Index"]) >= 0
    b, g, r = (img[..., i].astype(int) for i in range(3))
    drawn = ((g > 150) & (b < 90) & (g - r > 60)) | ((r > 200) & (g > 140) & (b < 80))  # green or amber ellipse
    assert drawn.sum() > 300, "no ellipse drawn on a frame with a head"
    assert client.request("/latest.jpg?source=nope")[0] == 404
    assert client.request("/latest.jpg")[0] == 400
    assert client.request("/live.mjpeg?source=nope")[0] == 404

    # Findings (per frame and exams: results = "both") with their delivery state.
    wait_until(lambda: client.json("/api/findings?limit=5")["findings"], 30, interval=0.2, what="findings")
    items = client.json("/api/findings?limit=5")["findings"]
    assert 1 <= len(items) <= 5 and all(i["state"] == "pending" for i in items)
    seqs = [i["finding"]["seq"] for i in items]
    assert seqs == sorted(seqs, reverse=True), "newest first"
    assert client.request("/api/findings?limit=0")[0] == 400 and client.request("/api/findings?limit=x")[0] == 400
    target = items[0]["finding"]

    # Feedback: refused ones change nothing, a good one is committed before the answer, a retry is idempotent.
    before = feedback_rows(tmp_path / "state")
    for body, code in ((b"not json", 400), ({"verdict": "maybe"}, 400), ({"verdict": "correct"}, 400),
                       ({"verdict": "correct", "value_mm": -3}, 400), ({"verdict": "correct", "value_mm": True}, 400),
                       ({"verdict": "confirm", "label": "normal"}, 400), ({"verdict": "confirm", "extra": 1}, 400),
                       ({"verdict": "correct", "label": "normal"}, 400),  # a head measurement has no label
                       ({"verdict": "confirm", "note": "x" * 501}, 400), ({"verdict": "confirm", "feedback_id": "7"}, 400),
                       (b'{"verdict": "confirm", "note": "\\ud800"}', 400),  # a lone surrogate: not UTF-8
                       ({"verdict": "confirm", "feedback_id": 7}, 400)):
        status, answer = client.feedback(target["finding_id"], body)
        assert status == code and len(answer["error"].splitlines()) == 1, (body, status, answer)
    assert client.feedback(str(uuid.uuid4()), {"verdict": "confirm"})[0] == 404
    status, _, text = client.request(f"/api/findings/{target['finding_id']}/feedback", b"verdict=confirm",
                                     content_type="application/x-www-form-urlencoded")
    assert status == 415
    status, _, _ = client.request(f"/api/findings/{target['finding_id']}/feedback", b"{" + b" " * 5000 + b"}")
    assert status == 413
    assert feedback_rows(tmp_path / "state") == before, "a refused request stored something"

    fid = str(uuid.uuid4())
    body = {"verdict": "correct", "value_mm": 181.5, "note": "re-measured on the frozen frame", "feedback_id": fid}
    status, answer = client.feedback(target["finding_id"], body)
    assert status == 201, answer
    rows = feedback_rows(tmp_path / "state")
    assert len(rows) == len(before) + 1 and rows[0][0] < 0 and rows[0][2] == 0  # committed, pending, own seq
    record = rows[0][1]
    assert record == answer["feedback"]
    assert record["feedback_id"] == fid and record["finding_id"] == target["finding_id"]
    assert record["verdict"] == "correct" and record["value_mm"] == 181.5
    assert record["finding"]["model"] == "fetal-head" and record["device_id"] == "view-scanner"
    again = client.feedback(target["finding_id"], body)  # the same retry: nothing new, its real state
    assert again[0] == 200 and again[1]["state"] == "pending" and again[1]["feedback"] == record
    assert client.feedback(target["finding_id"], {**body, "value_mm": 170.0})[0] == 409
    assert len(feedback_rows(tmp_path / "state")) == len(rows)
    listed = client.json("/api/feedback")["feedback"]
    assert listed[0]["feedback_id"] == fid and listed[0]["state"] == "pending"
    with_feedback = [i for i in client.json("/api/findings?limit=200")["findings"]
                     if i["finding"]["finding_id"] == target["finding_id"]]
    assert with_feedback and with_feedback[0]["feedback"][0]["feedback_id"] == fid
    # Feedback never takes a finding's seq: the findings keep theirs without a gap.
    finding_seqs = sorted(i["finding"]["seq"] for i in client.json("/api/findings?limit=200")["findings"])
    assert finding_seqs == list(range(finding_seqs[0], finding_seqs[0] + len(finding_seqs)))


def read_parts(sock: socket.socket, n: int, timeout: float = 20.0) -> list[tuple[float, float, bytes]]:
    """(capture time, receive time, jpeg) of the next n MJPEG parts read from a raw socket."""
    sock.settimeout(timeout)
    buf = b""
    parts = []
    while len(parts) < n:
        chunk = sock.recv(65536)
        assert chunk, "the stream ended"
        buf += chunk
        while True:
            start = buf.find(b"--frame\r\n")
            end_head = buf.find(b"\r\n\r\n", start)
            if start < 0 or end_head < 0:
                break
            head = dict(line.split(": ", 1) for line in buf[start + 9:end_head].decode().split("\r\n"))
            size = int(head["Content-Length"])
            if len(buf) < end_head + 4 + size:
                break
            parts.append((float(head["X-Capture-Time"]), time.time(), buf[end_head + 4:end_head + 4 + size]))
            buf = buf[end_head + 4 + size:]
    return parts


def open_stream(port: int, token: str, path: str, rcvbuf: int | None = None) -> socket.socket:
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect(("127.0.0.1", port))
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
    return s


def test_mjpeg_is_rate_capped_and_a_viewer_that_stops_reading_is_dropped_without_holding_up_others(
        daemon, monkeypatch):
    import edge_runtime.view.server as server

    monkeypatch.setattr(server, "WRITE_TIMEOUT_S", 1.0)
    service, client = daemon
    port, token = service.view.port, service.view.token
    stalled = open_stream(port, token, "/live.mjpeg?source=probe&fps=30", rcvbuf=4096)  # never read again
    good = open_stream(port, token, "/live.mjpeg?source=probe&fps=5")
    try:
        parts = read_parts(good, 12, timeout=30)
        assert all(p[2][:2] == b"\xff\xd8" for p in parts)  # JPEGs
        span = parts[-1][1] - parts[1][1]
        assert span >= 10 / 5 * 0.8, f"12 parts at 5 fps came in {span:.2f} s: the cap did not hold"
        wait_until(lambda: service.view.counters["viewers_dropped"] >= 1, 90, interval=0.2,
                   what="the stalled viewer dropped")
        dropped_at = time.time()
        frames_before = service.recent_frames("probe", 1)[-1].frame_index
        fresh = []
        while not fresh:  # the other viewer goes on with pictures captured after the drop (not a buffered backlog)
            fresh = [p for p in read_parts(good, 1, timeout=30) if p[0] > dropped_at]
        assert service.recent_frames("probe", 1)[-1].frame_index > frames_before  # and so does the pipeline
    finally:
        stalled.close()
        good.close()


def test_events_stream_results_status_and_new_findings(daemon):
    service, client = daemon
    s = open_stream(service.view.port, service.view.token, "/events")
    s.settimeout(20)
    seen: dict[str, dict] = {}
    buf = b""
    deadline = time.monotonic() + 60
    try:
        while not {"status", "result", "finding"} <= set(seen) and time.monotonic() < deadline:
            buf += s.recv(65536)
            while b"\n\n" in buf:
                block, buf = buf.split(b"\n\n", 1)
                lines = dict(line.split(": ", 1) for line in block.decode().splitlines() if ": " in line)
                if "event" in lines:
                    seen[lines["event"]] = json.loads(lines["data"])
    finally:
        s.close()
    assert {"status", "result", "finding"} <= set(seen), sorted(seen)
    assert seen["result"]["source"] == "probe" and "guidance" in seen["result"]
    assert seen["status"]["device"]["site"] == "view-clinic"
    assert seen["finding"]["finding_id"] and "seq" in seen["finding"]
    thumb = seen["finding"].get("exam", {}).get("key_frame", {})
    assert "thumbnail" not in thumb, "events carry no pictures"


def test_quarantined_files_are_listed_with_their_reason(tmp_path):
    from edge_runtime.service import Service

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "broken.dcm").write_bytes(b"this is not DICOM at all" * 10)
    sources = f'[[sources]]\nname = "xray"\nkind = "dicom-folder"\nmodel = "cxr-pneumonia"\ninbox = "{inbox}"\n'
    service = Service(load_config(write_config(tmp_path, sources=sources)))
    service.start()
    try:
        client = Client(service.view.url, service.view.token)
        wait_until(lambda: client.json("/api/status")["quarantine"], 60, interval=0.2, what="the quarantined file")
        q = client.json("/api/status")["quarantine"][0]
        assert q["source"] == "xray" and q["file"] == "broken.dcm" and q["reason"] and q["at"]
        tile = client.json("/api/status")["sources"][0]
        assert tile["live"] is False and tile["guidance_state"] == "study" and tile["guidance"] == "waiting for studies"
    finally:
        service.stop()


# ---------------------------------------------------------------- feedback to the hub
@needs_mosquitto
def test_feedback_reaches_a_collector_over_mosquitto_and_its_receipt_marks_it_stored(tmp_path):
    from edge_hub.collector import Collector
    from edge_runtime.service import Service

    broker = Broker(tmp_path / "broker").start()
    hub_db = tmp_path / "hub.sqlite"
    col = Collector(broker.url, hub_db, client_id="hub-view", reconnect_min_s=0.05).start()
    mqtt = (f'[mqtt]\nbroker = "{broker.url}"\ntelemetry_interval_s = 0\nreconnect_min_s = 0.2\n'
            "reconnect_max_s = 1\nreceipt_timeout_s = 5\n\n")
    service = Service(load_config(write_config(tmp_path, extra=mqtt)))
    try:
        wait_until(col.subscribed.is_set, 15, what="collector subscription")
        service.start()
        client = Client(service.view.url, service.view.token)
        wait_until(lambda: client.json("/api/findings?limit=1")["findings"], 60, interval=0.2, what="a finding")
        finding = client.json("/api/findings?limit=1")["findings"][0]["finding"]
        status, answer = client.feedback(finding["finding_id"], {"verdict": "confirm", "note": "agrees with me"})
        assert status == 201
        fid = answer["feedback"]["feedback_id"]

        def hub_feedback():
            if not hub_db.exists():
                return None
            conn = sqlite3.connect(hub_db)
            try:
                return conn.execute("SELECT finding_id, verdict, device_id, site, payload FROM feedback "
                                    "WHERE feedback_id = ?", (fid,)).fetchone()
            except sqlite3.OperationalError:
                return None
            finally:
                conn.close()

        row = wait_until(hub_feedback, 30, interval=0.2, what="the feedback in the collector's database")
        assert row[:4] == (finding["finding_id"], "confirm", "view-scanner", "view-clinic")
        assert json.loads(row[4])["note"] == "agrees with me"
        wait_until(lambda: client.json("/api/feedback")["feedback"][0]["state"] == "stored", 30, interval=0.2,
                   what="the collector's receipt for the feedback")
        assert service.uplink.counters["receipt_malformed"] == 0
    finally:
        service.stop()
        col.stop(2.0)
        broker.stop()


# ---------------------------------------------------------------- parts
def test_outbox_feedback_rows_are_durable_idempotent_never_evicted_and_stored_by_receipt(tmp_path):
    box = Outbox(tmp_path / "o.sqlite", max_rows=3, keep_until_stored=True)
    seqs = [box.commit({"task": "classification", "priority": "routine", "result": {"label": "normal"}})
            for _ in range(2)]
    rec = {"feedback_id": str(uuid.uuid4()), "finding_id": "f", "verdict": "confirm"}
    stored, created, state = box.commit_feedback(rec)
    assert created and stored == rec and state == "pending"
    assert box.commit_feedback(dict(rec)) == (rec, False, "pending")
    # Counted apart: not an urgent finding, but owed all the same.
    assert box.stats()["pending"] == {"urgent": 0, "routine": 2} and box.stats()["pending_feedback"] == 1
    assert box.depth() == 3 and box.feedback_pending() == 1
    for _ in range(4):  # over max_rows: routine findings give way, the feedback never
        box.commit({"task": "classification", "priority": "routine", "result": {"label": "normal"}})
    assert [r for r, _ in box.feedback()] == [rec]
    batch = box.next_batch(10)
    assert batch[0].kind == "feedback" and batch[0].seq == -1 and all(r.kind == "findings" for r in batch[1:])
    assert batch[0].priority == "feedback"
    assert box.stats()["next_seq"] == seqs[-1] + 5  # findings' seq has no gap for the feedback
    box.mark_delivered([batch[0].seq])
    assert box.mark_stored([rec["feedback_id"]]) == (1, 0)
    assert box.feedback()[0][1] == "stored" and box.feedback_pending() == 0
    assert box.commit_feedback(dict(rec))[1:] == (False, "stored")
    # Stored feedback stays through the caps too (only age takes done rows); newest listed first.
    newer = [{"feedback_id": str(uuid.uuid4()), "finding_id": "f", "verdict": "confirm"} for _ in range(3)]
    for r in newer:
        box.commit_feedback(r)
    box.mark_delivered([-2, -3, -4])
    box.mark_stored([r["feedback_id"] for r in newer])
    for _ in range(6):
        box.commit({"task": "classification", "priority": "routine", "result": {"label": "normal"}})
    assert [r["feedback_id"] for r, _ in box.feedback()] == [r["feedback_id"] for r in reversed(newer)] + \
        [rec["feedback_id"]]
    # A record that is not UTF-8 JSON is refused whole: an OutboxError, nothing stored.
    from edge_runtime.outbox import OutboxError

    with pytest.raises(OutboxError, match="UTF-8"):
        box.commit_feedback({"feedback_id": str(uuid.uuid4()), "finding_id": "f", "note": "\ud800"})
    assert len(box.feedback()) == 4
    box.close()
    with pytest.raises(OutboxError, match="cannot read the feedback"):  # closed: one line, not a raw sqlite error
        box.feedback()


def test_receipts_with_feedback_ids_only_are_understood(tmp_path):
    """The collector's receipt for a batch of feedback names `feedback_ids` (finding_ids may be empty or absent)."""
    from edge_runtime.config import MqttSection
    from edge_runtime.uplink import Uplink

    box = Outbox(tmp_path / "o.sqlite", keep_until_stored=True)
    rec = {"feedback_id": str(uuid.uuid4()), "finding_id": "f", "verdict": "confirm"}
    box.commit_feedback(rec)
    box.mark_delivered([-1])
    up = Uplink(box, MqttSection(broker="mqtt://127.0.0.1:1"), DeviceIdentity("d", "s"))

    class Msg:
        topic = up.topic_receipts
        payload = json.dumps({"device_id": "d", "site": "s", "feedback_ids": [rec["feedback_id"]]}).encode()

    up._on_message(None, None, Msg())
    up._flush_acks()
    assert up.counters["receipt_malformed"] == 0 and box.feedback()[0][1] == "stored"
    Msg.payload = json.dumps({"device_id": "d", "site": "s", "feedback_ids": "x"}).encode()
    up._on_message(None, None, Msg())
    assert up.counters["receipt_malformed"] == 1
    box.close()


def fr(i: int, t: float, detected=True, hc=180.0, assessed=True) -> FrameResult:
    return FrameResult(i, t, "fp32", 10.0, True, assessed, detected, hc if detected else None, None, None)


def test_guidance_follows_the_exam_gate():
    now = 1000.0
    assert guidance([], now=now) == ("waiting", "waiting for frames")
    assert guidance([fr(0, now - 5)], now=now)[0] == "waiting"
    assert guidance([fr(0, now, assessed=False, detected=False)], now=now)[0] == "out_of_scope"
    assert guidance([fr(0, now, detected=False)], now=now) == ("absent", "no head in view")
    assert guidance([fr(0, now - 0.1), fr(1, now)], now=now) == ("unstable", "hold still")  # too few yet
    steady = [fr(i, now - 0.4 + 0.1 * i, hc=180.0 + 0.2 * i) for i in range(5)]
    state, line = guidance(steady, now=now)
    assert state == "measured" and "HC 180.4 mm" in line
    shaky = steady[:-1] + [fr(9, now, hc=195.0)]
    assert guidance(shaky, now=now) == ("unstable", "hold still")
    assert guidance([fr(0, now, hc=None)], now=now)[0] == "no_spacing"


def test_feedback_records_are_checked_against_the_finding():
    ident = DeviceIdentity("d", "s")
    cls = {"finding_id": "a", "task": "classification", "model": {"name": "cxr-pneumonia", "version": "1"},
           "result": {"label": "pneumonia", "probabilities": {"normal": 0.1, "pneumonia": 0.9}}}
    rec = build_record({"verdict": "correct", "label": "normal"}, cls, ident, lambda m: [])
    assert rec["label"] == "normal" and rec["finding"]["label"] == "pneumonia" and uuid.UUID(rec["feedback_id"])
    with pytest.raises(FeedbackError, match="one of normal, pneumonia"):
        build_record({"verdict": "correct", "label": "tb"}, cls, ident, lambda m: [])
    with pytest.raises(FeedbackError, match="measurement findings"):
        build_record({"verdict": "correct", "value_mm": 100}, cls, ident, lambda m: [])
    refused = {**cls, "result": {"assessed": False, "reason": "not a chest"}}  # no probabilities: the manifest's
    assert build_record({"verdict": "correct", "label": "normal"}, refused, ident,
                        lambda m: ["normal", "pneumonia"])["label"] == "normal"
    with pytest.raises(FeedbackError, match="JSON object"):
        build_record(["confirm"], cls, ident, lambda m: [])


def test_view_config_is_checked(tmp_path):
    def check(view: str):
        return load_config(write_config(tmp_path, view=view, sources=""))

    assert check('host = "127.0.0.1"\n').view.host == "127.0.0.1"
    with pytest.raises(ConfigError, match="view.host.*TLS"):
        check('host = "0.0.0.0"\n')
    assert check('host = "0.0.0.0"\nallow_plain_http = true\n').view.allow_plain_http
    with pytest.raises(ConfigError, match="go together"):
        check('host = "0.0.0.0"\ncert_file = "/x.pem"\n')
    with pytest.raises(ConfigError, match="mjpeg_max_fps"):
        check("mjpeg_max_fps = 0\n")
    with pytest.raises(ConfigError, match="view.port"):
        check("port = 70000\n")
    with pytest.raises(ConfigError, match="unknown key 'view.tokn'"):
        check('tokn = "x"\n')


def test_the_token_file_is_made_0600_and_a_readable_one_is_refused(tmp_path):
    path = tmp_path / "t" / "view.token"
    token = load_or_create_token(path)
    assert len(token) >= 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_token(path) == token
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_or_create_token(path)


def assert_view_alarm_and_reading_on(tmp_path, view: str, *words: str) -> None:
    """The view could not start: one alarm naming why, no view, and the daemon reads frames all the same."""
    from edge_runtime.service import Service

    service = Service(load_config(write_config(tmp_path, view=view)))
    try:
        service.start()
        assert service.view is None
        assert any(all(w in a for w in words) for a in service.alarms), service.alarms
        wait_until(lambda: service.recent_frames("probe", 1), 30, interval=0.1, what="frames read without the view")
    finally:
        service.stop()


def test_a_view_port_in_use_is_an_alarm_and_the_daemon_reads_on(tmp_path):
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    try:
        assert_view_alarm_and_reading_on(tmp_path, f"port = {blocker.getsockname()[1]}\n", "view.port", "already in use")
    finally:
        blocker.close()


def test_a_token_file_that_cannot_be_written_is_an_alarm_and_the_daemon_reads_on(tmp_path):
    assert_view_alarm_and_reading_on(tmp_path, 'port = 0\ntoken_file = "/proc/edge-view.token"\n', "view.token_file",
                                     "cannot write")


def test_check_names_a_view_port_in_use_and_a_token_file_others_can_read(tmp_path):
    from edge_runtime.check import view_problems

    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    try:
        config = load_config(write_config(tmp_path, view=f"port = {blocker.getsockname()[1]}\n", sources=""))
        token = tmp_path / "state" / "view.token"
        token.parent.mkdir(parents=True)
        token.write_text("secret\n")
        token.chmod(0o644)
        problems, _ = view_problems(config, None)
        keys = {p.key: p for p in problems}
        assert "already in use" in keys["view.port"].problem and "chmod 600" in keys["view.token_file"].fix
    finally:
        blocker.close()
    token.chmod(0o600)
    assert view_problems(load_config(write_config(tmp_path, sources="")), None) == ([], [])


def test_a_study_finding_is_put_on_its_configured_source_and_its_tile_line_says_the_answer():
    from edge_runtime.view.pictures import Picture, Pictures
    from edge_runtime.view.snapshot import study_line

    pictures = Pictures()
    study = {"finding_id": "f-1", "source": {"kind": "dicom-folder", "name": "c.dcm"}, "priority": "urgent",
             "result": {"label": "pneumonia", "probabilities": {"normal": 0.07, "pneumonia": 0.93},
                        "needs_review": True}}
    pictures.offer("xray", Picture(np.zeros((4, 4), np.uint8), 0.0, 0, finding=study))
    assert pictures.source_of(study) == "xray" and pictures.latest("xray")[0] == 1
    assert pictures.source_of({"finding_id": "other", "source": {"kind": "dicom-folder", "name": "c.dcm"}}) is None
    assert pictures.source_of({"source": {"kind": "phantom", "name": "probe"}}) == "probe"
    assert study_line(study) == "pneumonia 0.93, urgent, needs review"
    assert study_line({"result": {"assessed": False, "reason": "not a chest"}}) == "out of scope: not a chest"


def test_a_feedback_body_that_arrives_in_pieces_is_read_whole_and_a_cross_origin_write_is_refused(daemon, tmp_path):
    service, client = daemon
    wait_until(lambda: client.json("/api/findings?limit=1")["findings"], 60, interval=0.2, what="a finding")
    fid = client.json("/api/findings?limit=1")["findings"][0]["finding"]["finding_id"]
    body = json.dumps({"verdict": "confirm", "note": "sent over a slow link"}).encode()
    s = socket.create_connection(("127.0.0.1", service.view.port), timeout=10)
    try:
        s.sendall(f"POST /api/findings/{fid}/feedback HTTP/1.1\r\nHost: x\r\nAuthorization: bearer {service.view.token}"
                  f"\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                  .encode())
        for i in range(0, len(body), 7):  # seven bytes at a time, as a weak radio link delivers them
            s.sendall(body[i:i + 7])
            time.sleep(0.02)
        answer = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
    finally:
        s.close()
    assert answer.startswith(b"HTTP/1.1 201"), answer[:200]  # (and the Bearer scheme is case-insensitive)
    status, headers, _ = client.request("/api/status")
    assert headers.get("Cache-Control") == "no-store"
    # A browser page of another origin (another port of this host is "same site") cannot write with the cookie.
    req = urllib.request.Request(client.url + f"/api/findings/{fid}/feedback", data=b'{"verdict": "confirm"}',
                                 headers={"Authorization": f"Bearer {client.token}", "Content-Type": "application/json",
                                          "Origin": "http://127.0.0.1:1", "Sec-Fetch-Site": "same-site"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=10)
    assert refused.value.code == 403
    assert len(feedback_rows(tmp_path / "state")) == 1


def test_viewers_that_leave_while_a_source_sends_nothing_give_their_slots_back(tmp_path):
    """A probe unplugged (no new picture): viewers reloading the page must not use up view.max_viewers."""
    from edge_runtime.service import Service

    service = Service(load_config(write_config(tmp_path, view="port = 0\nmax_viewers = 2\n")))
    service.start()
    try:
        wait_until(lambda: service.pictures.latest("probe")[0] > 0, 30, interval=0.1, what="a picture")
        service.live_sources[0].stop(timeout=5)  # the feed goes silent
        port, token = service.view.port, service.view.token
        for _ in range(3):
            streams = [open_stream(port, token, "/live.mjpeg?source=probe") for _ in range(2)]
            read_parts(streams[0], 1)
            for st in streams:
                st.close()
            wait_until(lambda: service.view._streams == 0, 10, interval=0.1, what="the slots given back")
        s = open_stream(port, token, "/events")
        s.settimeout(10)
        assert s.recv(64).startswith(b"HTTP/1.1 200")
        s.close()
    finally:
        service.stop()


def test_status_on_a_closed_outbox_is_a_one_line_503_not_a_traceback(daemon):
    service, client = daemon
    service.outbox.close()
    status, _, body = client.request("/api/findings")
    assert status == 503 and len(json.loads(body)["error"].splitlines()) == 1
    assert client.request("/api/feedback")[0] == 503
    status, _, body = client.request("/api/status")
    assert status == 200 and "error" in json.loads(body)["outbox"]
