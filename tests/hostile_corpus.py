"""A deterministic corpus of hostile and broken inputs, built at test time from the shared DICOM, PNG and JPEG files.

Nothing here is committed as data: `build_corpus(out)` writes the files into a temporary folder. Each file name starts
with its class (`trunc`, `flip`, `header`, `frag`, `deep`, `crash`, `deflate-bomb`, `png-bomb`, `jpeg-bomb`,
`dup-same`, `dup-uid`, `junk`), so a test can check each class's outcome. `EXPECT_REFUSED` lists the classes that
must never get a finding.

    python tests/hostile_corpus.py --out /tmp/corpus --count 1000      # build a corpus of >= 1,000 files
    python tests/hostile_corpus.py --out /tmp/corpus --count 1000 --run # ... and run it through infer and the daemon
"""
from __future__ import annotations

import argparse
import io
import struct
import zlib
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SHARED_DATA = HERE.parent.parent / "shared" / "data"
DICOM_DIR = SHARED_DATA / "dicom"

# Small files of every decoder family: the in-suite corpus stays fast on two cores.
QUICK_DICOM = ("pydicom-data/US1_J2KR.dcm", "pydicom-data/RG3_J2KI.dcm", "pylibjpeg-data/RG2_JLSN.dcm",
               "pylibjpeg-data/JPEGExtended_3s_1f_u_08_08.dcm", "pylibjpeg-data/RG2_JPLY_fixed.dcm",
               "pydicom-data/examples_ybr_color.dcm", "pydicom-data/OBXXXX1A_rle_2frame.dcm",
               "pydicom-data/US1_UNCR.dcm", "pydicom-data/gdcm-US-ALOKA-16.dcm",
               "pydicom-data/JPGLosslessP14SV1_1s_1f_8b.dcm")

# Classes that are broken by construction: a finding for any of them is a wrong answer.
EXPECT_REFUSED = ("trunc", "header", "frag", "deep", "deflate-bomb", "png-bomb", "jpeg-bomb", "junk", "crash")
# Seeds of _stream_header_flips that abort GDCM (SIGABRT) on these files, with this package's guards in place.
CRASH_SEEDS = {"JPEGExtended_3s_1f_u_08_08": (151, 466, 641, 655, 697, 851, 886, 1852),
               "JPGLosslessP14SV1_1s_1f_8b": (460, 523, 607, 838, 866, 950, 1118, 1132, 1433, 1447, 1727)}
# A bit flip may land in a header byte nobody reads or change pixel values only: a finding is then right.
MAY_SUCCEED = ("flip", "dup-same", "dup-uid")

HEADER_EDITS = ("cols+1", "cols=65535", "rows=0", "bits=32", "bits=0", "stored>bits", "samples=4", "ybr420",
                "frames=-1", "frames=0", "frames+5", "frames=abc")


def shared_sources(quick: bool) -> tuple[list[Path], list[Path], list[Path]]:
    """(DICOM, PNG, JPEG) files the corpus is made from."""
    if quick:
        dicom = [DICOM_DIR / p for p in QUICK_DICOM]
    else:
        dicom = sorted(DICOM_DIR.glob("*/*.dcm"))
    pngs = sorted((SHARED_DATA / "hc18" / "images").glob("*_HC.png"))[: 2 if quick else 6]
    jpegs = sorted((SHARED_DATA / "cxr-kermany" / "train").glob("*/*.jpeg"))[: 2 if quick else 6]
    return [p for p in dicom if p.exists()], pngs, jpegs


def _write(out: Path, name: str, data: bytes) -> Path:
    path = out / name
    path.write_bytes(data)
    return path


def _flip(data: bytes, seed: int, start: int, flips: int = 24) -> bytes:
    rng = np.random.default_rng(seed)
    buf = bytearray(data)
    for pos in rng.integers(min(start, len(buf) - 1), len(buf), flips):
        buf[int(pos)] ^= 1 << int(rng.integers(0, 8))
    return bytes(buf)


