"""Explanations attached to findings: where the model looked (class activation map) or what it measured (mask).

One shape for every method, so the view page and the hub draw them the same way:

    {"method": "cam" | "segmentation", "label": ..., "image_size": [w, h],
     "grid": 16 rows of 16 uint8 (0-255), the map over the whole image,
     "bbox": {"x", "y", "width", "height"} in image pixels,
     "overlay": "data:image/jpeg;base64,...", the image with the map blended, at most 24 KB of JPEG}

`cam`: the model's "cam" graph output (quantize/cam_output.py), the map of the manifest's [explanation] label, ReLU'd
(only evidence for the class counts, as in Grad-CAM) and scaled to a maximum of 1. `bbox` is the smallest box
holding `top_mass` (20 %) of the map's mass: where the evidence is densest. `segmentation`: the head mask and the
fitted ellipse; `bbox` is the mask's bounding box.

Pure numpy/OpenCV on the display image: no engine, no manifest file reading, so the offline faithfulness check
(models/cxr-pneumonia/explain_check.py) measures exactly what the runtime ships.
"""
from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from edge_runtime.imaging.preprocess import ResizeGeometry

GRID = 16
MAX_OVERLAY_BYTES = 24 * 1024
OVERLAY_MAX_SIDE = 384  # a worklist thumbnail: enough to see a lobe, small enough for the uplink
WORK_MAX_SIDE = 256  # the map is computed at this resolution (an 8x8 CAM has no finer detail) and the bbox scaled up
METHODS = ("cam", "segmentation")


class ExplanationUnavailable(Exception):
    """The explanation cannot be computed for this input or model; the finding goes out without it."""


@dataclass(frozen=True)
class ExplanationSpec:
    """A manifest's [explanation] table."""

    method: str  # "cam" | "segmentation"
    output: str | None = None  # graph output holding the maps (cam)
    label: str | None = None  # whose map is shown (cam); default: the decision's positive label
    top_mass: float = 0.2


@dataclass(frozen=True)
class Box:
    x: int
    y: int
    width: int
    height: int

    def as_dict(self) -> dict[str, int]:
        return {"x": self.x, "y": self.y, "width": self.width, "height": self.height}


