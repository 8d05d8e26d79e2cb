"""Uplink fault tests against a real Mosquitto (a private broker per test).

Each test compares what was produced (finding_ids committed to the outbox) with what the collector stored:
zero lost, every arrival (duplicates included) carries a known finding_id, urgent before routine where the
design promises it (a backlog drained after the link comes up).
"""
from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import DICOM_DIR, needs_shared
from mqtt_helpers import (Broker, Capture, Producer, TcpProxy, assert_delivered, collected, fake_finding, make_pki,
                          mqtt_section, needs_mosquitto, priority_of, wait_until)
from edge_runtime.collector import Collector
from edge_runtime.errors import ConfigError
from edge_runtime.findings import DeviceIdentity
from edge_runtime.outbox import Outbox, OutboxFull
from edge_runtime.uplink import Uplink, backoff_delay

IDENTITY = DeviceIdentity("dev-1", "site-a")


class Rig:
    """Everything a test starts, stopped in reverse order whatever happens."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self._things: list = []

    def broker(self, persistence: bool = True, extra: str = "", name: str = "broker", **kw) -> Broker:
        b = Broker(self.tmp / name, persistence=persistence, extra=extra, **kw)
        self._things.append(("broker", b))
        return b.start()

    def proxy(self, port: int) -> TcpProxy:
        p = TcpProxy(port)
        self._things.append(("proxy", p))
        return p

    def outbox(self, name: str = "outbox.sqlite", **kw) -> Outbox:
        kw.setdefault("keep_until_stored", True)  # as the daemon runs it (mqtt.require_receipts = true)
        box = Outbox(self.tmp / name, **kw)
        self._things.append(("outbox", box))
        return box

    def uplink(self, box: Outbox, url: str, identity: DeviceIdentity = IDENTITY, **overrides) -> Uplink:
        up = Uplink(box, mqtt_section(url, **overrides), identity)
        self._things.append(("uplink", up))
        return up.start()

    def collector(self, url: str, db: Path, client_id: str = "hub-1", wait: bool = True, **kw) -> Collector:
        col = Collector(url, db, client_id=client_id, reconnect_min_s=0.05, reconnect_max_s=0.5, **kw)
        self._things.append(("collector", col))
        col.start()
        if wait:
            wait_until(col.subscribed.is_set, 15, what="collector subscription")
        return col

    def producer(self, *args, **kw) -> Producer:
        p = Producer(*args, **kw)
        self._things.append(("producer", p))
        return p

    def release(self, thing) -> None:
        self._things = [(k, t) for k, t in self._things if t is not thing]

    def close(self) -> None:
        order = {"producer": 0, "uplink": 1, "collector": 2, "proxy": 3, "outbox": 4, "broker": 5}
        for kind, thing in sorted(reversed(self._things), key=lambda kt: order[kt[0]]):
            try:
                if kind == "uplink":
                    thing.stop(timeout=2.0)
                elif kind == "collector":
                    thing.stop(timeout=2.0)
                elif kind in ("proxy", "outbox"):
                    thing.close()
                else:
                    thing.stop()
            except Exception:  # noqa: BLE001 - cleanup must reach everything
                pass


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    yield r
    r.close()


def produce(box: Outbox, n: int, urgent_every: int = 5, pace_s: float = 0.0, start: int = 0) -> dict[str, str]:
    """Commit n findings; returns {finding_id: priority} of what was accepted."""
    out = {}
    for i in range(start, start + n):
        f = fake_finding(i, priority_of(i, urgent_every), IDENTITY.device_id, IDENTITY.site)
        box.commit(f)
        out[f["finding_id"]] = f["priority"]
        if pace_s:
            time.sleep(pace_s)
    return out


def produce_batch(box: Outbox, n: int, urgent_every: int = 5, priority: str | None = None) -> dict[str, str]:
    fs = [fake_finding(i, priority or priority_of(i, urgent_every), IDENTITY.device_id, IDENTITY.site) for i in range(n)]
    box.commit_many([(f, None) for f in fs])
    return {f["finding_id"]: f["priority"] for f in fs}


class Feeder(threading.Thread):
    """Commits findings at a steady pace in the background: a live stream while faults happen."""

    def __init__(self, box: Outbox, n: int, pace_s: float, urgent_every: int = 5) -> None:
        super().__init__(daemon=True)
        self.box, self.n, self.pace_s, self.urgent_every = box, n, pace_s, urgent_every
        self.produced: dict[str, str] = {}

    def run(self) -> None:
        self.produced = produce(self.box, self.n, self.urgent_every, self.pace_s)


# ---------------------------------------------------------------- fault tests
@needs_mosquitto
def test_broker_down_at_start_backlog_arrives_urgent_first(rig):
    broker = rig.broker(persistence=True)
    db = rig.tmp / "collector.sqlite"
    col = rig.collector(broker.url, db)  # the hub's persistent session and subscription exist before devices publish
    col.stop()
    rig.release(col)
    broker.stop()

    box = rig.outbox()
    t0 = time.monotonic()
    up = rig.uplink(box, broker.url)
    assert time.monotonic() - t0 < 0.5, "start-up must not wait for the broker"
    produced = {}
    for k in range(6):  # 300 findings: routine and urgent interleaved, urgent committed after older routine
        produced.update(produce_batch(box, 50, urgent_every=5))
    wait_until(lambda: up.counters["connect_failures"] >= 2, 15, what="failed connection attempts")
    assert box.depth() == 300 and not up.connected

    broker.start()
    wait_until(lambda: box.depth() == 0, 30, what="outbox drained")
    col = rig.collector(broker.url, db)  # comes back and gets what the broker queued for it
    wait_until(lambda: len(collected(db)) >= 300, 30, what="all findings collected")
    rows = collected(db)
    assert_delivered(produced, rows)
    n_urgent = sum(1 for p in produced.values() if p == "urgent")
    assert n_urgent == 60
    assert [p for _, p, _ in rows[:n_urgent]] == ["urgent"] * n_urgent, "urgent findings must arrive before routine"
    assert box.stats()["delivered"] == 300


@needs_mosquitto
def test_link_cut_mid_stream_several_times(rig):
    broker = rig.broker()
    db = rig.tmp / "collector.sqlite"
    col = rig.collector(broker.url, db)
    proxy = rig.proxy(broker.port)
    box = rig.outbox()
    up = rig.uplink(box, proxy.url, rate_limit=300.0)
    feeder = Feeder(box, 400, pace_s=0.002)
    feeder.start()
    for k in range(4):
        wait_until(lambda: col.counters["stored"] >= 70 * (k + 1), 30, what=f"progress before cut {k + 1}")
        # The link fades first (what is sent is lost, no PUBACK comes back), then drops.
        proxy.blackhole()
        published = up.counters["published"]
        wait_until(lambda: up.counters["published"] >= published + 3, 10, what="publishes into the fading link")
        proxy.refuse()
        assert proxy.cut() >= 1
        wait_until(lambda: not up.connected, 10, what="uplink noticing the cut")
        failures = up.counters["connect_failures"]
        wait_until(lambda: up.counters["connect_failures"] > failures, 10, what="a refused reconnect")
        proxy.allow()
        wait_until(lambda: up.connected, 10, what="reconnect")
    feeder.join(30)
    wait_until(lambda: box.depth() == 0 and col.counters["stored"] >= 400, 30, what="everything delivered")
    assert_delivered(feeder.produced, collected(db))
    assert len(feeder.produced) == 400
    s = up.stats()
    assert s["reconnects"] >= 4 and proxy.cuts >= 4
    assert s["resent"] >= 4 * 3, s  # every publish lost in a fading link was sent again after the reconnect


@needs_mosquitto
def test_daemon_sigkilled_mid_stream_and_restarted(rig):
    broker = rig.broker()
    db = rig.tmp / "collector.sqlite"
    col = rig.collector(broker.url, db)
    proxy = rig.proxy(broker.port)
    outbox_path = rig.tmp / "producer-outbox.sqlite"
    n = 400
    producer = rig.producer(outbox_path, proxy.url, n=n, urgent_every=5, pace_s=0.002, rate_limit=300.0)
    producer.start()
    wait_until(lambda: col.counters["stored"] >= 100, 60, what="the producer streaming")
    # Kill it while some of its publishes are lost in a fading link: those must not count as delivered.
    proxy.blackhole()
    wait_until(lambda: proxy.dropped_bytes > 3 * 700, 10, what="publishes lost in the link")
    producer.kill()
    proxy.cut()
    proxy.allow()
    reported = producer.committed()
    assert 0 < reported < n, "the kill must land mid-stream"
    with Outbox(outbox_path) as box:  # every commit the child reported done survived SIGKILL
        assert all(box.has_source_item(f"item-{i}") for i in range(reported))
        assert box.depth() > 0 or reported < n

    again = rig.producer(outbox_path, proxy.url, n=n, urgent_every=5, rate_limit=300.0)
    again.start(exit_when_drained=True)
    assert again.wait(60) == 0, again.output()
    with Outbox(outbox_path) as box:
        produced = box.finding_ids()
        assert len(produced) == n, "each item is committed exactly once across the crash (source_item)"
        assert set(produced.values()) == {"stored"}, "every finding confirmed by a hub receipt"
        priorities = {fid: box.payload(seq)["priority"] for fid, seq in _seqs(box).items()}
    wait_until(lambda: len(collected(db)) >= n, 30, what="all findings collected")
    assert_delivered(priorities, collected(db))


def _seqs(box: Outbox) -> dict[str, int]:
    with box._read_lock:
        return dict(box._r.execute("SELECT finding_id, seq FROM findings"))


@needs_mosquitto
@pytest.mark.parametrize("persistence, receipts", [(True, True), (False, False), (False, True)],
                         ids=["persistent-broker", "volatile-broker-no-receipts", "volatile-broker-receipts"])
def test_broker_restarted_mid_stream(rig, persistence, receipts, monkeypatch):
    """The hub is slower than the stream, so at the restart the broker holds findings it has acknowledged (PUBACK)
    but not yet handed to the collector. A persistent broker keeps them; a volatile one loses them. Without receipts
    the device, told by CONNACK that its session is gone, sends the recent ones again; with receipts it re-sends
    every finding the hub has not confirmed, at the new connection. Either way nothing is lost."""
    from edge_hub.collector import CollectorStore

    write = CollectorStore.write  # what the collector calls for each batch
    hold = threading.Event()
    hold.set()

    def slow_write(self, rows):
        hold.wait(60)  # cleared around the restart: the hub stores (and confirms) nothing more until it is back
        time.sleep(0.2)  # a hub on a slow SD card: about 100 findings/s against a stream of 300/s
        return write(self, rows)

    monkeypatch.setattr(CollectorStore, "write", slow_write)
    broker = rig.broker(persistence=persistence)
    db = rig.tmp / "collector.sqlite"
    col = rig.collector(broker.url, db)
    box = rig.outbox(keep_until_stored=receipts)
    up = rig.uplink(box, broker.url, rate_limit=300.0, require_receipts=receipts)
    feeder = Feeder(box, 300, pace_s=0.002)
    feeder.start()
    wait_until(lambda: col.counters["stored"] >= 20, 30, what="the collector storing")
    hold.clear()  # from here the collector's count is frozen (a batch already being written may still land)
    time.sleep(0.5)
    wait_until(lambda: up.counters["acked"] - col.counters["stored"] >= 60, 30,
               what="findings acknowledged by the broker and queued for the collector")
    broker.restart()
    hold.set()
    feeder.join(30)
    wait_until(lambda: box.depth() == 0 and len(collected(db)) >= 300, 45, what="everything delivered after the restart")
    assert_delivered(feeder.produced, collected(db))
    assert up.stats()["reconnects"] >= 1 and col.counters["connects"] >= 2
    if persistence:
        assert up.counters["new_sessions"] == 1 and up.counters["requeued"] == 0, up.stats()
    elif not receipts:
        assert up.counters["new_sessions"] >= 2 and up.counters["requeued"] >= 60, up.stats()
        assert box.stats()["requeued"] == up.counters["requeued"]
    else:
        assert up.counters["new_sessions"] >= 2 and up.counters["requeued"] == 0, up.stats()
        assert up.counters["receipt_resent"] >= 60 and box.stats()["receipt_requeued"] == up.counters["receipt_resent"]
        wait_until(lambda: box.stats()["sent_unstored"] == 0, 30, what="every finding confirmed by a receipt")


@needs_mosquitto
def test_no_re_send_when_no_session_is_kept(rig, caplog):
    """With session expiry 0 every connect starts without a session, so a missing session says nothing about the
    broker: the re-send of recent findings would only flood a flapping link. It stays off, and says so once."""
    broker = rig.broker(persistence=False)
    db = rig.tmp / "collector.sqlite"
    col = rig.collector(broker.url, db)
    box = rig.outbox(keep_until_stored=False)  # the re-send on a lost session is the path without receipts
    up = rig.uplink(box, broker.url, session_expiry_s=0, require_receipts=False)
    produced = produce(box, 20)
    wait_until(lambda: box.depth() == 0, 20, what="first findings delivered")
    broker.restart()
    wait_until(lambda: up.counters["connects"] >= 2 and col.counters["connects"] >= 2, 20, what="both reconnected")
    produced.update(produce(box, 5, start=20))
    wait_until(lambda: box.depth() == 0 and len(collected(db)) >= 25, 20, what="later findings delivered")
    assert_delivered(produced, collected(db))
    assert up.counters["new_sessions"] == 2 and up.counters["requeued"] == 0 and box.stats()["requeued"] == 0
    assert sum("no session is kept" in r.getMessage() for r in caplog.records) == 1


@needs_mosquitto
@pytest.mark.parametrize("policy", ["row-cap", "urgent-only-over-cap", "disk-full"])
def test_store_full_while_offline(rig, policy):
    broker = rig.broker()
    db = rig.tmp / "collector.sqlite"
    rig.collector(broker.url, db)
    proxy = rig.proxy(broker.port)

    if policy == "row-cap":
        box = rig.outbox(max_rows=100)
        up = rig.uplink(box, proxy.url)
        produced = produce_batch(box, 60, priority="routine")
        wait_until(lambda: box.depth() == 0 and box.stats()["stored"] == 60, 20, what="first findings stored")
        proxy.refuse()
        proxy.cut()
        wait_until(lambda: not up.connected, 10, what="link down")
        offline = produce_batch(box, 40, priority="routine")
        assert box.stats()["pruned"] == 0 and box.stats()["evicted"] == 0
        burst = produce_batch(box, 100, urgent_every=5)  # 20 urgent, 80 routine
        produced.update(offline)
        produced.update(burst)
        s = box.stats()
        assert s["pruned"] == 60, "delivered rows go first"
        assert s["evicted"] == 40 and s["rows"] == 100
        evicted = box.evicted_ids()
        assert evicted == list(offline), "then routine findings, oldest first"
        proxy.allow()
        wait_until(lambda: box.depth() == 0 and len(collected(db)) >= 160, 30, what="delivery after the link returns")
        rows = collected(db)
        assert_delivered(produced, rows, evicted=set(evicted))
        assert [p for _, p, _ in rows[60:80]] == ["urgent"] * 20

    elif policy == "urgent-only-over-cap":
        proxy.refuse()
        box = rig.outbox(max_rows=50)
        rig.uplink(box, proxy.url)
        produced = produce_batch(box, 80, priority="urgent")
        s = box.stats()
        assert s["evicted"] == 0 and s["pending"]["urgent"] == 80 and s["over_cap_alarms"] >= 1
        proxy.allow()
        wait_until(lambda: box.depth() == 0 and len(collected(db)) >= 80, 30, what="every urgent finding delivered")
        assert_delivered(produced, collected(db))

    else:  # disk-full: an alarm, the study files stay in the inbox and are retried
        proxy.refuse()
        box = rig.outbox(max_page_count=48)
        rig.uplink(box, proxy.url)
        inbox = [(fake_finding(i, priority_of(i, 5), IDENTITY.device_id, IDENTITY.site), f"study-{i}") for i in range(300)]
        produced = {f["finding_id"]: f["priority"] for f, _ in inbox}
        while inbox:
            try:
                box.commit(*inbox[0])
            except OutboxFull:
                break
            inbox.pop(0)
        assert inbox, "the tiny database should have filled up"
        assert box.stats()["full_alarms"] >= 1
        stored_before = box.stats()["rows"]
        proxy.allow()
        deadline = time.monotonic() + 60
        while inbox:
            assert time.monotonic() < deadline, f"{len(inbox)} study items never committed"
            try:
                box.commit(*inbox[0])
                inbox.pop(0)
            except OutboxFull:
                wait_until(lambda: box.depth() == 0, 30, what="the uplink making room")
        wait_until(lambda: box.depth() == 0 and len(collected(db)) >= 300, 30, what="everything delivered")
        assert stored_before < 300
        assert_delivered(produced, collected(db))


@needs_mosquitto
def test_no_subscriber_keeps_findings_pending_until_a_collector_subscribes(rig):
    broker = rig.broker(persistence=False)
    box = rig.outbox()
    up = rig.uplink(box, broker.url)
    produced = produce_batch(box, 40)
    wait_until(lambda: up.counters["unrouted"] >= 1, 15, what="a PUBACK 'no matching subscribers'")
    assert box.depth() == 40, "a finding nobody subscribed to is not delivered"
    db = rig.tmp / "collector.sqlite"
    rig.collector(broker.url, db)
    wait_until(lambda: box.depth() == 0 and len(collected(db)) >= 40, 30, what="delivery once subscribed")
    assert_delivered(produced, collected(db))


@needs_mosquitto
def test_mqtt_311_option_end_to_end(rig):
    broker = rig.broker()
    db = rig.tmp / "collector.sqlite"
    rig.collector(broker.url, db, protocol="3.1.1")
    box = rig.outbox()
    produced = produce_batch(box, 60, urgent_every=4)
    up = rig.uplink(box, broker.url, protocol="3.1.1")
    wait_until(lambda: box.depth() == 0 and len(collected(db)) >= 60, 30, what="delivery over MQTT 3.1.1")
    rows = collected(db)
    assert_delivered(produced, rows)
    assert [p for _, p, _ in rows[:15]] == ["urgent"] * 15
    assert up.stats()["connects"] == 1


@needs_mosquitto
def test_status_online_retained_and_last_will_offline(rig):
    broker = rig.broker()
    proxy = rig.proxy(broker.port)
    cap = Capture(broker.port, "edge/v1/site-a/dev-1/status")
    try:
        box = rig.outbox()
        up = rig.uplink(box, proxy.url)
        wait_until(lambda: cap.payloads()[-1:] == [b"online"], 10, what="online")
        proxy.cut()  # an unclean drop: the broker publishes the will
        wait_until(lambda: cap.payloads()[-1:] == [b"offline"], 10, what="last will")
        wait_until(lambda: cap.payloads()[-1:] == [b"online"], 10, what="online again after reconnect")
        assert up.stop(timeout=3.0)
        wait_until(lambda: cap.payloads()[-1:] == [b"offline"], 10, what="offline on a clean stop")
    finally:
        cap.close()
    late = Capture(broker.port, "edge/v1/site-a/dev-1/status")  # subscribes afterwards: gets the retained state
    try:
        wait_until(lambda: late.messages, 10, what="retained status")
        assert late.messages[-1][1:] == (b"offline", True)
    finally:
        late.close()


@needs_mosquitto
def test_mutual_tls_and_password(rig):
    pki = make_pki(rig.tmp / "pki")
    from mqtt_helpers import free_port

    tls_port = free_port()
    passwords = rig.tmp / "passwords"
    subprocess.run([shutil.which("mosquitto_passwd") or "mosquitto_passwd", "-b", "-c", str(passwords), "dev-1", "s3cret"],
                   check=True, capture_output=True)
    (rig.tmp / "password.txt").write_text("s3cret\n")
    (rig.tmp / "wrong.txt").write_text("guess\n")
    # Anonymous clients stay allowed (the collector on the plain listener); a client that names a user must match.
    broker = rig.broker(extra=(f"password_file {passwords}\n"
                               f"listener {tls_port} 127.0.0.1\ncafile {pki['ca']}\ncertfile {pki['server_cert']}\n"
                               f"keyfile {pki['server_key']}\nrequire_certificate true\n"))
    from mqtt_helpers import port_open

    wait_until(lambda: port_open(tls_port), 10, what="TLS listener")
    db = rig.tmp / "collector.sqlite"
    rig.collector(broker.url, db)
    url = f"mqtts://localhost:{tls_port}"

    client_tls = dict(ca_file=str(pki["ca"]), cert_file=str(pki["client_cert"]), key_file=str(pki["client_key"]))
    refused = []
    for name, overrides in (("no-cert", dict(ca_file=str(pki["ca"]))),
                            ("wrong-password", dict(client_tls, username="dev-1", password_file=str(rig.tmp / "wrong.txt")))):
        other = rig.outbox(f"{name}.sqlite")
        produce_batch(other, 5)
        refused.append((other, rig.uplink(other, url, DeviceIdentity(f"dev-{name}", "site-a"), **overrides)))
    box = rig.outbox()
    produced = produce_batch(box, 30)
    rig.uplink(box, url, username="dev-1", password_file=str(rig.tmp / "password.txt"), **client_tls)
    wait_until(lambda: box.depth() == 0 and len(collected(db)) >= 30, 30, what="delivery over mutual TLS")
    assert_delivered(produced, collected(db))
    for other, up in refused:
        wait_until(lambda: up.counters["connect_failures"] >= 1, 15, what="a client without the right credentials refused")
        assert other.depth() == 5 and up.counters["connects"] == 0, up.last_error
    assert "refused the connection: not authorized" in refused[1][1].last_error.lower(), refused[1][1].last_error


# ---------------------------------------------------------------- end to end: receipts, link windows, clean stop
@needs_mosquitto
@pytest.mark.parametrize("receipts", [True, False], ids=["receipts", "puback-only-control"])
def test_persistent_broker_killed_while_the_collector_is_away(rig, receipts):
    """docs/mqtt.md's broker (persistence, autosave_interval 60) killed -9 three times while the collector is away:
    what it acknowledged since its last snapshot is gone, yet the snapshot holds the device's session, so the
    CONNACK says session_present = 1. With receipts the device re-sends what the hub never confirmed and nothing is
    lost; the control (PUBACK is the end) shows that the scenario really loses findings without them."""
    broker = rig.broker(persistence=True, autosave_interval=60)
    db = rig.tmp / "collector.sqlite"
    col = rig.collector(broker.url, db)
    box = rig.outbox(keep_until_stored=receipts)
    up = rig.uplink(box, broker.url, require_receipts=receipts)
    wait_until(lambda: up.connected, 15, what="device connected")
    broker.stop()  # a clean stop writes the snapshot: both sessions (and the collector's subscription) are in it
    broker.start()
    wait_until(lambda: up.counters["connects"] >= 2 and col.subscribed.is_set(), 20, what="both back")
    col.stop()  # the hub goes away; the broker queues for it
    rig.release(col)
    produced: dict[str, str] = {}
    for k in range(3):
        produced.update(produce(box, 40, start=40 * k))
        wait_until(lambda: box.depth() == 0, 20, what=f"batch {k + 1} acknowledged by the broker")
        connects = up.counters["connects"]
        broker.kill()
        broker.start()
        wait_until(lambda: up.counters["connects"] > connects, 20, what=f"reconnect after kill {k + 1}")
    assert up.counters["new_sessions"] == 1, "the snapshot kept the device's session: CONNACK session_present = 1"
    col = rig.collector(broker.url, db)  # the hub comes back
    if receipts:
        wait_until(lambda: box.depth() == 0 and box.sent_unstored() == 0, 60, what="every finding confirmed stored")
        assert_delivered(produced, collected(db))
        assert up.counters["receipt_resent"] >= 40 and box.stats()["stored"] == len(produced) == 120
        assert set(box.finding_ids().values()) == {"stored"}
    else:
        time.sleep(3.0)  # the collector gets what the broker still holds (nothing more comes): then count
        assert up.counters["receipt_resent"] == 0
        lost = set(produced) - {fid for fid, _, _ in collected(db)}
        assert lost, "the control should lose findings (else this test proves nothing)"
        assert box.depth() == 0, "without receipts the device believes everything was delivered"


@needs_mosquitto
def test_short_link_windows_between_outages_are_used(rig):
    """A rural link: outages of a few seconds, then windows of 1-6 s. With the shipped backoff (1 s doubling to 60 s,
    but capped at reconnect_pending_max_s = 3 s while findings are owed) every window of a few seconds gets a
    connection; with the plain doubling the device would sleep through them after a few failures."""
    broker = rig.broker()
    db = rig.tmp / "collector.sqlite"
    col = rig.collector(broker.url, db)
    proxy = rig.proxy(broker.port)
    proxy.refuse()
    box = rig.outbox()
    produced = produce_batch(box, 300)
    # 25 findings/s: the 300 need about 12 s of link, more than any one window gives
    up = rig.uplink(box, proxy.url, reconnect_min_s=1.0, reconnect_max_s=60.0, rate_limit=25.0)
    assert up.cfg.reconnect_pending_max_s == 3.0
    # six failures: plain doubling would now wait 32-64 s, longer than the whole run of windows below
    wait_until(lambda: up.counters["connect_failures"] >= 6, 60, what="a long run of failed attempts")
    used = 0
    rng = random.Random(21)
    for window_s in (5.0, 1.5, 4.0, 6.0, 2.0, 5.0):
        connects = up.counters["connects"]
        proxy.allow()
        opened = time.monotonic()
        while time.monotonic() - opened < window_s and up.counters["connects"] == connects:
            time.sleep(0.02)
        if up.counters["connects"] > connects:
            used += 1
        time.sleep(max(0.0, window_s - (time.monotonic() - opened)))
        proxy.refuse()
        proxy.cut()
        time.sleep(rng.uniform(2.0, 5.0))  # the outage
        if box.depth() == 0 and box.sent_unstored() == 0:
            break
    assert used >= 3, f"only {used} link windows were used"
    proxy.allow()
    wait_until(lambda: box.depth() == 0 and box.sent_unstored() == 0, 60, what="everything confirmed stored")
    assert_delivered(produced, collected(db))
    assert col.counters["stored"] == 300


@needs_mosquitto
def test_a_half_open_link_is_noticed_from_unanswered_publishes(rig):
    """The link stalls (nothing comes back, the TCP connection stays up: a NAT dropped its state, a radio faded).
    With keepalive 60 s paho would take 60-90 s; the ack timer notices within ack_timeout_s and reconnects."""
    broker = rig.broker()
    db = rig.tmp / "collector.sqlite"
    rig.collector(broker.url, db)
    proxy = rig.proxy(broker.port)
    box = rig.outbox()
    up = rig.uplink(box, proxy.url, keepalive_s=60, ack_timeout_s=3.0)
    produced = produce_batch(box, 20)
    wait_until(lambda: box.depth() == 0, 20, what="first findings delivered")
    proxy.blackhole()
    stalled = time.monotonic()
    produced.update(produce(box, 10, start=20))
    wait_until(lambda: up.counters["half_open"] >= 1, 30, what="the half-open link noticed")
    noticed_s = time.monotonic() - stalled
    assert noticed_s < 30, noticed_s  # keepalive would need 60 s or more
    assert "half-open" in up.last_error or not up.connected
    proxy.allow()
    wait_until(lambda: box.depth() == 0 and box.sent_unstored() == 0 and len(collected(db)) >= 30, 30,
               what="delivery after the link heals")
    assert_delivered(produced, collected(db))


@needs_mosquitto
def test_a_connect_into_a_stalled_link_gives_up_after_its_timeout(rig):
    """TCP connects (the proxy accepts) but nothing comes back: the attempt ends at connect_timeout_s and the next
    one follows within the owed backoff cap, so the link is used soon after it heals."""
    broker = rig.broker()
    db = rig.tmp / "collector.sqlite"
    rig.collector(broker.url, db)
    proxy = rig.proxy(broker.port)
    proxy.blackhole()
    box = rig.outbox()
    produced = produce_batch(box, 10)
    up = rig.uplink(box, proxy.url, connect_timeout_s=2.0, reconnect_min_s=0.5, reconnect_max_s=60.0)
    t0 = time.monotonic()
    wait_until(lambda: up.counters["connect_failures"] >= 2, 20, what="two stalled attempts")
    assert "no CONNACK" in up.last_error and time.monotonic() - t0 < 20
    proxy.allow()
    wait_until(lambda: box.depth() == 0 and box.sent_unstored() == 0, 30, what="delivery once the link heals")
    assert_delivered(produced, collected(db))


@needs_mosquitto
@pytest.mark.parametrize("drain_s", [3.0, 0.0], ids=["drain", "no-drain-control"])
def test_a_clean_stop_publishes_what_is_pending(rig, drain_s):
    """Findings committed just before SIGTERM: the uplink keeps publishing them for up to drain_on_stop_s while the
    link is up (here 200/s for 150 findings), and waits for their receipts; without the drain they wait for the
    next start."""
    broker = rig.broker()
    db = rig.tmp / "collector.sqlite"
    rig.collector(broker.url, db)
    box = rig.outbox()
    up = rig.uplink(box, broker.url, rate_limit=200.0, drain_on_stop_s=drain_s)
    wait_until(lambda: up.connected, 15, what="connected")
    produced = produce_batch(box, 150)
    assert up.stop(timeout=drain_s + 5.0)
    rig.release(up)
    if drain_s:
        assert box.depth() == 0 and box.sent_unstored() == 0, box.stats()
        wait_until(lambda: len(collected(db)) >= 150, 10, what="collected")
        assert_delivered(produced, collected(db))
    else:
        assert box.depth() > 0, "the control should leave findings pending"


def _receipt(**body) -> bytes:
    return json.dumps(body).encode()


@needs_mosquitto
def test_bad_receipts_are_ignored_and_counted_and_cannot_touch_a_never_sent_finding(rig, caplog):
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    broker = rig.broker()
    box = rig.outbox()
    produced = produce_batch(box, 5)  # nobody subscribed to findings: they stay pending (0x10), never sent
    up = rig.uplink(box, broker.url)
    wait_until(lambda: up.counters["unrouted"] >= 1 and up._subacked, 15, what="unrouted publishes, receipts subscribed")
    hub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="fake-hub", protocol=mqtt.MQTTv5)
    hub.connect("127.0.0.1", broker.port, 30)
    hub.loop_start()
    try:
        topic = up.topic_receipts
        pending = sorted(produced)
        for payload in (b"{not json", _receipt(finding_ids="x"), bytes([0xff, 0xfe])):
            hub.publish(topic, payload, qos=1).wait_for_publish(5)
        hub.publish(topic, _receipt(device_id="dev-2", site="site-a", finding_ids=pending), qos=1).wait_for_publish(5)
        hub.publish("edge/v1/site-a/dev-2/receipts", _receipt(finding_ids=pending), qos=1).wait_for_publish(5)
        hub.publish(topic, _receipt(device_id="dev-1", site="site-a", finding_ids=pending + ["made-up"]),
                    qos=1).wait_for_publish(5)
        wait_until(lambda: up.counters["receipt_unknown"] >= 6, 15, what="the last receipt processed")
    finally:
        hub.disconnect()
        hub.loop_stop()
    c = up.counters
    assert c["receipt_malformed"] == 3 and c["receipt_foreign"] == 1 and c["receipts"] == 1, c
    assert c["receipt_unknown"] == 6 and c["stored"] == 0
    assert box.depth() == 5 and set(box.finding_ids().values()) == {"pending"}, "never-sent findings untouched"
    assert sum("malformed receipt" in r.getMessage() for r in caplog.records) == 1, "logged once per connection"


def test_the_socket_gets_tcp_user_timeout_and_keepalive(tmp_path):
    import socket

    if not hasattr(socket, "TCP_USER_TIMEOUT"):
        pytest.skip("TCP_USER_TIMEOUT is Linux-only")
    server = socket.create_server(("127.0.0.1", 0))
    with Outbox(tmp_path / "o.sqlite") as box:
        up = Uplink(box, mqtt_section(f"mqtt://127.0.0.1:{server.getsockname()[1]}", ack_timeout_s=7.0), IDENTITY)
        client = up._make_client()
        client.connect("127.0.0.1", server.getsockname()[1], 30)
        try:
            up._tune_socket(client)
            sock = client.socket()
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 7000
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        finally:
            client._reset_sockets()
            server.close()


def test_backoff_is_capped_short_while_findings_are_owed(tmp_path):
    with Outbox(tmp_path / "o.sqlite", keep_until_stored=True) as box:
        up = Uplink(box, mqtt_section("mqtt://127.0.0.1", reconnect_min_s=1.0, reconnect_max_s=60.0), IDENTITY)
        assert up._backoff_cap() == 60.0, "nothing owed: the long backoff spares the broker"
        seqs = [box.commit(fake_finding(i, "routine")) for i in range(2)]
        assert up._backoff_cap() == 3.0
        box.mark_delivered(seqs)
        assert up._backoff_cap() == 3.0, "sent without a receipt is still owed"
        quiet = Uplink(box, mqtt_section("mqtt://127.0.0.1", reconnect_max_s=60.0, require_receipts=False), IDENTITY)
        assert quiet._backoff_cap() == 60.0
    rng = random.Random(5)
    delays = [backoff_delay(a, 1.0, 3.0, rng) for a in range(40)]
    assert all(0.5 <= d <= 3.0 for d in delays) and max(delays[5:]) > min(delays[5:]) + 0.5, "capped and jittered"


def test_a_network_change_wakes_the_reconnect_wait(tmp_path):
    import subprocess as sp

    from edge_runtime.uplink import NetworkWatch

    watch = NetworkWatch()
    if not watch.available:
        pytest.skip("no rtnetlink socket on this host")
    address = "127.0.0.211/32"
    if sp.run(["ip", "addr", "add", address, "dev", "lo"], capture_output=True).returncode != 0:
        watch.close()
        pytest.skip("cannot add an address here (needs CAP_NET_ADMIN and iproute2)")
    try:
        assert watch.wait(5.0), "an address added to lo is a network change"
    finally:
        sp.run(["ip", "addr", "del", address, "dev", "lo"], capture_output=True)
        watch.close()
    from mqtt_helpers import free_port

    with Outbox(tmp_path / "o.sqlite") as box:
        produce_batch(box, 2)
        up = Uplink(box, mqtt_section(f"mqtt://127.0.0.1:{free_port()}", reconnect_min_s=30.0, reconnect_max_s=30.0,
                                      reconnect_pending_max_s=30.0), IDENTITY).start()
        try:
            wait_until(lambda: up.counters["connect_failures"] >= 1 and up.state == "backoff", 10, what="a long backoff")
            time.sleep(0.5)
            sp.run(["ip", "addr", "add", address, "dev", "lo"], capture_output=True)
            wait_until(lambda: up.counters["connect_failures"] >= 2, 10, what="an early retry after the change")
            assert up.counters["net_events"] >= 1
        finally:
            sp.run(["ip", "addr", "del", address, "dev", "lo"], capture_output=True)
            up.stop(2.0)


# ---------------------------------------------------------------- configuration and start-up
def test_plaintext_to_a_remote_broker_is_refused_unless_allowed(tmp_path):
    with Outbox(tmp_path / "o.sqlite") as box:
        with pytest.raises(ConfigError, match="allow_insecure"):
            Uplink(box, mqtt_section("mqtt://hub.example.org:1883"), IDENTITY)
        Uplink(box, mqtt_section("mqtt://hub.example.org:1883", allow_insecure=True), IDENTITY)
        Uplink(box, mqtt_section("mqtt://localhost"), IDENTITY)
        up = Uplink(box, mqtt_section("mqtts://hub.example.org"), IDENTITY)
        assert up.target.port == 8883 and up.target.tls
        with pytest.raises(ConfigError, match="mqtt.cert_file"):
            Uplink(box, mqtt_section("mqtts://hub.example.org", cert_file=str(tmp_path / "missing.pem")), IDENTITY)
        with pytest.raises(ConfigError, match="plaintext"):
            Uplink(box, mqtt_section("mqtt://127.0.0.1", ca_file=str(tmp_path / "ca.pem")), IDENTITY)
        with pytest.raises(ConfigError, match="mqtt.broker"):
            Uplink(box, mqtt_section("http://hub.example.org"), IDENTITY)
        with pytest.raises(ConfigError, match="device.id"):
            Uplink(box, mqtt_section("mqtt://127.0.0.1"), DeviceIdentity("a/b", "s"))
        with pytest.raises(ConfigError, match="mqtt.resend_on_session_loss_s"):
            Uplink(box, mqtt_section("mqtt://127.0.0.1", resend_on_session_loss_s=-1), IDENTITY)


def test_from_config_without_broker_is_none_and_config_keys_are_strict(tmp_path):
    from edge_runtime.config import load_config

    path = tmp_path / "edge.toml"
    path.write_text('[mqtt]\nbroker = "mqtt://10.0.0.5:1883"\n')
    cfg = load_config(path)
    with Outbox(tmp_path / "o.sqlite") as box:
        with pytest.raises(ConfigError) as info:
            Uplink.from_config(box, cfg, IDENTITY)
        assert str(path) in str(info.value) and "mqtt.allow_insecure" in str(info.value)
        assert Uplink.from_config(box, load_config(None), IDENTITY) is None
    path.write_text('[mqtt]\nbrokr = "x"\n')
    with pytest.raises(ConfigError, match="unknown key 'mqtt.brokr'"):
        load_config(path)


def _connack(up: Uplink, session_present: bool, granted_expiry: int | None = None) -> None:
    """Feed the uplink's CONNACK callback as paho 2 would (MQTT 5)."""
    from paho.mqtt.client import ConnectFlags
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
    from paho.mqtt.reasoncodes import ReasonCode

    props = Properties(PacketTypes.CONNACK)
    if granted_expiry is not None:
        props.SessionExpiryInterval = granted_expiry
    up._on_connect(None, None, ConnectFlags(session_present), ReasonCode(PacketTypes.CONNACK, "Success"), props)


