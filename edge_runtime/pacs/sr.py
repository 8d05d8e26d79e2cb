"""A finding as a DICOM Comprehensive SR following TID 1500 (Measurement Report), built with highdicom.

One report per finding, generic over what the finding says:
- classification (`cxr-pneumonia`): a qualitative evaluation of the finding (present / absent), the probability
  of the positive label as a numeric measurement, and `needs_review` where the finding sets it;
- measurements (`fetal-head`): head circumference in mm and gestational age in weeks (UCUM units);
- not assessed: an evaluation "undetermined" and a comment with the reason the model did not read the image.
Every measurement group names the algorithm (name, version, the variant's sha256 and id) as IHE AI Results
asks, and references the source image by its real SOP Class and Instance UIDs; the evidence sequence holds its
Study, Series and SOP Instance UIDs. The SOP Instance UID is 2.25.<the finding_id as an integer>, the series one
per device and study, and every date in the object comes from the finding: a re-send is the same object.
"""
from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    ComprehensiveSR,
    DeviceObserverIdentifyingAttributes,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    QualitativeEvaluation,
    SourceImageForMeasurementGroup,
    TextContentItem,
    TrackingIdentifier,
)
from highdicom.sr.enum import RelationshipTypeValues
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from edge_runtime import __version__

MANUFACTURER = "edge-runtime"
SERIES_NUMBER = 9900  # high, so the AI results sort after the acquired series in a viewer
SERIES_DESCRIPTION = "AI results (edge-runtime)"
_NAMESPACE = uuid.UUID("6f1f3c1e-8a4b-5d7e-9c2a-1b0e5d4c3a21")  # fixed: derived UIDs must never change
# Concepts without a standard code get this private scheme (PS3.16 8.2: a "99" prefix is for local codes).
PRIVATE_SCHEME = "99EDGE"
NEEDS_REVIEW = CodedConcept("needs-review", PRIVATE_SCHEME, "Needs clinician review")

# Standard codes for what the shipped models report; any other label is coded in the private scheme.
FINDING_CODES: dict[str, CodedConcept] = {
    "pneumonia": CodedConcept("233604007", "SCT", "Pneumonia"),
}
MEASUREMENT_CODES: dict[str, tuple[CodedConcept, CodedConcept]] = {  # name -> (concept, UCUM unit)
    "head_circumference_mm": (CodedConcept.from_code(codes.LN.HeadCircumference),
                              CodedConcept.from_code(codes.UCUM.Millimeter)),
    "gestational_age_weeks": (CodedConcept.from_code(codes.LN.GestationalAge),
                              CodedConcept.from_code(codes.UCUM.Week)),
}
PROCEDURES = {  # modality -> procedure reported
    "US": CodedConcept.from_code(codes.SCT.UltrasoundScanObstetric),
}
IMAGING_PROCEDURE = CodedConcept.from_code(codes.SCT.ImagingProcedure)
PROBABILITY = CodedConcept.from_code(codes.DCM.Probability)
NO_UNITS = CodedConcept.from_code(codes.UCUM.NoUnits)


class ReportError(ValueError):
    """The stored finding or reference cannot make a valid report (a refused object, never retried)."""


def derived_uid(*parts: str) -> str:
    """A UID from a name (2.25 + UUID v5 as an integer): the same parts give the same UID on every device."""
    return f"2.25.{uuid.uuid5(_NAMESPACE, '/'.join(parts)).int}"


def sop_instance_uid(finding_id: str) -> str:
    """The report's SOP Instance UID: 2.25.<finding_id as a 128-bit integer>, so a re-send is the same object."""
    try:
        return f"2.25.{uuid.UUID(finding_id).int}"
    except (ValueError, AttributeError, TypeError):
        raise ReportError(f"finding_id {finding_id!r} is not a UUID") from None


def series_instance_uid(device_id: str, study_uid: str) -> str:
    """One SR series per device and study: the reports of one scanner sit together in the study."""
    return derived_uid("sr-series", device_id, study_uid)


