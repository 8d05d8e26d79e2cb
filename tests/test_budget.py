"""The budget controller, in simulated time: a fake clock, a live feed into a newest-wins slot, and an engine whose
cost per variant the test sets (it may change with time: a CPU hog that comes and goes)."""
from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from edge_runtime.budget import BudgetController, Decision, Level, build_levels


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t

    def advance(self, s):
        self.t += s


class Feed:
    """A live source at `fps` into a newest-wins slot, on the fake clock."""

    def __init__(self, clock: FakeClock, fps: float) -> None:
        self.clock, self.period, self.t0, self.taken = clock, 1.0 / fps, clock.t, 0

    def _newest(self) -> int:
        return math.floor((self.clock.t - self.t0) / self.period + 1e-9)

    def take(self) -> float:
        """The capture time of the newest frame not yet taken, waiting for the next one when there is none."""
        n = self._newest()
        if n <= self.taken:
            n = self.taken + 1
            self.clock.t = max(self.clock.t, self.t0 + n * self.period)
        self.taken = n
        return self.t0 + n * self.period

    def pending(self) -> bool:
        return self._newest() > self.taken


class Worker:
    """What the service's live worker does with the controller: decide, run or probe, observe; shadow-probe the
    level above on the frame just committed while no newer frame waits. `cost(variant, t)` is the engine's ms."""

    def __init__(self, ctl: BudgetController, clock: FakeClock, fps: float = 30.0) -> None:
        self.ctl, self.clock, self.feed = ctl, clock, Feed(clock, fps)
        self.committed: list[tuple[float, float, str]] = []  # (captured at, capture->result ms, variant)
        self.probe_spans: list[tuple[float, float]] = []

    def run(self, cost: Callable[[str, float], float], seconds: float) -> list[tuple[float, float, str]]:
        first = len(self.committed)
        end = self.clock.t + seconds
        while self.clock.t < end:
            captured = self.feed.take()
            decision = self.ctl.decide((self.clock.t - captured) * 1000.0, captured)
            if decision is Decision.SKIP:
                continue
            if decision is Decision.PROBE:
                wait_ms = (self.clock.t - captured) * 1000.0
                self._probe(cost, wait_ms)
                continue
            service = cost(self.ctl.level.variant, self.clock.t)
            variant = self.ctl.level.variant
            self.clock.advance(service / 1000.0)
            latency = (self.clock.t - captured) * 1000.0
            self.committed.append((captured, latency, variant))
            self.ctl.observe(latency, service)
            if not self.feed.pending() and self.ctl.shadow_probe_level() is not None:
                self._probe(cost, None)
        return self.committed[first:]

    def _probe(self, cost, wait_ms):
        above = self.ctl.levels[self.ctl.index - 1]
        start = self.clock.t
        service = cost(above.variant, start)
        self.clock.advance(service / 1000.0)
        self.probe_spans.append((start, self.clock.t))
        self.ctl.observe_probe(service, wait_ms)


def fixed(costs: dict[str, float]) -> Callable[[str, float], float]:
    return lambda variant, t: costs[variant]


def ups(ctl: BudgetController):
    return [s for s in ctl.switches if s.to_level < s.from_level]


def test_levels_from_variants_and_rates():
    levels = build_levels(["fp32", "int8"], source_fps=30)
    assert [lv.describe() for lv in levels] == ["fp32 @ every frame", "int8 @ every frame", "int8 @ 15/s", "int8 @ 7.5/s"]


