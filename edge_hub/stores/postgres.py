"""The PostgreSQL store: many collectors, one database (psycopg 3, the `hub` extra).

Each collector process holds one connection and writes a batch in one transaction: findings with a single
`INSERT ... SELECT FROM unnest(...) ON CONFLICT (finding_id) DO NOTHING RETURNING` (one round trip whatever the
batch size), duplicates counted on the row they repeat, feedback the same way by feedback_id, device status
upserted (newest arrival wins), messages that are not what their topic says into `rejected`, and this collector's
running counts in `collector_stats` (one row per collector, so collectors never wait on each other's counters).
The arrays travel in binary (%b): text format would escape every quote of every JSON payload, which
cost more than the rest of the collector together. Rows go in sorted by id, so two collectors whose batches overlap (a device re-send handed to another member of
the group) lock them in the same order; a deadlock or serialization failure anyway is retried.

A connection pool would not help here: a collector commits its batches one after another on one connection.

Schema: versioned in `hub_schema`, created and migrated by whichever collector starts first, under an advisory
lock, so N collectors starting at once do not race. Indexes serve `hub report`: (site, device_id, seq) for seq
gaps, (site, device_id, received_at) for last contact and --since, a partial index on urgent findings, and
feedback by finding_id for "not yet reviewed".
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any, Iterable

from edge_hub.messages import FeedbackRow, FindingRow, Rejected, Row, StatusRow
from edge_hub.stores import COUNT_KEYS, BatchResult, StoreUnavailable, store_messages
from edge_runtime.errors import ConfigError

log = logging.getLogger("edge_hub.postgres")

SCHEMA_LOCK = 0x6564676568756231  # pg_advisory_xact_lock key ("edgehub1"): one migrator at a time

_V1 = """
CREATE TABLE findings (
    finding_id  text PRIMARY KEY,
    site        text,
    device_id   text,
    seq         bigint,
    priority    text,
    created_at  text,                      -- as the device wrote it (UTC ISO 8601)
    received_at timestamptz NOT NULL,      -- when a collector took it off the broker
    stored_at   timestamptz NOT NULL DEFAULT now(),
    collector   text,
    topic       text NOT NULL,
    payload     jsonb NOT NULL,
    dups        integer NOT NULL DEFAULT 0 -- how many more times it arrived
);
CREATE INDEX findings_site_device_seq ON findings (site, device_id, seq);
CREATE INDEX findings_site_device_received ON findings (site, device_id, received_at);
CREATE INDEX findings_received ON findings (received_at);
CREATE INDEX findings_urgent ON findings (site, device_id) WHERE priority = 'urgent';
CREATE TABLE feedback (
    feedback_id text PRIMARY KEY,
    finding_id  text NOT NULL,
    verdict     text NOT NULL,
    site        text,
    device_id   text,
    created_at  text,
    received_at timestamptz NOT NULL,
    topic       text NOT NULL,
    payload     jsonb NOT NULL,
    dups        integer NOT NULL DEFAULT 0
);
CREATE INDEX feedback_finding ON feedback (finding_id);
CREATE TABLE device_status (
    site        text NOT NULL,
    device_id   text NOT NULL,
    status      text NOT NULL,
    retained    boolean NOT NULL,
    received_at timestamptz NOT NULL,
    topic       text NOT NULL,
    PRIMARY KEY (site, device_id)
);
CREATE TABLE rejected (
    id          bigserial PRIMARY KEY,
    topic       text NOT NULL,
    payload     bytea,
    reason      text NOT NULL,
    received_at timestamptz NOT NULL,
    collector   text
);
CREATE TABLE collector_stats (
    collector   text PRIMARY KEY,
    stored      bigint NOT NULL DEFAULT 0,
    duplicates  bigint NOT NULL DEFAULT 0,
    rejected    bigint NOT NULL DEFAULT 0,
    feedback    bigint NOT NULL DEFAULT 0,
    feedback_duplicates bigint NOT NULL DEFAULT 0,
    statuses    bigint NOT NULL DEFAULT 0,
    batches     bigint NOT NULL DEFAULT 0,
    last_commit timestamptz
);
"""
MIGRATIONS = (_V1,)  # index i brings hub_schema.version i to i + 1

_INSERT_FINDINGS = """
INSERT INTO findings (finding_id, site, device_id, seq, priority, created_at, received_at, collector, topic, payload)
SELECT f, s, d, q, p, c, to_timestamp(r), %(collector)s, t, j::jsonb
FROM unnest(%(f)b::text[], %(s)b::text[], %(d)b::text[], %(q)b::bigint[], %(p)b::text[], %(c)b::text[],
            %(r)b::float8[], %(t)b::text[], %(j)b::text[]) AS u(f, s, d, q, p, c, r, t, j)
