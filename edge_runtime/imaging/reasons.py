"""Decoder failures and warnings as one line a technician can act on.

Decoders fail with anything from a clear codec message ("Premature end of JPEG file") to Python internals from a
plugin that met data it did not expect ("'NoneType' object has no attribute 'encode'"). The first kind is kept, the
second becomes "could not interpret the data"; neither gets a traceback.
"""
from __future__ import annotations

import re

# Messages that say something about the data, from libjpeg(-turbo), libpng, OpenJPEG, GDCM, CharLS, pydicom, Pillow.
# Seen while decoding a frame, they mean the stream is broken: the frame is refused, not read as a partly grey image.
CORRUPTION = re.compile(
    r"premature end|corrupt jpeg|extraneous bytes|truncated|bogus|invalid (sos|huffman|jpeg)|huffman|"
    r"stream too short|not enough data|end of (the )?(file|stream|codestream)|less than expected|missing|"
    r"marker .* expected|unexpected marker|no image|crc error|idat|libpng error|read error|"
    r"stream error|tile.*(incomplete|error)|codestream error|failed to decode|error decoding",
    re.IGNORECASE,
)

# Messages that are about the decoder's code, not the data: never shown as they are.
_INTERNAL = re.compile(
    r"object has no attribute|nonetype|unpack_from|requires a buffer|not subscriptable|index out of range|"
    r"takes \d+ positional|unexpected keyword|has no len|object is not|broadcast|could not be broadcast|"
    r"cannot reshape|alias '|was removed in numpy|invalid literal|unsupported operand|maximum recursion|"
    r"list index|tuple index|keyerror|^\d+$",
    re.IGNORECASE,
)
_PLUGIN_LINE = re.compile(r"^\s*([\w-]+):\s*(.+)$")
_MAX = 240


def first_line(text: str) -> str:
    for line in str(text).splitlines():
        if line.strip():
            return " ".join(line.split())[:_MAX]
    return ""


def is_internal(message: str) -> bool:
    return bool(_INTERNAL.search(message))


def readable(message: str, what: str = "the data") -> str:
    """A decoder's message kept when it speaks about the data, replaced when it is a Python internal."""
    line = first_line(message)
    if not line or is_internal(line):
        return f"could not interpret {what} (corrupt or inconsistent with the header)"
    return line


def decode_failure(exc: BaseException) -> str:
    """pydicom's 'exceptions were raised by all available plugins' -> 'gdcm: ...; pylibjpeg: ...', each readable."""
    text = str(exc)
    if isinstance(exc, MemoryError):
        return "decoding needs more memory than the decode worker may use (imaging.decode_worker_memory_bytes)"
    if isinstance(exc, RecursionError):
        return "nested too deeply to decode (a malformed or hostile file)"
    plugins = []
    for line in text.splitlines()[1:]:
        match = _PLUGIN_LINE.match(line)
        if match:
            plugins.append(f"{match.group(1)}: {readable(match.group(2), 'the compressed data')}")
    if plugins:
        return "; ".join(plugins)
    if re.search(r"broadcast|reshape|cannot reshape", text, re.IGNORECASE):
        return "the pixel data does not match the header's Rows x Columns x SamplesPerPixel"
    return readable(text, "the pixel data")


def corruption_note(notes: list[str]) -> str | None:
    """The first decoder note that says the stream is broken, or None."""
    for note in notes:
        if CORRUPTION.search(note):
            return first_line(note)
    return None
