"""The `infer`, `models` and `doctor` contracts, run as a user runs them: the installed console script."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import CR_CHEST, DICOM_DIR, ellipse_image, needs_shared


def edge(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    exe = shutil.which("edge-runtime")
    cmd = [exe] if exe else [sys.executable, "-m", "edge_runtime"]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=300, cwd=cwd)


def findings(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


@pytest.fixture
def images(tmp_path):
    bright = tmp_path / "bright.png"
    dark = tmp_path / "dark.png"
    cv2.imwrite(str(bright), np.full((50, 60), 230, np.uint8))
    cv2.imwrite(str(dark), np.full((50, 60), 20, np.uint8))
    return bright, dark


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_infer_prints_one_finding_per_input_in_order(config_file, images, engine):
    bright, dark = images
    r = edge("--config", str(config_file), "infer", "--model", "tiny-cls", "--engine", engine, str(bright), str(dark))
    assert r.returncode == 0, r.stderr
    out = findings(r.stdout)
    assert [f["source"]["name"] for f in out] == [str(bright), str(dark)]
    assert [f["result"]["label"] for f in out] == ["bright", "normal"]
    assert [f["priority"] for f in out] == ["urgent", "routine"]
    f = out[0]
    assert f["model"]["engine"] == engine and f["model"]["device"] == "CPU" and f["model"]["precision"] == "fp32"
    assert f["device_id"] == "test-device" and f["site"] == "test-site" and f["task"] == "classification"
    assert set(f["latency_ms"]) >= {"capture_to_result", "preprocess", "inference", "postprocess"}
    assert f["budget_met"] is True and f["budget_ms"] == 1000
    assert out[1]["seq"] == out[0]["seq"] + 1 and out[0]["finding_id"] != out[1]["finding_id"]


def test_bad_inputs_are_one_line_each_and_others_still_run(config_file, images, tmp_path):
    bright, dark = images
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00garbage")
    missing = tmp_path / "missing.png"
    r = edge("--config", str(config_file), "infer", "--model", "tiny-cls", str(junk), str(bright), str(missing), str(dark))
    assert r.returncode == 1
    assert [f["source"]["name"] for f in findings(r.stdout)] == [str(bright), str(dark)]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2, r.stderr
    assert str(junk) in lines[0] and str(missing) in lines[1] and "no such file" in lines[1]
    assert "Traceback" not in r.stderr


def test_unknown_model(config_file, images):
    r = edge("--config", str(config_file), "infer", "--model", "nope", str(images[0]))
    assert r.returncode == 2 and r.stdout == ""
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("edge-runtime: nope: unknown model; installed models: ") and "tiny-cls, tiny-seg" in line


def test_hash_mismatch_refuses_to_run(config_file, models_root, images):
    with open(models_root / "tiny-cls" / "model.onnx", "ab") as fh:
        fh.write(b"tampered")
    r = edge("--config", str(config_file), "infer", "--model", "tiny-cls", str(images[0]))
    assert r.returncode == 2 and "sha256 mismatch" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_manifest_missing_key(config_file, models_root, images):
    path = models_root / "tiny-cls" / "manifest.toml"
    path.write_text(path.read_text().replace("latency_budget_ms = 1000\n", ""))
    r = edge("--config", str(config_file), "infer", "--model", "tiny-cls", str(images[0]))
    assert r.returncode == 2
    assert f"{path}: key 'latency_budget_ms' is missing" in r.stderr and "Traceback" not in r.stderr


def test_oversized_image(config_file, tmp_path, images):
    cfg = config_file.read_text() + "\n[imaging]\nmax_pixel_bytes = 1000\n"
    config_file.write_text(cfg)
    r = edge("--config", str(config_file), "infer", "--model", "tiny-cls", str(images[0]))
    assert r.returncode == 1 and "too large" in r.stderr


def test_segmentation_with_pixel_spacing(config_file, tmp_path):
    path = tmp_path / "head.png"
    cv2.imwrite(str(path), ellipse_image(axes=(500.0, 380.0)))
    r = edge("--config", str(config_file), "infer", "--model", "tiny-seg", "--pixel-spacing", "0.15", str(path))
    assert r.returncode == 0, r.stderr
    (f,) = findings(r.stdout)
    assert f["task"] == "segmentation"
    assert f["result"]["measurements"]["head_circumference_mm"] == pytest.approx(211.0, rel=0.02)


@needs_shared
def test_multi_frame_gives_one_finding_per_frame(config_file):
    cine = DICOM_DIR / "pydicom-data" / "OBXXXX1A_rle_2frame.dcm"
    r = edge("--config", str(config_file), "infer", "--model", "tiny-seg", str(cine))
    assert r.returncode == 0, r.stderr
    out = findings(r.stdout)
    assert [f["study"]["frame_index"] for f in out] == [0, 1]
    assert out[0]["study"]["modality"] == "US" and out[0]["study"]["study_id"].startswith("2.25.")


@needs_shared
def test_modality_mismatch_is_a_finding_the_model_did_not_assess(config_file):
    """Out of scope is not bad input: a finding that says why, no label, routine, exit 0 (issue 13)."""
    r = edge("--config", str(config_file), "infer", "--model", "tiny-cls", str(DICOM_DIR / "pydicom-data" / "US1_UNCR.dcm"))
    assert r.returncode == 0 and r.stderr == ""
    (f,) = findings(r.stdout)
    assert f["result"] == {"assessed": False,
                           "reason": "out of scope (metadata gate): Modality is US; tiny-cls reads CR, DX"}
    assert f["priority"] == "routine"


@needs_shared
def test_findings_carry_no_identifying_dicom_values(config_file):
    import pydicom

    r = edge("--config", str(config_file), "infer", "--model", "tiny-cls", str(CR_CHEST))
    assert r.returncode == 0, r.stderr
    ds = pydicom.dcmread(CR_CHEST, stop_before_pixels=True)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "PatientID", "PatientName"):
        value = str(ds.get(keyword, "")).strip()
        if value:
            assert value not in r.stdout, keyword


def test_models_list_and_json(config_file):
    r = edge("--config", str(config_file), "models", "list")
    assert r.returncode == 0 and "tiny-cls" in r.stdout and "classification" in r.stdout
    rows = json.loads(edge("--config", str(config_file), "models", "--json").stdout)
    assert {"tiny-cls", "tiny-seg"} <= {row["name"] for row in rows}


def test_doctor_reports_engines_decoders_and_integrity(config_file, models_root):
    r = edge("--config", str(config_file), "doctor", "--json")
    report = json.loads(r.stdout)
    assert r.returncode == 0, r.stdout
    titles = [s["title"] for s in report["sections"]]
    assert titles == ["System", "Engines and devices", "DICOM decoders", "Models", "Installed model versions"]
    checks = {c["name"]: c for s in report["sections"] for c in s["checks"]}
    assert "CPU" in checks["onnxruntime"]["detail"] and "CPU" in checks["openvino"]["detail"]
    assert checks["JPEG 2000 Image Compression (Lossless Only)"]["status"] == "ok"
    assert "openvino on CPU" in checks["tiny-cls/fp32"]["detail"]
    # A tampered model turns doctor red.
    with open(models_root / "tiny-seg" / "model.onnx", "ab") as fh:
        fh.write(b"x")
    r = edge("--config", str(config_file), "doctor", "--quick")
    assert r.returncode == 1 and "FAIL" in r.stdout and "sha256 mismatch" in r.stdout


def test_bad_config_is_one_line(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[engine]\nthreads = 'many'\n")
    r = edge("--config", str(cfg), "models")
    assert r.returncode == 2 and r.stderr.strip() == f"edge-runtime: {cfg}: key 'engine.threads' must be integer, got str 'many'"


def test_options_go_before_or_after_the_subcommand(config_file):
    after = edge("models", "list", "--json", "--config", str(config_file), "--log-level", "debug")
    before = edge("--config", str(config_file), "models", "list", "--json")
    assert after.returncode == 0 and before.returncode == 0, after.stderr + before.stderr
    names = {r["name"] for r in json.loads(after.stdout)}
    assert names == {r["name"] for r in json.loads(before.stdout)} and "tiny-cls" in names


def test_models_list_json_gives_variants_as_objects(config_file):
    rows = {r["name"]: r for r in json.loads(edge("--config", str(config_file), "models", "list", "--json").stdout)}
    (variant,) = rows["tiny-cls"]["variants"]
    assert variant == {"id": "fp32", "precision": "fp32", "engines": ["onnxruntime", "openvino"], "format": "onnx",
                       "file": "model.onnx"}


def test_run_help_shows_its_options():
    r = edge("run", "--help")
    assert r.returncode == 0 and "--config FILE" in r.stdout and "--log-level" in r.stdout


def test_run_config_after_the_subcommand_refuses_a_model_typo_naming_file_and_source(config_file):
    typo = '\n[[sources]]\nname = "probe"\nkind = "phantom"\nmodel = "tiny-sge"\n'
    config_file.write_text(config_file.read_text() + typo)
    r = edge("run", "--config", str(config_file))
    assert r.returncode == 2 and r.stdout == ""
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith(f"edge-runtime: {config_file}: key 'sources[0].model'")
    assert "'probe'" in line and "'tiny-sge'" in line and "did you mean 'tiny-seg'?" in line


@pytest.mark.parametrize("command", [["models", "list"], ["models", "list", "--json"], ["doctor", "--quick"]])
def test_a_reader_that_goes_away_is_no_traceback(config_file, command):
    """`edge-runtime models list | head -1` where head has already exited: no BrokenPipeError traceback."""
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)  # every write to the pipe now fails with EPIPE
    exe = shutil.which("edge-runtime")
    cmd = ([exe] if exe else [sys.executable, "-m", "edge_runtime"]) + ["--config", str(config_file), *command]
    try:
        r = subprocess.run(cmd, stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write_end)
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr
    assert r.returncode == 141
