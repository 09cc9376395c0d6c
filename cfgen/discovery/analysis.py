"""From the generation job's rows to the discovery tables: region statistics, pixel maps, entanglement.

The images never gather in one place. Ray Data actors read each row's factual and counterfactual PNGs and its
masks, reduce them to region means and fold the batch's difference maps into pixel accumulators (`RegionStage`,
`reduce_batch`); only numbers reach the driver, which merges the accumulators (`PairedPixelAccumulator`, a few
[H, W] arrays per intervention) and appends each row's numbers to a local Arrow spill. The statistics then read
the spill a slice of subjects at a time into mergeable statistics (`summarize`, `InterventionStats`: moments and a
Poisson bootstrap keyed by subject). So the driver holds a batch of numbers while streaming and a slice while
summarising, whatever the number of rows.

Every estimate is paired within a subject: the counterfactual minus the factual image of the same patient, the
subject's seeds averaged first (one subject, one observation). The observational baseline beside it is what a
user would compute without cfgen: the factual region statistic regressed on the attribute across subjects.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cfgen.config import DiscoveryConfig, JobConfig
from cfgen.discovery.plans import Intervention
from cfgen.discovery.regions import ZONES, region_masks, region_means
from cfgen.discovery.stats import PairedPixelAccumulator, PairedSummaries, SlopeAccumulator, benjamini_hochberg, \
    subject_keys

log = logging.getLogger(__name__)

#: the result columns the analysis reads (classifier columns p_before__* / p_after__* are added when present)
BASE_COLUMNS = ("image_id", "edit_name", "edit_applied", "seed", "factual_uri", "counterfactual_uri", "split")


def region_names(config: DiscoveryConfig) -> list[str]:
    """Every region the configured masks give, in report order."""
    names = ["image"]
    for mask in config.masks:
        if mask == "lungs":
            names += ["lungs"] + [f"{side}{z}" for side in ("right_lung", "left_lung")
                                  for z in ("", *(f"_{z}" for z in ZONES))] + ["outside_lungs"]
        else:
            names.append(mask)
    return names


def read_gray(uri: str, storage=None) -> np.ndarray:
    """A written PNG (8 or 16 bit) as float32 in [0, 1], through the data plane's own PNG decoder."""
    from cfgen.io.decode import decode_png
    from cfgen.io.storage import read_bytes

    return np.asarray(decode_png(read_bytes(uri, storage)).pixels, dtype=np.float32)


