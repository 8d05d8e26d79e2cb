"""PNG and JPEG inputs as display images, with the size guard applied to the header first."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from edge_runtime.errors import InputError

Image.MAX_IMAGE_PIXELS = None  # our own guard below replaces Pillow's warning-only bomb check


def read_header(path: Path) -> tuple[int, int, int, int]:
    """(width, height, channels, bytes per sample) from the file header, without decoding pixels."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            mode = img.mode
    except FileNotFoundError:
        raise InputError(str(path), "no such file") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise InputError(str(path), f"unreadable image header ({exc})") from None
    channels = {"L": 1, "P": 3, "RGB": 3, "RGBA": 4, "LA": 2, "CMYK": 4}.get(mode, 1)
    sample_bytes = 2 if mode.startswith("I;16") or mode == "I" else 1
    return width, height, channels, sample_bytes


def load_display_image(path: str | Path, max_pixel_bytes: int) -> np.ndarray:
    """PNG/JPEG -> uint8 display image: gray HxW or RGB HxWx3."""
    path = Path(path)
    width, height, channels, sample_bytes = read_header(path)
    size = width * height * channels * sample_bytes
    if size > max_pixel_bytes:
        raise InputError(
            str(path), f"image too large: {width}x{height}x{channels} = {size} bytes exceeds the limit of {max_pixel_bytes} bytes"
        )
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.size == 0:
        raise InputError(str(path), "image failed to decode (truncated or corrupt)")
    if arr.dtype == np.uint16:
        lo, hi = np.percentile(arr, (0.5, 99.5))
        arr = np.clip((arr.astype(np.float32) - lo) * (255.0 / max(hi - lo, 1.0)) + 0.5, 0, 255).astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise InputError(str(path), f"unsupported sample type {arr.dtype}")
    if arr.ndim == 3:
        if arr.shape[2] == 4:
            arr = cv2.cvtColor(arr, cv2.COLOR_BGRA2RGB)
        elif arr.shape[2] == 3:
            arr = cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
        else:
            arr = arr[:, :, 0]
        if arr.ndim == 3 and _is_gray(arr):
            arr = np.ascontiguousarray(arr[:, :, 0])
    return arr


def _is_gray(rgb: np.ndarray) -> bool:
    """RGB files that hold gray content (common for exported X-rays) are treated as gray."""
    sample = rgb[:: max(1, rgb.shape[0] // 64), :: max(1, rgb.shape[1] // 64)].astype(np.int16)
    return bool(np.abs(sample[:, :, 0] - sample[:, :, 1]).max() <= 2 and np.abs(sample[:, :, 1] - sample[:, :, 2]).max() <= 2)
