"""The engine interface every backend implements, and the device-fallback loop they share."""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np

from edge_runtime.errors import EngineError

log = logging.getLogger("edge_runtime.engines")

T = TypeVar("T")


@dataclass(frozen=True)
class EngineOptions:
    """How to load a model. devices=None means the backend's default preference order."""

    devices: tuple[str, ...] | None = None
    threads: int | None = None  # intra-op threads; None = engine default
    cache_dir: Path | None = None  # compiled-model / engine caches
    precision_hint: str = "f32"  # OpenVINO inference precision: "f32" keeps medical outputs exact (bf16 on AMX CPUs is not)
    warmup_runs: int = 2
    allow_spinning: bool = False  # ORT thread spin-wait burns CPU between frames on battery boards


class Engine(Protocol):
    """A loaded model ready to run one input tensor."""

    kind: str  # "onnxruntime" | "openvino"
    device: str  # the device actually in use, e.g. "CPU", "CUDA", "TensorRT", "GPU", "NPU"
    precision: str  # the precision the device computes in, e.g. "f32", "bf16", "int8"
    fallbacks: list[str]  # why preferred devices were skipped, in order
    load_ms: float  # session creation / compilation time, warm-up excluded
    output_names: list[str]  # graph output names in run_all order ("logits", "features", "cam")

    def run(self, x: np.ndarray) -> np.ndarray:
        """One input tensor in, the model's first output out."""

    def run_all(self, x: np.ndarray) -> list[np.ndarray]:
        """One input tensor in, every output in graph order (the scope gate reads the "features" output)."""

    def close(self) -> None: ...


def first_working_device(
    kind: str,
    preferred: Sequence[str],
    available: Sequence[str],
    load: Callable[[str], T],
) -> tuple[str, T, list[str]]:
    """Try devices in preference order; skip absent ones and ones that fail to load, saying why."""
    reasons: list[str] = []
    for device in preferred:
        if device not in available:
            reasons.append(f"{device}: not present")
            continue
        try:
            return device, load(device), reasons
        except Exception as exc:  # a device failing to compile must not stop the next one
            msg = " ".join(str(exc).split())[:300]
            reasons.append(f"{device}: failed to load ({msg})")
            log.warning("%s: device %s failed, falling back: %s", kind, device, msg)
    raise EngineError(kind, "no device could load the model: " + "; ".join(reasons))


def warm_up(engine: Engine, shape: Sequence[int], runs: int) -> None:
    x = np.zeros(tuple(shape), dtype=np.float32)
    for _ in range(runs):
        engine.run(x)