# ---------------------------------------------------------------- maps
def work_size(image_hw: tuple[int, int], max_side: int = WORK_MAX_SIDE) -> tuple[int, int]:
    """(h, w) of the working map: the image's aspect, long side at most max_side."""
    h, w = image_hw
    scale = min(1.0, max_side / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def cam_to_image(cam: np.ndarray, geometry: ResizeGeometry, model_hw: tuple[int, int], image_hw: tuple[int, int],
                 max_side: int = WORK_MAX_SIDE) -> np.ndarray:
    """One class's map at feature resolution -> float32 map over the display image (at the working size),
    ReLU'd and scaled to max 1. Raises ExplanationUnavailable when the map holds no positive evidence."""
    m = np.asarray(cam, dtype=np.float32)
    if m.ndim != 2 or m.size == 0 or not np.isfinite(m).all():
        raise ExplanationUnavailable(f"class activation map has shape {list(m.shape)} or non-finite values")
    mh, mw = model_hw
    # Each feature cell covers a block of the model input: bilinear upsampling to the input places cell centres
    # on block centres (cv2 samples pixel centres), then the letterbox pad (if any) is cut off.
    full = cv2.resize(m, (mw, mh), interpolation=cv2.INTER_LINEAR)
    h, w = image_hw
    x0, y0 = geometry.pad_x, geometry.pad_y
    x1, y1 = x0 + w * geometry.scale_x, y0 + h * geometry.scale_y
    crop = full[int(round(y0)): max(int(round(y1)), int(round(y0)) + 1), int(round(x0)): max(int(round(x1)), int(round(x0)) + 1)]
    wh, ww = work_size(image_hw, max_side)
    out = np.maximum(cv2.resize(crop, (ww, wh), interpolation=cv2.INTER_LINEAR), 0.0)
    peak = float(out.max())
    if not peak > 0.0:
        raise ExplanationUnavailable("the class activation map has no positive evidence for the class anywhere")
    return out / peak


BOX_SEARCH_SIDE = 32  # the smallest box is searched on the map resized to at most this side, then scaled up


def top_mass_box(m: np.ndarray, image_hw: tuple[int, int], fraction: float = 0.2) -> Box:
    """The smallest box, in image pixels, holding `fraction` of the (non-negative) map's mass: every axis-aligned
    box of the map (resized to at most BOX_SEARCH_SIDE a side) is tried; of those with the least area holding the
    mass, the one holding the most. So the box is where the evidence is densest, not the hull of scattered peaks."""
    h, w = image_hw
    mh, mw = m.shape
    scale = min(1.0, BOX_SEARCH_SIDE / max(mh, mw))
    gh, gw = max(1, round(mh * scale)), max(1, round(mw * scale))
    g = m if (gh, gw) == (mh, mw) else cv2.resize(m.astype(np.float32), (gw, gh), interpolation=cv2.INTER_AREA)
    g = np.maximum(g.astype(np.float64), 0.0)
    s = np.zeros((gh + 1, gw + 1))
    s[1:, 1:] = g.cumsum(0).cumsum(1)
    target = fraction * s[-1, -1] * (1 - 1e-9)
    best = (gh * gw + 1, 0.0, (0, 0, gw, gh))  # (area, -mass, box)
    for bh in range(1, gh + 1):
        rows = s[bh:] - s[:-bh]  # [gh - bh + 1, gw + 1]: column prefix sums of each band of height bh
        for bw in range(1, gw + 1):
            if bh * bw > best[0]:
                break
            mass = rows[:, bw:] - rows[:, :-bw]  # [y, x] mass of the bh x bw box at (x, y)
            y, x = np.unravel_index(int(np.argmax(mass)), mass.shape)
            if mass[y, x] >= target and (bh * bw, -mass[y, x]) < best[:2]:
                best = (bh * bw, -float(mass[y, x]), (int(x), int(y), bw, bh))
                break
    x, y, bw, bh = best[2]
    sy, sx = h / gh, w / gw
    x0, y0 = int(np.floor(x * sx)), int(np.floor(y * sy))
    x1, y1 = min(w, int(np.ceil((x + bw) * sx))), min(h, int(np.ceil((y + bh) * sy)))
    return Box(x0, y0, x1 - x0, y1 - y0)


def grid_of(m: np.ndarray, size: int = GRID) -> list[list[int]]:
    """A [0, 1] map -> size x size uint8 (area average), rows top to bottom."""
    g = cv2.resize(m.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
    return np.clip(np.rint(g * 255.0), 0, 255).astype(np.uint8).tolist()


# ---------------------------------------------------------------- overlay
def _display_bgr(image: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    h, w = image.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    img = image if scale == 1.0 else cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))),
                                                interpolation=cv2.INTER_AREA)
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    else:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)  # frames carry RGB
    return img, scale


