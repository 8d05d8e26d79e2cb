"""Exams: a live source's frames grouped into one measured answer per sweep of the probe.

A clinician wants the head circumference of this exam, how sure the device is and the frame it was measured on,
not thirty findings a second. `ExamTracker` runs on the live worker's thread, one per source:

    idle --a frame in which the model sees its target (result.detected)--> open
    open --the target not seen for `gap_s` of capture time (probe lifted)---> closed, end_reason "target_absent"
    open --`max_s` after the exam started--------------------------------> closed, "max_duration" (a frame that
                                                                           still shows the target opens the next)
    open --no frame at all for `gap_s` (the feed is down or silent)-------> closed, "feed_silent"
    open --a clean stop----------------------------------------------------> closed, "stop" (flushed, not lost)

"Absent" is a frame the model read and found no target in (no head, or refused by the scope gate). The gap is
measured from the last sighting to the next frame read; a head after a hole longer than the gap (the budget
skipped most of a lift) starts a new exam rather than merging two. A frame that failed (preprocessing, the
engine, the head) is counted in `frames_failed` and neither extends nor ends the exam.

At the close the frames that showed the target go through a quality gate: the ellipse fit (IoU of the mask with
its fitted ellipse), the mask's area and whether the ellipse lies inside the image, the scope gate's verdict
(a frame the gate refused or marked atypical is not used), and stability against neighbouring frames (a
circumference more than max(3 mm, 3 %) from the median of the frames within half a second is a glitch: the probe
moved, a shadow cut the skull). The exam's result is the median circumference of the frames used, its
interquartile range, the gestational age of that median, a quality score and the key frame: the used frame whose
circumference is nearest the median (pixels are kept for a handful of candidates only, never for every frame).
Fewer than `min_frames` usable frames: the exam still gives a finding, `assessed = false` with the reason.

Nothing here touches the outbox: the service commits what `observe`, `tick` and `flush` return. A kill -9 loses
the open exam's aggregate (it lives in memory only); closed exams are committed findings.
"""
from __future__ import annotations

import logging
import math
import statistics
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np

from edge_runtime.config import LIVE_KINDS, SourceSection
from edge_runtime.errors import ConfigError
from edge_runtime.findings import DeviceIdentity, ModelRef, build_finding
from edge_runtime.frames import Frame
from edge_runtime.heads import HeadResult
from edge_runtime.explain import ExplanationUnavailable, segmentation_explanation
from edge_runtime.heads.geometry import hadlock_ga_weeks
from edge_runtime.keyframe import key_frame_jpeg

# Why a frame of an open exam was not used (the keys of exam.frames_rejected).
REJECTIONS = ("no_head", "scope", "fit", "area", "no_spacing", "unstable")
END_REASONS = ("target_absent", "max_duration", "feed_silent", "stop", "model_switch")

log = logging.getLogger("edge_runtime.exams")


def resolve_results(src: SourceSection, task: str, where: str = "configuration") -> str:
    """The source's results mode: its `results` key, else "exam" for a live source of a measuring model."""
    measuring = task == "segmentation"
    if not src.results:
        return "exam" if src.kind in LIVE_KINDS and measuring else "frame"
    if src.results != "frame" and not measuring:
        raise ConfigError(where, f"source {src.name!r}: results = {src.results!r} aggregates a measurement over an "
                                 f"exam, and its model is a {task} model; set results = \"frame\"")
    return src.results


@dataclass(frozen=True)
class ExamSettings:
    gap_s: float = 2.0
    max_s: float = 600.0
    # The gate. The head refuses fits below the manifest's min_fit_quality (0.8); an exam can afford to be
    # pickier: the fetal-head validation set's 1st percentile is 0.927 (manifest, [segmentation]).
    min_fit_quality: float = 0.9
    min_area_fraction: float = 0.02  # a head this small is too far or too oblique to measure
    max_area_fraction: float = 0.6  # a head filling the frame is cut by the sector
    edge_margin_px: float = 2.0  # the fitted ellipse must lie inside the image by this much
    stability_window_s: float = 0.5
    stability_rel: float = 0.03
    stability_min_mm: float = 3.0
    min_frames: int = 3  # usable frames an exam needs to be assessed
    review_frames: int = 10  # fewer usable frames than this: needs_review
    review_quality: float = 0.7  # a quality score under this: needs_review
    candidates: int = 6  # frames whose pixels are kept as key-frame candidates

    @classmethod
    def for_source(cls, src: SourceSection) -> ExamSettings:
        return cls(gap_s=src.exam_gap_s, max_s=src.exam_max_s)


