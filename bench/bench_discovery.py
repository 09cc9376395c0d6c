"""Discovery on the phantom benchmark, scored against the truth the renderer planted.

For each config (a phantom data set and its trained model), runs `cfgen discover` (`cfgen.pipeline.discover`,
as the job does; generation is reused where already written) and then, for the same subjects, the same region
statistics on the *true* counterfactuals the SCM renders. A region's truth is "planted" where the true paired CI
excludes 0; the benchmark reports, per (intervention, region): the estimate, its CI and p-value, whether it was
flagged, the planted size, and whether the CI covers it. Nothing here is told which effect was planted: a data set
with other planted effects is scored the same way.

The planted size is the direct effect: the truth holds every attribute the intervention does not set, as the edited
prompt does (`cfgen.phantoms.truth.held_intervention`). Where the intervened attribute causes others (age and sex in
the phantoms), the total effect, its descendants recomputed, is printed beside it and not scored: an edit that
keeps the rest of the prompt does not estimate it.

Checks printed PASS/MISS (issue 17):
- every planted effect of a non-control intervention inside the lungs is recovered: right sign, the 95% CI covers
  the planted size, p < 0.01; and no region is flagged for it where the truth did not change, or changed the
  other way (the issue's "no zone outside the lungs flagged", for effects that leave the rest of the image alone);
- no region of a null control is flagged;
- the entanglement flag of do(pleural_effusion=1) on support_devices: set on a confounded data set (phantoms'
  `confounding` > 0), clear on an unconfounded one.

Writes `--json` (bench/results/discovery.json).

    .venv/bin/python bench/bench_discovery.py --configs configs/phantom-bench.yaml configs/phantom-bench-null.yaml \
        --set edit.guidance_scale=3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LUNG_REGIONS = ("lungs", "right_lung", "left_lung")


def true_region_differences(job, subjects: pd.DataFrame) -> pd.DataFrame:
    """Per (intervention, subject): the true counterfactual minus the factual, meaned in each region (the same
    regions, from the same lung mask, as the analysis used). `d__` columns: the direct effect, every attribute the
    intervention does not set held (what a prompt edit asks for, `cfgen.phantoms.truth.held_intervention`); `t__`
    columns: the total effect, the intervention's descendants recomputed by the SCM (differs for age and sex)."""
    from cfgen.discovery.analysis import region_names
    from cfgen.discovery.regions import region_masks, region_means
    from cfgen.phantoms.scm import PhantomSCM
    from cfgen.phantoms.truth import true_counterfactual
    from cfgen.pipeline.workflows import phantom_config_for

    scm = PhantomSCM(phantom_config_for(job))
    names = region_names(job.discovery)
    scale = 255.0 if job.data.decode.dtype == "uint8" else 65535.0
    rows = []
    for _, s in subjects.iterrows():
        index = int(s["phantom_index"])
        edit = json.loads(s["edit_applied"])
        factual = true_counterfactual(scm, index, {}, job.data.decode) / scale
        _, lungs = scm.render(scm.subject(index), job.data.decode.size)
        masks = region_masks({"lungs": lungs}, factual.shape)
        row = {"edit_name": s["edit_name"], "image_id": s["image_id"]}
        for prefix, effect in (("d", "direct"), ("t", "total")):
            truth = true_counterfactual(scm, index, edit, job.data.decode, effect=effect) / scale
            means = region_means(truth - factual, masks)
            row.update({f"{prefix}__{r}": means.get(r, np.nan) for r in names})
        rows.append(row)
    return pd.DataFrame(rows)


