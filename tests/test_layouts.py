"""Ingest straight from data sets laid out as released: CheXpert (JPEGs + CSV) on S3, MIMIC-CXR (DICOM tree +
gzipped tables + MIMIC-IV patients) on local disk. Small copies in the real column layouts, built here."""

import gzip
import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cfgen.config import JobConfig
from cfgen.io.storage import write_bytes

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

CHEXPERT_COLUMNS = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Enlarged Cardiomediastinum",
                    "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia",
                    "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices"]


def _jpeg(height: int, width: int, value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((height, width), value, dtype=np.uint8), mode="L").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_chexpert_layout_on_s3(ray_local, s3_storage, bucket):
    root = f"s3://{bucket}/CheXpert-v1.0-small"
    rows = []
    for p in range(1, 4):
        for view, frontal, appa in (("view1_frontal", "Frontal", "PA"), ("view2_lateral", "Lateral", "")):
            rel = f"train/patient{p:05d}/study1/{view}.jpg"
            write_bytes(f"{root}/{rel}", _jpeg(390, 320, 40 * p), s3_storage)
            labels = [""] * 14
            labels[13] = "1.0" if p == 1 else ("-1.0" if p == 2 else "")  # Support Devices: 1, uncertain, blank
            labels[10] = "0.0"  # Pleural Effusion
            rows.append([f"CheXpert-v1.0-small/{rel}", ["Female", "Male", "Unknown"][p - 1], str(50 + p),
                         frontal, appa, *labels])
    csv = pd.DataFrame(rows, columns=CHEXPERT_COLUMNS).to_csv(index=False)
    write_bytes(f"{root}/train.csv", csv.encode(), s3_storage)
    write_bytes(f"{root}/valid.csv", pd.DataFrame(columns=CHEXPERT_COLUMNS).to_csv(index=False).encode(), s3_storage)

    job = JobConfig.model_validate({
        "output_uri": f"s3://{bucket}/out", "storage": s3_storage.model_dump(),
        "data": {"manifest_uri": root, "manifest_format": "chexpert", "view_positions": ["PA", "AP"],
                 "decode": {"size": 64, "resize_mode": "pad"},
                 "prompt": {"attributes": ["sex", "age", "pleural_effusion", "support_devices"]}},
    })
    from cfgen.pipeline.ingest import decoded_rows, ingest

    result = ingest(job)
    assert (result.input_rows, result.filtered_out, result.ok_rows, result.error_rows) == (6, 3, 3, 0)
    decoded = decoded_rows(job, result.decoded_uri).to_pandas().sort_values("image_id")
    assert list(decoded["patient_id"]) == ["patient00001", "patient00002", "patient00003"]
    prompts = list(decoded["prompt"])
    assert prompts[0] == ("a chest x-ray of a 51 year old female patient, without pleural effusion, "
                          "with support devices")
    assert "support devices" not in prompts[1]  # uncertain label, policy "omit"
    assert prompts[2].startswith("a chest x-ray of a 53 year old patient")  # sex Unknown left out
    image = np.stack(decoded["image"].to_numpy())[0]
    # 390x320 portrait padded into 64x64: black bars left and right, the image value in the middle
    assert image[:, :4].max() == 0 and abs(int(image[32, 32]) - 40) <= 2


def _dicom(rows: int, cols: int, photometric: str) -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.Rows, ds.Columns = "DX", rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ramp = np.tile(np.linspace(0, 4095, cols, dtype=np.uint16), (rows, 1))
    ds.PixelData = ramp.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_mimic_layout_on_local_disk(ray_local, tmp_path):
    root = tmp_path / "mimic-cxr"
    meta, split, labels = [], [], []
    for i, (subject, study, view) in enumerate([(10000032, 50414267, "PA"), (10000032, 53189527, "LATERAL"),
                                                (11000011, 55555555, "AP")]):
        dicom_id = f"0{i}aa804e-bde0afdd-112c0b34-7bc16630-4e38401{i}"
        path = root / "files" / f"p{str(subject)[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom_id}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_dicom(300, 240, "MONOCHROME1" if i == 0 else "MONOCHROME2"))
        meta.append([dicom_id, subject, study, "CHEST (PA AND LAT)", view, 300, 240, 21800506 + i, 213014.531,
                     "CHEST (PA AND LAT)", "postero-anterior", "Erect"])
        split.append([dicom_id, study, subject, "train" if subject == 10000032 else "test"])
    labels.append([10000032, 50414267] + [""] * 13 + ["1.0"])
    meta_cols = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
                 "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
                 "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning"]
    label_cols = ["subject_id", "study_id", "Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
                  "Enlarged Cardiomediastinum", "Fracture", "Lung Lesion", "Lung Opacity", "No Finding",
                  "Pleural Effusion", "Pleural Other", "Pneumonia", "Pneumothorax", "Support Devices"]
    for name, frame in (("metadata", pd.DataFrame(meta, columns=meta_cols)),
                        ("chexpert", pd.DataFrame(labels, columns=label_cols)),
                        ("split", pd.DataFrame(split, columns=["dicom_id", "study_id", "subject_id", "split"]))):
        (root / f"mimic-cxr-2.0.0-{name}.csv.gz").write_bytes(gzip.compress(frame.to_csv(index=False).encode()))
    patients = tmp_path / "patients.csv.gz"
    patients.write_bytes(gzip.compress(b"subject_id,gender,anchor_age,anchor_year,anchor_year_group,dod\n"
                                       b"10000032,F,52,2180,2014 - 2016,\n"))

    job = JobConfig.model_validate({
        "output_uri": str(tmp_path / "out"),
        "data": {"manifest_uri": str(root), "manifest_format": "mimic", "patients_uri": str(patients),
                 "view_positions": ["PA", "AP"], "decode": {"size": 64},
                 "prompt": {"attributes": ["sex", "age", "support_devices"]}},
    })
    from cfgen.pipeline.ingest import decoded_rows, ingest

    result = ingest(job)
    assert (result.input_rows, result.filtered_out, result.ok_rows, result.error_rows) == (3, 1, 2, 0)
    decoded = decoded_rows(job, result.decoded_uri).to_pandas().set_index("view_position")
    assert decoded.loc["PA", "prompt"] == "a chest x-ray of a 52 year old female patient, with support devices"
    assert decoded.loc["AP", "prompt"] == "a chest x-ray"  # no patients row, no labels: nothing is invented
    assert decoded.loc["PA", "split"] == "train" and decoded.loc["AP", "split"] == "test"
    pa, ap = (np.asarray(decoded.loc[v, "image"]) for v in ("PA", "AP"))
    # MONOCHROME1 is inverted on decode: the PA ramp runs bright -> dark, the MONOCHROME2 one dark -> bright
    assert pa[32, 10] > pa[32, 50] and ap[32, 10] < ap[32, 50]
