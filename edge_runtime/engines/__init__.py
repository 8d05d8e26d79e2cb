"""Engine registry: pick a backend by kind ("onnxruntime", "openvino" or "auto") and load a model."""
from __future__ import annotations

import logging
from pathlib import Path

from edge_runtime.engines.base import Engine, EngineOptions, warm_up
from edge_runtime.errors import EngineError

log = logging.getLogger("edge_runtime.engines")

KINDS = ("onnxruntime", "openvino")


def _backend(kind: str):
    if kind == "onnxruntime":
        from edge_runtime.engines import onnxruntime_engine as module

        return module.OnnxRuntimeEngine, module
    if kind == "openvino":
        from edge_runtime.engines import openvino_engine as module

        return module.OpenVinoEngine, module
    raise EngineError(kind, f"unknown engine; allowed: {', '.join(KINDS)}, auto")


def available_devices(kind: str) -> list[str]:
    return _backend(kind)[1].available_devices()


def resolve_auto() -> str:
    """Accelerators first: a CUDA/TensorRT board runs ONNX Runtime, an Intel GPU/NPU runs OpenVINO; on a
    plain CPU ONNX Runtime, which starts faster (import and session creation) at similar FP32 speed."""
    try:
        ort_devices = available_devices("onnxruntime")
    except ImportError:
        ort_devices = []
    if any(d in ort_devices for d in ("TensorRT", "CUDA")):
        return "onnxruntime"
    try:
        ov_devices = available_devices("openvino")
    except ImportError:
        ov_devices = []
    if any(d in ov_devices for d in ("NPU", "GPU")):
        return "openvino"
    if ort_devices:
        return "onnxruntime"
    if ov_devices:
        return "openvino"
    raise EngineError("auto", "neither onnxruntime nor openvino is installed")


def load_engine(kind: str, model_path: Path, input_shape: tuple[int, ...], options: EngineOptions) -> Engine:
    """Load a model on the first working device of the backend and warm it up."""
    cls, _ = _backend(kind)
    try:
        engine = cls(Path(model_path), options)
    except EngineError:
        raise
    except ImportError as exc:
        raise EngineError(kind, f"engine not installed ({exc})") from None
    for reason in engine.fallbacks:
        log.info("%s: skipped %s", kind, reason)
    warm_up(engine, input_shape, options.warmup_runs)
    return engine
