"""edge-bench: the quick run writes valid output; bad input is one line. Never a speed assertion: speed claims
live in BENCHMARKS.md with their machine metadata."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.overhead import parse_benchmark_app
from benchmarks.report import markdown, plot, validate
from conftest import REPO, SHARED_DATA
from mqtt_helpers import MOSQUITTO


def edge_bench() -> list[str]:
    """The console script when installed beside this interpreter, else the module."""
    script = Path(sys.executable).with_name("edge-bench")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "benchmarks"]


def run_bench(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(edge_bench() + args, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          stdin=subprocess.DEVNULL)


@pytest.mark.slow
def test_quick_run_writes_valid_json_markdown_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["--quick", "--out", str(out)] + (["--data", str(SHARED_DATA)] if SHARED_DATA.is_dir() else [])
    proc = run_bench(args, timeout=400)  # a hang guard, not a speed check: about 75 s idle, several times that on a busy board
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    assert validate(doc) == []
    assert doc["mode"] == "quick" and doc["tool"] == "edge-bench"
    machine = doc["machine"]
    assert machine["cpu"]["model"] and machine["cpu"]["logical_cpus"] >= 1 and machine["memory_mb"] > 0
    assert machine["os"]["python"] and "onnxruntime" in machine["packages"] and "openvino" in machine["packages"]
    results = doc["results"]
    for kind in ("engine", "overhead", "pipeline", "startup"):
        assert results.get(kind), f"no {kind} results"
    engine = results["engine"][0]
    for key in ("session_creation_ms", "first_inference_ms", "p50_ms", "p99_9_ms", "throughput_ips", "peak_rss_mb", "cpu_percent"):
        assert math.isfinite(engine[key]["median"]), key
    assert results["pipeline"][0]["e2e_p99_ms"]["median"] > 0 and results["pipeline"][0]["peak_rss_mb"]["median"] > 0
    skipped = {s["kind"] for s in doc["skipped"]}
    assert bool(results.get("uplink")) == (MOSQUITTO is not None) and ("uplink" in skipped) == (MOSQUITTO is None)
    assert bool(results.get("decode")) == SHARED_DATA.is_dir()
    assert {t["status"] for t in doc["targets"]} <= {"PASS", "MISS", "NOT RUN"} and len(doc["targets"]) >= 5
    md = (out / "results.md").read_text()
    assert "## Targets" in md and "## Machine" in md and doc["command"] in md
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert any("matplotlib" in n for n in doc["notes"])
    else:
        assert (out / "engine-latency-cdf.png").stat().st_size > 0 and (out / "pipeline.png").stat().st_size > 0


@pytest.mark.parametrize("args, named", [
    (["--models", "no-such-model"], "no-such-model"),
    (["--engines", "tensorflow"], "tensorflow"),
    (["--only", "gpu-burn"], "gpu-burn"),
    (["--data", "/nonexistent/shared/data"], "/nonexistent/shared/data"),
    (["--threads", "two"], "two"),
])
def test_bad_input_is_one_line_naming_it(args: list[str], named: str, tmp_path: Path) -> None:
    proc = run_bench(args + ["--out", str(tmp_path / "out")], timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and "Traceback" not in proc.stderr, proc.stderr


def test_child_with_unknown_model_or_variant_is_one_line() -> None:
    for extra, named in ((["--model", "nope", "--variant", "fp32"], "nope"),
                         (["--model", "cxr-pneumonia", "--variant", "int8-ov"], "int8-ov")):
        proc = subprocess.run([sys.executable, "-m", "benchmarks.engine", "--engine", "openvino", *extra, "--json"],
                              capture_output=True, text=True, timeout=60, cwd=REPO)
        assert proc.returncode == 2 and named in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_benchmark_app_report_is_parsed_in_its_units() -> None:
    text = ("[ INFO ]   INFERENCE_PRECISION_HINT: <Type: 'float32'>\n[ INFO ] First inference took 3.35 ms\n"
            "[ INFO ] Count:            1556 iterations\n[ INFO ] Duration:         1000.46 ms\n[ INFO ] Latency:\n"
            "[ INFO ]    Median:        605.33 us\n[ INFO ]    Average:       620.16 us\n[ INFO ]    Min:  549.97 us\n"
            "[ INFO ]    Max:           4810.10 us\n[ INFO ] Throughput:   1555.28 FPS\n")
    parsed = parse_benchmark_app(text)
    assert parsed["p50"] == pytest.approx(0.60533) and parsed["first_inference_ms"] == pytest.approx(3.35)
    assert parsed["iterations"] == 1556 and parsed["compute_precision"] == "f32"


def minimal_doc() -> dict:
    return {"schema": 1, "tool": "edge-bench", "mode": "quick", "command": "edge-bench --quick", "started_at": "now",
            "duration_s": 1.0, "settings": {"kinds": ["decode"]}, "results": {}, "targets": [],
            "skipped": [{"kind": "decode", "reason": "no data"}], "errors": [], "notes": [],
            "machine": {"cpu": {"model": "x", "architecture": "x86_64", "logical_cpus": 2, "usable_cpus": 2, "flags": []},
                        "memory_mb": 1024.0, "os": {"name": "Linux", "kernel": "6", "python": "3.11"},
                        "packages": {"numpy": "2"}}}


def test_validate_names_what_is_wrong() -> None:
    doc = minimal_doc()
    assert validate(doc) == []
    doc["results"]["uplink"] = {"findings_per_s": {"median": float("nan")}}
    doc["settings"]["kinds"].append("engine")
    del doc["machine"]["os"]
    problems = validate(doc)
    assert any("findings_per_s" in p for p in problems)
    assert any("'engine'" in p for p in problems) and any("'os'" in p for p in problems)


def test_plots_are_skipped_with_a_note_without_matplotlib(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    written, note = plot(minimal_doc(), tmp_path)
    assert written == [] and "matplotlib" in note
    assert "## Targets" in markdown(minimal_doc(), written)


def test_the_daemon_never_imports_benchmarks() -> None:
    offenders = [str(p.relative_to(REPO)) for p in (REPO / "edge_runtime").rglob("*.py")
                 if "import benchmarks" in p.read_text() or "from benchmarks" in p.read_text()]
    assert offenders == []


def test_contention_recovery_times_are_taken_from_the_switches() -> None:
    from benchmarks.contention import recovery

    switches = [{"at": 101.0, "from": 1, "to": 2}, {"at": 104.0, "from": 2, "to": 3},  # hogs from 100 to 130 s
                {"at": 135.0, "from": 3, "to": 2}, {"at": 141.5, "from": 2, "to": 1}]
    rec = recovery(switches, level_before=1, hog_on=100.0, hog_off=130.0, level_at_off=3)
    assert rec["first_step_down_after_hog_start_s"] == 1.0 and rec["deepest_level"] == 3
    assert rec["back_up_after_hog_stop_s"] == 11.5 and rec["stepped_down_again_after"] == 0
    never = recovery(switches[:3], level_before=1, hog_on=100.0, hog_off=130.0, level_at_off=3)
    assert never["back_up_after_hog_stop_s"] is None  # not back within the window: the target reads as a miss
    doc = minimal_doc()
    doc["results"]["contention"] = {
        "recovery": never, "hogs": 2, "hog_for_s": 30.0, "hog_at_s": 20.0, "after_s": 40.0, "source": "phantom",
        "precision": "fp32", "threads": 2, "budget_ms": 33.0, "levels": ["fp32", "int8", "int8 @ 15/s", "int8 @ 7.5/s"],
        "phases": {"before": {"findings": 0, "seconds": 20.0}}, "switches": [],
        "controller": {"probes": 4, "probe_skipped": 1, "rounds_passed": 0, "rounds_failed": 2, "rounds_expired": 0}}
    from benchmarks.report import evaluate_targets

    target = next(t for t in evaluate_targets(doc["results"], None) if "hog" in t["target"])
    assert target["status"] == "MISS" and target["measured"] == "not within the window"
    assert "## Contention" in markdown(doc, [])


def test_exam_mode_overhead_is_judged_against_its_own_target_and_rendered() -> None:
    from benchmarks.report import evaluate_targets

    def row(results: str, ratio: float, last_stage: str) -> dict:
        m = lambda v: {"median": v, "min": v, "max": v, "n": 1}  # noqa: E731
        return {"model": "fetal-head", "engine": "onnxruntime", "variant": "int8-qdq", "device": "CPU",
                "compute_precision": "graph", "threads": 2, "rounds": 200, "results": results, "input": "phantom frame",
                "ratio_p50": m(ratio), "ratio_p50_ci95": [ratio - 0.1, ratio + 0.1], "runtime_p50_ms": m(8.0),
                "runtime_p99_ms": m(9.0), "bare_p50_ms": m(7.0), "bare_p99_ms": m(7.5),
                "stages_p50_ms": {"preprocess": m(0.8), "inference": m(7.0), "postprocess": m(1.5), last_stage: m(0.2)}}

    doc = minimal_doc()
    doc["results"]["overhead"] = [row("frame", 1.46, "finding_and_commit"), row("exam", 1.14, "exam_and_ring")]
    targets = evaluate_targets(doc["results"], "onnxruntime")
    exam = next(t for t in targets if "exam mode" in t["target"])
    assert exam["threshold"] == "<= 1.15x" and exam["status"] == "PASS" and exam["measured"] == "1.14x"
    frame = next(t for t in targets if t["target"].startswith("runtime overhead, "))
    assert frame["threshold"] == "<= 1.10x" and frame["status"] == "MISS"
    assert "0.20 (exam, ring)" in markdown(doc, [])


def test_exams_benchmark_counts_publish_packets_as_they_cross_the_wire() -> None:
    from benchmarks.exams import publish_wire_bytes, varint_len

    assert [varint_len(n) for n in (0, 127, 128, 16383, 16384)] == [1, 1, 2, 2, 3]
    # fixed header 1 + remaining length 1; topic length 2 + "a/b" 3; packet id 2; properties length 1; payload 10
    assert publish_wire_bytes("a/b", b"x" * 10) == 1 + 1 + 2 + 3 + 2 + 1 + 10
    assert publish_wire_bytes("a/b", b"x" * 200) == 1 + 2 + 2 + 3 + 2 + 1 + 200