@dataclass(slots=True)
class FrameRecord:
    """What an exam keeps of each frame: small numbers, never pixels."""

    index: int
    captured_at: float  # monotonic
    status: str  # "gated" (passed the per-frame gate), "used" (and stable), or one of REJECTIONS
    hc_mm: float | None = None
    fit: float | None = None
    latency_ms: float = 0.0
    budget_met: bool = True
    variant: str = ""


@dataclass
class Candidate:
    """A key-frame candidate: the frame itself (its pixels, for the thumbnail), the head's result and model."""

    record: FrameRecord
    frame: Frame
    result: dict[str, Any]
    model: ModelRef


@dataclass
class ExamSummary:
    """A closed exam, ready to become a finding (`exam_finding`)."""

    exam_id: str
    source: str
    task: str
    started_at: float  # wall clock (time.time())
    ended_at: float
    end_reason: str
    frames_seen: int
    frames_used: int
    frames_failed: int
    rejected: dict[str, int]
    result: dict[str, Any]
    priority: str
    key: Candidate | None  # None when not assessed
    first: Candidate  # the frame that opened the exam: its study block and model when there is no key frame
    variants: dict[str, int]
    latency_ms: dict[str, float]
    budget_misses: int
    wall_offset: float  # time.time() - time.monotonic() while the exam was open: capture times as wall clock

    @property
    def assessed(self) -> bool:
        return bool(self.result.get("assessed"))


def classify(result: dict[str, Any], image_hw: tuple[int, int], settings: ExamSettings) -> tuple[bool, str]:
    """(does the frame show the target, its status before the stability check)."""
    if not result.get("assessed", True):
        return False, "scope"  # the scope gate refused it: for an exam, nothing of the target is there
    if not result.get("detected"):
        return False, "no_head"
    if result.get("needs_review"):
        return True, "scope"  # assessed only because a header vouched for it: not good enough to aggregate
    if result.get("measurements", {}).get("head_circumference_mm") is None:
        return True, "no_spacing"
    if (result.get("quality") or 0.0) < settings.min_fit_quality:
        return True, "fit"
    if not ellipse_well_placed(result.get("ellipse") or {}, image_hw, settings):
        return True, "area"
    return True, "gated"


def ellipse_well_placed(ellipse: dict[str, Any], image_hw: tuple[int, int], settings: ExamSettings) -> bool:
    """The fitted head's area within the allowed fraction of the image, and the whole ellipse inside it."""
    try:
        (cx, cy), (d1, d2), angle = ellipse["center_px"], ellipse["axes_px"], ellipse["angle_deg"]
    except (KeyError, TypeError, ValueError):
        return False
    h, w = image_hw
    area = math.pi * d1 * d2 / 4.0 / float(h * w)
    if not settings.min_area_fraction <= area <= settings.max_area_fraction:
        return False
    # Half-extents of the rotated ellipse's bounding box.
    a, b, t = d1 / 2.0, d2 / 2.0, math.radians(angle)
    ex = math.hypot(a * math.cos(t), b * math.sin(t))
    ey = math.hypot(a * math.sin(t), b * math.cos(t))
    m = settings.edge_margin_px
    return cx - ex >= m and cy - ey >= m and cx + ex <= w - 1 - m and cy + ey <= h - 1 - m


def stable_mask(times: np.ndarray, hcs: np.ndarray, settings: ExamSettings) -> list[bool]:
    """True where a circumference agrees with the median of the other frames within the stability window
    (at least two of them: a lone frame cannot be confirmed). Plain lists for the small windows: a 600 s exam
    at 30 fps closes in about 0.1 s on the worker thread rather than 0.3 s with a numpy call per frame."""
    lo = np.searchsorted(times, times - settings.stability_window_s, side="left").tolist()
    hi = np.searchsorted(times, times + settings.stability_window_s, side="right").tolist()
    values = hcs.tolist()
    ok = [False] * len(values)
    for i, v in enumerate(values):
        neighbours = values[lo[i]:i] + values[i + 1:hi[i]]
        if len(neighbours) < 2:
            continue
        med = statistics.median(neighbours)
        ok[i] = abs(v - med) <= max(settings.stability_min_mm, settings.stability_rel * med)
    return ok


