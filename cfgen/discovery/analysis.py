"""From the generation job's rows to the discovery tables: region statistics, pixel maps, entanglement.

The images never gather in one place. Ray Data tasks read each row's factual and counterfactual PNGs and its masks
and reduce them to region means (`RegionStage`); the driver streams those batches once, adding each difference map
to one bounded accumulator per intervention (`PairedPixelAccumulator`) and keeping only the per-row numbers. So
100,000 counterfactuals cost the memory of a batch of images plus a table of numbers.

Every estimate is paired within a subject: the counterfactual minus the factual image of the same patient, the
subject's seeds averaged first (one subject, one observation). The observational baseline beside it is what a
user would compute without cfgen: the factual region statistic regressed on the attribute across subjects.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from cfgen.config import DiscoveryConfig, JobConfig
from cfgen.discovery.plans import Intervention
from cfgen.discovery.regions import ZONES, region_masks, region_means
from cfgen.discovery.stats import PairedPixelAccumulator, benjamini_hochberg, ols_slope, paired_summary

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
    """Ray Data task: one batch of results rows -> region means of factual and counterfactual, the difference
    map, and why a row could not be read (a missing PNG, a mask of the wrong shape) instead of a crash."""

    def __init__(self, job: dict[str, Any]):
        self.job = JobConfig.model_validate(job)
        self.names = region_names(self.job.discovery)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
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


@dataclass
class DiscoveryResult:
    """Everything `cfgen discover` reports; `regions` and `entanglement` are the tables another tool can score."""

    regions: pd.DataFrame
    entanglement: pd.DataFrame
    maps: dict[str, dict[str, Any]]
    examples: dict[str, list[dict[str, Any]]]
    eligibility: dict[str, dict[str, int]]
    subjects: pd.DataFrame  # one row per (intervention, subject): region differences, classifier shifts, units
    notes: list[str] = field(default_factory=list)


@dataclass
class _Reduction:
    """What the driver keeps while streaming: a columnar table of numbers per eligible row (no URIs, no images),
    the factual statistics of every subject once, bounded pixel accumulators and a few examples."""

    interventions: Sequence[Intervention]
    config: DiscoveryConfig
    age_range: tuple[float, float]
    shape: tuple[int, int]
    frames: list[pd.DataFrame] = field(default_factory=list)
    #: every readable subject once, eligible or not: the population the observational baseline regresses over
    population_frames: list[pd.DataFrame] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    tests: dict[str, PairedPixelAccumulator] = field(default_factory=dict)
    means: dict[str, PairedPixelAccumulator] = field(default_factory=dict)
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    ineligible: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, batch: Mapping[str, np.ndarray]) -> None:
        by_name = {i.name: i for i in self.interventions}
        first_seed = self.config.seeds[0]
        n = len(batch["image_id"])
        scalars = [c for c in batch if c not in ("diff", "factual")]
        numbers = [c for c in scalars if not c.endswith("_uri") and c != "read_error"]
        eligible, units, newcomers = [], [], []
        for j in range(n):
            row = {c: _scalar(batch[c][j]) for c in scalars}
            intervention = by_name.get(row["edit_name"])
            if intervention is None:
                continue
            # Arrow hands a missing string back as None or NaN: only text is a reason
            error = row.get("read_error") if isinstance(row.get("read_error"), str) else None
            if error is None and row["image_id"] not in self.seen:
                self.seen.add(row["image_id"])
                newcomers.append(j)
            reason = error or intervention.eligibility(row, self.age_range)
            if reason is None and "edit_applied" in row and not isinstance(row["edit_applied"], str):
                reason = "edit not applied"  # (results of a cfgen before edit_applied: every edit was applied)
            if reason is not None:
                counts = self.ineligible.setdefault(intervention.name, {})
                key = "unreadable" if error else reason
                counts[key] = counts.get(key, 0) + 1
                if error:
                    log.warning("discovery: %s %s: %s", row["image_id"], intervention.name, error)
                continue
            eligible.append(j)
            units.append(intervention.units(row))
            examples = self.examples.setdefault(intervention.name, [])
            if len(examples) < self.config.examples and row["seed"] == first_seed:
                examples.append({"image_id": str(row["image_id"]), "factual": batch["factual"][j].copy(),
                                 "counterfactual": (batch["factual"][j] + batch["diff"][j]).copy()})
        if newcomers:
            columns = [c for c in numbers if not c.startswith(("d__", "p_after__")) and c not in (
                "edit_name", "edit_applied")]
            self.population_frames.append(pd.DataFrame({c: np.asarray(batch[c])[newcomers] for c in columns}))
        if not eligible:
            return
        idx = np.asarray(eligible)
        frame = pd.DataFrame({c: np.asarray(batch[c])[idx] for c in numbers})
        frame["units"] = units
        self.frames.append(frame)
        names, seeds = frame["edit_name"].to_numpy(), frame["seed"].to_numpy()
        for name in dict.fromkeys(names):
            mine = idx[names == name]
            self.means.setdefault(name, PairedPixelAccumulator(self.shape)).update(
                batch["diff"][mine], batch["factual"][mine])
            first = idx[(names == name) & (seeds == first_seed)]  # the pixel test counts each subject once
            if len(first):
                self.tests.setdefault(name, PairedPixelAccumulator(self.shape)).update(
                    batch["diff"][first], batch["factual"][first])

    def subjects(self) -> pd.DataFrame:
        return subject_table(pd.concat(self.frames, ignore_index=True) if self.frames else pd.DataFrame())

    def population(self) -> pd.DataFrame:
        return pd.concat(self.population_frames, ignore_index=True) if self.population_frames else pd.DataFrame()


def _scalar(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return value


def stream_subjects(job: JobConfig, results_uri: str, interventions: Sequence[Intervention]) -> _Reduction:
    """Read the generation rows of `interventions` once, through `RegionStage` tasks, into a `_Reduction`."""
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
    ds = ds.map_batches(RegionStage, fn_constructor_kwargs={"job": job.model_dump(mode="python")},
                        compute=ray.data.ActorPoolStrategy(size=job.discovery.num_actors), batch_size=64,
                        batch_format="numpy", num_cpus=job.discovery.cpus_per_actor)
    size = job.data.decode.size
    reduction = _Reduction(interventions, job.discovery, tuple(job.edit.age_range), (size, size))
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
    it is flagged (`verdicts`)."""
    regions = region_names(config)
    test_name = "paired-t" if config.test == "t" else "wilcoxon-signed-rank"
    rows, notes = [], []
    for i in interventions:
        mine = subjects[subjects["edit_name"] == i.name] if not subjects.empty else subjects
        n = len(mine)
        if n < config.min_subjects:
            notes.append(f"{i.name}: {n} eligible subjects, fewer than discovery.min_subjects "
                         f"({config.min_subjects}): no test")
        x = attribute_value(i.attribute, population[i.attribute]) if i.attribute in population else None
        for r in regions:
            record: dict[str, Any] = {"intervention": i.name, "attribute": i.attribute, "region": r,
                                      "null_control": i.null_control, "unit": i.unit, "test": test_name}
            if n >= config.min_subjects and f"d__{r}" in mine:
                d = mine[f"d__{r}"].to_numpy(np.float64)
                s = paired_summary(d, alpha=config.alpha, test=config.test, n_boot=config.bootstrap, seed=0,
                                   min_n=config.min_subjects)
                u = mine["units"].to_numpy(np.float64)
                per_unit, scale = _per_unit(d, u)
                record.update(n=s["n"], mean_diff=s["mean"], ci_low=s["ci_low"], ci_high=s["ci_high"],
                              p_value=s["p_value"], effect_size=s["effect_size"], per_unit=per_unit,
                              per_unit_ci_low=_scaled(s["ci_low"], s["ci_high"], scale)[0],
                              per_unit_ci_high=_scaled(s["ci_low"], s["ci_high"], scale)[1], reason=s["reason"])
            else:
                record.update(n=n, mean_diff=np.nan, ci_low=np.nan, ci_high=np.nan, p_value=np.nan,
                              effect_size=np.nan, per_unit=np.nan, per_unit_ci_low=np.nan, per_unit_ci_high=np.nan,
                              reason=f"too few subjects: {n} < {config.min_subjects}")
            obs = _observational(x, population.get(f"f__{r}"), i, config)
            record.update({f"obs_{k}": obs[k] for k in ("slope", "ci_low", "ci_high", "p_value", "n")})
            rows.append(record)
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


