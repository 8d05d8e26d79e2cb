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


@dataclass(frozen=True)
class Component:
    """The largest component, kept as a crop of the display-resolution mask (one job: avoid full-frame copies).

    `mask` (uint8 0/1) is frame[y : y + h, x : x + w] of the full-frame component mask, where the crop is the
    component's bounding box grown by one pixel on each side that the image allows. That zero margin makes
    contour tracing on the crop trace exactly what it traces on the full frame (cv2.findContours treats the
    crop's edge as background, as it treats the image's edge)."""

    mask: np.ndarray
    x: int
    y: int
    area: int  # foreground pixels
    image_hw: tuple[int, int]

    def full(self) -> np.ndarray:
        """The full-frame uint8 0/1 mask (for callers that draw or compare at display resolution)."""
        out = np.zeros(self.image_hw, dtype=np.uint8)
        h, w = self.mask.shape
        out[self.y : self.y + h, self.x : self.x + w] = self.mask
        return out


def _grown(x: int, y: int, w: int, h: int, image_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """A box grown by one pixel on every side, clipped to the image: (x0, y0, x1, y1)."""
    return max(x - 1, 0), max(y - 1, 0), min(x + w + 1, image_hw[1]), min(y + h + 1, image_hw[0])


def largest_component_crop(mask: np.ndarray) -> Component | None:
    """uint8 0/1 mask -> its largest 8-connected component as a Component, or None when empty.

    Labelling runs on the bounding box of the foreground only (a head fills about a quarter of an ultrasound
    frame), and without OpenCV's per-component statistics, which cost four times the labelling itself: the
    areas come from a bincount, and only when there is more than one component. Ties go to the lowest label,
    as argmax over the statistics did."""
    mask = mask.astype(np.uint8, copy=False)
    image_hw = (int(mask.shape[0]), int(mask.shape[1]))
    x, y, w, h = cv2.boundingRect(mask)
    if w == 0 or h == 0:
        return None
    n, labels = cv2.connectedComponents(mask[y : y + h, x : x + w], connectivity=8)
    if n <= 1:
        return None
    if n == 2:  # one component: it is the whole foreground, and the mask itself holds it (margin included)
        x0, y0, x1, y1 = _grown(x, y, w, h, image_hw)
        crop = mask[y0:y1, x0:x1]
        return Component(crop, x0, y0, cv2.countNonZero(crop), image_hw)
    areas = np.bincount(labels.reshape(-1), minlength=n)
    biggest = 1 + int(np.argmax(areas[1:]))
    inside = (labels == biggest).view(np.uint8)
    bx, by, bw, bh = cv2.boundingRect(inside)
    x0, y0, x1, y1 = _grown(x + bx, y + by, bw, bh, image_hw)
    crop = np.zeros((y1 - y0, x1 - x0), dtype=np.uint8)
    crop[y + by - y0 : y + by - y0 + bh, x + bx - x0 : x + bx - x0 + bw] = inside[by : by + bh, bx : bx + bw]
    return Component(crop, x0, y0, int(areas[biggest]), image_hw)


def largest_component(mask: np.ndarray) -> np.ndarray | None:
    """uint8 0/1 mask -> full-frame mask of its largest 8-connected component, or None when empty."""
    component = largest_component_crop(mask)
    return None if component is None else component.full()


def fit_ellipse(component: np.ndarray | Component, spacing_mm: tuple[float, float] | None) -> Ellipse | None:
    """Fit an ellipse to the outer contour of a component. spacing_mm = (row, column) spacing.

    A Component is traced on its crop with the crop's offset added, which yields the same points, in the
    same order, as tracing the full-frame mask (see Component): the fit is identical and costs half."""
    if isinstance(component, Component):
        contours, _ = cv2.findContours(component.mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE,
                                       offset=(component.x, component.y))
    else:
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


def segment_head(
    prob: np.ndarray,
    geometry: ResizeGeometry,
    image_hw: tuple[int, int],
    spacing_mm: tuple[float, float] | None,
    threshold: float = 0.5,
) -> tuple[Ellipse | None, Component | None]:
    """Probability map at model resolution -> (ellipse in the display image, its component as a crop).

    The per-frame path (the segmentation head): the same mask, component and fit as segment_ellipse, without
    building a full-frame component mask."""
    full = upsample_probability(prob, geometry, image_hw)
    component = largest_component_crop(np.greater_equal(full, threshold).view(np.uint8))
    if component is None:
        return None, None
    return fit_ellipse(component, spacing_mm), component


def segment_ellipse(
    prob: np.ndarray,
    geometry: ResizeGeometry,
    image_hw: tuple[int, int],
    spacing_mm: tuple[float, float] | None,
    threshold: float = 0.5,
) -> tuple[Ellipse | None, np.ndarray]:
    """Probability map at model resolution -> (ellipse in the display image, display-resolution mask)."""
    ellipse, component = segment_head(prob, geometry, image_hw, spacing_mm, threshold)
    if component is None:  # nothing above the threshold: the (empty) mask
        return None, np.zeros(image_hw, dtype=np.uint8)
    return ellipse, component.full()


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
