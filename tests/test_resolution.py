"""Resolution-aware decoding (imaging.resolution, imaging.openjpeg): the size rule, the exact block mean, OpenJPEG's
resolution levels, the fall-backs, and equivalence with the full decode on the shared real files: the chest
model's probability within 0.02 and the fetal model's head circumference within 0.5 mm."""
from __future__ import annotations

import csv
import json

import cv2
import numpy as np
import pytest
from conftest import CR_CHEST, DICOM_DIR, SHARED_DATA, needs_shared
from test_cli import edge, findings

from edge_runtime.engines import EngineOptions
from edge_runtime.errors import InputError
from edge_runtime.frames import Frame
from edge_runtime.imaging import openjpeg
from edge_runtime.imaging.dicom import DicomImage
from edge_runtime.imaging.inputs import open_input
from edge_runtime.imaging.preprocess import PreprocessSpec, decode_hint
from edge_runtime.imaging.resolution import DecodeHint, DecodeInfo, block_average
from edge_runtime.pipeline import Predictor
from edge_runtime.registry import ModelRegistry

MAX_PROB_DIFF = 0.02
MAX_HC_DIFF_MM = 0.5


# ---------------------------------------------------------------- the size rule
def test_hint_comes_from_the_preprocessing_spec():
    hint = decode_hint(PreprocessSpec(128, 96, resize="letterbox"))
    assert hint == DecodeHint(128, 96, "letterbox")


def test_stretch_keeps_twice_the_model_input_on_each_side():
    hint = DecodeHint(128, 128)
    assert hint.max_factor(1955, 1841) == pytest.approx(1841 / 256)
    assert hint.power_of_two_level(1955, 1841) == 2  # JPEG 2000 1/4 = 489 x 461; 1/8 would be 245 x 231 < 256
    # box-filter routes keep 4x: 652 x 614 >= 512 x 512 (7, at 2x, moved RG1_UNCR's probability by 0.032)
    assert hint.max_factor(1955, 1841, box=True) == pytest.approx(1841 / 512)
    assert hint.block_factor(1955, 1841) == 3 and hint.power_of_two_level(1955, 1841, box=True) == 1
    assert hint.block_factor(480, 640) == 1 and hint.power_of_two_level(480, 640) == 0
    # an integer ratio left for the final area resize is preferred: 2048x1536 -> 128: 2 (exact), not 3
    assert hint.block_factor(1536, 2048) == 2
    assert DecodeHint(128, 128, margin=4.0).power_of_two_level(1955, 1841) == 1  # a larger margin keeps more


def test_the_models_own_decode_margin_wins_over_a_smaller_configured_one(tmp_path):
    from edge_runtime.errors import ConfigError
    from edge_runtime.registry import parse_manifest

    spec = PreprocessSpec(128, 128, decode_margin=4.0)
    assert decode_hint(spec, 2.0).margin == 4.0 and decode_hint(spec, 8.0).margin == 8.0
    assert decode_hint(spec).power_of_two_level(1955, 1841) == 1  # not 2, as a 2x margin would give
    assert decode_hint(PreprocessSpec(128, 128)).margin == 2.0  # a manifest without the key: the configured one
    manifest = ModelRegistry().get("cxr-pneumonia")
    assert manifest.preprocess.decode_margin == 4.0  # cxr-pneumonia 1.1.0 (BENCHMARKS.md)
    text = (manifest.folder / "manifest.toml").read_text()
    assert "\ndecode_margin = 4.0\n" in text
    (tmp_path / "manifest.toml").write_text(text.replace("\ndecode_margin = 4.0\n", "\ndecode_margin = 1.5\n"))
    with pytest.raises(ConfigError, match="decode_margin"):
        parse_manifest(tmp_path / "manifest.toml")


def test_letterbox_counts_the_aspect_kept_inner_image():
    hint = DecodeHint(176, 256, "letterbox")
    assert hint.block_factor(540, 800) == 1  # HC18's own size: the inner image is 256 x 173, no room
    assert hint.block_factor(2160, 3200) == 3  # 3200 / 3 = 1067 >= 4 x 256


