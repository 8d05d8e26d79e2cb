"""Outbox: durable commit, seq ownership, source-item dedup, publish order, caps and eviction, SQLITE_FULL."""
from __future__ import annotations

import json
import sqlite3
import threading

import pytest

from mqtt_helpers import fake_finding
from edge_runtime.errors import EdgeError
from edge_runtime.outbox import Outbox, OutboxFull


def F(i: int = 0, priority: str = "routine") -> dict:
    return fake_finding(i, priority)


@pytest.fixture
def box(tmp_path):
    b = Outbox(tmp_path / "outbox.sqlite")
    yield b
    b.close()


def test_commit_assigns_monotonic_seq_inside_the_stored_payload(box, tmp_path):
    findings = [F(i) for i in range(3)]
    seqs = [box.commit(f) for f in findings]
    assert seqs == [1, 2, 3]
    for f, seq in zip(findings, seqs):
        assert f["seq"] == seq  # the caller's dict learns its seq once committed
        stored = box.payload(seq)
        assert stored["seq"] == seq and stored["finding_id"] == f["finding_id"]
    conn = sqlite3.connect(tmp_path / "outbox.sqlite")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_finding_without_id_gets_one(box):
    f = F()
    del f["finding_id"]
    seq = box.commit(f)
    assert len(f["finding_id"]) == 36 and box.payload(seq)["finding_id"] == f["finding_id"]


def test_seq_is_never_reused_after_pruning_and_reopen(tmp_path):
    path = tmp_path / "o.sqlite"
    with Outbox(path, max_rows=3) as box:
        seqs = [box.commit(F(i)) for i in range(3)]
        box.mark_delivered(seqs)
        assert [box.commit(F(i)) for i in range(3, 5)] == [4, 5]
        assert box.stats()["pruned"] == 2  # delivered rows 1 and 2 made room
    with Outbox(path, max_rows=3) as box:
        box.mark_delivered([3, 4, 5])
        for _ in range(3):
            box.commit(F())
        assert box.commit(F()) == 9  # seq 1..8 are gone or taken: never handed out again
        assert box.stats()["rows"] == 3


def test_source_item_is_committed_once_even_after_reopen(tmp_path):
    path = tmp_path / "o.sqlite"
    with Outbox(path) as box:
        first = box.commit(F(1), source_item="2.25.123#0")
        assert box.has_source_item("2.25.123#0") and not box.has_source_item("2.25.123#1")
        assert box.commit(F(2), source_item="2.25.123#0") == first
    with Outbox(path) as box:  # a file re-processed after a crash
        again = F(3)
        assert box.commit(again, source_item="2.25.123#0") == first
        assert again["seq"] == 0  # nothing stored for it
        assert box.stats()["rows"] == 1 and box.depth() == 1


def test_same_finding_committed_twice_is_stored_once(box):
    f = F()
    a = box.commit(f)
    b = box.commit(dict(f))
    assert a == b and box.stats()["rows"] == 1


def test_commit_many_is_one_transaction_all_or_nothing(box):
    good = [(F(i), None) for i in range(3)]
    bad = F(9)
    bad["result"] = {"p": float("nan")}  # not valid JSON: the whole request fails
    with pytest.raises(ValueError):
        box.commit_many(good + [(bad, None)])
    assert box.stats()["rows"] == 0
    assert box.commit_many(good) == [1, 2, 3]


def test_unknown_priority_is_refused(box):
    with pytest.raises(ValueError, match="priority"):
        box.commit(F(0, "critical"))


def test_next_batch_is_urgent_first_then_seq_and_skips_in_flight(box):
    prios = ["routine", "urgent", "routine", "urgent", "routine"]
    seqs = [box.commit(F(i, p)) for i, p in enumerate(prios)]
    rows = box.next_batch(10)
    assert [r.seq for r in rows] == [seqs[1], seqs[3], seqs[0], seqs[2], seqs[4]]
    assert [r.priority for r in rows] == ["urgent", "urgent", "routine", "routine", "routine"]
    assert json.loads(rows[0].payload)["seq"] == seqs[1]
    assert [r.seq for r in box.next_batch(2, exclude={seqs[1]})] == [seqs[3], seqs[0]]
    box.mark_delivered([seqs[1], seqs[0]])
    assert [r.seq for r in box.next_batch(10)] == [seqs[3], seqs[2], seqs[4]]


