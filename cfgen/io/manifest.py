"""The cfgen manifest: one row per image, the table every cfgen job starts from.

Flow: `read_manifest` (a cfgen CSV/Parquet, or a CheXpert/MIMIC layout through `cfgen.io.adapters`) ->
`normalize_manifest` (types every column, validates every row, routes bad rows to an errors table) ->
`filter_manifest` (views, splits, limit) -> `check_images_present` (fails early when the images are not where the
manifest says). The modules form layers whose imports point one way, downwards:

    cfgen.io.manifest   this reader, which dispatches on the format
    cfgen.io.adapters   the released CheXpert and MIMIC-CXR layouts
    cfgen.io.schema     the columns, their types and normalisation (schema table there); cfgen.io.tables: CSV/Parquet

Every name of `cfgen.io.schema` is importable from here as well, so callers need one import for the manifest.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pandas as pd

from cfgen.config import StorageConfig
from cfgen.io import adapters, schema
from cfgen.io.schema import *  # noqa: F403 - the columns and their normalisation, importable from here as well
from cfgen.io.schema import resolve_uri, string_series, with_row_id
from cfgen.io.storage import exists, parent_uri
from cfgen.io.tables import read_table

__all__ = [*schema.__all__, "IMAGE_LAYOUTS", "read_table", "read_manifest", "default_image_root", "check_images_present"]

#: Where each manifest format expects its images, for the message of a manifest whose images are not found.
IMAGE_LAYOUTS: dict[str, str] = {
    "cfgen": "each image_uri absolute (s3://, gs://, /abs/path) or relative to data.image_root",
    "chexpert": (
        f"train/patientNNNNN/studyN/viewN_*.jpg under the {' or '.join(adapters.CHEXPERT_FOLDERS)} folder; "
        "data.image_root may be that folder or the folder holding it"
    ),
    "mimic": "files/pNN/pSUBJECT_ID/sSTUDY_ID/DICOM_ID.dcm (MIMIC-CXR) or .jpg (MIMIC-CXR-JPG) under data.image_root",
}

#: How many of the first rows `check_images_present` looks for, and how many storage requests run at once.
IMAGE_CHECK_ROWS = 32
_CHECK_THREADS = 8


def _is_table_file(uri: str) -> bool:
    return re.search(r"\.(csv|tsv|parquet|pq)(\.\w+)?$", str(uri).lower()) is not None


def default_image_root(uri: str) -> str:
    """Where relative image paths of the manifest at `uri` point when no image root is given: the folder of a
    table file, or the data-set folder itself."""
    return parent_uri(uri) if _is_table_file(uri) else str(uri)


def read_manifest(
    uri: str,
    storage: StorageConfig | None = None,
    fmt: str = "cfgen",
    image_root: str | None = None,
    **adapter_kwargs: Any,
) -> pd.DataFrame:
    """Read a manifest in cfgen, CheXpert or MIMIC-CXR form and return cfgen columns with a `row_id`.

    `image_root` defaults to `default_image_root(uri)`, which is where the released CheXpert/MIMIC layouts and
    cfgen's phantom writer put the images. Relative `image_uri`/`mask_uri` are joined to it. For "mimic", `uri` is
    the data-set root or any of its `mimic-cxr-2.0.0-*.csv(.gz)` files; for "chexpert", a `train.csv`/`valid.csv`
    file, the folder holding them, or the folder holding `CheXpert-v1.0-small/`. Pass the result to
    `normalize_manifest` before use.
    """
    folder = default_image_root(uri)
    if fmt == "cfgen":
        df = with_row_id(read_table(uri, storage))
        root = image_root if image_root is not None else folder
        for column in ("image_uri", "mask_uri"):
            if column in df.columns:
                df[column] = string_series((resolve_uri(v, root) for v in df[column]), df.index)
        return df
    if fmt == "chexpert":
        if not _is_table_file(uri):
            return adapters.load_manifest_from_layout(uri, storage, "chexpert", image_root=image_root,
                                                      **adapter_kwargs)
        return adapters.read_chexpert_table(uri, storage, image_root=image_root if image_root is not None else folder,
                                            **adapter_kwargs)
    if fmt == "mimic":
        return adapters.load_manifest_from_layout(folder, storage, "mimic", image_root=image_root, **adapter_kwargs)
    raise ValueError(f"manifest format {fmt!r} is not one of 'cfgen', 'chexpert', 'mimic'")


def check_images_present(
    rows: pd.DataFrame,
    image_root: str,
    fmt: str = "cfgen",
    storage: StorageConfig | None = None,
    n_rows: int = IMAGE_CHECK_ROWS,
) -> None:
    """Raise ValueError, naming the root and the layout, when most of the first `n_rows` images do not exist.

    A wrong image root makes every row a `missing_object` error; one message before any work is started says more
    than a job whose errors table is the whole data set. A few missing files (real buckets have them) pass and
    become error rows as usual.
    """
    uris = [u for u in rows["image_uri"].head(n_rows).tolist() if isinstance(u, str)] if len(rows) else []
    if not uris:
        return
    with ThreadPoolExecutor(max_workers=min(_CHECK_THREADS, len(uris))) as pool:
        found = list(pool.map(lambda uri: exists(uri, storage), uris))
    missing = [uri for uri, ok in zip(uris, found) if not ok]
    if 2 * len(missing) <= len(uris):
        return
    raise ValueError(
        f"{len(missing)} of the first {len(uris)} images of the manifest do not exist (e.g. {missing[0]}). "
        f"Image root tried: {image_root}. The {fmt} layout expects {IMAGE_LAYOUTS.get(fmt, IMAGE_LAYOUTS['cfgen'])}. "
        "Set data.image_root to the folder that holds the images."
    )
