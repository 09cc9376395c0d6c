"""CheXpert and MIMIC-CXR tables, in their released column layouts, to cfgen manifests."""

from __future__ import annotations

import gzip
import io
import math

import pandas as pd
import pytest

from cfgen.io import adapters
from cfgen.io.manifest import normalize_manifest, read_manifest, read_table
from cfgen.io.splits import assert_no_patient_leak

# --- CheXpert: header and rows as in CheXpert-v1.0-small/train.csv (labels 1.0/0.0/-1.0/blank) -----------------
CHEXPERT_HEADER = (
    "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Opacity,"
    "Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,Fracture,"
    "Support Devices"
)
CHEXPERT_TRAIN = CHEXPERT_HEADER + """
CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,Female,68,Frontal,AP,1.0,,,,,,,,,0.0,,,,1.0
CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg,Female,87,Frontal,AP,,,-1.0,1.0,,-1.0,-1.0,,-1.0,,-1.0,,1.0,
CheXpert-v1.0-small/train/patient00002/study1/view2_lateral.jpg,Female,83,Lateral,,,,,1.0,,,-1.0,,,,,,1.0,
CheXpert-v1.0-small/train/patient00003/study1/view1_frontal.jpg,Male,41,Frontal,PA,,,,,,1.0,,,,0.0,,,,
CheXpert-v1.0-small/train/patient00004/study1/view2_lateral.jpg,Unknown,0,Lateral,LL,1.0,0.0,,,,,,,,,0.0,,,
"""
CHEXPERT_VALID = CHEXPERT_HEADER + """
CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg,Male,73,Frontal,AP,0.0,1.0,1.0,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0
CheXpert-v1.0-small/valid/patient64542/study1/view2_lateral.jpg,Male,70,Lateral,,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,1.0,0.0,0.0,1.0
"""

# --- MIMIC-CXR-JPG 2.0.0 tables (gzipped on PhysioNet) -----------------------------------------------------
MIMIC_METADATA = """\
dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,StudyDate,StudyTime,ProcedureCodeSequence_CodeMeaning,ViewCodeSequence_CodeMeaning,PatientOrientationCodeSequence_CodeMeaning
02aa804e-bde0afdd-112c0b34-7bc16630-4e384014,10000032,50414267,CHEST (PA AND LAT),PA,3056,2544,21800506,213014.531,CHEST (PA AND LAT),postero-anterior,Erect
174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962,10000032,50414267,CHEST (PA AND LAT),LATERAL,3056,2544,21800506,213014.531,CHEST (PA AND LAT),lateral,Erect
68b5c4b1-227d0485-9cc38c3f-7b84ab51-4b472714,10000032,53911762,CHEST (PORTABLE AP),AP,2705,2539,21830723,80556.875,CHEST (PORTABLE AP),antero-posterior,
fffabebf-74fd3a1f-673b6b41-96ec0ac9-2ab69818,10000764,57375967,,,2544,3056,21321102,131225.171,,,
ea030e7a-2e3b1346-bc518786-7a8fd698-f673b44c,10000764,57375967,CHEST (PA AND LAT),  ap axial ,3056,2544,21321102,131225.171,CHEST (PA AND LAT),,Erect
4b8e7f2a-11aa22bb-33cc44dd-55ee66ff-77889900,19999987,58971208,CHEST (PA AND LAT),LL,2544,3056,,,CHEST (PA AND LAT),left lateral,Erect
"""
MIMIC_CHEXPERT = """\
subject_id,study_id,Atelectasis,Cardiomegaly,Consolidation,Edema,Enlarged Cardiomediastinum,Fracture,Lung Lesion,Lung Opacity,No Finding,Pleural Effusion,Pleural Other,Pneumonia,Pneumothorax,Support Devices
10000032,50414267,,,,,,,,,1.0,,,,,
10000032,53911762,,,,1.0,,,,-1.0,,1.0,,,0.0,1.0
10000764,57375967,,,1.0,,,,,,,,,-1.0,,
"""
MIMIC_NEGBIO = """\
subject_id,study_id,Atelectasis,Cardiomegaly,Consolidation,Edema,Enlarged Cardiomediastinum,Fracture,Lung Lesion,Lung Opacity,No Finding,Pleural Effusion,Pleural Other,Pneumonia,Pneumothorax,Support Devices
10000032,50414267,,1.0,,,,,,,,,,,,
"""
MIMIC_SPLIT = """\
dicom_id,study_id,subject_id,split
02aa804e-bde0afdd-112c0b34-7bc16630-4e384014,50414267,10000032,train
174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962,50414267,10000032,train
68b5c4b1-227d0485-9cc38c3f-7b84ab51-4b472714,53911762,10000032,train
fffabebf-74fd3a1f-673b6b41-96ec0ac9-2ab69818,57375967,10000764,validate
ea030e7a-2e3b1346-bc518786-7a8fd698-f673b44c,57375967,10000764,validate
4b8e7f2a-11aa22bb-33cc44dd-55ee66ff-77889900,58971208,19999987,test
"""
MIMIC_PATIENTS = """\
subject_id,gender,anchor_age,anchor_year,anchor_year_group,dod
10000032,F,52,2180,2014 - 2016,2180-09-09
10000764,M,86,2132,2014 - 2016,
"""


