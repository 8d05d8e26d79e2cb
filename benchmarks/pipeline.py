"""Pipeline benchmark: the daemon itself (`edge_runtime.service.Service`) under a live 30 fps feed.

A configuration is built in a temporary state directory: one live source into `fetal-head` (the shared 120-frame
cine replayed in a loop, or the phantom) and a `dicom-folder` inbox for `cxr-pneumonia`, so both models are loaded
as on a scanner (`--xray FILE --xray-at S` drops a study into that inbox S seconds into the window). No broker:
findings queue in the outbox, as in a clinic that is offline. After `--warmup-s` the counters are snapshotted;
for `--seconds` the harness samples RSS and CPU from outside the workers; then the daemon stops and every
finding is read back from the outbox, so end-to-end latency is the `capture_to_result` the findings carry, exact
rather than from histogram buckets. `--budget-ms` overrides the source's budget: a large one pins the configured
variant (the controller never steps down) and over-budget frames are then counted against the manifest's budget.

    python -m benchmarks.pipeline --source phantom --seconds 60
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (BenchError, CpuMeter, cdf_points, child_entry, latency_stats, peak_rss_mb, quiet_pydicom,
                               rss_mb)

LIVE_MODEL = "fetal-head"
STUDY_MODEL = "cxr-pneumonia"


def build_config(args: argparse.Namespace, root: Path):
    from edge_runtime.config import Config, DeviceSection, EngineSection, ServiceSection, SourceSection, check_sources

    if args.source == "cine":
        if not args.cine or not Path(args.cine).is_file():
            raise BenchError(f"{args.cine or '--cine'}: no such cine file (the 120-frame echo from ../shared/data)")
        live = SourceSection(name="cine", kind="cine", model=LIVE_MODEL, path=str(args.cine), fps=args.fps, loop=True,
                             budget_ms=args.budget_ms, results=getattr(args, "results", "frame"))
    else:
        live = SourceSection(name="probe", kind="phantom", model=LIVE_MODEL, fps=args.fps, budget_ms=args.budget_ms,
                             results=getattr(args, "results", "frame"))
    if args.xray and not Path(args.xray).is_file():
        raise BenchError(f"{args.xray}: no such file")
    inbox = root / "inbox"
    inbox.mkdir(parents=True)
    study = SourceSection(name="xray", kind="dicom-folder", model=STUDY_MODEL, inbox=str(inbox))
    config = Config(device=DeviceSection(id="bench", site="bench", state_dir=str(root / "state")),
                    engine=EngineSection(kind=args.engine, precision=args.precision, threads=args.threads),
                    service=ServiceSection(metrics_port=0), sources=[live, study])
    check_sources(config)
    return config


def counters(service, source: str) -> dict[str, float]:
    value = lambda name, **labels: service.metrics.registry.get_sample_value(name, labels) or 0.0  # noqa: E731
    return {
        "frames_in": value("edge_frames_in_total", source=source),
        "dropped": value("edge_frames_dropped_total", source=source),
        "late": value("edge_frames_late_total", model=LIVE_MODEL, source=source),
        "rate_skipped": value("edge_frames_rate_skipped_total", model=LIVE_MODEL, source=source),
        "budget_misses": value("edge_budget_misses_total", model=LIVE_MODEL),
        "switches_down": value("edge_variant_switches_total", model=LIVE_MODEL, source=source, direction="down"),
        "switches_up": value("edge_variant_switches_total", model=LIVE_MODEL, source=source, direction="up"),
        "probes": value("edge_budget_probes_total", model=LIVE_MODEL, source=source),
        "probe_skipped": value("edge_frames_probe_skipped_total", model=LIVE_MODEL, source=source),
        "next_seq": float(service.outbox.stats()["next_seq"]),
    }


def read_findings(outbox_path: Path) -> list[dict[str, Any]]:
    from edge_runtime.outbox import Outbox

    with Outbox(outbox_path) as outbox:
        end = outbox.stats()["next_seq"]
        return [f for f in (outbox.payload(seq) for seq in range(1, end)) if f is not None]


def drop_study(src: str, inbox: Path) -> None:
    """Into the inbox the way the SCP does it: a hidden temporary name, then a rename (old mtime: ready at once)."""
    tmp = inbox / f".{Path(src).name}.part"
    shutil.copy2(src, tmp)
    tmp.replace(inbox / Path(src).name)


def live_summary(findings: list[dict[str, Any]], budget_ms: float) -> dict[str, Any]:
    """End-to-end latency of the live model's findings, overall and per variant, with the stage breakdown;
    `over_budget` counts against `budget_ms` (the manifest's budget)."""
    if not findings:
        return {"findings": 0}
    total = [f["latency_ms"]["capture_to_result"] for f in findings]
    per_variant: dict[str, list[float]] = {}
    for f in findings:
        per_variant.setdefault(f["model"]["variant"], []).append(f["latency_ms"]["capture_to_result"])
    stages = {s: float(np.median([f["latency_ms"].get(s, 0.0) for f in findings])) for s in ("preprocess", "inference", "postprocess")}
    hc = [f["result"]["measurements"]["head_circumference_mm"] for f in findings
          if f["result"].get("measurements", {}).get("head_circumference_mm") is not None]
    return {
        "findings": len(findings), "budget_ms": budget_ms, "latency_ms": latency_stats(total), "cdf_ms": cdf_points(total),
        "over_budget": sum(1 for v in total if v > budget_ms),
        "variants": {v: {"findings": len(t), "latency_ms": latency_stats(t), "cdf_ms": cdf_points(t)} for v, t in per_variant.items()},
        "stages_p50_ms": stages, "model": {k: findings[0]["model"][k] for k in ("engine", "device", "compute_precision")},
        "head_circumference_median_mm": statistics.median(hc) if hc else None, "head_found_fraction": len(hc) / len(findings),
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from edge_runtime.service import Service

    quiet_pydicom()
    with tempfile.TemporaryDirectory(prefix="edge-bench-pipeline-") as tmp:
        config = build_config(args, Path(tmp))
        live_name = config.sources[0].name
        rss_before = rss_mb()
        service = Service(config)
        t_start = time.monotonic()
        service.start()
        start_s = time.monotonic() - t_start
        samples: list[list[float]] = []
        begin = snap = cpu = None
        dropped_at = None
        t0 = time.monotonic()
        next_supervise = t0 + 2.0
        try:
            while True:
                elapsed = time.monotonic() - t0
                if elapsed >= args.warmup_s + args.seconds:
                    break
                if begin is None and elapsed >= args.warmup_s:
                    begin, snap, cpu = time.monotonic(), counters(service, live_name), CpuMeter()
                if args.xray and dropped_at is None and begin is not None and time.monotonic() - begin >= args.xray_at:
                    drop_study(args.xray, Path(config.sources[1].inbox))
                    dropped_at = time.monotonic() - begin
                budget = service.budgets[live_name]
                samples.append([round(elapsed, 2), round(rss_mb(), 1), budget.index])
                if time.monotonic() >= next_supervise:  # what run_forever does every 2 s
                    service.supervise_once()
                    next_supervise += 2.0
                service.stop_event.wait(args.sample_s)
            window_s = time.monotonic() - begin
            end = counters(service, live_name)
            cpu_percent = cpu.percent()
            peak = peak_rss_mb()
            levels = [level.describe() for level in service.budgets[live_name].levels]
            budget_ms = service.budgets[live_name].budget_ms
            nominal_ms = service.runners[LIVE_MODEL].manifest.latency_budget_ms
            ready_s = service.ready_s
            switches = [{"from": s.from_level, "to": s.to_level, "reason": s.reason} for s in service.budgets[live_name].switches]
            runners = {name: list(r.order) for name, r in service.runners.items()}
        finally:
            stopped = service.stop()
        findings = read_findings(service.outbox.path)
    first, last = int(snap["next_seq"]), int(end["next_seq"])
    live = [f for f in findings if f["model"]["name"] == LIVE_MODEL]
    in_window = [f for f in live if first <= f["seq"] < last]
    delta = {k: end[k] - snap[k] for k in end if k != "next_seq"}
    studies = [f for f in findings if f["model"]["name"] == STUDY_MODEL]
    return {
        "source": args.source, "source_path": args.cine if args.source == "cine" else "phantom (synthetic, 800x540)",
        "fps": args.fps, "seconds": window_s, "warmup_s": args.warmup_s, "engine": args.engine, "precision": args.precision,
        "threads": args.threads, "models_loaded": runners, "levels": levels,
        "ready_s": ready_s, "start_s": start_s, "stopped_cleanly": stopped == 0,
        "counts": delta, "counts_including_warmup": {k: v for k, v in end.items() if k != "next_seq"},
        "fps_in": delta["frames_in"] / window_s, "findings_per_s": len(in_window) / window_s,
        "budget_ms": budget_ms, "live": live_summary(in_window, nominal_ms), "switches": switches,
        "cpu_percent": cpu_percent, "rss_before_service_mb": rss_before, "peak_rss_mb": peak,
        "rss_series": samples, "rss_series_columns": ["t_s", "rss_mb", "budget_level"],
        "study": {"findings": len(studies),
                  "capture_to_result_ms": studies[0]["latency_ms"]["capture_to_result"] if studies else None,
                  "decode_ms": studies[0]["latency_ms"].get("decode") if studies else None,
                  "dropped_at_s": dropped_at},
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pipeline", description=__doc__.splitlines()[0])
    p.add_argument("--source", choices=["phantom", "cine"], default="phantom")
    # The latencies are read back from per-frame findings in the outbox: "frame" (the default here) keeps them
    # there; "both" also runs the exam tracker (a live source's default is "exam", with no per-frame rows).
    p.add_argument("--results", choices=["frame", "both"], default="frame")
    p.add_argument("--cine", help="multi-frame DICOM to replay (with --source cine)")
    p.add_argument("--xray", help="a DICOM dropped into the cxr-pneumonia inbox (both models are loaded either way)")
    p.add_argument("--xray-at", type=float, default=0.0, help="seconds into the measured window to drop --xray")
    p.add_argument("--budget-ms", type=float, default=0.0, help="the live source's budget (0 = the manifest's)")
    p.add_argument("--fps", type=float, default=30.0)
    p.add_argument("--seconds", type=float, default=60.0, help="measured window")
    p.add_argument("--warmup-s", type=float, default=5.0, help="run before the window, not counted")
    p.add_argument("--engine", default="auto", choices=["auto", "onnxruntime", "openvino"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "int8"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sample-s", type=float, default=0.5, help="RSS sampling interval")
    return p


main = child_entry(build_parser, measure)

if __name__ == "__main__":
    raise SystemExit(main())
