"""edge-quantize: FP32 model -> INT8 variants for ONNX Runtime and OpenVINO, registered only when proven.

    edge-quantize ort       MODEL --data DIR [--dataset cxr-kermany|hc18] [--method minmax|entropy|percentile]
    edge-quantize openvino  MODEL --data DIR [--dataset ...] [--preset mixed|performance]
    edge-quantize evaluate  MODEL --data DIR [--dataset ...] [--variant FILE ...]
    edge-quantize all       MODEL --data DIR --dataset ...   (quantize both, evaluate, guard, register)

MODEL is a model folder (with manifest.toml) or the name of an installed model. With --dataset, calibration
uses the dataset's TRAIN split and evaluation its VAL split (quantize.datasets); without it, --data is a plain
folder of images / DICOM files (label = first sub-folder) and `all` needs --eval-data for a labelled folder.

Exit status: 0 success (for `all`: at least one variant registered, or --dry-run), 2 usage or input error,
3 `all` refused every variant on every engine.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from edge_runtime.errors import EdgeError
from edge_runtime.registry import MANIFEST, ModelManifest, ModelRegistry, parse_manifest, verify_variant
from quantize.calibration import (DATASETS, CalibrationSet, Sample, build_calibration, dataset_samples, folder_samples,
                                  stratified_pick)
from quantize.evaluate import Candidate, Report, evaluate, format_report
from quantize.guards import GuardConfig, Verdict, check_all
from quantize.ort_static import DEFAULT_PERCENTILE, METHODS, quantize_ort
from quantize.register import register_variant, remove_variant

ENGINES = ("onnxruntime", "openvino")
QDQ_ID = "int8-qdq"
OV_ID = "int8-ov"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- helpers
def resolve_model(spec: str) -> Path:
    p = Path(spec)
    if (p / MANIFEST).is_file():
        return p
    if p.name == MANIFEST and p.is_file():
        return p.parent
    folders = ModelRegistry().folders()
    if spec in folders:
        return folders[spec]
    raise SystemExit(f"edge-quantize: {spec}: not a model folder (no {MANIFEST}) and not an installed model "
                     f"({', '.join(sorted(folders)) or 'none installed'})")


def fp32_variant(manifest: ModelManifest):
    v = manifest.variant("onnxruntime", "fp32")
    verify_variant(manifest, v)
    return v


def calibration(args, manifest: ModelManifest) -> CalibrationSet:
    _log(f"calibration: {args.samples} samples from {args.data}"
         + (f" ({args.dataset} train split)" if args.dataset else " (folder)"))
    calib = build_calibration(manifest, args.data, args.dataset, n=args.samples, seed=args.seed, split="train")
    _log(f"  {len(calib)} tensors, strata {calib.provenance['strata']}")
    return calib


def eval_samples(args) -> tuple[list[Sample], str]:
    manifest_labels = args._manifest.output.labels
    if getattr(args, "eval_data", None):
        return folder_samples(args.eval_data, manifest_labels), f"folder {Path(args.eval_data).name}"
    if args.dataset:
        s = dataset_samples(args.data, args.dataset, "val")
        if args.limit:
            s = stratified_pick(s, args.limit, args.seed)
        return s, f"{args.dataset} val split{' (stratified sample of %d)' % args.limit if args.limit else ''}, runtime path"
    return folder_samples(args.data, manifest_labels), f"folder {Path(args.data).name}"


def _variant_id_from_file(model: str, path: Path) -> str:
    stem = path.stem
    return stem[len(model) + 1:] if stem.startswith(model + "-") else stem


def candidates_for(manifest: ModelManifest, variants: list[tuple[str, Path, tuple[str, ...]]], engines: tuple[str, ...]) -> list[Candidate]:
    fp32 = fp32_variant(manifest)
    out = []
    for e in engines:
        if e in fp32.engines:
            out.append(Candidate("fp32", fp32.path, e, "fp32", "f32"))
        for vid, path, v_engines in variants:
            if e in v_engines:
                out.append(Candidate(vid, path, e, "int8", "f32"))
    return out


def _guard_config(args) -> GuardConfig:
    return GuardConfig(
        max_auc_drop=args.max_auc_drop,
        max_sensitivity_drop=None if args.max_sens_drop < 0 else args.max_sens_drop,
        max_hc_mad_increase_mm=args.max_hc_mad_increase,
        max_dice_drop=None if args.max_dice_drop < 0 else args.max_dice_drop,
        max_p50_ratio=1.0,
    )


def _metric_keys(task: str) -> tuple[str, ...]:
    if task == "classification":
        return ("val_auc", "val_accuracy", "val_sensitivity", "val_specificity", "decision_changes_vs_fp32",
                "max_abs_prob_diff_vs_fp32")
    return ("val_hc_mad_mm", "val_hc_median_abs_err_mm", "val_dice", "val_no_head_fraction",
            "hc_mean_abs_diff_vs_fp32_mm", "hc_max_abs_diff_vs_fp32_mm")


def cpu_description() -> str:
    """The CPU the latencies were measured on (model name and logical CPU count)."""
    import os

    name = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            name = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), "")
    except OSError:
        pass
    import platform

    return f"{name or platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs"


def variant_metrics(report: Report, variant: str, verdicts: list[Verdict], passed: list[str]) -> dict[str, Any]:
    """Flat metrics for the manifest: the primary (first passed) engine's accuracy as val_*, then per engine
    accuracy, FP32 baseline, p50/p90 with the precision each number used, and the guard outcome."""
    out: dict[str, Any] = {"evaluated_on": f"{report.data}, {report.n_items} images",
                           "evaluated": _dt.date.today().isoformat()}
    mine = {r.candidate.engine: r for r in report.results.values() if r.candidate.variant == variant}
    primary = mine[passed[0]] if passed else next(iter(mine.values()))
    for k in _metric_keys(report.task):
        if k in primary.metrics:
            out[k] = primary.metrics[k]
    out["val_metrics_engine"] = primary.candidate.engine
    for e, r in mine.items():
        base = report.fp32(e)
        for k in _metric_keys(report.task):
            if k in r.metrics and not k.endswith("vs_fp32"):
                out[f"{e}_{k}"] = r.metrics[k]
                if base is not None and k in base.metrics:
                    out[f"{e}_fp32_{k}"] = base.metrics[k]
        out[f"{e}_p50_ms"] = r.p50_ms
        out[f"{e}_p90_ms"] = r.p90_ms
        out[f"{e}_compute_precision"] = r.compute_precision
        if base is not None:
            out[f"{e}_fp32_p50_ms"] = base.p50_ms
            out[f"{e}_fp32_p90_ms"] = base.p90_ms
            out[f"{e}_fp32_compute_precision"] = base.compute_precision
            out[f"{e}_speedup_vs_fp32"] = base.p50_ms / r.p50_ms if r.p50_ms > 0 else None
            if r.p50_ratio_ci95[1] == r.p50_ratio_ci95[1]:
                out[f"{e}_p50_ratio_vs_fp32_ci95"] = list(r.p50_ratio_ci95)
            if report.paced_runs > 0:  # one study at a time: each call after an idle gap
                out[f"{e}_paced_p50_ms"] = r.paced_p50_ms
                out[f"{e}_fp32_paced_p50_ms"] = base.paced_p50_ms
                if r.paced_p50_ratio_ci95[1] == r.paced_p50_ratio_ci95[1]:
                    out[f"{e}_paced_p50_ratio_vs_fp32_ci95"] = list(r.paced_p50_ratio_ci95)
        v = next((v for v in verdicts if v.variant == variant and v.engine == e), None)
        if v is not None:
            out[f"{e}_guard"] = "passed" if v.passed else "refused: " + "; ".join(v.failures)
    out["latency"] = (f"p50/p90 of {report.runs} runs after warm-up, all candidates interleaved in one process, "
                      f"{report.threads} intra-op threads, batch 1, CPU; ORT spin-wait off; OpenVINO "
                      "INFERENCE_PRECISION_HINT f32 (FP32 baseline and INT8), PERFORMANCE_HINT LATENCY")
    if report.paced_runs > 0:
        out["latency_paced"] = (f"p50 of {report.paced_runs} calls each after {report.paced_gap_ms:g} ms idle, "
                                "candidates interleaved; the speed guard requires the variant faster both ways")
    out["latency_cpu"] = cpu_description()
    return {k: v for k, v in out.items() if v is not None}


CARD_HEADING = "## INT8 variants"


def _f(v: Any, fmt: str) -> str:
    return format(v, fmt) if isinstance(v, (int, float)) and v == v else "-"


def _public_args(argv: list[str]) -> list[str]:
    """The command line without local-only options (work folders, report files)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--work", "--report"):
            skip = True
            continue
        if a.startswith(("--work=", "--report=")) or a in ("--keep-work", "--no-card"):
            continue
        out.append(a)
    return out


