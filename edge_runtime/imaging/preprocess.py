"""Display image -> model input tensor.

This module is the single definition of what a model sees. Training code imports it, so an image that
reaches the runtime (a DICOM after its LUTs, a PNG, a video frame) becomes exactly the tensor the model
was trained on.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

INTERPOLATIONS = {
    "area": cv2.INTER_AREA,
    "linear": cv2.INTER_LINEAR,
    "cubic": cv2.INTER_CUBIC,
    "nearest": cv2.INTER_NEAREST,
}
CHANNELS = ("gray", "rgb")
RESIZE_MODES = ("stretch", "letterbox")


@dataclass(frozen=True)
class PreprocessSpec:
    """How to turn a uint8 display image into an NCHW float32 tensor."""

    height: int
    width: int
    channels: str = "gray"  # "gray" (1 channel) or "rgb" (3 channels)
    resize: str = "stretch"  # "stretch" squashes to (height, width); "letterbox" keeps aspect, pads with 0
    interpolation: str = "area"
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    # The least reduced-decode margin this model's output tolerates (manifest preprocessing.decode_margin): a decoder
    # keeps at least this many times the final resize's output on each side, whatever imaging.reduced_decode_margin
    # says (cxr-pneumonia 1.1.0 reads 59 px patches and needs 4: BENCHMARKS.md, "Radiographs inside their budget").
    decode_margin: float = 2.0

    @property
    def n_channels(self) -> int:
        return 1 if self.channels == "gray" else 3


@dataclass(frozen=True)
class ResizeGeometry:
    """Maps model-input pixel coordinates back to the display image.

    Pixel centres, as cv2.resize samples them: x_img + 0.5 = (x_in - pad_x + 0.5) / scale_x.
    """

    scale_x: float
    scale_y: float
    pad_x: float = 0.0
    pad_y: float = 0.0

    def to_image(self, points: np.ndarray) -> np.ndarray:
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        x = (pts[:, 0] - self.pad_x + 0.5) / self.scale_x - 0.5
        y = (pts[:, 1] - self.pad_y + 0.5) / self.scale_y - 0.5
        return np.stack([x, y], axis=1)


def to_channels(image: np.ndarray, channels: str) -> np.ndarray:
    """uint8 HxW or HxWx3 (RGB) -> HxW (gray) or HxWx3 (RGB)."""
    if channels not in CHANNELS:
        raise ValueError(f"channels must be one of {CHANNELS}, got {channels!r}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if channels == "gray":
        return image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    return image if image.ndim == 3 else cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)


def resize(image: np.ndarray, spec: PreprocessSpec) -> tuple[np.ndarray, ResizeGeometry]:
    """Resize a display image to the model's input size; returns the image and the inverse geometry."""
    interp = INTERPOLATIONS[spec.interpolation]
    h, w = image.shape[:2]
    if spec.resize == "stretch":
        out = cv2.resize(image, (spec.width, spec.height), interpolation=interp)
        return out, ResizeGeometry(spec.width / w, spec.height / h)
    if spec.resize != "letterbox":
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {spec.resize!r}")
    scale = min(spec.width / w, spec.height / h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    inner = cv2.resize(image, (nw, nh), interpolation=interp)
    out = np.zeros((spec.height, spec.width) + image.shape[2:], dtype=image.dtype)
    px, py = (spec.width - nw) // 2, (spec.height - nh) // 2
    out[py : py + nh, px : px + nw] = inner
    return out, ResizeGeometry(nw / w, nh / h, float(px), float(py))


def prepare(image: np.ndarray, spec: PreprocessSpec) -> tuple[np.ndarray, ResizeGeometry]:
    """uint8 display image -> (1, C, H, W) float32 tensor and the geometry to map outputs back."""
    if image.dtype != np.uint8:
        raise ValueError(f"display image must be uint8, got {image.dtype}")
    img = to_channels(image, spec.channels)
    img, geometry = resize(img, spec)
    x = img.astype(np.float32) * np.float32(1.0 / 255.0)
    if x.ndim == 2:
        x = x[None, :, :]
    else:
        x = np.transpose(x, (2, 0, 1))
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(-1, 1, 1)
    x = (x - mean) / std
    return np.ascontiguousarray(x[None], dtype=np.float32), geometry


def decode_hint(spec: PreprocessSpec, margin: float = 2.0):
    """What a decoder may shrink an image to for this model: at least `margin` (>= 2) times the final resize's
    output on each side, and at least the model's own spec.decode_margin (imaging.resolution.DecodeHint)."""
    from edge_runtime.imaging.resolution import DecodeHint

    return DecodeHint(spec.height, spec.width, spec.resize, max(margin, spec.decode_margin))
