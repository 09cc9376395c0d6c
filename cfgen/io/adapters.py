"""CheXpert and MIMIC-CXR tables, as released, to the cfgen manifest (see `cfgen.io.manifest`).

Adapters rename and derive columns and convert values that are valid; a value they cannot read is passed through
unchanged so that `normalize_manifest` reports the row instead of an adapter dropping or guessing it.

CheXpert (`train.csv`, `valid.csv`; Stanford ML Group):
  `Path, Sex, Age, Frontal/Lateral, AP/PA` + 14 observations (1.0 / 0.0 / -1.0 uncertain / blank not mentioned).
  - `Path` is relative to the folder that holds the data-set folder, e.g.
    `CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg` (`CheXpert-v1.0/...` in the full-size
    release). Users rename or move that folder and point `image_root` at either the data-set folder or its
    parent, so the leading `CheXpert-v1.0*/` component is stripped and the rest (`train/patient00001/...`) is
    looked up on the first rows under `image_root`, then under `image_root/CheXpert-v1.0-small` and
    `image_root/CheXpert-v1.0`; the first that holds them is used for every row (`chexpert_image_root`).
  - `Age` 0 is treated as missing: the cohort is adult, and the few rows with 0 are placeholders; "a 0 year old"
    in a prompt would teach the model a falsehood.
  - `Sex` "Unknown" is missing. `AP/PA` is blank for most laterals: view_position is then "LATERAL"; a frontal
    with a blank `AP/PA` has no view_position. `Frontal/Lateral` is kept as `frontal_lateral`.
  - `study_id` is "studyN", numbered within a patient: group studies by (patient_id, study_id).

MIMIC-CXR / MIMIC-CXR-JPG (PhysioNet; the tables ship gzipped as `mimic-cxr-2.0.0-*.csv.gz`):
  - metadata: one row per image (`dicom_id`); labels (`-chexpert` or `-negbio`) are per study, joined on
    (subject_id, study_id), so a study the labeler did not cover keeps blank labels; `-split` joins on dicom_id.
  - sex and age are not in MIMIC-CXR but in MIMIC-IV's `patients.csv` (`gender`, `anchor_age`, `anchor_year`).
    MIMIC-IV and MIMIC-CXR share one date shift per patient, so the age at the study is
    `anchor_age + (year of StudyDate - anchor_year)`; without a StudyDate it is `anchor_age`.
  - image path: `files/p{first two digits of subject_id}/p{subject_id}/s{study_id}/{dicom_id}.dcm|.jpg`.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import numpy as np
import pandas as pd

from cfgen.config import StorageConfig
from cfgen.io.schema import (
    FINDINGS,
    coerce_float_column,
    id_str,
    is_null,
    normalize_split,
    normalize_view_position,
    parse_age,
    resolve_uri,
    string_series,
)
from cfgen.io.storage import exists, is_absolute_uri, join_uri
from cfgen.io.tables import read_table

logger = logging.getLogger(__name__)

__all__ = [
    "CHEXPERT_OBSERVATIONS",
    "CHEXPERT_COLUMNS",
    "MIMIC_METADATA_COLUMNS",
    "MIMIC_LABEL_COLUMNS",
    "MIMIC_SPLIT_COLUMNS",
    "MIMIC_PATIENTS_COLUMNS",
    "CHEXPERT_FOLDERS",
    "chexpert_to_manifest",
    "chexpert_image_root",
    "read_chexpert_table",
    "mimic_to_manifest",
    "mimic_image_path",
    "load_manifest_from_layout",
    "split_from_filename",
    "strip_chexpert_prefix",
]

#: CheXpert observation columns (as spelled in the released CSVs) -> cfgen finding columns.
CHEXPERT_OBSERVATIONS: dict[str, str] = {
    "No Finding": "no_finding",
    "Enlarged Cardiomediastinum": "enlarged_cardiomediastinum",
    "Cardiomegaly": "cardiomegaly",
    "Lung Opacity": "lung_opacity",
    "Lung Lesion": "lung_lesion",
    "Edema": "edema",
    "Consolidation": "consolidation",
    "Pneumonia": "pneumonia",
    "Atelectasis": "atelectasis",
    "Pneumothorax": "pneumothorax",
    "Pleural Effusion": "pleural_effusion",
    "Pleural Other": "pleural_other",
    "Fracture": "fracture",
    "Support Devices": "support_devices",
}
assert tuple(CHEXPERT_OBSERVATIONS.values()) == FINDINGS

CHEXPERT_COLUMNS: tuple[str, ...] = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_OBSERVATIONS)
MIMIC_METADATA_COLUMNS: tuple[str, ...] = (
    "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows", "Columns",
    "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
)
MIMIC_LABEL_COLUMNS: tuple[str, ...] = ("subject_id", "study_id", *sorted(CHEXPERT_OBSERVATIONS))
MIMIC_SPLIT_COLUMNS: tuple[str, ...] = ("dicom_id", "study_id", "subject_id", "split")
MIMIC_PATIENTS_COLUMNS: tuple[str, ...] = ("subject_id", "gender", "anchor_age", "anchor_year", "anchor_year_group",
                                           "dod")

#: The data-set folders of the CheXpert releases, as `Path` names them: the downsampled one, the full-size one.
CHEXPERT_FOLDERS: tuple[str, ...] = ("CheXpert-v1.0-small", "CheXpert-v1.0")
_CHEXPERT_PREFIX = re.compile(r"^(?:\./)?(CheXpert-v1\.0[^/]*)/")
_CHEXPERT_IDS = re.compile(r"(patient\d+)/(study\d+)/([^/]+?)(?:\.\w+)?$")
# CheXpert Plus names the image column differently; the rest of its layout differs too, only the path is shared.
_CHEXPERT_PATH_COLUMNS = ("Path", "path_to_image")
_CHEXPERT_SEX = {"male": "M", "female": "F", "unknown": None}
_CHEXPERT_PROBES = 3  # first rows looked up per candidate root: one missing file must not mislead the choice


def _require(df: pd.DataFrame, columns, table: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{table}: missing columns {missing}; found {list(df.columns)}")


def _chexpert_path_column(df: pd.DataFrame) -> str:
    column = next((c for c in _CHEXPERT_PATH_COLUMNS if c in df.columns), None)
    if column is None:
        raise ValueError(f"CheXpert table: no 'Path' column; found {list(df.columns)}")
    return column


def strip_chexpert_prefix(path: str) -> str:
    """`CheXpert-v1.0-small/train/p/s/v.jpg` -> `train/p/s/v.jpg` (any `CheXpert-v1.0*` folder name)."""
    return _CHEXPERT_PREFIX.sub("", path.replace("\\", "/"), count=1)


def split_from_filename(uri: str) -> str | None:
    """`.../train.csv` -> "train", `valid.csv` -> "validate", `test*.csv` -> "test", else None."""
    name = str(uri).replace("\\", "/").rsplit("/", 1)[-1].lower()
    stem = name.split(".", 1)[0]
    for split in ("train", "valid", "test"):
        if stem == split or stem.startswith(split + "_"):
            return normalize_split(split)
    return None


def _chexpert_age(value: Any) -> Any:
    try:
        age = parse_age(value)
    except (TypeError, ValueError):
        return value  # normalize_manifest reports it
    return np.nan if age == 0 else age


def _chexpert_sex(value: Any) -> Any:
    if is_null(value):
        return None
    return _CHEXPERT_SEX.get(str(value).strip().lower(), value)


def chexpert_to_manifest(
    df: pd.DataFrame, image_root: str | None = None, split: str | None = None
) -> pd.DataFrame:
    """A CheXpert `train.csv`/`valid.csv` table as cfgen manifest rows (row_id = position in `df`).

    `split` (e.g. from the file name: "train", "valid") wins; otherwise it is read from the path's first folder.
    Without `image_root` image_uri stays relative to the data-set folder.
    """
    path_column = _chexpert_path_column(df)
    index = df.index
    paths = [strip_chexpert_prefix(p) if isinstance(p, str) else p for p in (id_str(v) for v in df[path_column])]

    patient_ids, study_ids, image_ids, path_splits = [], [], [], []
    for path in paths:
        match = _CHEXPERT_IDS.search(path) if path else None
        if match:
            patient_ids.append(match.group(1))
            study_ids.append(match.group(2))
            image_ids.append("_".join(match.groups()))
        else:
            patient_ids.append(None)
            study_ids.append(None)
            image_ids.append(re.sub(r"\.\w+$", "", path).replace("/", "_") if path else None)
        first = path.split("/", 1)[0] if path and "/" in path else None
        path_splits.append(split_from_filename(first) if first else None)

    def column(name: str) -> list[Any]:
        return df[name].tolist() if name in df.columns else [None] * len(df)

    frontal_lateral = [None if is_null(v) else str(v).strip() for v in column("Frontal/Lateral")]
    views = []
    for ap_pa, fl in zip(column("AP/PA"), frontal_lateral):
        view = normalize_view_position(ap_pa)
        if view is None and fl is not None and fl.lower() == "lateral":
            view = "LATERAL"
        views.append(view)

    out = pd.DataFrame(index=index)
    out["row_id"] = np.arange(len(df), dtype=np.int64)
    out["image_id"] = string_series(image_ids, index)
    out["image_uri"] = string_series((resolve_uri(p, image_root) for p in paths), index)
    out["patient_id"] = string_series(patient_ids, index)
    out["study_id"] = string_series(study_ids, index)
    out["view_position"] = string_series(views, index)
    given = normalize_split(split)
    out["split"] = string_series((given or s for s in path_splits), index)
    out["sex"] = pd.Series([_chexpert_sex(v) for v in column("Sex")], index=index, dtype=object)
    out["age"] = coerce_float_column(pd.Series([_chexpert_age(v) for v in column("Age")], index=index, dtype=object),
                                     parse=parse_age)
    for source, finding in CHEXPERT_OBSERVATIONS.items():
        out[finding] = coerce_float_column(pd.Series(column(source), index=index, dtype=object))
    out["frontal_lateral"] = string_series(frontal_lateral, index)
    return out.reset_index(drop=True)


def chexpert_image_root(paths: list[Any], image_root: str | None, storage: StorageConfig | None = None) -> str | None:
    """The folder that the stripped CheXpert paths (`train/patient00001/...`) are relative to.

    `image_root` is tried as the data-set folder, then as the folder holding it (joined with the folder name the
    paths start with, then each of `CHEXPERT_FOLDERS`); the first under which one of the first rows' images exists
    wins. When none does, `image_root` is returned unchanged and the missing images are reported by
    `cfgen.io.manifest.check_images_present`.
    """
    written = [p.replace("\\", "/") for p in (id_str(v) for v in paths) if p]
    sample = [strip_chexpert_prefix(p) for p in written[:_CHEXPERT_PROBES]]
    if image_root is None or not sample or any(is_absolute_uri(p) for p in sample):
        return image_root
    named = [m.group(1) for m in (_CHEXPERT_PREFIX.match(p) for p in written[:1]) if m]
    candidates = [image_root, *(join_uri(image_root, name) for name in dict.fromkeys([*named, *CHEXPERT_FOLDERS]))]
    for candidate in candidates:
        if any(exists(resolve_uri(path, candidate), storage) for path in sample):
            return candidate
    return image_root


def read_chexpert_table(
    uri: str, storage: StorageConfig | None = None, image_root: str | None = None, split: str | None = None
) -> pd.DataFrame:
    """A released CheXpert CSV as manifest rows, split from its file name unless given, images resolved under
    `image_root` as the data-set folder or its parent (`chexpert_image_root`)."""
    table = read_table(uri, storage)
    paths = table[_chexpert_path_column(table)].head(_CHEXPERT_PROBES).tolist()
    image_root = chexpert_image_root(paths, image_root, storage)
    return chexpert_to_manifest(table, image_root=image_root, split=split or split_from_filename(uri))


def mimic_image_path(subject_id: str, study_id: str, dicom_id: str, ext: str = ".dcm") -> str:
    """`files/p10/p10000032/s50414267/<dicom_id>.dcm`: MIMIC-CXR's folder per patient group, patient, study."""
    return f"files/p{subject_id[:2]}/p{subject_id}/s{study_id}/{dicom_id}{ext}"


