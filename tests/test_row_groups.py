"""Reading only the row groups that hold pending rows (the generation job's input), and the row groups the
ordered sink writes."""

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cfgen.pipeline.row_groups import RowGroupSource, plan_row_group_reads


def _shard(path, first: int, rows: int, group: int, bad: set[int] = frozenset()) -> None:
    ids = [f"im{i:04d}" for i in range(first, first + rows)]
    table = pa.table({
        "image_id": ids,
        "status": ["error" if i in bad else "ok" for i in range(first, first + rows)],
        "pixels": list(np.arange(first, first + rows, dtype=np.float32)[:, None] * np.ones((1, 16), np.float32)),
        "split": ["test"] * rows,
    })
    pq.write_table(table, path, row_group_size=group)


def _read_all(source: RowGroupSource) -> pa.Table:
    tables = [t for task in source.get_read_tasks(1) for t in task.read_fn()]
    return pa.concat_tables(tables)


def test_only_the_row_groups_holding_a_pending_ok_row_are_read_and_only_those_rows_come_out(tmp_path):
    fs = pafs.LocalFileSystem()
    a, b = str(tmp_path / "part-000000.parquet"), str(tmp_path / "part-000001.parquet")
    _shard(a, 0, 40, 10, bad={25})  # groups: 0-9, 10-19, 20-29, 30-39
    _shard(b, 40, 20, 10)  # groups: 40-49, 50-59
    pending = ["im0003", "im0025", "im0027", "im0055", "im9999"]  # 25 is an error row; 9999 is in no file
    reads = plan_row_group_reads([a, b], fs, pending)
    assert [(r.path, r.row_groups, r.ids) for r in reads] == [
        (a, (0, 2), ("im0003", "im0027")), (b, (1,), ("im0055",))]
    source = RowGroupSource(reads, fs, columns=["image_id", "pixels"])
    out = _read_all(source)
    assert out.column_names == ["image_id", "pixels"]
    assert out["image_id"].to_pylist() == ["im0003", "im0027", "im0055"]
    assert [row[0] for row in out["pixels"].to_pylist()] == [3.0, 27.0, 55.0]
    tasks = source.get_read_tasks(1)
    assert [t.metadata.num_rows for t in tasks] == [2, 1]
    groups = pq.read_metadata(a)
    assert tasks[0].metadata.size_bytes == groups.row_group(0).total_byte_size + groups.row_group(2).total_byte_size


def test_a_task_takes_groups_up_to_its_row_budget_and_nothing_is_planned_for_finished_files(tmp_path):
    fs = pafs.LocalFileSystem()
    a, b = str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")
    _shard(a, 0, 40, 10)
    _shard(b, 40, 20, 10)
    reads = plan_row_group_reads([a, b], fs, [f"im{i:04d}" for i in range(40)], max_rows_per_task=20)
    assert [(r.path, r.row_groups, r.num_rows) for r in reads] == [(a, (0, 1), 20), (a, (2, 3), 20)]
    assert _read_all(RowGroupSource(reads, fs))["image_id"].to_pylist() == [f"im{i:04d}" for i in range(40)]
    assert plan_row_group_reads([a, b], fs, []) == []


def test_the_ordered_sink_writes_row_groups_of_about_its_target_size(tmp_path):
    from ray.data._internal.execution.interfaces.task_context import TaskContext

    from cfgen.pipeline.ordered_parquet import OrderedParquetSink, row_group_rows

    rows = pa.table({"pixels": list(np.zeros((100, 1000), np.float32))})  # ~4 KB a row
    assert row_group_rows(rows, target_bytes=40_000) == 40000 // (rows.nbytes // 100)
    assert row_group_rows(rows, target_bytes=1) == 1
    sink = OrderedParquetSink(str(tmp_path / "out"), pafs.LocalFileSystem(), row_group_bytes=10 * rows.nbytes // 100)
    sink.on_write_start()
    sink.write([rows], TaskContext(task_idx=0, op_name="Write"))
    meta = pq.read_metadata(tmp_path / "out" / "part-000000.parquet")
    assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == [10] * 10
