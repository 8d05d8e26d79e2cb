"""Add the class activation map of each class to a classifier graph as an output named "cam".

For a network that ends in global average pooling and a linear layer, logit_c = b_c + mean_hw(sum_k W[c,k] F_k[h,w]),
so the map M_c[h,w] = sum_k W[c,k] F_k[h,w] is exactly the per-position share of the logit (Zhou et al. 2016). Its
spatial mean plus the bias is the logit. Grad-CAM on the logit of such a network gives the same map: d logit_c /
d F_k[h,w] = W[c,k] / (H W), so Grad-CAM = ReLU(M_c) / (H W), equal after normalisation. Autograd cannot be exported
to ONNX, but this map needs none: it is one 1x1 convolution with the classifier's own weights on the final feature
maps, computed in the graph at the cost of a 384 -> 2 channel 1x1 conv on the final grid (8x8 for cxr-pneumonia 1.1.0).

The surgery reuses the graph's tensors (no weights are copied: the Gemm's weight, or in a QDQ graph its
DequantizeLinear output, is reshaped to a [C, K, 1, 1] kernel), and it only adds nodes, so the logit path is
untouched. The map carries no bias (the bias is the same at every position).

    python -m quantize.cam_output models/cxr-pneumonia

Idempotent: a graph that already has "cam" is left alone. Prints each file's new sha256 for the manifest.
"""
from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

CAM = "cam"


def _producers(graph) -> dict[str, object]:
    return {o: n for n in graph.node for o in n.output}


def find_head(graph, logits: str) -> tuple[str, str, bool]:
    """(final feature maps F, classifier weight tensor, transB) of the GAP -> Flatten -> Gemm head producing logits.

    Walks back from the logits through any Quantize/DequantizeLinear pairs (a QDQ graph wraps every tensor)."""
    prod = _producers(graph)

    def through_qdq(name: str):
        node = prod.get(name)
        while node is not None and node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            name = node.input[0]
            node = prod.get(name)
        return node

    gemm = through_qdq(logits)
    if gemm is None or gemm.op_type != "Gemm":
        raise ValueError(f"logits {logits!r} do not come from a Gemm (found {gemm.op_type if gemm else 'nothing'})")
    attrs = {a.name: a for a in gemm.attribute}
    if "transA" in attrs and attrs["transA"].i:
        raise ValueError("Gemm with transA is not a plain linear classifier")
    trans_b = bool(attrs["transB"].i) if "transB" in attrs else False
    flatten = through_qdq(gemm.input[0])
    if flatten is None or flatten.op_type != "Flatten":
        raise ValueError("the classifier's input is not a Flatten of a global average pool")
    pool = through_qdq(flatten.input[0])
    if pool is None or pool.op_type != "GlobalAveragePool":
        raise ValueError("the classifier's input is not a global average pool")
    return pool.input[0], gemm.input[1], trans_b


def add_onnx_cam(path: Path, logits: str = "logits") -> bool:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    if any(o.name == CAM for o in graph.output):
        return False
    features, weight, trans_b = find_head(graph, logits)
    shape = _weight_shape(graph, weight)
    n_classes, width = (shape[0], shape[1]) if trans_b else (shape[1], shape[0])
    nodes = []
    if not trans_b:
        nodes.append(helper.make_node("Transpose", [weight], ["cam_weight_t"], name="cam_transpose", perm=[1, 0]))
        weight = "cam_weight_t"
    graph.initializer.append(numpy_helper.from_array(np.array([n_classes, width, 1, 1], dtype=np.int64),
                                                     "cam_kernel_shape"))
    nodes.append(helper.make_node("Reshape", [weight, "cam_kernel_shape"], ["cam_kernel"], name="cam_kernel"))
    nodes.append(helper.make_node("Conv", [features, "cam_kernel"], [CAM], name="cam_conv", kernel_shape=[1, 1]))
    graph.node.extend(nodes)
    graph.output.append(helper.make_tensor_value_info(CAM, TensorProto.FLOAT, [1, n_classes, None, None]))
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return True


def _weight_shape(graph, name: str) -> tuple[int, int]:
    """Shape of the classifier weight: an initializer, or the DequantizeLinear of one in a QDQ graph."""
    inits = {i.name: tuple(i.dims) for i in graph.initializer}
    if name in inits:
        return inits[name]
    node = _producers(graph).get(name)
    if node is not None and node.op_type == "DequantizeLinear" and node.input[0] in inits:
        return inits[node.input[0]]
    raise ValueError(f"classifier weight {name!r} is neither an initializer nor a DequantizeLinear of one")


def main(argv: list[str] | None = None) -> int:
    from edge_runtime.registry import sha256_file

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", type=Path)
    args = ap.parse_args(argv)
    manifest = tomllib.loads((args.folder / "manifest.toml").read_text())
    for v in manifest["variants"]:
        if v["format"] != "onnx":
            print(f"{v['id']}: {v['format']} is not handled (convert from the ONNX file after this step)")
            continue
        path = args.folder / v["file"]
        changed = add_onnx_cam(path, manifest["output"]["name"])
        print(f"{v['id']}: {'added' if changed else 'already has'} '{CAM}'; sha256 {sha256_file(path)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
