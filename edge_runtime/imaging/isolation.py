"""Untrusted files are decoded in a small pool of worker processes, so a decoder can only cost the file it chokes on.

A file from the inbox, the SCP or `infer` may crash a native decoder (GDCM aborts on some inconsistent headers),
hang it, or blow its memory up. Each worker (imaging.decode_worker) is a fresh interpreter with an address-space
limit; every request has a timeout. A worker that dies or hangs is replaced, and the file gets a reason naming the
decoder and the signal. The daemon, the SCP and `infer` carry on with the next file.

`DecodePool.open(path)` gives an `IsolatedInput` with the interface of imaging.inputs.InputImage (n_frames, meta,
frame(i, windowing)); frames come over a socket one at a time as uint8 display arrays, so a long cine never sits in
either process whole. Hold it in a `with` block: the worker returns to the pool when the block ends.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

from edge_runtime.errors import InputError
from edge_runtime.imaging.decode_worker import THREAD_ENV, FrameBuffer
from edge_runtime.imaging.dicom import DicomMeta
from edge_runtime.imaging.guard import DecodeLimits
from edge_runtime.imaging.inputs import sniff
from edge_runtime.imaging.resolution import DecodeHint, DecodeInfo
from edge_runtime.imaging.reasons import first_line
from edge_runtime.registry import sha256_file

log = logging.getLogger("edge_runtime.decode")

DEFAULT_WORKERS = 1
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_WORKER_MEMORY_BYTES = 1 << 30  # address space a worker may add to what its decoders map at start
_START_TIMEOUT_S = 120.0  # a cold start on a busy 2-core board imports numpy, pydicom, OpenCV and GDCM


class WorkerLost(Exception):
    """The worker died or hung during a request; `reason` says how, readably."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class DecodeWorker:
    """One worker process and the parent's end of its socket."""

    def __init__(self, memory_bytes: int, limits: DecodeLimits) -> None:
        self.memory_bytes = memory_bytes
        self.limits = limits
        self.proc: subprocess.Popen | None = None
        self.conn = None
        self.capture: Path | None = None
        self._capture_fh = None
        self.frames: FrameBuffer | None = None
        self._capture_pos = 0
        self._ready = False

    def start(self) -> None:
        """Starts the process; it imports its decoders on its own, `wait_ready` waits for that."""
        from multiprocessing.connection import Connection

        ours, theirs = socket.socketpair()
        tmp_fd, name = tempfile.mkstemp(prefix="edge-decode-", suffix=".log")
        os.close(tmp_fd)
        fd = os.open(name, os.O_WRONLY | os.O_APPEND)  # append: the worker may empty the file under its writers
        self.capture = Path(name)
        self._capture_fh = open(name, "rb")  # noqa: SIM115 - read until the worker is stopped
        shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        frames_fd, frames_name = tempfile.mkstemp(prefix="edge-decode-", suffix=".frames", dir=shm)
        os.close(frames_fd)
        self.frames = FrameBuffer(frames_name)
        env = {**os.environ, **THREAD_ENV}
        args = [sys.executable, "-m", "edge_runtime.imaging.decode_worker", str(theirs.fileno()), name, frames_name,
                str(self.memory_bytes), json.dumps(dataclasses.asdict(self.limits))]
        try:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, env=env,
                                         pass_fds=(theirs.fileno(),), close_fds=True)
        finally:
            os.close(fd)
            theirs.close()
        self.conn = Connection(ours.detach())
        self._capture_pos = 0
        self._ready = False

    def wait_ready(self) -> None:
        if self._ready:
            return
        reply = self._receive(_START_TIMEOUT_S, "starting")
        if not reply.get("ready"):
            raise WorkerLost(f"the decode worker did not start: {reply}")
        self._ready = True
        self._native()  # what the imports printed is not a file's
        self._unlink()  # the worker unlinked them already; this is for one that died before it could

    def send(self, message: dict, what: str) -> None:
        self.wait_ready()
        try:
            self.conn.send_bytes(json.dumps(message).encode())
        except OSError:
            raise WorkerLost(self._death(what)) from None

    def request(self, message: dict, timeout_s: float, what: str) -> dict:
        self.send(message, what)
        return self._receive(timeout_s, what)

    def pixels(self, nbytes: int, what: str) -> bytearray:
        """A copy of the frame the worker just wrote: the buffer is overwritten by its next frame. The worker is not
        trusted to say its size: it must have written that much."""
        if nbytes > self.frames.size():
            raise WorkerLost(f"the decode worker announced {nbytes} bytes for {what} but wrote {self.frames.size()}")
        return bytearray(self.frames.view(nbytes))

    def _receive(self, timeout_s: float, what: str) -> dict:
        try:
            if not self.conn.poll(timeout_s):
                raise WorkerLost(self._hung(timeout_s, what))
            return json.loads(self.conn.recv_bytes())
        except (EOFError, OSError):
            raise WorkerLost(self._death(what)) from None
        except ValueError:
            raise WorkerLost(f"the decode worker answered garbage while {what}") from None

    def _hung(self, timeout_s: float, what: str) -> str:
        self.kill()
        native = self._native()
        tail = f"; it printed: {native[-1]}" if native else ""
        return f"decoding took longer than {timeout_s:.0f} s (imaging.decode_timeout_s) while {what}; " \
               f"the decoder was stopped{tail}"

    def _death(self, what: str) -> str:
        code = None
        if self.proc is not None:
            try:
                code = self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # its socket broke but it lives on: end it
                self.kill()
                code = self.proc.returncode
        native = self._native()
        said = f": {first_line(native[-1])}" if native else ""
        for i, line in enumerate(native):  # GDCM: "terminate called ...", then the source line and the assertion
            if ".cxx:" in line or ".cpp:" in line or "what():" in line:
                text = re.sub(r"what\(\):\s*|/\S*/", "", " ".join(native[i:i + 2]))  # no build paths
                said = ": " + first_line(text)
                break
        if code is not None and code < 0:
            try:
                sig = signal.Signals(-code).name
            except ValueError:
                sig = f"signal {-code}"
            hint = " (out of memory?)" if sig == "SIGKILL" else ""
            return f"decoder crashed with {sig}{hint} while {what}{said}"
        return f"the decode worker exited with status {code} while {what}{said}"

    def _native(self) -> list[str]:
        """Lines the worker printed since the last call (its notes come with each reply; this is for crashes)."""
        fh = self._capture_fh
        if fh is None:
            return []
        try:
            if os.fstat(fh.fileno()).st_size < self._capture_pos:
                self._capture_pos = 0  # the worker emptied it
            fh.seek(self._capture_pos)
            text = fh.read(1 << 16)
            self._capture_pos = fh.tell()
        except OSError:
            return []
        return [line.strip() for line in text.decode("utf-8", "replace").splitlines() if line.strip()]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.conn is not None and self.alive():
            try:
                self.conn.send_bytes(json.dumps({"op": "stop"}).encode())
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()
        if self.conn is not None:
            self.conn.close()
        self._unlink()
        if self._capture_fh is not None:
            self._capture_fh.close()
            self._capture_fh = None
        if self.frames is not None:
            self.frames.close()
            self.frames = None

    def _unlink(self) -> None:
        if self.capture is not None:
            self.capture.unlink(missing_ok=True)
        if self.frames is not None:
            Path(self.frames.path).unlink(missing_ok=True)


