"""Uplink benchmark: drain a backlog of findings from the outbox to a private Mosquitto, then a live trickle.

A private Mosquitto runs on a free loopback port (`edge_runtime.local_broker.LocalBroker`: own config file,
`persistence false`, never the system broker on 1883). A consumer in its own process subscribes to the findings
topic with QoS 1 (so the uplink's MQTT 5 `require_subscriber` stays on, as shipped) and counts what arrives. The
outbox is filled with `--findings` real-shaped findings (`build_finding`, fetal-head sized, one in 20 urgent) in
batches, then the runtime's `Uplink` starts and drains it. Measured: findings/s over the whole drain (connect
included) and in steady state (10 % to 90 % delivered), the drain curve, publish-to-PUBACK latency in steady state,
then `--live-rate` findings/s committed one by one for `--live-s` (commit-to-PUBACK latency, what a finding waits
when the link is up). The Uplink is subclassed only to timestamp publishes and PUBACKs; its path is unchanged.
That first drain runs with `require_receipts = false` (the consumer sends none): PUBACK is the end.

With receipts (`--receipts-findings`, default the same backlog): the real collector (`Collector`, in its own
process, SQLite `synchronous=FULL`) stores the findings and sends receipts; measured: findings/s until the last one
is *stored* on the device (the end-to-end rate).

Link windows (`--windows`): the same collector behind an in-process TCP switch that cuts and restores the link.
The link first stays up for one window to measure its drain rate, then goes down for `--outage-s` (a long outage)
and comes back for `--window-s` at a time, with outages of `--gap-s` (random within) between windows. Measured per
window: link-up to first CONNACK, and findings stored in the window against what the measured rate allows. And a
fleet of `--fleet` devices whose link returns at the same instant, computed from the uplink's own backoff function
(`backoff_delay`, seeded RNG, refused attempts cost nothing) rather than spawned: when their first attempts fall.

    python -m benchmarks.uplink --findings 100000
    python -m benchmarks.uplink --quick            # every phase, small: under a minute
"""
from __future__ import annotations

import argparse
import json
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import BenchError, CpuMeter, child_env, child_main, latency_stats

TOPIC = "edge/v1/+/+/findings"


