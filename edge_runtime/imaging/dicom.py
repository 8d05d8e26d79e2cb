"""DICOM decoding to display images.

A DICOM file becomes a sequence of uint8 display frames (gray HxW or RGB HxWx3) the way a viewer would show
them: modality LUT, VOI LUT or window, MONOCHROME1 inversion, palette and YBR colour to RGB. The size guard
runs on the header before any pixel buffer is allocated. Frames are decoded one at a time so a long cine
never sits in memory whole.
"""
from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pydicom.pixels
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    HTJ2K,
    UID,
    DeflatedExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
)

from edge_runtime.errors import InputError
from edge_runtime.imaging.guard import (
    DEFAULT_MAX_PIXEL_BYTES,
    DecodeLimits,
    check_deflated,
    check_dicom_header,
    check_dicom_peak,
    check_native_length,
    codestream_shape,
    jpeg_is_complete,
)
from edge_runtime.imaging.reasons import decode_failure, readable
from edge_runtime.imaging.resolution import BOX_ROUTE_MARGIN, DecodeHint, DecodeInfo, block_average, reduced_size

_JPEG_8_12 = (JPEGBaseline8Bit, JPEGExtended12Bit)
_JPEG_FAMILY = frozenset({JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless,
                          JPEGLSNearLossless})
_J2K = frozenset({JPEG2000Lossless, JPEG2000, HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K})
_PHOTOMETRICS = frozenset({"MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "YBR_FULL", "YBR_FULL_422",
                           "YBR_PARTIAL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT"})
_J2K_PHOTOMETRICS = frozenset({"MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "YBR_ICT", "YBR_RCT",
                               "YBR_FULL"})
_FAST_JPEG_LAYOUTS = {(1, "MONOCHROME2"), (1, "MONOCHROME1"), (3, "YBR_FULL_422"), (3, "YBR_FULL"), (3, "RGB")}
# Reduced decoding: which colour layouts each route reproduces exactly as the full decode would.
_J2K_REDUCE_LAYOUTS = {(1, "MONOCHROME1"), (1, "MONOCHROME2"), (3, "RGB"), (3, "YBR_ICT"), (3, "YBR_RCT")}
_DCT_REDUCE_LAYOUTS = {(1, "MONOCHROME1"), (1, "MONOCHROME2"), (3, "YBR_FULL_422"), (3, "YBR_FULL")}
_CV_REDUCED = {(1, 1): cv2.IMREAD_REDUCED_GRAYSCALE_2, (1, 2): cv2.IMREAD_REDUCED_GRAYSCALE_4,
               (1, 3): cv2.IMREAD_REDUCED_GRAYSCALE_8, (3, 1): cv2.IMREAD_REDUCED_COLOR_2,
               (3, 2): cv2.IMREAD_REDUCED_COLOR_4, (3, 3): cv2.IMREAD_REDUCED_COLOR_8}


@dataclass(frozen=True)
class DicomMeta:
    """What the pipeline needs from a DICOM header. Identifiers here are the originals: pseudonymise
    them (imaging.deid) before anything leaves the device."""

    modality: str
    sop_class_uid: str
    transfer_syntax: str
    rows: int
    cols: int
    frames: int
    samples_per_pixel: int
    photometric: str
    bits_allocated: int
    bits_stored: int
    pixel_spacing_mm: tuple[float, float] | None  # (row, column)
    spacing_source: str | None
    frame_time_ms: float | None
    study_uid: str = ""
    series_uid: str = ""
    instance_uid: str = ""
    extra: dict = field(default_factory=dict)
    body_part: str = ""  # BodyPartExamined and ViewPosition, for the scope gate ("" when absent)
    view_position: str = ""

    @property
    def pixel_bytes(self) -> int:
        return self.rows * self.cols * self.frames * self.samples_per_pixel * max(1, self.bits_allocated // 8)


def _positive_pair(value) -> tuple[float, float] | None:
    try:
        row, col = float(value[0]), float(value[1])
    except (TypeError, ValueError, IndexError):
        return None
    return (row, col) if row > 0 and col > 0 else None


def pixel_spacing(ds: Dataset) -> tuple[tuple[float, float] | None, str | None]:
    """(row, column) spacing in mm and where it came from, or (None, None).

    PixelSpacing (patient plane) wins over ImagerPixelSpacing (detector plane, no magnification correction).
    Ultrasound images carry spacing per region: use the 2D region with physical units of cm that covers the
    most pixels.
    """
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        pair = _positive_pair(ds.get(keyword))
        if pair:
            return pair, keyword
    best: tuple[int, tuple[float, float]] | None = None
    for region in ds.get("SequenceOfUltrasoundRegions", []):
        # Units code 3 = cm (PS3.3 C.8.5.5.1.15); spatial format 1 = 2D.
        if region.get("PhysicalUnitsXDirection") != 3 or region.get("PhysicalUnitsYDirection") != 3:
            continue
        if region.get("RegionSpatialFormat", 1) != 1:
            continue
        dx, dy = region.get("PhysicalDeltaX"), region.get("PhysicalDeltaY")
        if not dx or not dy or dx <= 0 or dy <= 0:
            continue
        area = (int(region.get("RegionLocationMaxX1", 0)) - int(region.get("RegionLocationMinX0", 0))) * (
            int(region.get("RegionLocationMaxY1", 0)) - int(region.get("RegionLocationMinY0", 0))
        )
        if best is None or area > best[0]:
            best = (area, (abs(float(dy)) * 10.0, abs(float(dx)) * 10.0))
    if best:
        return best[1], "SequenceOfUltrasoundRegions"
    return None, None


# Patient and study attributes a report for the clinic's PACS repeats so that it files into the same study
# (edge_runtime.pacs). Originals: they stay on the device and go only to that PACS.
RECORD_ATTRIBUTES = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "StudyDate",
                     "StudyTime", "AccessionNumber", "StudyID", "ReferringPhysicianName")


