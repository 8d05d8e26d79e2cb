"""OpenCV capture: a /dev/videoN grabber behind a portable ultrasound, an RTSP URL, or a video file.

A feed that drops (cable pulled, camera reset, stream ended) is reopened with backoff by LiveSource.
"""
from __future__ import annotations

import time

import cv2

from edge_runtime.frames import Frame, StudyRef
from edge_runtime.sources.base import LiveSource


def _capture_target(device: str) -> int | str:
    """'/dev/video2' or '2' -> 2 (V4L2 index); URLs and file paths stay strings."""
    if device.isdigit():
        return int(device)
    if device.startswith("/dev/video") and device[len("/dev/video"):].isdigit():
        return int(device[len("/dev/video"):])
    return device


class VideoSource(LiveSource):
    kind = "video"

    def __init__(self, name: str, slot, device: str, fps: float = 0.0, gray: bool = True,
                 pixel_spacing_mm: float = 0.0, loop: bool = False) -> None:
        super().__init__(name, slot, fps=fps)
        self.device = device
        self.gray = gray
        self.loop = loop  # for files: start again at the end (demo, soak tests)
        self.spacing = (pixel_spacing_mm, pixel_spacing_mm) if pixel_spacing_mm > 0 else None
        self.capture: cv2.VideoCapture | None = None
        self.index = 0

    def open(self) -> None:
        capture = cv2.VideoCapture(_capture_target(self.device))
        if not capture.isOpened():
            capture.release()
            raise OSError(f"cannot open video source {self.device}")
        self.capture = capture

    def read(self) -> Frame | None:
        assert self.capture is not None
        ok, bgr = self.capture.read()
        captured = time.monotonic()
        if not ok or bgr is None:
            if self.loop and self.capture.set(cv2.CAP_PROP_POS_FRAMES, 0):
                ok, bgr = self.capture.read()
            if not ok or bgr is None:
                return None  # dropped: LiveSource reopens
        pixels = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY if self.gray else cv2.COLOR_BGR2RGB)
        frame = Frame(pixels, self.kind, self.name, captured_at=captured, pixel_spacing_mm=self.spacing,
                      study=StudyRef(modality="US", frame_index=self.index))
        self.index += 1
        return frame

    def close(self) -> None:
        if self.capture is not None:
            self.capture.release()
            self.capture = None
