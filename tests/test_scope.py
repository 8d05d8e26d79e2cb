"""Scope gates: metadata and content gates in the shared pipeline, the [scope] manifest table, and the
shipped models' gate files on real inputs (the issue's 'done when')."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import CLASSIFIER_MANIFEST, DICOM_DIR, SHARED_DATA, needs_shared, sha256
from edge_runtime.errors import ConfigError, InputError, ModelError
from edge_runtime.frames import Frame, StudyRef
from edge_runtime.pipeline import Predictor
from edge_runtime.registry import ModelRegistry, parse_manifest
from edge_runtime.scope import (ContentGate, ContentGateSpec, ScopeSpec, check_pixel_spacing, mahalanobis_sq,
                                metadata_refusal, write_statistics)

REPO = Path(__file__).resolve().parent.parent
CHEST_SCOPE = ScopeSpec(modality=("CR", "DX"), body_part=("CHEST",), view_position=("PA", "AP"),
                        photometric=("MONOCHROME1", "MONOCHROME2"))


# ------------------------------------------------------------------ metadata gate
def test_metadata_gate_refuses_a_hand_radiograph_and_names_tag_and_value():
    reason = metadata_refusal(CHEST_SCOPE, StudyRef(modality="CR", body_part="HAND"), "cxr")
    assert reason == "out of scope (metadata gate): BodyPartExamined is HAND; cxr reads CHEST"


@pytest.mark.parametrize("study, tag", [
    (StudyRef(modality="US"), "Modality is US"),
    (StudyRef(modality="CR", body_part="chest", view_position="LL"), "ViewPosition is LL"),
    (StudyRef(modality="DX", photometric="RGB"), "PhotometricInterpretation is RGB"),
])
def test_metadata_gate_checks_each_tag(study, tag):
    assert tag in metadata_refusal(CHEST_SCOPE, study, "cxr")


def test_missing_tags_are_not_refused():
    assert metadata_refusal(CHEST_SCOPE, StudyRef(), "cxr") is None  # a PNG: no header at all
    assert metadata_refusal(CHEST_SCOPE, StudyRef(modality="CR", body_part="", view_position=" "), "cxr") is None
    assert metadata_refusal(CHEST_SCOPE, StudyRef(modality="CR", body_part="Chest", view_position="pa"), "cxr") is None


# ------------------------------------------------------------------ content gate and statistics
def test_mahalanobis_matches_the_definition():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 3))
    mean = rng.normal(size=3)
    a = rng.normal(size=(3, 3))
    precision = a @ a.T + np.eye(3)
    want = [float((r - mean) @ precision @ (r - mean)) for r in x]
    assert np.allclose(mahalanobis_sq(x, mean, precision), want)


def test_content_gate_verifies_its_hash_and_refuses_far_features(tmp_path):
    path = tmp_path / "scope-features.npz"
    digest = write_statistics(path, np.zeros(2), np.eye(2))
    gate = ContentGate("m", ContentGateSpec(path, digest, threshold=9.0))
    assert gate.refusal(np.array([1.0, 2.0])) == (5.0, None)
    score, reason = gate.refusal(np.array([3.0, 4.0]))
    assert score == 25.0 and "content gate" in reason and "25.0" in reason and "9.0" in reason
    assert gate.refusal(np.array([np.nan, 0.0]))[1] is not None  # NaN features never pass
    with pytest.raises(ModelError, match="sha256 mismatch"):
        ContentGate("m", ContentGateSpec(path, "0" * 64, threshold=9.0))
    with pytest.raises(ModelError, match="features output has 3 values"):
        gate.score(np.zeros(3))


def tiny_gated_classifier(folder: Path, threshold: float = 4.0, header_confirmed: float | None = None) -> Path:
    """The conftest classifier plus a 'features' output (the pooled mean) and a [scope] whose statistics
    put mid-grey images in scope: mean 0.5, variance 0.01 -> distance 100 * (m - 0.5)^2."""
    import onnx
    from onnx import TensorProto, helper

    folder.mkdir(parents=True)
    nodes = [
        helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["features"]),
        helper.make_node("Gemm", ["features", "W", "B"], ["logits"]),
    ]
    inits = [helper.make_tensor("W", TensorProto.FLOAT, [1, 2], [0.0, 4.0]),
             helper.make_tensor("B", TensorProto.FLOAT, [2], [0.0, -2.0])]
    graph = helper.make_graph(
        nodes, "gated", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 2]),
         helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(folder / "model.onnx"))
    digest = write_statistics(folder / "scope-features.npz", np.array([0.5]), np.array([[100.0]]))
    text = CLASSIFIER_MANIFEST.format(name=folder.name, sha=sha256(folder / "model.onnx"))
    relaxed = f"header_confirmed_threshold = {header_confirmed}\n" if header_confirmed else ""
    scope = (f'[scope]\nbody_part = ["CHEST"]\n\n[scope.content]\nfile = "scope-features.npz"\n'
             f'sha256 = "{digest}"\nthreshold = {threshold}\n{relaxed}\n[[variants]]')
    text = text.replace("[[variants]]", scope)
    (folder / "manifest.toml").write_text(text)
    return folder


def frame_of(value: int, **study) -> Frame:
    return Frame(np.full((40, 40), value, np.uint8), "file", "x.png", study=StudyRef(**study))


def test_pipeline_applies_both_gates_and_marks_in_scope_findings(tmp_path):
    tiny_gated_classifier(tmp_path / "models" / "gated")
    p = Predictor.load(ModelRegistry([tmp_path / "models"]), "gated", "onnxruntime")
    inside = p.predict(frame_of(140)).head  # mean 0.55: distance 0.25
    assert inside.result["assessed"] is True and inside.result["label"] in ("normal", "bright")
    assert inside.result["scope_distance"] == pytest.approx(0.2, abs=0.1)
    far = p.predict(frame_of(250)).head  # mean 0.98: distance 23
    assert far.result == {"assessed": False, "reason": far.result["reason"]} and far.priority == "routine"
    assert "content gate" in far.result["reason"]
    hand = p.predict(frame_of(140, modality="CR", body_part="HAND")).head
    assert hand.result["assessed"] is False and "BodyPartExamined is HAND" in hand.result["reason"]
    assert "label" not in hand.result and "probabilities" not in hand.result


def test_a_confirming_header_relaxes_the_content_gate_and_asks_for_review(tmp_path):
    tiny_gated_classifier(tmp_path / "models" / "gated", threshold=4.0, header_confirmed=24.0)
    p = Predictor.load(ModelRegistry([tmp_path / "models"]), "gated", "onnxruntime")
    assert p.predict(frame_of(250)).head.result["assessed"] is False  # a PNG (distance 23): the strict limit
    assert p.predict(frame_of(250, modality="CR")).head.result["assessed"] is False  # BodyPartExamined missing
    confirmed = p.predict(frame_of(250, modality="CR", body_part="CHEST")).head.result
    assert confirmed["assessed"] is True and confirmed["needs_review"] is True and "atypical" in confirmed["scope_note"]
    typical = p.predict(frame_of(140, modality="CR", body_part="CHEST")).head.result
    assert typical["assessed"] is True and "scope_note" not in typical
    far = p.predict(frame_of(0, modality="CR", body_part="CHEST")).head.result  # distance 25: beyond both limits
    assert far["assessed"] is False and "limit 24.0" in far["reason"]


def test_a_variant_without_the_features_output_is_refused_at_load(tmp_path):
    from conftest import classifier_onnx  # the plain graph: logits only

    folder = tiny_gated_classifier(tmp_path / "models" / "gated")
    gated_sha = sha256(folder / "model.onnx")
    classifier_onnx(folder / "model.onnx")
    text = (folder / "manifest.toml").read_text()
    (folder / "manifest.toml").write_text(text.replace(gated_sha, sha256(folder / "model.onnx")))
    with pytest.raises(ModelError, match="no scope 'features' output"):
        Predictor.load(ModelRegistry([tmp_path / "models"]), "gated", "onnxruntime")


def test_scope_table_is_validated(tmp_path):
    folder = tiny_gated_classifier(tmp_path / "gated", threshold=4.0)
    manifest = parse_manifest(folder / "manifest.toml")
    assert manifest.scope.body_part == ("CHEST",) and manifest.scope.modality == ("CR", "DX")
    assert manifest.scope.content.threshold == 4.0
    text = (folder / "manifest.toml").read_text()
    (folder / "manifest.toml").write_text(text.replace("threshold = 4.0\n\n[[variants]]",
                                                       "threshold = -1.0\n\n[[variants]]"))
    with pytest.raises(ConfigError, match="scope.content.threshold"):
        parse_manifest(folder / "manifest.toml")


@pytest.mark.parametrize("spacing", [(-1.0, -1.0), (0.0, 0.0), (math.nan, math.nan), (0.1, 6.0)])
def test_implausible_pixel_spacing_is_an_input_error(spacing):
    with pytest.raises(InputError, match="pixel spacing") as exc:
        check_pixel_spacing("scan.png", spacing)
    assert exc.value.name == "scan.png" if hasattr(exc.value, "name") else "scan.png" in str(exc.value)
    check_pixel_spacing("scan.png", (0.1, 0.1))
    check_pixel_spacing("scan.png", None)


# ------------------------------------------------------------------ shipped models, real inputs
def HC18_IMAGE() -> Path:
    return sorted((SHARED_DATA / "hc18" / "images").glob("*_HC.png"))[0]


def private_config(tmp_path: Path) -> str:
    """The bundled models with a private state directory (the CLI's sequence file and device key)."""
    path = tmp_path / "edge.toml"
    path.write_text(f'[device]\nstate_dir = "{tmp_path / "state"}"\n\n[engine]\nthreads = 1\nwarmup_runs = 1\n')
    return str(path)


def edge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_runtime", *args], capture_output=True, text=True, timeout=300,
                          cwd=REPO)


