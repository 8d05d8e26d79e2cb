"""ONNX Runtime static quantization to QDQ: uint8 activations, int8 per-channel weights.

Why these settings (measured on the 2-vCPU build machine, see ENGINE-NOTES): int8 activations (S8S8) left
many convolutions in FP32 and gave no speed-up; uint8 activations with int8 per-channel weights quantize every
Conv. The model pre-processing step (symbolic shape inference + graph optimisation) runs first, as ORT
recommends. Dynamic quantization is never used: it is 10-15x slower than FP32 for CNNs. QDQ (not QOperator)
is the format because OpenVINO reads QDQ and runs it as int8, but cannot read QLinearConv.

Histogram methods (Entropy, Percentile) collect every intermediate tensor of every sample; the samples are
fed in chunks (ORT's strided collection) so a U-Net with a few hundred samples stays within memory.
"""
from __future__ import annotations

import logging
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from quantize.calibration import CalibrationSet, ort_reader

METHODS = ("minmax", "entropy", "percentile")
DEFAULT_PERCENTILE = 99.999
_CHUNK = 16  # samples per calibration chunk


def _chunk(n: int, most: int = _CHUNK) -> int:
    """Largest chunk size <= most that divides n (ORT requires equal chunks)."""
    return max(d for d in range(1, min(n, most) + 1) if n % d == 0)


def preprocess_model(fp32: Path, out: Path) -> Path:
    """ORT's quantization pre-processing: shape inference and graph optimisation (folds BN etc.)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(fp32), str(out), skip_symbolic_shape=False)
    return out


def quantize_ort(
    fp32: Path,
    out: Path,
    calib: CalibrationSet,
    method: str = "minmax",
    percentile: float = DEFAULT_PERCENTILE,
    nodes_to_exclude: list[str] | None = None,
    reduce_range: bool = True,
) -> dict[str, Any]:
    """Quantize an FP32 ONNX model to a QDQ INT8 ONNX file; returns what was done (for the manifest).

    `reduce_range` (the default) keeps weights to 7 bits: on an x86 CPU without VNNI both ONNX Runtime and OpenVINO
    multiply u8 x s8 pairs into 16-bit sums that saturate with full-range weights (255 x 127 x 2 > 32767), and the
    variant then computes something else there (BENCHMARKS.md, "INT8 on a CPU without VNNI"). Full range (False)
    is for boards known to have VNNI or AMX; its manifest entry must then say `cpu_requires = ["vnni"]`."""
    import onnx
    import onnxruntime
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method not in METHODS:
        raise ValueError(f"calibration method must be one of {', '.join(METHODS)}, got {method!r}")
    if len(calib) == 0:
        raise ValueError("empty calibration set")
    fp32, out = Path(fp32), Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    input_name = onnx.load(str(fp32), load_external_data=False).graph.input[0].name
    extra: dict[str, Any] = {
        # Histogram methods: uint8 activations want the real (mostly non-negative) range, not a symmetric one.
        "CalibTensorRangeSymmetric": False,
        "CalibStridedMinMax": _chunk(len(calib)),
    }
    if method == "percentile":
        extra["CalibPercentile"] = float(percentile)
    calibrate_method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[method]
    with tempfile.TemporaryDirectory(prefix="edge-quantize-") as tmp:
        pre = preprocess_model(fp32, Path(tmp) / "preprocessed.onnx")
        level = logging.getLogger().level  # quantize_static logs chatty warnings on the root logger
        logging.getLogger().setLevel(logging.ERROR)
        try:
            quantize_static(
                str(pre),
                str(out),
                ort_reader(calib, input_name),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=reduce_range,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=calibrate_method,
                nodes_to_exclude=nodes_to_exclude or [],
                extra_options=extra,
            )
        finally:
            logging.getLogger().setLevel(level)
    summary = graph_summary(out)
    info: dict[str, Any] = {
        "tool": f"onnxruntime {onnxruntime.__version__} quantize_static",
        "format": "QDQ",
        "activations": "uint8 (asymmetric, per-tensor)",
        "weights": "int8 (symmetric, per-channel" + (", 7-bit range: no saturation without VNNI)" if reduce_range
                                                     else ", full 8-bit range: needs VNNI/AMX on x86)"),
        "calibration_method": method,
        "pre_process": "onnxruntime.quantization.shape_inference.quant_pre_process",
        **summary,
    }
    if method == "percentile":
        info["percentile"] = float(percentile)
    return info


def graph_summary(path: Path) -> dict[str, Any]:
    """Which compute ops ended up between QDQ pairs: quantized vs. total per op type."""
    import onnx

    model = onnx.load(str(path))
    nodes = list(model.graph.node)
    produced_by_dq = {o for n in nodes if n.op_type == "DequantizeLinear" for o in n.output}
    compute = ("Conv", "ConvTranspose", "Gemm", "MatMul")
    total = Counter(n.op_type for n in nodes if n.op_type in compute)
    quantized = Counter(n.op_type for n in nodes if n.op_type in compute and n.input and n.input[0] in produced_by_dq)
    return {
        "quantized_ops": ", ".join(f"{op} {quantized[op]}/{total[op]}" for op in sorted(total)),
        "fp32_compute_ops": int(sum(total.values()) - sum(quantized.values())),
    }
