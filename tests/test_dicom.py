"""DICOM decoding against the 24 real files in ../shared/data/dicom, plus bad inputs made in the test."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import CR_CHEST, DICOM_DIR, needs_shared

from edge_runtime.errors import InputError
from edge_runtime.imaging.dicom import DicomImage, to_display
from edge_runtime.imaging.inputs import open_input


def manifest_rows() -> list[dict]:
    path = DICOM_DIR / "MANIFEST.tsv"
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


ROWS = manifest_rows()


@needs_shared
def test_manifest_lists_all_24_files():
    assert len(ROWS) == 24


@needs_shared
@pytest.mark.parametrize("row", ROWS, ids=[r["file"].split("/")[-1] for r in ROWS])
def test_every_shared_file_decodes_to_its_shape(row):
    image = DicomImage(DICOM_DIR / row["file"])
    expected = tuple(int(x) for x in row["decoded_shape"].strip("()").split(",") if x.strip())
    frames = int(row["frames"])
    assert image.n_frames == frames
    raw = image.raw_frame(frames - 1)  # the last frame proves multi-frame access
    assert raw.shape == (expected[1:] if frames > 1 else expected)
    display = image.display_frame(0)
    assert display.dtype == np.uint8
    assert display.shape[:2] == (int(row["rows"]), int(row["cols"]))
    assert display.max() > display.min(), "display image is flat"
    if row["photometric"] in ("PALETTE COLOR", "RGB") or row["photometric"].startswith("YBR"):
        assert display.ndim == 3 and display.shape[2] == 3


@needs_shared
def test_monochrome1_is_inverted_so_bone_is_bright():
    image = DicomImage(CR_CHEST)
    assert image.meta.photometric == "MONOCHROME1"
    display = image.display_frame(0)
    h, w = display.shape
    # The mediastinum (centre) is denser than the air-filled lungs beside it: it must display brighter.
    centre = display[h // 3 : 2 * h // 3, int(w * 0.45) : int(w * 0.55)].mean()
    lung = display[h // 3 : 2 * h // 3, int(w * 0.2) : int(w * 0.3)].mean()
    assert centre > lung + 20


@needs_shared
def test_lossless_and_uncompressed_give_identical_display():
    a = DicomImage(DICOM_DIR / "pydicom-data" / "RG1_UNCR.dcm").display_frame(0)
    b = DicomImage(CR_CHEST).display_frame(0)
    assert np.array_equal(a, b)


@needs_shared
def test_12bit_jpeg_extended_decodes_without_gpl_plugin():
    image = DicomImage(DICOM_DIR / "pylibjpeg-data" / "RG2_JPLY_fixed.dcm")
    raw = image.raw_frame(0)
    reference = DicomImage(DICOM_DIR / "pylibjpeg-data" / "RG2_JPLL.dcm").raw_frame(0)
    assert raw.shape == reference.shape == (2140, 1760)
    # Lossy vs lossless encodings of the same radiograph: close, not equal.
    assert np.abs(raw.astype(np.int32) - reference.astype(np.int32)).mean() < 8


@needs_shared
@pytest.mark.parametrize(
    "name, source, spacing",
    [
        ("pylibjpeg-data/966_fixed.dcm", "PixelSpacing", (0.16, 0.16)),
        ("pylibjpeg-data/RG2_JLSL.dcm", "PixelSpacing", (0.2, 0.2)),
        ("pydicom-data/color3d_jpeg_baseline.dcm", "SequenceOfUltrasoundRegions", None),
        ("pydicom-data/RG1_J2KR.dcm", None, None),  # PixelSpacing of 0\0 means unknown
    ],
)
def test_pixel_spacing_sources(name, source, spacing):
    if not DICOM_DIR.is_dir():
        pytest.skip(f"shared data not found at {DICOM_DIR}")
    meta = DicomImage(DICOM_DIR / name).meta
    assert meta.spacing_source == source
    if spacing:
        assert meta.pixel_spacing_mm == pytest.approx(spacing)
    if source == "SequenceOfUltrasoundRegions":
        row, col = meta.pixel_spacing_mm
        assert 0.05 < row < 2.0 and row == pytest.approx(col)
    if source is None:
        assert meta.pixel_spacing_mm is None


@needs_shared
def test_cine_frame_time():
    meta = DicomImage(DICOM_DIR / "pydicom-data" / "color3d_jpeg_baseline.dcm").meta
    assert meta.frames == 120
    assert meta.frame_time_ms == pytest.approx(33.333, abs=0.01)


def test_window_and_modality_lut_applied():
    ds = synthetic_dataset(np.array([[0, 1000], [2000, 4095]], dtype=np.uint16))
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1000
    ds.WindowCenter, ds.WindowWidth = 0, 2000  # in rescaled units: -1000..1000 -> 0..255
    out = to_display(ds.pixel_array, ds)
    assert out[0, 0] == 0 and out[1, 0] == 255 and 120 <= out[0, 1] <= 135


def test_no_window_uses_percentile_window_for_wide_data():
    data = np.linspace(0, 4095, 64 * 64).reshape(64, 64).astype(np.uint16)
    ds = synthetic_dataset(data)
    out = to_display(ds.pixel_array, ds)
    assert out.min() == 0 and out.max() == 255


def synthetic_dataset(pixels: np.ndarray) -> pydicom.Dataset:
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    return ds


def write_dataset(ds: pydicom.Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def test_size_guard_rejects_before_decoding(tmp_path):
    ds = synthetic_dataset(np.zeros((64, 64), np.uint16))
    path = write_dataset(ds, tmp_path / "big.dcm")
    with pytest.raises(InputError, match=r"too large: 64x64x1 frames .* exceeds the limit of 1000 bytes"):
        DicomImage(path, max_pixel_bytes=1000)
    # A header claiming a huge frame count is refused from the header alone.
    ds.NumberOfFrames = 1_000_000  # 8 GB claimed, 8 KB present
    path = write_dataset(ds, tmp_path / "claims-many-frames.dcm")
    with pytest.raises(InputError, match="too large"):
        DicomImage(path)


def test_truncated_dicom_is_a_one_line_error(tmp_path):
    ds = synthetic_dataset(np.arange(128 * 128, dtype=np.uint16).reshape(128, 128))
    full = write_dataset(ds, tmp_path / "full.dcm").read_bytes()
    cut = tmp_path / "truncated.dcm"
    cut.write_bytes(full[: len(full) // 2])
    with pytest.raises(InputError) as info:
        image = open_input(cut)
        image.frame(0)
    assert str(cut) in str(info.value) and "\n" not in str(info.value)


def test_unsupported_transfer_syntax(tmp_path):
    from pydicom.encaps import encapsulate
    from pydicom.uid import MPEG2MPML

    ds = synthetic_dataset(np.zeros((8, 8), np.uint16))
    ds.file_meta.TransferSyntaxUID = MPEG2MPML  # video in DICOM: no pixel decoder exists for it
    ds.PixelData = encapsulate([b"\x00" * 16])
    ds["PixelData"].VR = "OB"
    path = write_dataset(ds, tmp_path / "video.dcm")
    with pytest.raises(InputError, match=r"unsupported transfer syntax MPEG2 .*1\.2\.840\.10008\.1\.2\.4\.100"):
        DicomImage(path)


def test_non_image_dicom(tmp_path):
    ds = synthetic_dataset(np.zeros((8, 8), np.uint16))
    del ds.PixelData
    path = write_dataset(ds, tmp_path / "sr.dcm")
    with pytest.raises(InputError, match="no pixel data"):
        DicomImage(path)


def test_not_dicom(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(InputError, match="not a DICOM"):
        open_input(path)


@needs_shared
def test_copy_of_shared_file_opens_via_front_door(tmp_path):
    copy = tmp_path / "cr.dcm"
    shutil.copy(CR_CHEST, copy)
    inp = open_input(copy)
    assert inp.kind == "dicom" and inp.modality == "CR" and inp.n_frames == 1


JPEG_BASELINE_FILES = ["pydicom-data/color3d_jpeg_baseline.dcm", "pydicom-data/examples_ybr_color.dcm"]


@needs_shared
@pytest.mark.parametrize("name", JPEG_BASELINE_FILES)
def test_fast_jpeg_baseline_path_gives_pydicoms_pixels(name):
    """8-bit JPEG Baseline frames go straight through libjpeg-turbo once the first frame matched pydicom; every
    frame of the shared YBR_FULL_422 files is then bit-identical to pydicom's decode."""
    path = DICOM_DIR / name
    image = DicomImage(path)
    frames = [image.raw_frame(i) for i in range(image.n_frames)]
    assert image._fast_jpeg is True, "the fast path did not engage"
    ds = pydicom.dcmread(path)
    for i, frame in enumerate(frames):
        assert np.array_equal(frame, pydicom.pixels.pixel_array(ds, index=i)), f"frame {i}"


