"""The install step machine: receiving -> verifying -> unpacking -> self-test -> activation.

Each install is a job folder `<state>/models/jobs/<id>/` with the bundle file and job.json (the step it is at),
written before the step's work starts. A crash (SIGKILL, power loss) at any step leaves either the old version
active or the new one, because the only change to what runs is the rename in store.link(); `recover()`, run at
every daemon start and before every CLI install, finishes the work: a job with its bundle is run again from
verification (its half-written staging folder is deleted first), a job without one is discarded, a ledger one
step behind the link is repaired.

Policy checks after the signature: a version rolled back on this device is refused for good; a version seen
before with other contents is refused (a version names one set of bytes forever); a version below the one
running is refused unless allow_downgrade (local installs only: a remote downgrade would let anyone replay an
old signed bundle); the same version with the same contents is 'unchanged'.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from edge_runtime.engines import EngineOptions
from edge_runtime.errors import EdgeError
from edge_runtime.ota import bundle as bundles
from edge_runtime.ota.store import BUNDLED, ModelStore, utc_now, version_key, write_json_atomic
from edge_runtime.registry import MANIFEST, parse_manifest, verify_signature

log = logging.getLogger("edge_runtime.ota")

STEPS = ("receiving", "verifying", "unpacking", "selftest", "activating")
HALT_ENV = "EDGE_RUNTIME_OTA_HALT"  # tests only: SIGKILL this process when the named step is reached


def halt_point(step: str) -> None:
    """The kill test's hook: the process dies here, as under a power cut, when EDGE_RUNTIME_OTA_HALT names it."""
    if os.environ.get(HALT_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def manifest_sha(folder: Path) -> str:
    """The ledger's identity of a version's contents (bundle.content_id: packing details left out)."""
    return bundles.folder_content_id(Path(folder))


@dataclass
class Outcome:
    """How one install ended. result: activated | unchanged | refused | failed."""

    result: str
    reason: str
    name: str | None = None
    version: str | None = None
    step: str = ""
    previous: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.result in ("activated", "unchanged")

    def line(self) -> str:
        what = f"{self.name} {self.version}" if self.name else "bundle"
        return f"{what}: {self.result}" + (f" ({self.reason})" if self.reason else "")


Baseline = Callable[[str], "tuple[str, str] | None"]  # model name -> (version, manifest sha256) when none is installed


class Installer:
    def __init__(self, store: ModelStore, *, public_key: Path | None, targets: list[tuple[str, str]],
                 options_for: Callable[[str], EngineOptions], baseline: Baseline,
                 max_bytes: int = bundles.DEFAULT_MAX_BYTES, report: Callable[[dict], None] | None = None) -> None:
        self.store = store
        self.public_key = public_key
        self.targets = targets
        self.options_for = options_for
        self.baseline = baseline
        self.max_bytes = max_bytes
        self.report = report or (lambda event: None)
        store.ensure()

    # ------------------------------------------------------------ entry points
    def install(self, path: Path, *, origin: str = "local", remote: bool = False, allow_downgrade: bool = False,
                move: bool = False, label: str | None = None, expect_name: str | None = None) -> Outcome:
        """expect_name: the model the bundle must be for (the hub's announcement, `--model`)."""
        with self.store.lock():
            return self._install(path, origin, remote, allow_downgrade, move, label, expect_name)

    def _install(self, path: Path, origin: str, remote: bool, allow_downgrade: bool, move: bool, label: str | None,
                 expect_name: str | None) -> Outcome:
        """Install a bundle file. move=True: the file is ours (an assembled MQTT bundle) and is moved, not copied."""
        if remote and self.public_key is None:
            outcome = Outcome("refused", "no models.public_key configured on this device: remote installs are refused")
            self._finish(outcome, origin)
            if move:
                Path(path).unlink(missing_ok=True)
            return outcome
        job = self._new_job(Path(path), origin, remote, allow_downgrade, move, label, expect_name)
        return self._run(job)

    def recover(self) -> list[Outcome]:
        """Finish or discard what a crash interrupted; make every ledger agree with its link."""
        with self.store.lock():
            return self._recover()

    def _recover(self) -> list[Outcome]:
        outcomes = []
        for job in sorted(self.store.jobs_dir.glob("*")) if self.store.jobs_dir.is_dir() else []:
            meta = _read_job(job)
            if meta is None or not (job / "bundle.tar").is_file():
                log.warning("models: discarding the interrupted install %s (its bundle never arrived whole)", job.name)
                self.report({"result": "discarded", "reason": "an install interrupted before its bundle was stored "
                             "whole", "step": (meta or {}).get("step", "receiving"), "at": utc_now()})
                shutil.rmtree(job, ignore_errors=True)
                continue
            log.warning("models: resuming the install interrupted at step %s (%s)", meta.get("step"), job.name)
            outcomes.append(self._run(job, resumed=True))
        if self.store.staging_dir.is_dir():
            for leftover in self.store.staging_dir.iterdir():
                shutil.rmtree(leftover, ignore_errors=True)
        for link in self.store.active_dir.glob(".*.link"):  # a new link made, never renamed into place
            link.unlink(missing_ok=True)
        for name in self.store.names():
            self.store.reconcile(name)
        return outcomes

    # ------------------------------------------------------------ the steps
    def _new_job(self, path: Path, origin: str, remote: bool, allow_downgrade: bool, move: bool,
                 label: str | None = None, expect_name: str | None = None) -> Path:
        job = self.store.jobs_dir / f"{utc_now().replace(':', '')}-{uuid.uuid4().hex[:8]}"
        job.mkdir(parents=True)
        meta = {"step": "receiving", "origin": origin, "remote": remote, "allow_downgrade": allow_downgrade,
                "source": label or str(path), "started": utc_now(), "expect_name": expect_name}
        write_json_atomic(job / "job.json", meta)
        target = job / "bundle.tar"
        try:
            if move:
                os.replace(path, target)
            else:
                tmp = job / "bundle.tar.part"
                shutil.copyfile(path, tmp)  # from a USB stick: our own copy, the stick may be pulled
                with open(tmp, "rb+") as fh:
                    os.fsync(fh.fileno())
                os.replace(tmp, target)
        except OSError:
            pass  # _run reports the missing bundle with the reason
        halt_point("receiving")
        return job

    def _step(self, job: Path, meta: dict, step: str, name: str | None = None, version: str | None = None) -> None:
        meta["step"] = step
        if name:
            meta["name"], meta["version"] = name, version
        write_json_atomic(job / "job.json", meta)
        self.report({"model": name, "version": version, "step": step, "result": "in-progress",
                     "origin": meta.get("origin"), "at": utc_now()})
        halt_point(step)

    def _run(self, job: Path, resumed: bool = False) -> Outcome:
        meta = _read_job(job) or {}
        origin = meta.get("origin", "local")
        staging = None
        outcome: Outcome
        try:
            path = job / "bundle.tar"
            if not path.is_file():
                raise bundles.BundleError(meta.get("source", "bundle"), "cannot read the bundle file")
            self._step(job, meta, "verifying")
            vb = bundles.verify(path, self.public_key, max_bytes=self.max_bytes, expect_name=meta.get("expect_name"))
            meta["name"], meta["version"] = vb.name, vb.version
            if not vb.signed:
                log.warning("models: %s %s: signature not checked (no models.public_key configured); file hashes "
                            "checked only", vb.name, vb.version)
            unchanged = self._policy(vb, bool(meta.get("allow_downgrade")) and not meta.get("remote"))
            if unchanged is not None:
                outcome = unchanged
            else:
                self._step(job, meta, "unpacking", vb.name, vb.version)
                staging = self.store.staging_dir / f"{vb.name}-{vb.version}-{job.name}"
                if staging.exists():
                    shutil.rmtree(staging)
                bundles.unpack(vb, staging)
                self._step(job, meta, "selftest", vb.name, vb.version)
                manifest = parse_manifest(staging / MANIFEST)
                if manifest.name != vb.name or manifest.version != vb.version:
                    raise bundles.BundleError(str(path), "the unpacked manifest differs from the verified one")
                if self.public_key is not None:
                    verify_signature(staging, self.public_key)  # as the registry will check it at every load
                from edge_runtime.ota.selftest import run_selftest

                result = run_selftest(manifest, self.targets, self.options_for, halt=halt_point)
                self._step(job, meta, "activating", vb.name, vb.version)
                self.store.add_version(vb.name, vb.version, staging)
                staging = None
                base = self.baseline(vb.name)
                st = self.store.activate(vb.name, vb.version, vb.content_id, base[0] if base else None)
                reason = "self-test passed: " + result.summary() + ("" if vb.signed else "; signature NOT checked "
                                                                   "(no public key)")
                if resumed:
                    reason += "; completed after a restart"
                outcome = Outcome("activated", reason, vb.name, vb.version, "activation", st.previous)
        except EdgeError as exc:
            from edge_runtime.ota.selftest import SelfTestError

            failed = isinstance(exc, SelfTestError)
            name, version = meta.get("name"), meta.get("version")
            if name is None and getattr(exc, "claimed", None):
                name, version = exc.claimed  # what the refused bundle says it is: reported, not trusted
            source = Path(meta.get("source", "bundle")).name  # the file the technician or hub gave, not our copy
            reason = exc.reason if failed else f"{source}: {exc.reason}"
            outcome = Outcome("failed" if failed else "refused", reason, name, version, meta.get("step", ""))
        except OSError as exc:
            outcome = Outcome("failed", f"I/O error: {exc}", meta.get("name"), meta.get("version"),
                              meta.get("step", ""))
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(job, ignore_errors=True)
        self._finish(outcome, origin)
        return outcome

    def _policy(self, vb: bundles.VerifiedBundle, allow_downgrade: bool) -> Outcome | None:
        """Refuse what must not be installed; an Outcome 'unchanged' for a bundle of what already runs."""
        st = self.store.reconcile(vb.name)
        where = str(vb.path.name)
        if vb.version in st.rolled_back:
            raise bundles.BundleError(where, f"{vb.name} {vb.version} was rolled back on this device; publish a "
                                             "new version")
        base = self.baseline(vb.name)
        known = dict(st.versions)
        if base is not None:
            known.setdefault(base[0], base[1])
        if vb.version in known and known[vb.version] != vb.content_id:
            raise bundles.BundleError(where, f"{vb.name} {vb.version} was installed before with other contents; a "
                                             "version may not change: give the new contents a new version")
        running = st.active or (base[0] if base else None)
        if st.active == vb.version:  # the shipped version itself may be installed: its signed copy then runs
            return Outcome("unchanged", f"{vb.version} is already the active version", vb.name, vb.version,
                           "verifying", st.previous)
        if running is not None and version_key(vb.version) < version_key(running) and not allow_downgrade:
            # (the same version as the shipped one is no downgrade: installing its signed copy is provisioning)
            raise bundles.BundleError(where, f"downgrade refused: {vb.name} {vb.version} is older than the running "
                                             f"{running} (a technician may pass --allow-downgrade to a local install)")
        return None

    def _finish(self, outcome: Outcome, origin: str) -> None:
        known = outcome.name and (outcome.name in self.store.names() or self.baseline(outcome.name) is not None)
        if known:  # a refused bundle naming a model this device does not have leaves no ledger behind
            st = self.store.record(outcome.name, outcome.result, outcome.version, outcome.reason, outcome.step) \
                if outcome.result != "activated" else self._record_activated(outcome)
            outcome.previous = st.previous
        event = {"model": outcome.name, "version": outcome.version, "step": outcome.step or "done",
                 "result": outcome.result, "reason": outcome.reason, "origin": origin, "at": utc_now()}
        write_json_atomic(self.store.root / "last.json", event)
        level = logging.INFO if outcome.ok else logging.ERROR
        log.log(level, "models: %s", outcome.line())
        self.report(event)

    def _record_activated(self, outcome: Outcome):
        return self.store.record(outcome.name, "activated", outcome.version, outcome.reason, "activation")

    # ------------------------------------------------------------ by hand
    def rollback(self, name: str, reason: str) -> Outcome:
        with self.store.lock():
            st = self.store.rollback(name, reason)
        now = st.active or BUNDLED
        outcome = Outcome("rolled-back", f"{reason}; now running {now}", name, st.last.get("version"), "rollback",
                          st.previous)
        event = {"model": name, "version": outcome.version, "step": "rollback", "result": "rolled-back",
                 "reason": outcome.reason, "origin": "device", "at": utc_now(), "active": now}
        write_json_atomic(self.store.root / "last.json", event)
        log.warning("models: %s", outcome.line())
        self.report(event)
        return outcome


def _read_job(job: Path) -> dict | None:
    try:
        meta = json.loads((job / "job.json").read_text(encoding="utf-8"))
        return meta if isinstance(meta, dict) else None
    except (OSError, ValueError):
        return None


def targets_for(kind: str, precision: str) -> list[tuple[str, str]]:
    """The (engine, precision) pairs the daemon loads: the configured precision, then int8 to step down to
    (service.ModelRunner's rule)."""
    return [(kind, precision)] + [(kind, p) for p in ("int8",) if p != precision]
