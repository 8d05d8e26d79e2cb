"""DICOM C-STORE SCP: X-ray detectors and scanners push images here over the DICOM network.

A dataset is answered Success only once it is on disk: written to a hidden temporary file, fsynced, renamed
into the inbox and the directory fsynced. The inbox is then a DicomFolderSource like any other. Non-image SOP
classes (structured reports, presentation states) are refused with status 0x0122, callers not on the allowed
list are rejected at association, a full disk answers 0xA700 (out of resources) so the sender retries later.
Verification (C-ECHO) is answered for allowed callers; `echo()` is the client side, for doctor and check.
"""
from __future__ import annotations

import errno
import logging
import os
import threading
import time
from pathlib import Path

from pydicom.uid import UID

from edge_runtime.errors import ConfigError
from edge_runtime.sources.base import SourceState

log = logging.getLogger("edge_runtime.sources")

STATUS_SUCCESS = 0x0000
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000


def is_image_storage(sop_class_uid: str) -> bool:
    return "Image Storage" in UID(sop_class_uid).name


def echo(host: str, port: int, called_ae: str, calling_ae: str = "EDGE-CHECK", timeout: float = 5.0) -> str:
    """C-ECHO a DICOM node (our own SCP, a PACS): '' when it answered Success, else one line saying what failed.
    For `doctor` and `check`."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        if assoc.is_rejected:
            return f"association rejected by {called_ae} at {host}:{port} (is {calling_ae} an allowed caller?)"
        return f"no DICOM association with {called_ae} at {host}:{port} (not listening, or aborted)"
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if not status or "Status" not in status:
        return f"C-ECHO to {called_ae} at {host}:{port} got no answer within {timeout:.0f} s"
    if status.Status != STATUS_SUCCESS:
        return f"C-ECHO to {called_ae} at {host}:{port} answered status 0x{status.Status:04X}"
    return ""


class DicomScp:
    kind = "dicom-scp"

    def __init__(self, name: str, inbox: str | Path, ae_title: str = "EDGE", host: str = "0.0.0.0", port: int = 11112,
                 allowed_callers: list[str] | None = None) -> None:
        self.name = name
        self.inbox = Path(inbox)
        self.inbox.mkdir(parents=True, exist_ok=True)
        self.ae_title = ae_title
        self.host, self.port = host, port
        self.allowed_callers = list(allowed_callers or [])
        self.received = 0
        self.rejected = 0
        self._server = None
        self._lock = threading.Lock()
        self.state = SourceState("starting", since=time.time())

    def start(self) -> None:
        from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=self.ae_title)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)  # C-ECHO: the first thing a technician tries (echoscu)
        ae.require_called_aet = True
        if self.allowed_callers:
            ae.require_calling_aet = self.allowed_callers
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, self._on_echo)]
        try:
            self._server = ae.start_server((self.host, self.port), block=False, evt_handlers=handlers)
        except OSError as exc:
            # Name the port: "Address already in use" alone does not say which of the daemon's ports it is.
            why = "already in use (another SCP or a second daemon?)" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise ConfigError(f"source {self.name}", f"cannot listen on DICOM port {self.host}:{self.port}: {why}; "
                                                     "free it or set another sources[].port") from None
        self.port = self._server.server_address[1]  # when configured with port 0 (tests)
        self.state = self.state.with_state("up")
        log.info("dicom-scp %s: listening on %s:%d as %s", self.name, self.host, self.port, self.ae_title)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self.state = self.state.with_state("stopped")

    def _on_echo(self, event) -> int:
        log.info("dicom-scp %s: C-ECHO from %s", self.name, event.assoc.requestor.ae_title)
        return STATUS_SUCCESS

    def _on_store(self, event) -> int:
        sop_class = str(event.request.AffectedSOPClassUID)
        sop_instance = str(event.request.AffectedSOPInstanceUID)
        caller = event.assoc.requestor.ae_title
        if not is_image_storage(sop_class):
            self.rejected += 1
            log.warning("dicom-scp %s: refused %s from %s: not an image SOP class", self.name, UID(sop_class).name, caller)
            return STATUS_SOP_CLASS_NOT_SUPPORTED
        safe = "".join(c for c in sop_instance if c.isdigit() or c == ".") or "unnamed"
        tmp = self.inbox / f".{safe}.part"
        final = self.inbox / f"{safe}.dcm"
        try:
            with open(tmp, "wb") as fh:
                fh.write(event.encoded_dataset())
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
            fd = os.open(self.inbox, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            log.error("dicom-scp %s: cannot store %s (%s)", self.name, sop_instance, exc.strerror)
            return STATUS_OUT_OF_RESOURCES
        with self._lock:
            self.received += 1
        return STATUS_SUCCESS
