"""Task heads turn raw model outputs into results. One module per task, selected by the manifest's task."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class HeadResult:
    task: str
    result: dict[str, Any]
    priority: str  # "urgent" | "routine"


def make_head(manifest):
    if manifest.task == "classification":
        from edge_runtime.heads.classification import ClassificationHead

        return ClassificationHead(manifest)
    if manifest.task == "segmentation":
        from edge_runtime.heads.segmentation import SegmentationHead

        return SegmentationHead(manifest)
    raise ValueError(f"no head for task {manifest.task!r}")
