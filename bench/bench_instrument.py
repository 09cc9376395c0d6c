"""The measuring instrument, checked where the truth is known (issue 15).

phantoms -> ingest -> attribute classifier (Ray Train, DDP) -> calibration on validate -> held-out AUROC with
bootstrap CIs -> the calibration table: true / do-nothing / other-subject counterfactuals for each edit, scored by
the same functions the generation job uses. Writes bench/results/instrument.json and prints markdown tables.

    .venv/bin/python bench/bench_instrument.py                       # configs/instrument-bench.yaml
    .venv/bin/python bench/bench_instrument.py phantoms.n=1000 classifier.train.epochs=3   # a quick smoke run

It asserts nothing: it prints what the instrument reads, and the list of acceptance misses (exit code 0 either way).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "instrument-bench.yaml"))
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "instrument.json"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from cfgen.config import load_config
    from cfgen.pipeline.classify import run_classify
    from cfgen.pipeline.ingest import ingest
    from cfgen.pipeline.instrument import check_calibration, phantom_calibration
    from cfgen.pipeline.runtime import init_ray
    from cfgen.pipeline.workflows import run_phantoms

    started = time.time()
    job = load_config(args.config, args.overrides)
    init_ray(job.ray)
    phantoms = run_phantoms(job)
    job.data.manifest_uri = phantoms["manifest_parquet"]
    ingested = ingest(job)
    classified = run_classify(job, ingested.decoded_uri)
    rows = phantom_calibration(job, classified["classifier_uri"], ingested.decoded_uri)
    problems = check_calibration(rows)
    evaluation = classified["evaluation"]
    auroc = {a: v["auroc"] for a, v in evaluation["attributes"].items() if "auroc" in v}
    result = {
        "config": str(Path(args.config).relative_to(ROOT)) if Path(args.config).is_relative_to(ROOT) else args.config,
        "overrides": args.overrides,
        "auroc": auroc,
        "auroc_ci": {a: [v["auroc_ci_low"], v["auroc_ci_high"]] for a, v in evaluation["attributes"].items()
                     if "auroc" in v},
        "age_mae_years": evaluation["attributes"].get("age", {}).get("mae_years"),
        "classifier": {k: evaluation[k] for k in ("n_train", "n_validate", "n_test", "train_seconds",
                                                  "architecture", "feature_dim", "calibration")},
        "calibration": rows,
        "acceptance_misses": problems,
        "wall_seconds": time.time() - started,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2, default=float))
    print(markdown(result))
    return 0


def markdown(result: dict) -> str:
    lines = ["| attribute | AUROC | 95% CI |", "|---|---|---|"]
    for a, v in result["auroc"].items():
        lo, hi = result["auroc_ci"][a]
        lines.append(f"| {a} | {v:.3f} | {lo:.3f}-{hi:.3f} |")
    if result["age_mae_years"] is not None:
        lines.append(f"| age (MAE, years) | {result['age_mae_years']:.1f} | |")
    lines += ["", "| set | edit | n | flip rate | mean shift to target | max off-target shift (attribute) | "
              "L1 outside region | SSIM to input | L1 to truth | realism FD | real-vs-real FD (n) |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["calibration"]:
        lines.append(
            f"| {r['set']} | {r['edit']} | {r['n']} | {r['flip_rate']:.3f} | {r['mean_target_shift']:+.3f} | "
            f"{r['max_off_target_shift']:.3f} ({r['off_target_attribute']}) | {r['l1_outside_region']:.4f} | "
            f"{r['ssim_to_input']:.3f} | {r['l1_to_truth']:.4f} | {r['realism_distance']:.2f} | "
            f"{r['realism_real_baseline']:.2f} ({r['realism_n']}) |")
    lines += ["", "acceptance misses: " + ("; ".join(result["acceptance_misses"]) or "none"),
              f"wall time {result['wall_seconds']:.0f} s"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
