from __future__ import annotations

import json
import logging
import os
import socket

import pytest

from edge_runtime.telemetry import JsonFormatter, Metrics, histogram_quantile, scrape, sd_notify, watchdog_interval_s


def test_metrics_endpoint_serves_what_was_counted():
    m = Metrics()
    port = m.serve("127.0.0.1", 0)
    try:
        m.frames_in.labels("phantom").inc(30)
        m.frames_dropped.labels("phantom").inc(4)
        for v in (5, 12, 18, 40):
            m.latency.labels("fetal-head", "capture_to_result").observe(v)
        m.link_up.set(1)
        s = scrape(f"http://127.0.0.1:{port}/metrics")
        assert s["edge_frames_in_total"] == [({"source": "phantom"}, 30.0)]
        assert s["edge_frames_dropped_total"][0][1] == 4.0
        assert s["edge_latency_ms_count"][0][1] == 4.0
        assert s["edge_link_up"] == [({}, 1.0)]
    finally:
        m.shutdown()


def test_histogram_quantile():
    buckets = [(10.0, 50.0), (20.0, 90.0), (50.0, 100.0), (float("inf"), 100.0)]
    assert histogram_quantile(buckets, 0.5) == pytest.approx(10.0)
    assert histogram_quantile(buckets, 0.7) == pytest.approx(15.0)
    assert histogram_quantile([(10.0, 0.0), (float("inf"), 0.0)], 0.5) is None


def test_json_log_lines():
    record = logging.LogRecord("edge_runtime.budget", logging.WARNING, __file__, 1, "stepping %s", ("down",), None)
    record.model = "fetal-head"
    entry = json.loads(JsonFormatter().format(record))
    assert entry["msg"] == "stepping down" and entry["level"] == "warning" and entry["model"] == "fetal-head"


def test_sd_notify_reaches_the_socket(tmp_path, monkeypatch):
    path = tmp_path / "notify.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert sd_notify("READY=1")
        assert server.recv(64) == b"READY=1"
    finally:
        server.close()
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert sd_notify("READY=1") is False


def test_watchdog_interval(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "20000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval_s() == 10.0
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert watchdog_interval_s() is None


def test_component_stats_are_exported_at_scrape_time():
    m = Metrics()
    counts = {"published": 3, "acked": 2, "inflight": 1, "state": "connected"}
    m.watch("edge_uplink", lambda: counts, counters=("published", "acked", "missing"), gauges=("inflight",))
    m.watch("edge_broken", lambda: 1 / 0, counters=("x",))  # a failing component does not break the endpoint
    port = m.serve("127.0.0.1", 0)
    try:
        counts["acked"] = 3
        s = scrape(f"http://127.0.0.1:{port}/metrics")
        assert s["edge_uplink_published_total"] == [({}, 3.0)]
        assert s["edge_uplink_acked_total"] == [({}, 3.0)]  # the value when scraped, not when registered
        assert s["edge_uplink_inflight"] == [({}, 1.0)]
        assert "edge_uplink_missing_total" not in s and "edge_broken_x_total" not in s
    finally:
        m.shutdown()