class RegionStage:
    """Ray Data actor: one batch of results rows -> per row, region means of the factual and of the difference
    (and why a row could not be read: a missing PNG, a mask of the wrong shape, instead of a crash); with
    `interventions`, also each row's eligibility and the batch's pixel accumulators and example images
    (`reduce_batch`), so that only numbers travel to the driver, never the images."""

    def __init__(self, job: dict[str, Any], interventions: Sequence[Intervention] | None = None):
        self.job = JobConfig.model_validate(job)
        self.names = region_names(self.job.discovery)
        self.interventions = list(interventions) if interventions is not None else None
        #: example pairs this actor may still send per intervention (the driver shows `examples` in all)
        self.examples_left = {i.name: self.job.discovery.examples for i in self.interventions or []}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        measured = self.measure(batch)
        if self.interventions is None:
            return measured
        return reduce_batch(measured, self.interventions, self.job.discovery, tuple(self.job.edit.age_range),
                            self.examples_left)

    def measure(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from cfgen.io.decode import DecodeError
        from cfgen.io.preprocess import read_mask

        n = len(batch["image_id"])
        size = self.job.data.decode.size
        out: dict[str, Any] = {k: np.asarray(v) for k, v in batch.items()}
        diffs = np.zeros((n, size, size), dtype=np.float32)
        factuals = np.zeros((n, size, size), dtype=np.float32)
        stats = {f"{kind}__{r}": np.full(n, np.nan) for kind in ("f", "d") for r in self.names}
        errors: list[str | None] = [None] * n
        for i in range(n):
            try:
                factual = read_gray(str(batch["factual_uri"][i]), self.job.storage)
                counterfactual = read_gray(str(batch["counterfactual_uri"][i]), self.job.storage)
                if factual.shape != counterfactual.shape:
                    raise ValueError(f"factual {factual.shape} and counterfactual {counterfactual.shape} differ")
                masks = {}
                for name, column in self.job.discovery.masks.items():
                    uri = batch[column][i] if column in batch else None
                    masks[name] = read_mask(None if uri is None else str(uri), self.job.data.decode,
                                            self.job.storage)
                regions = region_masks(masks, factual.shape)
            except (OSError, ValueError, DecodeError) as err:
                errors[i] = f"{type(err).__name__}: {err}"
                continue
            diff = counterfactual - factual
            f_means, d_means = region_means(factual, regions), region_means(diff, regions)
            for r in self.names:
                stats[f"f__{r}"][i] = f_means.get(r, np.nan)
                stats[f"d__{r}"][i] = d_means.get(r, np.nan)
            diffs[i], factuals[i] = diff, factual
        out.update(stats)
        out["diff"], out["factual"] = diffs, factuals
        out["read_error"] = np.array(errors, dtype=object)
        return out


def reduce_batch(measured: Mapping[str, np.ndarray], interventions: Sequence[Intervention], config: DiscoveryConfig,
                 age_range: tuple[float, float], examples_left: dict[str, int]) -> dict[str, np.ndarray]:
    """A measured batch (`RegionStage.measure`) -> its numbers only: per row `skip_reason` (None: the row counts;
    "unreadable" or the intervention's reason otherwise; "not planned" for another edit) and `units`, and in
    the first row's `partial` the batch's pixel accumulators (every counted row's difference map, and the first
    seed's alone for the pixel test, which counts each subject once: None where those are the same rows) and
    example images, at most `examples_left[name]` (decremented: what this worker may still send). Row-local, so
    any worker can reduce any batch."""
    by_name = {i.name: i for i in interventions}
    first_seed = config.seeds[0]
    images = ("diff", "factual")
    out = {c: np.asarray(v) for c, v in measured.items() if c not in images}
    n = len(out["image_id"])
    scalars = [c for c in out if c != "read_error"]
    reasons: list[str | None] = [None] * n
    units = np.full(n, np.nan)
    for j in range(n):
        row = {c: _scalar(out[c][j]) for c in scalars}
        intervention = by_name.get(row.get("edit_name"))
        error = _text(out["read_error"][j])
        if intervention is None:
            reasons[j] = "not planned"
            continue
        reason = "unreadable" if error else intervention.eligibility(row, age_range)
        if error:
            log.warning("discovery: %s %s: %s", row["image_id"], intervention.name, error)
        if reason is None and "edit_applied" in row and not isinstance(row["edit_applied"], str):
            reason = "edit not applied"  # (results of a cfgen before edit_applied: every edit was applied)
        reasons[j] = reason
        if reason is None:
            units[j] = intervention.units(row)
    counted = np.array([r is None for r in reasons], dtype=bool)
    names, seeds = out["edit_name"], out.get("seed", np.full(n, first_seed))
    shape = measured["diff"].shape[1:]
    partial: dict[str, Any] = {}
    for name in dict.fromkeys(names[counted]):
        mine = counted & (names == name)
        first = mine & (seeds == first_seed)
        means = PairedPixelAccumulator(shape).update(measured["diff"][mine], measured["factual"][mine])
        tests = None if np.array_equal(first, mine) else PairedPixelAccumulator(shape).update(
            measured["diff"][first], measured["factual"][first])
        shown = np.flatnonzero(first)[:examples_left.get(name, config.examples)]
        examples_left[name] = examples_left.get(name, config.examples) - len(shown)
        partial[name] = {"means": means.to_dict(), "tests": None if tests is None else tests.to_dict(),
                         "examples": [{"image_id": str(out["image_id"][j]), "factual": measured["factual"][j].copy(),
                                       "counterfactual": (measured["factual"][j] + measured["diff"][j]).copy()}
                                      for j in shown]}
    out["skip_reason"] = np.array(reasons, dtype=object)
    out["units"] = units
    blobs = np.full(n, None, dtype=object)
    if n:
        blobs[0] = pickle.dumps(partial, protocol=pickle.HIGHEST_PROTOCOL)
    out["partial"] = blobs
    return out


@dataclass
class DiscoveryResult:
    """Everything `cfgen discover` reports; `regions` and `entanglement` are the tables another tool can score."""

    regions: pd.DataFrame
    entanglement: pd.DataFrame
    maps: dict[str, dict[str, Any]]
    examples: dict[str, list[dict[str, Any]]]
    eligibility: dict[str, dict[str, int]]
    #: a local Parquet file, one row per (intervention, subject): region differences, classifier shifts, units
    #: (None when no subject was eligible)
    subjects_path: str | None
    notes: list[str] = field(default_factory=list)


#: columns spilled as text whatever their values look like (an id column of numbers stays an id)
TEXT_KEYS = ("image_id", "edit_name")
#: what names one subject of one intervention
SUBJECT_KEYS = ("edit_name", "image_id")
#: rows of a spill read at once by `_Spill.groups` (about a megabyte of numbers a slice)
GROUP_ROWS = 4096
#: rows a spill writes at once (a Parquet row group, an Arrow record batch)
SPILL_ROW_GROUP = 8192


class _Spill:
    """Rows appended batch by batch to local Parquet or Arrow files, read back one slice at a time: the driver's memory
    stays that of a batch while the stream runs, whatever the number of rows. A read closes the file being
    written; a later append starts the next one."""

    def __init__(self, path: str, format: str = "parquet"):
        self.path, self.writer, self.schema, self.rows = path, None, None, 0
        self.format = format  # "parquet", or "ipc" (Arrow files: no encoder state while writing) for scratch
        self.files: list[str] = []
        self.pending: list[Any] = []  # appended tables not yet written: one row group of up to SPILL_ROW_GROUP

    def append(self, columns: Mapping[str, np.ndarray]) -> None:
        """Append a batch of the first batch's columns (in any order)."""
        import pyarrow as pa

        table = pa.table({c: _arrow_column(v, text=c in TEXT_KEYS) for c, v in columns.items()})
        if not table.num_rows:
            return
        if self.schema is None:
            self.schema = table.schema
        if set(table.schema.names) != set(self.schema.names):
            raise ValueError(f"a batch's columns {sorted(table.schema.names)} differ from the first batch's "
                             f"{sorted(self.schema.names)}")
        self.pending.append(table.select(self.schema.names).cast(self.schema))
        self.rows += table.num_rows
        if sum(t.num_rows for t in self.pending) >= SPILL_ROW_GROUP:
            self._flush()

    def _flush(self) -> None:
        """Write what is pending as one row group (a row group per small batch would make the file's footer, which
        every read parses, grow with the batches)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.pending:
            return
        if self.writer is None:
            stem = Path(self.path)
            self.files.append(str(stem if not self.files else stem.with_name(f"{stem.stem}-{len(self.files)}"
                                                                             f"{stem.suffix}")))
            self.writer = (pq.ParquetWriter(self.files[-1], self.schema) if self.format == "parquet"
                           else pa.ipc.new_file(self.files[-1], self.schema))
        # one record batch: the appended batches (a few hundred rows each) kept as chunks would make every read
        # build a table of hundreds of chunks per column, megabytes of array headers for a megabyte of numbers
        self.writer.write_table(pa.concat_tables(self.pending).combine_chunks())
        self.pending = []

    def close(self) -> None:
        self._flush()
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def read(self, where: tuple[str, Any] | None = None) -> pd.DataFrame:
        """The rows (where `column == value`); an empty frame when nothing was appended."""
        import pyarrow as pa

        batches = list(self.batches(where))  # closes the file being written
        if not batches:
            return pd.DataFrame()
        return pa.Table.from_batches(batches).to_pandas(use_threads=False)

    def batches(self, where: tuple[str, Any] | None = None) -> Iterator[Any]:
        """The spill's record batches (where `column == value`), one at a time.

        Arrow files are read from memory-mapped files, batch by batch, without Arrow's dataset scanner: the
        scanner's read-ahead threads left ~20-27 MB of freed pages in malloc arenas of their own in the driver,
        kept after the read, at 100,000 rows (bench/RESULTS.md, discovery at scale); the mapped pages are the
        page cache's, not the process's. Parquet (the per-subject output) is read one row group at a time."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.close()
        for path in self.files:
            if self.format == "ipc":
                with pa.memory_map(path) as source, pa.ipc.open_file(source) as reader:
                    parts = (reader.get_batch(i) for i in range(reader.num_record_batches))
                    yield from _filtered(parts, where)
            else:
                yield from _filtered(pq.ParquetFile(path).iter_batches(use_threads=False), where)

    def groups(self, where: tuple[str, Any] | None = None, key: str = "image_id",
               rows: int | None = None) -> Iterator[pd.DataFrame]:
        """The rows (where `column == value`) in slices of about `rows` rows that never split the rows of one
        `key`: hash-partitioned through local files next to the spill when there are more, so whoever reads them
        holds a slice, not the run. One slice, in file order, when the spill is small."""
        import pyarrow as pa

        self.close()
        parts = -(-self.rows // (rows or GROUP_ROWS))
        if parts <= 1:
            frame = self.read(where)
            if not frame.empty:
                yield frame
            return
        # Arrow IPC streams, not Parquet: an open Parquet writer per slice keeps encoder buffers per column
        paths = [Path(self.path).with_name(f"{Path(self.path).stem}.part{j}.arrow") for j in range(parts)]
        writers: dict[int, Any] = {}
        try:
            for batch in self.batches(where):
                ids = batch.column(key).to_numpy(zero_copy_only=False).astype(object)
                bucket = pd.util.hash_array(ids) % parts
                for j in np.unique(bucket).tolist():
                    if j not in writers:
                        writers[j] = pa.ipc.new_stream(str(paths[j]), batch.schema)
                    writers[j].write_batch(batch.filter(pa.array(bucket == j)))
            for j in sorted(writers):
                writers.pop(j).close()
                with pa.ipc.open_stream(str(paths[j])) as reader:
                    frame = reader.read_all().to_pandas(use_threads=False)
                paths[j].unlink()
                yield frame
        finally:
            for w in writers.values():
                w.close()
            for path in paths:
                path.unlink(missing_ok=True)




def _filtered(batches: Iterable[Any], where: tuple[str, Any] | None) -> Iterator[Any]:
    """The rows of each batch where `column == value` (every row when `where` is None), empty batches left out."""
    import pyarrow.compute as pc

    for batch in batches:
        if where is not None:
            batch = batch.filter(pc.equal(batch.column(where[0]), where[1]))
        if batch.num_rows:
            yield batch


def _arrow_column(values: np.ndarray, text: bool = False):
    """Text (or missing) as string, anything numeric as float64: the same types in every batch."""
    import pyarrow as pa

    values = np.asarray(values)
    if text or values.dtype.kind in "OUS":
        return pa.array([None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v) for v in values],
                        type=pa.string())
    return pa.array(values.astype(np.float64))


@dataclass
class _Reduction:
    """What the driver keeps while streaming: bounded pixel accumulators, a few examples and counts; the numbers
    of each counted row (no URIs, no images) and of every readable subject go to local Arrow spills in
    `folder`, read back a slice of subjects at a time by `summarize`."""

    interventions: Sequence[Intervention]
    config: DiscoveryConfig
    folder: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="cfgen-discovery-"))
    tests: dict[str, PairedPixelAccumulator] = field(default_factory=dict)
    means: dict[str, PairedPixelAccumulator] = field(default_factory=dict)
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    ineligible: dict[str, dict[str, int]] = field(default_factory=dict)

    def __post_init__(self):
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        self.rows = _Spill(str(Path(self.folder) / "rows.arrow"), format="ipc")
        #: every readable row's factual numbers, eligible or not: the observational baseline's population
        self.population_rows = _Spill(str(Path(self.folder) / "population.arrow"), format="ipc")

    def add(self, batch: Mapping[str, np.ndarray]) -> None:
        """Fold in one reduced batch (`reduce_batch`)."""
        for blob in batch["partial"]:
            if not isinstance(blob, (bytes, bytearray)):  # None, or NaN where Arrow read a column of nulls
                continue
            for name, state in pickle.loads(blob).items():
                for kind, store in (("means", self.means), ("tests", self.tests)):
                    own = state[kind] if state[kind] is not None else state["means"]  # None: the same rows
                    acc = PairedPixelAccumulator.from_dict(own)
                    if name in store:
                        store[name].merge(acc)
                    else:
                        store[name] = acc
                shown = self.examples.setdefault(name, [])
                shown.extend(state["examples"][:max(0, self.config.examples - len(shown))])
        reasons = [_text(r) for r in batch["skip_reason"]]
        names = batch["edit_name"]
        for name, reason in zip(names, reasons):
            if reason is not None and reason != "not planned":
                counts = self.ineligible.setdefault(str(name), {})
                counts[reason] = counts.get(reason, 0) + 1
        numbers = [c for c in batch if not c.endswith("_uri") and c not in ("read_error", "skip_reason", "partial")]
        counted = np.array([r is None for r in reasons], dtype=bool)
        self.rows.append({c: np.asarray(batch[c])[counted] for c in numbers})
        readable = np.array([_text(e) is None for e in batch["read_error"]], dtype=bool)
        columns = [c for c in numbers if not c.startswith(("d__", "p_after__")) and c not in (
            "edit_name", "edit_applied", "units")]
        self.population_rows.append({c: np.asarray(batch[c])[readable] for c in columns})

    def subject_slices(self, name: str | None = None) -> Iterator[pd.DataFrame]:
        """One row per (intervention, subject) of intervention `name` (all when None), a slice of subjects at a
        time (`_Spill.groups`: a subject's seeds are never split)."""
        for rows in self.rows.groups(where=("edit_name", name) if name else None):
            yield subject_table(rows)

    def population_slices(self) -> Iterator[pd.DataFrame]:
        """Every readable subject once (its first row), a slice of subjects at a time."""
        for frame in self.population_rows.groups():
            yield frame.drop_duplicates("image_id", ignore_index=True)

    def subjects(self, name: str | None = None) -> pd.DataFrame:
        """`subject_slices` as one table ordered by subject (all in memory: `summarize` reads the slices)."""
        return _ordered(list(self.subject_slices(name)))

    def population(self) -> pd.DataFrame:
        """`population_slices` as one table ordered by subject."""
        return _ordered(list(self.population_slices()))


