"""Where a hub keeps what its collectors take off the broker: one small interface, two stores.

`open_store(db)`: a `postgresql://` (or `postgres://`) URL gives the PostgreSQL store (many collectors, one
database; needs the `hub` extra: psycopg 3); anything else is a SQLite file path (one collector, a small hub).

Both write a batch in one transaction and say what it held: the collector acknowledges the batch's messages
only after `write` returns. A store that cannot reach its database raises `StoreUnavailable`: the collector then
stops acknowledging (the broker keeps the messages) and reconnects with backoff.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol

from edge_hub.messages import Row, parse


class StoreUnavailable(Exception):
    """The database went away (or never came): nothing of the batch is acknowledged."""


@dataclass
class BatchResult:
    stored: int = 0                 # findings new to the database
    duplicates: int = 0             # findings it already had (a re-send)
    rejected: int = 0               # messages that were not what their topic says (kept in `rejected`)
    feedback: int = 0
    feedback_duplicates: int = 0
    statuses: int = 0
    # (topic, kind, id) of every finding and feedback now in the database (new or duplicate): the receipts
    accepted: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, other: "BatchResult") -> None:
        for name in COUNT_KEYS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.accepted += other.accepted


COUNT_KEYS = ("stored", "duplicates", "rejected", "feedback", "feedback_duplicates", "statuses")


class HubStore(Protocol):
    """What the collector and `hub report|export` need from a store."""

    kind: str                        # "sqlite" | "postgresql"
    param: str                       # placeholder for a named parameter: ":{}" or "%({})s"
    epoch: str                       # SQL that turns a stored timestamp column {col} into epoch seconds
    since_param: str                 # SQL comparing {col} with the named epoch parameter since
    as_text: str                     # SQL giving a stored JSON column {col} as text

    def write(self, rows: list[Row]) -> BatchResult: ...
    def ensure(self) -> None: ...
    def counts(self) -> dict[str, int]: ...
    def query(self, sql: str, params: dict[str, Any]) -> list[tuple]: ...
    def stream(self, sql: str, params: dict[str, Any]) -> Iterable[tuple]: ...
    def close(self) -> None: ...


def store_messages(store: "HubStore", messages: list[tuple[str, bytes]],
                   accepted: list[tuple[str, str]] | None = None) -> tuple[int, int, int]:
    """(topic, payload) pairs -> (stored, duplicates, rejected), the collector's old one-call interface.
    `accepted` gets (topic, id) of what is now in the database."""
    now = time.time()
    result = store.write([parse(topic, payload, now) for topic, payload in messages])
    if accepted is not None:
        accepted.extend((topic, ident) for topic, _, ident in result.accepted)
    return result.stored, result.duplicates, result.rejected


def is_postgres_url(db: str) -> bool:
    return str(db).startswith(("postgresql://", "postgres://"))


def open_store(db: str, *, where: str = "collect", name: str = "", connect: bool = True) -> "HubStore":
    """The store for --db: PostgreSQL for a URL, SQLite for a path. `name` labels this collector's rows;
    connect=False leaves a server's first connection to `ensure()`."""
    if is_postgres_url(str(db)):
        from edge_hub.stores.postgres import PostgresStore

        return PostgresStore(str(db), where=where, name=name, connect=connect)
    from edge_hub.stores.sqlite import SqliteStore

    return SqliteStore(db)
