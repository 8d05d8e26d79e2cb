"""Expose a model's own penultimate features as a second graph output named "features".

The content scope gate (edge_runtime.scope) measures how far an input's features lie from the training
set's. Reading them from the shipped graph itself needs no retraining and no second model. One layer is not
enough: the classifier's pooled penultimate vector is semantic (it separates normal from pneumonia) and lets
through 3/4 of fetal ultrasound images, while early feature maps describe texture and contrast and refuse
them all. So "features" is the concatenation of several stages, each averaged over space: for the chest
classifier one block per resolution stage, for the U-Net the encoder stages down
to the bottleneck. Spatial means forget where things are, and the chest classifier 1.1.0 sees only 59 px
patches (its map is local evidence, issue 15): so it also gets "image@8x8", the input's 8x8 block means (64
values), the coarse layout that tells a chest film from an ultrasound fan or a photograph. Every variant gets the same
output (FP32 ONNX, INT8 QDQ ONNX, OpenVINO IR), so the gate works whichever one the budget runs; the first
output is untouched, so every accuracy figure measured before still holds.

    python -m quantize.scope_features models/cxr-pneumonia
    python -m quantize.scope_features models/fetal-head

Idempotent: a graph that already has "features" is left alone. Print the new sha256 of each file changed;
the manifest's sha256 keys must be updated to them (the script says which).
"""
from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

FEATURES = "features"
FETAL_STAGES = (0, 1, 2, 3, 4)

# Per model: the FP32 tensors whose spatial means (a 2-D tensor is taken as it is) make up the features.
SOURCES = {
    "cxr-pneumonia": (
        "/features/features.2/body/body.2/body.2.0/Conv_output_0",
        "/features/features.6/body/body.2/body.2.0/Conv_output_0",
        "/features/features.10/Add_output_0",
        # 1.0.0 also had "/Flatten_output_0", the pooled penultimate vector: in 1.1.0 a few rarely firing channels
        # of it move 6-7 training standard deviations under INT8, so every INT8 input read as out of scope; the
        # early stages and the layout refuse every negative without it (quantize/scope_fit.py measures it).
        "image@8x8",
    ),
    "fetal-head": tuple(f"/enc.{i}/enc.{i}.1/enc.{i}.1.2/Relu_output_0" for i in FETAL_STAGES),
}
# The same tensors in an OpenVINO IR converted by NNCF (the FakeQuantize after each activation).
OV_SOURCES = {
    "fetal-head": tuple(f"/enc.{i}/enc.{i}.1/enc.{i}.1.2/Relu/fq_output_0" for i in FETAL_STAGES),
}


def add_onnx_features(path: Path, tensors: tuple[str, ...]) -> bool:
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(path))
    graph = model.graph
    if any(o.name == FEATURES for o in graph.output):
        return False
    produced = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    pooled = []
    for i, tensor in enumerate(tensors):
        if "@" in tensor:  # "<tensor>@<h>x<w>": its channel mean on an h x w grid, a coarse layout of the input
            name, grid = tensor.split("@")
            gh, gw = (int(v) for v in grid.split("x"))
            shape = next(d for d in graph.input if d.name == name).type.tensor_type.shape.dim
            h, w = shape[2].dim_value, shape[3].dim_value
            if not h or not w or h % gh or w % gw:
                raise SystemExit(f"{path}: {name} is {h}x{w}, not divisible into {gh}x{gw}")
            graph.node.append(helper.make_node("AveragePool", [name], [f"features_grid{i}"], name=f"features_grid{i}",
                                               kernel_shape=[h // gh, w // gw], strides=[h // gh, w // gw]))
            graph.node.append(helper.make_node("ReduceMean", [f"features_grid{i}"], [f"features_cmean{i}"],
                                               name=f"features_cmean{i}", axes=[1], keepdims=1))
            graph.node.append(helper.make_node("Flatten", [f"features_cmean{i}"], [f"features_{i}"],
                                               name=f"features_flat{i}"))
            pooled.append(f"features_{i}")
            continue
        # In a QDQ graph the float value downstream layers read is the DequantizeLinear output.
        dq = f"{tensor}_DequantizeLinear_Output"
        src = dq if dq in produced else tensor
        if src not in produced:
            raise SystemExit(f"{path}: tensor {tensor} not found; is this the model the script knows?")
        if tensor.endswith("Flatten_output_0"):
            pooled.append(src)
            continue
        graph.node.append(helper.make_node("GlobalAveragePool", [src], [f"features_gap{i}"], name=f"features_gap{i}"))
        graph.node.append(helper.make_node("Flatten", [f"features_gap{i}"], [f"features_{i}"],
                                           name=f"features_flat{i}"))
        pooled.append(f"features_{i}")
    graph.node.append(helper.make_node("Concat", pooled, [FEATURES], name="features_concat", axis=1))
    graph.output.append(helper.make_tensor_value_info(FEATURES, TensorProto.FLOAT, [1, None]))
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return True


def add_openvino_features(xml: Path, op_names: tuple[str, ...]) -> bool:
    import numpy as np
    import openvino as ov
    import openvino.opset13 as ops

    core = ov.Core()
    model = core.read_model(str(xml))
    if any(FEATURES in o.get_names() for o in model.outputs):
        return False
    by_name = {op.get_friendly_name(): op for op in model.get_ops()}
    pooled = []
    for name in op_names:
        if name not in by_name:
            raise SystemExit(f"{xml}: op {name} not found")
        pooled.append(ops.reduce_mean(by_name[name].output(0), np.array([2, 3], dtype=np.int64), keep_dims=False))
    result = ops.result(ops.concat(pooled, axis=1))
    result.output(0).get_tensor().set_names({FEATURES})
    model.add_results([result])
    tmp = xml.with_suffix(".tmp.xml")
    ov.save_model(model, str(tmp), compress_to_fp16=False)
    tmp.replace(xml)
    tmp.with_suffix(".bin").replace(xml.with_suffix(".bin"))
    return True


def main(argv: list[str] | None = None) -> int:
    from edge_runtime.registry import sha256_file

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", type=Path)
    args = ap.parse_args(argv)
    manifest = tomllib.loads((args.folder / "manifest.toml").read_text())
    name = manifest["name"]
    tensors = SOURCES[name]
    for v in manifest["variants"]:
        path = args.folder / v["file"]
        if v["format"] == "onnx":
            changed = add_onnx_features(path, tensors)
        else:
            changed = add_openvino_features(path, OV_SOURCES[name])
        print(f"{v['id']}: {'added' if changed else 'already has'} '{FEATURES}'; sha256 {sha256_file(path)}")
        if v.get("weights"):
            print(f"{v['id']}: weights sha256 {sha256_file(args.folder / v['weights'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
