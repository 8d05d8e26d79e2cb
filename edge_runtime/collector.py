"""`edge-runtime collect`: the clinic or regional hub's subscriber that stores findings idempotently.

It subscribes with QoS 1 on a persistent session (so the broker queues findings while the collector is away)
and stores each finding in SQLite keyed by finding_id: a duplicate (the same finding sent again after a lost
PUBACK) is counted, never stored twice. PUBACKs are sent manually, only after the findings they acknowledge are
committed (synchronous=FULL), in batches: a crash of the collector means a redelivery, not a loss.

After each batch is committed it publishes a **receipt** to every device in the batch,
`edge/v1/<site>/<device_id>/receipts` (QoS 1): `{"device_id", "site", "finding_ids": [...]}`, naming the findings
it stored and the duplicates it already had (a re-send means the device is still waiting). The device marks those
rows stored and only then prunes them. The site and device come from the topic a finding arrived on (the one the
broker's ACL ties to the device), not from its payload. A receipt that is lost (the collector's link drops first)
costs a re-send and a duplicate, never a row.

Several collectors share the load with an MQTT shared subscription ("$share/collectors/edge/v1/+/+/findings"):
the broker hands each finding to one member of the group. See docs/mqtt.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import signal
import socket
import sqlite3
import ssl
import threading
import time
from pathlib import Path
from typing import Any

from edge_runtime.errors import ConfigError, EdgeError
from edge_runtime.uplink import backoff_delay, check_transport, parse_broker_url

log = logging.getLogger("edge_runtime.collector")

DEFAULT_TOPIC = "edge/v1/+/+/findings"


def receipt_topic(findings_topic: str) -> str | None:
    """edge/v1/<site>/<device>/findings -> edge/v1/<site>/<device>/receipts; None for any other shape."""
    parts = findings_topic.split("/")
    if len(parts) < 3 or parts[-1] != "findings" or not parts[-2] or not parts[-3]:
        return None
    return "/".join(parts[:-1] + ["receipts"])

_SCHEMA = """
CREATE TABLE IF NOT EXISTS findings (
    rx          INTEGER PRIMARY KEY,      -- arrival order at this collector
    finding_id  TEXT NOT NULL UNIQUE,
    device_id   TEXT,
    site        TEXT,
    seq         INTEGER,
    priority    TEXT,
    created_at  TEXT,
    received_at REAL NOT NULL,
    topic       TEXT NOT NULL,
    payload     TEXT NOT NULL,
    dups        INTEGER NOT NULL DEFAULT 0  -- how many more times it arrived
);
CREATE INDEX IF NOT EXISTS findings_device ON findings(device_id, seq);
CREATE TABLE IF NOT EXISTS rejected (      -- messages that are not findings: kept for inspection, acknowledged
    id INTEGER PRIMARY KEY, topic TEXT NOT NULL, payload BLOB, reason TEXT NOT NULL, received_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
"""


class CollectorStore:
    """SQLite (WAL, synchronous=FULL), one writer. Stores a batch in one transaction."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self.conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
            self.conn.execute("PRAGMA journal_mode = WAL")
            self.conn.execute("PRAGMA synchronous = FULL")
            self.conn.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise EdgeError(str(self.path), f"cannot open the collector database ({exc})") from None

    def store(self, messages: list[tuple[str, bytes]],
              accepted: list[tuple[str, str]] | None = None) -> tuple[int, int, int]:
        """(topic, payload) pairs -> (stored, duplicates, rejected). One transaction. `accepted`, when given, gets
        (topic, finding_id) of every finding now in the database (stored or duplicate), once it is committed."""
        done: list[tuple[str, str]] = []
        stored = dups = rejected = 0
        now = time.time()
        with self._lock:
            c = self.conn
            c.execute("BEGIN IMMEDIATE")
            try:
                for topic, payload in messages:
                    try:
                        text = payload.decode("utf-8")
                        f = json.loads(text)
                        finding_id = f["finding_id"]
                        if not isinstance(f, dict) or not isinstance(finding_id, str) or not finding_id:
                            raise ValueError("finding_id missing")
                    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
                        c.execute("INSERT INTO rejected(topic, payload, reason, received_at) VALUES (?,?,?,?)",
                                  (topic, payload, f"not a finding: {exc}", now))
                        rejected += 1
                        continue
                    cur = c.execute(
                        "INSERT OR IGNORE INTO findings(finding_id, device_id, site, seq, priority, created_at, received_at,"
                        " topic, payload) VALUES (?,?,?,?,?,?,?,?,?)",
                        (finding_id, f.get("device_id"), f.get("site"), f.get("seq"), f.get("priority"),
                         f.get("created_at"), now, topic, text))
                    if cur.rowcount == 1:
                        stored += 1
                    else:
                        c.execute("UPDATE findings SET dups = dups + 1 WHERE finding_id = ?", (finding_id,))
                        dups += 1
                    done.append((topic, finding_id))
                for key, n in (("stored", stored), ("duplicates", dups), ("rejected", rejected)):
                    if n:
                        c.execute("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = value + ?",
                                  (key, n, n))
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise
        if accepted is not None:
            accepted.extend(done)
        return stored, dups, rejected

    def counts(self) -> dict[str, int]:
        with self._lock:
            meta = dict(self.conn.execute("SELECT key, value FROM meta"))
        return {k: meta.get(k, 0) for k in ("stored", "duplicates", "rejected")}

    def close(self) -> None:
        with self._lock:
            self.conn.close()


class Collector:
    """Subscriber loop on its own thread (start/stop) or in the caller's (run)."""

    def __init__(
        self,
        broker_url: str,
        db_path: str | Path,
        *,
        topic: str = DEFAULT_TOPIC,
        client_id: str = "",
        protocol: str = "5",
        session_expiry_s: int = 7 * 24 * 3600,
        ca_file: str = "",
        cert_file: str = "",
        key_file: str = "",
        username: str = "",
        password: str | None = None,
        allow_insecure: bool = False,
        receive_maximum: int = 1000,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 30.0,
        keepalive_s: int = 30,
        batch_max: int = 500,
        receipts: bool = True,
    ) -> None:
        where = "collect"
        self.target = parse_broker_url(broker_url, where, key="--broker")
        check_transport(self.target, allow_insecure, where,
                        {"--ca-file": ca_file, "--cert-file": cert_file, "--key-file": key_file},
                        insecure_key="--allow-insecure", url_key="--broker")
        if protocol not in ("5", "3.1.1"):
            raise ConfigError(where, f"--protocol must be 5 or 3.1.1; got {protocol!r}")
        if topic.startswith("$share/") and topic.count("/") < 2:
            raise ConfigError(where, f"--topic {topic!r}: a shared subscription is $share/<group>/<filter>")
        self.topic = topic
        self.client_id = client_id or f"edge-collector-{socket.gethostname()}"
        self.v5 = protocol == "5"
        self.session_expiry_s = session_expiry_s
        self.tls = (ca_file, cert_file, key_file)
        self.username, self.password = username, password
        self.receive_maximum = receive_maximum
        self.reconnect = (reconnect_min_s, reconnect_max_s)
        self.keepalive_s = keepalive_s
        self.batch_max = batch_max
        self.receipts = receipts
        self.store = CollectorStore(db_path)
        self.subscribed = threading.Event()
        self.counters = {"received": 0, "stored": 0, "duplicates": 0, "rejected": 0, "connects": 0,
                         "receipts_sent": 0, "receipted": 0}
        self.last_error = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._batch: list[Any] = []
        self._suback: list | None = None
        self._connack: tuple[bool, str, bool] | None = None

    # ------------------------------------------------------------ lifecycle
    def start(self) -> "Collector":
        self._thread = threading.Thread(target=self.run, name="collector", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.store.close()

    def stats(self) -> dict[str, Any]:
        return {"subscribed": self.subscribed.is_set(), "last_error": self.last_error, **self.counters}

    def run(self, max_seconds: float | None = None) -> None:
        end = time.monotonic() + max_seconds if max_seconds else None
        attempt = 0
        rng = random.Random()
        while not self._stop.is_set() and (end is None or time.monotonic() < end):
            if self._session(end):
                attempt = 0
            if self._stop.is_set() or (end is not None and time.monotonic() >= end):
                break
            delay = backoff_delay(attempt, *self.reconnect, rng)
            attempt += 1
            self._stop.wait(delay if end is None else max(0.0, min(delay, end - time.monotonic())))

    # ------------------------------------------------------------ one connection
    def _make_client(self):
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        kwargs: dict[str, Any] = {"callback_api_version": CallbackAPIVersion.VERSION2, "client_id": self.client_id,
                                  "protocol": mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311, "manual_ack": True}
        if not self.v5:
            kwargs["clean_session"] = False
        client = mqtt.Client(**kwargs)
        if self.target.tls:
            ca, cert, key = self.tls
            client.tls_set(ca_certs=ca or None, certfile=cert or None, keyfile=key or None,
                           cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        if self.username:
            client.username_pw_set(self.username, self.password)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    def _session(self, end: float | None) -> bool:
        import paho.mqtt.client as mqtt

        self._connack, self._suback = None, None
        self._batch = []
        client = self._make_client()
        try:
            try:
                if self.v5:
                    from paho.mqtt.packettypes import PacketTypes
                    from paho.mqtt.properties import Properties

                    props = Properties(PacketTypes.CONNECT)
                    props.SessionExpiryInterval = self.session_expiry_s
                    props.ReceiveMaximum = self.receive_maximum
                    client.connect(self.target.host, self.target.port, self.keepalive_s, clean_start=False, properties=props)
                else:
                    client.connect(self.target.host, self.target.port, self.keepalive_s)
            except (OSError, ssl.SSLError, ValueError) as exc:
                self._note(f"connect to {self.target.host}:{self.target.port} failed: {exc}")
                return False
            deadline = time.monotonic() + 10.0
            while self._connack is None:
                rc = client.loop(0.05)
                if self._connack is None and (rc != mqtt.MQTT_ERR_SUCCESS or self._stop.is_set() or time.monotonic() > deadline):
                    self._note(f"no CONNACK ({mqtt.error_string(rc)})")
                    return False
            ok, why, session_present = self._connack
            if not ok:
                self._note(f"broker refused the connection: {why}")
                return False
            self.counters["connects"] += 1
            # Subscribe on every connect: harmless when the session kept it, necessary when the broker lost it.
            client.subscribe(self.topic, qos=1)
            log.info("collector connected (session present: %s), subscribing to %s", session_present, self.topic)
            while True:
                idle = 0.05 if not self._batch else 0.005
                received = self.counters["received"]
                rc = client.loop(idle)
                # Drain what is already readable before committing: one fsync for the whole burst.
                while rc == mqtt.MQTT_ERR_SUCCESS and self.counters["received"] != received and len(self._batch) < self.batch_max:
                    received = self.counters["received"]
                    rc = client.loop(0.0)
                if self._suback is not None and not self.subscribed.is_set():
                    if all(not r.is_failure for r in self._suback):
                        self.subscribed.set()
                    else:
                        self._note(f"subscription to {self.topic} refused: {self._suback}")
                        return True
                self._commit_batch(client if rc == mqtt.MQTT_ERR_SUCCESS else None)
                if rc != mqtt.MQTT_ERR_SUCCESS:
                    self._note(f"link lost ({mqtt.error_string(rc)})")
                    return True
                if self._stop.is_set() or (end is not None and time.monotonic() >= end):
                    client.disconnect()
                    client.loop(0.01)
                    return True
        finally:
            self.subscribed.clear()
            self._commit_batch(None)
            try:
                client._reset_sockets()
            except Exception:  # noqa: BLE001 - private API: best effort only
                pass

    def _commit_batch(self, client) -> None:
        """Store, then acknowledge. Without a live client the findings are still stored; the broker will send
        them again (unacknowledged) and they count as duplicates."""
        if not self._batch:
            return
        batch, self._batch = self._batch, []
        accepted: list[tuple[str, str]] = []
        stored, dups, rejected = self.store.store([(m.topic, m.payload) for m in batch], accepted)
        self.counters["stored"] += stored
        self.counters["duplicates"] += dups
        self.counters["rejected"] += rejected
        if client is not None:
            if self.receipts:
                self._send_receipts(client, accepted)
            for m in batch:
                client.ack(m.mid, m.qos)

    def _send_receipts(self, client, accepted: list[tuple[str, str]]) -> None:
        """One QoS 1 receipt per device in the batch, after its commit (what it names is in the database)."""
        by_topic: dict[str, list[str]] = {}
        for topic, finding_id in accepted:
            target = receipt_topic(topic)
            if target is not None:
                by_topic.setdefault(target, []).append(finding_id)
        for target, ids in by_topic.items():
            parts = target.split("/")
            body = {"device_id": parts[-2], "site": parts[-3], "finding_ids": ids}
            client.publish(target, json.dumps(body, separators=(",", ":")), qos=1)
            self.counters["receipts_sent"] += 1
            self.counters["receipted"] += len(ids)

    def _note(self, why: str) -> None:
        if why != self.last_error:
            log.warning("collector: %s", why)
        self.last_error = why

    # ------------------------------------------------------------ paho callbacks
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connack = (not reason_code.is_failure, str(reason_code), bool(getattr(flags, "session_present", False)))

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        self._suback = list(reason_codes)

    def _on_message(self, client, userdata, message) -> None:
        self.counters["received"] += 1
        self._batch.append(message)


# ---------------------------------------------------------------- CLI
def add_parser(sub) -> None:
    """The `collect` subcommand (wired from cli.build_parser)."""
    p = sub.add_parser("collect", help="subscribe to findings on a broker and store them idempotently (hub side)")
    p.add_argument("--broker", required=True, metavar="URL", help="mqtts://host:8883 (mqtt:// only to loopback "
                                                                  "unless --allow-insecure)")
    p.add_argument("--db", required=True, metavar="PATH", help="SQLite file the findings are stored in")
    p.add_argument("--topic", default=DEFAULT_TOPIC, help=f"subscription (default {DEFAULT_TOPIC}); several "
                                                          "collectors: $share/collectors/" + DEFAULT_TOPIC)
    p.add_argument("--client-id", default="", help="stable id: the broker keeps the session under it "
                                                   "(default edge-collector-<hostname>)")
    p.add_argument("--protocol", choices=["5", "3.1.1"], default="5")
    p.add_argument("--session-expiry", type=int, default=7 * 24 * 3600, metavar="S",
                   help="MQTT 5: how long the broker queues findings while this collector is away (default 7 days)")
    p.add_argument("--ca-file", default="")
    p.add_argument("--cert-file", default="", help="client certificate for mutual TLS")
    p.add_argument("--key-file", default="")
    p.add_argument("--username", default="")
    p.add_argument("--password-file", default="", help="file holding the password (not on the command line)")
    p.add_argument("--allow-insecure", action="store_true", help="allow plaintext mqtt:// to a non-loopback broker")
    p.add_argument("--no-receipts", action="store_true", help="do not publish receipts to the devices (then set "
                                                              "mqtt.require_receipts = false on them)")
    p.add_argument("--max-seconds", type=float, default=None, help="stop after this long (tests)")
    p.set_defaults(func=cmd_collect)


def cmd_collect(args: argparse.Namespace, config=None) -> int:
    password = None
    if args.password_file:
        try:
            password = Path(args.password_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError("collect", f"--password-file {args.password_file!r}: {exc.strerror}") from None
    collector = Collector(args.broker, args.db, topic=args.topic, client_id=args.client_id, protocol=args.protocol,
                          session_expiry_s=args.session_expiry, ca_file=args.ca_file, cert_file=args.cert_file,
                          key_file=args.key_file, username=args.username, password=password,
                          allow_insecure=args.allow_insecure, receipts=not args.no_receipts)
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, lambda *_: collector._stop.set())
    try:
        collector.run(max_seconds=args.max_seconds)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        counts = collector.store.counts()
        collector.store.close()
    print(json.dumps({"db": str(args.db), **counts, "connects": collector.counters["connects"]}), flush=True)
    return 0
