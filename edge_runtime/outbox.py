"""The outbox: the durable store every finding enters before anything else may happen to it.

A finding is accepted only once its row is committed (SQLite WAL, synchronous=FULL). The outbox owns `seq`:
it is assigned inside the committing transaction from a counter in the `meta` table, so it is monotonic per
device and never reused, even after rows are pruned. Study sources pass a `source_item` (the pseudonymous SOP
Instance UID and frame index): committing an item that is already stored returns the existing seq and stores
nothing, so a file re-processed after a crash never gives a second finding.

Concurrent `commit` calls from several worker threads share one transaction and one fsync (group commit:
whoever takes the write lock commits everything queued so far), so commit latency stays about one fsync
while throughput grows with the number of writers.

A row has three delivery states: **pending** (not yet acknowledged by the broker), **sent** (PUBACK: the broker
has it) and **stored** (a receipt from a collector: the hub has committed it). With `keep_until_stored` (the
daemon sets it from `mqtt.require_receipts`) only stored rows count as done: a broker that crashes and loses what
it acknowledged cannot lose a finding, because the sent rows stay and are re-sent until a receipt comes. Without
it, a PUBACK is the end of the road, as before receipts existed. A receipt never touches a row that was never sent.

Caps (rows, payload bytes, age) are enforced inside the committing transaction: done rows go first (stored, and
sent too without `keep_until_stored`), then routine rows not yet done, oldest first, sent ones before pending ones
(evicted, counted, and listed in `evicted`), urgent rows never; if only urgent rows remain over a cap they are kept
and an alarm is counted. A full disk or database (SQLITE_FULL) first prunes done rows and retries once, then
raises `OutboxFull`: an alarm for the caller (study files stay in their inbox and are retried), never a crash and
never a half-stored finding.

Schema version 2 added the stored state; a version 1 file is migrated in place, in one transaction, on open: its
delivered rows become sent (a PUBACK was all they ever had).

Destinations other than MQTT (the clinic's PACS) have a delivery state of their own in `deliveries`, one row per
finding and destination, committed in the finding's own transaction (`commit(..., deliveries={...})`), so each
destination is independent of the others and of the MQTT state above, which it never touches. A delivery row keeps
its own copy of the payload and the destination-only data (`local`: the PACS needs the real study UIDs, which
never enter the MQTT payload), so the caps that prune findings after their MQTT delivery cannot take a delivery
that is still owed; both are cleared once the destination has the object. Pending deliveries are never evicted.
The table has its own version (meta `deliveries_schema`): a file without it gets it in the opening transaction.

Clinicians' feedback on a finding (the local view's confirm / correct) travels the same road as a finding, to
`.../feedback` instead of `.../findings`: a row committed (fsync) before the view answers, pending, sent, stored by
the collector's receipt (`feedback_ids`). Its rows take their seq from a counter of their own below zero (-1, -2,
...; `seq < 0` is what marks a row as feedback), so the findings' seq, in which the hub looks for gaps, keeps none;
the `finding_id` column holds the feedback_id. Its rank (-1) sends it first and keeps it out of the urgent and
routine counts (`stats()["pending_feedback"]`); the caps never evict or prune it (done feedback ages out after
`max_age_days` like any done row): a clinician's verdict is a handful of bytes and never worth a finding's room.
"""
from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from edge_runtime.errors import EdgeError
from edge_runtime.findings import PRIORITIES, to_json

log = logging.getLogger("edge_runtime.outbox")

