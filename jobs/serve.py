"""Entry point: `python jobs/serve.py --config configs/demo.yaml [section.key=value …]` serves the model with Ray Serve
on serve.host:serve.port until interrupted (`serve run cfgen.serve.deployment:app_builder config=…` does the same)."""

import argparse
import sys

from cfgen.config import load_config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    job = load_config(args.config, args.overrides) if args.config else load_config(None, args.overrides)
    from cfgen.pipeline.runtime import init_ray
    from cfgen.serve.deployment import run

    init_ray(job.ray)
    run(job, blocking=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
