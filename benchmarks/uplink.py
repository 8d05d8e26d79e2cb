"""Uplink benchmark: drain a backlog of findings from the outbox to a private Mosquitto, then a live trickle.

A private Mosquitto runs on a free loopback port (`edge_runtime.local_broker.LocalBroker`: own config file,
`persistence false`, never the system broker on 1883). A consumer in its own process subscribes to the findings
topic with QoS 1 (so the uplink's MQTT 5 `require_subscriber` stays on, as shipped) and counts what arrives. The
outbox is filled with `--findings` real-shaped findings (`build_finding`, fetal-head sized, one in 20 urgent) in
batches, then the runtime's `Uplink` starts and drains it. Measured: findings/s over the whole drain (connect
included) and in steady state (10 % to 90 % delivered), the drain curve, publish-to-PUBACK latency in steady state,
then `--live-rate` findings/s committed one by one for `--live-s` (commit-to-PUBACK latency, what a finding waits
when the link is up). The Uplink is subclassed only to timestamp publishes and PUBACKs; its path is unchanged.

    python -m benchmarks.uplink --findings 100000
"""
from __future__ import annotations

import argparse
import json
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


def start_consumer(port: int, timeout: float = 15.0) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.uplink", "consume", "--port", str(port)],
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
                                   reconnect_min_s=0.2, reconnect_max_s=1.0, connect_timeout_s=5.0)
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
    if not drained:
        raise BenchError(f"uplink: the {args.findings}-finding backlog did not drain within {args.timeout:.0f} s "
                         f"({curve[-1][1] if curve else 0} delivered)")
    return summarize_drain(args, acks, curve, fill_s, sizes, cpu_percent) | {
        "live": live, "consumer": received, "uplink_counters": {k: v for k, v in stats.items() if isinstance(v, (int, float))},
        "expected_at_consumer": args.findings + live.get("findings", 0),
        "require_subscriber": True, "broker": "private mosquitto on 127.0.0.1, persistence false",
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.uplink", description=__doc__.splitlines()[0])
    p.add_argument("--findings", type=int, default=100_000, help="backlog size")
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
    return child_main(build_parser(), measure, argv)


if __name__ == "__main__":
    raise SystemExit(main())