def record_attributes(ds: Dataset) -> dict[str, str]:
    """The header's RECORD_ATTRIBUTES as text (absent or empty ones left out)."""
    out = {}
    for keyword in RECORD_ATTRIBUTES:
        try:
            value = ds.get(keyword)
            text = "" if value is None else str(value)
        except Exception:  # noqa: BLE001 - an unreadable name must not cost the image its reading; left out
            continue
        if text:
            out[keyword] = text
    return out


def is_image_sop_class(sop_class_uid: str) -> bool:
    return "Image Storage" in UID(sop_class_uid).name


def _sop_name(ds: Dataset) -> str:
    uid = str(ds.get("SOPClassUID", ""))
    return UID(uid).name if uid else "no SOP class"


def _number_of_frames(name: str, ds: Dataset) -> int:
    """NumberOfFrames as the header says it (absent = 1); an unreadable value is a reason, never a default."""
    if "NumberOfFrames" not in ds or ds["NumberOfFrames"].value in (None, ""):
        return 1
    raw = ds["NumberOfFrames"].value
    try:
        return int(raw)
    except (TypeError, ValueError):
        raise InputError(name, f"impossible header: NumberOfFrames = {str(raw)[:40]!r}") from None


def _frame_time_ms(ds: Dataset) -> float | None:
    for keyword in ("FrameTime",):
        value = ds.get(keyword)
        if value:
            return float(value)
    for keyword in ("CineRate", "RecommendedDisplayFrameRate"):
        value = ds.get(keyword)
        if value:
            return 1000.0 / float(value)
    return None


