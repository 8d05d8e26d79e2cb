"""The decode worker: a separate Python process that opens and decodes untrusted files for imaging.isolation.

It is started as `python -m edge_runtime.imaging.decode_worker FD` (a fresh interpreter: never a fork of the
daemon, whose engine threads would not survive one), limits its own address space once its decoders are
imported, and answers requests on the socket FD. A native crash, a hang or a memory blow-up in a decoder then
ends this process only. Its stdout and stderr are a file the parent reads: what libjpeg, libpng, OpenJPEG or
GDCM print there, with Python warnings and pydicom's log records, comes back as notes, and a note that says the
stream is broken (e.g. "Premature end of JPEG file") makes the frame an error, not a partly grey image.

Messages are JSON both ways (a compromised worker must not be able to hand the daemon a pickle); frame pixels
go through a shared-memory file (FrameBuffer) that the parent copies out of.
"""
from __future__ import annotations

import json
import os
import sys

# One thread per library: the worker decodes one file at a time and must not compete with the engine for cores.
THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2",
              "OPENCV_FOR_THREADS_NUM": "1"}


_CAPTURE_MAX = 1 << 20  # the captured output file is emptied past this (its notes were already taken)


def _vm_bytes(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


class FrameBuffer:
    """A file in /dev/shm both processes map: a frame is one memcpy in, one out (a 3.6-megapixel radiograph over
    a socket cost about 10 ms; through here about 1). It only grows, to the largest frame seen."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR)
        self._map = None
        self._size = 0

    def view(self, nbytes: int) -> memoryview:
        import mmap

        size = os.fstat(self._fd).st_size
        if nbytes > size:
            os.ftruncate(self._fd, nbytes)
            size = nbytes
        if self._map is None or self._size != size:
            if self._map is not None:
                self._map.close()
            self._map = mmap.mmap(self._fd, size)
            self._size = size
        return memoryview(self._map)[:nbytes]

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def write(self, pixels) -> None:
        self.view(pixels.nbytes)[:] = memoryview(pixels).cast("B")

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
        os.close(self._fd)


def limit_memory(extra_bytes: int) -> int:
    """RLIMIT_AS = what the interpreter and its decoders already map + `extra_bytes`: an allocation beyond it
    fails (MemoryError, or std::bad_alloc and an abort inside a C++ decoder) instead of taking the board's memory."""
    import resource

    if extra_bytes <= 0:
        return 0
    limit = _vm_bytes("VmSize") + extra_bytes
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return limit


class _Notes:
    """Everything the decoders said during one request: native output, Python warnings, log records."""

    def __init__(self, capture) -> None:
        self._capture = capture  # the file fd 1 and 2 write to, opened for reading
        self._capture.seek(0, os.SEEK_END)
        self.records: list[str] = []
        import logging

        class _Collect(logging.Handler):
            def emit(inner, record: logging.LogRecord) -> None:  # noqa: N805 - the handler, not the notes
                self.records.append(f"{record.name}: {record.getMessage()}")  # the message only: no traceback

        root = logging.getLogger()
        root.handlers[:] = [_Collect()]
        root.setLevel(logging.WARNING)

    def take(self, caught: list) -> list[str]:
        sys.stdout.flush()
        sys.stderr.flush()
        native = self._capture.read(1 << 16).decode("utf-8", "replace")
        self._capture.seek(0, os.SEEK_END)
        if self._capture.tell() > _CAPTURE_MAX:  # the file is opened O_APPEND: writers carry on at the new end
            os.ftruncate(2, 0)  # fd 2 is this file (its path is gone once the parent saw us start)
            self._capture.seek(0)
        notes = [line.strip() for line in native.splitlines() if line.strip()]
        notes += [f"{w.category.__name__}: {w.message}" for w in caught]
        notes += self.records
        self.records = []
        return notes[:50]


class _Server:
    def __init__(self, conn, capture, frames: FrameBuffer, limits, limit: int) -> None:
        self.conn = conn
        self.limit = limit  # RLIMIT_AS in force (0 = none)
        self.limits = limits
        self.notes = _Notes(capture)
        self.frames = frames
        self.inp = None

    def send(self, message: dict) -> None:
        self.conn.send_bytes(json.dumps(message).encode())

    def serve(self) -> None:
        while True:
            try:
                request = json.loads(self.conn.recv_bytes())
            except (EOFError, OSError):
                return  # the parent closed the socket or died: nothing left to do
            if request["op"] == "stop":
                return
            self.handle(request)

    def handle(self, request: dict) -> None:
        import warnings

        from edge_runtime.errors import InputError
        from edge_runtime.imaging.reasons import corruption_note, decode_failure

        pixels = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                reply, pixels = self.run(request)
                error = None
            except InputError as exc:
                error = exc.reason
            except (MemoryError, RecursionError) as exc:
                error = decode_failure(exc)
            except Exception as exc:  # a decoder bug on hostile data is this file's problem, told readably
                error = f"decoder failed: {decode_failure(exc)}"
            notes = self.notes.take(caught)
        if error is not None and request["op"] == "frame":
            error = self.memory_reason() or error
        if error is None and request["op"] != "stats":
            broken = corruption_note(notes)
            if broken is not None:
                what = f"frame {request['index']}" if request["op"] == "frame" else "the image"
                error = f"{what} is corrupt or truncated (decoder said: {broken})"
        if error is not None:
            self.inp = None if request["op"] == "open" else self.inp
            self.send({"ok": False, "reason": error, "notes": notes})
            return
        if pixels is not None:
            self.frames.write(pixels)
        reply.update(ok=True, notes=notes)
        self.send(reply)

    def memory_reason(self) -> str | None:
        """Decoder plugins report a failed allocation as anything (pydicom: "'NoneType' object has no attribute
        'encode'", or nothing): when the frame's estimated peak does not fit in what the limit leaves, say so."""
        from edge_runtime.imaging.guard import dicom_frame_peak_bytes

        dicom = getattr(self.inp, "dicom", None)
        if not self.limit or dicom is None:
            return None
        m = dicom.meta
        need = dicom_frame_peak_bytes(m.rows, m.cols, m.samples_per_pixel, m.bits_allocated, 0)
        if _vm_bytes("VmSize") + need <= self.limit:
            return None
        return (f"decoding a frame needs about {need >> 20} MiB, more than the decode worker has left under its limit "
                "(imaging.decode_worker_memory_bytes)")

    def run(self, request: dict):
        import numpy as np

        op = request["op"]
        if op == "open":
            import dataclasses

            from edge_runtime.imaging.inputs import open_input
            from edge_runtime.imaging.resolution import DecodeHint

            self.inp = None  # the previous file's buffers go before the next one is read
            inp = open_input(request["path"], limits=self.limits, hint=DecodeHint.from_dict(request.get("hint")))
            self.inp = inp
            meta = dataclasses.asdict(inp.meta) if inp.meta is not None else None
            return {"kind": inp.kind, "n_frames": inp.n_frames, "meta": meta}, None
        if op == "frame":
            if self.inp is None:
                raise RuntimeError("no file open")
            arr, info = self.inp.decoded(int(request["index"]), request["windowing"])
            arr = np.ascontiguousarray(arr)
            return {"shape": list(arr.shape), "dtype": arr.dtype.str, "decode": info.to_dict()}, arr
        if op == "stats":
            return {"peak_rss_bytes": _vm_bytes("VmHWM"), "rss_bytes": _vm_bytes("VmRSS")}, None
        raise RuntimeError(f"unknown request {op!r}")


def _die_with_parent() -> None:
    """A worker stuck in a decoder would outlive a killed daemon; Linux ends it with the parent (PR_SET_PDEATHSIG).
    Elsewhere the worker ends at its next read of the closed socket."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main(argv: list[str]) -> int:
    from multiprocessing.connection import Connection

    fd, capture_path, frames_path, memory_bytes, limits_json = int(argv[0]), argv[1], argv[2], int(argv[3]), argv[4]
    _die_with_parent()
    # Both files are open in both processes from here on: their names go now, so nothing is left on disk
    # whichever process is killed, whenever.
    capture = open(capture_path, "rb")  # noqa: SIM115 - read for the life of the worker
    frames = FrameBuffer(frames_path)
    for path in (capture_path, frames_path):
        try:
            os.unlink(path)
        except OSError:
            pass
    conn = Connection(fd)
    # The decoders are imported before the limit is set, so the limit bounds what decoding adds.
    import cv2
    import numpy  # noqa: F401
    import pydicom.pixels  # noqa: F401

    from edge_runtime.imaging import inputs, openjpeg  # noqa: F401
    from edge_runtime.imaging.guard import DecodeLimits

    openjpeg.available()  # libopenjp2 is mapped before the limit, like the other decoders

    cv2.setNumThreads(1)
    limit = limit_memory(memory_bytes)
    server = _Server(conn, capture, frames, DecodeLimits(**json.loads(limits_json)), limit)
    conn.send_bytes(json.dumps({"ok": True, "ready": os.getpid(), "limit": limit}).encode())
    server.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
