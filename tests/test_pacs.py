"""PACS reports: the TID 1500 SR of every finding kind (validated with dciodvfy and dsrdump), the outbox's
per-destination delivery state, and the C-STORE worker against a real, private Orthanc (stored in the source
study, a re-send is the same object, PACS down then up, a wrong AE title is an alarm, a refusal is kept)."""
from __future__ import annotations

import json
import sqlite3
import time
import uuid
from pathlib import Path

import pydicom
import pytest
from conftest import DICOM_DIR, needs_shared
from mqtt_helpers import free_port, wait_until
from orthanc_helpers import DCIODVFY, DSRDUMP, Orthanc, needs_orthanc, needs_validators, validate

from edge_runtime.config import ConfigError, PacsSection, load_config
from edge_runtime.imaging.dicom import DicomImage
from edge_runtime.outbox import DeliveryOutcome, Outbox
from edge_runtime.pacs import DESTINATION, no_report_reason, source_reference
from edge_runtime.pacs.delivery import PacsDelivery, status_outcome
from edge_runtime.pacs.reference import MULTI_FRAME, NO_DICOM
from edge_runtime.pacs.sr import ReportError, build_sr, sop_instance_uid

CR = DICOM_DIR / "pydicom-data" / "RG1_UNCR.dcm"
US = DICOM_DIR / "pydicom-data" / "OBXXXX1A.dcm"
CINE = DICOM_DIR / "pydicom-data" / "OBXXXX1A_rle_2frame.dcm"
MODEL = {"name": "cxr-pneumonia", "version": "1.0.0", "variant": "int8-ov", "sha256": "9a" * 32, "precision": "int8",
         "engine": "openvino", "device": "CPU", "compute_precision": "f32"}


def finding(kind: str = "pneumonia", **result) -> dict:
    base = {"schema": 1, "finding_id": str(uuid.uuid4()), "seq": 3, "device_id": "scanner-7", "site": "clinic-a",
            "created_at": "2026-12-03T08:41:42.317Z", "source": {"kind": "dicom-folder", "name": "x.dcm"},
            "study": {"study_id": "2.25.1", "series_id": "2.25.2", "instance_id": "2.25.3", "modality": "CR",
                      "frame_index": 0}, "model": MODEL, "task": "classification", "priority": "urgent"}
    if kind == "pneumonia":
        base["result"] = {"assessed": True, "label": "pneumonia", "probabilities": {"normal": 0.1, "pneumonia": 0.9},
                          "threshold": 0.42, **result}
    elif kind == "normal":
        base["result"] = {"assessed": True, "label": "normal", "probabilities": {"normal": 0.8, "pneumonia": 0.2},
                          "needs_review": True, "scope_note": "image atypical for the training set", **result}
        base["priority"] = "routine"
    elif kind == "fetal-head":
        base.update(task="segmentation", model={**MODEL, "name": "fetal-head"}, priority="routine")
        base["result"] = {"assessed": True, "detected": True, "quality": 0.95,
                          "measurements": {"head_circumference_mm": 171.4, "gestational_age_weeks": 19.6}, **result}
    elif kind == "no-head":  # assessed, but nothing to measure
        base.update(task="segmentation", model={**MODEL, "name": "fetal-head"}, priority="routine")
        base["result"] = {"assessed": True, "detected": False, "note": "no head found in the image"}
    elif kind == "not-assessed":
        base["result"] = {"assessed": False, "reason": "BodyPartExamined HIP is outside the model's scope (CHEST)"}
        base["priority"] = "routine"
    return base


def reference(path: Path, positive: str = "pneumonia") -> dict:
    meta = DicomImage(path).meta
    return source_reference(meta, positive_label=positive)


def content(ds) -> list[tuple[str, str]]:
    """(concept name, value) of every content item, depth first."""
    out = []

    def walk(items):
        for item in items:
            name = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""
            if item.ValueType == "CODE":
                value = item.ConceptCodeSequence[0].CodeMeaning
            elif item.ValueType == "NUM":
                mv = item.MeasuredValueSequence[0]
                value = f"{mv.NumericValue} {mv.MeasurementUnitsCodeSequence[0].CodeValue}"
            elif item.ValueType in ("TEXT", "UIDREF"):
                value = str(item.get("TextValue", item.get("UID", "")))
            elif item.ValueType == "IMAGE":
                value = item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            else:
                value = item.ValueType
            out.append((name, value))
            walk(item.get("ContentSequence", []))

    walk(ds.ContentSequence)
    return out


