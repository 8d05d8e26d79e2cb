"""The hub's tests get a private PostgreSQL server from edge_hub.local_postgres (initdb into a temporary folder,
a free loopback port; as root it runs as the `postgres` user). They skip with a reason when the binaries
(Debian's `postgresql` package; .ci/run installs it) or psycopg (the `test` extra) are missing.
"""
from __future__ import annotations

import importlib.util

import pytest

from edge_hub.local_postgres import PG_BIN, PgServer

__all__ = ["PG_BIN", "PgServer", "needs_postgres"]  # PgServer: re-exported to the tests


def _missing() -> str:
    if PG_BIN is None:
        return "PostgreSQL server binaries not found (apt install postgresql)"
    if importlib.util.find_spec("psycopg") is None:
        return "psycopg 3 not installed (pip install '.[test]')"
    return ""


_why = _missing()
needs_postgres = pytest.mark.skipif(bool(_why), reason=_why or "-")