@needs_shared
@pytest.mark.parametrize("model", ["cxr-pneumonia", "fetal-head"])
def test_shipped_gate_files_load_and_hash_for_every_variant(model):
    registry = ModelRegistry()
    manifest = registry.get(model)
    assert manifest.scope.content is not None and manifest.scope.content.path.is_file()
    for v in manifest.variants:
        for engine in v.engines:
            if v.cpu_missing(engine):  # e.g. cxr int8-qdq on OpenVINO without VNNI: refused, never loaded
                continue
            p = Predictor.load(registry, model, engine, v.precision)
            assert p.gate is not None and p.gate.dim > 100


@needs_shared
def test_cxr_infer_refuses_out_of_scope_and_assesses_chest_images(tmp_path):
    """The issue's 'done when': RG3 (an extremity CR) twice and an HC18 ultrasound PNG renamed .dcm give
    assessed=false with a reason; RG1 (a chest CR) and Kermany chest JPEGs assessed=true; exit 0."""
    jpegs = sorted((SHARED_DATA / "cxr-kermany" / "train" / "NORMAL").glob("*.jpeg"))[:2] + \
        sorted((SHARED_DATA / "cxr-kermany" / "train" / "PNEUMONIA").glob("*.jpeg"))[:2]
    renamed = tmp_path / "fetal.dcm"  # the case: an HC18 PNG renamed .dcm (sniffed as PNG: no header)
    renamed.write_bytes(HC18_IMAGE().read_bytes())
    refused = [DICOM_DIR / "pydicom-data" / "RG3_J2KR.dcm", DICOM_DIR / "pydicom-data" / "RG3_UNCR.dcm", renamed]
    assessed = [DICOM_DIR / "pydicom-data" / "RG1_J2KR.dcm", *jpegs]
    r = edge("--config", private_config(tmp_path), "infer", "--model", "cxr-pneumonia",
             *map(str, refused + assessed))
    assert r.returncode == 0, r.stderr
    out = [json.loads(line) for line in r.stdout.splitlines()]
    assert [f["source"]["name"] for f in out] == [str(p) for p in refused + assessed]
    for f in out[: len(refused)]:
        res = f["result"]
        assert res["assessed"] is False and res["reason"].startswith("out of scope") and f["priority"] == "routine"
        assert "label" not in res and "probabilities" not in res
    assert "BodyPartExamined is EXTREMITY" in out[0]["result"]["reason"]
    assert "content gate" in out[2]["result"]["reason"]
    for f in out[len(refused):]:
        assert f["result"]["assessed"] is True and f["result"]["label"] in ("normal", "pneumonia")
        assert isinstance(f["result"]["needs_review"], bool)


