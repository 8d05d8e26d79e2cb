"""Store-and-forward of reports to the clinic's PACS: C-STORE (pynetdicom SCU) from the outbox's PACS deliveries.

The same guarantees as the MQTT uplink: a report is owed from the moment its finding is committed (the delivery
row is written in the finding's transaction) and it is done only on a Success or Warning status (the PACS stored
it, perhaps coerced) or "duplicate SOP instance" (it has it already: a re-send after a crash is the same object,
since its SOP Instance UID comes from the finding_id). A PACS that is down, unreachable or rejects the
association costs nothing: the reports wait in the outbox and the association is retried with a doubling backoff
(retry_min_s .. retry_max_s); a rejection is an alarm naming the AE titles and the reason. A failure status on
one object is its own: out of resources is retried (max_attempts), anything else refuses the object, which is
kept in the outbox with the status, counted and listed in `status`, and not tried again until an operator
requeues it (`edge-runtime pacs requeue`).

Reports are built in a separate, niced process (`build_workers`): highdicom takes ~15-20 ms a report, and a
backlog of a thousand after a PACS outage must neither take the live pipeline's CPU nor hold its GIL. The
builder writes each report to a spool file that is sent as it is (no second encoding) and removed after.
"""
from __future__ import annotations

import json
import logging
import os
import ssl
import threading
import time
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from edge_runtime.outbox import DeliveryOutcome, DeliveryRow, Outbox, OutboxError
from edge_runtime.pacs.builder import build_report_file
from edge_runtime.pacs.reference import DESTINATION

log = logging.getLogger("edge_runtime.pacs")

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
EXPLICIT_LE, IMPLICIT_LE = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"
IDLE_RELEASE_S = 5.0  # an association with nothing to send is released after this long
BUILDER_IDLE_S = 60.0  # builder processes with nothing to build end after this long (their memory comes back)
POLL_S = 0.25  # how often an idle worker looks for new deliveries
REFUSED_SHOWN = 20
BUILDER_START_S = 60.0  # spawning a builder and importing highdicom (~1 s; much more on a loaded board)


def status_outcome(status: int) -> str:
    """'stored', 'transient' or 'refused' for a C-STORE status (PS3.4 B.2.3, PS3.7 C)."""
    if status == 0x0000 or status in (0x0001, 0x0107, 0x0116) or 0xB000 <= status <= 0xBFFF:
        return "stored"  # success, or a warning: the PACS holds the object (coerced / elements discarded)
    if status == 0x0111:
        return "stored"  # duplicate SOP instance: it has this very object already
    if 0xA700 <= status <= 0xA7FF or status in (0x0210, 0x0213):
        return "transient"  # out of resources, duplicate invocation, resource limitation: later
    return "refused"  # does not match the SOP class, cannot understand, not authorised, SOP class not supported


def _status_text(status: int) -> str:
    try:
        from pynetdicom.status import code_to_category, code_to_status
        info = code_to_status(status)
        return f"0x{status:04X} {code_to_category(status)}: {info[1] if info else ''}".rstrip(": ")
    except Exception:  # noqa: BLE001 - the number alone still says it
        return f"0x{status:04X}"


# ------------------------------------------------------------------ report building (child processes)
class BuildFailed(Exception):
    """This finding cannot make a report (ReportError in the builder): refuse the delivery."""


class BuilderLost(Exception):
    """The builder process died or stopped answering: the report is not at fault."""


