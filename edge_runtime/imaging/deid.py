"""De-identification of anything that may leave the device.

Findings carry only pseudonymous identifiers: HMAC-SHA256 of the original UID under a secret key that
never leaves this device, so the same study always maps to the same pseudonym here (a hub can group a
study's findings) while nobody without the key can link it back. `deidentify` applies the DICOM PS3.15
Basic Application Level Confidentiality Profile to a dataset for the rare case a dataset itself is shared.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from pydicom.dataset import Dataset

KEY_BYTES = 32

# PS3.15 Table E.1-1, Basic Profile. Actions: X remove, Z empty, D dummy value, U pseudonymous UID.
# Attributes the profile lists as "X/Z/D" variants are mapped to the strictest workable action.
_UID_ATTRIBUTES = (
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "MediaStorageSOPInstanceUID",
    "FrameOfReferenceUID", "SynchronizationFrameOfReferenceUID", "ReferencedSOPInstanceUID",
    "ReferencedFrameOfReferenceUID", "IrradiationEventUID", "CreatorVersionUID", "DeviceUID",
    "DimensionOrganizationUID", "DoseReferenceUID", "FiducialUID", "InstanceCreatorUID",
    "StorageMediaFileSetUID", "TargetUID", "TemplateExtensionCreatorUID", "TemplateExtensionOrganizationUID",
    "TransactionUID", "UID", "ConcatenationUID", "ContextGroupExtensionCreatorUID",
    "LargePaletteColorLookupTableUID", "PaletteColorLookupTableUID", "ReferencedGeneralPurposeScheduledProcedureStepTransactionUID",
)
_EMPTY_ATTRIBUTES = (  # Z: keep the element, no value (type 2 attributes that must be present)
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
    "StudyDate", "StudyTime", "ReferringPhysicianName", "ContentCreatorName", "FillerOrderNumberImagingServiceRequest",
    "PlacerOrderNumberImagingServiceRequest", "VerifyingObserverName", "PersonName",
)
_REMOVE_ATTRIBUTES = (  # X
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "StationName", "OperatorsName",
    "PerformingPhysicianName", "NameOfPhysiciansReadingStudy", "PhysiciansOfRecord", "RequestingPhysician",
    "ScheduledPerformingPhysicianName", "PatientAddress", "PatientTelephoneNumbers", "PatientBirthName",
    "PatientMotherBirthName", "OtherPatientIDs", "OtherPatientNames", "OtherPatientIDsSequence", "PatientAge",
    "PatientSize", "PatientWeight", "MedicalRecordLocator", "EthnicGroup", "Occupation", "AdditionalPatientHistory",
    "PatientComments", "PatientBirthTime", "PatientInsurancePlanCodeSequence", "PatientReligiousPreference",
    "PatientState", "PregnancyStatus", "SmokingStatus", "MedicalAlerts", "Allergies", "CountryOfResidence",
    "RegionOfResidence", "MilitaryRank", "BranchOfService", "ResponsiblePerson", "ResponsibleOrganization",
    "IssuerOfPatientID", "PatientBirthDateInAlternativeCalendar", "PatientDeathDateInAlternativeCalendar",
    "PatientAlternativeCalendar", "InsurancePlanIdentification", "DeviceSerialNumber", "PlateID", "CassetteID",
    "GantryID", "DetectorID", "AcquisitionDeviceProcessingDescription", "AdmissionID", "AdmittingDiagnosesDescription",
    "AdmittingDiagnosesCodeSequence", "ReasonForStudy", "RequestedProcedureDescription", "RequestedProcedureID",
    "RequestAttributesSequence", "PerformedProcedureStepID", "PerformedProcedureStepDescription",
    "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime", "PerformedProcedureStepEndDate",
    "PerformedProcedureStepEndTime", "ScheduledProcedureStepID", "ScheduledProcedureStepDescription",
    "ScheduledProcedureStepLocation", "ScheduledStationName", "ScheduledStationAETitle", "StudyDescription",
    "SeriesDescription", "ProtocolName", "ImageComments", "TextComments", "TextString", "DerivationDescription",
    "InterpretationText", "InterpretationAuthor", "ResultsComments", "ServiceEpisodeDescription", "ServiceEpisodeID",
    "VisitComments", "CurrentPatientLocation", "PatientInstitutionResidence", "InstitutionCodeSequence",
    "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers", "PersonAddress", "PersonTelephoneNumbers",
    "OrderEnteredBy", "OrderEntererLocation", "OrderCallbackPhoneNumber", "ReferencedPatientSequence",
    "ReferencedStudySequence", "ReferencedPerformedProcedureStepSequence", "AcquisitionDate", "AcquisitionTime",
    "AcquisitionDateTime", "ContentDate", "ContentTime", "SeriesDate", "SeriesTime", "InstanceCreationDate",
    "InstanceCreationTime", "OverlayDate", "OverlayTime", "CurveDate", "CurveTime", "DigitalSignaturesSequence",
    "OriginalAttributesSequence", "ModifiedAttributesSequence", "RequestingService", "Manufacturer",
    "IconImageSequence", "ConsultingPhysicianName", "EvaluatorName", "HumanPerformerName", "ReviewerName",
    "SourceApplicationEntityTitle", "DataSetTrailingPadding", "FrameComments", "SpecimenAccessionNumber",
    "ProcedureCodeSequence", "PerformedProcedureCodeSequence", "RequestedProcedureCodeSequence",
    "ReasonForRequestedProcedureCodeSequence", "ReferencedImageSequence", "SourceImageSequence",
    "PerformedProtocolCodeSequence", "ScheduledProtocolCodeSequence", "ActualHumanPerformersSequence",
)

_FILE_META_REMOVE = (
    "SourceApplicationEntityTitle", "SendingApplicationEntityTitle", "ReceivingApplicationEntityTitle",
    "PrivateInformationCreatorUID", "PrivateInformation",
)

# What the basic profile names as identifying, for checks that nothing leaks (tests and the privacy audit).
IDENTIFYING_ATTRIBUTES = _EMPTY_ATTRIBUTES + _REMOVE_ATTRIBUTES + _UID_ATTRIBUTES + _FILE_META_REMOVE


def load_or_create_key(path: str | Path) -> bytes:
    """The device's pseudonymisation key: created once (0600), then read. Losing it only breaks linkage
    of old and new pseudonyms; it never exposes identities."""
    path = Path(path)
    try:
        data = path.read_bytes()
        if len(data) >= KEY_BYTES:
            return data[:KEY_BYTES]
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(KEY_BYTES)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return key


def pseudonym(key: bytes, value: str) -> str:
    """A stable pseudonymous DICOM UID (2.25 + 128-bit integer from HMAC-SHA256); '' stays ''."""
    if not value:
        return ""
    digest = hmac.new(key, value.encode("utf-8"), hashlib.sha256).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def deidentify(ds: Dataset, key: bytes) -> Dataset:
    """Apply the PS3.15 basic profile in place (UIDs pseudonymised, identifying attributes emptied or removed,
    private tags, overlays and curves removed) and mark the dataset as de-identified."""
    _deidentify_level(ds, key)
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        if "MediaStorageSOPInstanceUID" in meta:
            meta.MediaStorageSOPInstanceUID = pseudonym(key, str(meta.MediaStorageSOPInstanceUID))
        for keyword in _FILE_META_REMOVE:  # AE titles can name the sending station and site
            if keyword in meta:
                delattr(meta, keyword)
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "DICOM PS3.15 Basic Application Confidentiality Profile; HMAC-SHA256 UID pseudonyms"
    return ds


def _deidentify_level(ds: Dataset, key: bytes) -> None:
    ds.remove_private_tags()
    for tag in [t for t in ds.keys() if (t.group & 0xFF00) in (0x5000, 0x6000)]:
        del ds[tag]  # curves and overlays may carry burned-in annotations
    for keyword in _REMOVE_ATTRIBUTES:
        if keyword in ds:
            delattr(ds, keyword)
    for keyword in _EMPTY_ATTRIBUTES:
        if keyword in ds:
            ds[keyword].value = None
    for keyword in _UID_ATTRIBUTES:
        if keyword in ds and ds[keyword].value:
            value = ds[keyword].value
            if not isinstance(value, str) and hasattr(value, "__iter__"):
                ds[keyword].value = [pseudonym(key, str(v)) for v in value]
            else:
                ds[keyword].value = pseudonym(key, str(value))
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                _deidentify_level(item, key)
