"""The newest picture of each source, handed from the workers to the view without a copy.

The live worker offers each frame it has read (its pixel array, never written again, and its FrameResult); a study
worker offers the display image of the study it committed. An offer is a dict assignment and a counter bump on the
worker's thread; drawing the overlay and encoding the JPEG happen on the view's own thread (edge_runtime/view/
render.py), only while someone looks, and at most at the view's rate. `on_offer` (set by the view) is called with
the source's name so that an MJPEG stream wakes at once instead of polling.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np


@dataclass(frozen=True)
class Picture:
    pixels: np.ndarray  # the display frame (uint8 gray HxW or RGB HxWx3) as the model read it
    captured_ts: float  # wall clock of the capture (live) or of the commit (study)
    frame_index: int
    result: Any = None  # live: edge_runtime.live_results.FrameResult
    finding: dict[str, Any] = field(default_factory=dict)  # study: the committed finding (label, explanation)


class Pictures:
    def __init__(self) -> None:
        self._latest: dict[str, tuple[int, Picture]] = {}
        self.on_offer: Callable[[str], None] | None = None

    def offer(self, source: str, picture: Picture) -> None:
        count = self._latest.get(source, (0, None))[0] + 1
        self._latest[source] = (count, picture)  # one assignment: a reader sees the old pair or the new one
        callback = self.on_offer
        if callback is not None:
            callback(source)

    def latest(self, source: str) -> tuple[int, Picture | None]:
        """(how many pictures this source has offered, the newest) ; (0, None) before the first."""
        return self._latest.get(source, (0, None))
