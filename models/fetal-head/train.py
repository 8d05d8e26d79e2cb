"""Train the fetal-head segmentation reference model on HC18, export ONNX, write manifest.toml and CARD.md.

    python models/fetal-head/train.py --data ../shared/data/hc18 --out models/fetal-head

Model inputs are built exactly like the runtime: augmented uint8 display image (800x540 B-mode)
-> edge_runtime.imaging.preprocess.prepare(image, SPEC). Targets are the filled annotation ellipse,
warped with the same geometry and resized with the same letterbox. Validation measures like the runtime:
sigmoid -> edge_runtime.heads.geometry.segment_ellipse -> head circumference (mm).
"""
from __future__ import annotations

import copy
import math
import sys
import time
from pathlib import Path

import cv2
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # models/ (training_common)
import training_common as tc  # noqa: E402  (also puts the repo root on sys.path)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from edge_runtime.heads.geometry import dice, ellipse_mask, hadlock_ga_weeks, segment_ellipse  # noqa: E402
from edge_runtime.imaging.preprocess import PreprocessSpec, prepare, resize  # noqa: E402
from quantize.datasets import hc18_items, hc18_mask, load_display_image  # noqa: E402
from unet import UNet  # noqa: E402

NAME = "fetal-head"
VERSION = "1.0.0"
WIDTHS = (16, 32, 64, 128, 160)
SPEC = PreprocessSpec(height=176, width=256, channels="gray", resize="letterbox", interpolation="area", mean=(0.5,), std=(0.25,))
SEG_THRESHOLD = 0.5
MIN_AREA_FRACTION = 0.005


# ----------------------------------------------------------------------------------------------- data
def load_cache(data: Path, split: str, cache: Path) -> dict:
    """Decoded display images + full-resolution filled masks (lists; a few HC18 frames are not 800x540),
    cached as padded .npy arrays plus per-image shapes under the cache dir."""
    items = hc18_items(data, split)
    cache.mkdir(parents=True, exist_ok=True)
    key = f"hc18-{split}-{len(items)}"
    fi, fm, fs = (cache / f"{key}-{k}.npy" for k in ("images", "masks", "shapes"))
    if not (fi.exists() and fm.exists() and fs.exists()):
        imgs = [load_display_image(it.image) for it in items]
        msks = [hc18_mask(it.annotation) for it in items]
        shapes = np.array([im.shape for im in imgs], dtype=np.int32)
        hmax, wmax = shapes.max(axis=0)
        pad_i = np.zeros((len(imgs), hmax, wmax), np.uint8)
        pad_m = np.zeros((len(imgs), hmax, wmax), np.uint8)
        for k, (im, mk) in enumerate(zip(imgs, msks)):
            assert im.shape == mk.shape, items[k].image
            pad_i[k, : im.shape[0], : im.shape[1]] = im
            pad_m[k, : im.shape[0], : im.shape[1]] = mk
        np.save(fi, pad_i)
        np.save(fm, pad_m)
        np.save(fs, shapes)
    pad_i, pad_m, shapes = np.load(fi), np.load(fm), np.load(fs)
    images = [pad_i[k, :h, :w] for k, (h, w) in enumerate(shapes)]
    masks = [pad_m[k, :h, :w] for k, (h, w) in enumerate(shapes)]
    return {"items": items, "images": images, "masks": masks}