def card_section(manifest: ModelManifest, refusals: list[str], command: str) -> str:
    """The model card's INT8 section, written from the manifest's registered int8 variants."""
    cls = manifest.task == "classification"
    rows = []
    cal = quant = None
    for idx, v in enumerate(manifest.variants):
        if v.precision != "int8":
            continue
        raw = manifest.raw["variants"][idx]
        cal = raw.get("calibration", cal)
        m = v.metrics
        for e in v.engines:
            if cls:
                acc = (f"{_f(m.get(f'{e}_val_auc'), '.4f')} ({_f(m.get(f'{e}_fp32_val_auc'), '.4f')}) | "
                       f"{_f(m.get(f'{e}_val_sensitivity'), '.3f')} / {_f(m.get(f'{e}_val_specificity'), '.3f')} "
                       f"({_f(m.get(f'{e}_fp32_val_sensitivity'), '.3f')} / {_f(m.get(f'{e}_fp32_val_specificity'), '.3f')})")
            else:
                acc = (f"{_f(m.get(f'{e}_val_hc_mad_mm'), '.3f')} ({_f(m.get(f'{e}_fp32_val_hc_mad_mm'), '.3f')}) | "
                       f"{_f(m.get(f'{e}_val_dice'), '.4f')} ({_f(m.get(f'{e}_fp32_val_dice'), '.4f')})")
            ci = m.get(f"{e}_p50_ratio_vs_fp32_ci95")
            ci = f"; ratio CI {ci[0]:.2f}-{ci[1]:.2f}" if ci else ""
            rows.append(
                f"| `{v.id}` | `{v.path.name}`{' + `.bin`' if v.weights_path else ''} | {e} | {acc} | "
                f"**{_f(m.get(f'{e}_p50_ms'), '.2f')}** / {_f(m.get(f'{e}_fp32_p50_ms'), '.2f')} "
                f"(x{_f(m.get(f'{e}_speedup_vs_fp32'), '.2f')}{ci}) | {m.get(f'{e}_compute_precision', '-')} / "
                f"{m.get(f'{e}_fp32_compute_precision', '-')} |"
            )
            quant = quant or raw.get("quantization")
    if cls:
        head = "| variant | file | engine | AUC (FP32) | sens / spec at threshold (FP32) | p50 ms INT8 / FP32 | compute precision INT8 / FP32 |"
    else:
        head = "| variant | file | engine | HC MAD mm (FP32) | Dice (FP32) | p50 ms INT8 / FP32 | compute precision INT8 / FP32 |"
    lines = [
        CARD_HEADING,
        "",
        f"Made and checked by `{command}`. A variant is listed for an engine only where it passed the guards on "
        "that engine: accuracy against the FP32 model on the same engine and the same validation images ("
        + ("AUC drop <= 0.005, sensitivity drop at the threshold <= 0.01" if cls else "HC MAD increase <= 0.3 mm, Dice drop <= 0.005")
        + "), and a p50 latency below FP32's p50 on that engine, measured in the same run, with the 95 % CI of the "
        "p50 ratio INT8/FP32 (bootstrap over the paired, interleaved rounds) below 1.",
        "",
        head,
        "|" + "---|" * 7,
        *rows,
        "",
    ]
    for e in ("onnxruntime", "openvino"):
        mine = [v for v in manifest.variants if v.precision == "int8" and e in v.engines]
        if len(mine) < 2:
            continue
        picked = manifest.variant(e, "int8")
        fastest = min(mine, key=lambda v: v.metrics.get(f"{e}_p50_ms", float("inf")))
        p_fast = fastest.metrics.get(f"{e}_p50_ms", float("inf"))
        if fastest.id != picked.id and picked.metrics.get(f"{e}_p50_ms", 0.0) > 1.05 * p_fast:  # > 5 %: not noise
            lines += [
                f"On {e} the runtime loads `{picked.id}` (the registry prefers "
                f"{'the OpenVINO IR' if picked.format == 'openvino-ir' else picked.format} there), although `{fastest.id}` "
                f"measured faster on {e} in this run ({_f(fastest.metrics.get(f'{e}_p50_ms'), '.2f')} vs "
                f"{_f(picked.metrics.get(f'{e}_p50_ms'), '.2f')} ms p50).",
                "",
            ]
    if rows:
        v0 = next(v for v in manifest.variants if v.precision == "int8")
        lines += [
            f"Evaluation: {v0.metrics.get('evaluated_on', '?')}, {v0.metrics.get('evaluated', '')}. "
            f"Latency: {v0.metrics.get('latency', '')}; {v0.metrics.get('latency_cpu', 'CPU not recorded')}. ORT's compute precision is what the graph says: int8 between "
            "QDQ pairs, fp32 elsewhere; OpenVINO's is int8 in quantized layers and the precision hint (f32) elsewhere.",
            "",
        ]
    if cal:
        strata = ", ".join(f"{k} {n}" for k, n in cal.get("strata", {}).items())
        lines += [
            f"Calibration: {cal.get('n_samples')} images from the {cal.get('source')}, stratified by "
            f"{cal.get('stratified_by')} ({strata}), seed {cal.get('seed')}, read through the runtime path "
            f"(`{cal.get('input_path')}`); sorted file list sha256 `{str(cal.get('files_sha256', ''))[:16]}...`. "
            "Evaluation never uses training images.",
            "",
        ]
    for idx, v in enumerate(manifest.variants):
        q = manifest.raw["variants"][idx].get("quantization") if v.precision == "int8" else None
        if q:
            detail = ", ".join(f"{k}: {q[k]}" for k in ("format", "activations", "weights", "calibration_method", "preset",
                                                         "activation_range", "quantized_ops", "fake_quantize_ops") if k in q)
            lines.append(f"- `{v.id}`: {q.get('tool', '')}; {detail}.")
    if refusals:
        lines += ["", "Refused in the same run (not shipped):", ""] + [f"- `{r}`" for r in refusals]
    return "\n".join(lines).rstrip() + "\n"