class DicomImage:
    """One DICOM file opened for frame-by-frame display decoding. The header is checked (imaging.guard) before any
    pixel buffer is allocated: impossible values, the estimated decode peak, a deflate bomb, truncated pixel data."""

    def __init__(self, path: str | Path, max_pixel_bytes: int = DEFAULT_MAX_PIXEL_BYTES,
                 limits: DecodeLimits | None = None) -> None:
        self.path = Path(path)
        self.name = str(path)
        self.limits = limits or DecodeLimits(max_pixel_bytes=max_pixel_bytes)
        max_pixel_bytes = self.limits.max_pixel_bytes
        self.file_bytes = self._check_file_meta()
        try:
            self.ds = pydicom.dcmread(self.path)
        except InvalidDicomError:
            raise InputError(self.name, "not a DICOM file (no DICM preamble or valid header)") from None
        except FileNotFoundError:
            raise InputError(self.name, "no such file") from None
        except RecursionError:
            raise InputError(self.name, "DICOM header nests sequences too deeply to read (a malformed or hostile "
                                        "file)") from None
        except MemoryError:
            raise InputError(self.name, "DICOM header declares more data than the decode worker may hold") from None
        except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError, IndexError, struct.error) as exc:
            raise InputError(self.name, f"unreadable DICOM header ({readable(str(exc), 'the header')})") from None
        ds = self.ds
        if "PixelData" not in ds:
            if "Rows" in ds or is_image_sop_class(str(ds.get("SOPClassUID", ""))):
                raise InputError(self.name, f"no pixel data although the header is an image's ({_sop_name(ds)}): "
                                            f"truncated, probably cut off in transfer ({self.file_bytes} bytes)")
            raise InputError(self.name, "DICOM has no pixel data (not an image SOP instance)")
        try:
            tsyntax = ds.file_meta.TransferSyntaxUID
        except AttributeError:
            raise InputError(self.name, "DICOM file meta has no Transfer Syntax UID") from None
        self.meta = self._read_meta(ds, str(tsyntax))
        m = self.meta
        check_dicom_header(self.name, m.rows, m.cols, m.frames, m.samples_per_pixel, m.bits_allocated,
                           m.bits_stored, m.photometric)
        self._check_syntax_layout(UID(m.transfer_syntax))
        try:
            spacing, source = pixel_spacing(ds)
        except (TypeError, ValueError, AttributeError, KeyError):
            spacing, source = None, None  # a garbled calibration: no millimetres, still an image
        object.__setattr__(self.meta, "pixel_spacing_mm", spacing)
        object.__setattr__(self.meta, "spacing_source", source)
        if self.meta.pixel_bytes > max_pixel_bytes:
            raise InputError(
                self.name,
                f"image too large: {self.meta.rows}x{self.meta.cols}x{self.meta.frames} frames x "
                f"{self.meta.samples_per_pixel} samples x {self.meta.bits_allocated} bits = "
                f"{self.meta.pixel_bytes} bytes exceeds the limit of {max_pixel_bytes} bytes",
            )
        check_dicom_peak(self.name, m.rows, m.cols, m.samples_per_pixel, m.bits_allocated, self.file_bytes, self.limits)
        self._check_decoder(UID(self.meta.transfer_syntax))
        if not UID(m.transfer_syntax).is_compressed:
            bits = m.rows * m.cols * m.frames * m.samples_per_pixel * m.bits_allocated
            layout = (f"{m.rows} x {m.cols} x {m.frames} frame(s) x {m.samples_per_pixel} sample(s) x "
                      f"{m.bits_allocated} bits")
            check_native_length(self.name, (bits + 7) // 8, len(ds.PixelData), layout)
        self._fast_jpeg: bool | None = None if self._fast_jpeg_eligible() else False  # None: not yet checked
        self._fragments: list[bytes] | None = None
        if UID(m.transfer_syntax).is_compressed:
            self._frame_bytes(m.frames - 1)  # a header that promises more frames than the data holds fails here
        self._palette: np.ndarray | None = None  # PALETTE COLOR: the lookup table, once built
        self._palette_built = False

    def _check_file_meta(self) -> int:
        """The file's size; a Deflated Explicit VR dataset is inflated once, counting, under the cap first."""
        try:
            size = self.path.stat().st_size
            meta = pydicom.filereader.read_file_meta_info(self.path)
        except FileNotFoundError:
            raise InputError(self.name, "no such file") from None
        except InvalidDicomError:
            raise InputError(self.name, "not a DICOM file (no DICM preamble or valid header)") from None
        except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError, IndexError, struct.error) as exc:
            raise InputError(self.name, f"unreadable DICOM file meta ({readable(str(exc), 'the file meta')})") from None
        if meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
            group_length = int(meta.get("FileMetaInformationGroupLength", 0) or 0)
            check_deflated(self.name, self.path, 128 + 4 + 12 + group_length, self.limits)
        return size

    def _read_meta(self, ds: Dataset, tsyntax: str) -> DicomMeta:
        try:
            return DicomMeta(
                modality=str(ds.get("Modality", "")),
                sop_class_uid=str(ds.get("SOPClassUID", "")),
                transfer_syntax=tsyntax,
                rows=int(ds.Rows),
                cols=int(ds.Columns),
                frames=_number_of_frames(self.name, ds),
                samples_per_pixel=int(ds.get("SamplesPerPixel", 1)),
                photometric=str(ds.get("PhotometricInterpretation", "MONOCHROME2")),
                bits_allocated=int(ds.BitsAllocated),
                bits_stored=int(ds.get("BitsStored", ds.BitsAllocated)),
                pixel_spacing_mm=None,
                spacing_source=None,
                frame_time_ms=_frame_time_ms(ds),
                study_uid=str(ds.get("StudyInstanceUID", "")),
                series_uid=str(ds.get("SeriesInstanceUID", "")),
                instance_uid=str(ds.get("SOPInstanceUID", "")),
                body_part=str(ds.get("BodyPartExamined", "") or ""),
                view_position=str(ds.get("ViewPosition", "") or ""),
                extra={"record": record_attributes(ds)},
            )
        except AttributeError as exc:
            missing = str(exc).rsplit("'", 2)[-2] if "'" in str(exc) else "a required attribute"
            raise InputError(self.name, f"DICOM image header incomplete (no {missing})") from None
        except (TypeError, ValueError, OverflowError) as exc:
            raise InputError(self.name, f"DICOM image header has an unreadable value ({readable(str(exc), 'a value')})"
                             ) from None

    def _check_syntax_layout(self, tsyntax: UID) -> None:
        m = self.meta
        if tsyntax in _JPEG_FAMILY and m.bits_allocated > 16:
            raise InputError(self.name, f"inconsistent header: BitsAllocated = {m.bits_allocated} for {tsyntax.name} "
                                        "(JPEG holds at most 16 bits)")
        if m.photometric.upper() not in _PHOTOMETRICS:
            raise InputError(self.name, f"impossible header: PhotometricInterpretation {m.photometric!r}")
        if m.photometric.upper() == "YBR_PARTIAL_420":
            raise InputError(self.name, "inconsistent header: PhotometricInterpretation YBR_PARTIAL_420 is used only "
                                        f"by MPEG video, not {tsyntax.name}")
        if tsyntax in _J2K and m.photometric.upper() not in _J2K_PHOTOMETRICS:
            raise InputError(self.name, f"inconsistent header: PhotometricInterpretation {m.photometric} cannot be "
                                        f"held in {tsyntax.name}")

    def _check_decoder(self, tsyntax: UID) -> None:
        try:
            decoder = pydicom.pixels.get_decoder(tsyntax)
        except NotImplementedError:
            raise InputError(self.name, f"unsupported transfer syntax {tsyntax.name} ({tsyntax})") from None
        if not decoder.is_available and tsyntax not in _JPEG_8_12:
            raise InputError(
                self.name, f"no decoder installed for transfer syntax {tsyntax.name} ({tsyntax}); see 'edge-runtime doctor'"
            )

    @property
    def n_frames(self) -> int:
        return self.meta.frames

    def _fast_jpeg_eligible(self) -> bool:
        m = self.meta
        return (UID(m.transfer_syntax) == JPEGBaseline8Bit and m.bits_allocated == 8
                and (m.samples_per_pixel, m.photometric.upper()) in _FAST_JPEG_LAYOUTS)

    def _frame_bytes(self, index: int) -> bytes:
        """One frame's compressed bytes; the frames are split out once per file."""
        if self._fragments is None:
            try:
                self._fragments = list(generate_frames(self.ds.PixelData, number_of_frames=self.n_frames))
            except Exception:  # pydicom raises ValueError, struct.error, ... on a broken item structure
                raise InputError(self.name, "corrupt encapsulated pixel data: its fragments cannot be split into the "
                                            f"{self.n_frames} frame(s) the header says (truncated or damaged?)"
                                 ) from None
        if index >= len(self._fragments):
            raise InputError(self.name, f"truncated: the header says {self.n_frames} frames, the pixel data holds "
                                        f"{len(self._fragments)} (frame {index} is missing)")
        return self._fragments[index]

    def _check_frame_stream(self, index: int) -> None:
        """A compressed frame is refused when it is cut off or its own header disagrees with the DICOM header: a
        decoder would give a partly grey image, or (GDCM) abort the process."""
        tsyntax = UID(self.meta.transfer_syntax)
        if tsyntax not in _JPEG_FAMILY and tsyntax not in _J2K:
            return
        data = self._frame_bytes(index)
        if not jpeg_is_complete(data):
            raise InputError(self.name, f"frame {index} is truncated: its {tsyntax.name} stream has no end marker "
                                        "(cut off in transfer?)")
        shape = codestream_shape(data)
        m = self.meta
        if shape is None:
            return
        rows, cols, comps, bits = shape
        if (rows and rows != m.rows) or cols != m.cols or comps != m.samples_per_pixel:
            raise InputError(self.name, f"inconsistent: the header says {m.rows} x {m.cols} x {m.samples_per_pixel} "
                                        f"samples, the {tsyntax.name} data of frame {index} holds {rows} x {cols} x "
                                        f"{comps}")
        if bits > m.bits_allocated or (m.bits_allocated > 16 and bits <= 16):
            raise InputError(self.name, f"inconsistent: the header says BitsAllocated = {m.bits_allocated}, the "
                                        f"{tsyntax.name} data of frame {index} holds {bits}-bit samples")

    def _jpeg_codec_frame(self, index: int) -> np.ndarray | None:
        """One JPEG frame decoded by imagecodecs (libjpeg-turbo, BSD), or None when it is missing or fails."""
        try:
            import imagecodecs

            return imagecodecs.jpeg8_decode(self._frame_bytes(index))
        except Exception:
            return None

    def _fast_jpeg_frame(self, index: int) -> np.ndarray | None:
        """8-bit JPEG Baseline straight through libjpeg-turbo, colour converted by the codec: a 640x480 YBR_FULL_422
        echo frame in 0.8 ms where pydicom's Pillow decode plus its numpy YBR->RGB takes 14."""
        arr = self._jpeg_codec_frame(index)
        if arr is None:
            return None
        shape = (self.meta.rows, self.meta.cols) + ((3,) if self.meta.samples_per_pixel == 3 else ())
        return arr if arr.shape == shape and arr.dtype == np.uint8 else None

    def raw_frame(self, index: int) -> np.ndarray:
        """Stored values of one frame (colour already converted to RGB), before any LUT."""
        if not 0 <= index < self.n_frames:
            raise InputError(self.name, f"frame {index} out of range (0..{self.n_frames - 1})")
        self._check_frame_stream(index)
        if self._fast_jpeg:
            fast = self._fast_jpeg_frame(index)
            if fast is not None:
                return fast
        try:
            ref = pydicom.pixels.pixel_array(self.ds, index=index)
            if self._fast_jpeg is None:
                # The fast path is used for a file only once it gave the same pixels as pydicom on its first frame.
                fast = self._fast_jpeg_frame(index)
                self._fast_jpeg = fast is not None and np.array_equal(fast, ref)
            return ref
        except InputError:
            raise
        except Exception as exc:  # decoders raise anything from ValueError to RuntimeError
            fallback = self._imagecodecs_frame(index)
            if fallback is not None:
                return fallback
            raise InputError(self.name, f"frame {index} failed to decode ({UID(self.meta.transfer_syntax).name}): "
                                        f"{decode_failure(exc)}") from None

    def _imagecodecs_frame(self, index: int) -> np.ndarray | None:
        """12-bit JPEG (Process 2 and 4) is beyond Pillow and GDCM; imagecodecs (BSD) decodes it."""
        if UID(self.meta.transfer_syntax) not in _JPEG_8_12 or self.meta.samples_per_pixel != 1:
            return None
        arr = self._jpeg_codec_frame(index)
        if arr is None or arr.shape[:2] != (self.meta.rows, self.meta.cols):
            return None
        return arr

    def display(self, raw: np.ndarray, windowing: str = "voi") -> np.ndarray:
        """One of this file's frames (stored values) -> uint8 display image; a palette becomes a table once per file."""
        if not self._palette_built and self.meta.photometric.upper() == "PALETTE COLOR":
            self._palette = palette_table(self.ds, raw.dtype)
            self._palette_built = True
        return to_display(raw, self.ds, windowing, self._palette)

    def display_frame(self, index: int, windowing: str = "voi") -> np.ndarray:
        """uint8 display image of one frame: gray HxW or RGB HxWx3."""
        raw = self.raw_frame(index)
        try:
            return self.display(raw, windowing)
        except (ValueError, TypeError, IndexError, KeyError, AttributeError) as exc:
            raise InputError(self.name, f"frame {index} has pixel data inconsistent with its LUTs "
                                        f"({readable(str(exc), 'its LUTs')})") from None

    def display_frames(self, windowing: str = "voi") -> Iterator[np.ndarray]:
        for i in range(self.n_frames):
            yield self.display_frame(i, windowing)

    # ------------------------------------------------------------ resolution-aware decoding (imaging.resolution)
    def decode_frame(self, index: int, windowing: str = "voi",
                     hint: DecodeHint | None = None) -> tuple[np.ndarray, DecodeInfo]:
        """uint8 display image of one frame, decoded no larger than `hint` needs (None: full size), and how."""
        raw, info = self.reduced_raw_frame(index, hint) if hint is not None else (None, None)
        if raw is None:
            raw = self.raw_frame(index)
            info = DecodeInfo.full(raw.shape, info.reason if info is not None else None)
        try:
            return self.display(raw, windowing), info
        except (ValueError, TypeError, IndexError, KeyError, AttributeError) as exc:
            raise InputError(self.name, f"frame {index} has pixel data inconsistent with its LUTs "
                                        f"({readable(str(exc), 'its LUTs')})") from None

    def reduced_raw_frame(self, index: int, hint: DecodeHint) -> tuple[np.ndarray | None, DecodeInfo]:
        """Stored values of one frame at the smallest size `hint` allows, by the cheapest exact route; (None, info
        with the reason) when this file must be decoded whole. A reduced decode that fails is never the file's
        verdict: the caller's full decode is."""
        m = self.meta
        if not 0 <= index < self.n_frames:
            raise InputError(self.name, f"frame {index} out of range (0..{self.n_frames - 1})")
        full = (m.rows, m.cols)
        if hint.power_of_two_level(m.rows, m.cols, max_level=5) < 1 and hint.block_factor(m.rows, m.cols) < 2:
            return None, DecodeInfo("full", 1, full, full, f"{m.rows}x{m.cols} is within {max(2.0, hint.margin):g}x "
                                                              f"of the model input ({hint.height}x{hint.width}, "
                                                              f"{hint.resize})")
        layout = (m.samples_per_pixel, m.photometric.upper())
        if layout[1] == "PALETTE COLOR":
            return None, DecodeInfo("full", 1, full, full, "PALETTE COLOR: indices cannot be averaged")
        tsyntax = UID(m.transfer_syntax)
        self._check_frame_stream(index)  # truncated or inconsistent streams are refused as by the full decode
        route = "strided-block-average"
        try:
            if tsyntax in _J2K and layout in _J2K_REDUCE_LAYOUTS:
                route = "j2k"
                reduced = self._j2k_reduced(index, hint)
            elif tsyntax == JPEGBaseline8Bit and m.bits_allocated == 8 and layout in _DCT_REDUCE_LAYOUTS:
                route = "jpeg-dct"
                reduced = self._dct_reduced(index, hint)
            elif not tsyntax.is_compressed:
                reduced = self._native_reduced(index, hint)
            else:
                reduced = None, f"{tsyntax.name} has no reduced decode"
        except InputError:
            raise
        except Exception as exc:  # a corrupt tile, an unsupported progression, a codec quirk: decode it whole
            reduced = None, f"{route} reduced decode failed ({decode_failure(exc)})"
        arr, info = reduced
        if arr is not None:
            return arr, info
        # No cheaper decoder route: decode whole, then average the stored values (the display LUTs and the final
        # resize then run on the small image).
        k = hint.block_factor(m.rows, m.cols)
        if k < 2:
            return None, DecodeInfo("full", 1, full, full, info or f"{m.rows}x{m.cols} is within {BOX_ROUTE_MARGIN:g}x of "
                                                                   "the model input for block averaging")
        raw, codec = self._codec_frame(index), "imagecodecs"
        if raw is None:
            raw, codec = self.raw_frame(index), ""
        small = block_average(raw, k)
        path = f"{codec}+block-average-{k}" if codec else f"block-average-{k}"
        return small, DecodeInfo(path, k, small.shape[:2], full, info)

    def _codec_frame(self, index: int) -> np.ndarray | None:
        """JPEG-LS through CharLS (imagecodecs, BSD): the same stored values as pydicom's GDCM route (the equivalence
        tests compare them on the shared files) in a fifth of its time (RG2_JLSL: 108 against 565 ms on the busy
        2-core machine), and as strict: it refuses every damaged file of the hostile corpus. JPEG Lossless through
        libjpeg-turbo was as fast (86 against 309 ms) but read a damaged file of that corpus as an image without a
        word, so it stays with GDCM. None when the codec refuses the frame or gives another shape: pydicom then
        decodes it, and says what is wrong with it."""
        m = self.meta
        tsyntax = UID(m.transfer_syntax)
        if m.samples_per_pixel != 1 or int(self.ds.get("PixelRepresentation", 0) or 0) != 0:
            return None
        try:
            import imagecodecs

            if tsyntax not in (JPEGLSLossless, JPEGLSNearLossless):
                return None
            arr = imagecodecs.jpegls_decode(self._frame_bytes(index))
        except Exception:
            return None
        if arr.shape != (m.rows, m.cols) or arr.dtype.kind != "u" or arr.dtype.itemsize * 8 < m.bits_stored:
            return None
        return arr.astype(self._expected_dtype(), copy=False)

    def _expected_dtype(self) -> np.dtype:
        m = self.meta
        signed = int(self.ds.get("PixelRepresentation", 0) or 0) == 1
        if m.bits_allocated == 8:
            return np.dtype(np.int8 if signed else np.uint8)
        return np.dtype(np.int16 if signed else np.uint16)

    def _j2k_reduced(self, index: int, hint: DecodeHint):
        from edge_runtime.imaging import openjpeg

        m = self.meta
        if not openjpeg.available():
            return None, "no libopenjp2 for JPEG 2000 resolution levels"
        if m.bits_allocated > 16:
            return None, f"{m.bits_allocated}-bit JPEG 2000"
        level = hint.power_of_two_level(m.rows, m.cols, max_level=5)
        arr = openjpeg.decode(self._frame_bytes(index), level)
        want = reduced_size(m.rows, m.cols, 1 << level) + ((3,) if m.samples_per_pixel == 3 else ())
        if arr.shape != want:
            return None, f"JPEG 2000 level 1/{1 << level} gave {arr.shape}, expected {want}"
        arr = arr.astype(self._expected_dtype(), copy=False)
        return arr, DecodeInfo(f"j2k-level-{level}", 1 << level, arr.shape[:2], (m.rows, m.cols))

    def _dct_reduced(self, index: int, hint: DecodeHint):
        """libjpeg(-turbo) DCT scaling through OpenCV: the 8x8 blocks are inverse-transformed at 4x4, 2x2 or 1x1."""
        m = self.meta
        level = hint.power_of_two_level(m.rows, m.cols, max_level=3, box=True)
        if level < 1:
            return None, f"{m.rows}x{m.cols} leaves no DCT scaling at {BOX_ROUTE_MARGIN:g}x the model input"
        flag = _CV_REDUCED[(m.samples_per_pixel, level)]
        arr = cv2.imdecode(np.frombuffer(self._frame_bytes(index), np.uint8), flag)
        want = reduced_size(m.rows, m.cols, 1 << level) + ((3,) if m.samples_per_pixel == 3 else ())
        if arr is None or arr.shape != want:
            got = None if arr is None else arr.shape
            return None, f"JPEG DCT scaling 1/{1 << level} gave {got}, expected {want}"
        if arr.ndim == 3:
            arr = cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
        return arr, DecodeInfo(f"jpeg-dct-1/{1 << level}", 1 << level, arr.shape[:2], (m.rows, m.cols))

    def _native_reduced(self, index: int, hint: DecodeHint):
        """Uncompressed: block-average straight out of the pixel data, with pydicom's masking of unused high bits;
        the full-size frame is never converted or copied."""
        m = self.meta
        ds = self.ds
        if m.bits_allocated not in (8, 16):
            return None, f"BitsAllocated {m.bits_allocated}"
        if m.samples_per_pixel == 3 and int(ds.get("PlanarConfiguration", 0) or 0) != 0:
            return None, "planar colour pixel data"
        if m.photometric.upper() not in ("MONOCHROME1", "MONOCHROME2", "RGB"):
            return None, f"{m.photometric} pixel data"
        if UID(m.transfer_syntax) == pydicom.uid.ExplicitVRBigEndian:
            return None, "big-endian pixel data"
        dtype = self._expected_dtype().newbyteorder("<")
        if dtype.kind == "i" and m.bits_stored < m.bits_allocated:
            return None, "signed samples with unused high bits"
        shape = (m.rows, m.cols) + ((3,) if m.samples_per_pixel == 3 else ())
        count = int(np.prod(shape))
        arr = np.frombuffer(ds.PixelData, dtype, count=count, offset=index * count * dtype.itemsize).reshape(shape)
        if dtype.kind == "u" and m.bits_stored < m.bits_allocated:
            arr = arr & np.array((1 << m.bits_stored) - 1, dtype=dtype)
        k = hint.block_factor(m.rows, m.cols)
        if k < 2:
            return None, f"{m.rows}x{m.cols} is within {BOX_ROUTE_MARGIN:g}x of the model input for block averaging"
        small = block_average(arr.astype(dtype.newbyteorder("="), copy=False), k)
        return small, DecodeInfo(f"strided-block-average-{k}", k, small.shape[:2], (m.rows, m.cols))


