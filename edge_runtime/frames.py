"""Frame: pixels plus where and when they came from, and the time each stage spent on them."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from edge_runtime.imaging.resolution import DecodeInfo


@dataclass(frozen=True)
class StudyRef:
    """Pseudonymous study identity (never the original UIDs) and acquisition facts."""

    study_id: str = ""
    series_id: str = ""
    instance_id: str = ""
    modality: str = ""
    frame_index: int = 0
    # Header facts the scope gate checks (empty when the input has no such tag, e.g. a PNG).
    body_part: str = ""
    view_position: str = ""
    photometric: str = ""


@dataclass
class Frame:
    pixels: np.ndarray  # uint8 display image, gray HxW or RGB HxWx3
    source_kind: str  # "file", "video", "cine", "dicom-folder", "dicom-scp", "phantom"
    source_name: str
    captured_at: float = field(default_factory=time.monotonic)  # monotonic seconds
    study: StudyRef = field(default_factory=StudyRef)
    pixel_spacing_mm: tuple[float, float] | None = None  # (row, column)
    timings_ms: dict[str, float] = field(default_factory=dict)
    # How a file's frame was decoded (imaging.resolution.DecodeInfo); None for live frames. A reduced decode's
    # factor maps the model's outputs back onto the full image (pipeline.Predictor).
    decode: DecodeInfo | None = None

    def add_timing(self, stage: str, ms: float) -> None:
        self.timings_ms[stage] = self.timings_ms.get(stage, 0.0) + ms


class Stopwatch:
    """`with Stopwatch(frame, "preprocess"):` adds the block's wall time to the frame's record."""

    def __init__(self, frame: Frame, stage: str) -> None:
        self.frame, self.stage = frame, stage

    def __enter__(self) -> Stopwatch:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.frame.add_timing(self.stage, (time.perf_counter() - self.t0) * 1000.0)
