"""The hub-side collector: idempotent storage by finding_id, persistent session, shared subscriptions, CLI."""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import pytest

from mqtt_helpers import REPO, Broker, assert_delivered, collected, fake_finding, mqtt_section, needs_mosquitto, wait_until
from edge_hub.collector import Collector, CollectorStore
from edge_runtime.findings import DeviceIdentity, to_json
from edge_runtime.outbox import Outbox
from edge_runtime.uplink import Uplink


def test_store_is_idempotent_by_finding_id_and_counts_duplicates(tmp_path):
    store = CollectorStore(tmp_path / "hub.sqlite")
    a, b = fake_finding(1, "urgent"), fake_finding(2, "routine")
    topic = "edge/v1/site-a/dev-1/findings"
    assert store.store([(topic, to_json(a).encode()), (topic, to_json(b).encode())]) == (2, 0, 0)
    assert store.store([(topic, to_json(a).encode()), (topic, b"not json"), (topic, b'{"x": 1}')]) == (0, 1, 2)
    assert store.counts() == {"stored": 2, "duplicates": 1, "rejected": 2, "feedback": 0, "feedback_duplicates": 0,
                              "statuses": 0}
    store.close()
    rows = collected(tmp_path / "hub.sqlite")
    assert rows == [(a["finding_id"], "urgent", 1), (b["finding_id"], "routine", 0)]
    conn = sqlite3.connect(tmp_path / "hub.sqlite")
    assert conn.execute("SELECT COUNT(*) FROM rejected").fetchone()[0] == 2  # kept for inspection, not lost
    conn.close()


def test_collect_refuses_plaintext_to_a_remote_broker(tmp_path, capsys):
    from edge_runtime.cli import main

    assert main(["collect", "--broker", "mqtt://10.1.2.3", "--db", str(tmp_path / "hub.sqlite")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--allow-insecure" in err


def _collect_cli(broker: Broker, db, seconds: float) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "edge_runtime", "collect", "--broker", broker.url, "--db", str(db),
         "--client-id", "hub-cli", "--max-seconds", str(seconds)],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_mosquitto
def test_collect_cli_keeps_a_persistent_session_and_gets_what_was_queued(tmp_path):
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    broker = Broker(tmp_path / "broker").start()
    try:
        db = tmp_path / "hub.sqlite"
        assert _collect_cli(broker, db, 1.0)["stored"] == 0  # creates the session and its subscription
        findings = [fake_finding(i, "routine") for i in range(20)]
        pub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="pub", protocol=mqtt.MQTTv5)
        pub.connect("127.0.0.1", broker.port)
        pub.loop_start()
        infos = [pub.publish("edge/v1/site-a/dev-1/findings", to_json(f), qos=1) for f in findings]
        for info in infos:
            info.wait_for_publish(10)
        infos[0].wait_for_publish(10)
        pub.disconnect()
        pub.loop_stop()
        report = _collect_cli(broker, db, 2.0)  # offline meanwhile: the broker queued them for its session
        assert report["stored"] == 20 and report["duplicates"] == 0
        assert_delivered({f["finding_id"]: "routine" for f in findings}, collected(db))
    finally:
        broker.stop()


@needs_mosquitto
def test_shared_subscription_spreads_findings_over_collectors_without_loss(tmp_path):
    broker = Broker(tmp_path / "broker").start()
    things = []
    try:
        topic = "$share/collectors/edge/v1/+/+/findings"
        dbs = [tmp_path / f"hub-{k}.sqlite" for k in range(2)]
        cols = [Collector(broker.url, db, topic=topic, client_id=f"hub-{k}", reconnect_min_s=0.05).start()
                for k, db in enumerate(dbs)]
        things += cols
        for col in cols:
            wait_until(col.subscribed.is_set, 10, what="shared subscription")
        produced = {}
        for d in range(2):  # two devices, one broker, two collectors
            identity = DeviceIdentity(f"dev-{d}", "site-s")
            box = Outbox(tmp_path / f"dev-{d}.sqlite")
            fs = [fake_finding(i, "routine", identity.device_id, identity.site) for i in range(100)]
            box.commit_many([(f, None) for f in fs])
            produced.update({f["finding_id"]: "routine" for f in fs})
            things.append(Uplink(box, mqtt_section(broker.url), identity).start())
            things.append(box)
        wait_until(lambda: sum(len(collected(db)) for db in dbs) >= 200, 30, what="findings spread over collectors")
        per_hub = [collected(db) for db in dbs]
        assert all(rows for rows in per_hub), "each member of the group takes a share"
        ids = [set(r[0] for r in rows) for rows in per_hub]
        assert not ids[0] & ids[1], "a shared subscription delivers each finding to one collector"
        assert_delivered(produced, per_hub[0] + per_hub[1])
    finally:
        for t in reversed(things):
            t.stop(2.0) if hasattr(t, "stop") else t.close()
        broker.stop()