@needs_shared
def test_fetal_head_refuses_a_chest_radiograph_and_measures_hc18_with_a_quality(tmp_path):
    chest = sorted((SHARED_DATA / "cxr-kermany" / "train" / "NORMAL").glob("*.jpeg"))[0]
    hc18 = HC18_IMAGE()
    r = edge("--config", private_config(tmp_path), "infer", "--model", "fetal-head", "--pixel-spacing", "0.15",
             str(chest), str(hc18), str(DICOM_DIR / "pydicom-data" / "RG1_UNCR.dcm"))
    assert r.returncode == 0, r.stderr
    out = [json.loads(line) for line in r.stdout.splitlines()]
    assert out[0]["result"]["assessed"] is False and "content gate" in out[0]["result"]["reason"]
    assert out[2]["result"]["assessed"] is False and "Modality is CR" in out[2]["result"]["reason"]
    head = out[1]["result"]
    assert head["assessed"] is True and head["detected"] is True
    assert 0.5 < head["quality"] <= 1.0 and head["measurements"]["head_circumference_mm"] > 0


@needs_shared
@pytest.mark.parametrize("value", ["-1", "0", "nan", "6"])
def test_infer_refuses_an_implausible_pixel_spacing_naming_the_input(tmp_path, value):
    hc18 = str(HC18_IMAGE())
    r = edge("--config", private_config(tmp_path), "infer", "--model", "fetal-head", "--pixel-spacing", value, hc18)
    assert r.returncode == 1 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and hc18 in lines[0] and "pixel spacing" in lines[0], r.stderr