def _stream_header_flips(data: bytes, seed: int) -> bytes:
    """1-11 bit flips in the first 300 bytes of the first fragment: the codestream's own header segments. For some
    seeds GDCM aborts the process (an uncaught C++ exception, gdcmJPEGBITSCodec.hxx:782): found by fuzzing,
    listed in CRASH_SEEDS."""
    rng = np.random.default_rng(seed)
    buf = bytearray(data)
    start = _pixel_offset(data) + 12 + 8 + 8  # past the element header, the offset table and the item header
    for _ in range(int(rng.integers(1, 12))):
        pos = start + int(rng.integers(0, min(300, len(buf) - start)))
        buf[pos] ^= 1 << int(rng.integers(0, 8))
    return bytes(buf)


def _pixel_offset(data: bytes) -> int:
    """Where the pixel data element starts (its tag), so bit flips hit the image rather than the header."""
    pos = data.rfind(b"\xe0\x7f\x10\x00")
    return pos if pos > 0 else len(data) // 2


def _pixel_end(data: bytes) -> int:
    """Where the pixel data's own bytes end: before the encapsulated sequence delimiter, or at the end of a native
    value (trailing elements and padding after it are not the image)."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    start = _pixel_offset(data)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        return data.rfind(b"\xfe\xff\xdd\xe0")
    header = 12 if data[start + 4:start + 6] in (b"OB", b"OW") else 8
    return start + header + len(ds.PixelData)


def _dicom_bytes(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _header_edit(ds, edit: str):
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if edit == "cols+1":
        ds.Columns = ds.Columns + 1
    elif edit == "cols=65535":
        ds.Columns = 65535
    elif edit == "rows=0":
        ds.Rows = 0
    elif edit == "bits=32":
        ds.BitsAllocated = 32
    elif edit == "bits=0":
        ds.BitsAllocated = 0
    elif edit == "stored>bits":
        ds.BitsStored = ds.BitsAllocated + 4
    elif edit == "samples=4":
        ds.SamplesPerPixel = 4
    elif edit == "ybr420":
        ds.PhotometricInterpretation = "YBR_PARTIAL_420"
    elif edit == "frames=-1":
        ds.NumberOfFrames = -1
    elif edit == "frames=0":
        ds.NumberOfFrames = 0
    elif edit == "frames+5":
        ds.NumberOfFrames = frames + 5
    elif edit == "frames=abc":
        ds.NumberOfFrames = 77  # replaced by "ab" in the written bytes: pydicom refuses to write it
    return ds


def _garble_frames(data: bytes) -> bytes:
    for tag in (b"\x28\x00\x08\x00IS\x02\x0077", b"\x28\x00\x08\x00\x02\x00\x00\x0077"):
        data = data.replace(tag, tag[:-2] + b"ab")
    return data


def _items(fragments: list[bytes]) -> bytes:
    """Encapsulated pixel data: an empty offset table, one item per fragment, the sequence delimiter."""
    out = [b"\xfe\xff\x00\xe0\x00\x00\x00\x00"]
    for frag in fragments:
        frag = frag + b"\x00" * (len(frag) % 2)
        out.append(b"\xfe\xff\x00\xe0" + struct.pack("<I", len(frag)) + frag)
    return b"".join(out) + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"


def _drop_last_fragment(ds) -> bytes | None:
    """Encapsulated pixel data without its last fragment (a sender that lost the end); a single-fragment image
    keeps the first half of it."""
    from pydicom.encaps import generate_fragments

    if not ds.file_meta.TransferSyntaxUID.is_compressed:
        return None
    fragments = list(generate_fragments(ds.PixelData))
    kept = fragments[:-1] if len(fragments) > 1 else [fragments[0][: len(fragments[0]) // 2]]
    ds.PixelData = _items(kept)
    return _dicom_bytes(ds)


def _deep_sequence(data: bytes, depth: int) -> bytes:
    """A private sequence nested `depth` deep, undefined lengths, inserted before the pixel data (explicit VR LE)."""
    seq = b"\x09\x00\x10\x10SQ\x00\x00\xff\xff\xff\xff"
    item, item_end = b"\xfe\xff\x00\xe0\xff\xff\xff\xff", b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
    seq_end = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    nested = b""
    for _ in range(depth):
        nested = seq + item + nested + item_end + seq_end
    pos = _pixel_offset(data)
    return data[:pos] + nested + data[pos:]


def _deflate_bomb(template, inflated_bytes: int) -> bytes:
    """A Deflated Explicit VR file whose private OB element of zeros inflates to `inflated_bytes` (written by hand:
    pydicom would hold the whole inflated dataset to write it)."""
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = template.copy()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    from pydicom.filebase import DicomBytesIO

    meta, body = DicomBytesIO(), DicomBytesIO()
    meta.is_little_endian, meta.is_implicit_VR = True, False
    body.is_little_endian, body.is_implicit_VR = True, False
    write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    if "PixelData" in ds:
        del ds.PixelData
    write_dataset(body, ds)
    packer = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [bytes(128), b"DICM", meta.getvalue(), packer.compress(body.getvalue()),
             packer.compress(b"\xe0\x7f\x10\x00OB\x00\x00" + struct.pack("<I", inflated_bytes))]
    zeros = bytes(1 << 22)
    left = inflated_bytes
    while left > 0:
        parts.append(packer.compress(zeros[: min(left, len(zeros))]))
        left -= len(zeros)
    parts.append(packer.flush())
    return b"".join(parts)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_bomb(side: int, bits: int = 16) -> bytes:
    """A real 16-bit grey PNG of side x side zeros: about 1 MB on disk per 23000 x 23000."""
    ihdr = struct.pack(">IIBBBBB", side, side, bits, 0, 0, 0, 0)
    row = bytes(1 + side * bits // 8)
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def png_claims(data: bytes, width: int, height: int) -> bytes:
    """A PNG whose IHDR (CRC fixed) claims another size than its data holds."""
    ihdr = bytearray(data[16:29])
    ihdr[0:8] = struct.pack(">II", width, height)
    return data[:8] + _png_chunk(b"IHDR", bytes(ihdr)) + data[33:]


def jpeg_bomb(side: int) -> bytes:
    """A tiny progressive JPEG whose frame header says side x side: a few KB that would decode to gigabytes."""
    import cv2

    img = (np.arange(64 * 64, dtype=np.uint8).reshape(64, 64))
    ok, enc = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    data = bytearray(enc.tobytes())
    for marker in (b"\xff\xc2", b"\xff\xc0"):
        pos = data.find(marker)
        if pos > 0:
            data[pos + 5:pos + 9] = struct.pack(">HH", side, side)
            break
    return bytes(data)


def build_corpus(out: Path, count: int = 0, quick: bool = True, bomb_bytes: int = 1 << 30) -> list[Path]:
    """Write the corpus into `out`; with `count`, add bit-flip variants until there are at least that many files."""
    import pydicom

    out.mkdir(parents=True, exist_ok=True)
    dicoms, pngs, jpegs = shared_sources(quick)
    files: list[Path] = []
    for src in dicoms:
        data = src.read_bytes()
        stem = src.stem
        end = _pixel_end(data)
        for frac in (0.02, 0.3, 0.6, 0.9, 0.99):  # of the bytes up to the end of the pixel data
            files.append(_write(out, f"trunc__{stem}__{int(frac * 100)}pct.dcm", data[: int(end * frac)]))
        for cut in (3, 17, 64):  # into the pixel data itself (a cut trailing padding still leaves a whole image)
            files.append(_write(out, f"trunc__{stem}__minus{cut}.dcm", data[: end - cut]))
        for seed in range(3):
            files.append(_write(out, f"flip__{stem}__seed{seed}.dcm", _flip(data, seed, _pixel_offset(data) + 12)))
        for edit in HEADER_EDITS:
            ds = _header_edit(pydicom.dcmread(io.BytesIO(data)), edit)
            written = _dicom_bytes(ds)
            written = _garble_frames(written) if edit == "frames=abc" else written
            files.append(_write(out, f"header__{stem}__{edit.replace('>', 'gt').replace('=', '_')}.dcm", written))
        dropped = _drop_last_fragment(pydicom.dcmread(io.BytesIO(data)))
        if dropped is not None:
            files.append(_write(out, f"frag__{stem}__lastfragment.dcm", dropped))
        for seed in CRASH_SEEDS.get(stem, ())[: 2 if quick else None]:
            files.append(_write(out, f"crash__{stem}__seed{seed}.dcm", _stream_header_flips(data, seed)))
        if not pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta.TransferSyntaxUID.is_implicit_VR:
            files.append(_write(out, f"deep__{stem}__300.dcm", _deep_sequence(data, 300)))
    if dicoms:
        first = pydicom.dcmread(dicoms[0])
        files.append(_write(out, f"dup-same__{dicoms[0].stem}__copy.dcm", dicoms[0].read_bytes()))
        other = pydicom.dcmread(dicoms[1])
        other.SOPInstanceUID = first.SOPInstanceUID  # a different image under an already-seen UID
        files.append(_write(out, f"dup-uid__{dicoms[1].stem}__as_{dicoms[0].stem}.dcm", _dicom_bytes(other)))
        template = pydicom.dcmread(dicoms[-1])
        for size in ((bomb_bytes,) if quick else (bomb_bytes, 3 * bomb_bytes)):
            files.append(_write(out, f"deflate-bomb__{dicoms[-1].stem}__{size >> 20}MiB.dcm", _deflate_bomb(template,
                                                                                                           size)))
    for src in pngs + jpegs:
        data = src.read_bytes()
        ext = src.suffix.lstrip(".")
        for frac in (0.05, 0.5, 0.9, 0.99):
            files.append(_write(out, f"trunc__{src.stem}__{int(frac * 100)}pct.{ext}", data[: int(len(data) * frac)]))
        for seed in range(3):
            files.append(_write(out, f"flip__{src.stem}__seed{seed}.{ext}", _flip(data, seed, len(data) // 8)))
    if pngs:
        files.append(_write(out, "png-bomb__zeros__12000.png", png_bomb(12000)))
        if not quick:
            files.append(_write(out, "png-bomb__zeros__23000.png", png_bomb(23000)))
        files.append(_write(out, f"png-bomb__{pngs[0].stem}__claims30000.png",
                            png_claims(pngs[0].read_bytes(), 30000, 30000)))
    files.append(_write(out, "jpeg-bomb__progressive__30000.jpeg", jpeg_bomb(30000)))
    files.append(_write(out, "junk__empty.dcm", b""))
    files.append(_write(out, "junk__preamble-only.dcm", bytes(128) + b"DICM"))
    seed = 100
    while count and len(files) < count:
        src = (dicoms + pngs + jpegs)[seed % len(dicoms + pngs + jpegs)]
        data = src.read_bytes()
        start = _pixel_offset(data) + 12 if src.suffix == ".dcm" else len(data) // 8
        files.append(_write(out, f"flip__{src.stem}__seed{seed}{src.suffix}", _flip(data, seed, start)))
        seed += 1
    return files


def klass(path: Path | str) -> str:
    return Path(path).name.split("__", 1)[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="the small in-suite source set")
    parser.add_argument("--run", action="store_true", help="run the corpus through infer and the daemon, report")
    args = parser.parse_args()
    files = build_corpus(args.out / "corpus", args.count, quick=args.quick)
    print(f"{len(files)} files in {args.out / 'corpus'}")
    if args.run:
        from hostile_run import report

        print(report(files, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