def _decoder_name(kind: str, meta: DicomMeta | None) -> str:
    """Which library decodes this file, for a crash reason: pydicom tries its available plugins in order."""
    if kind == "png":
        return "PNG (OpenCV libpng)"
    if kind == "jpeg":
        return "JPEG (OpenCV libjpeg)"
    if meta is None:
        return "DICOM header (pydicom)"
    try:
        import pydicom.pixels
        from pydicom.uid import UID

        uid = UID(meta.transfer_syntax)
        plugins = pydicom.pixels.get_decoder(uid).available_plugins
        return f"{uid.name} ({', '.join(plugins) or 'pydicom'})"
    except Exception:  # an unknown syntax was refused in the worker already; the name is only for the reason
        return meta.transfer_syntax


class IsolatedInput:
    """A file opened in a decode worker: the interface of InputImage, frames fetched one by one."""

    def __init__(self, pool: DecodePool, worker: DecodeWorker, name: str, reply: dict, path: Path,
                 hint: DecodeHint | None = None) -> None:
        self._pool, self._worker = pool, worker
        self.hint = hint
        self.name = name
        self.path = path
        self.kind: str = reply["kind"]
        self.n_frames: int = int(reply["n_frames"])
        self._digest: str | None = None
        self._digest_thread: threading.Thread | None = None
        meta = reply.get("meta")
        self.meta: DicomMeta | None = DicomMeta(**{**meta, "pixel_spacing_mm": _pair(meta["pixel_spacing_mm"])}) \
            if meta else None
        self.decoder = _decoder_name(self.kind, self.meta)

    def start_digest(self) -> None:
        """Hash the file in a thread while the worker decodes the first frame (hashlib releases the GIL): a 7 MB
        radiograph's sha256 costs about 4 ms, hidden behind its decode on two cores."""
        if self._digest_thread is None and self._digest is None:
            self._digest_thread = threading.Thread(target=self._hash, name="digest", daemon=True)
            self._digest_thread.start()

    def _hash(self) -> None:
        try:
            self._digest = sha256_file(self.path)
        except OSError:
            self._digest = ""  # the file vanished under us: the caller's next step on it says so

    @property
    def sha256(self) -> str:
        """Of the whole file: a reused SOP Instance UID with other content is another study item."""
        if self._digest is None:
            self.start_digest()
        if self._digest_thread is not None:
            self._digest_thread.join()
        return self._digest or ""

    @property
    def modality(self) -> str:
        return self.meta.modality if self.meta else ""

    @property
    def pixel_spacing_mm(self) -> tuple[float, float] | None:
        return self.meta.pixel_spacing_mm if self.meta else None

    def frame(self, index: int, windowing: str = "voi") -> np.ndarray:
        return self.decoded(index, windowing)[0]

    def decoded(self, index: int, windowing: str = "voi") -> tuple[np.ndarray, DecodeInfo]:
        """One display frame at the size the file was opened for (DecodePool.open's hint), and how it was decoded;
        a reduction that did not happen says why in the debug log."""
        if self._worker is None:
            raise InputError(self.name, "decode worker already released")
        what = f"decoding frame {index} with {self.decoder}"
        reply = self._pool._call(self._worker, {"op": "frame", "index": index, "windowing": windowing}, self.name, what)
        shape = tuple(int(n) for n in reply["shape"])
        dtype = np.dtype(reply["dtype"])
        if dtype != np.uint8 or len(shape) not in (2, 3):
            raise InputError(self.name, f"decode worker returned a {dtype} frame of shape {shape}")
        nbytes = int(np.prod(shape)) * dtype.itemsize
        try:
            pixels = self._worker.pixels(nbytes, what)
        except WorkerLost as exc:
            self._pool._lost(self._worker, exc)
            raise InputError(self.name, exc.reason) from None
        info = DecodeInfo.from_dict(reply["decode"]) if reply.get("decode") else DecodeInfo.full(shape)
        if info.reason and self.hint is not None and index == 0:  # once per file, not per cine frame
            log.debug("%s: decoded %s (%s)", self.name, info.path, info.reason)
        return np.frombuffer(pixels, dtype).reshape(shape), info

    def frames(self, windowing: str = "voi"):
        for i in range(self.n_frames):
            yield i, self.frame(i, windowing)

    def close(self) -> None:
        if self._worker is not None:
            self._pool._release(self._worker)
            self._worker = None

    def __enter__(self) -> IsolatedInput:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _pair(value) -> tuple[float, float] | None:
    return (float(value[0]), float(value[1])) if value else None