def update_card(folder: Path, section: str) -> Path:
    """Replace the card's INT8 section (up to the next '## ' heading) or insert it before '## Known failure modes'
    (or at the end)."""
    card = folder / "CARD.md"
    text = card.read_text(encoding="utf-8") if card.is_file() else f"# {folder.name}\n"
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith(CARD_HEADING)), None)
    if start is not None:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    else:
        start = end = next((i for i, ln in enumerate(lines) if ln.startswith("## Known failure modes")), len(lines))
    new = section.rstrip("\n").splitlines() + ([""] if end < len(lines) else [])
    lines[start:end] = new
    card.write_text("\n".join(lines).rstrip("\n") + "\n", encoding="utf-8")
    return card


# ----------------------------------------------------------------------------------------------- commands
def cmd_ort(args) -> int:
    manifest = args._manifest
    calib = calibration(args, manifest)
    out = Path(args.out) if args.out else Path("quantize-out") / f"{manifest.name}-{QDQ_ID}.onnx"
    info = quantize_ort(fp32_variant(manifest).path, out, calib, args.method, args.percentile)
    print(json.dumps({"file": str(out), "quantization": info, "calibration": calib.provenance}, indent=2))
    return 0


def cmd_openvino(args) -> int:
    from quantize.openvino_nncf import quantize_openvino

    manifest = args._manifest
    calib = calibration(args, manifest)
    out = Path(args.out) if args.out else Path("quantize-out") / f"{manifest.name}-{OV_ID}.xml"
    info = quantize_openvino(fp32_variant(manifest).path, out, calib, args.preset, activation_range=args.ov_range)
    print(json.dumps({"file": str(out), "weights": str(out.with_suffix(".bin")), "quantization": info,
                      "calibration": calib.provenance}, indent=2))
    return 0


