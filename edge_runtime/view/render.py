"""The view's pictures: the newest frame of a source with its overlay, as a JPEG, drawn once per new frame.

Runs on the view's render thread ("edge-view", niced so that inference keeps the CPU), never on a worker's: the
fitted head ellipse (green; amber while the circumference is not steady), the circumference, the guidance line and
the capture time (HH:MM:SS.mmm, what the picture-to-browser delay is measured against). A study source shows its
explanation overlay when the finding carries one, else the display image, with the label. Every viewer of a source
gets the same bytes: three viewers cost one encode per frame, not three.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import datetime

import cv2
import numpy as np

from edge_runtime.view.guidance import guidance
from edge_runtime.view.pictures import Picture, Pictures
from edge_runtime.view.snapshot import study_line

MAX_SIDE = 800  # a B-mode frame as captured; a 2000 px radiograph is shrunk to this for the page
JPEG_QUALITY = 80
FONT = cv2.FONT_HERSHEY_SIMPLEX
STATE_BGR = {"measured": (0, 200, 0), "unstable": (0, 190, 255), "no_spacing": (0, 190, 255),
             "absent": (230, 230, 230), "out_of_scope": (60, 60, 255), "waiting": (200, 200, 200),
             "study": (230, 230, 230)}


@dataclass(frozen=True)
class Rendered:
    count: int  # the source's picture counter this JPEG was drawn from
    jpeg: bytes
    captured_ts: float
    frame_index: int


def _clock(ts: float) -> str:
    return datetime.fromtimestamp(ts).strftime("%H:%M:%S.%f")[:-3]


def _bgr(pixels: np.ndarray, max_side: int = MAX_SIDE) -> tuple[np.ndarray, float]:
    h, w = pixels.shape[:2]
    scale = min(1.0, max_side / float(max(h, w)))
    img = pixels if scale == 1.0 else cv2.resize(pixels, (max(1, round(w * scale)), max(1, round(h * scale))),
                                                  interpolation=cv2.INTER_AREA)
    code = cv2.COLOR_GRAY2BGR if img.ndim == 2 else cv2.COLOR_RGB2BGR
    return cv2.cvtColor(img, code), scale


def _text(img: np.ndarray, text: str, org: tuple[int, int], bgr: tuple[int, int, int], scale: float = 0.6) -> None:
    """Text on a dark box: readable on speckle and on a near-white radiograph alike."""
    (w, h), base = cv2.getTextSize(text, FONT, scale, 1)
    x, y = org
    cv2.rectangle(img, (x - 4, y - h - 5), (min(img.shape[1] - 1, x + w + 4), y + base + 3), (20, 20, 20), -1)
    cv2.putText(img, text, org, FONT, scale, bgr, 1, cv2.LINE_AA)


def draw_live(picture: Picture, recent: list) -> np.ndarray:
    img, scale = _bgr(picture.pixels)
    state, line = guidance(recent)
    r = picture.result
    if r is not None and r.detected and r.ellipse:  # green when steady, amber while not (or not calibrated)
        (cx, cy), (d1, d2), angle = r.ellipse["center_px"], r.ellipse["axes_px"], r.ellipse["angle_deg"]
        bgr = STATE_BGR["measured"] if state == "measured" else STATE_BGR["unstable"]
        cv2.ellipse(img, (round(cx * scale), round(cy * scale)), (round(d1 / 2 * scale), round(d2 / 2 * scale)),
                    angle, 0, 360, bgr, 2, cv2.LINE_AA)
    h = img.shape[0]
    _text(img, line, (10, 28), STATE_BGR.get(state, (255, 255, 255)), 0.8)
    if r is not None and r.head_circumference_mm is not None:
        _text(img, f"HC {r.head_circumference_mm:.1f} mm", (10, 56), (255, 255, 255))
    _text(img, f"{_clock(picture.captured_ts)}  frame {picture.frame_index}", (10, h - 12), (220, 220, 220), 0.5)
    return img


def draw_study(picture: Picture) -> np.ndarray:
    from edge_runtime.explain import decode_overlay

    f = picture.finding
    overlay = (f.get("explanation") or {}).get("overlay")
    img = None
    if overlay:
        try:  # the explanation's own JPEG: the image with the map (or mask) blended, as the finding carries it
            img = cv2.imdecode(np.frombuffer(decode_overlay(overlay), np.uint8), cv2.IMREAD_COLOR)
        except ValueError:
            img = None
    if img is None:
        img, _ = _bgr(picture.pixels)
    result = f.get("result", {})
    line = study_line(f)
    if result.get("assessed") is False:
        bgr = STATE_BGR["out_of_scope"]
    else:
        bgr = (60, 60, 255) if f.get("priority") == "urgent" else (230, 230, 230)
    _text(img, line, (8, 24), bgr, 0.6)
    _text(img, _clock(picture.captured_ts), (8, img.shape[0] - 10), (220, 220, 220), 0.45)
    return img


class Renderer:
    """One JPEG per new picture per source, cached; `jpeg(source)` is called on the render thread."""

    def __init__(self, pictures: Pictures, recent_frames) -> None:
        self.pictures = pictures
        self.recent_frames = recent_frames  # Service.recent_frames(source, n)
        self._cache: dict[str, Rendered] = {}
        self._lock = threading.Lock()
        self.renders = 0
        self.render_s = 0.0

    def jpeg(self, source: str) -> Rendered | None:
        count, picture = self.pictures.latest(source)
        if picture is None:
            return None
        with self._lock:
            cached = self._cache.get(source)
            if cached is not None and cached.count == count:
                return cached
            t0 = time.perf_counter()
            if picture.result is not None:
                img = draw_live(picture, self.recent_frames(source, 30))
            else:
                img = draw_study(picture)
            ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
            if not ok:
                return cached
            rendered = Rendered(count, buf.tobytes(), picture.captured_ts, picture.frame_index)
            self._cache[source] = rendered
            self.renders += 1
            self.render_s += time.perf_counter() - t0
            return rendered
