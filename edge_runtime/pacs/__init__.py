"""Reports for the clinic's PACS: a DICOM Comprehensive SR (TID 1500) per study finding, delivered by C-STORE.

- `reference`: what the PACS destination needs from a source's DICOM header (the real Study, Series and SOP
  Instance UIDs, the patient and study attributes); kept in the outbox for this destination only, never in the
  MQTT payload. `no_report_reason` says why an input gets no report (a PNG has no DICOM identifiers).
- `sr`: the SR built with highdicom from the stored finding and that reference; its SOP Instance UID is derived
  from the finding_id, so a re-send is the same object.
- `delivery`: the store-and-forward worker (pynetdicom SCU) that drains the outbox's PACS deliveries.

The service wires these; nothing here imports the service or the CLI.
"""
from edge_runtime.pacs.reference import DESTINATION, no_report_reason, source_reference

__all__ = ["DESTINATION", "no_report_reason", "source_reference"]
