"""Hand-over between a live source and its pipeline: one slot, newest frame wins, capture never blocks.

A live feed is worth only its newest frame: queueing frames behind a slow model would add latency to every
later frame. `put` replaces an unread frame (counted as dropped) and returns at once; `get` waits for a frame.
"""
from __future__ import annotations

import threading
from typing import Generic, TypeVar

T = TypeVar("T")


class LatestSlot(Generic[T]):
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: T | None = None
        self._closed = False
        self.put_count = 0
        self.dropped = 0

    def put(self, item: T) -> None:
        with self._cond:
            if self._item is not None:
                self.dropped += 1
            self._item = item
            self.put_count += 1
            self._cond.notify()

    def get(self, timeout: float | None = None) -> T | None:
        """The newest frame, or None on timeout or once closed and empty."""
        with self._cond:
            if self._item is None and not self._closed:
                self._cond.wait(timeout)
            item, self._item = self._item, None
            return item

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def pending(self) -> bool:
        """A frame is waiting: the worker has something newer to do than optional work (a budget probe)."""
        return self._item is not None

    @property
    def closed(self) -> bool:
        return self._closed
