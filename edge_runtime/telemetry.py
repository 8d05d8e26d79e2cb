"""Metrics (Prometheus text format on a localhost endpoint), structured logs, and systemd notifications."""
from __future__ import annotations

import json
import logging
import os
import socket
import time
import urllib.request
from collections.abc import Iterable, Sequence
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

LATENCY_BUCKETS_MS = (1, 2, 5, 10, 15, 20, 25, 33, 50, 75, 100, 150, 250, 500, 1000, 2500, 5000, 10000)


class Metrics:
    """Every number an operator or `edge-runtime status` needs, in one registry."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.frames_in = Counter("edge_frames_in", "Frames captured or files taken from an inbox", ["source"], registry=r)
        self.frames_dropped = Counter("edge_frames_dropped", "Live frames overwritten before a worker took them", ["source"], registry=r)
        self.frames_late = Counter("edge_frames_late", "Frames skipped because they were already past the budget", ["model", "source"], registry=r)
        self.frames_rate_skipped = Counter("edge_frames_rate_skipped", "Frames skipped by a lowered inference rate", ["model", "source"], registry=r)
        self.latency = Histogram("edge_latency_ms", "Latency per stage in milliseconds", ["model", "stage"],
                                 buckets=LATENCY_BUCKETS_MS, registry=r)
        self.budget_misses = Counter("edge_budget_misses", "Findings whose capture-to-result latency exceeded the budget", ["model"], registry=r)
        self.variant_switches = Counter("edge_variant_switches", "Budget controller level changes", ["model", "source", "direction"], registry=r)
        self.budget_level = Gauge("edge_budget_level", "Current budget level (0 = best variant, full rate)", ["model", "source"], registry=r)
        self.latency_p95 = Gauge("edge_latency_p95_ms", "Rolling p95 capture-to-result latency", ["model", "source"], registry=r)
        self.frames_probe_skipped = Counter("edge_frames_probe_skipped", "Live frames skipped because they arrived during a budget probe", ["model", "source"], registry=r)
        self.budget_probes = Counter("edge_budget_probes", "Probe inferences of the budget level above (results discarded)", ["model", "source"], registry=r)
        self.budget_probe_rounds = Counter("edge_budget_probe_rounds", "Finished probe rounds of the level above", ["model", "source", "result"], registry=r)
        self.findings = Counter("edge_findings", "Findings committed to the outbox", ["model", "priority"], registry=r)
        self.exams = Counter("edge_exams", "Exams closed by live sources (one finding each)", ["source", "assessed"], registry=r)
        self.input_errors = Counter("edge_input_errors", "Inputs that failed (decode, size, modality, ...)", ["source"], registry=r)
        self.worker_errors = Counter("edge_worker_errors", "Unexpected failures processing an item (engine fault, bug)", ["source"], registry=r)
        self.quarantined = Counter("edge_quarantined", "Study files moved to quarantine", ["source"], registry=r)
        self.outbox_full = Counter("edge_outbox_full", "Commits refused because the disk or the database is full", registry=r)
        self.outbox_depth = Gauge("edge_outbox_pending", "Findings waiting for delivery", ["priority"], registry=r)
        self.link_up = Gauge("edge_link_up", "1 while the MQTT link is connected", registry=r)
        self.inbox_depth = Gauge("edge_inbox_pending", "Study files waiting in an inbox", ["source"], registry=r)
        self.ready = Gauge("edge_ready", "1 once every model is loaded and warm", registry=r)
        self.stalled = Gauge("edge_stage_stalled", "1 while a stage has made no progress within the watchdog window", ["stage"], registry=r)
        self.started = Gauge("edge_start_time_seconds", "Unix time the daemon started", registry=r)
        self.started.set(time.time())
        self._server = None
        self._live = _LiveStats()
        r.register(self._live)

    def watch(self, prefix: str, stats: Callable[[], dict[str, Any]], counters: tuple[str, ...], gauges: tuple[str, ...] = ()) -> None:
        """Export a component's own counters (uplink, outbox) read at scrape time, so they are never stale."""
        self._live.sources.append((prefix, stats, counters, gauges))

    def watch_labeled(self, name: str, doc: str, labels: Sequence[str],
                      read: Callable[[], Iterable[tuple[Sequence[str], float]]]) -> None:
        """Export a gauge family computed at scrape time: `read()` gives (label values, value) pairs (source
        states, exact window percentiles), so a series appears and disappears with what it describes."""
        self._live.labeled.append((name, doc, tuple(labels), read))

    def serve(self, host: str = "127.0.0.1", port: int = 9464) -> int:
        """Start the HTTP endpoint; returns the port (0 picks a free one)."""
        self._server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return self._server.server_address[1]

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None


