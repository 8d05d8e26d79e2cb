"""The Finding: the one record that leaves the device. Schema in DESIGN.md; JSON encoding here."""
from __future__ import annotations

import fcntl
import json
import os
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edge_runtime.frames import Frame
from edge_runtime.heads import HeadResult

PRIORITIES = ("urgent", "routine")
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class DeviceIdentity:
    device_id: str
    site: str


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: str
    variant: str
    sha256: str
    precision: str  # the variant's precision: fp32 | int8
    engine: str
    device: str
    compute_precision: str  # what the device computes in (OpenVINO: f32/bf16; ORT: "graph")


class SequenceCounter:
    """Per-device monotonic sequence numbers kept in a file, safe across processes (flock + fsync)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def next(self) -> int:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            raw = os.read(fd, 32).strip()
            value = int(raw) + 1 if raw else 1
            os.lseek(fd, 0, os.SEEK_SET)
            os.ftruncate(fd, 0)
            os.write(fd, str(value).encode())
            os.fsync(fd)
            return value
        finally:
            os.close(fd)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def build_finding(
    *,
    identity: DeviceIdentity,
    seq: int,
    frame: Frame,
    model: ModelRef,
    head: HeadResult,
    capture_to_result_ms: float,
    budget_ms: float,
    explanation: dict[str, Any] | None = None,
) -> dict[str, Any]:
    t = frame.timings_ms
    latency = {"capture_to_result": round(capture_to_result_ms, 2)}
    for stage in ("decode", "preprocess", "inference", "postprocess", "explain"):
        if stage in t:
            latency[stage] = round(t[stage], 2)
    finding = {
        "schema": SCHEMA_VERSION,
        "finding_id": str(uuid.uuid4()),
        "seq": seq,
        "device_id": identity.device_id,
        "site": identity.site,
        "created_at": utc_now(),
        "source": {"kind": frame.source_kind, "name": frame.source_name},
        "study": {
            "study_id": frame.study.study_id,
            "series_id": frame.study.series_id,
            "instance_id": frame.study.instance_id,
            "modality": frame.study.modality,
            "frame_index": frame.study.frame_index,
        },
        "model": {
            "name": model.name,
            "version": model.version,
            "variant": model.variant,
            "sha256": model.sha256,
            "precision": model.precision,
            "engine": model.engine,
            "device": model.device,
            "compute_precision": model.compute_precision,
        },
        "task": head.task,
        "result": head.result,
        "priority": head.priority,
        "latency_ms": latency,
        "budget_ms": budget_ms,
        "budget_met": capture_to_result_ms <= budget_ms,
        **({"decode": frame.decode.to_dict()} if frame.decode is not None else {}),  # a file's frame: how decoded
    }
    if explanation is not None:  # issue 15: only on findings that need it (edge_runtime.explain), to keep the uplink small
        finding["explanation"] = explanation
    return finding


def to_json(finding: dict[str, Any]) -> str:
    return json.dumps(finding, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
