"""Segmentation head: head mask -> ellipse -> circumference (mm) -> gestational age (Hadlock)."""
from __future__ import annotations

import cv2
import numpy as np

from edge_runtime.heads import HeadResult
from edge_runtime.heads.geometry import Component, Ellipse, ellipse_mask, hadlock_ga_weeks, segment_head
from edge_runtime.imaging.preprocess import ResizeGeometry
from edge_runtime.registry import ModelManifest

CONTOUR_POINTS = 32  # enough to redraw the ellipse at the hub, small enough for a finding


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))


def ellipse_quality(component: np.ndarray, ellipse: Ellipse) -> float:
    """IoU of the head mask with its own fitted ellipse: about 0.97 on a clean skull, lower when the mask is
    ragged, split or not elliptical (shadowing, a partial head, something that is not a head)."""
    fitted = ellipse_mask(component.shape[:2], ellipse.center_px, ellipse.axes_px, ellipse.angle_deg)
    union = cv2.countNonZero(cv2.bitwise_or(fitted, component))
    return cv2.countNonZero(cv2.bitwise_and(fitted, component)) / union if union else 0.0


def component_fit_quality(component: Component, ellipse: Ellipse) -> float:
    """ellipse_quality on a cropped component: the same IoU, counted where the component can be.

    The fitted ellipse is drawn on the full frame as before (drawing on a crop would shift its fixed-point
    vertices); the intersection needs only the component's crop, and the union is |fitted| + |component| - it."""
    fitted = ellipse_mask(component.image_hw, ellipse.center_px, ellipse.axes_px, ellipse.angle_deg)
    h, w = component.mask.shape
    inside = fitted[component.y : component.y + h, component.x : component.x + w]
    inter = cv2.countNonZero(cv2.bitwise_and(inside, component.mask))
    union = cv2.countNonZero(fitted) + component.area - inter
    return inter / union if union else 0.0


class SegmentationHead:
    task = "segmentation"

    def __init__(self, manifest: ModelManifest) -> None:
        assert manifest.segmentation is not None
        self.spec = manifest.segmentation
        self.activation = manifest.output.activation

    def __call__(
        self,
        output: np.ndarray,
        *,
        geometry: ResizeGeometry,
        image_hw: tuple[int, int],
        pixel_spacing_mm: tuple[float, float] | None,
        **_,
    ) -> HeadResult:
        logits = np.asarray(output, dtype=np.float32)
        logits = logits.reshape(logits.shape[-2:])
        prob = sigmoid(logits) if self.activation == "sigmoid" else logits
        ellipse, component = segment_head(prob, geometry, image_hw, pixel_spacing_mm, self.spec.threshold)
        area_fraction = component.area / float(image_hw[0] * image_hw[1]) if ellipse else 0.0
        if ellipse is None or area_fraction < self.spec.min_area_fraction:
            reason = f"no fetal head found in the frame (head mask {area_fraction:.1%} of the image, " \
                     f"at least {self.spec.min_area_fraction:.1%} needed)"
            result = {"detected": False, "measurements": {}, "reason": reason,
                      "note": "no fetal head found in the frame"}
            return HeadResult(self.task, result, "routine")
        quality = component_fit_quality(component, ellipse)
        if quality < self.spec.min_fit_quality:
            reason = (f"no measurable fetal head: the mask fits an ellipse with quality {quality:.2f}, "
                      f"below {self.spec.min_fit_quality:.2f}")
            result = {"detected": False, "measurements": {}, "reason": reason, "quality": round(quality, 3)}
            return HeadResult(self.task, result, "routine")
        measurements: dict[str, float | None] = {}
        notes = []
        if pixel_spacing_mm is None:
            measurements["head_circumference_mm"] = None
            notes.append("no pixel spacing in the input: circumference in mm needs --pixel-spacing or a calibrated source")
        else:
            hc = ellipse.circumference_mm
            measurements["head_circumference_mm"] = round(hc, 1)
            if self.spec.gestational_age == "hadlock-1984-hc":
                ga = hadlock_ga_weeks(hc)
                measurements["gestational_age_weeks"] = None if ga is None else round(ga, 1)
                if ga is None:
                    notes.append("head circumference outside Hadlock's 14-42 week range: no gestational age")
        (cx, cy), (d1, d2) = ellipse.center_px, ellipse.axes_px
        poly = cv2.ellipse2Poly((int(round(cx)), int(round(cy))), (int(round(d1 / 2)), int(round(d2 / 2))),
                                int(round(ellipse.angle_deg)), 0, 360, 360 // CONTOUR_POINTS)
        result = {
            "detected": True,
            "measurements": measurements,
            "quality": round(quality, 3),
            "ellipse": {
                "center_px": [round(cx, 1), round(cy, 1)],
                "axes_px": [round(d1, 1), round(d2, 1)],
                "angle_deg": round(ellipse.angle_deg, 1),
            },
            "contour": poly.tolist(),
        }
        if notes:
            result["note"] = "; ".join(notes)
        return HeadResult(self.task, result, "routine")
