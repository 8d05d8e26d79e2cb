"""Model-update benchmark: how long a signed bundle takes to pack, verify and install (each step, the self-test
on every engine/precision the daemon uses included), and what the hot switch costs a live feed.

Per model (a copy of the shipped folder with its version bumped; the shipped files are never touched), `repeats`
times in this process: pack (with the test vectors), verify, install (verifying -> unpacking -> self-test ->
activation, per step from the installer's own step events). Then, once, a phantom feed at `--fps` through
fetal-head on a running Service: a new version is installed and switched to while frames flow; the gaps between
consecutive findings in the second around the switch against the median gap before it, and the frames the
newest-wins slot dropped during the switch.

    python -m benchmarks.ota --repeats 3
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import BenchError, child_entry, summarize


def _config(state: Path, extra: str = "") -> Path:
    path = state.parent / "edge.toml"
    path.write_text(f'[device]\nid = "bench"\nsite = "bench"\nstate_dir = "{state}"\n'
                    '[engine]\nkind = "onnxruntime"\nthreads = 2\nwarmup_runs = 1\n[service]\nmetrics_port = 0\n'
                    + extra)
    return path


def _copy(model: str, root: Path, version: str) -> Path:
    from edge_runtime.registry import bundled_models_dir

    dest = root / model
    shutil.copytree(bundled_models_dir() / model, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.sig"))
    manifest = dest / "manifest.toml"
    lines = manifest.read_text().splitlines(keepends=True)
    manifest.write_text("".join(f'version = "{version}"\n' if ln.startswith("version = ") else ln for ln in lines))
    return dest


def install_once(model: str, work: Path) -> dict[str, Any]:
    from edge_runtime.cli import engine_options
    from edge_runtime.config import load_config
    from edge_runtime.ota import bundle as bundles
    from edge_runtime.ota.wiring import installer_from_config

    keys = work / "keys"
    keys.mkdir()
    bundles.generate_keypair(keys / "k.pem", keys / "p.pem")
    folder = _copy(model, work / "src", "9.9.9")
    t0 = time.perf_counter()
    vb = bundles.pack(folder, keys / "k.pem", work / "b.bundle")
    pack_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    bundles.verify(vb.path, keys / "p.pem")
    verify_s = time.perf_counter() - t0
    config = load_config(_config(work / "state", f'[models]\npublic_key = "{keys / "p.pem"}"\n'))
    installer = installer_from_config(config, lambda kind: engine_options(config, kind))
    marks: list[tuple[str, float]] = []
    installer.report = lambda event: marks.append((event.get("step", ""), time.perf_counter()))
    t0 = time.perf_counter()
    outcome = installer.install(vb.path)
    install_s = time.perf_counter() - t0
    if outcome.result != "activated":
        raise BenchError(f"{model}: install {outcome.result}: {outcome.reason}")
    steps: dict[str, float] = {}
    for (step, t), (_, t_next) in zip(marks, marks[1:]):
        steps[step] = steps.get(step, 0.0) + t_next - t
    return {"bundle_bytes": vb.size, "pack_s": pack_s, "verify_s": verify_s, "install_s": install_s,
            "steps_s": steps, "selftest": outcome.reason}


def switch_gap(work: Path, fps: float) -> dict[str, Any]:
    from edge_runtime.cli import engine_options
    from edge_runtime.config import load_config
    from edge_runtime.ota import bundle as bundles
    from edge_runtime.ota.wiring import installer_from_config
    from edge_runtime.service import Service

    keys = work / "keys"
    keys.mkdir()
    bundles.generate_keypair(keys / "k.pem", keys / "p.pem")
    vb = bundles.pack(_copy("fetal-head", work / "src", "9.9.9"), keys / "k.pem", work / "b.bundle")
    config = load_config(_config(work / "state", '[[sources]]\nname = "probe"\nkind = "phantom"\n'
                                                  f'model = "fetal-head"\nfps = {fps}\n'))
    service = Service(config)
    stamps: list[tuple[float, str]] = []
    commit = service._commit

    def stamped(finding, source_item):  # when each finding is committed, and by which version
        stamps.append((time.perf_counter(), finding["model"]["version"]))
        return commit(finding, source_item)

    service._commit = stamped
    service.start()
    try:
        time.sleep(4.0)
        dropped0 = service.metrics.registry.get_sample_value("edge_frames_dropped_total", {"source": "probe"}) or 0.0
        installer = installer_from_config(config, lambda kind: engine_options(config, kind))
        t_install = time.perf_counter()
        outcome = installer.install(vb.path)
        if outcome.result != "activated":
            raise BenchError(f"fetal-head: install {outcome.result}: {outcome.reason}")
        t_switch = time.perf_counter()
        why = service.switch_model("fetal-head")
        switch_s = time.perf_counter() - t_switch
        if why is not None:
            raise BenchError(f"fetal-head: switch failed: {why}")
        time.sleep(2.0)
        dropped1 = service.metrics.registry.get_sample_value("edge_frames_dropped_total", {"source": "probe"}) or 0.0
    finally:
        service.stop()
    times = np.array([t for t, _ in stamps])
    gaps = np.diff(times) * 1000.0
    before = gaps[times[1:] < t_install]
    around = gaps[(times[1:] >= t_switch - 0.5) & (times[1:] <= t_switch + switch_s + 1.0)]
    versions = [v for _, v in stamps]
    first_new = versions.index("9.9.9") if "9.9.9" in versions else None
    return {"fps": fps, "findings": len(stamps), "switch_s": switch_s, "install_while_running_s": t_switch - t_install,
            "median_gap_before_ms": float(np.median(before)) if before.size else None,
            "max_gap_before_ms": float(before.max()) if before.size else None,
            "max_gap_around_switch_ms": float(around.max()) if around.size else None,
            "dropped_during_install_and_switch": dropped1 - dropped0,
            "old_after_new": first_new is not None and any(v != "9.9.9" for v in versions[first_new:])}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"command": f"python -m benchmarks.ota --repeats {args.repeats} --fps {args.fps}",
                              "models": {}}
    for model in args.models.split(","):
        runs = []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory(prefix="edge-bench-ota-") as tmp:
                runs.append(install_once(model, Path(tmp)))
        steps = sorted({s for r in runs for s in r["steps_s"]})
        result["models"][model] = {
            "bundle_bytes": runs[0]["bundle_bytes"], "selftest": runs[0]["selftest"],
            **{k: summarize([r[k] for r in runs]) for k in ("pack_s", "verify_s", "install_s")},
            "steps_s": {s: summarize([r["steps_s"].get(s) for r in runs]) for s in steps}}
    with tempfile.TemporaryDirectory(prefix="edge-bench-ota-") as tmp:
        result["switch"] = switch_gap(Path(tmp), args.fps)
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ota", description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--models", default="cxr-pneumonia,fetal-head")
    p.add_argument("--fps", type=float, default=30.0, help="the phantom feed's rate during the switch")
    return p


main = child_entry(build_parser, measure)

if __name__ == "__main__":
    raise SystemExit(main())
