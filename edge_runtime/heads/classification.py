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


def needs_review(p: np.ndarray, labels: tuple[str, ...], label: str, qhat: float) -> bool:
    """Split-conformal prediction set {labels with p >= 1 - qhat}: anything but exactly {label} (both labels,
    none, or the other one) means the calibrated model cannot vouch for its answer at the chosen coverage."""
    members = [lbl for lbl, v in zip(labels, p) if v >= 1.0 - qhat]
    return members != [label]


class ClassificationHead:
    task = "classification"

    def __init__(self, manifest: ModelManifest) -> None:
        self.labels = manifest.output.labels
        self.activation = manifest.output.activation
        self.decision = manifest.decision

    def __call__(self, output: np.ndarray, **_) -> HeadResult:
        temperature = self.decision.temperature if self.decision is not None else 1.0
        p = activate(np.asarray(output, dtype=np.float64) / temperature, self.activation)
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
        if d is not None and d.conformal_qhat is not None:
            result["needs_review"] = needs_review(p, self.labels, label, d.conformal_qhat)
        urgent = bool(d is not None and d.urgent_if_positive and positive)
        return HeadResult(self.task, result, "urgent" if urgent else "routine")
