"""The SQLite store: one file, one writer (WAL, synchronous=FULL). A small hub's, and the one the demo uses.

Schema versions live in PRAGMA user_version: 1 is the collector's original schema (findings, rejected, meta), 2
adds feedback, device status and the report's indexes. A file from an older collector is migrated on open.
"""
from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any, Iterable

from edge_hub.messages import FeedbackRow, FindingRow, Rejected, Row, StatusRow
from edge_hub.stores import COUNT_KEYS, BatchResult, store_messages
from edge_runtime.errors import EdgeError

_V1 = """
CREATE TABLE IF NOT EXISTS findings (
    rx          INTEGER PRIMARY KEY,      -- arrival order at this collector
    finding_id  TEXT NOT NULL UNIQUE,
    device_id   TEXT,
    site        TEXT,
    seq         INTEGER,
    priority    TEXT,
    created_at  TEXT,
    received_at REAL NOT NULL,
    topic       TEXT NOT NULL,
    payload     TEXT NOT NULL,
    dups        INTEGER NOT NULL DEFAULT 0  -- how many more times it arrived
);
CREATE INDEX IF NOT EXISTS findings_device ON findings(device_id, seq);
CREATE TABLE IF NOT EXISTS rejected (      -- messages that are not findings: kept for inspection, acknowledged
    id INTEGER PRIMARY KEY, topic TEXT NOT NULL, payload BLOB, reason TEXT NOT NULL, received_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
"""
_V2 = """
CREATE TABLE IF NOT EXISTS feedback (
    feedback_id TEXT PRIMARY KEY,
    finding_id  TEXT NOT NULL,
    verdict     TEXT NOT NULL,
    device_id   TEXT,
    site        TEXT,
    created_at  TEXT,
    received_at REAL NOT NULL,
    topic       TEXT NOT NULL,
    payload     TEXT NOT NULL,
    dups        INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS feedback_finding ON feedback(finding_id);
CREATE TABLE IF NOT EXISTS device_status (
    site TEXT NOT NULL, device_id TEXT NOT NULL, status TEXT NOT NULL, retained INTEGER NOT NULL,
    received_at REAL NOT NULL, topic TEXT NOT NULL, PRIMARY KEY (site, device_id)
);
CREATE INDEX IF NOT EXISTS findings_site_device_seq ON findings(site, device_id, seq);
CREATE INDEX IF NOT EXISTS findings_site_device_received ON findings(site, device_id, received_at);
CREATE INDEX IF NOT EXISTS findings_received ON findings(received_at);
"""
MIGRATIONS = (_V1, _V2)  # index i brings user_version i to i + 1


class SqliteStore:
    """SQLite (WAL, synchronous=FULL), one writer. Stores a batch in one transaction."""

    kind = "sqlite"
    param = ":{}"
    epoch = "{col}"
    since_param = "{col} >= :since"
    as_text = "{col}"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self.conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
            self.conn.execute("PRAGMA journal_mode = WAL")
            self.conn.execute("PRAGMA synchronous = FULL")
            self._migrate()
        except sqlite3.Error as exc:
            raise EdgeError(str(self.path), f"cannot open the collector database ({exc})") from None

    def _migrate(self) -> None:
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise sqlite3.DatabaseError(f"schema version {version} is newer than this collector knows "
                                        f"({len(MIGRATIONS)}); upgrade edge-runtime")
        for target, script in enumerate(MIGRATIONS[version:], start=version + 1):
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in filter(str.strip, script.split(";")):
                    self.conn.execute(statement)
                self.conn.execute(f"PRAGMA user_version = {target}")
                self.conn.execute("COMMIT")
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise

    def ensure(self) -> None:
        """A local file does not go away the way a server does: nothing to reconnect."""

    def store(self, messages: list[tuple[str, bytes]],
              accepted: list[tuple[str, str]] | None = None) -> tuple[int, int, int]:
        return store_messages(self, messages, accepted)

    def write(self, rows: list[Row]) -> BatchResult:
        out = BatchResult()
        with self._lock:
            c = self.conn
            c.execute("BEGIN IMMEDIATE")
            try:
                for row in rows:
                    self._write_one(c, row, out)
                for key in COUNT_KEYS:
                    n = getattr(out, key)
                    if n:
                        c.execute("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = value + ?",
                                  (key, n, n))
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise
        return out

    @staticmethod
    def _write_one(c: sqlite3.Connection, row: Row, out: BatchResult) -> None:
        if isinstance(row, Rejected):
            c.execute("INSERT INTO rejected(topic, payload, reason, received_at) VALUES (?,?,?,?)",
                      (row.topic, row.payload, row.reason, row.received_at))
            out.rejected += 1
        elif isinstance(row, FindingRow):
            cur = c.execute(
                "INSERT OR IGNORE INTO findings(finding_id, device_id, site, seq, priority, created_at, received_at,"
                " topic, payload) VALUES (?,?,?,?,?,?,?,?,?)",
                (row.finding_id, row.device_id, row.site, row.seq, row.priority, row.created_at, row.received_at,
                 row.topic, row.text))
            if cur.rowcount == 1:
                out.stored += 1
            else:
                c.execute("UPDATE findings SET dups = dups + 1 WHERE finding_id = ?", (row.finding_id,))
                out.duplicates += 1
            out.accepted.append((row.topic, "findings", row.finding_id))
        elif isinstance(row, FeedbackRow):
            cur = c.execute(
                "INSERT OR IGNORE INTO feedback(feedback_id, finding_id, verdict, device_id, site, created_at,"
                " received_at, topic, payload) VALUES (?,?,?,?,?,?,?,?,?)",
                (row.feedback_id, row.finding_id, row.verdict, row.device_id, row.site, row.created_at,
                 row.received_at, row.topic, row.text))
            if cur.rowcount == 1:
                out.feedback += 1
            else:
                c.execute("UPDATE feedback SET dups = dups + 1 WHERE feedback_id = ?", (row.feedback_id,))
                out.feedback_duplicates += 1
            out.accepted.append((row.topic, "feedback", row.feedback_id))
        elif isinstance(row, StatusRow):
            # Newest arrival wins: a slower collector's older status never overwrites a newer one.
            c.execute("INSERT INTO device_status(site, device_id, status, retained, received_at, topic)"
                      " VALUES (?,?,?,?,?,?) ON CONFLICT(site, device_id) DO UPDATE SET status = excluded.status,"
                      " retained = excluded.retained, received_at = excluded.received_at, topic = excluded.topic"
                      " WHERE excluded.received_at >= device_status.received_at",
                      (row.site, row.device_id, row.status, int(row.retained), row.received_at, row.topic))
            out.statuses += 1

    def counts(self) -> dict[str, int]:
        with self._lock:
            meta = dict(self.conn.execute("SELECT key, value FROM meta"))
        return {k: meta.get(k, 0) for k in COUNT_KEYS}

    def query(self, sql: str, params: dict[str, Any]) -> list[tuple]:
        with self._lock:
            return self.conn.execute(sql, params).fetchall()

    def stream(self, sql: str, params: dict[str, Any]) -> Iterable[tuple]:
        with self._lock:
            cur = self.conn.execute(sql, params)
            while rows := cur.fetchmany(1000):
                yield from rows

    def close(self) -> None:
        with self._lock:
            self.conn.close()

