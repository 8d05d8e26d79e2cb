"""Shared fixtures: tiny ONNX models built in the test with onnx.helper, wrapped in model folders."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
DICOM_DIR = SHARED_DATA / "dicom"
CR_CHEST = DICOM_DIR / "pydicom-data" / "RG1_J2KR.dcm"

needs_shared = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"shared data not found at {SHARED_DATA} (clone with ../shared beside the repo)"
)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def classifier_onnx(path: Path, size: int = 32, weight: float = 4.0) -> Path:
    """image (1,1,size,size) -> logits (1,2) = [0, weight * (mean - 0.5)]: brighter images are 'positive'."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "W", "B"], ["logits"]),
    ]
    inits = [
        helper.make_tensor("W", TensorProto.FLOAT, [1, 2], [0.0, weight]),
        helper.make_tensor("B", TensorProto.FLOAT, [2], [0.0, -weight * 0.5]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny-classifier",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 2])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def segmenter_onnx(path: Path, height: int = 64, width: int = 96) -> Path:
    """image (1,1,H,W) -> logits = 20 * (x - 0.5): bright pixels are 'head'."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Sub", ["image", "half"], ["centred"]),
        helper.make_node("Mul", ["centred", "gain"], ["logits"]),
    ]
    inits = [helper.make_tensor("half", TensorProto.FLOAT, [], [0.5]), helper.make_tensor("gain", TensorProto.FLOAT, [], [20.0])]
    graph = helper.make_graph(
        nodes,
        "tiny-segmenter",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, height, width])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1, height, width])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


CLASSIFIER_MANIFEST = """\
name = "{name}"
version = "0.0.1"
task = "classification"
modality = ["CR", "DX"]
summary = "test classifier"
intended_use = "tests only; not for diagnostic use"
latency_budget_ms = 1000

[input]
name = "image"
shape = [1, 1, 32, 32]
layout = "NCHW"
channels = "gray"
dtype = "float32"

[preprocessing]
resize = "stretch"
interpolation = "area"
mean = [0.0]
std = [1.0]
windowing = "voi"

[output]
name = "logits"
activation = "softmax"
labels = ["normal", "bright"]

[decision]
positive_label = "bright"
threshold = 0.5
urgent_if_positive = true

[[variants]]
id = "fp32"
file = "model.onnx"
format = "onnx"
engines = ["onnxruntime", "openvino"]
precision = "fp32"
sha256 = "{sha}"
"""

SEGMENTER_MANIFEST = """\
name = "{name}"
version = "0.0.1"
task = "segmentation"
modality = ["US"]
summary = "test segmenter"
intended_use = "tests only; not for diagnostic use"
latency_budget_ms = 1000

[input]
name = "image"
shape = [1, 1, 64, 96]
layout = "NCHW"
channels = "gray"
dtype = "float32"

[preprocessing]
resize = "letterbox"
interpolation = "area"

[output]
name = "logits"
activation = "sigmoid"
labels = ["head"]

[segmentation]
threshold = 0.5
measurement = "head_circumference"
gestational_age = "hadlock-1984-hc"
min_area_fraction = 0.005

[[variants]]
id = "fp32"
file = "model.onnx"
format = "onnx"
engines = ["onnxruntime", "openvino"]
precision = "fp32"
sha256 = "{sha}"
"""


def make_model_folder(root: Path, name: str, kind: str = "classifier") -> Path:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    onnx_path = folder / "model.onnx"
    if kind == "classifier":
        classifier_onnx(onnx_path)
        text = CLASSIFIER_MANIFEST
    else:
        segmenter_onnx(onnx_path)
        text = SEGMENTER_MANIFEST
    (folder / "manifest.toml").write_text(text.format(name=name, sha=sha256(onnx_path)))
    return folder


@pytest.fixture
def models_root(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    make_model_folder(root, "tiny-cls", "classifier")
    make_model_folder(root, "tiny-seg", "segmenter")
    return root


@pytest.fixture
def config_file(tmp_path: Path, models_root: Path) -> Path:
    """A config that uses the tiny models and a private state directory."""
    path = tmp_path / "edge.toml"
    path.write_text(
        f'[device]\nid = "test-device"\nsite = "test-site"\nstate_dir = "{tmp_path / "state"}"\n\n'
        f'[models]\npaths = ["{models_root}"]\n\n[engine]\nthreads = 1\nwarmup_runs = 1\n'
    )
    return path


def ellipse_image(height: int = 540, width: int = 800, axes=(300.0, 200.0), angle: float = 20.0) -> np.ndarray:
    """A gray image with a bright filled ellipse (full axes in pixels) centred in the frame."""
    import cv2

    img = np.full((height, width), 20, np.uint8)
    cv2.ellipse(img, ((width / 2, height / 2), axes, angle), 230, thickness=-1)
    return img
