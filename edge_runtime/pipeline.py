"""Per-model worker: scope gates, preprocess -> engine -> head, with each stage timed on the frame.

The scope gates (edge_runtime.scope) run here so that every caller, `infer` and the daemon alike, gets them:
the metadata gate before any pixel work, the content gate on the engine's "features" output before the head's
result is reported. The explanation (edge_runtime.explain) is built here too, from the same outputs, for the
findings that need one: assessed and urgent or needs_review, or whenever the caller asks (`infer --explain`)."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import numpy as np

from edge_runtime.engines import EngineOptions, load_engine, resolve_auto
from edge_runtime.engines.base import Engine
from edge_runtime.errors import ModelError
from edge_runtime.explain import ExplanationUnavailable, cam_explanation, segmentation_explanation
from edge_runtime.findings import ModelRef
from edge_runtime.frames import Frame, Stopwatch
from edge_runtime.heads import HeadResult, make_head
from edge_runtime.imaging.preprocess import ResizeGeometry, decode_hint, prepare
from edge_runtime.imaging.resolution import DecodeHint
from edge_runtime.registry import ModelManifest, ModelRegistry, Variant, verify_variant
from edge_runtime.scope import (ContentGate, ContentGateSpec, check_pixel_spacing, header_confirms, metadata_refusal,
                                not_assessed)

log = logging.getLogger("edge_runtime.pipeline")
EXPLAIN_MODES = ("flagged", "always", "never")


def gate_spec(manifest: ModelManifest, variant: Variant) -> ContentGateSpec:
    """The manifest's content gate with the variant's own limit, where it has one (the header-confirmed limit
    keeps its ratio to the strict one)."""
    spec = manifest.scope.content
    if variant.scope_threshold is None or spec is None:
        return spec
    relaxed = spec.header_confirmed_threshold
    if relaxed is not None:
        relaxed = relaxed * variant.scope_threshold / spec.threshold
    return replace(spec, threshold=variant.scope_threshold, header_confirmed_threshold=relaxed)


def full_image_geometry(geometry: ResizeGeometry, frame: Frame) -> tuple[ResizeGeometry, tuple[int, int]]:
    """The resize geometry and image size in the full image's pixels: a frame decoded at 1/f maps its pixel centre
    x_dec to x_full + 0.5 = (x_dec + 0.5) * f, so contours, ellipses and millimetres (with the file's own pixel
    spacing) stay those of the full image."""
    info = frame.decode
    if info is None or info.factor <= 1:
        return geometry, frame.pixels.shape[:2]
    f = float(info.factor)
    return ResizeGeometry(geometry.scale_x / f, geometry.scale_y / f, geometry.pad_x, geometry.pad_y), info.full_size


def explanation_in_full_image(explanation: dict | None, frame: Frame) -> dict | None:
    """An explanation drawn on a frame decoded at 1/f, with its box and image size in the full image's pixels
    (what the finding's other coordinates use); the grid and the overlay are resolution-free."""
    info = frame.decode
    if explanation is None or info is None or info.factor <= 1:
        return explanation
    f = int(info.factor)
    rows, cols = info.full_size
    b = explanation["bbox"]
    x0, y0 = b["x"] * f, b["y"] * f
    x1, y1 = min(cols, (b["x"] + b["width"]) * f), min(rows, (b["y"] + b["height"]) * f)
    return {**explanation, "image_size": [int(cols), int(rows)],
            "bbox": {"x": x0, "y": y0, "width": x1 - x0, "height": y1 - y0}}


def ellipse_in_decoded_image(ellipse: dict, frame: Frame) -> dict:
    """The inverse of full_image_geometry's mapping for a head's ellipse: back onto the decoded pixels."""
    info = frame.decode
    if info is None or info.factor <= 1:
        return ellipse
    f = float(info.factor)
    return {**ellipse, "center_px": [(c + 0.5) / f - 0.5 for c in ellipse["center_px"]],
            "axes_px": [a / f for a in ellipse["axes_px"]]}


@dataclass
class Prediction:
    head: HeadResult
    capture_to_result_ms: float
    explanation: dict | None = None  # the finding's `explanation`, when one was wanted and could be built


class Predictor:
    """One loaded model variant on one engine."""

    def __init__(self, manifest: ModelManifest, variant: Variant, engine: Engine, explain: str = "flagged") -> None:
        if explain not in EXPLAIN_MODES:
            raise ValueError(f"explain must be one of {', '.join(EXPLAIN_MODES)}; got {explain!r}")
        self.manifest = manifest
        self.variant = variant
        self.engine = engine
        self.head = make_head(manifest)
        self.gate = ContentGate(manifest.name, gate_spec(manifest, variant)) if manifest.scope.content else None
        if self.gate is not None:
            self._check_features_output()
        self.explain_mode = explain
        self.cam_index, self.explain_missing = self._explanation_source()
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

    def decode_hint(self, margin: float = 2.0) -> DecodeHint:
        """The smallest decode this model's preprocessing can use (from the manifest's input size; `margin`:
        imaging.reduced_decode_margin): what the callers hand the decoder when imaging.reduced_decode is on."""
        return decode_hint(self.manifest.preprocess, margin)

    def _check_features_output(self) -> None:
        """A variant without the features output (or of another width) cannot be gated: refuse it at load."""
        outputs = self.engine.run_all(np.zeros(self.manifest.input.shape, dtype=np.float32))
        width = outputs[1].size if len(outputs) > 1 else 0
        if width != self.gate.dim:
            raise ModelError(self.manifest.name, f"variant {self.variant.id} has no scope 'features' output of "
                                                 f"{self.gate.dim} values (found {width}); "
                                                 "re-run quantize.scope_features")

    def _explanation_source(self) -> tuple[int | None, str | None]:
        """(index of the map output in run_all, None) or (None, why findings of this variant carry no explanation).
        A model without the output still runs: it is only said once, here."""
        spec = self.manifest.explanation
        if spec is None:
            return None, f"{self.manifest.name} declares no [explanation] in its manifest"
        if spec.method != "cam":
            return None, None
        names = list(getattr(self.engine, "output_names", []) or [])
        if spec.output in names:
            return names.index(spec.output), None
        reason = (f"variant {self.variant.id} has no '{spec.output}' output (outputs: {', '.join(names) or 'unknown'}); "
                  "findings carry no explanation: add it with python -m quantize.cam_output")
        log.warning("%s: %s", self.manifest.name, reason)
        return None, reason

    def wants_explanation(self, head: HeadResult, explain: bool | None) -> bool:
        """explain=None: the predictor's mode ("flagged": assessed and urgent or needs_review); True/False: the caller's."""
        if head.result.get("assessed") is False:
            return False  # the model did not read the input: there is nothing to explain
        if explain is not None:
            return explain
        if self.explain_mode != "flagged":
            return self.explain_mode == "always"
        return head.priority == "urgent" or head.result.get("needs_review") is True

    def _explain(self, outputs: list[np.ndarray], geometry, frame: Frame, head: HeadResult) -> dict | None:
        """The explanation, or None with a logged reason: never an error for the finding."""
        spec = self.manifest.explanation
        try:
            if spec is None or (spec.method == "cam" and self.cam_index is None):
                raise ExplanationUnavailable(self.explain_missing)
            if spec.method == "cam":
                cam = np.asarray(outputs[self.cam_index])
                index = self.manifest.output.labels.index(spec.label)
                if cam.ndim != 4 or cam.shape[1] <= index:
                    raise ExplanationUnavailable(f"output '{spec.output}' has shape {list(cam.shape)}, not [1, classes, h, w]")
                model_hw = (self.manifest.preprocess.height, self.manifest.preprocess.width)
                return cam_explanation(frame.pixels, cam[0, index], geometry, model_hw, spec.label, spec.top_mass)
            return self._segmentation_explanation(outputs[0], geometry, frame, head)
        except ExplanationUnavailable as exc:
            log.info("%s: %s: explanation left out: %s", self.manifest.name, frame.source_name, exc)
        except Exception as exc:  # a bug in drawing must not cost the finding
            log.warning("%s: %s: explanation left out: internal error %s: %s", self.manifest.name, frame.source_name,
                        type(exc).__name__, exc)
        return None

    def _segmentation_explanation(self, output: np.ndarray, geometry, frame: Frame, head: HeadResult) -> dict:
        from edge_runtime.heads.geometry import segment_ellipse
        from edge_runtime.heads.segmentation import sigmoid

        if not head.result.get("detected"):
            raise ExplanationUnavailable("no fetal head was measured in the frame")
        logits = np.asarray(output, dtype=np.float32)
        logits = logits.reshape(logits.shape[-2:])
        prob = sigmoid(logits) if self.manifest.output.activation == "sigmoid" else logits
        _, mask = segment_ellipse(prob, geometry, frame.pixels.shape[:2], None, self.manifest.segmentation.threshold)
        return segmentation_explanation(frame.pixels, ellipse_in_decoded_image(head.result["ellipse"], frame), mask,
                                        self.manifest.explanation.label)

    def _gated_head(self, outputs: list[np.ndarray], geometry, frame: Frame) -> HeadResult:
        """The content gate's verdict, else the head's result marked assessed (with how typical the image was)."""
        score = None
        if self.gate is not None:
            score, refused = self.gate.refusal(outputs[1], header_confirms(self.manifest.scope, frame.study))
            if refused is not None:
                return not_assessed(self.manifest.task, refused)
        geometry, image_hw = full_image_geometry(geometry, frame)
        head = self.head(outputs[0], geometry=geometry, image_hw=image_hw, pixel_spacing_mm=frame.pixel_spacing_mm)
        result = {"assessed": True, **head.result}
        if score is not None:  # the hub can watch it drift
            result["scope_distance"] = round(score, 1)
            if self.gate.atypical(score):
                result["needs_review"] = True
                result["scope_note"] = (f"image atypical for the training set (feature distance {score:.1f} over "
                                        f"{self.gate.spec.threshold:.1f}); assessed because its DICOM header confirms "
                                        "the scope")
        return HeadResult(head.task, result, head.priority)

    def predict(self, frame: Frame, explain: bool | None = None) -> Prediction:
        """explain: None follows the predictor's mode; True/False overrides it for this frame."""
        manifest = self.manifest
        reason = metadata_refusal(manifest.scope, frame.study, manifest.name)
        if reason is not None:
            return Prediction(not_assessed(manifest.task, reason), (time.monotonic() - frame.captured_at) * 1000.0)
        if manifest.task == "segmentation":
            check_pixel_spacing(frame.source_name, frame.pixel_spacing_mm)
        with Stopwatch(frame, "preprocess"):
            x, geometry = prepare(frame.pixels, manifest.preprocess)
        with Stopwatch(frame, "inference"):
            every = self.gate is not None or self.cam_index is not None
            outputs = self.engine.run_all(x) if every else [self.engine.run(x)]
        with Stopwatch(frame, "postprocess"):
            head = self._gated_head(outputs, geometry, frame)
        explanation = None
        if self.wants_explanation(head, explain):
            with Stopwatch(frame, "explain"):
                explanation = explanation_in_full_image(self._explain(outputs, geometry, frame, head), frame)
        return Prediction(head, (time.monotonic() - frame.captured_at) * 1000.0, explanation)