def _lut(rng: np.random.Generator) -> np.ndarray:
    """Random brightness / contrast / gamma as a uint8 lookup table."""
    x = np.arange(256, dtype=np.float32) / 255.0
    gamma = math.exp(rng.uniform(math.log(0.7), math.log(1.4)))
    x = x**gamma
    contrast = rng.uniform(0.75, 1.3)
    bright = rng.uniform(-0.12, 0.12)
    x = (x - 0.5) * contrast + 0.5 + bright
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def augment(img: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Geometric + intensity augmentation on the uint8 display image (mask follows as float32)."""
    h, w = img.shape
    mask = mask.astype(np.float32)
    # Aspect-changing crop: simulates other scanners' frame shapes, which the letterbox then pads.
    if rng.random() < 0.3:
        cw = int(round(w * rng.uniform(0.6, 1.0)))
        ch = int(round(h * rng.uniform(0.8, 1.0)))
        x0 = int(rng.integers(0, w - cw + 1))
        y0 = int(rng.integers(0, h - ch + 1))
        img, mask = img[y0 : y0 + ch, x0 : x0 + cw], mask[y0 : y0 + ch, x0 : x0 + cw]
        h, w = img.shape
    # Similarity transform (+ optional horizontal flip) about the image centre.
    angle = rng.uniform(-25, 25)
    scale = math.exp(rng.uniform(math.log(0.8), math.log(1.15)))
    tx, ty = rng.uniform(-0.08, 0.08) * w, rng.uniform(-0.08, 0.08) * h
    m = cv2.getRotationMatrix2D((w / 2 - 0.5, h / 2 - 0.5), angle, scale)
    m[:, 2] += (tx, ty)
    if rng.random() < 0.5:
        flip = np.array([[-1, 0, w - 1], [0, 1, 0], [0, 0, 1]], dtype=np.float64)
        m = m @ flip
    img = cv2.LUT(img, _lut(rng))  # before the warp: outside the frame stays black, as on a scanner
    img = cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    mask = cv2.warpAffine(mask, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    if rng.random() < 0.2:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.5, 1.5))
    if rng.random() < 0.2:  # multiplicative speckle-like noise
        noise = rng.normal(1.0, rng.uniform(0.05, 0.15), img.shape).astype(np.float32)
        img = np.clip(img.astype(np.float32) * noise, 0, 255).astype(np.uint8)
    return img, mask


def make_sample(img: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Runtime preprocessing of the display image; the mask gets the identical letterbox resize."""
    x, _ = prepare(img, SPEC)
    y, _ = resize(mask.astype(np.float32), SPEC)
    return x[0], y[None]


# ----------------------------------------------------------------------------------------------- loss
def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    inter = (p * target).sum(dim=(1, 2, 3))
    den = p.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3))
    soft_dice = 1 - (2 * inter + 1) / (den + 1)
    return bce + soft_dice.mean()


# ----------------------------------------------------------------------------------------------- evaluation
def measure(prob: np.ndarray, geometry, image_hw, ps: float):
    """Runtime measurement: ellipse (or None when no head / component too small) from a model-res prob map."""
    ellipse, component = segment_ellipse(prob, geometry, image_hw, (ps, ps), SEG_THRESHOLD)
    if ellipse is None or component.sum() < MIN_AREA_FRACTION * image_hw[0] * image_hw[1]:
        return None
    return ellipse


def evaluate(predict, val: dict) -> dict:
    """predict(x (1,1,H,W) float32) -> logits (1,1,H,W). Returns per-image arrays and summary."""
    hc_pred, dices, found = [], [], []
    for it, img, gt in zip(val["items"], val["images"], val["masks"]):
        x, geometry = prepare(img, SPEC)
        logits = predict(x)
        prob = 1.0 / (1.0 + np.exp(-logits[0, 0].astype(np.float64)))
        e = measure(prob.astype(np.float32), geometry, img.shape, it.pixel_size_mm)
        if e is None:
            found.append(False)
            hc_pred.append(float("nan"))
            dices.append(0.0)
            continue
        found.append(True)
        hc_pred.append(e.circumference_mm)
        dices.append(dice(ellipse_mask(img.shape, e.center_px, e.axes_px, e.angle_deg), gt))
    hc_true = np.array([it.hc_mm for it in val["items"]])
    hc_pred, dices, found = np.array(hc_pred), np.array(dices), np.array(found)
    err = np.abs(hc_pred - hc_true)
    return {
        "hc_pred": hc_pred,
        "hc_true": hc_true,
        "abs_err": err,
        "dice": dices,
        "found": found,
        "mad": float(np.nanmean(err)) if found.any() else float("inf"),
        "dice_mean": float(dices.mean()),
        "no_head_fraction": float(1 - found.mean()),
    }


