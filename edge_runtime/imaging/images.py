"""PNG and JPEG inputs as display images, with the size guard applied to the header first."""
from __future__ import annotations

import struct
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from edge_runtime.errors import InputError
from edge_runtime.imaging.guard import DecodeLimits, ImageHeader, check_image_peak, jpeg_is_complete, png_is_complete
from edge_runtime.imaging.reasons import readable
from edge_runtime.imaging.resolution import BOX_ROUTE_MARGIN, DecodeHint, DecodeInfo, block_average, reduced_size

# libjpeg DCT scaling through OpenCV, by (gray?, log2 of the factor)
_CV_REDUCED = {(True, 1): cv2.IMREAD_REDUCED_GRAYSCALE_2, (True, 2): cv2.IMREAD_REDUCED_GRAYSCALE_4,
               (True, 3): cv2.IMREAD_REDUCED_GRAYSCALE_8, (False, 1): cv2.IMREAD_REDUCED_COLOR_2,
               (False, 2): cv2.IMREAD_REDUCED_COLOR_4, (False, 3): cv2.IMREAD_REDUCED_COLOR_8}

Image.MAX_IMAGE_PIXELS = None  # our own guard below replaces Pillow's warning-only bomb check


def image_header(path: Path) -> ImageHeader:
    """What the file header says (Pillow reads headers only), without decoding pixels."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            mode = img.mode
            fmt = img.format or "image"
            progressive = bool(img.info.get("progressive") or img.info.get("progression"))
    except FileNotFoundError:
        raise InputError(str(path), "no such file") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, struct.error) as exc:
        raise InputError(str(path), f"unreadable image header ({readable(str(exc), 'the header')})") from None
    channels = {"L": 1, "P": 3, "RGB": 3, "RGBA": 4, "LA": 2, "CMYK": 4}.get(mode, 1)
    sample_bytes = 2 if mode.startswith("I;16") or mode == "I" else 1
    return ImageHeader(fmt, width, height, channels, sample_bytes, progressive)


def read_header(path: Path) -> tuple[int, int, int, int]:
    """(width, height, channels, bytes per sample) from the file header, without decoding pixels."""
    h = image_header(path)
    return h.width, h.height, h.channels, h.sample_bytes


def load_display_image(path: str | Path, max_pixel_bytes: int, limits: DecodeLimits | None = None) -> np.ndarray:
    """PNG/JPEG -> uint8 display image: gray HxW or RGB HxWx3. Refused before decoding when the header's
    dimensions need more than the limits, or when the file is cut off (no PNG IEND / JPEG end marker)."""
    return decode_display_image(path, max_pixel_bytes, limits)[0]


def _reduced_jpeg(data: bytes, header: ImageHeader, hint: DecodeHint) -> tuple[np.ndarray | None, str]:
    """A JPEG decoded at 1/2, 1/4 or 1/8 by libjpeg's DCT scaling, or (None, why not)."""
    level = hint.power_of_two_level(header.height, header.width, max_level=3, box=True)
    gray = header.channels == 1
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), _CV_REDUCED[(gray, level)])
    want = reduced_size(header.height, header.width, 1 << level) + (() if gray else (3,))
    if arr is None or arr.shape != want or arr.dtype != np.uint8:
        return None, f"JPEG DCT scaling 1/{1 << level} gave {None if arr is None else arr.shape}, expected {want}"
    return arr, ""


def decode_display_image(path: str | Path, max_pixel_bytes: int, limits: DecodeLimits | None = None,
                         hint: DecodeHint | None = None) -> tuple[np.ndarray, DecodeInfo]:
    """load_display_image, decoded no larger than `hint` needs (imaging.resolution): a JPEG through libjpeg's DCT
    scaling, a PNG whole and then block-averaged; falls back to the full decode with the reason recorded."""
    path = Path(path)
    limits = limits or DecodeLimits(max_pixel_bytes=max_pixel_bytes)
    header = image_header(path)
    data = path.read_bytes()
    check_image_peak(str(path), header, len(data), limits)
    if header.format == "PNG" and not png_is_complete(data):
        raise InputError(str(path), "truncated: the PNG has no end chunk (cut off in transfer?)")
    if header.format == "JPEG" and not jpeg_is_complete(data):
        raise InputError(str(path), "truncated: the JPEG has no end marker after its last scan (cut off in transfer?)")
    full = (header.height, header.width)
    arr, info = None, None
    k = hint.block_factor(*full) if hint is not None else 1
    if hint is not None and k < 2:
        info = DecodeInfo("full", 1, full, full, f"{full[0]}x{full[1]} is within {BOX_ROUTE_MARGIN:g}x of the model "
                                                 "input (the least a box-filter reduction keeps)")
    elif hint is not None and header.format == "JPEG" and header.sample_bytes == 1:
        arr, why = _reduced_jpeg(data, header, hint)
        if arr is not None:
            f = 1 << hint.power_of_two_level(*full, max_level=3, box=True)
            info = DecodeInfo(f"jpeg-dct-1/{f}", f, arr.shape[:2], full)
        else:
            info = DecodeInfo("full", 1, full, full, why)
    if arr is None:
        arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    del data
    if arr is None or arr.size == 0:
        raise InputError(str(path), "image failed to decode (truncated or corrupt)")
    if info is None and hint is not None:  # a PNG (or an odd JPEG): averaged before its stretch and colour steps
        arr = block_average(arr, k)
        info = DecodeInfo(f"block-average-{k}", k, arr.shape[:2], full)
    if info is None:
        info = DecodeInfo.full(arr.shape)
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
    return arr, info


def _is_gray(rgb: np.ndarray) -> bool:
    """RGB files that hold gray content (common for exported X-rays) are treated as gray."""
    sample = rgb[:: max(1, rgb.shape[0] // 64), :: max(1, rgb.shape[1] // 64)].astype(np.int16)
    return bool(np.abs(sample[:, :, 0] - sample[:, :, 1]).max() <= 2 and np.abs(sample[:, :, 1] - sample[:, :, 2]).max() <= 2)
