"""Offline check of the in-graph class activation maps ("cam" output, quantize/cam_output.py). Needs torch.

1. Grad-CAM agreement: the PyTorch CXRNet, with its weights read back from the shipped FP32 ONNX initializers
   (BatchNorm is folded there, so each BatchNorm is set to the identity), is run with autograd; Grad-CAM of each
   class's logit on the final feature maps (ReLU of the gradient-weighted sum, gradients averaged over space) is
   compared with ReLU(cam) from the shipped graph, both scaled to a maximum of 1: max |difference| over N
   validation images (every k-th of the split), both classes, both engines.
2. Logits unchanged and consistent: |logit - (mean(cam) - ... + bias)| is reported (spatial mean of the map plus
   the classifier bias must equal the logit).
3. INT8 agreement: Pearson r of the INT8 QDQ graph's pneumonia map with the FP32 graph's, per validation image,
   on the raw map (4x4 for 1.0.0, 8x8 for 1.1.0; the keys say "raw_4x4" for both) and on the 16x16 grid the finding carries; on ONNX Runtime and OpenVINO.
4. Deletion test (faithfulness): on true-positive validation images (pneumonia, flagged at the manifest's
   threshold on calibrated P), the runtime's top-20 %-mass box (edge_runtime.explain) is filled with the image mean
   and P(pneumonia) re-measured; the same for random boxes of the same size (10 positions per image, seeded).
   A win: the map's box lowers P more than the mean of the random boxes. Per variant and engine; on ONNX Runtime
   also the diagnostic variants in DELETION_VARIANTS, and an occlusion map on the map's own grid against the map itself.

    .venv/bin/pip install torch==2.13.0
    .venv/bin/python models/cxr-pneumonia/explain_check.py --data ../shared/data/cxr-kermany --out /tmp/explain.json \
        --overlay docs/cxr-explanation-example.jpg

The log-odds map (pneumonia minus normal: Grad-CAM on the log-odds that P is read from) instead of the pneumonia
map, Grad-CAM, INT8 and deletion test only (about 2 min; for 1.0.0 it was the same map, r >= 0.998, and no better):

    .venv/bin/python models/cxr-pneumonia/explain_check.py --log-odds --out /tmp/explain-log-odds.json

Logits unchanged by the surgery (no torch needed): the shipped files with `cam` and `features` stripped again
(the graphs as they were before it) against the shipped ones:

    mkdir -p /tmp/before && .venv/bin/python -c "from benchmarks.explain import strip_output as s
    for f in ('fp32', 'int8-qdq'):
        s(f'models/cxr-pneumonia/cxr-pneumonia-{f}.onnx', '/tmp/before/x.onnx', 'cam')
        s('/tmp/before/x.onnx', f'/tmp/before/cxr-pneumonia-{f}.onnx', 'features')"
    .venv/bin/python models/cxr-pneumonia/explain_check.py --before /tmp/before
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
    """CXRNet with the ONNX graph's (BatchNorm-folded) conv weights and biases; BatchNorm set to the identity.

    The conv strides and depthwise kernel sizes are read from the graph too, so a model trained with train.py
    --final-stride 1 --spatial-blocks 6 (8x8 final grid, local evidence) and one with the defaults (4x4, 1.0.0)
    are both rebuilt as they were exported."""
    import onnx
    import torch
    from onnx import numpy_helper

    from cxr_net import CXRNet

    graph = onnx.load(str(onnx_path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    convs = [n for n in graph.node if n.op_type == "Conv" and not n.name.startswith("cam_")]
    # Depthwise kernels from the graph too: train.py --spatial-blocks N keeps 3x3 in the first N blocks, 1x1 after.
    depthwise = [inits[n.input[1]].shape[-1] for n in convs
                 if any(a.name == "group" and a.i > 1 for a in n.attribute)]
    spatial_blocks = None if all(k == 3 for k in depthwise) else sum(1 for k in depthwise if k == 3)
    model = CXRNet(spatial_blocks=spatial_blocks).eval()
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
            strides = next((tuple(a.ints) for a in node.attribute if a.name == "strides"), (1, 1))
            conv.stride = strides
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


def class_map(cam: np.ndarray, index: int, kind: str = "class") -> np.ndarray:
    """The map of a [2, h, w] cam output that picks the deletion region. "class": the label's own map (what the
    runtime ships). "log-odds": the label's map minus the other class's, whose spatial mean is the log-odds
    logit_c - logit_other (less the bias difference) that P(label) = sigmoid(...) is read from; it is Grad-CAM on
    the log-odds. With ReLU features both class maps are high wherever features are strong, so the difference could
    separate the classes better: measured in follow_up_log_odds (it does not, here: the two maps are the same map)."""
    c = np.asarray(cam, dtype=np.float32)
    return c[index] if kind == "class" else c[index] - c[1 - index]


def grad_cam_log_odds(model, x: np.ndarray) -> np.ndarray:
    """Grad-CAM [h, w] of the log-odds logit[pneumonia] - logit[normal] (P(pneumonia) is its sigmoid)."""
    import torch

    store = {}
    hook = model.features.register_forward_hook(lambda _m, _i, out: store.__setitem__("f", out))
    try:
        logits = model(torch.from_numpy(x))
    finally:
        hook.remove()
    f = store["f"]
    (grad,) = torch.autograd.grad(logits[0, POSITIVE] - logits[0, 1 - POSITIVE], f)
    alpha = grad.mean(dim=(2, 3), keepdim=True)
    return torch.relu((alpha * f).sum(dim=1))[0].detach().numpy()


def follow_up_log_odds(manifest, variants, images, xs, labels, n_gradcam: int, tp_limit: int | None) -> dict:
    """The log-odds map (class_map "log-odds"): Grad-CAM agreement, INT8 vs FP32, deletion test (P and log-odds,
    ties apart), FP32 and INT8 on both engines; and the pneumonia-only map's deletion test on the same images."""
    spec = manifest.preprocess
    model_hw = (spec.height, spec.width)
    engines = {(vid, kind): load_engine(kind, variants[vid].path, manifest.input.shape, EngineOptions(threads=2))
               for vid in ("fp32", "int8-qdq") for kind in ("onnxruntime", "openvino")}
    outs = {key: [e.run_all(x) for x in xs] for key, e in engines.items()}
    report: dict = {"n_val": len(xs)}
    # Why the two maps may not differ: how far the classifier rows are from W_normal = -W_pneumonia (two-class
    # softmax cross-entropy moves them by opposite gradients), and how alike the maps are per image.
    import onnx
    from onnx import numpy_helper

    w = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(variants["fp32"].path)).graph.initializer}["fc.weight"]
    alike = [pearson(o[2][0, POSITIVE], class_map(o[2][0], POSITIVE, "log-odds")) for o in outs[("fp32", "onnxruntime")]]
    report["class_vs_log_odds_map"] = {
        "fc_rows_pearson": float(np.corrcoef(w[0], w[1])[0, 1]),
        "fc_rows_sum_over_difference_norm": float(np.linalg.norm(w[0] + w[1]) / np.linalg.norm(w[1] - w[0])),
        "map_pearson_fp32_onnxruntime": summary(alike)}
    model, _ = torch_model_from_onnx(variants["fp32"].path)
    step = max(1, len(xs) // n_gradcam)
    picked = list(range(0, len(xs), step))[:n_gradcam]
    for kind in ("onnxruntime", "openvino"):
        diff = 0.0
        for i in picked:
            gc = grad_cam_log_odds(model, xs[i])
            cam = class_map(outs[("fp32", kind)][i][2][0], POSITIVE, "log-odds")
            diff = max(diff, float(np.abs(unit_max(gc) - unit_max(cam)).max()))
        report[f"gradcam_log_odds_{kind}"] = {"images": len(picked), "max_abs_diff_normalised": diff}
    ref = outs[("fp32", "onnxruntime")]
    for kind in ("onnxruntime", "openvino"):
        raw, grid = [], []
        for i, img in enumerate(images):
            a = class_map(ref[i][2][0], POSITIVE, "log-odds")
            b = class_map(outs[("int8-qdq", kind)][i][2][0], POSITIVE, "log-odds")
            raw.append(pearson(a, b))
            geometry = prepare(img, spec)[1]
            try:
                ma, mb = (cam_to_image(a, geometry, model_hw, img.shape[:2]),
                          cam_to_image(b, geometry, model_hw, img.shape[:2]))
            except Exception:
                continue  # no positive evidence in one of them: no grid is shipped
            grid.append(pearson(np.asarray(grid_of(ma)), np.asarray(grid_of(mb))))
        report[f"int8_vs_fp32_log_odds_{kind}"] = {"pearson_raw_4x4": summary(raw), "pearson_grid_16x16": summary(grid)}
    for key, engine in engines.items():
        t0 = time.time()
        report[f"deletion_log_odds_{key[0]}_{key[1]}"] = deletion_test(engine, images, xs, labels, manifest,
                                                                       map_kind="log-odds", limit=tp_limit)
        report[f"deletion_log_odds_{key[0]}_{key[1]}"]["seconds"] = time.time() - t0
        print(key, json.dumps(report[f"deletion_log_odds_{key[0]}_{key[1]}"]), flush=True)
    report["deletion_class_fp32_onnxruntime"] = deletion_test(engines[("fp32", "onnxruntime")], images, xs, labels,
                                                              manifest, map_kind="class", limit=tp_limit)
    return report


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


# Region variants of the deletion test. "box-mean" is the test; the others look for what the result depends
# on: the region as the top 20 % of the map's area (a pixel set, compared with the same set shifted cyclically to a
# random place), and a blurred copy of the image as the fill instead of the flat mean (a flat grey patch in a lung
# looks like an opacity).
DELETION_VARIANTS = ("box-mean", "box-blur", "area20-mean", "area20-blur")


def _margin(logits: np.ndarray) -> float:
    z = np.asarray(logits, dtype=np.float64).ravel()
    return float(z[POSITIVE] - z[1 - POSITIVE])


def deletion_test(engine, images, xs, labels, manifest, variants=("box-mean",), rng_seed: int = 0,
                  map_kind: str = "class", limit: int | None = None) -> dict:
    """Map region vs random regions of the same size on the engine's own true positives, per region variant.

    map_kind: which map of the cam output gives the region (edge_runtime.explain.class_map). limit: stop after this
    many true positives (in validation order). On P a tie (the map's drop equal to the random drop, both usually 0
    when P is 1.0 in float64) is counted apart; on the log-odds (logit margin) nothing saturates."""
    import cv2

    spec = manifest.preprocess
    model_hw = (spec.height, spec.width)
    temperature, threshold = manifest.decision.temperature, manifest.decision.threshold
    top_mass = float(manifest.raw["explanation"].get("top_mass", 0.2))
    rng = np.random.default_rng(rng_seed)
    stats = {v: {"win_p": 0, "tie_p": 0, "win_margin": 0, "draws_won": 0, "draws_tied": 0, "draws_won_margin": 0,
                 "draws": 0, "d_cam": [], "d_rand": [], "dz_cam": [], "dz_rand": []} for v in variants}
    n, box_area, saturated = 0, [], 0

    def scores(img: np.ndarray) -> tuple[float, float]:
        logits = engine.run(prepare(img, spec)[0])
        return calibrated_p(logits, temperature), _margin(logits)

    for img, x, label in zip(images, xs, labels):
        if label != POSITIVE:
            continue
        out = engine.run_all(x)
        p0, z0 = calibrated_p(out[0], temperature), _margin(out[0])
        if p0 < threshold:
            continue
        if limit is not None and n >= limit:
            break
        n += 1
        saturated += p0 == 1.0
        h, w = img.shape[:2]
        m = cam_to_image(class_map(out[2][0], POSITIVE, map_kind), prepare(img, spec)[1], model_hw, img.shape[:2])
        box = top_mass_box(m, img.shape[:2], top_mass)
        box_area.append(box.width * box.height / float(w * h))
        full = cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR)
        area = full >= np.quantile(full, 0.8)
        fills = {"mean": np.full_like(img, np.uint8(round(float(img.mean())))), "blur": cv2.GaussianBlur(img, (0, 0), 12)}

        def box_mask(bx: int, by: int) -> np.ndarray:
            k = np.zeros(img.shape[:2], bool)
            k[by: by + box.height, bx: bx + box.width] = True
            return k

        for variant in variants:
            shape, fill = variant.split("-")
            if shape == "box":
                region = box_mask(box.x, box.y)
                randoms = [box_mask(int(rng.integers(0, w - box.width + 1)), int(rng.integers(0, h - box.height + 1)))
                           for _ in range(RANDOM_BOXES)]
            else:
                region = area
                randoms = [np.roll(area, (int(rng.integers(0, h)), int(rng.integers(0, w))), (0, 1))
                           for _ in range(RANDOM_BOXES)]

            def deleted(k: np.ndarray) -> tuple[float, float]:
                im = img.copy()
                im[k] = fills[fill][k]
                p, z = scores(im)
                return p0 - p, z0 - z

            dp, dz = deleted(region)
            rand = [deleted(k) for k in randoms]
            st = stats[variant]
            mean_p, mean_z = float(np.mean([r[0] for r in rand])), float(np.mean([r[1] for r in rand]))
            st["win_p"] += dp > mean_p
            st["tie_p"] += dp == mean_p
            st["win_margin"] += dz > mean_z
            st["draws_won"] += sum(dp > r[0] for r in rand)  # per box: P and margin rank alike, except P's ties
            st["draws_tied"] += sum(dp == r[0] for r in rand)
            st["draws_won_margin"] += sum(dz > r[1] for r in rand)
            st["draws"] += len(rand)
            st["d_cam"].append(dp)
            st["d_rand"].append(mean_p)
            st["dz_cam"].append(dz)
            st["dz_rand"].append(mean_z)
    report = {"map": map_kind, "true_positives": n, "random_regions_per_image": RANDOM_BOXES,
              "p_exactly_1_in_float64": saturated, "median_box_area_fraction": float(np.median(box_area))}
    for variant, st in stats.items():
        ties = st["tie_p"]
        report[variant] = {"win_rate_vs_mean_of_random_p": st["win_p"] / n,
                           "tie_rate_vs_mean_of_random_p": ties / n,
                           "win_rate_vs_mean_of_random_p_ties_left_out": st["win_p"] / max(1, n - ties),
                           "win_rate_vs_mean_of_random_margin": st["win_margin"] / n,
                           "win_rate_per_random_region": st["draws_won"] / st["draws"],
                           "tie_rate_per_random_region_p": st["draws_tied"] / st["draws"],
                           "win_rate_per_random_region_margin": st["draws_won_margin"] / st["draws"],
                           "median_p_drop_map_region": float(np.median(st["d_cam"])),
                           "median_p_drop_random_region": float(np.median(st["d_rand"])),
                           "median_margin_drop_map_region": float(np.median(st["dz_cam"])),
                           "median_margin_drop_random_region": float(np.median(st["dz_rand"]))}
    return report


