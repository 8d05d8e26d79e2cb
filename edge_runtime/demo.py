"""`edge-runtime demo`: the daemon itself on an embedded default, for about 30 seconds.

- `probe`: the fetal head phantom at 30 fps into `fetal-head` (live: newest frame wins, latency budget), sweeping:
  a head for 5 s, the probe lifted for 3 s, another head of another known size. Each sweep is an exam and gives
  one finding (edge_runtime/exams.py); the per-frame results stay on the device (the live view reads them).
- `xray`: a real chest CR (RG1_J2KR.dcm, JPEG 2000, from the pydicom-data package of the `demo` extra) dropped
  into a temporary inbox for `cxr-pneumonia` (a study: never dropped, moved to done/ once committed).
- The device starts offline: findings queue in the outbox. Part-way through, a private Mosquitto starts on a
  free loopback port (when the binary exists) with a collector subscribed, and the backlog drains.
A live view shows fps, latency p50/p99 against the budget, drops, late frames, findings, the outbox and the
link; the summary checks that every finding the collector should have is there.
"""
from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from edge_runtime.config import Config, MqttSection, SourceSection

DEMO_DICOM = "RG1_J2KR.dcm"


def find_demo_dicom() -> Path | None:
    """The CR chest from pydicom-data (demo extra), else the shared data beside a checkout."""
    try:
        from pydicom.data import get_testdata_file

        path = get_testdata_file(DEMO_DICOM, download=False)  # never fetch data at run time
        if path:
            return Path(path)
    except (ImportError, ValueError, OSError):
        pass
    shared = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "dicom" / "pydicom-data" / DEMO_DICOM
    return shared if shared.is_file() else None


def demo_config(config: Config, inbox: Path | None, broker_url: str) -> Config:
    """The embedded default: the user's device and engine settings, the demo's sources, outbox and link."""
    sources = [SourceSection(name="probe", kind="phantom", model="fetal-head", fps=30.0, sweeps=True)]
    if inbox is not None:
        sources.append(SourceSection(name="xray", kind="dicom-folder", model="cxr-pneumonia", inbox=str(inbox)))
    mqtt = MqttSection(broker=broker_url, reconnect_min_s=0.5, reconnect_max_s=2.0, connect_timeout_s=2.0,
                       telemetry_interval_s=0.0) if broker_url else MqttSection()
    # The view on a free loopback port unless the user's file chose one: the demo prints its address.
    view = config.view if config.source_path else dataclasses.replace(config.view, port=0)
    return dataclasses.replace(config, sources=sources, mqtt=mqtt, view=view,
                               service=dataclasses.replace(config.service, metrics_port=0))


class Window:
    """Findings read back from the outbox as they are committed (the demo sees exactly what would be sent), and
    the live source's per-frame results from the daemon's in-memory ring (they are not in the outbox)."""

    def __init__(self) -> None:
        self.next_seq = 1
        self.latency: dict[str, list[float]] = {}
        self.budget: dict[str, float] = {}
        self.exams: list[dict] = []
        self.frames = 0
        self.frames_with_head = 0
        self.last_frame = -1
        self.cxr: list[dict] = []
        self.ids: set[str] = set()

    def read(self, outbox) -> list[dict]:
        end = outbox.stats()["next_seq"]
        new = [f for f in (outbox.payload(s) for s in range(self.next_seq, end)) if f is not None]
        self.next_seq = end
        for f in new:
            name = f["model"]["name"]
            self.ids.add(f["finding_id"])
            if name == "fetal-head" and "exam" in f:
                self.exams.append(f)
            elif name == "cxr-pneumonia":
                self.latency.setdefault(name, []).append(f["latency_ms"]["capture_to_result"])
                self.cxr.append(f)
        return new

    def read_frames(self, service, source: str = "probe") -> None:
        """The frames processed since the last call, from the ring a live view reads."""
        for r in service.recent_frames(source):
            if r.frame_index > self.last_frame:
                self.last_frame = r.frame_index
                self.frames += 1
                self.frames_with_head += r.head_circumference_mm is not None
                self.latency.setdefault("fetal-head", []).append(r.latency_ms)
        budget = service.budgets.get(source)
        if budget is not None:
            self.budget["fetal-head"] = budget.budget_ms

    def percentile(self, model: str, q: float, last: int = 0) -> float | None:
        values = self.latency.get(model, [])[-last:] if last else self.latency.get(model, [])
        return float(np.percentile(values, q)) if values else None