def score(job, out: dict[str, Any]) -> dict[str, Any]:
    from cfgen.discovery.analysis import region_names
    from cfgen.discovery.stats import paired_summary

    folder = Path(out["regions_uri"]).parent
    regions = pd.read_parquet(out["regions_uri"])
    subjects = pd.read_parquet(folder / "subjects.parquet")
    entanglement = pd.read_parquet(folder / "entanglement.parquet")
    truth = true_region_differences(job, subjects)
    d = job.discovery
    rows = []
    for _, r in regions.iterrows():
        mine = truth[truth["edit_name"] == r["intervention"]]
        t = mine[f"d__{r['region']}"].to_numpy(np.float64)
        s = paired_summary(t, alpha=d.alpha, n_boot=d.bootstrap, min_n=d.min_subjects) if len(t) else None
        total = float(mine[f"t__{r['region']}"].mean()) if len(mine) else np.nan
        planted = bool(s and (s["ci_low"] > 0 or s["ci_high"] < 0) and abs(s["mean"]) > 1e-4)
        rows.append({"intervention": r["intervention"], "region": r["region"], "null_control": bool(r["null_control"]),
                     "n": int(r["n"]), "estimate": r["mean_diff"], "ci_low": r["ci_low"], "ci_high": r["ci_high"],
                     "p_value": r["p_value"], "q_value": r["q_value"], "significant": bool(r["significant"]),
                     "flagged": bool(r["flagged"]), "min_effect": float(r["min_effect"]),
                     "planted_size": s["mean"] if s else np.nan, "planted": planted, "total_effect": total,
                     "covers_planted": bool(r["ci_low"] <= s["mean"] <= r["ci_high"]) if s else False,
                     "effect_ratio": r["mean_diff"] / s["mean"] if s and planted else np.nan})
    table = pd.DataFrame(rows)
    from cfgen.pipeline.workflows import phantom_config_for

    confounding = phantom_config_for(job).confounding
    return {"regions": json.loads(table.to_json(orient="records")),
            "checks": checks_for(table, entanglement, confounding),
            "entanglement": json.loads(entanglement.to_json(orient="records")), "confounding": confounding,
            "eligibility": out["eligibility"], "notes": out["notes"], "report": out["report"]}


def checks_for(table: pd.DataFrame, entanglement: pd.DataFrame, confounding: float) -> list[dict[str, Any]]:
    """The issue's PASS/MISS checks on a scored region table and the entanglement table."""
    checks = []
    lungs = table["region"].isin(LUNG_REGIONS)
    for _, r in table[table["planted"] & lungs & ~table["null_control"]].iterrows():
        ok = bool(np.sign(r["estimate"]) == np.sign(r["planted_size"]) and r["covers_planted"] and r["p_value"] < 0.01)
        checks.append({"check": f"{r['intervention']} in {r['region']}: sign, CI covers {r['planted_size']:.4f}, "
                                f"p < 0.01", "value": f"{r['estimate']:.4f} [{r['ci_low']:.4f}, {r['ci_high']:.4f}] "
                                                      f"p {r['p_value']:.1e}", "pass": ok})
    for name in table.loc[table["planted"] & lungs & ~table["null_control"], "intervention"].unique():
        # a flag where the truth changed nothing, or with the truth's sign reversed, is a false finding; a planted
        # change outside the lungs (sex moves the body's outline) may be flagged with its sign
        mine = table[(table["intervention"] == name) & table["flagged"]]
        false = mine[~mine["planted"] | (np.sign(mine["estimate"]) != np.sign(mine["planted_size"]))]
        checks.append({"check": f"{name}: no region flagged where the truth did not change that way",
                       "value": ", ".join(false["region"]) or "none", "pass": false.empty})
    for name in table.loc[table["null_control"], "intervention"].unique():
        mine = table[table["intervention"] == name]
        checks.append({"check": f"null control {name}: no region flagged",
                       "value": ", ".join(mine.loc[mine["flagged"], "region"]) or "none", "pass": not mine["flagged"].any()})
    ent = entanglement[(entanglement["intervened"] == "pleural_effusion=1") & (entanglement["other"] == "support_devices")]
    if len(ent):
        e = ent.iloc[0]
        want = confounding > 0
        checks.append({"check": f"entanglement pleural_effusion=1 -> support_devices {'flagged' if want else 'clear'} "
                                f"(confounding {confounding:g})",
                       "value": f"shift {e['mean_shift']:+.3f} [{e['ci_low']:+.3f}, {e['ci_high']:+.3f}], flagged "
                                f"{bool(e['flagged'])}", "pass": bool(e["flagged"]) == want})
    return checks


