"""`edge-runtime collect`: the clinic or regional hub's subscriber that stores findings idempotently.

It subscribes with QoS 1 on a persistent session (so the broker queues findings while the collector is away)
to findings, clinicians' feedback and device status, and stores each finding keyed by finding_id (feedback by
feedback_id; the latest status per device) in a store (edge_hub.stores: a SQLite file, or PostgreSQL for a
fleet): a duplicate (the same finding sent again after a lost PUBACK) is counted, never stored twice. PUBACKs
are sent manually, only after the messages they acknowledge are committed, in batches: a crash of the collector
means a redelivery, not a loss. A database that goes away ends the MQTT connection without acknowledging the
batch (the broker keeps it for the session); the collector waits for the database with backoff, then
reconnects and gets it again.

After each batch is committed it publishes a **receipt** to every device in the batch,
`edge/v1/<site>/<device_id>/receipts` (QoS 1): `{"device_id", "site", "finding_ids": [...]}` (and
`"feedback_ids": [...]` when the batch held feedback), naming the findings it stored and the duplicates it already had (a re-send means the device is still waiting). The device marks those
rows stored and only then prunes them. The site and device come from the topic a finding arrived on (the one the
broker's ACL ties to the device), not from its payload. A receipt that is lost (the collector's link drops first)
costs a re-send and a duplicate, never a row.

Several collectors share the load with MQTT shared subscriptions (`--share collectors`, i.e.
"$share/collectors/edge/v1/+/+/findings" and the same for feedback and status): the broker hands each message to
one member of the group. Each member keeps its own client id and persistent session, so a member killed and
restarted gets back what it had not acknowledged. See docs/mqtt.md.
"""
from __future__ import annotations

import json
import logging
import random
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from edge_hub.messages import parse
from edge_hub.stores import StoreUnavailable, open_store
from edge_hub.stores.sqlite import SqliteStore
from edge_runtime.errors import ConfigError
from edge_runtime.transport import backoff_delay, check_transport, parse_broker_url

log = logging.getLogger("edge_hub.collector")

DEFAULT_TOPIC = "edge/v1/+/+/findings"
DEFAULT_TOPICS = (DEFAULT_TOPIC, "edge/v1/+/+/feedback", "edge/v1/+/+/status")
CollectorStore = SqliteStore  # the name tests and older code import


def receipt_topic(topic: str) -> str | None:
    """edge/v1/<site>/<device>/findings (or .../feedback) -> edge/v1/<site>/<device>/receipts; None for any
    other shape."""
    parts = topic.split("/")
    if len(parts) < 3 or parts[-1] not in ("findings", "feedback") or not parts[-2] or not parts[-3]:
        return None
    return "/".join(parts[:-1] + ["receipts"])


def shared(topics: Sequence[str], group: str) -> list[str]:
    """The same filters as members of the shared-subscription group `group`."""
    if not group or set(group) & set("/+#$"):
        raise ConfigError("collect", f"--share {group!r}: a group name is one topic level, without / + # $")
    return [f"$share/{group}/{t}" for t in topics]