def _code_for_label(label: str) -> CodedConcept:
    return FINDING_CODES.get(label) or CodedConcept(label[:16], PRIVATE_SCHEME, label.replace("_", " ")[:64])


def _dicom_datetime(created_at: str) -> datetime:
    try:
        return datetime.fromisoformat(created_at.replace("Z", "+00:00")).astimezone(timezone.utc)
    except (AttributeError, ValueError):
        raise ReportError(f"created_at {created_at!r} is not an ISO 8601 time") from None


def _evidence(ref: dict) -> Dataset:
    """The source image as highdicom needs it for the evidence, patient and study modules (its header
    attributes only; the pixels stay where they are)."""
    ds = Dataset()
    for key, keyword in (("sop_class_uid", "SOPClassUID"), ("sop_instance_uid", "SOPInstanceUID"),
                         ("series_uid", "SeriesInstanceUID"), ("study_uid", "StudyInstanceUID")):
        if not ref.get(key):
            raise ReportError(f"the source reference has no {keyword}")
        setattr(ds, keyword, ref[key])
    ds.Modality = ref.get("modality", "") or "OT"
    record = ref.get("record", {})
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                    "AccessionNumber", "StudyID", "ReferringPhysicianName"):
        setattr(ds, keyword, record.get(keyword, None))  # type 2: present even when empty
    if record.get("IssuerOfPatientID"):
        ds.IssuerOfPatientID = record["IssuerOfPatientID"]
    return ds


def _algorithm(model: dict) -> AlgorithmIdentification:
    name, version = model.get("name"), model.get("version")
    if not name or not version:
        raise ReportError("the finding names no model name and version")
    # One parameter line each: the variant's sha256 identifies the exact weights; the rest says how it ran.
    params = [f"sha256={model.get('sha256', '')}",
              f"variant={model.get('variant', '')} ({model.get('precision', '')}, {model.get('engine', '')})"]
    # No Algorithm Manufacturer item: the object's Manufacturer (0008,0070) says it, and each item costs build time.
    return AlgorithmIdentification(name=name, version=str(version), parameters=params)


def _source_images(ref: dict) -> list[SourceImageForMeasurementGroup]:
    frames = [int(ref["frame_number"])] if ref.get("frame_number") else None
    return [SourceImageForMeasurementGroup(ref["sop_class_uid"], ref["sop_instance_uid"], frames)]


def _classification(result: dict, ref: dict, algorithm) -> tuple[CodedConcept, list, list]:
    """(finding type, measurements, evaluations) of a classification."""
    probabilities = result.get("probabilities") or {}
    label = result.get("label")
    positive = ref.get("positive_label") or next((k for k in probabilities if k != "normal"), label)
    if not positive or label is None:
        raise ReportError("classification result without a label")
    finding = _code_for_label(positive)
    present = CodedConcept.from_code(codes.SCT.Present if label == positive else codes.SCT.Absent)
    evaluations = [QualitativeEvaluation(finding, present)]
    measurements = []
    p = probabilities.get(positive)
    if isinstance(p, (int, float)):
        measurements.append(Measurement(PROBABILITY, float(p), NO_UNITS))
    return finding, measurements, evaluations


def _measurements(result: dict, ref: dict, algorithm) -> tuple[CodedConcept | None, list, list]:
    out = []
    for name, value in (result.get("measurements") or {}).items():
        if value is None or name not in MEASUREMENT_CODES:
            continue  # no gestational age outside the formula's range; unknown measurements are not invented
        concept, unit = MEASUREMENT_CODES[name]
        out.append(Measurement(concept, float(value), unit))  # the group's source image is theirs
    finding = MEASUREMENT_CODES["head_circumference_mm"][0] if "head_circumference_mm" in (
        result.get("measurements") or {}) else None
    return finding, out, []


def _comment(text: str) -> TextContentItem:
    return TextContentItem(CodedConcept.from_code(codes.DCM.Comment), text[:1024],
                           relationship_type=RelationshipTypeValues.CONTAINS)