def _clean_ids(df: pd.DataFrame, columns) -> pd.DataFrame:
    """Ids as text so that tables read as int, float or str join alike ("10000032.0" from a float export too)."""
    df = df.copy()
    for column in columns:
        ids = [id_str(v) for v in df[column]]
        if column in ("subject_id", "study_id"):
            ids = [i[: i.index(".")] if i and re.fullmatch(r"\d+\.0+", i) else i for i in ids]
        df[column] = pd.Series(ids, index=df.index, dtype=object)
    return df


def _study_year(value: Any) -> float:
    text = id_str(value)
    if text is None or not re.fullmatch(r"\d{8}(\.0+)?", text):
        return np.nan
    return float(text[:4])


def mimic_to_manifest(
    metadata_df: pd.DataFrame,
    chexpert_df: pd.DataFrame | None,
    split_df: pd.DataFrame | None = None,
    patients_df: pd.DataFrame | None = None,
    image_root: str | None = None,
    ext: str = ".dcm",
) -> pd.DataFrame:
    """MIMIC-CXR tables as cfgen manifest rows, one per `dicom_id` (row_id = position in the metadata table).

    `chexpert_df` is `mimic-cxr-2.0.0-chexpert.csv` or `-negbio.csv` (or None: no labels); `ext` ".dcm" for
    MIMIC-CXR, ".jpg" for MIMIC-CXR-JPG. Other metadata columns (StudyDate, Rows, ...) are kept as extras.
    """
    ext = ext if ext.startswith(".") else "." + ext
    if ext not in (".dcm", ".jpg"):
        raise ValueError(f"ext {ext!r}: MIMIC-CXR images are .dcm (MIMIC-CXR) or .jpg (MIMIC-CXR-JPG)")
    _require(metadata_df, ("dicom_id", "subject_id", "study_id"), "mimic-cxr-2.0.0-metadata")
    meta = _clean_ids(metadata_df.reset_index(drop=True), ("dicom_id", "subject_id", "study_id"))
    meta["row_id"] = np.arange(len(meta), dtype=np.int64)
    n = len(meta)

    # Left joins on deduplicated keys: every metadata row survives exactly once.
    if chexpert_df is not None:
        _require(chexpert_df, ("subject_id", "study_id"), "mimic-cxr-2.0.0-chexpert/negbio")
        labels = _clean_ids(chexpert_df, ("subject_id", "study_id"))
        labels = labels.rename(columns=CHEXPERT_OBSERVATIONS)
        labels = labels[["subject_id", "study_id", *[f for f in FINDINGS if f in labels.columns]]]
        labels = labels.drop_duplicates(["subject_id", "study_id"])
        meta = meta.merge(labels, on=["subject_id", "study_id"], how="left", validate="many_to_one")
    if split_df is not None:
        _require(split_df, ("dicom_id", "split"), "mimic-cxr-2.0.0-split")
        splits = _clean_ids(split_df, ("dicom_id",))[["dicom_id", "split"]].drop_duplicates("dicom_id")
        meta = meta.merge(splits.rename(columns={"split": "_split"}), on="dicom_id", how="left",
                          validate="many_to_one")
    if patients_df is not None:
        _require(patients_df, ("subject_id", "gender", "anchor_age"), "MIMIC-IV patients")
        keep = [c for c in ("subject_id", "gender", "anchor_age", "anchor_year") if c in patients_df.columns]
        patients = _clean_ids(patients_df, ("subject_id",))[keep].drop_duplicates("subject_id")
        meta = meta.merge(patients.rename(columns={"gender": "_gender", "anchor_age": "_anchor_age",
                                                   "anchor_year": "_anchor_year"}),
                          on="subject_id", how="left", validate="many_to_one")
    assert len(meta) == n

    index = meta.index
    out = pd.DataFrame(index=index)
    out["row_id"] = meta["row_id"]
    out["image_id"] = string_series(meta["dicom_id"], index)
    relative = [
        mimic_image_path(s, st, d, ext) if s and st and d else None
        for s, st, d in zip(meta["subject_id"], meta["study_id"], meta["dicom_id"])
    ]
    out["image_uri"] = string_series((resolve_uri(p, image_root) for p in relative), index)
    out["patient_id"] = string_series(meta["subject_id"], index)
    out["study_id"] = string_series(meta["study_id"], index)
    views = meta["ViewPosition"] if "ViewPosition" in meta.columns else [None] * n
    out["view_position"] = string_series((normalize_view_position(v) for v in views), index)
    out["split"] = string_series((normalize_split(v) for v in meta["_split"]) if "_split" in meta else [None] * n,
                                  index)
    if "_gender" in meta.columns:
        out["sex"] = pd.Series([None if is_null(v) else str(v).strip() for v in meta["_gender"]], index=index,
                               dtype=object)
        anchor_age = pd.to_numeric(meta["_anchor_age"], errors="coerce")
        age = anchor_age
        if "_anchor_year" in meta.columns and "StudyDate" in meta.columns:
            shift = meta["StudyDate"].map(_study_year) - pd.to_numeric(meta["_anchor_year"], errors="coerce")
            age = anchor_age + shift.where(shift.notna(), 0.0)
        out["age"] = age.astype("float64")
    else:
        out["sex"] = string_series([None] * n, index)
        out["age"] = np.nan
    for finding in FINDINGS:
        if finding in meta.columns:
            out[finding] = coerce_float_column(meta[finding].astype(object))
        else:
            out[finding] = np.nan
    mapped = {"dicom_id", "subject_id", "study_id", "ViewPosition", "row_id", "_split", "_gender", "_anchor_age",
              "_anchor_year", "path", *FINDINGS}
    for extra in (c for c in metadata_df.columns if c not in mapped):
        out[extra] = meta[extra]
    return out


