"""Offline check of the in-graph class activation maps ("cam" output, quantize/cam_output.py). Needs torch.

1. Grad-CAM agreement: the PyTorch CXRNet, with its weights read back from the shipped FP32 ONNX initializers
   (BatchNorm is folded there, so each BatchNorm is set to the identity), is run with autograd; Grad-CAM of each
   class's logit on the final feature maps (ReLU of the gradient-weighted sum, gradients averaged over space) is
   compared with ReLU(cam) from the shipped graph, both scaled to a maximum of 1: max |difference| over N
   validation images (every k-th of the split), both classes, both engines.
2. Logits unchanged and consistent: |logit - (mean(cam) - ... + bias)| is reported (spatial mean of the map plus
   the classifier bias must equal the logit).
3. INT8 agreement: Pearson r of the INT8 QDQ graph's pneumonia map with the FP32 graph's, per validation image,
   on the raw 4x4 map and on the 16x16 grid the finding carries; on ONNX Runtime and OpenVINO.
4. Deletion test (faithfulness): on true-positive validation images (pneumonia, flagged at the manifest's
   threshold on calibrated P), the runtime's top-20 %-mass box (edge_runtime.explain) is filled with the image mean
   and P(pneumonia) re-measured; the same for random boxes of the same size (10 positions per image, seeded).
   A win: the map's box lowers P more than the mean of the random boxes. Per variant and engine.

    .venv/bin/pip install torch==2.13.0
    .venv/bin/python models/cxr-pneumonia/explain_check.py --data ../shared/data/cxr-kermany --out /tmp/explain.json \
        --overlay docs/cxr-explanation-example.jpg
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))

from edge_runtime.engines import EngineOptions, load_engine  # noqa: E402
from edge_runtime.explain import (cam_explanation, cam_to_image, decode_overlay, grid_of,  # noqa: E402
                                  top_mass_box)
from edge_runtime.imaging.inputs import open_input  # noqa: E402
from edge_runtime.imaging.preprocess import prepare  # noqa: E402
from edge_runtime.registry import ModelRegistry, verify_variant  # noqa: E402

POSITIVE = 1  # label index of "pneumonia"
RANDOM_BOXES = 10


def torch_model_from_onnx(onnx_path: Path):
    """CXRNet with the ONNX graph's (BatchNorm-folded) conv weights and biases; BatchNorm set to the identity."""
    import onnx
    import torch
    from onnx import numpy_helper

    from cxr_net import CXRNet

    graph = onnx.load(str(onnx_path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    convs = [n for n in graph.node if n.op_type == "Conv" and not n.name.startswith("cam_")]
    model = CXRNet().eval()
    mods = list(model.features.modules())
    pairs = [(c, b) for c, b in zip(mods, mods[1:])
             if isinstance(c, torch.nn.Conv2d) and isinstance(b, torch.nn.BatchNorm2d)]
    if len(pairs) != len(convs):
        raise SystemExit(f"{onnx_path}: {len(convs)} Conv nodes for {len(pairs)} conv+BN modules")
    with torch.no_grad():
        for (conv, bn), node in zip(pairs, convs):
            w, b = inits[node.input[1]], inits[node.input[2]]
            if tuple(conv.weight.shape) != w.shape:
                raise SystemExit(f"shape mismatch at {node.name}: {tuple(conv.weight.shape)} vs {w.shape}")
            conv.weight.copy_(torch.from_numpy(w))
            bn.weight.fill_(1.0)
            bn.bias.copy_(torch.from_numpy(b))
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)  # sqrt(var + eps) = 1
        model.fc.weight.copy_(torch.from_numpy(inits["fc.weight"]))
        model.fc.bias.copy_(torch.from_numpy(inits["fc.bias"]))
    return model, inits["fc.bias"]


def grad_cam(model, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(logits [C], Grad-CAM [C, h, w]) of each class's logit on model.features' output."""
    import torch

    store = {}
    hook = model.features.register_forward_hook(lambda _m, _i, out: store.__setitem__("f", out))
    try:
        logits = model(torch.from_numpy(x))
    finally:
        hook.remove()
    f = store["f"]
    maps = []
    for c in range(logits.shape[1]):
        (grad,) = torch.autograd.grad(logits[0, c], f, retain_graph=True)
        alpha = grad.mean(dim=(2, 3), keepdim=True)
        maps.append(torch.relu((alpha * f).sum(dim=1))[0].detach().numpy())
    return logits[0].detach().numpy(), np.stack(maps)


def unit_max(m: np.ndarray) -> np.ndarray:
    m = np.maximum(m, 0.0)
    peak = m.max()
    return m / peak if peak > 0 else m


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def calibrated_p(logits: np.ndarray, temperature: float) -> float:
    z = np.asarray(logits, dtype=np.float64).ravel() / temperature
    e = np.exp(z - z.max())
    return float(e[POSITIVE] / e.sum())


def summary(values: list[float]) -> dict[str, float]:
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=np.float64)
    return {"n": int(v.size), "min": float(v.min()), "p05": float(np.percentile(v, 5)), "median": float(np.median(v)),
            "mean": float(v.mean()), "share_ge_0.95": float((v >= 0.95).mean())}


def deletion_test(engine, images, xs, labels, manifest, rng_seed: int = 0) -> dict:
    """Map box vs random boxes of the same size on the engine's own true positives."""
    spec = manifest.preprocess
    model_hw = (spec.height, spec.width)
    temperature, threshold = manifest.decision.temperature, manifest.decision.threshold
    top_mass = float(manifest.raw["explanation"].get("top_mass", 0.2))
    rng = np.random.default_rng(rng_seed)
    wins = draws_won = draws = n = 0
    drops_cam, drops_rand, box_area = [], [], []

    def p_of(img: np.ndarray) -> float:
        return calibrated_p(engine.run(prepare(img, spec)[0]), temperature)

    for img, x, label in zip(images, xs, labels):
        if label != POSITIVE:
            continue
        out = engine.run_all(x)
        p0 = calibrated_p(out[0], temperature)
        if p0 < threshold:
            continue
        geometry = prepare(img, spec)[1]
        m = cam_to_image(out[2][0, POSITIVE], geometry, model_hw, img.shape[:2])
        box = top_mass_box(m, img.shape[:2], top_mass)
        fill = np.uint8(round(float(img.mean())))
        masked = img.copy()
        masked[box.y: box.y + box.height, box.x: box.x + box.width] = fill
        d_cam = p0 - p_of(masked)
        h, w = img.shape[:2]
        d_rand = []
        for _ in range(RANDOM_BOXES):
            rx, ry = int(rng.integers(0, w - box.width + 1)), int(rng.integers(0, h - box.height + 1))
            r = img.copy()
            r[ry: ry + box.height, rx: rx + box.width] = fill
            d_rand.append(p0 - p_of(r))
        n += 1
        wins += d_cam > float(np.mean(d_rand))
        draws_won += sum(d_cam > d for d in d_rand)
        draws += len(d_rand)
        drops_cam.append(d_cam)
        drops_rand.append(float(np.mean(d_rand)))
        box_area.append(box.width * box.height / float(w * h))
    return {"true_positives": n, "win_rate_vs_mean_of_random": wins / n, "win_rate_per_random_box": draws_won / draws,
            "median_drop_map_box": float(np.median(drops_cam)), "median_drop_random_box": float(np.median(drops_rand)),
            "median_box_area_fraction": float(np.median(box_area)), "random_boxes_per_image": RANDOM_BOXES}



def main(argv: list[str] | None = None) -> int:
    from quantize.datasets import cxr_items

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=HERE.parents[2] / "shared" / "data" / "cxr-kermany")
    ap.add_argument("--n-gradcam", type=int, default=100)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--overlay", type=Path, help="write one overlay JPEG (the card's example) here")
    args = ap.parse_args(argv)
    t_start = time.time()
    manifest = ModelRegistry().get("cxr-pneumonia")
    spec = manifest.preprocess
    model_hw = (spec.height, spec.width)
    items = cxr_items(args.data, "val")
    images = [open_input(p).frame(0, manifest.windowing) for p, _ in items]
    labels = [lbl for _, lbl in items]
    xs = [prepare(img, spec)[0] for img in images]
    variants = {v.id: v for v in manifest.variants}
    for v in variants.values():
        verify_variant(manifest, v)
    engines = {(vid, kind): load_engine(kind, variants[vid].path, manifest.input.shape, EngineOptions(threads=2))
               for vid in ("fp32", "int8-qdq") for kind in ("onnxruntime", "openvino")}
    outs = {key: [e.run_all(x) for x in xs] for key, e in engines.items()}
    report: dict = {"n_val": len(items)}

    # 1-2: Grad-CAM of the PyTorch model vs the FP32 graph's map.
    model, bias = torch_model_from_onnx(variants["fp32"].path)
    step = max(1, len(items) // args.n_gradcam)
    picked = list(range(0, len(items), step))[: args.n_gradcam]
    for kind in ("onnxruntime", "openvino"):
        diff, logit_diff, sum_diff = 0.0, 0.0, 0.0
        for i in picked:
            t_logits, gc = grad_cam(model, xs[i])
            logits, cam = outs[("fp32", kind)][i][0][0], outs[("fp32", kind)][i][2][0]
            for c in range(cam.shape[0]):
                diff = max(diff, float(np.abs(unit_max(gc[c]) - unit_max(cam[c])).max()))
            logit_diff = max(logit_diff, float(np.abs(t_logits - logits).max()))
            sum_diff = max(sum_diff, float(np.abs(cam.mean(axis=(1, 2)) + bias - logits).max()))
        report[f"gradcam_{kind}"] = {"images": len(picked), "max_abs_diff_normalised": diff,
                                     "max_abs_logit_diff_torch_vs_graph": logit_diff,
                                     "max_abs_mean_cam_plus_bias_minus_logit": sum_diff}

    # 3: INT8 vs FP32 maps (pneumonia class).
    ref = outs[("fp32", "onnxruntime")]
    for kind in ("onnxruntime", "openvino"):
        raw, grid, iou = [], [], []
        for i, img in enumerate(images):
            a, b = ref[i][2][0, POSITIVE], outs[("int8-qdq", kind)][i][2][0, POSITIVE]
            raw.append(pearson(a, b))
            geometry = prepare(img, spec)[1]
            try:
                ma, mb = cam_to_image(a, geometry, model_hw, img.shape[:2]), cam_to_image(b, geometry, model_hw, img.shape[:2])
            except Exception:
                continue
            grid.append(pearson(np.asarray(grid_of(ma)), np.asarray(grid_of(mb))))
            ba, bb = top_mass_box(ma, img.shape[:2]), top_mass_box(mb, img.shape[:2])
            ix = max(0, min(ba.x + ba.width, bb.x + bb.width) - max(ba.x, bb.x))
            iy = max(0, min(ba.y + ba.height, bb.y + bb.height) - max(ba.y, bb.y))
            inter = ix * iy
            iou.append(inter / float(ba.width * ba.height + bb.width * bb.height - inter))
        report[f"int8_vs_fp32_{kind}"] = {"pearson_raw_4x4": summary(raw), "pearson_grid_16x16": summary(grid),
                                          "bbox_iou": summary(iou)}

    # 4: deletion test.
    for key, engine in engines.items():
        report[f"deletion_{key[0]}_{key[1]}"] = deletion_test(engine, images, xs, labels, manifest)

    if args.overlay:
        # The most confident true positive: the card's example overlay.
        scores = [(calibrated_p(o[0], manifest.decision.temperature), i) for i, o in enumerate(ref) if labels[i] == POSITIVE]
        _, best = max(scores)
        img = images[best]
        e = cam_explanation(img, ref[best][2][0, POSITIVE], prepare(img, spec)[1], model_hw, "pneumonia")
        args.overlay.parent.mkdir(parents=True, exist_ok=True)
        args.overlay.write_bytes(decode_overlay(e["overlay"]))
        report["overlay_example"] = {"file": items[best][0].name, "bbox": e["bbox"],
                                     "bytes": args.overlay.stat().st_size}
    report["seconds"] = time.time() - t_start
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