def test_steps_down_when_over_budget_and_up_only_after_a_probe_that_fits():
    clock = FakeClock()
    ctl = BudgetController(33.0, build_levels(["fp32", "int8"], 30), clock=clock, dwell_s=3.0, name="fetal-head")
    worker = Worker(ctl, clock)
    slow = fixed({"fp32": 45.0, "int8": 20.0})  # a slow board: FP32 misses the budget, INT8 fits
    worker.run(slow, 10)
    assert ctl.index == 1 and len(ctl.switches) == 1 and "over budget" in ctl.switches[0].reason
    # INT8 at 20 ms has headroom (< 0.7 x 33), so FP32 is probed: 45 ms does not fit. No step up, no flapping.
    worker.run(slow, 30)
    assert len(ctl.switches) == 1
    assert ctl.round_counts["failed"] >= 2 and ctl.round_counts["passed"] == 0
    # The load goes away: the next probe of FP32 fits and the controller steps up on it.
    worker.run(fixed({"fp32": 10.0, "int8": 8.0}), 20)
    assert ctl.index == 0 and ctl.switches[-1].reason.startswith("probe p95")
    assert "under 70% of budget 33 ms" in ctl.switches[-1].reason


def test_a_prediction_is_never_a_reason_to_step_up():
    """INT8 gets much faster while FP32 stays too slow (the issue's case: old medians scaled by a speed-up that
    does not apply to the level above). Probes of FP32 keep failing: no step up, and they get rarer."""
    clock = FakeClock()
    ctl = BudgetController(33.0, build_levels(["fp32", "int8"], 30), clock=clock, dwell_s=2.0, max_backoff_s=16.0)
    worker = Worker(ctl, clock)
    worker.run(fixed({"fp32": 45.0, "int8": 20.0}), 6)
    assert ctl.index == 1
    worker.run(fixed({"fp32": 45.0, "int8": 5.0}), 120)
    assert ups(ctl) == [], [s.reason for s in ctl.switches]
    failed = [r for r in ctl.rounds if r.result == "failed"]
    starts = [r.started_at for r in failed]
    gaps = [round(b - a) for a, b in zip(starts, starts[1:])]
    # back-off 2 s (the dwell) after the step down, then 4, 8, 16, capped at 16 s
    assert gaps[:3] == [4, 8, 16] and set(gaps[3:]) == {16}, gaps
    assert all(len(r.estimates_ms) == 2 for r in failed)  # two probes over the limit end a round: cheap failures


def test_lowers_the_rate_when_even_the_fastest_variant_is_too_slow():
    clock = FakeClock()
    ctl = BudgetController(33.0, build_levels(["fp32", "int8"], 30), clock=clock, dwell_s=2.0)
    worker = Worker(ctl, clock)
    worker.run(fixed({"fp32": 60.0, "int8": 60.0}), 30)
    assert ctl.index == len(ctl.levels) - 1
    assert ctl.level.max_rate_hz == pytest.approx(7.5)
    committed = worker.run(fixed({"fp32": 60.0, "int8": 60.0}), 4)
    assert len(committed) <= 4 * 7.5 + 1 and ctl.rate_skipped > 0
    assert ctl.probes == 0 or ctl.round_counts["passed"] == 0  # no headroom: nothing to probe, nothing to climb


def test_no_switch_before_dwell_or_enough_samples():
    clock = FakeClock()
    ctl = BudgetController(33.0, [Level("fp32"), Level("int8")], clock=clock, dwell_s=5.0, min_samples=20)
    for _ in range(10):
        clock.advance(0.1)
        ctl.observe(100.0)
    assert ctl.index == 0  # 10 samples: not enough evidence
    for _ in range(20):
        clock.advance(0.1)
        ctl.observe(100.0)
    assert ctl.index == 1
    for _ in range(60):  # pushes the last slow samples out of the new level's window
        clock.advance(0.05)
        ctl.observe(1.0)
    assert ctl.probe_wanted() is None  # 4 s since the switch < 5 s dwell
    clock.advance(2.0)
    assert ctl.probe_wanted() == Level("fp32")
    assert ctl.index == 1  # headroom alone never steps up


def test_late_frames_are_skipped_and_counted():
    ctl = BudgetController(33.0, [Level("fp32")])
    assert ctl.admit(frame_age_ms=5.0) is True
    assert ctl.admit(frame_age_ms=40.0) is False
    assert ctl.late == 1