class _BuilderProcess:
    """One `python -m edge_runtime.pacs.builder` process and the daemon's end of its socket."""

    def __init__(self, nice: int) -> None:
        from multiprocessing.connection import Connection

        from edge_runtime.imaging.decode_worker import THREAD_ENV

        ours, theirs = socket.socketpair()
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "edge_runtime.pacs.builder", str(theirs.fileno()),
                                          str(nice)], stdin=subprocess.DEVNULL, env={**os.environ, **THREAD_ENV},
                                         pass_fds=(theirs.fileno(),), close_fds=True)
        finally:
            theirs.close()
        self.conn = Connection(ours.detach())
        self.outstanding = 0
        self.ready = False

    def send(self, request: dict) -> None:
        try:
            self.conn.send_bytes(json.dumps(request).encode())
        except OSError:
            raise BuilderLost("the report builder process is gone") from None
        self.outstanding += 1

    def recv(self, timeout: float) -> dict:
        try:
            if not self.ready:  # its first message says highdicom is imported
                if not self.conn.poll(BUILDER_START_S):
                    raise BuilderLost(f"the report builder did not start in {BUILDER_START_S:.0f} s")
                self.conn.recv_bytes()
                self.ready = True
            if not self.conn.poll(timeout):
                raise BuilderLost(f"the report builder gave no answer in {timeout:.0f} s")
            answer = json.loads(self.conn.recv_bytes())
        except (EOFError, OSError, ValueError):
            raise BuilderLost(f"the report builder process died (exit status {self.proc.poll()})") from None
        self.outstanding -= 1
        return answer

    def close(self) -> None:
        try:
            self.conn.close()
        except OSError:
            pass
        try:
            self.proc.wait(5)  # it ends when its socket closes
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


class ReportBuilder:
    """Builds reports ahead of the sender: in `workers` niced processes (round robin, answers in order per
    process), or in the calling thread with workers = 0. Each report goes to a spool file named by its seq."""

    def __init__(self, spool_dir: Path, workers: int = 1, nice: int = 10) -> None:
        self.spool_dir = Path(spool_dir)
        self.workers = workers
        self.nice = nice
        self.restarts = 0
        self._procs: list[_BuilderProcess] = []
        self._assigned: dict[int, _BuilderProcess] = {}
        self._inline: dict[int, tuple[str, str]] = {}
        self._next = 0
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.spool_dir.glob("*.dcm*"):  # a crash left them; every report can be built again
            stale.unlink(missing_ok=True)

    def path_for(self, row: DeliveryRow) -> Path:
        return self.spool_dir / f"{row.seq}.dcm"

    def submit(self, row: DeliveryRow) -> None:
        path = str(self.path_for(row))
        if self.workers == 0:
            try:
                self._inline[row.seq] = ("uid", build_report_file(row.payload, row.local, path))
            except Exception as exc:  # noqa: BLE001 - ReportError or a bug: that report's failure only
                self._inline[row.seq] = ("error", str(exc))
            return
        if not self._procs:
            self._procs = [_BuilderProcess(self.nice) for _ in range(self.workers)]
        proc = self._procs[self._next % len(self._procs)]
        self._next += 1
        proc.send({"seq": row.seq, "payload": row.payload, "local": row.local, "path": path})
        self._assigned[row.seq] = proc

    def result(self, row: DeliveryRow, timeout: float) -> str:
        """The report's SOP Instance UID once its file is written; BuildFailed or BuilderLost otherwise."""
        if row.seq in self._inline:
            kind, value = self._inline.pop(row.seq)
            if kind == "error":
                raise BuildFailed(value)
            return value
        proc = self._assigned.pop(row.seq)
        try:
            answer = proc.recv(timeout)
        except BuilderLost:
            self.reset()
            raise
        if answer.get("seq") != row.seq:  # cannot happen with in-order answers; never send the wrong file
            self.reset()
            raise BuilderLost(f"the report builder answered for seq {answer.get('seq')} instead of {row.seq}")
        if "error" in answer:
            raise BuildFailed(answer["error"])
        return answer["uid"]

    def discard(self, rows: list[DeliveryRow], timeout: float) -> None:
        """Rows submitted but not sent (the association was lost): read their answers so the next batch's are
        in step, and remove their files."""
        for row in rows:
            if row.seq in self._assigned or row.seq in self._inline:
                try:
                    self.result(row, timeout)
                except (BuildFailed, BuilderLost):
                    pass
            self.path_for(row).unlink(missing_ok=True)

    def reset(self) -> None:
        """Stop every builder (one died or hung); the next submit starts fresh ones."""
        if self._procs:
            self.restarts += 1
        self.close()

    def close(self) -> None:
        for proc in self._procs:
            if proc.outstanding:
                proc.proc.kill()
            proc.close()
        self._procs, self._assigned, self._inline = [], {}, {}


