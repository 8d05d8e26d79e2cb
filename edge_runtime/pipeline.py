"""Per-model worker: preprocess -> engine -> head, with each stage timed on the frame."""
from __future__ import annotations

import time
from dataclasses import dataclass

from edge_runtime.engines import EngineOptions, load_engine, resolve_auto
from edge_runtime.engines.base import Engine
from edge_runtime.findings import ModelRef
from edge_runtime.frames import Frame, Stopwatch
from edge_runtime.heads import HeadResult, make_head
from edge_runtime.imaging.preprocess import prepare
from edge_runtime.registry import ModelManifest, ModelRegistry, Variant, verify_variant


@dataclass
class Prediction:
    head: HeadResult
    capture_to_result_ms: float


class Predictor:
    """One loaded model variant on one engine."""

    def __init__(self, manifest: ModelManifest, variant: Variant, engine: Engine) -> None:
        self.manifest = manifest
        self.variant = variant
        self.engine = engine
        self.head = make_head(manifest)
        self.ref = ModelRef(
            name=manifest.name,
            version=manifest.version,
            variant=variant.id,
            sha256=variant.sha256,
            precision=variant.precision,
            engine=engine.kind,
            device=engine.device,
            compute_precision=engine.precision,
        )

    @classmethod
    def load(
        cls,
        registry: ModelRegistry,
        name: str,
        engine: str = "auto",
        precision: str = "fp32",
        options: EngineOptions | None = None,
    ) -> Predictor:
        manifest = registry.get(name)
        kind = resolve_auto() if engine == "auto" else engine
        variant = manifest.variant(kind, precision)
        verify_variant(manifest, variant)
        loaded = load_engine(kind, variant.path, manifest.input.shape, options or EngineOptions())
        return cls(manifest, variant, loaded)

    def predict(self, frame: Frame) -> Prediction:
        with Stopwatch(frame, "preprocess"):
            x, geometry = prepare(frame.pixels, self.manifest.preprocess)
        with Stopwatch(frame, "inference"):
            y = self.engine.run(x)
        with Stopwatch(frame, "postprocess"):
            head = self.head(
                y,
                geometry=geometry,
                image_hw=frame.pixels.shape[:2],
                pixel_spacing_mm=frame.pixel_spacing_mm,
            )
        return Prediction(head, (time.monotonic() - frame.captured_at) * 1000.0)
