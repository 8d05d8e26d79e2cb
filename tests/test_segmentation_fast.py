"""The faster segmentation head (component kept as a crop, labelling without statistics, IoU counted on the crop)
measures exactly what the previous full-frame algorithm measured. The previous algorithm is kept here, verbatim in
what it computes, as the reference."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from conftest import SHARED_DATA, ellipse_image, needs_shared

from edge_runtime.engines import EngineOptions
from edge_runtime.heads.geometry import (Ellipse, ellipse_mask, fit_ellipse, largest_component_crop, ramanujan_perimeter,
                                         segment_ellipse, segment_head, upsample_probability)
from edge_runtime.heads.segmentation import component_fit_quality, sigmoid
from edge_runtime.imaging.inputs import open_input
from edge_runtime.imaging.preprocess import PreprocessSpec, prepare
from edge_runtime.pipeline import Predictor
from edge_runtime.registry import ModelRegistry

HC_TOLERANCE_MM = 0.05
CENTRE_TOLERANCE_PX = 0.1


# ------------------------------------------------------------------ the previous algorithm (reference)
def ref_largest_component(mask: np.ndarray) -> np.ndarray | None:
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n <= 1:
        return None
    return (labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))).astype(np.uint8)


def ref_fit_ellipse(component: np.ndarray, spacing_mm) -> Ellipse | None:
    contours, _ = cv2.findContours(component, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return None
    contour = max(contours, key=cv2.contourArea)
    if len(contour) < 5:
        return None
    pts = contour.reshape(-1, 2).astype(np.float64)
    (cx, cy), (d1, d2), angle = cv2.fitEllipse(pts.astype(np.float32))
    if spacing_mm is None:
        return Ellipse((cx, cy), (d1, d2), angle, (math.nan, math.nan), math.nan)
    (_, _), (m1, m2), _ = cv2.fitEllipse((pts * [spacing_mm[1], spacing_mm[0]]).astype(np.float32))
    return Ellipse((cx, cy), (d1, d2), angle, (m1, m2), ramanujan_perimeter(m1 / 2, m2 / 2))


def ref_quality(component: np.ndarray, ellipse: Ellipse) -> float:
    fitted = ellipse_mask(component.shape[:2], ellipse.center_px, ellipse.axes_px, ellipse.angle_deg)
    union = cv2.countNonZero(cv2.bitwise_or(fitted, component))
    return cv2.countNonZero(cv2.bitwise_and(fitted, component)) / union if union else 0.0


def ref_head(prob, geometry, image_hw, spacing_mm, threshold):
    """(ellipse, full-frame component, area, IoU) as the head computed them before."""
    mask = (upsample_probability(prob, geometry, image_hw) >= threshold).astype(np.uint8)
    component = ref_largest_component(mask)
    if component is None:
        return None, mask, 0, 0.0
    ellipse = ref_fit_ellipse(component, spacing_mm)
    return ellipse, component, cv2.countNonZero(component), ref_quality(component, ellipse) if ellipse else 0.0


def fast_on_mask(mask: np.ndarray, spacing_mm):
    component = largest_component_crop(mask)
    if component is None:
        return None, None, 0, 0.0
    ellipse = fit_ellipse(component, spacing_mm)
    return ellipse, component, component.area, component_fit_quality(component, ellipse) if ellipse else 0.0


def assert_same_ellipse(got: Ellipse | None, want: Ellipse | None, what: str) -> None:
    assert (got is None) == (want is None), what
    if want is None:
        return
    assert got.center_px == want.center_px, what
    assert got.axes_px == want.axes_px and got.angle_deg == want.angle_deg, what
    if not math.isnan(want.circumference_mm):
        assert got.circumference_mm == want.circumference_mm, what


# ------------------------------------------------------------------ synthetic masks: exact equality
def random_mask(rng: np.random.Generator, shape=(135, 200)) -> np.ndarray:
    mask = np.zeros(shape, dtype=np.uint8)
    for _ in range(rng.integers(1, 5)):
        # centres may sit outside the frame: components cut by the image edge, where contour tracing differs
        cx, cy = rng.integers(-20, shape[1] + 20), rng.integers(-20, shape[0] + 20)
        cv2.ellipse(mask, (int(cx), int(cy)), (int(rng.integers(2, 60)), int(rng.integers(2, 45))),
                    float(rng.uniform(0, 180)), 0, 360, 1, thickness=-1)
    if rng.random() < 0.5:
        mask[rng.random(shape) < 0.01] = 1  # speckle: many one-pixel components
    if rng.random() < 0.2:
        mask[:, int(rng.integers(0, shape[1]))] = 1  # a full-height line joining components through both edges
    return mask


def test_fast_component_fit_and_quality_equal_the_full_frame_algorithm():
    rng = np.random.default_rng(20)
    spacing = (0.11, 0.07)  # anisotropic: the mm refit sees the same points too
    for trial in range(150):
        mask = random_mask(rng)
        want = ref_largest_component(mask)
        # cv2.fitEllipse jitters degenerate point sets (a one-pixel line) with OpenCV's RNG: seed it alike for both
        cv2.setRNGSeed(trial)
        want_ellipse = ref_fit_ellipse(want, spacing) if want is not None else None
        cv2.setRNGSeed(trial)
        ellipse, component, area, quality = fast_on_mask(mask, spacing)
        what = f"trial {trial}"
        assert (component is None) == (want is None), what
        if want is None:
            continue
        assert np.array_equal(component.full(), want), what
        assert area == cv2.countNonZero(want), what
        assert_same_ellipse(ellipse, want_ellipse, what)
        if ellipse is not None:
            assert quality == ref_quality(want, want_ellipse), what
    assert largest_component_crop(np.zeros((10, 10), dtype=np.uint8)) is None


def test_equal_areas_keep_the_first_label():
    mask = np.zeros((40, 60), dtype=np.uint8)
    mask[5:15, 5:15] = 1
    mask[25:35, 40:50] = 1  # same area, later in raster order
    component = largest_component_crop(mask)
    assert np.array_equal(component.full(), ref_largest_component(mask))
    assert component.x == 4 and component.y == 4 and component.area == 100


def test_segment_ellipse_keeps_its_full_frame_contract():
    """Training, evaluation and the explanation still get a full-frame 0/1 mask from segment_ellipse."""

    img = ellipse_image(axes=(300.0, 200.0), angle=25.0)
    x, geo = prepare(img, PreprocessSpec(height=176, width=256, resize="letterbox"))
    prob = 1 / (1 + np.exp(-20 * (x[0, 0] - 0.5)))
    ellipse, mask = segment_ellipse(prob, geo, img.shape, (0.1, 0.1))
    want_ellipse, want_mask, _, _ = ref_head(prob, geo, img.shape, (0.1, 0.1), 0.5)
    assert mask.shape == img.shape and mask.dtype == np.uint8 and np.array_equal(mask, want_mask)
    assert_same_ellipse(ellipse, want_ellipse, "synthetic ellipse")
    empty_ellipse, empty = segment_ellipse(np.zeros_like(prob), geo, img.shape, None)
    assert empty_ellipse is None and empty.shape == img.shape and not empty.any()


# ------------------------------------------------------------------ real HC18 frames through the shipped model
@needs_shared
@pytest.mark.parametrize("precision", ["int8"])
def test_head_on_real_hc18_frames_matches_the_previous_algorithm(precision):
    from quantize.datasets import hc18_items

    items = hc18_items(SHARED_DATA / "hc18", "val")
    items = [items[i] for i in np.linspace(0, len(items) - 1, 40).round().astype(int)]
    p = Predictor.load(ModelRegistry(), "fetal-head", "onnxruntime", precision, EngineOptions(threads=2, warmup_runs=1))
    spec = p.manifest.segmentation
    measured = 0
    try:
        for item in items:
            pixels = open_input(item.image).frame(0, p.manifest.windowing)
            spacing = (item.pixel_size_mm, item.pixel_size_mm)
            x, geometry = prepare(pixels, p.manifest.preprocess)
            logits = p.engine.run(x)
            prob = sigmoid(np.asarray(logits, dtype=np.float32).reshape(logits.shape[-2:]))
            want_ellipse, _, want_area, want_quality = ref_head(prob, geometry, pixels.shape[:2], spacing, spec.threshold)
            result = p.head(logits, geometry=geometry, image_hw=pixels.shape[:2], pixel_spacing_mm=spacing).result
            what = item.image.name
            area_fraction = want_area / float(pixels.shape[0] * pixels.shape[1]) if want_ellipse else 0.0
            want_detected = (want_ellipse is not None and area_fraction >= spec.min_area_fraction
                             and want_quality >= spec.min_fit_quality)
            assert result["detected"] == want_detected, what
            if not want_detected:
                continue
            measured += 1
            assert result["quality"] == round(want_quality, 3), what
            hc = result["measurements"]["head_circumference_mm"]
            assert abs(hc - want_ellipse.circumference_mm) <= HC_TOLERANCE_MM, what
            cx, cy = result["ellipse"]["center_px"]
            assert abs(cx - want_ellipse.center_px[0]) <= CENTRE_TOLERANCE_PX, what
            assert abs(cy - want_ellipse.center_px[1]) <= CENTRE_TOLERANCE_PX, what
            # and unrounded: the fast path's ellipse is the reference's, bit for bit
            ellipse, component = segment_head(prob, geometry, pixels.shape[:2], spacing, spec.threshold)
            assert_same_ellipse(ellipse, want_ellipse, what)
            assert component_fit_quality(component, ellipse) == want_quality, what
    finally:
        p.engine.close()
    assert measured >= 30, f"only {measured} of {len(items)} frames measured: the comparison saw too few heads"