ORDER BY f
ON CONFLICT (finding_id) DO NOTHING
RETURNING finding_id
"""
_INSERT_FEEDBACK = """
INSERT INTO feedback (feedback_id, finding_id, verdict, site, device_id, created_at, received_at, topic, payload)
SELECT b, f, v, s, d, c, to_timestamp(r), t, j::jsonb
FROM unnest(%(b)b::text[], %(f)b::text[], %(v)b::text[], %(s)b::text[], %(d)b::text[], %(c)b::text[],
            %(r)b::float8[], %(t)b::text[], %(j)b::text[]) AS u(b, f, v, s, d, c, r, t, j)
ORDER BY b
ON CONFLICT (feedback_id) DO NOTHING
RETURNING feedback_id
"""
_COUNT_DUPS = """
UPDATE {table} SET dups = {table}.dups + u.n
FROM (SELECT * FROM unnest(%(ids)b::text[], %(ns)b::int[]) AS u(id, n) ORDER BY id) AS u
WHERE {table}.{key} = u.id
"""
_UPSERT_STATUS = """
INSERT INTO device_status (site, device_id, status, retained, received_at, topic)
VALUES (%s, %s, %s, %s, to_timestamp(%s), %s)
ON CONFLICT (site, device_id) DO UPDATE SET status = EXCLUDED.status, retained = EXCLUDED.retained,
    received_at = EXCLUDED.received_at, topic = EXCLUDED.topic
WHERE EXCLUDED.received_at >= device_status.received_at
"""
_INSERT_REJECTED = ("INSERT INTO rejected (topic, payload, reason, received_at, collector)"
                    " VALUES (%s, %s, %s, to_timestamp(%s), %s)")
_STATS = """
INSERT INTO collector_stats AS s (collector, stored, duplicates, rejected, feedback, feedback_duplicates, statuses,
                                  batches, last_commit)
VALUES (%s, %s, %s, %s, %s, %s, %s, 1, now())
ON CONFLICT (collector) DO UPDATE SET stored = s.stored + EXCLUDED.stored, duplicates = s.duplicates +
    EXCLUDED.duplicates, rejected = s.rejected + EXCLUDED.rejected, feedback = s.feedback + EXCLUDED.feedback,
    feedback_duplicates = s.feedback_duplicates + EXCLUDED.feedback_duplicates,
    statuses = s.statuses + EXCLUDED.statuses, batches = s.batches + 1, last_commit = now()
"""


def _psycopg():
    try:
        import psycopg
    except ImportError:
        raise ConfigError("collect", "--db postgresql://... needs psycopg 3: pip install 'edge-runtime[hub]'") from None
    return psycopg


def redact(url: str) -> str:
    """The URL without its password, for log lines."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