# ------------------------------------------------------------------ the report
@needs_shared
def test_a_pneumonia_report_follows_tid_1500_and_references_the_real_study():
    f, ref = finding("pneumonia"), reference(CR)
    src = pydicom.dcmread(CR, stop_before_pixels=True)
    sr = build_sr(f, ref)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    assert sr.SOPInstanceUID == f"2.25.{uuid.UUID(f['finding_id']).int}" == sop_instance_uid(f["finding_id"])
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert sr.StudyInstanceUID == src.StudyInstanceUID and sr.PatientID == src.PatientID  # the clinic's own study
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == src.StudyInstanceUID
    assert evidence.ReferencedSeriesSequence[0].SeriesInstanceUID == src.SeriesInstanceUID
    assert evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    items = content(sr)
    assert ("Pneumonia", "Present") in items and ("Probability", "0.9 1") in items
    assert ("Algorithm Name", "cxr-pneumonia") in items and ("Algorithm Version", "1.0.0") in items
    assert ("Algorithm Parameters", f"sha256={'9a' * 32}") in items
    assert ("Source of Measurement", src.SOPInstanceUID) in items
    assert not any(name == "Needs clinician review" for name, _ in items)  # not set on this finding
    # No pseudonym of the MQTT side leaks into the clinic's record, and the report says where it was made.
    assert "2.25.1" not in {sr.StudyInstanceUID, sr.SeriesInstanceUID}
    assert sr.Manufacturer == "edge-runtime" and sr.Modality == "SR" and sr.CompletionFlag == "COMPLETE"


@needs_shared
def test_a_normal_finding_says_absent_and_needs_review_with_the_scope_note():
    items = content(build_sr(finding("normal"), reference(CR)))
    assert ("Pneumonia", "Absent") in items and ("Probability", "0.2 1") in items
    assert ("Needs clinician review", "Yes") in items
    assert ("Comment", "image atypical for the training set") in items


@needs_shared
def test_a_fetal_head_report_gives_hc_in_mm_and_ga_in_weeks():
    items = content(build_sr(finding("fetal-head"), reference(US, positive="")))
    assert ("Head Circumference", "171.4 mm") in items and ("Gestational Age", "19.6 wk") in items
    assert ("Algorithm Name", "fetal-head") in items
    f = finding("fetal-head", measurements={"head_circumference_mm": 80.0, "gestational_age_weeks": None})
    items = content(build_sr(f, reference(US, positive="")))
    assert ("Head Circumference", "80.0 mm") in items  # outside the formula's range: no age, never a made-up one
    assert not any(name == "Gestational Age" for name, _ in items)
    items = content(build_sr(finding("no-head"), reference(US, positive="")))
    assert ("Comment", "no head found in the image") in items
    assert not any(name == "Head Circumference" for name, _ in items)  # nothing measured, nothing reported as such


@needs_shared
def test_a_not_assessed_finding_gets_a_report_that_says_so():
    items = content(build_sr(finding("not-assessed"), reference(CR)))
    assert ("Pneumonia", "Undetermined") in items
    assert ("Comment", "Not assessed: BodyPartExamined HIP is outside the model's scope (CHEST)") in items
    assert not any(name == "Probability" for name, _ in items)


@needs_shared
def test_a_resend_is_the_same_object_byte_for_byte(tmp_path):
    f, ref = finding("pneumonia"), reference(CR)
    build_sr(f, ref).save_as(tmp_path / "a.dcm", enforce_file_format=True)
    build_sr(json.loads(json.dumps(f)), json.loads(json.dumps(ref))).save_as(tmp_path / "b.dcm", enforce_file_format=True)
    assert (tmp_path / "a.dcm").read_bytes() == (tmp_path / "b.dcm").read_bytes()


@needs_shared
@needs_validators
@pytest.mark.parametrize("kind,path", [("pneumonia", CR), ("normal", CR), ("fetal-head", US), ("no-head", US),
                                       ("not-assessed", CR)])