def tls_args(cfg):
    """pynetdicom's (SSLContext, server_hostname) for a [pacs] with tls, else None."""
    if not cfg.tls:
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cfg.ca_file or None)
    if cfg.cert_file:
        context.load_cert_chain(cfg.cert_file, cfg.key_file or None)
    return context, cfg.host


def probe(cfg, timeout_s: float = 5.0) -> str:
    """'' when the PACS accepts an association from calling_ae for Comprehensive SR Storage and answers a C-ECHO;
    otherwise what is wrong (for `edge-runtime check`)."""
    from pynetdicom import AE, evt

    where = f"{cfg.called_ae}@{cfg.host}:{cfg.port}"
    ae = AE(ae_title=cfg.calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout_s
    ae.add_requested_context(COMPREHENSIVE_SR, [EXPLICIT_LE, IMPLICIT_LE])
    ae.add_requested_context("1.2.840.10008.1.1")  # Verification
    answer: dict[str, str] = {}

    def on_acse(event) -> None:
        p = event.primitive
        if getattr(p, "result", None) in (1, 2):
            answer["why"] = f"{p.result_str}, source {p.source_str}: {p.reason_str}"

    tls = tls_args(cfg)  # unloadable TLS files raise: the caller names the key
    try:
        assoc = ae.associate(cfg.host, cfg.port, ae_title=cfg.called_ae, tls_args=tls,
                             evt_handlers=[(evt.EVT_ACSE_RECV, on_acse)])
    except (OSError, ssl.SSLError, ValueError, RuntimeError) as exc:
        return f"cannot reach the PACS {where}: {exc}"
    if assoc.is_rejected:
        return (f"the PACS {where} rejects calling AE {cfg.calling_ae}: {answer.get('why', 'no reason given')}")
    if not assoc.is_established:
        return f"cannot associate with the PACS {where} (connection refused, timed out or aborted)"
    try:
        if not any(c.abstract_syntax == COMPREHENSIVE_SR for c in assoc.accepted_contexts):
            return f"the PACS {where} accepts no Comprehensive SR Storage from {cfg.calling_ae}"
        status = assoc.send_c_echo()
        if not status or int(status.get("Status", 0xFFFF)) != 0:
            return f"the PACS {where} did not answer a C-ECHO"
        return ""
    finally:
        assoc.release()


# ------------------------------------------------------------------ the worker
@dataclass
class _Peer:
    assoc: Any
    explicit: bool  # the PACS accepted Explicit VR Little Endian: spool files go as they are
    used_at: float


class PacsDelivery:
    """The PACS worker thread. `alarm(text)` is called once per new alarm (the service logs and shows it)."""

    def __init__(self, outbox: Outbox, cfg, spool_dir: Path, alarm: Callable[[str], None] | None = None) -> None:
        self.outbox = outbox
        self.cfg = cfg
        self.alarm = alarm or (lambda text: log.error("ALARM: %s", text))
        self.builder = ReportBuilder(spool_dir, cfg.build_workers, cfg.build_nice)
        self.where = f"{cfg.called_ae}@{cfg.host}:{cfg.port}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._peer: _Peer | None = None
        self._backoff = cfg.retry_min_s
        self._retry_at = 0.0
        self._last_work = time.monotonic()
        self.state = "idle"  # idle | up | down | rejected
        self.last_error = ""
        self.active_alarm = ""  # the alarm in force (cleared once an association is established)
        self.counters = {"sent": 0, "stored": 0, "duplicates": 0, "warnings": 0, "refused": 0, "transient": 0,
                         "associations": 0, "rejected": 0, "connect_failures": 0, "aborted": 0, "build_errors": 0}

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="pacs", daemon=True)
        self._thread.start()
        log.info("PACS delivery to %s (calling AE %s%s)", self.where, self.cfg.calling_ae,
                 ", TLS" if self.cfg.tls else "")

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():  # stuck in a C-STORE: leave it (a daemon thread) rather than race it
                log.warning("PACS delivery did not stop within %.0f s; an unmarked report is sent again next time",
                            timeout)
                return
        self._release()
        self.builder.close()

    def alive(self) -> bool:
        return self._thread is None or self._thread.is_alive()

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.counters)
        try:
            out.update({f"outbox_{k}": v for k, v in self.outbox.delivery_stats(DESTINATION).items()})
        except OutboxError:
            pass
        # up: not failing (an association is open, or none is needed now); down/rejected: reports wait
        out.update(up=1 if self.state in ("up", "idle") else 0, state=self.state, last_error=self.last_error,
                   builder_restarts=self.builder.restarts)
        return out

    def not_owed(self) -> dict[str, int]:
        """Findings that got no report, by reason (a PNG has no DICOM identifiers)."""
        try:
            return self.outbox.not_owed_reasons(DESTINATION)
        except OutboxError:
            return {}

    def refused(self) -> list[dict[str, Any]]:
        try:
            return self.outbox.refused_deliveries(DESTINATION, REFUSED_SHOWN)
        except OutboxError:
            return []

    # ------------------------------------------------------------ loop
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if not self._step():
                    self._stop.wait(POLL_S)
            except OutboxError as exc:
                self._note_error(f"outbox: {exc.reason}")
                self._stop.wait(1.0)
            except Exception as exc:  # noqa: BLE001 - a bug must not end PACS delivery silently
                log.exception("PACS delivery failed; retrying")
                self._note_error(f"{type(exc).__name__}: {exc}")
                self._drop_peer()
                self._stop.wait(1.0)

    def _step(self) -> bool:
        """One batch; False when there was nothing to do (or the PACS is backing off)."""
        now = time.time()
        if now < self._retry_at:
            return False
        rows = self.outbox.due_deliveries(DESTINATION, self.cfg.batch, now)
        if not rows:
            idle = time.monotonic() - self._last_work
            if self._peer is not None and idle > IDLE_RELEASE_S:
                self._release()
            if idle > BUILDER_IDLE_S:
                self.builder.close()
            if self.state == "up" and self._peer is None:
                self.state = "idle"
            return False
        peer = self._peer or self._associate(len(rows))
        if peer is None:
            return False
        self._send(peer, rows)
        self._last_work = time.monotonic()
        return True

    def _send(self, peer: _Peer, rows: list[DeliveryRow]) -> None:
        for row in rows:  # built ahead in the builder process while earlier ones are sent
            self.builder.submit(row)
        done = 0
        try:
            for row in rows:
                if self._stop.is_set():
                    return
                outcome = self._send_one(peer, row)
                self.builder.path_for(row).unlink(missing_ok=True)
                if outcome is None:  # the association is gone: this row and the rest stay pending, untouched
                    return
                done += 1
                self.outbox.mark_deliveries(DESTINATION, [outcome])
        finally:
            self.builder.discard(rows[done:], self.cfg.timeout_s)

    def _send_one(self, peer: _Peer, row: DeliveryRow) -> DeliveryOutcome | None:
        try:
            self.builder.result(row, max(60.0, self.cfg.timeout_s))
        except BuilderLost as exc:  # the builder's fault, not the report's (unless it keeps happening on it)
            return self._transient(row, None, str(exc))
        except BuildFailed as exc:
            self.counters["build_errors"] += 1
            reason = f"cannot build the report: {exc}"
            log.error("PACS: finding %s refused locally: %s", row.finding_id, reason)
            return DeliveryOutcome(row.seq, "refused", None, reason)
        path = self.builder.path_for(row)
        dataset: Any = path
        if not peer.explicit:  # the PACS takes Implicit VR only: let pynetdicom re-encode it
            from pydicom import dcmread
            dataset = dcmread(path)
        try:
            rsp = peer.assoc.send_c_store(dataset)
        except (ValueError, AttributeError, RuntimeError, OSError) as exc:
            self._lost(f"C-STORE failed: {exc}")
            return None
        peer.used_at = time.monotonic()
        self.counters["sent"] += 1
        status = int(rsp.Status) if rsp is not None and "Status" in rsp else None
        if status is None:  # no response: timeout, abort, connection lost
            self._lost("no C-STORE response (timeout, abort or connection lost)")
            return None
        outcome = status_outcome(status)
        text = _status_text(status)
        if outcome == "stored":
            self.counters["stored"] += 1
            if status == 0x0111:
                self.counters["duplicates"] += 1
            elif status:
                self.counters["warnings"] += 1
            return DeliveryOutcome(row.seq, "stored", status, "" if status == 0 else text)
        if outcome == "transient":
            return self._transient(row, status, f"{self.where} answered {text}")
        self.counters["refused"] += 1
        reason = f"{self.where} refused it: {text}"
        log.error("PACS: report for finding %s refused: %s; kept in the outbox, not retried", row.finding_id, reason)
        return DeliveryOutcome(row.seq, "refused", status, reason)

    def _transient(self, row: DeliveryRow, status: int | None, reason: str) -> DeliveryOutcome:
        self.counters["transient"] += 1
        if row.attempts + 1 >= self.cfg.max_attempts:
            self.counters["refused"] += 1
            return DeliveryOutcome(row.seq, "refused", status, f"{reason} (after {row.attempts + 1} attempts)")
        delay = min(self.cfg.retry_max_s, self.cfg.retry_min_s * 2 ** row.attempts)
        return DeliveryOutcome(row.seq, "retry", status, reason, time.time() + delay)

    # ------------------------------------------------------------ association
    def _associate(self, owed: int) -> _Peer | None:
        from pynetdicom import AE, _config, evt

        _config.STORE_SEND_CHUNKED_DATASET = True  # a spool file is streamed as it is, never decoded again
        cfg = self.cfg
        ae = AE(ae_title=cfg.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = cfg.timeout_s
        ae.connection_timeout = cfg.timeout_s
        ae.add_requested_context(COMPREHENSIVE_SR, [EXPLICIT_LE, IMPLICIT_LE])
        answer: dict[str, Any] = {}

        def on_acse(event) -> None:
            primitive = event.primitive
            if getattr(primitive, "result", None) in (1, 2):
                answer["rejection"] = (f"{primitive.result_str}, source {primitive.source_str}: "
                                       f"{primitive.reason_str}")

        def on_open(event) -> None:
            answer["connected"] = True
            # Small DIMSE messages on a socket with Nagle's algorithm wait for delayed ACKs (~40 ms each):
            # TCP_NODELAY takes a C-STORE to Orthanc from ~50 ms to ~10 ms.
            try:
                event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (AttributeError, OSError):
                pass

        try:
            tls = self._tls_args()
        except (OSError, ssl.SSLError) as exc:
            self._fail("down", f"cannot set up TLS for {self.where}: {exc}", owed, alarm=True)
            return None
        try:
            assoc = ae.associate(cfg.host, cfg.port, ae_title=cfg.called_ae, tls_args=tls,
                                 evt_handlers=[(evt.EVT_ACSE_RECV, on_acse), (evt.EVT_CONN_OPEN, on_open)])
        except (OSError, ValueError, RuntimeError) as exc:
            self._fail("down", f"cannot reach the PACS {self.where}: {exc}", owed)
            return None
        if assoc.is_established:
            cx = [c for c in assoc.accepted_contexts if c.abstract_syntax == COMPREHENSIVE_SR]
            if not cx:
                assoc.release()
                self._fail("rejected", f"PACS {self.where} accepts no Comprehensive SR Storage from calling AE "
                                       f"{cfg.calling_ae} (enable the SOP class there)", owed, alarm=True)
                return None
            explicit = any(c.transfer_syntax and c.transfer_syntax[0] == EXPLICIT_LE for c in cx)
            self._peer = _Peer(assoc, explicit, time.monotonic())
            self.counters["associations"] += 1
            self._backoff = cfg.retry_min_s
            if self.state != "up":
                log.info("PACS %s: association established; %d report(s) owed", self.where, owed)
            if self.active_alarm:
                log.warning("PACS %s: alarm cleared", self.where)
                self.active_alarm = ""
            self.state, self.last_error = "up", ""
            return self._peer
        if assoc.is_rejected:
            self.counters["rejected"] += 1
            why = answer.get("rejection", "no reason given")
            self._fail("rejected", f"PACS {self.where} rejected the association from calling AE {cfg.calling_ae} "
                                   f"(called AE {cfg.called_ae}): {why}; check pacs.called_ae and pacs.calling_ae "
                                   "against the PACS's configuration", owed, alarm=True)
        elif assoc.is_aborted and answer.get("connected"):
            self.counters["aborted"] += 1
            why = ("over TLS: a client certificate it does not accept (check pacs.cert_file/key_file), "
                   f"or it refuses calling AE {cfg.calling_ae}") if cfg.tls else f"it may refuse calling AE {cfg.calling_ae}"
            self._fail("rejected" if cfg.tls else "down", f"PACS {self.where} aborted the association ({why})", owed,
                       alarm=cfg.tls)
        elif cfg.tls and self._port_open():  # TCP is fine, so the TLS handshake failed: a configuration problem
            self._fail("rejected", f"TLS handshake with the PACS {self.where} failed (check pacs.ca_file, and "
                                   "pacs.cert_file/key_file if it requires a client certificate)", owed, alarm=True)
        else:
            self._fail("down", f"cannot reach the PACS {self.where} (connection refused or timed out)", owed)
        return None

    def _port_open(self) -> bool:
        try:
            with socket.create_connection((self.cfg.host, self.cfg.port), timeout=min(5.0, self.cfg.timeout_s)):
                return True
        except OSError:
            return False

    def _tls_args(self):
        return tls_args(self.cfg)

    def _fail(self, state: str, text: str, owed: int, alarm: bool = False) -> None:
        if state != "rejected":
            self.counters["connect_failures"] += 1
        self.state = state
        delay = self._backoff
        self._backoff = min(self.cfg.retry_max_s, self._backoff * 2)
        self._retry_at = time.time() + delay
        message = f"{text}; {owed}+ report(s) wait in the outbox, retry in {delay:.0f} s"
        if alarm:
            if text != self.active_alarm:
                self.alarm(message)
            self.active_alarm = text
        elif text != self.last_error:
            log.warning("%s", message)
        self.last_error = text

    def _lost(self, text: str) -> None:
        self.counters["aborted"] += 1
        self._drop_peer()
        self._fail("down", f"PACS {self.where}: {text}", 1)

    def _note_error(self, text: str) -> None:
        self.last_error = text

    def _drop_peer(self) -> None:
        peer, self._peer = self._peer, None
        if peer is not None:
            try:
                peer.assoc.abort()
            except Exception:  # noqa: BLE001 - it is gone either way
                pass

    def _release(self) -> None:
        peer, self._peer = self._peer, None
        if peer is not None:
            try:
                peer.assoc.release()
            except Exception:  # noqa: BLE001
                pass
