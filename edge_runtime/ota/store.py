"""Installed model versions in the state directory, activated by one atomic rename.

    <state>/models/
      active/<name>          symlink -> ../versions/<name>/<version>; the registry searches active/ first,
                             so what it points at is what runs; absent = the bundled (shipped) version runs
      versions/<name>/<ver>/ complete, verified, self-tested folders; only the active and the previous one kept
      ledger/<name>.json     every version ever installed with its content id (bundle.content_id: a version
                             may never come back with other contents), active/previous, the last result and a short history
      staging/, jobs/, incoming/   work in progress (install.py, chunks.py); a restart cleans them up

Activation writes a new symlink beside the old one and renames it over `active/<name>`: a reader (or a crash)
sees the old version or the new one, never a mix, because a version folder is complete before anything points
at it. The ledger is written after the rename; `reconcile()` (at every start) repairs a ledger that a crash left
one step behind the link.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_runtime.errors import EdgeError
from edge_runtime.ota.bundle import fsync_dir

BUNDLED = "bundled"  # 'previous' when the version before the first install is the shipped one
HISTORY = 20


class StoreError(EdgeError):
    pass


def version_key(version: str) -> tuple:
    """'1.10.0' > '1.9.2'; numeric parts compare as numbers, others as text; '1.0.0-rc1' < '1.0.0'."""
    main, _, pre = version.partition("-")
    parts = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"[.+_]", main) if p)
    return parts + (((1, 0, ""),) if not pre else ((0, 0, pre),))


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class ModelState:
    """One model's ledger, as `status`, `doctor` and the status topic show it."""

    name: str
    active: str | None  # installed version the link points at; None = the bundled one runs
    previous: str | None  # version (or BUNDLED) a rollback goes back to
    versions: dict[str, str]  # version -> content id (bundle.content_id), every version ever installed
    rolled_back: list[str]  # versions refused for good on this device
    last: dict[str, Any]  # {"result", "version", "reason", "step", "at"}
    history: list[dict[str, Any]]
    stack: list[str] = field(default_factory=list)  # versions activated in turn (BUNDLED first), still on disk
    probation: dict[str, Any] = field(default_factory=dict)  # {"version", "until" (unix s), "baseline_rate", "baseline_n"}

    def to_dict(self) -> dict[str, Any]:
        return {"active": self.active, "previous": self.previous, "versions": self.versions,
                "rolled_back": self.rolled_back, "last": self.last, "history": self.history, "stack": self.stack,
                "probation": self.probation}

    def push(self, version: str, before: str | None) -> None:
        if not self.stack and before is not None:
            self.stack.append(before)
        self.stack = [v for v in self.stack if v != version] + [version]
        self.active = version
        self.previous = self.stack[-2] if len(self.stack) > 1 else None