def test_every_report_kind_passes_dciodvfy_and_dsrdump(tmp_path, kind, path):
    sr = build_sr(finding(kind), reference(path, positive="" if path == US else "pneumonia"))
    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    errors, dump = validate(tmp_path / "sr.dcm")
    assert errors == []
    assert "Imaging Measurement Report" in dump and "Algorithm Name" in dump


def test_a_finding_that_cannot_make_a_report_raises_report_error():
    ref = {"study_uid": "1.2.3", "series_uid": "1.2.3.4", "sop_instance_uid": "1.2.3.4.5",
           "sop_class_uid": "1.2.840.10008.5.1.4.1.1.1", "modality": "CR", "record": {}}
    with pytest.raises(ReportError, match="not a UUID"):
        build_sr({**finding(), "finding_id": "seven"}, ref)
    with pytest.raises(ReportError, match="SOPInstanceUID"):
        build_sr(finding(), {**ref, "sop_instance_uid": ""})
    with pytest.raises(ReportError, match="model"):
        build_sr({**finding(), "model": {}}, ref)


@needs_shared
def test_inputs_without_dicom_identifiers_or_with_many_frames_get_no_report_and_a_reason():
    assert no_report_reason(None) == NO_DICOM  # a PNG or JPEG
    assert no_report_reason(DicomImage(CR).meta) is None
    cine = DicomImage(CINE)
    assert no_report_reason(cine.meta, cine.n_frames) == MULTI_FRAME
    assert no_report_reason(cine.meta, cine.n_frames, frame_index=1) is None  # one report, on the last frame
    ref = source_reference(cine.meta, frame_index=1, n_frames=2)  # an exam finding may still reference a frame
    assert ref["frame_number"] == 2 and ref["record"]["PatientID"] == str(pydicom.dcmread(CINE).PatientID)


# ------------------------------------------------------------------ config
def test_pacs_config_requires_an_ae_title_and_names_the_key(tmp_path):
    def load(text: str):
        path = tmp_path / "edge.toml"
        path.write_text(text)
        return load_config(path)

    assert load('[pacs]\nhost = "10.0.0.5"\ncalled_ae = "ORTHANC"\n').pacs.port == 104
    with pytest.raises(ConfigError, match="pacs.called_ae"):
        load('[pacs]\nhost = "10.0.0.5"\n')
    with pytest.raises(ConfigError, match="pacs.calling_ae.*16"):
        load('[pacs]\nhost = "h"\ncalled_ae = "A"\ncalling_ae = "MUCH-TOO-LONG-AE-TITLE"\n')
    with pytest.raises(ConfigError, match="pacs.tls"):
        load('[pacs]\nhost = "h"\ncalled_ae = "A"\nca_file = "/etc/ca.pem"\n')
    with pytest.raises(ConfigError, match="unknown key 'pacs.aet'"):
        load('[pacs]\naet = "A"\n')


# ------------------------------------------------------------------ outbox: per-destination state
def test_deliveries_are_committed_with_the_finding_and_independent_of_mqtt(tmp_path):
    box = Outbox(tmp_path / "o.sqlite")
    local = {"study_uid": "1.2.3", "record": {"PatientID": "REAL-ID"}}
    f = finding()
    seq = box.commit(f, "item-1", deliveries={DESTINATION: local})
    assert box.commit(finding(), "item-1", deliveries={DESTINATION: local}) == seq  # the same study item: nothing new
    rows = box.due_deliveries(DESTINATION, 10)
    assert [(r.seq, r.finding_id, r.local, r.priority) for r in rows] == [(seq, f["finding_id"], local, "urgent")]
    # The MQTT side does not carry the destination's data, and its state moves on its own.
    assert "REAL-ID" not in box.next_batch(10)[0].payload
    box.mark_delivered([seq])
    assert box.finding_ids() == {f["finding_id"]: "sent"} and box.delivery_states(DESTINATION) == {f["finding_id"]: "pending"}
    assert box.mark_deliveries(DESTINATION, [DeliveryOutcome(seq, "stored", 0)]) == 1
    assert box.delivery_states(DESTINATION) == {f["finding_id"]: "stored"} and box.finding_ids()[f["finding_id"]] == "sent"
    assert box.mark_deliveries(DESTINATION, [DeliveryOutcome(seq, "stored", 0)]) == 0  # done once
    # Once the PACS has it, the real identifiers leave the device's database.
    conn = sqlite3.connect(tmp_path / "o.sqlite")
    assert conn.execute("SELECT payload, local FROM deliveries").fetchall() == [("", "")]
    conn.close()
    assert box.delivery_stats(DESTINATION) == {"pending": 0, "stored": 1, "refused": 0, "oldest_pending_s": None}
    box.close()


