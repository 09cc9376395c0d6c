"""The editing engine on phantoms, scored against the truth (issue 16, first part).

For a trained model and its classifier (by default the demo's, `make demo` first), edits the first `--n` test
images with each method variant and each edit, through `cfgen.editing.engine.counterfactuals` (the batch job's
engine), and prints per (variant, edit), over the images whose true attributes the edit changes: UNet evaluations
per counterfactual, error against the true counterfactual, the do-nothing error and their ratio, the median
effect ratio, the null edit's SSIM, the classifier's flip rate, images/s. Writes bench/results/edit.json.

    .venv/bin/python bench/bench_edit.py                       # the demo's model, 64 test images
    .venv/bin/python bench/bench_edit.py --n 16 --steps 10     # quicker
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EDITS = [{"support_devices": 0}, {"pleural_effusion": 1}, {"smoking": 1}, {"cardiomegaly": 1}]
#: (name, engine settings); compositing and confinement are switches, measured, not assumed
VARIANTS = [
    ("ddim raw", dict(method="ddim", composite=False)),
    ("ddim composite", dict(method="ddim", composite=True)),
    ("ddim composite + lung mask", dict(method="ddim", composite=True, confine=True)),
    ("sdedit 0.5 composite", dict(method="sdedit", strength=0.5, composite=True)),
    ("sdedit 0.8 composite", dict(method="sdedit", strength=0.8, composite=True)),
]


def load_test_rows(decoded_uri: str, n: int):
    import pyarrow.dataset as pds
    import ray.data  # noqa: F401 - registers Ray's tensor type, which the decoded shards' image column uses

    from cfgen.pipeline.data import tensor_column

    table = pds.dataset(decoded_uri, format="parquet").to_table(
        filter=(pds.field("status") == "ok") & (pds.field("split") == "test"))
    table = table.sort_by("image_id").slice(0, n)
    return table.drop_columns(["image"]).to_pylist(), tensor_column(table, "image")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--run", default=str(ROOT / "runs" / "demo"), help="output folder of a finished demo")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--model", help="diffusers folder to edit with (default: <run>/models/finetuned)")
    parser.add_argument("--variants", nargs="*", help="names of VARIANTS to run (default: all)")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "edit.json"))
    args = parser.parse_args()

    import torch

    from cfgen.classify.store import load_classifier
    from cfgen.config import PhantomConfig, load_config
    from cfgen.editing.engine import counterfactuals
    from cfgen.io.preprocess import read_mask
    from cfgen.io.prompts import counterfactual_prompt
    from cfgen.metrics.effectiveness import row_scores, summarize_scores, target_value
    from cfgen.metrics.image import as_unit_float, effect_ratio, l1, ssim
    from cfgen.models.sd import load_pipeline
    from cfgen.phantoms.scm import PhantomSCM
    from cfgen.phantoms.truth import true_counterfactual
    from cfgen.pipeline.generate import edit_seed

    torch.set_num_threads(2)
    job = load_config(args.config, [f"output_uri={args.run}"])
    run = Path(args.run)
    pipe = load_pipeline(args.model or str(run / "models" / "finetuned"))
    classifier = load_classifier(str(run / "models" / "classifier"))
    scm = PhantomSCM(PhantomConfig.model_validate_json((run / "phantoms" / "phantom_config.json").read_text()))
    rows, images = load_test_rows(str(run / "ingest" / "decoded"), args.n)
    masks = np.stack([read_mask(r["mask_uri"], job.data.decode) for r in rows]).astype(np.float32)
    factual_prompts = [r["prompt"] for r in rows]
    cf_prompts = [[counterfactual_prompt(r, e, job.data.prompt) for r in rows] for e in EDITS]
    seeds = [edit_seed(r["image_id"], 0) for r in rows]
    truths = [np.stack([as_unit_float(true_counterfactual(scm, r["phantom_index"], e, job.data.decode))
                        for r in rows]) for e in EDITS]
    before = classifier.predict(images)
    x = as_unit_float(images)

    results = []
    for name, settings in VARIANTS:
        if args.variants and name not in args.variants:
            continue
        confine = settings.pop("confine", False)
        outs, nulls, started, forward, backward = [[] for _ in EDITS], [], time.perf_counter(), 0.0, 0.0
        for s in range(0, len(rows), args.batch):
            sl = slice(s, s + args.batch)
            res = counterfactuals(pipe, images[sl], factual_prompts[sl], [p[sl] for p in cf_prompts],
                                  num_inference_steps=args.steps, masks=masks[sl] if confine else None,
                                  seeds=seeds[sl], **settings)
            for k, cf in enumerate(res.counterfactuals):
                outs[k].append(cf)
            nulls.append(res.null_edit)
            forward += res.unet_forward * len(images[sl])
            backward += res.unet_backward * len(images[sl])
        seconds = time.perf_counter() - started
        null = np.concatenate(nulls)
        null_ssim = float(np.mean([ssim(x[i], null[i]) for i in range(len(x))]))
        for k, edit in enumerate(EDITS):
            cf, truth = np.concatenate(outs[k]), truths[k]
            (attr, value), = edit.items()
            state = np.array([target_value(attr, scm.subject(r["phantom_index"]).attributes()[attr]) for r in rows])
            changes = state != target_value(attr, value)
            idx = np.flatnonzero(changes)
            cf_err = float(np.mean([l1(cf[i], truth[i]) for i in idx]))
            id_err = float(np.mean([l1(x[i], truth[i]) for i in idx]))
            effects = [effect_ratio(x[i], cf[i], truth[i]) for i in idx]
            scores = summarize_scores(row_scores(before, classifier.predict(cf), edit, state))
            results.append({
                "method": name, "edit": f"{attr}={value}", "n": int(len(idx)),
                "unet_forward": forward / len(rows), "unet_backward": backward / len(rows),
                "cf_error": cf_err, "identity_error": id_err, "error_ratio": cf_err / id_err,
                "effect_ratio": float(np.nanmedian(effects)), "null_ssim": null_ssim,
                "flip_rate": scores["flip_rate"], "max_off_target_shift": scores["max_off_target_shift"],
                "images_per_s": len(rows) * len(EDITS) / seconds, "steps": args.steps,
            })
        settings["confine"] = confine
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"run": args.run, "model": args.model, "n_images": len(rows),
                                           "steps": args.steps,
                                           "rows": results}, indent=2))
    print("| method | edit | n | UNet fwd/cf | cf error | do-nothing | ratio | median effect | null SSIM | "
          "flip rate | off-target | cf/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['method']} | {r['edit']} | {r['n']} | {r['unet_forward']:.0f} | {r['cf_error']:.4f} | "
              f"{r['identity_error']:.4f} | {r['error_ratio']:.2f} | {r['effect_ratio']:.2f} | {r['null_ssim']:.3f} | "
              f"{r['flip_rate']:.2f} | {r['max_off_target_shift']:.2f} | {r['images_per_s']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