@needs_shared
def test_fast_jpeg_path_stays_off_when_it_disagrees_with_pydicom(monkeypatch):
    import imagecodecs

    real = imagecodecs.jpeg8_decode
    monkeypatch.setattr(imagecodecs, "jpeg8_decode", lambda data: real(data) // 2)  # a codec that decodes differently
    path = DICOM_DIR / JPEG_BASELINE_FILES[1]
    image = DicomImage(path)
    frames = [image.raw_frame(i) for i in range(3)]
    assert image._fast_jpeg is False
    ds = pydicom.dcmread(path)
    assert all(np.array_equal(f, pydicom.pixels.pixel_array(ds, index=i)) for i, f in enumerate(frames))


def palette_dataset(pixels: np.ndarray, first_mapped: int, entries: int, seed: int) -> pydicom.Dataset:
    """A PALETTE COLOR dataset with a random 16-bit palette of `entries` rows starting at `first_mapped`."""
    ds = synthetic_dataset(pixels)
    ds.Modality = "US"
    ds.PhotometricInterpretation = "PALETTE COLOR"
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelData = pixels.tobytes()
    rng = np.random.default_rng(seed)
    for colour in ("Red", "Green", "Blue"):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [entries % 65536, first_mapped, 16])
        setattr(ds, f"{colour}PaletteColorLookupTableData", rng.integers(0, 65536, entries, dtype=np.uint16).tobytes())
    return ds


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_palette_lookup_table_gives_pydicoms_colours(dtype, tmp_path):
    """One table lookup per frame must equal pydicom's apply_color_lut scaled to 8 bits, value for value: below the
    first mapped value, inside the palette and past its end (both clamp), for two files with different palettes."""
    from edge_runtime.imaging.dicom import _palette_to_u8

    top = np.iinfo(dtype).max
    pixels = np.concatenate([np.arange(0, top + 1, max(1, (top + 1) // 4096)), [0, 9, 10, top]]).astype(dtype)
    pixels = np.resize(pixels, (64, pixels.size // 64 + 1)).astype(dtype)
    first = [palette_dataset(pixels, first_mapped=10, entries=200 if dtype == np.uint8 else 3000, seed=1),
             palette_dataset(pixels, first_mapped=0, entries=256 if dtype == np.uint8 else 65536, seed=2)]
    images = [DicomImage(write_dataset(ds, tmp_path / f"palette-{i}.dcm")) for i, ds in enumerate(first)]
    for image in images + images:  # the second round uses the table each file built on its first frame
        expected = _palette_to_u8(pixels, image.ds)
        out = image.display_frame(0)
        assert image._palette is not None  # the lookup table, not pydicom per frame
        assert out.dtype == np.uint8 and out.shape == pixels.shape + (3,)
        np.testing.assert_array_equal(out, expected)
    assert not np.array_equal(images[0].display_frame(0), images[1].display_frame(0))


@needs_shared
@pytest.mark.parametrize("name", ["gdcm-US-ALOKA-16.dcm", "OBXXXX1A_rle_2frame.dcm"])
def test_shared_palette_files_display_as_pydicom_does(name):
    from edge_runtime.imaging.dicom import _palette_to_u8

    image = DicomImage(DICOM_DIR / "pydicom-data" / name)
    for i in range(image.n_frames):
        np.testing.assert_array_equal(image.display_frame(i), _palette_to_u8(image.raw_frame(i), image.ds))
    assert image._palette is not None


def test_a_segmented_palette_shorter_than_its_descriptor_still_displays(tmp_path):
    """pydicom can apply this palette to the values the frame holds but not to every 8-bit value: the lookup table
    cannot be built, and the frame goes through pydicom directly instead of failing."""
    from edge_runtime.imaging.dicom import _palette_to_u8, palette_table

    pixels = np.resize(np.arange(100, dtype=np.uint8), (10, 10))
    ds = palette_dataset(pixels, first_mapped=0, entries=256, seed=3)
    for colour in ("Red", "Green", "Blue"):
        delattr(ds, f"{colour}PaletteColorLookupTableData")
        segment = np.array([0, 100, *range(0, 65536, 656)[:100]], dtype=np.uint16)  # one discrete segment, 100 entries
        setattr(ds, f"Segmented{colour}PaletteColorLookupTableData", segment.tobytes())
    with pytest.raises(IndexError):
        _palette_to_u8(np.arange(256, dtype=np.uint8), ds)  # values past the 100 entries: pydicom gives up
    assert palette_table(ds, np.dtype(np.uint8)) is None
    out = DicomImage(write_dataset(ds, tmp_path / "segmented.dcm")).display_frame(0)
    np.testing.assert_array_equal(out, _palette_to_u8(pixels, ds))
