"""Decode benchmark: ms per frame for every DICOM file under a folder, grouped by transfer syntax.

Each file is opened with the runtime's `DicomImage` (header and size guard), then every frame (at most
`--max-frames`) is decoded to its display image as the daemon does (`raw_frame`: the pixel-data plugin; then
`DicomImage.display`: modality LUT, VOI/window, colour), `--runs` times with the first run discarded as warm-up.

Reduced decoding (imaging.resolution) is timed beside it on the same frames: `DicomImage.decode_frame` with the
decode hint of the shipped model that reads the file's modality (CR/DX: cxr-pneumonia, US: fetal-head), and for
both paths the model's `prepare` (its final area resize) on the result, so full vs reduced compares what a study
costs up to the engine. `--no-reduced` times the full path only.

    python -m benchmarks.decode --dicom ../shared/data/dicom
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import BenchError, child_entry, quiet_pydicom


def model_hints() -> dict[str, tuple[str, Any, Any]]:
    """{modality: (model name, its DecodeHint, its PreprocessSpec)} for the shipped models."""
    from edge_runtime.imaging.preprocess import decode_hint
    from edge_runtime.registry import ModelRegistry

    registry = ModelRegistry()
    out: dict[str, tuple[str, Any, Any]] = {}
    for name in registry.names():
        manifest = registry.get(name)
        for modality in manifest.modality:
            out.setdefault(modality, (name, decode_hint(manifest.preprocess), manifest.preprocess))
    return out


def reduced_timings(image, frames: int, runs: int, model: tuple[str, Any, Any]) -> dict[str, Any]:
    """ms per frame of the full and the reduced path, each up to the model's input tensor (decode, display, prepare)."""
    from edge_runtime.imaging.preprocess import prepare

    name, hint, spec = model
    full_ms: list[float] = []
    reduced_ms: list[float] = []
    prepare_full: list[float] = []
    prepare_reduced: list[float] = []
    info = None
    for run in range(runs):
        for index in range(frames):
            t0 = time.perf_counter()
            pixels = image.display(image.raw_frame(index), "voi")
            t1 = time.perf_counter()
            prepare(pixels, spec)
            t2 = time.perf_counter()
            small, info = image.decode_frame(index, "voi", hint)
            t3 = time.perf_counter()
            prepare(small, spec)
            t4 = time.perf_counter()
            if run > 0 or runs == 1:
                full_ms.append((t1 - t0) * 1000.0)
                prepare_full.append((t2 - t1) * 1000.0)
                reduced_ms.append((t3 - t2) * 1000.0)
                prepare_reduced.append((t4 - t3) * 1000.0)
    full_total = float(np.median(np.add(full_ms, prepare_full)))
    reduced_total = float(np.median(np.add(reduced_ms, prepare_reduced)))
    return {"model": name, "path": info.path, "decoded_size": list(info.size), "reason": info.reason,
            "full_decode_display_ms": float(np.median(full_ms)), "full_prepare_ms": float(np.median(prepare_full)),
            "reduced_decode_display_ms": float(np.median(reduced_ms)),
            "reduced_prepare_ms": float(np.median(prepare_reduced)),
            "full_to_tensor_ms": full_total, "reduced_to_tensor_ms": reduced_total,
            "speedup": full_total / reduced_total if reduced_total > 0 else None}


def decode_file(path: Path, runs: int, max_frames: int, hints: dict | None = None) -> dict[str, Any]:
    from edge_runtime.errors import InputError
    from edge_runtime.imaging.dicom import DicomImage
    from pydicom.uid import UID

    t0 = time.perf_counter()
    try:
        image = DicomImage(path)
    except InputError as exc:
        return {"error": exc.reason}
    open_ms = (time.perf_counter() - t0) * 1000.0
    meta = image.meta
    frames = min(image.n_frames, max_frames)
    raw_ms: list[float] = []
    display_ms: list[float] = []
    try:
        for run in range(runs):
            for index in range(frames):
                t0 = time.perf_counter()
                raw = image.raw_frame(index)
                t1 = time.perf_counter()
                image.display(raw, "voi")
                t2 = time.perf_counter()
                if run > 0 or runs == 1:  # the first pass warms decoders and caches: discarded
                    raw_ms.append((t1 - t0) * 1000.0)
                    display_ms.append((t2 - t1) * 1000.0)
    except InputError as exc:
        return {"error": exc.reason, "transfer_syntax": UID(meta.transfer_syntax).name}
    total = np.add(raw_ms, display_ms)
    mp = meta.rows * meta.cols / 1e6
    reduced = None
    if hints is not None and meta.modality in hints:
        try:
            reduced = reduced_timings(image, frames, runs, hints[meta.modality])
        except InputError as exc:
            reduced = {"error": exc.reason}
    return {
        "reduced": reduced,
        "transfer_syntax": UID(meta.transfer_syntax).name, "transfer_syntax_uid": meta.transfer_syntax,
        "modality": meta.modality, "rows": meta.rows, "cols": meta.cols, "frames": meta.frames, "frames_timed": frames,
        "samples_per_pixel": meta.samples_per_pixel, "bits_stored": meta.bits_stored, "photometric": meta.photometric,
        "open_ms": open_ms, "decode_ms_per_frame": float(np.median(raw_ms)), "display_ms_per_frame": float(np.median(display_ms)),
        "ms_per_frame": float(np.median(total)), "ms_per_megapixel": float(np.median(total)) / mp,
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    folder = Path(args.dicom)
    if not folder.is_dir():
        raise BenchError(f"{folder}: no such folder (the shared DICOM set is ../shared/data/dicom)")
    import pydicom  # noqa: F401  (before quieting its logger)

    quiet_pydicom()
    files = sorted(folder.rglob("*.dcm"))
    if not files:
        raise BenchError(f"{folder}: no .dcm files")
    results = {}
    hints = None if args.no_reduced else model_hints()
    for path in files:
        results[str(path.relative_to(folder))] = decode_file(path, args.runs, args.max_frames, hints)
    return {"folder": str(folder), "runs": args.runs, "max_frames": args.max_frames, "files": results}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.decode", description=__doc__.splitlines()[0])
    p.add_argument("--dicom", required=True, help="folder searched for *.dcm")
    p.add_argument("--runs", type=int, default=3, help="passes over each file's frames; the first is discarded")
    p.add_argument("--max-frames", type=int, default=30, help="frames timed per file")
    p.add_argument("--no-reduced", action="store_true", help="time the full decode only (no imaging.resolution path)")
    return p


main = child_entry(build_parser, measure)

if __name__ == "__main__":
    raise SystemExit(main())