def quality_score(fits: list[float], hc_median: float, iqr_mm: float) -> float:
    """0..1: the median fit of the frames used, times their agreement (an IQR of 5 % of the median gives 0)."""
    agreement = max(0.0, 1.0 - iqr_mm / (0.05 * hc_median)) if hc_median > 0 else 0.0
    return float(np.median(fits)) * agreement


@dataclass
class _OpenExam:
    exam_id: str
    started: float  # monotonic capture time of the first sighting
    last_seen: float
    first: Candidate
    wall_offset: float  # time.time() - time.monotonic() when it opened
    absent_since: float | None = None  # the first frame without the target since the last sighting
    last_frame: float = 0.0
    failed: int = 0
    failed_since_seen: int = 0
    records: list[FrameRecord] = field(default_factory=list)
    candidates: list[Candidate] = field(default_factory=list)
    recent: deque = field(default_factory=lambda: deque(maxlen=15))  # the last gated circumferences
    priority: str = "routine"


class ExamTracker:
    """One per live source. `observe` each frame's result; `tick` when no frame came; `flush` at a stop. Each
    returns the exams it closed."""

    def __init__(self, source: str, task: str, settings: ExamSettings = ExamSettings()) -> None:
        self.source = source
        self.task = task
        self.settings = settings
        self.exam: _OpenExam | None = None
        self.closed = 0

    @property
    def open(self) -> bool:
        return self.exam is not None

    def observe(self, frame: Frame, model: ModelRef, head: HeadResult, latency_ms: float,
                budget_ms: float) -> list[ExamSummary]:
        s = self.settings
        t = frame.captured_at
        result = head.result
        seen, status = classify(result, frame.pixels.shape[:2], s)
        closed: list[ExamSummary] = []
        ex = self.exam
        if ex is not None:
            if t - ex.started >= s.max_s:
                closed.append(self._close("max_duration"))
            elif self._gap_passed(ex, t, seen):
                closed.append(self._close("target_absent"))
        if self.exam is None:
            if not seen:
                return closed
            first = Candidate(FrameRecord(frame.study.frame_index, t, status), frame, result, model)
            self.exam = _OpenExam(str(uuid.uuid4()), t, t, first, time.time() - time.monotonic())
        ex = self.exam
        ex.last_frame = max(ex.last_frame, t)
        if seen:
            ex.last_seen, ex.absent_since, ex.failed_since_seen = t, None, 0
        elif ex.absent_since is None:
            ex.absent_since = t
        hc = result.get("measurements", {}).get("head_circumference_mm") if seen else None
        record = FrameRecord(frame.study.frame_index, t, status, hc, result.get("quality"), latency_ms,
                             latency_ms <= budget_ms, model.variant)
        ex.records.append(record)
        if head.priority == "urgent":
            ex.priority = "urgent"
        if status == "gated":
            self._offer(ex, Candidate(record, frame, result, model))
        return closed

    def failed(self, frame: Frame) -> None:
        """A frame that could not be read: counted in the open exam, which it neither extends nor ends."""
        if self.exam is not None:
            self.exam.failed += 1
            self.exam.failed_since_seen += 1
            self.exam.last_frame = max(self.exam.last_frame, frame.captured_at)

    def tick(self, now: float | None = None) -> list[ExamSummary]:
        """No frame came: close the open exam once the feed has been silent for the gap."""
        ex = self.exam
        now = time.monotonic() if now is None else now
        if ex is not None and now - max(ex.last_frame, ex.last_seen) >= self.settings.gap_s:
            return [self._close("feed_silent")]
        return []

    def flush(self, reason: str = "stop") -> list[ExamSummary]:
        return [self._close(reason)] if self.exam is not None else []

    # ------------------------------------------------------------ internals
    def _gap_passed(self, ex: _OpenExam, t: float, seen: bool) -> bool:
        """The target has been absent for the gap: a frame read `gap_s` or more after the last sighting, with
        an absent frame in between or none at all (under load the budget may skip most of a lift: a head after a
        long hole is then a new exam, not a merge of two). Failed frames alone in between end nothing."""
        if t - ex.last_seen < self.settings.gap_s:
            return False
        return ex.absent_since is not None or ex.failed_since_seen == 0

    def _offer(self, ex: _OpenExam, cand: Candidate) -> None:
        """Keep the few gated frames nearest the recent median as key-frame candidates (bounded memory)."""
        ex.recent.append(cand.record.hc_mm)
        if len(ex.candidates) < self.settings.candidates:
            ex.candidates.append(cand)
            return
        ref = statistics.median(ex.recent)
        worst = max(range(len(ex.candidates)), key=lambda i: abs(ex.candidates[i].record.hc_mm - ref))
        if abs(cand.record.hc_mm - ref) < abs(ex.candidates[worst].record.hc_mm - ref):
            ex.candidates[worst] = cand

    def _close(self, reason: str) -> ExamSummary:
        ex, s = self.exam, self.settings
        assert ex is not None
        self.exam = None
        self.closed += 1
        # The absent frames after the last sighting only told us the exam was over: they are not part of it.
        ex.records = [r for r in ex.records if r.captured_at <= ex.last_seen]
        gated = [r for r in ex.records if r.status == "gated"]
        if gated:
            stable = stable_mask(np.array([r.captured_at for r in gated]), np.array([r.hc_mm for r in gated]), s)
            for r, ok in zip(gated, stable):
                r.status = "used" if ok else "unstable"
        used = [r for r in ex.records if r.status == "used"]
        rejected = {k: 0 for k in REJECTIONS}
        for r in ex.records:
            if r.status in rejected:
                rejected[r.status] += 1
        result, key = self._result(ex, used, rejected)
        latencies = np.array([r.latency_ms for r in ex.records]) if ex.records else np.zeros(1)
        variants: dict[str, int] = {}
        for r in ex.records:
            variants[r.variant] = variants.get(r.variant, 0) + 1
        return ExamSummary(
            exam_id=ex.exam_id, source=self.source, task=self.task,
            started_at=ex.started + ex.wall_offset, ended_at=ex.last_seen + ex.wall_offset, end_reason=reason,
            frames_seen=len(ex.records) + ex.failed, frames_used=len(used), frames_failed=ex.failed,
            rejected=rejected, result=result, priority=ex.priority, key=key, first=ex.first, variants=variants,
            latency_ms={"p50": round(float(np.percentile(latencies, 50)), 2),
                        "p99": round(float(np.percentile(latencies, 99)), 2)},
            budget_misses=sum(1 for r in ex.records if not r.budget_met), wall_offset=ex.wall_offset)

    def _result(self, ex: _OpenExam, used: list[FrameRecord],
                rejected: dict[str, int]) -> tuple[dict[str, Any], Candidate | None]:
        s = self.settings
        if len(used) < s.min_frames:
            why = ", ".join(f"{k} {v}" for k, v in rejected.items() if v) or "none"
            reason = (f"{len(used)} usable frame(s) of {len(ex.records) + ex.failed} seen, at least {s.min_frames} "
                      f"needed (not used: {why}" + (f"; {ex.failed} failed" if ex.failed else "") + ")")
            return {"assessed": False, "reason": reason, "measurements": {}}, None
        hcs = np.array([r.hc_mm for r in used])
        median = float(np.median(hcs))
        q1, q3 = (float(v) for v in np.percentile(hcs, [25, 75]))
        quality = quality_score([r.fit for r in used], median, q3 - q1)
        measurements: dict[str, Any] = {"head_circumference_mm": round(median, 1),
                                        "head_circumference_iqr_mm": round(q3 - q1, 2)}
        ga = hadlock_ga_weeks(median)
        measurements["gestational_age_weeks"] = None if ga is None else round(ga, 1)
        usable = [c for c in ex.candidates if c.record.status == "used"] or ex.candidates
        key = min(usable, key=lambda c: (abs(c.record.hc_mm - median), -(c.record.fit or 0.0)))
        result: dict[str, Any] = {
            "assessed": True, "detected": True, "measurements": measurements, "quality": round(quality, 3),
            "needs_review": len(used) < s.review_frames or quality < s.review_quality,
            "ellipse": key.result.get("ellipse"), "contour": key.result.get("contour"),
        }
        if ga is None:
            result["note"] = "head circumference outside Hadlock's 14-42 week range: no gestational age"
        return result, key


def utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def exam_finding(summary: ExamSummary, identity: DeviceIdentity, budget_ms: float,
                 thumbnail: bool = True) -> dict[str, Any]:
    """The exam as a Finding: the key frame's study block, model and latency (the frame the answer was measured
    on), the aggregated result, and the `exam` object (docs: README, "Exams")."""
    shown = summary.key or summary.first
    head = HeadResult(summary.task, summary.result, summary.priority)
    latency = shown.record.latency_ms
    finding = build_finding(identity=identity, seq=0, frame=shown.frame, model=shown.model, head=head,
                            capture_to_result_ms=latency, budget_ms=budget_ms)
    exam: dict[str, Any] = {
        "exam_id": summary.exam_id, "started_at": utc(summary.started_at), "ended_at": utc(summary.ended_at),
        "duration_s": round(max(0.0, summary.ended_at - summary.started_at), 2), "end_reason": summary.end_reason,
        "frames_seen": summary.frames_seen, "frames_used": summary.frames_used,
        "frames_failed": summary.frames_failed, "frames_rejected": {k: v for k, v in summary.rejected.items() if v},
        "variants": summary.variants, "latency_ms": summary.latency_ms, "budget_misses": summary.budget_misses,
    }
    if summary.key is not None:
        key = summary.key
        exam["key_frame"] = {"frame_index": key.record.index,
                             "captured_at": utc(key.record.captured_at + summary.wall_offset),
                             "head_circumference_mm": key.record.hc_mm, "fit_quality": key.record.fit}
        if thumbnail:
            thumb = key_frame_jpeg(key.frame.pixels, key.result.get("ellipse"), contour=key.result.get("contour"))
            exam["key_frame"]["thumbnail"] = thumb.as_json()
    finding["exam"] = exam
    explanation = key_frame_explanation(summary)
    if explanation is not None:
        finding["explanation"] = explanation
    return finding