def test_the_pacs_copy_leaves_out_the_pictures_a_report_does_not_carry(tmp_path):
    box = Outbox(tmp_path / "o.sqlite")
    f = finding()
    f["explanation"] = {"method": "cam", "bbox": {"x": 1, "y": 2, "width": 3, "height": 4}, "grid": [[0] * 16] * 16,
                        "overlay": "data:image/jpeg;base64," + "A" * 30000}
    f["exam"] = {"exam_id": "e", "key_frame": {"frame_index": 7, "thumbnail": {"data": "B" * 30000}}}
    box.commit(f, None, deliveries={DESTINATION: {"study_uid": "1.2.3"}})
    (row,) = box.due_deliveries(DESTINATION, 10)
    kept = json.loads(row.payload)
    assert kept["explanation"] == {"method": "cam", "bbox": f["explanation"]["bbox"]}
    assert kept["exam"]["key_frame"] == {"frame_index": 7} and len(row.payload) < 2000
    assert "A" * 100 in box.next_batch(10)[0].payload  # the MQTT side keeps the whole finding
    box.close()


def test_a_finding_not_owed_to_the_pacs_keeps_the_reason(tmp_path):
    box = Outbox(tmp_path / "o.sqlite")
    f = finding()
    box.commit(f, None, deliveries={DESTINATION: NO_DICOM})
    assert box.due_deliveries(DESTINATION, 10) == [] and box.delivery_states(DESTINATION) == {f["finding_id"]: "not owed"}
    assert box.not_owed_reasons(DESTINATION) == {NO_DICOM: 1} and box.delivery_stats(DESTINATION)["pending"] == 0
    box.close()


def test_retry_waits_for_its_time_and_refused_is_kept_with_its_status(tmp_path):
    now = [1000.0]
    box = Outbox(tmp_path / "o.sqlite", clock=lambda: now[0])
    a, b = (box.commit(finding(), None, deliveries={DESTINATION: {}}) for _ in range(2))
    box.mark_deliveries(DESTINATION, [DeliveryOutcome(a, "retry", 0xA700, "out of resources", retry_at=1060.0),
                                      DeliveryOutcome(b, "refused", 0xA900, "does not match its SOP class")])
    assert box.due_deliveries(DESTINATION, 10) == [] and box.next_delivery_at(DESTINATION) == 1060.0
    now[0] = 1061.0
    assert [(r.seq, r.attempts) for r in box.due_deliveries(DESTINATION, 10)] == [(a, 1)]
    refused = box.refused_deliveries(DESTINATION)
    assert [(r["seq"], r["status"], r["reason"]) for r in refused] == [(b, 0xA900, "does not match its SOP class")]
    assert box.delivery_stats(DESTINATION)["refused"] == 1
    assert box.requeue_refused(DESTINATION) == 1 and box.delivery_stats(DESTINATION)["refused"] == 0
    assert {r.seq for r in box.due_deliveries(DESTINATION, 10)} == {a, b}
    box.close()


def test_caps_that_prune_mqtt_rows_never_take_a_pending_delivery(tmp_path):
    box = Outbox(tmp_path / "o.sqlite", max_rows=5)
    seqs = [box.commit({**finding(), "priority": "routine"}, None, deliveries={DESTINATION: {"n": i}})
            for i in range(12)]
    box.mark_delivered(seqs)
    assert box.stats()["rows"] <= 5  # MQTT rows pruned as before
    assert len(box.due_deliveries(DESTINATION, 100)) == 12  # every report still owed, with its own payload
    box.close()