class ModelStore:
    def __init__(self, state_dir: Path) -> None:
        self.root = Path(state_dir) / "models"
        self.active_dir = self.root / "active"
        self.versions_dir = self.root / "versions"
        self.ledger_dir = self.root / "ledger"
        self.staging_dir = self.root / "staging"
        self.jobs_dir = self.root / "jobs"
        self.incoming_dir = self.root / "incoming"

    @contextlib.contextmanager
    def lock(self):
        """One install, rollback or ledger update at a time across processes (the daemon and a technician's CLI)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def ensure(self) -> None:
        for d in (self.active_dir, self.versions_dir, self.ledger_dir, self.staging_dir, self.jobs_dir,
                  self.incoming_dir):
            d.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------ reading
    def names(self) -> list[str]:
        found = {p.stem for p in self.ledger_dir.glob("*.json")} if self.ledger_dir.is_dir() else set()
        if self.active_dir.is_dir():
            found |= {p.name for p in self.active_dir.iterdir() if not p.name.startswith(".")}
        return sorted(found)

    def linked_version(self, name: str) -> str | None:
        """The version active/<name> points at (None: no link, the bundled version runs)."""
        link = self.active_dir / name
        try:
            return Path(os.readlink(link)).name
        except (FileNotFoundError, OSError):
            return None

    def version_dir(self, name: str, version: str) -> Path:
        return self.versions_dir / name / version

    def installed(self, name: str) -> list[str]:
        d = self.versions_dir / name
        if not d.is_dir():
            return []
        return sorted((p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")), key=version_key)

    def state(self, name: str) -> ModelState:
        path = self.ledger_dir / f"{name}.json"
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raw = {}
        except (OSError, ValueError) as exc:
            raise StoreError(str(path), f"unreadable ledger ({exc}); move it away to start a new one") from None
        return ModelState(name, raw.get("active"), raw.get("previous"), dict(raw.get("versions", {})),
                          list(raw.get("rolled_back", [])), dict(raw.get("last", {})), list(raw.get("history", [])),
                          list(raw.get("stack", [])), dict(raw.get("probation", {})))

    def save(self, st: ModelState) -> None:
        st.history = st.history[-HISTORY:]
        write_json_atomic(self.ledger_dir / f"{st.name}.json", st.to_dict())

    def set_probation(self, name: str, probation: dict[str, Any]) -> None:
        """The health watch of a freshly switched version (empty: none), kept so that a restart resumes it."""
        st = self.state(name)
        st.probation = probation
        self.save(st)

    def record(self, name: str, result: str, version: str | None, reason: str, step: str = "") -> ModelState:
        """Set the last result (and append it to the history)."""
        st = self.state(name)
        st.last = {"result": result, "version": version, "reason": reason, "step": step, "at": utc_now()}
        st.history.append(st.last)
        self.save(st)
        return st

    # ------------------------------------------------------------ changing
    def add_version(self, name: str, version: str, staged: Path) -> Path:
        """Move a complete, verified, self-tested folder into versions/ (one rename)."""
        final = self.version_dir(name, version)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():  # left by an interrupted install of this same version: the staged copy is fresh
            if self.linked_version(name) == version:
                raise StoreError(name, f"version {version} is active; it cannot be replaced")
            shutil.rmtree(final)
        os.replace(staged, final)
        fsync_dir(final.parent)
        return final

    def link(self, name: str, version: str | None) -> None:
        """Point active/<name> at a version (None: remove the link, the bundled version runs). Atomic."""
        self.active_dir.mkdir(parents=True, exist_ok=True)
        link = self.active_dir / name
        if version is None:
            try:
                os.unlink(link)
            except FileNotFoundError:
                pass
        else:
            if not self.version_dir(name, version).is_dir():
                raise StoreError(name, f"version {version} is not installed")
            tmp = self.active_dir / f".{name}.{os.getpid()}.link"
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            os.symlink(Path("..") / "versions" / name / version, tmp)
            from edge_runtime.ota.install import halt_point

            halt_point("activating")  # tests: a crash with the new link made but not yet renamed
            os.replace(tmp, link)
        fsync_dir(self.active_dir)

    def activate(self, name: str, version: str, content_id: str, bundled_version: str | None) -> ModelState:
        """Switch to an installed version; the one running before becomes 'previous'."""
        st = self.state(name)
        before = self.linked_version(name)
        self.link(name, version)
        from edge_runtime.ota.install import halt_point

        halt_point("activated")  # tests: a crash after the rename, before the ledger knows
        st.versions[version] = content_id
        st.push(version, before if before is not None else (BUNDLED if bundled_version else None))
        self.save(st)
        self.prune(name)
        return st

    def rollback(self, name: str, reason: str) -> ModelState:
        """Back to the previous version; the version rolled back from is never activated again on this device."""
        st = self.reconcile(name)
        if st.active is None:
            raise StoreError(name, "no installed version is active (the bundled version runs); nothing to roll back")
        if st.previous is None:
            raise StoreError(name, f"version {st.active} has no previous version to go back to")
        bad = st.active
        target = None if st.previous == BUNDLED else st.previous
        self.link(name, target)
        st.rolled_back = sorted(set(st.rolled_back) | {bad}, key=version_key)
        st.probation = {}
        st.stack = [v for v in st.stack if v != bad]
        st.active = target
        st.previous = st.stack[-2] if len(st.stack) > 1 else None
        st.last = {"result": "rolled-back", "version": bad, "reason": reason, "step": "rollback", "at": utc_now(),
                   "now_active": target or BUNDLED}
        st.history.append(st.last)
        self.save(st)
        shutil.rmtree(self.version_dir(name, bad), ignore_errors=True)  # never used again; the ledger keeps its hash
        return st

    def reconcile(self, name: str) -> ModelState:
        """Make the ledger agree with the link (the link is the truth: it is what the registry loads)."""
        st = self.state(name)
        linked = self.linked_version(name)
        if linked is not None and not self.version_dir(name, linked).is_dir():
            self.link(name, None)  # a link to nothing would hide the bundled version
            linked = None
        if st.active != linked:
            if linked is not None and linked not in st.versions:
                from edge_runtime.ota.install import manifest_sha

                st.versions[linked] = manifest_sha(self.version_dir(name, linked))
            if linked is None:
                st.stack = [v for v in st.stack if v != st.active]
                st.active = None
                st.previous = st.stack[-2] if len(st.stack) > 1 else None
            else:
                st.push(linked, st.active or st.previous)
            st.last = {"result": "recovered", "version": linked, "reason": "ledger repaired after a restart: "
                       f"active is {linked or 'the bundled version'}", "step": "activation", "at": utc_now()}
            st.history.append(st.last)
            self.save(st)
        return st

    def prune(self, name: str) -> None:
        """Keep the active and the previous version folders only (the ledger keeps every version's hash)."""
        st = self.state(name)
        keep = {st.active, st.previous, self.linked_version(name)}
        for version in self.installed(name):
            if version not in keep:
                shutil.rmtree(self.version_dir(name, version), ignore_errors=True)
        st.stack = [v for v in st.stack if v == BUNDLED or v in keep]
        self.save(st)
