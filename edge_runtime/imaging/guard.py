"""Refuse hostile or impossible inputs before anything large is allocated.

Three checks run on headers only: impossible header values (NumberOfFrames -1, BitsAllocated 0, ...), the
decode's estimated peak memory (the compressed bytes, the decoder's output and the display pipeline's working
copies, not only the raw pixels), and for Deflated Explicit VR files an incremental inflate with a cap, so a
deflate bomb is refused after reading at most the cap instead of inflating to gigabytes first.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from edge_runtime.errors import InputError

MiB = 1 << 20
DEFAULT_MAX_PIXEL_BYTES = 1 << 30  # decoded pixels of a whole input, all frames
DEFAULT_MAX_DECODE_BYTES = 512 * MiB  # estimated peak of decoding one frame; fits a 2 GB board beside the daemon

# Bytes held per decoded sample beyond the raw frame, by the display pipeline (imaging/dicom.py): pydicom's modality
# LUT gives float64 when the file rescales, the windowing works on one float32 copy, the display frame is uint8.
_DISPLAY_WORK_BYTES = 8 + 4 + 1
_ALLOWED_BITS = (1, 8, 16, 32, 64)
_INFLATE_CHUNK = 1 * MiB


@dataclass(frozen=True)
class DecodeLimits:
    """What one input may cost to decode; the defaults fit a 2 GB board."""

    max_pixel_bytes: int = DEFAULT_MAX_PIXEL_BYTES
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES


def _mib(n: int) -> str:
    return f"{n / MiB:.0f} MiB"


def dicom_frame_peak_bytes(rows: int, cols: int, samples: int, bits_allocated: int, file_bytes: int) -> int:
    """Estimated peak while one frame is decoded and turned into a display frame: the file as read (pydicom holds
    the whole dataset), the decoder's output and pydicom's copy of it, and the display working copies."""
    samples_in_frame = rows * cols * samples
    raw = samples_in_frame * max(1, bits_allocated // 8)
    return file_bytes + 2 * raw + samples_in_frame * _DISPLAY_WORK_BYTES


def check_dicom_header(name: str, rows: int, cols: int, frames: int, samples: int, bits_allocated: int,
                       bits_stored: int, photometric: str) -> None:
    """Values no real image has: refuse them with the value, before a decoder sees them."""
    if frames <= 0:
        raise InputError(name, f"impossible header: NumberOfFrames = {frames} (an image has at least 1 frame)")
    if rows <= 0 or cols <= 0:
        raise InputError(name, f"impossible header: Rows x Columns = {rows} x {cols}")
    if bits_allocated not in _ALLOWED_BITS:
        raise InputError(name, f"impossible header: BitsAllocated = {bits_allocated} (allowed 1, 8, 16, 32 or 64)")
    if not 1 <= bits_stored <= bits_allocated:
        raise InputError(name, f"impossible header: BitsStored = {bits_stored} with BitsAllocated = {bits_allocated}")
    if samples not in (1, 3):
        raise InputError(name, f"impossible header: SamplesPerPixel = {samples} (allowed 1 or 3)")
    colour = photometric.upper() not in ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR")
    if colour != (samples == 3):
        raise InputError(name, f"inconsistent header: PhotometricInterpretation {photometric} with SamplesPerPixel = "
                               f"{samples}")


def check_dicom_peak(name: str, rows: int, cols: int, samples: int, bits_allocated: int, file_bytes: int,
                     limits: DecodeLimits) -> None:
    peak = dicom_frame_peak_bytes(rows, cols, samples, bits_allocated, file_bytes)
    if peak > limits.max_decode_bytes:
        raise InputError(name, f"image too large to decode safely: {rows}x{cols}x{samples} samples of {bits_allocated}"
                               f" bits needs about {_mib(peak)} while decoding, over the limit of "
                               f"{_mib(limits.max_decode_bytes)} (imaging.max_decode_bytes)")


def check_native_length(name: str, expected: int, held: int, layout: str) -> None:
    """Uncompressed pixel data shorter than the header says: cut off in transfer (or a wrong header), not an image."""
    if held < expected:
        raise InputError(name, f"truncated or inconsistent: the header says {layout} = {expected} bytes of pixel data, "
                               f"the file holds {held} (cut off in transfer, or a wrong header)")


def check_deflated(name: str, path: Path, dataset_offset: int, limits: DecodeLimits) -> None:
    """Inflate a Deflated Explicit VR dataset in chunks, counting, and stop at the cap: a bomb costs at most one
    chunk of memory and the time to inflate the cap. pydicom then inflates a stream known to fit."""
    cap = limits.max_decode_bytes
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    with open(path, "rb") as fh:
        fh.seek(dataset_offset)
        while True:
            chunk = inflater.unconsumed_tail or fh.read(_INFLATE_CHUNK)
            if not chunk:
                break
            try:
                total += len(inflater.decompress(chunk, _INFLATE_CHUNK))
            except zlib.error as exc:
                raise InputError(name, f"corrupt deflated dataset (zlib: {exc})") from None
            if total > cap:
                raise InputError(name, f"deflated dataset inflates to more than {_mib(cap)} "
                                       "(imaging.max_decode_bytes): a decompression bomb or a huge dataset")
            if inflater.eof:
                break


@dataclass(frozen=True)
class ImageHeader:
    """What a PNG or JPEG header says, read without decoding pixels."""

    format: str  # "PNG" | "JPEG"
    width: int
    height: int
    channels: int
    sample_bytes: int
    progressive: bool

    def peak_bytes(self, file_bytes: int) -> int:
        """Estimated decode peak: OpenCV's decoded image, a progressive JPEG's coefficient buffer (2 bytes per
        sample, held whole until the last scan), and the uint8 display conversion (a float32 copy for 16-bit)."""
        samples = self.width * self.height * self.channels
        peak = file_bytes + samples * self.sample_bytes
        if self.progressive:
            peak += samples * 2
        peak += samples * (4 + 1 if self.sample_bytes > 1 else 1)
        return peak


def check_image_peak(name: str, header: ImageHeader, file_bytes: int, limits: DecodeLimits) -> None:
    raw = header.width * header.height * header.channels * header.sample_bytes
    if header.width <= 0 or header.height <= 0:
        raise InputError(name, f"impossible {header.format} header: {header.width}x{header.height} pixels")
    if raw > limits.max_pixel_bytes:
        raise InputError(name, f"image too large: {header.width}x{header.height}x{header.channels} = {raw} bytes "
                               f"exceeds the limit of {limits.max_pixel_bytes} bytes")
    peak = header.peak_bytes(file_bytes)
    if peak > limits.max_decode_bytes:
        kind = "progressive JPEG" if header.progressive else header.format
        raise InputError(name, f"image too large to decode safely: a {header.width}x{header.height} {kind} needs "
                               f"about {_mib(peak)} while decoding, over the limit of {_mib(limits.max_decode_bytes)} "
                               "(imaging.max_decode_bytes)")


def jpeg_is_complete(data: bytes) -> bool:
    """A JPEG-family codestream (JPEG, JPEG-LS, JPEG 2000) ends with its end marker (FFD9) after the last scan.
    Inside entropy-coded data FF is always followed by 00 or a restart marker, so an FFD9 after the last start of
    scan (FFDA; JPEG 2000: start of data FF93) means the stream was not cut off."""
    end = data.rfind(b"\xff\xd9")  # padding (00 or FF) after it is allowed
    return end > max(data.rfind(b"\xff\xda"), data.rfind(b"\xff\x93"))


def png_is_complete(data: bytes) -> bool:
    """A PNG ends with its IEND chunk (length 0, type IEND, CRC)."""
    return data.rstrip(b"\x00")[-12:-4] == b"\x00\x00\x00\x00IEND"


def png_ihdr(data: bytes) -> tuple[int, int, int, int] | None:
    """(width, height, bit depth, colour type) from the IHDR chunk, or None when it is missing."""
    if len(data) < 33 or data[12:16] != b"IHDR":
        return None
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    return width, height, depth, colour


# JPEG start-of-frame markers (all processes; not DHT C4, JPG C8, DAC CC) and JPEG-LS SOF55 (F7).
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7})


def codestream_shape(data: bytes) -> tuple[int, int, int, int] | None:
    """(rows, columns, components, bits) from a JPEG / JPEG-LS frame header or a JPEG 2000 SIZ marker, or None when
    the stream starts otherwise. Lets a header that disagrees with its pixel data be named before a decoder (GDCM
    aborts the process on some of these) sees it."""
    if data[:2] == b"\xff\xd8":
        i = 2
        while i + 4 <= len(data):
            if data[i] != 0xFF:
                return None
            marker = data[i + 1]
            if marker == 0xFF:  # fill byte
                i += 1
                continue
            if marker in _JPEG_SOF:
                if i + 10 > len(data):
                    return None
                bits, rows, cols, comps = struct.unpack(">BHHB", data[i + 4:i + 10])
                return rows, cols, comps, bits
            if marker == 0xDA:
                return None
            i += 2 + struct.unpack(">H", data[i + 2:i + 4])[0]
        return None
    if data[:4] == b"\xff\x4f\xff\x51" and len(data) >= 43:
        xsiz, ysiz, xosiz, yosiz = struct.unpack(">IIII", data[8:24])
        comps = struct.unpack(">H", data[40:42])[0]
        return ysiz - yosiz, xsiz - xosiz, comps, (data[42] & 0x7F) + 1
    return None
