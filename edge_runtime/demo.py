"""`edge-runtime demo`: both shipped models on embedded inputs, on this machine, in about 20 seconds.

- The fetal head phantom at 30 fps into `fetal-head`: live fps, latency p50/p99 against the budget, the
  measured head circumference against the phantom's known one.
- A real chest CR (RG1_J2KR.dcm, JPEG 2000, from the pydicom-data package of the `demo` extra) into
  `cxr-pneumonia`.
Everything runs through the same preprocess -> engine -> head path as `infer`, and prints findings as JSON.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from edge_runtime.findings import DeviceIdentity, SequenceCounter, build_finding
from edge_runtime.frames import Frame
from edge_runtime.sources.phantom import Phantom, PhantomSpec

DEMO_DICOM = "RG1_J2KR.dcm"


def find_demo_dicom() -> Path | None:
    """The CR chest from pydicom-data (demo extra), else the shared data beside a checkout."""
    try:
        from pydicom.data import get_testdata_file

        path = get_testdata_file(DEMO_DICOM)
        if path:
            return Path(path)
    except (ImportError, ValueError, OSError):
        pass
    shared = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "dicom" / "pydicom-data" / DEMO_DICOM
    return shared if shared.is_file() else None


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def run_demo(args, config) -> int:
    from edge_runtime.cli import engine_options, make_registry, study_ref
    from edge_runtime.engines import resolve_auto
    from edge_runtime.imaging.deid import load_or_create_key
    from edge_runtime.imaging.inputs import open_input
    from edge_runtime.pipeline import Predictor

    out = sys.stdout
    t_start = time.monotonic()
    registry = make_registry(config)
    kind = resolve_auto() if config.engine.kind == "auto" else config.engine.kind
    options = engine_options(config, kind)
    fetal = Predictor.load(registry, "fetal-head", kind, config.engine.precision, options)
    cxr = Predictor.load(registry, "cxr-pneumonia", kind, config.engine.precision, options)
    ready_s = time.monotonic() - t_start
    identity = DeviceIdentity(config.device.id, config.device.site)
    seq = SequenceCounter(config.state_dir / "demo.seq")
    key = load_or_create_key(config.state_dir / "device.key")
    print(f"edge-runtime demo: models warm on {kind} in {ready_s:.2f} s", file=out)
    for p in (fetal, cxr):
        print(f"  {p.ref.name} v{p.ref.version} [{p.ref.variant}] on {p.ref.engine}/{p.ref.device} "
              f"({p.ref.compute_precision}), budget {p.manifest.latency_budget_ms:.0f} ms", file=out)

    # 1. Live phantom at 30 fps.
    spec = PhantomSpec()
    phantom = Phantom(spec)
    fps, seconds = 30.0, float(args.seconds)
    latencies: list[float] = []
    hcs: list[float] = []
    misses = late = 0
    n_frames = int(fps * seconds)
    t0 = time.monotonic()
    last_print = t0
    print(f"\nfetal-head: phantom at {fps:.0f} fps for {seconds:.0f} s, true head circumference {spec.head_circumference_mm:.1f} mm",
          file=out)
    for i in range(n_frames):
        due = t0 + i / fps
        now = time.monotonic()
        if now < due:
            time.sleep(due - now)
        elif now - due > 1.0 / fps:
            late += 1  # the loop fell a whole frame behind: a live source would have dropped this frame
            continue
        frame = Frame(phantom.frame(i), "phantom", "phantom", captured_at=time.monotonic(),
                      pixel_spacing_mm=(spec.pixel_spacing_mm, spec.pixel_spacing_mm))
        pred = fetal.predict(frame)
        latencies.append(pred.capture_to_result_ms)
        misses += pred.capture_to_result_ms > fetal.manifest.latency_budget_ms
        hc = pred.head.result.get("measurements", {}).get("head_circumference_mm")
        if hc is not None:
            hcs.append(hc)
        if time.monotonic() - last_print >= 1.0 or i == n_frames - 1:
            last_print = time.monotonic()
            elapsed = last_print - t0
            done = len(latencies)
            print(f"  t={elapsed:5.1f}s  fps={done / elapsed:5.1f}  latency p50={percentile(latencies, 50):5.1f} ms "
                  f"p99={percentile(latencies, 99):5.1f} ms (budget {fetal.manifest.latency_budget_ms:.0f})  "
                  f"late={late}  misses={misses}  HC={hc if hc is not None else '-'} mm", file=out, flush=True)
    detected = len(hcs) / max(1, len(latencies))
    hc_text = (f"median HC {statistics.median(hcs):.1f} mm vs true {spec.head_circumference_mm:.1f} mm "
               f"(head found in {detected:.0%} of frames)") if hcs else "no head found in any frame"

    # 2. A real chest CR.
    print("\ncxr-pneumonia: chest CR, JPEG 2000", file=out)
    dicom = find_demo_dicom()
    cxr_line = "skipped: RG1_J2KR.dcm not found (install the demo extra: pip install 'edge-runtime[demo]')"
    if dicom is not None:
        inp = open_input(dicom, config.imaging.max_pixel_bytes)
        captured = time.monotonic()
        frame = Frame(inp.frame(0, cxr.manifest.windowing), "file", str(dicom), captured_at=captured,
                      study=study_ref(inp, key, 0), pixel_spacing_mm=inp.pixel_spacing_mm)
        frame.add_timing("decode", (time.monotonic() - captured) * 1000.0)
        pred = cxr.predict(frame)
        finding = build_finding(identity=identity, seq=seq.next(), frame=frame, model=cxr.ref, head=pred.head,
                                capture_to_result_ms=pred.capture_to_result_ms, budget_ms=cxr.manifest.latency_budget_ms)
        print(json.dumps(finding, indent=2), file=out)
        r = finding["result"]
        cxr_line = (f"{r['label']} (p(pneumonia)={r['probabilities']['pneumonia']:.3f}, threshold {r['threshold']}), "
                    f"priority {finding['priority']}, {finding['latency_ms']['capture_to_result']:.0f} ms incl. decode")

    print("\nSummary", file=out)
    print(f"  ready in {ready_s:.2f} s (both models loaded and warm)", file=out)
    print(f"  fetal-head: {len(latencies)} frames, p50 {percentile(latencies, 50):.1f} ms, p99 {percentile(latencies, 99):.1f} ms, "
          f"{misses} budget misses, {late} late frames skipped; {hc_text}", file=out)
    print(f"  cxr-pneumonia: {cxr_line}", file=out)
    print("  Not for diagnostic use: demonstration of the runtime on a phantom and a public test image.", file=out)
    return 0
