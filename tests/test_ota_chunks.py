"""Bundles over MQTT in chunks: stored one by one, resumed after a restart, put together, checked; the health
rule that rolls a new version back."""
from __future__ import annotations

import hashlib
import os
import time

import pytest

from edge_runtime.ota.chunks import MAX_PARTIALS, ChunkError, Receiver, parse, split
from edge_runtime.ota.health import HealthRule, HealthWatch


def test_chunks_survive_a_restart_and_reassemble(tmp_path):
    data = os.urandom(10_000)
    payloads = split(data, 1024)
    assert len(payloads) == 10
    rx = Receiver(tmp_path / "incoming", 1 << 20, 3600)
    for p in payloads[:6] + payloads[2:4]:  # duplicates (QoS 1 redelivery) are fine
        bundle, held, count = rx.accept(p)
    assert (held, count) == (6, 10) and not rx.complete(bundle)
    rx = Receiver(tmp_path / "incoming", 1 << 20, 3600)  # a restart: what was stored stays
    for p in payloads[6:]:
        got = rx.accept(p)
    assert got == (hashlib.sha256(data).hexdigest(), 10, 10) and rx.complete(bundle)
    assert rx.assemble(bundle).read_bytes() == data
    rx.mark_done(bundle)
    assert rx.accept(payloads[0]) is None  # a re-publish of a bundle already handled


def test_the_announced_model_is_kept_with_the_chunks(tmp_path):
    rx = Receiver(tmp_path / "incoming", 1 << 20, 3600)
    payloads = split(b"z" * 3000, 1000, model="cxr-pneumonia")
    bundle, _, _ = rx.accept(payloads[0])
    assert rx.model(bundle) == "cxr-pneumonia"
    other = split(b"z" * 3000, 1000, model="fetal-head")[1]  # same bytes, another announcement
    with pytest.raises(ChunkError, match="disagree"):
        rx.accept(other)


def test_a_whole_bundle_in_one_message(tmp_path):
    rx = Receiver(tmp_path / "incoming", 1 << 20, 3600)
    bundle, held, count = rx.accept(b"a whole tar")
    assert (held, count) == (1, 1) and rx.assemble(bundle).read_bytes() == b"a whole tar"


def test_chunks_that_do_not_add_up_are_discarded(tmp_path):
    good, evil = split(os.urandom(4000), 1000), split(os.urandom(4000), 1000)
    rx = Receiver(tmp_path / "incoming", 1 << 20, 3600)
    bundle = parse(good[0], 1 << 20).bundle
    forged = good[3][: len(good[3]) - 1000] + evil[3][-1000:]  # right header, wrong bytes
    for p in good[:3] + [forged]:
        rx.accept(p)
    with pytest.raises(ChunkError, match="do not add up"):
        rx.assemble(bundle)
    assert not (tmp_path / "incoming" / bundle).exists()


@pytest.mark.parametrize("mangle, match", [
    (lambda p: p[:9] + (10 ** 6).to_bytes(4, "big") + p[13:], "header length"),
    (lambda p: p[:14] + b"x" + p[15:], "malformed header"),
])
def test_malformed_chunks_are_refused(tmp_path, mangle, match):
    rx = Receiver(tmp_path / "incoming", 1 << 20, 3600)
    with pytest.raises(ChunkError, match=match):
        rx.accept(mangle(split(b"x" * 3000, 1000)[0]))


def test_over_the_cap_is_refused_from_the_first_chunk(tmp_path):
    rx = Receiver(tmp_path / "incoming", 5000, 3600)
    with pytest.raises(ChunkError, match="over the cap of 5000 bytes"):
        rx.accept(split(b"x" * 6000, 1000)[0])
    with pytest.raises(ChunkError, match="over the cap"):
        rx.accept(b"y" * 6000)
    assert rx.partials() == []


def test_stale_partials_are_discarded_and_their_number_is_bounded(tmp_path):
    rx = Receiver(tmp_path / "incoming", 1 << 20, 60)
    for i in range(MAX_PARTIALS + 2):
        rx.accept(split(bytes([i]) * 3000, 1000)[0])
    assert len(rx.partials()) == MAX_PARTIALS
    assert len(rx.purge_stale(time.time() + 120)) == MAX_PARTIALS and rx.partials() == []


def test_health_rule_errors_and_out_of_scope_rate():
    watch = HealthWatch(HealthRule(window_s=100, max_errors=2, min_frames=10, max_unassessed_increase=0.3))
    for i in range(50):
        watch.observe("m", "1.0", assessed=i % 10 != 0)  # the old version: 10 % out of scope
    watch.switched("m", "2.0", now=0.0)
    for i in range(9):
        watch.observe("m", "2.0", assessed=False)
    assert watch.check(now=1.0) == ([], [])  # not enough findings yet
    watch.observe("m", "2.0", assessed=False)
    trips, _ = watch.check(now=2.0)
    assert trips and trips[0][:2] == ("m", "2.0") and "out-of-scope rate 100%" in trips[0][2] and "10%" in trips[0][2]
    watch.switched("m", "3.0", now=0.0)
    watch.error("m", "2.0", "late error of the old version")  # does not count against 3.0
    watch.error("m", "3.0", "RuntimeError: boom")
    assert watch.check(now=1.0) == ([], [])
    watch.error("m", "3.0", "RuntimeError: boom")
    trips, _ = watch.check(now=1.0)
    assert "2 worker errors" in trips[0][2]
    watch.switched("m", "4.0", now=0.0)
    for _ in range(30):
        watch.observe("m", "4.0", assessed=True)
    assert watch.check(now=50.0) == ([], []) and watch.check(now=100.0) == ([], [("m", "4.0")])


def test_a_resumed_watch_keeps_the_old_baseline_and_the_rest_of_its_window():
    watch = HealthWatch(HealthRule(window_s=300, max_errors=3, min_frames=10, max_unassessed_increase=0.3))
    assert watch.switched("m", "2.0", now=0.0, left_s=40.0, baseline=(0.5, 100)) == (0.5, 100)
    for _ in range(10):
        watch.observe("m", "2.0", assessed=False)  # 100 %: not above 2x the old 50 %
    assert watch.check(now=39.0) == ([], []) and watch.check(now=40.0) == ([], [("m", "2.0")])
