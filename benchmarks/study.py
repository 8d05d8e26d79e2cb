"""Study benchmark: file to committed finding for radiographs, through the daemon's own study path.

The daemon (`edge_runtime.service.Service`) runs with one `dicom-folder` inbox for cxr-pneumonia and nothing else.
Each file is copied `--runs` times under a fresh SOP Instance UID (the pixel data untouched; a byte-identical copy
would be recognised as already committed), and the copies are dropped into the inbox one at a time, each after
the previous one's finding is committed: one study at a time, the engine's threads asleep in between, as on a
scanner. The time is the study worker's, from taking the file (opening it in the decode worker) to its finding
committed in the outbox (fsync): decode-worker round trip, hashing, decode, preprocess, inference, head, finding,
commit. The inbox's settle time and poll interval are policy, not work, and are not in it. The first copy of the
first file is a warm-up and not counted. `--full-decode` sets imaging.reduced_decode = false, to compare.

    python -m benchmarks.study --dicom ../shared/data/dicom --runs 7
"""
from __future__ import annotations

import argparse
import csv
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import BenchError, child_entry, latency_stats, quiet_pydicom

STUDY_MODEL = "cxr-pneumonia"


def radiographs(folder: Path) -> list[tuple[str, str]]:
    """(file, body part) of every CR/DX file the shared folder's MANIFEST.tsv lists."""
    manifest = folder / "MANIFEST.tsv"
    if not manifest.is_file():
        raise BenchError(f"{manifest}: no such file (the shared DICOM set is ../shared/data/dicom)")
    with open(manifest, newline="") as fh:
        return [(row["file"], row.get("body_part", "")) for row in csv.DictReader(fh, delimiter="\t")
                if row["modality"] in ("CR", "DX")]


def stage_copies(src: Path, dest: Path, runs: int) -> list[Path]:
    """`runs` copies of src under fresh SOP Instance UIDs (pixel data bytes as they are)."""
    import pydicom
    from pydicom.uid import generate_uid

    out = []
    for i in range(runs):
        ds = pydicom.dcmread(src)
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        target = dest / f"{src.stem}.{i}.dcm"
        ds.save_as(target, enforce_file_format=True)
        out.append(target)
    return out


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.pipeline import read_findings
    from edge_runtime.config import (Config, DeviceSection, EngineSection, ImagingSection, ServiceSection,
                                     SourceSection, check_sources)
    from edge_runtime.service import Service

    quiet_pydicom()
    folder = Path(args.dicom)
    files = radiographs(folder)
    if args.only:
        files = [(f, b) for f, b in files if any(key in f for key in args.only.split(","))]
    if not files:
        raise BenchError(f"{folder}: no CR/DX files{' matching --only' if args.only else ''}")
    with tempfile.TemporaryDirectory(prefix="edge-bench-study-") as tmp:
        root = Path(tmp)
        staging = root / "staging"
        staging.mkdir()
        staged = {name: stage_copies(folder / name, staging, args.runs + (1 if i == 0 else 0))
                  for i, (name, _) in enumerate(files)}
        inbox = root / "inbox"
        config = Config(device=DeviceSection(id="bench", site="bench", state_dir=str(root / "state")),
                        engine=EngineSection(kind=args.engine, precision=args.precision, threads=args.threads),
                        imaging=ImagingSection(reduced_decode=not args.full_decode),
                        service=ServiceSection(metrics_port=0),
                        sources=[SourceSection(name="xray", kind="dicom-folder", model=STUDY_MODEL, inbox=str(inbox))])
        check_sources(config)
        service = Service(config)
        timings: list[tuple[str, float]] = []
        original = service._process_study

        def timed(src, item, predictor, budget_ms, progress):  # the study worker's own call, timed around
            t0 = time.monotonic()
            try:
                return original(src, item, predictor, budget_ms, progress)
            finally:
                timings.append((item.path.name, (time.monotonic() - t0) * 1000.0))

        service._process_study = timed
        service.start()
        service.decoder.wait_ready()
        old = time.time() - 3600  # an mtime past the inbox's settle time: ready at once
        per_file: dict[str, list[float]] = {}
        try:
            for name, copies in staged.items():
                for path in copies:
                    n = len(timings)
                    os.utime(path, (old, old))
                    os.replace(path, inbox / path.name)
                    deadline = time.monotonic() + args.timeout_s
                    while len(timings) == n:
                        if time.monotonic() > deadline:
                            raise BenchError(f"{name}: no finding within {args.timeout_s:g} s")
                        time.sleep(0.002)
                    per_file.setdefault(name, []).append(timings[-1][1])
                    time.sleep(args.gap_s)  # one study at a time: the engine's threads go to sleep in between
        finally:
            service.stop()
        findings = read_findings(service.outbox.path)
    by_name: dict[str, list[dict]] = {}
    for f in findings:
        stem = f["source"]["name"].rsplit(".", 2)[0]
        by_name.setdefault(stem, []).append(f)
    results = {}
    first = files[0][0]
    for name, body in files:
        ms = per_file.get(name, [])
        if name == first:
            ms = ms[1:]  # the warm-up copy
        fs = by_name.get(Path(name).stem, [])
        fs = fs[1:] if name == first else fs
        lat = {s: float(np.median([f["latency_ms"].get(s, 0.0) for f in fs])) for s in
               ("decode", "preprocess", "inference", "postprocess", "capture_to_result")} if fs else {}
        results[name] = {
            "body_part": body, "runs": len(ms), "file_to_committed_ms": latency_stats(ms) if ms else None,
            "finding_latency_p50_ms": lat,
            "decode": fs[0].get("decode") if fs else None,
            "budget_met": sum(1 for f in fs if f["budget_met"]) if fs else 0,
            "assessed": sum(1 for f in fs if f["result"].get("assessed")) if fs else 0,
            "p_pneumonia": [f["result"].get("probabilities", {}).get("pneumonia") for f in fs[:1]],
        }
    return {"folder": str(folder), "model": STUDY_MODEL, "engine": args.engine, "precision": args.precision,
            "threads": args.threads, "reduced_decode": not args.full_decode, "runs": args.runs, "gap_s": args.gap_s,
            "files": results}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.study", description=__doc__.splitlines()[0])
    p.add_argument("--dicom", required=True, help="the shared DICOM folder (with MANIFEST.tsv)")
    p.add_argument("--runs", type=int, default=7, help="copies of each file, dropped one at a time")
    p.add_argument("--only", help="comma list of substrings: only the files whose name holds one")
    p.add_argument("--full-decode", action="store_true", help="imaging.reduced_decode = false")
    p.add_argument("--engine", default="onnxruntime", choices=["auto", "onnxruntime", "openvino"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "int8"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--gap-s", type=float, default=0.2, help="idle time between one finding and the next drop")
    p.add_argument("--timeout-s", type=float, default=60.0)
    return p


main = child_entry(build_parser, measure)

if __name__ == "__main__":
    raise SystemExit(main())