def _ordered(parts: list[pd.DataFrame]) -> pd.DataFrame:
    """Slices joined in subject order, so the table does not depend on how the spill was sliced."""
    if not parts:
        return pd.DataFrame()
    frame = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
    by = [c for c in SUBJECT_KEYS if c in frame.columns]
    return frame.sort_values(by, ignore_index=True, kind="stable") if by else frame


def _text(value: Any) -> str | None:
    """A text cell or None: Arrow hands a missing string back as None, or as NaN when the batch's whole column is
    missing, so only text counts as a value."""
    return value if isinstance(value, str) else None


def _scalar(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return value


def stream_subjects(job: JobConfig, results_uri: str, interventions: Sequence[Intervention]) -> _Reduction:
    """Read the generation rows of `interventions` once, through `RegionStage` actors that reduce each batch to
    numbers and pixel accumulators, into a `_Reduction` (the images never reach the driver)."""
    import pyarrow.dataset as pds
    import ray.data
    from ray.data.expressions import col

    from cfgen.io.storage import pyarrow_filesystem

    fs, path = pyarrow_filesystem(results_uri, job.storage)
    schema = pds.dataset(path, filesystem=fs, format="parquet").schema.names
    missing = [c for c in ("image_id", "edit_name", "seed", "factual_uri", "counterfactual_uri") if c not in schema]
    if missing:
        raise ValueError(f"{results_uri}: the results lack {missing}; they were written by an older cfgen "
                         "generate: run it again into a new output folder")
    attributes = sorted({i.attribute for i in interventions} | {"sex", "age"} | set(job.data.prompt.attributes))
    wanted = [c for c in (*BASE_COLUMNS, *attributes, *job.discovery.masks.values(), "phantom_index") if c in schema]
    wanted += [c for c in schema if c.startswith(("p_before__", "p_after__"))]
    ds = ray.data.read_parquet(path, filesystem=fs).select_columns(sorted(set(wanted)))
    names = [i.name for i in interventions]
    ds = ds.filter(expr=col("edit_name").is_in(names) & col("seed").is_in(list(job.discovery.seeds)))
    if job.discovery.splits and "split" in schema:
        ds = ds.filter(expr=col("split").is_in(list(job.discovery.splits)))
    # one batch per block (streaming, no shuffle): a map task's output is one block, so a results file read as one
    # block would reach the driver only when all of it was reduced, every batch's accumulators at once, and the
    # other actors would sit idle
    ds = ds.repartition(target_num_rows_per_block=job.discovery.batch_rows)
    ds = ds.map_batches(RegionStage, fn_constructor_kwargs={"job": job.model_dump(mode="python"),
                                                            "interventions": list(interventions)},
                        compute=ray.data.ActorPoolStrategy(size=job.discovery.num_actors),
                        batch_size=job.discovery.batch_rows,
                        batch_format="numpy", num_cpus=job.discovery.cpus_per_actor)
    reduction = _Reduction(interventions, job.discovery)
    for batch in ds.iter_batches(batch_size=job.discovery.batch_rows, batch_format="numpy"):
        reduction.add(batch)
    return reduction


def subject_table(rows: pd.DataFrame | Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per (intervention, subject): a subject's seeds averaged, its seed count kept."""
    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    if frame.empty:
        return frame
    numeric = [c for c in frame.columns if c.startswith(("f__", "d__", "p_before__", "p_after__")) or c == "units"]
    other = [c for c in frame.columns if c not in numeric and c not in ("seed", "edit_name", "image_id")]
    grouped = frame.groupby(["edit_name", "image_id"], sort=False)
    out = grouped[numeric].mean()
    out["n_seeds"] = grouped.size()
    out = out.join(grouped[other].first())
    return out.reset_index()


def attribute_value(attribute: str, values: pd.Series) -> pd.Series:
    """An attribute as a number for regression: binary as 0/1 (uncertain -1 and missing as NaN), age in years,
    sex as 1 for male."""
    if attribute == "sex":
        from cfgen.io.schema import normalize_sex

        return values.map(lambda v: np.nan if v is None or (isinstance(v, float) and np.isnan(v))
                          else float(normalize_sex(v) == "M"))
    numbers = pd.to_numeric(values, errors="coerce")
    return numbers.where(numbers != -1) if attribute != "age" else numbers


def region_table(subjects: pd.DataFrame, population: pd.DataFrame, interventions: Sequence[Intervention],
                 config: DiscoveryConfig) -> tuple[pd.DataFrame, list[str]]:
    """One row per (intervention, region): the paired counterfactual estimate with its bootstrap CI, test and
    effect size; its size per unit of the attribute; the observational slope of the same statistic; and whether
    it is flagged (`verdicts`). The in-memory form of what `summarize` streams."""
    slopes = observational_slopes([population], {i.attribute for i in interventions}, config)
    rows, notes = [], []
    for i in interventions:
        mine = subjects[subjects["edit_name"] == i.name] if not subjects.empty else subjects
        rows += intervention_rows(InterventionStats(config).update(mine), slopes.get(i.attribute), i, config,
                                  notes)
    return finish_region_table(rows, config, notes)


class InterventionStats:
    """One intervention's statistics, folded in one slice of its subject table (`subject_table`) at a time:
    the paired region differences with the units they moved by, and the classifier's shift of every head. What
    it keeps does not grow with the subjects (`PairedSummaries`)."""

    def __init__(self, config: DiscoveryConfig):
        self.config, self.regions, self.n = config, region_names(config), 0
        self.present: set[str] = set()
        self.paired = PairedSummaries(len(self.regions), config.bootstrap, seed=0,
                                      keep_values=config.test == "wilcoxon")
        self.units = _PerUnit(len(self.regions))
        self.heads: list[str] | None = None
        self.shifts: PairedSummaries | None = None

    def update(self, subjects: pd.DataFrame) -> InterventionStats:
        if subjects.empty:
            return self
        keys = subject_keys(subjects["image_id"])
        self.present |= {r for r in self.regions if f"d__{r}" in subjects}
        d = np.column_stack([_floats(subjects, f"d__{r}") for r in self.regions])
        self.paired.update(d, keys)
        self.units.update(d, _floats(subjects, "units"))
        if self.heads is None:
            self.heads = sorted(c.removeprefix("p_after__") for c in subjects.columns if c.startswith("p_after__"))
            self.shifts = PairedSummaries(len(self.heads), self.config.bootstrap, seed=0) if self.heads else None
        if self.shifts is not None:
            self.shifts.update(np.column_stack([_floats(subjects, f"p_after__{h}") - _floats(subjects, f"p_before__{h}")
                                                for h in self.heads]), keys)
        self.n += len(subjects)
        return self


def _floats(frame: pd.DataFrame, column: str) -> np.ndarray:
    return frame[column].to_numpy(np.float64) if column in frame else np.full(len(frame), np.nan)


class _PerUnit:
    """The change per unit of the attribute (least squares through the origin, d ~ b u) per column and, where
    every subject moved by the same units (a binary do() or a fixed shift), the factor that turns the mean's CI
    into b's; streamed as sums and the range of u."""

    def __init__(self, columns: int):
        self.du, self.uu = np.zeros(columns), np.zeros(columns)
        self.low, self.high = np.full(columns, np.inf), np.full(columns, -np.inf)

    def update(self, d: np.ndarray, u: np.ndarray) -> None:
        ok = ~np.isnan(d) & ~np.isnan(u)[:, None]
        us = np.where(ok, u[:, None], 0.0)
        self.du += np.sum(np.where(ok, d, 0.0) * us, axis=0)
        self.uu += np.sum(us**2, axis=0)
        self.low = np.minimum(self.low, np.where(ok, u[:, None], np.inf).min(axis=0))
        self.high = np.maximum(self.high, np.where(ok, u[:, None], -np.inf).max(axis=0))

    def result(self, j: int) -> tuple[float, float]:
        if self.uu[j] == 0:  # no pair, or nobody moved
            return float("nan"), float("nan")
        same = np.isclose(self.high[j], self.low[j])
        return float(self.du[j] / self.uu[j]), (1.0 / float(self.low[j])) if same else float("nan")


def observational_slopes(populations: Iterable[pd.DataFrame], attributes: Iterable[str],
                         config: DiscoveryConfig) -> dict[str, SlopeAccumulator]:
    """Per attribute, the factual region statistics regressed on it across the population (every readable
    subject once), folded in one slice of subjects at a time."""
    regions = region_names(config)
    slopes: dict[str, SlopeAccumulator] = {}
    for frame in populations:
        for a in attributes:
            if a in frame and not frame.empty:
                y = np.column_stack([_floats(frame, f"f__{r}") for r in regions])
                slopes.setdefault(a, SlopeAccumulator(len(regions))).update(
                    attribute_value(a, frame[a]).to_numpy(np.float64), y)
    return slopes


def intervention_rows(stats: InterventionStats, slopes: SlopeAccumulator | None, i: Intervention,
                      config: DiscoveryConfig, notes: list[str]) -> list[dict[str, Any]]:
    """`region_table`'s rows of one intervention, from its folded subjects (`stats`) and the population's
    slopes on its attribute, before the correction for multiple testing that needs every row."""
    test_name = "paired-t" if config.test == "t" else "wilcoxon-signed-rank"
    n = stats.n
    if n < config.min_subjects:
        notes.append(f"{i.name}: {n} eligible subjects, fewer than discovery.min_subjects "
                     f"({config.min_subjects}): no test")
    rows = []
    for j, r in enumerate(stats.regions):
        record: dict[str, Any] = {"intervention": i.name, "attribute": i.attribute, "region": r,
                                  "null_control": i.null_control, "unit": i.unit, "test": test_name}
        if n >= config.min_subjects and r in stats.present:
            s = stats.paired.result(j, alpha=config.alpha, test=config.test, min_n=config.min_subjects)
            per_unit, scale = stats.units.result(j)
            record.update(n=s["n"], mean_diff=s["mean"], ci_low=s["ci_low"], ci_high=s["ci_high"],
                          p_value=s["p_value"], effect_size=s["effect_size"], per_unit=per_unit,
                          per_unit_ci_low=_scaled(s["ci_low"], s["ci_high"], scale)[0],
                          per_unit_ci_high=_scaled(s["ci_low"], s["ci_high"], scale)[1], reason=s["reason"])
        else:
            record.update(n=n, mean_diff=np.nan, ci_low=np.nan, ci_high=np.nan, p_value=np.nan,
                          effect_size=np.nan, per_unit=np.nan, per_unit_ci_low=np.nan, per_unit_ci_high=np.nan,
                          reason=f"too few subjects: {n} < {config.min_subjects}")
        obs = (slopes.result(j, alpha=config.alpha, min_n=config.min_subjects, per=i.per) if slopes is not None
               else {"slope": np.nan, "ci_low": np.nan, "ci_high": np.nan, "p_value": np.nan, "n": 0})
        record.update({f"obs_{k}": obs[k] for k in ("slope", "ci_low", "ci_high", "p_value", "n")})
        rows.append(record)
    return rows


def finish_region_table(rows: list[dict[str, Any]], config: DiscoveryConfig,
                        notes: list[str]) -> tuple[pd.DataFrame, list[str]]:
    """Benjamini-Hochberg over every row of the run, then the verdicts."""
    table = pd.DataFrame(rows)
    if table.empty:
        return table, notes
    _, q = benjamini_hochberg(table["p_value"].to_numpy(np.float64), config.alpha)
    table["q_value"] = q
    table = verdicts(table, config.alpha, config.min_effect)
    below = table[table["significant"] & ~table["flagged"]]
    if len(below):
        notes.append(f"{len(below)} region rows are significant (CI excludes 0, q <= {config.alpha:g}) but not "
                     f"flagged: their CI does not clear the pre-set minimum effect +/-{config.min_effect:g} or the "
                     f"null controls' size in that region")
    return table, notes


def verdicts(table: pd.DataFrame, alpha: float, min_effect: float) -> pd.DataFrame:
    """`significant`: the CI excludes 0 and the BH q-value is <= alpha. `flagged`, a candidate finding: also the
    whole CI beyond +/-`min_effect` (a margin fixed before the run, so the engine's small bias across thousands of
    subjects does not pass for a finding) and, for an intervention where null controls ran, beyond the largest
    |CI bound| of a null control in the same region (`null_bound`): what the analysis finds when nothing is there.
    A null control itself is judged against the margin alone."""
    table = table.copy()
    low, high = table["ci_low"], table["ci_high"]
    table["significant"] = (((low > 0) | (high < 0)) & (table["q_value"] <= alpha)).fillna(False).astype(bool)
    controls = table[table["null_control"].astype(bool)]
    bound = controls.assign(b=np.maximum(controls["ci_low"].abs(), controls["ci_high"].abs())) \
        .groupby("region")["b"].max() if len(controls) else pd.Series(dtype=np.float64)
    own = table["region"].map(bound).where(~table["null_control"].astype(bool))
    table["null_bound"] = own
    margin = np.fmax(min_effect, own.fillna(0.0).to_numpy(np.float64))
    clears = (low > margin) | (high < -margin)
    table["flagged"] = (table["significant"] & clears.fillna(False)).astype(bool)
    table["min_effect"] = min_effect
    table["alpha"] = alpha
    return table


def _scaled(lo: float, hi: float, scale: float) -> tuple[float, float]:
    if np.isnan(scale):
        return float("nan"), float("nan")
    a, b = lo * scale, hi * scale
    return (min(a, b), max(a, b))


def entanglement_table(subjects: pd.DataFrame, interventions: Sequence[Intervention], correlations: pd.DataFrame,
                       config: DiscoveryConfig) -> pd.DataFrame:
    """`entanglement_rows` of subject tables held in memory."""
    frames = [entanglement_rows(InterventionStats(config).update(subjects[subjects["edit_name"] == i.name]), i,
                                correlations, config) for i in interventions] if not subjects.empty else []
    frames = [f for f in frames if not f.empty]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def entanglement_rows(stats: InterventionStats, i: Intervention, correlations: pd.DataFrame,
                      config: DiscoveryConfig) -> pd.DataFrame:
    """For intervened A and every attribute B the classifier reads: the mean shift of its reading of B under
    do(A), with a CI, next to the correlation of A and B in the training data. Flagged where the shift is not
    expected (B is neither A nor one of `expected_effects[A]`), its CI excludes 0 and it is at least
    `entanglement_min_shift` (probability; years for age, scaled by 50): the model's counterfactuals move B
    although do(A) should not."""
    if stats.shifts is None:
        return pd.DataFrame()
    expected = {i.attribute, *config.expected_effects.get(i.attribute, [])}
    rows = []
    for j, b in enumerate(stats.heads):
        s = stats.shifts.result(j, alpha=config.alpha, min_n=config.min_subjects)
        threshold = config.entanglement_min_shift * (50.0 if b == "age" else 1.0)
        excludes = bool(s["ci_low"] > 0 or s["ci_high"] < 0)
        corr = correlations.loc[i.attribute, b] if (i.attribute in correlations.index
                                                     and b in correlations.columns) else np.nan
        rows.append({"intervened": i.name, "attribute": i.attribute, "other": b, "n": s["n"],
                     "mean_shift": s["mean"], "ci_low": s["ci_low"], "ci_high": s["ci_high"],
                     "p_value": s["p_value"], "data_correlation": float(corr), "expected": b in expected,
                     "null_control": i.null_control,
                     "flagged": bool(b not in expected and excludes and abs(s["mean"]) >= threshold)})
    return pd.DataFrame(rows)


def attribute_correlations(metadata: pd.DataFrame, attributes: Sequence[str]) -> pd.DataFrame:
    """Pearson correlations between attributes (pairwise complete) of a metadata table."""
    numbers = pd.DataFrame({a: attribute_value(a, metadata[a]) for a in attributes if a in metadata})
    return numbers.corr(min_periods=3)


def summarize(reduction: _Reduction, correlations: pd.DataFrame) -> DiscoveryResult:
    """The tables and maps of a finished stream, read from the spill a slice of subjects at a time (every row of
    a subject in the same slice) into accumulators that do not grow with the subjects; the per-subject table goes
    to `<reduction.folder>/subjects.parquet` (`DiscoveryResult.subjects_path`) slice by slice."""
    config = reduction.config
    slopes = observational_slopes(reduction.population_slices(), {i.attribute for i in reduction.interventions}, config)
    subjects = _Spill(str(Path(reduction.folder) / "subjects.parquet"))
    rows, entangled, notes, eligibility = [], [], [], {}
    for i in reduction.interventions:
        stats = InterventionStats(config)
        for table in reduction.subject_slices(i.name):
            subjects.append({c: table[c].to_numpy() for c in table.columns})
            stats.update(table)
        rows += intervention_rows(stats, slopes.get(i.attribute), i, config, notes)
        entangled.append(entanglement_rows(stats, i, correlations, config))
        eligibility[i.name] = {"eligible_subjects": stats.n, **reduction.ineligible.get(i.name, {})}
        unreadable = reduction.ineligible.get(i.name, {}).get("unreadable", 0)
        if unreadable:
            notes.append(f"{i.name}: {unreadable} rows could not be read (see the job log)")
    regions, notes = finish_region_table(rows, config, notes)
    subjects.close()
    maps = {}
    for name, acc in reduction.tests.items():
        test = acc.result(config.alpha)
        mean = reduction.means[name].result(config.alpha)
        maps[name] = {**test, "mean": mean["mean"], "mean_factual": mean.get("mean_factual"), "n": test["n"],
                      "n_rows": mean["n"]}
    frames = [e for e in entangled if not e.empty]
    return DiscoveryResult(regions=regions, entanglement=pd.concat(frames, ignore_index=True) if frames else
                           pd.DataFrame(), maps=maps, examples=reduction.examples, eligibility=eligibility,
                           subjects_path=subjects.path if subjects.rows else None, notes=notes)


def to_json(result: DiscoveryResult) -> dict[str, Any]:
    """The headline numbers as plain JSON (benchmarks and MLflow)."""
    def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
        return json.loads(frame.to_json(orient="records")) if not frame.empty else []

    return {"regions": records(result.regions), "entanglement": records(result.entanglement),
            "eligibility": result.eligibility, "notes": result.notes}