def torch_predictor(model):
    def predict(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy()

    return predict


# ----------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = tc.training_parser(__doc__.splitlines()[0], "hc18", HERE, epochs=26, batch=8)
    args = ap.parse_args()

    tc.seed_everything(args.seed)
    wall = tc.Timer()
    train, val = load_cache(args.data, "train", args.cache), load_cache(args.data, "val", args.cache)
    n_train = len(train["items"]) if not args.limit else min(args.limit, len(train["items"]))
    tc.log(f"train {len(train['items'])} images / {len({i.subject_id for i in train['items']})} subjects, "
           f"val {len(val['items'])} / {len({i.subject_id for i in val['items']})}; cache {time.time():.0f}")

    model = UNet(WIDTHS)
    n_params = tc.count_params(model)
    tc.log(f"UNet{WIDTHS} params {n_params}")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(n_train / args.batch)
    total = steps_per_epoch * args.epochs
    warm = steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))) * 0.98 + 0.02
    )
    rng = np.random.default_rng(args.seed)
    best = {"mad": float("inf")}
    history = []
    for epoch in range(1, args.epochs + 1):
        model.train()
        t0 = time.time()
        order = rng.permutation(len(train["items"]))[:n_train]
        losses = []
        for b in range(0, n_train, args.batch):
            xs, ys = [], []
            for i in order[b : b + args.batch]:
                img, mask = augment(train["images"][i], train["masks"][i], rng)
                x, y = make_sample(img, mask)
                xs.append(x)
                ys.append(y)
            x, y = torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        model.eval()
        r = evaluate(torch_predictor(model), val)
        history.append((epoch, float(np.mean(losses)), r["mad"], r["dice_mean"], r["no_head_fraction"]))
        tc.log(f"epoch {epoch:2d} loss {np.mean(losses):.4f} val MAD {r['mad']:.3f} mm dice {r['dice_mean']:.4f} "
               f"no-head {r['no_head_fraction']:.3f} ({time.time() - t0:.0f}s, total {wall() / 60:.1f} min)")
        # Selection: lowest val HC MAD, each missed head counted as a 50 mm error.
        score = float(np.where(r["found"], r["abs_err"], 50.0).mean())
        if score < best.get("score", float("inf")):
            best = {"score": score, "mad": r["mad"], "epoch": epoch, "state": copy.deepcopy(model.state_dict())}
    train_minutes = wall() / 60
    tc.log(f"best epoch {best['epoch']} (val MAD {best['mad']:.3f} mm); training {train_minutes:.1f} min")
    model.load_state_dict(best["state"])
    model.eval()

    # ------------------------------------------------------------------ export + checks
    args.out.mkdir(parents=True, exist_ok=True)
    onnx_path = args.out / f"{NAME}-fp32.onnx"
    tc.export_onnx(model, torch.zeros(1, 1, SPEC.height, SPEC.width), onnx_path)
    check_inputs = [prepare(img, SPEC)[0] for img in val["images"][:8]]
    max_diff = tc.ort_check(model, onnx_path, check_inputs)
    tc.log(f"ONNX {onnx_path} ({onnx_path.stat().st_size / 1e6:.2f} MB); max |ORT - torch| logits = {max_diff:.3g}")
    if max_diff > 1e-3:
        raise SystemExit(f"ORT/torch mismatch {max_diff}")

    sess = tc.ort_session(onnx_path)
    r = evaluate(lambda x: sess.run(["logits"], {"image": x})[0], val)  # final numbers from the shipped ONNX
    subjects = [it.subject_id for it in val["items"]]
    err = np.where(r["found"], r["abs_err"], np.nan)
    mad_ci = tc.bootstrap_ci(subjects, lambda idx: float(np.nanmean(err[idx])), n_resamples=2000, seed=args.seed)
    dice_ci = tc.bootstrap_ci(subjects, lambda idx: float(r["dice"][idx].mean()), n_resamples=2000, seed=args.seed)
    ga_err = []
    for hp, ht in zip(r["hc_pred"], r["hc_true"]):
        gp, gt = (hadlock_ga_weeks(hp) if hp == hp else None), hadlock_ga_weeks(ht)
        if gp is not None and gt is not None:
            ga_err.append(abs(gp - gt))
    ga_in_range = float(np.mean([hadlock_ga_weeks(h) is not None for h in r["hc_true"]]))
    lat = tc.ort_latency_ms(onnx_path, (1, 1, SPEC.height, SPEC.width), runs=300, warmup=30)
    sha = tc.sha256_file(onnx_path)
    metrics = {
        "val_hc_mad_mm": r["mad"],
        "val_hc_mad_mm_ci95": list(mad_ci),
        "val_hc_median_abs_err_mm": float(np.nanmedian(err)),
        "val_hc_p95_abs_err_mm": float(np.nanpercentile(err, 95)),
        "val_hc_mean_err_mm": float(np.nanmean(r["hc_pred"] - r["hc_true"])),
        "val_dice": r["dice_mean"],
        "val_dice_ci95": list(dice_ci),
        "val_no_head_fraction": r["no_head_fraction"],
        "val_ga_mad_weeks": float(np.mean(ga_err)) if ga_err else float("nan"),
        "val_ga_in_hadlock_range_fraction": ga_in_range,
        "ort_fp32_p50_ms": lat["p50"],
        "ort_fp32_p90_ms": lat["p90"],
        "ort_max_abs_diff_vs_torch": max_diff,
    }
    for k, v in metrics.items():
        tc.log(f"  {k} = {v}")

    n_val = len(val["items"])
    manifest = {
        "name": NAME,
        "version": VERSION,
        "task": "segmentation",
        "modality": ["US"],
        "summary": "Fetal skull ellipse segmentation on 2D B-mode ultrasound -> head circumference and Hadlock gestational age.",
        "intended_use": (
            "Research and engineering reference model for the edge-runtime daemon: outlines the fetal skull in a "
            "standard transthalamic plane and reports head circumference (mm) and a Hadlock gestational-age estimate "
            "for a trained operator to review. Not for diagnostic use. Not a medical device; measurements must be "
            "confirmed by a qualified sonographer."
        ),
        "latency_budget_ms": 33,
        "input": {
            "name": "image",
            "shape": [1, 1, SPEC.height, SPEC.width],
            "layout": "NCHW",
            "channels": SPEC.channels,
            "dtype": "float32",
        },
        "preprocessing": {
            "resize": SPEC.resize,
            "interpolation": SPEC.interpolation,
            "mean": list(SPEC.mean),
            "std": list(SPEC.std),
            "windowing": "voi",
        },
        "output": {"name": "logits", "activation": "sigmoid", "labels": ["head"]},
        "segmentation": {
            "threshold": SEG_THRESHOLD,
            "measurement": "head_circumference",
            "gestational_age": "hadlock-1984-hc",
            "min_area_fraction": MIN_AREA_FRACTION,
        },
        "variants": [
            {
                "id": "fp32",
                "file": onnx_path.name,
                "format": "onnx",
                "engines": ["onnxruntime", "openvino"],
                "precision": "fp32",
                "sha256": sha,
                "params": n_params,
                "metrics": metrics,
            }
        ],
        "training": {
            "data": "HC18 grand challenge training set: van den Heuvel TLA, de Bruijn D, de Korte CL, van Ginneken B. "
            "Automated measurement of fetal head circumference using 2D ultrasound images. PLoS ONE 13(8):e0200412, 2018. "
            "doi:10.1371/journal.pone.0200412; data doi:10.5281/zenodo.1322001",
            "licence": "CC BY 4.0",
            "attribution": "HC18 data (c) van den Heuvel et al., Radboud University Medical Center, licensed CC BY 4.0; "
            "799 of the 999 annotated training images as provided in the project's shared data.",
            "split": f"by subject_id: a subject goes to validation when int(sha1('hc18-subject-<id>')[:8],16) % 100 < 20 "
            f"(quantize.datasets.hc18_items); {n_train} train images / {len({i.subject_id for i in train['items']})} subjects, "
            f"{n_val} val images / {len(set(subjects))} subjects",
            "n_train": n_train,
            "n_val": n_val,
        },
        "provenance": {
            "code": "models/fetal-head/train.py",
            "torch": torch.__version__.split("+")[0],
            "seed": args.seed,
            "created": tc.today(),
            "epochs": args.epochs,
        },
    }
    import tomli_w

    (args.out / "manifest.toml").write_text(tomli_w.dumps(manifest))
    (args.out / "CARD.md").write_text(card(manifest, metrics, history, args, n_params, onnx_path, best["epoch"], train_minutes))
    tc.log(f"wrote {args.out / 'manifest.toml'} and CARD.md; total wall {wall() / 60:.1f} min")


