"""Latency budget control: shed work instead of queueing it.

Per model, the controller watches the rolling p95 of capture->result latency. Over budget, it steps down one
level: a faster variant first (e.g. INT8 instead of FP32), then a lower inference rate. With headroom (p95 under
`low` x budget) it steps back up one level, but only when the level above is predicted to fit: its p95 when we
left it, scaled by how much the current level's median latency has fallen since we entered it. A minimum dwell time
between switches, and a doubling wait after a step up that had to be undone, give hysteresis: the pipeline does
not flap between a level that fits and one that does not. A prediction is evidence from the past (a start-up
transient, a neighbour process that has since gone): after `probe_after_s` (times the back-off) with headroom, the
controller steps up once to re-measure, even against the prediction; a step up that misses the budget
`abort_misses` times is undone at once. A frame already older than the budget when the worker picks it up is
skipped: its result would be late whatever happens next. Every switch is logged with its reason and counted.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

log = logging.getLogger("edge_runtime.budget")


@dataclass(frozen=True)
class Level:
    """One operating point: which variant runs and at most how many inferences per second (0 = every frame)."""

    variant: str
    max_rate_hz: float = 0.0

    def describe(self) -> str:
        rate = f"{self.max_rate_hz:g}/s" if self.max_rate_hz else "every frame"
        return f"{self.variant} @ {rate}"


@dataclass(frozen=True)
class Switch:
    from_level: int
    to_level: int
    reason: str


def build_levels(variants_fast_last: Sequence[str], source_fps: float, rate_steps: Sequence[float] = (0.5, 0.25)) -> list[Level]:
    """Levels from best to cheapest: each variant at full rate, then the fastest at reduced rates."""
    levels = [Level(v) for v in variants_fast_last]
    if source_fps > 0:
        levels += [Level(variants_fast_last[-1], source_fps * f) for f in rate_steps]
    return levels


class BudgetController:
    def __init__(
        self,
        budget_ms: float,
        levels: Sequence[Level],
        window: int = 60,
        low: float = 0.7,
        dwell_s: float = 3.0,
        min_samples: int = 20,
        clock: Callable[[], float] = time.monotonic,
        name: str = "",
        probe_after_s: float = 60.0,
        abort_misses: int = 3,
    ) -> None:
        if not levels:
            raise ValueError("at least one level")
        self.budget_ms = budget_ms
        self.levels = list(levels)
        self.low = low
        self.dwell_s = dwell_s
        self.min_samples = min_samples
        self.probe_after_s = probe_after_s
        self.abort_misses = abort_misses
        self.clock = clock
        self.name = name
        self.samples: deque[float] = deque(maxlen=window)
        self.index = 0
        self.last_switch = float("-inf")  # the first switch needs evidence (min_samples), not a dwell
        self.left_p95: dict[int, float] = {}  # p95 of a level when we stepped down from it
        self.left_at: dict[int, float] = {}  # when we stepped down from it
        self.entry_p50: dict[int, float] = {}  # first full-window median after entering a level
        self.up_penalty = 1.0  # doubles after a step up that had to be undone
        self.last_up: float | None = None
        self.last_admitted: float | None = None
        self.switches: list[Switch] = []
        self.late = 0
        self.rate_skipped = 0
        self.misses = 0

    @property
    def level(self) -> Level:
        return self.levels[self.index]

    def p95(self) -> float | None:
        return float(np.percentile(self.samples, 95)) if self.samples else None

    def admit(self, frame_age_ms: float) -> bool:
        """Should the worker run this frame? False for a frame already past its budget or over the rate cap."""
        if frame_age_ms > self.budget_ms:
            self.late += 1
            return False
        rate = self.level.max_rate_hz
        now = self.clock()
        if rate > 0 and self.last_admitted is not None and now - self.last_admitted < 1.0 / rate:
            self.rate_skipped += 1
            return False
        self.last_admitted = now
        return True

    def p50(self) -> float | None:
        return float(np.median(self.samples)) if self.samples else None

    def predicted_p95(self, level: int) -> float | None:
        """Expected p95 at `level` (one above the current): its p95 when we left it, scaled by how much this level's
        latency has changed since we entered it. The change is a ratio of medians: the first window after a switch
        holds a frame or two that waited behind the slow level, and a p95 ratio would take them for a speed-up."""
        current = self.p50()
        if level not in self.left_p95 or self.index not in self.entry_p50 or current is None:
            return None
        return self.left_p95[level] * current / max(self.entry_p50[self.index], 1e-6)

    def observe(self, latency_ms: float) -> Switch | None:
        """Record one capture->result latency; returns the switch made, if any."""
        self.samples.append(latency_ms)
        if latency_ms > self.budget_ms:
            self.misses += 1
            if self.last_up is not None and self.index < len(self.levels) - 1:
                early = self._abort_step_up()
                if early is not None:
                    return early
        if len(self.samples) < self.min_samples:
            return None
        p95 = self.p95()
        assert p95 is not None
        if self.index not in self.entry_p50:
            self.entry_p50[self.index] = self.p50()
        since = self.clock() - self.last_switch
        if self.last_up is not None and self.clock() - self.last_up >= 4 * self.dwell_s * self.up_penalty:
            self.up_penalty, self.last_up = 1.0, None  # the last step up held: forget the earlier failures
        if since < self.dwell_s:
            return None
        if p95 > self.budget_ms and self.index < len(self.levels) - 1:
            if self.last_up is not None:
                self.up_penalty = min(self.up_penalty * 2, 64.0)  # the step up did not hold: wait longer next time
                self.last_up = None
            self.left_p95[self.index] = p95
            self.left_at[self.index] = self.clock()
            return self._switch(self.index + 1, f"p95 {p95:.1f} ms over budget {self.budget_ms:.0f} ms")
        if self.index == 0 or since < self.dwell_s * self.up_penalty:
            return None
        # A slower variant above needs real headroom and a prediction that it fits. The same variant at a higher
        # rate costs about the same per frame: being within budget now is the prediction (a rise in contention
        # shows up as a step back down, and the back-off doubles).
        same_variant = self.levels[self.index - 1].variant == self.level.variant
        limit = self.budget_ms if same_variant else self.low * self.budget_ms
        if p95 >= limit:
            return None
        predicted = p95 if same_variant else self.predicted_p95(self.index - 1)
        age = self.clock() - self.left_at.get(self.index - 1, self.clock())
        stale = age >= self.probe_after_s * self.up_penalty
        if predicted is None or predicted <= self.budget_ms or stale:
            self.last_up = self.clock()
            if predicted is None:
                expect = ""
            elif predicted <= self.budget_ms:
                expect = f", expected {predicted:.1f} ms above"
            else:
                expect = f", probing: the {predicted:.1f} ms expected above is {age:.0f} s old"
            where = "within" if same_variant else f"under {self.low:.0%} of"
            return self._switch(self.index - 1, f"p95 {p95:.1f} ms {where} budget {self.budget_ms:.0f} ms{expect}")
        return None

    def _abort_step_up(self) -> Switch | None:
        """A step up that already missed the budget `abort_misses` times is undone at once, without waiting for a
        full window and the dwell: a probe that fails then costs a few late findings, not seconds of them."""
        over = sum(1 for v in self.samples if v > self.budget_ms)
        if over < self.abort_misses:
            return None
        self.up_penalty = min(self.up_penalty * 2, 64.0)
        self.last_up = None
        worst = max(self.samples)  # a few samples: their maximum stands in for the p95, pessimistically
        self.left_p95[self.index] = worst
        self.left_at[self.index] = self.clock()
        return self._switch(self.index + 1, f"{over} of {len(self.samples)} frames since stepping up over budget "
                                            f"{self.budget_ms:.0f} ms (worst {worst:.1f} ms): undone early")

    def _switch(self, to: int, reason: str) -> Switch:
        switch = Switch(self.index, to, reason)
        direction = "down" if to > self.index else "up"
        log.warning("budget %s: stepping %s from %s to %s: %s", self.name, direction,
                    self.levels[self.index].describe(), self.levels[to].describe(), reason)
        self.index = to
        self.entry_p50.pop(to, None)
        self.switches.append(switch)
        self.samples.clear()  # judge the new level on its own latencies
        self.last_switch = self.clock()
        return switch
