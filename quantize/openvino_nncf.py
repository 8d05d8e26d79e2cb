"""NNCF post-training quantization of an FP32 ONNX model to an OpenVINO IR pair (.xml + .bin).

The ONNX model is read by OpenVINO, quantized by NNCF with the same calibration tensors as the ORT path (the
runtime's preprocessing), and saved without FP16 weight compression so the layers NNCF leaves in floating
point keep their FP32 weights. Which precision those layers then run in is a load-time choice
(INFERENCE_PRECISION_HINT); the evaluation measures them with f32, like the runtime's default.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from quantize.calibration import CalibrationSet

PRESETS = ("performance", "mixed")
# Activation ranges: NNCF's default averages each sample's min/max over the calibration set ("mean"), which
# clips every sample beyond the average; that hurts per-image quantities such as pooled features and logits
# (a brighter-than-average image saturates). "minmax" takes the global min/max, like ORT's MinMax.
RANGES = ("mean", "minmax")


def nncf_available() -> bool:
    try:
        import nncf  # noqa: F401
    except ImportError:
        return False
    return True


def quantize_openvino(
    fp32: Path,
    out_xml: Path,
    calib: CalibrationSet,
    preset: str = "mixed",
    fast_bias_correction: bool = True,
    activation_range: str = "mean",
) -> dict[str, Any]:
    """Quantize with NNCF; writes out_xml and its .bin. Returns what was done (for the manifest).

    preset "mixed" = symmetric int8 weights, asymmetric activations (suits ReLU outputs); "performance" =
    symmetric everywhere.
    """
    try:
        import nncf
    except ImportError:
        raise RuntimeError("nncf is not installed: pip install 'edge-runtime[quantize]' (or pip install nncf)") from None
    import openvino as ov

    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    if activation_range not in RANGES:
        raise ValueError(f"activation range must be one of {', '.join(RANGES)}, got {activation_range!r}")
    if len(calib) == 0:
        raise ValueError("empty calibration set")
    out_xml = Path(out_xml)
    if out_xml.suffix != ".xml":
        raise ValueError(f"OpenVINO IR output must end in .xml, got {out_xml.name}")
    out_xml.parent.mkdir(parents=True, exist_ok=True)
    model = ov.Core().read_model(str(fp32))
    dataset = nncf.Dataset(calib.tensors)
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    # 7-bit weights in every layer (NNCF's default does the first layer only): an x86 CPU without VNNI saturates
    # 16-bit sums of u8 x s8 products otherwise (see quantize/ort_static.py, reduce_range).
    options: dict[str, Any] = {"overflow_fix": OverflowFix.ENABLE}
    if activation_range == "minmax":
        from nncf.quantization.range_estimator import RangeEstimatorParametersSet

        options["activations_range_estimator_params"] = RangeEstimatorParametersSet.MINMAX
    advanced = AdvancedQuantizationParameters(**options)
    quantized = nncf.quantize(
        model,
        dataset,
        preset=nncf.QuantizationPreset.MIXED if preset == "mixed" else nncf.QuantizationPreset.PERFORMANCE,
        subset_size=len(calib),
        fast_bias_correction=fast_bias_correction,
        advanced_parameters=advanced,
    )
    ov.save_model(quantized, str(out_xml), compress_to_fp16=False)
    fq = sum(1 for op in quantized.get_ops() if op.get_type_name() == "FakeQuantize")
    conv = sum(1 for op in quantized.get_ops() if op.get_type_name() in ("Convolution", "GroupConvolution", "MatMul"))
    return {
        "tool": f"nncf {nncf.__version__} quantize, openvino {ov.__version__}",
        "format": "OpenVINO IR (FakeQuantize)",
        "preset": preset,
        "fast_bias_correction": fast_bias_correction,
        "activation_range": "global min/max" if activation_range == "minmax" else "mean of per-sample min/max (NNCF default)",
        "subset_size": len(calib),
        "fake_quantize_ops": fq,
        "compute_ops": conv,
        "weights_compression": "none (fp32 weights for the layers left in floating point)",
        "overflow_fix": "enable (7-bit weights in every layer: no saturation without VNNI)",
    }


def weights_path(xml: Path) -> Path:
    return Path(xml).with_suffix(".bin")
