"""Real parts for the MQTT fault tests: a private Mosquitto per test, an in-test TCP proxy that can cut the
link, a producer child process that can be SIGKILLed, and helpers to wait on conditions without fixed sleeps.

Never the system broker on 1883: every Broker gets its own port, config file and persistence directory.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest

from edge_runtime.local_broker import find_mosquitto, free_port, port_open  # noqa: F401  (re-exported to tests)

MOSQUITTO = find_mosquitto()
REPO = Path(__file__).resolve().parent.parent
PRODUCER = Path(__file__).resolve().parent / "outbox_producer.py"

needs_mosquitto = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto binary not found (apt install mosquitto)")


def wait_until(condition: Callable[[], Any], timeout: float = 30.0, interval: float = 0.02, what: str = "condition") -> Any:
    """Poll until condition() is truthy; fail the test with `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class Broker:
    """A private mosquitto on a free loopback port. stop()/kill()/start() keep the port and the persistence dir."""

    def __init__(self, root: Path, persistence: bool = True, port: int | None = None, extra: str = "",
                 autosave_interval: int = 1) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.persistence = persistence
        self.data = self.root / "data"
        self.data.mkdir(exist_ok=True)
        self.conf = self.root / "mosquitto.conf"
        self.log = self.root / "mosquitto.log"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            f"persistence {'true' if persistence else 'false'}\n"
            f"persistence_location {self.data}/\n"
            f"autosave_interval {autosave_interval}\n"  # 60 as docs/mqtt.md recommends: a kill -9 loses the tail
            "max_queued_messages 0\n"  # 0 = unlimited: the default (1000) silently drops for an offline collector
            "max_inflight_messages 100\n"
            "set_tcp_nodelay true\n"
            "user root\n"  # tests run as root: do not switch to the mosquitto user (it cannot write tmp dirs)
            f"log_dest file {self.log}\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
            + extra  # e.g. a second (TLS) listener and its options
        )
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> "Broker":
        assert MOSQUITTO, "mosquitto not installed"
        assert self.proc is None or self.proc.poll() is not None, "broker already running"
        deadline = time.monotonic() + timeout
        while True:  # the old process may still hold the port for a moment after a restart
            self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            started = time.monotonic()
            while self.proc.poll() is None and time.monotonic() - started < timeout:
                if port_open(self.port):
                    return self
                time.sleep(0.02)
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.poll() is not None else ""
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            if time.monotonic() > deadline:
                raise RuntimeError(f"mosquitto did not start on port {self.port}: {err or self.log_tail()}")
            time.sleep(0.2)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM: a clean shutdown (mosquitto saves its persistence file)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close()

    def kill(self) -> None:
        """SIGKILL: a crash (whatever was not saved by autosave is gone)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._close()

    def restart(self) -> None:
        self.stop()
        self.start()

    def _close(self) -> None:
        if self.proc is not None and self.proc.stderr:
            self.proc.stderr.close()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


class TcpProxy:
    """client <-> proxy <-> broker, in test threads. cut() drops every open connection; refuse() makes new ones
    fail (accepted then closed at once); allow() lets them through again: a flapping link on demand.
    blackhole() silently drops whatever is sent either way (a radio link fading out): messages published
    meanwhile never reach the broker and their PUBACKs never come back."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.accepting = True
        self.blackholed = False
        self.dropped_bytes = 0
        self.cuts = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, name="tcp-proxy", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.accepting:
                _hard_close(client)
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=2.0)
                upstream.settimeout(None)
            except OSError:
                _hard_close(client)
                continue
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._pairs.append((client, upstream))
                self.connections += 1
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if self.blackholed:
                    self.dropped_bytes += len(data)
                    continue
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> int:
        """Drop every open connection now (both directions, RST). Returns how many were cut."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for a, b in pairs:
            _hard_close(a)
            _hard_close(b)
        if pairs:
            self.cuts += 1
        return len(pairs)

    def open_connections(self) -> int:
        with self._lock:
            return sum(1 for a, _ in self._pairs if a.fileno() != -1)

    def refuse(self) -> None:
        self.accepting = False

    def allow(self) -> None:
        self.accepting = True
        self.blackholed = False

    def blackhole(self) -> None:
        self.blackholed = True

    def close(self) -> None:
        self._closed = True
        self.refuse()
        try:
            self.listener.close()
        except OSError:
            pass
        self.cut()


def _hard_close(s: socket.socket) -> None:
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST, not FIN
    except OSError:
        pass
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass


# ---------------------------------------------------------------- findings and the producer child
def fake_finding(i: int, priority: str, device_id: str = "dev-1", site: str = "site-a") -> dict[str, Any]:
    """A finding shaped like build_finding's, without running a model (the uplink is the point here)."""
    return {
        "schema": 1,
        "finding_id": str(uuid.uuid4()),
        "seq": 0,
        "device_id": device_id,
        "site": site,
        "created_at": "2024-01-01T00:00:00.000Z",
        "source": {"kind": "test", "name": f"item-{i}"},
        "study": {"study_id": f"2.25.{i}", "series_id": "", "instance_id": "", "modality": "CR", "frame_index": 0},
        "model": {"name": "tiny-cls", "version": "0.0.1", "variant": "fp32", "sha256": "0" * 64, "precision": "fp32",
                  "engine": "onnxruntime", "device": "CPU", "compute_precision": "graph"},
        "task": "classification",
        "result": {"label": "bright" if priority == "urgent" else "normal", "probabilities": {"normal": 0.5, "bright": 0.5}},
        "priority": priority,
        "latency_ms": {"capture_to_result": 12.5, "preprocess": 1.0, "inference": 10.0, "postprocess": 1.5},
        "budget_ms": 1000.0,
        "budget_met": True,
    }


def priority_of(i: int, urgent_every: int) -> str:
    return "urgent" if urgent_every and i % urgent_every == urgent_every - 1 else "routine"


def mqtt_section(broker_url: str, **overrides):
    """An [mqtt] section tuned for tests: fast reconnects, no telemetry chatter."""
    from edge_runtime.config import MqttSection

    values = dict(broker=broker_url, reconnect_min_s=0.05, reconnect_max_s=0.5, connect_timeout_s=3.0,
                  keepalive_s=10, telemetry_interval_s=0.0)
    values.update(overrides)
    return MqttSection(**values)


class Producer:
    """tests/outbox_producer.py as a child process: commits findings item-0..item-(n-1) into an outbox file (one
    source_item each, so a restarted producer never commits an item twice) while its uplink publishes them."""

    def __init__(self, db: Path, broker_url: str, n: int, urgent_every: int = 5, pace_s: float = 0.0,
                 rate_limit: float = 0.0, device_id: str = "dev-kill") -> None:
        self.args = [sys.executable, str(PRODUCER), "--db", str(db), "--broker", broker_url, "--n", str(n),
                     "--urgent-every", str(urgent_every), "--pace", str(pace_s), "--rate-limit", str(rate_limit),
                     "--device-id", device_id]
        self.proc: subprocess.Popen | None = None
        self.lines: list[str] = []

    def start(self, exit_when_drained: bool = False) -> "Producer":
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        args = self.args + (["--exit-when-drained"] if exit_when_drained else [])
        self.lines = []
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()
        return self

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def committed(self) -> int:
        """Highest item index the child reported as committed (+1), from its stdout."""
        done = [int(x.split()[1]) for x in self.lines if x.startswith("committed ")]
        return max(done) + 1 if done else 0

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def output(self) -> str:
        return "\n".join(self.lines[-30:])


# ---------------------------------------------------------------- observers
class Capture:
    """A plain subscriber that records every (topic, payload, retain) it sees: status, telemetry, anything."""

    def __init__(self, port: int, topic: str = "edge/v1/#", client_id: str | None = None) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.messages: list[tuple[str, bytes, bool]] = []
        self._subscribed = threading.Event()
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                  client_id=client_id or f"capture-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self._subscribed.set()
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, m.payload, bool(m.retain)))
        self.client.connect("127.0.0.1", port, 30)
        self.client.loop_start()
        wait_until(self._subscribed.is_set, 10, what="capture subscription")

    def payloads(self, suffix: str = "") -> list[bytes]:
        return [p for t, p, _ in list(self.messages) if t.endswith(suffix)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def collected(db: Path) -> list[tuple[str, str, int]]:
    """(finding_id, priority, dups) from a collector database, in arrival order."""
    import sqlite3

    if not Path(db).exists():
        return []
    conn = sqlite3.connect(db, timeout=10)
    try:
        return conn.execute("SELECT finding_id, priority, dups FROM findings ORDER BY rx").fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()


def assert_delivered(produced: dict[str, str], received: list[tuple[str, str, int]], evicted: set[str] = frozenset()) -> None:
    """Zero lost (every produced, non-evicted id arrived), nothing unknown (every arrival, duplicates included,
    carries a produced finding_id), nothing evicted that was urgent."""
    got = {fid for fid, _, _ in received}
    lost = set(produced) - set(evicted) - got
    unknown = got - set(produced)
    assert not lost, f"{len(lost)} finding(s) lost, e.g. {sorted(lost)[:3]}"
    assert not unknown, f"{len(unknown)} unknown finding_id(s) received, e.g. {sorted(unknown)[:3]}"
    assert not {f for f in evicted if produced.get(f) == "urgent"}, "an urgent finding was evicted"


# ---------------------------------------------------------------- TLS material
def make_pki(root: Path) -> dict[str, Path]:
    """A throw-away CA, a server certificate for localhost/127.0.0.1 and a client certificate (EC P-256)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    root.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key, path: Path) -> Path:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        return path

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("edge-test-ca")).issuer_name(name("edge-test-ca"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    out = {"ca": root / "ca.pem"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for role, cn, usage in (("server", "localhost", ExtendedKeyUsageOID.SERVER_AUTH),
                            ("client", "dev-tls", ExtendedKeyUsageOID.CLIENT_AUTH)):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
        if role == "server":
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        out[f"{role}_cert"] = root / f"{role}.pem"
        out[f"{role}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out[f"{role}_key"] = write_key(key, root / f"{role}.key")
    return out
