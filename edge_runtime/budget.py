"""Latency budget control: shed work instead of queueing it, and climb back only on measured evidence.

Per model, the controller watches the rolling p95 of capture->result latency at the level in use. Over budget, it
steps down one level: a faster variant first (e.g. INT8 instead of FP32), then a lower inference rate. A frame
already older than the budget when the worker picks it up is skipped: its result would be late whatever happens.

A step up is taken only when a real probe of the level above, run under the load of now, fits. Predictions from
old medians do not hold on a scanner's board, where other processes come and go. With headroom at the current
level (p95 under `low` x budget, or `rate_low` x budget when the level above differs only in rate), after the dwell
and the level's back-off, the controller asks the worker to probe:
- at a full-rate level, the worker runs the level above's variant on the frame it has just finished (that frame's
  finding is already committed; the probe's result is discarded), and only while no newer frame waits in the slot,
  so in time it would otherwise spend idle. The estimate is the probe's own time plus the capture->pick-up wait the
  current level measures;
- at a reduced-rate level, on frames the rate cap skips anyway, paced at the level above's rate: the probe then
  carries exactly the level above's load, and its capture->result latency is measured, not estimated.
A frame captured while a probe was running is skipped and counted (`probe_skipped`): frames never wait behind a
probe, and the current level's window holds only latencies it caused. `probe_samples` probes whose p95 fits give
the step up. A round fails as soon as so many probes are over the limit that its p95 cannot fit (two of ten): a
failed level costs a couple of probes, not a burst of late findings. A level that failed (stepped down from, a
failed round, an undone step up) is retried after a back-off that doubles from `dwell_s` up to `max_backoff_s`, and
is forgotten once a step up to it has held for `hold_s`. A step up that misses the budget `abort_misses` times in
its first `min_samples` findings anyway is undone at once. Every switch is logged with its reason and recorded with its time.
"""
from __future__ import annotations

import enum
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger("edge_runtime.budget")

# A rate cap admits a frame once 90 % of its interval has passed: frames arrive with jitter, and at 15/s from a
# 30 fps feed a frame a millisecond early must not be skipped (that would make the rate 10/s).
RATE_SLACK = 0.9


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
    at: float = 0.0  # the controller's clock (monotonic seconds) when it switched


class Decision(enum.Enum):
    """What the worker does with the frame it has just taken."""

    RUN = "run"  # infer at the current level and commit the finding
    PROBE = "probe"  # infer with the level above's variant, measure, discard the result
    SKIP = "skip"  # late, over the rate cap, or captured while a probe ran


