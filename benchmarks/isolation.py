"""Decode isolation benchmark: what decoding a file in a decode worker process (imaging/isolation.py) adds over
decoding it in-process, per file and per frame, on the shared radiographs and ultrasound files.

Each round opens the file and decodes every frame to its display image both ways, alternating which goes first;
the first round is discarded as warm-up; medians over the rest, and the difference of the minima (other load on a
shared machine inflates the medians of long decodes). The file's sha256 (the daemon's duplicate check,
hashed in a thread while frame 0 decodes) is timed on its own. Live frames (video, phantom, cine) never pass through
a worker: nothing is added to them.

    python -m benchmarks.isolation            # 15 rounds
    python -m benchmarks.isolation --quick    # 4 rounds, under a minute
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

DICOM = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "dicom"
FILES = ("pydicom-data/RG1_UNCR.dcm", "pydicom-data/RG1_J2KR.dcm", "pylibjpeg-data/RG2_JLSL.dcm",
         "pylibjpeg-data/RG2_JPLL.dcm", "pydicom-data/US1_UNCR.dcm", "pydicom-data/examples_ybr_color.dcm")


def _in_process(path: Path) -> int:
    from edge_runtime.imaging.inputs import open_input

    inp = open_input(path)
    for index in range(inp.n_frames):
        inp.frame(index, "voi")
    return inp.n_frames


def _isolated(pool, path: Path) -> int:
    with pool.open(path) as inp:
        for index in range(inp.n_frames):
            inp.frame(index, "voi")
        return inp.n_frames


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - t0) * 1000.0


def measure(rounds: int, folder: Path) -> dict:
    from edge_runtime.imaging.isolation import DecodePool
    from edge_runtime.registry import sha256_file

    results = {}
    with DecodePool(timeout_s=300) as pool:
        t0 = time.perf_counter()
        pool.wait_ready()
        start_ms = (time.perf_counter() - t0) * 1000.0
        for name in FILES:
            path = folder / name
            if not path.exists():
                continue
            frames = _in_process(path)
            local, isolated, digest = [], [], []
            for r in range(rounds + 1):
                pair = [("local", _in_process), ("isolated", lambda p: _isolated(pool, p))]
                if r % 2:
                    pair.reverse()
                times = {label: _timed(fn, path) for label, fn in pair}
                d = _timed(sha256_file, path)
                if r:
                    local.append(times["local"])
                    isolated.append(times["isolated"])
                    digest.append(d)
            lm, im = statistics.median(local), statistics.median(isolated)
            results[name] = {"frames": frames, "in_process_ms": round(lm, 2), "isolated_ms": round(im, 2),
                             "added_ms_per_file": round(im - lm, 2), "added_ms_per_frame": round((im - lm) / frames, 2),
                             # minima: on a shared machine the other load inflates medians of long decodes
                             "added_ms_per_file_min": round(min(isolated) - min(local), 2),
                             "sha256_ms": round(statistics.median(digest), 2), "bytes": path.stat().st_size}
        peak = pool.peak_rss_bytes()
    return {"rounds": rounds, "worker_start_ms": round(start_ms, 1), "worker_peak_rss_mib": round(peak / 2**20, 1),
            "files": results}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.isolation", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="4 rounds (under a minute)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--dicom", type=Path, default=DICOM)
    args = p.parse_args(argv)
    if not args.dicom.is_dir():
        print(f"{args.dicom}: no such folder (the shared DICOM set)")
        return 2
    result = measure(4 if args.quick else args.rounds, args.dicom)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