def test_misses_counted():
    ctl = BudgetController(33.0, [Level("fp32")])
    for v in (10, 40, 50):
        ctl.observe(v)
    assert ctl.misses == 2


def at_int8_with_headroom(clock: FakeClock, **kwargs) -> BudgetController:
    """A controller that has stepped down to INT8 and has 20 fast INT8 latencies: FP32 is due for a probe."""
    ctl = BudgetController(100.0, [Level("fp32"), Level("int8")], clock=clock, dwell_s=3.0, **kwargs)
    for _ in range(20):
        clock.advance(0.05)
        ctl.observe(150.0, 140.0)
    assert ctl.index == 1
    clock.advance(3.0)
    for _ in range(20):
        clock.advance(0.05)
        ctl.observe(30.0, 20.0)  # 10 ms of each finding was the wait before the worker started on it
    assert ctl.probe_wanted() == Level("fp32")
    return ctl


def test_probe_estimate_adds_the_measured_wait_and_steps_up_on_the_probe_p95():
    clock = FakeClock()
    ctl = at_int8_with_headroom(clock)
    assert ctl.overhead_ms() == pytest.approx(10.0)
    for i in range(9):
        clock.advance(0.05)
        assert ctl.observe_probe(50.0 + i) is None  # 50..58 ms + 10 ms wait: under 70 ms (0.7 x 100)
    clock.advance(0.05)
    switch = ctl.observe_probe(59.0)
    assert switch is not None and switch.to_level == 0 and ctl.index == 0
    assert ctl.rounds[-1].result == "passed" and ctl.rounds[-1].p95_ms == pytest.approx(68.55)
    assert "probe p95" in switch.reason and "10 probes" in switch.reason and switch.at == clock.t
    # The same probes without the wait they leave out would have fitted; with a 20 ms wait they do not.
    clock2 = FakeClock()
    ctl2 = at_int8_with_headroom(clock2)
    while ctl2.probe_wanted() is not None:
        clock2.advance(0.05)
        ctl2.observe_probe(62.0, wait_ms=20.0)
    assert ctl2.index == 1 and ctl2.round_counts == {"passed": 0, "failed": 1, "expired": 0}


def test_a_failed_level_is_retried_with_a_doubling_back_off_that_is_forgotten_once_it_holds():
    clock = FakeClock()
    ctl = at_int8_with_headroom(clock, max_backoff_s=10.0, hold_s=5.0)
    waits = []
    for _ in range(4):
        while ctl.probe_wanted() is None:
            clock.advance(0.1)
        t = clock.t
        ctl.observe_probe(95.0)
        ctl.observe_probe(95.0)  # two over the limit: the round fails
        waits.append(round(ctl.retry_at[0] - t, 1))
    assert waits == [6.0, 10.0, 10.0, 10.0]  # 3 s (the step down) doubled, then capped
    while ctl.probe_wanted() is None:
        clock.advance(0.1)
    for _ in range(10):
        ctl.observe_probe(40.0)
    assert ctl.index == 0
    for _ in range(120):  # 6 s at FP32 within budget: the step up held
        clock.advance(0.05)
        ctl.observe(50.0, 45.0)
    assert 0 not in ctl.backoff_s


def test_frames_never_wait_behind_a_probe():
    """FP32 probes take longer than the gap to the next frame. A frame captured during a probe is skipped, so every
    committed INT8 finding took only its own inference: none waited for a probe to finish."""
    clock = FakeClock()
    ctl = BudgetController(33.0, build_levels(["fp32", "int8"], 30), clock=clock, dwell_s=3.0)
    worker = Worker(ctl, clock)
    committed = worker.run(fixed({"fp32": 45.0, "int8": 12.0}), 60)
    assert ctl.index == 1 and ctl.probes > 0 and ctl.probe_skipped > 0
    int8 = [(c, lat) for c, lat, v in committed if v == "int8"]
    assert max(lat for _, lat in int8) == pytest.approx(12.0)
    assert not any(start <= c < end for c, _ in int8 for start, end in worker.probe_spans)


