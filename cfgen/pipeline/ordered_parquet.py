"""Write a Ray Dataset to Parquet with its rows in the dataset's order: file k holds the k-th write task's blocks,
each file its blocks in the order they came.

Ray Data's own `write_parquet` hands a write task's blocks to `pyarrow.dataset.write_dataset` with threads on and
no order kept, so a task holding several blocks may write them in any order (seen in CI: block 13 of an ingest
written after blocks 14 and 15; measured: 16 blocks through that call came out reordered in 5 of 10 runs). The
ingest's decoded shards and the latent cache are read back in file-name order and trained on in that order, so
their order is part of what makes two builds of one config the same.
"""

from __future__ import annotations

from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq
from ray.data import Datasink

from cfgen.pipeline.data import in_order


#: Uncompressed bytes a row group aims at. A reader holds a whole row group at once, and a resume reads only the
#: row groups holding a pending row (`cfgen.pipeline.row_groups`): a file written as one group of 1,000 images of
#: 512 x 512 x 16 bits would be 500 MB in one piece, read whole for any one of its rows.
ROW_GROUP_BYTES = 32 * 2**20


def row_group_rows(table: pa.Table, target_bytes: int = ROW_GROUP_BYTES) -> int:
    """Rows per row group for `table`: about `target_bytes` each, at least one row."""
    per_row = max(1, table.nbytes // max(1, table.num_rows))
    return max(1, target_bytes // per_row)


def file_name(task_index: int) -> str:
    """Zero-padded, so that the names sort as the tasks were numbered."""
    return f"part-{task_index:06d}.parquet"


class OrderedParquetSink(Datasink):
    """One Parquet file per write task, named by the task's index (a rerun overwrites, never duplicates)."""

    def __init__(self, path: str, filesystem: pa.fs.FileSystem, row_group_bytes: int = ROW_GROUP_BYTES):
        self.path = path.rstrip("/")
        self.filesystem = filesystem
        self.row_group_bytes = row_group_bytes

    def on_write_start(self, schema=None) -> None:
        self.filesystem.create_dir(self.path, recursive=True)

    def write(self, blocks: Iterable, ctx) -> int:
        tables = [t for t in (_as_arrow(b) for b in blocks) if t.num_rows]
        if not tables:
            return 0
        table = pa.concat_tables(tables, promote_options="default")  # in order; no copy when the schemas agree
        pq.write_table(table, f"{self.path}/{file_name(ctx.task_idx)}", filesystem=self.filesystem,
                       row_group_size=row_group_rows(table, self.row_group_bytes))
        return table.num_rows

    def get_name(self) -> str:
        return "OrderedParquet"


def _as_arrow(block) -> pa.Table:
    from ray.data.block import BlockAccessor

    return BlockAccessor.for_block(block).to_arrow()


def write_parquet_in_order(ds, path: str, filesystem: pa.fs.FileSystem) -> None:
    """Execute `ds` in its input's order and write it so that reading the files in name order gives that order."""
    in_order(ds).write_datasink(OrderedParquetSink(path, filesystem))
