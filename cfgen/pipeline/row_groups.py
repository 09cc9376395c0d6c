"""Read only the Parquet row groups that hold the rows a job still has to do.

The generation job's driver reads the decoded shards' metadata columns before it plans (the key table needs them),
so it already knows which row of which file each pending image is. Ray Data's `read_parquet` would then list the
same files' footers again through a pool of actors of its own (one more process per job, 0.8-2.3 s of CPU:
bench/RESULTS.md, the generation job) and read every image of every file, leaving the filter to drop the finished
ones, so a resume with 2% of its keys left read all of them. `RowGroupSource` reads the row groups that hold a
pending row, filtered to those rows inside the read task, and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata


@dataclass(frozen=True)
class RowGroupRead:
    """One read task: row groups of one file and the ids wanted from them."""

    path: str
    row_groups: tuple[int, ...]
    ids: tuple
    size_bytes: int  # uncompressed size of the groups read

    @property
    def num_rows(self) -> int:
        """The wanted rows (after the filter)."""
        return len(self.ids)


def plan_row_group_reads(files: Sequence[str], filesystem: pa.fs.FileSystem, wanted_ids: Iterable,
                         id_column: str = "image_id", max_rows_per_task: int = 1024,
                         threads: int = 16) -> list[RowGroupRead]:
    """The row groups of `files` that hold an `ok` row whose id is in `wanted_ids`, in file and group order.

    Only the id and status columns are read here, `threads` files at a time (on object storage each file is a few
    requests, latency-bound). A task takes consecutive groups of one file up to `max_rows_per_task` wanted rows, so
    that a large file still spreads over several tasks."""
    from concurrent.futures import ThreadPoolExecutor

    wanted = pa.array(sorted(set(wanted_ids)))
    if not len(wanted) or not files:
        return []

    def plan_file(path: str) -> list[RowGroupRead]:
        reads: list[RowGroupRead] = []
        parquet = pq.ParquetFile(path, filesystem=filesystem)
        groups: list[int] = []
        group_ids: list = []
        size = 0
        for g in range(parquet.num_row_groups):
            table = parquet.read_row_group(g, columns=[id_column, "status"])
            picked = table[id_column].filter(_wanted_ok(table, id_column, wanted)).to_pylist()
            if not picked:
                continue
            if group_ids and len(group_ids) + len(picked) > max_rows_per_task:
                reads.append(RowGroupRead(path, tuple(groups), tuple(group_ids), size))
                groups, group_ids, size = [], [], 0
            groups.append(g)
            group_ids.extend(picked)
            size += int(parquet.metadata.row_group(g).total_byte_size)
        if groups:
            reads.append(RowGroupRead(path, tuple(groups), tuple(group_ids), size))
        return reads

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(files)))) as pool:
        return [read for file_reads in pool.map(plan_file, files) for read in file_reads]


def _wanted_ok(table: pa.Table, id_column: str, wanted: pa.Array) -> pa.Array:
    """Rows decoded ok whose id is wanted (an error row of the same id stays out: it is the job's input error)."""
    return pc.and_(pc.is_in(table[id_column], value_set=wanted.cast(table[id_column].type)),
                   pc.equal(table["status"], "ok"))


class RowGroupSource(Datasource):
    """A Ray Data source over planned row-group reads (`plan_row_group_reads`): a read task yields one table per
    row group, holding the wanted rows only, with `columns` (all when None). Ray Data joins what a task yields into
    blocks of up to `target_max_block_size`, so the job still repartitions to its batch size."""

    def __init__(self, reads: list[RowGroupRead], filesystem: pa.fs.FileSystem, columns: list[str] | None = None,
                 id_column: str = "image_id"):
        self.reads = reads
        self.filesystem = filesystem
        self.columns = columns
        self.id_column = id_column

    def estimate_inmemory_data_size(self) -> int:
        return sum(r.size_bytes for r in self.reads)

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        tasks = []
        for read in self.reads:
            meta = BlockMetadata(num_rows=read.num_rows, size_bytes=read.size_bytes, exec_stats=None,
                                 input_files=(read.path,))
            tasks.append(ReadTask(_reader(read, self.filesystem, self.columns, self.id_column), meta,
                                  per_task_row_limit=per_task_row_limit))
        return tasks

    def get_name(self) -> str:
        return "ParquetRowGroups"


def _reader(read: RowGroupRead, filesystem, columns, id_column):
    def read_fn() -> Iterable[pa.Table]:
        import ray.data.extensions  # noqa: F401 - Ray's tensor type, so that the image column keeps its shape

        wanted = pa.array(list(read.ids))
        with filesystem.open_input_file(read.path) as handle:
            parquet = pq.ParquetFile(handle)
            read_columns = None if columns is None else sorted(set(columns) | {id_column, "status"})
            for g in read.row_groups:
                table = parquet.read_row_group(g, columns=read_columns)
                table = table.filter(_wanted_ok(table, id_column, wanted))
                if columns is not None:
                    table = table.select(columns)
                if table.num_rows:
                    yield table

    return read_fn
