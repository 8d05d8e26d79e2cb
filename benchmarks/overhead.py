"""Overhead benchmark: the runtime's whole per-frame path against the bare engine call, and OpenVINO's own tool.

Runtime path (decode already done, as for a live frame): `Predictor.predict` (preprocess, engine, head), then
with `--results frame` `build_finding` and `Outbox.commit` (SQLite WAL, synchronous=FULL: one fsync per finding);
with `--results exam` (a live source's default) what the daemon does per frame instead: the exam tracker's
`observe` and the live ring (edge_runtime/exams.py, live_results.py), no commit; the exam's own finding (key-frame
JPEG and one commit, once per exam) is timed apart as `exam_close_ms`. All the runtime's own code, loaded with the same engine options the daemon derives from its configuration. Bare engine:
`engine.run(x)` on the tensor `prepare` made from the same frame. The two alternate round by round (the order
rotating, `quantize.evaluate.measure_latency`), so background load hits both alike; the ratio of their p50s gets a
95 % bootstrap interval over the paired rounds.

`run_benchmark_app` runs OpenVINO's benchmark_app (shipped in the openvino wheel) with the runtime's settings
(CPU, one stream, N threads, synchronous API, INFERENCE_PRECISION_HINT f32) and parses its report.

    python -m benchmarks.overhead --model fetal-head --engine auto --threads 2
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import BenchError, child_entry, latency_stats


def input_frame(manifest, image: str | None) -> tuple[np.ndarray, tuple[float, float] | None, str]:
    """(display pixels, pixel spacing, modality): a real file when given, else what the model sees live."""
    if image:
        from edge_runtime.imaging.inputs import open_input

        inp = open_input(image)
        return inp.frame(0, manifest.windowing), inp.pixel_spacing_mm, inp.modality or manifest.modality[0]
    if manifest.task == "segmentation":
        from edge_runtime.sources.phantom import Phantom, PhantomSpec

        spec = PhantomSpec()
        return Phantom(spec).frame(0), (spec.pixel_spacing_mm,) * 2, "US"
    # A detector-sized synthetic radiograph (the shared chest CR is 1955 x 1841) when no file is available.
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:1955, 0:1841].astype(np.float32)
    img = 128 + 60 * np.sin(xx / 300) * np.cos(yy / 250) + rng.normal(0, 8, yy.shape)
    return np.clip(img, 0, 255).astype(np.uint8), None, manifest.modality[0]


def study_frame(manifest, image: str, hint):
    """A file decoded the way the study worker decodes it (imaging.reduced_decode: `hint`, None = whole), with how."""
    from edge_runtime.imaging.inputs import open_input

    inp = open_input(image, hint=hint)
    pixels, decoded = inp.decoded(0, manifest.windowing)
    return pixels, inp.pixel_spacing_mm, inp.modality or manifest.modality[0], decoded


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from edge_runtime.cli import engine_options, make_registry
    from edge_runtime.config import Config, DeviceSection, EngineSection
    from edge_runtime.engines import resolve_auto
    from edge_runtime.findings import DeviceIdentity, build_finding
    from edge_runtime.frames import Frame, StudyRef
    from edge_runtime.imaging.preprocess import prepare
    from edge_runtime.outbox import Outbox
    from edge_runtime.exams import ExamSettings, ExamTracker, exam_finding
    from edge_runtime.live_results import FrameResult, LiveResults
    from edge_runtime.pipeline import Predictor
    from quantize.evaluate import measure_latency, p50_ratio_ci

    kind = resolve_auto() if args.engine == "auto" else args.engine
    with tempfile.TemporaryDirectory(prefix="edge-bench-overhead-") as tmp:
        cfg = Config(device=DeviceSection(id="bench", site="bench", state_dir=tmp),
                     engine=EngineSection(kind=kind, precision=args.precision, threads=args.threads))
        predictor = Predictor.load(make_registry(cfg), args.model, kind, args.precision, engine_options(cfg, kind))
        manifest = predictor.manifest
        decoded = None
        if args.image:  # as the study worker decodes it: reduced to what the model needs unless --full-decode
            pixels, spacing, modality, decoded = study_frame(manifest, args.image,
                                                             None if args.full_decode else predictor.decode_hint())
        else:
            pixels, spacing, modality = input_frame(manifest, args.image)
        x, _ = prepare(pixels, manifest.preprocess)
        identity = DeviceIdentity("bench", "bench")
        after = "exam_and_ring" if args.results == "exam" else "finding_and_commit"
        stages: dict[str, list[float]] = {"preprocess": [], "inference": [], "postprocess": [], after: []}
        tracker = ExamTracker("overhead", manifest.task, ExamSettings())
        live = LiveResults()
        budget_ms = manifest.latency_budget_ms
        index = iter(range(1 << 30))
        with Outbox.from_config(cfg) as outbox:

            def keep_local(frame: Frame, prediction) -> None:
                """What the daemon's live worker does with a frame in exam mode (Service._keep_local)."""
                tracker.observe(frame, predictor.ref, prediction.head, prediction.capture_to_result_ms, budget_ms)
                r = prediction.head.result
                ms = prediction.capture_to_result_ms
                live.add(FrameResult(frame.study.frame_index, time.time(), predictor.variant.id, ms, ms <= budget_ms,
                                     bool(r.get("assessed", True)), bool(r.get("detected", False)),
                                     r.get("measurements", {}).get("head_circumference_mm"), r.get("ellipse"),
                                     tracker.exam.exam_id if tracker.exam is not None else None))

            def runtime_path(_: Any) -> None:
                frame = Frame(pixels, "bench", "overhead", captured_at=time.monotonic(), pixel_spacing_mm=spacing,
                              study=StudyRef(modality=modality, frame_index=next(index)), decode=decoded)
                prediction = predictor.predict(frame)
                t0 = time.perf_counter()
                if args.results == "exam":
                    keep_local(frame, prediction)
                else:
                    finding = build_finding(identity=identity, seq=0, frame=frame, model=predictor.ref,
                                            head=prediction.head, capture_to_result_ms=prediction.capture_to_result_ms,
                                            budget_ms=budget_ms)
                    outbox.commit(finding)
                stages[after].append((time.perf_counter() - t0) * 1000.0)
                for stage in ("preprocess", "inference", "postprocess"):
                    stages[stage].append(frame.timings_ms[stage])

            def bare_engine(_: Any) -> None:
                predictor.engine.run(x)

            lat = measure_latency({"runtime": runtime_path, "bare": bare_engine}, x, runs=args.rounds, warmup=args.warmup)
            exam_close_ms = None
            if args.results == "exam" and tracker.open:  # once per exam: aggregate, key-frame JPEG, one commit
                t0 = time.perf_counter()
                for summary in tracker.flush("stop"):
                    outbox.commit(exam_finding(summary, identity, budget_ms))
                exam_close_ms = (time.perf_counter() - t0) * 1000.0
        ratio, lo, hi = p50_ratio_ci(lat["runtime"], lat["bare"])
        ref = predictor.ref
        predictor.engine.close()
    return {
        "model": manifest.name, "variant": ref.variant, "engine": ref.engine, "device": ref.device,
        "precision": ref.precision, "compute_precision": ref.compute_precision, "threads": args.threads,
        "input": args.image or ("phantom frame" if manifest.task == "segmentation" else "synthetic radiograph"),
        "input_shape": list(pixels.shape), "rounds": args.rounds, "warmup_rounds": args.warmup,
        "results": args.results, "exam_close_ms": exam_close_ms,
        "decode": decoded.to_dict() if decoded is not None else None,
        "runtime_ms": latency_stats(lat["runtime"]), "bare_ms": latency_stats(lat["bare"]),
        "ratio_p50": ratio, "ratio_p50_ci95": [lo, hi],
        "stages_p50_ms": {k: float(np.median(v[-args.rounds:])) for k, v in stages.items()},
    }