def encode_jpeg(bgr: np.ndarray, max_bytes: int = MAX_OVERLAY_BYTES) -> bytes:
    """JPEG at the best quality that fits max_bytes, halving the size when even quality 30 does not."""
    img = bgr
    while True:
        for quality in (85, 70, 55, 40, 30):
            ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
            if ok and buf.size <= max_bytes:
                return buf.tobytes()
        if min(img.shape[:2]) < 32:
            raise ExplanationUnavailable(f"overlay does not fit {max_bytes} bytes")
        img = cv2.resize(img, (img.shape[1] // 2, img.shape[0] // 2), interpolation=cv2.INTER_AREA)


def data_uri(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def decode_overlay(uri: str) -> bytes:
    """The JPEG bytes of an explanation's overlay (for tests and the view page)."""
    prefix = "data:image/jpeg;base64,"
    if not uri.startswith(prefix):
        raise ValueError("overlay is not a base64 JPEG data URI")
    return base64.b64decode(uri[len(prefix):], validate=True)


def heat_overlay(image: np.ndarray, m: np.ndarray, box: Box, max_side: int = OVERLAY_MAX_SIDE) -> np.ndarray:
    """The image with the map in a colour scale, blended where the map is high (cold regions keep the image)."""
    img, scale = _display_bgr(image, max_side)
    h, w = img.shape[:2]
    mm = cv2.resize(m.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    heat = cv2.applyColorMap(np.clip(mm * 255.0, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)
    alpha = (0.6 * mm)[..., None]
    out = (img.astype(np.float32) * (1.0 - alpha) + heat.astype(np.float32) * alpha).astype(np.uint8)
    _draw_box(out, box, scale)
    return out


def _draw_box(img: np.ndarray, box: Box, scale: float) -> None:
    p0 = (int(box.x * scale), int(box.y * scale))
    p1 = (int(np.ceil((box.x + box.width) * scale)) - 1, int(np.ceil((box.y + box.height) * scale)) - 1)
    cv2.rectangle(img, p0, p1, (255, 255, 255), 1, lineType=cv2.LINE_AA)


# ---------------------------------------------------------------- explanations
def cam_explanation(image: np.ndarray, cam: np.ndarray, geometry: ResizeGeometry, model_hw: tuple[int, int],
                    label: str, top_mass: float = 0.2) -> dict[str, Any]:
    """Explanation of a classification from one class's activation map (feature resolution, e.g. 8x8)."""
    image_hw = image.shape[:2]
    m = cam_to_image(cam, geometry, model_hw, image_hw)
    box = top_mass_box(m, image_hw, top_mass)
    overlay = encode_jpeg(heat_overlay(image, m, box))
    return {"method": "cam", "label": label, "image_size": [int(image_hw[1]), int(image_hw[0])],
            "top_mass": top_mass, "grid": grid_of(m), "bbox": box.as_dict(), "overlay": data_uri(overlay)}


def segmentation_explanation(image: np.ndarray, ellipse: dict[str, Any], mask: np.ndarray | None = None,
                             label: str = "head") -> dict[str, Any]:
    """Explanation of a measurement: the mask and its fitted ellipse on the (key) frame.

    ellipse: as a segmentation finding's result["ellipse"] ({center_px, axes_px (full axes), angle_deg}) in image
    pixels. mask: the head mask at image resolution (nonzero = head); None draws the filled ellipse as the mask.
    The exam builder calls this with its key frame; the pipeline with the frame it measured."""
    image_hw = image.shape[:2]
    try:
        center = tuple(float(v) for v in ellipse["center_px"])
        axes = tuple(float(v) for v in ellipse["axes_px"])
        angle = float(ellipse["angle_deg"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ExplanationUnavailable(f"ellipse lacks center_px/axes_px/angle_deg ({exc})") from None
    if mask is None:
        from edge_runtime.heads.geometry import ellipse_mask

        mask = ellipse_mask(image_hw, center, axes, angle)
    if mask.shape[:2] != image_hw:
        raise ExplanationUnavailable(f"mask {list(mask.shape[:2])} does not match the image {list(image_hw)}")
    binary = (mask > 0).astype(np.uint8)
    x, y, w, h = cv2.boundingRect(binary)
    if w == 0 or h == 0:
        raise ExplanationUnavailable("the mask is empty")
    box = Box(int(x), int(y), int(w), int(h))
    img, scale = _display_bgr(image, OVERLAY_MAX_SIDE)
    small = cv2.resize(binary, (img.shape[1], img.shape[0]), interpolation=cv2.INTER_NEAREST)
    tint = img.copy()
    tint[small > 0] = (0.55 * tint[small > 0] + 0.45 * np.array([0, 200, 0])).astype(np.uint8)
    c = (int(round(center[0] * scale)), int(round(center[1] * scale)))
    ax = (max(1, int(round(axes[0] * scale / 2))), max(1, int(round(axes[1] * scale / 2))))
    cv2.ellipse(tint, c, ax, angle, 0, 360, (0, 255, 255), 1, lineType=cv2.LINE_AA)
    work = cv2.resize(binary.astype(np.float32), work_size(image_hw)[::-1], interpolation=cv2.INTER_AREA)
    return {"method": "segmentation", "label": label, "image_size": [int(image_hw[1]), int(image_hw[0])],
            "grid": grid_of(work), "bbox": box.as_dict(), "overlay": data_uri(encode_jpeg(tint))}
