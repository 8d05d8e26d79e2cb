"""Classification head: logits -> probabilities per label -> label at the manifest threshold -> priority."""
from __future__ import annotations

import numpy as np

from edge_runtime.heads import HeadResult
from edge_runtime.registry import ModelManifest


def activate(logits: np.ndarray, activation: str) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    if activation == "softmax":
        e = np.exp(z - z.max())
        return e / e.sum()
    return 1.0 / (1.0 + np.exp(-z))


class ClassificationHead:
    task = "classification"

    def __init__(self, manifest: ModelManifest) -> None:
        self.labels = manifest.output.labels
        self.activation = manifest.output.activation
        self.decision = manifest.decision

    def __call__(self, output: np.ndarray, **_) -> HeadResult:
        p = activate(output, self.activation)
        if p.size != len(self.labels):
            raise ValueError(f"model output has {p.size} values for {len(self.labels)} labels")
        probabilities = {label: round(float(v), 6) for label, v in zip(self.labels, p)}
        d = self.decision
        positive = False
        if d is not None:
            positive = probabilities[d.positive_label] >= d.threshold
        if d is not None and len(self.labels) == 2:
            label = d.positive_label if positive else next(lbl for lbl in self.labels if lbl != d.positive_label)
        else:
            label = self.labels[int(np.argmax(p))]
        result = {"label": label, "probabilities": probabilities}
        if d is not None:
            result["threshold"] = d.threshold
        urgent = bool(d is not None and d.urgent_if_positive and positive)
        return HeadResult(self.task, result, "urgent" if urgent else "routine")
