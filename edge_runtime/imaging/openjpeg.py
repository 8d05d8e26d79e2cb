"""JPEG 2000 decoding at a reduced resolution level, straight through OpenJPEG's C API (ctypes).

A JPEG 2000 codestream holds its image as a wavelet pyramid: OpenJPEG can stop at 1/2, 1/4, 1/8 ... of the size
(`opj_set_decoded_resolution_factor`) and skips the code-blocks of the finer levels, so a 1955x1841 lossless chest
CR decodes at 1/4 in a fraction of the full decode. None of the Python wrappers the project has offers that for
every file: pylibjpeg-openjpeg and imagecodecs have no reduce argument, and Pillow's `reduce` refuses RG1_J2KR.dcm
at 1/4 ("broken data stream", its own tile-size check on a size not divisible by 4). OpenJPEG itself decodes it.

The library is the system's libopenjp2 (BSD-2; Debian libopenjp2-7) or, where that is missing, the copy Pillow's
wheel carries. `available()` says whether either was found; callers fall back to a full decode when not.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import threading

import numpy as np

_CODEC_J2K = 0  # OPJ_CODEC_J2K: a raw codestream, which is what DICOM encapsulates
_DPARAMETERS_BYTES = 1 << 15  # opj_dparameters_t is about 8.3 kB; only OpenJPEG writes it (set_default, setup)


class _ImageComp(ctypes.Structure):
    # opj_image_comp_t (openjpeg.h, 2.x): dx, dy, w, h, x0, y0, prec, bpp, sgnd, resno_decoded, factor, data, alpha
    _fields_ = [("dx", ctypes.c_uint32), ("dy", ctypes.c_uint32), ("w", ctypes.c_uint32), ("h", ctypes.c_uint32),
                ("x0", ctypes.c_uint32), ("y0", ctypes.c_uint32), ("prec", ctypes.c_uint32),
                ("bpp", ctypes.c_uint32), ("sgnd", ctypes.c_uint32), ("resno_decoded", ctypes.c_uint32),
                ("factor", ctypes.c_uint32), ("data", ctypes.POINTER(ctypes.c_int32)), ("alpha", ctypes.c_uint16)]


class _Image(ctypes.Structure):
    # opj_image_t: x0, y0, x1, y1, numcomps, color_space, comps, icc_profile_buf, icc_profile_len
    _fields_ = [("x0", ctypes.c_uint32), ("y0", ctypes.c_uint32), ("x1", ctypes.c_uint32), ("y1", ctypes.c_uint32),
                ("numcomps", ctypes.c_uint32), ("color_space", ctypes.c_int),
                ("comps", ctypes.POINTER(_ImageComp)), ("icc_profile_buf", ctypes.c_void_p),
                ("icc_profile_len", ctypes.c_uint32)]


_READ = ctypes.CFUNCTYPE(ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
_SKIP = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p)
_SEEK = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p)
_MSG = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_void_p)

_lib: ctypes.CDLL | None = None
_lib_tried = False
_lock = threading.Lock()


class J2KError(Exception):
    """OpenJPEG could not decode the stream at the asked level; the message is OpenJPEG's own (or ours)."""


def _candidates() -> list[str]:
    found = ctypes.util.find_library("openjp2")
    paths = [found] if found else []
    try:
        import PIL

        libs = os.path.join(os.path.dirname(os.path.dirname(PIL.__file__)), "pillow.libs")
        paths += sorted(glob.glob(os.path.join(libs, "libopenjp2*.so*")))
    except ImportError:
        pass
    return paths


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, u32, i32 = ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int32
    sigs = {
        "opj_version": ([], ctypes.c_char_p),
        "opj_create_decompress": ([ctypes.c_int], p),
        "opj_destroy_codec": ([p], None),
        "opj_set_default_decoder_parameters": ([p], None),
        "opj_setup_decoder": ([p, p], i32),
        "opj_set_error_handler": ([p, _MSG, p], i32),
        "opj_set_warning_handler": ([p, _MSG, p], i32),
        "opj_stream_create": ([ctypes.c_size_t, i32], p),
        "opj_stream_destroy": ([p], None),
        "opj_stream_set_read_function": ([p, _READ], None),
        "opj_stream_set_skip_function": ([p, _SKIP], None),
        "opj_stream_set_seek_function": ([p, _SEEK], None),
        "opj_stream_set_user_data_length": ([p, ctypes.c_uint64], None),
        "opj_read_header": ([p, p, ctypes.POINTER(ctypes.POINTER(_Image))], i32),
        "opj_set_decoded_resolution_factor": ([p, u32], i32),
        "opj_decode": ([p, p, ctypes.POINTER(_Image)], i32),
        "opj_end_decompress": ([p, p], i32),
        "opj_image_destroy": ([ctypes.POINTER(_Image)], None),
    }
    for name, (args, res) in sigs.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    return lib


