from __future__ import annotations

import numpy as np
import pytest
from conftest import classifier_onnx, segmenter_onnx

from edge_runtime.engines import EngineOptions, available_devices, load_engine, resolve_auto
from edge_runtime.engines.base import first_working_device
from edge_runtime.errors import EngineError

KINDS = ["onnxruntime", "openvino"]


@pytest.mark.parametrize("kind", KINDS)
def test_runs_classifier(tmp_path, kind):
    path = classifier_onnx(tmp_path / "c.onnx", size=32)
    engine = load_engine(kind, path, (1, 1, 32, 32), EngineOptions(threads=1, cache_dir=tmp_path / "cache"))
    assert engine.device == "CPU"
    out = engine.run(np.full((1, 1, 32, 32), 0.75, np.float32))
    assert out.shape == (1, 2)
    assert out[0] == pytest.approx([0.0, 1.0], abs=1e-5)  # 4 * (0.75 - 0.5)


def test_engines_agree_on_segmenter(tmp_path):
    path = segmenter_onnx(tmp_path / "s.onnx", 64, 96)
    x = np.random.default_rng(0).random((1, 1, 64, 96), dtype=np.float32)
    outs = [load_engine(k, path, (1, 1, 64, 96), EngineOptions(threads=1)).run(x) for k in KINDS]
    assert np.allclose(outs[0], outs[1], atol=1e-4)
    assert np.allclose(outs[0], 20 * (x - 0.5), atol=1e-4)


def test_openvino_precision_is_explicit_f32_by_default(tmp_path):
    path = classifier_onnx(tmp_path / "c.onnx")
    engine = load_engine("openvino", path, (1, 1, 32, 32), EngineOptions(threads=1))
    assert engine.precision == "f32"


def test_openvino_writes_compiled_model_cache(tmp_path):
    path = classifier_onnx(tmp_path / "c.onnx")
    cache = tmp_path / "cache"
    load_engine("openvino", path, (1, 1, 32, 32), EngineOptions(threads=1, cache_dir=cache))
    assert any((cache / "openvino").iterdir()), "no cache blob written"


@pytest.mark.parametrize("kind", KINDS)
def test_absent_preferred_devices_fall_back_to_cpu(tmp_path, kind):
    path = classifier_onnx(tmp_path / "c.onnx")
    devices = ("TensorRT", "CUDA", "CPU") if kind == "onnxruntime" else ("NPU", "GPU", "CPU")
    engine = load_engine(kind, path, (1, 1, 32, 32), EngineOptions(devices=devices, threads=1))
    assert engine.device == "CPU"
    absent = [d for d in devices[:2] if d not in available_devices(kind)]
    assert [f.split(":")[0] for f in engine.fallbacks] == absent
    assert all("not present" in f for f in engine.fallbacks)


def test_device_that_fails_to_compile_falls_back():
    def load(device):
        if device == "GPU":
            raise RuntimeError("clBuildProgram failed")
        return f"loaded on {device}"

    device, result, reasons = first_working_device("openvino", ["NPU", "GPU", "CPU"], ["GPU", "CPU"], load)
    assert (device, result) == ("CPU", "loaded on CPU")
    assert reasons == ["NPU: not present", "GPU: failed to load (clBuildProgram failed)"]


def test_no_device_at_all_is_one_error():
    with pytest.raises(EngineError, match="no device could load the model: NPU: not present; GPU: not present"):
        first_working_device("openvino", ["NPU", "GPU"], ["CPU"], lambda d: d)


def test_unknown_device_and_engine(tmp_path):
    path = classifier_onnx(tmp_path / "c.onnx")
    with pytest.raises(EngineError, match="unknown device"):
        load_engine("openvino", path, (1, 1, 32, 32), EngineOptions(devices=("TPU",)))
    with pytest.raises(EngineError, match="unknown engine"):
        load_engine("tensorflow", path, (1, 1, 32, 32), EngineOptions())


def test_auto_resolves_to_an_installed_engine():
    assert resolve_auto() in KINDS


def test_auto_prefers_accelerators_then_openvino_on_a_plain_cpu():
    from edge_runtime.engines import choose_engine

    assert choose_engine(["TensorRT", "CUDA", "CPU"], ["CPU"]) == "onnxruntime"  # a Jetson
    assert choose_engine(["CPU"], ["NPU", "GPU", "CPU"]) == "openvino"  # an Intel board with an NPU
    assert choose_engine(["CPU"], ["CPU"]) == "openvino"
    assert choose_engine(["CPU"], []) == "onnxruntime"  # no OpenVINO plugin for this CPU
    assert choose_engine([], []) is None


def test_broken_model_file(tmp_path):
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"not a model")
    with pytest.raises(EngineError, match="no device could load the model: CPU: failed to load"):
        load_engine("onnxruntime", path, (1, 1, 32, 32), EngineOptions(devices=("CPU",)))


def test_auto_does_not_import_onnxruntime_to_choose_openvino():
    """On a CPU-only box auto reads ONNX Runtime's provider libraries instead of importing it: a daemon that
    runs OpenVINO then never pays for loading ONNX Runtime."""
    import subprocess
    import sys

    from edge_runtime.engines import _ort_accelerators_built_in, available_devices

    built_in = _ort_accelerators_built_in()
    assert built_in == any(d in available_devices("onnxruntime") for d in ("CUDA", "TensorRT"))
    code = ("import sys; from edge_runtime.engines import resolve_auto; k = resolve_auto(); "
            "print(k, 'onnxruntime' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    if built_in:
        assert out[0] == "onnxruntime"  # CUDA or TensorRT present: a Jetson runs ONNX Runtime
    else:
        assert out[0] in KINDS
        if out[0] == "openvino":
            assert out[1] == "False", "auto imported onnxruntime to pick OpenVINO"