def timed_uplink_class():
    from edge_runtime.uplink import Uplink

    class TimedUplink(Uplink):
        """The runtime's Uplink, with a timestamp at each publish and at each PUBACK."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.sent_at: dict[int, float] = {}
            self.acks: list[tuple[float, float, int]] = []  # (PUBACK time, publish-to-PUBACK s, seq)
            self.connacks: list[float] = []

        def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
            super()._on_connect(client, userdata, flags, reason_code, properties)
            if not reason_code.is_failure:
                self.connacks.append(time.perf_counter())

        def _make_client(self):
            client = super()._make_client()
            publish = client.publish

            def timed_publish(topic, payload=None, qos=0, retain=False, properties=None):
                t = time.perf_counter()
                info = publish(topic, payload, qos, retain, properties)
                self.sent_at[info.mid] = t
                return info

            client.publish = timed_publish
            return client

        def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
            seq = self._inflight.get(mid)
            sent = self.sent_at.pop(mid, None)
            super()._on_publish(client, userdata, mid, reason_code, properties)
            if seq is not None and sent is not None:
                now = time.perf_counter()
                self.acks.append((now, now - sent, seq))

    return TimedUplink


def sample_finding(i: int) -> dict[str, Any]:
    """A finding as the daemon writes one for a fetal-head frame (contour included), via build_finding."""
    from edge_runtime.findings import DeviceIdentity, ModelRef, build_finding
    from edge_runtime.frames import Frame, StudyRef
    from edge_runtime.heads import HeadResult

    frame = Frame(np.zeros((1, 1), np.uint8), "phantom", "probe", captured_at=time.monotonic(),
                  study=StudyRef(modality="US", frame_index=i), timings_ms={"preprocess": 0.8, "inference": 7.0, "postprocess": 2.4})
    ref = ModelRef("fetal-head", "1.0.0", "int8-ov", "0" * 64, "int8", "openvino", "CPU", "f32")
    contour = [[400 + int(200 * np.cos(a)), 270 + int(160 * np.sin(a))] for a in np.linspace(0, 2 * np.pi, 33)]
    result = {"detected": True, "measurements": {"head_circumference_mm": 218.0, "gestational_age_weeks": 23.9},
              "ellipse": {"center_px": [400.0, 270.0], "axes_px": [400.0, 320.0], "angle_deg": 15.0}, "contour": contour}
    head = HeadResult("segmentation", result, "urgent" if i % 20 == 19 else "routine")
    return build_finding(identity=DeviceIdentity("bench", "bench"), seq=0, frame=frame, model=ref, head=head,
                         capture_to_result_ms=12.3, budget_ms=33.0)


def start_consumer(port: int, timeout: float = 15.0, db: Path | None = None) -> subprocess.Popen:
    """The plain counting subscriber, or with `db` the real collector (stores, sends receipts)."""
    mode = ["collect", "--db", str(db)] if db is not None else ["consume"]
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.uplink", *mode, "--port", str(port)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=child_env())
    ready = threading.Event()
    threading.Thread(target=lambda: (proc.stdout.readline(), ready.set()), daemon=True).start()
    if not ready.wait(timeout):
        proc.kill()
        raise BenchError(f"the MQTT consumer did not subscribe on 127.0.0.1:{port} within {timeout:.0f} s")
    return proc


def stop_consumer(proc: subprocess.Popen) -> dict[str, Any]:
    try:
        out, _ = proc.communicate("", timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return {}
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def wait_delivered(outbox, target: int, timeout: float, curve: list[list[float]] | None = None, t0: float = 0.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        delivered = outbox.stats()["delivered"]
        if curve is not None:
            curve.append([round(time.perf_counter() - t0, 3), delivered])
        if delivered >= target:
            return True
        time.sleep(0.05)
    return False


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from edge_runtime.config import MqttSection
    from edge_runtime.findings import DeviceIdentity, to_json
    from edge_runtime.local_broker import LocalBroker, find_mosquitto
    from edge_runtime.outbox import Outbox

    if find_mosquitto() is None:
        raise BenchError("mosquitto: binary not found (apt install mosquitto); the uplink benchmark needs a broker")
    with tempfile.TemporaryDirectory(prefix="edge-bench-uplink-") as tmp, LocalBroker(Path(tmp) / "broker") as broker:
        consumer = start_consumer(broker.port)
        try:
            with Outbox(Path(tmp) / "outbox.sqlite") as outbox:
                t = time.perf_counter()
                sizes = []
                for start in range(0, args.findings, 1000):
                    batch = [(sample_finding(i), None) for i in range(start, min(args.findings, start + 1000))]
                    outbox.commit_many(batch)
                    sizes.append(len(to_json(batch[0][0]).encode()))
                fill_s = time.perf_counter() - t
                mqtt = MqttSection(broker=broker.url, inflight=args.inflight, telemetry_interval_s=0.0,
                                   reconnect_min_s=0.2, reconnect_max_s=1.0, connect_timeout_s=5.0,
                                   require_receipts=False)
                uplink = timed_uplink_class()(outbox, mqtt, DeviceIdentity("bench", "bench"))
                curve: list[list[float]] = []
                cpu = CpuMeter()
                t0 = time.perf_counter()
                uplink.start()
                drained = wait_delivered(outbox, args.findings, args.timeout, curve, t0)
                cpu_percent = cpu.percent()
                acks = list(uplink.acks)
                live = live_phase(outbox, uplink, args) if drained else {}
                uplink.stop(5.0)
                stats = uplink.stats()
        finally:
            received = stop_consumer(consumer)
        receipts = receipts_phase(args, broker, Path(tmp)) if drained and args.receipts_findings else {}
    if not drained:
        raise BenchError(f"uplink: the {args.findings}-finding backlog did not drain within {args.timeout:.0f} s "
                         f"({curve[-1][1] if curve else 0} delivered)")
    return summarize_drain(args, acks, curve, fill_s, sizes, cpu_percent) | {
        "live": live, "consumer": received, "uplink_counters": {k: v for k, v in stats.items() if isinstance(v, (int, float))},
        "expected_at_consumer": args.findings + live.get("findings", 0),
        "require_subscriber": True, "broker": "private mosquitto on 127.0.0.1, persistence false",
        **receipts, "fleet": simulate_fleet(args.fleet, seed=21) if args.fleet else {},
    }


def summarize_drain(args, acks, curve, fill_s: float, sizes: list[int], cpu_percent: float) -> dict[str, Any]:
    n = len(acks)
    times = np.array([a[0] for a in acks]) - (acks[0][0] - acks[0][1]) if acks else np.array([])
    lo, hi = int(0.1 * n), max(int(0.9 * n) - 1, 0)
    steady = [a[1] * 1000.0 for a in acks[int(0.05 * n): int(0.95 * n)]] or [a[1] * 1000.0 for a in acks]
    drain_s = curve[-1][0] if curve else float("nan")
    step = max(1, len(curve) // 200)
    return {
        "findings": args.findings, "inflight_window": args.inflight, "payload_bytes_avg": float(np.mean(sizes)),
        "fill_s": fill_s, "fill_findings_per_s": args.findings / fill_s,
        "drain_s": drain_s, "findings_per_s": args.findings / drain_s,
        "steady_findings_per_s": (hi - lo) / (times[hi] - times[lo]) if n > 10 and times[hi] > times[lo] else None,
        "publish_to_puback_ms": latency_stats(steady), "cpu_percent": cpu_percent,
        "drain_curve": curve[::step] + ([curve[-1]] if curve and (len(curve) - 1) % step else []),
        "drain_curve_columns": ["t_s", "delivered"],
    }


def live_phase(outbox, uplink, args) -> dict[str, Any]:
    """Findings committed one at a time at `live_rate`/s while the link is up: commit-to-PUBACK latency."""
    if args.live_s <= 0 or args.live_rate <= 0:
        return {}
    committed: dict[int, float] = {}
    before = len(uplink.acks)
    base = outbox.stats()["delivered"]
    period = 1.0 / args.live_rate
    next_due = time.perf_counter()
    end = next_due + args.live_s
    i = args.findings
    while time.perf_counter() < end:
        time.sleep(max(0.0, next_due - time.perf_counter()))
        finding = sample_finding(i)
        t = time.perf_counter()
        committed[outbox.commit(finding)] = t  # from the hand-over to the outbox (its fsync included) to the PUBACK
        i += 1
        next_due += period
    wait_delivered(outbox, base + len(committed), 10.0)
    lat = [(t_ack - committed[seq]) * 1000.0 for t_ack, _, seq in uplink.acks[before:] if seq in committed]
    return {"findings": len(committed), "rate_per_s": args.live_rate, "seconds": args.live_s,
            "commit_to_puback_ms": latency_stats(lat) if lat else None}


# ------------------------------------------------------------------ receipts on: drain and link windows
def fill(outbox, n: int, start: int = 0) -> None:
    for first in range(start, start + n, 1000):
        outbox.commit_many([(sample_finding(i), None) for i in range(first, min(start + n, first + 1000))])


def wait_stored(outbox, target: int, timeout: float, curve: list[list[float]] | None = None, t0: float = 0.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stored = outbox.stats()["stored"]
        if curve is not None:
            curve.append([round(time.perf_counter() - t0, 3), stored])
        if stored >= target:
            return True
        time.sleep(0.05)
    return False


def receipts_phase(args: argparse.Namespace, broker, tmp: Path) -> dict[str, Any]:
    """The real collector stores and sends receipts: the backlog drain until everything is stored, then the link
    windows through a switch."""
    from edge_runtime.config import MqttSection
    from edge_runtime.findings import DeviceIdentity
    from edge_runtime.outbox import Outbox

    collector = start_consumer(broker.port, db=tmp / "hub.sqlite")
    out: dict[str, Any] = {}
    try:
        with Outbox(tmp / "receipts-outbox.sqlite", keep_until_stored=True) as outbox:
            fill(outbox, args.receipts_findings)
            mqtt = MqttSection(broker=broker.url, inflight=args.inflight, telemetry_interval_s=0.0,
                               reconnect_min_s=0.2, reconnect_max_s=1.0, connect_timeout_s=5.0)
            uplink = timed_uplink_class()(outbox, mqtt, DeviceIdentity("bench-r", "bench"))
            curve: list[list[float]] = []
            t0 = time.perf_counter()
            uplink.start()
            done = wait_stored(outbox, args.receipts_findings, args.timeout, curve, t0)
            uplink.stop(5.0)
            if not done:
                raise BenchError(f"uplink with receipts: {curve[-1][1] if curve else 0} of {args.receipts_findings} "
                                 f"stored within {args.timeout:.0f} s")
            n = args.receipts_findings
            lo = next(t for t, k in curve if k >= 0.1 * n)
            hi = next(t for t, k in curve if k >= 0.9 * n)
            out["receipts"] = {"findings": n, "stored_s": curve[-1][0], "findings_per_s": n / curve[-1][0],
                               "steady_findings_per_s": 0.8 * n / (hi - lo) if hi > lo else None,
                               "resent": uplink.counters["receipt_resent"],
                               "unknown": uplink.counters["receipt_unknown"]}
        if args.windows:
            out["link_windows"] = link_windows(args, broker, tmp)
    finally:
        hub = stop_consumer(collector)
    if "receipts" in out:
        out["receipts"]["collector"] = hub
    return out


class LinkSwitch:
    """device <-> switch <-> broker. down() cuts every connection (RST) and refuses new ones; up() lets them in."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.is_up = False
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            if not self.is_up:
                _reset(conn)
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=2.0)
                upstream.settimeout(None)
            except OSError:
                _reset(conn)
                continue
            with self._lock:
                self._socks += [conn, upstream]
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(262144):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def up(self) -> None:
        self.is_up = True

    def down(self) -> None:
        self.is_up = False
        with self._lock:
            socks, self._socks = self._socks, []
        for sock in socks:
            _reset(sock)

    def close(self) -> None:
        self.down()
        self.listener.close()


