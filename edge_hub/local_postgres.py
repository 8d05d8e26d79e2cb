"""A private PostgreSQL server on loopback: its own cluster (initdb into a temporary folder), a free port, its
socket in that folder; never the system cluster on 5432. For the hub's tests and benchmarks, as
edge_runtime.local_broker is for Mosquitto.

initdb refuses to run as root, so as root the server runs as Debian's `postgres` user (the folder is handed to
it). `fsync=False` (the default) is for tests only: a benchmark of durable commits passes fsync=True.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from edge_runtime.local_broker import free_port


def pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None



PG_BIN = pg_bin()


class PgServer:
    """start() / stop() (fast shutdown) / kill() (SIGKILL: crash recovery at the next start) / cleanup()."""

    def __init__(self, fsync: bool = False) -> None:
        if PG_BIN is None:
            raise RuntimeError("PostgreSQL server binaries not found (apt install postgresql)")
        self.root = Path(tempfile.mkdtemp(prefix="edge-pg-"))  # not under pytest's root-only tmp_path
        self.data = self.root / "data"
        self.port = free_port()
        self.fsync = fsync
        self.proc: subprocess.Popen | None = None
        self.log = self.root / "postgres.log"
        self._as: dict = {}
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            self._as = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": [],
                        "env": {"PATH": os.environ.get("PATH", ""), "HOME": str(self.root), "LC_ALL": "C.UTF-8"}}
        self._initdb()

    def _initdb(self) -> None:
        out = subprocess.run([str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                              "-E", "UTF8", "--no-sync", "--no-instructions"],
                             capture_output=True, text=True, timeout=120, cwd=self.root, **self._as)
        if out.returncode != 0:
            raise RuntimeError(f"initdb failed: {out.stderr.strip()[-500:]}")

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def database(self, name: str | None = None) -> str:
        """A fresh database on this server: one per test, so tests never see each other's rows."""
        import psycopg

        name = name or f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def start(self, timeout: float = 60.0) -> "PgServer":
        assert self.proc is None or self.proc.poll() is not None, "server already running"
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [str(PG_BIN / "postgres"), "-D", str(self.data), "-p", str(self.port), "-k", str(self.root),
             "-c", "listen_addresses=127.0.0.1", "-c", f"fsync={'on' if self.fsync else 'off'}",
             "-c", "max_connections=50", "-c", "shared_buffers=64MB"],
            stdout=logf, stderr=subprocess.STDOUT, cwd=self.root, **self._as)
        logf.close()
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"postgres did not start on port {self.port}: {self.log_tail()}")
            time.sleep(0.1)
        return self

    def ready(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(self.url, connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown: clients are disconnected, data is kept
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def cleanup(self) -> None:
        self.stop()
        if self.proc is not None and self.proc.poll() is None:
            self.kill()
        shutil.rmtree(self.root, ignore_errors=True)