@needs_shared
def test_a_dicom_with_an_absurd_pixel_spacing_is_refused_naming_the_file(tmp_path):
    import pydicom

    ds = pydicom.dcmread(DICOM_DIR / "pydicom-data" / "OBXXXX1A.dcm")
    ds.PixelSpacing = [6.0, 6.0]  # mm per pixel: a cm/mm mix-up
    path = tmp_path / "ob.dcm"
    ds.save_as(path)
    r = edge("--config", private_config(tmp_path), "infer", "--model", "fetal-head", str(path))
    assert r.returncode == 1 and r.stdout == ""
    (line,) = r.stderr.strip().splitlines()
    assert str(path) in line and "pixel spacing 6.0 mm" in line


@pytest.mark.parametrize("value", ["6.0", "nan", "-0.5"])
def test_configuration_refuses_an_implausible_video_pixel_spacing(tmp_path, value):
    from edge_runtime.config import load_config

    path = tmp_path / "edge.toml"
    path.write_text('[[sources]]\nname = "probe"\nkind = "video"\nmodel = "fetal-head"\ndevice = "/dev/video0"\n'
                    f"pixel_spacing_mm = {value}\n")
    with pytest.raises(ConfigError, match=r"sources\[0\]\.pixel_spacing_mm"):
        load_config(path)


def test_a_variant_can_carry_its_own_content_limit(tmp_path):
    folder = tiny_gated_classifier(tmp_path / "models" / "gated", threshold=4.0, header_confirmed=8.0)
    text = (folder / "manifest.toml").read_text()
    (folder / "manifest.toml").write_text(text.replace('precision = "fp32"\n',
                                                       'precision = "fp32"\nscope_threshold = 30.0\n'))
    p = Predictor.load(ModelRegistry([tmp_path / "models"]), "gated", "onnxruntime")
    assert p.gate.limit(False) == 30.0 and p.gate.limit(True) == 60.0  # the header-confirmed ratio is kept
    assert p.predict(frame_of(250)).head.result["assessed"] is True  # distance 23: inside this variant's limit