@dataclass
class ProbeRound:
    """Probes of one level above, collected until they pass, fail or go stale."""

    level: int
    started_at: float
    limit_ms: float
    estimates_ms: list[float] = field(default_factory=list)
    result: str = ""  # "passed", "failed" or "expired" once over
    p95_ms: float | None = None
    ended_at: float | None = None


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
        abort_misses: int = 3,
        rate_low: float = 0.9,
        probe_samples: int = 10,
        max_backoff_s: float = 15.0,
        hold_s: float | None = None,
        round_timeout_s: float = 10.0,
    ) -> None:
        if not levels:
            raise ValueError("at least one level")
        if probe_samples < 2:
            raise ValueError("probe_samples: at least 2")
        self.budget_ms = budget_ms
        self.levels = list(levels)
        self.low = low
        self.rate_low = rate_low
        self.dwell_s = dwell_s
        self.min_samples = min_samples
        self.abort_misses = abort_misses
        self.probe_samples = probe_samples
        self.max_backoff_s = max(max_backoff_s, dwell_s)
        self.hold_s = 4 * dwell_s if hold_s is None else hold_s
        self.round_timeout_s = round_timeout_s
        self.clock = clock
        self.name = name
        self.samples: deque[float] = deque(maxlen=window)  # capture->result at the current level
        self.waits: deque[float] = deque(maxlen=window)  # of those, the part before the worker started on the frame
        self.index = 0
        self.last_switch = float("-inf")  # the first switch needs evidence (min_samples), not a dwell
        self.backoff_s: dict[int, float] = {}  # per level: the wait before the next try after its last failure
        self.retry_at: dict[int, float] = {}  # per level: no probe of it before this time
        self.last_up: float | None = None  # set while a step up has not yet held for hold_s
        self.last_admitted: float | None = None
        self.last_probe_at: float | None = None
        self.probe_until: float | None = None  # when the last probe ended: frames captured before it are skipped
        self.round: ProbeRound | None = None
        self.rounds: deque[ProbeRound] = deque(maxlen=100)  # finished rounds, newest last
        self.round_counts: dict[str, int] = {"passed": 0, "failed": 0, "expired": 0}
        self.switches: list[Switch] = []
        self.late = 0
        self.rate_skipped = 0
        self.probe_skipped = 0
        self.probes = 0
        self.misses = 0
        # A round fails once more probes are over the limit than its p95 tolerates (np.percentile interpolates
        # between the two order statistics around 0.95 x (n - 1); with this many over, both are over).
        self.allowed_over = probe_samples - 1 - math.floor(0.95 * (probe_samples - 1))

    @property
    def level(self) -> Level:
        return self.levels[self.index]

    def p95(self) -> float | None:
        return float(np.percentile(self.samples, 95)) if self.samples else None

    def p50(self) -> float | None:
        return float(np.median(self.samples)) if self.samples else None

    def overhead_ms(self) -> float:
        """Median capture->pick-up wait at the current level: what a probe's own time leaves out."""
        return float(np.median(self.waits)) if self.waits else 0.0

    # ------------------------------------------------------------ per frame
    def decide(self, frame_age_ms: float, captured_at: float | None = None) -> Decision:
        """What the worker does with a frame `frame_age_ms` old, captured at `captured_at` (the controller's clock)."""
        if captured_at is not None and self.probe_until is not None and captured_at < self.probe_until:
            self.probe_skipped += 1  # it arrived during a probe: running it now would make it wait behind one
            return Decision.SKIP
        if frame_age_ms > self.budget_ms:
            self.late += 1
            return Decision.SKIP
        rate = self.level.max_rate_hz
        now = self.clock()
        if rate > 0 and self.last_admitted is not None and now - self.last_admitted < RATE_SLACK / rate:
            if self._rate_probe_due(now):
                self.last_probe_at = now
                return Decision.PROBE
            self.rate_skipped += 1
            return Decision.SKIP
        self.last_admitted = now
        return Decision.RUN

    def admit(self, frame_age_ms: float) -> bool:
        """Should the worker run this frame at the current level? For a caller that does not probe: a frame
        `decide` would probe on counts as skipped by the rate cap, which it is."""
        decision = self.decide(frame_age_ms)
        if decision is Decision.PROBE:
            self.rate_skipped += 1
        return decision is Decision.RUN

    def observe(self, latency_ms: float, service_ms: float | None = None) -> Switch | None:
        """Record one finding's capture->result latency (and the worker's own part of it, `service_ms`);
        returns the switch made, if any."""
        self.samples.append(latency_ms)
        if service_ms is not None:
            self.waits.append(max(latency_ms - service_ms, 0.0))
        now = self.clock()
        if latency_ms > self.budget_ms:
            self.misses += 1
            # Only until the new level has a window of its own: from then on its p95 decides, and three misses in
            # a window of 60 (5 %, the p95's own line) are not a step up that failed.
            if self.last_up is not None and self.index < len(self.levels) - 1 and len(self.samples) <= self.min_samples:
                early = self._abort_step_up()
                if early is not None:
                    return early
        if self.last_up is not None and now - self.last_up >= self.hold_s:
            self.backoff_s.pop(self.index, None)  # the step up held: forget this level's earlier failures
            self.last_up = None
        if len(self.samples) < self.min_samples or now - self.last_switch < self.dwell_s:
            return None
        p95 = self.p95()
        assert p95 is not None
        if p95 > self.budget_ms and self.index < len(self.levels) - 1:
            return self._step_down(f"p95 {p95:.1f} ms over budget {self.budget_ms:.0f} ms")
        return None

    # ------------------------------------------------------------ probes
    def probe_wanted(self) -> Level | None:
        """The level above, when it is due for a probe: headroom here, the dwell and its back-off are over."""
        if self.index == 0 or len(self.samples) < self.min_samples:
            return None
        now = self.clock()
        if now - self.last_switch < self.dwell_s or now < self.retry_at.get(self.index - 1, float("-inf")):
            return None
        # Headroom on the newest `min_samples` latencies only: this gate decides whether a probe is worth its cost,
        # the probe decides the step, and a full window at 7.5/s would hold the climb back by 8 s.
        recent = list(self.samples)[-self.min_samples:]
        if float(np.percentile(recent, 95)) >= self.up_limit_ms():
            return None
        return self.levels[self.index - 1]

    def shadow_probe_level(self) -> Level | None:
        """The level to probe on the frame just finished, when the worker has nothing newer to do. Reduced-rate
        levels probe on the frames their rate cap skips instead (`decide` says PROBE)."""
        return self.probe_wanted() if self.level.max_rate_hz == 0 else None

    def up_limit_ms(self) -> float:
        """What the level above must fit under. A slower variant needs real headroom; the same variant at a higher
        rate costs the same per frame, and its probe carried the higher rate's load: a narrow margin is enough."""
        if self.index == 0:
            return 0.0
        same_variant = self.levels[self.index - 1].variant == self.level.variant
        return (self.rate_low if same_variant else self.low) * self.budget_ms

    def observe_probe(self, service_ms: float, wait_ms: float | None = None) -> Switch | None:
        """Record one probe of the level above: its own time (preprocess, inference, postprocess) and, for a frame
        the rate cap skipped, how long that frame waited before it (else the current level's median wait stands
        in). Returns the step up when the round has passed."""
        now = self.clock()
        self.probe_until = now
        self.probes += 1
        if self.index == 0:
            return None
        above = self.index - 1
        current = self.round
        if current is not None and (current.level != above or now - current.started_at > self.round_timeout_s):
            self._end_round(current, "expired", now)  # too sparse to describe the load of now: start again
            current = None
        if current is None:
            current = self.round = ProbeRound(above, now, self.up_limit_ms())
        estimate = service_ms + (self.overhead_ms() if wait_ms is None else wait_ms)
        current.estimates_ms.append(estimate)
        over = sum(1 for e in current.estimates_ms if e > current.limit_ms)
        if over > self.allowed_over:
            self._probe_failed(current, now, over)
            return None
        if len(current.estimates_ms) < self.probe_samples:
            return None
        p95 = float(np.percentile(current.estimates_ms, 95))
        if p95 > current.limit_ms:
            self._probe_failed(current, now, over)
            return None
        self._end_round(current, "passed", now, p95)
        self.last_up = now
        share = current.limit_ms / self.budget_ms
        n = len(current.estimates_ms)
        return self._switch(above, f"probe p95 {p95:.1f} ms ({n} probes under the current load) "
                                   f"under {share:.0%} of budget {self.budget_ms:.0f} ms")

    def _rate_probe_due(self, now: float) -> bool:
        """A frame the rate cap skips is probed when a probe is wanted, at the level above's rate."""
        above = self.probe_wanted()
        if above is None:
            return False
        if above.max_rate_hz == 0:
            return True
        last = max(self.last_admitted or float("-inf"), self.last_probe_at or float("-inf"))
        return now - last >= RATE_SLACK / above.max_rate_hz

    def _probe_failed(self, failed: ProbeRound, now: float, over: int) -> None:
        p95 = float(np.percentile(failed.estimates_ms, 95))
        self._end_round(failed, "failed", now, p95)
        wait = self._failed(failed.level)
        log.info("budget %s: %s does not fit under the current load: %d of %d probes over %.0f ms (worst %.1f ms); "
                 "next probe in %.0f s", self.name, self.levels[failed.level].describe(), over,
                 len(failed.estimates_ms), failed.limit_ms, max(failed.estimates_ms), wait)

    def _end_round(self, ended: ProbeRound, result: str, now: float, p95: float | None = None) -> None:
        ended.result, ended.ended_at, ended.p95_ms = result, now, p95
        self.rounds.append(ended)
        self.round_counts[result] += 1
        if self.round is ended:
            self.round = None

    # ------------------------------------------------------------ switching
    def _failed(self, level: int) -> float:
        """`level` did not hold: no probe of it for a back-off that doubles with each failure in a row."""
        previous = self.backoff_s.get(level)
        wait = self.dwell_s if previous is None else min(previous * 2, self.max_backoff_s)
        self.backoff_s[level] = wait
        self.retry_at[level] = self.clock() + wait
        return wait

    def _step_down(self, reason: str) -> Switch:
        self._failed(self.index)
        self.last_up = None
        if self.round is not None:
            self._end_round(self.round, "expired", self.clock())
        return self._switch(self.index + 1, reason)

    def _abort_step_up(self) -> Switch | None:
        """A step up that misses the budget `abort_misses` times in its first `min_samples` findings is undone at
        once, without waiting for a full window and the dwell: the probe passed, but the load changed, and that
        costs a few late findings."""
        over = sum(1 for v in self.samples if v > self.budget_ms)
        if over < self.abort_misses:
            return None
        worst = max(self.samples)
        return self._step_down(f"{over} of {len(self.samples)} frames since stepping up over budget "
                               f"{self.budget_ms:.0f} ms (worst {worst:.1f} ms): undone early")

    def _switch(self, to: int, reason: str) -> Switch:
        switch = Switch(self.index, to, reason, self.clock())
        down = to > self.index
        # Down is a degraded state a technician should see; up is the recovery from it.
        log.log(logging.WARNING if down else logging.INFO, "budget %s: stepping %s from %s to %s: %s", self.name,
                "down" if down else "up", self.levels[self.index].describe(), self.levels[to].describe(), reason)
        self.index = to
        self.switches.append(switch)
        self.samples.clear()  # judge the new level on its own latencies
        self.waits.clear()
        self.last_switch = self.clock()
        return switch