def _csv(text: str) -> pd.DataFrame:
    return pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, na_values=[""])


# ------------------------------------------------------------------------------------------------------ CheXpert
def test_chexpert_paths_ids_and_prefix_stripping():
    m = adapters.chexpert_to_manifest(_csv(CHEXPERT_TRAIN), image_root="s3://data/chexpert", split="train")
    assert m.loc[0, "image_uri"] == "s3://data/chexpert/train/patient00001/study1/view1_frontal.jpg"
    assert m.loc[0, "image_id"] == "patient00001_study1_view1_frontal"
    assert (m.loc[1, "patient_id"], m.loc[1, "study_id"]) == ("patient00002", "study2")
    assert m["row_id"].tolist() == [0, 1, 2, 3, 4]
    assert set(m["split"]) == {"train"}


def test_chexpert_prefix_of_the_full_dataset_is_stripped_too():
    assert adapters.strip_chexpert_prefix("CheXpert-v1.0/valid/patient64541/study1/view1_frontal.jpg") == (
        "valid/patient64541/study1/view1_frontal.jpg"
    )
    assert adapters.strip_chexpert_prefix("train/patient1/study1/view1.jpg") == "train/patient1/study1/view1.jpg"


def test_chexpert_without_image_root_stays_relative_to_the_dataset_folder():
    m = adapters.chexpert_to_manifest(_csv(CHEXPERT_VALID))
    assert m.loc[0, "image_uri"] == "valid/patient64541/study1/view1_frontal.jpg"
    assert m["split"].tolist() == ["validate", "validate"]  # from the path when no split is given


def test_chexpert_sex_age_views_and_labels():
    m = adapters.chexpert_to_manifest(_csv(CHEXPERT_TRAIN))
    assert m.loc[0, "sex"] == "F" and m.loc[3, "sex"] == "M" and m.loc[4, "sex"] is None  # "Unknown"
    assert m.loc[0, "age"] == 68.0 and math.isnan(m.loc[4, "age"])  # Age 0 is a placeholder
    assert m["view_position"].tolist()[:4] == ["AP", "AP", "LATERAL", "PA"]
    assert m.loc[4, "view_position"] == "LL"
    assert m.loc[2, "frontal_lateral"] == "Lateral"
    assert m.loc[0, "no_finding"] == 1.0 and m.loc[0, "pneumothorax"] == 0.0 and m.loc[0, "support_devices"] == 1.0
    assert m.loc[1, "cardiomegaly"] == -1.0 and math.isnan(m.loc[1, "support_devices"])
    assert m["cardiomegaly"].dtype == "float64"


def test_chexpert_rows_validate_cleanly():
    ok, errors = normalize_manifest(adapters.chexpert_to_manifest(_csv(CHEXPERT_TRAIN)))
    assert len(ok) == 5 and errors.empty


def test_chexpert_bad_label_is_reported_not_guessed():
    bad = CHEXPERT_TRAIN.replace("Male,41,Frontal,PA,,,,,,1.0", "Male,41,Frontal,PA,,,,,,2.0")
    ok, errors = normalize_manifest(adapters.chexpert_to_manifest(_csv(bad)))
    assert len(ok) == 4 and errors["row_id"].tolist() == [3]
    assert errors.loc[0, "reason"] == "edema: label '2.0' not in 1/0/-1/blank"


def test_chexpert_missing_path_column_is_a_clear_error():
    with pytest.raises(ValueError, match="Path"):
        adapters.chexpert_to_manifest(pd.DataFrame({"Sex": ["Male"]}))