def test_a_reduced_rate_probes_on_the_frames_its_rate_cap_skips():
    clock = FakeClock()
    ctl = BudgetController(33.0, build_levels(["int8"], 30), clock=clock, dwell_s=3.0)
    worker = Worker(ctl, clock)
    worker.run(fixed({"int8": 40.0}), 20)  # contention: even INT8 misses, the rate goes down to 7.5/s
    assert ctl.level == Level("int8", 7.5)
    # Contention half gone: 28 ms fits 0.9 x 33 at the rate above; probes run at 15/s on skipped frames.
    committed = worker.run(fixed({"int8": 28.0}), 15)
    first_up = ups(ctl)[0]
    assert first_up.from_level == 2 and first_up.to_level == 1 and first_up.reason.startswith("probe p95")
    passed = next(r for r in ctl.rounds if r.result == "passed")
    assert passed.level == 1 and len(passed.estimates_ms) == 10
    # Ten probes at 15/s on the frames the 7.5/s cap skips: between two findings, never instead of one.
    assert passed.ended_at - passed.started_at == pytest.approx(9 / 7.5, abs=0.1)
    during = [c for c, _, _ in committed if passed.started_at <= c <= passed.ended_at]
    assert len(during) == pytest.approx(9 / 7.5 * 7.5, abs=1)
    assert ctl.index == 0 and ctl.level.max_rate_hz == 0  # and on up to every frame


def test_leaves_a_reduced_rate_once_contention_is_gone_and_no_further_than_fits():
    clock = FakeClock()
    ctl = BudgetController(33.0, build_levels(["fp32", "int8"], 30), clock=clock, dwell_s=3.0)
    worker = Worker(ctl, clock)
    normal = fixed({"fp32": 45.0, "int8": 25.0})
    worker.run(normal, 8)
    assert ctl.index == 1
    worker.run(fixed({"fp32": 90.0, "int8": 40.0}), 15)  # contention: even INT8 misses, the rate goes down
    assert ctl.level.max_rate_hz > 0
    # INT8 at 25 ms is within 90 % of the budget but not under 70 %: back to INT8 at full rate, not to FP32.
    worker.run(normal, 40)
    assert ctl.index == 1 and ctl.level.max_rate_hz == 0
    assert all(s.reason.startswith("probe p95") for s in ups(ctl))


def test_a_step_up_that_misses_anyway_is_undone_after_a_few_misses():
    """The probe fitted, but the level does not hold once every frame runs on it (here: FP32 is slow only while it
    is the level in use). The step up is undone after `abort_misses` late findings, and its back-off doubles."""
    clock = FakeClock()
    ctl = BudgetController(33.0, build_levels(["fp32", "int8"], 30), clock=clock, dwell_s=3.0, abort_misses=3)
    worker = Worker(ctl, clock)
    worker.run(fixed({"fp32": 45.0, "int8": 15.0}), 8)
    assert ctl.index == 1
    misses_before, backoff_before = ctl.misses, ctl.backoff_s[0]
    worker.run(lambda v, t: {"fp32": 40.0 if ctl.index == 0 else 20.0, "int8": 15.0}[v], 10)
    assert len(ups(ctl)) == 1 and ctl.index == 1
    assert "undone early" in ctl.switches[-1].reason
    # 3 on FP32, and at most one INT8 frame that was captured while the last FP32 inference ran (without the
    # early undo: a whole window, 20+ frames, of misses)
    assert 3 <= ctl.misses - misses_before <= 4
    assert ctl.backoff_s[0] == 2 * backoff_before


def test_an_occasional_slow_frame_does_not_undo_a_step_up():
    clock = FakeClock()
    ctl = BudgetController(33.0, build_levels(["fp32", "int8"], 30), clock=clock, dwell_s=3.0)
    worker = Worker(ctl, clock)
    worker.run(fixed({"fp32": 90.0, "int8": 15.0}), 5)  # a start-up transient: FP32 looks terrible
    assert ctl.index == 1
    n = iter(range(10**6))
    # FP32 now fits at 20 ms, with one 40 ms outlier every 50 frames: the controller climbs back and stays.
    worker.run(lambda v, t: (40.0 if next(n) % 50 == 49 else 20.0) if v == "fp32" else 15.0, 90)
    assert ctl.index == 0, [s.reason for s in ctl.switches]
    assert len(ups(ctl)) == 1


