"""A bundle over MQTT: cut into messages by the hub, stored message by message on the device, put together.

Message payload: MAGIC, a 4-byte big-endian header length, a JSON header {"bundle": sha256 of the whole bundle,
"size": its bytes, "index": i, "count": n, "offset": byte offset}, then the chunk's bytes. A payload without
MAGIC is a whole bundle in one message. The header is not trusted: the assembled file must hash to the id it
announced, and then the bundle's own signature decides.

Each chunk is written to `incoming/<bundle id>/<index>.part` (fsynced, renamed into place) inside the MQTT
callback, before paho sends the PUBACK: a chunk acknowledged is a chunk on disk. So after a link drop or a
restart the chunks already received stay and the rest complete the bundle whenever they come (the broker keeps
the device's persistent session and queues them; a hub that publishes the whole bundle again is fine too,
chunks already held are skipped). A partial bundle that gets no new chunk for `models.incoming_ttl_s` is
discarded, and so is the oldest partial when more than MAX_PARTIALS are open.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from edge_runtime.errors import EdgeError

MAGIC = b"EDGEBNDL\x01"
DEFAULT_CHUNK_BYTES = 256 << 10
MAX_PARTIALS = 4
MAX_HEADER = 4096
DONE_KEPT = 32


class ChunkError(EdgeError):
    pass


@dataclass(frozen=True)
class Chunk:
    bundle: str
    size: int
    index: int
    count: int
    offset: int
    data: bytes
    model: str | None = None


def split(data: bytes, chunk_bytes: int = DEFAULT_CHUNK_BYTES, model: str | None = None) -> list[bytes]:
    """The MQTT payloads for one bundle (the hub side: `edge-runtime models publish`). `model`: the model the hub
    means to roll out; the device refuses a bundle whose signed manifest names another."""
    if chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be > 0")
    digest = hashlib.sha256(data).hexdigest()
    count = max(1, -(-len(data) // chunk_bytes))
    out = []
    for i in range(count):
        part = data[i * chunk_bytes:(i + 1) * chunk_bytes]
        fields = {"bundle": digest, "size": len(data), "index": i, "count": count, "offset": i * chunk_bytes}
        if model:
            fields["model"] = model
        header = json.dumps(fields, separators=(",", ":")).encode()
        out.append(MAGIC + len(header).to_bytes(4, "big") + header + part)
    return out


def parse(payload: bytes, max_bytes: int) -> Chunk:
    if not payload.startswith(MAGIC):
        if len(payload) > max_bytes:
            raise ChunkError("bundle message", f"{len(payload)} bytes, over the cap of {max_bytes} bytes")
        return Chunk(hashlib.sha256(payload).hexdigest(), len(payload), 0, 1, 0, payload)
    n = int.from_bytes(payload[len(MAGIC):len(MAGIC) + 4], "big")
    if not 0 < n <= MAX_HEADER:
        raise ChunkError("bundle chunk", "malformed header length")
    start = len(MAGIC) + 4
    try:
        h = json.loads(payload[start:start + n])
        chunk = Chunk(str(h["bundle"]), int(h["size"]), int(h["index"]), int(h["count"]), int(h["offset"]),
                      payload[start + n:], str(h["model"]) if h.get("model") is not None else None)
    except (ValueError, KeyError, TypeError) as exc:
        raise ChunkError("bundle chunk", f"malformed header ({exc})") from None
    if len(chunk.bundle) != 64 or any(c not in "0123456789abcdef" for c in chunk.bundle):
        raise ChunkError("bundle chunk", "the bundle id is not a sha256 hex digest")
    if chunk.size > max_bytes:
        raise ChunkError(f"bundle {chunk.bundle[:12]}", f"announces {chunk.size} bytes, over the cap of {max_bytes} "
                                                        "bytes (models.max_bundle_bytes)")
    if not (0 <= chunk.index < chunk.count <= max(1, chunk.size) and 0 <= chunk.offset
            and chunk.offset + len(chunk.data) <= chunk.size):
        raise ChunkError(f"bundle {chunk.bundle[:12]}", f"chunk {chunk.index}/{chunk.count} does not fit the size")
    return chunk


class Receiver:
    def __init__(self, incoming: Path, max_bytes: int, ttl_s: float) -> None:
        self.incoming = Path(incoming)
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.incoming.mkdir(parents=True, exist_ok=True)
        self._done_path = self.incoming / "done.json"

    def _done(self) -> list[str]:
        try:
            return list(json.loads(self._done_path.read_text()))
        except (OSError, ValueError):
            return []

    def mark_done(self, bundle: str) -> None:
        from edge_runtime.ota.store import write_json_atomic

        done = [b for b in self._done() if b != bundle] + [bundle]
        write_json_atomic(self._done_path, done[-DONE_KEPT:])
        shutil.rmtree(self.incoming / bundle, ignore_errors=True)

    def accept(self, payload: bytes) -> tuple[str, int, int] | None:
        """Store one message durably. Returns (bundle id, chunks held, count), or None for a bundle handled
        before (a QoS 1 duplicate, a re-publish). Raises ChunkError for a message that cannot be part of one."""
        chunk = parse(payload, self.max_bytes)
        if chunk.bundle in self._done():
            return None
        folder = self.incoming / chunk.bundle
        if not folder.is_dir():
            self._make_room()
            folder.mkdir(parents=True)
            from edge_runtime.ota.store import write_json_atomic

            write_json_atomic(folder / "meta.json", {"size": chunk.size, "count": chunk.count, "model": chunk.model})
        meta = json.loads((folder / "meta.json").read_text())
        if meta != {"size": chunk.size, "count": chunk.count, "model": chunk.model}:
            raise ChunkError(f"bundle {chunk.bundle[:12]}", "chunks disagree on the bundle's size, count or model")
        part = folder / f"{chunk.index}.part"
        if not part.exists():
            tmp = folder / f".{chunk.index}.tmp"
            with open(tmp, "wb") as fh:
                fh.write(chunk.offset.to_bytes(8, "big") + chunk.data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, part)
        os.utime(folder)  # the TTL counts from the last chunk
        held = sum(1 for _ in folder.glob("*.part"))
        from edge_runtime.ota.install import halt_point

        if held * 2 >= chunk.count and chunk.count > 1:
            halt_point("receiving-half")  # tests: a crash with half a bundle on disk
        return chunk.bundle, held, chunk.count

    def assemble(self, bundle: str) -> Path:
        """The whole bundle file, checked against its id. Raises ChunkError (and discards it) if it does not add up."""
        folder = self.incoming / bundle
        meta = json.loads((folder / "meta.json").read_text())
        out = folder / "bundle.tar"
        tmp = folder / ".bundle.tmp"
        h = hashlib.sha256()
        with open(tmp, "wb") as fh:
            expected = 0
            for i in range(meta["count"]):
                raw = (folder / f"{i}.part").read_bytes()
                offset, data = int.from_bytes(raw[:8], "big"), raw[8:]
                if offset != expected:
                    break
                h.update(data)
                fh.write(data)
                expected += len(data)
            fh.flush()
            os.fsync(fh.fileno())
        if expected != meta["size"] or h.hexdigest() != bundle:
            self.mark_done(bundle)
            raise ChunkError(f"bundle {bundle[:12]}", "the chunks do not add up to the announced bundle (size or "
                                                      "sha256 differs); discarded")
        os.replace(tmp, out)
        return out

    def model(self, bundle: str) -> str | None:
        """The model name the hub's header announced for this bundle (None: not said)."""
        try:
            return json.loads((self.incoming / bundle / "meta.json").read_text()).get("model")
        except (OSError, ValueError):
            return None

    def complete(self, bundle: str) -> bool:
        folder = self.incoming / bundle
        try:
            meta = json.loads((folder / "meta.json").read_text())
        except (OSError, ValueError):
            return False
        return all((folder / f"{i}.part").exists() for i in range(meta["count"]))

    def partials(self) -> list[Path]:
        return sorted((p for p in self.incoming.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)

    def _make_room(self) -> None:
        partials = self.partials()
        while len(partials) >= MAX_PARTIALS:
            shutil.rmtree(partials.pop(0), ignore_errors=True)

    def purge_stale(self, now: float | None = None) -> list[str]:
        """Discard partial bundles without a new chunk for ttl_s; their ids."""
        now = time.time() if now is None else now
        gone = []
        for folder in self.partials():
            if now - folder.stat().st_mtime > self.ttl_s:
                shutil.rmtree(folder, ignore_errors=True)
                gone.append(folder.name)
        return gone