RANK = {"urgent": 0, "routine": 1}
PRIORITY_OF_RANK = {v: k for k, v in RANK.items()}
PENDING, SENT, STORED = 0, 1, 2
DELIVERED = SENT  # the name before receipts existed: a PUBACK
STATE_NAMES = {PENDING: "pending", SENT: "sent", STORED: "stored"}
SCHEMA_VERSION = 2
REFUSED = 3  # deliveries only: the destination refused the object; kept with its status, not retried
NOT_OWED = 4  # deliveries only: the finding cannot go to this destination (the reason is kept: a PNG has no UIDs)
DELIVERY_STATE_NAMES = {PENDING: "pending", STORED: "stored", REFUSED: "refused", NOT_OWED: "not owed"}
DELIVERIES_SCHEMA = 1
RESEND_BACKOFF_MAX = 5  # a row still without a receipt waits receipt_timeout * 2**resends, resends capped here
EVICTED_LOG_ROWS = 100_000  # how many evicted findings are remembered by id (for audit and tests)
AGE_CHECK_INTERVAL_S = 60.0
_CHUNK = 500  # parameters per IN (...) list

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS findings (
    seq          INTEGER PRIMARY KEY,          -- assigned from meta.next_seq: monotonic, never reused
    finding_id   TEXT NOT NULL UNIQUE,
    rank         INTEGER NOT NULL,             -- 0 urgent, 1 routine: publish order is (rank, seq)
    created_at   REAL NOT NULL,                -- unix time of the commit (age cap)
    payload      TEXT NOT NULL,                -- the Finding JSON exactly as published
    bytes        INTEGER NOT NULL,
    source_item  TEXT UNIQUE,                  -- study sources: what was processed (NULL for live frames)
    state        INTEGER NOT NULL DEFAULT 0,   -- 0 pending, 1 sent (PUBACK received), 2 stored (hub receipt)
    attempts     INTEGER NOT NULL DEFAULT 0,   -- publishes that ended without a PUBACK
    delivered_at REAL,                         -- the last PUBACK (kept when re-sent for want of a receipt)
    stored_at    REAL,                         -- schema 2: the receipt
    resends      INTEGER NOT NULL DEFAULT 0    -- schema 2: re-sends for want of a receipt
);
CREATE INDEX IF NOT EXISTS findings_pending ON findings(rank, seq) WHERE state = 0;
CREATE INDEX IF NOT EXISTS findings_delivered ON findings(seq) WHERE state = 1;
CREATE INDEX IF NOT EXISTS findings_delivered_at ON findings(delivered_at) WHERE state = 1;
CREATE INDEX IF NOT EXISTS findings_stored ON findings(seq) WHERE state = 2;
CREATE INDEX IF NOT EXISTS findings_age ON findings(created_at);
CREATE TABLE IF NOT EXISTS deliveries (         -- deliveries_schema 1: per-destination state (not MQTT)
    destination  TEXT NOT NULL,                -- e.g. 'pacs'
    seq          INTEGER NOT NULL,             -- the finding's seq (the finding row may be pruned before this one)
    finding_id   TEXT NOT NULL,
    rank         INTEGER NOT NULL,
    state        INTEGER NOT NULL DEFAULT 0,   -- 0 pending, 2 stored (the destination has it), 3 refused, 4 not owed
    payload      TEXT NOT NULL,                -- the finding JSON ('' once stored)
    local        TEXT NOT NULL,                -- destination-only JSON, never published ('' once stored)
    attempts     INTEGER NOT NULL DEFAULT 0,   -- tries that ended without the destination having it
    next_at      REAL NOT NULL DEFAULT 0,      -- unix time before which it is not tried again (backoff)
    status       INTEGER,                      -- the destination's last status code (DICOM: 0x0000 success)
    detail       TEXT NOT NULL DEFAULT '',     -- why it was refused or is retried
    created_at   REAL NOT NULL,
    done_at      REAL,
    PRIMARY KEY (destination, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries(destination, rank, seq) WHERE state = 0;
CREATE INDEX IF NOT EXISTS deliveries_refused ON deliveries(destination, done_at) WHERE state = 3;
CREATE TABLE IF NOT EXISTS evicted (
    seq        INTEGER PRIMARY KEY,
    finding_id TEXT NOT NULL,
    rank       INTEGER NOT NULL,
    reason     TEXT NOT NULL,                  -- rows | bytes | age
    evicted_at REAL NOT NULL
);
"""

# Counters kept in `meta`, read and written inside each write transaction (so a second process that opens the
# same file for inspection never sees them torn).
_META_KEYS = (
    "schema_version", "next_seq", "rows", "bytes", "pending_rows_0", "pending_rows_1", "pending_bytes_0",
    "pending_bytes_1", "delivered", "pruned", "evicted", "over_cap_alarms", "full_alarms", "requeued",
    "sent_rows", "stored", "receipt_requeued", "feedback_count", "pending_rows_-1", "pending_bytes_-1",
)
# Feedback rows: rank -1 sorts them before urgent findings in the publish order (they are few and small), and
# their pending counters (pending_rows_-1) stay out of the urgent/routine ones that gauges and alerts read.
FEEDBACK_RANK = -1
PRIORITY_OF_RANK[FEEDBACK_RANK] = "feedback"


class OutboxError(EdgeError):
    """The outbox cannot store or read findings (I/O error, corrupt file, ...)."""


class OutboxFull(OutboxError):
    """The disk or database is full: nothing of this commit was stored. An alarm; retry later."""


@dataclass(frozen=True)
class Row:
    seq: int
    finding_id: str  # the feedback_id for a feedback row
    priority: str
    payload: str
    attempts: int

    @property
    def kind(self) -> str:
        """The topic's last level this row is published to: 'findings' or 'feedback' (seq below zero)."""
        return "feedback" if self.seq < 0 else "findings"


@dataclass(frozen=True)
class DeliveryRow:
    """A finding owed to a destination other than MQTT, with that destination's own data."""

    seq: int
    finding_id: str
    priority: str
    payload: str
    local: dict[str, Any]
    attempts: int


@dataclass(frozen=True)
class DeliveryOutcome:
    """What a destination said about one delivery: 'stored', 'refused' or 'retry' (not before retry_at)."""

    seq: int
    outcome: str
    status: int | None = None
    detail: str = ""
    retry_at: float | None = None


class _Request:
    __slots__ = ("items", "result", "error", "done")

    def __init__(self, items: list[tuple[dict[str, Any], str | None]]) -> None:
        self.items = items
        self.result: list[int] = []
        self.error: BaseException | None = None
        self.done = False


def _is_full(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return (code & 0xFF) == sqlite3.SQLITE_FULL
    return "full" in str(exc).lower()


def delivery_copy(finding: dict[str, Any]) -> dict[str, Any]:
    """The finding as another destination (the PACS) keeps it while owed: without its pictures (the explanation's
    overlay and grid, the exam's key-frame thumbnail). They can be 30 KB a finding, a report carries none of them,
    and a PACS down for days must not grow the outbox past its byte cap with copies of them."""
    slim = {k: v for k, v in finding.items() if k != "explanation"}
    if "explanation" in finding:
        slim["explanation"] = {k: v for k, v in finding["explanation"].items() if k not in ("overlay", "grid")}
    key_frame = (finding.get("exam") or {}).get("key_frame")
    if isinstance(key_frame, dict) and "thumbnail" in key_frame:
        slim["exam"] = {**finding["exam"], "key_frame": {k: v for k, v in key_frame.items() if k != "thumbnail"}}
    return slim


def _rollback(conn: sqlite3.Connection) -> None:
    """End a failed write transaction. A rollback that fails too (the connection is broken) is not the error to
    report: the caller raises the one that made it roll back."""
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass


def _chunks(seq: Sequence[int], n: int = _CHUNK) -> Iterable[Sequence[int]]:
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


class Outbox:
    def __init__(
        self,
        path: str | Path,
        *,
        max_rows: int = 1_000_000,
        max_bytes: int = 1 << 30,
        max_age_days: float = 90.0,
        max_page_count: int | None = None,
        clock: Callable[[], float] = time.time,
        keep_until_stored: bool = False,
    ) -> None:
        self.path = Path(path)
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.max_age_s = max_age_days * 86400.0 if max_age_days > 0 else 0.0
        self.clock = clock
        self.keep_until_stored = keep_until_stored
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write_lock = threading.Lock()  # every write transaction, on either connection
        self._read_lock = threading.Lock()
        self._queue_lock = threading.Lock()
        self._queue: list[_Request] = []
        self._last_age_check = 0.0
        self._evict_logged_at = -1e9
        self._evicted_unlogged = 0
        self._closed = False
        self.commits = 0  # in-process change counter: the uplink re-reads the outbox when it moves
        self.last_alarm = ""
        try:
            self._w = self._connect(max_page_count)
            self._w.executescript(_SCHEMA)
            self._w.execute("BEGIN IMMEDIATE")
            version = self._w.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if not version:
                self._init_meta()
            elif version[0] < SCHEMA_VERSION:
                self._migrate(version[0])
            self._ensure_deliveries_schema()
            self._w.execute("COMMIT")
            self._r = self._connect(None)
            self._r.execute("PRAGMA query_only = ON")
        except sqlite3.Error as exc:
            raise OutboxError(str(self.path), f"cannot open the outbox database ({exc})") from None

    @classmethod
    def from_config(cls, config) -> "Outbox":
        o = config.outbox
        path = Path(o.path) if o.path else config.state_dir / "outbox.sqlite"
        return cls(path, max_rows=o.max_rows, max_bytes=o.max_bytes, max_age_days=o.max_age_days,
                   keep_until_stored=config.mqtt.require_receipts)

    def _migrate(self, version: int) -> None:
        """Inside the opening transaction: bring an older file to SCHEMA_VERSION (DDL is transactional in SQLite,
        so a crash mid-way leaves the old file as it was)."""
        if version < 2:
            columns = {r[1] for r in self._w.execute("PRAGMA table_info(findings)")}
            for name, decl in (("stored_at", "REAL"), ("resends", "INTEGER NOT NULL DEFAULT 0")):
                if name not in columns:
                    self._w.execute(f"ALTER TABLE findings ADD COLUMN {name} {decl}")
            sent = self._w.execute("SELECT COUNT(*) FROM findings WHERE state = 1").fetchone()[0]
            self._w.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                                [("sent_rows", sent), ("schema_version", SCHEMA_VERSION)])
            log.warning("outbox %s: migrated from schema %d to %d; its %d delivered finding(s) are now 'sent' "
                        "(they wait for a hub receipt when mqtt.require_receipts is on)", self.path, version,
                        SCHEMA_VERSION, sent)

    def _ensure_deliveries_schema(self) -> None:
        """Inside the opening transaction: the deliveries table is created by _SCHEMA; record its version (a file
        written before it existed has no deliveries to migrate)."""
        row = self._w.execute("SELECT value FROM meta WHERE key = 'deliveries_schema'").fetchone()
        if not row or row[0] < DELIVERIES_SCHEMA:
            self._w.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('deliveries_schema', ?)",
                            (DELIVERIES_SCHEMA,))
            if row is None and self._w.execute("SELECT COUNT(*) FROM findings").fetchone()[0]:
                log.info("outbox %s: added per-destination delivery state (deliveries schema %d); findings "
                         "committed before it are not sent to other destinations", self.path, DELIVERIES_SCHEMA)

    def _connect(self, max_page_count: int | None) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = OFF")
        if max_page_count:
            conn.execute(f"PRAGMA max_page_count = {int(max_page_count)}")
        return conn

    # ------------------------------------------------------------ meta counters
    def _load_meta(self, conn: sqlite3.Connection | None = None) -> dict[str, int]:
        meta = {k: 0 for k in _META_KEYS}
        meta.update((conn or self._w).execute("SELECT key, value FROM meta").fetchall())
        return meta

    def _init_meta(self) -> None:
        row = self._w.execute("SELECT COUNT(*), COALESCE(SUM(bytes), 0), COALESCE(MAX(seq), 0) FROM findings").fetchone()
        meta = {k: 0 for k in _META_KEYS}
        meta.update(schema_version=SCHEMA_VERSION, next_seq=row[2] + 1, rows=row[0], bytes=row[1])
        for rank, n, b in self._w.execute(
                "SELECT rank, COUNT(*), COALESCE(SUM(bytes), 0) FROM findings WHERE state = 0 GROUP BY rank"):
            meta[f"pending_rows_{rank}"], meta[f"pending_bytes_{rank}"] = n, b
        meta["sent_rows"] = self._w.execute("SELECT COUNT(*) FROM findings WHERE state = 1").fetchone()[0]
        self._save_meta(meta, {})

    def _save_meta(self, meta: dict[str, int], before: dict[str, int]) -> None:
        changed = [(k, v) for k, v in meta.items() if before.get(k) != v]
        if changed:
            self._w.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", changed)

    # ------------------------------------------------------------ commit
    def commit(self, finding: dict[str, Any], source_item: str | None = None,
               deliveries: dict[str, dict[str, Any] | str] | None = None) -> int:
        """Store one finding durably; returns its seq. The dict gets its `seq` (and a `finding_id` if it had
        none) once committed. If `source_item` was committed before, returns that seq and stores nothing.
        `deliveries` {destination: local data} owes the finding to those destinations too, in the same
        transaction (the local data is stored for that destination only, never published); a str instead of
        the data records why the finding is not owed to that destination (counted and shown, never sent)."""
        return self.commit_many([(finding, source_item, deliveries) if deliveries else (finding, source_item)])[0]

    def commit_many(self, items: Sequence[tuple]) -> list[int]:
        """Store several findings in one transaction: all or none. Returns their seqs in order. Each item is
        (finding, source_item) or (finding, source_item, deliveries)."""
        items = list(items)
        for finding, *_ in items:
            priority = finding.get("priority", "routine")
            if priority not in RANK:
                raise ValueError(f"finding priority must be one of {', '.join(PRIORITIES)}, got {priority!r}")
        if not items:
            return []
        req = _Request(items)
        with self._queue_lock:
            self._queue.append(req)
        with self._write_lock:
            if not req.done:  # nobody committed it for us while we waited: lead a group commit
                with self._queue_lock:
                    group, self._queue = self._queue, []
                self._commit_group(group)
        if req.error is not None:
            raise req.error
        return req.result

    def _commit_group(self, group: list[_Request]) -> None:
        try:
            try:
                self._commit_group_once(group)
            except OutboxFull:
                # Make room from delivered rows (safe to drop) and try once more before raising the alarm.
                if self._prune_delivered_for_space(max(1000, 2 * sum(len(r.items) for r in group))):
                    self._commit_group_once(group)
                else:
                    raise
        except OutboxFull as exc:
            self._count_alarm("full_alarms", exc.reason)
            for r in group:
                r.error = OutboxFull(exc.subject, exc.reason)
        except Exception as exc:  # noqa: BLE001 - every waiting caller must get an answer
            for r in group:
                r.error = exc
        finally:
            for r in group:
                r.done = True

    def _commit_group_once(self, group: list[_Request]) -> None:
        conn = self._w
        now = self.clock()
        pending_results: list[tuple[_Request, list[int], list[tuple[dict[str, Any], int, str]]]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            meta = self._load_meta()
            before = dict(meta)
            for r in group:
                if r.error is not None:
                    continue
                conn.execute("SAVEPOINT req")
                saved = dict(meta)
                try:
                    seqs, updates = self._insert_items(r.items, meta, now)
                    conn.execute("RELEASE req")
                    pending_results.append((r, seqs, updates))
                except (ValueError, TypeError) as exc:  # this caller's bad finding (e.g. NaN): only it fails
                    conn.execute("ROLLBACK TO req")
                    conn.execute("RELEASE req")
                    meta.clear()
                    meta.update(saved)
                    r.error = exc
            self._enforce_caps(meta, now)
            self._save_meta(meta, before)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            _rollback(conn)
            for r in group:
                if isinstance(r.error, (ValueError, TypeError)):
                    r.error = None  # retried with the others if we try again
            if _is_full(exc):
                raise OutboxFull(str(self.path), f"disk or database full ({exc}); nothing stored, retry later") from None
            raise OutboxError(str(self.path), f"commit failed ({exc})") from None
        for r, seqs, updates in pending_results:
            for finding, seq, finding_id in updates:
                finding["seq"] = seq
                finding["finding_id"] = finding_id
            r.result = seqs
        self.commits += 1

    def _insert_items(self, items, meta: dict[str, int], now: float) -> tuple[list[int], list]:
        conn = self._w
        seqs: list[int] = []
        updates = []
        for item in items:
            finding, source_item = item[0], item[1]
            deliveries = item[2] if len(item) > 2 else None  # (finding, source_item[, deliveries])
            if source_item is not None:
                row = conn.execute("SELECT seq, finding_id FROM findings WHERE source_item = ?", (source_item,)).fetchone()
                if row is not None:
                    seqs.append(row[0])
                    continue
            finding_id = str(finding.get("finding_id") or uuid.uuid4())
            row = conn.execute("SELECT seq FROM findings WHERE finding_id = ?", (finding_id,)).fetchone()
            if row is not None:  # the same finding committed twice: idempotent
                seqs.append(row[0])
                continue
            seq = meta["next_seq"]
            rank = RANK[finding.get("priority", "routine")]
            payload = to_json({**finding, "seq": seq, "finding_id": finding_id})
            size = len(payload.encode("utf-8"))
            conn.execute(
                "INSERT INTO findings(seq, finding_id, rank, created_at, payload, bytes, source_item) VALUES (?,?,?,?,?,?,?)",
                (seq, finding_id, rank, now, payload, size, source_item),
            )
            meta["next_seq"] = seq + 1
            meta["rows"] += 1
            meta["bytes"] += size
            meta[f"pending_rows_{rank}"] += 1
            meta[f"pending_bytes_{rank}"] += size
            copy = None  # what an owed destination keeps of the finding, made once
            for destination, local in (deliveries or {}).items():
                if isinstance(local, str):  # not owed, and why
                    conn.execute("INSERT INTO deliveries(destination, seq, finding_id, rank, state, payload, local, "
                                 "detail, created_at, done_at) VALUES (?,?,?,?,?,'','',?,?,?)",
                                 (destination, seq, finding_id, rank, NOT_OWED, local[:500], now, now))
                    continue
                if copy is None:
                    copy = to_json(delivery_copy({**finding, "seq": seq, "finding_id": finding_id}))
                conn.execute("INSERT INTO deliveries(destination, seq, finding_id, rank, payload, local, created_at) "
                             "VALUES (?,?,?,?,?,?,?)", (destination, seq, finding_id, rank, copy,
                                                         json.dumps(local, separators=(",", ":"), allow_nan=False),
                                                         now))
            seqs.append(seq)
            updates.append((finding, seq, finding_id))
        return seqs, updates

    # ------------------------------------------------------------ caps
    def _over(self, meta: dict[str, int]) -> bool:
        return meta["rows"] > self.max_rows or meta["bytes"] > self.max_bytes

    def _done_sql(self) -> str:
        """Rows whose delivery is finished: safe to prune (stored; sent too when no receipt is required)."""
        return "state = 2" if self.keep_until_stored else "state >= 1"

    def _cap_steps(self) -> tuple[tuple[str, str], ...]:
        """(condition, index) in the order rows give way to a cap: done rows, then routine rows not yet done,
        sent ones (the broker has them) before pending ones; urgent rows never."""
        if self.keep_until_stored:  # seq > 0: findings only; feedback rows are never taken by a cap
            return (("state = 2 AND seq > 0", "findings_stored"), ("state = 1 AND rank = 1", "findings_delivered"),
                    ("state = 0 AND rank = 1", "findings_pending"))
        return (("state = 2 AND seq > 0", "findings_stored"), ("state = 1 AND seq > 0", "findings_delivered"),
                ("state = 0 AND rank = 1", "findings_pending"))

    def _enforce_caps(self, meta: dict[str, int], now: float) -> None:
        """Inside the write transaction: done rows first, then routine rows oldest first, never urgent."""
        if self.max_age_s and now - self._last_age_check >= AGE_CHECK_INTERVAL_S:
            self._last_age_check = now
            cutoff = now - self.max_age_s
            old = self._w.execute("SELECT seq, rank, bytes, state, finding_id FROM findings WHERE created_at < ? "
                                  f"AND ({self._done_sql()} OR rank = 1) ORDER BY seq", (cutoff,)).fetchall()
            self._remove(old, meta, now, "age")
            # Finished deliveries (stored, refused) age out too; a pending one is owed and stays.
            self._w.execute("DELETE FROM deliveries WHERE state >= 2 AND created_at < ?", (cutoff,))
        if not self._over(meta):
            return
        for state_sql, index in self._cap_steps():
            while self._over(meta):
                excess_rows = meta["rows"] - self.max_rows
                excess_bytes = meta["bytes"] - self.max_bytes
                batch = self._w.execute(
                    f"SELECT seq, rank, bytes, state, finding_id FROM findings INDEXED BY {index} "
                    f"WHERE {state_sql} ORDER BY seq LIMIT ?", (max(64, min(excess_rows, 10_000)),)).fetchall()
                if not batch:
                    break
                chosen = []
                for row in batch:
                    if excess_rows <= 0 and excess_bytes <= 0:
                        break
                    chosen.append(row)
                    excess_rows -= 1
                    excess_bytes -= row[2]
                why = "rows" if meta["rows"] > self.max_rows else "bytes"
                self._remove(chosen, meta, now, why)
        if self._over(meta):
            # Only urgent findings are left over the cap: keep every one of them and raise the alarm.
            meta["over_cap_alarms"] += 1
            self._note_alarm(f"outbox over its cap with only urgent findings pending ({meta['rows']} rows, "
                             f"{meta['bytes']} bytes); keeping them all")

    def _remove(self, rows: list[tuple], meta: dict[str, int], now: float, reason: str) -> None:
        if not rows:
            return
        seqs = [r[0] for r in rows]
        for chunk in _chunks(seqs):
            self._w.execute(f"DELETE FROM findings WHERE seq IN ({','.join('?' * len(chunk))})", chunk)
        evicted = []
        for seq, rank, size, state, finding_id in rows:
            meta["rows"] -= 1
            meta["bytes"] -= size
            if state == SENT:
                meta["sent_rows"] -= 1
            if state == STORED or (state == SENT and not self.keep_until_stored):
                meta["pruned"] += 1
                continue
            if state == PENDING:
                meta[f"pending_rows_{rank}"] -= 1
                meta[f"pending_bytes_{rank}"] -= size
            meta["evicted"] += 1  # never confirmed stored by the hub: an eviction, listed for audit
            evicted.append((seq, finding_id, rank, reason, now))
        if evicted:
            self._w.executemany("INSERT OR REPLACE INTO evicted(seq, finding_id, rank, reason, evicted_at) VALUES (?,?,?,?,?)", evicted)
            self._w.execute("DELETE FROM evicted WHERE seq <= (SELECT seq FROM evicted ORDER BY seq DESC LIMIT 1 OFFSET ?)",
                            (EVICTED_LOG_ROWS,))
            self._evicted_unlogged += len(evicted)
            if time.monotonic() - self._evict_logged_at >= 60.0:  # a full store evicts on every commit: say it once a minute
                log.warning("outbox cap (%s): evicted %d routine finding(s) since the last report, oldest first",
                            reason, self._evicted_unlogged)
                self._evict_logged_at, self._evicted_unlogged = time.monotonic(), 0

    def _prune_delivered_for_space(self, n: int) -> int:
        """After SQLITE_FULL: drop up to n done rows (oldest first) so their pages can be reused."""
        conn = self._w
        try:
            conn.execute("BEGIN IMMEDIATE")
            meta = self._load_meta()
            before = dict(meta)
            rows = conn.execute("SELECT seq, rank, bytes, state, finding_id FROM findings INDEXED BY findings_stored "
                                "WHERE state = 2 AND seq > 0 ORDER BY seq LIMIT ?", (n,)).fetchall()
            if not self.keep_until_stored and len(rows) < n:
                rows += conn.execute("SELECT seq, rank, bytes, state, finding_id FROM findings INDEXED BY "
                                     "findings_delivered WHERE state = 1 AND seq > 0 ORDER BY seq LIMIT ?",
                                     (n - len(rows),)).fetchall()
            self._remove(rows, meta, self.clock(), "space")
            self._save_meta(meta, before)
            conn.execute("COMMIT")
            return len(rows)
        except sqlite3.Error:
            _rollback(conn)
            return 0

    def _note_alarm(self, text: str) -> None:
        if text != self.last_alarm:
            log.error("ALARM: %s", text)
        self.last_alarm = text

    def _count_alarm(self, key: str, text: str) -> None:
        """Called with the write lock held."""
        self._note_alarm(text)
        try:
            self._w.execute("INSERT INTO meta(key, value) VALUES (?, 1) ON CONFLICT(key) DO UPDATE SET value = value + 1", (key,))
        except sqlite3.Error:
            pass  # the disk is full: the alarm is still logged and raised to the caller

    # ------------------------------------------------------------ uplink side
    def next_batch(self, limit: int, exclude: Iterable[int] = ()) -> list[Row]:
        """Up to `limit` pending rows in publish order (urgent first, then seq), skipping `exclude` (in flight)."""
        exclude = list(exclude)
        sql = "SELECT seq, finding_id, rank, payload, attempts FROM findings INDEXED BY findings_pending WHERE state = 0"
        if exclude:
            sql += f" AND seq NOT IN ({','.join('?' * len(exclude))})"
        sql += " ORDER BY rank, seq LIMIT ?"
        with self._read_lock:
            rows = self._r.execute(sql, (*exclude, limit)).fetchall()
        return [Row(seq, fid, PRIORITY_OF_RANK[rank], payload, attempts) for seq, fid, rank, payload, attempts in rows]

    def mark_delivered(self, seqs: Iterable[int]) -> int:
        """PUBACK received for these rows. Returns how many changed state. Written without an fsync of its own:
        a mark lost to a power cut only means the finding is sent again (same finding_id), never lost."""
        seqs = sorted(set(seqs))
        if not seqs:
            return 0
        return self._update_pending(seqs, deliver=True)

    def record_attempts(self, seqs: Iterable[int]) -> None:
        """These rows were published but the PUBACK never came (link lost, rejected): they stay pending."""
        seqs = sorted(set(seqs))
        if seqs:
            self._update_pending(seqs, deliver=False)

    def _update_pending(self, seqs: list[int], deliver: bool) -> int:
        conn = self._w
        changed = 0
        with self._write_lock:
            try:
                conn.execute("PRAGMA synchronous = NORMAL")
                conn.execute("BEGIN IMMEDIATE")
                meta = self._load_meta()
                before = dict(meta)
                now = self.clock()
                for chunk in _chunks(seqs):
                    marks = ",".join("?" * len(chunk))
                    if deliver:
                        rows = conn.execute(f"SELECT rank, bytes FROM findings WHERE state = 0 AND seq IN ({marks})", chunk).fetchall()
                        conn.execute(f"UPDATE findings SET state = 1, delivered_at = ? WHERE state = 0 AND seq IN ({marks})", (now, *chunk))
                        for rank, size in rows:
                            meta[f"pending_rows_{rank}"] -= 1
                            meta[f"pending_bytes_{rank}"] -= size
                        meta["delivered"] += len(rows)
                        meta["sent_rows"] += len(rows)
                        changed += len(rows)
                    else:
                        conn.execute(f"UPDATE findings SET attempts = attempts + 1 WHERE state = 0 AND seq IN ({marks})", chunk)
                self._save_meta(meta, before)
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                _rollback(conn)
                if _is_full(exc):
                    raise OutboxFull(str(self.path), f"disk or database full while marking delivery ({exc})") from None
                raise OutboxError(str(self.path), f"cannot mark delivery ({exc})") from None
            finally:
                try:
                    conn.execute("PRAGMA synchronous = FULL")
                except sqlite3.Error:
                    pass
        if changed:
            self.commits += 1
        return changed

    def requeue_delivered(self, window_s: float) -> int:
        """Make pending again the rows delivered within `window_s` seconds before the most recent delivery; returns
        how many. The uplink calls this when the broker has lost its session: whatever that broker acknowledged but
        had not yet passed on to a subscriber is gone with it, so those findings are sent again (same finding_id;
        consumers deduplicate). The window ends at the last delivery, not now, so a broker that stayed down for
        longer than the window still gets back what it held when it went down. Durable (synchronous=FULL): a
        requeue lost to a power cut would be a silent loss."""
        conn = self._w
        n = 0
        with self._write_lock:
            try:
                conn.execute("BEGIN IMMEDIATE")
                last = conn.execute("SELECT MAX(delivered_at) FROM findings WHERE state = 1").fetchone()[0]
                if last is not None:
                    since = last - window_s
                    meta = self._load_meta()
                    before = dict(meta)
                    rows = conn.execute("SELECT rank, COUNT(*), COALESCE(SUM(bytes), 0) FROM findings "
                                        "INDEXED BY findings_delivered_at WHERE state = 1 AND delivered_at >= ? "
                                        "GROUP BY rank", (since,)).fetchall()
                    conn.execute("UPDATE findings SET state = 0, delivered_at = NULL "
                                 "WHERE state = 1 AND delivered_at >= ?", (since,))
                    for rank, count, size in rows:
                        meta[f"pending_rows_{rank}"] += count
                        meta[f"pending_bytes_{rank}"] += size
                        n += count
                    meta["requeued"] += n
                    meta["sent_rows"] -= n
                    self._save_meta(meta, before)
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                _rollback(conn)
                raise OutboxError(str(self.path), f"cannot requeue delivered findings ({exc})") from None
        if n:
            self.commits += 1
        return n

    def mark_stored(self, finding_ids: Iterable[str]) -> tuple[int, int]:
        """A hub receipt for these finding_ids: mark them stored. Returns (newly stored, unknown). Only a row that
        was sent (PUBACK) can become stored, also one made pending again for a re-send; a row never sent, an id
        this outbox does not hold (pruned, another device's, made up) is unknown and changes nothing. A receipt
        repeated for a row already stored is neither. Written without an fsync of its own: a mark lost to a power
        cut means one more re-send (a duplicate at the hub), never a loss."""
        ids = sorted({i for i in finding_ids if isinstance(i, str)})
        if not ids:
            return 0, 0
        conn = self._w
        stored = known = 0
        with self._write_lock:
            try:
                conn.execute("PRAGMA synchronous = NORMAL")
                conn.execute("BEGIN IMMEDIATE")
                meta = self._load_meta()
                before = dict(meta)
                now = self.clock()
                for chunk in _chunks(ids):
                    rows = conn.execute(f"SELECT seq, state, rank, bytes, delivered_at FROM findings WHERE finding_id "
                                        f"IN ({','.join('?' * len(chunk))})", chunk).fetchall()
                    marked = []
                    for seq, state, rank, size, sent_at in rows:
                        if state == STORED:
                            known += 1
                        elif state == SENT or sent_at is not None:  # pending again for a re-send: was sent before
                            known += 1
                            marked.append(seq)
                            if state == SENT:
                                meta["sent_rows"] -= 1
                            else:
                                meta[f"pending_rows_{rank}"] -= 1
                                meta[f"pending_bytes_{rank}"] -= size
                    for part in _chunks(marked):
                        conn.execute(f"UPDATE findings SET state = 2, stored_at = ? WHERE seq IN "
                                     f"({','.join('?' * len(part))})", (now, *part))
                    stored += len(marked)
                meta["stored"] += stored
                self._save_meta(meta, before)
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                _rollback(conn)
                raise OutboxError(str(self.path), f"cannot mark findings stored ({exc})") from None
            finally:
                try:
                    conn.execute("PRAGMA synchronous = FULL")
                except sqlite3.Error:
                    pass
        if stored:
            self.commits += 1
        return stored, len(ids) - known

    def requeue_unstored(self, older_than_s: float | None, sent_before: float | None = None) -> int:
        """Make pending again the sent rows still without a receipt; returns how many. `older_than_s` None: all of
        them whose PUBACK came before `sent_before` (a new connection: whatever the broker held before it may be
        gone; what this connection sent is not in doubt yet). Otherwise only rows whose last PUBACK is
        older than `older_than_s * 2**resends` (resends capped at RESEND_BACKOFF_MAX): a hub away for a day gets a
        copy every hour or so, not every two minutes. The row keeps its finding_id and its PUBACK time, so a
        receipt that arrives for the earlier copy still counts. Durable (synchronous=FULL)."""
        conn = self._w
        n = 0
        now = self.clock()
        with self._write_lock:
            try:
                conn.execute("BEGIN IMMEDIATE")
                if older_than_s is None:
                    rows = conn.execute("SELECT seq, rank, bytes FROM findings INDEXED BY findings_delivered_at "
                                        "WHERE state = 1 AND delivered_at < ?",
                                        (now if sent_before is None else sent_before,)).fetchall()
                else:
                    rows = conn.execute(
                        "SELECT seq, rank, bytes FROM findings INDEXED BY findings_delivered_at "
                        "WHERE state = 1 AND delivered_at < ? AND delivered_at < ? - ? * (1 << MIN(resends, ?))",
                        (now - older_than_s, now, older_than_s, RESEND_BACKOFF_MAX)).fetchall()
                if rows:
                    meta = self._load_meta()
                    before = dict(meta)
                    for chunk in _chunks([r[0] for r in rows]):
                        conn.execute(f"UPDATE findings SET state = 0, resends = resends + 1 WHERE seq IN "
                                     f"({','.join('?' * len(chunk))})", chunk)
                    for _, rank, size in rows:
                        meta[f"pending_rows_{rank}"] += 1
                        meta[f"pending_bytes_{rank}"] += size
                    n = len(rows)
                    meta["sent_rows"] -= n
                    meta["receipt_requeued"] += n
                    self._save_meta(meta, before)
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                _rollback(conn)
                raise OutboxError(str(self.path), f"cannot requeue findings without a receipt ({exc})") from None
        if n:
            self.commits += 1
        return n

    # ------------------------------------------------------------ other destinations (deliveries)
    def due_deliveries(self, destination: str, limit: int, now: float | None = None,
                       exclude: Iterable[int] = ()) -> list[DeliveryRow]:
        """Up to `limit` pending deliveries to `destination` whose backoff has passed, urgent first, then seq."""
        exclude = list(exclude)
        now = self.clock() if now is None else now
        sql = ("SELECT seq, finding_id, rank, payload, local, attempts FROM deliveries INDEXED BY deliveries_due "
               "WHERE destination = ? AND state = 0 AND next_at <= ?")
        if exclude:
            sql += f" AND seq NOT IN ({','.join('?' * len(exclude))})"
        sql += " ORDER BY rank, seq LIMIT ?"
        with self._read_lock:
            rows = self._r.execute(sql, (destination, now, *exclude, limit)).fetchall()
        return [DeliveryRow(seq, fid, PRIORITY_OF_RANK[rank], payload, json.loads(local), attempts)
                for seq, fid, rank, payload, local, attempts in rows]

    def next_delivery_at(self, destination: str) -> float | None:
        """When the earliest pending delivery to `destination` may be tried (None: nothing is pending)."""
        with self._read_lock:
            row = self._r.execute("SELECT MIN(next_at) FROM deliveries INDEXED BY deliveries_due WHERE "
                                  "destination = ? AND state = 0", (destination,)).fetchone()
        return row[0] if row else None

    def mark_deliveries(self, destination: str, outcomes: Sequence[DeliveryOutcome]) -> int:
        """Record what the destination said, in one transaction; returns how many rows changed. stored: done, the
        payload and local data are dropped (the destination holds them now); refused: kept with the status and
        the reason, never tried again; retry: attempts + 1, not before `retry_at`. Only pending rows change.
        Written without an fsync of its own: a mark lost to a power cut means the same object is sent again
        (the destination already has it or refuses it again), never a loss."""
        if not outcomes:
            return 0
        conn = self._w
        now = self.clock()
        changed = 0
        with self._write_lock:
            try:
                conn.execute("PRAGMA synchronous = NORMAL")
                conn.execute("BEGIN IMMEDIATE")
                counts = {"stored": 0, "refused": 0}
                for o in outcomes:
                    if o.outcome == "stored":
                        cur = conn.execute("UPDATE deliveries SET state = 2, payload = '', local = '', status = ?, "
                                           "detail = ?, done_at = ? WHERE destination = ? AND seq = ? AND state = 0",
                                           (o.status, o.detail, now, destination, o.seq))
                    elif o.outcome == "refused":
                        cur = conn.execute("UPDATE deliveries SET state = 3, attempts = attempts + 1, status = ?, "
                                           "detail = ?, done_at = ? WHERE destination = ? AND seq = ? AND state = 0",
                                           (o.status, o.detail, now, destination, o.seq))
                    elif o.outcome == "retry":
                        cur = conn.execute("UPDATE deliveries SET attempts = attempts + 1, status = ?, detail = ?, "
                                           "next_at = ? WHERE destination = ? AND seq = ? AND state = 0",
                                           (o.status, o.detail, o.retry_at or now, destination, o.seq))
                    else:
                        raise ValueError(f"delivery outcome must be stored, refused or retry; got {o.outcome!r}")
                    changed += cur.rowcount
                    if o.outcome in counts:
                        counts[o.outcome] += cur.rowcount
                for what, n in counts.items():
                    if n:
                        conn.execute("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET "
                                     "value = value + excluded.value", (f"{destination}_{what}", n))
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                _rollback(conn)
                raise OutboxError(str(self.path), f"cannot mark {destination} deliveries ({exc})") from None
            finally:
                try:
                    conn.execute("PRAGMA synchronous = FULL")
                except sqlite3.Error:
                    pass
        return changed

    def requeue_refused(self, destination: str, finding_ids: Iterable[str] | None = None) -> int:
        """Make refused deliveries pending again (all, or these finding_ids): an operator fixed the cause (the
        PACS now accepts the SOP class). Returns how many. Durable."""
        conn = self._w
        with self._write_lock:
            try:
                conn.execute("BEGIN IMMEDIATE")
                if finding_ids is None:
                    cur = conn.execute("UPDATE deliveries SET state = 0, next_at = 0, done_at = NULL WHERE "
                                       "destination = ? AND state = 3", (destination,))
                    n = cur.rowcount
                else:
                    n = 0
                    for fid in set(finding_ids):
                        n += conn.execute("UPDATE deliveries SET state = 0, next_at = 0, done_at = NULL WHERE "
                                          "destination = ? AND state = 3 AND finding_id = ?",
                                          (destination, fid)).rowcount
                if n:
                    conn.execute("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET "
                                 "value = value - excluded.value", (f"{destination}_refused", n))
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                _rollback(conn)
                raise OutboxError(str(self.path), f"cannot requeue refused {destination} deliveries ({exc})") from None
        return n

    def delivery_stats(self, destination: str) -> dict[str, Any]:
        """pending (owed now), stored and refused (ever, less those requeued), the oldest pending one's age."""
        meta = self._read_meta()
        with self._read_lock:
            pending, oldest = self._r.execute(
                "SELECT COUNT(*), MIN(created_at) FROM deliveries INDEXED BY deliveries_due WHERE destination = ? "
                "AND state = 0", (destination,)).fetchone()
        return {"pending": pending, "stored": meta.get(f"{destination}_stored", 0),
                "refused": meta.get(f"{destination}_refused", 0),
                "oldest_pending_s": round(self.clock() - oldest, 1) if oldest is not None else None}

    def refused_deliveries(self, destination: str, limit: int = 20) -> list[dict[str, Any]]:
        """The most recent refusals: finding_id, status, reason, when (newest first)."""
        with self._read_lock:
            rows = self._r.execute("SELECT finding_id, seq, status, detail, done_at, attempts FROM deliveries INDEXED "
                                   "BY deliveries_refused WHERE destination = ? AND state = 3 ORDER BY done_at DESC "
                                   "LIMIT ?", (destination, limit)).fetchall()
        return [{"finding_id": fid, "seq": seq, "status": status, "reason": detail, "at": at, "attempts": attempts}
                for fid, seq, status, detail, at, attempts in rows]

    def not_owed_reasons(self, destination: str, limit: int = 10) -> dict[str, int]:
        """Why findings were not owed to `destination`: reason -> how many (the most frequent reasons)."""
        with self._read_lock:
            return dict(self._r.execute("SELECT detail, COUNT(*) AS n FROM deliveries WHERE destination = ? AND "
                                        "state = 4 GROUP BY detail ORDER BY n DESC LIMIT ?", (destination, limit)))

    def delivery_states(self, destination: str) -> dict[str, str]:
        """finding_id -> 'pending' | 'stored' | 'refused' | 'not owed' for `destination` (tests and audits)."""
        with self._read_lock:
            return {fid: DELIVERY_STATE_NAMES[st] for fid, st in self._r.execute(
                "SELECT finding_id, state FROM deliveries WHERE destination = ?", (destination,))}

    # ------------------------------------------------------------ inspection
    def has_source_item(self, source_item: str) -> bool:
        with self._read_lock:
            return self._r.execute("SELECT 1 FROM findings WHERE source_item = ?", (source_item,)).fetchone() is not None

    def pending_by_priority(self) -> dict[str, int]:
        meta = self._read_meta()
        return {p: meta.get(f"pending_rows_{r}", 0) for p, r in RANK.items()}

    def depth(self) -> int:
        """Pending rows, feedback included: not yet acknowledged by the broker (what the uplink still owes)."""
        meta = self._read_meta()
        return sum(meta.get(f"pending_rows_{r}", 0) for r in (*RANK.values(), FEEDBACK_RANK))

    def sent_unstored(self) -> int:
        """Rows the broker acknowledged that no hub receipt has confirmed yet."""
        return self._read_meta().get("sent_rows", 0)


    def stats(self) -> dict[str, Any]:
        meta = self._read_meta()
        return {
            "pending": {p: meta.get(f"pending_rows_{r}", 0) for p, r in RANK.items()},
            "pending_bytes": {p: meta.get(f"pending_bytes_{r}", 0) for p, r in RANK.items()},
            "pending_feedback": meta.get(f"pending_rows_{FEEDBACK_RANK}", 0),  # clinicians' feedback not yet sent
            "rows": meta.get("rows", 0),
            "bytes": meta.get("bytes", 0),
            "next_seq": meta.get("next_seq", 1),
            "delivered": meta.get("delivered", 0),  # ever marked sent (PUBACK)
            "sent_unstored": meta.get("sent_rows", 0),  # sent (PUBACK), no hub receipt yet
            "stored": meta.get("stored", 0),  # ever confirmed stored by a hub receipt
            "receipt_requeued": meta.get("receipt_requeued", 0),  # sent rows re-sent for want of a receipt
            "pruned": meta.get("pruned", 0),  # done rows removed to respect the caps
            "evicted": meta.get("evicted", 0),  # routine findings removed before delivery
            "requeued": meta.get("requeued", 0),  # delivered rows made pending again after the broker lost its session
            "over_cap_alarms": meta.get("over_cap_alarms", 0),
            "full_alarms": meta.get("full_alarms", 0),
            "last_alarm": self.last_alarm,
        }

    def evicted_ids(self) -> list[str]:
        """finding_ids of the most recent evictions (up to EVICTED_LOG_ROWS), oldest first."""
        with self._read_lock:
            return [r[0] for r in self._r.execute("SELECT finding_id FROM evicted ORDER BY seq")]

    def finding_ids(self) -> dict[str, str]:
        """finding_id -> state ('pending' | 'sent' | 'stored') of every finding row, feedback left out (tests and
        audits)."""
        with self._read_lock:
            return {fid: STATE_NAMES[st] for fid, st in
                    self._r.execute("SELECT finding_id, state FROM findings WHERE seq > 0")}

    def payload(self, seq: int) -> dict[str, Any] | None:
        with self._read_lock:
            row = self._r.execute("SELECT payload FROM findings WHERE seq = ?", (seq,)).fetchone()
        return json.loads(row[0]) if row else None

    def _select(self, sql: str, params: tuple, what: str) -> list[tuple]:
        """A read on the read connection; a closed or failing database is an OutboxError naming what was read."""
        with self._read_lock:
            try:
                return self._r.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise OutboxError(str(self.path), f"cannot read {what} ({exc})") from None

    def finding(self, finding_id: str) -> dict[str, Any] | None:
        """The finding with this id as published (None: never committed here, or pruned since)."""
        rows = self._select("SELECT payload FROM findings WHERE finding_id = ? AND seq > 0", (finding_id,), "a finding")
        return json.loads(rows[0][0]) if rows else None

    def recent_findings(self, limit: int) -> list[tuple[dict[str, Any], str]]:
        """The newest `limit` findings still held (payload, delivery state), newest first."""
        rows = self._select("SELECT payload, state FROM findings WHERE seq > 0 ORDER BY seq DESC LIMIT ?", (limit,),
                            "the recent findings")
        return [(json.loads(p), STATE_NAMES[st]) for p, st in rows]

    def findings_after(self, seq: int, limit: int = 200) -> list[dict[str, Any]]:
        """Findings committed after `seq`, oldest first (what a watcher has not seen yet)."""
        rows = self._select("SELECT payload FROM findings WHERE seq > ? ORDER BY seq LIMIT ?", (max(0, seq), limit),
                            "new findings")
        return [json.loads(p) for (p,) in rows]

    # ------------------------------------------------------------ feedback
    def commit_feedback(self, record: dict[str, Any]) -> tuple[dict[str, Any], bool, str]:
        """Store one feedback record durably (synchronous=FULL, like a finding) to be published on .../feedback.
        Returns (the stored record, True, 'pending') or, when its feedback_id was committed before, (that record,
        False, its delivery state): a retried POST stores nothing twice."""
        feedback_id = str(record["feedback_id"])
        try:
            payload = to_json(record)
            size = len(payload.encode("utf-8"))
        except (ValueError, TypeError, UnicodeError) as exc:  # e.g. a lone surrogate: nothing is stored
            raise OutboxError(str(self.path), f"the feedback cannot be stored as UTF-8 JSON ({exc})") from None
        conn = self._w
        with self._write_lock:
            try:
                conn.execute("BEGIN IMMEDIATE")
                row = conn.execute("SELECT payload, state FROM findings WHERE finding_id = ?",
                                   (feedback_id,)).fetchone()
                if row is not None:
                    conn.execute("COMMIT")
                    return json.loads(row[0]), False, STATE_NAMES[row[1]]
                meta = self._load_meta()
                before = dict(meta)
                seq = -(meta["feedback_count"] + 1)
                conn.execute("INSERT INTO findings(seq, finding_id, rank, created_at, payload, bytes) "
                             "VALUES (?,?,?,?,?,?)", (seq, feedback_id, FEEDBACK_RANK, self.clock(), payload, size))
                meta["feedback_count"] += 1
                meta["rows"] += 1
                meta["bytes"] += size
                meta[f"pending_rows_{FEEDBACK_RANK}"] += 1
                meta[f"pending_bytes_{FEEDBACK_RANK}"] += size
                self._save_meta(meta, before)
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                _rollback(conn)
                if _is_full(exc):
                    raise OutboxFull(str(self.path), f"disk or database full ({exc}); the feedback was not "
                                                     "stored, retry later") from None
                raise OutboxError(str(self.path), f"cannot store feedback ({exc})") from None
        self.commits += 1
        return json.loads(payload), True, "pending"

    def feedback(self, limit: int = 100) -> list[tuple[dict[str, Any], str]]:
        """The newest `limit` feedback records still held (record, delivery state), newest first."""
        rows = self._select("SELECT payload, state FROM findings WHERE seq < 0 ORDER BY seq LIMIT ?", (limit,),
                            "the feedback")
        return [(json.loads(p), STATE_NAMES[st]) for p, st in rows]

    def feedback_pending(self) -> int:
        return self._read_meta().get(f"pending_rows_{FEEDBACK_RANK}", 0)

    def _read_meta(self) -> dict[str, int]:
        with self._read_lock:
            try:
                return self._load_meta(self._r)
            except sqlite3.Error as exc:  # closed or broken: the caller's error to handle, not a raw sqlite one
                raise OutboxError(str(self.path), f"cannot read the outbox counters ({exc})") from None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._write_lock, self._read_lock:
            for conn in (self._r, self._w):
                try:
                    conn.close()
                except sqlite3.Error:
                    pass

    def __enter__(self) -> "Outbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