def occlusion_agreement(engine, images, xs, labels, manifest, limit: int = 200) -> dict:
    """Each block of the image under one cell of the map's grid (4x4 or 8x8) filled with the image mean in turn: the
    logit-margin drop per block against the map's pneumonia-minus-normal value of the same cell (Pearson r per image, argmax agreement)."""
    spec = manifest.preprocess
    rs, agree, n = [], 0, 0
    for img, x, label in zip(images, xs, labels):
        if label != POSITIVE or n >= limit:
            continue
        out = engine.run_all(x)
        z0 = _margin(out[0])
        if z0 <= 0:
            continue
        n += 1
        h, w = img.shape[:2]
        fill = np.uint8(round(float(img.mean())))
        gh, gw = out[2].shape[2:]
        drop = np.zeros((gh, gw))
        for i in range(gh):
            for j in range(gw):
                im = img.copy()
                im[i * h // gh:(i + 1) * h // gh, j * w // gw:(j + 1) * w // gw] = fill
                drop[i, j] = z0 - _margin(engine.run(prepare(im, spec)[0]))
        cam = out[2][0, POSITIVE] - out[2][0, 1 - POSITIVE]
        rs.append(pearson(drop, cam))
        agree += int(np.argmax(drop) == np.argmax(cam))
    return {"images": n, "pearson_r": summary(rs), "argmax_cell_agreement": agree / n}


def identity_check(manifest, before: Path, xs: list[np.ndarray]) -> dict:
    """Max |difference| of every output the old file has, old file vs shipped file, per variant and engine."""
    out = {}
    for v in manifest.variants:
        for kind in ("onnxruntime", "openvino"):
            old = load_engine(kind, before / v.path.name, manifest.input.shape, EngineOptions(threads=2))
            new = load_engine(kind, v.path, manifest.input.shape, EngineOptions(threads=2))
            diffs = {name: 0.0 for name in old.output_names}
            for x in xs:
                a, b = old.run_all(x), dict(zip(new.output_names, new.run_all(x)))
                for name, value in zip(old.output_names, a):
                    diffs[name] = max(diffs[name], float(np.abs(value - b[name]).max()))
            out[f"{v.id}_{kind}"] = {"images": len(xs), "max_abs_diff": diffs, "new_outputs": new.output_names}
    return out


def main(argv: list[str] | None = None) -> int:
    from quantize.datasets import cxr_items

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=HERE.parents[2] / "shared" / "data" / "cxr-kermany")
    ap.add_argument("--n-gradcam", type=int, default=100)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--overlay", type=Path, help="write one overlay JPEG (the card's example) here")
    ap.add_argument("--log-odds", action="store_true",
                    help="only the log-odds map's measurements (Grad-CAM, INT8, deletion test), see follow_up_log_odds")
    ap.add_argument("--tp-limit", type=int, help="deletion test on the first N true positives only")
    ap.add_argument("--before", type=Path, help="only compare the outputs with the files before the surgery in this folder")
    args = ap.parse_args(argv)
    t_start = time.time()
    manifest = ModelRegistry().get("cxr-pneumonia")
    spec = manifest.preprocess
    model_hw = (spec.height, spec.width)
    items = cxr_items(args.data, "val")
    images = [open_input(p).frame(0, manifest.windowing) for p, _ in items]
    labels = [lbl for _, lbl in items]
    xs = [prepare(img, spec)[0] for img in images]
    if args.before:
        print(json.dumps(identity_check(manifest, args.before, xs[:40]), indent=2))
        return 0
    variants = {v.id: v for v in manifest.variants}
    for v in variants.values():
        verify_variant(manifest, v)
    if args.log_odds:
        report = follow_up_log_odds(manifest, variants, images, xs, labels, args.n_gradcam, args.tp_limit)
        report["seconds"] = time.time() - t_start
        text = json.dumps(report, indent=2)
        print(text)
        if args.out:
            args.out.write_text(text + "\n")
        return 0
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
        variants = DELETION_VARIANTS if key[1] == "onnxruntime" else ("box-mean",)
        report[f"deletion_{key[0]}_{key[1]}"] = deletion_test(engine, images, xs, labels, manifest, variants)
    report["occlusion_fp32_onnxruntime"] = occlusion_agreement(engines[("fp32", "onnxruntime")], images, xs, labels,
                                                               manifest)

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