def _run_evaluation(args, manifest, variants) -> tuple[Report, list[Verdict]]:
    samples, label = eval_samples(args)
    engines = tuple(args.engines.split(",")) if args.engines else ENGINES
    cands = candidates_for(manifest, variants, engines)
    _log(f"evaluate: {len(samples)} items ({label}); candidates: {', '.join(c.key for c in cands)}")
    report = evaluate(manifest, cands, samples, threads=args.threads, runs=args.runs, warmup=args.warmup,
                      data_label=label, progress=_log, paced_runs=args.paced_runs, paced_gap_ms=args.paced_gap_ms)
    verdicts = check_all(report, _guard_config(args))
    print(format_report(report))
    return report, verdicts


def cmd_evaluate(args) -> int:
    manifest = args._manifest
    variants: list[tuple[str, Path, tuple[str, ...]]] = []
    for f in args.variant or []:
        p = Path(f)
        vid = _variant_id_from_file(manifest.name, p)
        variants.append((vid, p, ("openvino",) if p.suffix == ".xml" else ENGINES))
    if not args.variant:
        for v in manifest.variants:
            if v.precision == "int8":
                verify_variant(manifest, v)
                variants.append((v.id, v.path, v.engines))
        if not variants:
            _log(f"edge-quantize: {manifest.name} has no int8 variant; pass --variant FILE")
            return 2
    report, verdicts = _run_evaluation(args, manifest, variants)
    for v in verdicts:
        print(v.line())
    if args.report:
        _write_report(args.report, report, verdicts)
    return 0


