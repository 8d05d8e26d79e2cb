"""The health rule for a version just switched to: in its first `models.health_window_s` seconds, roll it back
when the workers raise `models.health_max_errors` errors on it, or when its out-of-scope rate (findings with
result.assessed false) on the same streams is far above the old version's: at least
`models.health_min_frames` findings, and a rate above both twice the old one and the old one plus
`models.health_max_unassessed_increase`. The old version's rate is the one over its last BASELINE findings
before the switch (none seen: 0)."""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

BASELINE = 200


@dataclass(frozen=True)
class HealthRule:
    window_s: float = 300.0
    max_errors: int = 3
    min_frames: int = 20
    max_unassessed_increase: float = 0.3


@dataclass
class _Watch:
    version: str
    since: float
    baseline_rate: float
    baseline_n: int
    until: float = 0.0
    frames: int = 0
    unassessed: int = 0
    errors: int = 0
    last_error: str = ""


@dataclass
class HealthWatch:
    rule: HealthRule = field(default_factory=HealthRule)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._recent: dict[str, deque[bool]] = {}  # model -> recent assessed flags of the version running
        self._watch: dict[str, _Watch] = {}

    def observe(self, model: str, version: str, assessed: bool) -> None:
        with self._lock:
            w = self._watch.get(model)
            if w is not None and w.version == version:
                w.frames += 1
                w.unassessed += not assessed
                return
            if w is None:
                self._recent.setdefault(model, deque(maxlen=BASELINE)).append(assessed)

    def error(self, model: str, version: str, why: str) -> None:
        with self._lock:
            w = self._watch.get(model)
            if w is not None and w.version == version:
                w.errors += 1
                w.last_error = why

    def switched(self, model: str, version: str, now: float | None = None, left_s: float | None = None,
                 baseline: tuple[float, int] | None = None) -> tuple[float, int]:
        """Start watching `version`, against the rate of what ran before it (or `baseline`, (rate, n), when the
        watch resumes after a restart with `left_s` of its window). Returns the baseline used."""
        with self._lock:
            recent = self._recent.pop(model, deque())
            if baseline is None:
                baseline = ((sum(not a for a in recent) / len(recent)) if recent else 0.0, len(recent))
            start = time.monotonic() if now is None else now
            left = self.rule.window_s if left_s is None else left_s
            self._watch[model] = _Watch(version, start, baseline[0], baseline[1], until=start + left)
            return baseline

    def forget(self, model: str) -> None:
        with self._lock:
            self._watch.pop(model, None)
            self._recent.pop(model, None)

    def watching(self, model: str) -> str | None:
        with self._lock:
            w = self._watch.get(model)
            return w.version if w else None

    def check(self, now: float | None = None) -> tuple[list[tuple[str, str, str]], list[tuple[str, str]]]:
        """([(model, version, why)] to roll back, [(model, version)] that passed their window)."""
        now = time.monotonic() if now is None else now
        trips, passed = [], []
        r = self.rule
        with self._lock:
            for model, w in list(self._watch.items()):
                why = None
                if w.errors >= r.max_errors:
                    why = (f"health rule: {w.errors} worker errors in its first {now - w.since:.0f} s "
                           f"(last: {w.last_error})")
                elif w.frames >= r.min_frames:
                    rate = w.unassessed / w.frames
                    if rate > 2 * w.baseline_rate and rate > w.baseline_rate + r.max_unassessed_increase:
                        why = (f"health rule: out-of-scope rate {rate:.0%} over {w.frames} findings, the old version "
                               f"had {w.baseline_rate:.0%} over {w.baseline_n}")
                if why:
                    trips.append((model, w.version, why))
                    del self._watch[model]
                elif now >= w.until:
                    passed.append((model, w.version))
                    del self._watch[model]
        return trips, passed
