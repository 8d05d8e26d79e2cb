"""What a PACS report needs from its source, and why an input gets none.

The reference holds the original identifiers (Study, Series and SOP Instance UIDs, patient and study attributes)
so that the report lands in the clinic's own study. It is stored with the PACS delivery in the outbox and read
only by the PACS worker; the finding published over MQTT keeps its pseudonyms (imaging.deid).
"""
from __future__ import annotations

from typing import Any

DESTINATION = "pacs"
# Not a report-worthy input: say why once, in the log and in `status` (counted per reason).
NO_DICOM = "not a DICOM input (no Study, Series and SOP Instance UIDs to report against)"
MULTI_FRAME = ("a frame of a multi-frame input: one report per file, on its last frame (a live cine is reported "
               "by its exam finding)")


def no_report_reason(meta: Any, n_frames: int = 1, frame_index: int = 0) -> str | None:
    """None when a finding on this input can get a report; otherwise the reason it cannot. A multi-frame file
    gets one report, for its last frame's finding (the study is complete then), not one per frame."""
    if meta is None:
        return NO_DICOM
    missing = [name for name, value in (("StudyInstanceUID", meta.study_uid), ("SeriesInstanceUID", meta.series_uid),
                                        ("SOPInstanceUID", meta.instance_uid), ("SOPClassUID", meta.sop_class_uid))
               if not value]
    if missing:
        return f"DICOM header without {', '.join(missing)}"
    if n_frames > 1 and frame_index < n_frames - 1:
        return MULTI_FRAME
    return None


def source_reference(meta: Any, *, frame_index: int = 0, n_frames: int = 1, positive_label: str = "") -> dict:
    """The PACS destination's record of where a finding came from (a dict stored as JSON in the outbox).
    `positive_label` names the classification label that means "finding present" (the manifest's)."""
    ref = {
        "study_uid": meta.study_uid,
        "series_uid": meta.series_uid,
        "sop_instance_uid": meta.instance_uid,
        "sop_class_uid": meta.sop_class_uid,
        "modality": meta.modality,
        "record": dict((meta.extra or {}).get("record", {})),  # patient and study attributes, as in the header
    }
    if n_frames > 1:
        ref["frame_number"] = frame_index + 1  # DICOM frame numbers start at 1
    if positive_label:
        ref["positive_label"] = positive_label
    return ref
