"""The budget controller driven by a deliberately slow engine (a fake clock stands in for wall time)."""
from __future__ import annotations

import pytest

from edge_runtime.budget import BudgetController, Level, build_levels


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t

    def advance(self, s):
        self.t += s


def run_frames(ctl: BudgetController, clock: FakeClock, latency_for_level, seconds: float, fps: float = 30.0):
    """Feed a live source at fps for `seconds`; the engine's latency depends on the level in use."""
    processed = 0
    for _ in range(int(seconds * fps)):
        clock.advance(1.0 / fps)
        if ctl.admit(frame_age_ms=1.0):
            ctl.observe(latency_for_level(ctl.level))
            processed += 1
    return processed


def test_levels_from_variants_and_rates():
    levels = build_levels(["fp32", "int8"], source_fps=30)
    assert [lv.describe() for lv in levels] == ["fp32 @ every frame", "int8 @ every frame", "int8 @ 15/s", "int8 @ 7.5/s"]


def test_steps_down_to_faster_variant_when_over_budget_and_back_up_with_hysteresis():
    clock = FakeClock()
    ctl = BudgetController(33.0, build_levels(["fp32", "int8"], 30), clock=clock, dwell_s=3.0, name="fetal-head")
    slow = {"fp32": 45.0, "int8": 20.0}  # a slow board: FP32 misses the budget, INT8 fits
    run_frames(ctl, clock, lambda lv: slow[lv.variant], seconds=10)
    assert ctl.level.variant == "int8" and ctl.index == 1
    assert len(ctl.switches) == 1 and "over budget" in ctl.switches[0].reason
    # INT8 at 20 ms has headroom (< 0.7 x 33), but FP32 is predicted at 45 ms: it stays, no flapping.
    run_frames(ctl, clock, lambda lv: slow[lv.variant], seconds=20)
    assert len(ctl.switches) == 1
    # The load goes away (both variants fast): back up to FP32 after the dwell time.
    run_frames(ctl, clock, lambda lv: 10.0, seconds=10)
    assert ctl.index == 0 and "under 70%" in ctl.switches[-1].reason


def test_lowers_the_rate_when_even_the_fastest_variant_is_too_slow():
    clock = FakeClock()
    ctl = BudgetController(33.0, build_levels(["fp32", "int8"], 30), clock=clock, dwell_s=2.0)
    run_frames(ctl, clock, lambda lv: 60.0, seconds=30)
    assert ctl.index == len(ctl.levels) - 1
    assert ctl.level.max_rate_hz == pytest.approx(7.5)
    processed = run_frames(ctl, clock, lambda lv: 60.0, seconds=4)
    assert processed <= 4 * 7.5 + 1 and ctl.rate_skipped > 0


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
    for _ in range(30):
        clock.advance(0.1)
        ctl.observe(1.0)
    assert ctl.index == 1  # 3 s since the switch < 5 s dwell


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


def test_failed_step_up_backs_off():
    """FP32 stays slow although INT8 gets faster (the ratio misleads): probes up get rarer, not periodic."""
    clock = FakeClock()
    ctl = BudgetController(33.0, build_levels(["fp32", "int8"], 30), clock=clock, dwell_s=2.0)
    run_frames(ctl, clock, lambda lv: {"fp32": 45.0, "int8": 20.0}[lv.variant], seconds=6)
    assert ctl.index == 1
    run_frames(ctl, clock, lambda lv: {"fp32": 45.0, "int8": 8.0}[lv.variant], seconds=120)
    ups = [s for s in ctl.switches if s.to_level < s.from_level]
    # One probe up, undone; then the ratio learnt at the step down predicts FP32 will not fit: no more probes
    # (without prediction and back-off: one probe every few seconds, each costing a burst of budget misses).
    assert len(ups) == 1, [s.reason for s in ctl.switches]
    assert ctl.index == 1 and ctl.up_penalty == 2.0


def test_a_stale_prediction_is_probed_once_and_backs_off_when_the_probe_fails():
    clock = FakeClock()
    ctl = BudgetController(33.0, build_levels(["fp32", "int8"], 30), clock=clock, dwell_s=3.0, probe_after_s=60.0)
    # A start-up transient: FP32 looks terrible, so the controller leaves it with a pessimistic p95.
    run_frames(ctl, clock, lambda lv: 90.0 if lv.variant == "fp32" else 15.0, seconds=5)
    assert ctl.index == 1
    # The transient is gone and FP32 would now fit (20 ms), but the prediction (90 x 15/15) says it does not:
    # no step up before the prediction is probe_after_s old ...
    run_frames(ctl, clock, lambda lv: 20.0 if lv.variant == "fp32" else 15.0, seconds=50)
    assert ctl.index == 1 and len(ctl.switches) == 1
    # ... then one probe, which holds.
    run_frames(ctl, clock, lambda lv: 20.0 if lv.variant == "fp32" else 15.0, seconds=20)
    assert ctl.index == 0 and "probing" in ctl.switches[-1].reason

    # When the probe fails (FP32 really is too slow), the controller steps down again and waits twice as long.
    clock2 = FakeClock()
    ctl2 = BudgetController(33.0, build_levels(["fp32", "int8"], 30), clock=clock2, dwell_s=3.0, probe_after_s=60.0)
    run_frames(ctl2, clock2, lambda lv: 90.0 if lv.variant == "fp32" else 15.0, seconds=70)
    probes = [s for s in ctl2.switches if "probing" in s.reason]
    assert len(probes) == 1 and ctl2.index == 1 and ctl2.up_penalty == 2.0
    run_frames(ctl2, clock2, lambda lv: 90.0 if lv.variant == "fp32" else 15.0, seconds=100)
    assert len([s for s in ctl2.switches if "probing" in s.reason]) == 1  # next probe only after 120 s
    run_frames(ctl2, clock2, lambda lv: 90.0 if lv.variant == "fp32" else 15.0, seconds=40)
    assert len([s for s in ctl2.switches if "probing" in s.reason]) == 2


