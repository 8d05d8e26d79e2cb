"""Study sources: the DICOM inbox (never drops, done/ and quarantine/) and the C-STORE SCP (real network)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

import pydicom
import pytest
from conftest import CR_CHEST, DICOM_DIR, needs_shared

from edge_runtime.sources.dicom_folder import DicomFolderSource
from edge_runtime.sources.dicom_scp import STATUS_SOP_CLASS_NOT_SUPPORTED, DicomScp


def make_inbox(tmp_path):
    return DicomFolderSource("xray", tmp_path / "inbox", settle_s=0.0, retry_s=0.2)


def drop(src: DicomFolderSource, name: str, data: bytes, age_s: float = 0.0):
    path = src.inbox / name
    path.write_bytes(data)
    if age_s:
        t = time.time() - age_s
        os.utime(path, (t, t))
    return path


def test_files_present_at_start_are_processed_oldest_first(tmp_path):
    src = make_inbox(tmp_path)
    drop(src, "b.dcm", b"b", age_s=10)
    drop(src, "a.dcm", b"a", age_s=20)
    drop(src, ".hidden.part", b"x", age_s=30)
    first, second = src.next_item(), src.next_item()
    assert [first.path.name, second.path.name] == ["a.dcm", "b.dcm"]
    assert src.next_item() is None  # both in flight, the .part file is ignored


def test_done_only_on_request_and_quarantine_with_reason(tmp_path):
    src = make_inbox(tmp_path)
    drop(src, "good.dcm", b"g")
    drop(src, "bad.dcm", b"b")
    items = {i.path.name: i for i in (src.next_item(), src.next_item())}
    assert (src.inbox / "good.dcm").exists()  # nothing moves before the pipeline says so
    items["good.dcm"].done()
    moved = items["bad.dcm"].quarantine("not a DICOM file (no DICM preamble)\nsecond line")
    assert (src.done_dir / "good.dcm").read_bytes() == b"g"
    assert moved == src.quarantine_dir / "bad.dcm"
    reason = (src.quarantine_dir / "bad.dcm.reason.txt").read_text()
    assert reason.endswith("not a DICOM file (no DICM preamble) second line\n") and reason.count("\n") == 1
    assert list(src.inbox.iterdir()) == []
    assert (src.done_count, src.quarantined) == (1, 1)


def test_released_item_is_retried_later(tmp_path):
    src = make_inbox(tmp_path)
    drop(src, "x.dcm", b"x")
    item = src.next_item()
    item.release()  # e.g. the outbox was full
    assert src.next_item() is None
    time.sleep(0.25)
    again = src.next_item()
    assert again is not None and again.path.name == "x.dcm"


def test_unsettled_file_waits(tmp_path):
    src = DicomFolderSource("xray", tmp_path / "inbox", settle_s=5.0)
    drop(src, "copying.dcm", b"partial")
    assert src.next_item() is None
    drop(src, "old.dcm", b"complete", age_s=10)
    assert src.next_item().path.name == "old.dcm"


def test_name_clash_in_done_keeps_both(tmp_path):
    src = make_inbox(tmp_path)
    for content in (b"1", b"2"):
        drop(src, "same.dcm", content)
        src.next_item().done()
    assert sorted(p.name for p in src.done_dir.iterdir()) == ["same.1.dcm", "same.dcm"]


@pytest.fixture
def scp(tmp_path):
    server = DicomScp("detector", tmp_path / "inbox", ae_title="EDGE", host="127.0.0.1", port=0, allowed_callers=["DETECTOR"])
    server.start()
    yield server
    server.stop()


def send(scp, path_or_ds, calling="DETECTOR"):
    from pynetdicom import AE

    ds = path_or_ds if isinstance(path_or_ds, pydicom.Dataset) else pydicom.dcmread(path_or_ds)
    ae = AE(ae_title=calling)
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="EDGE")
    if not assoc.is_established:
        return None
    status = assoc.send_c_store(ds)
    assoc.release()
    return status.Status if status else None


@needs_shared
def test_storescu_pushes_a_real_cr_into_the_inbox(scp, tmp_path):
    cmd = [sys.executable, "-m", "pynetdicom", "storescu", "127.0.0.1", str(scp.port), str(CR_CHEST),
           "-aet", "DETECTOR", "-aec", "EDGE", "-cx"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    stored = list(scp.inbox.glob("*.dcm"))
    assert len(stored) == 1 and scp.received == 1
    original = pydicom.dcmread(CR_CHEST)
    copy = pydicom.dcmread(stored[0])
    assert copy.SOPInstanceUID == original.SOPInstanceUID
    assert copy.PixelData == original.PixelData
    assert not list(scp.inbox.glob(".*.part"))


@needs_shared
def test_non_image_sop_class_is_refused_with_a_status(scp):
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(DICOM_DIR / "pydicom-data" / "US1_UNCR.dcm", stop_before_pixels=True)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    assert send(scp, ds) == STATUS_SOP_CLASS_NOT_SUPPORTED
    assert scp.rejected == 1 and list(scp.inbox.iterdir()) == []


@needs_shared
def test_caller_not_allowed_is_rejected(scp):
    assert send(scp, CR_CHEST, calling="INTRUDER") is None
    assert list(scp.inbox.iterdir()) == []
    assert send(scp, CR_CHEST, calling="DETECTOR") == 0


def test_a_file_that_keeps_failing_is_quarantined_with_its_last_error(tmp_path):
    src = DicomFolderSource("xray", tmp_path / "inbox", settle_s=0.0, retry_s=0.0, max_attempts=3)
    drop(src, "poison.dcm", b"x")
    src.next_item().release()  # the outbox was full: not the file's fault, does not count
    for _ in range(3):
        src.next_item().release(error="RuntimeError: engine fault")
    assert src.next_item() is None  # used up: quarantined instead of handed out
    reason = (src.quarantine_dir / "poison.dcm.reason.txt").read_text()
    assert "gave up after 3 attempts" in reason and "engine fault" in reason


def test_a_file_that_crashes_the_daemon_ends_the_crash_loop(tmp_path):
    def restart() -> DicomFolderSource:  # a new process: only the ledger on disk remembers
        return DicomFolderSource("xray", tmp_path / "inbox", settle_s=0.0, retry_s=0.0, max_attempts=2)

    drop(restart(), "crasher.dcm", b"x")
    assert restart().next_item() is not None  # ... and the process dies while decoding it
    assert restart().next_item() is not None
    src = restart()
    drop(src, "good.dcm", b"y", age_s=0)
    item = src.next_item()
    assert item.path.name == "good.dcm"  # the crasher went to quarantine; the inbox moves on
    assert "stopped while processing" in (src.quarantine_dir / "crasher.dcm.reason.txt").read_text()
    item.done()
    assert restart().next_item() is None


def test_scp_state_follows_the_listener_and_a_taken_port_is_named(scp, tmp_path):
    from edge_runtime.errors import ConfigError

    assert scp.state.state == "up"
    second = DicomScp("pacs", tmp_path / "inbox2", host="127.0.0.1", port=scp.port)
    taken = rf"source pacs: cannot listen on DICOM port 127\.0\.0\.1:{scp.port}: already in use"
    with pytest.raises(ConfigError, match=taken):
        second.start()
    assert second.state.state == "starting"
    scp.stop()
    assert scp.state.state == "stopped"


def test_files_in_inbox_subfolders_are_found_and_hidden_folders_skipped(tmp_path):
    inbox = tmp_path / "inbox"
    (inbox / "2026-12-01" / "room-2").mkdir(parents=True)
    (inbox / ".staging").mkdir()
    (inbox / "2026-12-01" / "room-2" / "a.dcm").write_bytes(b"a")
    (inbox / ".staging" / "b.dcm").write_bytes(b"b")
    (inbox / "c.dcm").write_bytes(b"c")
    old = time.time() - 60
    for p in (inbox / "2026-12-01" / "room-2" / "a.dcm", inbox / ".staging" / "b.dcm", inbox / "c.dcm"):
        os.utime(p, (old, old))
    src = DicomFolderSource("xray", inbox, tmp_path / "done", tmp_path / "quarantine")
    assert [p.name for p in src.pending()] == ["a.dcm", "c.dcm"]
    item = src.next_item()
    assert item.path == inbox / "2026-12-01" / "room-2" / "a.dcm"
    item.quarantine("test")  # the ledger is keyed by the path below the inbox, and cleared again
    assert (tmp_path / "quarantine" / "a.dcm").exists() and src._attempts == {}


def test_folder_state_names_a_missing_inbox(tmp_path):
    src = DicomFolderSource("xray", tmp_path / "inbox", tmp_path / "done", tmp_path / "quarantine")
    assert src.check_state().state == "up"
    (tmp_path / "inbox").rmdir()  # an unmounted or deleted inbox
    state = src.check_state()
    assert state.state == "down" and state.reason == f"{tmp_path / 'inbox'} does not exist"


def test_c_echo_answers_allowed_callers_only(scp):
    from edge_runtime.sources.dicom_scp import echo

    assert echo("127.0.0.1", scp.port, "EDGE", "DETECTOR") == ""
    assert "rejected" in echo("127.0.0.1", scp.port, "EDGE", "STRANGER")


@pytest.mark.skipif(shutil.which("echoscu") is None, reason="dcmtk's echoscu not installed (apt-get install dcmtk)")
def test_dcmtk_echoscu_works(scp):
    r = subprocess.run(["echoscu", "-aet", "DETECTOR", "-aec", "EDGE", "127.0.0.1", str(scp.port)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


@needs_shared
@pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk's storescu not installed (apt-get install dcmtk)")
def test_dcmtk_storescu_with_hostile_files_leaves_the_scp_up(scp, tmp_path):
    sys.path.insert(0, os.path.dirname(__file__))
    from hostile_corpus import _header_edit

    bad = []
    for edit in ("cols+1", "frames=-1", "samples=4"):  # uncompressed: storescu sends it without converting
        ds = _header_edit(pydicom.dcmread(DICOM_DIR / "pydicom-data" / "US1_UNCR.dcm"), edit)
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        path = tmp_path / f"{edit.replace('=', '_')}.dcm"
        ds.save_as(path)
        bad.append(str(path))
    r = subprocess.run(["storescu", "-aet", "DETECTOR", "-aec", "EDGE", "127.0.0.1", str(scp.port), *bad],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert len([p for p in (tmp_path / "inbox").iterdir() if p.suffix == ".dcm"]) == 3
    subprocess.run(["echoscu", "-aet", "DETECTOR", "-aec", "EDGE", "127.0.0.1", str(scp.port)], check=True, timeout=60)


def test_doctor_echoes_the_configured_scp(scp, tmp_path):
    from edge_runtime.config import load_config
    from edge_runtime.doctor import scp_checks

    def config(port: int):
        path = tmp_path / f"edge-{port}.toml"
        path.write_text(f'[[sources]]\nname = "xray"\nkind = "dicom-scp"\nmodel = "cxr-pneumonia"\n'
                        f'inbox = "{tmp_path / "inbox"}"\nae_title = "EDGE"\nport = {port}\n'
                        'allowed_callers = ["DETECTOR"]\n')
        return load_config(path)

    [up] = scp_checks(config(scp.port))
    assert up["status"] == "ok" and "answered as DETECTOR" in up["detail"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    [down] = scp_checks(config(free))
    assert down["status"] == "warn" and "is the daemon running?" in down["detail"]