def key_frame_explanation(summary: ExamSummary) -> dict[str, Any] | None:
    """The segmentation explanation (mask and fitted ellipse on the key frame), for an exam that is flagged
    (urgent or needs_review) the way a frame's finding would be; routine exams carry only the thumbnail."""
    key = summary.key
    flagged = summary.priority == "urgent" or summary.result.get("needs_review") is True
    if key is None or not summary.assessed or not flagged or not key.result.get("ellipse"):
        return None
    try:
        return segmentation_explanation(key.frame.pixels, key.result["ellipse"])
    except ExplanationUnavailable as exc:
        log.info("exam %s: explanation left out: %s", summary.exam_id, exc)
    except Exception as exc:  # a bug in drawing must not cost the exam its finding
        log.warning("exam %s: explanation left out: internal error %s: %s", summary.exam_id, type(exc).__name__, exc)
    return None


def describe(summary: ExamSummary) -> str:
    """One log line's worth: what the exam measured, or why it could not."""
    head = (f"exam {summary.exam_id[:8]} {summary.ended_at - summary.started_at:.1f} s, {summary.frames_seen} frames "
            f"({summary.frames_used} used), ended: {summary.end_reason.replace('_', ' ')}")
    r = summary.result
    if not summary.assessed:
        return f"{head}: not assessed: {r.get('reason')}"
    m = r["measurements"]
    ga = m.get("gestational_age_weeks")
    return (f"{head}: HC {m['head_circumference_mm']:.1f} mm (IQR {m['head_circumference_iqr_mm']:.1f} mm)"
            + (f", GA {ga:.1f} weeks" if ga is not None else "") + f", quality {r['quality']:.2f}"
            + (", needs review" if r.get("needs_review") else ""))
