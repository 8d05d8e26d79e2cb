"""A watched inbox of DICOM files (X-ray detectors and PACS exports drop files here; the SCP writes here too).

Study files are never dropped: a file stays in the inbox until its findings are committed, then moves to
done/; a file that cannot be used moves to quarantine/ beside a .reason.txt naming why. Files already in the
inbox at start are processed first, oldest first. A crash therefore means a retry, never a loss (the outbox
refuses a second finding for the same source item). A file that keeps failing for reasons of its own (an engine
error on it, or a decoder that crashes the whole process) is quarantined after `max_attempts`: attempts are
counted in a ledger on disk before each try, so a crash loop ends too.
"""
from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from edge_runtime.sources.base import SourceState

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


def folder_problem(folder: Path, mode: int) -> str:
    """'' when `folder` is a directory this process can use with `mode` (os.R_OK | os.W_OK | os.X_OK bits),
    otherwise what is wrong with it, naming the folder."""
    if not folder.exists():
        return f"{folder} does not exist"
    if not folder.is_dir():
        return f"{folder} is not a directory"
    missing = [word for bit, word in ((os.R_OK, "read"), (os.W_OK, "write"), (os.X_OK, "search")) if mode & bit
               and not os.access(folder, bit)]
    return f"{folder}: no {'/'.join(missing)} permission for uid {os.getuid()}" if missing else ""


@dataclass
class StudyItem:
    """One inbox file handed to a pipeline; the pipeline must end it with done() or quarantine()."""

    path: Path
    source: DicomFolderSource

    def done(self) -> Path:
        return self.source._finish(self, self.source.done_dir, None)

    def quarantine(self, reason: str) -> Path:
        return self.source._finish(self, self.source.quarantine_dir, reason)

    def release(self, error: str | None = None) -> None:
        """Give the file back to the inbox untouched: it is retried later. With `error`, the try counts as a
        failure of this file (after `max_attempts` it is quarantined); without, as not its fault (the outbox
        was full, the daemon is stopping)."""
        self.source._release(self, error)


class DicomFolderSource:
    kind = "dicom-folder"
    live = False

    def __init__(self, name: str, inbox: str | Path, done_dir: str | Path | None = None,
                 quarantine_dir: str | Path | None = None, settle_s: float = 1.0, retry_s: float = 30.0,
                 max_attempts: int = 3) -> None:
        self.name = name
        self.inbox = Path(inbox)
        self.done_dir = Path(done_dir) if done_dir else self.inbox.parent / "done"
        self.quarantine_dir = Path(quarantine_dir) if quarantine_dir else self.inbox.parent / "quarantine"
        for folder in (self.inbox, self.done_dir, self.quarantine_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.settle_s = settle_s  # a file still being copied in is left alone until its mtime settles
        self.retry_s = retry_s
        self.max_attempts = max_attempts
        self._ledger = self.quarantine_dir / ".attempts.json"  # {file name: [tries begun, last error]}
        self._attempts: dict[str, list] = self._load_ledger()
        self._lock = threading.Lock()
        self._in_flight: set[Path] = set()
        self._retry_after: dict[Path, float] = {}
        self.items_in = 0
        self.done_count = 0
        self.quarantined = 0
        self._state = SourceState("starting", since=time.time())

    def check_state(self) -> SourceState:
        """up while the inbox can be listed and files moved out of it; down with the folder and the missing
        permission otherwise (a remounted or re-owned inbox must be visible, not a silently idle worker)."""
        problem = folder_problem(self.inbox, os.R_OK | os.W_OK | os.X_OK)
        for folder in (self.done_dir, self.quarantine_dir):
            problem = problem or folder_problem(folder, os.W_OK | os.X_OK)
        self._state = self._state.with_state("down", problem) if problem else self._state.with_state("up")
        return self._state

    def pending(self) -> list[Path]:
        """Inbox files ready to process, oldest first, subfolders included: a detector or a PACS export that
        writes <inbox>/<date>/<study>/... is what users do, and a file nobody looks at is a lost study.
        Hidden folders (a copy tool's staging area) are skipped like hidden files."""
        now = time.time()
        ready = []
        for folder, dirs, files in os.walk(self.inbox):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in files:
                if name.startswith(".") or name.endswith(IGNORED_SUFFIXES):
                    continue
                path = Path(folder, name)
                try:
                    mtime = path.stat().st_mtime
                except FileNotFoundError:
                    continue
                if now - mtime >= self.settle_s:
                    ready.append((mtime, name, path))
        return [p for _, _, p in sorted(ready)]

    def _key(self, path: Path) -> str:
        """The ledger's name for a file: its path below the inbox (just the name for a top-level file)."""
        return str(path.relative_to(self.inbox))

    def next_item(self) -> StudyItem | None:
        """The oldest ready file not already being processed, or None. A file that has used up its attempts
        is quarantined here, with the last error."""
        now = time.monotonic()
        with self._lock:
            for path in self.pending():
                if path in self._in_flight or self._retry_after.get(path, 0) > now:
                    continue
                tries, last_error = self._attempts.get(self._key(path), [0, ""])
                item = StudyItem(path, self)
                self._in_flight.add(path)
                if tries >= self.max_attempts:
                    self._finish_locked(item, self.quarantine_dir, f"gave up after {tries} attempts; last: "
                                        f"{last_error or 'the daemon stopped while processing it (a crash?)'}")
                    continue
                self._attempts[self._key(path)] = [tries + 1, last_error]
                self._save_ledger()  # before the try: a crash on this file still counts
                self.items_in += 1
                return item
        return None

    def depth(self) -> int:
        return len(self.pending())

    def _finish(self, item: StudyItem, folder: Path, reason: str | None) -> Path:
        with self._lock:
            return self._finish_locked(item, folder, reason)

    def _finish_locked(self, item: StudyItem, folder: Path, reason: str | None) -> Path:
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
        if self._attempts.pop(self._key(item.path), None) is not None:
            self._save_ledger()
        return target

    def _release(self, item: StudyItem, error: str | None) -> None:
        with self._lock:
            self._in_flight.discard(item.path)
            self._retry_after[item.path] = time.monotonic() + self.retry_s
            entry = self._attempts.get(self._key(item.path))
            if entry is not None:
                if error is None:
                    entry[0] = max(0, entry[0] - 1)  # not this file's fault: the try does not count
                else:
                    entry[1] = " ".join(error.split())[:500]
                self._save_ledger()

    def _load_ledger(self) -> dict[str, list]:
        try:
            data = json.loads(self._ledger.read_text())
            return {str(k): [int(v[0]), str(v[1])] for k, v in data.items()}
        except (OSError, ValueError, TypeError, IndexError, AttributeError):
            return {}  # no ledger yet (or a torn one): every file starts with a clean count

    def _save_ledger(self) -> None:
        tmp = self._ledger.with_name(self._ledger.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(self._attempts, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._ledger)
