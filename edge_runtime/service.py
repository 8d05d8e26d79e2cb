"""The daemon: wires sources -> workers (preprocess, engine, head) -> outbox -> uplink, and supervises them.

- Live sources hand frames over through a newest-wins slot; the worker skips frames already past their
  budget and the budget controller steps variants and rates. Study sources hand over files that stay in the
  inbox until their findings are committed.
- READY=1 goes to systemd once every model is loaded and warm. WATCHDOG=1 is sent only while no stage has
  been stuck on one item for longer than `service.stall_timeout_s`, so a hung inference gets us restarted.
- SIGTERM/SIGINT: sources stop, workers finish the item in hand, the uplink gets a bounded time to flush,
  the outbox closes. Nothing committed is lost; nothing half-done is marked done.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from edge_runtime.budget import BudgetController, build_levels
from edge_runtime.config import Config, SourceSection
from edge_runtime.engines import resolve_auto
from edge_runtime.errors import EdgeError, InputError
from edge_runtime.findings import DeviceIdentity, build_finding
from edge_runtime.frames import Frame, StudyRef
from edge_runtime.imaging.deid import load_or_create_key, pseudonym
from edge_runtime.pipeline import Predictor
from edge_runtime.slot import LatestSlot
from edge_runtime.telemetry import Metrics, sd_notify, watchdog_interval_s

log = logging.getLogger("edge_runtime.service")

# Counters the outbox and the uplink keep themselves, exported as edge_outbox_* / edge_uplink_* at scrape time.
OUTBOX_COUNTERS = ("delivered", "pruned", "evicted", "over_cap_alarms", "full_alarms", "requeued")
DECODE_COUNTERS = ("files", "frames", "refused", "crashes", "timeouts", "restarts")
UPLINK_COUNTERS = ("published", "acked", "resent", "rejected", "unrouted", "connects", "disconnects",
                   "connect_failures", "errors", "new_sessions", "requeued")


class StudyInterrupted(Exception):
    """The daemon is stopping in the middle of a multi-frame study: the file goes back to the inbox."""


@dataclass
class Progress:
    """What the supervisor reads: when a stage last moved, and since when it has been on its current item."""

    name: str
    beat: float = field(default_factory=time.monotonic)
    busy_since: float | None = None
    processed: int = 0

    def start_item(self) -> None:
        self.busy_since = time.monotonic()

    def end_item(self) -> None:
        self.busy_since = None
        self.processed += 1
        self.beat = time.monotonic()

    def stalled(self, timeout_s: float) -> bool:
        since = self.busy_since  # read once: the worker may end the item between two reads
        return since is not None and time.monotonic() - since > timeout_s


class ModelRunner:
    """All loaded variants of one model, fastest last, so the budget controller can switch instantly."""

    def __init__(self, service: Service, model: str) -> None:
        cfg = service.config
        registry = service.registry
        manifest = registry.get(model)
        kind = service.engine_kind
        from edge_runtime.cli import engine_options

        options = engine_options(cfg, kind)
        precisions = [cfg.engine.precision] + [p for p in ("int8",) if p != cfg.engine.precision]
        self.predictors: dict[str, Predictor] = {}
        for precision in precisions:
            try:
                manifest.variant(kind, precision)
            except EdgeError:
                continue  # no such variant: nothing to step down to
            predictor = Predictor.load(registry, model, kind, precision, options)
            self.predictors[predictor.variant.id] = predictor
        self.manifest = manifest
        self.order = list(self.predictors)  # configured precision first, faster fallbacks after

    def get(self, variant: str) -> Predictor:
        return self.predictors[variant]


class Service:
    def __init__(self, config: Config) -> None:
        from edge_runtime.cli import make_registry
        from edge_runtime.malloc import limit_arenas

        limit_arenas(config.service.malloc_arenas)  # before any engine starts its threads
        self.config = config
        self.registry = make_registry(config)
        self.engine_kind = resolve_auto() if config.engine.kind == "auto" else config.engine.kind
        self.identity = DeviceIdentity(config.device.id, config.device.site)
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self.key = load_or_create_key(config.state_dir / "device.key")
        self.metrics = Metrics()
        self.stop_event = threading.Event()
        self.runners: dict[str, ModelRunner] = {}
        self.progress: dict[str, Progress] = {}
        self.threads: list[threading.Thread] = []
        self.live_sources: list = []
        self.scps: list = []
        self.folders: dict = {}  # study inboxes by source name
        self.budgets: dict[str, BudgetController] = {}
        self.outbox = None
        self.uplink = None
        self.metrics_port: int | None = None
        self.ready = threading.Event()
        self.alarms: list[str] = []
        from edge_runtime.imaging.isolation import DecodePool

        self.decoder = DecodePool.from_config(config.imaging)  # study files are untrusted: decoded in workers

    # ------------------------------------------------------------ start-up
    def start(self) -> None:
        from edge_runtime.outbox import Outbox

        t0 = time.monotonic()
        if self.config.service.metrics_port:
            self.metrics_port = self.metrics.serve(self.config.service.metrics_host, self.config.service.metrics_port)
        self.outbox = Outbox.from_config(self.config)
        self.metrics.watch("edge_outbox", self.outbox.stats, counters=OUTBOX_COUNTERS, gauges=("rows", "bytes"))
        for src in self.config.sources:
            if src.model not in self.runners:
                self.runners[src.model] = ModelRunner(self, src.model)
        if any(s.kind in ("dicom-folder", "dicom-scp") for s in self.config.sources):
            self.decoder.start()  # the workers import their decoders on their own; readiness does not wait
            self.metrics.watch("edge_decode", self.decoder.stats, counters=DECODE_COUNTERS, gauges=("workers",))
        for src in self.config.sources:
            self._start_source(src)
        self.uplink = self._start_uplink()
        self.ready_s = time.monotonic() - t0
        self.metrics.ready.set(1)
        self.ready.set()
        sd_notify(f"READY=1\nSTATUS=ready in {self.ready_s:.1f}s: {len(self.config.sources)} source(s)")
        log.warning("ready in %.2f s: %s", self.ready_s,
                    ", ".join(f"{s.name} ({s.kind}) -> {s.model}" for s in self.config.sources) or "no sources")

    def _start_uplink(self):
        from edge_runtime.uplink import Uplink

        uplink = Uplink.from_config(self.outbox, self.config, self.identity)
        if uplink is not None:
            self.metrics.watch("edge_uplink", uplink.stats, counters=UPLINK_COUNTERS, gauges=("inflight", "window"))
            uplink.start()
        return uplink

    def _start_source(self, src: SourceSection) -> None:
        runner = self.runners[src.model]
        progress = self.progress[src.name] = Progress(src.name)
        if src.kind in ("dicom-folder", "dicom-scp"):
            from edge_runtime.sources.dicom_folder import DicomFolderSource

            inbox = Path(src.inbox)
            folder = DicomFolderSource(src.name, inbox, inbox.parent / f"{inbox.name}-done", inbox.parent / f"{inbox.name}-quarantine")
            self.folders[src.name] = folder
            if src.kind == "dicom-scp":
                from edge_runtime.sources.dicom_scp import DicomScp

                scp = DicomScp(src.name, inbox, src.ae_title, src.host, src.port, src.allowed_callers)
                scp.start()
                self.scps.append(scp)
            target, args = self._study_worker, (src, folder, runner, progress)
        else:
            slot: LatestSlot[Frame] = LatestSlot()
            source = self._make_live_source(src, slot)
            budget_ms = src.budget_ms or runner.manifest.latency_budget_ms
            self.budgets[src.name] = BudgetController(budget_ms, build_levels(runner.order, source.fps), name=src.name)
            source.start()
            self.live_sources.append(source)
            target, args = self._live_worker, (src, source, slot, runner, progress)
        thread = threading.Thread(target=self._guard, args=(target, args, progress), name=f"worker-{src.name}", daemon=True)
        thread.start()
        self.threads.append(thread)

    def _make_live_source(self, src: SourceSection, slot: LatestSlot):
        if src.kind == "phantom":
            from edge_runtime.sources.phantom import PhantomSource

            return PhantomSource(src.name, slot, fps=src.fps or 30.0)
        if src.kind == "cine":
            from edge_runtime.sources.cine import CineSource

            return CineSource(src.name, slot, src.path, self.key, fps=src.fps, loop=src.loop,
                              max_pixel_bytes=self.config.imaging.max_pixel_bytes)
        from edge_runtime.sources.video import VideoSource

        return VideoSource(src.name, slot, src.device, fps=src.fps, pixel_spacing_mm=src.pixel_spacing_mm, loop=src.loop)

    # ------------------------------------------------------------ workers
    def _guard(self, target, args, progress: Progress) -> None:
        """A bug in one worker must not take the daemon down silently: log, mark stalled, let the watchdog act."""
        try:
            target(*args)
        except Exception:
            log.exception("worker %s crashed", progress.name)
            progress.busy_since = 0.0  # reads as stalled: the watchdog stops, systemd restarts us

    def _commit(self, finding: dict, source_item: str | None) -> int | None:
        return self.outbox.commit(finding, source_item=source_item)

    def _live_worker(self, src: SourceSection, source, slot: LatestSlot, runner: ModelRunner, progress: Progress) -> None:
        from edge_runtime.outbox import OutboxError, OutboxFull

        budget = self.budgets[src.name]
        m = self.metrics
        model = runner.manifest.name
        dropped_seen = 0
        while not self.stop_event.is_set():
            frame = slot.get(0.2)
            progress.beat = time.monotonic()
            if slot.dropped > dropped_seen:
                m.frames_dropped.labels(src.name).inc(slot.dropped - dropped_seen)
                dropped_seen = slot.dropped
            if frame is None:
                continue
            m.frames_in.labels(src.name).inc()
            late_before, rate_before = budget.late, budget.rate_skipped
            if not budget.admit((time.monotonic() - frame.captured_at) * 1000.0):
                m.frames_late.labels(model, src.name).inc(budget.late - late_before)
                m.frames_rate_skipped.labels(model, src.name).inc(budget.rate_skipped - rate_before)
                continue
            predictor = runner.get(budget.level.variant)
            progress.start_item()
            try:
                prediction = predictor.predict(frame)
                finding = self._finding(frame, predictor, prediction, budget.budget_ms)
                self._commit(finding, None)
            except OutboxError as exc:
                if isinstance(exc, OutboxFull):
                    m.outbox_full.inc()
                self._alarm(f"outbox: {exc.reason}; a {model} finding from {src.name} was not stored")
                continue
            except EdgeError as exc:
                m.input_errors.labels(src.name).inc()
                log.warning("%s: %s", src.name, exc)
                continue
            finally:
                progress.end_item()
            self._record(model, frame, prediction.capture_to_result_ms, budget.budget_ms, finding["priority"])
            switch = budget.observe(prediction.capture_to_result_ms)
            p95 = budget.p95()
            if p95 is not None:  # none right after a switch: keep the last value rather than show 0
                m.latency_p95.labels(model, src.name).set(p95)
            if switch is not None:
                m.variant_switches.labels(model, src.name, "down" if switch.to_level > switch.from_level else "up").inc()
                m.budget_level.labels(model, src.name).set(switch.to_level)

    def _study_worker(self, src: SourceSection, folder, runner: ModelRunner, progress: Progress) -> None:
        m = self.metrics
        predictor = runner.get(runner.order[0])  # studies are not live: always the best variant
        budget_ms = src.budget_ms or runner.manifest.latency_budget_ms
        while not self.stop_event.is_set():
            m.inbox_depth.labels(src.name).set(folder.depth())
            item = folder.next_item()
            progress.beat = time.monotonic()
            if item is None:
                self.stop_event.wait(0.25)
                continue
            m.frames_in.labels(src.name).inc()
            progress.start_item()
            try:
                self._handle_study(src, item, predictor, budget_ms, progress)
            finally:
                progress.end_item()

    def _handle_study(self, src: SourceSection, item, predictor: Predictor, budget_ms: float, progress: Progress) -> None:
        """Process one study file and end it: done, quarantined, or released for a retry. Never raises: one bad
        file must not stop the inbox (a file that keeps failing is quarantined by the folder's attempt count)."""
        from edge_runtime.outbox import OutboxError, OutboxFull

        m = self.metrics
        try:
            self._process_study(src, item, predictor, budget_ms, progress)
            item.done()
        except InputError as exc:
            m.input_errors.labels(src.name).inc()
            m.quarantined.labels(src.name).inc()
            log.warning("%s: quarantined %s: %s", src.name, item.path.name, exc.reason)
            self._end(item.quarantine, exc.reason)
        except StudyInterrupted:
            log.info("%s: stopping; %s stays in the inbox (committed frames are not repeated)", src.name, item.path.name)
            self._end(item.release)
        except OutboxError as exc:
            if isinstance(exc, OutboxFull):
                m.outbox_full.inc()
            self._alarm(f"outbox: {exc.reason}; {item.path.name} stays in the inbox and is retried")
            self._end(item.release)
        except Exception as exc:  # an engine fault, a bug, an I/O error moving the file
            m.worker_errors.labels(src.name).inc()
            log.exception("%s: %s failed; it stays in the inbox and is retried", src.name, item.path.name)
            self._end(item.release, f"{type(exc).__name__}: {exc}")

    def _end(self, action, *args) -> None:
        try:
            action(*args)
        except OSError as exc:  # e.g. the quarantine folder is not writable: the file stays, nothing is lost
            self._alarm(f"cannot move a study file: {exc}")

    def _process_study(self, src: SourceSection, item, predictor: Predictor, budget_ms: float, progress: Progress) -> None:
        t_open = time.monotonic()
        with self.decoder.open(item.path) as inp:  # a decoder crash or hang costs this file only: InputError
            self._study_frames(src, item, inp, predictor, budget_ms, progress, t_open)

    def _study_frames(self, src: SourceSection, item, inp, predictor: Predictor, budget_ms: float, progress: Progress,
                      t_open: float) -> None:
        manifest = predictor.manifest
        if inp.modality and manifest.modality and inp.modality not in manifest.modality:
            raise InputError(str(item.path), f"modality {inp.modality} is not one this model reads ({', '.join(manifest.modality)})")
        inp.start_digest()
        first = inp.frame(0, manifest.windowing)  # decoded while the file is hashed; wasted only on a duplicate
        # The content digest is part of the item: a different image that reuses a SOP Instance UID gets its own
        # findings instead of vanishing as "already committed"; a byte-identical copy maps onto the same items.
        if inp.meta is not None and inp.meta.instance_uid:
            base = f"{pseudonym(self.key, inp.meta.instance_uid)}:{inp.sha256[:16]}"
        else:
            base = "sha256:" + inp.sha256
        items = [f"{base}#{index}" for index in range(inp.n_frames)]
        committed = [self.outbox.has_source_item(s) for s in items]
        if all(committed):
            log.info("%s: %s is byte-identical to an instance already processed (%d finding(s) committed); no new "
                     "finding", src.name, item.path.name, len(items))
            return
        for index in range(inp.n_frames):
            if self.stop_event.is_set():
                raise StudyInterrupted()
            progress.start_item()  # a long multi-frame study is progress frame by frame, not one stuck item
            if committed[index]:
                continue  # committed before a crash: never a second finding
            captured = t_open if index == 0 else time.monotonic()
            meta = inp.meta
            study = StudyRef(
                pseudonym(self.key, meta.study_uid) if meta else "",
                pseudonym(self.key, meta.series_uid) if meta else "",
                pseudonym(self.key, meta.instance_uid) if meta else "",
                inp.modality, index)
            try:
                pixels = first if index == 0 else inp.frame(index, manifest.windowing)
            except InputError as exc:
                if index:  # every frame before this one is committed by now
                    raise InputError(exc.subject, f"{exc.reason} (after {index} of {inp.n_frames} frames were "
                                                  "committed; their findings stand)") from None
                raise
            frame = Frame(pixels, src.kind, item.path.name, captured_at=captured,
                          study=study, pixel_spacing_mm=inp.pixel_spacing_mm)
            frame.add_timing("decode", (time.monotonic() - captured) * 1000.0)
            prediction = predictor.predict(frame)
            finding = self._finding(frame, predictor, prediction, budget_ms)
            self._commit(finding, items[index])
            self._record(manifest.name, frame, prediction.capture_to_result_ms, budget_ms, finding["priority"])

    def _finding(self, frame: Frame, predictor: Predictor, prediction, budget_ms: float) -> dict:
        return build_finding(identity=self.identity, seq=0, frame=frame, model=predictor.ref, head=prediction.head,
                             capture_to_result_ms=prediction.capture_to_result_ms, budget_ms=budget_ms)

    def _record(self, model: str, frame: Frame, total_ms: float, budget_ms: float, priority: str) -> None:
        m = self.metrics
        for stage, ms in frame.timings_ms.items():
            m.latency.labels(model, stage).observe(ms)
        m.latency.labels(model, "capture_to_result").observe(total_ms)
        if total_ms > budget_ms:
            m.budget_misses.labels(model).inc()
        m.findings.labels(model, priority).inc()

    def _alarm(self, text: str) -> None:
        if not self.alarms or self.alarms[-1] != text:
            log.error("ALARM: %s", text)
        self.alarms.append(text)
        del self.alarms[:-100]

    # ------------------------------------------------------------ supervision
    def supervise_once(self) -> list[str]:
        """Names of stalled stages; pings the watchdog only when there are none."""
        timeout = self.config.service.stall_timeout_s
        stalled = [p.name for p in self.progress.values() if p.stalled(timeout)]
        now = time.monotonic()
        for source in self.live_sources:  # a capture thread blocked inside a driver call
            since = source.reading_since
            if since is not None and now - since > timeout:
                stalled.append(f"{source.name}/capture")
        if self.uplink is not None and not self.uplink.alive():
            stalled.append("uplink")
        stages = list(self.progress) + [f"{s.name}/capture" for s in self.live_sources]
        stages += ["uplink"] if self.uplink is not None else []
        for name in stages:
            self.metrics.stalled.labels(name).set(1 if name in stalled else 0)
        if not stalled:
            sd_notify("WATCHDOG=1")
        else:
            log.error("stalled: %s; withholding the watchdog ping", ", ".join(stalled))
        self._update_gauges()
        return stalled

    def _update_gauges(self) -> None:
        if self.outbox is not None:
            for priority, count in self.outbox.pending_by_priority().items():
                self.metrics.outbox_depth.labels(priority).set(count)
        if self.uplink is not None:
            self.metrics.link_up.set(1 if self.uplink.connected else 0)

    def run_forever(self) -> int:
        """Start, supervise until SIGTERM/SIGINT, stop cleanly. Returns the exit status."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop_event.set())
        try:
            self.start()
        except EdgeError:
            self.stop()
            raise
        except OSError as exc:  # e.g. the SCP or metrics port is taken
            self.stop()
            raise EdgeError("service", f"cannot start: {exc}") from None
        interval = min(watchdog_interval_s() or 2.0, 2.0)
        while not self.stop_event.wait(interval):
            try:
                self.supervise_once()
            except Exception:  # supervision must outlive its own bugs; a missed ping is what systemd acts on
                log.exception("supervision failed")
        return self.stop()

    def stop(self) -> int:
        sd_notify("STOPPING=1")
        self.stop_event.set()
        deadline = time.monotonic() + self.config.service.stop_timeout_s
        for scp in self.scps:
            scp.stop()
        for source in self.live_sources:
            source.stop(timeout=max(0.1, deadline - time.monotonic()))
        for thread in self.threads:
            thread.join(timeout=max(0.1, deadline - time.monotonic()))
        status = 0
        busy = [t.name for t in self.threads if t.is_alive()]
        if busy:
            log.error("%s did not finish within %.0f s", ", ".join(busy), self.config.service.stop_timeout_s)
            status = 1
        if self.uplink is not None:
            self.uplink.stop(timeout=max(0.5, deadline - time.monotonic()))
        if self.outbox is not None and not busy:
            self.outbox.close()  # with a worker still inside a commit, leave it: SQLite rolls back what was not committed
        if not busy:
            self.decoder.close()  # a worker thread still decoding would read the closed pool as a crashed decoder
        self.metrics.shutdown()
        return status