class _LiveStats:
    """A prometheus collector over `stats()` dicts: numbers the components keep themselves."""

    def __init__(self) -> None:
        self.sources: list[tuple[str, Callable[[], dict[str, Any]], tuple[str, ...], tuple[str, ...]]] = []
        self.labeled: list[tuple[str, str, tuple[str, ...], Callable[[], Iterable[tuple[Sequence[str], float]]]]] = []

    def describe(self):
        return []  # values are read at scrape time; nothing to check at registration

    def collect(self):
        for prefix, stats, counters, gauges in self.sources:
            try:
                values = stats()
            except Exception:  # a closed component must not break the endpoint
                continue
            for key in counters:
                if isinstance(values.get(key), (int, float)):
                    yield CounterMetricFamily(f"{prefix}_{key}", f"{prefix.removeprefix('edge_')} {key.replace('_', ' ')}",
                                              value=values[key])
            for key in gauges:
                if isinstance(values.get(key), (int, float)):
                    yield GaugeMetricFamily(f"{prefix}_{key}", f"{prefix.removeprefix('edge_')} {key.replace('_', ' ')}",
                                            value=values[key])
        for name, doc, labels, read in self.labeled:
            family = GaugeMetricFamily(name, doc, labels=list(labels))
            try:
                for values, value in read():
                    family.add_metric([str(v) for v in values], float(value))
            except Exception:  # same rule: a component being torn down must not break the endpoint
                continue
            yield family


def scrape(url: str, timeout: float = 2.0) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Read a metrics endpoint: {sample name: [(labels, value), ...]}."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        text = resp.read().decode("utf-8")
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return samples


def histogram_quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Quantile from cumulative (upper bound, count) buckets, interpolated linearly as Prometheus does."""
    buckets = sorted(buckets)
    total = buckets[-1][1] if buckets else 0
    if total <= 0:
        return None
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return prev_bound
            span = count - prev_count
            return prev_bound + (bound - prev_bound) * ((rank - prev_count) / span if span else 0)
        prev_bound, prev_count = bound, count
    return prev_bound


# ------------------------------------------------------------------ structured logs
class JsonFormatter(logging.Formatter):
    """One JSON object per line: what a log shipper or `journalctl -o cat | jq` wants."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in ("model", "source", "reason", "input"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


LOG_LEVELS = ("debug", "info", "warning", "error")
# Third-party loggers that are chatty at INFO (pynetdicom logs every association) or that warn about every
# tolerated header oddity (pydicom): routed into our handler, at a level a technician can read.
THIRD_PARTY_LEVELS = {"pynetdicom": logging.WARNING, "paho": logging.WARNING, "urllib3": logging.WARNING,
                      "PIL": logging.WARNING, "pydicom": logging.ERROR, "openvino": logging.WARNING}


def setup_logging(verbosity: int = 0, fmt: str = "text", level: str | None = None) -> None:
    """One handler on the root logger, so our lines and third-party ones come out in one format. `level`
    (debug|info|warning|error) wins over `verbosity` (-v steps down from WARNING)."""
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    numeric = getattr(logging, level.upper()) if level else logging.WARNING - 10 * min(verbosity, 2)
    root.setLevel(numeric)
    for name, floor in THIRD_PARTY_LEVELS.items():
        third = logging.getLogger(name)
        third.handlers[:] = []  # pynetdicom installs its own stderr handler: one format, one stream
        third.propagate = True
        third.setLevel(logging.DEBUG if numeric <= logging.DEBUG else floor)
    logging.captureWarnings(True)  # warnings.warn() from libraries -> the 'py.warnings' logger, same format
    quiet_opencv(debug=numeric <= logging.DEBUG)


def quiet_opencv(debug: bool = False) -> None:
    """OpenCV logs from C++ straight to stderr ('[ WARN:0@0.730] global cap_v4l.cpp ...'), which would break a
    JSON log. Its messages are silenced; what matters (a device that does not open) is reported by our own
    lines. OPENCV_LOG_LEVEL in the environment wins, for debugging a capture driver. FFmpeg inside OpenCV
    (RTSP, video files) logs through av_log, which OpenCV reads its level for when its FFmpeg backend first
    starts: quiet (-8) unless set, or debugging."""
    if not debug:
        os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    if os.environ.get("OPENCV_LOG_LEVEL"):
        return
    import cv2

    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_WARNING if debug else cv2.utils.logging.LOG_LEVEL_SILENT)


# ------------------------------------------------------------------ systemd
def sd_notify(state: str) -> bool:
    """Send a state line (READY=1, WATCHDOG=1, STOPPING=1, STATUS=...) to systemd; False outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
        return True
    except OSError:
        return False


def watchdog_interval_s() -> float | None:
    """Half of systemd's WatchdogSec for this process, or None when no watchdog is armed."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 1e6 / 2
