"""What the daemon runs for model updates: bundles from MQTT, installs on a thread of their own, the status
topic, the switch to a new version without a restart, and the rollbacks (load failure, health rule).

Threads: the uplink thread only stores chunks (chunks.Receiver.accept) and wakes the agent; the agent thread
assembles, installs (verification and the self-test load engines: seconds, never on the uplink or a worker) and
asks the service to switch (`switch(name) -> None | reason`), which builds the new runner beside the old one
and swaps it in between two items.
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
from pathlib import Path
from typing import Callable

from edge_runtime.findings import DeviceIdentity
from edge_runtime.ota.chunks import ChunkError, Receiver, parse
from edge_runtime.ota.health import HealthWatch
from edge_runtime.ota.install import Installer
from edge_runtime.ota.store import BUNDLED, ModelStore, utc_now

log = logging.getLogger("edge_runtime.ota")


class OtaAgent:
    def __init__(self, store: ModelStore, installer: Installer, receiver: Receiver, health: HealthWatch,
                 identity: DeviceIdentity, topic_prefix: str,
                 baseline: Callable[[str], "tuple[str, str] | None"]) -> None:
        self.store = store
        self.installer = installer
        self.receiver = receiver
        self.health = health
        self.identity = identity
        self.baseline = baseline
        prefix = topic_prefix.rstrip("/")
        self.topic_device = f"{prefix}/{identity.site}/{identity.device_id}/models/bundle"
        self.topic_site = f"{prefix}/{identity.site}/models/bundle"
        self.topic_status = f"{prefix}/{identity.site}/{identity.device_id}/models/status"
        self.publish: Callable[[str, bytes, bool], None] | None = None  # set by the service (uplink.post)
        self.switch: Callable[[str], str | None] = lambda name: None  # set by the service
        self.last_event: dict = {}
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._refused_unsigned: str | None = None
        self.busy = False  # an item from the queue is being handled (the service leaves the links alone then)
        installer.report = self.report_event

    # ------------------------------------------------------------ uplink thread
    def on_bundle_message(self, payload: bytes) -> None:
        """Store one message durably (the PUBACK follows this return); the agent thread does the rest."""
        if self.installer.public_key is None:  # refused anyway: do not fill the disk with its chunks first
            try:
                bundle = parse(payload, self.receiver.max_bytes).bundle
            except ChunkError:
                bundle = ""
            if bundle != self._refused_unsigned:
                self._refused_unsigned = bundle
                reason = "no models.public_key configured on this device: remote installs are refused"
                log.error("models: a bundle arrived over MQTT: %s", reason)
                self.report_event({"result": "refused", "reason": reason, "step": "receiving", "at": utc_now(),
                                   "origin": "mqtt"})
            return
        try:
            got = self.receiver.accept(payload)
        except ChunkError as exc:
            self.report_event({"result": "refused", "reason": str(exc), "step": "receiving", "at": utc_now(),
                          "origin": "mqtt"})
            log.error("models: %s", exc)
            return
        except OSError as exc:
            log.error("models: cannot store a bundle chunk: %s", exc)
            return
        if got is None:
            return  # a bundle handled before
        bundle, held, count = got
        if held == count:
            self._queue.put(("bundle", bundle))
        elif held == 1 or held % 16 == 0:
            self.report_event({"result": "in-progress", "step": "receiving", "reason": f"{held} of {count} chunks",
                          "bundle": bundle, "at": utc_now(), "origin": "mqtt"})

    # ------------------------------------------------------------ agent thread
    def start(self) -> None:
        """Resume what a crash interrupted (jobs, complete chunk sets), then wait for bundles."""
        for folder in self.receiver.partials():
            if self.receiver.complete(folder.name):
                self._queue.put(("bundle", folder.name))
        self._thread = threading.Thread(target=self._run, name="models-ota", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._queue.put(("stop", ""))
        if self._thread is not None:
            self._thread.join(timeout)

    def request_rollback(self, name: str, reason: str) -> None:
        self._queue.put(("rollback", (name, reason)))

    def idle(self) -> bool:
        return not self.busy and self._queue.empty()

    def request_sync(self, name: str, version: str) -> None:
        """The link names another version than the one running (a technician's `models install` or `rollback`
        while the daemon runs): switch to it, on probation like any new version."""
        self._queue.put(("sync", (name, version)))

    def request_confirm(self, name: str, version: str, reason: str) -> None:
        """A version through its health window: recorded on the agent thread, as every ledger change."""
        self._queue.put(("confirm", (name, version, reason)))

    def confirm(self, name: str, version: str, reason: str) -> None:
        with self.store.lock():
            self.store.set_probation(name, {})
            self.store.record(name, "confirmed", version, reason, "health")
        self.report_event({"model": name, "version": version, "result": "confirmed", "step": "health", "reason": reason,
                      "at": utc_now()})

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                kind, arg = self._queue.get(timeout=60.0)
            except queue.Empty:
                for gone in self.receiver.purge_stale():
                    self.report_event({"result": "discarded", "step": "receiving", "bundle": gone, "at": utc_now(),
                                  "reason": "no new chunk within models.incoming_ttl_s", "origin": "mqtt"})
                continue
            self.busy = True
            try:
                if kind == "bundle":
                    self._install_received(arg)
                elif kind == "rollback":
                    self.rollback(*arg)
                elif kind == "confirm":
                    self.confirm(*arg)
                elif kind == "sync":
                    log.info("models: %s: switching to %s (installed or rolled back by hand)", *arg)
                    self.activated(*arg)
            except Exception:  # noqa: BLE001 - the agent must outlive its own bugs; the old version keeps running
                log.exception("models: %s %s failed", kind, arg)
            finally:
                self.busy = False

    def _install_received(self, bundle: str) -> None:
        try:
            path = self.receiver.assemble(bundle)  # meta.json (the announced model) stays until mark_done
        except (ChunkError, OSError) as exc:
            self.report_event({"result": "refused", "reason": str(exc), "step": "receiving", "at": utc_now(),
                          "origin": "mqtt"})
            return
        outcome = self.installer.install(path, origin="mqtt", remote=True, move=True,
                                         label=f"MQTT bundle {bundle[:12]}", expect_name=self.receiver.model(bundle))
        self.receiver.mark_done(bundle)
        if outcome.result == "activated":
            self.activated(outcome.name, outcome.version)

    def activated(self, name: str, version: str) -> None:
        """Switch the running daemon; a version that does not load is rolled back at once."""
        why = self.switch(name)
        if why is None:
            self.start_probation(name, version)
            return
        self.rollback(name, f"version {version} failed to load: {why}")

    def start_probation(self, name: str, version: str) -> None:
        """Watch a version just switched to; kept in the ledger so that a restart resumes the watch."""
        rate, n = self.health.switched(name, version)
        with self.store.lock():
            self.store.set_probation(name, {"version": version, "baseline_rate": rate, "baseline_n": n,
                                            "until": time.time() + self.health.rule.window_s})

    def resume_probation(self, name: str, running: str) -> None:
        """At start: the version running was switched to less than health_window_s ago: keep watching it."""
        p = self.store.state(name).probation
        left = float(p.get("until", 0)) - time.time()
        if p.get("version") == running and left > 0:
            self.health.switched(name, running, left_s=left,
                                 baseline=(float(p.get("baseline_rate", 0.0)), int(p.get("baseline_n", 0))))
            log.info("models: %s %s: health watch resumed for the %.0f s left of its window", name, running, left)

    def rollback(self, name: str, reason: str) -> None:
        from edge_runtime.errors import EdgeError

        self.health.forget(name)
        try:
            self.installer.rollback(name, reason)
        except EdgeError as exc:
            log.error("models: cannot roll back %s: %s", name, exc)
            return
        why = self.switch(name)
        if why is not None:
            log.error("models: %s: the version rolled back to does not load either: %s", name, why)

    # ------------------------------------------------------------ status
    def status(self) -> dict:
        models = {}
        for name in sorted(set(self.store.names())):
            st = self.store.state(name)
            base = self.baseline(name)
            models[name] = {"active": st.active or (f"{base[0]} ({BUNDLED})" if base else None),
                            "previous": st.previous, "installed": self.store.installed(name),
                            "rolled_back": st.rolled_back, "last": st.last}
        return {"device_id": self.identity.device_id, "site": self.identity.site, "at": utc_now(),
                "models": models, "event": self.last_event}

    def report_event(self, event: dict) -> None:
        self.last_event = event
        if self.publish is not None:
            try:
                body = json.dumps(self.status(), separators=(",", ":")).encode()
            except Exception:  # noqa: BLE001 - status must never stop an install
                log.exception("models: building the status message failed")
                return
            self.publish(self.topic_status, body, True)


def store_for(state_dir: Path) -> ModelStore:
    return ModelStore(state_dir)