def test_mark_delivered_counts_once_and_stats_follow(box):
    seqs = [box.commit(F(i, "urgent" if i < 2 else "routine")) for i in range(5)]
    assert box.pending_by_priority() == {"urgent": 2, "routine": 3}
    assert box.mark_delivered([seqs[0], seqs[2]]) == 2
    assert box.mark_delivered([seqs[0]]) == 0  # a duplicate PUBACK changes nothing
    s = box.stats()
    assert s["pending"] == {"urgent": 1, "routine": 2} and s["delivered"] == 2 and s["rows"] == 5
    assert s["pending_bytes"]["urgent"] > 0
    box.record_attempts([seqs[1]])
    assert [r.attempts for r in box.next_batch(1)] == [1]


def recount(path) -> dict[str, int]:
    """The pending counters recomputed from the rows themselves, to compare with the meta table."""
    conn = sqlite3.connect(path)
    out = {f"pending_{k}_{r}": 0 for k in ("rows", "bytes") for r in (-1, 0, 1)}  # -1: feedback
    rows = conn.execute("SELECT rank, COUNT(*), COALESCE(SUM(bytes), 0) FROM findings WHERE state = 0 GROUP BY rank")
    for rank, n, size in rows:
        out[f"pending_rows_{rank}"], out[f"pending_bytes_{rank}"] = n, size
    conn.close()
    return out


def test_requeue_delivered_makes_recent_deliveries_pending_again_durably(tmp_path):
    now = [1_000_000.0]
    path = tmp_path / "o.sqlite"
    box = Outbox(path, clock=lambda: now[0])
    assert box.requeue_delivered(600) == 0  # nothing delivered yet
    seqs = [box.commit(F(i, "urgent" if i == 3 else "routine")) for i in range(5)]
    box.mark_delivered(seqs[:2])  # delivered at t0
    now[0] += 100
    box.mark_delivered(seqs[2:4])  # delivered at t0 + 100 (one routine, one urgent): the last deliveries
    now[0] += 3600  # the broker stayed down for an hour: the window still ends at the last delivery
    assert box.requeue_delivered(50) == 2
    s = box.stats()
    assert s["pending"] == {"urgent": 1, "routine": 2} and s["requeued"] == 2
    assert {k: v for k, v in box._read_meta().items() if k.startswith("pending_")} == recount(path)
    assert [r.seq for r in box.next_batch(10)] == [seqs[3], seqs[2], seqs[4]]  # urgent first, then seq
    box.close()
    box = Outbox(path, clock=lambda: now[0])
    assert box.stats()["pending"] == {"urgent": 1, "routine": 2} and box.stats()["requeued"] == 2
    assert box.mark_delivered([seqs[2], seqs[3]]) == 2 and box.depth() == 1  # delivered again, counted again
    assert box.requeue_delivered(4000) == 4  # the first two were delivered 3,700 s before the re-delivery
    assert {k: v for k, v in box._read_meta().items() if k.startswith("pending_")} == recount(path)
    box.close()