def _per_unit(d: np.ndarray, u: np.ndarray) -> tuple[float, float]:
    """The change per unit of the attribute (least squares through the origin, d ~ b u) and, where every subject
    moved by the same units (a binary do() or a fixed shift), the factor that turns the mean's CI into b's."""
    ok = ~np.isnan(d) & ~np.isnan(u)
    d, u = d[ok], u[ok]
    if d.size == 0 or not np.any(u):
        return float("nan"), float("nan")
    b = float(np.sum(d * u) / np.sum(u * u))
    return b, (1.0 / float(u[0])) if np.allclose(u, u[0]) else float("nan")


def _scaled(lo: float, hi: float, scale: float) -> tuple[float, float]:
    if np.isnan(scale):
        return float("nan"), float("nan")
    a, b = lo * scale, hi * scale
    return (min(a, b), max(a, b))


def _observational(x: pd.Series | None, y: pd.Series | None, i: Intervention, config: DiscoveryConfig):
    if x is None or y is None:
        return {"slope": np.nan, "ci_low": np.nan, "ci_high": np.nan, "p_value": np.nan, "n": 0}
    out = ols_slope(x.to_numpy(np.float64), y.to_numpy(np.float64), alpha=config.alpha, min_n=config.min_subjects,
                    per=i.per)
    return {k: out[k] for k in ("slope", "ci_low", "ci_high", "p_value", "n")}


