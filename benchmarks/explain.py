"""Cost of explanations: inference with and without the class activation map output, and building one explanation.

1. Per engine and variant of a model with an [explanation] "cam" output: the shipped graph against the same graph
   with the output (and the nodes only it needs) removed, both loaded through the runtime's own backend
   (`edge_runtime.engines.load_engine`) and run with `run_all` (every output, as the gated pipeline runs them),
   interleaved in blocks in one process so drift and load hit both alike. Reports p50 of each, the extra ms, and
   the ratio of p50s with the spread of the per-block ratios.
2. Building one explanation (`edge_runtime.explain.cam_explanation`: map to the image, top-mass box, 16x16 grid,
   JPEG overlay) for a 224x224 Kermany image and for a 1955x1841 chest CR display image: that work happens only on
   findings that carry an explanation (urgent, needs_review, or infer --explain).

    python -m benchmarks.explain --model cxr-pneumonia --out benchmarks/results/explain.json
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import DEFAULT_DATA, BenchError
from benchmarks.machine import collect as machine_info


def strip_output(src: Path, dst: Path, output: str) -> None:
    """dst = src without the named output and the nodes nothing else needs (the graph as it was before the map)."""
    try:
        import onnx
    except ImportError:
        raise BenchError("onnx is needed to build the graph without the map: pip install onnx") from None
    model = onnx.load(str(src))
    graph = model.graph
    keep_outputs = [o for o in graph.output if o.name != output]
    if len(keep_outputs) == len(graph.output):
        raise BenchError(f"{src}: has no output {output!r}")
    needed = {o.name for o in keep_outputs}
    kept = []
    for node in reversed(list(graph.node)):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(node.input)
    del graph.output[:]
    graph.output.extend(keep_outputs)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    used = {i for n in graph.node for i in n.input}
    inits = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    onnx.save(model, str(dst))


def time_block(engine, x: np.ndarray, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        engine.run_all(x)
        out.append((time.perf_counter() - t0) * 1000.0)
    return out


def model_input(manifest, data: Path | None) -> tuple[np.ndarray, np.ndarray | None]:
    from edge_runtime.imaging.inputs import open_input
    from edge_runtime.imaging.preprocess import prepare

    image = None
    if data is not None:
        files = sorted((data / "cxr-kermany" / "train" / "PNEUMONIA").glob("*.jpeg"))
        if files:
            image = open_input(files[0]).frame(0, manifest.windowing)
    if image is None:
        image = np.random.default_rng(0).integers(0, 256, manifest.input.shape[2:], dtype=np.uint8)
    return prepare(image, manifest.preprocess)[0], image


def measure_inference(manifest, engines: list[str], threads: int, rounds: int, block: int) -> list[dict[str, Any]]:
    from edge_runtime.engines import EngineOptions, load_engine

    output = manifest.explanation.output
    x, _ = model_input(manifest, DEFAULT_DATA)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for v in manifest.variants:
            if v.format != "onnx":
                continue
            bare = Path(tmp) / f"{v.id}-without-{output}.onnx"
            strip_output(v.path, bare, output)
            for kind in engines:
                if kind not in v.engines:
                    continue
                options = EngineOptions(threads=threads, warmup_runs=20)
                pair = {"with": load_engine(kind, v.path, manifest.input.shape, options),
                        "without": load_engine(kind, bare, manifest.input.shape, options)}
                samples: dict[str, list[float]] = {"with": [], "without": []}
                ratios = []
                for r in range(rounds):
                    order = ("with", "without") if r % 2 == 0 else ("without", "with")
                    medians = {}
                    for key in order:
                        t = time_block(pair[key], x, block)
                        samples[key] += t
                        medians[key] = float(np.median(t))
                    ratios.append(medians["with"] / medians["without"])
                p50 = {k: float(np.median(s)) for k, s in samples.items()}
                rows.append({"variant": v.id, "precision": v.precision, "engine": kind,
                             "device": pair["with"].device, "compute_precision": pair["with"].precision,
                             "p50_ms_with": p50["with"], "p50_ms_without": p50["without"],
                             "extra_ms": p50["with"] - p50["without"], "ratio": p50["with"] / p50["without"],
                             "block_ratio_p05_p50_p95": [float(q) for q in np.percentile(ratios, [5, 50, 95])],
                             "runs_each": len(samples["with"])})
                for e in pair.values():
                    e.close()
    return rows


def measure_building(manifest, runs: int) -> list[dict[str, Any]]:
    from edge_runtime.engines import EngineOptions, load_engine
    from edge_runtime.explain import cam_explanation, decode_overlay
    from edge_runtime.imaging.inputs import open_input
    from edge_runtime.imaging.preprocess import prepare

    engine = load_engine("onnxruntime", manifest.variant("onnxruntime", "fp32").path, manifest.input.shape,
                         EngineOptions(threads=2))
    index = list(engine.output_names).index(manifest.explanation.output)
    label = manifest.output.labels.index(manifest.explanation.label)
    hw = (manifest.preprocess.height, manifest.preprocess.width)
    images = {"kermany-224x224": model_input(manifest, DEFAULT_DATA)[1]}
    if DEFAULT_DATA is not None and (DEFAULT_DATA / "dicom" / "pydicom-data" / "RG1_J2KR.dcm").is_file():
        inp = open_input(DEFAULT_DATA / "dicom" / "pydicom-data" / "RG1_J2KR.dcm")
        images["chest-cr-rg1"] = inp.frame(0, manifest.windowing)
    rows = []
    for name, image in images.items():
        x, geometry = prepare(image, manifest.preprocess)
        cam = engine.run_all(x)[index][0, label]
        cam_explanation(image, cam, geometry, hw, manifest.explanation.label)  # warm: encoder tables
        t = []
        for _ in range(runs):
            t0 = time.perf_counter()
            e = cam_explanation(image, cam, geometry, hw, manifest.explanation.label)
            t.append((time.perf_counter() - t0) * 1000.0)
        rows.append({"image": name, "size": [int(image.shape[1]), int(image.shape[0])], "p50_ms": float(np.median(t)),
                     "p90_ms": float(np.percentile(t, 90)), "overlay_bytes": len(decode_overlay(e["overlay"])),
                     "explanation_json_bytes": len(json.dumps(e, separators=(",", ":")))})
    return rows


def main(argv: list[str] | None = None) -> int:
    import os

    from edge_runtime.registry import ModelRegistry

    p = argparse.ArgumentParser(prog="python -m benchmarks.explain", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cxr-pneumonia")
    p.add_argument("--engines", default="onnxruntime,openvino")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=20, help="interleaved blocks per configuration")
    p.add_argument("--block", type=int, default=50, help="runs per block")
    p.add_argument("--build-runs", type=int, default=50)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    manifest = ModelRegistry().get(args.model)
    if manifest.explanation is None or manifest.explanation.method != "cam":
        print(f"edge-bench: {args.model}: no [explanation] method 'cam' in its manifest")
        return 2
    try:
        report = {"model": args.model, "load_average": list(os.getloadavg()), "machine": machine_info(),
                  "inference": measure_inference(manifest, args.engines.split(","), args.threads, args.rounds,
                                                 args.block),
                  "building": measure_building(manifest, args.build_runs)}
    except BenchError as exc:
        print(f"edge-bench: {exc}")
        return 2
    report["load_average_after"] = list(os.getloadavg())
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
