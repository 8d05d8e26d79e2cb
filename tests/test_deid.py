from __future__ import annotations

import os
import stat

import pydicom
import pytest
from conftest import CR_CHEST, DICOM_DIR, needs_shared

from edge_runtime.imaging.deid import IDENTIFYING_ATTRIBUTES, deidentify, load_or_create_key, pseudonym


def test_key_is_created_once_private(tmp_path):
    path = tmp_path / "state" / "device.key"
    key = load_or_create_key(path)
    assert len(key) == 32 and load_or_create_key(path) == key
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_pseudonyms_are_stable_keyed_and_valid_uids():
    a, b = b"a" * 32, b"b" * 32
    uid = "1.2.826.0.1.3680043.8.498.1"
    assert pseudonym(a, uid) == pseudonym(a, uid) != pseudonym(b, uid)
    p = pseudonym(a, uid)
    assert p.startswith("2.25.") and len(p) <= 64 and uid not in p
    assert pseudonym(a, "") == ""


def identifying_values(ds: pydicom.Dataset) -> set[str]:
    values = set()
    for elem in list(ds.iterall()) + list(ds.file_meta):
        if elem.keyword in IDENTIFYING_ATTRIBUTES and elem.VR != "SQ" and elem.value not in (None, ""):
            text = str(elem.value).strip()
            if len(text) >= 4:
                values.add(text)
    return values


@needs_shared
@pytest.mark.parametrize("path", sorted(DICOM_DIR.rglob("*.dcm")) if DICOM_DIR.is_dir() else [], ids=lambda p: p.name)
def test_basic_profile_removes_every_identifying_value(path):
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    before = identifying_values(ds)
    deidentify(ds, b"k" * 32)
    dumped = str(ds) + str(ds.file_meta)
    leaked = [v for v in before if v in dumped and not v.startswith("2.25.")]
    assert not leaked, f"still present after de-identification: {leaked}"
    assert ds.PatientIdentityRemoved == "YES"


@needs_shared
def test_deidentified_dataset_keeps_pixels_and_geometry():
    ds = pydicom.dcmread(CR_CHEST)
    rows, cols, modality = ds.Rows, ds.Columns, ds.Modality
    original_uid = ds.SOPInstanceUID
    deidentify(ds, b"k" * 32)
    assert (ds.Rows, ds.Columns, ds.Modality) == (rows, cols, modality)
    assert ds.SOPInstanceUID == pseudonym(b"k" * 32, original_uid)
    assert ds.pixel_array.shape == (rows, cols)
