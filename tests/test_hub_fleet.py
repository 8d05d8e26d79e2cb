"""The fleet fault test: three `edge-runtime collect` processes in one shared-subscription group on a private
Mosquitto, writing to one real PostgreSQL; 50 simulated devices publish 10,000 findings, some sent twice; every
couple of seconds one collector is SIGKILLed and started again. Exactly 10,000 rows, each produced finding_id
once, and every member of the group took a share."""
from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from mqtt_helpers import REPO, Broker, fake_finding, needs_mosquitto, wait_until
from pg_helpers import PgServer, needs_postgres

pytestmark = [needs_mosquitto, needs_postgres, pytest.mark.slow]

DEVICES, PER_DEVICE, RESEND = 50, 200, 0.05  # 10,000 findings, ~500 of them published a second time
COLLECTORS = 3


def start_collector(broker: Broker, url: str, k: int, log) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "edge_runtime", "collect", "--broker", broker.url, "--db", url, "--share", "collectors",
         "--client-id", f"hub-{k}", "--log-level", "info"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True)


def publish_fleet(port: int, produced: dict[str, int], resent: list[str], done: threading.Event,
                  seconds: float) -> None:
    """Each device publishes its findings in seq order, all devices interleaved, paced over `seconds`; a few
    findings are published again later (a device that lost the PUBACK sends the same finding_id again)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    rng = random.Random(17)
    clients = []
    for d in range(DEVICES):
        c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"dev-{d:02d}",
                        protocol=mqtt.MQTTv5)
        c.max_inflight_messages_set(50)
        c.connect("127.0.0.1", port, 30)
        c.loop_start()
        clients.append(c)
    infos, sent = [], []
    start = time.monotonic()
    total = DEVICES * PER_DEVICE
    for n in range(total):
        d, seq = n % DEVICES, n // DEVICES + 1
        f = fake_finding(n, "urgent" if n % 7 == 0 else "routine", f"dev-{d:02d}", f"site-{d % 5}") | {"seq": seq}
        payload = json.dumps(f)
        topic = f"edge/v1/site-{d % 5}/dev-{d:02d}/findings"
        infos.append(clients[d].publish(topic, payload, qos=1))
        produced[f["finding_id"]] = d
        sent.append((d, topic, payload, f["finding_id"]))
        if sent and rng.random() < RESEND:
            d2, topic2, payload2, fid2 = sent[rng.randrange(len(sent))]
            infos.append(clients[d2].publish(topic2, payload2, qos=1))
            resent.append(fid2)
        lag = start + seconds * (n + 1) / total - time.monotonic()
        if lag > 0:
            time.sleep(lag)
    for info in infos:
        info.wait_for_publish(60)
    for c in clients:
        c.disconnect()
        c.loop_stop()
    done.set()


def count(url: str, sql: str = "SELECT count(*) FROM findings"):
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=5) as conn:
            return conn.execute(sql).fetchone()[0]
    except psycopg.Error:
        return None  # the schema not created yet


def test_three_collectors_survive_sigkill_with_exact_counts(tmp_path):
    pg = PgServer().start()
    broker = Broker(tmp_path / "broker").start()
    log = open(tmp_path / "collectors.log", "w")
    procs: list[subprocess.Popen] = []
    try:
        url = pg.database("fleet")
        procs = [start_collector(broker, url, k, log) for k in range(COLLECTORS)]
        # Each member's persistent session and shared subscription exist before the devices publish.
        wait_until(lambda: count(url, "SELECT count(*) FROM hub_schema") == 1, 60, what="the schema")
        wait_until(lambda: len(set(re.findall(r"collector (hub-\d) subscribed", (tmp_path / "collectors.log").read_text())))
                   == COLLECTORS, 60, interval=0.2, what="three collectors subscribed")
        produced: dict[str, int] = {}
        resent: list[str] = []
        done = threading.Event()
        pub = threading.Thread(target=publish_fleet, args=(broker.port, produced, resent, done, 12.0), daemon=True)
        pub.start()
        rng = random.Random(3)
        kills = 0
        while not done.is_set() or kills < 4:
            time.sleep(rng.uniform(1.5, 2.5))
            k = rng.randrange(COLLECTORS)
            procs[k].send_signal(signal.SIGKILL)
            procs[k].wait(30)
            procs[k] = start_collector(broker, url, k, log)
            kills += 1
        pub.join(120)
        assert done.is_set(), "the fleet did not finish publishing"
        wait_until(lambda: count(url) == DEVICES * PER_DEVICE, 120, interval=0.5,
                   what=f"{DEVICES * PER_DEVICE} findings in PostgreSQL (after {kills} kills)")
        time.sleep(1.0)  # anything still redelivered now must be a duplicate, not a row
        assert count(url) == DEVICES * PER_DEVICE
        import psycopg

        with psycopg.connect(url) as conn:
            ids = {r[0] for r in conn.execute("SELECT finding_id FROM findings")}
            dups = conn.execute("SELECT coalesce(sum(dups), 0) FROM findings").fetchone()[0]
            shares = dict(conn.execute("SELECT collector, stored FROM collector_stats"))
            per_device = conn.execute("SELECT count(DISTINCT device_id), min(n), max(n) FROM "
                                      "(SELECT device_id, count(*) AS n FROM findings GROUP BY device_id) AS c").fetchone()
        assert ids == set(produced), "every produced finding stored, nothing unknown"
        assert dups >= len(set(resent)), "re-sends are counted as duplicates, not stored"
        assert per_device == (DEVICES, PER_DEVICE, PER_DEVICE)
        assert sorted(shares) == [f"hub-{k}" for k in range(COLLECTORS)] and all(shares.values()), shares
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        log.close()
        broker.stop()
        pg.cleanup()