class PostgresStore:
    kind = "postgresql"
    param = "%({})s"
    epoch = "extract(epoch from {col})"
    since_param = "{col} >= to_timestamp(%(since)s)"
    as_text = "{col}::text"
    retries = 3  # deadlock / serialization failure: the batch is retried whole

    def __init__(self, url: str, *, where: str = "collect", name: str = "", connect: bool = True) -> None:
        self.psycopg = _psycopg()
        self.url = url
        self.where = where
        self.name = name or "collector"
        self.conn = None
        if connect:
            self.ensure()

    # ------------------------------------------------------------ connection and schema
    def ensure(self) -> None:
        """Connect (and create or migrate the schema) if not connected; StoreUnavailable when the server is not
        there, ConfigError when it answers but refuses (bad credentials, no such database)."""
        if self.conn is not None and not self.conn.closed:
            return
        psycopg = self.psycopg
        try:
            # autocommit: every write is an explicit transaction() block; a lone query commits by itself.
            self.conn = psycopg.connect(self.url, autocommit=True, connect_timeout=10,
                                        application_name=f"edge-hub {self.name}"[:63])
            self._migrate()
        except psycopg.OperationalError as exc:
            self._drop()
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if "authentication failed" in message or "does not exist" in message:
                raise ConfigError(self.where, f"--db {redact(self.url)}: {message}") from None
            raise StoreUnavailable(f"database {redact(self.url)} unavailable: {message}") from None
        except psycopg.Error as exc:
            self._drop()
            raise StoreUnavailable(f"database {redact(self.url)}: {exc}") from None

    def _migrate(self) -> None:
        conn = self.conn
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS hub_schema (version integer NOT NULL)")
            version = conn.execute("SELECT coalesce(max(version), 0) FROM hub_schema").fetchone()[0]
            if version > len(MIGRATIONS):
                raise ConfigError(self.where, f"--db {redact(self.url)}: schema version {version} is newer than this "
                                              f"collector knows ({len(MIGRATIONS)}); upgrade edge-runtime")
            for target, script in enumerate(MIGRATIONS[version:], start=version + 1):
                conn.execute(script)
                conn.execute("INSERT INTO hub_schema (version) VALUES (%s)", (target,))
                log.info("hub database %s: schema version %d", redact(self.url), target)

    def _drop(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except Exception:  # noqa: BLE001 - closing a broken connection: nothing to report
                pass
        self.conn = None

    # ------------------------------------------------------------ writing
    def store(self, messages: list[tuple[str, bytes]],
              accepted: list[tuple[str, str]] | None = None) -> tuple[int, int, int]:
        return store_messages(self, messages, accepted)

    def write(self, rows: list[Row]) -> BatchResult:
        psycopg = self.psycopg
        for attempt in range(self.retries + 1):
            self.ensure()
            try:
                try:
                    return self._write_batch(rows)
                except psycopg.errors.DataError as exc:
                    # One row the server refuses (NaN in a payload's JSON, say): find it, keep the others.
                    log.warning("hub database: batch refused (%s); storing its %d messages one by one",
                                str(exc).splitlines()[0], len(rows))
                    return self._write_one_by_one(rows)
            except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure) as exc:
                if attempt == self.retries:
                    raise StoreUnavailable(f"database {redact(self.url)}: {exc}") from None
                time.sleep(0.05 * (attempt + 1))
            except psycopg.OperationalError as exc:
                self._drop()
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise StoreUnavailable(f"database {redact(self.url)} lost: {first}") from None
        raise AssertionError("unreachable")

    def _write_batch(self, rows: list[Row]) -> BatchResult:
        out = BatchResult()
        with self.conn.transaction():
            self._write_rows(rows, out)
            self._write_stats(out)
        return out

    def _write_one_by_one(self, rows: list[Row]) -> BatchResult:
        psycopg = self.psycopg
        out = BatchResult()
        with self.conn.transaction():
            for row in rows:
                part = BatchResult()
                try:
                    with self.conn.transaction():  # a savepoint: one bad row rolls back alone
                        self._write_rows([row], part)
                except psycopg.errors.DataError as exc:
                    payload = getattr(row, "text", "").encode()
                    reason = f"refused by the database: {str(exc).splitlines()[0]}"
                    part = BatchResult()
                    self._write_rows([Rejected(row.topic, payload, reason, row.received_at)], part)
                out.add(part)
            self._write_stats(out)
        return out

    def _write_rows(self, rows: list[Row], out: BatchResult) -> None:
        cur = self.conn.cursor()
        findings = [r for r in rows if isinstance(r, FindingRow)]
        feedback = [r for r in rows if isinstance(r, FeedbackRow)]
        if findings:
            cur.execute(_INSERT_FINDINGS, {
                "collector": self.name, "f": [r.finding_id for r in findings], "s": [r.site for r in findings],
                "d": [r.device_id for r in findings], "q": [r.seq for r in findings],
                "p": [r.priority for r in findings], "c": [r.created_at for r in findings],
                "r": [r.received_at for r in findings], "t": [r.topic for r in findings],
                "j": [r.text for r in findings]})
            new = {row[0] for row in cur.fetchall()}
            out.stored += len(new)
            out.duplicates += self._count_dups(cur, "findings", "finding_id", [r.finding_id for r in findings], new)
            out.accepted += [(r.topic, "findings", r.finding_id) for r in findings]
        if feedback:
            cur.execute(_INSERT_FEEDBACK, {
                "b": [r.feedback_id for r in feedback], "f": [r.finding_id for r in feedback],
                "v": [r.verdict for r in feedback], "s": [r.site for r in feedback],
                "d": [r.device_id for r in feedback], "c": [r.created_at for r in feedback],
                "r": [r.received_at for r in feedback], "t": [r.topic for r in feedback],
                "j": [r.text for r in feedback]})
            new = {row[0] for row in cur.fetchall()}
            out.feedback += len(new)
            out.feedback_duplicates += self._count_dups(cur, "feedback", "feedback_id",
                                                        [r.feedback_id for r in feedback], new)
            out.accepted += [(r.topic, "feedback", r.feedback_id) for r in feedback]
        latest: dict[tuple[str, str], StatusRow] = {}
        for r in rows:
            if isinstance(r, StatusRow) and (
                    (r.site, r.device_id) not in latest or r.received_at >= latest[(r.site, r.device_id)].received_at):
                latest[(r.site, r.device_id)] = r  # one upsert per device per statement
        if latest:
            cur.executemany(_UPSERT_STATUS, [(r.site, r.device_id, r.status, r.retained, r.received_at, r.topic)
                                             for r in sorted(latest.values(), key=lambda r: (r.site, r.device_id))])
        out.statuses += sum(isinstance(r, StatusRow) for r in rows)
        rejected = [r for r in rows if isinstance(r, Rejected)]
        if rejected:
            cur.executemany(_INSERT_REJECTED, [(r.topic, r.payload, r.reason, r.received_at, self.name)
                                               for r in rejected])
            out.rejected += len(rejected)

    @staticmethod
    def _count_dups(cur, table: str, key: str, ids: list[str], new: set[str]) -> int:
        """Every arrival of an id beyond its first stored copy is a duplicate (within the batch or not)."""
        extra = {i: n - (1 if i in new else 0) for i, n in Counter(ids).items()}
        extra = {i: n for i, n in extra.items() if n}
        if extra:
            order = sorted(extra)
            cur.execute(_COUNT_DUPS.format(table=table, key=key), {"ids": order, "ns": [extra[i] for i in order]})
        return sum(extra.values())

    def _write_stats(self, out: BatchResult) -> None:
        self.conn.execute(_STATS, (self.name, *(getattr(out, k) for k in COUNT_KEYS)))

    # ------------------------------------------------------------ reading
    def counts(self) -> dict[str, int]:
        """Totals over every collector writing to this database."""
        row = self.query("SELECT " + ", ".join(f"coalesce(sum({k}), 0)" for k in COUNT_KEYS)
                         + " FROM collector_stats", {})[0]
        return {k: int(v) for k, v in zip(COUNT_KEYS, row)}

    def query(self, sql: str, params: dict[str, Any]) -> list[tuple]:
        self.ensure()
        try:
            return self.conn.execute(sql, params).fetchall()
        except self.psycopg.OperationalError as exc:
            self._drop()
            raise StoreUnavailable(f"database {redact(self.url)} lost: {str(exc).strip()}") from None

    def stream(self, sql: str, params: dict[str, Any]) -> Iterable[tuple]:
        """A server-side cursor: an export of millions of rows never sits in memory."""
        self.ensure()
        with self.conn.transaction():
            with self.conn.cursor(name="edge_hub_export") as cur:
                cur.itersize = 2000
                cur.execute(sql, params)
                yield from cur

    def close(self) -> None:
        self._drop()