def test_row_cap_prunes_delivered_first_then_evicts_oldest_routine_never_urgent(box, tmp_path):
    box.max_rows = 10
    delivered = [box.commit(F(i)) for i in range(4)]
    box.mark_delivered(delivered)
    routine = [F(i) for i in range(4)]
    urgent = [F(i, "urgent") for i in range(4)]
    for r, u in zip(routine, urgent):
        box.commit(r)
        box.commit(u)
    assert box.stats()["rows"] == 10 and box.stats()["evicted"] == 0 and box.stats()["pruned"] == 2
    more = [F(i) for i in range(3)]
    for f in more:
        box.commit(f)
    s = box.stats()
    assert s["pruned"] == 4 and s["evicted"] == 1  # both remaining delivered rows went first, then one routine
    assert box.evicted_ids() == [routine[0]["finding_id"]]
    pending = box.finding_ids()
    assert all(u["finding_id"] in pending for u in urgent)
    # Only urgent findings pending and still over the cap: keep them all and raise the alarm.
    for i in range(20):
        box.commit(F(i, "urgent"))
    s = box.stats()
    assert s["pending"]["urgent"] == 24 and s["pending"]["routine"] == 0
    assert s["evicted"] == 1 + 3 + 3 and s["over_cap_alarms"] > 0 and "only urgent" in s["last_alarm"]


def test_byte_cap_evicts_routine_by_payload_bytes(box):
    fs = [F(i) for i in range(8)]
    box.commit(fs[0])
    one = box.stats()["bytes"]  # every fake finding has the same size
    box.max_bytes = one * 5 + one // 2
    for f in fs[1:]:
        box.commit(f)
    s = box.stats()
    assert s["bytes"] <= box.max_bytes and s["rows"] == 5 and s["evicted"] == 3
    assert box.evicted_ids() == [f["finding_id"] for f in fs[:3]]


def test_age_cap_drops_old_delivered_and_routine_but_keeps_old_urgent(tmp_path):
    now = [1_000_000.0]
    box = Outbox(tmp_path / "o.sqlite", max_age_days=1, clock=lambda: now[0])
    old_routine, old_urgent, old_done = F(1), F(2, "urgent"), F(3)
    for f in (old_routine, old_urgent, old_done):
        box.commit(f)
    box.mark_delivered([old_done["seq"]])
    now[0] += 2 * 86400
    box.commit(F(4))
    ids = box.finding_ids()
    assert old_routine["finding_id"] not in ids and old_done["finding_id"] not in ids
    assert old_urgent["finding_id"] in ids
    assert box.evicted_ids() == [old_routine["finding_id"]] and box.stats()["pruned"] == 1
    box.close()


def test_sqlite_full_is_an_alarm_nothing_half_stored_and_space_comes_back(tmp_path):
    box = Outbox(tmp_path / "o.sqlite", max_page_count=40)
    committed = []
    with pytest.raises(OutboxFull) as info:
        for i in range(10_000):
            f = F(i)
            box.commit_many([(f, f"item-{i}"), (F(i), None)])
            committed.append(f)
    assert isinstance(info.value, EdgeError) and "full" in str(info.value)
    s = box.stats()
    assert s["rows"] == 2 * len(committed) and s["full_alarms"] >= 1  # the failed pair left nothing behind
    assert not box.has_source_item(f"item-{len(committed)}")
    # Once the uplink has delivered findings, a full store makes room from delivered rows and carries on.
    box.mark_delivered(r.seq for r in box.next_batch(10_000))
    box.commit(F(99), source_item="retry")
    assert box.has_source_item("retry") and box.stats()["pruned"] > 0
    box.close()


def test_concurrent_commits_share_transactions_and_get_unique_increasing_seqs(box):
    per_thread = {}

    def worker(k: int) -> None:
        per_thread[k] = [box.commit(F(i)) for i in range(40)]

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = sorted(s for seqs in per_thread.values() for s in seqs)
    assert every == list(range(1, 241))
    assert all(seqs == sorted(seqs) for seqs in per_thread.values())
    assert box.stats()["rows"] == 240


def test_a_bad_finding_fails_alone_inside_a_group_commit(box):
    from edge_runtime.outbox import _Request

    bad = F(1)
    bad["budget_ms"] = float("inf")
    good, bad_req = _Request([(F(0), None)]), _Request([(bad, None)])
    with box._write_lock:
        box._commit_group([good, bad_req])
    assert good.error is None and good.result == [1]
    assert isinstance(bad_req.error, ValueError)
    assert box.stats()["rows"] == 1


