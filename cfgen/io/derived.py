"""De-identified derived DICOMs of counterfactuals (highdicom Secondary Capture), for the batch job and Serve.

A counterfactual is a new image derived from a patient's X-ray, so it is written as a new object, not a copy of the
source with new pixels: Secondary Capture (the IOD for images a system made rather than acquired), ImageType
DERIVED\\SECONDARY, new Study, Series and SOP Instance UIDs, the model and the edit in the series description and
the derivation description, and a Source Image Sequence that points at the source image.

De-identification follows DICOM PS3.15 Annex E's Basic Application Level Confidentiality Profile by construction:
the object is built from nothing but the attributes listed here, so no patient name, birth date, ID, other IDs,
address, accession number, institution, physician, operator or date from the source can leak into it; the
configured pseudonym is the patient's name and ID. UIDs are replaced as the profile's "U" action asks,
consistently: the replacement is a hash of a salt and the source UID (`2.25.<integer>`, PS3.5 B.2), so every
counterfactual of one study shares one new study UID and the source reference points at the same replacement a
team's de-identification of the sources with the same salt would give. Keep the salt private: with it, anyone
holding the sources can link them. Identical inputs give identical files (the batch job's reruns are
idempotent). PatientIdentityRemoved is YES and the Deidentification Method Code Sequence names the profile
(DCM 113100).

The pixels are the counterfactual at the decoded resolution (`data.decode.size`), MONOCHROME2, 8 bits; pixel
spacing is the source's scaled by the resize when the source said it.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any

import numpy as np

from cfgen.config import StorageConfig

#: The generating software, as the Manufacturer of the equipment that made the derived image.
MANUFACTURER = "cfgen"
#: What the derived objects never copy from the source (PS3.15 E.1-1's Basic Profile, the attributes the issue and
#: the tests name); the builder copies nothing else either, so this list documents rather than filters.
REMOVED_FROM_SOURCE = (
    "PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "OtherPatientIDsSequence",
    "OtherPatientNames", "PatientAddress", "AccessionNumber", "InstitutionName", "InstitutionAddress",
    "ReferringPhysicianName", "PerformingPhysicianName", "NameOfPhysiciansReadingStudy", "OperatorsName",
    "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "StudyID", "PatientTelephoneNumbers",
)


def replacement_uid(salt: str, *parts: Any) -> str:
    """A UID under the 2.25 root from a hash of `salt` and `parts` (the same inputs, the same UID)."""
    digest = hashlib.sha256("|".join([salt, *map(str, parts)]).encode()).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def _source_header(source: bytes | None):
    if not source:
        return None
    import pydicom

    try:
        return pydicom.dcmread(io.BytesIO(source), stop_before_pixels=True, force=False)
    except Exception:  # noqa: BLE001 - not a DICOM (a PNG source): no header to reference
        return None


def derived_dicom(
    counterfactual: np.ndarray,
    *,
    source: bytes | None = None,
    key: str,
    image_id: str,
    description: str,
    derivation: str,
    pseudonym: str = "ANONYMOUS",
    salt: str = "cfgen",
    scale: float | None = None,
    series_key: str = "",
) -> bytes:
    """The Secondary Capture of one counterfactual (float in [0,1] or uint8 [H,W]) as DICOM bytes.

    `source`: the source image's bytes when it is a DICOM (its UIDs are referenced, replaced; its pixel spacing
    scaled by `scale`, output pixels per source pixel, by default the long sides' ratio); `key`: the counterfactual's key (its SOP Instance UID);
    `description`: the series description (model and edit, at most 64 characters kept); `derivation`: the
    derivation description (the full edit, model, version, method)."""
    import highdicom as hd
    from pydicom.dataset import Dataset

    header = _source_header(source)
    pixels = np.asarray(counterfactual)
    if pixels.dtype != np.uint8:
        pixels = np.clip(np.rint(pixels.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    source_study = getattr(header, "StudyInstanceUID", None) or f"image:{image_id}"
    study_uid = replacement_uid(salt, "study", source_study)
    series_uid = replacement_uid(salt, "series", source_study, series_key or description)
    spacing = None
    if scale is None and header is not None and getattr(header, "Rows", None) and getattr(header, "Columns", None):
        scale = max(pixels.shape) / max(int(header.Rows), int(header.Columns))  # the long side fitted (pad mode)
    if header is not None and getattr(header, "PixelSpacing", None) and scale:
        spacing = tuple(float(v) / scale for v in header.PixelSpacing)
    image = hd.sc.SCImage(
        pixel_array=pixels,
        photometric_interpretation="MONOCHROME2",
        bits_allocated=8,
        coordinate_system="PATIENT",
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        series_number=1,
        sop_instance_uid=replacement_uid(salt, "instance", key),
        instance_number=1,
        manufacturer=MANUFACTURER,
        patient_id=pseudonym,
        patient_name=pseudonym if "^" in pseudonym else pseudonym + "^",
        patient_orientation=("L", "F"),
        pixel_spacing=spacing,
    )
    image.ImageType = ["DERIVED", "SECONDARY"]
    image.SeriesDescription = description[:64]
    image.DerivationDescription = derivation[:1024]
    image.PatientIdentityRemoved = "YES"
    image.DeidentificationMethod = "PS3.15 Basic Application Confidentiality Profile"
    method = Dataset()
    method.CodeValue, method.CodingSchemeDesignator = "113100", "DCM"
    method.CodeMeaning = "Basic Application Confidentiality Profile"
    image.DeidentificationMethodCodeSequence = [method]
    if header is not None and getattr(header, "SOPInstanceUID", None):
        ref = Dataset()
        ref.ReferencedSOPClassUID = header.SOPClassUID
        ref.ReferencedSOPInstanceUID = replacement_uid(salt, "instance-source", header.SOPInstanceUID)
        purpose = Dataset()  # CID 7202 "Source Image Purposes of Reference"
        purpose.CodeValue, purpose.CodingSchemeDesignator = "121322", "DCM"
        purpose.CodeMeaning = "Source image for image processing operation"
        ref.PurposeOfReferenceCodeSequence = [purpose]
        image.SourceImageSequence = [ref]
        if getattr(header, "Modality", None):
            image.Modality = header.Modality
        for name in ("ViewPosition", "BodyPartExamined", "Laterality"):
            if getattr(header, name, None):
                setattr(image, name, getattr(header, name))
    def no_dates(dataset, element):  # no date or time of the build anywhere (dates are what the profile
        if element.VR in ("DA", "TM", "DT"):  # removes, and a rerun must write the same bytes)
            element.value = ""

    image.walk(no_dates)
    buf = io.BytesIO()
    image.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def derived_dicom_for_row(row: dict[str, Any], counterfactual: np.ndarray, pseudonym: str,
                          storage: StorageConfig | None = None, salt: str = "cfgen") -> bytes:
    """`derived_dicom` for a results row of the generation job (its image_uri read again for the header)."""
    from cfgen.io.storage import read_bytes

    source = None
    uri = str(row.get("image_uri") or "")
    if uri and not uri.lower().split("?")[0].endswith((".png", ".jpg", ".jpeg")):
        try:
            source = read_bytes(uri, storage)
        except Exception:  # noqa: BLE001 - the header is optional; the image is already decoded
            source = None
    model = row.get("model_version") or ""
    description = f"cfgen do({row.get('edit_name')}) {row.get('method')} {model}".strip()
    derivation = (f"Counterfactual by cfgen: do({row.get('edit_applied') or row.get('edit')}), method "
                  f"{row.get('method')}, seed {row.get('seed')}, model {row.get('model_uri')} version {model}")
    return derived_dicom(counterfactual, source=source, key=str(row.get("key") or row.get("image_id")),
                         image_id=str(row.get("image_id")), description=description, derivation=derivation,
                         pseudonym=pseudonym, salt=salt,
                         series_key=f"{model}|{row.get('edit_name')}|{row.get('method')}|{row.get('seed')}")