def _delivered_box(tmp_path) -> Outbox:
    box = Outbox(tmp_path / "o.sqlite")
    produce_batch(box, 5, priority="routine")
    box.mark_delivered(_seqs(box).values())
    return box


@pytest.mark.parametrize("granted, requeued", [(None, 5), (3600, 5), (0, 0)], ids=["as-asked", "shorter", "zero"])
def test_a_session_expiry_of_0_granted_in_connack_turns_the_re_send_off(tmp_path, granted, requeued):
    with _delivered_box(tmp_path) as box:
        up = Uplink(box, mqtt_section("mqtt://127.0.0.1"), IDENTITY)  # asks for 7 days
        _connack(up, session_present=False, granted_expiry=granted)
        up._requeue_recent()
        assert box.stats()["requeued"] == up.counters["requeued"] == requeued and not up._requeue_owed


def test_a_failed_re_send_stays_owed_until_it_succeeds(tmp_path, monkeypatch):
    from edge_runtime.outbox import OutboxError

    with _delivered_box(tmp_path) as box:
        up = Uplink(box, mqtt_section("mqtt://127.0.0.1"), IDENTITY)
        real = box.requeue_delivered

        def broken(window_s):
            raise OutboxError("o", "disk I/O error")

        monkeypatch.setattr(box, "requeue_delivered", broken)
        up._requeue_owed = True  # what a CONNACK without a session sets
        up._requeue_recent()
        assert up._requeue_owed and box.depth() == 0  # not done: the pump tries again a second later
        monkeypatch.setattr(box, "requeue_delivered", real)
        up._requeue_recent()
        assert not up._requeue_owed and box.depth() == 5 and up.counters["requeued"] == 5


