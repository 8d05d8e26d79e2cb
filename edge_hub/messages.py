"""What arrives on the hub's subscriptions, classified and checked before any store sees it.

The kind comes from the topic's last level (`findings`, `feedback`, `status`); the site and device from the two
levels before it (the ones the broker's ACL ties to the device), falling back to the payload for a topic of
another shape. A message that is not what its topic says becomes a `Rejected` with a reason: it is kept in the
rejected table and acknowledged, never retried for ever.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Union

INT64_MAX = 2**63 - 1
ID_MAX = 200  # a UUID is 36; anything this long is not an id
VERDICTS = ("confirm", "correct")


@dataclass(frozen=True)
class FindingRow:
    finding_id: str
    device_id: str | None
    site: str | None
    seq: int | None
    priority: str | None
    created_at: str | None
    topic: str
    text: str          # the payload as received (JSON)
    received_at: float  # when this collector got it (epoch s)


@dataclass(frozen=True)
class FeedbackRow:
    feedback_id: str
    finding_id: str
    verdict: str
    device_id: str | None
    site: str | None
    created_at: str | None
    topic: str
    text: str
    received_at: float


@dataclass(frozen=True)
class StatusRow:
    device_id: str
    site: str
    status: str        # "online" / "offline" as the uplink publishes it, or whatever text a device sent
    retained: bool
    topic: str
    received_at: float


@dataclass(frozen=True)
class Rejected:
    topic: str
    payload: bytes
    reason: str
    received_at: float


Row = Union[FindingRow, FeedbackRow, StatusRow, Rejected]


def topic_kind(topic: str) -> str:
    """'findings' | 'feedback' | 'status'; any other topic is treated as findings (what `collect` always did)."""
    last = topic.rsplit("/", 1)[-1]
    return last if last in ("feedback", "status") else "findings"


def topic_identity(topic: str) -> tuple[str | None, str | None]:
    """(site, device_id) from .../<site>/<device_id>/<kind>, or (None, None) for a shorter topic."""
    parts = topic.split("/")
    if len(parts) >= 3 and parts[-2] and parts[-3]:
        return parts[-3], parts[-2]
    return None, None


def _text_field(obj: dict, key: str, required: bool = False) -> str | None:
    value = obj.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value or len(value) > ID_MAX or "\x00" in value:
        raise ValueError(f"'{key}' must be a non-empty string of at most {ID_MAX} characters")
    return value


def _json_object(payload: bytes) -> tuple[dict, str]:
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("not UTF-8") from None
    if "\x00" in text or "\\u0000" in text:
        raise ValueError("contains a NUL character")  # PostgreSQL text and jsonb cannot hold one
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    return obj, text


def parse(topic: str, payload: bytes, received_at: float, retained: bool = False) -> Row:
    """One message -> the row a store writes, or a Rejected naming why."""
    kind = topic_kind(topic)
    try:
        if kind == "status":
            return _status(topic, payload, received_at, retained)
        obj, text = _json_object(payload)
        return (_feedback if kind == "feedback" else _finding)(topic, obj, text, received_at)
    except ValueError as exc:
        what = {"findings": "a finding", "feedback": "feedback", "status": "a device status"}[kind]
        return Rejected(topic, payload, f"not {what}: {exc}", received_at)


def _identity(topic: str, obj: dict[str, Any]) -> tuple[str | None, str | None]:
    site, device = topic_identity(topic)
    return (site or _text_field(obj, "site")), (device or _text_field(obj, "device_id"))


def _finding(topic: str, obj: dict, text: str, received_at: float) -> FindingRow:
    finding_id = _text_field(obj, "finding_id", required=True)
    seq = obj.get("seq")
    if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq <= INT64_MAX):
        raise ValueError("'seq' must be a non-negative integer")
    priority = obj.get("priority")
    if priority is not None and not isinstance(priority, str):
        raise ValueError("'priority' must be a string")
    created = obj.get("created_at")
    if created is not None and not isinstance(created, str):
        raise ValueError("'created_at' must be a string")
    site, device = _identity(topic, obj)
    return FindingRow(finding_id, device, site, seq, priority, created, topic, text, received_at)


def _feedback(topic: str, obj: dict, text: str, received_at: float) -> FeedbackRow:
    feedback_id = _text_field(obj, "feedback_id", required=True)
    finding_id = _text_field(obj, "finding_id", required=True)
    verdict = obj.get("verdict")
    if verdict not in VERDICTS:
        raise ValueError(f"'verdict' must be one of {', '.join(VERDICTS)}; got {verdict!r}")
    created = obj.get("created_at")
    if created is not None and not isinstance(created, str):
        raise ValueError("'created_at' must be a string")
    site, device = _identity(topic, obj)
    return FeedbackRow(feedback_id, finding_id, verdict, device, site, created, topic, text, received_at)


def _status(topic: str, payload: bytes, received_at: float, retained: bool) -> StatusRow:
    site, device = topic_identity(topic)
    if not site or not device:
        raise ValueError("the topic does not name a site and a device")
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ValueError("not UTF-8") from None
    if not text or len(text) > 4096 or "\x00" in text:
        raise ValueError("empty, longer than 4096 characters, or has a NUL character")
    return StatusRow(device, site, text, retained, topic, received_at)