def test_an_outbox_written_before_deliveries_existed_gains_them_in_place(tmp_path):
    box = Outbox(tmp_path / "o.sqlite")
    box.commit(finding())
    box.close()
    conn = sqlite3.connect(tmp_path / "o.sqlite")  # as a schema-2 file written before this table existed
    conn.execute("DROP TABLE deliveries")
    conn.execute("DELETE FROM meta WHERE key = 'deliveries_schema'")
    conn.commit()
    conn.close()
    box = Outbox(tmp_path / "o.sqlite")
    assert box._read_meta()["deliveries_schema"] == 1 and box._read_meta()["schema_version"] == 2
    seq = box.commit(finding(), None, deliveries={DESTINATION: {}})
    assert [r.seq for r in box.due_deliveries(DESTINATION, 5)] == [seq] and box.stats()["rows"] == 2
    box.close()


def test_status_codes_map_to_stored_transient_or_refused():
    assert [status_outcome(s) for s in (0x0000, 0xB000, 0xB007, 0x0111)] == ["stored"] * 4
    assert [status_outcome(s) for s in (0xA700, 0xA7FF, 0x0213)] == ["transient"] * 3
    assert [status_outcome(s) for s in (0xA900, 0xC000, 0x0122, 0x0124)] == ["refused"] * 4


# ------------------------------------------------------------------ delivery against a real Orthanc
@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    server = Orthanc(tmp_path_factory.mktemp("orthanc")).start()
    yield server
    server.stop()


def pacs_config(port: int, called: str = "PACS", **kw) -> PacsSection:
    kw.setdefault("build_workers", 1)  # one builder process starts faster; the daemon test runs the default two
    return PacsSection(host="127.0.0.1", port=port, called_ae=called, calling_ae="EDGE", retry_min_s=0.2,
                       retry_max_s=1.0, timeout_s=10.0, **kw)


def fill(box: Outbox, ref: dict, n: int, kind: str = "pneumonia") -> list[str]:
    ids = []
    for _ in range(n):
        f = finding(kind)
        box.commit(f, None, deliveries={DESTINATION: ref})
        ids.append(f["finding_id"])
    return ids


@needs_shared
@needs_orthanc
def test_reports_are_stored_in_the_source_study_with_their_content(tmp_path, orthanc):
    source = orthanc.upload(CR)
    box = Outbox(tmp_path / "o.sqlite")
    ids = fill(box, reference(CR), 3) + fill(box, reference(CR), 1, "not-assessed")
    worker = PacsDelivery(box, pacs_config(orthanc.dicom_port), tmp_path / "spool")
    worker.start()
    try:
        wait_until(lambda: box.delivery_stats(DESTINATION)["stored"] == 4, 90, what="4 reports stored")
    finally:
        worker.stop()
    for fid in ids:
        instance = orthanc.find_instance(sop_instance_uid(fid))
        assert instance is not None, fid
        assert orthanc.study_of(instance) == source["ParentStudy"]  # next to the image, in the same study
        tags = orthanc.tags(instance)
        assert tags["Modality"] == "SR" and tags["SOPClassUID"] == "1.2.840.10008.5.1.4.1.1.88.33"
    stored = orthanc.file(orthanc.find_instance(sop_instance_uid(ids[0])))
    (tmp_path / "back.dcm").write_bytes(stored)
    if DCIODVFY and DSRDUMP:  # what the PACS holds is valid too
        assert validate(tmp_path / "back.dcm")[0] == []
    assert ("Pneumonia", "Present") in content(pydicom.dcmread(tmp_path / "back.dcm"))
    assert worker.stats()["stored"] == 4 and worker.stats()["refused"] == 0 and not list((tmp_path / "spool").iterdir())
    box.close()