def library() -> ctypes.CDLL | None:
    """The bound libopenjp2 (2.x), or None when none loads."""
    global _lib, _lib_tried
    with _lock:
        if not _lib_tried:
            _lib_tried = True
            for path in _candidates():
                try:
                    lib = _bind(ctypes.CDLL(path))
                except (OSError, AttributeError):
                    continue
                if lib.opj_version().decode().startswith("2."):
                    _lib = lib
                    break
        return _lib


def available() -> bool:
    return library() is not None


def version() -> str:
    lib = library()
    return lib.opj_version().decode() if lib is not None else ""


class _MemoryStream:
    """The read/skip/seek callbacks OpenJPEG pulls a bytes object through (it has no memory stream of its own)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.read = _READ(self._read)
        self.skip = _SKIP(self._skip)
        self.seek = _SEEK(self._seek)

    def _read(self, buffer, nbytes, _user) -> int:
        left = len(self.data) - self.pos
        if left <= 0:
            return ctypes.c_size_t(-1).value  # OpenJPEG's end of stream
        n = min(nbytes, left)
        ctypes.memmove(buffer, self.data[self.pos:self.pos + n], n)
        self.pos += n
        return n

    def _skip(self, nbytes, _user) -> int:
        target = min(max(self.pos + nbytes, 0), len(self.data))
        moved, self.pos = target - self.pos, target
        return moved

    def _seek(self, offset, _user) -> int:
        if not 0 <= offset <= len(self.data):
            return 0
        self.pos = offset
        return 1


def decode(data: bytes, reduce: int = 0) -> np.ndarray:
    """A JPEG 2000 codestream -> stored sample values at resolution level 1/2**reduce: HxW for one component,
    HxWxC for several (OpenJPEG has applied the codestream's inverse component transform, as a full decode does).
    Integer dtype from the precision and signedness: uint8/int8 up to 8 bits, uint16/int16 up to 16."""
    lib = library()
    if lib is None:
        raise J2KError("no libopenjp2 found")
    errors: list[str] = []
    on_error = _MSG(lambda msg, _u: errors.append(msg.decode("utf-8", "replace").strip()))
    on_warning = _MSG(lambda msg, _u: None)
    stream = _MemoryStream(bytes(data))
    codec = lib.opj_create_decompress(_CODEC_J2K)
    handle = lib.opj_stream_create(min(len(data), 1 << 20) or 1, 1)
    image = ctypes.POINTER(_Image)()
    try:
        lib.opj_set_error_handler(codec, on_error, None)
        lib.opj_set_warning_handler(codec, on_warning, None)
        lib.opj_stream_set_read_function(handle, stream.read)
        lib.opj_stream_set_skip_function(handle, stream.skip)
        lib.opj_stream_set_seek_function(handle, stream.seek)
        lib.opj_stream_set_user_data_length(handle, len(data))
        params = ctypes.create_string_buffer(_DPARAMETERS_BYTES)
        lib.opj_set_default_decoder_parameters(params)
        if not lib.opj_setup_decoder(codec, params):
            raise J2KError(_said(errors, "decoder set-up failed"))
        if not lib.opj_read_header(handle, codec, ctypes.byref(image)):
            raise J2KError(_said(errors, "unreadable codestream header"))
        if reduce and not lib.opj_set_decoded_resolution_factor(codec, reduce):
            raise J2KError(_said(errors, f"resolution level 1/{1 << reduce} not in the codestream"))
        if not lib.opj_decode(codec, handle, image) or not lib.opj_end_decompress(codec, handle):
            raise J2KError(_said(errors, "decode failed"))
        return _pixels(image.contents)
    finally:
        if image:
            lib.opj_image_destroy(image)
        lib.opj_stream_destroy(handle)
        lib.opj_destroy_codec(codec)


def _said(errors: list[str], default: str) -> str:
    return "; ".join(e for e in errors if e)[:300] or default


def _pixels(img: _Image) -> np.ndarray:
    n = int(img.numcomps)
    if n < 1:
        raise J2KError("no components")
    comps = [img.comps[i] for i in range(n)]
    first = comps[0]
    h, w = int(first.h), int(first.w)
    if h == 0 or w == 0 or not first.data:
        raise J2KError("empty image at this level")
    if any(int(c.h) != h or int(c.w) != w or not c.data for c in comps):
        raise J2KError("components of different sizes (subsampled) at this level")
    prec, signed = int(first.prec), bool(first.sgnd)
    if prec > 16:
        raise J2KError(f"{prec}-bit samples")
    dtype = (np.int8 if signed else np.uint8) if prec <= 8 else (np.int16 if signed else np.uint16)
    planes = [np.ctypeslib.as_array(c.data, shape=(h * w,)).reshape(h, w).astype(dtype) for c in comps]
    return planes[0] if n == 1 else np.stack(planes, axis=-1)
