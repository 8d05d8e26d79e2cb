"""Engine registry: pick a backend by kind ("onnxruntime", "openvino" or "auto") and load a model."""
from __future__ import annotations

import importlib.util
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


def choose_engine(ort_devices: list[str], ov_devices: list[str]) -> str | None:
    """Accelerators first: a CUDA/TensorRT board (Jetson) runs ONNX Runtime, an Intel GPU/NPU runs OpenVINO.
    On a plain CPU OpenVINO: under a paced 30 fps feed its fetal-head INT8 inference holds at 7.0-7.3 ms, where ONNX
    Runtime without spin-waiting, our battery-friendly default, takes 10.1-10.9 ms (9.0 in a tight loop), and
    end-to-end p50 is 11-12 ms against 16 (BENCHMARKS.md)."""
    if any(d in ort_devices for d in ("TensorRT", "CUDA")):
        return "onnxruntime"
    if ov_devices:
        return "openvino"
    if ort_devices:
        return "onnxruntime"
    return None


def _ort_accelerators_built_in() -> bool | None:
    """Whether the installed onnxruntime carries CUDA or TensorRT, read from its provider libraries without
    importing it (the import costs a daemon that then runs OpenVINO about 20 MB). None when not installed.
    Those providers ship as shared libraries beside the core (libonnxruntime_providers_cuda.so, ..._tensorrt.so);
    get_available_providers reports exactly the ones present."""
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        capi = Path(folder) / "capi"
        if any(capi.glob("*onnxruntime_providers_cuda*")) or any(capi.glob("*onnxruntime_providers_tensorrt*")):
            return True
    return False


def resolve_auto() -> str:
    devices = {}
    ort = _ort_accelerators_built_in()
    if ort:
        return "onnxruntime"  # a Jetson or a CUDA box: its devices are listed (and fall back) when it loads
    for kind in KINDS:
        if kind == "onnxruntime" and ort is not None:
            devices[kind] = ["CPU"]  # installed, no accelerator provider: the CPU provider is always built in
            continue
        try:
            devices[kind] = available_devices(kind)
        except ImportError:
            devices[kind] = []
    kind = choose_engine(devices["onnxruntime"], devices["openvino"])
    if kind is None:
        raise EngineError("auto", "neither onnxruntime nor openvino is installed")
    return kind


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


def options_from_config(config, kind: str) -> EngineOptions:
    """The [engine] section's options for one engine kind (config: edge_runtime.config.Config)."""
    e = config.engine
    devices = e.onnxruntime_devices if kind == "onnxruntime" else e.openvino_devices if kind == "openvino" else None
    return EngineOptions(
        devices=tuple(devices) if devices else None,
        threads=e.threads or None,
        cache_dir=config.cache_dir,
        precision_hint=e.openvino_precision,
        warmup_runs=e.warmup_runs,
        allow_spinning=e.allow_spinning,
    )