@needs_shared
@needs_orthanc
def test_a_resend_after_a_lost_mark_is_the_same_object_not_a_duplicate(tmp_path, orthanc):
    box = Outbox(tmp_path / "o.sqlite")
    ids = fill(box, reference(CR), 2)
    worker = PacsDelivery(box, pacs_config(orthanc.dicom_port), tmp_path / "spool")
    worker.start()
    wait_until(lambda: box.delivery_stats(DESTINATION)["stored"] == 2, 90, what="2 reports stored")
    worker.stop()
    before = len(orthanc.instances())
    conn = sqlite3.connect(tmp_path / "o.sqlite")  # as after a power cut that lost the marks (no fsync of its own)
    box.close()
    rows = conn.execute("SELECT seq FROM deliveries").fetchall()
    conn.close()
    box = Outbox(tmp_path / "o.sqlite")
    with box._write_lock:
        box._w.execute("UPDATE deliveries SET state = 0, payload = (SELECT payload FROM findings WHERE "
                       "findings.seq = deliveries.seq), local = ?", (json.dumps(reference(CR)),))
    assert len(box.due_deliveries(DESTINATION, 10)) == len(rows) == 2
    worker = PacsDelivery(box, pacs_config(orthanc.dicom_port), tmp_path / "spool2")
    worker.start()
    wait_until(lambda: box.delivery_stats(DESTINATION)["pending"] == 0, 90, what="re-sent")
    worker.stop()
    assert len(orthanc.instances()) == before  # Orthanc has each report once
    assert all(orthanc.find_instance(sop_instance_uid(fid)) for fid in ids)
    box.close()


@needs_shared
@needs_orthanc
def test_a_pacs_that_is_down_then_up_gets_every_report(tmp_path):
    server = Orthanc(tmp_path / "orthanc")  # not started yet: the PACS is down
    box = Outbox(tmp_path / "o.sqlite")
    ids = fill(box, reference(CR), 5)
    worker = PacsDelivery(box, pacs_config(server.dicom_port), tmp_path / "spool")
    worker.start()
    try:
        wait_until(lambda: worker.stats()["connect_failures"] >= 2, 60, what="failed associations")
        assert worker.state == "down" and box.delivery_stats(DESTINATION)["pending"] == 5
        assert worker.active_alarm == ""  # unreachable is a state (retried), not an AE title problem
        server.start()
        wait_until(lambda: box.delivery_stats(DESTINATION)["stored"] == 5, 90, what="5 reports after the outage")
        assert worker.state in ("up", "idle")  # idle once the association is released
        assert all(server.find_instance(sop_instance_uid(fid)) for fid in ids)
    finally:
        worker.stop()
        server.stop()
    box.close()


@needs_shared
@needs_orthanc
def test_a_wrong_called_ae_is_an_alarm_naming_it_and_nothing_is_lost(tmp_path, orthanc):
    box = Outbox(tmp_path / "o.sqlite")
    fill(box, reference(CR), 2)
    alarms: list[str] = []
    worker = PacsDelivery(box, pacs_config(orthanc.dicom_port, called="WRONGAE"), tmp_path / "spool", alarm=alarms.append)
    worker.start()
    try:
        wait_until(lambda: worker.stats()["rejected"] >= 2, 60, what="rejected associations")
    finally:
        worker.stop()
    assert len(alarms) == 1  # said once, not at every retry
    assert "WRONGAE" in alarms[0] and "EDGE" in alarms[0] and "rejected the association" in alarms[0]
    assert "Called AE title not recognised" in alarms[0] and "2+ report(s) wait" in alarms[0]
    assert worker.state == "rejected" and box.delivery_stats(DESTINATION)["pending"] == 2
    box.close()


def _refusing_scp(port: int, refuse_status: int, received: list):
    """A real SCP (pynetdicom) that refuses every other object with a failure status."""
    from pynetdicom import AE, evt

    def on_store(event):
        received.append(event.request.AffectedSOPInstanceUID)
        return refuse_status if len(received) % 2 == 0 else 0x0000

    ae = AE(ae_title="PACS")
    ae.add_supported_context("1.2.840.10008.5.1.4.1.1.88.33", ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    return ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])


@needs_shared
def test_a_refused_object_is_kept_with_its_status_counted_and_not_retried(tmp_path):
    port, received = free_port(), []
    server = _refusing_scp(port, 0xA900, received)
    box = Outbox(tmp_path / "o.sqlite")
    fill(box, reference(CR), 4)
    worker = PacsDelivery(box, pacs_config(port), tmp_path / "spool")
    worker.start()
    try:
        wait_until(lambda: box.delivery_stats(DESTINATION)["pending"] == 0, 60, what="all four answered")
        time.sleep(1.0)  # a refused object must not come back
    finally:
        worker.stop()
        server.shutdown()
    assert len(received) == 4
    s = box.delivery_stats(DESTINATION)
    assert (s["stored"], s["refused"]) == (2, 2) and worker.stats()["refused"] == 2
    refused = worker.refused()
    assert {r["status"] for r in refused} == {0xA900} and all("0xA900" in r["reason"] for r in refused)
    box.close()


