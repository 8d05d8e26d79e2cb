"""A watched inbox of DICOM files (X-ray detectors and PACS exports drop files here; the SCP writes here too).

Study files are never dropped: a file stays in the inbox until its findings are committed, then moves to
done/; a file that cannot be used moves to quarantine/ beside a .reason.txt naming why. Files already in the
inbox at start are processed first, oldest first. A crash therefore means a retry, never a loss (the outbox
refuses a second finding for the same source item).
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

IGNORED_SUFFIXES = (".part", ".tmp", ".reason.txt")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _free_name(folder: Path, name: str) -> Path:
    target = folder / name
    n = 1
    while target.exists():
        target = folder / f"{Path(name).stem}.{n}{Path(name).suffix}"
        n += 1
    return target


@dataclass
class StudyItem:
    """One inbox file handed to a pipeline; the pipeline must end it with done() or quarantine()."""

    path: Path
    source: DicomFolderSource

    def done(self) -> Path:
        return self.source._finish(self, self.source.done_dir, None)

    def quarantine(self, reason: str) -> Path:
        return self.source._finish(self, self.source.quarantine_dir, reason)

    def release(self) -> None:
        """Give the file back to the inbox untouched (e.g. the outbox is full): it is retried later."""
        self.source._release(self)


class DicomFolderSource:
    kind = "dicom-folder"
    live = False

    def __init__(self, name: str, inbox: str | Path, done_dir: str | Path | None = None,
                 quarantine_dir: str | Path | None = None, settle_s: float = 1.0, retry_s: float = 30.0) -> None:
        self.name = name
        self.inbox = Path(inbox)
        self.done_dir = Path(done_dir) if done_dir else self.inbox.parent / "done"
        self.quarantine_dir = Path(quarantine_dir) if quarantine_dir else self.inbox.parent / "quarantine"
        for folder in (self.inbox, self.done_dir, self.quarantine_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.settle_s = settle_s  # a file still being copied in is left alone until its mtime settles
        self.retry_s = retry_s
        self._lock = threading.Lock()
        self._in_flight: set[Path] = set()
        self._retry_after: dict[Path, float] = {}
        self.items_in = 0
        self.done_count = 0
        self.quarantined = 0

    def pending(self) -> list[Path]:
        """Inbox files ready to process, oldest first."""
        now = time.time()
        ready = []
        try:
            entries = list(os.scandir(self.inbox))
        except FileNotFoundError:
            return []
        for entry in entries:
            if not entry.is_file() or entry.name.startswith(".") or entry.name.endswith(IGNORED_SUFFIXES):
                continue
            try:
                mtime = entry.stat().st_mtime
            except FileNotFoundError:
                continue
            if now - mtime >= self.settle_s:
                ready.append((mtime, entry.name, Path(entry.path)))
        return [p for _, _, p in sorted(ready)]

    def next_item(self) -> StudyItem | None:
        """The oldest ready file not already being processed, or None."""
        now = time.monotonic()
        with self._lock:
            for path in self.pending():
                if path in self._in_flight or self._retry_after.get(path, 0) > now:
                    continue
                self._in_flight.add(path)
                self.items_in += 1
                return StudyItem(path, self)
        return None

    def depth(self) -> int:
        return len(self.pending())

    def _finish(self, item: StudyItem, folder: Path, reason: str | None) -> Path:
        with self._lock:
            target = _free_name(folder, item.path.name)
            os.replace(item.path, target)
            if reason is not None:
                stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
                reason_file = target.with_name(target.name + ".reason.txt")
                reason_file.write_text(f"{stamp} {' '.join(reason.split())}\n")
                self.quarantined += 1
            else:
                self.done_count += 1
            _fsync_dir(folder)
            _fsync_dir(self.inbox)
            self._in_flight.discard(item.path)
            self._retry_after.pop(item.path, None)
            return target

    def _release(self, item: StudyItem) -> None:
        with self._lock:
            self._in_flight.discard(item.path)
            self._retry_after[item.path] = time.monotonic() + self.retry_s