# ------------------------------------------------------------------ OpenVINO benchmark_app
_BENCHMARK_APP = "import sys; from openvino.tools.benchmark.main import main; sys.argv[0] = 'benchmark_app'; sys.exit(main())"
_TIME = r"\s+([\d.]+)\s*(ms|us|s)\b"  # benchmark_app prints fast models' latencies in us
_FIELDS = {
    "first_inference_ms": r"First inference took" + _TIME,
    "duration_ms": r"Duration:" + _TIME,
    "p50": r"Median:" + _TIME,
    "avg": r"Average:" + _TIME,
    "min": r"Min:" + _TIME,
    "max": r"Max:" + _TIME,
}
_TO_MS = {"ms": 1.0, "us": 1e-3, "s": 1e3}


def benchmark_app_command(model: Path, shape: tuple[int, ...], threads: int, seconds: float, precision: str | None) -> list[str]:
    """benchmark_app with the runtime's OpenVINO settings: CPU, 1 stream (= PERFORMANCE_HINT LATENCY), N threads,
    synchronous requests, the given INFERENCE_PRECISION_HINT (None = OpenVINO's default for the device)."""
    cmd = [sys.executable, "-c", _BENCHMARK_APP, "-m", str(model), "-d", "CPU", "-hint", "none", "-nstreams", "1",
           "-api", "sync", "-t", f"{max(1, round(seconds))}", "-shape", "[" + ",".join(map(str, shape)) + "]"]
    if threads:
        cmd += ["-nthreads", str(threads)]
    if precision:
        cmd += ["-infer_precision", precision]
    return cmd


def parse_benchmark_app(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, pattern in _FIELDS.items():
        found = re.search(pattern, text)
        if found:
            out[key] = float(found.group(1)) * _TO_MS[found.group(2)]
    for key, pattern in (("iterations", r"Count:\s+(\d+)\s+iterations"), ("throughput_ips", r"Throughput:\s+([\d.]+)\s*FPS")):
        found = re.search(pattern, text)
        if found:
            out[key] = float(found.group(1))
    used = re.search(r"INFERENCE_PRECISION_HINT:\s*<Type: '(\w+)'>", text)
    out["compute_precision"] = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}.get(used.group(1), used.group(1)) if used else None
    if "p50" not in out:
        raise BenchError(f"benchmark_app printed no latency report: {text.strip().splitlines()[-1] if text.strip() else 'nothing'}")
    return out


def run_benchmark_app(model: Path, shape: tuple[int, ...], threads: int, seconds: float, precision: str | None,
                      timeout: float = 120.0) -> dict[str, Any]:
    cmd = benchmark_app_command(model, shape, threads, seconds, precision)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise BenchError(f"benchmark_app on {model.name}: no result within {timeout:.0f} s") from None
    result = parse_benchmark_app(proc.stdout + proc.stderr)
    result["command"] = "benchmark_app " + " ".join(cmd[3:])
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--engine", default="auto", choices=["auto", "onnxruntime", "openvino"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "int8"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--image", help="a DICOM/PNG/JPEG file as the decoded input (default: phantom or synthetic frame)")
    p.add_argument("--results", default="frame", choices=["frame", "exam"],
                   help="frame: a finding committed per frame; exam: per-frame results stay local (exam mode)")
    p.add_argument("--full-decode", action="store_true", help="--image decoded whole (imaging.reduced_decode = false)")
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    return p


main = child_entry(build_parser, measure)

if __name__ == "__main__":
    raise SystemExit(main())
