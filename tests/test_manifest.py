"""cfgen manifest: reading, validation with errors as rows, filters, Arrow schema, patient-level splits."""

from __future__ import annotations

import math

import pandas as pd
import pyarrow as pa
import pytest

from cfgen.io import manifest as mf
from cfgen.io.splits import assert_no_patient_leak, patient_split

HEADER = (
    "image_id,image_uri,patient_id,view_position,split,sex,age,smoking,support_devices,pleural_effusion,phantom_seed"
)


def _write(path, text):
    path.write_text(text)
    return str(path)


def test_findings_are_the_14_chexpert_observations_in_csv_order():
    assert len(mf.FINDINGS) == 14
    assert mf.FINDINGS[0] == "no_finding" and mf.FINDINGS[-1] == "support_devices"
    assert set(mf.FINDINGS) <= set(mf.MANIFEST_SCHEMA.names)


def test_csv_ids_keep_leading_zeros_and_relative_uris_join_the_manifest_folder(tmp_path):
    uri = _write(tmp_path / "manifest.csv", HEADER + "\n00042,images/00042.dcm,007,pa,train,F,63,1,1,0,17\n")
    df = mf.read_manifest(uri)
    assert df.loc[0, "image_id"] == "00042" and df.loc[0, "patient_id"] == "007"
    assert df.loc[0, "image_uri"] == str(tmp_path / "images" / "00042.dcm")
    assert df.loc[0, "row_id"] == 0


def test_image_root_overrides_and_absolute_uris_are_kept(tmp_path):
    uri = _write(tmp_path / "m.csv", "image_id,image_uri\na,x/a.png\nb,s3://bucket/b.png\nc,/abs/c.png\n")
    df = mf.read_manifest(uri, image_root="s3://data/root")
    assert df["image_uri"].tolist() == ["s3://data/root/x/a.png", "s3://bucket/b.png", "/abs/c.png"]


def test_parquet_manifest_with_integer_ids(tmp_path):
    path = tmp_path / "m.parquet"
    pd.DataFrame({"image_id": [10000032, 10000033], "image_uri": ["a.dcm", "b.dcm"], "age": [63.0, None]}).to_parquet(
        path
    )
    ok, errors = mf.normalize_manifest(mf.read_manifest(str(path)))
    assert ok["image_id"].tolist() == ["10000032", "10000033"]
    assert math.isnan(ok.loc[1, "age"]) and errors.empty


def test_normalize_types_values_and_keeps_extra_columns(tmp_path):
    uri = _write(tmp_path / "m.csv", HEADER + "\n1,a.dcm,p1, ap axial ,valid,Female,63.0,0,-1.0,,17\n")
    ok, errors = mf.normalize_manifest(mf.read_manifest(uri))
    assert errors.empty
    row = ok.iloc[0]
    assert (row.view_position, row.split, row.sex, row.age, row.smoking) == ("AP AXIAL", "validate", "F", 63.0, 0.0)
    assert row.support_devices == -1.0 and math.isnan(row.pleural_effusion) and math.isnan(row.cardiomegaly)
    assert row.phantom_seed == "17"  # extras pass through untouched
    assert list(ok.columns[: len(mf.MANIFEST_COLUMNS)]) == list(mf.MANIFEST_COLUMNS)


def test_bad_rows_go_to_errors_and_nothing_is_dropped(tmp_path):
    rows = [
        "a,a.dcm,p1,PA,train,F,63,1,1,0,1",  # ok
        ",b.dcm,p2,PA,train,M,50,0,0,0,2",  # missing image_id
        "c,,p3,PA,train,M,50,0,0,0,3",  # missing image_uri
        "a,a2.dcm,p1,PA,train,F,63,1,1,0,4",  # duplicate image_id
        "d,d.dcm,p4,PA,train,F,sixty,1,1,0,5",  # unparseable age
        "e,e.dcm,p5,PA,train,F,40,1,2,0,6",  # label 2
        "f,f.dcm,p6,AP,test,X,40,1,1,yes,7",  # sex X and label "yes"
        "g,g.dcm,p7,LL,test,,,,,,8",  # ok: everything optional missing
    ]
    df = mf.read_manifest(_write(tmp_path / "m.csv", HEADER + "\n" + "\n".join(rows) + "\n"))
    ok, errors = mf.normalize_manifest(df)
    assert len(ok) + len(errors) == len(df) == 8
    assert ok["image_id"].tolist() == ["a", "g"]
    assert list(errors.columns) == list(mf.ERROR_COLUMNS)
    assert set(errors["stage"]) == {"manifest"}
    reasons = dict(zip(errors["row_id"], errors["reason"]))
    assert reasons[1] == "missing image_id"
    assert reasons[2] == "missing image_uri"
    assert reasons[3] == "duplicate image_id (first at row_id 0)"
    assert reasons[4] == "unparseable age 'sixty'"
    assert reasons[5] == "support_devices: label '2' not in 1/0/-1/blank"
    assert "unrecognised sex 'X'" in reasons[6] and "pleural_effusion: label 'yes'" in reasons[6]
    assert errors.set_index("row_id").loc[3, "image_uri"].endswith("a2.dcm")


