"""Accuracy and speed guards: an INT8 variant ships on an engine only if it is as accurate and really faster.

Accuracy is compared with the FP32 model on the same engine and the same labelled files (one evaluation run):

- classification: AUC drop <= 0.005 and sensitivity drop at the manifest threshold <= 0.01 (the operating
  point is what a triage user sees; AUC alone can hide a shifted threshold);
- segmentation: HC MAD increase <= 0.3 mm and Dice drop <= 0.005.

Speed: the variant's p50 on that engine must be lower than FP32's p50 on the same engine, measured in the same
run (interleaved), and not by chance: the 95 % bootstrap CI of the p50 ratio (over the paired rounds) must stay
below 1. Both ways the runtime calls a model count: back to back (a tight loop) and paced (each call after an idle
gap, as the `infer` CLI and the study worker call it, one study at a time with the engine's threads asleep in
between: quantize.evaluate.measure_latency_paced). A variant faster in the tight loop only is refused. A guard
that fails gives one line naming the guard and by how much, e.g.
``refused fetal-head int8-ov/openvino: HC MAD +0.41 mm > +0.30 mm allowed``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from quantize.evaluate import Report, Result


@dataclass(frozen=True)
class GuardConfig:
    max_auc_drop: float = 0.005
    max_sensitivity_drop: float | None = 0.01
    max_hc_mad_increase_mm: float = 0.3
    max_dice_drop: float | None = 0.005
    # The variant's p50 must be below max_p50_ratio x FP32's p50. 1.0 = "faster than FP32"; None disables the
    # speed guard (only for tests that check the accuracy path on a noisy machine; the CLI never does).
    max_p50_ratio: float | None = 1.0
    # ... and the speed-up must not be noise: the upper end of the 95 % CI of the p50 ratio (bootstrap over the
    # paired, interleaved rounds) must also be below max_p50_ratio.
    require_significant_speedup: bool = True
    # ... and the same again for the paced measurement, where the report has one (Report.paced_runs > 0)
    paced: bool = True


@dataclass
class Verdict:
    model: str
    variant: str
    engine: str
    failures: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)  # every guard, passed or not, for the record

    @property
    def passed(self) -> bool:
        return not self.failures

    def line(self) -> str:
        if self.passed:
            return f"passed {self.model} {self.variant}/{self.engine}: " + "; ".join(self.checks)
        return f"refused {self.model} {self.variant}/{self.engine}: " + "; ".join(self.failures)


def _num(v: float | None) -> float:
    return math.nan if v is None else float(v)


def check(report: Report, key: str, config: GuardConfig = GuardConfig()) -> Verdict:
    """All guards for one INT8 candidate (a report key such as 'int8-ov/openvino') against FP32 on its engine."""
    result: Result = report.results[key]
    c = result.candidate
    verdict = Verdict(report.model, c.variant, c.engine)
    base = report.fp32(c.engine)
    if base is None:
        verdict.failures.append(f"no FP32 baseline measured on {c.engine}")
        return verdict
    m, b = result.metrics, base.metrics

    def drop_guard(name: str, metric: str, limit: float | None, fmt: str) -> None:
        if limit is None:
            return
        new, old = _num(m.get(metric)), _num(b.get(metric))
        drop = old - new
        text = f"{name} drop {drop:{fmt}} (FP32 {old:{fmt}} -> INT8 {new:{fmt}})"
        if new != new or old != old:
            verdict.failures.append(f"{name} not measurable (FP32 {old:{fmt}}, INT8 {new:{fmt}}): the evaluation data "
                                    "needs both classes")
        elif not drop <= limit:
            verdict.failures.append(f"{name} drop {drop:{fmt}} > {limit:{fmt}} allowed (FP32 {old:{fmt}}, INT8 {new:{fmt}})")
        verdict.checks.append(text)

    if report.task == "classification":
        drop_guard("AUC", "val_auc", config.max_auc_drop, ".4f")
        drop_guard("sensitivity", "val_sensitivity", config.max_sensitivity_drop, ".4f")
    else:
        new, old = _num(m.get("val_hc_mad_mm")), _num(b.get("val_hc_mad_mm"))
        inc = new - old
        verdict.checks.append(f"HC MAD {inc:+.2f} mm (FP32 {old:.3f} -> INT8 {new:.3f})")
        if not inc <= config.max_hc_mad_increase_mm:
            verdict.failures.append(
                f"HC MAD {inc:+.2f} mm > {config.max_hc_mad_increase_mm:+.2f} mm allowed (FP32 {old:.3f} mm, INT8 {new:.3f} mm)"
            )
        drop_guard("Dice", "val_dice", config.max_dice_drop, ".4f")

    if config.max_p50_ratio is not None:
        _speed_guard(verdict, config, c.engine, base.compute_precision, "p50", result.p50_ms, base.p50_ms,
                     result.p50_ratio_ci95)
        if config.paced and report.paced_runs > 0:
            _speed_guard(verdict, config, c.engine, base.compute_precision,
                         f"paced p50 ({report.paced_gap_ms:g} ms idle before each call)", result.paced_p50_ms,
                         base.paced_p50_ms, result.paced_p50_ratio_ci95)
        elif config.paced:
            verdict.checks.append("paced latency not measured (back to back only)")
    return verdict


def _speed_guard(verdict: Verdict, config: GuardConfig, engine: str, base_precision: str, what: str, p: float,
                 p0: float, ci95: tuple[float, float]) -> None:
    """The variant's `what` latency must be below max_p50_ratio x FP32's, and not by chance (the CI's upper end)."""
    limit = config.max_p50_ratio * p0
    delta = p - p0
    pct = 100.0 * delta / p0 if p0 > 0 else math.nan
    speed = f"{what} {p:.3f} ms vs FP32 {p0:.3f} ms ({base_precision}) on {engine} ({delta:+.3f} ms, {pct:+.0f}%)"
    lo, hi = ci95
    if hi == hi:
        speed += f", p50 ratio 95% CI {lo:.2f}-{hi:.2f}"
    verdict.checks.append(speed)
    if not p < limit:
        need = "not faster than" if config.max_p50_ratio == 1.0 else f"not below {config.max_p50_ratio:g} x"
        verdict.failures.append(
            f"{what} {p:.3f} ms {need} FP32 {p0:.3f} ms ({base_precision}) on {engine} ({delta:+.3f} ms, {pct:+.0f}%)"
        )
    elif config.require_significant_speedup and hi == hi and not hi < config.max_p50_ratio:
        verdict.failures.append(
            f"{what} {p:.3f} ms vs FP32 {p0:.3f} ms ({base_precision}) on {engine} ({pct:+.0f}%) is within "
            f"measurement noise: 95% CI of the p50 ratio {lo:.2f}-{hi:.2f} reaches {config.max_p50_ratio:g}"
        )


def check_all(report: Report, config: GuardConfig = GuardConfig()) -> list[Verdict]:
    return [check(report, key, config) for key, r in report.results.items() if r.candidate.precision != "fp32"]