# The helpers below work in place on one float32 copy: a 3.6-megapixel radiograph then needs one 14 MB buffer
# instead of one per arithmetic step (the decode's peak RSS fell by about 40 MB), with the same operations in the
# same order, so the same bytes out.
def _to_u8(y: np.ndarray) -> np.ndarray:
    """float32 values in display units (0..255 before rounding) -> uint8, rounding half up; consumes y."""
    y += 0.5
    np.clip(y, 0, 255, out=y)
    return y.astype(np.uint8)


def _scale_to_u8(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        hi = lo + 1.0
    out = arr.astype(np.float32)
    out -= np.float32(lo)
    out *= np.float32(255.0 / (hi - lo))
    return _to_u8(out)


def _window_linear(arr: np.ndarray, center: float, width: float, exact: bool) -> np.ndarray:
    """PS3.3 C.11.2.1.2 LINEAR and LINEAR_EXACT windowing straight to 0..255."""
    y = arr.astype(np.float32)
    if exact:
        y -= center
        y /= max(width, 1e-6)
    else:
        y -= center - 0.5
        y /= max(width - 1.0, 1.0)
    y += 0.5
    y *= 255.0
    return _to_u8(y)


def _window_sigmoid(arr: np.ndarray, center: float, width: float) -> np.ndarray:
    y = arr.astype(np.float32)
    y -= center
    y *= -4.0
    y /= max(width, 1e-6)
    np.exp(y, out=y)
    y += 1.0
    np.divide(1.0, y, out=y)
    y *= 255.0
    return _to_u8(y)


def _first(value) -> float:
    if isinstance(value, pydicom.multival.MultiValue):
        value = value[0]
    return float(value)


def gray_to_display(arr: np.ndarray, ds: Dataset, windowing: str) -> np.ndarray:
    """Grayscale stored values -> uint8 display values."""
    values = pydicom.pixels.apply_modality_lut(arr, ds)
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if windowing == "voi" and "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        lut_item = ds.VOILUTSequence[0]
        out = pydicom.pixels.apply_voi(values, ds, index=0)
        bits = int(lut_item.LUTDescriptor[2])
        display = _scale_to_u8(out, 0, (1 << bits) - 1)
    elif windowing == "voi" and center is not None and width is not None and _first(width) > 0:
        function = str(ds.get("VOILUTFunction", "LINEAR")).upper()
        c, w = _first(center), _first(width)
        if function == "SIGMOID":
            display = _window_sigmoid(values, c, w)
        else:
            display = _window_linear(values, c, w, exact=function == "LINEAR_EXACT")
    elif arr.dtype == np.uint8 and windowing != "minmax":
        display = arr  # 8-bit without a window: the stored values are what the scanner showed
    else:
        # No window in the file: a robust window over the frame, as viewers do.
        lo, hi = np.percentile(values, (0.5, 99.5))
        display = _scale_to_u8(values, float(lo), float(hi))
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        display = 255 - display
    return np.ascontiguousarray(display, dtype=np.uint8)


def _palette_to_u8(values: np.ndarray, ds: Dataset) -> np.ndarray:
    rgb = pydicom.pixels.apply_color_lut(values, ds)
    bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
    return _scale_to_u8(rgb, 0, (1 << bits) - 1) if rgb.dtype != np.uint8 else rgb


def palette_table(ds: Dataset, dtype: np.dtype) -> np.ndarray | None:
    """The file's palette as a uint8 RGB table over every value `dtype` can hold (256 or 65,536 rows), built through
    pydicom: a frame is then one lookup (a 640x480 16-bit palette frame: 31 -> about 1 ms). None for other dtypes,
    and for a palette pydicom cannot apply to every value (a segmented LUT shorter than its descriptor says): it may
    still cover the values the frames hold, and those frames go through pydicom directly, as before."""
    if dtype not in (np.uint8, np.uint16):
        return None
    try:
        return np.ascontiguousarray(_palette_to_u8(np.arange(np.iinfo(dtype).max + 1, dtype=dtype), ds))
    except (IndexError, ValueError, TypeError, KeyError, AttributeError):
        return None


def to_display(raw: np.ndarray, ds: Dataset, windowing: str = "voi", palette: np.ndarray | None = None) -> np.ndarray:
    """Stored frame values -> uint8 display image (gray HxW or RGB HxWx3). `palette`: the file's `palette_table`, when
    it has one (DicomImage builds it once per file)."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        return np.take(palette, raw, axis=0) if palette is not None else _palette_to_u8(raw, ds)
    if raw.ndim == 3:
        # RGB (pydicom has already converted YBR_* to RGB); scale wider samples down to 8 bits.
        if raw.dtype == np.uint8:
            return raw
        return _scale_to_u8(raw, 0, (1 << int(ds.get("BitsStored", 16))) - 1)
    return gray_to_display(raw, ds, windowing)