@needs_shared
def test_out_of_resources_is_retried_then_refused_after_max_attempts(tmp_path):
    port, received = free_port(), []
    from pynetdicom import AE, evt

    ae = AE(ae_title="PACS")
    ae.add_supported_context("1.2.840.10008.5.1.4.1.1.88.33", ["1.2.840.10008.1.2.1"])
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, lambda e: received.append(1) or 0xA700)])
    box = Outbox(tmp_path / "o.sqlite")
    fill(box, reference(CR), 1)
    worker = PacsDelivery(box, pacs_config(port, max_attempts=3), tmp_path / "spool")
    worker.start()
    try:
        wait_until(lambda: box.delivery_stats(DESTINATION)["refused"] == 1, 60, what="refused after 3 attempts")
    finally:
        worker.stop()
        server.shutdown()
    assert len(received) == 3 and "after 3 attempts" in worker.refused()[0]["reason"]
    box.close()


@needs_shared
def test_a_finding_that_cannot_make_a_report_is_refused_locally_and_the_rest_go(tmp_path):
    port, received = free_port(), []
    server = _refusing_scp(port, 0x0000, received)
    box = Outbox(tmp_path / "o.sqlite")
    bad = {**finding(), "model": {}}
    box.commit(bad, None, deliveries={DESTINATION: reference(CR)})
    fill(box, reference(CR), 2)
    worker = PacsDelivery(box, pacs_config(port, build_workers=0), tmp_path / "spool")
    worker.start()
    try:
        wait_until(lambda: box.delivery_stats(DESTINATION)["pending"] == 0, 60, what="all handled")
    finally:
        worker.stop()
        server.shutdown()
    assert len(received) == 2 and worker.refused()[0]["finding_id"] == bad["finding_id"]
    assert "cannot build the report" in worker.refused()[0]["reason"] and worker.refused()[0]["status"] is None
    box.close()


@needs_shared
@needs_orthanc
def test_dicom_tls_with_a_client_certificate_delivers_and_without_one_is_an_alarm(tmp_path):
    from mqtt_helpers import make_pki

    pki = make_pki(tmp_path / "pki")
    server = Orthanc(tmp_path / "orthanc", extra={
        "DicomTlsEnabled": True, "DicomTlsCertificate": str(pki["server_cert"]),
        "DicomTlsPrivateKey": str(pki["server_key"]), "DicomTlsTrustedCertificates": str(pki["ca"]),
        "DicomTlsRemoteCertificateRequired": True}).start()
    try:
        box = Outbox(tmp_path / "o.sqlite")
        [fid] = fill(box, reference(CR), 1)
        alarms: list[str] = []
        bare = PacsDelivery(box, pacs_config(server.dicom_port, tls=True, ca_file=str(pki["ca"])),
                            tmp_path / "spool", alarm=alarms.append)
        bare.start()
        try:
            wait_until(lambda: alarms, 60, what="an alarm without a client certificate")
        finally:
            bare.stop()
        assert "TLS" in alarms[0] and "pacs.cert_file" in alarms[0]
        assert box.delivery_stats(DESTINATION)["pending"] == 1 and server.find_instance(sop_instance_uid(fid)) is None
        worker = PacsDelivery(box, pacs_config(server.dicom_port, tls=True, ca_file=str(pki["ca"]),
                                               cert_file=str(pki["client_cert"]), key_file=str(pki["client_key"])),
                              tmp_path / "spool")
        worker.start()
        try:
            wait_until(lambda: box.delivery_stats(DESTINATION)["stored"] == 1, 60, what="stored over TLS")
        finally:
            worker.stop()
        assert server.find_instance(sop_instance_uid(fid)) is not None
        box.close()
    finally:
        server.stop()