def test_chexpert_layout_reads_train_and_valid(tmp_path):
    root = tmp_path / "CheXpert-v1.0-small-renamed"
    root.mkdir()
    (root / "train.csv").write_text(CHEXPERT_TRAIN)
    (root / "valid.csv").write_text(CHEXPERT_VALID)
    m = adapters.load_manifest_from_layout(str(root), fmt="chexpert")
    assert len(m) == 7 and m["row_id"].tolist() == list(range(7))
    assert m["split"].value_counts().to_dict() == {"train": 5, "validate": 2}
    assert m.loc[5, "image_uri"] == str(root / "valid/patient64541/study1/view1_frontal.jpg")
    assert_no_patient_leak(m)


def test_read_manifest_chexpert_file_takes_split_from_its_name(tmp_path):
    (tmp_path / "valid.csv").write_text(CHEXPERT_VALID)
    m = read_manifest(str(tmp_path / "valid.csv"), fmt="chexpert")
    assert m["split"].tolist() == ["validate", "validate"]
    assert m.loc[0, "image_uri"] == str(tmp_path / "valid/patient64541/study1/view1_frontal.jpg")


def _chexpert_release(parent, folder="CheXpert-v1.0-small", csv=CHEXPERT_TRAIN, name="train.csv"):
    """A CheXpert release as unzipped under `parent`: `folder/{name}` and every image its `Path` column names."""
    root = parent / folder
    root.mkdir(parents=True, exist_ok=True)
    text = csv.replace("CheXpert-v1.0-small/", f"{folder}/")
    (root / name).write_text(text)
    for line in text.splitlines()[1:]:
        image = parent / line.split(",", 1)[0]
        image.parent.mkdir(parents=True, exist_ok=True)
        image.write_bytes(b"\xff\xd8")
    return root


FIRST_TRAIN_IMAGE = "train/patient00001/study1/view1_frontal.jpg"


@pytest.mark.parametrize("folder", ["CheXpert-v1.0-small", "CheXpert-v1.0"])
def test_chexpert_image_root_may_be_the_folder_that_holds_the_data_set(tmp_path, folder):
    """`Path` reads `CheXpert-v1.0-small/train/...`: relative to the parent of the data-set folder."""
    root = _chexpert_release(tmp_path, folder)
    m = read_manifest(str(root / "train.csv"), fmt="chexpert", image_root=str(tmp_path))
    assert m.loc[0, "image_uri"] == str(root / FIRST_TRAIN_IMAGE)
    assert m.loc[0, "image_id"] == "patient00001_study1_view1_frontal"  # ids do not depend on the reading


def test_chexpert_image_root_may_be_the_data_set_folder_itself(tmp_path):
    root = _chexpert_release(tmp_path)
    for image_root in (str(root), None):  # None: the folder of train.csv
        m = read_manifest(str(root / "train.csv"), fmt="chexpert", image_root=image_root)
        assert m.loc[0, "image_uri"] == str(root / FIRST_TRAIN_IMAGE)


def test_chexpert_manifest_uri_may_be_the_folder_that_holds_the_data_set(tmp_path):
    root = _chexpert_release(tmp_path)
    _chexpert_release(tmp_path, csv=CHEXPERT_VALID, name="valid.csv")
    m = read_manifest(str(tmp_path), fmt="chexpert")
    assert len(m) == 7 and m["split"].value_counts().to_dict() == {"train": 5, "validate": 2}
    assert m.loc[0, "image_uri"] == str(root / FIRST_TRAIN_IMAGE)
    assert m.loc[5, "image_uri"] == str(root / "valid/patient64541/study1/view1_frontal.jpg")


def test_chexpert_reading_is_not_misled_by_one_missing_first_image(tmp_path):
    root = _chexpert_release(tmp_path)
    (root / FIRST_TRAIN_IMAGE).unlink()
    m = read_manifest(str(root / "train.csv"), fmt="chexpert", image_root=str(tmp_path))
    assert m.loc[1, "image_uri"] == str(root / "train/patient00002/study2/view1_frontal.jpg")


def test_chexpert_parent_folder_reading_on_s3(s3_storage, s3_client, bucket):
    s3_client.put_object(Bucket=bucket, Key="data/CheXpert-v1.0-small/train.csv", Body=CHEXPERT_TRAIN.encode())
    s3_client.put_object(Bucket=bucket, Key=f"data/CheXpert-v1.0-small/{FIRST_TRAIN_IMAGE}", Body=b"\xff\xd8")
    m = read_manifest(f"s3://{bucket}/data/CheXpert-v1.0-small/train.csv", s3_storage, fmt="chexpert",
                      image_root=f"s3://{bucket}/data")
    assert m.loc[0, "image_uri"] == f"s3://{bucket}/data/CheXpert-v1.0-small/{FIRST_TRAIN_IMAGE}"


