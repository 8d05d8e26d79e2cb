"""The exam's key frame as a small JPEG with the fitted ellipse drawn: what a clinician glances at on the hub.

One function, `key_frame_jpeg(pixels, ellipse, contour=, mask=)`, so that another overlay (an explanation's mask
or contour) can be drawn on the same picture. The JPEG is at most `KEY_FRAME_MAX_BYTES` (24 KB): the quality
steps down, then the picture shrinks, until it fits. Inline in the finding as base64 (`exam.key_frame.thumbnail`),
it goes over the uplink once, with the exam's finding.
"""
from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

KEY_FRAME_MAX_BYTES = 24 * 1024
KEY_FRAME_WIDTH = 320  # enough to judge where the caliper sat; a quarter of a B-mode frame's width
QUALITIES = (80, 65, 50, 35)
ELLIPSE_BGR = (0, 255, 0)
CONTOUR_BGR = (0, 200, 255)
MASK_BGR = (255, 96, 0)


@dataclass(frozen=True)
class Thumbnail:
    jpeg: bytes
    width: int
    height: int
    quality: int

    def as_json(self) -> dict[str, Any]:
        return {"media_type": "image/jpeg", "width": self.width, "height": self.height, "bytes": len(self.jpeg),
                "encoding": "base64", "data": base64.b64encode(self.jpeg).decode("ascii")}


def key_frame_jpeg(pixels: np.ndarray, ellipse: dict[str, Any] | None, *, contour: list | None = None,
                   mask: np.ndarray | None = None, max_bytes: int = KEY_FRAME_MAX_BYTES,
                   width: int = KEY_FRAME_WIDTH) -> Thumbnail:
    """`pixels` (gray HxW or RGB HxWx3, the display frame), `ellipse` as the head gives it ({center_px, axes_px,
    angle_deg} in display pixels), an optional contour (display pixels) and mask (display size, nonzero = in)."""
    h, w = pixels.shape[:2]
    while True:
        scale = min(1.0, width / float(w))
        size = (max(1, int(round(w * scale))), max(1, int(round(h * scale))))
        img = cv2.resize(pixels, size, interpolation=cv2.INTER_AREA) if scale < 1.0 else pixels.copy()
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR) if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
        draw_overlay(img, scale, ellipse, contour, mask)
        for quality in QUALITIES:
            ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality, cv2.IMWRITE_JPEG_OPTIMIZE, 1])
            if ok and buf.size <= max_bytes:
                return Thumbnail(buf.tobytes(), size[0], size[1], quality)
        if width <= 32:
            raise ValueError(f"a key frame does not fit in {max_bytes} bytes even at 32 pixels wide")
        width = width * 3 // 4  # the lowest quality did not fit: a smaller picture


def draw_overlay(img: np.ndarray, scale: float, ellipse: dict[str, Any] | None, contour: list | None,
                 mask: np.ndarray | None) -> None:
    """Mask tinted, contour and ellipse drawn, all scaled from display pixels to the thumbnail, in place."""
    if mask is not None:
        small = cv2.resize((mask > 0).astype(np.uint8), (img.shape[1], img.shape[0]), interpolation=cv2.INTER_NEAREST)
        tint = np.zeros_like(img)
        tint[:] = MASK_BGR
        blend = cv2.addWeighted(img, 0.7, tint, 0.3, 0)
        img[small > 0] = blend[small > 0]
    if contour:
        pts = np.round(np.asarray(contour, dtype=np.float64) * scale).astype(np.int32).reshape(-1, 1, 2)
        cv2.polylines(img, [pts], True, CONTOUR_BGR, 1, cv2.LINE_AA)
    if ellipse:
        (cx, cy), (d1, d2), angle = ellipse["center_px"], ellipse["axes_px"], ellipse["angle_deg"]
        shift = 4
        f = 1 << shift
        cv2.ellipse(img, (int(round(cx * scale * f)), int(round(cy * scale * f))),
                    (int(round(d1 / 2 * scale * f)), int(round(d2 / 2 * scale * f))), angle, 0, 360, ELLIPSE_BGR, 1,
                    cv2.LINE_AA, shift)
