"""What a sonographer is told under the live picture: one line from the newest frames' results.

The states follow the exam's own gate (edge_runtime/exams.py), so the line says what the exam will do with the
frames now coming: "out of scope" (the scope gate refused the picture), "no head in view", "hold still" (a head,
but its circumference is not yet steady over the last half second: the exam would drop these frames as unstable),
"measured: HC ... mm" (steady: the frames count toward the exam), "no pixel spacing" (a head, no calibration).
"""
from __future__ import annotations

import statistics
import time
from typing import Sequence

from edge_runtime.exams import ExamSettings

STALE_S = 2.0  # no frame read for this long: the picture is old news
MIN_STEADY = 3  # frames that must agree before "measured"


def guidance(recent: Sequence, settings: ExamSettings = ExamSettings(), now: float | None = None) -> tuple[str, str]:
    """(state, line) from the newest FrameResults (oldest first)."""
    if not recent:
        return "waiting", "waiting for frames"
    last = recent[-1]
    now = time.time() if now is None else now
    if now - last.captured_at > STALE_S:
        return "waiting", f"no new frame for {now - last.captured_at:.0f} s"
    if not last.assessed:
        return "out_of_scope", "out of scope: not a fetal head view"
    if not last.detected:
        return "absent", "no head in view"
    if last.head_circumference_mm is None:
        return "no_spacing", "head found; no pixel spacing, so no measurement"
    window = [r.head_circumference_mm for r in recent
              if r.detected and r.head_circumference_mm is not None
              and last.captured_at - r.captured_at <= settings.stability_window_s]
    if len(window) < MIN_STEADY:
        return "unstable", "hold still"
    med = statistics.median(window)
    limit = max(settings.stability_min_mm, settings.stability_rel * med)
    if any(abs(v - med) > limit for v in window):
        return "unstable", "hold still"
    return "measured", f"measured: HC {med:.1f} mm"