def test_from_config_uses_the_state_dir(tmp_path):
    import dataclasses

    from edge_runtime.config import Config, DeviceSection, OutboxSection

    cfg = dataclasses.replace(Config(), device=DeviceSection(id="d", site="s", state_dir=str(tmp_path / "state")),
                              outbox=OutboxSection(max_rows=7))
    with Outbox.from_config(cfg) as box:
        assert box.path == tmp_path / "state" / "outbox.sqlite" and box.max_rows == 7


# ---------------------------------------------------------------- three states: pending, sent, stored (receipts)
def recount_sent(path) -> int:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT COUNT(*) FROM findings WHERE state = 1").fetchone()[0]
    finally:
        conn.close()


def _ids(box: Outbox) -> dict[int, str]:
    with box._read_lock:
        return dict(box._r.execute("SELECT seq, finding_id FROM findings"))


def test_a_receipt_stores_only_sent_rows_and_counts_the_unknown(tmp_path):
    path = tmp_path / "o.sqlite"
    box = Outbox(path, keep_until_stored=True)
    seqs = [box.commit(F(i)) for i in range(4)]
    ids = _ids(box)
    box.mark_delivered(seqs[:2])
    assert box.finding_ids()[ids[seqs[0]]] == "sent" and box.sent_unstored() == 2
    # one sent row, one never-sent pending row, an id nobody has, and garbage types
    stored, unknown = box.mark_stored([ids[seqs[0]], ids[seqs[2]], "not-a-known-id", 17])
    assert (stored, unknown) == (1, 2)
    states = box.finding_ids()
    assert states[ids[seqs[0]]] == "stored" and states[ids[seqs[2]]] == "pending", "a receipt never touches a never-sent row"
    assert box.mark_stored([ids[seqs[0]]]) == (0, 0), "a repeated receipt changes nothing and is not unknown"
    s = box.stats()
    assert s["stored"] == 1 and s["sent_unstored"] == 1 and s["pending"]["routine"] == 2
    assert box.mark_delivered([seqs[0]]) == 0, "a late PUBACK does not move a stored row back"
    box.close()
    box = Outbox(path, keep_until_stored=True)  # the marks survive a reopen
    assert box.stats()["sent_unstored"] == recount_sent(path) == 1 and box.stats()["stored"] == 1
    box.close()


def test_only_stored_rows_are_pruned_when_receipts_are_required(tmp_path):
    box = Outbox(tmp_path / "o.sqlite", keep_until_stored=True, max_rows=6)
    seqs = [box.commit(F(i)) for i in range(4)]
    ids = _ids(box)
    box.mark_delivered(seqs)  # all four sent, two of them stored
    box.mark_stored([ids[seqs[1]], ids[seqs[3]]])
    urgent = [box.commit(F(10 + i, "urgent")) for i in range(2)]
    box.commit(F(20))  # 7 rows > 6: the oldest stored row goes, nothing else
    s = box.stats()
    assert s["pruned"] == 1 and s["evicted"] == 0 and s["rows"] == 6 and seqs[1] not in _ids(box)
    box.commit(F(21))
    box.commit(F(22))  # the second stored row, then the oldest sent-but-unconfirmed routine row (an eviction)
    s = box.stats()
    assert s["pruned"] == 2 and s["evicted"] == 1 and box.evicted_ids() == [ids[seqs[0]]]
    assert s["sent_unstored"] == 1 and set(urgent) <= set(_ids(box))
    box.close()
    plain = Outbox(tmp_path / "p.sqlite", max_rows=3)  # without receipts a PUBACK is the end: sent rows prune
    first = [plain.commit(F(i)) for i in range(3)]
    plain.mark_delivered(first)
    plain.commit(F(3))
    assert plain.stats()["pruned"] == 1 and plain.stats()["evicted"] == 0
    plain.close()