def test_leaves_a_reduced_rate_once_contention_is_gone():
    clock = FakeClock()
    ctl = BudgetController(33.0, build_levels(["fp32", "int8"], 30), clock=clock, dwell_s=3.0)
    run_frames(ctl, clock, lambda lv: 45.0 if lv.variant == "fp32" else 25.0, seconds=8)
    assert ctl.index == 1
    run_frames(ctl, clock, lambda lv: 40.0, seconds=15)  # contention: even INT8 misses, the rate goes down
    assert ctl.level.max_rate_hz > 0
    # Contention gone: INT8 at 25 ms is within budget but not under 70 % of it. The same variant at a higher
    # rate costs the same per frame, so the controller climbs back to INT8 at full rate (and no further).
    run_frames(ctl, clock, lambda lv: 45.0 if lv.variant == "fp32" else 25.0, seconds=40)
    assert ctl.index == 1 and ctl.level.max_rate_hz == 0
    assert "within budget" in ctl.switches[-1].reason


def test_back_off_is_forgotten_once_a_step_up_holds():
    clock = FakeClock()
    ctl = BudgetController(33.0, build_levels(["fp32", "int8"], 30), clock=clock, dwell_s=3.0, probe_after_s=60.0)
    run_frames(ctl, clock, lambda lv: 90.0 if lv.variant == "fp32" else 15.0, seconds=70)  # one failed probe
    assert ctl.up_penalty == 2.0
    run_frames(ctl, clock, lambda lv: 20.0 if lv.variant == "fp32" else 15.0, seconds=200)  # the next probe holds
    assert ctl.index == 0
    assert ctl.up_penalty == 1.0


def test_a_failing_probe_is_undone_after_a_few_misses():
    """FP32 really is too slow: the probe returns to INT8 after `abort_misses` late findings, not a full window."""
    clock = FakeClock()
    ctl = BudgetController(33.0, build_levels(["fp32", "int8"], 30), clock=clock, dwell_s=3.0, probe_after_s=60.0,
                           abort_misses=3)
    run_frames(ctl, clock, lambda lv: 40.0 if lv.variant == "fp32" else 15.0, seconds=10)
    assert ctl.index == 1
    misses_before = ctl.misses
    run_frames(ctl, clock, lambda lv: 40.0 if lv.variant == "fp32" else 15.0, seconds=70)
    probes = [s for s in ctl.switches if "probing" in s.reason]
    assert len(probes) == 1 and ctl.index == 1
    assert "undone early" in ctl.switches[-1].reason
    assert ctl.misses - misses_before == 3  # without the early undo: a whole window (20+ frames) of misses
    assert ctl.up_penalty == 2.0


def test_an_occasional_slow_frame_does_not_undo_a_step_up():
    clock = FakeClock()
    ctl = BudgetController(33.0, build_levels(["fp32", "int8"], 30), clock=clock, dwell_s=3.0, probe_after_s=60.0)
    run_frames(ctl, clock, lambda lv: 90.0 if lv.variant == "fp32" else 15.0, seconds=5)
    assert ctl.index == 1
    n = iter(range(10**6))
    # FP32 now fits at 20 ms, with one 40 ms outlier every 50 frames: the probe holds.
    run_frames(ctl, clock, lambda lv: (40.0 if next(n) % 50 == 49 else 20.0) if lv.variant == "fp32" else 15.0, seconds=90)
    assert ctl.index == 0, [s.reason for s in ctl.switches]


def test_frames_that_waited_behind_the_slow_level_do_not_fake_a_speed_up():
    """After a step down the first window holds a few frames that queued behind the slow FP32 inference. Taken as
    the new level's entry latency they would make INT8 look as if it had since become much faster, and predict
    that FP32 (still too slow) fits again."""
    clock = FakeClock()
    ctl = BudgetController(150.0, build_levels(["fp32", "int8"], 30), clock=clock, dwell_s=3.0, probe_after_s=600.0)
    waited = iter([180.0, 120.0])  # the first INT8 findings: captured while the last FP32 inference ran
    run_frames(ctl, clock, lambda lv: 200.0 if lv.variant == "fp32" else next(waited, 21.0), seconds=30)
    assert [s.to_level for s in ctl.switches] == [1], [s.reason for s in ctl.switches]
