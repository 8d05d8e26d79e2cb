"""The hub's stores, SQLite and a real PostgreSQL server: idempotent by id, duplicates counted, bad input kept
in `rejected`, feedback and device status, versioned schema created once by racing collectors."""
from __future__ import annotations

import json
import sqlite3
import threading

import pytest

from mqtt_helpers import fake_finding
from pg_helpers import PgServer, needs_postgres
from edge_hub.messages import FeedbackRow, FindingRow, Rejected, StatusRow, parse
from edge_hub.stores import StoreUnavailable, open_store

TOPIC = "edge/v1/site-a/dev-1/findings"


@pytest.fixture(scope="module")
def pg():
    if needs_postgres.args[0]:
        pytest.skip(needs_postgres.kwargs["reason"])
    server = PgServer().start()
    yield server
    server.cleanup()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=needs_postgres)])
def store(request, tmp_path):
    db = str(tmp_path / "hub.sqlite") if request.param == "sqlite" else request.getfixturevalue("pg").database()
    s = open_store(db, name="test-collector")
    yield s
    s.close()


def finding(i: int, priority: str = "routine", device: str = "dev-1", seq: int | None = None) -> bytes:
    f = fake_finding(i, priority, device, "site-a")
    f["seq"] = i + 1 if seq is None else seq
    return json.dumps(f).encode()


def feedback(fid: str, finding_id: str, verdict: str = "confirm") -> bytes:
    return json.dumps({"feedback_id": fid, "finding_id": finding_id, "verdict": verdict, "label": "normal",
                       "value_mm": None, "note": "", "created_at": "2026-12-01T10:00:00Z", "device_id": "dev-1",
                       "site": "site-a"}).encode()


def test_parse_classifies_by_topic_and_names_what_is_wrong():
    assert isinstance(parse(TOPIC, finding(1), 1.0), FindingRow)
    row = parse("edge/v1/site-t/dev-9/findings", finding(1), 1.0)
    assert (row.site, row.device_id) == ("site-t", "dev-9"), "the topic (the broker's ACL) names the device"
    assert isinstance(parse("edge/v1/s/d/feedback", feedback("fb-1", "f-1"), 1.0), FeedbackRow)
    assert isinstance(parse("edge/v1/s/d/status", b"online", 1.0, True), StatusRow)
    cases = {
        (TOPIC, b"\xff\xfe"): "not UTF-8",
        (TOPIC, b"[1, 2]"): "not a JSON object",
        (TOPIC, b'{"finding_id": ""}'): "'finding_id'",
        (TOPIC, json.dumps({"finding_id": "a", "seq": "7"}).encode()): "'seq'",
        (TOPIC, json.dumps({"finding_id": "a", "seq": -1}).encode()): "'seq'",
        (TOPIC, json.dumps({"finding_id": "a\u0000b"}).encode()): "NUL",
        ("edge/v1/s/d/feedback", feedback("fb", "f", verdict="maybe")): "'verdict'",
        ("edge/v1/s/d/status", b""): "empty",
    }
    for (topic, payload), why in cases.items():
        row = parse(topic, payload, 1.0)
        assert isinstance(row, Rejected) and why in row.reason, (payload, row)


def test_findings_are_stored_once_and_every_repeat_is_counted(store):
    a, b, c = finding(0, "urgent"), finding(1), finding(2)
    fid = [json.loads(x)["finding_id"] for x in (a, b, c)]
    assert store.store([(TOPIC, a), (TOPIC, b), (TOPIC, a)]) == (2, 1, 0), "a repeat inside one batch"
    accepted: list = []
    assert store.store([(TOPIC, a), (TOPIC, c)], accepted) == (1, 1, 0)
    assert accepted == [(TOPIC, fid[0]), (TOPIC, fid[2])], "duplicates are receipted again"
    rows = dict(store.query("SELECT finding_id, dups FROM findings", {}))
    assert rows == {fid[0]: 2, fid[1]: 0, fid[2]: 0}
    assert store.counts()["stored"] == 3 and store.counts()["duplicates"] == 2