def card(manifest: dict, m: dict, history, args, n_params: int, onnx_path: Path, best_epoch: int, train_minutes: float) -> str:
    t = manifest["training"]
    p = manifest["provenance"]
    hist = "\n".join(f"| {e} | {l:.4f} | {mad:.3f} | {d:.4f} | {nh:.3f} |" for e, l, mad, d, nh in history)
    return f"""# fetal-head {manifest['version']} — fetal skull segmentation and head circumference

**Not for diagnostic use.** Research/engineering reference model for the `edge-runtime` daemon. It is not a
medical device, has not been clinically validated, and every measurement must be reviewed by a qualified operator.

## What it does
Segments the fetal skull (filled ellipse) in a 2D B-mode ultrasound frame. The runtime thresholds the sigmoid
probability at {SEG_THRESHOLD} after up-sampling it to the display image, keeps the largest component (smaller than
{MIN_AREA_FRACTION:.1%} of the frame -> "no head found"), fits an ellipse (`edge_runtime.heads.geometry`) and reports the head
circumference (Ramanujan perimeter x pixel spacing, mm) and, inside 14-42 weeks only, the Hadlock (1984) gestational age.

## Intended use
Assist a trained operator measuring HC in a standard transthalamic plane on portable scanners; output is a
suggestion to be checked and corrected. Not for diagnosis, not for unsupervised use, not for screening decisions.

## Input and preprocessing
- Input `image`: float32 NCHW `[1, 1, {SPEC.height}, {SPEC.width}]` (H x W), gray.
- uint8 display image (DICOM after its modality/VOI LUTs, PNG, video frame) -> gray -> **letterbox** to 256x176
  (aspect kept, zero padding), `INTER_AREA` -> x/255 -> (x - {SPEC.mean[0]}) / {SPEC.std[0]}.
  Implemented once in `edge_runtime.imaging.preprocess.prepare`; training calls the same function on the augmented
  display image, so the runtime path is the training path.
- Output `logits`: `[1, 1, {SPEC.height}, {SPEC.width}]`, sigmoid -> P(head).

## Architecture
U-Net, widths {WIDTHS}, 4 max-pool stages, two 3x3 conv+BN+ReLU per block, bilinear up-sampling (no
ConvTranspose), skip concatenation, 1x1 head. {n_params:,} parameters; `{onnx_path.name}` {onnx_path.stat().st_size / 1e6:.1f} MB,
ONNX opset 17, static batch 1. ORT FP32 (2 intra-op threads, batch 1, 300 runs after warm-up on the 2-vCPU
build machine): p50 **{m['ort_fp32_p50_ms']:.1f} ms**, p90 {m['ort_fp32_p90_ms']:.1f} ms. Max |ORT - torch| logit difference on
8 validation images: {m['ort_max_abs_diff_vs_torch']:.2g}.

## Data and licence
{t['data']}. Licence: {t['licence']}. {t['attribution']}
Masks: `cv2.fitEllipse` on the 1-pixel annotation outline, filled with `ellipse_mask`
(reproduces labels.csv HC within 0.03 mm).

Split: {t['split']}. The validation split was used only to pick the epoch; no other tuning on it.

## Validation metrics (n = {t['n_val']} images, measured like the runtime on the exported ONNX)
95 % CIs: percentile bootstrap over subjects, 2000 resamples, seed {args.seed}.

| metric | value |
|---|---|
| HC mean absolute difference | **{m['val_hc_mad_mm']:.2f} mm** (95 % CI {m['val_hc_mad_mm_ci95'][0]:.2f}-{m['val_hc_mad_mm_ci95'][1]:.2f}) |
| HC median / 95th percentile absolute difference | {m['val_hc_median_abs_err_mm']:.2f} / {m['val_hc_p95_abs_err_mm']:.2f} mm |
| HC mean signed difference (bias) | {m['val_hc_mean_err_mm']:+.2f} mm |
| Dice, fitted ellipse vs. ground-truth ellipse (full resolution) | **{m['val_dice']:.4f}** (95 % CI {m['val_dice_ci95'][0]:.4f}-{m['val_dice_ci95'][1]:.4f}) |
| no head found | {m['val_no_head_fraction']:.1%} (counted as Dice 0, excluded from HC MAD) |
| GA abs. difference (both inside Hadlock 14-42 w) | {m['val_ga_mad_weeks']:.2f} weeks |
| val images whose true HC is inside Hadlock's range | {m['val_ga_in_hadlock_range_fraction']:.1%} |
| ORT FP32 p50 latency | {m['ort_fp32_p50_ms']:.1f} ms (budget {manifest['latency_budget_ms']} ms for 30 fps) |

## Known failure modes and limits
- Trained only on standard transthalamic planes from one Dutch centre (Radboud UMC, GE Voluson E8 / 730). Out-of-plane,
  oblique or non-standard planes, other anatomy, or no fetus at all can still produce an ellipse: the model does not
  verify the plane. An operator must.
- Burned-in text, calipers, measurement overlays and colour Doppler boxes were absent or rare in training; they can
  bias the contour.
- HC18 contains first-trimester images (HC well below 100 mm). Gestational age is only reported inside Hadlock's
  14-42 week range ({m['val_ga_in_hadlock_range_fraction']:.0%} of validation images); the formula is not extrapolated.
- Heads cut by the image border: the ellipse is fitted to the visible part only, which may underestimate HC.
- Pixel spacing comes from the DICOM / scanner; without a correct spacing the mm values are meaningless.
- Other scanners' frame shapes are letterboxed; training used aspect-changing crops, but no other scanner's images.
- Small validation set ({t['n_val']} images); CIs are wide-ish and the external performance is unknown.

## Training
AdamW (lr {args.lr}, wd 1e-4), 1 epoch warm-up + cosine, batch {args.batch}, {p['epochs']} epochs (best epoch
{best_epoch} on val HC MAD), BCE + soft Dice on the letterboxed filled-ellipse mask. Augmentation on the uint8
display image before `prepare`: aspect-changing crop (p 0.3), rotation +-25 deg, scale 0.8-1.15, shift +-8 %,
horizontal flip, gamma 0.7-1.4, contrast 0.75-1.3, brightness +-0.12, blur and multiplicative noise (p 0.2 each).
torch {p['torch']}, 2 CPU threads, seed {p['seed']}, deterministic algorithms; {train_minutes:.1f} min of training.

Epoch log (val = runtime measurement with the torch model):

| epoch | train loss | val HC MAD mm | val Dice | no-head |
|---|---|---|---|---|
{hist}

## Retrain
```
python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 && .venv/bin/pip install -e '.[train]'
.venv/bin/python models/fetal-head/train.py --data ../shared/data/hc18 --out models/fetal-head
```
Decoded images are cached under `/tmp/edge-cache` (override with `--cache`). Created {p['created']}.
"""


if __name__ == "__main__":
    main()
