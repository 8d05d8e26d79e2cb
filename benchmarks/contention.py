"""Contention benchmark: the daemon under a live 30 fps feed while CPU hogs come and go.

The pipeline benchmark's daemon (a live phantom or the shared cine into fetal-head, the cxr-pneumonia inbox
loaded too), FP32 configured so that the budget controller has every level to use. After the warm-up, `--hogs`
busy-loop processes (default: one per CPU) start `--hog-at` s into the window and are killed `--hog-for` s later;
the window goes on for `--after` s. Reported: every switch with its time from the hog's start and stop, how soon
the controller stepped down once the hog started, how long after the hog stopped it was back at the level it held
before (the target: 30 s), the probes it ran and the frames they cost (a frame captured during a probe is skipped,
never committed late), and the findings' latency before, during and after the hog, exact from the outbox.

    python -m benchmarks.contention             # 20 s before, 30 s of hogs, 40 s after
    python -m benchmarks.contention --quick     # under a minute: 5 s before, 12 s of hogs, 30 s after
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import BenchError, CpuMeter, child_entry, latency_stats, quiet_pydicom
from benchmarks.pipeline import LIVE_MODEL, build_config, read_findings

HOG = "while True: pass"


def start_hogs(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", HOG], stdin=subprocess.DEVNULL) for _ in range(n)]


def stop_hogs(hogs: list[subprocess.Popen]) -> None:
    for hog in hogs:
        hog.kill()
    for hog in hogs:
        hog.wait()


def phase_summary(findings: list[dict[str, Any]], seconds: float, budget_ms: float) -> dict[str, Any]:
    if not findings:
        return {"findings": 0, "seconds": seconds}
    total = [f["latency_ms"]["capture_to_result"] for f in findings]
    variants: dict[str, int] = {}
    for f in findings:
        variants[f["model"]["variant"]] = variants.get(f["model"]["variant"], 0) + 1
    return {"findings": len(findings), "seconds": seconds, "findings_per_s": len(findings) / seconds,
            "latency_ms": latency_stats(total), "over_budget": sum(1 for v in total if v > budget_ms),
            "variants": variants}


def recovery(switches: list[dict[str, Any]], level_before: int, hog_on: float, hog_off: float,
             level_at_off: int) -> dict[str, Any]:
    """When the controller first stepped down after the hog started, and how long after it stopped the controller
    was back at the level it held before (None: not within the window)."""
    down = next((s for s in switches if s["to"] > s["from"] and s["at"] >= hog_on), None)
    deepest = max([level_before] + [s["to"] for s in switches if hog_on <= s["at"] < hog_off])
    if level_at_off <= level_before:
        back = 0.0
    else:
        up = next((s for s in switches if s["at"] >= hog_off and s["to"] <= level_before), None)
        back = up["at"] - hog_off if up else None
    later_down = [s for s in switches if back is not None and s["at"] > hog_off + back and s["to"] > level_before]
    return {"level_before": level_before, "deepest_level": deepest, "level_at_hog_stop": level_at_off,
            "first_step_down_after_hog_start_s": down["at"] - hog_on if down else None,
            "back_up_after_hog_stop_s": back, "stepped_down_again_after": len(later_down)}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from edge_runtime.service import Service

    if args.quick:
        args.warmup_s, args.hog_at, args.hog_for, args.after = 3.0, 5.0, 12.0, 30.0
    for name in ("hog_for", "hog_at", "after", "warmup_s", "hogs"):
        value = getattr(args, name)
        if value < 0 or (name == "hog_for" and value == 0):
            raise BenchError(f"--{name.replace('_', '-')}: must be {'positive' if name == 'hog_for' else '0 or more'}, "
                             f"got {value:g}")
    quiet_pydicom()
    hogs_n = args.hogs or os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="edge-bench-contention-") as tmp:
        config = build_config(args, Path(tmp))
        live = config.sources[0].name
        service = Service(config)
        service.start()
        budget = service.budgets[live]
        hogs: list[subprocess.Popen] = []
        trace: list[list[float]] = []
        marks: dict[str, float] = {}
        seqs: dict[str, int] = {}
        counts: dict[str, dict[str, float]] = {}
        try:
            service.stop_event.wait(args.warmup_s)
            t0 = time.monotonic()
            seqs["begin"], counts["begin"] = service.outbox.stats()["next_seq"], controller_counts(budget)
            cpu = CpuMeter()
            end = t0 + args.hog_at + args.hog_for + args.after
            next_supervise = t0 + 2.0
            while (now := time.monotonic()) < end:
                if "hog_on" not in marks and now - t0 >= args.hog_at:
                    marks["hog_on"], marks["level_before"] = now, budget.index
                    seqs["hog_on"] = service.outbox.stats()["next_seq"]
                    hogs = start_hogs(hogs_n)
                if "hog_on" in marks and "hog_off" not in marks and now - marks["hog_on"] >= args.hog_for:
                    stop_hogs(hogs)
                    hogs = []
                    marks["hog_off"], marks["level_at_off"] = time.monotonic(), budget.index
                    seqs["hog_off"] = service.outbox.stats()["next_seq"]
                trace.append([round(now - t0, 2), budget.index])
                if now >= next_supervise:  # what run_forever does every 2 s
                    service.supervise_once()
                    next_supervise += 2.0
                service.stop_event.wait(args.sample_s)
            cpu_percent = cpu.percent()
            seqs["end"], counts["end"] = service.outbox.stats()["next_seq"], controller_counts(budget)
            switches = [{"at": s.at, "from": s.from_level, "to": s.to_level, "reason": s.reason}
                        for s in budget.switches]
            rounds = [{"at": r.started_at, "level": r.level, "result": r.result, "probes": len(r.estimates_ms),
                       "p95_ms": r.p95_ms, "limit_ms": r.limit_ms} for r in budget.rounds]
            levels = [level.describe() for level in budget.levels]
            budget_ms = budget.budget_ms
        finally:
            stop_hogs(hogs)
            stopped = service.stop()
        findings = [f for f in read_findings(service.outbox.path) if f["model"]["name"] == LIVE_MODEL]
    on, off = marks["hog_on"], marks["hog_off"]

    def between(a: str, b: str) -> list[dict[str, Any]]:
        return [f for f in findings if seqs[a] <= f["seq"] < seqs[b]]

    rel = lambda t: round(t - on, 2)  # noqa: E731
    delta = {k: counts["end"][k] - counts["begin"][k] for k in counts["end"]}
    return {
        "source": args.source, "fps": args.fps, "engine": args.engine, "precision": args.precision,
        "threads": args.threads, "hogs": hogs_n, "hog_at_s": args.hog_at, "hog_for_s": off - on,
        "after_s": args.after, "warmup_s": args.warmup_s, "levels": levels, "budget_ms": budget_ms,
        "stopped_cleanly": stopped == 0, "cpu_percent": cpu_percent,
        "recovery": recovery(switches, int(marks["level_before"]), on, off, int(marks["level_at_off"])),
        "switches": [s | {"t_from_hog_start_s": rel(s["at"]), "t_from_hog_stop_s": round(s["at"] - off, 2)}
                     for s in switches if s["at"] >= on - args.hog_at],
        "probe_rounds": [r | {"t_from_hog_start_s": rel(r["at"])} for r in rounds if r["at"] >= on - args.hog_at],
        "controller": delta,
        "probe_skipped_per_probe": delta["probe_skipped"] / delta["probes"] if delta["probes"] else None,
        "phases": {"before": phase_summary(between("begin", "hog_on"), args.hog_at, budget_ms),
                   "hog": phase_summary(between("hog_on", "hog_off"), off - on, budget_ms),
                   "after": phase_summary(between("hog_off", "end"), args.after, budget_ms)},
        "level_series": [[round(t - args.hog_at, 2), lv] for t, lv in trace],
        "level_series_columns": ["t_from_hog_start_s", "budget_level"],
    }


def controller_counts(budget) -> dict[str, float]:
    return {"probes": budget.probes, "probe_skipped": budget.probe_skipped, "late": budget.late,
            "rate_skipped": budget.rate_skipped, "misses": budget.misses,
            **{f"rounds_{k}": v for k, v in budget.round_counts.items()}}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.contention", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="5 s before, 12 s of hogs, 30 s after: under a minute")
    p.add_argument("--source", choices=["phantom", "cine"], default="phantom")
    p.add_argument("--cine", help="multi-frame DICOM to replay (with --source cine)")
    p.add_argument("--fps", type=float, default=30.0)
    p.add_argument("--hogs", type=int, default=0, help="busy-loop processes (0 = one per CPU)")
    p.add_argument("--hog-at", type=float, default=20.0, help="seconds into the window the hogs start")
    p.add_argument("--hog-for", type=float, default=30.0, help="seconds the hogs run")
    p.add_argument("--after", type=float, default=40.0, help="seconds measured after the hogs stop")
    p.add_argument("--warmup-s", type=float, default=5.0, help="run before the window, not counted")
    p.add_argument("--engine", default="auto", choices=["auto", "onnxruntime", "openvino"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "int8"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budget-ms", type=float, default=0.0, help="the live source's budget (0 = the manifest's)")
    p.add_argument("--sample-s", type=float, default=0.25, help="level sampling interval")
    p.set_defaults(xray=None, xray_at=0.0)
    return p


main = child_entry(build_parser, measure)

if __name__ == "__main__":
    raise SystemExit(main())
