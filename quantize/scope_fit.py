"""Fit and measure a model's scope gate, calibration and operating point on data its training never saw.

    python -m quantize.scope_fit --model cxr-pneumonia --data ../shared/data --out /tmp/cxr-scope.json
    python -m quantize.scope_fit --model fetal-head --data ../shared/data --out /tmp/fh-scope.json
    (--quick: a few hundred images per set, under a minute; for a smoke test, not for the card)

Everything runs the runtime path (open_input -> frame(0, windowing) -> prepare -> the shipped ONNX graph on
ONNX Runtime), so the statistics are those the daemon will see.

Content gate: the penultimate features (the graph's "features" output, quantize.scope_features) of the
training split give a mean and a Ledoit-Wolf shrinkage covariance; an input's score is its squared
Mahalanobis distance to them. The threshold is the 99th percentile of the validation split's scores, so
>= 99 % of in-scope images pass by construction on that split; the out-of-scope sets measure refusal.
The statistics are written to <model folder>/scope-features.npz (its sha256 goes into the manifest).

Classification (chest) also gets: a temperature fitted (NLL) on one half of the validation split by patient
group, ECE (15 bins) and Brier before/after on the other half; a split-conformal threshold (alpha 0.05) on
the same calibration half; and an operating point chosen so sensitivity >= 0.95 holds under every strong
augmentation of the validation split (photometric and geometric) and across patient-group folds.
Segmentation (fetal head) gets: the ellipse fit quality (IoU of the mask with its fitted ellipse) on
validation, HC error, and the quality floor below which no measurement is reported.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
from pathlib import Path

import cv2
import numpy as np

from edge_runtime.engines import EngineOptions, load_engine
from edge_runtime.imaging.inputs import open_input
from edge_runtime.imaging.preprocess import prepare
from edge_runtime.registry import ModelRegistry
from edge_runtime.scope import FEATURES_FILE, mahalanobis_sq, write_statistics
from quantize.datasets import cxr_items_with_groups, hc18_items

RNG = np.random.default_rng(0)
# A policy, not a fit: an image whose header confirms the scope (CR/DX + CHEST + PA/AP) is refused only when
# its features are twice as far as the in-scope limit (it is assessed and flagged for review in between).
HEADER_CONFIRMED_FACTOR = 2.0
ECE_BINS = 15


# ------------------------------------------------------------------ running the model
class Runner:
    def __init__(self, manifest, variant_id: str = "fp32", engine: str = "onnxruntime") -> None:
        self.manifest = manifest
        variant = next(v for v in manifest.variants if v.id == variant_id)
        self.engine = load_engine(engine, variant.path, manifest.input.shape, EngineOptions(threads=1))

    def pixels(self, path: Path) -> np.ndarray:
        return open_input(path).frame(0, self.manifest.windowing)

    def run(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, object]:
        x, geometry = prepare(pixels, self.manifest.preprocess)
        out, feats = self.engine.run_all(x)[:2]
        return out, feats.reshape(-1).astype(np.float64), geometry


def features_of(runner: Runner, images) -> np.ndarray:
    return np.stack([runner.run(img)[1] for img in images])


# ------------------------------------------------------------------ negatives
def synthetic_images(n_per_kind: int, hw: tuple[int, int]) -> dict[str, list[np.ndarray]]:
    """Images no scanner makes: the content gate must refuse them all."""
    h, w = hw
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    kinds: dict[str, list[np.ndarray]] = {k: [] for k in ("noise", "gradient", "blank", "text", "natural")}
    for i in range(n_per_kind):
        kinds["noise"].append(RNG.integers(0, 256, (h, w), dtype=np.uint8))
        angle = RNG.uniform(0, 2 * math.pi)
        g = np.cos(angle) * xx / w + np.sin(angle) * yy / h
        kinds["gradient"].append(cv2.normalize(g, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8))
        kinds["blank"].append(np.full((h, w), int(RNG.integers(0, 256)), dtype=np.uint8))
        page = np.full((h, w), 255 if i % 2 else 0, dtype=np.uint8)
        for line in range(2, h // 24):
            words = "".join(chr(int(c)) for c in RNG.integers(65, 91, 30))
            cv2.putText(page, words, (4, line * 24), cv2.FONT_HERSHEY_SIMPLEX, 0.7, 0 if i % 2 else 255, 2)
        kinds["text"].append(page)
        # 1/f noise: the power spectrum of natural photographs, plus a few hard-edged shapes.
        f = np.fft.fftfreq(h)[:, None] ** 2 + np.fft.fftfreq(w)[None, :] ** 2
        spectrum = (RNG.normal(size=(h, w)) + 1j * RNG.normal(size=(h, w))) / np.maximum(f, 1e-6) ** 0.9
        nat = cv2.normalize(np.real(np.fft.ifft2(spectrum)).astype(np.float32), None, 0, 255, cv2.NORM_MINMAX)
        for _ in range(4):
            c = (int(RNG.integers(0, w)), int(RNG.integers(0, h)))
            cv2.circle(nat, c, int(RNG.integers(10, h // 3)), float(RNG.integers(0, 256)), -1)
        kinds["natural"].append(nat.astype(np.uint8))
    return kinds


def shared_dicoms(data: Path) -> list[Path]:
    return sorted((data / "dicom").glob("*/*.dcm"))


# ------------------------------------------------------------------ statistics
def fit_gaussian(train: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Mean and precision of a Ledoit-Wolf fit on standardised features (stages differ in scale by orders of
    magnitude; shrinking towards a scaled identity only makes sense on a common scale), mapped back so the
    runtime computes the same distance on raw features. A feature (nearly) constant over the training split (a
    channel no training image drives) gets a floor on its scale, 1 % of the median feature's: without it the
    rounding of an INT8 variant, 2e-4 on a dead channel, alone read as hundreds of standard deviations."""
    from sklearn.covariance import LedoitWolf

    sd = train.std(axis=0)
    sd = np.maximum(sd, 0.01 * float(np.median(sd[sd > 0])) if (sd > 0).any() else 1e-6)
    lw = LedoitWolf().fit(train / sd)
    return lw.location_ * sd, lw.precision_ / np.outer(sd, sd), float(lw.shrinkage_)


