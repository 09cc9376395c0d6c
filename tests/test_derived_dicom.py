"""Derived DICOMs: Secondary Capture, new UIDs, DERIVED, a source reference, and nothing identifying copied."""

import io
import warnings

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from cfgen.config import PhantomConfig
from cfgen.io.derived import derived_dicom, derived_dicom_for_row, replacement_uid
from cfgen.phantoms.writers import write_phantoms

#: Every identifying attribute the Basic Profile removes that a source CXR commonly carries, with a value to find.
PHI = {
    "PatientName": "Doe^Jane", "PatientID": "MRN-483920", "PatientBirthDate": "19580214",
    "OtherPatientIDs": "ALT-77121", "PatientAddress": "12 Harbour Road", "AccessionNumber": "ACC-99172",
    "InstitutionName": "St Example Hospital", "InstitutionAddress": "1 Hospital Way",
    "ReferringPhysicianName": "Refer^Rita", "PerformingPhysicianName": "Perform^Paul",
    "NameOfPhysiciansReadingStudy": "Reader^Rob", "OperatorsName": "Operator^Olga", "StudyDate": "20190304",
    "StudyID": "ST-5512", "PatientTelephoneNumbers": "5550100",
}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ph")
    write_phantoms(PhantomConfig(n=1, size=64, seed=3, formats=["dicom"]), str(folder))
    ds = pydicom.dcmread(folder / "images" / "PH000000.dcm")
    for name, value in PHI.items():
        setattr(ds, name, value)
    other = Dataset()
    other.PatientID = "SEQ-ID-3131"
    ds.OtherPatientIDsSequence = [other]
    buf = io.BytesIO()
    ds.save_as(buf)
    path = folder / "with_phi.dcm"
    path.write_bytes(buf.getvalue())
    return ds, buf.getvalue(), path


def _derive(source_bytes, key="key-1", **kw):
    image = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return derived_dicom(image, source=source_bytes, key=key, image_id="PH000000",
                             description="cfgen do(smoking=1) ddpm v1", derivation="do(smoking=1)", **kw)


def test_nothing_identifying_is_copied_and_the_pseudonym_is_written(source):
    src, data, _ = source
    out = pydicom.dcmread(io.BytesIO(_derive(data, pseudonym="PSEUDO-17")))
    dump = str(out) + repr(out.file_meta)
    for name, value in PHI.items():
        assert value not in dump, name
    assert "SEQ-ID-3131" not in dump
    assert str(out.PatientName) == "PSEUDO-17^" and out.PatientID == "PSEUDO-17"
    assert out.PatientIdentityRemoved == "YES"
    assert out.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    for uid in (src.SOPInstanceUID, src.StudyInstanceUID, src.SeriesInstanceUID):
        assert uid not in dump  # replaced, never copied


def test_it_is_a_derived_secondary_capture_that_references_its_source(source):
    src, data, _ = source
    out = pydicom.dcmread(io.BytesIO(_derive(data)))
    assert out.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
    assert list(out.ImageType) == ["DERIVED", "SECONDARY"]
    ref = out.SourceImageSequence[0]
    assert ref.ReferencedSOPClassUID == src.SOPClassUID
    assert ref.ReferencedSOPInstanceUID == replacement_uid("cfgen", "instance-source", src.SOPInstanceUID)
    assert out.SeriesDescription == "cfgen do(smoking=1) ddpm v1" and "smoking" in out.DerivationDescription
    assert out.StudyInstanceUID.startswith("2.25.") and out.SOPInstanceUID.startswith("2.25.")
    pixels = out.pixel_array
    assert pixels.shape == (64, 64) and pixels.dtype == np.uint8 and pixels.max() == 255
    assert out.PhotometricInterpretation == "MONOCHROME2"


def test_the_same_inputs_give_the_same_bytes_and_another_key_another_instance(source):
    _, data, _ = source
    a, b, c = _derive(data), _derive(data), _derive(data, key="key-2")
    assert a == b
    da, dc = pydicom.dcmread(io.BytesIO(a)), pydicom.dcmread(io.BytesIO(c))
    assert da.SOPInstanceUID != dc.SOPInstanceUID
    assert (da.StudyInstanceUID, da.SeriesInstanceUID) == (dc.StudyInstanceUID, dc.SeriesInstanceUID)
    other_salt = pydicom.dcmread(io.BytesIO(_derive(data, salt="team-secret")))
    assert other_salt.StudyInstanceUID != da.StudyInstanceUID


def test_a_png_source_gets_new_uids_and_no_source_reference():
    out = pydicom.dcmread(io.BytesIO(_derive(None)))
    assert "SourceImageSequence" not in out and out.StudyInstanceUID.startswith("2.25.")


def test_a_results_row_is_written_from_its_source_file(source):
    _, _, path = source
    row = {"key": "k", "image_id": "PH000000", "image_uri": str(path), "edit_name": "smoking=1", "method": "ddpm",
           "seed": 0, "model_version": "abc123", "model_uri": "runs/x", "edit_applied": '{"smoking": 1}'}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = pydicom.dcmread(io.BytesIO(derived_dicom_for_row(row, np.zeros((64, 64)), "P-1")))
    assert "SourceImageSequence" in out and out.PatientID == "P-1"
    assert "abc123" in out.SeriesDescription and "smoking" in out.DerivationDescription
    assert "Doe" not in str(out)
