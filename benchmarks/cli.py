"""`edge-bench`: run every benchmark in fresh processes, repeated, and write JSON, Markdown and PNG plots.

    edge-bench                      # the full run (about 15-20 minutes on 2 cores)
    edge-bench --quick --out DIR    # every kind but contention, small and once (under 2 minutes): CI checks it
    edge-bench --only engine,overhead --models fetal-head --engines openvino --threads 1,2,4
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks import SCHEMA_VERSION
from benchmarks.common import (CHECKOUT, CHEST_CR, CINE, DEFAULT_DATA, PROG, BenchError, ChildFailed, clean, data_file,
                               median_run, run_child, summarize)
from benchmarks.report import evaluate_targets, markdown, plot, validate

RUN_KINDS = ("engine", "overhead", "pipeline", "uplink", "decode", "study", "startup", "contention")  # benchmark_app runs with engine


@dataclass
class Settings:
    quick: bool
    kinds: list[str]
    models: list[str]
    engines: list[str]
    threads: list[int]
    repeats: int
    pipeline_repeats: int
    pipeline_seconds: float
    backlog: int
    data: Path | None
    out: Path
    engine_seconds: float = 2.0
    overhead_rounds: int = 200
    decode_runs: int = 3
    decode_frames: int = 30

    def as_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


@dataclass
class Run:
    """What a run collects: results by kind, plus what was skipped or failed and why."""

    results: dict[str, Any] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    t0: float = field(default_factory=time.monotonic)

    def log(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.0f}s] {text}", file=sys.stderr, flush=True)

    def child(self, kind: str, args: list[str], timeout: float, label: str) -> dict[str, Any] | None:
        self.log(f"{kind}: {label}")
        try:
            return run_child(kind, args, timeout)
        except ChildFailed as exc:
            self.errors.append({"kind": kind, "reason": str(exc)})
            self.log(f"  failed: {exc}")
            return None


# ------------------------------------------------------------------ arguments
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Benchmarks of edge-runtime: engines, runtime overhead, the daemon "
                                "under a live feed, uplink drain and DICOM decode.", epilog=__doc__.split("\n\n")[1])
    p.add_argument("--quick", action="store_true", help="every kind but contention, small and once: under 2 minutes (CI)")
    p.add_argument("--out", help="output folder (default: benchmarks/results/<date>-<host> in a checkout)")
    p.add_argument("--only", help=f"comma-separated kinds: {','.join(RUN_KINDS)} (default: all)")
    p.add_argument("--models", help="comma-separated model names (default: every installed model)")
    p.add_argument("--engines", help="comma-separated engines: onnxruntime,openvino (default: both)")
    p.add_argument("--threads", help="comma-separated intra-op thread counts for the engine benchmark (default 1,2; quick: 2)")
    p.add_argument("--repeats", type=int, help="fresh-process repeats per measurement (default 3; quick: 1)")
    p.add_argument("--pipeline-repeats", type=int, help="repeats of each daemon scenario (default 2; quick: 1)")
    p.add_argument("--pipeline-seconds", type=float, help="measured window of each daemon scenario (default 60; quick: 8)")
    p.add_argument("--backlog", type=int, help="findings in the uplink backlog (default 100000; quick: 2000)")
    p.add_argument("--data", help="the shared data folder (default ../shared/data beside the checkout)")
    return p


def _csv(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def parse_settings(args: argparse.Namespace) -> Settings:
    """Check every input before anything runs; a bad one is a BenchError naming it."""
    from edge_runtime.engines import KINDS as ENGINE_KINDS
    from edge_runtime.registry import ModelRegistry

    quick = args.quick
    kinds = _csv(args.only) or list(RUN_KINDS)
    for k in kinds:
        if k not in RUN_KINDS:
            raise BenchError(f"--only: unknown benchmark {k!r}; allowed: {', '.join(RUN_KINDS)}")
    installed = ModelRegistry().names()
    models = _csv(args.models) or installed
    for m in models:
        if m not in installed:
            raise BenchError(f"--models: unknown model {m!r}; installed models: {', '.join(installed) or 'none'}")
    engines = _csv(args.engines) or list(ENGINE_KINDS)
    for e in engines:
        if e not in ENGINE_KINDS:
            raise BenchError(f"--engines: unknown engine {e!r}; allowed: {', '.join(ENGINE_KINDS)}")
    try:
        threads = [int(t) for t in (_csv(args.threads) or (["2"] if quick else ["1", "2"]))]
    except ValueError:
        raise BenchError(f"--threads: {args.threads!r} is not a comma-separated list of integers") from None
    if any(t < 0 for t in threads):
        raise BenchError(f"--threads: {args.threads!r}: thread counts must be 0 (engine default) or more")
    for name in ("repeats", "pipeline_repeats", "backlog"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise BenchError(f"--{name.replace('_', '-')}: must be at least 1, got {value}")
    if args.pipeline_seconds is not None and args.pipeline_seconds <= 0:
        raise BenchError(f"--pipeline-seconds: must be positive, got {args.pipeline_seconds}")
    if args.data:
        data = Path(args.data)
        if not data.is_dir():
            raise BenchError(f"--data: {data}: no such folder")
    else:
        data = DEFAULT_DATA
    stamp = f"{datetime.now().strftime('%Y-%m-%d')}-{socket.gethostname()}"
    base = CHECKOUT / "benchmarks" / "results" if CHECKOUT else Path.cwd() / "edge-bench-results"
    out = Path(args.out) if args.out else (base / "tmp" / f"{stamp}-quick" if quick else base / stamp)
    s = Settings(quick=quick, kinds=kinds, models=models, engines=engines, threads=threads,
                 repeats=args.repeats or (1 if quick else 3), pipeline_repeats=args.pipeline_repeats or (1 if quick else 2),
                 pipeline_seconds=args.pipeline_seconds or (8.0 if quick else 60.0),
                 backlog=args.backlog or (2000 if quick else 100_000), data=data, out=out)
    if quick:
        s.engine_seconds, s.overhead_rounds, s.decode_runs, s.decode_frames = 0.5, 40, 2, 1
    return s


# ------------------------------------------------------------------ engine and benchmark_app
def engine_jobs(s: Settings) -> list[dict[str, Any]]:
    from edge_runtime.engines import available_devices
    from edge_runtime.registry import ModelRegistry

    registry = ModelRegistry()
    jobs = []
    devices = {}
    for kind in s.engines:
        try:
            devices[kind] = [d for d in available_devices(kind) if d != "OpenVINO"]  # ORT's OpenVINO EP: see openvino rows
        except ImportError:
            devices[kind] = []
    for model in s.models:
        manifest = registry.get(model)
        for v in manifest.variants:
            if s.quick and v.precision != "fp32":
                continue
            for kind in s.engines:
                if kind not in v.engines:
                    continue
                for device in devices[kind]:
                    for threads in s.threads:
                        jobs.append({"model": model, "variant": v.id, "engine": kind, "device": device, "threads": threads,
                                     "path": v.path, "shape": manifest.input.shape})
    return jobs


def run_engine(s: Settings, run: Run) -> None:
    jobs = engine_jobs(s)
    runs: dict[int, list[dict[str, Any]]] = {i: [] for i in range(len(jobs))}
    for r in range(s.repeats):  # repeats outermost: background load spreads over every job alike
        for i, job in enumerate(jobs):
            args = ["--model", job["model"], "--engine", job["engine"], "--variant", job["variant"], "--device", job["device"],
                    "--threads", str(job["threads"]), "--seconds", str(s.engine_seconds)]
            if s.quick:
                args += ["--warmup", "5", "--min-iters", "20"]
            res = run.child("engine", args, 180, f"{job['model']} {job['variant']} {job['engine']}/{job['device']} "
                            f"{job['threads']} thread(s) ({r + 1}/{s.repeats})")
            if res:
                runs[i].append(res)
    results = []
    for i, job in enumerate(jobs):
        if not runs[i]:
            continue
        rs = runs[i]
        first = rs[0]
        rec = {k: first[k] for k in ("model", "variant", "engine", "device", "precision", "compute_precision",
                                     "precision_hint", "threads", "file")}
        rec["session_creation_ms"] = summarize([x["session_creation_ms"] for x in rs])
        rec["first_inference_ms"] = summarize([x["first_inference_ms"] for x in rs])
        for q in ("avg", "min", "max", "p50", "p90", "p95", "p99", "p99_9"):
            rec[f"{q}_ms"] = summarize([x["latency_ms"][q] for x in rs])
        for k in ("throughput_ips", "cpu_percent", "peak_rss_mb", "iterations"):
            rec[k] = summarize([x[k] for x in rs])
        rec["cdf_ms"] = median_run(rs, lambda x: x["latency_ms"]["p50"])["cdf_ms"]
        rec["_job"] = job
        results.append(rec)
    run.results["engine"] = results
    if "openvino" in s.engines:
        run_benchmark_app(s, run, results)


def run_benchmark_app(s: Settings, run: Run, engine_results: list[dict[str, Any]]) -> None:
    from benchmarks.overhead import run_benchmark_app as bench_app

    top = max(s.threads)
    rows = [e for e in engine_results if e["engine"] == "openvino" and e["device"] == "CPU" and e["threads"] == top]
    if s.quick:
        rows = rows[:1]
    plan = [(e, "f32") for e in rows] + [(e, None) for e in rows if e["precision"] == "fp32" and not s.quick]
    measured: dict[int, list[dict[str, Any]]] = {i: [] for i in range(len(plan))}
    for r in range(s.repeats):
        for i, (e, precision) in enumerate(plan):
            job = e["_job"]
            run.log(f"benchmark_app: {e['model']} {e['variant']} {top} thread(s), precision {precision or 'default'} "
                    f"({r + 1}/{s.repeats})")
            try:
                measured[i].append(bench_app(Path(job["path"]), tuple(job["shape"]), top, s.engine_seconds, precision))
            except BenchError as exc:
                run.errors.append({"kind": "benchmark_app", "reason": str(exc)})
    out = []
    for i, (e, precision) in enumerate(plan):
        rs = measured[i]
        if not rs:
            continue
        p50 = summarize([x["p50"] for x in rs])
        ours = e["p50_ms"]["median"] if precision else None  # only the f32 rows have matching settings
        out.append({"model": e["model"], "variant": e["variant"], "threads": top, "precision": precision or "default",
                    "compute_precision": rs[0]["compute_precision"], "p50_ms": p50,
                    "avg_ms": summarize([x.get("avg") for x in rs]),
                    "first_inference_ms": summarize([x.get("first_inference_ms") for x in rs]),
                    "throughput_ips": summarize([x.get("throughput_ips") for x in rs]),
                    "edge_bench_p50_ms": e["p50_ms"] if precision else None,
                    "ratio": ours / p50["median"] if ours else None, "command": rs[0]["command"]})
    run.results["benchmark_app"] = out


# ------------------------------------------------------------------ overhead
def run_overhead(s: Settings, run: Run) -> None:
    from edge_runtime.engines import resolve_auto
    from edge_runtime.registry import ModelRegistry

    cr = data_file(s.data, CHEST_CR)
    if cr is None:
        run.notes.append("overhead: cxr-pneumonia ran on a synthetic 1955x1841 radiograph (shared chest CR not found)")
    auto = resolve_auto()
    engines = [auto] if s.quick else s.engines
    top = max(s.threads) or 2
    jobs = []
    for model in s.models:
        manifest = ModelRegistry().get(model)
        # FP32 on every engine; in a full run also the INT8 variant `auto` would step down to (what a 2-core board runs)
        plan = [(e, "fp32") for e in engines] + [(auto, "int8")] * (not s.quick)
        for engine, precision in plan:
            if precision == "int8" and not any(v.precision == "int8" and engine in v.engines for v in manifest.variants):
                continue
            args = ["--model", model, "--engine", engine, "--threads", str(top), "--rounds", str(s.overhead_rounds),
                    "--precision", precision]
            if manifest.task == "classification" and cr is not None:
                args += ["--image", str(cr)]
            jobs.append((f"{model} {precision} on {engine}", args))
            if manifest.task == "segmentation" and precision == "int8":  # a live source's default (issue 20)
                jobs.append((f"{model} {precision} on {engine}, exam mode", args + ["--results", "exam"]))
    runs: dict[int, list[dict[str, Any]]] = {i: [] for i in range(len(jobs))}
    for r in range(s.repeats):
        for i, (label, args) in enumerate(jobs):
            res = run.child("overhead", args, 300, f"{label} ({r + 1}/{s.repeats})")
            if res:
                runs[i].append(res)
    results = []
    for rs in runs.values():
        if not rs:
            continue
        first = rs[0]
        rec = {k: first[k] for k in ("model", "engine", "variant", "device", "compute_precision", "threads", "rounds")}
        rec["results"] = first.get("results", "frame")
        rec["input"] = Path(first["input"]).name if first["input"].endswith(".dcm") else first["input"]
        rec["ratio_p50"] = summarize([x["ratio_p50"] for x in rs])
        rec["ratio_p50_ci95"] = median_run(rs, lambda x: x["ratio_p50"])["ratio_p50_ci95"]
        for side in ("runtime", "bare"):
            for q in ("p50", "p99"):
                rec[f"{side}_{q}_ms"] = summarize([x[f"{side}_ms"][q] for x in rs])
        rec["stages_p50_ms"] = {k: summarize([x["stages_p50_ms"][k] for x in rs]) for k in first["stages_p50_ms"]}
        results.append(rec)
    run.results["overhead"] = results


# ------------------------------------------------------------------ pipeline
def pipeline_scenarios(s: Settings, run: Run) -> list[tuple[str, list[str]]]:
    """The best variant (INT8 configured: the target's scenario) on the phantom and the shared cine; the default
    configuration (FP32, the budget controller stepping down); FP32 pinned; and INT8 with a chest CR study decoded
    mid-stream. Both models are loaded in every scenario."""
    seconds, warmup = s.pipeline_seconds, (2.0 if s.quick else 5.0)
    base = ["--seconds", str(seconds), "--warmup-s", str(warmup), "--threads", str(2)]
    int8 = base + ["--precision", "int8"]
    scenarios = [("phantom, int8", ["--source", "phantom"] + int8)]
    if s.quick:
        return scenarios
    cine, cr = data_file(s.data, CINE), data_file(s.data, CHEST_CR)
    if cine:
        scenarios.append(("cine, int8", ["--source", "cine", "--cine", str(cine)] + int8))
    else:
        run.skipped.append({"kind": "pipeline", "reason": f"cine scenario: {CINE} not found in the shared data"})
    scenarios.append(("phantom, fp32 configured", ["--source", "phantom"] + base + ["--precision", "fp32"]))
    # fp32 held at level 0 (a budget the controller never reaches): does the FP32 variant itself fit 30 fps?
    pinned = ["--seconds", str(max(10.0, seconds / 2)), "--warmup-s", str(warmup), "--threads", "2", "--budget-ms", "100000"]
    scenarios.append(("phantom, fp32 pinned", ["--source", "phantom"] + pinned))
    if cr:
        scenarios.append(("phantom+xray, int8", ["--source", "phantom", "--xray", str(cr), "--xray-at", str(seconds / 3)] + int8))
    else:
        run.skipped.append({"kind": "pipeline", "reason": f"phantom+xray scenario: {CHEST_CR} not found in the shared data"})
    return scenarios


def run_pipeline(s: Settings, run: Run) -> None:
    scenarios = pipeline_scenarios(s, run)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in scenarios}
    for r in range(s.pipeline_repeats):
        for name, args in scenarios:
            res = run.child("pipeline", args, s.pipeline_seconds * 2 + 120, f"{name} ({r + 1}/{s.pipeline_repeats})")
            if res and res["live"].get("findings"):
                runs[name].append(res)
            elif res:
                run.errors.append({"kind": "pipeline", "reason": f"{name}: no fetal-head findings in the window"})
    results = []
    for name, rs in runs.items():
        if not rs:
            continue
        mid = median_run(rs, lambda x: x["live"]["latency_ms"]["p99"])
        lat = lambda q: summarize([x["live"]["latency_ms"][q] for x in rs])  # noqa: E731
        count = lambda k: summarize([x["counts"][k] for x in rs])  # noqa: E731
        rec = {"scenario": name, "source": mid["source"], "engine": mid["live"]["model"]["engine"],
               "compute_precision": mid["live"]["model"]["compute_precision"], "configured_precision": mid["precision"],
               "threads": mid["threads"], "budget_ms": mid["budget_ms"], "seconds": mid["seconds"], "fps": mid["fps"],
               "variants_used": sorted({v for x in rs for v in x["live"]["variants"]}),
               "e2e_p50_ms": lat("p50"), "e2e_p90_ms": lat("p90"), "e2e_p99_ms": lat("p99"), "e2e_max_ms": lat("max"),
               "over_budget": summarize([x["live"]["over_budget"] for x in rs]),
               "budget_misses": count("budget_misses"), "dropped": count("dropped"), "late": count("late"),
               "switches": summarize([x["counts"]["switches_down"] + x["counts"]["switches_up"] for x in rs]),
               "switches_including_warmup": summarize([x["counts_including_warmup"]["switches_down"]
                                                       + x["counts_including_warmup"]["switches_up"] for x in rs]),
               "fps_in": summarize([x["fps_in"] for x in rs]), "findings_per_s": summarize([x["findings_per_s"] for x in rs]),
               "cpu_percent": summarize([x["cpu_percent"] for x in rs]), "peak_rss_mb": summarize([x["peak_rss_mb"] for x in rs]),
               "ready_s": summarize([x["ready_s"] for x in rs]),
               "stages_p50_ms": {k: summarize([x["live"]["stages_p50_ms"][k] for x in rs]) for k in mid["live"]["stages_p50_ms"]},
               "variants": {v: {"findings": d["findings"], "p50_ms": d["latency_ms"]["p50"], "p99_ms": d["latency_ms"]["p99"],
                                "max_ms": d["latency_ms"]["max"], "cdf_ms": d["cdf_ms"]} for v, d in mid["live"]["variants"].items()},
               "switch_log": mid["switches"], "levels": mid["levels"], "models_loaded": mid["models_loaded"],
               "head_circumference_median_mm": mid["live"].get("head_circumference_median_mm"),
               "rss_series": mid["rss_series"], "rss_series_columns": mid["rss_series_columns"], "study": mid["study"]}
        results.append(rec)
    run.results["pipeline"] = results


# ------------------------------------------------------------------ uplink, decode, startup
def run_uplink(s: Settings, run: Run) -> None:
    from edge_runtime.local_broker import find_mosquitto

    if find_mosquitto() is None:
        run.skipped.append({"kind": "uplink", "reason": "mosquitto binary not found (apt install mosquitto)"})
        return
    args = ["--findings", str(s.backlog)] + (["--live-s", "2", "--quick"] if s.quick else [])
    rs = [res for r in range(min(s.repeats, 2))
          if (res := run.child("uplink", args, 900, f"{s.backlog:,} findings ({r + 1})"))]
    if not rs:
        return
    mid = median_run(rs, lambda x: x["findings_per_s"])
    live = lambda q: summarize([(x["live"].get("commit_to_puback_ms") or {}).get(q) for x in rs])  # noqa: E731
    run.results["uplink"] = {
        "findings": s.backlog, "inflight_window": mid["inflight_window"], "payload_bytes_avg": mid["payload_bytes_avg"],
        "findings_per_s": summarize([x["findings_per_s"] for x in rs]),
        "steady_findings_per_s": summarize([x["steady_findings_per_s"] for x in rs]),
        "drain_s": summarize([x["drain_s"] for x in rs]),
        "publish_p50_ms": summarize([x["publish_to_puback_ms"]["p50"] for x in rs]),
        "publish_p99_ms": summarize([x["publish_to_puback_ms"]["p99"] for x in rs]),
        "live_rate_per_s": mid["live"].get("rate_per_s"), "live_p50_ms": live("p50"), "live_p99_ms": live("p99"),
        "fill_findings_per_s": summarize([x["fill_findings_per_s"] for x in rs]),
        "cpu_percent": summarize([x["cpu_percent"] for x in rs]),
        "received": summarize([x["consumer"].get("unique", 0) for x in rs]),
        "lost": summarize([x["expected_at_consumer"] - x["consumer"].get("unique", 0) for x in rs]),
        "require_subscriber": mid["require_subscriber"], "broker": mid["broker"],
        "drain_curve": mid["drain_curve"], "drain_curve_columns": mid["drain_curve_columns"],
        # end to end (issue 21): receipts-on drain, link windows after a long outage, a simulated fleet
        "receipts_findings_per_s": summarize([(x.get("receipts") or {}).get("findings_per_s") for x in rs]),
        "link_windows": mid.get("link_windows"), "fleet": mid.get("fleet"),
    }


def run_decode(s: Settings, run: Run) -> None:
    folder = s.data / "dicom" if s.data else None
    if folder is None or not folder.is_dir():
        run.skipped.append({"kind": "decode", "reason": "the shared DICOM folder (../shared/data/dicom) was not found"})
        return
    args = ["--dicom", str(folder), "--runs", str(s.decode_runs), "--max-frames", str(s.decode_frames)]
    rs = [res for r in range(s.repeats) if (res := run.child("decode", args, 600, f"{folder} ({r + 1}/{s.repeats})"))]
    if not rs:
        return
    files = {}
    for name, first in rs[0]["files"].items():
        if "error" in first:
            files[name] = first
            continue
        each = [x["files"][name] for x in rs if "error" not in x["files"][name]]
        files[name] = {k: first[k] for k in ("transfer_syntax", "transfer_syntax_uid", "modality", "rows", "cols", "frames",
                                            "frames_timed", "samples_per_pixel", "bits_stored", "photometric")}
        for k in ("open_ms", "decode_ms_per_frame", "display_ms_per_frame", "ms_per_frame", "ms_per_megapixel"):
            files[name][k] = summarize([f[k] for f in each])
        reduced = [f["reduced"] for f in each if f.get("reduced") and "error" not in f["reduced"]]
        if reduced:  # imaging.resolution: full vs reduced, each up to the model's input tensor
            files[name]["reduced"] = {k: reduced[0][k] for k in ("model", "path", "decoded_size", "reason")}
            for k in ("full_to_tensor_ms", "reduced_to_tensor_ms", "speedup"):
                files[name]["reduced"][k] = summarize([r[k] for r in reduced])
    by_syntax: dict[str, list[dict[str, Any]]] = {}
    for f in files.values():
        if "error" not in f:
            by_syntax.setdefault(f["transfer_syntax"], []).append(f)
    table = []
    for syntax, fs in by_syntax.items():
        fs = sorted(fs, key=lambda f: med_of(f, "ms_per_frame"))
        mid = fs[(len(fs) - 1) // 2]  # the median file: its decode and display add up to its total
        table.append({"transfer_syntax": syntax, "files": len(fs), "median_file_ms_per_frame": med_of(mid, "ms_per_frame"),
                      "decode_ms": med_of(mid, "decode_ms_per_frame"), "display_ms": med_of(mid, "display_ms_per_frame"),
                      "ms_per_megapixel": med_of(mid, "ms_per_megapixel"), "median_file_size": f"{mid['rows']}x{mid['cols']}",
                      "min_ms": med_of(fs[0], "ms_per_frame"), "max_ms": med_of(fs[-1], "ms_per_frame")})
    table.sort(key=lambda d: d["median_file_ms_per_frame"])
    run.results["decode"] = {"folder": str(folder), "runs_per_process": s.decode_runs, "max_frames": s.decode_frames,
                             "files": files, "by_transfer_syntax": table}


def run_study(s: Settings, run: Run) -> None:
    """Radiographs file to committed finding through the daemon's study worker, reduced and full decode
    (imaging.reduced_decode), once each: the copies inside a run are the repeats."""
    folder = s.data / "dicom" if s.data else None
    if folder is None or not folder.is_dir():
        run.skipped.append({"kind": "study", "reason": "the shared DICOM folder (../shared/data/dicom) was not found"})
        return
    args = ["--dicom", str(folder), "--runs", "2" if s.quick else "7"] + (["--only", "RG1_J2KR"] if s.quick else [])
    out = {}
    for mode, extra in (("reduced", []), ("full", ["--full-decode"])):
        res = run.child("study", args + extra, 900, f"radiographs, {mode} decode")
        if res:
            out[mode] = res
    if out:
        run.results["study"] = out


def med_of(f: dict[str, Any], key: str) -> float:
    return f[key]["median"]


def run_startup(s: Settings, run: Run) -> None:
    seconds = "1" if s.quick else "2"
    rs = [res for r in range(s.repeats) if (res := run.child("startup", ["--seconds", seconds], 180, f"demo ({r + 1}/{s.repeats})"))]
    if rs:
        run.results["startup"] = {"command": rs[0]["command"], "ready_s": summarize([x["ready_s"] for x in rs]),
                                  "launch_to_ready_s": summarize([x["launch_to_ready_s"] for x in rs]),
                                  "exit_status": [x["exit_status"] for x in rs], "variants": rs[0]["variants"]}


def run_contention(s: Settings, run: Run) -> None:
    """Once, not repeated: its busy loops saturate the machine for half a minute, and every scenario after it would
    start on a machine still cooling down. The quick run leaves it out (it alone needs most of a minute)."""
    if s.quick:
        run.skipped.append({"kind": "contention", "reason": "not in the quick run (about a minute on its own): "
                                                            "python -m benchmarks.contention --quick"})
        return
    res = run.child("contention", ["--threads", "2"], 300, "phantom, fp32 configured, busy loops mid-run")
    if res:
        run.results["contention"] = res


RUNNERS = {"engine": run_engine, "overhead": run_overhead, "pipeline": run_pipeline, "uplink": run_uplink,
           "decode": run_decode, "study": run_study, "startup": run_startup, "contention": run_contention}


# ------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        s = parse_settings(args)
        s.out.mkdir(parents=True, exist_ok=True)
    except BenchError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{PROG}: --out: {args.out}: cannot create ({exc.strerror})", file=sys.stderr)
        return 2
    from benchmarks.machine import collect

    started = datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    run = Run()
    run.log(f"{PROG} {'quick' if s.quick else 'full'} run -> {s.out}")
    machine = collect()
    if s.data is None:
        run.notes.append("shared data not found: decode, the cine and X-ray scenarios are skipped")
    for kind in s.kinds:
        RUNNERS[kind](s, run)
    for e in run.results.get("engine", []):
        e.pop("_job", None)
    from edge_runtime.engines import resolve_auto
    from edge_runtime.errors import EngineError

    try:
        auto = resolve_auto()  # the daemon's engine here: the overhead target is judged on it
    except EngineError:
        auto = None
    if hasattr(os, "getloadavg"):
        machine["load_average_at_end"] = list(os.getloadavg())  # the machine may be shared: say how busy it was
    doc = {"schema": SCHEMA_VERSION, "tool": PROG, "mode": "quick" if s.quick else "full",
           "command": " ".join([PROG, *argv]), "started_at": started, "duration_s": time.monotonic() - run.t0,
           "machine": machine, "settings": s.as_dict() | {"auto_engine": auto}, "results": run.results,
           "targets": evaluate_targets(run.results, auto), "skipped": run.skipped, "errors": run.errors, "notes": run.notes}
    doc = clean(doc)
    plots, note = plot(doc, s.out)
    if note:
        doc["notes"].append(note)
    doc["duration_s"] = time.monotonic() - run.t0
    problems = validate(doc)
    (s.out / "results.json").write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    (s.out / "results.md").write_text(markdown(doc, plots))
    for t in doc["targets"]:
        print(f"{t['status']:>7}  {t['target']}: {t['measured']} (target {t['threshold']})")
    print(f"results: {s.out / 'results.json'}, {s.out / 'results.md'}" + (f", {len(plots)} plot(s)" if plots else ""))
    for p in problems:
        print(f"{PROG}: invalid output: {p}", file=sys.stderr)
    return 1 if problems or run.errors else 0


if __name__ == "__main__":
    sys.exit(main())
