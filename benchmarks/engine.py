"""Engine benchmark: one model variant on one engine, device and thread count, in this (fresh) process.

Reports what onnxruntime_perf_test reports: session creation, first inference, latency avg/min/max and
p50/p90/p95/p99/p99.9, throughput, peak RSS and CPU%. The engine is loaded through the runtime's own backend
(`edge_runtime.engines.load_engine`, no warm-up there so the first inference is seen), then `--warmup` runs are
discarded and the timed loop runs for at least `--seconds` and `--min-iters` (at most `--max-iters`). The input is
random, as benchmark_app and onnxruntime_perf_test fill it.

    python -m benchmarks.engine --model fetal-head --engine openvino --variant fp32 --threads 2
"""
from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from benchmarks.common import BenchError, CpuMeter, cdf_points, child_entry, latency_stats, peak_rss_mb


def find_variant(manifest, variant_id: str, engine: str):
    for v in manifest.variants:
        if v.id == variant_id:
            if engine not in v.engines:
                raise BenchError(f"{manifest.name}: variant {variant_id!r} does not run on {engine} (it runs on {', '.join(v.engines)})")
            return v
    have = ", ".join(v.id for v in manifest.variants)
    raise BenchError(f"{manifest.name}: unknown variant {variant_id!r}; variants: {have}")


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from edge_runtime.engines import EngineOptions, load_engine
    from edge_runtime.registry import ModelRegistry, verify_variant

    manifest = ModelRegistry().get(args.model)
    variant = find_variant(manifest, args.variant, args.engine)
    verify_variant(manifest, variant)
    shape = tuple(manifest.input.shape)
    options = EngineOptions(devices=(args.device,), threads=args.threads or None, precision_hint=args.hint,
                            warmup_runs=0, allow_spinning=args.allow_spinning)
    engine = load_engine(args.engine, variant.path, shape, options)  # warmup_runs=0: nothing has run yet
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    t0 = time.perf_counter()
    engine.run(x)
    first_ms = (time.perf_counter() - t0) * 1000.0
    for _ in range(args.warmup):
        engine.run(x)
    times: list[float] = []
    cpu = CpuMeter()
    start = time.perf_counter()
    while len(times) < args.max_iters:
        t0 = time.perf_counter()
        engine.run(x)
        t1 = time.perf_counter()
        times.append((t1 - t0) * 1000.0)
        if len(times) >= args.min_iters and t1 - start >= args.seconds:
            break
    total_s = time.perf_counter() - start
    cpu_percent = cpu.percent()
    engine.close()
    return {
        "model": manifest.name, "variant": variant.id, "engine": args.engine, "device": engine.device,
        "precision": variant.precision, "compute_precision": engine.precision,
        "precision_hint": args.hint if args.engine == "openvino" else None, "threads": args.threads,
        "file": variant.path.name, "input_shape": list(shape),
        "session_creation_ms": engine.load_ms, "first_inference_ms": first_ms,
        "warmup_runs": args.warmup, "iterations": len(times), "total_s": total_s,
        "latency_ms": latency_stats(times), "throughput_ips": len(times) / total_s,
        "cpu_percent": cpu_percent, "peak_rss_mb": peak_rss_mb(), "cdf_ms": cdf_points(times),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.engine", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--engine", required=True, choices=["onnxruntime", "openvino"])
    p.add_argument("--variant", required=True, help="variant id from the manifest (fp32, int8-qdq, int8-ov, ...)")
    p.add_argument("--device", default="CPU", help="CPU, GPU, NPU (openvino); CPU, CUDA, TensorRT, OpenVINO (onnxruntime)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads (0 = engine default)")
    p.add_argument("--hint", default="f32", help="OpenVINO INFERENCE_PRECISION_HINT (f32, f16, bf16, default)")
    p.add_argument("--allow-spinning", action="store_true", help="ONNX Runtime thread spin-wait (the runtime's default is off)")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--min-iters", type=int, default=100)
    p.add_argument("--max-iters", type=int, default=5000)
    return p


main = child_entry(build_parser, measure)

if __name__ == "__main__":
    raise SystemExit(main())
