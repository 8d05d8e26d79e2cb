"""Live source plumbing: a capture thread that paces frames and hands them to a newest-wins slot."""
from __future__ import annotations

import abc
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from edge_runtime.frames import Frame
from edge_runtime.slot import LatestSlot

log = logging.getLogger("edge_runtime.sources")

STATES = ("starting", "up", "down", "stopped")


@dataclass(frozen=True)
class SourceState:
    """What an operator needs about one source: is it delivering, and if not, why and when it is tried again.
    Times are wall-clock (time.time()) because they are shown to people and exported as metrics."""

    state: str  # starting | up | down | stopped
    reason: str = ""  # why it is down (empty otherwise)
    since: float = 0.0  # when it entered this state
    next_retry: float | None = None  # down: when the next attempt to open it is due

    @property
    def up(self) -> bool:
        return self.state == "up"

    def with_state(self, state: str, reason: str = "", next_retry: float | None = None) -> SourceState:
        """A new state; `since` is kept while the state itself does not change (a retry that fails again
        is still the same outage, so the down-alarm clock keeps running)."""
        since = self.since if state == self.state and self.since else time.time()
        return SourceState(state, " ".join(reason.split()), since, next_retry)


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
        self.state = SourceState("starting", since=time.time())
        self.first_attempt = threading.Event()  # set once the first open() has succeeded or failed (readiness)
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
        self.state = self.state.with_state("stopped")

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
                reason = f"open failed: {exc}"
                # One WARNING when the outage starts or its reason changes, not one per retry: a device that
                # stays unplugged for a day must not flood the journal (status and metrics show the retries).
                if self.state.state != "down" or self.state.reason != reason:
                    log.warning("source %s: %s; retrying with back-off up to %.0f s", self.name, reason,
                                self.reconnect_max_s)
                self.state = self.state.with_state("down", reason, next_retry=time.time() + backoff)
                self.first_attempt.set()
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.reconnect_max_s)
                continue
            backoff = 0.2
            if self.state.state == "down":
                log.warning("source %s: up again after %.0f s down", self.name, time.time() - self.state.since)
            self.state = self.state.with_state("up")
            self.first_attempt.set()
            why = self._pump()
            self.close()
            if not self._stop.is_set():
                self.reconnects += 1
                log.warning("source %s: %s; reconnecting", self.name, why)
                self.state = self.state.with_state("down", why, next_retry=time.time() + 0.2)
                self._stop.wait(0.2)
        self.state = self.state.with_state("stopped")

    def _pump(self) -> str:
        """Capture until the feed drops or we are stopped; returns why it ended."""
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
                return f"read failed ({exc})"
            finally:
                self.reading_since = None
            if frame is None:
                return "feed dropped"
            self.frames_in += 1
            self.last_frame_at = frame.captured_at
            self.slot.put(frame)
        return "stopped"


def run_until(predicate: Callable[[], bool], timeout: float, step: float = 0.01) -> bool:
    """Poll until predicate() or timeout; for tests and the demo."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()