def test_age_out_of_range_is_an_error():
    ok, errors = mf.normalize_manifest(pd.DataFrame({"image_id": ["a", "b"], "image_uri": ["a", "b"],
                                                      "age": ["200", "90+"]}))
    assert ok["age"].tolist() == [90.0]
    assert "out of range" in errors.loc[0, "reason"]


def test_row_id_names_the_source_row_after_filtering():
    df = pd.DataFrame({"image_id": ["a", "b", None], "image_uri": ["a", "b", "c"]})
    ok, errors = mf.normalize_manifest(df.iloc[1:])
    assert ok["row_id"].tolist() == [0] and errors["row_id"].tolist() == [1]  # positions in what was given


def test_normalize_accepts_missing_known_columns_and_adds_them():
    ok, _ = mf.normalize_manifest(pd.DataFrame({"image_id": ["a"], "image_uri": ["/x/a.png"]}))
    assert set(mf.MANIFEST_COLUMNS) <= set(ok.columns)
    assert pd.isna(ok.loc[0, "sex"]) and math.isnan(ok.loc[0, "cardiomegaly"])


def test_filter_manifest_by_view_split_and_limit():
    df = pd.DataFrame({
        "image_id": list("abcde"),
        "view_position": ["PA", "ap", "LATERAL", None, "AP"],
        "split": ["train", "train", "train", "train", "valid"],
    })
    assert mf.filter_manifest(df, view_positions=["PA", "AP"])["image_id"].tolist() == ["a", "b", "e"]
    assert mf.filter_manifest(df, splits=["validate"])["image_id"].tolist() == ["e"]
    assert mf.filter_manifest(df, view_positions=["AP", "PA"], splits=["train"], limit=1)["image_id"].tolist() == ["a"]
    assert len(mf.filter_manifest(df)) == 5


def test_manifest_to_arrow_uses_the_schema_types():
    ok, _ = mf.normalize_manifest(pd.DataFrame({"image_id": ["a"], "image_uri": ["a.png"], "age": ["63"],
                                                "phantom_index": [3]}))
    table = mf.manifest_to_arrow(ok)
    assert table.schema.field("image_id").type == pa.string()
    assert table.schema.field("age").type == pa.float64()
    assert table.schema.field("row_id").type == pa.int64()
    assert table.schema.field("phantom_index").type == pa.int64()


def test_read_manifest_rejects_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="manifest format"):
        mf.read_manifest(_write(tmp_path / "m.csv", "image_id,image_uri\n"), fmt="dicomdir")


def test_read_manifest_from_s3(s3_storage, s3_client, bucket):
    s3_client.put_object(Bucket=bucket, Key="ds/manifest.csv", Body=b"image_id,image_uri\n001,img/001.dcm\n")
    df = mf.read_manifest(f"s3://{bucket}/ds/manifest.csv", s3_storage)
    assert df.loc[0, "image_uri"] == f"s3://{bucket}/ds/img/001.dcm"


# ----------------------------------------------------------------------------------------- images where they are
def _rows(uris):
    return pd.DataFrame({"image_id": [f"i{k}" for k in range(len(uris))], "image_uri": uris})


def test_check_images_present_fails_early_naming_the_root_and_the_layout(tmp_path):
    rows = _rows([str(tmp_path / f"train/patient{k:05d}/study1/view1_frontal.jpg") for k in range(40)])
    with pytest.raises(ValueError) as error:
        mf.check_images_present(rows, str(tmp_path), "chexpert")
    message = str(error.value)
    assert "32 of the first 32 images" in message and f"Image root tried: {tmp_path}." in message
    assert "CheXpert-v1.0-small" in message and "data.image_root" in message