def rate(scores: np.ndarray, threshold: float) -> float:
    return float(np.mean(scores > threshold)) if len(scores) else float("nan")


def softmax2(logits: np.ndarray, t: float = 1.0) -> np.ndarray:
    z = logits / t
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def ece(p_pos: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error of the top-label confidence, equal-width bins."""
    conf = np.maximum(p_pos, 1 - p_pos)
    pred = (p_pos >= 0.5).astype(int)
    edges = np.linspace(0.0, 1.0, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (conf > lo) & (conf <= hi)
        if sel.any():
            total += sel.mean() * abs((pred[sel] == y[sel]).mean() - conf[sel].mean())
    return float(total)


def brier(p_pos: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean((p_pos - y) ** 2))


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    from scipy.optimize import minimize_scalar

    def nll(log_t: float) -> float:
        p = softmax2(logits, math.exp(log_t))[np.arange(len(y)), y]
        return float(-np.mean(np.log(np.clip(p, 1e-12, 1))))

    return float(math.exp(minimize_scalar(nll, bounds=(-3, 3), method="bounded").x))


def sens_spec(p: np.ndarray, y: np.ndarray, thr: float) -> tuple[float, float]:
    pos = p >= thr
    return float(pos[y == 1].mean()), float((~pos[y == 0]).mean())


def auc(p: np.ndarray, y: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p))


# ------------------------------------------------------------------ augmentation (shifted data)
def augmentations() -> dict[str, callable]:
    def gamma(img, g):
        return (255.0 * (img / 255.0) ** g).astype(np.uint8)

    def contrast(img, c):
        m = img.mean()
        return np.clip((img.astype(np.float32) - m) * c + m, 0, 255).astype(np.uint8)

    def noise(img, s):
        return np.clip(img + RNG.normal(0, s, img.shape), 0, 255).astype(np.uint8)

    def rotate(img, deg):
        h, w = img.shape[:2]
        m = cv2.getRotationMatrix2D((w / 2, h / 2), deg, 1.0)
        return cv2.warpAffine(img, m, (w, h), borderMode=cv2.BORDER_CONSTANT)

    def crop(img, f):
        h, w = img.shape[:2]
        dy, dx = int(h * f), int(w * f)
        return img[dy : h - dy, dx : w - dx]

    def scale(img, s):
        h, w = img.shape[:2]
        small = cv2.resize(img, (int(w * s), int(h * s)), interpolation=cv2.INTER_AREA)
        out = np.zeros_like(img)
        y0, x0 = (h - small.shape[0]) // 2, (w - small.shape[1]) // 2
        out[y0 : y0 + small.shape[0], x0 : x0 + small.shape[1]] = small
        return out

    return {
        "none": lambda im: im,
        "gamma0.6": lambda im: gamma(im, 0.6),
        "gamma1.6": lambda im: gamma(im, 1.6),
        "contrast0.6": lambda im: contrast(im, 0.6),
        "contrast1.5": lambda im: contrast(im, 1.5),
        # A wider VOI window on a brighter display: how another vendor's CR processing looks next to these JPEGs.
        "washed-out": lambda im: (im.astype(np.float32) * 0.6 + 90).astype(np.uint8),
        "noise12": lambda im: noise(im, 12.0),
        "blur5": lambda im: cv2.GaussianBlur(im, (5, 5), 1.5),
        "rotate+10": lambda im: rotate(im, 10),
        "rotate-10": lambda im: rotate(im, -10),
        "crop10%": lambda im: crop(im, 0.10),
        "scale0.85": lambda im: scale(im, 0.85),
        "jpeg-q30": lambda im: cv2.imdecode(cv2.imencode(".jpg", im, [cv2.IMWRITE_JPEG_QUALITY, 30])[1], 0),
    }


def half_of(group: str) -> int:
    """Calibration half (0) or evaluation half (1) of a validation patient group, by hash."""
    return int(hashlib.sha1(("calib-" + group).encode()).hexdigest()[:8], 16) % 2


def train_with_shift(runner: Runner, images, seed: int = 1) -> np.ndarray:
    """Training features of each image as it is and under one random augmentation: the gate must accept the
    acquisition variety the operating point is validated for (another scanner's contrast, a tilt, noise), so
    its reference distribution holds that variety too."""
    rng = np.random.default_rng(seed)
    augs = augmentations()
    keys = [k for k in augs if k != "none"]
    feats = []
    for img in images:
        feats.append(runner.run(img)[1])
        feats.append(runner.run(augs[keys[rng.integers(len(keys))]](img))[1])
    return np.stack(feats)


def content_gate(train: np.ndarray, val_by_condition: dict[str, np.ndarray], negatives: dict[str, np.ndarray]
                 ) -> tuple[dict, np.ndarray, np.ndarray]:
    mean, precision, shrink = fit_gaussian(train)
    val_scores = {k: mahalanobis_sq(f, mean, precision) for k, f in val_by_condition.items()}
    pooled = np.concatenate(list(val_scores.values()))
    threshold = float(np.percentile(pooled, 99))
    report = {
        "method": "squared Mahalanobis distance of the features output (spatial means of several stages, "
                  "concatenated) to the training split (each image as is and under one random augmentation), "
                  "Ledoit-Wolf shrinkage covariance on standardised features",
        "n_train": len(train), "feature_dim": int(train.shape[1]), "shrinkage": shrink,
        "threshold": threshold,
        "threshold_rule": "99th percentile of validation scores pooled over the clean split and each augmentation",
        "val_n": len(val_scores["none"]), "val_refused": rate(val_scores["none"], threshold),
        "val_refused_by_condition": {k: rate(v, threshold) for k, v in val_scores.items()},
        "negatives": {},
    }
    relaxed = HEADER_CONFIRMED_FACTOR * threshold
    report["header_confirmed_threshold"] = relaxed
    for name, f in negatives.items():
        sc = mahalanobis_sq(f, mean, precision) if len(f) else np.array([])
        report["negatives"][name] = {"n": len(sc), "refused": rate(sc, threshold),
                                     "refused_at_header_confirmed_limit": rate(sc, relaxed)}
    all_neg = sum(v["n"] for v in report["negatives"].values())
    report["negatives_refused_overall"] = (
        sum(v["n"] * v["refused"] for v in report["negatives"].values()) / all_neg if all_neg else float("nan"))
    return report, mean, precision


def variant_val_refusal(manifest, variant_id: str, engine: str, val_px, mean, precision, threshold) -> float:
    runner = Runner(manifest, variant_id, engine)
    return rate(mahalanobis_sq(features_of(runner, val_px), mean, precision), threshold)


def variant_thresholds(manifest, val_px, mean, precision, fp32_threshold: float,
                       negatives: dict[str, list] | None = None) -> dict:
    """Each INT8 variant's own limit, by the FP32 rule (99th percentile of validation scores, clean and under
    each augmentation pooled) on each engine it runs on, the highest kept: quantized features drift from the
    FP32 statistics, and one shared limit refused up to 3 % of in-scope images on an INT8 variant."""
    out = {}
    augs = augmentations()
    for v in manifest.variants:
        if v.precision == "fp32":
            continue
        per_engine = {}
        for engine in v.engines:
            runner = Runner(manifest, v.id, engine)
            clean = mahalanobis_sq(features_of(runner, val_px), mean, precision)
            pooled = np.concatenate([clean] + [mahalanobis_sq(features_of(runner, (f(px) for px in val_px)), mean,
                                                              precision) for k, f in augs.items() if k != "none"])
            per_engine[engine] = {"limit": float(np.percentile(pooled, 99)),
                                  "val_refused_at_fp32_limit": rate(clean, fp32_threshold)}
        limit = max(e["limit"] for e in per_engine.values())
        for e, r in per_engine.items():
            runner = Runner(manifest, v.id, e)
            r["val_refused_at_own_limit"] = rate(mahalanobis_sq(features_of(runner, val_px), mean, precision), limit)
            for name, items in (negatives or {}).items():  # paths or pixel arrays
                imgs = (runner.pixels(i) if isinstance(i, Path) else i for i in items)
                scores = mahalanobis_sq(features_of(runner, imgs), mean, precision)
                r[f"{name}_refused_at_own_limit"] = rate(scores, limit)
        out[v.id] = {"scope_threshold": limit, "engines": per_engine}
    return out


# ------------------------------------------------------------------ chest
def run_cxr(manifest, data: Path, quick: bool) -> dict:
    root = data / "cxr-kermany"
    train = cxr_items_with_groups(root, "train")
    val = cxr_items_with_groups(root, "val")
    if quick:
        train = [train[i] for i in RNG.choice(len(train), 150, replace=False)]
        val = [val[i] for i in RNG.choice(len(val), 80, replace=False)]
    runner = Runner(manifest)
    val_px = [runner.pixels(p) for p, _, _ in val]
    augs = augmentations()
    logits, val_feats = {}, {}
    for name, f in augs.items():  # one pass per condition gives the gate and the operating point their inputs
        outs = [runner.run(f(px)) for px in val_px]
        logits[name] = np.stack([o[0].reshape(-1) for o in outs])
        val_feats[name] = np.stack([o[1] for o in outs])
    hc18 = sorted((data / "hc18" / "images").glob("*_HC.png"))
    if quick:
        hc18 = hc18[:40]
    chest = ("RG1", "966")
    dicoms = [p for p in shared_dicoms(data) if p.name.split("_")[0] not in chest]
    negatives = {
        "hc18-ultrasound": features_of(runner, (runner.pixels(p) for p in hc18)),
        "shared-dicom-not-chest": features_of(runner, (runner.pixels(p) for p in dicoms)),
        **{f"synthetic-{k}": features_of(runner, v)
           for k, v in synthetic_images(4 if quick else 40, (512, 512)).items()},
    }
    train_feats = train_with_shift(runner, (runner.pixels(p) for p, _, _ in train))
    gate, mean, precision = content_gate(train_feats, val_feats, negatives)
    chest_dicoms = [p for p in shared_dicoms(data) if p.name.split("_")[0] in chest]
    cs = mahalanobis_sq(features_of(runner, [runner.pixels(p) for p in chest_dicoms]), mean, precision)
    gate["shared_chest_dicoms_distance"] = {p.name: round(float(v), 1) for p, v in zip(chest_dicoms, cs)}
    if not quick:
        gate["variants"] = variant_thresholds(manifest, val_px, mean, precision, gate["threshold"], {
            "hc18-ultrasound": hc18, "shared-dicom-not-chest": dicoms,
            "synthetic": [i for v in synthetic_images(40, (512, 512)).values() for i in v]})
        gate["val_refused_int8_qdq_onnxruntime"] = variant_val_refusal(
            manifest, "int8-qdq", "onnxruntime", val_px, mean, precision, gate["threshold"])
        gate["val_refused_int8_qdq_openvino"] = variant_val_refusal(
            manifest, "int8-qdq", "openvino", val_px, mean, precision, gate["threshold"])
        gate["val_refused_fp32_openvino"] = variant_val_refusal(
            manifest, "fp32", "openvino", val_px, mean, precision, gate["threshold"])

    # Calibration: temperature on the calibration half (by patient group), measured on the other half.
    y = np.array([label for _, label, _ in val])
    halves = np.array([half_of(g) for _, _, g in val])
    cal, ev = halves == 0, halves == 1
    # Fitted on the calibration half under every augmentation pooled: the temperature is for the clinic's
    # shifted images, not only for the bench's.
    t = fit_temperature(np.concatenate([lg[cal] for lg in logits.values()]), np.concatenate([y[cal]] * len(logits)))
    p_raw = softmax2(logits["none"])[:, 1]
    p_cal = softmax2(logits["none"], t)[:, 1]
    p_raw_aug = np.concatenate([softmax2(lg)[ev, 1] for lg in logits.values()])
    p_cal_aug = np.concatenate([softmax2(lg, t)[ev, 1] for lg in logits.values()])
    y_aug = np.concatenate([y[ev]] * len(logits))
    calib = {
        "method": "temperature scaling (NLL) on the calibration half of the validation split (by patient group), "
                  "clean and under each augmentation pooled; measured on the other half",
        "temperature": t, "n_fit": int(cal.sum()), "n_eval": int(ev.sum()),
        "ece15_before": ece(p_raw[ev], y[ev]), "ece15_after": ece(p_cal[ev], y[ev]),
        "brier_before": brier(p_raw[ev], y[ev]), "brier_after": brier(p_cal[ev], y[ev]),
        "ece15_shifted_before": ece(p_raw_aug, y_aug), "ece15_shifted_after": ece(p_cal_aug, y_aug),
        "brier_shifted_before": brier(p_raw_aug, y_aug), "brier_shifted_after": brier(p_cal_aug, y_aug),
    }
    # Split conformal (score 1 - p(true label)) on the calibration half at alpha 0.05.
    probs = softmax2(logits["none"], t)
    scores = 1 - probs[np.arange(len(y)), y][cal]
    n = len(scores)
    qhat = float(np.quantile(scores, min(1.0, math.ceil((n + 1) * 0.95) / n), method="higher"))
    calib["conformal_alpha"] = 0.05
    calib["conformal_qhat"] = qhat

    # Operating point: the highest threshold on calibrated P(pneumonia) with sensitivity >= 0.95 under every
    # augmentation and in every patient-group fold of the validation split.
    p_aug = {name: softmax2(lg, t)[:, 1] for name, lg in logits.items()}
    folds = np.array([int(hashlib.sha1(("fold-" + g).encode()).hexdigest()[:8], 16) % 5 for _, _, g in val])
    grid = np.unique(np.round(np.concatenate(list(p_aug.values())), 4))
    best = float(grid[0])
    for thr in grid:
        ok = all(sens_spec(p, y, thr)[0] >= 0.95 for p in p_aug.values())
        ok = ok and all(sens_spec(p_aug["none"][folds == k], y[folds == k], thr)[0] >= 0.95 for k in range(5))
        if not ok:
            break
        best = float(thr)
    op = {"threshold": best, "rule": "highest threshold on the calibrated P(pneumonia) with sensitivity >= 0.95 "
          "under each augmentation and in each of 5 patient-group folds of the validation split",
          "per_condition": {}}
    for name, p in p_aug.items():
        se, sp = sens_spec(p, y, best)
        op["per_condition"][name] = {"auc": auc(p, y), "sensitivity": se, "specificity": sp, "ece15": ece(p, y)}
    for k in range(5):
        se, sp = sens_spec(p_aug["none"][folds == k], y[folds == k], best)
        op["per_condition"][f"fold{k}"] = {"sensitivity": se, "specificity": sp, "n": int((folds == k).sum())}
    op["worst_sensitivity"] = min(r["sensitivity"] for r in op["per_condition"].values())
    op["worst_specificity"] = min(r["specificity"] for r in op["per_condition"].values())
    pooled_p = np.concatenate(list(p_aug.values()))
    pooled_y = np.concatenate([y] * len(p_aug))
    op["pooled_shifted"] = dict(zip(("sensitivity", "specificity"), sens_spec(pooled_p, pooled_y, best)))
    op["pooled_shifted"]["auc"] = auc(pooled_p, pooled_y)
    if not quick:  # the INT8 variant at the same temperature and threshold, clean validation split
        int8 = Runner(manifest, "int8-qdq", "onnxruntime")
        p8 = softmax2(np.stack([int8.run(px)[0].reshape(-1) for px in val_px]), t)[:, 1]
        se, sp = sens_spec(p8, y, best)
        op["int8_qdq_onnxruntime"] = {"auc": auc(p8, y), "sensitivity": se, "specificity": sp,
                                      "ece15": ece(p8, y),
                                      "decision_changes_vs_fp32": int(((p8 >= best) != (p_aug["none"] >= best)).sum())}
    # needs_review on the evaluation half: how often, and how many of the errors it catches.
    from edge_runtime.heads.classification import needs_review

    labels = ("normal", "pneumonia")
    pred = p_cal[ev] >= best
    review = np.array([needs_review(np.array([1 - q, q]), labels, labels[int(d)], qhat)
                       for q, d in zip(p_cal[ev], pred)])
    wrong = pred != (y[ev] == 1)
    calib["needs_review_rate_eval_half"] = float(review.mean())
    calib["error_rate_eval_half"] = float(wrong.mean())
    calib["errors_flagged_for_review_eval_half"] = float(review[wrong].mean()) if wrong.any() else float("nan")
    return {"model": manifest.name, "content_gate": gate, "calibration": calib, "operating_point": op,
            "statistics": (mean, precision)}


# ------------------------------------------------------------------ fetal head
def run_fetal(manifest, data: Path, quick: bool) -> dict:
    from edge_runtime.heads.geometry import segment_ellipse
    from edge_runtime.heads.segmentation import ellipse_quality, sigmoid

    root = data / "hc18"
    train = hc18_items(root, "train")
    val = hc18_items(root, "val")
    if quick:
        train, val = train[:60], val[:25]
    runner = Runner(manifest)
    val_px = [runner.pixels(it.image) for it in val]
    val_feats = {name: features_of(runner, (f(px) for px in val_px)) for name, f in augmentations().items()}
    cxr = cxr_items_with_groups(data / "cxr-kermany", "val")
    cxr = [cxr[i] for i in RNG.choice(len(cxr), 30 if quick else 400, replace=False)]
    dicoms = shared_dicoms(data)
    us_not_head = ("US1", "JPG", "JPEG", "color", "examples", "gdcm")
    negatives = {
        "kermany-chest-xray": features_of(runner, (runner.pixels(p) for p, _, _ in cxr)),
        "shared-dicom-radiographs": features_of(runner, (runner.pixels(p) for p in dicoms
                                                         if p.name.startswith(("RG", "966")))),
        "shared-dicom-ultrasound-not-fetal-head": features_of(runner, (runner.pixels(p) for p in dicoms
                                                                       if p.name.startswith(us_not_head))),
        **{f"synthetic-{k}": features_of(runner, v)
           for k, v in synthetic_images(4 if quick else 40, (540, 800)).items()},
    }
    train_feats = train_with_shift(runner, (runner.pixels(it.image) for it in train))
    gate, mean, precision = content_gate(train_feats, val_feats, negatives)
    ob = [p for p in dicoms if p.name.startswith("OB")]
    sc = mahalanobis_sq(features_of(runner, [runner.pixels(p) for p in ob]), mean, precision)
    gate["shared_obstetric_dicoms_distance"] = {p.name: round(float(v), 1) for p, v in zip(ob, sc)}
    if not quick:
        gate["variants"] = variant_thresholds(manifest, val_px, mean, precision, gate["threshold"], {
            "kermany-chest-xray": [p for p, _, _ in cxr],
            "shared-dicom-radiographs": [p for p in dicoms if p.name.startswith(("RG", "966"))],
            "shared-dicom-ultrasound-not-fetal-head": [p for p in dicoms if p.name.startswith(us_not_head)],
            "synthetic": [i for v in synthetic_images(40, (540, 800)).values() for i in v]})
        for vid, eng in (("int8-qdq", "onnxruntime"), ("int8-ov", "openvino")):
            gate[f"val_refused_{vid}_{eng}"] = variant_val_refusal(manifest, vid, eng, val_px, mean, precision,
                                                                   gate["threshold"])
    spec = manifest.segmentation
    qualities, errors = [], []
    for it, px in zip(val, val_px):
        out, _, geometry = runner.run(px)
        prob = sigmoid(np.asarray(out, dtype=np.float32).reshape(out.shape[-2:]))
        ellipse, component = segment_ellipse(prob, geometry, px.shape[:2], (it.pixel_size_mm,) * 2, spec.threshold)
        qualities.append(ellipse_quality(component, ellipse) if ellipse else 0.0)
        errors.append(abs(ellipse.circumference_mm - it.hc_mm) if ellipse else float("nan"))
    qualities, errors = np.array(qualities), np.array(errors)
    floor = float(np.percentile(qualities, 1))
    kept = qualities >= floor
    finite = np.isfinite(errors)
    quality = {
        "score": "IoU of the largest mask component with its fitted ellipse (1 = a perfect ellipse)",
        "val_quality_median": float(np.median(qualities)), "val_quality_p1": floor,
        "val_hc_mad_mm_all": float(np.nanmean(errors)),
        "val_hc_mad_mm_kept": float(np.nanmean(errors[kept])),
        "val_refused_by_quality": float((~kept).mean()),
        "corr_quality_abs_error": float(np.corrcoef(qualities[finite], errors[finite])[0, 1]),
    }
    return {"model": manifest.name, "content_gate": gate, "quality": quality, "statistics": (mean, precision)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, choices=("cxr-pneumonia", "fetal-head"))
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--out", type=Path, required=True, help="JSON report")
    ap.add_argument("--quick", action="store_true", help="a few hundred images: a smoke test, not card figures")
    ap.add_argument("--write", action="store_true", help="write scope-features.npz into the model folder")
    args = ap.parse_args(argv)
    manifest = ModelRegistry().get(args.model)
    report = (run_cxr if args.model == "cxr-pneumonia" else run_fetal)(manifest, args.data, args.quick)
    mean, precision = report.pop("statistics")
    if args.write:
        path = manifest.folder / FEATURES_FILE
        report["features_file_sha256"] = write_statistics(path, mean, precision)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
