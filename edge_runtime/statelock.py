"""One daemon per state directory: an exclusive flock on <state_dir>/daemon.lock, held for the daemon's life.

Two daemons on one state directory would watch the same inbox, write the same outbox and knock each other off
the broker (same client id). The kernel drops a flock when its holder dies, so a crash never leaves a stale
lock behind. The file also holds the holder's pid, so the refusal can say who holds it; readers (`status`,
`check`, `doctor`) only read that pid and never take the lock, so they cannot make a starting daemon fail.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from edge_runtime.errors import EdgeError

LOCK_NAME = "daemon.lock"


class StateDirBusy(EdgeError):
    """Another daemon holds the state directory."""


class StateLock:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock or raise StateDirBusy naming the directory and the pid that holds it."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = holder_pid(self.state_dir)
            who = f"pid {pid}" if pid else "another process"
            raise StateDirBusy(str(self.state_dir), f"state directory already in use by a running edge-runtime "
                                                    f"({who}, lock {self.path}); stop it, or give this daemon its own "
                                                    "device.state_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # a clean stop leaves no pid that could later name an unrelated process
        except OSError:
            pass
        os.close(self._fd)  # closing the last descriptor drops the flock
        self._fd = None


def holder_pid(state_dir: Path) -> int | None:
    """The pid of the daemon holding `state_dir`, when that process is alive; None otherwise. Reads only."""
    try:
        text = (Path(state_dir) / LOCK_NAME).read_text().strip()
        pid = int(text)
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None  # killed without a clean stop: the kernel already dropped its flock
    except PermissionError:
        pass  # alive, owned by another user (the service account)
    return pid