def entanglement_table(subjects: pd.DataFrame, interventions: Sequence[Intervention], correlations: pd.DataFrame,
                       config: DiscoveryConfig) -> pd.DataFrame:
    """For each intervened A and every attribute B the classifier reads: the mean shift of its reading of B under
    do(A), with a CI, next to the correlation of A and B in the training data. Flagged where the shift is not
    expected (B is neither A nor one of `expected_effects[A]`), its CI excludes 0 and it is at least
    `entanglement_min_shift` (probability; years for age, scaled by 50): the model's counterfactuals move B
    although do(A) should not."""
    if subjects.empty:
        return pd.DataFrame()
    heads = sorted(c.removeprefix("p_after__") for c in subjects.columns if c.startswith("p_after__"))
    rows = []
    for i in interventions:
        mine = subjects[subjects["edit_name"] == i.name]
        expected = {i.attribute, *config.expected_effects.get(i.attribute, [])}
        for b in heads:
            shift = (mine[f"p_after__{b}"] - mine[f"p_before__{b}"]).to_numpy(np.float64)
            s = paired_summary(shift, alpha=config.alpha, n_boot=config.bootstrap, seed=0,
                               min_n=config.min_subjects)
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
    """The tables and maps of a finished stream."""
    config = reduction.config
    subjects = reduction.subjects()
    population = reduction.population()
    regions, notes = region_table(subjects, population, reduction.interventions, config)
    maps = {}
    for name, acc in reduction.tests.items():
        test = acc.result(config.alpha)
        mean = reduction.means[name].result(config.alpha)
        maps[name] = {**test, "mean": mean["mean"], "mean_factual": mean.get("mean_factual"), "n": test["n"],
                      "n_rows": mean["n"]}
    eligibility = {}
    for i in reduction.interventions:
        n = int((subjects["edit_name"] == i.name).sum()) if not subjects.empty else 0
        eligibility[i.name] = {"eligible_subjects": n, **reduction.ineligible.get(i.name, {})}
        unreadable = reduction.ineligible.get(i.name, {}).get("unreadable", 0)
        if unreadable:
            notes.append(f"{i.name}: {unreadable} rows could not be read (see the job log)")
    return DiscoveryResult(regions=regions, entanglement=entanglement_table(subjects, reduction.interventions,
                                                                            correlations, config),
                           maps=maps, examples=reduction.examples, eligibility=eligibility, subjects=subjects,
                           notes=notes)


def to_json(result: DiscoveryResult) -> dict[str, Any]:
    """The headline numbers as plain JSON (benchmarks and MLflow)."""
    def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
        return json.loads(frame.to_json(orient="records")) if not frame.empty else []

    return {"regions": records(result.regions), "entanglement": records(result.entanglement),
            "eligibility": result.eligibility, "notes": result.notes}
