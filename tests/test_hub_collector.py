"""The collector on a real PostgreSQL server behind a real Mosquitto: findings, feedback and device status
stored, receipts after the commit, and a database that goes away costs acknowledgements, never a row."""
from __future__ import annotations

import json
import logging

import pytest

from mqtt_helpers import Broker, Capture, fake_finding, needs_mosquitto, wait_until
from pg_helpers import PgServer, needs_postgres
from edge_hub.collector import Collector

pytestmark = [needs_mosquitto, needs_postgres]


@pytest.fixture(scope="module")
def pg():
    server = PgServer().start()
    yield server
    server.cleanup()


class Publisher:
    def __init__(self, port: int) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="fake-devices",
                                  protocol=mqtt.MQTTv5)
        self.client.connect("127.0.0.1", port, 30)
        self.client.loop_start()

    def send(self, topic: str, payload, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def rows(url: str, sql: str) -> list[tuple]:
    import psycopg

    with psycopg.connect(url) as conn:
        return conn.execute(sql).fetchall()


def test_findings_feedback_and_status_land_in_postgres_with_receipts(tmp_path, pg):
    url = pg.database()
    broker = Broker(tmp_path / "broker").start()
    cap = Capture(broker.port, "edge/v1/+/+/receipts")
    pub = Publisher(broker.port)
    pub.send("edge/v1/site-p/dev-1/status", "online", retain=True)  # retained before the collector exists
    col = Collector(broker.url, url, client_id="hub-pg", reconnect_min_s=0.05).start()
    try:
        wait_until(col.subscribed.is_set, 15, what="collector subscription")
        fs = [fake_finding(i, "urgent" if i % 4 == 0 else "routine", "dev-1", "site-p") | {"seq": i + 1}
              for i in range(20)]
        for f in fs:
            pub.send("edge/v1/site-p/dev-1/findings", json.dumps(f))
        pub.send("edge/v1/site-p/dev-1/findings", json.dumps(fs[3]))  # a re-send
        fb = {"feedback_id": "fb-1", "finding_id": fs[0]["finding_id"], "verdict": "correct", "label": "normal",
              "value_mm": None, "note": "", "created_at": "2026-12-01T10:00:00Z", "device_id": "dev-1",
              "site": "site-p"}
        pub.send("edge/v1/site-p/dev-1/feedback", json.dumps(fb))
        pub.send("edge/v1/site-p/dev-1/feedback", json.dumps(fb))
        pub.send("edge/v1/site-p/dev-1/findings", b"\x00 not a finding")
        wait_until(lambda: col.counters["stored"] == 20 and col.counters["feedback_duplicates"] == 1
                   and col.counters["rejected"] == 1, 20, what="everything stored")
        assert rows(url, "SELECT count(*), sum(dups) FROM findings") == [(20, 1)]
        assert rows(url, "SELECT feedback_id, verdict, dups FROM feedback") == [("fb-1", "correct", 1)]
        assert rows(url, "SELECT site, device_id, status, retained FROM device_status") == [
            ("site-p", "dev-1", "online", True)]
        assert rows(url, "SELECT collector, stored, duplicates, rejected FROM collector_stats") == [
            ("hub-pg", 20, 1, 1)]
        wait_until(lambda: sum(len(json.loads(p).get("finding_ids", [])) for p in cap.payloads()) >= 21
                   and sum(len(json.loads(p).get("feedback_ids", [])) for p in cap.payloads()) >= 2, 15,
                   what="receipts")
        named = [i for p in cap.payloads() for i in json.loads(p).get("finding_ids", [])]
        assert sorted(set(named)) == sorted(f["finding_id"] for f in fs)
        assert [i for p in cap.payloads() for i in json.loads(p).get("feedback_ids", [])] == ["fb-1", "fb-1"]
        pub.send("edge/v1/site-p/dev-1/status", "offline", retain=True)
        wait_until(lambda: rows(url, "SELECT status FROM device_status") == [("offline",)], 15, what="status update")
    finally:
        col.stop(2.0)
        pub.close()
        cap.close()
        broker.stop()


def test_a_database_that_goes_away_costs_acknowledgements_not_rows(tmp_path, pg, caplog):
    """The server is stopped under a running collector: it stops acknowledging and says so; the broker keeps
    what arrives meanwhile; after the server is back everything is stored exactly once."""
    caplog.set_level(logging.WARNING, logger="edge_hub.collector")
    url = pg.database()
    broker = Broker(tmp_path / "broker").start()
    pub = Publisher(broker.port)
    col = Collector(broker.url, url, client_id="hub-away", reconnect_min_s=0.05, reconnect_max_s=0.5).start()
    try:
        wait_until(col.subscribed.is_set, 15, what="collector subscription")
        first = [fake_finding(i, "routine", "dev-2", "site-p") | {"seq": i + 1} for i in range(30)]
        for f in first:
            pub.send("edge/v1/site-p/dev-2/findings", json.dumps(f))
        wait_until(lambda: col.counters["stored"] == 30, 20, what="the first findings stored")
        pg.stop()
        later = [fake_finding(i, "urgent", "dev-2", "site-p") | {"seq": 31 + i} for i in range(50)]
        for f in later:
            pub.send("edge/v1/site-p/dev-2/findings", json.dumps(f))  # the broker takes them: PUBACK
        wait_until(col.db_unavailable.is_set, 20, what="the collector to notice the database is gone")
        wait_until(lambda: any("not acknowledged" in r.getMessage() or "not taking messages" in r.getMessage()
                               for r in caplog.records), 20, what="a log line saying so")
        line = next(r.getMessage() for r in caplog.records if "database" in r.getMessage())
        assert "127.0.0.1" in line and len(line.splitlines()) == 1
        pg.start()
        wait_until(lambda: not col.db_unavailable.is_set() and col.subscribed.is_set(), 30,
                   what="the collector back on the database and the broker")
        wait_until(lambda: rows(url, "SELECT count(*) FROM findings") == [(80,)], 30, what="all 80 findings")
        got = {r[0] for r in rows(url, "SELECT finding_id FROM findings")}
        assert got == {f["finding_id"] for f in first + later}
        assert any("is back" in r.getMessage() for r in caplog.records)
    finally:
        col.stop(2.0)
        pub.close()
        broker.stop()
        if not pg.ready():
            pg.start()


def test_real_devices_through_two_shared_collectors_and_the_report(tmp_path, pg, capsys):
    """The device side as it ships (Outbox, Uplink with receipts) for three devices, two collectors in one
    shared-subscription group on PostgreSQL: every finding stored once, every device's outbox confirmed by
    receipts, and `hub report` shows the fleet: counts, status online, no seq gaps."""
    from edge_hub.collector import DEFAULT_TOPICS, shared
    from edge_runtime.cli import main
    from edge_runtime.findings import DeviceIdentity
    from edge_runtime.outbox import Outbox
    from edge_runtime.uplink import Uplink
    from mqtt_helpers import mqtt_section

    url = pg.database()
    broker = Broker(tmp_path / "broker").start()
    things = []
    try:
        cols = [Collector(broker.url, url, topic=shared(DEFAULT_TOPICS, "collectors"), client_id=f"hub-{k}",
                          reconnect_min_s=0.05).start() for k in range(2)]
        things += cols
        for col in cols:
            wait_until(col.subscribed.is_set, 15, what="shared subscription")
        boxes = []
        for d in range(3):
            identity = DeviceIdentity(f"scanner-{d}", "clinic-7" if d < 2 else "clinic-9")
            box = Outbox(tmp_path / f"dev-{d}.sqlite", keep_until_stored=True)
            box.commit_many([(fake_finding(i, "urgent" if i % 5 == 0 else "routine", identity.device_id,
                                           identity.site), None) for i in range(40)])
            boxes.append(box)
            things.append(Uplink(box, mqtt_section(broker.url), identity).start())
        wait_until(lambda: rows(url, "SELECT count(*) FROM findings") == [(120,)], 30, what="120 findings")
        wait_until(lambda: all(b.stats()["sent_unstored"] == 0 and b.depth() == 0 for b in boxes), 30,
                   what="every device's findings confirmed by receipts")
        wait_until(lambda: rows(url, "SELECT count(*) FROM device_status WHERE status = 'online'") == [(3,)], 15,
                   what="each device's status")
        assert all(c.counters["stored"] for c in cols), "both members took a share"
        assert main(["hub", "report", "--db", url, "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert [(d["site"], d["device_id"], d["status"], d["findings"], d["seq"]["missing"]) for d in report["devices"]] \
            == [("clinic-7", "scanner-0", "online", {"urgent": 8, "routine": 32}, 0),
                ("clinic-7", "scanner-1", "online", {"urgent": 8, "routine": 32}, 0),
                ("clinic-9", "scanner-2", "online", {"urgent": 8, "routine": 32}, 0)]
        assert report["totals"]["urgent_unreviewed"] == 24 and all(d["last_contact"] for d in report["devices"])
    finally:
        for t in reversed(things):
            t.stop(2.0)
        for b in locals().get("boxes", []):
            b.close()
        broker.stop()