def rescore(block: dict[str, Any], alpha: float, min_effect: float) -> dict[str, Any]:
    """A stored result judged again with another minimum effect: the same estimates, CIs and p-values (nothing is
    regenerated), the verdicts of `cfgen.discovery.analysis.verdicts`, the checks again."""
    from cfgen.discovery.analysis import verdicts
    from cfgen.discovery.stats import benjamini_hochberg

    table = pd.DataFrame(block["regions"])
    table["q_value"] = benjamini_hochberg(table["p_value"].to_numpy(np.float64), alpha)[1]
    table = verdicts(table, alpha, min_effect)
    entanglement = pd.DataFrame(block["entanglement"])
    return {**block, "regions": json.loads(table.to_json(orient="records")),
            "checks": checks_for(table, entanglement, block["confounding"]),
            "rescored": {"min_effect": min_effect, "alpha": alpha,
                         "from": "the estimates, CIs and p-values stored by an earlier run"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=[str(ROOT / "configs" / "phantom-bench.yaml")])
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "discovery.json"))
    parser.add_argument("--set", nargs="*", default=[], help="section.key=value overrides for every config")
    parser.add_argument("--rescore", help="judge a stored discovery.json again (with --min-effect) instead of running")
    parser.add_argument("--min-effect", type=float, help="discovery.min_effect for --rescore")
    args = parser.parse_args()
    if args.rescore:
        from cfgen.config import DiscoveryConfig

        blocks = json.loads(Path(args.rescore).read_text())
        margin = DiscoveryConfig().min_effect if args.min_effect is None else args.min_effect
        results = [rescore(b, DiscoveryConfig().alpha, margin) for b in blocks]
        for b in results:
            print_block(b)
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
        print(f"\nwrote {args.json}")
        return

    from cfgen.config import load_config
    from cfgen.pipeline.discover import run_discover
    from cfgen.pipeline.runtime import init_ray
    from cfgen.pipeline.outputs import with_output_models, with_output_phantoms

    results = []
    for path in args.configs:
        job = with_output_models(with_output_phantoms(load_config(path, args.set)))  # as `cfgen discover` does
        init_ray(job.ray)
        started = time.time()
        out = run_discover(job)
        scored = score(job, out)
        edit = job.discovery_edit()
        scored.update(config=path, overrides=args.set, seconds=round(time.time() - started, 1),
                      method=edit.method, steps=edit.num_inference_steps, guidance=edit.guidance_scale,
                      edit_guidance=edit.edit_guidance)
        results.append(scored)
        print_block(scored)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    print(f"\nwrote {args.json}")


def print_block(scored: dict[str, Any]) -> None:
    margin = scored["regions"][0].get("min_effect") if scored["regions"] else None
    print(f"\n## {scored['config']} (confounding {scored['confounding']:g}; {scored['seconds']:.0f} s; "
          f"minimum effect {margin}; report {scored['report']})\n")
    print("| intervention | region | n | estimate | 95% CI | p | significant | flagged | planted size | covers "
          "| ratio | total effect |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in scored["regions"]:
        ratio = r["effect_ratio"]
        ratio = "-" if ratio is None or np.isnan(ratio) else f"{ratio:.2f}"
        control = " (null control)" if r["null_control"] else ""
        planted = " (planted)" if r["planted"] else ""
        print(f"| {r['intervention']}{control} | {r['region']} | {r['n']} | {r['estimate']:.4f} "
              f"| [{r['ci_low']:.4f}, {r['ci_high']:.4f}] | {r['p_value']:.1e} "
              f"| {'-' if r.get('significant') is None else ('yes' if r['significant'] else 'no')} "
              f"| {'yes' if r['flagged'] else 'no'} "
              f"| {r['planted_size']:.4f}{planted} | {'yes' if r['covers_planted'] else 'no'} | {ratio} "
              f"| {'-' if r.get('total_effect') is None else format(r['total_effect'], '.4f')} |")
    print("\n| check | value | result |\n|---|---|---|")
    for c in scored["checks"]:
        print(f"| {c['check']} | {c['value']} | {'PASS' if c['pass'] else 'MISS'} |")


if __name__ == "__main__":
    main()
