from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import ellipse_image

from edge_runtime.heads.classification import ClassificationHead
from edge_runtime.heads.geometry import (dice, ellipse_mask, hadlock_ga_weeks, largest_component, ramanujan_perimeter,
                                         segment_ellipse)
from edge_runtime.heads.segmentation import SegmentationHead
from edge_runtime.imaging.preprocess import PreprocessSpec, prepare
from edge_runtime.registry import ModelRegistry


def test_ramanujan_circle_and_ellipse():
    assert ramanujan_perimeter(10, 10) == pytest.approx(2 * math.pi * 10)
    assert ramanujan_perimeter(10, 5) == pytest.approx(48.4422, abs=1e-3)  # exact value 48.44224


def test_hadlock_range():
    assert hadlock_ga_weeks(175.0) == pytest.approx(8.96 + 0.54 * 17.5 + 0.0003 * 17.5**3)  # ~20 weeks
    assert hadlock_ga_weeks(60.0) is None  # first trimester: below 14 weeks
    assert hadlock_ga_weeks(420.0) is None


def test_classification_threshold_and_priority(models_root):
    head = ClassificationHead(ModelRegistry([models_root]).get("tiny-cls"))
    r = head(np.array([[0.0, 2.0]]))
    assert r.result["label"] == "bright" and r.priority == "urgent"
    assert sum(r.result["probabilities"].values()) == pytest.approx(1.0)
    r = head(np.array([[0.0, -1.0]]))
    assert r.result["label"] == "normal" and r.priority == "routine"


def test_classification_rejects_wrong_output_size(models_root):
    head = ClassificationHead(ModelRegistry([models_root]).get("tiny-cls"))
    with pytest.raises(ValueError, match="3 values for 2 labels"):
        head(np.zeros((1, 3)))


@pytest.mark.parametrize("resize", ["stretch", "letterbox"])
def test_segment_ellipse_recovers_circumference(resize):
    axes, spacing = (300.0, 200.0), 0.15
    img = ellipse_image(axes=axes, angle=25.0)
    spec = PreprocessSpec(height=176, width=256, resize=resize)
    x, geo = prepare(img, spec)
    prob = 1 / (1 + np.exp(-20 * (x[0, 0] - 0.5)))
    ellipse, _ = segment_ellipse(prob, geo, img.shape, (spacing, spacing))
    truth = ramanujan_perimeter(axes[0] / 2, axes[1] / 2) * spacing
    assert ellipse.circumference_mm == pytest.approx(truth, rel=0.01)
    fitted = ellipse_mask(img.shape, ellipse.center_px, ellipse.axes_px, ellipse.angle_deg)
    assert dice(fitted, img > 128) > 0.98


def test_anisotropic_spacing():
    img = ellipse_image(axes=(200.0, 200.0), angle=0.0)  # a circle in pixels
    spec = PreprocessSpec(height=176, width=256)
    x, geo = prepare(img, spec)
    ellipse, _ = segment_ellipse(1 / (1 + np.exp(-20 * (x[0, 0] - 0.5))), geo, img.shape, (0.2, 0.1))
    truth = ramanujan_perimeter(100 * 0.1, 100 * 0.2)  # x axis 0.1 mm/px, y 0.2 mm/px
    assert ellipse.circumference_mm == pytest.approx(truth, rel=0.015)


def test_segmentation_head_measurements(models_root):
    manifest = ModelRegistry([models_root]).get("tiny-seg")
    head = SegmentationHead(manifest)
    img = ellipse_image(axes=(600.0, 450.0), angle=10.0)
    x, geo = prepare(img, manifest.preprocess)
    logits = 20 * (x - 0.5)
    r = head(logits, geometry=geo, image_hw=img.shape, pixel_spacing_mm=(0.12, 0.12))
    m = r.result["measurements"]
    truth = ramanujan_perimeter(300, 225) * 0.12
    assert m["head_circumference_mm"] == pytest.approx(truth, rel=0.01)
    assert m["gestational_age_weeks"] == pytest.approx(hadlock_ga_weeks(truth), abs=0.2)
    assert r.result["detected"] and len(r.result["contour"]) >= 30


def test_segmentation_head_without_spacing_or_head(models_root):
    manifest = ModelRegistry([models_root]).get("tiny-seg")
    head = SegmentationHead(manifest)
    img = ellipse_image(axes=(300.0, 200.0))
    x, geo = prepare(img, manifest.preprocess)
    r = head(20 * (x - 0.5), geometry=geo, image_hw=img.shape, pixel_spacing_mm=None)
    assert r.result["measurements"]["head_circumference_mm"] is None and "pixel spacing" in r.result["note"]
    r = head(np.full_like(x, -10.0), geometry=geo, image_hw=img.shape, pixel_spacing_mm=(0.1, 0.1))
    assert r.result["detected"] is False


def test_largest_component_matches_whole_frame_labelling():
    """Labelling only the foreground's bounding box keeps exactly the component whole-frame labelling keeps."""
    import cv2

    rng = np.random.default_rng(3)
    for trial in range(40):
        mask = np.zeros((120, 160), dtype=np.uint8)
        for _ in range(rng.integers(1, 5)):
            cx, cy = rng.integers(0, 160), rng.integers(0, 120)
            cv2.ellipse(mask, (int(cx), int(cy)), (int(rng.integers(2, 40)), int(rng.integers(2, 30))),
                        float(rng.uniform(0, 180)), 0, 360, 1, thickness=-1)
        mask[rng.random(mask.shape) < 0.01] = 1  # speckle: many one-pixel components
        n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        expected = (labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))).astype(np.uint8)
        got = largest_component(mask)
        assert got is not None and got.dtype == np.uint8 and got.shape == mask.shape
        assert np.array_equal(got, expected), f"trial {trial}"
    assert largest_component(np.zeros((10, 10), dtype=np.uint8)) is None