def test_bad_messages_are_kept_with_a_reason_and_do_not_sink_the_batch(store):
    good = finding(0)
    nan = b'{"finding_id": "nan-1", "seq": 1, "result": {"p": NaN}}'  # Python's JSON takes it; jsonb does not
    assert store.store([(TOPIC, b"not json"), (TOPIC, good), (TOPIC, nan), (TOPIC, b'{"x": 1}')]) \
        == ((2, 0, 2) if store.kind == "sqlite" else (1, 0, 3))
    reasons = [r for (r,) in store.query("SELECT reason FROM rejected ORDER BY id", {})]
    assert any("not JSON" in r for r in reasons) and any("finding_id" in r for r in reasons)
    if store.kind == "postgresql":
        assert any("refused by the database" in r for r in reasons), reasons
    assert [i for (i,) in store.query("SELECT finding_id FROM findings", {})][:1] == [json.loads(good)["finding_id"]]


def test_feedback_is_idempotent_by_feedback_id_and_status_keeps_the_newest(store):
    f = finding(0, "urgent")
    fid = json.loads(f)["finding_id"]
    fb_topic, st_topic = "edge/v1/site-a/dev-1/feedback", "edge/v1/site-a/dev-1/status"
    r = store.write([parse(TOPIC, f, 10.0), parse(fb_topic, feedback("fb-1", fid), 11.0),
                     parse(fb_topic, feedback("fb-1", fid), 12.0), parse(st_topic, b"online", 13.0, True)])
    assert (r.stored, r.feedback, r.feedback_duplicates, r.statuses) == (1, 1, 1, 1)
    assert (st_topic.replace("status", "feedback"), "feedback", "fb-1") in r.accepted
    # A slower collector's older status must not overwrite the newer one.
    store.write([parse(st_topic, b"offline", 20.0)])
    store.write([parse(st_topic, b"online", 15.0)])
    assert store.query("SELECT status FROM device_status", {}) == [("offline",)]
    assert store.query("SELECT feedback_id, finding_id, verdict, dups FROM feedback", {}) == [("fb-1", fid, "confirm", 1)]


def test_sqlite_file_from_the_old_collector_is_migrated(tmp_path):
    db = tmp_path / "old.sqlite"
    conn = sqlite3.connect(db)  # the schema edge_runtime.collector created before it had versions
    conn.executescript("""CREATE TABLE findings (rx INTEGER PRIMARY KEY, finding_id TEXT NOT NULL UNIQUE,
        device_id TEXT, site TEXT, seq INTEGER, priority TEXT, created_at TEXT, received_at REAL NOT NULL,
        topic TEXT NOT NULL, payload TEXT NOT NULL, dups INTEGER NOT NULL DEFAULT 0);
        CREATE TABLE rejected (id INTEGER PRIMARY KEY, topic TEXT NOT NULL, payload BLOB, reason TEXT NOT NULL,
        received_at REAL NOT NULL);
        CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
        INSERT INTO findings VALUES (1, 'old-1', 'dev-1', 'site-a', 1, 'urgent', '', 1.0, 't', '{}', 0);
        INSERT INTO meta VALUES ('stored', 1);""")
    conn.close()
    s = open_store(str(db))
    assert s.query("PRAGMA user_version", {}) == [(2,)]
    assert s.counts()["stored"] == 1 and s.query("SELECT count(*) FROM device_status", {}) == [(0,)]
    s.close()


@needs_postgres
def test_racing_collectors_create_the_schema_once(pg):
    url = pg.database()
    errors: list[BaseException] = []

    def open_one(k: int) -> None:
        try:
            open_store(url, name=f"c{k}").close()
        except BaseException as exc:  # noqa: BLE001 - reported by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=open_one, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    s = open_store(url)
    assert s.query("SELECT version FROM hub_schema", {}) == [(1,)]
    s.conn.execute("UPDATE hub_schema SET version = 99")
    s.close()
    from edge_runtime.errors import ConfigError

    with pytest.raises(ConfigError, match="schema version 99 is newer"):
        open_store(url)


@needs_postgres
def test_an_absent_server_is_unavailable_and_bad_credentials_are_a_config_error(pg):
    from edge_runtime.errors import ConfigError
    from edge_runtime.local_broker import free_port

    with pytest.raises(StoreUnavailable, match="unavailable"):
        open_store(f"postgresql://postgres@127.0.0.1:{free_port()}/hub")
    with pytest.raises(ConfigError, match="does not exist"):
        open_store(f"postgresql://postgres@127.0.0.1:{pg.port}/no_such_db")
    s = open_store(pg.database(), connect=False)  # the collector's way: connect when it needs to
    assert s.conn is None
    s.ensure()
    assert s.query("SELECT 1", {}) == [(1,)]
    s.close()