def ms(value: float | None) -> str:
    return "   -  " if value is None else f"{value:6.1f}"


class View:
    """One line per second when piped; on a terminal, a block redrawn in place."""

    def __init__(self, out) -> None:
        self.out = out
        self.tty = out.isatty()
        self.drawn = 0

    def show(self, lines: list[str]) -> None:
        if self.tty:
            if self.drawn:
                self.out.write(f"\x1b[{self.drawn}F")
            self.out.write("".join(f"\x1b[2K{line}\n" for line in lines))
            self.drawn = len(lines)
        else:
            self.out.write("  ".join(line.strip() for line in lines) + "\n")
        self.out.flush()

    def note(self, text: str) -> None:
        self.drawn = 0
        self.out.write(text + "\n")
        self.out.flush()


def run_demo(args, config: Config) -> int:
    from edge_runtime.collector import Collector
    from edge_runtime.local_broker import LocalBroker, find_mosquitto
    from edge_runtime.service import Service

    out = sys.stdout
    seconds = float(args.seconds)
    state = config.state_dir
    dicom = find_demo_dicom()
    inbox = None
    if dicom is not None:
        inbox = state / "inbox"
        inbox.mkdir(parents=True, exist_ok=True)
        shutil.copy(dicom, inbox / dicom.name)
    mosquitto = find_mosquitto()
    broker = LocalBroker(state / "broker", binary=mosquitto) if mosquitto else None
    cfg = demo_config(config, inbox, broker.url if broker else "")
    offline_s = min(12.0, seconds * 0.4)

    print(f"edge-runtime demo: the daemon for {seconds:.0f} s on this machine (state in {state})", file=out)
    service = Service(cfg)
    service.start()
    for name, runner in service.runners.items():
        best = runner.get(runner.order[0]).ref
        print(f"  {name} v{best.version}: variants {', '.join(runner.order)} on {best.engine}/{best.device} "
              f"({best.compute_precision}), budget {runner.manifest.latency_budget_ms:.0f} ms", file=out)
    print(f"  ready in {service.ready_s:.2f} s (every variant loaded and warm)", file=out)
    if service.view is not None:
        print(f"  view: {service.view.url}?token={service.view.token}  (open it in a browser on this machine while "
              "the demo runs: live picture, findings, feedback)", file=out)
    else:
        print(f"  view: not started ({'; '.join(a for a in service.alarms if a.startswith('view:')) or 'disabled'})",
              file=out)
    if dicom is None:
        print("  xray: skipped, RG1_J2KR.dcm not found (install the demo extra: pip install 'edge-runtime[demo]')", file=out)
    if broker is None:
        print("  uplink: mosquitto not installed, findings stay queued in the outbox (apt install mosquitto)", file=out)
    else:
        print(f"  uplink: offline for the first {offline_s:.0f} s; then a local Mosquitto on {broker.url} and a collector",
              file=out)
    print(file=out)

    view = View(out)
    window = Window()
    collector = None
    m = service.metrics
    t0 = time.monotonic()
    last_frames, last_t = 0, t0
    fps = 0.0
    try:
        while True:
            elapsed = time.monotonic() - t0
            if elapsed >= seconds:
                break
            if broker is not None and collector is None and elapsed >= offline_s:
                broker.start()
                collector = Collector(broker.url, state / "hub.sqlite", client_id="edge-demo-hub",
                                      reconnect_max_s=2.0).start()
                collector.subscribed.wait(5)
                view.note(f"  -- t={elapsed:4.1f}s: Mosquitto started on {broker.url}, collector subscribed; "
                          "the backlog drains --")
            service.stop_event.wait(1.0)
            service.supervise_once()
            window.read_frames(service)
            for f in window.read(service.outbox):
                if "exam" in f:
                    view.note(f"  exam {len(window.exams)}: {exam_line(f, service)}")
                elif f["model"]["name"] == "cxr-pneumonia":
                    r = f["result"]
                    view.note(f"  xray {f['source']['name']}: {r['label']} p(pneumonia)={r['probabilities']['pneumonia']:.3f} "
                              f"(threshold {r['threshold']:.3f}), priority {f['priority']}, "
                              f"{f['latency_ms']['capture_to_result']:.0f} ms incl. decode")
            now = time.monotonic()
            fps = (window.frames - last_frames) / max(1e-6, now - last_t)
            last_frames, last_t = window.frames, now
            view.show(status_lines(service, window, m, now - t0, fps, collector))
    finally:
        status = service.stop()
        window.read_frames(service)
        states = stored_states(service.outbox.path)
        reread(window, service.outbox.path)  # what the stop committed: the exam in progress
        if collector is not None:
            delivered = sum(1 for st in states.values() if st == "delivered")
            deadline = time.monotonic() + 5.0  # acknowledged by the broker: let the hub store them too
            while collector.stats()["stored"] < delivered and time.monotonic() < deadline:
                time.sleep(0.1)
            collector.stop()
        if broker is not None:
            broker.stop()

    # Summary.
    budget = window.budget.get("fetal-head", 0.0)
    p50, p99 = window.percentile("fetal-head", 50), window.percentile("fetal-head", 99)
    value = lambda name, **labels: m.registry.get_sample_value(name, labels) or 0.0  # noqa: E731
    print("\nSummary", file=out)
    print(f"  ready in {service.ready_s:.2f} s; stopped cleanly: {'yes' if status == 0 else 'no'}", file=out)
    print(f"  fetal-head: {window.frames} frames processed ({window.frames_with_head} with a head), kept on the device; "
          f"capture->result p50 {ms(p50).strip()} ms, p99 {ms(p99).strip()} ms "
          f"against a {budget:.0f} ms budget; {int(value('edge_budget_misses_total', model='fetal-head'))} misses, "
          f"{int(value('edge_frames_dropped_total', source='probe'))} frames overwritten, "
          f"{int(value('edge_frames_late_total', model='fetal-head', source='probe'))} late skipped, "
          f"{int(value('edge_variant_switches_total', model='fetal-head', source='probe', direction='down'))} step(s) down",
          file=out)
    errors = exam_errors(window.exams, service)
    worst = f"; worst |error| {max(abs(e) for e in errors):.1f} mm" if errors else ""
    print(f"  exams: {len(window.exams)} found (one finding each, {len(errors)} measured){worst}", file=out)
    for i, f in enumerate(window.exams, 1):
        print(f"    exam {i}: {exam_line(f, service)}", file=out)
    for f in window.cxr:
        r = f["result"]
        print(f"  cxr-pneumonia: {r['label']} (p(pneumonia)={r['probabilities']['pneumonia']:.3f}), priority {f['priority']}",
              file=out)
    if collector is not None:
        received = hub_ids(state / "hub.sqlite")
        committed = set(states)  # the outbox, read after the stop: includes findings committed while stopping
        # A finding the collector has but whose PUBACK had not arrived stays pending: resent later, same finding_id.
        queued = {fid for fid, st in states.items() if st == "pending"} - received
        lost = committed - received - queued
        print(f"  uplink: {len(committed)} findings committed; {len(received & committed)} reached the collector, "
              f"{len(queued)} still queued at stop (kept in the outbox for the next link), {len(lost)} lost", file=out)
        exams, thumbs, studies = hub_bytes(state / "hub.sqlite")
        print(f"  over MQTT: {(exams - thumbs) / 1024:.1f} KB of exam findings without their key-frame thumbnails "
              f"({(exams - thumbs) / 1024 / (seconds / 60):.1f} KB per minute of scanning), {thumbs / 1024:.1f} KB of "
              f"thumbnails (one per exam), {studies / 1024:.1f} KB of study findings (the chest CR; with its "
              "explanation overlay when it is urgent or needs review)", file=out)
        if lost:
            status = 1
    else:
        pending = sum(1 for st in states.values() if st == "pending")
        print(f"  uplink: no broker; {pending} of {len(states)} findings queued in the outbox for when a link exists",
              file=out)
    feedback = feedback_states(service.outbox.path)
    if feedback:
        print(f"  feedback from the view: {len(feedback)} ({feedback.count('stored')} confirmed stored by the hub)",
              file=out)
    print("  Not for diagnostic use: a demonstration on a phantom and a public test image.", file=out)
    return status


