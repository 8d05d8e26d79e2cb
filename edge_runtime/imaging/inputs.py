"""One front door for file inputs: DICOM, PNG or JPEG, opened as a sequence of display frames."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_runtime.errors import InputError
from edge_runtime.imaging.dicom import DEFAULT_MAX_PIXEL_BYTES, DicomImage, DicomMeta
from edge_runtime.imaging.guard import DecodeLimits
from edge_runtime.imaging.images import decode_display_image
from edge_runtime.imaging.resolution import DecodeHint, DecodeInfo

_PNG = b"\x89PNG\r\n\x1a\n"
_JPEG = b"\xff\xd8\xff"


@dataclass
class InputImage:
    """A file opened for inference: frame count, display frames, and (for DICOM) its header facts."""

    name: str
    kind: str  # "dicom" | "png" | "jpeg"
    n_frames: int
    dicom: DicomImage | None = None
    _pixels: np.ndarray | None = None
    hint: DecodeHint | None = None  # the model input its frames are decoded for (None: full size)
    _info: DecodeInfo | None = None  # PNG/JPEG: how its one image was decoded

    @property
    def meta(self) -> DicomMeta | None:
        return self.dicom.meta if self.dicom else None

    @property
    def modality(self) -> str:
        return self.dicom.meta.modality if self.dicom else ""

    @property
    def pixel_spacing_mm(self) -> tuple[float, float] | None:
        return self.dicom.meta.pixel_spacing_mm if self.dicom else None

    def frame(self, index: int, windowing: str = "voi") -> np.ndarray:
        return self.decoded(index, windowing)[0]

    def decoded(self, index: int, windowing: str = "voi") -> tuple[np.ndarray, DecodeInfo]:
        """One display frame, at the size this input was opened for (`hint`), and how it was decoded."""
        if self.dicom is not None:
            if self.hint is None:
                pixels = self.dicom.display_frame(index, windowing)
                return pixels, DecodeInfo.full(pixels.shape)
            return self.dicom.decode_frame(index, windowing, self.hint)
        if index != 0:
            raise InputError(self.name, f"frame {index} out of range (0..0)")
        assert self._pixels is not None and self._info is not None
        return self._pixels, self._info

    def frames(self, windowing: str = "voi") -> Iterator[tuple[int, np.ndarray]]:
        for i in range(self.n_frames):
            yield i, self.frame(i, windowing)


def sniff(path: Path) -> str:
    """'dicom', 'png' or 'jpeg' from the file's first bytes; InputError otherwise."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except FileNotFoundError:
        raise InputError(str(path), "no such file") from None
    except IsADirectoryError:
        raise InputError(str(path), "is a directory, expected a DICOM, PNG or JPEG file") from None
    except OSError as exc:
        raise InputError(str(path), f"cannot read ({exc.strerror})") from None
    if len(head) == 0:
        raise InputError(str(path), "empty file")
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(_PNG):
        return "png"
    if head.startswith(_JPEG):
        return "jpeg"
    raise InputError(str(path), "not a DICOM (no DICM preamble), PNG or JPEG file")


def open_input(path: str | Path, max_pixel_bytes: int = DEFAULT_MAX_PIXEL_BYTES,
               limits: DecodeLimits | None = None, hint: DecodeHint | None = None) -> InputImage:
    """Open a file in this process. Untrusted files go through imaging.isolation instead, which calls this in a
    decode worker process. `hint`: the model input the frames are for; they are then decoded no larger than it
    needs (imaging.resolution); None decodes them whole (display, overlays)."""
    path = Path(path)
    limits = limits or DecodeLimits(max_pixel_bytes=max_pixel_bytes)
    kind = sniff(path)
    if kind == "dicom":
        dicom = DicomImage(path, limits=limits)
        return InputImage(str(path), kind, dicom.n_frames, dicom=dicom, hint=hint)
    pixels, info = decode_display_image(path, limits.max_pixel_bytes, limits, hint)
    return InputImage(str(path), kind, 1, _pixels=pixels, hint=hint, _info=info)