def _reset(sock: socket.socket) -> None:
    """RST, not FIN; the shutdown wakes a pump thread blocked in recv() (a bare close() would not)."""
    for step in (lambda: sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"),
                 lambda: sock.shutdown(socket.SHUT_RDWR), sock.close):
        try:
            step()
        except OSError:
            pass


def link_windows(args: argparse.Namespace, broker, tmp: Path) -> dict[str, Any]:
    """Shipped reconnect settings (1 s doubling to 60 s, capped at reconnect_pending_max_s while owed)."""
    from edge_runtime.config import MqttSection
    from edge_runtime.findings import DeviceIdentity
    from edge_runtime.outbox import Outbox

    rng = random.Random(21)
    switch = LinkSwitch(broker.port)
    mqtt = MqttSection(broker=f"mqtt://127.0.0.1:{switch.port}", inflight=args.inflight, telemetry_interval_s=0.0)
    windows = []
    try:
        with Outbox(tmp / "windows-outbox.sqlite", keep_until_stored=True) as outbox:
            fill(outbox, args.window_findings)
            uplink = timed_uplink_class()(outbox, mqtt, DeviceIdentity("bench-w", "bench"))
            switch.up()
            uplink.start()
            # The link's own drain rate: findings across it (PUBACKs) per second while it is up, after the first
            # second. Stored counts lag behind (receipts of a window's tail arrive at the next connection), so the
            # windows are judged by what crossed the link; what was stored is reported beside it.
            time.sleep(1.0)
            s0, t0 = outbox.stats()["delivered"], time.perf_counter()
            time.sleep(max(1.0, args.window_s - 1.0))
            rate = (outbox.stats()["delivered"] - s0) / (time.perf_counter() - t0)
            switch.down()
            time.sleep(args.outage_s)  # the long outage: the backoff would have grown to its cap of 60 s
            for k in range(args.windows):
                left = outbox.depth()
                connacks = len(uplink.connacks)
                before = outbox.stats()
                samples = []  # (s since the link came up, PUBACKs so far)
                t_up = time.perf_counter()
                switch.up()
                while (t := time.perf_counter() - t_up) < args.window_s:
                    samples.append((t, outbox.stats()["delivered"]))
                    time.sleep(0.05)
                after = outbox.stats()
                switch.down()
                sent = after["delivered"] - before["delivered"]
                first = uplink.connacks[connacks] - t_up if len(uplink.connacks) > connacks else None
                # What the link allows: its rate once the connection runs (from 1 s after the CONNACK) over the
                # whole window, so the ratio is the share of the window the reconnect and the ramp-up cost.
                steady = [x for x in samples if first is not None and x[0] >= first + 1.0]
                link = (steady[-1][1] - steady[0][1]) / (steady[-1][0] - steady[0][0]) if len(steady) > 5 else rate
                allowed = min(left, link * args.window_s)
                windows.append({"first_connack_s": first, "sent": sent, "stored": after["stored"] - before["stored"],
                                "link_rate_per_s": link, "allowed": allowed,
                                "ratio": sent / allowed if allowed else None,
                                "outage_before_s": args.outage_s if k == 0 else gap})
                gap = rng.uniform(*args.gap_s)
                if k < args.windows - 1:
                    time.sleep(gap)
            switch.up()  # the end: everything must reach the hub's database
            if not wait_stored(outbox, args.window_findings, args.timeout):
                raise BenchError(f"link windows: {outbox.stats()['stored']} of {args.window_findings} "
                                 "stored at the end")
            uplink.stop(2.0)
            counters = {k: uplink.counters[k] for k in ("connects", "connect_failures", "half_open", "receipt_resent")}
            lost = args.window_findings - outbox.stats()["stored"]
    finally:
        switch.close()
    firsts = [w["first_connack_s"] for w in windows if w["first_connack_s"] is not None]
    # the median over windows the backlog did not run dry in (there the link, not the backlog, set the limit)
    full = [w for w in windows if w["ratio"] is not None
            and abs(w["allowed"] - w["link_rate_per_s"] * args.window_s) <= 0.01 * w["allowed"]]
    ratios = [w["ratio"] for w in full]
    return {"window_s": args.window_s, "outage_s": args.outage_s, "gap_s": list(args.gap_s),
            "link_rate_per_s": rate, "windows": windows, "windows_used": len(firsts),
            "first_connack_s": latency_stats([f * 1000.0 for f in firsts]) if firsts else None,
            "first_window_ratio": windows[0]["ratio"] if windows else None,
            "ratio_median": float(np.median(ratios)) if ratios else None, "uplink_counters": counters,
            "lost": lost}


