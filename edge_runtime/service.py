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

import dataclasses
import errno
import logging
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from edge_runtime import __version__
from edge_runtime.budget import BudgetController, Decision, Switch, build_levels
from edge_runtime.config import Config, SourceSection
from edge_runtime.engines import resolve_auto
from edge_runtime.errors import EdgeError, InputError
from edge_runtime.findings import DeviceIdentity, build_finding
from edge_runtime.frames import Frame, StudyRef
from edge_runtime.imaging.deid import load_or_create_key, pseudonym
from edge_runtime.pipeline import Predictor
from edge_runtime.slot import LatestSlot
from edge_runtime.sources.base import SourceState
from edge_runtime.statelock import StateLock
from edge_runtime.telemetry import Metrics, sd_notify, watchdog_interval_s
from edge_runtime.view.pictures import Picture, Pictures

log = logging.getLogger("edge_runtime.service")

# Counters the outbox and the uplink keep themselves, exported as edge_outbox_* / edge_uplink_* at scrape time.
OUTBOX_COUNTERS = ("delivered", "pruned", "evicted", "over_cap_alarms", "full_alarms", "requeued",
                   "stored", "receipt_requeued")
DECODE_COUNTERS = ("files", "frames", "refused", "crashes", "timeouts", "restarts")
UPLINK_COUNTERS = ("published", "acked", "resent", "rejected", "unrouted", "connects", "disconnects",
                   "connect_failures", "errors", "new_sessions", "requeued",
                   "receipts", "stored", "receipt_unknown", "receipt_foreign", "receipt_malformed", "receipt_resent",
                   "half_open", "net_events")
PACS_COUNTERS = ("sent", "stored", "duplicates", "warnings", "refused", "transient", "associations", "rejected",
                 "connect_failures", "aborted", "build_errors")
PACS_GAUGES = ("up", "outbox_pending", "outbox_stored", "outbox_refused", "outbox_oldest_pending_s")
LATENCY_WINDOW = 1000  # findings per model behind the exact percentiles `status` shows
WINDOW_QUANTILES = (0.5, 0.95, 0.99, 1.0)
FIRST_OPEN_WAIT_S = 5.0  # readiness waits this long for live sources' first open, to report what is up


def _utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def describe_state(state: SourceState) -> str:
    """'down (cannot open: ...; retry in 4 s)' for a log line or sd_notify STATUS."""
    detail = [state.reason] if state.reason else []
    if state.next_retry is not None:
        detail.append(f"retry in {max(0.0, state.next_retry - time.time()):.0f} s")
    return state.state + (f" ({'; '.join(detail)})" if detail else "")


def study_summary(finding: dict) -> str:
    """What one processed study gave, for its log line: the label and probability, or the measurements."""
    result = finding.get("result", {})
    if "label" in result:
        p = result.get("probabilities", {}).get(result["label"])
        text = result["label"] + (f" p={p:.2f}" if isinstance(p, (int, float)) else "")
    elif result.get("measurements"):
        text = ", ".join(f"{k} {v}" for k, v in result["measurements"].items())
    else:
        text = result.get("note") or result.get("reason") or "no result"
    return f"{text}, {finding.get('priority', '?')}"


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
        from edge_runtime.engines import options_from_config as engine_options

        options = engine_options(cfg, kind)
        precisions = manifest.precisions_to_load(kind, cfg.engine.precision)
        if precisions and cfg.engine.precision not in precisions:
            # e.g. int8 configured, but this model's INT8 variant is not shipped for this engine (refused by the
            # speed guard there): run its FP32 rather than not at all, and say so
            log.warning("%s: no %s variant for %s; running its fp32 variant", model, cfg.engine.precision, kind)
        self.predictors: dict[str, Predictor] = {}
        for precision in precisions:
            predictor = Predictor.load(registry, model, kind, precision, options)
            self.predictors[predictor.variant.id] = predictor
        if not self.predictors:  # no variant for this engine at all: the registry's one-line reason
            manifest.variant(kind, cfg.engine.precision)
        self.manifest = manifest
        self.order = list(self.predictors)  # configured precision first, faster fallbacks after

    def get(self, variant: str) -> Predictor:
        return self.predictors[variant]


