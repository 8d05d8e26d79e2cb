"""FP32 vs INT8 on labelled data through the runtime path, and latency of every variant in one run.

Accuracy: each file is read like on the device (``open_input(...).frame(0, windowing)`` -> ``prepare``) once,
and the same tensor goes through every candidate (variant x engine), so the only difference between two
candidates is the model and the engine. Classification: the manifest's activation, AUC, and accuracy /
sensitivity / specificity at the manifest threshold. Segmentation (fetal-head): sigmoid -> ``segment_ellipse``
at the display resolution with the pixel size of the file (HC18: labels.csv), Dice of the fitted ellipse
against the ground-truth ellipse and the mean absolute head-circumference difference (HC MAD, mm), exactly as
the model card's validation numbers were measured.

Decoding: each file is also read the way the runtime reads it with ``imaging.reduced_decode`` on (decoded no larger
than twice the model input, imaging.resolution); where that gives another tensor, every candidate runs on it too,
and the metrics of that path are reported beside the full-decode ones (``val_auc_reduced_decode``, ...).

Latency: all candidates are loaded in this process with the same thread count; after warm-up they run
interleaved (one run of each per round, the order rotating every round) on a real input, so background load
and CPU frequency changes hit every candidate alike. p50 and p90 are per candidate. ONNX Runtime runs as the
runtime does (spin-wait off); OpenVINO with an explicit INFERENCE_PRECISION_HINT (f32 by default: the CPU
default on AMX machines is bf16), and each result records the precision the engine reported.

Latency is measured twice: back to back (a tight loop, the engine's best case) and paced, each call after an idle
gap (``paced_gap_ms``), the way the `infer` CLI and the study worker call a model: one study at a time, the engine's
threads asleep in between. A variant can win the tight loop and lose paced (cxr-pneumonia INT8 on ONNX Runtime was
measured 1.21 ms against FP32's 0.97 ms over 624 images one at a time): the guards look at both.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.engines import EngineOptions, load_engine
from edge_runtime.heads.classification import activate
from edge_runtime.heads.geometry import dice, ellipse_mask, segment_ellipse
from edge_runtime.imaging.inputs import open_input
from edge_runtime.imaging.preprocess import ResizeGeometry, decode_hint, prepare
from edge_runtime.registry import ModelManifest
from quantize.calibration import Sample
from quantize.datasets import hc18_mask
from quantize.metrics import roc_auc, sensitivity_specificity


@dataclass(frozen=True)
class Candidate:
    """One model file on one engine."""

    variant: str  # "fp32", "int8-qdq", "int8-ov", ...
    path: Path
    engine: str  # "onnxruntime" | "openvino"
    precision: str = "int8"  # "fp32" | "int8"
    hint: str = "f32"  # OpenVINO INFERENCE_PRECISION_HINT

    @property
    def key(self) -> str:
        return f"{self.variant}/{self.engine}"


@dataclass
class Result:
    candidate: Candidate
    metrics: dict[str, float] = field(default_factory=dict)
    p50_ms: float = math.nan
    p90_ms: float = math.nan
    compute_precision: str = ""  # what the engine reported (ORT: "graph"; OpenVINO: the hint it applied)
    load_ms: float = math.nan
    # p50 / FP32 p50 on the same engine and its 95 % CI (bootstrap over the paired interleaved rounds)
    p50_ratio: float = math.nan
    p50_ratio_ci95: tuple[float, float] = (math.nan, math.nan)
    # the same, each call after an idle gap (Report.paced_gap_ms), as one-study-at-a-time use calls the model
    paced_p50_ms: float = math.nan
    paced_p90_ms: float = math.nan
    paced_p50_ratio: float = math.nan
    paced_p50_ratio_ci95: tuple[float, float] = (math.nan, math.nan)


@dataclass
class Report:
    model: str
    task: str
    data: str
    n_items: int
    threads: int
    runs: int
    results: dict[str, Result]
    seconds: float = 0.0
    paced_runs: int = 0
    paced_gap_ms: float = 0.0

    def fp32(self, engine: str) -> Result | None:
        for r in self.results.values():
            if r.candidate.precision == "fp32" and r.candidate.engine == engine:
                return r
        return None

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "results"}
        out["results"] = {
            key: {
                "variant": r.candidate.variant,
                "engine": r.candidate.engine,
                "file": r.candidate.path.name,
                "precision": r.candidate.precision,
                "precision_hint": r.candidate.hint if r.candidate.engine == "openvino" else None,
                "compute_precision": r.compute_precision,
                "p50_ms": r.p50_ms,
                "p90_ms": r.p90_ms,
                "load_ms": r.load_ms,
                "p50_ratio_vs_fp32": r.p50_ratio,
                "p50_ratio_vs_fp32_ci95": list(r.p50_ratio_ci95),
                "paced_p50_ms": r.paced_p50_ms,
                "paced_p90_ms": r.paced_p90_ms,
                "paced_p50_ratio_vs_fp32": r.paced_p50_ratio,
                "paced_p50_ratio_vs_fp32_ci95": list(r.paced_p50_ratio_ci95),
                **r.metrics,
            }
            for key, r in self.results.items()
        }
        return out


def compute_precision_label(candidate: Candidate, reported: str) -> str:
    """Human-readable compute precision: int8 variants run int8 in quantized layers, the rest at the hint."""
    if candidate.engine == "openvino":
        base = reported or candidate.hint
        return f"int8 + {base}" if candidate.precision == "int8" else base
    return "int8 (QDQ) + fp32" if candidate.precision == "int8" else "fp32"


# ----------------------------------------------------------------------------------------------- engines
def load_candidates(candidates: list[Candidate], shape: tuple[int, ...], threads: int = 2) -> dict[str, Any]:
    engines = {}
    for c in candidates:
        opts = EngineOptions(devices=("CPU",), threads=threads, precision_hint=c.hint, warmup_runs=2, allow_spinning=False)
        engines[c.key] = load_engine(c.engine, c.path, shape, opts)
    return engines


def measure_latency(
    run_fns: dict[str, Callable[[np.ndarray], Any]], x: np.ndarray, runs: int = 200, warmup: int = 20
) -> dict[str, np.ndarray]:
    """{key: per-round times in ms}, the candidates interleaved round by round, order rotating each round."""
    keys = list(run_fns)
    for _ in range(warmup):
        for k in keys:
            run_fns[k](x)
    times: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(runs):
        order = keys[r % len(keys):] + keys[: r % len(keys)]
        if (r // len(keys)) % 2:
            order.reverse()
        for k in order:
            t0 = time.perf_counter()
            run_fns[k](x)
            times[k].append((time.perf_counter() - t0) * 1000.0)
    return {k: np.asarray(v) for k, v in times.items()}


def measure_latency_paced(
    run_fns: dict[str, Callable[[np.ndarray], Any]], x: np.ndarray, runs: int = 60, gap_ms: float = 30.0
) -> dict[str, np.ndarray]:
    """{key: per-call ms}, each call after `gap_ms` of idle sleep: the engine's worker threads park between calls,
    caches go cold, and the next call pays the wake-up, as in one-study-at-a-time use. Interleaved and rotated like
    measure_latency, so load hits every candidate alike."""
    keys = list(run_fns)
    for k in keys:  # one call each so the first paced round is not a first call
        run_fns[k](x)
    times: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(runs):
        order = keys[r % len(keys):] + keys[: r % len(keys)]
        for k in order:
            time.sleep(gap_ms / 1000.0)
            t0 = time.perf_counter()
            run_fns[k](x)
            times[k].append((time.perf_counter() - t0) * 1000.0)
    return {k: np.asarray(v) for k, v in times.items()}


def p50_ratio_ci(t: np.ndarray, t_ref: np.ndarray, n_resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """median(t) / median(t_ref) and its 95 % percentile-bootstrap CI, resampling paired rounds."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(t), (n_resamples, len(t)))
    ratios = np.median(t[idx], axis=1) / np.median(t_ref[idx], axis=1)
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    return float(np.median(t) / np.median(t_ref)), float(lo), float(hi)


