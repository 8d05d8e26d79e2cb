"""The daemon with a dicom-folder source and [pacs] pointing at a private Orthanc: each chest radiograph dropped in
the inbox becomes one valid TID 1500 SR in its own study, through a kill -9 during delivery and a PACS outage;
a JPEG gets no report and `status` says why."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pydicom
from conftest import DICOM_DIR, REPO, SHARED_DATA, needs_shared
from mqtt_helpers import free_port, wait_until
from orthanc_helpers import DCIODVFY, DSRDUMP, Orthanc, needs_orthanc, validate

from edge_runtime.pacs.reference import NO_DICOM
from edge_runtime.pacs.sr import sop_instance_uid

CR = DICOM_DIR / "pydicom-data" / "RG1_UNCR.dcm"
JPEG = SHARED_DATA / "cxr-kermany" / "train" / "NORMAL" / "IM-0115-0001.jpeg"


def radiographs(folder: Path, n: int) -> list[tuple[str, str]]:
    """n distinct chest radiographs (new SOP Instance UIDs, two studies) from one real CR; (study, instance) UIDs."""
    folder.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(CR)
    out = []
    for i in range(n):
        study = f"2.25.{4242000 + i % 2}"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, f"{study}.1"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{study}.1.{i}"
        ds.save_as(folder / f"cr{i:02d}.dcm", enforce_file_format=True)
        out.append((study, str(ds.SOPInstanceUID)))
    return out


def write_config(tmp_path: Path, inbox: Path, pacs_port: int, metrics_port: int) -> Path:
    path = tmp_path / "edge.toml"
    path.write_text(
        f'[device]\nid = "scanner-1"\nsite = "clinic"\nstate_dir = "{tmp_path / "state"}"\n\n'
        '[engine]\nkind = "onnxruntime"\nthreads = 1\nwarmup_runs = 1\n\n'
        f"[service]\nmetrics_port = {metrics_port}\nstop_timeout_s = 10\n\n"
        f'[pacs]\nhost = "127.0.0.1"\nport = {pacs_port}\ncalled_ae = "PACS"\ncalling_ae = "SCANNER1"\n'
        "retry_min_s = 0.2\nretry_max_s = 1.0\nbatch = 4\n\n"
        f'[[sources]]\nname = "xray"\nkind = "dicom-folder"\nmodel = "cxr-pneumonia"\ninbox = "{inbox}"\n')
    return path


def daemon(config: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edge_runtime", "--config", str(config), "run"], cwd=REPO,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def findings(state: Path) -> list[dict]:
    conn = sqlite3.connect(state / "outbox.sqlite")
    try:
        return [json.loads(p) for (p,) in conn.execute("SELECT payload FROM findings ORDER BY seq")]
    finally:
        conn.close()


def status(config: Path) -> dict:
    """`edge-runtime status --json`, or {"pacs": {}} while the daemon is not answering yet."""
    out = subprocess.run([sys.executable, "-m", "edge_runtime", "--config", str(config), "status", "--json"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    return json.loads(out.stdout) if out.returncode == 0 else {"pacs": {}}


@needs_shared
@needs_orthanc
def test_each_radiograph_gets_one_valid_sr_in_its_study_through_kill_9_and_a_pacs_outage(tmp_path):
    pacs = Orthanc(tmp_path / "orthanc").start()
    inbox = tmp_path / "inbox"
    sources = radiographs(tmp_path / "originals", 8)
    for path in sorted((tmp_path / "originals").iterdir())[:2]:
        pacs.upload(path)  # the modality sent these images to the PACS already: the reports must join them
    config = write_config(tmp_path, inbox, pacs.dicom_port, free_port())
    inbox.mkdir()
    for path in sorted((tmp_path / "originals").iterdir()):
        os.link(path, inbox / path.name)
    os.link(JPEG, inbox / "photo.jpeg")  # no DICOM identifiers: a finding, but no report
    proc = daemon(config)
    try:
        # kill -9 once the first reports are in the PACS, while the rest are still owed
        wait_until(lambda: len(pacs.sr_instances()) >= 1, 120, interval=0.05, what="a first report in Orthanc")
        proc.send_signal(signal.SIGKILL)
        _, first_err = proc.communicate(timeout=30)
        pacs.stop()  # and the PACS goes down while the daemon is away
        proc = daemon(config)
        wait_until(lambda: len(list((tmp_path / "inbox-done").iterdir())) == 9, 120, what="every file processed")
        report = wait_until(lambda: (r := status(config))["pacs"] and r["pacs"]["state"] == "down" and r, 60,
                            what="status: PACS down")
        assert report["pacs"]["pending"] >= 1 and report["pacs"]["calling_ae"] == "SCANNER1"
        assert report["pacs"]["no_report"] == {NO_DICOM: 1}
        pacs.start()  # back up: everything owed goes
        report = wait_until(lambda: (r := status(config))["pacs"] and r["pacs"]["pending"] == 0 and r["pacs"]["up"] and r, 120,
                            what="every report delivered")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-2000:]
        assert "Traceback" not in first_err + err, (first_err + err)[-3000:]
        assert "photo.jpeg gets no PACS report: not a DICOM input" in first_err + err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    cxr = [f for f in findings(tmp_path / "state") if f["source"]["name"].endswith(".dcm")]
    assert len(cxr) == 8  # one finding per radiograph, none twice
    srs = pacs.sr_instances()
    assert len(srs) == 8  # one report per finding: none lost, none duplicated
    by_uid = {pacs.tags(i)["SOPInstanceUID"]: i for i in srs}
    assert set(by_uid) == {sop_instance_uid(f["finding_id"]) for f in cxr}
    uploaded = {pacs.tags(i)["SOPInstanceUID"]: i for i in pacs.instances() if i not in srs}
    for study_uid, instance_uid in sources:
        [sr] = [by_uid[sop_instance_uid(f["finding_id"])] for f in cxr
                if f["source"]["name"] == f"cr{sources.index((study_uid, instance_uid)):02d}.dcm"]
        assert pacs.tags(sr)["StudyInstanceUID"] == study_uid  # the radiograph's real study, not its pseudonym
        if instance_uid in uploaded:
            assert pacs.study_of(sr) == pacs.study_of(uploaded[instance_uid])
    assert (report["pacs"]["stored"], report["pacs"]["refused"]) == (8, 0)
    assert all(f["study"]["study_id"] not in {s for s, _ in sources} for f in cxr)  # MQTT keeps pseudonyms
    if DCIODVFY and DSRDUMP:
        (tmp_path / "sr.dcm").write_bytes(pacs.file(srs[0]))
        assert validate(tmp_path / "sr.dcm")[0] == []
    pacs.stop()


@needs_shared
@needs_orthanc
def test_a_pacs_that_rejects_our_ae_title_is_an_alarm_in_status_and_telemetry(tmp_path):
    from edge_runtime.config import load_config
    from edge_runtime.service import Service

    pacs = Orthanc(tmp_path / "orthanc").start()
    inbox = tmp_path / "inbox"
    config = write_config(tmp_path, inbox, pacs.dicom_port, 0)
    config.write_text(config.read_text().replace('called_ae = "PACS"', 'called_ae = "NOTPACS"'))
    service = Service(load_config(config))
    try:
        service.start()
        radiographs(inbox, 1)
        alarm = wait_until(lambda: [a for a in service.current_alarms() if a["kind"] == "pacs"], 90,
                           what="a PACS alarm")[0]
        assert "NOTPACS" in alarm["reason"] and "SCANNER1" in alarm["reason"] and "rejected" in alarm["reason"]
        assert any("NOTPACS" in text for text in service.alarms)  # logged as an ALARM once
        assert service.pacs.stats()["outbox_pending"] == 1  # nothing lost: the report waits
        service.supervise_once()  # the source alarms still work beside it
    finally:
        service.stop()
        pacs.stop()
