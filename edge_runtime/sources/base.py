"""Live source plumbing: a capture thread that paces frames and hands them to a newest-wins slot."""
from __future__ import annotations

import abc
import logging
import threading
import time
from collections.abc import Callable

from edge_runtime.frames import Frame
from edge_runtime.slot import LatestSlot

log = logging.getLogger("edge_runtime.sources")


class LiveSource(abc.ABC):
    """Subclasses implement `open()` (may raise to signal the feed is down) and `read()` (a Frame, or None
    when the feed dropped). The thread reconnects with backoff and never blocks on the consumer."""

    kind = "live"
    live = True

    def __init__(self, name: str, slot: LatestSlot[Frame], fps: float = 0.0, reconnect_max_s: float = 10.0) -> None:
        self.name = name
        self.slot = slot
        self.fps = fps  # 0 = as fast as the feed delivers
        self.reconnect_max_s = reconnect_max_s
        self.frames_in = 0
        self.reconnects = 0
        self.errors = 0
        self.last_frame_at: float | None = None
        self.reading_since: float | None = None  # set while inside read(): a driver call that never returns shows
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- to implement
    def open(self) -> None: ...

    @abc.abstractmethod
    def read(self) -> Frame | None:
        """The next frame, or None when the feed dropped."""

    def close(self) -> None: ...

    # -- running
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"source-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        backoff = 0.2
        while not self._stop.is_set():
            try:
                self.open()
            except Exception as exc:
                self.errors += 1
                log.warning("source %s: cannot open (%s); retrying in %.1f s", self.name, exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.reconnect_max_s)
                continue
            backoff = 0.2
            self._pump()
            self.close()
            if not self._stop.is_set():
                self.reconnects += 1
                log.warning("source %s: feed dropped; reconnecting", self.name)
                self._stop.wait(0.2)

    def _pump(self) -> None:
        period = 1.0 / self.fps if self.fps > 0 else 0.0
        next_due = time.monotonic()
        while not self._stop.is_set():
            if period:
                delay = next_due - time.monotonic()
                if delay > 0:
                    self._stop.wait(delay)
                # Never try to catch up with a burst: a late capture just starts the next period.
                next_due = max(next_due + period, time.monotonic())
            self.reading_since = time.monotonic()
            try:
                frame = self.read()
            except Exception as exc:
                self.errors += 1
                log.warning("source %s: read failed (%s)", self.name, exc)
                return
            finally:
                self.reading_since = None
            if frame is None:
                return
            self.frames_in += 1
            self.last_frame_at = frame.captured_at
            self.slot.put(frame)


def run_until(predicate: Callable[[], bool], timeout: float, step: float = 0.01) -> bool:
    """Poll until predicate() or timeout; for tests and the demo."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()