def test_chexpert_without_images_under_either_reading_keeps_the_data_set_folder_reading(tmp_path):
    (tmp_path / "train.csv").write_text(CHEXPERT_TRAIN)
    m = read_manifest(str(tmp_path / "train.csv"), fmt="chexpert")
    assert m.loc[0, "image_uri"] == str(tmp_path / FIRST_TRAIN_IMAGE)  # reported by check_images_present


# --------------------------------------------------------------------------------------------------------- MIMIC
def _mimic(**kwargs):
    return adapters.mimic_to_manifest(_csv(MIMIC_METADATA), _csv(MIMIC_CHEXPERT), split_df=_csv(MIMIC_SPLIT),
                                      patients_df=_csv(MIMIC_PATIENTS), **kwargs)


def test_mimic_image_paths_follow_the_files_layout():
    m = _mimic(image_root="s3://physionet/mimic-cxr-jpg/2.0.0", ext=".jpg")
    assert m.loc[0, "image_uri"] == (
        "s3://physionet/mimic-cxr-jpg/2.0.0/"
        "files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg"
    )
    assert m.loc[5, "image_uri"].endswith(
        "files/p19/p19999987/s58971208/4b8e7f2a-11aa22bb-33cc44dd-55ee66ff-77889900.jpg"
    )
    dcm = _mimic()
    assert dcm.loc[0, "image_uri"] == "files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.dcm"
    assert dcm.loc[0, "image_id"] == "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014"
    assert (dcm.loc[0, "patient_id"], dcm.loc[0, "study_id"]) == ("10000032", "50414267")


def test_mimic_labels_join_per_study_and_unlabelled_studies_stay_blank():
    m = _mimic()
    assert len(m) == 6 and m["row_id"].tolist() == list(range(6))
    # both images of study 50414267 get that study's labels
    assert m.loc[0, "no_finding"] == 1.0 and m.loc[1, "no_finding"] == 1.0
    assert m.loc[2, "lung_opacity"] == -1.0 and m.loc[2, "pneumothorax"] == 0.0 and m.loc[2, "support_devices"] == 1.0
    assert m.loc[3, "pneumonia"] == -1.0
    assert all(math.isnan(m.loc[5, f]) for f in ("no_finding", "cardiomegaly", "support_devices"))  # no labels


def test_mimic_view_positions_are_normalised_and_blank_is_null():
    m = _mimic()
    assert m["view_position"].tolist()[:3] == ["PA", "LATERAL", "AP"]
    assert pd.isna(m.loc[3, "view_position"])
    assert m.loc[4, "view_position"] == "AP AXIAL" and m.loc[5, "view_position"] == "LL"


def test_mimic_split_sex_and_age_at_the_study():
    m = _mimic()
    assert m["split"].tolist() == ["train", "train", "train", "validate", "validate", "test"]
    assert m.loc[0, "sex"] == "F" and m.loc[3, "sex"] == "M" and pd.isna(m.loc[5, "sex"])  # not in patients
    assert m.loc[0, "age"] == 52.0  # StudyDate 2180 == anchor_year
    assert m.loc[2, "age"] == 55.0  # three years after the anchor year
    assert m.loc[3, "age"] == 86.0
    assert m.loc[0, "StudyDate"] == "21800506"  # other metadata kept as extras
    ok, errors = normalize_manifest(m)
    assert len(ok) == 6 and errors.empty
    assert_no_patient_leak(ok)


def test_mimic_integer_ids_from_a_typed_reader_join_the_same():
    metadata = pd.read_csv(io.StringIO(MIMIC_METADATA))  # subject_id/study_id as int64
    labels = pd.read_csv(io.StringIO(MIMIC_CHEXPERT))
    m = adapters.mimic_to_manifest(metadata, labels)
    assert m.loc[0, "patient_id"] == "10000032" and m.loc[0, "no_finding"] == 1.0
    float_export = _csv(MIMIC_CHEXPERT.replace("10000032,50414267,", "10000032.0,50414267.0,"))
    assert adapters.mimic_to_manifest(_csv(MIMIC_METADATA), float_export).loc[0, "no_finding"] == 1.0