def test_start_never_blocks_and_stop_is_prompt_without_a_broker(tmp_path):
    from mqtt_helpers import free_port

    with Outbox(tmp_path / "o.sqlite") as box:
        produce_batch(box, 5)
        up = Uplink(box, mqtt_section(f"mqtt://127.0.0.1:{free_port()}"), IDENTITY)
        t0 = time.monotonic()
        up.start()
        assert time.monotonic() - t0 < 0.2
        wait_until(lambda: up.counters["connect_failures"] >= 3, 10, what="retries with backoff")
        assert up.alive() and not up.connected and box.depth() == 5
        t0 = time.monotonic()
        assert up.stop(timeout=2.0)
        assert time.monotonic() - t0 < 2.0 and up.stats()["state"] == "stopped"


def test_backoff_grows_exponentially_with_jitter_and_a_cap():
    rng = random.Random(1)
    for attempt, d in [(0, 1.0), (1, 2.0), (3, 8.0), (10, 60.0), (50, 60.0)]:
        for _ in range(20):
            x = backoff_delay(attempt, 1.0, 60.0, rng)
            assert d / 2 <= x <= d
    assert len({round(backoff_delay(4, 1.0, 60.0, rng), 6) for _ in range(10)}) > 1  # jitter spreads a fleet out