def simulate_fleet(n: int, seed: int, outage_s: float = 60.0, lo: float = 1.0, cap: float = 3.0) -> dict[str, Any]:
    """n devices whose link dropped at random instants within a minute before a long outage ends at t = 0, each
    retrying by the uplink's backoff_delay (capped while it owes findings); a refused attempt costs nothing.
    Returns when their first attempts after t = 0 fall: the spread a broker sees."""
    from edge_runtime.uplink import backoff_delay

    rng = random.Random(seed)
    firsts = []
    for _ in range(n):
        t, attempt = -outage_s - rng.uniform(0.0, 60.0), 0
        while t < 0:
            t += backoff_delay(attempt, lo, cap, rng)
            attempt += 1
        firsts.append(t)
    buckets = np.bincount((np.array(firsts) / 0.1).astype(int))
    return {"devices": n, "method": "computed from backoff_delay with a seeded RNG, not spawned clients",
            "cap_s": cap, "first_attempt_s": latency_stats([f * 1000.0 for f in firsts]),
            "peak_per_100ms": int(buckets.max()),
            "mean_per_100ms_over_spread": float(n / max(1, np.count_nonzero(buckets))),
            "spread_s": float(max(firsts) - min(firsts))}


# ------------------------------------------------------------------ the consumer (its own process)
def consume(port: int) -> int:
    """Subscribe QoS 1 to every device's findings, count them; print one JSON line when stdin closes."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    ids: set[str] = set()
    count = [0]
    subscribed = threading.Event()
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="edge-bench-consumer",
                         protocol=mqtt.MQTTv5)
    client.on_connect = lambda c, u, f, rc, p: c.subscribe(TOPIC, qos=1)
    client.on_subscribe = lambda c, u, mid, rcs, p: subscribed.set()

    def on_message(c, u, msg) -> None:
        count[0] += 1
        ids.add(json.loads(msg.payload)["finding_id"])

    client.on_message = on_message
    client.connect("127.0.0.1", port, 30)
    client.loop_start()
    if not subscribed.wait(10):
        return 1
    print("subscribed", flush=True)
    sys.stdin.read()  # the benchmark closes our stdin when it is done
    time.sleep(0.5)
    client.disconnect()
    client.loop_stop()
    print(json.dumps({"received": count[0], "unique": len(ids), "duplicates": count[0] - len(ids)}), flush=True)
    return 0


def collect(port: int, db: str) -> int:
    """The runtime's collector (stores, sends receipts); prints its counts as one JSON line when stdin closes."""
    from edge_runtime.collector import Collector

    col = Collector(f"mqtt://127.0.0.1:{port}", db, client_id="edge-bench-collector", reconnect_min_s=0.05,
                    reconnect_max_s=0.5).start()
    if not col.subscribed.wait(10):
        return 1
    print("subscribed", flush=True)
    sys.stdin.read()
    time.sleep(0.5)
    counters = dict(col.counters)
    col.stop(5.0)
    print(json.dumps(counters), flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.uplink", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="every phase, small (under a minute): sizes below are "
                                                        "replaced by quick ones")
    p.add_argument("--findings", type=int, default=100_000, help="backlog size")
    p.add_argument("--receipts-findings", type=int, default=None, help="backlog for the receipts-on drain "
                                                                       "(default --findings; 0 = skip)")
    p.add_argument("--windows", type=int, default=6, help="link windows after the long outage (0 = skip)")
    p.add_argument("--window-s", type=float, default=10.0)
    p.add_argument("--outage-s", type=float, default=60.0, help="the long outage before the first window")
    p.add_argument("--gap-s", type=float, nargs=2, default=(3.0, 10.0), metavar=("MIN", "MAX"),
                   help="outages between windows, uniform in [MIN, MAX]")
    p.add_argument("--window-findings", type=int, default=300_000, help="backlog for the link windows")
    p.add_argument("--fleet", type=int, default=1000, help="simulated devices reconnecting at once (0 = skip)")
    p.add_argument("--inflight", type=int, default=32, help="mqtt.inflight (the runtime's default: 32)")
    p.add_argument("--live-rate", type=float, default=30.0, help="findings/s committed after the drain")
    p.add_argument("--live-s", type=float, default=5.0)
    p.add_argument("--timeout", type=float, default=300.0, help="give up on the drain after this long")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["consume"]:
        parser = argparse.ArgumentParser(prog="python -m benchmarks.uplink consume")
        parser.add_argument("--port", type=int, required=True)
        return consume(parser.parse_args(argv[1:]).port)
    if argv[:1] == ["collect"]:
        parser = argparse.ArgumentParser(prog="python -m benchmarks.uplink collect")
        parser.add_argument("--port", type=int, required=True)
        parser.add_argument("--db", required=True)
        a = parser.parse_args(argv[1:])
        return collect(a.port, a.db)
    return child_main(build_parser(), measure_with_defaults, argv)


def measure_with_defaults(args: argparse.Namespace) -> dict[str, Any]:
    if args.quick:  # every phase once, small: a CI check of the output, not of speed
        args.findings, args.live_s = min(args.findings, 2000), min(args.live_s, 2.0)
        args.receipts_findings = 2000 if args.receipts_findings is None else min(args.receipts_findings, 2000)
        args.windows, args.window_s, args.outage_s, args.gap_s = min(args.windows, 2), 3.0, 4.0, (1.0, 2.0)
        args.window_findings = min(args.window_findings, 30_000)
    if args.receipts_findings is None:
        args.receipts_findings = args.findings
    return measure(args)


if __name__ == "__main__":
    raise SystemExit(main())
