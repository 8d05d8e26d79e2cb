"""Does an OpenVINO variant compute the same on a board with fewer CPU instructions? Checked on this machine.

OpenVINO's x86 INT8 convolutions pick their kernels by instruction set. With VNNI (AVX-512 VNNI, AVX-VNNI or AMX)
u8 x s8 products are summed in 32 bits; on AVX2 alone they pass through 16-bit sums that saturate when the weights
use the full signed 8-bit range (cxr-pneumonia 1.0.0's ONNX Runtime QDQ graph drifted there: BENCHMARKS.md, "INT8
on a CPU without VNNI"). oneDNN, under OpenVINO's CPU plugin, honours ONEDNN_MAX_CPU_ISA, so a VNNI machine can run
the AVX2 kernels (ONEDNN_VERBOSE=1 shows `jit_uni_int8:avx2`). This runs one variant on OpenVINO over validation
inputs twice, in two child processes, at the machine's own instruction set and capped, and compares every output
(logits, and `features` / `cam` where present): identical outputs mean the variant needs nothing the capped
instruction set lacks, so the manifest needs no `[variants.cpu_requires]` for it.

    python -m quantize.isa_check models/cxr-pneumonia --variant int8-qdq --data ../shared/data/cxr-kermany \
        --dataset cxr-kermany [--isa AVX2] [--every 5]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ISAS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI")


def _inputs(manifest, data: Path, dataset: str | None, every: int) -> list[np.ndarray]:
    from quantize.calibration import dataset_samples, display_image, folder_samples, model_input

    samples = dataset_samples(data, dataset, "val") if dataset else folder_samples(data, manifest.output.labels)
    return [model_input(display_image(s, manifest), manifest)[0] for s in samples[::every]]


def run_child(folder: Path, variant: str, data: Path, dataset: str | None, every: int, out: Path) -> None:
    """In this process: every output of the variant on OpenVINO for each input, saved as one .npz."""
    from edge_runtime.engines import EngineOptions, load_engine
    from edge_runtime.registry import ModelRegistry

    manifest = ModelRegistry([folder.parent]).get(folder.name)
    if variant in ("fp32", "int8"):
        v = manifest.variant("openvino", variant)
    else:
        v = next((x for x in manifest.variants if x.id == variant), None)
        if v is None:
            raise SystemExit(f"{folder}: no variant {variant!r}; variants: {', '.join(x.id for x in manifest.variants)}")
    engine = load_engine("openvino", v.path, manifest.input.shape, EngineOptions(threads=2))
    outs = [engine.run_all(x) for x in _inputs(manifest, data, dataset, every)]
    np.savez(out, **{f"{k}": np.stack([o[k] for o in outs]) for k in range(len(outs[0]))},
             names=np.array(engine.output_names))


def compare(a: Path, b: Path) -> dict:
    """Per output: max |difference| and the median and max of each input's max |difference| over its max |value|."""
    x, y = np.load(a), np.load(b)
    report = {}
    for k, name in enumerate(x["names"]):
        p, q = x[str(k)].astype(np.float64), y[str(k)].astype(np.float64)
        flat_p, flat_q = p.reshape(len(p), -1), q.reshape(len(q), -1)
        rel = np.abs(flat_p - flat_q).max(axis=1) / (np.abs(flat_p).max(axis=1) + 1e-12)
        report[str(name)] = {"max_abs_diff": float(np.abs(p - q).max()), "median_rel_diff": float(np.median(rel)),
                             "max_rel_diff": float(rel.max())}
    report["inputs"] = int(len(x["0"]))
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="model folder (with manifest.toml)")
    ap.add_argument("--variant", default="int8", help="variant id, or fp32 / int8 for the registry's pick on OpenVINO")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--dataset", choices=("cxr-kermany", "hc18"))
    ap.add_argument("--isa", default="AVX2", choices=ISAS, help="the capped instruction set (ONEDNN_MAX_CPU_ISA)")
    ap.add_argument("--every", type=int, default=5, help="every k-th validation input")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    folder = args.folder.resolve()
    if args.child:
        run_child(folder, args.variant, args.data, args.dataset, args.every, args.child)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        outs = {}
        for tag, isa in (("native", None), ("capped", args.isa)):
            env = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"}
            if isa:
                env["ONEDNN_MAX_CPU_ISA"] = isa
            outs[tag] = Path(tmp) / f"{tag}.npz"
            cmd = [sys.executable, "-m", "quantize.isa_check", str(folder), "--variant", args.variant, "--data",
                   str(args.data), "--every", str(args.every), "--child", str(outs[tag])]
            if args.dataset:
                cmd += ["--dataset", args.dataset]
            rc = subprocess.run(cmd, env=env).returncode
            if rc:  # the child printed its reason
                print(f"isa_check: the {tag} run failed (exit {rc})", file=sys.stderr)
                return rc
        report = {"model": folder.name, "variant": args.variant, "capped_isa": args.isa, **compare(outs["native"],
                                                                                                 outs["capped"])}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