# ----------------------------------------------------------------------------------------------- accuracy
def _classification_metrics(y: np.ndarray, p: np.ndarray, threshold: float, p_ref: np.ndarray | None) -> dict[str, float]:
    sens, spec = sensitivity_specificity(y, p, threshold)
    out = {
        "val_auc": roc_auc(y, p),
        "val_accuracy": float(((p >= threshold) == (y == 1)).mean()),
        "val_sensitivity": sens,
        "val_specificity": spec,
        "n": int(len(y)),
    }
    if p_ref is not None:
        out["decision_changes_vs_fp32"] = int(((p >= threshold) != (p_ref >= threshold)).sum())
        out["max_abs_prob_diff_vs_fp32"] = float(np.max(np.abs(p - p_ref))) if len(p) else 0.0
    return out


def _segmentation_metrics(hc_true: np.ndarray, hc: np.ndarray, dices: np.ndarray, hc_ref: np.ndarray | None) -> dict[str, float]:
    found = ~np.isnan(hc)
    err = np.abs(hc - hc_true)
    out = {
        "val_hc_mad_mm": float(np.nanmean(err)) if found.any() else math.inf,
        "val_hc_median_abs_err_mm": float(np.nanmedian(err)) if found.any() else math.inf,
        "val_dice": float(dices.mean()),
        "val_no_head_fraction": float(1 - found.mean()),
        "n": int(len(hc)),
    }
    if hc_ref is not None:
        both = found & ~np.isnan(hc_ref)
        d = np.abs(hc[both] - hc_ref[both])
        out["hc_mean_abs_diff_vs_fp32_mm"] = float(d.mean()) if len(d) else math.nan
        out["hc_max_abs_diff_vs_fp32_mm"] = float(d.max()) if len(d) else math.nan
    return out