def test_a_cpu_hog_steps_the_controller_down_and_it_is_back_up_within_30_s_of_the_hog_stopping():
    clock = FakeClock()
    ctl = BudgetController(33.0, build_levels(["fp32", "int8"], 30), clock=clock, dwell_s=3.0, name="probe")
    worker = Worker(ctl, clock)
    t0 = clock.t
    base = {"fp32": 18.0, "int8": 8.0}
    hog_from, hog_to = t0 + 20.0, t0 + 80.0

    def cost(variant: str, t: float) -> float:  # two busy loops on a 2-core board: everything ~4x slower
        return base[variant] * (4.5 if hog_from <= t < hog_to else 1.0)

    worker.run(cost, 140)
    down = [s for s in ctl.switches if s.to_level > s.from_level]
    assert down and down[0].at - hog_from < 5.0 and ctl.switches[0].at >= hog_from
    assert max(s.to_level for s in ctl.switches) >= 2  # even INT8 at full rate did not fit: the rate went down
    back = next(s for s in ctl.switches if s.to_level == 0 and s.at > hog_to)
    assert back.at - hog_to <= 30.0, [(round(s.at - t0, 1), s.reason) for s in ctl.switches]
    assert ctl.index == 0
    assert all(s.reason.startswith("probe p95") for s in ups(ctl))
    # no step up to FP32 while the hog runs
    assert not [s for s in ups(ctl) if hog_from <= s.at < hog_to and s.to_level == 0]


def test_decide_skips_a_frame_captured_while_a_probe_ran():
    clock = FakeClock()
    ctl = at_int8_with_headroom(clock)
    captured = clock.t
    clock.advance(0.05)
    ctl.observe_probe(50.0)
    assert ctl.decide(10.0, captured) is Decision.SKIP and ctl.probe_skipped == 1
    clock.advance(0.01)
    assert ctl.decide(0.0, clock.t) is Decision.RUN


@pytest.mark.parametrize("outlier_ms, passes", [(62.0, True), (200.0, False)])
def test_one_slow_probe_of_ten_fails_the_round_only_when_it_lifts_the_p95_over_the_limit(outlier_ms, passes):
    clock = FakeClock()
    ctl = at_int8_with_headroom(clock)  # limit 70 ms; each probe's estimate adds the 10 ms wait
    for _ in range(9):
        clock.advance(0.05)
        ctl.observe_probe(55.0)
    clock.advance(0.05)
    switch = ctl.observe_probe(outlier_ms)
    assert (switch is not None) == passes and ctl.rounds[-1].result == ("passed" if passes else "failed")
    assert ctl.index == (0 if passes else 1)


def test_misses_after_the_first_window_are_judged_by_the_p95_not_undone_early():
    clock = FakeClock()
    ctl = at_int8_with_headroom(clock)
    for _ in range(10):
        ctl.observe_probe(40.0)
    assert ctl.index == 0
    misses_before = ctl.misses
    for _ in range(30):  # the new level has a window of its own
        clock.advance(0.05)
        ctl.observe(50.0, 40.0)
    for i in range(30):  # three misses in its 60 findings: 5 %, not a p95 over budget
        clock.advance(0.05)
        ctl.observe(150.0 if i % 10 == 0 else 50.0, 40.0)
    assert ctl.index == 0 and ctl.misses - misses_before == 3
    clock.advance(0.05)
    ctl.observe(150.0, 40.0)
    ctl.observe(150.0, 40.0)  # five in 60: the p95 is over budget, and the level steps down
    assert ctl.index == 1 and ctl.switches[-1].reason.startswith("p95")