def _group(finding: dict, ref: dict) -> MeasurementsAndQualitativeEvaluations:
    result = finding.get("result") or {}
    algorithm = _algorithm(finding.get("model") or {})
    notes: list[str] = []
    if result.get("assessed") is False:
        concept = (_code_for_label(ref["positive_label"]) if ref.get("positive_label")
                   else CodedConcept.from_code(codes.DCM.Finding))
        measurements: list = []
        evaluations = [QualitativeEvaluation(concept, CodedConcept.from_code(codes.SCT.Undetermined))]
        notes.append(f"Not assessed: {result.get('reason') or 'no reason given'}")
    elif finding.get("task") == "classification" or "label" in result:
        concept, measurements, evaluations = _classification(result, ref, algorithm)
    elif result.get("measurements") is not None or finding.get("task") == "segmentation":
        concept, measurements, evaluations = _measurements(result, ref, algorithm)
        if not measurements:
            notes.append(result.get("note") or result.get("reason") or "No measurement could be made on this image")
    else:
        raise ReportError(f"no report for a {finding.get('task')!r} result")
    if "needs_review" in result:
        evaluations.append(QualitativeEvaluation(NEEDS_REVIEW, CodedConcept.from_code(
            codes.SCT.Yes if result["needs_review"] else codes.SCT.No)))
    for key in ("scope_note",):
        if result.get(key):
            notes.append(str(result[key]))
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=derived_uid("tracking", finding["finding_id"]),
                                               identifier=f"finding {finding['finding_id']}"),
        finding_type=concept,
        algorithm_id=algorithm,
        measurements=measurements or None,
        qualitative_evaluations=evaluations or None,
        source_images=_source_images(ref),
    )
    container = group[0]
    for note in notes:  # TID 1501 has no free-text row of its own: a CONTAINS comment in the group's container
        container.ContentSequence.append(_comment(note))
    return group


def build_sr(finding: dict[str, Any], ref: dict[str, Any]) -> Dataset:
    """The report for one stored finding and its source reference. Raises ReportError when they cannot make a
    valid object (a report that can never be built is refused, not retried)."""
    finding_id = finding.get("finding_id")
    uid = sop_instance_uid(finding_id)
    when = _dicom_datetime(finding.get("created_at", ""))
    evidence = _evidence(ref)
    device = finding.get("device_id") or "edge"
    observer = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=derived_uid("device", device), name=device[:64],
            physical_location=(finding.get("site") or "")[:64] or None))
    try:
        report = MeasurementReport(
            observation_context=ObservationContext(observer_device_context=observer),
            procedure_reported=PROCEDURES.get(ref.get("modality", ""), IMAGING_PROCEDURE),
            imaging_measurements=[_group(finding, ref)],
        )
        sr = ComprehensiveSR(
            evidence=[evidence],
            content=report[0],
            series_instance_uid=series_instance_uid(device, ref["study_uid"]),
            series_number=SERIES_NUMBER,
            sop_instance_uid=uid,
            instance_number=int(finding.get("seq") or 1),
            manufacturer=MANUFACTURER,
            manufacturer_model_name="edge-runtime",
            software_versions=__version__,
            series_description=SERIES_DESCRIPTION,
            content_date=when.date(),
            content_time=when.time().replace(tzinfo=None),
            series_date=when.date(),
            series_time=when.time().replace(tzinfo=None),
            is_complete=True,
        )
    except (ValueError, TypeError, AttributeError) as exc:  # highdicom checks values (lengths, VRs, codes)
        raise ReportError(f"highdicom refused the report: {exc}") from None
    stamp = when.strftime("%Y%m%d"), when.strftime("%H%M%S.%f")
    sr.InstanceCreationDate, sr.InstanceCreationTime = stamp  # the finding's time, not the send's: same object
    sr.ContentDate, sr.ContentTime = stamp
    sr.SeriesDate, sr.SeriesTime = stamp
    for equipment in sr.get("ContributingEquipmentSequence", []):  # highdicom stamps "now" here
        equipment.ContributionDateTime = "".join(stamp)
    return sr


__all__ = ["build_sr", "sop_instance_uid", "series_instance_uid", "ReportError"]
