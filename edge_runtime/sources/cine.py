"""Replays a multi-frame DICOM (a cine loop) as a live feed at its own frame rate."""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from edge_runtime.frames import Frame, StudyRef
from edge_runtime.imaging.deid import pseudonym
from edge_runtime.imaging.dicom import DicomImage
from edge_runtime.sources.base import LiveSource


class CineSource(LiveSource):
    kind = "cine"

    def __init__(self, name: str, slot, path: str | Path, key: bytes, fps: float = 0.0, loop: bool = True,
                 windowing: str = "voi", max_pixel_bytes: int = 1 << 30) -> None:
        self.image = DicomImage(path, max_pixel_bytes)  # header errors surface at configuration time
        meta = self.image.meta
        # FrameTime / CineRate from the file unless the config overrides it; 30 fps when the file has neither.
        file_fps = 1000.0 / meta.frame_time_ms if meta.frame_time_ms else 30.0
        super().__init__(name, slot, fps=fps or file_fps)
        self.loop = loop
        self.windowing = windowing
        self.index = 0
        self.ref = StudyRef(pseudonym(key, meta.study_uid), pseudonym(key, meta.series_uid),
                            pseudonym(key, meta.instance_uid), meta.modality, body_part=meta.body_part,
                            view_position=meta.view_position, photometric=meta.photometric)

    def read(self) -> Frame | None:
        if self.index >= self.image.n_frames:
            if not self.loop:
                self._stop.set()
                return None
            self.index = 0
        captured = time.monotonic()
        pixels = self.image.display_frame(self.index, self.windowing)
        frame = Frame(pixels, self.kind, self.name, captured_at=captured,
                      pixel_spacing_mm=self.image.meta.pixel_spacing_mm,
                      study=replace(self.ref, frame_index=self.index))
        self.index += 1
        return frame
