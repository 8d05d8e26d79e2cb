"""The uplink: MQTT store-and-forward from the outbox, on its own thread, never on the inference path.

One thread owns everything network-side: it connects (with exponential backoff and jitter), then loops
`client.loop()` and keeps a bounded window of QoS 1 publishes in flight, read from the outbox in priority order
(urgent first, then seq). A row is marked delivered only when its PUBACK arrives (MQTT 5: with a success reason
code; "no matching subscribers" leaves it pending when `require_subscriber` is set, because a finding nobody
was subscribed to is a lost finding). When the link drops, whatever was in flight stays pending in the outbox
and is sent again after the reconnect with the same finding_id: consumers deduplicate by finding_id.

Each connection uses a fresh paho client, so paho's own in-memory resend queue is never involved: the outbox
is the one place unacknowledged findings live. The broker keeps the session (clean_start = False with a
session expiry on MQTT 5, clean_session = False on 3.1.1).

A PUBACK means the broker has the finding, not that a collector does. When a CONNACK says the broker holds no
session for this device (a broker restarted without persistence, or a session that expired), whatever that
broker acknowledged but had not yet passed on may be gone, so findings delivered in the
`resend_on_session_loss_s` seconds before the last delivery are made pending again and re-sent: duplicates, which
consumers drop by finding_id, instead of a silent loss. A re-send that fails (an outbox error) is retried every
second until it succeeds, since the next CONNACK will report the new session as present. With a session expiry
of 0 (asked for, or granted by the broker) no session is ever present, so nothing is re-sent.

A PUBACK is still not the end (a broker crash loses what arrived since its last persistence snapshot, and the
CONNACK after it may well say the session is present). With `require_receipts` (the default) the uplink subscribes
to `.../receipts`, where a collector names the finding_ids it has committed; those rows become stored and only
then may be pruned. A sent row without a receipt is published again (same finding_id) at every new connection,
once the receipts the broker queued for us have been read, and whenever it has waited `receipt_timeout_s`
(doubling per re-send, up to 32 times). Receipts for ids this outbox never sent, or naming another device, change
nothing and are counted; a malformed one is logged once per connection.

Short link windows: while findings are owed (pending, or without a receipt), the reconnect backoff is capped at
`reconnect_pending_max_s` (jittered: a fleet spreads out), and a change of the host's links, addresses or routes
(rtnetlink, where the OS has it) cuts the wait short. A connection on which publishes (or a keepalive ping) go
unanswered for `ack_timeout_s` is dropped and a new one made: a half-open link is noticed in about ten seconds,
not after 1.5 keepalives; the socket also gets TCP_USER_TIMEOUT and TCP keepalive. A connect never blocks longer
than `connect_timeout_s`. A clean stop keeps publishing what is pending for up to `drain_on_stop_s` while the link
is up.

Status: `<prefix>/<site>/<device>/status` is "online" (retained) after each connect and "offline" (retained)
as the last will and on a clean stop. Telemetry (outbox depth and uplink counters, no findings) goes to
`.../telemetry` with QoS 0.
"""
from __future__ import annotations

import json
import logging
import random
import select
import socket
import ssl
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

from edge_runtime.config import MqttSection
from edge_runtime.errors import ConfigError
from edge_runtime.findings import DeviceIdentity, utc_now
from edge_runtime.outbox import Outbox, OutboxError
# Shared with the hub (edge_hub); `from edge_runtime.uplink import backoff_delay` keeps working.
from edge_runtime.transport import backoff_delay, check_transport, parse_broker_url

log = logging.getLogger("edge_runtime.uplink")

NO_MATCHING_SUBSCRIBERS = 0x10
_TOPIC_FORBIDDEN = set("/+#\x00")
RECEIPT_GRACE_S = 2.0  # after a CONNACK: how long queued receipts may take to arrive before the re-send of the rest
NET_EVENT_JITTER_S = 0.5  # after a network change: reconnect within this, spread, not at the same instant
# rtnetlink multicast groups: links, IPv4/IPv6 addresses and routes
_RTMGRP = 0x1 | 0x10 | 0x40 | 0x100 | 0x400