# ------------------------------------------------------------------------------------------------------ layouts
_MIMIC_PREFIX = "mimic-cxr-2.0.0-"


def _find(root: str, names, storage: StorageConfig | None) -> str | None:
    """The first of `names` (each tried as .csv.gz, then .csv) that exists under `root`."""
    for name in names:
        for candidate in (f"{name}.csv.gz", f"{name}.csv"):
            uri = join_uri(root, candidate)
            if exists(uri, storage):
                return uri
    return None


def _concat_with_row_ids(frames: list[pd.DataFrame]) -> pd.DataFrame:
    df = pd.concat(frames, ignore_index=True)
    df["row_id"] = np.arange(len(df), dtype=np.int64)
    return df


def load_manifest_from_layout(
    root_uri: str,
    storage: StorageConfig | None = None,
    fmt: str = "chexpert",
    image_root: str | None = None,
    labeler: str = "chexpert",
    patients_uri: str | None = None,
    ext: str | None = None,
) -> pd.DataFrame:
    """Find the released tables under `root_uri` and build the manifest (images relative to `image_root`, by
    default `root_uri`).

    CheXpert: `train.csv`, `valid.csv`, `test.csv` (whichever exist; split from the file name; row_id counts
    through them in that order). MIMIC: `mimic-cxr-2.0.0-metadata`, `-{labeler}` ("chexpert" or "negbio"),
    `-split` as `.csv.gz` or `.csv`, and MIMIC-IV `patients.csv(.gz)` from `patients_uri` or the root. `ext`
    None probes the first image as .jpg, then .dcm.
    """
    root = str(root_uri).rstrip("/") or "/"
    image_root = root if image_root is None else image_root
    if fmt == "chexpert":
        # the folder holding train.csv, or the folder that holds it (the reading of the CSVs' own `Path`)
        for folder in (root, *(join_uri(root, name) for name in CHEXPERT_FOLDERS)):
            tables = [uri for uri in (_find(folder, [name], storage) for name in ("train", "valid", "test")) if uri]
            if tables:
                break
        else:
            raise FileNotFoundError(
                f"{root}: no CheXpert train.csv / valid.csv / test.csv found there or in {' or '.join(CHEXPERT_FOLDERS)}/"
            )
        return _concat_with_row_ids([read_chexpert_table(uri, storage, image_root=image_root) for uri in tables])
    if fmt != "mimic":
        raise ValueError(f"layout format {fmt!r} is not 'chexpert' or 'mimic'")

    if labeler not in ("chexpert", "negbio"):
        raise ValueError(f"labeler {labeler!r}: MIMIC-CXR ships 'chexpert' and 'negbio' labels")
    metadata_uri = _find(root, [_MIMIC_PREFIX + "metadata"], storage)
    if metadata_uri is None:
        # The DICOM release (MIMIC-CXR) ships cxr-record-list (subject_id, study_id, dicom_id, path) instead of
        # the JPG release's metadata table; without it there is no ViewPosition, which each DICOM still carries.
        metadata_uri = _find(root, ["cxr-record-list"], storage)
        if metadata_uri is not None:
            ext = ext or ".dcm"
            logger.info("%s: no %smetadata table, using cxr-record-list (no view positions)", root, _MIMIC_PREFIX)
    if metadata_uri is None:
        raise FileNotFoundError(f"{root}: no {_MIMIC_PREFIX}metadata.csv(.gz) or cxr-record-list.csv(.gz) found")
    labels_uri = _find(root, [_MIMIC_PREFIX + labeler], storage)
    split_uri_ = _find(root, [_MIMIC_PREFIX + "split"], storage)
    patients_uri = patients_uri or _find(root, ["patients"], storage)
    if labels_uri is None:
        logger.warning("%s: no %s%s.csv(.gz): finding labels will be blank", root, _MIMIC_PREFIX, labeler)
    if patients_uri is None:
        logger.info("%s: no MIMIC-IV patients.csv(.gz): sex and age will be blank", root)

    metadata = read_table(metadata_uri, storage)
    if ext is None:
        ext = _probe_mimic_ext(metadata, image_root, storage)
    return mimic_to_manifest(
        metadata,
        read_table(labels_uri, storage) if labels_uri else None,
        split_df=read_table(split_uri_, storage) if split_uri_ else None,
        patients_df=read_table(patients_uri, storage) if patients_uri else None,
        image_root=image_root,
        ext=ext,
    )


def _probe_mimic_ext(metadata: pd.DataFrame, image_root: str, storage: StorageConfig | None) -> str:
    """MIMIC-CXR and MIMIC-CXR-JPG share the tables: look at the first image to tell them apart."""
    for _, row in metadata.head(1).iterrows():
        ids = [id_str(row.get(c)) for c in ("subject_id", "study_id", "dicom_id")]
        if all(ids):
            for ext in (".jpg", ".dcm"):
                if exists(resolve_uri(mimic_image_path(*ids, ext=ext), image_root), storage):
                    return ext
    logger.warning("%s: could not find the first MIMIC image as .jpg or .dcm; assuming .dcm", image_root)
    return ".dcm"