def exam_truth(f: dict, service) -> float | None:
    """The phantom's true circumference on the exam's key frame (None: no key frame, or not the phantom)."""
    key = f.get("exam", {}).get("key_frame")
    source = next((s for s in service.live_sources if s.name == f["source"]["name"]), None)
    if key is None or source is None or not hasattr(source, "truth_at"):
        return None
    return source.truth_at(key["frame_index"])[1]


def exam_errors(exams: list[dict], service) -> list[float]:
    errors = []
    for f in exams:
        hc, truth = f["result"].get("measurements", {}).get("head_circumference_mm"), exam_truth(f, service)
        if hc is not None and truth is not None:
            errors.append(hc - truth)
    return errors


def exam_line(f: dict, service) -> str:
    e, r = f["exam"], f["result"]
    head = f"{e['duration_s']:.1f} s, {e['frames_used']} of {e['frames_seen']} frames used, ended: " \
           f"{e['end_reason'].replace('_', ' ')}"
    if not r.get("assessed"):
        return f"{head}; not assessed: {r.get('reason')}"
    m = r["measurements"]
    truth = exam_truth(f, service)
    against = f" vs the phantom's {truth:.1f} mm ({m['head_circumference_mm'] - truth:+.1f} mm)" if truth else ""
    thumb = e.get("key_frame", {}).get("thumbnail")
    return (f"{head}; HC {m['head_circumference_mm']:.1f} mm{against}, IQR {m['head_circumference_iqr_mm']:.1f} mm, "
            f"quality {r['quality']:.2f}" + (f", key frame #{e['key_frame']['frame_index']}" if "key_frame" in e else "")
            + (f" ({thumb['bytes'] / 1024:.1f} KB JPEG)" if thumb else ""))


