"""Command line: the front door. `edge-runtime infer | models | doctor` (daemon commands join later)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings

from edge_runtime import __version__
from edge_runtime.config import Config, load_config
from edge_runtime.telemetry import LOG_LEVELS
from edge_runtime.engines import options_from_config
from edge_runtime.errors import ConfigError, EdgeError, InputError
from edge_runtime.findings import DeviceIdentity, SequenceCounter, build_finding, to_json
from edge_runtime.frames import Frame, StudyRef
from edge_runtime.imaging.deid import load_or_create_key, pseudonym
from edge_runtime.imaging.inputs import InputImage
from edge_runtime.registry import registry_from_config

PROG = "edge-runtime"


def error_line(exc: BaseException) -> None:
    """Expected failures: one line on stderr, no traceback."""
    print(f"{PROG}: {exc}", file=sys.stderr, flush=True)


# The daemon's wiring lives below cli; these names stay for the commands (and tests) that use them.
make_registry = registry_from_config
engine_options = options_from_config


def study_ref(inp: InputImage, key: bytes, frame_index: int) -> StudyRef:
    meta = inp.meta
    if meta is None:
        return StudyRef(frame_index=frame_index)
    return StudyRef(
        study_id=pseudonym(key, meta.study_uid),
        series_id=pseudonym(key, meta.series_uid),
        instance_id=pseudonym(key, meta.instance_uid),
        modality=meta.modality,
        frame_index=frame_index,
        body_part=meta.body_part,
        view_position=meta.view_position,
        photometric=meta.photometric,
    )


# ---------------------------------------------------------------- infer
def cmd_infer(args: argparse.Namespace, config: Config) -> int:
    from edge_runtime.engines import resolve_auto
    from edge_runtime.imaging.isolation import DecodePool
    from edge_runtime.pipeline import Predictor

    kind = args.engine or config.engine.kind
    kind = resolve_auto() if kind == "auto" else kind
    precision = args.precision or config.engine.precision
    decoder = DecodePool.from_config(config.imaging)  # a decoder crash or hang costs that input only
    decoder.start()  # first: the worker's imports overlap the engine's load
    failed = 0
    try:
        predictor = Predictor.load(make_registry(config), args.model, kind, precision, engine_options(config, kind))
        manifest = predictor.manifest
        key = load_or_create_key(config.state_dir / "device.key")
        seq = SequenceCounter(config.state_dir / "cli.seq")
        identity = DeviceIdentity(config.device.id, config.device.site)
        # 0 is a value to refuse (scope.check_pixel_spacing, per input), not 'absent'
        spacing = (args.pixel_spacing, args.pixel_spacing) if args.pixel_spacing is not None else None
        decoder.wait_ready()  # the worker's start-up is not the first input's latency
        for path in args.paths:
            inp = None
            try:
                t_open = time.monotonic()
                hint = predictor.decode_hint(config.imaging.reduced_decode_margin) if config.imaging.reduced_decode else None
                inp = decoder.open(path, hint)
                for index in range(inp.n_frames):
                    captured = t_open if index == 0 else time.monotonic()
                    pixels, decoded = inp.decoded(index, manifest.windowing)
                    frame = Frame(
                        pixels=pixels,
                        source_kind="file",
                        source_name=path,
                        captured_at=captured,
                        study=study_ref(inp, key, index),
                        pixel_spacing_mm=spacing if spacing is not None else inp.pixel_spacing_mm,
                        decode=decoded,
                    )
                    frame.add_timing("decode", (time.monotonic() - captured) * 1000.0)
                    # --explain: every assessed finding; otherwise the daemon's rule (urgent or needs_review)
                    prediction = predictor.predict(frame, explain=True if args.explain else None)
                    finding = build_finding(
                        identity=identity,
                        seq=seq.next(),
                        frame=frame,
                        model=predictor.ref,
                        head=prediction.head,
                        capture_to_result_ms=prediction.capture_to_result_ms,
                        budget_ms=manifest.latency_budget_ms,
                        explanation=prediction.explanation,
                    )
                    print(to_json(finding), flush=True)
            except EdgeError as exc:
                error_line(exc)
                failed += 1
            except Exception as exc:  # a bug on one input must not stop the others; still one line
                error_line(InputError(path, f"internal error {type(exc).__name__}: {exc}"))
                failed += 1
            finally:
                if inp is not None:
                    inp.close()  # the decode worker goes back to the pool
    finally:
        decoder.close()  # also after a failed model load or Ctrl-C
    return 1 if failed else 0


# ---------------------------------------------------------------- models
def cmd_models(args: argparse.Namespace, config: Config) -> int:
    if args.action != "list":  # model updates: edge_runtime/ota
        from edge_runtime.ota.commands import run

        return run(args, config, lambda kind: engine_options(config, kind))
    registry = make_registry(config)
    rows = []
    status = 0
    for name in registry.names():
        try:
            m = registry.get(name)
        except EdgeError as exc:
            error_line(exc)
            status = 1
            continue
        variants = [{"id": v.id, "precision": v.precision, "engines": list(v.engines), "format": v.format,
                     "file": v.path.name} for v in m.variants]
        rows.append({"name": m.name, "version": m.version, "task": m.task, "modality": "/".join(m.modality),
                     "budget_ms": m.latency_budget_ms, "variants": variants, "folder": str(m.folder)})
    if args.json:
        print(json.dumps(rows, indent=2))
    elif rows:
        shown = [{**r, "variants": ", ".join(f"{v['id']}[{v['precision']}:{'/'.join(v['engines'])}]"
                                             for v in r["variants"])} for r in rows]
        print_table(shown, ["name", "version", "task", "modality", "budget_ms", "variants"])
    else:
        print("no models installed", file=sys.stderr)
    return status


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    print("  ".join(c.upper().ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in columns))


# ---------------------------------------------------------------- doctor
def cmd_doctor(args: argparse.Namespace, config: Config) -> int:
    from edge_runtime.doctor import run_checks

    report = run_checks(config, make_registry(config), load_models=not args.quick)  # with --config: its sources too
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for section in report["sections"]:
            print(f"{section['title']}")
            for check in section["checks"]:
                mark = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}[check["status"]]
                print(f"  [{mark}] {check['name']}: {check['detail']}")
        print(f"\n{report['summary']}")
    return 0 if report["ok"] else 1


# ---------------------------------------------------------------- run / status
def cmd_run(args: argparse.Namespace, config: Config) -> int:
    from edge_runtime.service import Service
    from edge_runtime.telemetry import setup_logging

    if not config.source_path or not config.sources:
        where = config.source_path or "run"
        raise EdgeError(where, "the daemon needs --config FILE with at least one [[sources]] table (see README: Running the daemon)")
    from edge_runtime.check import model_problems

    problems = model_problems(config, make_registry(config))  # nothing starts half-configured
    from edge_runtime.ota.wiring import installed_source_keys

    # A version installed from a bundle that does not load is rolled back by the daemon at start (edge_runtime/ota).
    problems = [p for p in problems if p.key not in installed_source_keys(config)]
    if problems:
        raise EdgeError(problems[0].file, problems[0].line().removeprefix(f"{problems[0].file}: "))
    # A daemon logs its lifecycle at INFO by default (journald keeps it); -v still means DEBUG.
    level = args.log_level or ("debug" if args.verbose else "info")
    setup_logging(args.verbose, config.service.log_format, level=level)
    return Service(config).run_forever()


# ---------------------------------------------------------------- check
def cmd_check(args: argparse.Namespace, config: Config | None) -> int:
    """Reads the configuration itself: a file that does not load is a problem in the table, not a crash."""
    from edge_runtime.check import Problem, _from_config_error, print_problems, run_all

    if not args.config:
        raise EdgeError("check", "needs --config FILE (the configuration to check)")
    try:
        config = load_config(args.config)
    except EdgeError as exc:
        problem = (_from_config_error(exc, "-") if isinstance(exc, ConfigError)
                   else Problem(exc.subject, "-", exc.reason, "fix the file"))
        print_problems([problem], [], args.config)
        return 1
    problems, notes = run_all(config, make_registry(config))
    print_problems(problems, notes, args.config)
    return 1 if problems else 0


def status_report(url: str) -> dict:
    from edge_runtime.service import OUTBOX_COUNTERS, PACS_COUNTERS, UPLINK_COUNTERS
    from edge_runtime.telemetry import histogram_quantile, scrape

    s = scrape(url)

    def by(name: str, label: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for labels, value in s.get(name, []):
            out[labels.get(label, "")] = out.get(labels.get(label, ""), 0.0) + value
        return out

    # Every configured source has a state series, so a source that never produced a frame still shows.
    states = {labels["source"]: labels for labels, _ in s.get("edge_source_state", [])}
    since, retry = by("edge_source_state_since_seconds", "source"), by("edge_source_next_retry_seconds", "source")
    sources = sorted(set(states) | set(by("edge_frames_in_total", "source"))
                     | set(by("edge_input_errors_total", "source")))
    frames_in, dropped = by("edge_frames_in_total", "source"), by("edge_frames_dropped_total", "source")
    errors, quarantined = by("edge_input_errors_total", "source"), by("edge_quarantined_total", "source")
    buckets: dict[str, list[tuple[float, float]]] = {}
    for labels, value in s.get("edge_latency_ms_bucket", []):
        if labels.get("stage") == "capture_to_result":
            buckets.setdefault(labels["model"], []).append((float(labels["le"]), value))
    window: dict[str, dict[str, float]] = {}  # exact percentiles over the daemon's recent findings
    for labels, value in s.get("edge_latency_window_ms", []):
        window.setdefault(labels["model"], {})[labels["quantile"]] = value
    findings: dict[str, dict[str, float]] = {}
    for labels, value in s.get("edge_findings_total", []):
        findings.setdefault(labels["model"], {})[labels["priority"]] = value
    misses, late = by("edge_budget_misses_total", "model"), by("edge_frames_late_total", "model")
    switches = by("edge_variant_switches_total", "model")
    level: dict[str, float] = {}  # the most degraded source of each model
    for labels, value in s.get("edge_budget_level", []):
        level[labels.get("model", "")] = max(level.get(labels.get("model", ""), 0.0), value)
    operating: dict[str, dict] = {}  # the most degraded source's variant and rate, as the demo shows it
    for labels, _ in s.get("edge_budget_level_info", []):
        model, index = labels.get("model", ""), int(labels.get("level", "0"))
        if model not in operating or index > operating[model]["index"]:
            rate = float(labels.get("rate", "0") or 0)
            operating[model] = {"index": index, "variant": labels.get("variant", ""), "rate_hz": rate,
                                "text": f"{labels.get('variant', '')} @ {f'{rate:g}/s' if rate else 'every frame'}"}

    def percentiles(name: str) -> dict:
        if name in window:
            w = window[name]
            return {"p50_ms": w.get("0.5"), "p99_ms": w.get("0.99"), "max_ms": w.get("1"),
                    "percentiles": "exact, recent findings"}
        b = buckets.get(name, [])
        return {"p50_ms": histogram_quantile(b, 0.5), "p99_ms": histogram_quantile(b, 0.99), "max_ms": None,
                "percentiles": "histogram estimate"}

    models = {
        name: {
            **percentiles(name),
            "findings": findings.get(name, {}),
            "budget_misses": misses.get(name, 0.0),
            "late": late.get(name, 0.0),
            "switches": switches.get(name, 0.0),
            "level": level.get(name, operating.get(name, {}).get("index", 0.0)),
            "operating_point": operating.get(name, {}).get("text"),
        }
        for name in sorted(set(buckets) | set(window))
    }
    now = time.time()
    return {
        "url": url,
        "ready": bool(s.get("edge_ready", [({}, 0)])[0][1]),
        "uptime_s": now - s.get("edge_start_time_seconds", [({}, now)])[0][1],
        "link_up": bool(s.get("edge_link_up", [({}, 0)])[0][1]),
        "outbox_pending": by("edge_outbox_pending", "priority"),
        "outbox": {k: s[f"edge_outbox_{k}_total"][0][1] for k in OUTBOX_COUNTERS if f"edge_outbox_{k}_total" in s},
        "outbox_sent_unstored": s.get("edge_outbox_sent_unstored", [({}, 0)])[0][1],
        "uplink": {k: s[f"edge_uplink_{k}_total"][0][1] for k in UPLINK_COUNTERS if f"edge_uplink_{k}_total" in s},
        "sources": {n: {"kind": states.get(n, {}).get("kind", ""), "state": states.get(n, {}).get("state", "unknown"),
                        "reason": states.get(n, {}).get("reason", ""),
                        "for_s": round(now - since[n], 1) if n in since else None,
                        "retry_in_s": round(max(0.0, retry[n] - now), 1) if n in retry else None,
                        "frames_in": frames_in.get(n, 0.0), "dropped": dropped.get(n, 0.0),
                        "errors": errors.get(n, 0.0), "quarantined": quarantined.get(n, 0.0)} for n in sources},
        "models": models,
        "model_updates": {labels["model"]: {k: labels.get(k, "") for k in ("active", "previous", "installed", "result",
                                                                           "version", "reason")}
                          for labels, _ in s.get("edge_model_update_info", [])},
        "pacs": _pacs_report(s, PACS_COUNTERS),
    }


def _pacs_report(s: dict, counters: tuple[str, ...]) -> dict:
    """The PACS delivery state from the daemon's edge_pacs_* series ({} when no [pacs] is configured)."""
    if "edge_pacs_up" not in s:
        return {}
    info = s.get("edge_pacs_info", [({}, 0)])[0][0]
    value = lambda name: s.get(name, [({}, 0)])[0][1]  # noqa: E731
    return {
        "pacs": info.get("pacs", ""), "calling_ae": info.get("calling_ae", ""), "state": info.get("state", ""),
        "reason": info.get("reason", ""), "up": bool(value("edge_pacs_up")),
        "pending": int(value("edge_pacs_outbox_pending")), "stored": int(value("edge_pacs_outbox_stored")),
        "refused": int(value("edge_pacs_outbox_refused")), "oldest_pending_s": value("edge_pacs_outbox_oldest_pending_s"),
        "counters": {k: s[f"edge_pacs_{k}_total"][0][1] for k in counters if f"edge_pacs_{k}_total" in s},
        "refused_objects": [{"finding_id": labels.get("finding_id", ""), "status": int(v), "reason": labels.get("reason", "")}
                            for labels, v in s.get("edge_pacs_refused_info", [])],
        "no_report": {labels["reason"]: int(v) for labels, v in s.get("edge_pacs_skipped", []) if labels.get("reason")},
    }


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else (
        f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s")


def render_status(report: dict) -> list[str]:
    """The status table as lines (printed once, or redrawn by --watch)."""
    up = int(report["uptime_s"])
    pending = ", ".join(f"{k} {int(v)}" for k, v in sorted(report["outbox_pending"].items())) or "0"
    link = ("up" if report["link_up"] else "down") if report["uplink"] else "none (no [mqtt] broker configured)"
    not_up = [n for n, d in report["sources"].items() if d["state"] not in ("up", "unknown")]
    state = ("ready" + (f" (not up: {', '.join(not_up)})" if not_up else "")) if report["ready"] else "starting"
    lines = [f"edge-runtime {state}, up {up // 3600}h{up % 3600 // 60:02d}m{up % 60:02d}s, "
             f"link {link}, outbox pending: {pending}, delivered {int(report['outbox'].get('delivered', 0))}, "
             f"sent-not-stored {int(report.get('outbox_sent_unstored', 0))}"]
    if report["uplink"]:
        u = report["uplink"]
        lines.append(f"uplink: published {int(u.get('published', 0))}, acknowledged {int(u.get('acked', 0))}, "
                     f"resent {int(u.get('resent', 0))}, connects {int(u.get('connects', 0))}, "
                     f"failed connects {int(u.get('connect_failures', 0))}")
    lines += _pacs_lines(report.get("pacs") or {})
    rows = []
    for n, d in report["sources"].items():
        state = d["state"] + (f" {_duration(d['for_s'])}" if d["for_s"] is not None and d["state"] != "up" else "")
        why = d["reason"] + (f"; retry in {_duration(d['retry_in_s'])}" if d["retry_in_s"] is not None else "")
        rows.append({"source": n, "kind": d["kind"], "state": state, "frames_in": int(d["frames_in"]),
                     "dropped": int(d["dropped"]), "errors": int(d["errors"]), "quarantined": int(d["quarantined"]),
                     "reason": why or "-"})
    if rows:
        lines += table_lines(rows, ["source", "kind", "state", "frames_in", "dropped", "errors", "quarantined",
                                    "reason"])
    rows = []
    estimated = False
    for name, d in report["models"].items():
        f = d["findings"]
        estimated |= d["percentiles"] != "exact, recent findings"
        rows.append({"model": name, "p50_ms": f"{d['p50_ms']:.1f}" if d["p50_ms"] is not None else "-",
                     "p99_ms": f"{d['p99_ms']:.1f}" if d["p99_ms"] is not None else "-",
                     "urgent": int(f.get("urgent", 0)), "routine": int(f.get("routine", 0)),
                     "misses": int(d["budget_misses"]), "late": int(d["late"]),
                     "running": d["operating_point"] or ("studies: best variant" if not d["level"]
                                                         else int(d["level"])),
                     "switches": int(d["switches"])})
    if rows:
        lines.append("")
        lines += table_lines(rows, ["model", "p50_ms", "p99_ms", "urgent", "routine", "misses", "late", "running",
                                    "switches"])
        lines.append("p50/p99: " + ("histogram estimates (bucket interpolation)" if estimated else
                                    "exact, over each model's recent findings"))
    for name, u in report.get("model_updates", {}).items():
        lines.append(f"model {name}: active {u['active'] or '-'}, previous {u['previous'] or '-'}, installed "
                     f"{u['installed'] or '-'}; last {u['result'] or '-'} {u['version']}: {u['reason'] or '-'}")
    return lines


def _pacs_lines(p: dict) -> list[str]:
    if not p:
        return []
    state = p["state"] + (f" ({p['reason']})" if p["reason"] else "")
    lines = [f"pacs {p['pacs']} (calling AE {p['calling_ae']}): {state}, reports pending {p['pending']}, stored "
             f"{p['stored']}, refused {p['refused']}"
             + (f", oldest pending {_duration(p['oldest_pending_s'])}" if p["pending"] and p["oldest_pending_s"] else "")]
    for r in p["refused_objects"][:5]:
        status = f"0x{r['status']:04X}" if r["status"] >= 0 else "local"
        lines.append(f"  refused: finding {r['finding_id']} ({status}): {r['reason']}")
    for reason, n in sorted(p["no_report"].items()):
        lines.append(f"  no report for {n} finding(s): {reason}")
    return lines


def table_lines(rows: list[dict], columns: list[str]) -> list[str]:
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    out = ["  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip()]
    out += ["  ".join(str(r[c]).ljust(widths[c]) for c in columns).rstrip() for r in rows]
    return out


def cmd_status(args: argparse.Namespace, config: Config) -> int:
    url = args.url or f"http://{config.service.metrics_host.replace('0.0.0.0', '127.0.0.1')}:{config.service.metrics_port}/metrics"

    def read() -> dict:
        try:
            return status_report(url)
        except OSError as exc:
            raise EdgeError("status", f"no daemon answering at {url} ({getattr(exc, 'reason', exc)}); is edge-runtime running?") from None

    if not args.watch:
        report = read()
        print(json.dumps(report, indent=2) if args.json else "\n".join(render_status(report)))
        return 0
    if args.interval <= 0:
        raise EdgeError("status", f"--interval must be above 0; got {args.interval:g}")
    redraw = sys.stdout.isatty()
    while True:  # until Ctrl-C (exit 0) or the daemon goes away (one line, exit 2)
        report = read()
        text = json.dumps(report) if args.json else "\n".join(render_status(report))
        if redraw and not args.json:
            sys.stdout.write("\x1b[H\x1b[2J")  # home and clear: a live table like the demo's
        print(text if redraw or args.json else text + "\n", flush=True)
        time.sleep(args.interval)


# ---------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace, config: Config) -> int:
    import dataclasses
    import tempfile

    from edge_runtime.demo import run_demo

    # Always a throw-away state directory and device identity, even with --config (whose engine and model
    # settings are used): the demo must never drain or add to a real device's outbox.
    with tempfile.TemporaryDirectory(prefix="edge-demo-") as state:
        config = dataclasses.replace(config, device=dataclasses.replace(config.device, state_dir=state, id="demo-device", site="demo"),
                                     outbox=dataclasses.replace(config.outbox, path=""))
        return run_demo(args, config)


# ---------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Edge inference daemon for portable ultrasound and X-ray scanners.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    add_common_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("infer", help="run a model on files, print one JSON finding per frame")
    p.add_argument("--model", required=True, help="model name (see 'edge-runtime models list')")
    p.add_argument("--engine", choices=["onnxruntime", "openvino", "auto"], help="default from config: auto")
    p.add_argument("--precision", choices=["fp32", "int8"], help="variant precision (default fp32)")
    p.add_argument("--pixel-spacing", type=float, metavar="MM", help="pixel size in mm when the input has none")
    p.add_argument("--explain", action="store_true",
                   help="attach an explanation (class activation map or segmentation overlay) to every assessed finding")
    p.add_argument("paths", nargs="+", metavar="PATH", help="DICOM, PNG or JPEG files")
    p.set_defaults(func=cmd_infer)

    from edge_runtime.ota.commands import ACTIONS, add_arguments as add_models_arguments

    p = sub.add_parser("models", help="installed models; signed bundles: pack, verify, install, rollback, status",
                       description="list: the models the registry finds. pack FOLDER --key K --out B: a signed "
                                   "bundle; verify B; install B (self-test, atomic activation); rollback NAME; "
                                   "status: installed/active/previous versions; keygen --key K --out PUB; publish B "
                                   "(hub side, MQTT).")
    p.add_argument("action", nargs="?", choices=["list", *ACTIONS], default="list")
    p.add_argument("--json", action="store_true")
    add_models_arguments(p)
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("doctor", help="check engines, devices, decoders and model integrity",
                       description="Engines, devices, decoders and model integrity; with --config also opens each "
                                   "configured source briefly and reaches the broker.")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quick", action="store_true", help="skip loading each model on each engine")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("check", help="validate a configuration before a (re)start: keys, models, sources, broker, "
                                     "ports",
                       description="Validate every key and cross-reference of --config FILE: models exist, "
                                   "engines and devices available, sources openable, broker reachable and TLS "
                                   "coherent, ports free, state directory writable, disk space. One line per "
                                   "problem; exit 1 on any.")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("run", help="run the daemon (sources, models, outbox, uplink) until SIGTERM",
                       description="Run the daemon configured by --config FILE until SIGTERM/SIGINT. One daemon per "
                                   "state directory. Logs go to stderr at INFO (journald).")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("status", help="what the running daemon is doing (reads its metrics endpoint)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--url", help="metrics URL (default from config: http://127.0.0.1:9464/metrics)")
    p.add_argument("--watch", action="store_true", help="redraw the table until Ctrl-C")
    p.add_argument("--interval", type=float, default=2.0, metavar="S", help="--watch refresh period (default 2 s)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("demo", help="run both shipped models on embedded inputs (phantom, chest CR)")
    p.add_argument("--seconds", type=float, default=30.0, help="how long the daemon runs (default 30)")
    p.set_defaults(func=cmd_demo)

    from edge_hub.cli import add_parsers as add_hub_parsers  # hub side: `collect`, `hub report|export`

    add_hub_parsers(sub, common=lambda p: add_common_options(p, top=False))  # also on `hub report|export`
    from edge_runtime.pacs.commands import add_parser as add_pacs_parser  # `pacs refused|requeue`

    add_pacs_parser(sub)
    for command in sub.choices.values():  # options go before or after the subcommand: `run --config F`
        add_common_options(command, top=False)
    return parser


def add_common_options(parser: argparse.ArgumentParser, top: bool) -> None:
    """The same options on the main parser and on every subcommand. On a subcommand their default is
    SUPPRESS, so one given before the subcommand is not overwritten by the subcommand's default."""
    def default(value):
        return value if top else argparse.SUPPRESS

    parser.add_argument("--config", metavar="FILE", default=default(None), help="TOML configuration file")
    parser.add_argument("-v", "--verbose", action="count", default=default(0), help="more log output on stderr")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default=default(None),
                        help="log level (default: info for run, warning otherwise)")


def _stdout_gone() -> int:
    """`edge-runtime status | head -3`: the reader left. Point stdout at /dev/null so the interpreter's final
    flush does not raise again, and exit quietly as a Unix filter does."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 141  # 128 + SIGPIPE, what a shell reports for a filter killed by a closed pipe


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = getattr(logging, args.log_level.upper()) if args.log_level else logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.verbose == 0 and level > logging.DEBUG:
        # pydicom warns about every tolerated header oddity; the one-line error per input is what counts.
        logging.getLogger("pydicom").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", module=r"pydicom(\..*)?")
    try:
        if args.func is cmd_check:  # check reports a configuration that does not load as a problem, exit 1
            return cmd_check(args, None)
        config = load_config(args.config)
        status = args.func(args, config)
        sys.stdout.flush()  # inside the try: a closed pipe found at the final flush is handled too
        return status
    except BrokenPipeError:
        return _stdout_gone()
    except EdgeError as exc:
        error_line(exc)
        return 2
    except OSError as exc:  # a path given on the command line that cannot be read or written: one line, no traceback
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"edge-runtime {getattr(args, 'command', '') or ''}: {where}{exc.strerror or exc}".replace("  ", " "),
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0 if getattr(args, "watch", False) else 130


if __name__ == "__main__":
    sys.exit(main())
