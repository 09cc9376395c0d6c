"""`cfgen` on the command line: one subcommand per job, each a config file plus `section.key=value` overrides.

    cfgen demo --config configs/demo.yaml
    cfgen phantoms --n 1000 --out s3://bucket/phantoms --size 128 --seed 1
    cfgen classify --config configs/demo.yaml
    cfgen generate --config configs/demo.yaml model.pretrained=models:/cfgen-sd@champion
    cfgen discover --config configs/phantom-bench-v2.yaml
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from cfgen.config import JobConfig, load_config

COMMANDS = ("demo", "phantoms", "ingest", "train", "classify", "generate", "discover")
#: the commands that run Ray Train, and so want the dashboard's state API (`RayConfig.dashboard`; the demo asks itself)
TRAINING_COMMANDS = ("train", "classify")
#: jobs that edit: they use the model and classifier an earlier job trained into the output, where none is named
EDITING_COMMANDS = ("generate", "discover")


def parse_args(argv: list[str] | None = None) -> tuple[str, JobConfig]:
    parser = argparse.ArgumentParser(prog="cfgen", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        p = sub.add_parser(name, help=f"run the {name} job")
        p.add_argument("--config", help="YAML config (see configs/); defaults apply when omitted")
        p.add_argument("--output", help="shortcut for output_uri=…")
        p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.max_steps=50")
        if name == "phantoms":
            p.add_argument("--n", type=int, help="number of phantom subjects")
            p.add_argument("--out", help="where to write (local folder or s3://bucket/prefix)")
            p.add_argument("--size", type=int, help="image size in pixels (64..512)")
            p.add_argument("--seed", type=int, help="population seed")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.output:
        overrides.append(f"output_uri={args.output}")
    for flag in ("n", "size", "seed"):
        if getattr(args, flag, None) is not None:
            overrides.append(f"phantoms.{flag}={getattr(args, flag)}")
    job = load_config(args.config, overrides)
    if getattr(args, "out", None):
        job = job.model_copy(update={"output_uri": args.out})
    return args.command, job


def run(command: str, job: JobConfig) -> dict[str, Any]:
    """Run one job; `jobs/*.py` call this too, so every entry point runs the same code."""
    from cfgen.pipeline import outputs, workflows
    from cfgen.pipeline.runtime import init_ray

    if command == "demo":
        return workflows.run_demo(job)
    init_ray(job.ray, use_gpu=job.train.use_gpu, trains=command in TRAINING_COMMANDS)
    if command == "phantoms":
        return workflows.run_phantoms(job, out_uri=job.output_uri)
    # what an earlier job left in this output (a demo's phantoms, model and classifier), where the config names none
    job = outputs.with_output_phantoms(job)
    if command in EDITING_COMMANDS:
        job = outputs.with_output_models(job)
    if command == "ingest":
        return vars(workflows.run_ingest(job))
    if command == "train":
        return workflows.run_train(job)
    if command == "classify":
        from cfgen.pipeline.classify import run_classify

        return run_classify(job)
    if command == "generate":
        return vars(workflows.run_generate(job))
    if command == "discover":
        from cfgen.pipeline.discover import run_discover

        return run_discover(job)
    raise ValueError(f"unknown command {command!r}; one of {COMMANDS}")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    command, job = parse_args(argv)
    result = run(command, job)
    print(json.dumps(result, indent=2, default=str))
    if command == "demo":
        print(f"\nreport: {result['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