def evaluate(
    manifest: ModelManifest,
    candidates: list[Candidate],
    samples: list[Sample],
    threads: int = 2,
    runs: int = 200,
    warmup: int = 20,
    data_label: str = "",
    progress: Callable[[str], None] | None = None,
    run_override: dict[str, Callable[[np.ndarray], Any]] | None = None,
    paced_runs: int = 60,
    paced_gap_ms: float = 30.0,
    reduced_decode: bool = True,
) -> Report:
    """Accuracy of every candidate on the samples (full decode, and reduced decode where it differs), then
    interleaved latency, back to back and paced (`paced_runs` = 0: not paced). `run_override` replaces a
    candidate's run function (tests use it to craft a variant)."""
    t_start = time.perf_counter()
    if not samples:
        raise ValueError("no evaluation samples")
    engines = load_candidates(candidates, manifest.input.shape, threads)
    run_fns: dict[str, Callable[[np.ndarray], Any]] = {k: e.run for k, e in engines.items()}
    run_fns.update(run_override or {})
    keys = [c.key for c in candidates]
    task = manifest.task
    outputs: dict[str, list[float]] = {k: [] for k in keys}
    dices: dict[str, list[float]] = {k: [] for k in keys}
    # the same under reduced decoding (imaging.resolution): a file it does not shrink repeats its full-decode value
    outputs_r: dict[str, list[float]] = {k: [] for k in keys}
    dices_r: dict[str, list[float]] = {k: [] for k in keys}
    n_reduced = 0
    hint = decode_hint(manifest.preprocess) if reduced_decode else None
    labels, hc_true = [], []
    first_x = None
    if task == "classification":
        assert manifest.decision is not None
        pos = manifest.output.labels.index(manifest.decision.positive_label)
        if any(s.label is None for s in samples):
            raise ValueError("classification evaluation needs labelled files (a --dataset, or label sub-folders)")
    else:
        assert manifest.segmentation is not None
        seg = manifest.segmentation
        if any(s.annotation is None or s.hc_mm is None for s in samples):
            raise ValueError("segmentation evaluation needs HC18-style labels (--dataset hc18)")
    for i, s in enumerate(samples):
        inp = open_input(s.path)
        img = inp.frame(0, manifest.windowing)
        x, geometry = prepare(img, manifest.preprocess)
        reduced = None
        if hint is not None:
            small, info = open_input(s.path, hint=hint).decoded(0, manifest.windowing)
            if info.reduced:
                xr, g_small = prepare(small, manifest.preprocess)
                f = float(info.factor)  # geometry in the full image's pixels, as pipeline.full_image_geometry
                reduced = xr, ResizeGeometry(g_small.scale_x / f, g_small.scale_y / f, g_small.pad_x, g_small.pad_y)
                n_reduced += 1
        if first_x is None:
            first_x = x
        if task == "classification":
            labels.append(int(s.label))
            for k in keys:
                outputs[k].append(float(activate(run_fns[k](x), manifest.output.activation)[pos]))
                outputs_r[k].append(float(activate(run_fns[k](reduced[0]), manifest.output.activation)[pos])
                                    if reduced else outputs[k][-1])
        else:
            spacing = (s.pixel_size_mm, s.pixel_size_mm) if s.pixel_size_mm else inp.pixel_spacing_mm
            gt = hc18_mask(s.annotation)
            hc_true.append(float(s.hc_mm))
            h, w = img.shape[:2]
            for k in keys:
                for xx, gg, outs, ds in ((x, geometry, outputs, dices),) + (((*reduced, outputs_r, dices_r),)
                                                                            if reduced else ()):
                    logits = np.asarray(run_fns[k](xx), dtype=np.float64)
                    logits = logits.reshape(logits.shape[-2:])
                    prob = (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
                    e, comp = segment_ellipse(prob, gg, (h, w), spacing, seg.threshold)
                    if e is None or comp.sum() < seg.min_area_fraction * h * w:
                        outs[k].append(math.nan)
                        ds[k].append(0.0)
                    else:
                        outs[k].append(float(e.circumference_mm))
                        ds[k].append(dice(ellipse_mask((h, w), e.center_px, e.axes_px, e.angle_deg), gt))
                if not reduced:
                    outputs_r[k].append(outputs[k][-1])
                    dices_r[k].append(dices[k][-1])
        if progress and (i + 1) % 100 == 0:
            progress(f"  evaluated {i + 1}/{len(samples)}")
    ref_key = {c.engine: c.key for c in candidates if c.precision == "fp32"}
    results: dict[str, Result] = {}
    for c in candidates:
        ref = ref_key.get(c.engine)
        ref_out = np.array(outputs[ref]) if ref and ref != c.key else None
        if task == "classification":
            m = _classification_metrics(np.array(labels), np.array(outputs[c.key]), manifest.decision.threshold, ref_out)
        else:
            m = _segmentation_metrics(np.array(hc_true), np.array(outputs[c.key]), np.array(dices[c.key]), ref_out)
        if hint is not None:
            m.update(_reduced_decode_metrics(task, manifest, labels, hc_true, outputs[c.key], outputs_r[c.key],
                                             dices_r[c.key], n_reduced))
        eng = engines[c.key]
        results[c.key] = Result(c, m, compute_precision=compute_precision_label(c, getattr(eng, "precision", "")),
                                load_ms=float(getattr(eng, "load_ms", math.nan)))
    if progress:
        progress(f"  latency: {runs} interleaved rounds x {len(keys)} candidates, {threads} threads")
    lat = measure_latency(run_fns, first_x, runs=runs, warmup=warmup)
    for k, t in lat.items():
        results[k].p50_ms, results[k].p90_ms = float(np.percentile(t, 50)), float(np.percentile(t, 90))
        ref = ref_key.get(results[k].candidate.engine)
        if ref and ref != k:
            ratio, lo, hi = p50_ratio_ci(t, lat[ref])
            results[k].p50_ratio, results[k].p50_ratio_ci95 = ratio, (lo, hi)
    if paced_runs > 0:
        if progress:
            progress(f"  latency, paced: {paced_runs} rounds x {len(keys)} candidates, {paced_gap_ms:g} ms idle before "
                     "each call")
        paced = measure_latency_paced(run_fns, first_x, runs=paced_runs, gap_ms=paced_gap_ms)
        for k, t in paced.items():
            results[k].paced_p50_ms, results[k].paced_p90_ms = float(np.percentile(t, 50)), float(np.percentile(t, 90))
            ref = ref_key.get(results[k].candidate.engine)
            if ref and ref != k:
                ratio, lo, hi = p50_ratio_ci(t, paced[ref])
                results[k].paced_p50_ratio, results[k].paced_p50_ratio_ci95 = ratio, (lo, hi)
    for e in engines.values():
        e.close()
    return Report(manifest.name, task, data_label, len(samples), threads, runs, results, time.perf_counter() - t_start,
                  paced_runs=paced_runs, paced_gap_ms=paced_gap_ms if paced_runs > 0 else 0.0)


def _reduced_decode_metrics(task: str, manifest: ModelManifest, labels: list[int], hc_true: list[float],
                            full: list[float], reduced: list[float], dices_r: list[float], n_reduced: int
                            ) -> dict[str, float]:
    """The candidate's metrics when files are decoded reduced, and how far its outputs moved from the full decode."""
    f, r = np.array(full), np.array(reduced)
    out: dict[str, float] = {"n_reduced_decode": n_reduced}
    if task == "classification":
        m = _classification_metrics(np.array(labels), r, manifest.decision.threshold, None)
        out.update(val_auc_reduced_decode=m["val_auc"], val_sensitivity_reduced_decode=m["val_sensitivity"],
                   val_specificity_reduced_decode=m["val_specificity"],
                   max_abs_prob_diff_reduced_vs_full=float(np.max(np.abs(r - f))) if len(f) else 0.0)
    else:
        m = _segmentation_metrics(np.array(hc_true), r, np.array(dices_r), None)
        both = ~np.isnan(f) & ~np.isnan(r)
        out.update(val_hc_mad_mm_reduced_decode=m["val_hc_mad_mm"], val_dice_reduced_decode=m["val_dice"],
                   hc_max_abs_diff_reduced_vs_full_mm=float(np.abs(r[both] - f[both]).max()) if both.any() else 0.0)
    return out


def format_report(report: Report) -> str:
    """A plain-text table: one line per candidate."""
    if report.task == "classification":
        cols = [("AUC", "val_auc", "{:.4f}"), ("acc", "val_accuracy", "{:.4f}"), ("sens", "val_sensitivity", "{:.4f}"),
                ("spec", "val_specificity", "{:.4f}"), ("flips", "decision_changes_vs_fp32", "{:d}")]
    else:
        cols = [("HC MAD mm", "val_hc_mad_mm", "{:.3f}"), ("Dice", "val_dice", "{:.4f}"),
                ("no-head", "val_no_head_fraction", "{:.3f}"), ("|dHC| vs fp32", "hc_mean_abs_diff_vs_fp32_mm", "{:.3f}")]
    if report.task == "classification":
        cols.append(("AUC reduced", "val_auc_reduced_decode", "{:.4f}"))
    else:
        cols.append(("MAD reduced", "val_hc_mad_mm_reduced_decode", "{:.3f}"))
    head = f"{'candidate':<24} {'precision':<18} " + " ".join(f"{c[0]:>13}" for c in cols) + f" {'p50 ms':>8} {'p90 ms':>8}"
    head += f" {'paced p50':>9}"
    lines = [f"{report.model}: {report.n_items} items ({report.data}); latency {report.runs} interleaved runs, "
             f"{report.threads} threads", head]
    for key, r in report.results.items():
        vals = []
        for _, k, fmt in cols:
            v = r.metrics.get(k)
            vals.append(f"{(fmt.format(v) if v is not None and v == v else '-'):>13}")
        lines.append(f"{key:<24} {r.compute_precision:<18} " + " ".join(vals) + f" {r.p50_ms:8.3f} {r.p90_ms:8.3f}"
                     f" {r.paced_p50_ms:9.3f}")
    return "\n".join(lines)
