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
