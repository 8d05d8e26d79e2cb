"""Mask -> largest component -> ellipse -> circumference (mm) -> gestational age.

Pure geometry with no engine or manifest knowledge, so training, evaluation and the runtime measure the
same way. The probability map is upsampled to the display image before thresholding: the contour then has
sub-pixel accuracy at the display resolution, which matters because a one-pixel error at model resolution
is several display pixels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from edge_runtime.imaging.preprocess import ResizeGeometry

# Hadlock FP et al., Radiology 1984;152:497-501: menstrual age from head circumference (cm), derived on
# fetuses of 14 to 42 menstrual weeks. Outside that range the formula is an extrapolation: no age is given.
HADLOCK_MIN_WEEKS = 14.0
HADLOCK_MAX_WEEKS = 42.0


@dataclass(frozen=True)
class Ellipse:
    """An ellipse in display-image millimetres (centre, full axes) plus its fit in pixels."""

    center_px: tuple[float, float]
    axes_px: tuple[float, float]  # full axis lengths, pixels
    angle_deg: float
    axes_mm: tuple[float, float]  # full axis lengths, mm
    circumference_mm: float


def ramanujan_perimeter(a: float, b: float) -> float:
    """Perimeter of an ellipse with semi-axes a and b (Ramanujan's second approximation)."""
    h = ((a - b) / (a + b)) ** 2 if (a + b) > 0 else 0.0
    return math.pi * (a + b) * (1 + 3 * h / (10 + math.sqrt(4 - 3 * h)))


def hadlock_ga_weeks(hc_mm: float) -> float | None:
    """Gestational (menstrual) age in weeks from head circumference, or None outside 14-42 weeks."""
    hc_cm = hc_mm / 10.0
    weeks = 8.96 + 0.540 * hc_cm + 0.0003 * hc_cm**3
    if HADLOCK_MIN_WEEKS <= weeks <= HADLOCK_MAX_WEEKS:
        return weeks
    return None


def upsample_probability(prob: np.ndarray, geometry: ResizeGeometry, image_hw: tuple[int, int]) -> np.ndarray:
    """Model-resolution probability map -> display-image resolution (bilinear), undoing any letterbox."""
    h, w = image_hw
    x0, y0 = geometry.pad_x, geometry.pad_y
    x1, y1 = x0 + w * geometry.scale_x, y0 + h * geometry.scale_y
    # Crop the region that holds the image (a letterbox pad holds nothing), then stretch it to the image.
    crop = prob[int(round(y0)) : int(round(y1)), int(round(x0)) : int(round(x1))]
    return cv2.resize(crop.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)


def largest_component(mask: np.ndarray) -> np.ndarray | None:
    """uint8 0/1 mask -> mask of its largest 8-connected component, or None when empty.

    Labelling runs on the bounding box of the foreground only (a head fills about a quarter of an ultrasound
    frame): the same components, at a third of the cost of labelling the whole frame."""
    mask = mask.astype(np.uint8, copy=False)
    x, y, w, h = cv2.boundingRect(mask)
    if w == 0 or h == 0:
        return None
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask[y : y + h, x : x + w], connectivity=8)
    if n <= 1:
        return None
    biggest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    out = np.zeros(mask.shape, dtype=np.uint8)
    np.equal(labels, biggest, out=out[y : y + h, x : x + w], casting="unsafe")
    return out


def fit_ellipse(component: np.ndarray, spacing_mm: tuple[float, float] | None) -> Ellipse | None:
    """Fit an ellipse to the outer contour of a component. spacing_mm = (row, column) spacing."""
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
    row_mm, col_mm = spacing_mm
    # Anisotropic pixels: fit again in millimetre space so the perimeter is exact.
    (_, _), (m1, m2), _ = cv2.fitEllipse((pts * [col_mm, row_mm]).astype(np.float32))
    return Ellipse((cx, cy), (d1, d2), angle, (m1, m2), ramanujan_perimeter(m1 / 2, m2 / 2))


def segment_ellipse(
    prob: np.ndarray,
    geometry: ResizeGeometry,
    image_hw: tuple[int, int],
    spacing_mm: tuple[float, float] | None,
    threshold: float = 0.5,
) -> tuple[Ellipse | None, np.ndarray]:
    """Probability map at model resolution -> (ellipse in the display image, display-resolution mask)."""
    full = upsample_probability(prob, geometry, image_hw)
    mask = (full >= threshold).astype(np.uint8)
    component = largest_component(mask)
    if component is None:
        return None, mask
    return fit_ellipse(component, spacing_mm), component


def ellipse_mask(image_hw: tuple[int, int], center: tuple[float, float], axes: tuple[float, float], angle: float) -> np.ndarray:
    """Filled ellipse (full axes) as a uint8 0/1 mask, drawn with sub-pixel precision."""
    mask = np.zeros(image_hw, dtype=np.uint8)
    shift = 4
    f = 1 << shift
    c = (int(round(center[0] * f)), int(round(center[1] * f)))
    ax = (int(round(axes[0] / 2 * f)), int(round(axes[1] / 2 * f)))
    cv2.ellipse(mask, c, ax, angle, 0, 360, 1, thickness=-1, lineType=cv2.LINE_8, shift=shift)
    return mask


def dice(a: np.ndarray, b: np.ndarray) -> float:
    inter = float(np.logical_and(a > 0, b > 0).sum())
    total = float((a > 0).sum() + (b > 0).sum())
    return 1.0 if total == 0 else 2 * inter / total
