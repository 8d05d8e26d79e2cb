"""The newest picture of each source, handed from the workers to the view without a copy.

The live worker offers each frame it has read (its pixel array, never written again, and its FrameResult); a study
worker offers the display image of the study it committed. An offer is a dict assignment and a counter bump on the
worker's thread; drawing the overlay and encoding the JPEG happen on the view's own thread (edge_runtime/view/
render.py), only while someone looks, and at most at the view's rate. `on_offer` (set by the view) is called with
the source's name so that an MJPEG stream wakes at once instead of polling.
"""
from __future__ import annotations

from collections import OrderedDict
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


SOURCES_REMEMBERED = 2000  # study findings whose configured source the view can name (a finding names the file)


class Pictures:
    def __init__(self) -> None:
        self._latest: dict[str, tuple[int, Picture]] = {}
        self._source_of: OrderedDict[str, str] = OrderedDict()
        self.on_offer: Callable[[str], None] | None = None

    def offer(self, source: str, picture: Picture) -> None:
        finding_id = picture.finding.get("finding_id")
        if finding_id:  # a study finding's `source.name` is its file: remember which [[sources]] it came from
            self._source_of[finding_id] = source
            if len(self._source_of) > SOURCES_REMEMBERED:
                self._source_of.popitem(last=False)
        count = self._latest.get(source, (0, None))[0] + 1
        self._latest[source] = (count, picture)  # one assignment: a reader sees the old pair or the new one
        callback = self.on_offer
        if callback is not None:
            callback(source)

    def latest(self, source: str) -> tuple[int, Picture | None]:
        """(how many pictures this source has offered, the newest) ; (0, None) before the first."""
        return self._latest.get(source, (0, None))

    def source_of(self, finding: dict[str, Any]) -> str | None:
        """The configured source a finding came from: a live source names itself; a study finding is looked up
        among the recent ones (None after a restart, or for one from long ago)."""
        if finding.get("source", {}).get("kind") in ("phantom", "video", "cine"):
            return finding["source"].get("name")
        return self._source_of.get(finding.get("finding_id", ""))
