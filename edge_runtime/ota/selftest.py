"""Self-test vectors: made at pack time, checked on the device before a version is activated.

The vectors are fixed inputs (already preprocessed tensors of the manifest's input shape: dark and bright flats,
a gradient and seeded noise, each in the model's normalised range) and, for every variant, every output the
variant gives on them on its reference engine (ONNX Runtime for .onnx files, OpenVINO for IR), computed in f32
on the CPU. On the device, each (engine, precision) the daemon will run is loaded with the daemon's own engine
options (its devices, threads, OpenVINO precision hint) and must reproduce them within the manifest's
tolerance for that precision: |got - expected| <= atol + rtol * |expected|, element by element. That catches
a model file that does not match its vectors, an engine or device that computes the model differently, and a
variant that cannot load, before anything switches to it.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from edge_runtime.engines import EngineOptions, load_engine
from edge_runtime.errors import EdgeError
from edge_runtime.registry import ModelManifest, verify_variant

# INT8 moves logits (OpenVINO running ORT's QDQ graph: up to 0.12 logit on cxr-pneumonia, see its card), FP32
# engines agree to ~1e-5 in f32 (a bf16 device: ~1e-3).
DEFAULT_TOLERANCES = {"fp32": (2e-3, 1e-3), "fp16": (2e-2, 1e-2), "int8": (0.3, 0.05)}
VECTORS = 4
SEED = 20261203


class SelfTestError(EdgeError):
    """A version that failed its self-test: the message names the variant, engine, vector and error."""


@dataclass(frozen=True)
class SelfTestResult:
    checked: list[str]  # "fp32 on onnxruntime (CPU): 3 vectors, max error 1.2e-06"

    def summary(self) -> str:
        return "; ".join(self.checked)


def make_inputs(manifest: ModelManifest, count: int = VECTORS, seed: int = SEED) -> list[np.ndarray]:
    """Pixel-range images in [0, 1] normalised as the runtime's preprocessing does (mean/std per channel)."""
    n, c, h, w = manifest.input.shape
    rng = np.random.default_rng(seed)
    # dark and bright flats, a gradient, then noise: outputs across the model's range, not all near one point
    images = [np.full((h, w), 0.2, np.float32), np.full((h, w), 0.8, np.float32),
              np.tile(np.linspace(0, 1, w, dtype=np.float32), (h, 1))]
    while len(images) < count:
        images.append(rng.random((h, w), dtype=np.float32))
    mean = np.asarray(manifest.preprocess.mean, np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(manifest.preprocess.std, np.float32).reshape(1, -1, 1, 1)
    out = []
    for img in images[:count]:
        x = np.broadcast_to(img, (n, c, h, w)).astype(np.float32)
        out.append(((x - mean) / std).astype(np.float32))
    return out


def reference_engine(variant) -> str:
    return "openvino" if variant.format == "openvino-ir" else "onnxruntime"


def make_vectors(manifest: ModelManifest, count: int = VECTORS) -> bytes:
    """selftest.npz bytes: input_<i> and out_<variant>_<i>_<k> (every output k of every variant)."""
    inputs = make_inputs(manifest, count)
    arrays: dict[str, np.ndarray] = {f"input_{i}": x for i, x in enumerate(inputs)}
    options = EngineOptions(devices=("CPU",), threads=1, precision_hint="f32", warmup_runs=0)
    for variant in manifest.variants:
        verify_variant(manifest, variant)
        kind = reference_engine(variant)
        engine = load_engine(kind, variant.path, manifest.input.shape, options)
        try:
            for i, x in enumerate(inputs):
                for k, y in enumerate(engine.run_all(x)):
                    arrays[f"out_{variant.id}_{i}_{k}"] = np.asarray(y, np.float32)
        finally:
            engine.close()
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def load_vectors(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def tolerance(manifest: ModelManifest, precision: str) -> tuple[float, float]:
    table = manifest.raw.get("selftest", {}).get("tolerance", {}).get(precision)
    if isinstance(table, dict):
        return float(table.get("atol", 0.0)), float(table.get("rtol", 0.0))
    return DEFAULT_TOLERANCES.get(precision, DEFAULT_TOLERANCES["fp32"])


def run_selftest(manifest: ModelManifest, targets: list[tuple[str, str]],
                 options_for: Callable[[str], EngineOptions], halt: Callable[[str], None] | None = None) -> SelfTestResult:
    """Check every (engine kind, precision) in `targets` that the manifest has a variant for; the first target
    (the configured precision) must exist. Raises SelfTestError with the first failure."""
    from edge_runtime.pipeline import Predictor

    st = manifest.raw.get("selftest")
    if not isinstance(st, dict):
        raise SelfTestError(manifest.name, "the manifest has no [selftest] table: no test vectors to check")
    vectors = load_vectors(manifest.folder / st.get("file", "selftest.npz"))
    inputs = [vectors[f"input_{i}"] for i in range(len(vectors)) if f"input_{i}" in vectors]
    if not inputs:
        raise SelfTestError(manifest.name, "the test vectors hold no inputs")
    checked = []
    kind0, precision0 = targets[0]
    # what the daemon will load of this model (its fp32 where the configured precision has no variant)
    targets = [(kind0, p) for p in manifest.precisions_to_load(kind0, precision0)] or list(targets)
    for index, (kind, precision) in enumerate(targets):
        try:
            variant = manifest.variant(kind, precision)
        except EdgeError as exc:
            if index == 0:
                raise SelfTestError(manifest.name, f"self-test: {exc.reason}") from None
            continue  # no such variant: the daemon does not load one either
        label = f"{variant.id} on {kind}"
        try:
            verify_variant(manifest, variant)
            engine = load_engine(kind, variant.path, manifest.input.shape, options_for(kind))
            Predictor(manifest, variant, engine)  # the head and the scope gate must build on it too
        except EdgeError as exc:
            raise SelfTestError(manifest.name, f"self-test: {label} does not load: {exc.reason}") from None
        if halt is not None:
            halt("selftest")
        atol, rtol = tolerance(manifest, precision)
        worst = 0.0
        try:
            for i, x in enumerate(inputs):
                outputs = engine.run_all(x)
                for k, got in enumerate(outputs):
                    key = f"out_{variant.id}_{i}_{k}"
                    if key not in vectors:
                        continue  # an output the vectors do not record (k beyond them)
                    want = vectors[key]
                    got = np.asarray(got, np.float32)
                    if got.shape != want.shape or not np.all(np.isfinite(got)):
                        raise SelfTestError(manifest.name, f"self-test failed: {label} ({engine.device}) output {k} "
                                                           f"on vector {i} has shape {got.shape} or non-finite "
                                                           f"values; expected {want.shape}")
                    err = np.abs(got - want)
                    excess = err - (atol + rtol * np.abs(want))
                    worst = max(worst, float(err.max(initial=0.0)))
                    if np.any(excess > 0):
                        raise SelfTestError(manifest.name, f"self-test failed: {label} ({engine.device}) output {k} "
                                                           f"on vector {i} is off by up to {float(err.max()):.4g} "
                                                           f"(tolerance {atol:g} + {rtol:g}*|expected|)")
                if not any(f"out_{variant.id}_{i}_{k}" in vectors for k in range(len(outputs))):
                    raise SelfTestError(manifest.name, f"self-test: the vectors have no expected outputs for "
                                                       f"variant {variant.id}")
        finally:
            engine.close()
        checked.append(f"{label} ({engine.device}): {len(inputs)} vectors, max error {worst:.2g}")
    return SelfTestResult(checked)