def test_requeue_unstored_at_a_new_connection_and_after_the_receipt_timeout_with_backoff(tmp_path):
    now = [1_000_000.0]
    path = tmp_path / "o.sqlite"
    box = Outbox(path, keep_until_stored=True, clock=lambda: now[0])
    seqs = [box.commit(F(i, "urgent" if i == 0 else "routine")) for i in range(4)]
    ids = _ids(box)
    box.mark_delivered(seqs[:3])  # sent at t0
    now[0] += 5
    box.mark_delivered(seqs[3:])  # sent at t0 + 5, i.e. on the new connection below
    assert box.requeue_unstored(None, sent_before=now[0] - 1) == 3, "what the new connection sent is not in doubt"
    assert box.depth() == 3 and box.sent_unstored() == 1
    assert [r.seq for r in box.next_batch(10)] == seqs[:3], "re-sent in publish order, urgent first"
    # a receipt for the earlier copy still counts while the row waits to be re-sent
    assert box.mark_stored([ids[seqs[1]]]) == (1, 0) and box.depth() == 2
    box.mark_delivered([seqs[0], seqs[2]])  # re-sent: PUBACK at t0 + 5
    now[0] += 119
    assert box.requeue_unstored(120) == 0
    now[0] += 2  # 121 s after the last PUBACK of seqs[0], seqs[2] (resends = 1: they wait 240 s) and seqs[3] (120 s)
    assert box.requeue_unstored(120) == 1 and box.depth() == 1
    now[0] += 120
    assert box.requeue_unstored(120) == 2, "a second re-send waits twice as long"
    s = box.stats()
    assert s["receipt_requeued"] == 6 and s["sent_unstored"] == recount_sent(path) == 0
    assert {k: v for k, v in box._read_meta().items() if k.startswith("pending_")} == recount(path)
    box.close()


V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE findings (seq INTEGER PRIMARY KEY, finding_id TEXT NOT NULL UNIQUE, rank INTEGER NOT NULL,
    created_at REAL NOT NULL, payload TEXT NOT NULL, bytes INTEGER NOT NULL, source_item TEXT UNIQUE,
    state INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0, delivered_at REAL);
CREATE INDEX findings_pending ON findings(rank, seq) WHERE state = 0;
CREATE INDEX findings_delivered ON findings(seq) WHERE state = 1;
CREATE INDEX findings_delivered_at ON findings(delivered_at) WHERE state = 1;
CREATE INDEX findings_age ON findings(created_at);
CREATE TABLE evicted (seq INTEGER PRIMARY KEY, finding_id TEXT NOT NULL, rank INTEGER NOT NULL, reason TEXT NOT NULL,
    evicted_at REAL NOT NULL);
"""


def test_a_schema_1_outbox_is_migrated_in_place_delivered_rows_become_sent(tmp_path):
    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript(V1_SCHEMA)
    rows = [(i, f"id-{i}", 1, 1000.0 + i, json.dumps(F(i)), 100, None, 1 if i <= 3 else 0, 0, 2000.0 if i <= 3 else None)
            for i in range(1, 6)]
    conn.executemany("INSERT INTO findings VALUES (?,?,?,?,?,?,?,?,?,?)", rows)
    meta = {"schema_version": 1, "next_seq": 6, "rows": 5, "bytes": 500, "pending_rows_1": 2, "pending_bytes_1": 200,
            "delivered": 3}
    conn.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
    conn.commit()
    conn.close()
    box = Outbox(path, keep_until_stored=True)
    s = box.stats()
    assert s["sent_unstored"] == 3 and s["pending"]["routine"] == 2 and s["delivered"] == 3 and s["next_seq"] == 6
    assert box.finding_ids() == {"id-1": "sent", "id-2": "sent", "id-3": "sent", "id-4": "pending", "id-5": "pending"}
    assert box.mark_stored(["id-1", "id-4"]) == (1, 1)
    assert box._read_meta()["schema_version"] == 2
    box.close()
    box = Outbox(path, keep_until_stored=True)  # a second open migrates nothing again
    assert box.stats()["sent_unstored"] == 2 and box.stats()["stored"] == 1
    assert box.commit(F(9)) == 6
    box.close()