def test_block_average_is_the_exact_block_mean_including_partial_edges():
    rng = np.random.default_rng(0)
    for shape, dtype in (((37, 53), np.uint16), ((20, 31, 3), np.uint8), ((16, 16), np.int16)):
        info = np.iinfo(dtype)
        arr = rng.integers(max(info.min, -3000), min(info.max, 3000), size=shape).astype(dtype)
        out = block_average(arr, 4)
        assert out.shape[:2] == (-(-shape[0] // 4), -(-shape[1] // 4)) and out.dtype == dtype
        for i in range(out.shape[0]):
            for j in range(out.shape[1]):
                block = arr[i * 4:(i + 1) * 4, j * 4:(j + 1) * 4].astype(np.float64)
                expect = np.rint(block.reshape(-1, *shape[2:]).mean(axis=0))
                assert np.abs(out[i, j].astype(np.float64) - expect).max() <= 1, (shape, i, j)


def test_decode_info_round_trips_through_json():
    info = DecodeInfo("j2k-level-2", 4, (489, 461), (1955, 1841), None)
    assert DecodeInfo.from_dict(json.loads(json.dumps(info.to_dict()))) == info
    assert info.reduced and not DecodeInfo.full((10, 10)).reduced


# ---------------------------------------------------------------- OpenJPEG resolution levels
needs_openjpeg = pytest.mark.skipif(not openjpeg.available(), reason="no libopenjp2 (Debian libopenjp2-7 or Pillow's)")


@needs_openjpeg
def test_openjpeg_levels_on_a_size_not_divisible_by_the_factor():
    import openjpeg as pylibjpeg_openjpeg

    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:333, 0:515]
    arr = ((yy * 7 + xx * 3) % 4096 + rng.integers(0, 16, yy.shape)).astype(np.uint16)
    stream = pylibjpeg_openjpeg.encode(arr, bits_stored=12)  # lossless, 6 decomposition levels by default
    assert np.array_equal(openjpeg.decode(stream, 0), arr)
    quarter = openjpeg.decode(stream, 2)
    assert quarter.shape == (84, 129) and quarter.dtype == np.uint16
    # the 1/4 level is a low-pass image of the same picture, not something else
    ref = block_average(arr, 4).astype(np.float64)
    assert np.abs(quarter.astype(np.float64) - ref).mean() < 20


@needs_openjpeg
def test_openjpeg_refuses_garbage_with_its_own_reason():
    with pytest.raises(openjpeg.J2KError):
        openjpeg.decode(b"\xff\x4f\xff\x51" + b"\x00" * 64, 1)


# ---------------------------------------------------------------- the DICOM routes and their fall-backs
CXR_HINT = DecodeHint(128, 128)


@needs_shared
@needs_openjpeg
def test_j2k_radiograph_decodes_at_a_resolution_level():
    pixels, info = DicomImage(CR_CHEST).decode_frame(0, "voi", CXR_HINT)
    assert info.path == "j2k-level-2" and info.factor == 4
    assert pixels.shape == (489, 461) == info.size and info.full_size == (1955, 1841)


@needs_shared
def test_uncompressed_radiograph_is_block_averaged_from_the_pixel_data():
    pixels, info = DicomImage(DICOM_DIR / "pydicom-data" / "RG1_UNCR.dcm").decode_frame(0, "voi", CXR_HINT)
    assert info.path == "strided-block-average-3" and pixels.shape == (652, 614)


@needs_shared
def test_a_failing_reduced_decode_falls_back_to_the_full_decode(monkeypatch):
    def broken(data, reduce=0):
        raise openjpeg.J2KError("tile 0: corrupt code-block (simulated)")

    monkeypatch.setattr(openjpeg, "decode", broken)
    pixels, info = DicomImage(DICOM_DIR / "pydicom-data" / "RG3_J2KR.dcm").decode_frame(0, "voi", CXR_HINT)
    assert info.path.startswith("block-average-") and "corrupt code-block" in info.reason
    assert pixels.shape == info.size


@needs_shared
def test_a_file_bad_in_full_too_is_still_declared_bad(tmp_path):
    data = bytearray((DICOM_DIR / "pydicom-data" / "RG3_J2KR.dcm").read_bytes())
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(bytes(data[: len(data) - 200_000]) + bytes(data[-2:]))  # cut the codestream's middle out
    with pytest.raises(InputError):
        DicomImage(bad).decode_frame(0, "voi", CXR_HINT)


@needs_shared
def test_palette_and_small_images_are_decoded_whole_with_the_reason():
    _, info = DicomImage(DICOM_DIR / "pydicom-data" / "OBXXXX1A.dcm").decode_frame(0, "voi", CXR_HINT)
    assert info.path == "full" and "PALETTE" in info.reason
    _, info = DicomImage(DICOM_DIR / "pydicom-data" / "US1_J2KR.dcm").decode_frame(0, "voi", CXR_HINT)
    assert info.path == "full" and "within 2x" in info.reason


# ---------------------------------------------------------------- equivalence with the real models
@pytest.fixture(scope="module")
def registry() -> ModelRegistry:
    return ModelRegistry()


@pytest.fixture(scope="module")
def cxr(registry) -> Predictor:
    return Predictor.load(registry, "cxr-pneumonia", "onnxruntime", "fp32", EngineOptions(threads=2, warmup_runs=1))


@pytest.fixture(scope="module")
def fetal(registry) -> Predictor:
    return Predictor.load(registry, "fetal-head", "onnxruntime", "fp32", EngineOptions(threads=2, warmup_runs=1))


def _predict(p: Predictor, path, reduced: bool, spacing=None):
    inp = open_input(path, hint=p.decode_hint() if reduced else None)
    pixels, info = inp.decoded(0, p.manifest.windowing)
    frame = Frame(pixels, "file", str(path), pixel_spacing_mm=spacing or inp.pixel_spacing_mm, decode=info)
    return p.predict(frame).head.result, info


def _prob(result: dict) -> float:
    return float(result["probabilities"]["pneumonia"])


def _model_prob(p: Predictor, path, reduced: bool) -> tuple[float, DecodeInfo]:
    """P(pneumonia) from the model and its head, whatever the scope gate would say (most shared radiographs are
    refused by it without their header: the comparison is of the decode, not of the gate)."""
    from edge_runtime.imaging.preprocess import prepare

    pixels, info = open_input(path, hint=p.decode_hint() if reduced else None).decoded(0, p.manifest.windowing)
    x, geometry = prepare(pixels, p.manifest.preprocess)
    head = p.head(p.engine.run_all(x)[0], geometry=geometry, image_hw=pixels.shape[:2], pixel_spacing_mm=None)
    return _prob(head.result), info


def _radiographs() -> list:
    manifest = DICOM_DIR / "MANIFEST.tsv"
    if not manifest.is_file():
        return []
    with open(manifest, newline="") as fh:
        return [row["file"] for row in csv.DictReader(fh, delimiter="\t") if row["modality"] in ("CR", "DX")]


@needs_shared
@pytest.mark.parametrize("name", _radiographs() or ["(shared data absent)"])
def test_every_shared_radiograph_gives_the_same_probability_reduced(cxr, name):
    path = DICOM_DIR / name
    p_full, full_info = _model_prob(cxr, path, reduced=False)
    p_small, info = _model_prob(cxr, path, reduced=True)
    assert full_info.path == "full"
    assert info.reduced, f"{name}: not reduced ({info.reason})"
    assert min(info.size) >= 256
    assert abs(p_full - p_small) <= MAX_PROB_DIFF, (name, info.path, p_full, p_small)
    full, _ = _predict(cxr, path, reduced=False)  # and the content gate reads both alike
    small, _ = _predict(cxr, path, reduced=True)
    assert full.get("assessed") == small.get("assessed"), (name, full.get("reason"), small.get("reason"))


@needs_shared
def test_chest_jpegs_decoded_by_dct_scaling_give_the_same_probability(cxr, tmp_path):
    """The shared set is 224 x 224 (within 2x of a 128 input: decoded whole). Re-encoded at 1120 x 1120, libjpeg's DCT
    scaling decodes them at 1/2 (560 x 560: a box-filter route keeps 4x the input), and the probability stays within
    0.02 of the full decode (1/4 moved 4 of 201 by more; cxr-pneumonia moves by up to 0.065 under +-1 grey level of
    input noise: BENCHMARKS.md)."""
    from quantize.datasets import cxr_items

    items = cxr_items(SHARED_DATA / "cxr-kermany", "val")
    sample = [items[i] for i in np.linspace(0, len(items) - 1, 16).round().astype(int)]
    worst = 0.0
    for i, (path, _label) in enumerate(sample):
        img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        big = cv2.resize(img, (1120, 1120), interpolation=cv2.INTER_CUBIC)
        target = tmp_path / f"chest{i}.jpeg"
        cv2.imwrite(str(target), big, [cv2.IMWRITE_JPEG_QUALITY, 95])
        p_full, _ = _model_prob(cxr, target, reduced=False)
        p_small, info = _model_prob(cxr, target, reduced=True)
        assert info.path == "jpeg-dct-1/2" and info.size == (560, 560)
        worst = max(worst, abs(p_full - p_small))
        _, same = _model_prob(cxr, path, reduced=True)
        assert same.path == "full"  # 224 x 224 itself: nothing to gain
    assert worst <= MAX_PROB_DIFF


def _hc(result: dict) -> float | None:
    return result.get("measurements", {}).get("head_circumference_mm") if result.get("detected") else None


@needs_shared
def test_fetal_circumference_is_unchanged_by_reduced_decoding(fetal, tmp_path):
    """HC18 images are 800x540, already within 2x of the 256x176 input: decoded whole. Four times that size they are
    block-averaged by 3, and the circumference, mapped back to the full image's pixels and spacing, must agree."""
    from quantize.datasets import hc18_items

    items = hc18_items(SHARED_DATA / "hc18", "val")
    sample = [items[i] for i in np.linspace(0, len(items) - 1, 6).round().astype(int)]
    compared = 0
    for i, item in enumerate(sample):
        spacing = (item.pixel_size_mm, item.pixel_size_mm)
        full, _ = _predict(fetal, item.image, reduced=False, spacing=spacing)
        small, info = _predict(fetal, item.image, reduced=True, spacing=spacing)
        assert info.path == "full" and _hc(full) == _hc(small)
        img = cv2.imread(str(item.image), cv2.IMREAD_GRAYSCALE)
        big = tmp_path / f"hc{i}.png"
        cv2.imwrite(str(big), cv2.resize(img, (3200, 2160), interpolation=cv2.INTER_CUBIC))
        half = (item.pixel_size_mm / 4, item.pixel_size_mm / 4)
        full, _ = _predict(fetal, big, reduced=False, spacing=half)
        small, info = _predict(fetal, big, reduced=True, spacing=half)
        assert info.path == "block-average-3"
        assert (_hc(full) is None) == (_hc(small) is None)
        if _hc(full) is not None:
            assert abs(_hc(full) - _hc(small)) <= MAX_HC_DIFF_MM, (item.image.name, _hc(full), _hc(small))
            cx_full = full["ellipse"]["center_px"]
            cx_small = small["ellipse"]["center_px"]
            assert np.allclose(cx_full, cx_small, atol=6.0)  # in the full image's pixels, both
            compared += 1
    assert compared >= 4


@needs_shared
def test_fetal_ultrasound_dicoms_unchanged(fetal):
    for name in ("pydicom-data/US1_J2KR.dcm", "pydicom-data/OBXXXX1A.dcm", "pylibjpeg-data/JPEGLosslessP14SV1_3s_2f_u_08_08.dcm"):
        path = DICOM_DIR / name
        full, _ = _predict(fetal, path, reduced=False, spacing=(0.2, 0.2))
        small, info = _predict(fetal, path, reduced=True, spacing=(0.2, 0.2))
        if _hc(full) is not None or _hc(small) is not None:
            assert _hc(full) is not None and _hc(small) is not None
            assert abs(_hc(full) - _hc(small)) <= MAX_HC_DIFF_MM, (name, info.path)


# ---------------------------------------------------------------- the contract, as a user runs it
@needs_shared
@needs_openjpeg
def test_infer_records_the_decode_path_and_can_be_switched_off(tmp_path):
    base = f'[device]\nid = "t"\nsite = "s"\nstate_dir = "{tmp_path / "state"}"\n[engine]\nthreads = 1\nwarmup_runs = 1\n'
    on, off = tmp_path / "on.toml", tmp_path / "off.toml"
    on.write_text(base)
    off.write_text(base + "[imaging]\nreduced_decode = false\n")
    r = edge("--config", str(on), "infer", "--model", "cxr-pneumonia", "--engine", "onnxruntime", str(CR_CHEST))
    assert r.returncode == 0, r.stderr
    (f,) = findings(r.stdout)
    # the configured margin is 2x, the model's manifest asks 4x (preprocessing.decode_margin): JPEG 2000 level 1/2
    assert f["decode"] == {"path": "j2k-level-1", "factor": 2, "size": [978, 921], "full_size": [1955, 1841]}
    assert f["latency_ms"]["decode"] > 0
    r = edge("--config", str(off), "infer", "--model", "cxr-pneumonia", "--engine", "onnxruntime", str(CR_CHEST))
    assert r.returncode == 0, r.stderr
    (g,) = findings(r.stdout)
    assert g["decode"]["path"] == "full" and g["decode"]["size"] == [1955, 1841]
    p_on, p_off = f["result"]["probabilities"]["pneumonia"], g["result"]["probabilities"]["pneumonia"]
    assert abs(p_on - p_off) <= MAX_PROB_DIFF


@needs_shared
@pytest.mark.parametrize("name", ["pylibjpeg-data/RG1_JLSN.dcm", "pylibjpeg-data/RG2_JLSL.dcm",
                                  "pylibjpeg-data/RG2_JLSN.dcm"])
def test_jpegls_codec_route_gives_pydicoms_stored_values(name):
    """CharLS stands in for GDCM before block averaging only because it decodes the same values."""
    image = DicomImage(DICOM_DIR / name)
    fast = image._codec_frame(0)
    assert fast is not None
    ref = image.raw_frame(0)
    assert fast.dtype == ref.dtype and np.array_equal(fast, ref)
    _, info = image.decode_frame(0, "voi", CXR_HINT)
    assert info.path.startswith("imagecodecs+block-average-")


def test_int8_configured_where_the_model_has_none_runs_its_fp32(tmp_path, caplog):
    """An INT8 variant listed for OpenVINO only (as cxr-pneumonia 1.0.0's was, refused on ONNX Runtime by the paced
    speed guard; 1.1.0's passed it on both): a daemon configured for int8 on ONNX Runtime still reads chest studies,
    with FP32, and says so."""
    import shutil
    from types import SimpleNamespace

    from edge_runtime.config import Config, DeviceSection, EngineSection
    from edge_runtime.service import ModelRunner

    folder = tmp_path / "models" / "cxr-pneumonia"
    shutil.copytree(ModelRegistry().get("cxr-pneumonia").folder, folder)
    text = (folder / "manifest.toml").read_text()
    int8 = text.index('id = "int8-qdq"')
    listed = 'engines = ["onnxruntime", "openvino"]'
    assert text.find(listed, int8) > int8
    (folder / "manifest.toml").write_text(text[:int8] + text[int8:].replace(listed, 'engines = ["openvino"]', 1))
    config = Config(device=DeviceSection(id="t", site="s", state_dir=str(tmp_path)),
                    engine=EngineSection(kind="onnxruntime", precision="int8", threads=1, warmup_runs=1))
    service = SimpleNamespace(config=config, registry=ModelRegistry([tmp_path / "models"]), engine_kind="onnxruntime")
    with caplog.at_level("WARNING", logger="edge_runtime.service"):
        runner = ModelRunner(service, "cxr-pneumonia")
    assert runner.order == ["fp32"]
    assert "no int8 variant for onnxruntime; running its fp32 variant" in caplog.text


@needs_shared
@needs_openjpeg
def test_the_decode_worker_carries_the_hint_and_logs_why_a_file_was_decoded_whole(caplog):
    from edge_runtime.imaging.isolation import DecodePool

    with DecodePool() as pool, caplog.at_level("DEBUG", logger="edge_runtime.decode"):
        with pool.open(CR_CHEST, CXR_HINT) as inp:
            pixels, info = inp.decoded(0, "voi")
        assert info.path == "j2k-level-2" and pixels.shape == (489, 461)
        with pool.open(CR_CHEST) as inp:  # no hint: the full image (display, overlays)
            pixels, info = inp.decoded(0, "voi")
        assert info.path == "full" and pixels.shape == (1955, 1841)
        with pool.open(DICOM_DIR / "pydicom-data" / "OBXXXX1A.dcm", CXR_HINT) as inp:
            _, info = inp.decoded(0, "voi")
        assert info.path == "full"
    assert "OBXXXX1A.dcm: decoded full (PALETTE COLOR: indices cannot be averaged)" in caplog.text


def test_check_refuses_a_margin_below_twice_the_input(tmp_path):
    from edge_runtime.check import service_problems
    from edge_runtime.config import Config, DeviceSection, ImagingSection, ServiceSection

    config = Config(device=DeviceSection(id="t", site="s", state_dir=str(tmp_path)),
                    service=ServiceSection(metrics_port=0), imaging=ImagingSection(reduced_decode_margin=1.5))
    problems, _ = service_problems(config, None)
    assert any(p.key == "imaging.reduced_decode_margin" and "at least 2" in p.problem for p in problems), problems
    ok = Config(device=DeviceSection(id="t", site="s", state_dir=str(tmp_path)), service=ServiceSection(metrics_port=0))
    assert not [p for p in service_problems(ok, None)[0] if p.key.startswith("imaging.")]
