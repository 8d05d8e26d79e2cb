"""PACS benchmark: a backlog of reports built (highdicom) and C-STOREd to a private Orthanc, with and without a live
pipeline beside it.

A private Orthanc runs on free loopback ports (its own JSON config and storage folder, TCP_NODELAY=1 in its
environment as README recommends; never a system Orthanc). The outbox is filled with `--reports` cxr-pneumonia
findings, each owed to the PACS with the source reference of a real chest CR header (every report a new object,
since each has its own finding_id). Two phases:

1. drain: the runtime's `PacsDelivery` alone drains the backlog (`--build-workers` builder processes); measured:
   reports/s over the whole drain (association and builder start included) and in steady state (10 % to 90 %).
2. live (`--live-s`, 0 = skip): the daemon itself (`Service`) with a phantom source into fetal-head at `--fps` and
   [pacs] pointing at Orthanc, which is down at first: the live pipeline runs beside an idle backlog (baseline),
   then Orthanc starts and the backlog drains beside it, then it runs on after the drain. Measured: live
   capture-to-result p50/p99 before, during and after the drain (from the findings in the outbox), and the
   drain's reports/s under that load.

    python -m benchmarks.pacs --reports 1000
    python -m benchmarks.pacs --quick          # 200 reports, short live phase
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import BenchError, latency_stats

CR = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "dicom" / "pydicom-data" / "RG1_UNCR.dcm"


def free_port() -> int:
    from edge_runtime.local_broker import free_port as fp

    return fp()


class Orthanc:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.dicom_port, self.http_port = free_port(), free_port()
        self.config = root / "orthanc.json"
        root.mkdir(parents=True, exist_ok=True)
        self.config.write_text(json.dumps({
            "Name": "bench", "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"),
            "DicomAet": "PACS", "DicomPort": self.dicom_port, "HttpPort": self.http_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomCheckCalledAet": True,
            "Plugins": [], "StorageCompression": False, "SaveJobs": False}))
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        exe = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
        if not Path(exe).exists():
            raise BenchError("Orthanc not installed (apt-get install -y orthanc)")
        self.proc = subprocess.Popen([exe, str(self.config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env={**os.environ, "TCP_NODELAY": "1"})
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/system", timeout=2).read()
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise BenchError("Orthanc did not start") from None
                time.sleep(0.1)

    def count(self) -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/statistics", timeout=10) as rsp:
            return int(json.loads(rsp.read())["CountInstances"])

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(30)


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fill(outbox_path: Path, n: int) -> None:
    from edge_runtime.imaging.dicom import DicomImage
    from edge_runtime.outbox import Outbox
    from edge_runtime.pacs import DESTINATION, source_reference

    if not CR.is_file():
        raise BenchError(f"{CR}: the shared chest CR is missing")
    ref = source_reference(DicomImage(CR).meta, positive_label="pneumonia")
    model = {"name": "cxr-pneumonia", "version": "1.0.0", "variant": "fp32", "sha256": "9a" * 32,
             "precision": "fp32", "engine": "onnxruntime", "device": "CPU", "compute_precision": "graph"}
    with Outbox(outbox_path) as box:
        for start in range(0, n, 200):
            items = []
            for i in range(start, min(n, start + 200)):
                p = (i % 100) / 100.0
                finding = {"schema": 1, "finding_id": str(uuid.uuid4()), "seq": 0, "device_id": "bench", "site": "bench",
                           "created_at": "2026-12-03T08:00:00.000Z", "source": {"kind": "dicom-folder", "name": "x"},
                           "study": {}, "model": model, "task": "classification",
                           "result": {"assessed": True, "label": "pneumonia" if p >= 0.42 else "normal",
                                      "probabilities": {"normal": 1 - p, "pneumonia": p}, "threshold": 0.42},
                           "priority": "urgent" if p >= 0.42 else "routine"}
                items.append((finding, None, {DESTINATION: ref}))
            box.commit_many(items)


def wait_drained(box, n: int, timeout: float) -> list[tuple[float, int]]:
    """(time, stored) samples until all n are stored."""
    from edge_runtime.pacs import DESTINATION

    curve = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = box.delivery_stats(DESTINATION)
        curve.append((time.monotonic(), s["stored"] + s["refused"]))
        if s["pending"] == 0:
            return curve
        time.sleep(0.05)
    raise BenchError(f"the backlog did not drain in {timeout:.0f} s ({curve[-1][1]} of {n})")


def rates(curve: list[tuple[float, int]], n: int, t0: float) -> dict[str, float]:
    t = np.array([c[0] for c in curve])
    k = np.array([c[1] for c in curve])
    lo, hi = np.searchsorted(k, 0.1 * n), np.searchsorted(k, 0.9 * n)
    steady = (k[hi] - k[lo]) / (t[hi] - t[lo]) if hi > lo and t[hi] > t[lo] else float("nan")
    return {"reports": n, "seconds": round(t[-1] - t0, 2), "reports_per_s": round(n / (t[-1] - t0), 1),
            "steady_reports_per_s": round(float(steady), 1)}


def drain(args, root: Path) -> dict[str, Any]:
    from edge_runtime.config import PacsSection
    from edge_runtime.outbox import Outbox
    from edge_runtime.pacs.delivery import PacsDelivery

    pacs = Orthanc(root / "orthanc")
    pacs.start()
    try:
        fill(root / "drain.sqlite", args.reports)
        box = Outbox(root / "drain.sqlite")
        cfg = PacsSection(host="127.0.0.1", port=pacs.dicom_port, called_ae="PACS", calling_ae="BENCH",
                          build_workers=args.build_workers)
        worker = PacsDelivery(box, cfg, root / "spool")
        pacs_cpu0, own_cpu0 = cpu_s(pacs.proc.pid), time.process_time()
        t0 = time.monotonic()
        worker.start()
        curve = wait_drained(box, args.reports, 600)
        # CPU each part spent per report: what the rate would be on idle cores, whatever the load is now.
        builder = sum(cpu_s(b.proc.pid) for b in worker.builder._procs)
        sender, orthanc = time.process_time() - own_cpu0, cpu_s(pacs.proc.pid) - pacs_cpu0
        worker.stop()
        out = rates(curve, args.reports, t0)
        n = args.reports
        out["cpu_ms_per_report"] = {"builder": round(1000 * builder / n, 2), "daemon": round(1000 * sender / n, 2),
                                    "orthanc": round(1000 * orthanc / n, 2)}
        per = out["cpu_ms_per_report"]
        # builders run in parallel with the daemon's sender and Orthanc; two cores bound the total
        workers = max(1, args.build_workers)
        out["projected_idle_2_cores_reports_per_s"] = round(min(
            1000 * workers / max(per["builder"], 1e-3), 2000 / max(sum(per.values()), 1e-3)), 1)
        out["orthanc_instances"] = pacs.count()
        out["counters"] = worker.stats()
        box.close()
        return out
    finally:
        pacs.stop()


def live(args, root: Path) -> dict[str, Any]:
    from edge_runtime.config import Config, DeviceSection, EngineSection, PacsSection, ServiceSection, SourceSection
    from edge_runtime.outbox import Outbox
    from edge_runtime.service import Service

    state = root / "live-state"
    state.mkdir()
    fill(state / "outbox.sqlite", args.reports)
    pacs = Orthanc(root / "orthanc-live")
    config = Config(device=DeviceSection(id="bench", site="bench", state_dir=str(state)),
                    engine=EngineSection(kind="onnxruntime", threads=args.threads),
                    service=ServiceSection(metrics_port=0),
                    pacs=PacsSection(host="127.0.0.1", port=pacs.dicom_port, called_ae="PACS", calling_ae="BENCH",
                                     retry_min_s=0.5, retry_max_s=0.5, build_workers=args.build_workers),
                    sources=[SourceSection(name="probe", kind="phantom", model="fetal-head", fps=args.fps,
                                           budget_ms=10_000.0)])  # a large budget pins the variant: same work
    service = Service(config)
    service.start()
    marks: dict[str, float] = {}
    try:
        time.sleep(args.warmup_s)
        marks["before"] = time.time()
        time.sleep(args.live_s)
        marks["drain"] = time.time()
        t0 = time.monotonic()
        pacs.start()
        curve = wait_drained(service.outbox, args.reports, 900)
        marks["after"] = time.time()
        time.sleep(args.live_s)
        marks["end"] = time.time()
    finally:
        service.stop()
        pacs.stop()
    drained = rates(curve, args.reports, t0)
    from datetime import datetime

    def window(a: str, b: str) -> list[float]:
        out = []
        with Outbox(state / "outbox.sqlite") as box:
            for seq in range(1, box.stats()["next_seq"]):
                f = box.payload(seq)
                if f and f["model"]["name"] == "fetal-head":
                    ts = datetime.fromisoformat(f["created_at"].replace("Z", "+00:00")).timestamp()
                    if marks[a] <= ts < marks[b]:
                        out.append(f["latency_ms"]["capture_to_result"])
        return out

    result = {"drain_beside_live": drained, "fps": args.fps}
    for name, (a, b) in {"before": ("before", "drain"), "during": ("drain", "after"), "after": ("after", "end")}.items():
        samples = window(a, b)
        result[name] = {"findings": len(samples), **({k: round(v, 2) for k, v in latency_stats(samples).items()
                                                       if k in ("p50", "p99", "max")} if samples else {})}
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pacs", description=__doc__.split("\n\n")[0])
    p.add_argument("--reports", type=int, default=1000)
    p.add_argument("--build-workers", type=int, default=1)
    p.add_argument("--live-s", type=float, default=20.0, help="seconds of live pipeline before and after the drain")
    p.add_argument("--warmup-s", type=float, default=5.0)
    p.add_argument("--fps", type=float, default=15.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, help="write the result JSON here")
    args = p.parse_args(argv)
    if args.quick:
        args.reports, args.live_s, args.warmup_s = 200, 5.0, 2.0
    from benchmarks.machine import collect

    root = Path(tempfile.mkdtemp(prefix="edge-bench-pacs-"))
    try:
        result = {"benchmark": "pacs", "machine": collect(), "load_before": os.getloadavg(),
                  "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                  "drain": drain(args, root)}
        if args.live_s > 0:
            result["live"] = live(args, root)
        result["load_after"] = os.getloadavg()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    text = json.dumps(result, indent=1, default=str)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