# ---------------------------------------------------------------- privacy
def _identifying_values(path: Path) -> set[str]:
    """Values (length >= 4) of every PS3.15 basic-profile attribute in the file, sequences and file meta included."""
    import pydicom
    from pydicom.multival import MultiValue

    from edge_runtime.imaging.deid import IDENTIFYING_ATTRIBUTES

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    wanted = set(IDENTIFYING_ATTRIBUTES) | {"SourceApplicationEntityTitle", "SendingApplicationEntityTitle",
                                            "ReceivingApplicationEntityTitle"}
    values: set[str] = set()
    elements = list(ds.iterall()) + list(getattr(ds, "file_meta", None) or [])
    for elem in elements:
        if elem.keyword not in wanted or elem.VR == "SQ" or elem.value is None:
            continue
        items = elem.value if isinstance(elem.value, (list, tuple, MultiValue)) else [elem.value]
        for item in items:
            text = item.decode("latin-1", "replace") if isinstance(item, bytes) else str(item)
            parts = {text.strip()} | {p.strip() for p in text.replace("^", "=").split("=")}
            values |= {p for p in parts if len(p) >= 4}
    return values


def _leaves(value) -> list[str]:
    """The text a payload carries: JSON strings (numbers are measurements and counters, e.g. telemetry byte
    counts, where a 4-digit StudyID like 2002 would match by coincidence)."""
    if isinstance(value, dict):
        return [x for v in value.values() for x in _leaves(v)]
    if isinstance(value, list):
        return [x for v in value for x in _leaves(v)]
    return [value] if isinstance(value, str) else []


