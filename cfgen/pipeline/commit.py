"""Exactly-once outputs: keyed Parquet parts, committed whole.

The generation job writes its rows as parts, one per batch, each named by a hash of the keys it holds and written
whole (`write_bytes`: a local temp file renamed into place, or one object-store PUT), so a killed writer leaves no
half file a reader could take for data (readers skip `.`-prefixed temp files). A batch retried after an actor
died holds the same keys, so it lands on the same name and replaces the first copy instead of adding a second.
What a retry with another batch composition might still duplicate, `deduplicate` removes at the end of the job,
so the finished table holds each key once. The parts are also the done-key log a resumed job reads.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq

from cfgen.config import StorageConfig
from cfgen.io.storage import fsspec_filesystem, join_uri, pyarrow_filesystem, write_bytes


def part_name(keys: Iterable[str]) -> str:
    digest = hashlib.sha256("\n".join(sorted(str(k) for k in keys)).encode()).hexdigest()
    return f"part-{digest[:24]}.parquet"


def write_part(table: pa.Table, folder_uri: str, storage: StorageConfig | None = None) -> str | None:
    """Commit `table` (with a `key` column) as one part of `folder_uri`; None for an empty table."""
    if table.num_rows == 0:
        return None
    buf = io.BytesIO()
    pq.write_table(table, buf)
    uri = join_uri(folder_uri, part_name(table["key"].to_pylist()))
    write_bytes(uri, buf.getvalue(), storage)
    return uri


def part_files(folder_uri: str, storage: StorageConfig | None = None) -> list[str]:
    """The committed parts (paths in the folder's filesystem), temp files and other names left out."""
    fs, path = fsspec_filesystem(folder_uri, storage)
    try:
        names = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.rsplit("/", 1)[-1].startswith("part-") and n.endswith(".parquet"))


def read_parts(folder_uri: str, storage: StorageConfig | None = None,
               columns: list[str] | None = None) -> pa.Table | None:
    """Every committed part as one table (schemas unified: a column null in one batch and typed in another is
    read as the typed one); None when nothing is committed."""
    files = part_files(folder_uri, storage)
    if not files:
        return None
    fs, _ = pyarrow_filesystem(folder_uri, storage)
    tables = [pq.read_table(f, filesystem=fs, columns=columns) for f in files]
    return pa.concat_tables(tables, promote_options="permissive")


def committed_keys(folder_uri: str, storage: StorageConfig | None = None) -> set[str]:
    table = read_parts(folder_uri, storage, columns=["key"])
    return set() if table is None else set(table["key"].to_pylist())


def deduplicate(folder_uri: str, storage: StorageConfig | None = None) -> int:
    """Rewrite the parts that share a key so each key is held once (the part written last keeps it); returns
    the number of rows removed. Parts without shared keys are not touched."""
    return deduplicate_keys(folder_uri, storage)[0]


def deduplicate_keys(folder_uri: str, storage: StorageConfig | None = None) -> tuple[int, set[str]]:
    """`deduplicate`, also returning the committed keys it read (the job's final count needs no second pass over
    every part, which on object storage is one request per part)."""
    files = part_files(folder_uri, storage)
    if not files:
        return 0, set()
    fs, _ = pyarrow_filesystem(folder_uri, storage)
    paths = files
    keys = {p: pq.read_table(p, filesystem=fs, columns=["key"])["key"].to_pylist() for p in paths}
    every = {k for ks in keys.values() for k in ks}
    if len(files) < 2:
        return 0, every
    seen: dict[str, str] = {}
    for p in sorted(paths, key=lambda p: fs.get_file_info(p).mtime_ns or 0, reverse=True):
        for k in keys[p]:
            seen.setdefault(k, p)
    removed = 0
    ffs, _ = fsspec_filesystem(folder_uri, storage)
    for p in paths:
        drop = [k for k in keys[p] if seen[k] != p]
        if not drop:
            continue
        table = pq.read_table(p, filesystem=fs)
        keep = pa.array([seen[k] == p for k in table["key"].to_pylist()])
        kept = table.filter(keep)
        removed += table.num_rows - kept.num_rows
        ffs.rm(p)
        if kept.num_rows:
            write_part(kept, folder_uri, storage)
    return removed, every


def remove_parts(folder_uri: str, storage: StorageConfig | None = None) -> int:
    files = part_files(folder_uri, storage)
    fs, _ = fsspec_filesystem(folder_uri, storage)
    for f in files:
        fs.rm(f)
    return len(files)


def dataset(folder_uri: str, storage: StorageConfig | None = None) -> pds.Dataset:
    """The committed parts as a pyarrow dataset (what readers of a results folder should open)."""
    fs, path = pyarrow_filesystem(folder_uri, storage)
    return pds.dataset(path, filesystem=fs, format="parquet")