def status_lines(service, window: Window, m, elapsed: float, fps: float, collector) -> list[str]:
    value = lambda name, **labels: m.registry.get_sample_value(name, labels) or 0.0  # noqa: E731
    budget = service.budgets.get("probe")
    level = budget.level.describe() if budget else "-"
    p50, p99 = window.percentile("fetal-head", 50, last=300), window.percentile("fetal-head", 99, last=300)
    pending = service.outbox.pending_by_priority()
    link = "up" if service.uplink is not None and service.uplink.connected else "down"
    hub = f", hub {collector.stats()['stored']}" if collector is not None else ""
    return [
        f"t={elapsed:4.0f}s  fetal-head {fps:4.1f} fps  p50 {ms(p50)} p99 {ms(p99)} ms / budget "
        f"{window.budget.get('fetal-head', 0):.0f}  dropped {int(value('edge_frames_dropped_total', source='probe'))}  "
        f"late {int(value('edge_frames_late_total', model='fetal-head', source='probe'))}  "
        f"misses {int(value('edge_budget_misses_total', model='fetal-head'))}  [{level}]",
        f"        findings {len(window.ids)} (exams {len(window.exams)}, cxr {len(window.cxr)})  outbox pending {pending.get('urgent', 0)} urgent / "
        f"{pending.get('routine', 0)} routine  delivered {int(value('edge_outbox_delivered_total'))}  link {link}{hub}",
    ]


def reread(window: Window, outbox_path: Path) -> None:
    from edge_runtime.outbox import Outbox

    with Outbox(outbox_path) as outbox:
        window.read(outbox)


def stored_states(outbox_path: Path) -> dict[str, str]:
    from edge_runtime.outbox import Outbox

    with Outbox(outbox_path) as outbox:
        return outbox.finding_ids()


def feedback_states(outbox_path: Path) -> list[str]:
    from edge_runtime.outbox import Outbox

    with Outbox(outbox_path) as outbox:
        return [state for _, state in outbox.feedback(10_000)]


def hub_bytes(path: Path) -> tuple[int, int, int]:
    """Payload bytes the collector stored: (exam findings, the key-frame thumbnails inside them, other findings)."""
    import json
    import sqlite3

    if not path.exists():
        return 0, 0, 0
    conn = sqlite3.connect(path)
    try:
        exams = thumbs = others = 0
        for (payload,) in conn.execute("SELECT payload FROM findings"):
            size = len(payload.encode("utf-8"))
            exam = json.loads(payload).get("exam")
            if exam is None:
                others += size
                continue
            exams += size
            thumb = exam.get("key_frame", {}).get("thumbnail")
            thumbs += len(json.dumps(thumb, separators=(",", ":"))) if thumb else 0
        return exams, thumbs, others
    finally:
        conn.close()


def hub_ids(path: Path) -> set[str]:
    import sqlite3

    if not path.exists():
        return set()
    conn = sqlite3.connect(path)
    try:
        return {fid for (fid,) in conn.execute("SELECT finding_id FROM findings")}
    finally:
        conn.close()
