"""ONNX Runtime backend: TensorRT, CUDA, OpenVINO EP, then CPU."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from edge_runtime.engines.base import EngineOptions, first_working_device
from edge_runtime.errors import EngineError

KIND = "onnxruntime"
# Short device names used in config and findings, mapped to execution providers.
PROVIDERS = {
    "TensorRT": "TensorrtExecutionProvider",
    "CUDA": "CUDAExecutionProvider",
    "OpenVINO": "OpenVINOExecutionProvider",
    "CPU": "CPUExecutionProvider",
}
DEFAULT_DEVICES = ("TensorRT", "CUDA", "OpenVINO", "CPU")


def available_devices() -> list[str]:
    import onnxruntime as ort

    have = set(ort.get_available_providers())
    return [name for name, provider in PROVIDERS.items() if provider in have]


def _provider_options(device: str, options: EngineOptions) -> dict[str, str]:
    if device == "TensorRT" and options.cache_dir is not None:
        # Building a TensorRT engine takes minutes on a Jetson; the cache makes the second start fast.
        cache = Path(options.cache_dir) / "tensorrt"
        cache.mkdir(parents=True, exist_ok=True)
        return {"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(cache), "trt_timing_cache_enable": "True",
                "trt_timing_cache_path": str(cache)}
    if device == "OpenVINO" and options.cache_dir is not None:
        cache = Path(options.cache_dir) / "ort-openvino"
        cache.mkdir(parents=True, exist_ok=True)
        return {"cache_dir": str(cache)}
    return {}


class OnnxRuntimeEngine:
    kind = KIND

    def __init__(self, model_path: Path, options: EngineOptions) -> None:
        import onnxruntime as ort

        self.model_path = Path(model_path)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if options.threads:
            so.intra_op_num_threads = options.threads
            so.inter_op_num_threads = 1
        if not options.allow_spinning:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")

        def load(device: str) -> ort.InferenceSession:
            providers = [(PROVIDERS[device], _provider_options(device, options))]
            if device != "CPU":
                providers.append(("CPUExecutionProvider", {}))
            session = ort.InferenceSession(str(self.model_path), sess_options=so, providers=providers)
            if session.get_providers()[0] != PROVIDERS[device]:
                raise RuntimeError(f"provider {PROVIDERS[device]} was not applied")
            return session

        t0 = time.perf_counter()
        preferred = options.devices or DEFAULT_DEVICES
        unknown = [d for d in preferred if d not in PROVIDERS]
        if unknown:
            raise EngineError(KIND, f"unknown device(s) {', '.join(unknown)}; allowed: {', '.join(PROVIDERS)}")
        self.device, self.session, self.fallbacks = first_working_device(KIND, preferred, available_devices(), load)
        self.load_ms = (time.perf_counter() - t0) * 1000
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.precision = _precision_of(self.session)

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: x})[0]

    def run_all(self, x: np.ndarray) -> list[np.ndarray]:
        return self.session.run(None, {self.input_name: x})

    def close(self) -> None:
        self.session = None


def _precision_of(session) -> str:
    """ONNX Runtime computes in the types written in the graph (fp32, or int8 between QDQ pairs): "graph",
    unless the exporter recorded a precision in the model metadata."""
    return session.get_modelmeta().custom_metadata_map.get("precision", "graph")