@needs_mosquitto
@needs_shared
@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom: over-long values in the sample files
def test_published_payloads_carry_no_identifying_dicom_values(rig):
    import numpy as np
    from pydicom.misc import is_dicom

    from edge_runtime.cli import study_ref
    from edge_runtime.findings import ModelRef, build_finding
    from edge_runtime.frames import Frame
    from edge_runtime.heads import HeadResult
    from edge_runtime.imaging.deid import load_or_create_key
    from edge_runtime.imaging.inputs import open_input

    files = sorted(p for p in DICOM_DIR.rglob("*") if p.is_file() and is_dicom(p))
    assert files, f"no DICOM files under {DICOM_DIR}"
    broker = rig.broker()
    cap = Capture(broker.port, "edge/v1/#")
    try:
        db = rig.tmp / "collector.sqlite"
        rig.collector(broker.url, db)
        box = rig.outbox()
        rig.uplink(box, broker.url, telemetry_interval_s=0.2)
        key = load_or_create_key(rig.tmp / "device.key")
        model = ModelRef("tiny-cls", "0.0.1", "fp32", "0" * 64, "fp32", "onnxruntime", "CPU", "graph")
        forbidden: dict[str, set[str]] = {}
        expected = 0
        for path in files:
            inp = open_input(str(path), 1 << 30)  # what `infer` does, without running a model
            forbidden[str(path)] = _identifying_values(path)
            for index in range(min(inp.n_frames, 3)):
                frame = Frame(pixels=np.zeros((4, 4), np.uint8), source_kind="file", source_name=str(path),
                              study=study_ref(inp, key, index))
                head = HeadResult("classification", {"label": "normal", "probabilities": {"normal": 0.9, "bright": 0.1}},
                                  "routine")
                box.commit(build_finding(identity=IDENTITY, seq=0, frame=frame, model=model, head=head,
                                         capture_to_result_ms=5.0, budget_ms=100.0))
                expected += 1
        wait_until(lambda: box.depth() == 0 and len(collected(db)) >= expected, 30, what="privacy findings delivered")
        wait_until(lambda: cap.payloads("/telemetry"), 10, what="a telemetry message")
        wait_until(lambda: len(cap.payloads("/findings")) >= expected, 10, what="capture of every finding")
        raw = [(t, p.decode("utf-8")) for t, p, _ in list(cap.messages)]
    finally:
        cap.close()
    # What a payload says: its topic and every value (JSON keys such as "name" are the schema, not data).
    payloads = [topic + "\n" + "\n".join(_leaves(json.loads(p)) if p.startswith("{") else [p]) for topic, p in raw]
    leaks = []
    for path, values in forbidden.items():
        for value in values:
            if any(c.isalpha() for c in value):  # names, places, descriptions: anywhere, any case
                pattern = re.compile(re.escape(value), re.IGNORECASE)
            else:  # dates, times, numbers, UIDs: a whole number, not digits inside a random pseudonym or UUID
                pattern = re.compile(r"(?<![0-9])" + re.escape(value) + r"(?![0-9])")
            for payload in payloads:
                if pattern.search(payload):
                    leaks.append(f"{Path(path).name}: {value!r}")
                    break
    assert not leaks, f"identifying values published: {leaks[:10]}"
    assert any(json.loads(p).get("study", {}).get("study_id", "").startswith("2.25.") for _, p in raw if p.startswith("{"))
