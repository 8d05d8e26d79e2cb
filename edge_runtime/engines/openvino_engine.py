"""OpenVINO backend: NPU, GPU, then CPU, with the compiled-model cache on disk."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from edge_runtime.engines.base import EngineOptions, first_working_device
from edge_runtime.errors import EngineError

KIND = "openvino"
DEFAULT_DEVICES = ("NPU", "GPU", "CPU")
_PRECISION_HINTS = ("f32", "f16", "bf16", "default")


def _core():
    import openvino as ov

    return ov.Core()


def available_devices() -> list[str]:
    # OpenVINO names several GPUs GPU.0, GPU.1: the first of a kind stands for the kind.
    devices = []
    for name in _core().available_devices:
        base = name.split(".")[0]
        if base not in devices:
            devices.append(base)
    return devices


class OpenVinoEngine:
    kind = KIND

    def __init__(self, model_path: Path, options: EngineOptions) -> None:
        if options.precision_hint not in _PRECISION_HINTS:
            raise EngineError(KIND, f"precision hint {options.precision_hint!r}; allowed: {', '.join(_PRECISION_HINTS)}")
        core = _core()
        if options.cache_dir is not None:
            cache = Path(options.cache_dir) / "openvino"
            cache.mkdir(parents=True, exist_ok=True)
            core.set_property({"CACHE_DIR": str(cache)})
        self.model_path = Path(model_path)

        def load(device: str):
            config: dict[str, object] = {"PERFORMANCE_HINT": "LATENCY"}
            if options.precision_hint != "default":
                config["INFERENCE_PRECISION_HINT"] = options.precision_hint
            if options.threads and device == "CPU":
                config["INFERENCE_NUM_THREADS"] = int(options.threads)
            return core.compile_model(str(self.model_path), device, config)

        t0 = time.perf_counter()
        preferred = options.devices or DEFAULT_DEVICES
        unknown = [d for d in preferred if d not in ("NPU", "GPU", "CPU")]
        if unknown:
            raise EngineError(KIND, f"unknown device(s) {', '.join(unknown)}; allowed: NPU, GPU, CPU")
        self.device, self.compiled, self.fallbacks = first_working_device(KIND, preferred, available_devices(), load)
        self.load_ms = (time.perf_counter() - t0) * 1000
        self.request = self.compiled.create_infer_request()
        # The ONNX output names survive conversion as tensor names (a nameless output gets its index).
        self.output_names = [o.get_any_name() if o.get_names() else str(i) for i, o in enumerate(self.compiled.outputs)]
        try:
            # An ov.Type such as f32 or bf16: the precision the device really computes in.
            self.precision = self.compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
        except (RuntimeError, AttributeError):
            self.precision = options.precision_hint

    def run(self, x: np.ndarray) -> np.ndarray:
        self.request.infer({0: x})
        return self.request.get_output_tensor(0).data.copy()

    def run_all(self, x: np.ndarray) -> list[np.ndarray]:
        self.request.infer({0: x})
        return [self.request.get_output_tensor(i).data.copy() for i in range(len(self.compiled.outputs))]

    def close(self) -> None:
        self.request = None
        self.compiled = None
