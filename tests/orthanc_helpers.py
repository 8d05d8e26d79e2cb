"""A real PACS for the tests: Debian's Orthanc, started privately (its own JSON config, free DICOM and HTTP ports,
its own storage folder), and read back through its REST API. Never a system Orthanc."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from edge_runtime.local_broker import free_port

ORTHANC = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None)
DCIODVFY = shutil.which("dciodvfy")
DSRDUMP = shutil.which("dsrdump")

needs_orthanc = pytest.mark.skipif(ORTHANC is None, reason="Orthanc not installed (apt-get install -y orthanc)")
needs_validators = pytest.mark.skipif(DCIODVFY is None or DSRDUMP is None,
                                      reason="dciodvfy/dsrdump not installed (apt-get install -y dicom3tools dcmtk)")


class Orthanc:
    """One private Orthanc. stop()/start() keep its ports and its storage (a PACS that is down, then up)."""

    def __init__(self, root: Path, aet: str = "PACS", extra: dict | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self.dicom_port, self.http_port = free_port(), free_port()
        self.config = self.root / "orthanc.json"
        self.log = self.root / "orthanc.log"
        settings = {
            "Name": "edge-runtime-test", "StorageDirectory": str(self.root / "db"),
            "IndexDirectory": str(self.root / "db"), "DicomAet": aet, "DicomPort": self.dicom_port,
            "HttpPort": self.http_port, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomCheckCalledAet": True, "DicomAlwaysAllowStore": True, "Plugins": [], "StableAge": 1,
            "HttpServerEnabled": True, "DicomServerEnabled": True, "ConcurrentJobs": 1, "SaveJobs": False,
            "StorageCompression": False, "LogExportedResources": False, "KeepAlive": True,
            "DicomScpTimeout": 30, "SyncStorageArea": False,
        }
        settings.update(extra or {})
        self.config.write_text(json.dumps(settings, indent=1))
        self.proc: subprocess.Popen | None = None
        # DCMTK (Orthanc's DICOM layer) leaves Nagle's algorithm on unless TCP_NODELAY=1 is in its environment:
        # every C-STORE response then waits for a delayed ACK, ~100 ms an object instead of ~10 (README says so
        # to PACS administrators too).
        self.env = {**os.environ, "TCP_NODELAY": "1"}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 60.0) -> "Orthanc":
        assert ORTHANC, "Orthanc not installed"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([ORTHANC, str(self.config)], stdout=log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                self.get("/system")
                return self
            except (OSError, urllib.error.URLError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Orthanc did not answer in {timeout:.0f} s: {self.log.read_text()[-2000:]}")
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    # ------------------------------------------------------------ REST
    def request(self, method: str, path: str, body: bytes | None = None, ctype: str = "application/json") -> Any:
        req = urllib.request.Request(self.url + path, data=body, method=method, headers={"Content-Type": ctype})
        with urllib.request.urlopen(req, timeout=30) as rsp:
            data = rsp.read()
        return json.loads(data) if rsp.headers.get_content_type() == "application/json" else data

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def upload(self, path: Path) -> dict:
        """POST a DICOM file (the source image a report refers to)."""
        return self.request("POST", "/instances", Path(path).read_bytes(), "application/dicom")

    def instances(self) -> list[str]:
        return self.get("/instances")

    def find_instance(self, sop_instance_uid: str) -> str | None:
        """Orthanc's id of the instance with this SOP Instance UID, or None."""
        hits = self.request("POST", "/tools/lookup", sop_instance_uid.encode(), "text/plain")
        return next((h["ID"] for h in hits if h["Type"] == "Instance"), None)

    def tags(self, instance: str) -> dict:
        return self.get(f"/instances/{instance}/simplified-tags")

    def file(self, instance: str) -> bytes:
        return self.request("GET", f"/instances/{instance}/file")

    def study_of(self, instance: str) -> str:
        return self.get(f"/instances/{instance}/study")["ID"]

    def sr_instances(self) -> list[str]:
        """Every stored instance whose modality is SR."""
        return [i for i in self.instances() if self.get(f"/instances/{i}/series")["MainDicomTags"].get("Modality") == "SR"]


def validate(path: Path) -> tuple[list[str], str]:
    """(dciodvfy's Error lines, dsrdump's output) for one file; dsrdump failing raises."""
    v = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    errors = [line for line in (v.stdout + v.stderr).splitlines() if line.startswith("Error")]
    d = subprocess.run([DSRDUMP, str(path)], capture_output=True, text=True, timeout=60)
    if d.returncode != 0 or "E:" in d.stderr:
        raise AssertionError(f"dsrdump failed on {path}: {d.stderr.strip()}")
    return errors, d.stdout
