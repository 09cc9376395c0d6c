"""The benchmark VAE's fit, variant against variant: held-out L1 (whole image and per structure), SSIM, fit time.

Each variant is the config's `train.vae` section with overrides; it is fitted through `cfgen.train.vae.cached_fit`
on the same images `base_model` fits on, so a variant a config later adopts is already in the VAE cache. Run alone:
the fit time is the figure the 45-minute budget of configs/phantom-bench.yaml is judged by.

    .venv/bin/python bench/bench_vae.py --config configs/phantom-bench.yaml \\
        --variant "" --variant "train.vae.crop=32 train.vae.steps=3200"
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
    parser.add_argument("--config", default=str(ROOT / "configs" / "phantom-bench.yaml"))
    parser.add_argument("--variant", action="append", default=[],
                        help="space-separated section.key=value overrides; '' is the config as it is")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "vae.json"))
    args = parser.parse_args()

    from cfgen.config import load_config
    from cfgen.models.sd import build_tiny_pipeline
    from cfgen.pipeline.runtime import init_ray
    from cfgen.pipeline.workflows import autoencoder_fidelity, run_ingest, vae_cache_uri, vae_fit_images
    from cfgen.train.vae import cached_fit

    rows = []
    for variant in args.variant or [""]:
        job = load_config(args.config, variant.split())
        if not rows:
            init_ray(job.ray)
            decoded = run_ingest(job).decoded_uri
            sample = vae_fit_images(job, decoded)
        started = time.time()
        vae, record = cached_fit(build_tiny_pipeline(job.model, seed=job.train.seed).vae, sample, job.model.tiny,
                                 job.model.resolution, job.train.vae, vae_cache_uri(job), job.storage,
                                 seed=job.train.seed)
        fidelity = autoencoder_fidelity(job, vae, decoded)
        rows.append({"variant": variant or "(config)", "vae": job.train.vae.model_dump(mode="json"),
                     "fit_seconds": record["seconds"], "cached": record["cached"],
                     "wall_seconds": time.time() - started, "heldout_images": fidelity.get("heldout_images"),
                     "ssim": fidelity.get("ssim"), **{f"l1_{k}": v for k, v in fidelity.get("l1", {}).items()}})
        print(json.dumps(rows[-1]), flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=2))
    keys = [k for k in rows[0] if k.startswith("l1_")]
    print("\n| variant | fit s | SSIM | " + " | ".join(keys) + " |")
    print("|---|---|---|" + "---|" * len(keys))
    for r in rows:
        print(f"| {r['variant']} | {r['fit_seconds']:.0f} | {r['ssim']:.3f} | "
              + " | ".join(f"{r[k]:.4f}" for k in keys) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
