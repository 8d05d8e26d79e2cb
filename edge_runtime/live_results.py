"""Per-frame results of a live stream that stay on the device: a bounded ring (for a live view) and the
per-minute summary that telemetry carries (frames, latency p50/p99, budget misses), never per-frame rows.

Written by the source's worker thread, read by anyone (the view, telemetry): a lock guards both.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np

RING_FRAMES = 600  # 20 s at 30 fps: what a live view redraws from; about 100 KB per source


def _utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class FrameResult:
    """One frame's outcome, small: a view draws the caliper from `ellipse` on its own copy of the picture."""

    frame_index: int
    captured_at: float  # wall clock (time.time())
    variant: str
    latency_ms: float
    budget_met: bool
    assessed: bool
    detected: bool
    head_circumference_mm: float | None
    ellipse: dict[str, Any] | None
    exam_id: str | None  # the open exam the frame belongs to (exam mode), else None
    quality: float | None = None  # the head's ellipse fit (IoU of mask and ellipse), when a head was fitted


class LiveResults:
    """One per live source."""

    def __init__(self, ring_frames: int = RING_FRAMES, minute_s: float = 60.0) -> None:
        self._ring: deque[FrameResult] = deque(maxlen=ring_frames)
        self._lock = threading.Lock()
        self.minute_s = minute_s
        self._start = time.time()
        self._lat: list[float] = []
        self._misses = 0
        self._failed = 0
        self._exams = 0
        self._last: dict[str, Any] | None = None

    def add(self, result: FrameResult) -> None:
        with self._lock:
            self._roll(result.captured_at)
            self._ring.append(result)
            self._lat.append(result.latency_ms)
            self._misses += 0 if result.budget_met else 1

    def failed(self) -> None:
        with self._lock:
            self._roll(time.time())
            self._failed += 1

    def exam_closed(self) -> None:
        with self._lock:
            self._roll(time.time())
            self._exams += 1

    def recent(self, n: int | None = None) -> list[FrameResult]:
        """The newest `n` results (all the ring holds when None), oldest first."""
        with self._lock:
            items = list(self._ring)
        return items if n is None else items[-n:]

    def last_minute(self, now: float | None = None) -> dict[str, Any] | None:
        """The summary of the last complete minute (None before the first one has ended)."""
        with self._lock:
            self._roll(time.time() if now is None else now)
            return self._last

    def _roll(self, now: float) -> None:
        """Close the current minute once `now` is past it (a silent stretch yields one empty minute)."""
        if now - self._start < self.minute_s:
            return
        lat = np.array(self._lat) if self._lat else None
        self._last = {
            "from": _utc(self._start), "to": _utc(self._start + self.minute_s), "frames": len(self._lat),
            "failed": self._failed, "budget_misses": self._misses, "exams": self._exams,
            "latency_ms": None if lat is None else {"p50": round(float(np.percentile(lat, 50)), 2),
                                                    "p99": round(float(np.percentile(lat, 99)), 2)},
        }
        # Minutes with nothing at all in them are skipped: the next one starts at a minute boundary of now.
        self._start += self.minute_s * max(1, int((now - self._start) // self.minute_s))
        self._lat, self._misses, self._failed, self._exams = [], 0, 0, 0