def test_mimic_rejects_unknown_ext():
    with pytest.raises(ValueError, match="ext"):
        _mimic(ext=".png")


def _gz(path, text):
    path.write_bytes(gzip.compress(text.encode()))


def _mimic_root(root, gz=True):
    write = _gz if gz else (lambda p, t: p.write_text(t))
    suffix = ".csv.gz" if gz else ".csv"
    write(root / f"mimic-cxr-2.0.0-metadata{suffix}", MIMIC_METADATA)
    write(root / f"mimic-cxr-2.0.0-chexpert{suffix}", MIMIC_CHEXPERT)
    write(root / f"mimic-cxr-2.0.0-negbio{suffix}", MIMIC_NEGBIO)
    write(root / f"mimic-cxr-2.0.0-split{suffix}", MIMIC_SPLIT)
    write(root / f"patients{suffix}", MIMIC_PATIENTS)


def test_gzipped_tables_are_read(tmp_path):
    _gz(tmp_path / "mimic-cxr-2.0.0-metadata.csv.gz", MIMIC_METADATA)
    df = read_table(str(tmp_path / "mimic-cxr-2.0.0-metadata.csv.gz"))
    assert df.loc[0, "dicom_id"] == "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014"
    assert df.loc[0, "StudyTime"] == "213014.531"  # text, as released


@pytest.mark.parametrize("gz", [True, False])
def test_mimic_layout_finds_gzipped_or_plain_tables_and_probes_jpg(tmp_path, gz):
    _mimic_root(tmp_path, gz=gz)
    first = tmp_path / "files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg"
    first.parent.mkdir(parents=True)
    first.write_bytes(b"\xff\xd8")
    m = adapters.load_manifest_from_layout(str(tmp_path), fmt="mimic")
    assert m.loc[0, "image_uri"] == str(first)
    assert m.loc[0, "sex"] == "F" and m.loc[3, "split"] == "validate"


def test_mimic_layout_negbio_labels(tmp_path):
    _mimic_root(tmp_path)
    m = adapters.load_manifest_from_layout(str(tmp_path), fmt="mimic", labeler="negbio", ext=".dcm")
    assert m.loc[0, "cardiomegaly"] == 1.0 and math.isnan(m.loc[0, "no_finding"])
    assert m.loc[0, "image_uri"].endswith(".dcm")


def test_mimic_layout_on_s3(s3_storage, s3_client, bucket):
    for name, text in [("metadata", MIMIC_METADATA), ("chexpert", MIMIC_CHEXPERT), ("split", MIMIC_SPLIT)]:
        s3_client.put_object(Bucket=bucket, Key=f"mimic/mimic-cxr-2.0.0-{name}.csv.gz",
                             Body=gzip.compress(text.encode()))
    s3_client.put_object(Bucket=bucket, Key="mimic/files/p10/p10000032/s50414267/"
                         "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.dcm", Body=b"DICM")
    m = read_manifest(f"s3://{bucket}/mimic", s3_storage, fmt="mimic")
    assert m.loc[0, "image_uri"] == (
        f"s3://{bucket}/mimic/files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.dcm"
    )
    assert pd.isna(m.loc[0, "sex"])  # no patients table given
    ok, errors = normalize_manifest(m)
    assert len(ok) + len(errors) == 6 and errors.empty


def test_missing_layout_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="metadata"):
        adapters.load_manifest_from_layout(str(tmp_path), fmt="mimic")
    with pytest.raises(FileNotFoundError, match="train.csv"):
        adapters.load_manifest_from_layout(str(tmp_path), fmt="chexpert")


def test_mimic_dicom_release_with_only_the_record_list(tmp_path):
    """MIMIC-CXR (DICOM) ships cxr-record-list.csv.gz, not the JPG release's metadata table."""
    _gz(tmp_path / "cxr-record-list.csv.gz",
        "subject_id,study_id,dicom_id,path\n"
        "10000032,50414267,02aa804e-bde0afdd-112c0b34-7bc16630-4e384014,"
        "files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.dcm\n")
    _gz(tmp_path / "mimic-cxr-2.0.0-chexpert.csv.gz", MIMIC_CHEXPERT)
    m = adapters.load_manifest_from_layout(str(tmp_path), fmt="mimic")
    assert m.loc[0, "image_uri"] == str(
        tmp_path / "files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.dcm")
    assert m.loc[0, "no_finding"] == 1.0 and pd.isna(m.loc[0, "view_position"])
    assert "path" not in m.columns