def topic_base(prefix: str, identity: DeviceIdentity, where: str) -> str:
    for key, value in (("device.site", identity.site), ("device.id", identity.device_id)):
        if not value or set(value) & _TOPIC_FORBIDDEN:
            raise ConfigError(where, f"key '{key}' = {value!r} cannot be an MQTT topic level (no '/', '+', '#', empty)")
    return f"{prefix.rstrip('/')}/{identity.site}/{identity.device_id}"


class NetworkWatch:
    """Tells a waiting uplink that the host's network changed (a link, an address or a route), so it can try at
    once instead of sleeping out its backoff. Linux rtnetlink; elsewhere (or when the socket is refused) it never
    fires and the backoff alone applies."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)  # type: ignore[attr-defined]
            sock.bind((0, _RTMGRP))
            sock.setblocking(False)
            self._sock = sock
        except (AttributeError, OSError):
            pass

    @property
    def available(self) -> bool:
        return self._sock is not None

    def wait(self, timeout: float) -> bool:
        """Sleep up to `timeout`; True as soon as a change arrives (every queued notice is consumed)."""
        if self._sock is None:
            time.sleep(timeout)
            return False
        try:
            ready, _, _ = select.select([self._sock], [], [], max(0.0, timeout))
        except (OSError, ValueError):
            return False
        if not ready:
            return False
        while True:
            try:
                if not self._sock.recv(65536):
                    break
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # ENOBUFS: notices overflowed, which is a change too
                break
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class Uplink:
    def __init__(self, outbox: Outbox, mqtt: MqttSection, identity: DeviceIdentity, *, where: str = "configuration") -> None:
        self.outbox = outbox
        self.cfg = mqtt
        self.identity = identity
        self.target = parse_broker_url(mqtt.broker, where)
        check_transport(self.target, mqtt.allow_insecure, where,
                        {"mqtt.ca_file": mqtt.ca_file, "mqtt.cert_file": mqtt.cert_file, "mqtt.key_file": mqtt.key_file})
        if mqtt.password and mqtt.password_file:
            raise ConfigError(where, "set mqtt.password or mqtt.password_file, not both")
        self.password = mqtt.password or None
        if mqtt.password_file:
            try:
                self.password = Path(mqtt.password_file).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(where, f"key 'mqtt.password_file': cannot read {mqtt.password_file!r} ({exc.strerror})") from None
        if mqtt.inflight < 1:
            raise ConfigError(where, f"key 'mqtt.inflight' must be at least 1; got {mqtt.inflight}")
        if mqtt.rate_limit < 0 or mqtt.reconnect_min_s <= 0 or mqtt.reconnect_max_s < mqtt.reconnect_min_s:
            raise ConfigError(where, "keys 'mqtt.rate_limit' >= 0 and 0 < 'mqtt.reconnect_min_s' <= 'mqtt.reconnect_max_s' required")
        if mqtt.resend_on_session_loss_s < 0:
            raise ConfigError(where, "key 'mqtt.resend_on_session_loss_s' must be >= 0 (0 = off); "
                                     f"got {mqtt.resend_on_session_loss_s}")
        for key in ("receipt_timeout_s", "reconnect_pending_max_s", "ack_timeout_s"):
            if getattr(mqtt, key) <= 0:
                raise ConfigError(where, f"key 'mqtt.{key}' must be > 0; got {getattr(mqtt, key)}")
        if mqtt.drain_on_stop_s < 0:
            raise ConfigError(where, "key 'mqtt.drain_on_stop_s' must be >= 0 (0 = no drain); "
                                     f"got {mqtt.drain_on_stop_s}")
        base = topic_base(mqtt.topic_prefix, identity, where)
        self.topic_findings = f"{base}/findings"
        self.topic_feedback = f"{base}/feedback"  # clinicians' confirm / correct, outbox rows with seq < 0
        self.topic_status = f"{base}/status"
        self.topic_telemetry = f"{base}/telemetry"
        self.topic_receipts = f"{base}/receipts"
        self.client_id = mqtt.client_id or f"edge-{identity.device_id}"
        self.v5 = mqtt.protocol == "5"
        self._stop = threading.Event()
        self._stop_deadline = 0.0
        self._drain_deadline = 0.0
        self._drain_published = False
        self._thread: threading.Thread | None = None
        self._rng = random.Random()
        # Link state and counters (written by the uplink thread only; read anywhere).
        self.state = "idle"  # idle | connecting | connected | backoff | stopped
        self.connected = False
        self.window = mqtt.inflight
        self.counters = {"published": 0, "acked": 0, "resent": 0, "rejected": 0, "unrouted": 0, "connects": 0,
                         "disconnects": 0, "connect_failures": 0, "errors": 0, "new_sessions": 0, "requeued": 0,
                         "receipts": 0, "stored": 0, "receipt_unknown": 0, "receipt_foreign": 0,
                         "receipt_malformed": 0, "receipt_resent": 0, "half_open": 0, "net_events": 0}
        self.last_error = ""
        self.beat = time.monotonic()
        self.alarms: Callable[[], list[dict]] | None = None  # set by the service: active alarms for telemetry
        self.live: Callable[[], dict] | None = None  # set by the service: live streams' per-minute summaries
        # Per-connection state.
        self._inflight: dict[int, int] = {}  # mid -> seq
        self.last_acked_at: float | None = None  # wall clock of the last PUBACK marked (what the view shows)
        self.last_stored_at: float | None = None  # ... and of the last receipt that stored something
        self._acked: list[int] = []
        self._rejected: list[int] = []
        self._connack: tuple[bool, str] | None = None
        self._session_present = False
        self._session_kept = True  # False when the session expiry in force is 0: no session to lose
        self._requeue_owed = False  # a lost session's re-send that has not succeeded yet
        self._requeue_tried = 0.0
        self._warned_no_session = False
        self._hold_until = 0.0
        self._hold_attempt = 0
        self._seen_commits = -1
        self._last_poll = 0.0
        self._ack_wait_since = 0.0  # since when the oldest unanswered publish has waited (reset by each PUBACK)
        self._receipt_ids: list[str] = []
        self._subacked = False
        self._connected_at = 0.0
        self._connected_wall = 0.0  # the outbox clock at CONNACK: rows acknowledged before it are in doubt
        self._connect_resend_due = False  # this connection's re-send of sent rows without a receipt
        self._next_receipt_sweep = 0.0
        self._malformed_logged = False
        self._net: NetworkWatch | None = None
        # Hooks for other device features (model bundles): topics subscribed at QoS 1 on every connection, each
        # with a handler called on this thread inside paho's loop (it must be quick; the PUBACK follows its
        # return, so a handler that stores the message durably loses nothing), and messages to publish.
        self.subscriptions: dict[str, Callable[[bytes], None]] = {}
        self._posts: deque[tuple[str, bytes, bool]] = deque(maxlen=256)
        self._retained: dict[str, bytes] = {}  # last retained post per topic, published again after each connect
        self._receipt_mid: int | None = None

    @classmethod
    def from_config(cls, outbox: Outbox, config, identity: DeviceIdentity) -> "Uplink | None":
        """None when no broker is configured: findings then stay in the outbox until one is."""
        if not config.mqtt.broker:
            log.warning("no [mqtt] broker configured: findings are kept in the outbox only")
            return None
        return cls(outbox, config.mqtt, identity, where=config.source_path or "configuration")

    def subscribe(self, topic: str, handler: Callable[[bytes], None]) -> None:
        """Receive `topic` (QoS 1) from the next connection on; call before start()."""
        self.subscriptions[topic] = handler

    def post(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """Publish (QoS 1) from any thread, when the link is up; a retained one is repeated after each connect."""
        if retain:
            self._retained[topic] = payload
        self._posts.append((topic, payload, retain))

    # ------------------------------------------------------------ lifecycle
    def start(self) -> "Uplink":
        """Returns at once: connecting and draining a backlog happen on the uplink thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="uplink", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> bool:
        """While the link is up, keep publishing what is pending for up to `mqtt.drain_on_stop_s` (within
        `timeout`); then stop publishing, give in-flight messages the rest of `timeout` for their PUBACK, publish
        "offline", disconnect. Returns True if the thread finished in time. Unacknowledged rows stay pending."""
        now = time.monotonic()
        self._stop_deadline = now + max(0.0, timeout - 0.2)
        self._drain_deadline = min(now + self.cfg.drain_on_stop_s, self._stop_deadline - 0.5)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def alive(self) -> bool:
        """The thread runs and its loop moved recently (a blocking connect is bounded by connect_timeout_s)."""
        stale_after = max(60.0, 3 * self.cfg.connect_timeout_s)
        return self._thread is not None and self._thread.is_alive() and time.monotonic() - self.beat < stale_after

    def stats(self) -> dict[str, Any]:
        return {"state": self.state, "connected": self.connected, "inflight": len(self._inflight),
                "window": self.window, "reconnects": max(0, self.counters["connects"] - 1),
                "last_error": self.last_error, **self.counters}

    # ------------------------------------------------------------ thread
    def _run(self) -> None:
        attempt = 0
        self._net = NetworkWatch()
        try:
            while not self._stop.is_set():
                self.state = "connecting"
                try:
                    if self._session():
                        attempt = 0
                except Exception as exc:  # noqa: BLE001 - a bug must not end delivery: log, back off, reconnect
                    self.counters["errors"] += 1
                    self.last_error = f"internal error {type(exc).__name__}: {exc}"
                    log.exception("uplink session failed")
                if self._stop.is_set():
                    break
                self.state = "backoff"
                delay = backoff_delay(attempt, self.cfg.reconnect_min_s, self._backoff_cap(), self._rng)
                attempt += 1
                self._wait(delay)
        finally:
            self.state = "stopped"
            self.connected = False
            self._net.close()

    def _owed(self) -> int:
        """Findings this uplink still has to move: pending, and sent without a receipt when receipts count."""
        try:
            return self.outbox.depth() + (self.outbox.sent_unstored() if self.cfg.require_receipts else 0)
        except OutboxError:
            return 1  # cannot tell: assume there is work rather than sleep for a minute

    def _backoff_cap(self) -> float:
        """Short while something is owed, so a link window of a few seconds is used; long when idle."""
        if self._owed():
            return max(self.cfg.reconnect_min_s, min(self.cfg.reconnect_max_s, self.cfg.reconnect_pending_max_s))
        return self.cfg.reconnect_max_s

    def _wait(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self._stop.is_set():
            self.beat = time.monotonic()
            left = end - time.monotonic()
            if left <= 0:
                return
            if self._net is not None and self._net.available:
                if self._net.wait(min(left, 0.2)) and self._owed():
                    # The host's network changed: the link may be back. Try soon, at a spread-out instant.
                    self.counters["net_events"] += 1
                    end = min(end, time.monotonic() + self._rng.random() * NET_EVENT_JITTER_S)
            else:
                self._stop.wait(min(left, 1.0))

    def _make_client(self):
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        kwargs: dict[str, Any] = {"callback_api_version": CallbackAPIVersion.VERSION2, "client_id": self.client_id,
                                  "protocol": mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311}
        if not self.v5:
            kwargs["clean_session"] = False
        client = mqtt.Client(**kwargs)
        client.connect_timeout = self.cfg.connect_timeout_s
        client.max_inflight_messages_set(0)  # no paho queue: our window bounds what is in flight
        client.max_queued_messages_set(0)
        if self.target.tls:
            client.tls_set(ca_certs=self.cfg.ca_file or None, certfile=self.cfg.cert_file or None,
                           keyfile=self.cfg.key_file or None, cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        if self.cfg.username:
            client.username_pw_set(self.cfg.username, self.password)
        client.will_set(self.topic_status, "offline", qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    def _tune_socket(self, client) -> None:
        """Let the kernel notice a dead peer too: unacknowledged data for ack_timeout_s ends the connection
        (TCP_USER_TIMEOUT), and an idle connection is probed (TCP keepalive, after the MQTT keepalive would
        have sent a ping anyway, so it costs nothing on a busy link). Best effort: not every OS has these."""
        sock = client.socket()
        if sock is None:
            return
        options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
        for name, value in (("TCP_KEEPIDLE", max(1, int(self.cfg.keepalive_s))), ("TCP_KEEPINTVL", 3),
                            ("TCP_KEEPCNT", 3), ("TCP_USER_TIMEOUT", max(1, int(self.cfg.ack_timeout_s * 1000)))):
            if hasattr(socket, name):
                options.append((socket.IPPROTO_TCP, getattr(socket, name), value))
        for level, option, value in options:
            try:
                sock.setsockopt(level, option, value)
            except OSError:
                pass

    def _session(self) -> bool:
        """One connection: connect, publish until the link drops or stop. True if CONNACK was a success."""
        import paho.mqtt.client as mqtt

        self._inflight.clear()
        self._acked.clear()
        self._rejected.clear()
        self._receipt_ids.clear()
        self._connack = None
        self._subacked = False
        self._malformed_logged = False
        client = self._make_client()
        # One budget for the whole attempt (TCP, TLS, CONNACK): a stalled link costs connect_timeout_s, not twice it.
        deadline = time.monotonic() + self.cfg.connect_timeout_s
        try:
            try:
                if self.v5:
                    from paho.mqtt.packettypes import PacketTypes
                    from paho.mqtt.properties import Properties

                    props = Properties(PacketTypes.CONNECT)
                    props.SessionExpiryInterval = self.cfg.session_expiry_s
                    client.connect(self.target.host, self.target.port, self.cfg.keepalive_s, clean_start=False, properties=props)
                else:
                    client.connect(self.target.host, self.target.port, self.cfg.keepalive_s)
            except (OSError, ssl.SSLError, ValueError) as exc:
                self._failed(f"connect to {self.target.host}:{self.target.port} failed: {exc}")
                return False
            self._tune_socket(client)
            while self._connack is None:
                self.beat = time.monotonic()
                rc = client.loop(0.05)
                if rc != mqtt.MQTT_ERR_SUCCESS and self._connack is None:
                    self._failed(f"connection lost before CONNACK ({mqtt.error_string(rc)})")
                    return False
                if self._stop.is_set() or time.monotonic() > deadline:
                    if not self._stop.is_set():
                        self._failed("no CONNACK within connect_timeout_s")
                    return False
            ok, why = self._connack
            if not ok:
                self._failed(f"broker refused the connection: {why}")
                return False
            self.counters["connects"] += 1
            self.connected = True
            self.state = "connected"
            self.last_error = ""
            log.info("uplink connected to %s:%d (window %d)", self.target.host, self.target.port, self.window)
            if not self._session_present:
                self.counters["new_sessions"] += 1
                # With receipts, the re-send below covers a lost session too (and more precisely).
                self._requeue_owed = not self.cfg.require_receipts
            if self._requeue_owed:
                self._requeue_recent()
            for topic in self.subscriptions:  # every connect, as the receipts: a lost session lost them too
                client.subscribe(topic, qos=1)
            self._posts.extend((t, p, True) for t, p in list(self._retained.items()))
            if self.cfg.require_receipts:
                self._receipt_mid = client.subscribe(self.topic_receipts, qos=1)[1]
                self._connected_at = time.monotonic()
                self._connected_wall = self.outbox.clock()
                self._connect_resend_due = True
            client.publish(self.topic_status, "online", qos=1, retain=True)
            self._pump(client)
            return True
        finally:
            self._end_session(client)

    def _requeue_recent(self) -> None:
        """The broker held no session for this device: re-send what it acknowledged recently (see the module doc).
        Owed until it succeeds: the broker now keeps a session, so the next CONNACK would not ask for it again."""
        window = self.cfg.resend_on_session_loss_s
        self._requeue_tried = time.monotonic()
        if window <= 0:
            self._requeue_owed = False
            return
        if not self._session_kept:
            self._requeue_owed = False
            # Every connect starts without a session, so a missing one says nothing about a broker restart;
            # re-sending 10 minutes of findings at each reconnect of a flapping link would flood it.
            if not self._warned_no_session:
                self._warned_no_session = True
                log.warning("uplink: no session is kept for this device (session expiry 0): findings a broker "
                            "restarted without persistence had queued cannot be noticed and re-sent")
            return
        try:
            n = self.outbox.requeue_delivered(window)
        except OutboxError as exc:
            log.error("uplink: %s; the re-send after the lost session is tried again in a second", exc)
            return
        self._requeue_owed = False
        if n:
            self.counters["requeued"] += n
            log.warning("uplink: the broker held no session for this device (restarted without persistence, or the "
                        "session expired); re-sending the %d findings delivered in the last %.0f s before the link "
                        "went down", n, window)

    def _failed(self, why: str) -> None:
        self.counters["connect_failures"] += 1
        if why != self.last_error:
            log.warning("uplink: %s", why)
        self.last_error = why

    def _pump(self, client) -> None:
        import paho.mqtt.client as mqtt

        next_telemetry = time.monotonic() + (self.cfg.telemetry_interval_s or 0)
        tokens, last_refill = float(self.window), time.monotonic()
        while True:
            now = time.monotonic()
            self.beat = now
            if self._stop.is_set() and not self._draining(now):
                self._drain_and_leave(client)
                return
            if self._requeue_owed and now - self._requeue_tried >= 1.0:
                self._requeue_recent()
            if self.cfg.require_receipts:
                self._receipt_upkeep(now)
            acks_overdue = bool(self._inflight) and now - self._ack_wait_since > self.cfg.ack_timeout_s
            if acks_overdue or self._ping_unanswered(client, now):
                self.counters["half_open"] += 1
                self._lost(f"no answer from the broker for {self.cfg.ack_timeout_s:.0f} s (half-open link)")
                return
            # Fill the window (urgent first, then seq), within the rate cap and outside a hold.
            timeout = 0.05
            if self.cfg.rate_limit:
                tokens = min(float(self.window), tokens + (now - last_refill) * self.cfg.rate_limit)
                last_refill = now
            free = self.window - len(self._inflight)
            if self.cfg.rate_limit:
                free = min(free, int(tokens))
                if free <= 0:
                    timeout = min(timeout, max(0.001, (1.0 - tokens) / self.cfg.rate_limit))
            if free > 0 and now >= self._hold_until and self._outbox_may_have_more(now):
                rows = self.outbox.next_batch(free, exclude=self._inflight.values())
                for row in rows:
                    topic = self.topic_feedback if row.kind == "feedback" else self.topic_findings
                    info = client.publish(topic, row.payload, qos=1)
                    if info.rc != mqtt.MQTT_ERR_SUCCESS:
                        break  # link gone: loop() below notices
                    if not self._inflight:
                        self._ack_wait_since = time.monotonic()
                    self._inflight[info.mid] = row.seq
                    if self._stop.is_set():
                        self._drain_published = True
                    self.counters["published"] += 1
                    if row.attempts:
                        self.counters["resent"] += 1
                    if self.cfg.rate_limit:
                        tokens -= 1
            elif now < self._hold_until:
                timeout = min(timeout, self._hold_until - now)
            while self._posts:
                topic, payload, retain = self._posts.popleft()
                client.publish(topic, payload, qos=1, retain=retain)
            rc = client.loop(timeout)
            self._flush_acks()
            if rc != mqtt.MQTT_ERR_SUCCESS:
                self._lost(f"link lost ({mqtt.error_string(rc)})")
                return
            if self.cfg.telemetry_interval_s and time.monotonic() >= next_telemetry:
                next_telemetry = time.monotonic() + self.cfg.telemetry_interval_s
                self._publish_telemetry(client)

    def _draining(self, now: float) -> bool:
        """Stopping with the link up: keep going while pending findings, PUBACKs or (for what this drain sent)
        receipts are outstanding, until drain_on_stop_s is used up."""
        if now >= self._drain_deadline:
            return False
        try:
            if self._inflight or self.outbox.depth():
                return True
            return self.cfg.require_receipts and self._drain_published and self.outbox.sent_unstored() > 0
        except OutboxError:
            return False

    def _ping_unanswered(self, client, now: float) -> bool:
        """paho's keepalive ping has waited longer than ack_timeout_s for its PINGRESP (paho itself would wait a
        whole keepalive). Reads paho's private ping timestamp (monotonic): best effort, False if it moves."""
        ping_t = getattr(client, "_ping_t", 0)
        return isinstance(ping_t, (int, float)) and ping_t > 0 and now - ping_t > self.cfg.ack_timeout_s

    def _receipt_upkeep(self, now: float) -> None:
        """Re-send sent rows without a receipt: all of them once per connection (after the receipts the broker
        queued for us have arrived), then those past receipt_timeout_s, checked every second."""
        if self._connect_resend_due:
            if not self._subacked and now - self._connected_at < RECEIPT_GRACE_S:
                return
            self._flush_acks()
            try:
                n = self.outbox.requeue_unstored(None, sent_before=self._connected_wall)
            except OutboxError as exc:
                log.error("uplink: %s; tried again in a second", exc)
                self._connected_at = now - RECEIPT_GRACE_S + 1.0
                self._subacked = False
                return
            self._connect_resend_due = False
            self._next_receipt_sweep = now + 1.0
            if n:
                self.counters["receipt_resent"] += n
                log.info("uplink: re-sending %d finding(s) the hub has not confirmed (new connection)", n)
        elif now >= self._next_receipt_sweep:
            self._next_receipt_sweep = now + 1.0
            try:
                n = self.outbox.requeue_unstored(self.cfg.receipt_timeout_s)
            except OutboxError as exc:
                log.error("uplink: %s", exc)
                return
            if n:
                self.counters["receipt_resent"] += n
                log.warning("uplink: re-sending %d finding(s) without a hub receipt after %.0f s", n,
                            self.cfg.receipt_timeout_s)

    def _outbox_may_have_more(self, now: float) -> bool:
        """Skip the query when nothing changed since an empty read (re-read at least every second anyway)."""
        if self.outbox.commits != self._seen_commits or now - self._last_poll >= 1.0 or self._inflight:
            self._seen_commits = self.outbox.commits
            self._last_poll = now
            return True
        return False

    def _flush_acks(self) -> None:
        try:
            if self._acked:
                acked, self._acked = self._acked, []
                self.outbox.mark_delivered(acked)
                self.last_acked_at = time.time()
            if self._rejected:
                rejected, self._rejected = self._rejected, []
                self.outbox.record_attempts(rejected)
            if self._receipt_ids:  # after the PUBACKs: a receipt finds its row sent
                ids, self._receipt_ids = self._receipt_ids, []
                stored, unknown = self.outbox.mark_stored(ids)
                self.counters["stored"] += stored
                if stored:
                    self.last_stored_at = time.time()
                self.counters["receipt_unknown"] += unknown
        except OutboxError as exc:  # the rows stay pending (or sent) and are sent again: a duplicate, never a loss
            log.error("uplink: %s", exc)

    def _lost(self, why: str) -> None:
        self.counters["disconnects"] += 1
        self.last_error = why
        log.warning("uplink: %s; %d in flight will be re-sent", why, len(self._inflight))

    def _drain_and_leave(self, client) -> None:
        """Stopping: no new publishes; wait for in-flight PUBACKs until the deadline, then say offline."""
        import paho.mqtt.client as mqtt

        while self._inflight and time.monotonic() < self._stop_deadline:
            if client.loop(0.05) != mqtt.MQTT_ERR_SUCCESS:
                break
            self._flush_acks()
        self._flush_acks()
        info = client.publish(self.topic_status, "offline", qos=1, retain=True)
        end = min(self._stop_deadline, time.monotonic() + 1.0)
        while info.rc == mqtt.MQTT_ERR_SUCCESS and not info.is_published() and time.monotonic() < end:
            if client.loop(0.05) != mqtt.MQTT_ERR_SUCCESS:
                break
        client.disconnect()
        client.loop(0.01)

    def _end_session(self, client) -> None:
        self._flush_acks()
        if self._inflight:
            try:
                self.outbox.record_attempts(self._inflight.values())
            except OutboxError as exc:
                log.error("uplink: %s", exc)
            self._inflight.clear()
        self.connected = False
        try:
            client._reset_sockets()  # close the socket pair now rather than at garbage collection
        except Exception:  # noqa: BLE001 - private API: best effort only
            pass

    def _publish_telemetry(self, client) -> None:
        try:
            box = self.outbox.stats()
        except OutboxError:
            return
        body = {"device_id": self.identity.device_id, "site": self.identity.site, "at": utc_now(),
                "outbox": {k: box[k] for k in ("pending", "pending_bytes", "rows", "bytes", "evicted",
                                               "over_cap_alarms", "full_alarms", "sent_unstored", "stored")},
                "uplink": {k: v for k, v in self.stats().items() if k != "last_error"}}
        if self.alarms is not None:
            try:
                body["alarms"] = self.alarms()
            except Exception as exc:  # noqa: BLE001 - the service's hook must never stop the uplink thread
                log.error("uplink: reading the alarms for telemetry failed: %s", exc)
        if self.live is not None:
            try:
                body["live"] = self.live()
            except Exception as exc:  # noqa: BLE001 - same rule as the alarms
                log.error("uplink: reading the live summaries for telemetry failed: %s", exc)
        client.publish(self.topic_telemetry, json.dumps(body, separators=(",", ":")), qos=0)

    # ------------------------------------------------------------ paho callbacks (uplink thread, inside loop())
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        ok = not reason_code.is_failure
        self._session_present = bool(getattr(flags, "session_present", False))
        if self.v5:
            # The broker may grant a shorter session expiry than asked for (MQTT 5 CONNACK property).
            granted = getattr(properties, "SessionExpiryInterval", None) if properties is not None else None
            self._session_kept = (self.cfg.session_expiry_s if granted is None else int(granted)) > 0
        self._connack = (ok, str(reason_code))
        window = self.cfg.inflight
        receive_max = getattr(properties, "ReceiveMaximum", None) if ok and properties is not None else None
        if receive_max:
            # The broker disconnects a client that exceeds its Receive Maximum; keep one slot for the status message.
            window = min(window, max(1, int(receive_max) - 1))
        self.window = max(1, window)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        if mid != self._receipt_mid:
            if any(getattr(r, "is_failure", False) for r in reason_codes):
                log.warning("uplink: the broker refused a subscription (%s); allow it in the ACL", reason_codes)
            return
        self._subacked = True
        if any(getattr(r, "is_failure", False) for r in reason_codes):
            log.warning("uplink: the broker refused the receipts subscription %s (%s): findings are re-sent every "
                        "%.0f s and never pruned; allow it in the ACL or set mqtt.require_receipts = false",
                        self.topic_receipts, reason_codes, self.cfg.receipt_timeout_s)

    def _on_message(self, client, userdata, message) -> None:
        """A hub receipt: {"device_id", "site", "finding_ids": [...], "feedback_ids": [...]} (either list may be
        missing). Ids are collected here and marked stored in _flush_acks (outside paho's callback)."""
        handler = self.subscriptions.get(message.topic)
        if handler is not None:
            try:
                handler(message.payload)
            except Exception:  # noqa: BLE001 - a feature's bug must not end delivery
                log.exception("uplink: the handler for %s failed", message.topic)
            return
        if message.topic != self.topic_receipts:
            self.counters["receipt_foreign"] += 1
            return
        try:
            body = json.loads(message.payload)
            if not isinstance(body, dict) or not ("finding_ids" in body or "feedback_ids" in body):
                raise ValueError("a receipt names 'finding_ids' or 'feedback_ids'")
            ids = []
            for key in ("finding_ids", "feedback_ids"):  # feedback rows are outbox rows too, keyed by feedback_id
                part = body.get(key, [])
                if not isinstance(part, list) or not all(isinstance(i, str) for i in part):
                    raise ValueError(f"'{key}' must be a list of strings")
                ids += part
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            self.counters["receipt_malformed"] += 1
            if not self._malformed_logged:  # a broken hub would send one per batch: say it once per connection
                self._malformed_logged = True
                log.warning("uplink: %s: malformed receipt ignored (%s)", message.topic, exc)
            return
        if body.get("device_id", self.identity.device_id) != self.identity.device_id or \
                body.get("site", self.identity.site) != self.identity.site:
            self.counters["receipt_foreign"] += 1
            return
        self.counters["receipts"] += 1
        self._receipt_ids.extend(ids)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self._ack_wait_since = time.monotonic()
        seq = self._inflight.pop(mid, None)
        if seq is None:
            return  # status/telemetry, or a message from before a reconnect
        code = getattr(reason_code, "value", 0)
        if code == 0 or (code == NO_MATCHING_SUBSCRIBERS and not self.cfg.require_subscriber):
            self._acked.append(seq)
            self.counters["acked"] += 1
            self._hold_attempt = 0
            return
        # Not delivered: the row stays pending. Pause new publishes for a while instead of spinning.
        if code == NO_MATCHING_SUBSCRIBERS:
            self.counters["unrouted"] += 1
            why = "no subscriber for the findings topic (is a collector subscribed with a persistent session?)"
        else:
            self.counters["rejected"] += 1
            why = f"broker rejected a finding: {reason_code}"
        self._rejected.append(seq)
        if time.monotonic() >= self._hold_until:
            delay = backoff_delay(self._hold_attempt, self.cfg.reconnect_min_s, self.cfg.reconnect_max_s, self._rng)
            self._hold_attempt += 1
            self._hold_until = time.monotonic() + delay
            if why != self.last_error:
                log.warning("uplink: %s; holding for %.1f s", why, delay)
            self.last_error = why
