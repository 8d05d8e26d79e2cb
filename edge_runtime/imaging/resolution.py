"""Resolution-aware decoding: how small a decoded image may be for a model, and the record of how it was decoded.

A model sees its input size only (cxr-pneumonia: 128x128), yet a chest CR is about 2000x2000: decoding it whole
and area-resizing it is most of a study's time. The model's preprocessing (imaging.preprocess.decode_hint) says how
far a decode may shrink the image without changing what the model sees: to no less than twice the final resize's
output on each side, so the last step is still an area resize over at least 2x2 source pixels. The decoders then
take the cheapest exact route there: JPEG 2000 resolution levels (imaging.openjpeg), JPEG DCT scaling, or integer
block averaging of the stored values. Each route falls back to the full decode when the file does not allow it,
and `DecodeInfo` records which route was taken, the decoded and full sizes, and why a full decode was used.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import cv2
import numpy as np


# Box-filter routes (block averaging, JPEG DCT scaling) keep at least this many times the model input on each side,
# whatever the configured margin: at 2x they moved cxr-pneumonia's P(pneumonia) by 0.032 on RG1_UNCR (block 7,
# 280x263) and by up to 0.046 on chest JPEGs re-encoded at 1120 px (DCT 1/4); from 4x on, by at most 0.018 and 0.011
# (BENCHMARKS.md). JPEG 2000 resolution levels (the wavelet's own low-pass) stay at the configured margin: 0.014 at
# most on the shared radiographs at 1/4 (489x461).
BOX_ROUTE_MARGIN = 4.0


@dataclass(frozen=True)
class DecodeHint:
    """The model input a decode is for: its size and how preprocessing fits an image to it."""

    height: int
    width: int
    resize: str = "stretch"  # "stretch" | "letterbox" (imaging.preprocess.RESIZE_MODES)
    # How many times the final resize's output the decode keeps on each side (imaging.reduced_decode_margin): 2 is
    # the floor; more moves the model's input less (cxr-pneumonia: see BENCHMARKS.md) and saves less.
    margin: float = 2.0

    def max_factor(self, rows: int, cols: int, box: bool = False) -> float:
        """The largest reduction factor k for which a rows x cols image shrunk by k keeps at least `margin` times the
        final resize's output on each side (stretch: the model input; letterbox: the aspect-kept inner image);
        `box`: for a box-filter route, at least BOX_ROUTE_MARGIN times."""
        if rows <= 0 or cols <= 0 or self.height <= 0 or self.width <= 0:
            return 1.0
        m = max(2.0, self.margin, BOX_ROUTE_MARGIN if box else 0.0)
        if self.resize == "letterbox":
            scale = min(self.width / cols, self.height / rows)
            return max(1.0, 1.0 / (m * scale))
        return max(1.0, min(rows / (m * self.height), cols / (m * self.width)))

    def block_factor(self, rows: int, cols: int) -> int:
        """The integer block size to average by: the largest allowed, except that one which leaves the final
        stretch resize an integer ratio on both sides (1024x768 -> 128x128: 2, not 3) is preferred, because the
        area resize over whole blocks of blocks is the full-size result up to rounding."""
        k_max = int(math.floor(self.max_factor(rows, cols, box=True) + 1e-9))
        if self.resize == "stretch":
            for k in range(k_max, 1, -1):
                if (rows // k) % self.height == 0 and (cols // k) % self.width == 0 and rows % k == 0 and cols % k == 0:
                    return k
        return k_max

    def power_of_two_level(self, rows: int, cols: int, max_level: int = 3, box: bool = False) -> int:
        """log2 of the largest power-of-two reduction allowed (JPEG 2000 levels; JPEG 1/2, 1/4, 1/8 DCT scaling with
        `box`)."""
        k = self.max_factor(rows, cols, box)
        level = int(math.floor(math.log2(k) + 1e-9)) if k >= 2 else 0
        return max(0, min(level, max_level))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, value: dict | None) -> DecodeHint | None:
        if not value:
            return None
        return cls(int(value["height"]), int(value["width"]), str(value.get("resize", "stretch")),
                   float(value.get("margin", 2.0)))


@dataclass(frozen=True)
class DecodeInfo:
    """How one frame was decoded. `factor`: decoded pixel (i, j) covers full-image pixels [i*f, (i+1)*f) on each
    axis (the last row and column may be partial); `reason`: why a reduction that was asked for did not happen."""

    path: str  # "full" | "j2k-level-N" | "jpeg-dct-1/N" | "block-average-N" | "j2k-level-N+block-average-M"
    factor: int
    size: tuple[int, int]  # decoded (rows, columns)
    full_size: tuple[int, int]
    reason: str | None = None

    @property
    def reduced(self) -> bool:
        return self.factor > 1

    def to_dict(self) -> dict:
        out = {"path": self.path, "factor": self.factor, "size": list(self.size), "full_size": list(self.full_size)}
        if self.reason:
            out["reason"] = self.reason
        return out

    @classmethod
    def from_dict(cls, value: dict) -> DecodeInfo:
        return cls(str(value["path"]), int(value["factor"]), tuple(int(n) for n in value["size"]),
                   tuple(int(n) for n in value["full_size"]), value.get("reason"))

    @classmethod
    def full(cls, shape: tuple[int, ...], reason: str | None = None) -> DecodeInfo:
        hw = (int(shape[0]), int(shape[1]))
        return cls("full", 1, hw, hw, reason)


def reduced_size(rows: int, cols: int, factor: int) -> tuple[int, int]:
    return -(-rows // factor), -(-cols // factor)


def block_average(arr: np.ndarray, k: int) -> np.ndarray:
    """Mean of each k x k block (the last row/column of blocks over what is left), rounded, in arr's dtype.

    The whole blocks go through OpenCV's integer-ratio area resize (an exact block mean: 1.5 ms on a 1955x1841
    uint16 frame where numpy's reshape-mean takes 9); the thin remainder strips are averaged with numpy."""
    if k <= 1:
        return arr
    h, w = arr.shape[:2]
    hb, wb = h // k, w // k
    rh, rw = h - hb * k, w - wb * k
    rest = arr.shape[2:]
    out = np.empty((hb + (rh > 0), wb + (rw > 0)) + rest, dtype=arr.dtype)
    if hb and wb:
        body = cv2.resize(arr[: hb * k, : wb * k], (wb, hb), interpolation=cv2.INTER_AREA)
        out[:hb, :wb] = body.reshape((hb, wb) + rest)
    if rw and hb:
        out[:hb, wb] = _mean(arr[: hb * k, wb * k :].reshape((hb, k, rw) + rest), (1, 2), arr.dtype)
    if rh and wb:
        out[hb, :wb] = _mean(arr[hb * k :, : wb * k].reshape((rh, wb, k) + rest), (0, 2), arr.dtype)
    if rh and rw:
        out[hb, wb] = _mean(arr[hb * k :, wb * k :], (0, 1), arr.dtype)
    return out


def _mean(a: np.ndarray, axes: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    return np.rint(a.mean(axis=axes, dtype=np.float64)).astype(dtype)
