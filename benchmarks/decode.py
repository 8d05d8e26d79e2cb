"""Decode benchmark: ms per frame for every DICOM file under a folder, grouped by transfer syntax.

Each file is opened with the runtime's `DicomImage` (header and size guard), then every frame (at most
`--max-frames`) is decoded to its display image as the daemon does (`raw_frame`: the pixel-data plugin; then
`DicomImage.display`: modality LUT, VOI/window, colour), `--runs` times with the first run discarded as warm-up.

    python -m benchmarks.decode --dicom ../shared/data/dicom
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import BenchError, child_entry, quiet_pydicom


def decode_file(path: Path, runs: int, max_frames: int) -> dict[str, Any]:
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
    return {
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
    for path in files:
        results[str(path.relative_to(folder))] = decode_file(path, args.runs, args.max_frames)
    return {"folder": str(folder), "runs": args.runs, "max_frames": args.max_frames, "files": results}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.decode", description=__doc__.splitlines()[0])
    p.add_argument("--dicom", required=True, help="folder searched for *.dcm")
    p.add_argument("--runs", type=int, default=3, help="passes over each file's frames; the first is discarded")
    p.add_argument("--max-frames", type=int, default=30, help="frames timed per file")
    return p


main = child_entry(build_parser, measure)

if __name__ == "__main__":
    raise SystemExit(main())