class Collector:
    """Subscriber loop on its own thread (start/stop) or in the caller's (run)."""

    def __init__(
        self,
        broker_url: str,
        db_path: str | Path,
        *,
        topic: str | Sequence[str] = DEFAULT_TOPICS,
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
        on_commit: Callable[[list[tuple[Any, float]], float], None] | None = None,
    ) -> None:
        """`db_path`: a SQLite file path or a postgresql:// URL (edge_hub.stores.open_store). `on_commit`, when
        given, is called after each committed batch with its (message, arrival time) pairs and the commit time
        (time.time()); benchmarks measure broker-to-commit latency with it."""
        where = "collect"
        self.target = parse_broker_url(broker_url, where, key="--broker")
        check_transport(self.target, allow_insecure, where,
                        {"--ca-file": ca_file, "--cert-file": cert_file, "--key-file": key_file},
                        insecure_key="--allow-insecure", url_key="--broker")
        if protocol not in ("5", "3.1.1"):
            raise ConfigError(where, f"--protocol must be 5 or 3.1.1; got {protocol!r}")
        self.topics = [topic] if isinstance(topic, str) else list(topic)
        for t in self.topics:
            if t.startswith("$share/") and t.count("/") < 2:
                raise ConfigError(where, f"--topic {t!r}: a shared subscription is $share/<group>/<filter>")
        if not self.topics:
            raise ConfigError(where, "no --topic to subscribe to")
        self.topic = ", ".join(self.topics)
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
        self.on_commit = on_commit
        self.db_unavailable = threading.Event()  # set while the database cannot be reached
        # A database server is reached in run(), before each broker connection: one that is down at start is
        # waited for the same way as one that goes away later.
        self.store = open_store(str(db_path), where=where, name=self.client_id, connect=False)
        self.subscribed = threading.Event()
        self.counters = {"received": 0, "stored": 0, "duplicates": 0, "rejected": 0, "connects": 0,
                         "receipts_sent": 0, "receipted": 0, "feedback": 0, "feedback_duplicates": 0,
                         "statuses": 0, "db_failures": 0}
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
            if self._database_ready() and self._session(end):
                attempt = 0
            if self._stop.is_set() or (end is not None and time.monotonic() >= end):
                break
            delay = backoff_delay(attempt, *self.reconnect, rng)
            attempt += 1
            self._stop.wait(delay if end is None else max(0.0, min(delay, end - time.monotonic())))

    def _database_ready(self) -> bool:
        """Connected to the database (or it is a file): only then take messages off the broker."""
        try:
            self.store.ensure()
        except StoreUnavailable as exc:
            self.db_unavailable.set()
            self._note(f"{exc}; not taking messages (the broker keeps them), retrying with backoff")
            return False
        if self.db_unavailable.is_set():
            log.warning("collector: database %s is back; reconnecting to the broker", self.db_label)
            self.db_unavailable.clear()
        return True

    @property
    def db_label(self) -> str:
        from edge_hub.stores.postgres import redact

        return redact(str(getattr(self.store, "url", getattr(self.store, "path", ""))))

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
            client.subscribe([(t, 1) for t in self.topics])
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
                        log.info("collector %s subscribed to %s", self.client_id, self.topic)
                    else:
                        self._note(f"subscription to {self.topic} refused: {self._suback}")
                        return True
                if not self._commit_batch(client if rc == mqtt.MQTT_ERR_SUCCESS else None):
                    # Not acknowledged: leave, so the broker sends the batch again on the next connection.
                    client.disconnect()
                    client.loop(0.01)
                    return False
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

    def _commit_batch(self, client) -> bool:
        """Store, then acknowledge. Without a live client the messages are still stored; the broker will send
        them again (unacknowledged) and they count as duplicates. False when the database could not take the
        batch: nothing of it is acknowledged."""
        if not self._batch:
            return True
        batch, self._batch = self._batch, []
        if self.db_unavailable.is_set():
            return False  # already failed on this connection: the broker has these for the next one
        rows = [parse(m.topic, m.payload, arrived, bool(getattr(m, "retain", False))) for m, arrived in batch]
        try:
            result = self.store.write(rows)
        except StoreUnavailable as exc:
            self.counters["db_failures"] += 1
            self.db_unavailable.set()
            self._note(f"{exc}; {len(batch)} message(s) not acknowledged (the broker keeps them), "
                       "reconnecting with backoff")
            return False
        committed = time.time()
        for key in ("stored", "duplicates", "rejected", "feedback", "feedback_duplicates", "statuses"):
            self.counters[key] += getattr(result, key)
        if client is not None:
            if self.receipts:
                self._send_receipts(client, result.accepted)
            for m, _ in batch:
                client.ack(m.mid, m.qos)
        if self.on_commit is not None:
            self.on_commit(batch, committed)
        return True

    def _send_receipts(self, client, accepted: list[tuple[str, str, str]]) -> None:
        """One QoS 1 receipt per device in the batch, after its commit (what it names is in the database)."""
        by_topic: dict[str, dict[str, list[str]]] = {}
        for topic, kind, ident in accepted:
            target = receipt_topic(topic)
            if target is not None:
                key = "feedback_ids" if kind == "feedback" else "finding_ids"
                by_topic.setdefault(target, {"finding_ids": []}).setdefault(key, []).append(ident)
        for target, ids in by_topic.items():
            parts = target.split("/")
            body = {"device_id": parts[-2], "site": parts[-3], **ids}
            client.publish(target, json.dumps(body, separators=(",", ":")), qos=1)
            self.counters["receipts_sent"] += 1
            self.counters["receipted"] += sum(len(v) for v in ids.values())

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
        self._batch.append((message, time.time()))
