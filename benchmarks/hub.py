"""Hub benchmark: findings/s into PostgreSQL through Mosquitto with 1, 2 and 3 collectors, and broker-to-commit
latency.

Everything private and on loopback: a Mosquitto (`edge_runtime.local_broker.LocalBroker`), a PostgreSQL cluster
(`edge_hub.local_postgres.PgServer`, **fsync on**: every batch commit is durable, as in production), a fresh
database per run. The collectors are the real `Collector` (edge_hub.collector), each in its own process, in one
shared-subscription group ($share/collectors/...), receipts on. The fleet is one publisher process with `--devices`
MQTT clients (QoS 1, MQTT 5), each finding about 900 bytes of JSON shaped like the device's, one in 20 urgent;
each payload starts with its wall-clock send time (`{"t_pub": ...,`), which the collector stores like any other
key. `--protocol` sets the collectors' MQTT version (paho decodes an MQTT 5 PUBLISH's properties in Python, a
visible share of a collector's time).

Two phases per collector count:
- saturation: the fleet publishes `--findings` as fast as the broker takes them; measured: findings/s committed
  in steady state (10 % to 90 % of the rows, by commit time) and over the whole run;
- offered load: `--rate` findings/s for `--seconds`; measured: whether the hub keeps up, and publish-to-commit
  latency (the time from the device's publish call to the end of the collector's COMMIT, through the broker):
  p50, p99, max.

    python -m benchmarks.hub                         # 1, 2, 3 collectors; about 3 minutes on 2 cores
    python -m benchmarks.hub --protocol 5,3.1.1      # both MQTT versions, interleaved; about 7 minutes
    python -m benchmarks.hub --collectors 2 --findings 20000 --rate 3000 --seconds 10
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import BenchError, child_env, child_main

GROUP_TOPIC = "$share/collectors/edge/v1/+/+/findings"


# ------------------------------------------------------------------ the fleet (publisher process)
def finding(n: int, device: str, site: str, seq: int) -> dict[str, Any]:
    return {
        "schema": 1, "finding_id": str(uuid.uuid4()), "seq": seq, "device_id": device, "site": site,
        "created_at": "2026-12-03T09:00:00.000Z",
        "source": {"kind": "dicom_folder", "name": f"/var/lib/edge/incoming/img-{n:08d}.dcm"},
        "study": {"study_id": "2.25." + str(uuid.uuid4().int), "series_id": "2.25.1", "instance_id": "2.25.2",
                  "modality": "CR", "frame_index": 0},
        "model": {"name": "cxr-pneumonia", "version": "1.0.0", "variant": "int8", "sha256": "a" * 64,
                  "precision": "int8", "engine": "openvino", "device": "CPU"},
        "task": "classification",
        "result": {"label": "pneumonia" if n % 20 == 0 else "normal",
                   "probabilities": {"normal": 0.93, "pneumonia": 0.07}, "assessed": True, "needs_review": False},
        "priority": "urgent" if n % 20 == 0 else "routine",
        "latency_ms": {"capture_to_result": 182.4, "preprocess": 11.2, "inference": 160.3, "postprocess": 0.9},
        "budget_ms": 1000.0, "budget_met": True,
    }


def publish(args: argparse.Namespace) -> dict[str, Any]:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    clients = []
    for d in range(args.devices):
        c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"bench-dev-{d:03d}",
                        protocol=mqtt.MQTTv5)
        c.max_inflight_messages_set(100)
        c.max_queued_messages_set(0)
        c.connect("127.0.0.1", args.port, 60)
        c.loop_start()
        clients.append(c)
    payloads = []
    for n in range(args.count):  # built before the clock starts: the fleet's JSON encoding is not the hub's cost
        d = n % args.devices
        body = json.dumps(finding(n, f"dev-{d:03d}", f"site-{d % 10}", n // args.devices + 1)).encode()
        payloads.append((d, f"edge/v1/site-{d % 10}/dev-{d:03d}/findings", body[1:]))
    infos = []
    start, cpu0 = time.time(), time.process_time()
    for n, (d, topic, payload) in enumerate(payloads):
        infos.append(clients[d].publish(topic, b'{"t_pub":' + repr(time.time()).encode() + b"," + payload, qos=1))
        if args.rate:
            lag = start + (n + 1) / args.rate - time.time()
            if lag > 0:
                time.sleep(lag)
    published = time.time()
    for info in infos:
        info.wait_for_publish(300)
    acked = time.time()
    for c in clients:
        c.disconnect()
        c.loop_stop()
    return {"count": args.count, "start": start, "published": published, "acked": acked,
            "offered_per_s": args.count / max(published - start, 1e-9),
            "cpu_s": time.process_time() - cpu0}  # publishing only: not the imports, connects and JSON encoding


# ------------------------------------------------------------------ a collector (worker process)
def worker(args: argparse.Namespace) -> dict[str, Any]:
    from edge_hub.collector import Collector

    lat: list[float] = []
    commits: list[tuple[float, int]] = []

    def on_commit(batch, committed: float) -> None:
        commits.append((committed, len(batch)))
        for m, _ in batch:
            p = m.payload
            if p.startswith(b'{"t_pub":'):
                lat.append(committed - float(p[9:p.index(b",", 9)]))

    col = Collector(f"mqtt://127.0.0.1:{args.port}", args.db, topic=GROUP_TOPIC, client_id=args.client_id,
                    reconnect_min_s=0.05, on_commit=on_commit, batch_max=args.batch_max, protocol=args.protocol)
    signal.signal(signal.SIGTERM, lambda *_: col._stop.set())
    col.start()
    col.subscribed.wait(30)
    cpu0 = time.process_time()  # from here on: the collector's work, not its imports and connects
    print("subscribed", file=sys.stderr, flush=True)
    while col._thread.is_alive():
        col._thread.join(0.2)
    return {"client_id": args.client_id, "counters": col.counters, "latencies_s": lat, "commits": commits,
            "cpu_s": time.process_time() - cpu0}


# ------------------------------------------------------------------ one run (the parent)
def proc_cpu_s(pid: int) -> float:
    """utime + stime + cutime + cstime of a process (the postmaster's children are its backends), seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


class Hub:
    """Broker, database and N collector processes for one measurement."""

    def __init__(self, tmp: Path, pg, n: int, batch_max: int, protocol: str) -> None:
        from edge_runtime.local_broker import LocalBroker

        self.broker = LocalBroker(tmp / f"broker-{n}").start()
        self.db = pg.database(f"bench_{n}_{uuid.uuid4().hex[:6]}")
        self.procs = []
        for k in range(n):
            out = tmp / f"worker-{n}-{k}.json"
            p = subprocess.Popen([sys.executable, "-m", "benchmarks.hub", "worker", "--port", str(self.broker.port),
                                  "--db", self.db, "--client-id", f"bench-hub-{k}", "--batch-max", str(batch_max),
                                  "--protocol", protocol, "--json"], stdout=open(out, "w"), stderr=subprocess.PIPE, text=True,
                                 env=child_env())
            self.procs.append((p, out))
        for p, _ in self.procs:  # each member subscribed before the fleet publishes
            line = p.stderr.readline()
            if "subscribed" not in line:
                raise BenchError(f"collector did not subscribe: {line.strip() or p.stderr.read()[-300:]}")
            threading.Thread(target=p.stderr.read, daemon=True).start()

    def rows(self) -> int:
        import psycopg

        with psycopg.connect(self.db) as conn:
            return conn.execute("SELECT count(*) FROM findings").fetchone()[0]

    def fleet(self, count: int, rate: float, devices: int) -> dict[str, Any]:
        out = subprocess.run([sys.executable, "-m", "benchmarks.hub", "publish", "--port", str(self.broker.port),
                              "--count", str(count), "--rate", str(rate), "--devices", str(devices), "--json"],
                             capture_output=True, text=True, timeout=900, env=child_env())
        if out.returncode != 0:
            raise BenchError(f"publisher failed: {out.stderr.strip()[-300:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    def finish(self, expected: int, timeout: float = 300) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while self.rows() < expected and time.monotonic() < deadline:
            time.sleep(0.2)
        results = []
        for p, out in self.procs:
            p.send_signal(signal.SIGTERM)
            p.wait(60)
            text = [x for x in Path(out).read_text().splitlines() if x.startswith("{")]
            results.append(json.loads(text[-1]) if text else {})
        self.broker.stop()
        return results


def steady(commits: list[tuple[float, int]], lo: float = 0.1, hi: float = 0.9) -> dict[str, float]:
    commits = sorted(commits)
    times = np.repeat([t for t, _ in commits], [n for _, n in commits])
    total = len(times)
    a, b = times[int(total * lo)], times[min(total - 1, int(total * hi))]
    return {"steady_per_s": (int(total * hi) - int(total * lo)) / max(b - a, 1e-9),
            "whole_per_s": total / max(times[-1] - times[0], 1e-9) if total > 1 else 0.0}


def one_run(tmp: Path, pg, args: argparse.Namespace, n: int, protocol: str, phase: str, count: int,
            rate: float) -> dict[str, Any]:
    """One phase with n collectors on a fresh broker and database."""
    hub = Hub(tmp, pg, n, args.batch_max, protocol)
    load = os.getloadavg()
    pg_cpu = proc_cpu_s(pg.proc.pid)
    fleet = hub.fleet(count, rate, args.devices)
    broker_cpu = proc_cpu_s(hub.broker.proc.pid)
    workers = hub.finish(count)
    pg_cpu = proc_cpu_s(pg.proc.pid) - pg_cpu  # the collectors' backends have exited: counted
    stored = sum(w.get("counters", {}).get("stored", 0) for w in workers)
    commits = [tuple(c) for w in workers for c in w.get("commits", [])]
    lat = np.array([x for w in workers for x in w.get("latencies_s", [])]) * 1000
    run = {"collectors": n, "protocol": protocol, "phase": phase, "findings": count, "stored": stored,
           "offered_per_s": round(fleet["offered_per_s"], 1), **steady(commits),
           "batches": len(commits), "mean_batch": stored / max(len(commits), 1),
           "share": [w.get("counters", {}).get("stored", 0) for w in workers],
           # CPU per finding: what the load on a busy machine does not change much
           "cpu_us_per_finding": {
               "collectors": 1e6 * sum(w.get("cpu_s", 0) for w in workers) / count,
               "postgres": 1e6 * pg_cpu / count, "mosquitto": 1e6 * broker_cpu / count,
               "fleet_publisher": 1e6 * fleet.get("cpu_s", 0) / count},
           "loadavg_before": [round(x, 2) for x in load]}
    if len(lat):
        run.update(p50_ms=float(np.percentile(lat, 50)), p99_ms=float(np.percentile(lat, 99)),
                   max_ms=float(lat.max()))
    print(json.dumps({k: (round(v, 1) if isinstance(v, float) else v) for k, v in run.items()}),
          file=sys.stderr, flush=True)
    return run


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from edge_hub.local_postgres import PgServer

    counts = [int(x) for x in str(args.collectors).split(",")]
    protocols = str(args.protocol).split(",")
    if set(protocols) - {"5", "3.1.1"}:
        raise BenchError(f"--protocol: 5 and/or 3.1.1; got {args.protocol!r}")
    runs = []
    tmp = Path(tempfile.mkdtemp(prefix="edge-bench-hub-"))
    pg = PgServer(fsync=True).start()
    try:
        phases = (("saturation", args.findings, 0.0), ("offered", int(args.rate * args.seconds), args.rate))
        for n in counts:
            for protocol in protocols:  # interleaved, so both versions see about the same load
                for phase, count, rate in phases:
                    runs.append(one_run(tmp, pg, args, n, protocol, phase, count, rate))
    finally:
        pg.cleanup()
    import platform

    return {"kind": "hub", "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                        "loadavg_end": [round(x, 2) for x in os.getloadavg()]},
            "settings": {"findings": args.findings, "rate": args.rate, "seconds": args.seconds,
                         "devices": args.devices, "batch_max": args.batch_max, "protocol": args.protocol,
                         "postgres_fsync": True},
            "runs": runs}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.hub", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="role")
    p.add_argument("--collectors", default="1,2,3", help="collector counts to measure (default 1,2,3)")
    p.add_argument("--findings", type=int, default=30000, help="saturation phase: findings published (30000)")
    p.add_argument("--rate", type=float, default=3000.0, help="offered-load phase: findings/s (3000)")
    p.add_argument("--seconds", type=float, default=10.0, help="offered-load phase: how long (10 s)")
    p.add_argument("--devices", type=int, default=50, help="simulated devices (MQTT clients) in the fleet (50)")
    p.add_argument("--batch-max", type=int, default=500, help="collector batch size at most (500)")
    p.add_argument("--protocol", default="5", help="the collectors' MQTT version: 5, 3.1.1 or both, 5,3.1.1 (5)")
    w = sub.add_parser("worker")
    w.add_argument("--port", type=int, required=True)
    w.add_argument("--db", required=True)
    w.add_argument("--client-id", required=True)
    w.add_argument("--batch-max", type=int, default=500)
    w.add_argument("--protocol", choices=["5", "3.1.1"], default="5")
    w.add_argument("--json", action="store_true")
    f = sub.add_parser("publish")
    f.add_argument("--port", type=int, required=True)
    f.add_argument("--count", type=int, required=True)
    f.add_argument("--rate", type=float, default=0.0)
    f.add_argument("--devices", type=int, default=50)
    f.add_argument("--json", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, _ = parser.parse_known_args(argv)
    role = {"worker": worker, "publish": publish}.get(args.role or "", measure)
    return child_main(parser, role, argv)


if __name__ == "__main__":
    sys.exit(main())