class Service:
    def __init__(self, config: Config) -> None:
        from edge_runtime.registry import registry_from_config as make_registry
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
        self.results_modes: dict[str, str] = {}  # live source -> exam | frame | both
        self.exams: dict = {}  # live source -> ExamTracker (exam and both modes)
        self.live_results: dict = {}  # live source -> LiveResults (ring, per-minute summary)
        self._unstored_exams: dict[str, list[dict]] = {}
        self.outbox = None
        self.uplink = None
        self.pacs = None  # edge_runtime.pacs.delivery.PacsDelivery when [pacs] has a host
        self.view = None  # edge_runtime.view.server.ViewServer when [view] enabled and listening
        self.pictures = Pictures()  # each source's newest picture, for the view (offered only while it runs)
        self.metrics_port: int | None = None
        self.ready = threading.Event()
        self.alarms: list[str] = []
        self.lock = StateLock(config.state_dir)
        self.stop_reason = "stop requested"
        self.windows: dict[str, deque[float]] = {}  # model -> recent capture-to-result ms (exact percentiles)
        self._source_alarms: set[str] = set()
        self._status_line = ""  # the source states last sent as sd_notify STATUS
        from edge_runtime.engines import options_from_config as engine_options
        from edge_runtime.ota.wiring import agent_from_config

        # Model updates (edge_runtime/ota): bundles from MQTT or `models install`, switched to between items.
        self.ota = agent_from_config(config, self.identity, lambda kind: engine_options(config, kind))
        self.ota.switch = self.switch_model
        self._link_synced: dict[str, str] = {}  # model -> the linked version a switch was last asked for
        self._export_states()

        from edge_runtime.imaging.isolation import DecodePool

        # Study files are untrusted: decoded in workers, at least one per study source, so that a source never
        # waits (busy, as the watchdog sees it) for a worker another source's long study holds.
        studies = sum(s.kind in ("dicom-folder", "dicom-scp") for s in config.sources)
        imaging = dataclasses.replace(config.imaging, decode_workers=max(config.imaging.decode_workers, studies))
        self.decoder = DecodePool.from_config(imaging)

    # ------------------------------------------------------------ start-up
    def start(self) -> None:
        from edge_runtime.outbox import Outbox

        self.lock.acquire()  # first: a second daemon on this state directory must open nothing
        t0 = time.monotonic()
        log.info("starting edge-runtime %s: config %s, state directory %s, %d source(s)", __version__,
                 self.config.source_path or "(defaults)", self.config.state_dir, len(self.config.sources))
        if self.config.service.metrics_port:
            self.metrics_port = self._serve_metrics()
        self.outbox = Outbox.from_config(self.config)
        self.metrics.watch("edge_outbox", self.outbox.stats, counters=OUTBOX_COUNTERS,
                           gauges=("rows", "bytes", "sent_unstored"))
        recovered = self.ota.installer.recover()  # an install a crash interrupted: finished or discarded
        for outcome in recovered:
            log.warning("models: after the restart: %s", outcome.line())
        for src in self.config.sources:
            if src.model not in self.runners:
                self.runners[src.model] = self._load_runner(src.model)
        for outcome in recovered:  # a version activated just now is on probation as after a live switch
            if outcome.result == "activated" and outcome.name in self.runners \
                    and self.runners[outcome.name].manifest.version == outcome.version:
                self.ota.start_probation(outcome.name, outcome.version)
        for model, runner in self.runners.items():  # a restart inside a new version's health window
            if self.ota.health.watching(model) is None:
                self.ota.resume_probation(model, runner.manifest.version)
        if any(s.kind in ("dicom-folder", "dicom-scp") for s in self.config.sources):
            self.decoder.start()  # the workers import their decoders on their own; readiness does not wait
            self.metrics.watch("edge_decode", self.decoder.stats, counters=DECODE_COUNTERS, gauges=("workers",))
        self.pacs = self._start_pacs()  # before the sources: a study in the inbox at start is owed a report too
        for src in self.config.sources:
            self._start_source(src)
        self.uplink = self._start_uplink()
        self.ota.start()
        self.ota.report_event({"result": "started", "step": "start", "reason": "daemon started"})
        deadline = time.monotonic() + FIRST_OPEN_WAIT_S
        for source in self.live_sources:  # "ready" must say whether the probe is really there
            source.first_attempt.wait(max(0.0, deadline - time.monotonic()))
        self.ready_s = time.monotonic() - t0
        self.metrics.ready.set(1)
        self.ready.set()
        text, degraded = self._sources_line()
        self._status_line = self._states_shape()
        sd_notify(f"READY=1\nSTATUS=ready in {self.ready_s:.1f}s; {text}")
        log.log(logging.WARNING if degraded else logging.INFO, "ready in %.2f s; %s", self.ready_s, text)
        self.view = self._start_view()  # after READY: the page (and aiohttp's import) never delays reading scans

    def _load_runner(self, model: str) -> ModelRunner:
        """The model's runner; an installed version that does not load is rolled back and the previous one used."""
        try:
            return ModelRunner(self, model)
        except EdgeError as exc:
            if self.ota.store.linked_version(model) is None:
                raise
            reason = f"version {self.ota.store.linked_version(model)} failed to load at start-up: {exc.reason}"
            try:
                self.ota.installer.rollback(model, reason)
            except EdgeError as no_way_back:
                raise EdgeError(model, f"{reason}; no rollback: {no_way_back.reason}") from None
            self.registry.forget(model)
            return ModelRunner(self, model)

    def switch_model(self, model: str) -> str | None:
        """Load the model's active version beside the running one and swap it in; workers pick it up at their
        next item (a study in progress finishes on the version it started with). None, or why it failed."""
        if model not in self.runners:
            return None  # no source uses it: the next start loads it
        self.registry.forget(model)
        try:
            runner = ModelRunner(self, model)
        except EdgeError as exc:
            self.registry.forget(model)
            return exc.reason
        old = self.runners[model]
        for src in self.config.sources:
            budget = self.budgets.get(src.name)
            budget_ms = src.budget_ms or runner.manifest.latency_budget_ms
            if src.model == model and budget is not None and (runner.order != old.order
                                                              or budget_ms != budget.budget_ms):
                # other variants or another budget: a fresh controller over them (live sources only have budgets)
                fps = next((s.fps for s in self.live_sources if s.name == src.name), 0.0)
                self.budgets[src.name] = BudgetController(budget_ms, build_levels(runner.order, fps), name=src.name)
        self.runners[model] = runner
        log.info("models: %s switched from %s to %s without a restart", model, old.manifest.version,
                 runner.manifest.version, extra={"model": model})
        return None

    def _check_model_links(self) -> None:
        """A version installed or rolled back by hand (CLI) while we run: switch to what the link names now."""
        if not self.ota.idle():
            return  # an install of the agent's own switches when it is done
        for model, runner in list(self.runners.items()):
            linked = self.ota.store.linked_version(model)
            if linked is None:
                base = self.ota.baseline(model)
                linked = base[0] if base else None
            if linked is not None and linked != runner.manifest.version and self._link_synced.get(model) != linked:
                self._link_synced[model] = linked  # asked once per change; a failed load rolls the link back
                self.ota.request_sync(model, linked)

    def _check_model_health(self) -> None:
        trips, passed = self.ota.health.check()
        for model, version, why in trips:
            log.error("models: %s %s: %s; rolling back", model, version, why)
            self.ota.request_rollback(model, f"{version}: {why}")
        for model, version in passed:
            self.ota.request_confirm(model, version, f"healthy through its first "
                                                    f"{self.config.models.health_window_s:.0f} s")

    def _serve_metrics(self) -> int:
        host, port = self.config.service.metrics_host, self.config.service.metrics_port
        try:
            return self.metrics.serve(host, port)
        except OSError as exc:  # name the port: "Address already in use" alone does not say which one
            why = "already in use (a second daemon?)" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise EdgeError(self.config.source_path or "service", f"key 'service.metrics_port': cannot listen on "
                                                                  f"{host}:{port} for metrics: {why}; free the port "
                                                                  "or set another service.metrics_port") from None

    # ------------------------------------------------------------ source states
    def source_states(self) -> dict[str, SourceState]:
        """Every configured source, started or not: a source that never produced a frame still shows."""
        states = {src.name: SourceState("starting") for src in self.config.sources}
        for source in list(self.live_sources):
            states[source.name] = source.state
        for name, folder in list(self.folders.items()):
            states[name] = folder.check_state()
        for scp in list(self.scps):
            if not scp.state.up:  # an SCP that is not listening is down whatever its inbox says
                states[scp.name] = scp.state
        return states

    def _sources_line(self) -> tuple[str, bool]:
        """'up: a (video) -> m; down: b (cannot open ...)' and whether anything is not up."""
        states = self.source_states()
        up = [f"{s.name} ({s.kind}) -> {s.model}" for s in self.config.sources if states[s.name].up]
        down = [f"{s.name} {describe_state(states[s.name])}" for s in self.config.sources if not states[s.name].up]
        text = f"up: {', '.join(up) or 'none'}" + (f"; not up: {'; '.join(down)}" if down else "")
        return text, bool(down)

    def _states_shape(self) -> str:
        """Which source is in which state and why, without the retry countdown: changes only on a transition."""
        return repr(sorted((n, st.state, st.reason) for n, st in self.source_states().items()))

    def current_alarms(self) -> list[dict]:
        """Sources down longer than service.source_down_alarm_s; the uplink puts these in its telemetry."""
        limit = self.config.service.source_down_alarm_s
        now = time.time()
        alarms = [{"kind": "source_down", "source": name, "since": _utc(state.since), "down_s": round(now - state.since),
                   "reason": state.reason}
                  for name, state in self.source_states().items()
                  if limit > 0 and state.state == "down" and now - state.since >= limit]
        if self.pacs is not None and self.pacs.active_alarm:  # e.g. the PACS rejects our AE title
            alarms.append({"kind": "pacs", "pacs": self.pacs.where, "reason": self.pacs.active_alarm})
        return alarms

    def _check_source_alarms(self) -> None:
        alarms = {a["source"]: a for a in self.current_alarms() if a["kind"] == "source_down"}
        for name, alarm in alarms.items():
            if name not in self._source_alarms:
                log.error("ALARM: source %s down for %d s: %s", name, alarm["down_s"], alarm["reason"],
                          extra={"source": name, "reason": alarm["reason"]})
        for name in self._source_alarms - alarms.keys():
            log.warning("source %s: alarm cleared", name, extra={"source": name})
        self._source_alarms = set(alarms)
        shape = self._states_shape()
        if shape != self._status_line:  # systemctl status shows what is up now, not only at start
            self._status_line = shape
            sd_notify(f"STATUS={self._sources_line()[0]}")

    def _export_states(self) -> None:
        m = self.metrics
        kinds = {src.name: src.kind for src in self.config.sources}
        m.watch_labeled("edge_source_up", "1 while a source delivers (live: feed open; study: inbox usable)",
                        ["source"], lambda: [((n,), 1.0 if s.up else 0.0) for n, s in self.source_states().items()])
        m.watch_labeled("edge_source_state", "Each source's state and why (value 1)",
                        ["source", "kind", "state", "reason"],
                        lambda: [((n, kinds.get(n, ""), s.state, s.reason), 1.0)
                                 for n, s in self.source_states().items()])
        m.watch_labeled("edge_source_state_since_seconds", "Unix time each source entered its state", ["source"],
                        lambda: [((n,), s.since) for n, s in self.source_states().items() if s.since])
        m.watch_labeled("edge_source_next_retry_seconds", "Unix time a down source is next tried", ["source"],
                        lambda: [((n,), s.next_retry) for n, s in self.source_states().items()
                                 if s.state == "down" and s.next_retry is not None])
        m.watch_labeled("edge_model_update_info", "Model versions installed from bundles: active, previous and the "
                        "last install result with its reason (value 1)",
                        ["model", "active", "previous", "installed", "result", "version", "reason"],
                        self._model_update_info)
        m.watch_labeled("edge_latency_window_ms", f"Exact capture-to-result percentiles over the last {LATENCY_WINDOW} "
                        "findings per model (not bucket estimates)", ["model", "quantile"], self._window_quantiles)
        m.watch_labeled("edge_budget_level_info", "The operating point each live source runs at (value 1); rate 0 = "
                        "every frame", ["model", "source", "level", "variant", "rate"], self._level_info)

    def _model_update_info(self) -> list[tuple[tuple[str, ...], float]]:
        out = []
        for name, d in self.ota.status()["models"].items():
            last = d.get("last") or {}
            out.append(((name, str(d["active"] or ""), str(d["previous"] or ""), ",".join(d["installed"]),
                         str(last.get("result", "")), str(last.get("version") or ""), str(last.get("reason", ""))),
                        1.0))
        return out

    def _window_quantiles(self) -> list[tuple[tuple[str, str], float]]:
        out = []
        for model, window in list(self.windows.items()):
            values = np.fromiter(list(window), float)
            if values.size:
                for q, v in zip(WINDOW_QUANTILES, np.quantile(values, WINDOW_QUANTILES)):
                    out.append(((model, f"{q:g}"), float(v)))
        return out

    def _level_info(self) -> list[tuple[tuple[str, ...], float]]:
        models = {src.name: src.model for src in self.config.sources}
        return [((models.get(name, ""), name, str(b.index), b.level.variant, f"{b.level.max_rate_hz:g}"), 1.0)
                for name, b in list(self.budgets.items())]

    def _start_uplink(self):
        from edge_runtime.uplink import Uplink

        uplink = Uplink.from_config(self.outbox, self.config, self.identity)
        if uplink is not None:
            uplink.alarms = self.current_alarms  # telemetry carries the active alarms (sources down too long)
            uplink.live = self.live_summaries  # ... and each live stream's last minute, never per-frame rows
            for topic in (self.ota.topic_device, self.ota.topic_site):  # model bundles from the hub
                uplink.subscribe(topic, self.ota.on_bundle_message)
            self.ota.publish = uplink.post
            self.metrics.watch("edge_uplink", uplink.stats, counters=UPLINK_COUNTERS, gauges=("inflight", "window"))
            uplink.start()
        return uplink

    def _start_view(self):
        """The local web page (edge_runtime/view). A view that cannot listen is an alarm, not a reason to stop
        reading scans: the daemon runs on without it."""
        if not self.config.view.enabled:
            return None
        from edge_runtime.view.server import ViewServer

        view = ViewServer(self, self.config.view, self.config.state_dir, self.pictures,
                          where=self.config.source_path or "configuration")
        try:
            view.start()
        except Exception as exc:  # noqa: BLE001 - whatever stops the page must not stop the daemon
            reason = exc.reason if isinstance(exc, EdgeError) else f"{type(exc).__name__}: {exc}"
            self._alarm(f"view: {reason}; the daemon runs without its local page")
            view.stop()
            return None
        self.metrics.watch("edge_view", lambda: dict(view.counters), counters=tuple(view.counters))
        return view

    def _start_pacs(self):
        """The PACS worker, when [pacs] names a host: reports for study findings, by C-STORE from the outbox."""
        if not self.config.pacs.host:
            return None
        from edge_runtime.pacs.delivery import PacsDelivery

        pacs = PacsDelivery(self.outbox, self.config.pacs, self.config.state_dir / "pacs-spool", alarm=self._alarm)
        self.metrics.watch("edge_pacs", pacs.stats, counters=PACS_COUNTERS, gauges=PACS_GAUGES)
        m = self.metrics
        m.watch_labeled("edge_pacs_info", "The PACS destination and its delivery state (value 1)",
                        ["pacs", "calling_ae", "state", "reason"],
                        lambda: [((pacs.where, self.config.pacs.calling_ae, pacs.state,
                                   pacs.active_alarm or pacs.last_error), 1.0)])
        m.watch_labeled("edge_pacs_refused_info", "The most recent reports the PACS refused (value: DICOM status)",
                        ["finding_id", "reason"],
                        lambda: [((r["finding_id"], r["reason"]), float(r["status"] if r["status"] is not None else -1))
                                 for r in pacs.refused()])
        m.watch_labeled("edge_pacs_skipped", "Study findings that got no PACS report, by reason", ["reason"],
                        lambda: [((reason,), float(n)) for reason, n in pacs.not_owed().items()])
        pacs.start()
        return pacs

    def _pacs_deliveries(self, src: SourceSection, name: str, inp, index: int, manifest) -> dict | None:
        """What the PACS destination needs of this study finding ({'pacs': source reference}), or None: no PACS,
        or an input that cannot have a report (a PNG has no DICOM identifiers), counted by reason for `status`."""
        if not self.config.pacs.host:
            return None
        from edge_runtime.pacs import DESTINATION, no_report_reason, source_reference
        from edge_runtime.pacs.reference import MULTI_FRAME

        reason = no_report_reason(inp.meta, inp.n_frames, index)
        if reason is not None:  # kept with the finding (durable, shown in status), not only logged
            if index == 0 and reason != MULTI_FRAME:  # the whole file gets none: say it once
                log.info("%s: %s gets no PACS report: %s", src.name, name, reason,
                         extra={"source": src.name, "input": name, "reason": reason})
            return {DESTINATION: reason}
        positive = manifest.decision.positive_label if manifest.decision else ""
        return {DESTINATION: source_reference(inp.meta, frame_index=index, n_frames=inp.n_frames,
                                              positive_label=positive)}

    def _exam_deliveries(self, src: SourceSection, finding: dict) -> dict | None:
        """The PACS destination of an exam finding: a DICOM cine's exam is reported against the cine's real UIDs
        and its key frame; a feed without DICOM identifiers (a phantom, a video device) gets the reason."""
        if not self.config.pacs.host:
            return None
        from edge_runtime.pacs import DESTINATION, no_report_reason, source_reference

        image = next((getattr(s, "image", None) for s in self.live_sources if s.name == src.name), None)
        meta = getattr(image, "meta", None)
        reason = no_report_reason(meta)  # one report per exam, so the cine's frame count is no objection
        if reason is not None:
            return {DESTINATION: reason}
        return {DESTINATION: source_reference(meta, frame_index=int(finding["study"].get("frame_index") or 0),
                                              n_frames=image.n_frames)}

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
            self._start_exams(src, runner)
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

    def _start_exams(self, src: SourceSection, runner: ModelRunner) -> None:
        from edge_runtime.exams import ExamSettings, ExamTracker, resolve_results
        from edge_runtime.live_results import LiveResults

        mode = resolve_results(src, runner.manifest.task, self.config.source_path or "configuration")
        self.results_modes[src.name] = mode
        self.live_results[src.name] = LiveResults()
        if mode != "frame":
            self.exams[src.name] = ExamTracker(src.name, runner.manifest.task, ExamSettings.for_source(src))
        log.info("%s: results per %s", src.name, {"exam": "exam (per-frame results stay on the device)",
                                                    "frame": "frame", "both": "exam and per frame"}[mode])

    def _make_live_source(self, src: SourceSection, slot: LatestSlot):
        if src.kind == "phantom":
            from edge_runtime.sources.phantom import PhantomSource, SweepSchedule

            return PhantomSource(src.name, slot, fps=src.fps or 30.0, sweeps=SweepSchedule() if src.sweeps else None)
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

    def _commit(self, finding: dict, source_item: str | None, deliveries: dict | None = None) -> int | None:
        if deliveries:  # owed to other destinations too (the PACS), in the same transaction
            return self.outbox.commit(finding, source_item=source_item, deliveries=deliveries)
        return self.outbox.commit(finding, source_item=source_item)

    def _commit_frame(self, src: SourceSection, frame: Frame, predictor: Predictor, prediction, budget_ms: float) -> bool:
        """A per-frame finding (results = "frame" or "both"); an outbox that refuses it raises the alarm."""
        from edge_runtime.outbox import OutboxError, OutboxFull

        try:
            self._commit(self._finding(frame, predictor, prediction, budget_ms), None)
            return True
        except OutboxError as exc:
            if isinstance(exc, OutboxFull):
                self.metrics.outbox_full.inc()
            self._alarm(f"outbox: {exc.reason}; a {predictor.manifest.name} finding from {src.name} was not stored")
            return False

    def _keep_local(self, src: SourceSection, live, tracker, frame: Frame, predictor: Predictor, prediction,
                    budget_ms: float) -> None:
        """What stays on the device of a live frame: the ring and minute summary, and the open exam."""
        from edge_runtime.live_results import FrameResult

        result = prediction.head.result
        closed = tracker.observe(frame, predictor.ref, prediction.head, prediction.capture_to_result_ms, budget_ms) \
            if tracker is not None else []
        self._commit_exams(src, closed, budget_ms)
        ms = prediction.capture_to_result_ms
        record = FrameResult(
            frame.study.frame_index, time.time() - (time.monotonic() - frame.captured_at), predictor.variant.id, ms,
            ms <= budget_ms, bool(result.get("assessed", True)), bool(result.get("detected", False)),
            result.get("measurements", {}).get("head_circumference_mm"), result.get("ellipse"),
            tracker.exam.exam_id if tracker is not None and tracker.exam is not None else None,
            result.get("quality"))
        live.add(record)
        if self.view is not None:  # a reference, no copy: the view draws its overlay on its own thread
            self.pictures.offer(src.name, Picture(frame.pixels, record.captured_at, record.frame_index, result=record))

    def _commit_exams(self, src: SourceSection, closed: list, budget_ms: float) -> None:
        """Commit closed exams' findings, and any an outbox refused before (kept in memory and retried: an exam is
        one finding for minutes of scanning, it is not dropped for a full disk that may clear)."""
        from edge_runtime.exams import describe, exam_finding
        from edge_runtime.outbox import OutboxError, OutboxFull

        waiting = self._unstored_exams.setdefault(src.name, [])
        for summary in closed:
            log.info("%s: %s", src.name, describe(summary), extra={"source": src.name})
            self.metrics.exams.labels(src.name, "true" if summary.assessed else "false").inc()
            self.live_results[src.name].exam_closed()
            try:
                waiting.append(exam_finding(summary, self.identity, budget_ms))
            except Exception:  # a thumbnail that cannot be made must not cost the exam its finding
                log.exception("%s: the key-frame thumbnail of exam %s failed; committed without it", src.name,
                              summary.exam_id)
                waiting.append(exam_finding(summary, self.identity, budget_ms, thumbnail=False))
        while waiting:
            try:
                self._commit(waiting[0], f"exam:{waiting[0]['exam']['exam_id']}", self._exam_deliveries(src, waiting[0]))
            except OutboxError as exc:
                if isinstance(exc, OutboxFull):
                    self.metrics.outbox_full.inc()
                self._alarm(f"outbox: {exc.reason}; {len(waiting)} exam finding(s) from {src.name} wait in memory "
                            "and are retried")
                del waiting[:-100]  # bounded: a disk that never clears must not grow this without end
                return
            self.metrics.findings.labels(waiting[0]["model"]["name"], waiting[0]["priority"]).inc()
            waiting.pop(0)

    def recent_frames(self, source: str, n: int | None = None) -> list:
        """The newest per-frame results of a live source (edge_runtime.live_results.FrameResult), oldest first:
        what a live view draws. Empty for an unknown or study source."""
        live = self.live_results.get(source)
        return live.recent(n) if live is not None else []

    def live_summaries(self) -> dict[str, dict]:
        """Each live source's last complete minute (frames, latency p50/p99, misses, exams), for telemetry."""
        out = {}
        for name, live in list(self.live_results.items()):
            minute = live.last_minute()
            if minute is not None:
                out[name] = {"results": self.results_modes.get(name, "frame"), **minute}
        return out

    def _live_worker(self, src: SourceSection, source, slot: LatestSlot, runner: ModelRunner, progress: Progress) -> None:
        budget = self.budgets[src.name]
        model = runner.manifest.name
        mode = self.results_modes[src.name]
        tracker = self.exams.get(src.name)
        live = self.live_results[src.name]
        try:
            self._live_loop(src, slot, runner, progress, budget, model, mode, tracker, live)
        finally:  # a clean stop (or a crash of this loop) commits the exam so far: flushed, never lost
            if tracker is not None:
                self._commit_exams(src, tracker.flush("stop"), budget.budget_ms)

    def _live_loop(self, src: SourceSection, slot: LatestSlot, runner: ModelRunner, progress: Progress,
                   budget: BudgetController, model: str, mode: str, tracker, live) -> None:
        m = self.metrics
        dropped_seen = 0
        while not self.stop_event.is_set():
            previous, runner, budget = runner, self.runners[src.model], self.budgets[src.name]  # updates switch here
            if runner is not previous and tracker is not None:  # an exam is measured by one model version
                self._commit_exams(src, tracker.flush("model_switch"), budget.budget_ms)
            frame = slot.get(0.2)
            progress.beat = time.monotonic()
            if slot.dropped > dropped_seen:
                m.frames_dropped.labels(src.name).inc(slot.dropped - dropped_seen)
                dropped_seen = slot.dropped
            if frame is None:
                if tracker is not None:
                    self._commit_exams(src, tracker.tick(), budget.budget_ms)
                continue
            m.frames_in.labels(src.name).inc()
            late_before, rate_before, probe_before = budget.late, budget.rate_skipped, budget.probe_skipped
            age_ms = (time.monotonic() - frame.captured_at) * 1000.0
            decision = budget.decide(age_ms, frame.captured_at)
            if decision is Decision.SKIP:
                m.frames_late.labels(model, src.name).inc(budget.late - late_before)
                m.frames_rate_skipped.labels(model, src.name).inc(budget.rate_skipped - rate_before)
                m.frames_probe_skipped.labels(model, src.name).inc(budget.probe_skipped - probe_before)
                continue
            if decision is Decision.PROBE:  # a frame the rate cap skips anyway: measure the level above on it
                self._probe(src, budget, runner, frame, progress, wait_ms=age_ms)
                continue
            if budget.level.variant not in runner.predictors:
                continue  # the runner was switched to a new version a moment before its budget levels
            predictor = runner.get(budget.level.variant)
            progress.start_item()
            started = time.monotonic()
            try:
                # exam mode: a frame's explanation would never leave the device; the exam's key frame gets one
                prediction = predictor.predict(frame, explain=False if mode == "exam" else None)
                service_ms = (time.monotonic() - started) * 1000.0
                committed = mode != "exam" and self._commit_frame(src, frame, predictor, prediction, budget.budget_ms)
            except EdgeError as exc:  # counted and skipped; an open exam goes on
                m.input_errors.labels(src.name).inc()
                log.warning("%s: %s", src.name, exc)
                if tracker is not None:
                    tracker.failed(frame)
                live.failed()
                continue
            except Exception as exc:
                if self.ota.health.watching(model) != predictor.manifest.version:
                    raise  # a bug: the worker guard logs it and the watchdog acts
                # A version on probation: its faults count toward rolling it back instead of ending the worker.
                m.worker_errors.labels(src.name).inc()
                self.ota.health.error(model, predictor.manifest.version, f"{type(exc).__name__}: {exc}")
                log.exception("%s: %s %s failed on a frame", src.name, model, predictor.manifest.version)
                continue
            finally:
                progress.end_item()
            self._observe_health(predictor, prediction)
            self._record(model, frame, prediction.capture_to_result_ms, budget.budget_ms, prediction.head.priority,
                         counted=committed)
            self._keep_local(src, live, tracker, frame, predictor, prediction, budget.budget_ms)
            self._count_switch(model, src.name, budget, budget.observe(prediction.capture_to_result_ms, service_ms))
            # The finding is committed; with nothing newer waiting, the idle time measures the level above.
            if not slot.pending and not self.stop_event.is_set() and budget.shadow_probe_level() is not None:
                self._probe(src, budget, runner, replace(frame, timings_ms={}), progress)

    def _probe(self, src: SourceSection, budget: BudgetController, runner: ModelRunner, frame: Frame,
               progress: Progress, wait_ms: float | None = None) -> None:
        """Run the level above's variant on `frame` under the load of now, time it, discard its result."""
        above = budget.levels[budget.index - 1]
        model = runner.manifest.name
        progress.start_item()
        started = time.monotonic()
        try:
            runner.get(above.variant).predict(frame, explain=False)  # timed and discarded: nothing to explain
            service_ms = (time.monotonic() - started) * 1000.0
        except EdgeError as exc:  # the level above cannot read what this one reads: it must not be stepped up to
            log.warning("%s: a budget probe of %s failed: %s", src.name, above.describe(), exc)
            service_ms = float("inf")
        finally:
            progress.end_item()
        rounds_before = dict(budget.round_counts)
        switch = budget.observe_probe(service_ms, wait_ms)
        self.metrics.budget_probes.labels(model, src.name).inc()
        for result, count in budget.round_counts.items():
            if count > rounds_before[result]:
                self.metrics.budget_probe_rounds.labels(model, src.name, result).inc(count - rounds_before[result])
        self._count_switch(model, src.name, budget, switch)

    def _count_switch(self, model: str, source: str, budget: BudgetController, switch: Switch | None) -> None:
        m = self.metrics
        p95 = budget.p95()
        if p95 is not None:  # none right after a switch: keep the last value rather than show 0
            m.latency_p95.labels(model, source).set(p95)
        if switch is not None:
            m.variant_switches.labels(model, source, "down" if switch.to_level > switch.from_level else "up").inc()
            m.budget_level.labels(model, source).set(switch.to_level)

    def _study_worker(self, src: SourceSection, folder, runner: ModelRunner, progress: Progress) -> None:
        m = self.metrics
        while not self.stop_event.is_set():
            runner = self.runners[src.model]  # per item: a model update switches between studies
            predictor = runner.get(runner.order[0])  # studies are not live: always the best variant
            budget_ms = src.budget_ms or runner.manifest.latency_budget_ms
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
            last, frames, ms = self._process_study(src, item, predictor, budget_ms, progress)
            item.done()
            if last is not None:  # None: every frame was committed before (a restart, a byte-identical copy)
                log.info("%s: %s -> %s: %s, %.0f ms%s", src.name, item.path.name, predictor.manifest.name,
                         study_summary(last), ms, f" ({frames} frames, last shown)" if frames > 1 else "",
                         extra={"source": src.name, "model": predictor.manifest.name, "input": item.path.name})
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
            if not isinstance(exc, OSError):  # moving the file is not the model's fault: no count toward a rollback
                self.ota.health.error(predictor.manifest.name, predictor.manifest.version, f"{type(exc).__name__}: {exc}")
            log.exception("%s: %s failed; it stays in the inbox and is retried", src.name, item.path.name)
            self._end(item.release, f"{type(exc).__name__}: {exc}")

    def _end(self, action, *args) -> None:
        try:
            action(*args)
        except OSError as exc:  # e.g. the quarantine folder is not writable: the file stays, nothing is lost
            self._alarm(f"cannot move a study file: {exc}")

    def _process_study(self, src: SourceSection, item, predictor: Predictor, budget_ms: float,
                       progress: Progress) -> tuple[dict | None, int, float]:
        """Commit a finding per frame; returns the last finding (None if all were committed before), the
        number of frames and the milliseconds the file took, for its log line."""
        t_open = time.monotonic()
        imaging = self.config.imaging  # decoded no larger than the model needs (imaging.resolution)
        hint = predictor.decode_hint(imaging.reduced_decode_margin) if imaging.reduced_decode else None
        with self.decoder.open(item.path, hint) as inp:  # a decoder crash or hang costs this file only: InputError
            finding = self._study_frames(src, item, inp, predictor, budget_ms, progress, t_open)
            return finding, inp.n_frames, (time.monotonic() - t_open) * 1000.0

    def _study_frames(self, src: SourceSection, item, inp, predictor: Predictor, budget_ms: float, progress: Progress,
                      t_open: float) -> dict | None:
        """The file's frames, each committed once; the last finding made (None when all were committed before)."""
        manifest = predictor.manifest
        finding = None
        inp.start_digest()
        first = inp.decoded(0, manifest.windowing)  # decoded while the file is hashed; wasted only on a duplicate
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
            return None
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
                inp.modality, index, body_part=meta.body_part if meta else "",
                view_position=meta.view_position if meta else "", photometric=meta.photometric if meta else "")
            try:
                pixels, decoded = first if index == 0 else inp.decoded(index, manifest.windowing)
            except InputError as exc:
                if index:  # every frame before this one is committed by now
                    raise InputError(exc.subject, f"{exc.reason} (after {index} of {inp.n_frames} frames were "
                                                  "committed; their findings stand)") from None
                raise
            frame = Frame(pixels, src.kind, item.path.name, captured_at=captured,
                          study=study, pixel_spacing_mm=inp.pixel_spacing_mm, decode=decoded)
            frame.add_timing("decode", (time.monotonic() - captured) * 1000.0)
            if manifest.task == "segmentation" and inp.n_frames == 1:
                # A single-frame ultrasound study is its own key frame: its measurement carries the mask overlay
                prediction = predictor.predict(frame, explain=True)
            else:
                prediction = predictor.predict(frame)
            self._observe_health(predictor, prediction)
            finding = self._finding(frame, predictor, prediction, budget_ms)
            self._commit(finding, items[index], self._pacs_deliveries(src, item.path.name, inp, index, manifest))
            self._record(manifest.name, frame, prediction.capture_to_result_ms, budget_ms, finding["priority"])
            if self.view is not None:
                self.pictures.offer(src.name, Picture(pixels, time.time(), index, finding=finding))
        return finding

    def _observe_health(self, predictor: Predictor, prediction) -> None:
        """Every frame and study a version reads counts toward its health rule, whether or not it becomes a
        finding of its own (in exam mode frames do not)."""
        self.ota.health.observe(predictor.manifest.name, predictor.manifest.version,
                                prediction.head.result.get("assessed", True) is not False)

    def _finding(self, frame: Frame, predictor: Predictor, prediction, budget_ms: float) -> dict:
        return build_finding(identity=self.identity, seq=0, frame=frame, model=predictor.ref, head=prediction.head,
                             capture_to_result_ms=prediction.capture_to_result_ms, budget_ms=budget_ms,
                             explanation=prediction.explanation)

    def _record(self, model: str, frame: Frame, total_ms: float, budget_ms: float, priority: str,
                counted: bool = True) -> None:
        m = self.metrics
        for stage, ms in frame.timings_ms.items():
            m.latency.labels(model, stage).observe(ms)
        m.latency.labels(model, "capture_to_result").observe(total_ms)
        window = self.windows.get(model)
        if window is None:  # not setdefault: that would build a deque for every finding
            window = self.windows[model] = deque(maxlen=LATENCY_WINDOW)
        window.append(total_ms)
        if total_ms > budget_ms:
            m.budget_misses.labels(model).inc()
        if counted:  # a frame whose finding was committed (exam mode counts the exam's finding instead)
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
        if self.pacs is not None and not self.pacs.alive():
            stalled.append("pacs")
        stages = list(self.progress) + [f"{s.name}/capture" for s in self.live_sources]
        stages += ["uplink"] if self.uplink is not None else []
        stages += ["pacs"] if self.pacs is not None else []
        for name in stages:
            self.metrics.stalled.labels(name).set(1 if name in stalled else 0)
        if not stalled:
            sd_notify("WATCHDOG=1")
        else:
            log.error("stalled: %s; withholding the watchdog ping", ", ".join(stalled))
        self._update_gauges()
        self._check_source_alarms()
        self._check_model_health()
        self._check_model_links()
        return stalled

    def _update_gauges(self) -> None:
        if self.outbox is not None:
            for priority, count in self.outbox.pending_by_priority().items():
                self.metrics.outbox_depth.labels(priority).set(count)
        if self.uplink is not None:
            self.metrics.link_up.set(1 if self.uplink.connected else 0)

    def run_forever(self) -> int:
        """Start, supervise until SIGTERM/SIGINT, stop cleanly. Returns the exit status."""
        def on_signal(signum, _frame) -> None:
            self.stop_reason = signal.Signals(signum).name
            self.stop_event.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
        try:
            self.start()
        except EdgeError:
            self.stop_reason = "start failed"
            self.stop()
            raise
        except OSError as exc:  # e.g. the SCP or metrics port is taken
            self.stop_reason = "start failed"
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
        t0 = time.monotonic()
        if self.lock.held:
            log.info("stopping (%s)", self.stop_reason)
        sd_notify("STOPPING=1")
        self.stop_event.set()
        deadline = time.monotonic() + self.config.service.stop_timeout_s
        if self.view is not None:  # first: the page must not read an outbox that is about to close
            self.view.stop(timeout=min(2.0, self.config.service.stop_timeout_s / 4))
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
        self.ota.stop(timeout=max(0.1, deadline - time.monotonic()))
        if self.uplink is not None:
            self.uplink.stop(timeout=max(0.5, deadline - time.monotonic()))
        if self.pacs is not None:  # a report in flight is sent again at the next start: same object, no duplicate
            self.pacs.stop(timeout=max(0.5, deadline - time.monotonic()))
        if self.outbox is not None and not busy:
            self.outbox.close()  # with a worker still inside a commit, leave it: SQLite rolls back what was not committed
        if not busy:
            self.decoder.close()  # a worker thread still decoding would read the closed pool as a crashed decoder
        self.metrics.shutdown()
        if self.lock.held:
            log.info("stopped in %.1f s (%s)%s", time.monotonic() - t0, self.stop_reason,
                     "" if status == 0 else "; some work did not finish in time")
            self.lock.release()
        return status
