"""Exams benchmark: what live scanning sends over the uplink, and how well each exam measures, end to end.

The daemon (`edge_runtime.service.Service`) runs a sweeping phantom (a head of known circumference for 5 s, the
probe lifted for 3 s, another head) into `fetal-head`, with a private Mosquitto on a free loopback port and a
plain subscriber on the findings topic that counts what arrives: the PUBLISH packets' bytes as they cross the
wire (fixed header, topic, packet id, properties, payload), with the key-frame thumbnails' share counted apart.
`--results frame` runs the old behaviour (a finding per frame) for comparison. Per exam: the measured head
circumference against the phantom's truth on the key frame. Per frame (from the daemon's in-memory ring, which
exam mode leaves the per-frame results in): capture-to-result latency.

    python -m benchmarks.exams --seconds 120 --precision int8
"""
from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import BenchError, child_entry, latency_stats


def varint_len(n: int) -> int:
    """Bytes of an MQTT variable byte integer."""
    size = 1
    while n >= 128:
        n //= 128
        size += 1
    return size


def publish_wire_bytes(topic: str, payload: bytes, qos: int = 1, properties_len: int = 0) -> int:
    """The size of an MQTT 5 PUBLISH packet: fixed header, topic, packet id (QoS > 0), properties, payload."""
    body = 2 + len(topic.encode("utf-8")) + (2 if qos else 0) + varint_len(properties_len) + properties_len + len(payload)
    return 1 + varint_len(body) + body


class WireCounter:
    """A subscriber on the findings topic: every message's wire size, and its thumbnail's share."""

    def __init__(self, port: int, topic: str) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.messages: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="bench-wire",
                                  protocol=mqtt.MQTTv5)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, 30)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise BenchError(f"no subscription to {topic} within 10 s")

    def _on_message(self, client, userdata, message) -> None:
        finding = json.loads(message.payload)
        thumb = finding.get("exam", {}).get("key_frame", {}).get("thumbnail")
        props = message.properties.json() if message.properties is not None else {}
        with self._lock:
            self.messages.append({
                "at": time.monotonic(), "finding": finding,
                "wire": publish_wire_bytes(message.topic, message.payload, message.qos,
                                           len(json.dumps(props)) if props else 0),
                "thumbnail": len(json.dumps(thumb, separators=(",", ":"))) if thumb else 0,
                "thumbnail_jpeg": thumb["bytes"] if thumb else 0})

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def build_config(args: argparse.Namespace, root: Path, broker_url: str):
    from edge_runtime.config import (Config, DeviceSection, EngineSection, MqttSection, ServiceSection, SourceSection,
                                     check_sources)

    live = SourceSection(name="probe", kind="phantom", model="fetal-head", fps=args.fps, sweeps=True,
                         results=args.results)
    config = Config(device=DeviceSection(id="bench", site="bench", state_dir=str(root / "state")),
                    engine=EngineSection(kind=args.engine, precision=args.precision, threads=args.threads),
                    service=ServiceSection(metrics_port=0),
                    mqtt=MqttSection(broker=broker_url, require_receipts=False, telemetry_interval_s=0.0,
                                     reconnect_min_s=0.2, reconnect_max_s=1.0),
                    sources=[live])
    check_sources(config)
    return config


def exam_rows(findings: list[dict[str, Any]], source) -> list[dict[str, Any]]:
    rows = []
    for f in findings:
        e, r = f["exam"], f["result"]
        key = e.get("key_frame")
        sweep, truth = source.truth_at(key["frame_index"]) if key else (None, None)
        hc = r.get("measurements", {}).get("head_circumference_mm")
        rows.append({"sweep": sweep, "truth_mm": truth, "hc_mm": hc, "error_mm": None if hc is None or truth is None
                     else round(hc - truth, 2), "iqr_mm": r.get("measurements", {}).get("head_circumference_iqr_mm"),
                     "assessed": r.get("assessed"), "frames_seen": e["frames_seen"], "frames_used": e["frames_used"],
                     "end_reason": e["end_reason"], "quality": r.get("quality"),
                     "thumbnail_bytes": key.get("thumbnail", {}).get("bytes") if key else None})
    return rows


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from edge_runtime.local_broker import LocalBroker, find_mosquitto
    from edge_runtime.service import Service

    binary = find_mosquitto()
    if binary is None:
        raise BenchError("mosquitto not found (apt install mosquitto): the wire is measured through a real broker")
    with tempfile.TemporaryDirectory(prefix="edge-bench-exams-") as tmp:
        root = Path(tmp)
        broker = LocalBroker(root / "broker", binary=binary).start()
        counter = WireCounter(broker.port, "edge/v1/bench/bench/findings")
        service = Service(build_config(args, root, broker.url))
        try:
            service.start()
            source = service.live_sources[0]
            time.sleep(args.warmup_s)
            start, seen = time.monotonic(), len(counter.snapshot())
            first_frame = source.index
            latencies: list[float] = []
            last = -1
            while time.monotonic() - start < args.seconds:
                time.sleep(1.0)
                for r in service.recent_frames("probe"):
                    if r.frame_index > last and r.frame_index >= first_frame:
                        last = r.frame_index
                        latencies.append(r.latency_ms)
            window_s = time.monotonic() - start
            frames_captured = source.index - first_frame
            in_window = counter.snapshot()[seen:]
        finally:
            service.stop()
            time.sleep(0.5)
            everything = counter.snapshot()
            counter.close()
            broker.stop()
    minutes = window_s / 60.0
    wire = sum(m["wire"] for m in in_window)
    thumbs = sum(m["thumbnail"] for m in in_window)
    exams = [m["finding"] for m in everything if "exam" in m["finding"]]
    rows = exam_rows(exams, source)
    errors = [abs(r["error_mm"]) for r in rows if r["error_mm"] is not None]
    return {
        "results": args.results, "seconds": round(window_s, 1), "precision": args.precision, "engine": args.engine,
        "threads": args.threads, "fps": args.fps, "frames_captured": frames_captured, "frames_processed": len(latencies),
        "messages": len(in_window), "wire_bytes": wire, "thumbnail_bytes": thumbs,
        "wire_kb_per_min": round(wire / 1024 / minutes, 2),
        "wire_kb_per_min_without_thumbnails": round((wire - thumbs) / 1024 / minutes, 2),
        "thumbnail_jpeg_bytes_max": max((m["thumbnail_jpeg"] for m in in_window), default=0),
        "finding_bytes_median": sorted(m["wire"] - m["thumbnail"] for m in in_window)[len(in_window) // 2] if in_window else None,
        "latency_ms": latency_stats(latencies) if latencies else None,
        "exams": rows, "exams_total": len(rows), "exam_abs_error_max_mm": max(errors) if errors else None,
        "exams_within_2mm": sum(1 for e in errors if e <= 2.0),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.exams", description=__doc__.splitlines()[0])
    p.add_argument("--results", default="exam", choices=["exam", "frame"])
    p.add_argument("--seconds", type=float, default=120.0, help="the measured window")
    p.add_argument("--warmup-s", type=float, default=3.0)
    p.add_argument("--fps", type=float, default=30.0)
    p.add_argument("--engine", default="auto", choices=["auto", "onnxruntime", "openvino"])
    p.add_argument("--precision", default="int8", choices=["fp32", "int8"])
    p.add_argument("--threads", type=int, default=2)
    return p


main = child_entry(build_parser, measure)

if __name__ == "__main__":
    raise SystemExit(main())