def test_collector_rejects_a_malformed_shared_subscription(tmp_path):
    from edge_runtime.errors import ConfigError

    with pytest.raises(ConfigError, match=r"\$share/<group>/<filter>"):
        Collector("mqtt://127.0.0.1:1", tmp_path / "hub.sqlite", topic="$share/collectors")


def test_receipt_topic_is_the_devices_own():
    from edge_hub.collector import receipt_topic

    assert receipt_topic("edge/v1/site-a/dev-1/findings") == "edge/v1/site-a/dev-1/receipts"
    assert receipt_topic("edge/v1/site-a/dev-1/feedback") == "edge/v1/site-a/dev-1/receipts"
    assert receipt_topic("edge/v1/site-a/dev-1/telemetry") is None
    assert receipt_topic("findings") is None


@needs_mosquitto
@pytest.mark.parametrize("receipts", [True, False], ids=["receipts", "no-receipts"])
def test_collector_sends_each_device_a_receipt_for_what_it_committed(tmp_path, receipts):
    """Per device, after the commit: the ids it stored and the duplicates it already had; nothing for a message that
    is not a finding; nothing at all with receipts off."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from mqtt_helpers import Capture

    broker = Broker(tmp_path / "broker").start()
    cap = Capture(broker.port, "edge/v1/+/+/receipts")
    col = Collector(broker.url, tmp_path / "hub.sqlite", client_id="hub-r", reconnect_min_s=0.05, receipts=receipts)
    try:
        col.start()
        wait_until(col.subscribed.is_set, 10, what="collector subscription")
        pub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="fake-devices", protocol=mqtt.MQTTv5)
        pub.connect("127.0.0.1", broker.port, 30)
        pub.loop_start()
        sent: dict[str, list[str]] = {"dev-1": [], "dev-2": []}
        for i in range(12):
            device = "dev-1" if i % 3 else "dev-2"
            f = fake_finding(i, "routine", device, "site-r")
            sent[device].append(f["finding_id"])
            pub.publish(f"edge/v1/site-r/{device}/findings", to_json(f), qos=1).wait_for_publish(5)
        again = fake_finding(0, "routine", "dev-1", "site-r") | {"finding_id": sent["dev-1"][0]}
        pub.publish("edge/v1/site-r/dev-1/findings", to_json(again), qos=1).wait_for_publish(5)  # a re-send
        pub.publish("edge/v1/site-r/dev-1/findings", b"not a finding", qos=1).wait_for_publish(5)
        pub.disconnect()
        pub.loop_stop()
        wait_until(lambda: col.counters["stored"] == 12 and col.counters["duplicates"] == 1
                   and col.counters["rejected"] == 1, 15, what="stored")
        if not receipts:
            import time

            time.sleep(1.0)
            assert not cap.messages and col.counters["receipts_sent"] == 0
            return
        wait_until(lambda: sum(len(json.loads(p)["finding_ids"]) for _, p, _ in list(cap.messages)) >= 13, 15,
                   what="receipts")
        got: dict[str, list[str]] = {"dev-1": [], "dev-2": []}
        for topic, payload, _ in list(cap.messages):
            body = json.loads(payload)
            assert topic == f"edge/v1/{body['site']}/{body['device_id']}/receipts" and body["site"] == "site-r"
            got[body["device_id"]] += body["finding_ids"]
        assert sorted(got["dev-2"]) == sorted(sent["dev-2"])
        assert sorted(got["dev-1"]) == sorted(sent["dev-1"] + [sent["dev-1"][0]]), "a duplicate is confirmed again"
    finally:
        cap.close()
        col.stop(2.0)
        broker.stop()


def test_share_puts_every_topic_in_the_group_and_refuses_a_bad_name():
    from edge_hub.collector import DEFAULT_TOPICS, shared
    from edge_runtime.errors import ConfigError

    assert shared(DEFAULT_TOPICS, "collectors") == [f"$share/collectors/{t}" for t in DEFAULT_TOPICS]
    for bad in ("", "a/b", "a+", "#"):
        with pytest.raises(ConfigError, match="--share"):
            shared(DEFAULT_TOPICS, bad)