def _write_report(path: Path, report: Report, verdicts: list[Verdict], extra: dict | None = None) -> None:
    data = report.to_dict()
    data["verdicts"] = [{"variant": v.variant, "engine": v.engine, "passed": v.passed, "line": v.line()} for v in verdicts]
    data.update(extra or {})
    Path(path).write_text(json.dumps(data, indent=2, default=str) + "\n")


def cmd_all(args) -> int:
    from quantize.openvino_nncf import nncf_available, quantize_openvino

    manifest = args._manifest
    folder = manifest.folder
    unknown = set(args.engines.split(",")) - set(ENGINES) if args.engines else set()
    if unknown:
        _log(f"edge-quantize: unknown engine(s) {', '.join(sorted(unknown))}; allowed: {', '.join(ENGINES)}")
        return 2
    if not args.dataset and not args.eval_data:
        _log("edge-quantize: `all` needs --dataset (calibrate on train, evaluate on val) or --eval-data")
        return 2
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="edge-quantize-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        calib = calibration(args, manifest)
        fp32 = fp32_variant(manifest).path
        produced: dict[str, dict[str, Any]] = {}
        _log(f"ort: static QDQ, {args.method} calibration")
        qdq = work / f"{manifest.name}-{QDQ_ID}.onnx"
        produced[QDQ_ID] = {"file": qdq, "weights": None, "format": "onnx", "engines": ENGINES,
                            "quantization": quantize_ort(fp32, qdq, calib, args.method, args.percentile)}
        want = set(args.engines.split(",")) if args.engines else set(ENGINES)
        if "openvino" not in want:
            pass
        elif nncf_available():
            _log(f"openvino: NNCF {args.preset} preset, {args.ov_range} activation ranges")
            xml = work / f"{manifest.name}-{OV_ID}.xml"
            produced[OV_ID] = {"file": xml, "weights": xml.with_suffix(".bin"), "format": "openvino-ir",
                               "engines": ("openvino",), "quantization": quantize_openvino(fp32, xml, calib, args.preset,
                                                                                activation_range=args.ov_range)}
        else:
            print(f"skipped {manifest.name} {OV_ID}/openvino: nncf is not installed (pip install nncf)")
        for p in produced.values():
            p["engines"] = tuple(e for e in p["engines"] if e in want)
        variants = [(vid, p["file"], p["engines"]) for vid, p in produced.items()]
        report, verdicts = _run_evaluation(args, manifest, variants)
        registered = 0
        changed = False
        refusals = [v.line() for v in verdicts if not v.passed]
        for vid, p in produced.items():
            mine = [v for v in verdicts if v.variant == vid]
            for v in mine:
                print(v.line())
            passed = [e for e in p["engines"] if any(v.engine == e and v.passed for v in mine)]
            if not passed:
                print(f"not registered {manifest.name} {vid}: refused on every engine")
                if any(v.id == vid for v in manifest.variants) and not args.dry_run:
                    removed = remove_variant(folder, vid)  # an earlier run's entry: this run's evidence wins
                    print(f"unregistered {manifest.name} {vid} registered by an earlier run; removed "
                          f"{', '.join(f.name for f in removed) or 'no files'}")
                    changed = True
                continue
            entry = {
                "id": vid,
                "format": p["format"],
                "engines": passed,
                "precision": "int8",
                "metrics": variant_metrics(report, vid, verdicts, passed),
                "calibration": calib.provenance,
                "quantization": {**p["quantization"], "from": f"{fp32.name} (sha256 {fp32_variant(manifest).sha256[:16]}...)"},
            }
            if args.dry_run:
                print(f"dry run: would register {manifest.name} {vid} for {', '.join(passed)}")
                registered += 1
                continue
            register_variant(folder, entry, p["file"], p["weights"])
            print(f"registered {manifest.name} {vid} ({p['file'].name}) for {', '.join(passed)} in {folder / MANIFEST}")
            registered += 1
        if (registered or changed) and not args.dry_run and not args.no_card:
            command = "edge-quantize " + " ".join(_public_args(args._argv))
            card = update_card(folder, card_section(parse_manifest(folder / MANIFEST), refusals, command))
            print(f"updated {card}")
        if args.report:
            _write_report(args.report, report, verdicts, {"calibration": calib.provenance,
                                                         "quantization": {k: p["quantization"] for k, p in produced.items()}})
        return 0 if registered else 3
    finally:
        if not args.work and not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="edge-quantize", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("model", help="model folder (with manifest.toml) or installed model name")
        p.add_argument("--data", type=Path, required=True, help="dataset root, or a folder of images / DICOM files")
        p.add_argument("--dataset", choices=DATASETS, help="known dataset: calibrate on its train split, evaluate on val")
        p.add_argument("--samples", type=int, default=300, help="calibration samples, stratified by label (300)")
        p.add_argument("--seed", type=int, default=0)

    def quant(p: argparse.ArgumentParser) -> None:
        p.add_argument("--method", choices=METHODS, default="minmax", help="ORT calibration method (minmax)")
        p.add_argument("--percentile", type=float, default=DEFAULT_PERCENTILE, help="for --method percentile")
        p.add_argument("--preset", choices=("mixed", "performance"), default="mixed", help="NNCF preset (mixed)")
        p.add_argument("--ov-range", choices=("minmax", "mean"), default="minmax",
                       help="NNCF activation ranges: global min/max (default) or NNCF's mean of per-sample min/max")

    def evaluation(p: argparse.ArgumentParser) -> None:
        p.add_argument("--engines", help="comma list of engines to evaluate on (default: onnxruntime,openvino)")
        p.add_argument("--runs", type=int, default=200, help="timed interleaved rounds (200)")
        p.add_argument("--warmup", type=int, default=20)
        p.add_argument("--paced-runs", type=int, default=60,
                       help="rounds timed with an idle gap before each call, as one-study-at-a-time use (60; 0 = off)")
        p.add_argument("--paced-gap-ms", type=float, default=30.0, help="idle gap before each paced call (30 ms)")
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--limit", type=int, default=0, help="evaluate a stratified sample of N val items (0 = all)")
        p.add_argument("--eval-data", type=Path, help="labelled folder to evaluate on instead of the val split")
        p.add_argument("--report", type=Path, help="write the full evaluation as JSON")
        p.add_argument("--max-auc-drop", type=float, default=0.005)
        p.add_argument("--max-sens-drop", type=float, default=0.01, help="sensitivity drop at the threshold (<0 = off)")
        p.add_argument("--max-hc-mad-increase", type=float, default=0.3, help="mm")
        p.add_argument("--max-dice-drop", type=float, default=0.005, help="(<0 = off)")

    p = sub.add_parser("ort", help="ONNX Runtime static QDQ quantization")
    common(p)
    quant(p)
    p.add_argument("--out", type=Path, help="output .onnx (default quantize-out/<model>-int8-qdq.onnx)")
    p.set_defaults(func=cmd_ort)

    p = sub.add_parser("openvino", help="NNCF post-training quantization to OpenVINO IR")
    common(p)
    quant(p)
    p.add_argument("--out", type=Path, help="output .xml (default quantize-out/<model>-int8-ov.xml)")
    p.set_defaults(func=cmd_openvino)

    p = sub.add_parser("evaluate", help="FP32 vs INT8 accuracy and interleaved p50 on labelled data")
    common(p)
    evaluation(p)
    p.add_argument("--variant", action="append", help="INT8 model file (.onnx or .xml); default: the manifest's int8 variants")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("all", help="quantize for both engines, evaluate, apply the guards, register what passes")
    common(p)
    quant(p)
    evaluation(p)
    p.add_argument("--work", type=Path, help="keep intermediate files here (default: a temporary folder)")
    p.add_argument("--keep-work", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="apply the guards but register nothing")
    p.add_argument("--no-card", action="store_true", help="do not rewrite the INT8 section of CARD.md")
    p.set_defaults(func=cmd_all)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args._argv = list(sys.argv[1:] if argv is None else argv)
    folder = resolve_model(args.model)
    try:
        args._manifest = parse_manifest(folder / MANIFEST)
        if args.samples <= 0:
            raise ValueError("--samples must be positive")
        return args.func(args)
    except (EdgeError, FileNotFoundError, ValueError, RuntimeError) as exc:
        _log(f"edge-quantize: {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