class DecodePool:
    """`workers` decode processes, started at `start()` without waiting for them (readiness is not delayed by
    their imports), restarted in the background when one dies."""

    def __init__(self, workers: int = DEFAULT_WORKERS, timeout_s: float = DEFAULT_TIMEOUT_S,
                 memory_bytes: int = DEFAULT_WORKER_MEMORY_BYTES, limits: DecodeLimits | None = None) -> None:
        self.size = max(1, workers)
        self.timeout_s = timeout_s
        self.memory_bytes = memory_bytes
        self.limits = limits or DecodeLimits()
        self._idle: queue.Queue[DecodeWorker] = queue.Queue()
        self._all: list[DecodeWorker] = []
        self._lock = threading.Lock()
        self._started = False
        self._closed = False
        self.counts = {"files": 0, "frames": 0, "refused": 0, "crashes": 0, "timeouts": 0, "restarts": 0}

    @classmethod
    def from_config(cls, imaging) -> DecodePool:
        """The pool an [imaging] section (config.ImagingSection) describes, not started."""
        limits = DecodeLimits(max_pixel_bytes=imaging.max_pixel_bytes, max_decode_bytes=imaging.max_decode_bytes)
        return cls(imaging.decode_workers, imaging.decode_timeout_s, imaging.decode_worker_memory_bytes, limits)

    def start(self) -> None:
        with self._lock:
            if self._started:
                return
            self._started = True
            for _ in range(self.size):
                self._idle.put(self._spawn())

    def _spawn(self) -> DecodeWorker:
        worker = DecodeWorker(self.memory_bytes, self.limits)
        worker.start()
        self._all.append(worker)
        return worker

    def open(self, path: str | Path, hint: DecodeHint | None = None) -> IsolatedInput:
        """Open a file in a worker; InputError with a readable reason for anything wrong with the file. `hint`: the
        model input its frames are for (imaging.resolution); None decodes them whole (display, overlays)."""
        name = str(path)
        kind = sniff(Path(path))  # cheap and in-process: a non-image never reaches a worker
        self.start()
        worker = self._idle.get()
        try:
            request = {"op": "open", "path": str(Path(path).resolve())}
            if hint is not None:
                request["hint"] = hint.to_dict()
            reply = self._call(worker, request, name, f"opening it as {kind.upper()}")
        except BaseException:
            self._release(worker)
            raise
        self.counts["files"] += 1
        return IsolatedInput(self, worker, name, reply, Path(path), hint)

    def _call(self, worker: DecodeWorker, message: dict, name: str, what: str) -> dict:
        try:
            reply = worker.request(message, self.timeout_s, what)
        except WorkerLost as exc:
            self._lost(worker, exc)
            raise InputError(name, exc.reason) from None
        notes = reply.get("notes") or []
        if notes:  # decoder chatter in one line, never the raw lines in the daemon's log
            log.debug("%s: decoder notes while %s: %s", name, what, " | ".join(notes)[:1000])
        if not reply.get("ok"):
            self.counts["refused"] += 1
            raise InputError(name, reply.get("reason") or "refused by the decode worker")
        if message["op"] == "frame":
            self.counts["frames"] += 1
        return reply

    def _lost(self, worker: DecodeWorker, exc: WorkerLost) -> None:
        """A worker died or hung: replace it at once (in place, so whoever holds it gets a fresh one back)."""
        self.counts["timeouts" if "longer than" in exc.reason else "crashes"] += 1
        # INFO: the file's own reason (quarantine, infer's error line) already says it at the level that counts.
        log.info("decode worker %s lost: %s; starting a new one", worker.proc.pid if worker.proc else "?", exc.reason)
        worker.stop()
        if not self._closed:
            worker.start()
            self.counts["restarts"] += 1

    def _release(self, worker: DecodeWorker) -> None:
        if self._closed:
            worker.stop()
        else:
            self._idle.put(worker)

    def wait_ready(self) -> None:
        """Start the pool and wait until its workers have imported their decoders (benchmarks, tests)."""
        self.start()
        held = [self._idle.get() for _ in range(self.size)]
        try:
            for worker in held:
                try:
                    worker.wait_ready()
                except WorkerLost as exc:  # the next request on it restarts it and tells that file why
                    log.warning("decode worker did not start: %s", exc.reason)
        finally:
            for worker in held:
                self._idle.put(worker)

    def stats(self) -> dict:
        return dict(self.counts, workers=sum(1 for w in self._all if w.alive()))

    def peak_rss_bytes(self) -> int:
        """The largest peak RSS among idle workers (a busy one is not asked)."""
        peaks = []
        held = []
        while True:
            try:
                held.append(self._idle.get_nowait())
            except queue.Empty:
                break
        for worker in held:
            try:
                peaks.append(int(worker.request({"op": "stats"}, 10.0, "reporting its memory")["peak_rss_bytes"]))
            except (WorkerLost, KeyError, ValueError):
                pass
            self._idle.put(worker)
        return max(peaks, default=0)

    def close(self) -> None:
        self._closed = True
        for worker in self._all:
            worker.stop()

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