def test_check_images_present_lets_a_few_missing_files_through(tmp_path):
    present = [tmp_path / f"{k}.png" for k in range(3)]
    for path in present:
        path.write_bytes(b"x")
    mf.check_images_present(_rows([*map(str, present), str(tmp_path / "gone.png")]), str(tmp_path))
    mf.check_images_present(_rows([]), str(tmp_path))  # nothing to look for


def test_check_images_present_on_s3(s3_storage, s3_client, bucket):
    s3_client.put_object(Bucket=bucket, Key="cxr/a.dcm", Body=b"DICM")
    mf.check_images_present(_rows([f"s3://{bucket}/cxr/a.dcm"]), f"s3://{bucket}/cxr", "cfgen", s3_storage)
    with pytest.raises(ValueError, match="mimic layout expects files/pNN"):
        mf.check_images_present(_rows([f"s3://{bucket}/cxr/files/p10/x.dcm"] * 3), f"s3://{bucket}/cxr", "mimic",
                                s3_storage)


def test_ingest_with_a_wrong_image_root_stops_before_any_work(tmp_path):
    from cfgen.config import JobConfig
    from cfgen.pipeline.data import load_manifest
    from cfgen.pipeline.ingest import ingest

    _write(tmp_path / "m.csv", "image_id,image_uri\n" + "".join(f"{k},img/{k}.png\n" for k in range(10)))
    job = JobConfig.model_validate({"output_uri": str(tmp_path / "out"),
                                    "data": {"manifest_uri": str(tmp_path / "m.csv"), "image_root": "/nowhere"}})
    assert len(load_manifest(job)[0]) == 10  # reading the table alone does not look for images
    with pytest.raises(ValueError, match="Image root tried: /nowhere"):
        ingest(job)
    assert not (tmp_path / "out" / "ingest" / "errors.parquet").exists()


# ------------------------------------------------------------------------------------------------------ splits
def _patients(n_patients=200, images_each=3):
    return pd.DataFrame({
        "image_id": [f"img{p}_{i}" for p in range(n_patients) for i in range(images_each)],
        "patient_id": [f"p{p:05d}" for p in range(n_patients) for _ in range(images_each)],
    })


def test_patient_split_has_no_leak_and_roughly_the_fractions():
    out = patient_split(_patients(), seed=0)
    assert_no_patient_leak(out)
    share = out.drop_duplicates("patient_id")["split"].value_counts(normalize=True)
    assert set(share.index) == {"train", "validate", "test"}
    assert 0.7 < share["train"] < 0.9


def test_patient_split_is_deterministic_and_seeded():
    a = patient_split(_patients(), seed=0)["split"].tolist()
    assert a == patient_split(_patients(), seed=0)["split"].tolist()
    assert a != patient_split(_patients(), seed=1)["split"].tolist()
    # A stable hash (SHA-256), not Python's salted hash(): pinned values hold on every machine and run.
    pinned = pd.DataFrame({"image_id": ["x", "y", "z"], "patient_id": ["p00000", "p00001", "p00002"]})
    assert patient_split(pinned, seed=0)["split"].tolist() == ["train", "test", "train"]


def test_patient_split_keeps_existing_and_extends_it_to_the_patient():
    df = pd.DataFrame({"image_id": ["a", "b", "c"], "patient_id": ["p1", "p1", None],
                       "split": ["test", None, "valid"]})
    out = patient_split(df)
    assert out["split"].tolist() == ["test", "test", "validate"]
    fresh = patient_split(df, keep_existing=False)
    assert fresh.loc[0, "split"] == fresh.loc[1, "split"]


def test_rows_without_patient_fall_back_to_image_id():
    df = pd.DataFrame({"image_id": [f"i{k}" for k in range(50)], "patient_id": [None] * 50})
    splits = patient_split(df)["split"]
    assert splits.notna().all() and splits.nunique() > 1


def test_bad_fractions_are_refused():
    with pytest.raises(ValueError, match="sum to"):
        patient_split(_patients(), fractions={"train": 0.5, "test": 0.2})


def test_assert_no_patient_leak_names_the_patient():
    df = pd.DataFrame({"patient_id": ["p1", "p1", "p2"], "split": ["train", "test", "train"]})
    with pytest.raises(AssertionError, match="p1"):
        assert_no_patient_leak(df)