@needs_orthanc
def test_check_names_a_wrong_called_ae_and_passes_the_right_one(tmp_path, orthanc):
    import dataclasses

    from edge_runtime.check import pacs_problems
    from edge_runtime.config import Config

    good = Config(pacs=pacs_config(orthanc.dicom_port))
    assert pacs_problems(good) == []
    [problem] = pacs_problems(dataclasses.replace(good, pacs=pacs_config(orthanc.dicom_port, called="WRONGAE")))
    assert problem.key == "pacs.called_ae" and "Called AE title not recognised" in problem.problem
    [problem] = pacs_problems(dataclasses.replace(good, pacs=pacs_config(free_port())))
    assert problem.key == "pacs.host" and "cannot" in problem.problem


def test_status_shows_the_pacs_line_refusals_and_reasons():
    from edge_runtime.cli import render_status

    report = {"uptime_s": 5, "outbox_pending": {}, "link_up": False, "uplink": {}, "sources": {}, "models": {},
              "ready": True, "outbox": {}, "pacs": {
                  "pacs": "PACS@10.0.0.5:104", "calling_ae": "SCANNER1", "state": "rejected",
                  "reason": "PACS@10.0.0.5:104 rejected the association", "up": False, "pending": 3, "stored": 7,
                  "refused": 1, "oldest_pending_s": 125.0, "counters": {},
                  "refused_objects": [{"finding_id": "f-1", "status": 0xA900, "reason": "does not match"}],
                  "no_report": {NO_DICOM: 2}}}
    text = "\n".join(render_status(report))
    assert "pacs PACS@10.0.0.5:104 (calling AE SCANNER1): rejected (PACS@10.0.0.5:104 rejected" in text
    assert "reports pending 3, stored 7, refused 1, oldest pending 2m05s" in text
    assert "refused: finding f-1 (0xA900): does not match" in text and f"no report for 2 finding(s): {NO_DICOM}" in text
    assert "pacs" not in "\n".join(render_status({**report, "pacs": {}}))


def test_the_pacs_command_lists_refused_reports_and_requeues_them(tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    (tmp_path / "edge.toml").write_text(f'[device]\nstate_dir = "{tmp_path / "state"}"\n')
    box = Outbox(tmp_path / "state" / "outbox.sqlite")
    f = finding()
    seq = box.commit(f, None, deliveries={DESTINATION: {}})
    box.mark_deliveries(DESTINATION, [DeliveryOutcome(seq, "refused", 0xA900, "PACS refused it: 0xA900")])
    box.close()

    def cli(*args):
        out = subprocess.run([sys.executable, "-m", "edge_runtime", "--config", str(tmp_path / "edge.toml"), "pacs",
                              *args], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout

    assert f["finding_id"] in cli("refused") and "0xA900" in cli("refused")
    assert json.loads(cli("refused", "--json"))[0]["status"] == 0xA900
    assert cli("requeue", "--finding", "someone-else").startswith("0 refused")
    assert cli("requeue").startswith("1 refused") and "no refused reports" in cli("refused")
    with Outbox(tmp_path / "state" / "outbox.sqlite") as box:
        assert box.delivery_states(DESTINATION) == {f["finding_id"]: "pending"}


@needs_shared
@needs_validators
def test_a_cine_exam_finding_is_reported_once_against_its_key_frame_and_validates(tmp_path):
    from types import SimpleNamespace

    from edge_runtime.service import Service

    cine = DicomImage(CINE)
    f = finding("fetal-head", measurements={"head_circumference_mm": 171.4, "head_circumference_iqr_mm": 1.2,
                                            "gestational_age_weeks": 19.6})
    f["study"]["frame_index"] = 1
    f["exam"] = {"exam_id": str(uuid.uuid4()), "frames_seen": 60, "frames_used": 41}
    fake = SimpleNamespace(config=SimpleNamespace(pacs=SimpleNamespace(host="127.0.0.1")),
                           live_sources=[SimpleNamespace(name="probe", image=cine), SimpleNamespace(name="video")])
    ref = Service._exam_deliveries(fake, SimpleNamespace(name="probe"), f)[DESTINATION]
    assert ref["sop_instance_uid"] == cine.meta.instance_uid and ref["frame_number"] == 2  # the key frame
    assert Service._exam_deliveries(fake, SimpleNamespace(name="video"), f) == {DESTINATION: NO_DICOM}
    sr = build_sr(f, ref)
    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    errors, dump = validate(tmp_path / "sr.dcm")
    assert errors == [] and "Head Circumference" in dump
    assert ("Head Circumference", "171.4 mm") in content(sr)
