"""A clinician's verdict on a finding, checked before anything is stored: confirm it, or correct its label or its
measurement. The record is what `.../feedback` carries to the hub (edge_hub.messages reads `feedback_id`,
`finding_id`, `verdict`, `created_at`), with a summary of the finding it is about, so that a site can check and
later recalibrate a model on its own patients without joining tables.
"""
from __future__ import annotations

import math
import uuid
from datetime import datetime, timezone
from typing import Any, Callable, Iterable

from edge_runtime.findings import DeviceIdentity

VERDICTS = ("confirm", "correct")
KEYS = ("verdict", "label", "value_mm", "note", "feedback_id")
NOTE_MAX = 500
VALUE_MM_RANGE = (1.0, 1000.0)  # a head circumference (or any length the models measure) in millimetres
MAX_BODY_BYTES = 4096
COMPARED = ("finding_id", "verdict", "label", "value_mm", "note")  # what makes a retry "the same feedback"


class FeedbackError(ValueError):
    """A request that cannot become feedback: `status` is the HTTP answer, the message one line."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def finding_summary(finding: dict[str, Any]) -> dict[str, Any]:
    result = finding.get("result", {})
    out = {"model": finding.get("model", {}).get("name"), "version": finding.get("model", {}).get("version"),
           "task": finding.get("task"), "seq": finding.get("seq"), "created_at": finding.get("created_at"),
           "assessed": result.get("assessed", True)}
    if "label" in result:
        out["label"] = result["label"]
    hc = (result.get("measurements") or {}).get("head_circumference_mm")
    if hc is not None:
        out["head_circumference_mm"] = hc
    if "exam" in finding:
        out["exam_id"] = finding["exam"].get("exam_id")
    return out


def _labels(finding: dict[str, Any], labels_for: Callable[[str], Iterable[str]]) -> list[str]:
    probabilities = finding.get("result", {}).get("probabilities") or {}
    return list(probabilities) or list(labels_for(finding.get("model", {}).get("name", "")))


def build_record(body: Any, finding: dict[str, Any], identity: DeviceIdentity,
                 labels_for: Callable[[str], Iterable[str]]) -> dict[str, Any]:
    """The feedback record for `body` (the POSTed JSON) on `finding`, or FeedbackError(400) naming what is wrong."""
    if not isinstance(body, dict):
        raise FeedbackError(400, "the body must be a JSON object")
    unknown = sorted(set(body) - set(KEYS))
    if unknown:
        raise FeedbackError(400, f"unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(KEYS)}")
    verdict = body.get("verdict")
    if verdict not in VERDICTS:
        raise FeedbackError(400, f"'verdict' must be one of {', '.join(VERDICTS)}; got {verdict!r}")
    label, value, note = body.get("label"), body.get("value_mm"), body.get("note")
    if verdict == "confirm" and (label is not None or value is not None):
        raise FeedbackError(400, "a 'confirm' takes no 'label' or 'value_mm' (send 'correct' to change them)")
    if verdict == "correct":
        if label is None and value is None:
            raise FeedbackError(400, "a 'correct' needs the right 'label' or 'value_mm'")
        if label is not None:
            allowed = _labels(finding, labels_for)
            if finding.get("task") != "classification" or not allowed:
                raise FeedbackError(400, f"'label' is for classification findings; this one is {finding.get('task')!r}")
            if label not in allowed:
                raise FeedbackError(400, f"'label' must be one of {', '.join(allowed)}; got {label!r}")
        if value is not None:
            if finding.get("task") != "segmentation":
                raise FeedbackError(400, f"'value_mm' is for measurement findings; this one is {finding.get('task')!r}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not VALUE_MM_RANGE[0] <= value <= VALUE_MM_RANGE[1]:
                raise FeedbackError(400, f"'value_mm' must be a number of millimetres from {VALUE_MM_RANGE[0]:g} to "
                                         f"{VALUE_MM_RANGE[1]:g}; got {value!r}")
            value = float(value)
    if note is not None and (not isinstance(note, str) or len(note) > NOTE_MAX or "\x00" in note
                             or not _utf8(note)):
        raise FeedbackError(400, f"'note' must be text (UTF-8) of at most {NOTE_MAX} characters")
    feedback_id = body.get("feedback_id")
    if feedback_id is None:
        feedback_id = str(uuid.uuid4())
    else:
        try:
            if not isinstance(feedback_id, str):
                raise ValueError
            feedback_id = str(uuid.UUID(feedback_id))
        except ValueError:
            raise FeedbackError(400, f"'feedback_id' must be a UUID string; got {str(feedback_id)[:60]!r}") from None
    record = {"feedback_id": feedback_id, "finding_id": finding["finding_id"], "device_id": identity.device_id,
              "site": identity.site, "created_at": _utc_now(), "verdict": verdict}
    for key, v in (("label", label), ("value_mm", value), ("note", note or None)):
        if v is not None:
            record[key] = v
    record["finding"] = finding_summary(finding)
    return record


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")  # a lone surrogate (JSON "\ud800") is not
        return True
    except UnicodeEncodeError:
        return False


def same_feedback(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a.get(k) == b.get(k) for k in COMPARED)
