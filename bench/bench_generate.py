"""The generation job on Ray Data against a plain single-process loop doing the same work, and a long run's memory.

Part 1 (throughput): the same phantoms (`--n`, 500), the same tiny model and edits, the same stage code
(`FusedStage`: `CounterfactualStage` -> `MeasureStage` -> `CommitStage`, called as a plain function by the loop, one
torch thread), side by side in this run: counterfactuals/s of `cfgen.pipeline.generate.generate` on a local Ray with
1 and with 2 CPUs (one editing actor per CPU, one torch thread each) over the loop's, for each stage layout
(`edit.stages`: fused, the CPU default, and separate, the GPU one). Targets: >= 0.9x on 1 CPU, >= 1.6x on 2.
Each party runs pinned to its cores (the loop and the 1-CPU Ray run to one core: Ray's own processes included).
No party carries an instrument in its timed run unless `--account` asks for the CPU seconds of every process by
role (a sampler thread in the Ray parties, ~1.5% of a core).

Part 2 (scale, `--keys`, 20,000): one run of `generate` over a plan of that many keys (images x edits x seeds),
sampling every second the RSS of the driver and of every Ray worker and the object store in use; the run must end
with planned = done + failed and memory flat after warm-up (the last half's peak within 10% of the first half's).
Plot in `bench/results/generate_memory.png`.

Each Ray run is a fresh local Ray in a subprocess of this script (`--worker`), so no state carries over.

    .venv/bin/python bench/bench_generate.py                          # 500 phantoms at 1 and 2 CPUs, 20,000 keys
    .venv/bin/python bench/bench_generate.py --n 60 --keys 400        # smoke run (about 2 minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
EDITS = [{"support_devices": 0}, {"smoking": 1}]


def job_config(work: Path, n: int, out: str, cpus: float, actors: int, seeds: list[int], steps: int,
               batch: int, stages: str = "auto") -> dict:
    return {
        "output_uri": str(work / out),
        "phantoms": {"n": n, "size": 64, "seed": 11, "formats": ["dicom"], "split_fractions": {"test": 1.0}},
        "data": {"manifest_uri": str(work / f"ph-{n}" / "manifest.parquet"), "decode": {"size": 64}},
        "model": {"pretrained": str(work / "sd")},
        "edit": {"method": "ddpm", "num_inference_steps": steps, "batch_size": batch, "num_actors": actors,
                 "cpus_per_actor": 1.0, "stages": stages, "plan": [{"name": "bench", "edits": EDITS, "seeds": seeds}],
                 "output": {"panels": False, "progress_every_s": 30}},
        "metrics": {"enabled": False, "cpus_per_actor": 0.25},
        "tracking": {"tracking_uri": f"sqlite:///{work}/mlflow.db"},
        "ray": {"num_cpus": cpus},
    }


def prepare(work: Path, n: int) -> str:
    """Phantoms, their ingest and a tiny model, once per --work folder; returns the decoded URI."""
    from cfgen.config import JobConfig, ModelConfig
    from cfgen.models.sd import build_tiny_pipeline, save_pipeline
    from cfgen.pipeline.ingest import ingest
    from cfgen.pipeline.runtime import init_ray
    from cfgen.pipeline.workflows import run_phantoms

    job = JobConfig.model_validate(job_config(work, n, f"ingest-{n}", 2, 1, [0], 2, 16))
    if not (work / "sd" / "model_index.json").exists():
        save_pipeline(build_tiny_pipeline(ModelConfig(), seed=0), str(work / "sd"))
    init_ray(job.ray)
    run_phantoms(job, str(work / f"ph-{n}"))
    decoded = ingest(job).decoded_uri
    import ray

    ray.shutdown()
    return decoded


def plain_loop(work: Path, n: int, decoded: str, steps: int, batch: int) -> dict:
    """The stages as plain functions in this process, one torch thread: the baseline. Its clock starts where the
    Ray run's does (after the runtime is up): reading the rows, importing the engine and loading the model count
    for both."""
    started = time.perf_counter()
    import shutil

    import pyarrow.dataset as pds
    import ray.data.extensions  # noqa: F401 - registers Ray's tensor type, so the images keep their shape
    import torch

    from cfgen.config import JobConfig
    from cfgen.pipeline.generate import FusedStage, stage_arguments
    from cfgen.pipeline.plan import batch_units, model_version

    torch.set_num_threads(1)
    out = work / "loop"
    shutil.rmtree(out, ignore_errors=True)
    job = JobConfig.model_validate(job_config(work, n, "loop", 1, 1, [0], steps, batch))
    table = pds.dataset(decoded, format="parquet").to_table(
        columns=[c for c in pds.dataset(decoded, format="parquet").schema.names
                 if c not in ("provenance", "error_stage", "error_reason") and not c.startswith("__")])
    import pyarrow.compute as pc

    table = table.filter(pc.equal(table["status"], "ok"))
    version = model_version(str(work / "sd"), job)
    units = batch_units(job, table.drop_columns(["image"]).to_pandas(), version)
    # edit -> measure -> commit: the classes, in the order and with the arguments, of the Ray job's actors
    stage = FusedStage(**stage_arguments(job, str(work / "sd"), str(out / "generate"), units, version))
    done = failed = 0
    for start in range(0, table.num_rows, batch):
        committed = stage(table.slice(start, batch))
        bad = int(sum(committed["failed"].to_pylist()))
        done, failed = done + committed.num_rows - bad, failed + bad
    seconds = time.perf_counter() - started
    if failed:  # a baseline that fails is fast for the wrong reason
        raise RuntimeError(f"the plain loop failed on {failed} keys: see {out / 'generate' / 'failures'}")
    return {"party": "plain loop", "cpus": 1, "counterfactuals": done, "seconds": seconds,
            "cf_per_s": done / seconds, **steady_rate(out / "generate" / "results")}


class Sampler:
    """Once a second: RSS of the driver and of every Ray worker process, the object store's bytes in use (the
    plasma store's own count, as `ray memory --stats-only` reads it; Ray's `object_store_memory` resource is a
    scheduling quantity that objects do not use up), and each process's CPU time, summed by role at the end."""

    def __init__(self):
        self.samples: list[dict] = []
        self.cpu: dict[int, tuple[str, float]] = {}  # pid -> (role, CPU seconds last seen)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def role(cmd: str) -> str:
        if "ray::" in cmd:
            name = cmd.split("ray::", 1)[1].split()[0]
            return name.split("(")[-1].rstrip(")") if "MapBatches(" in name else name
        for known in ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py", "default_worker.py"):
            if known in cmd:
                return known
        return cmd.split()[0].rsplit("/", 1)[-1] if cmd else "?"

    def cpu_by_role(self) -> dict[str, float]:
        roles: dict[str, float] = {}
        for role, seconds in self.cpu.values():
            roles[role] = round(roles.get(role, 0.0) + seconds, 1)
        return dict(sorted(roles.items(), key=lambda kv: -kv[1]))

    def _store_used(self):
        import ray
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        state = get_state_from_address(ray.get_runtime_context().gcs_address)
        return int(get_memory_info_reply(state).store_stats.object_store_bytes_used)

    def _run(self):
        import psutil

        me = psutil.Process()
        start = time.perf_counter()
        while not self._stop.is_set():
            workers = 0
            for p in psutil.process_iter(["cmdline", "memory_info", "cpu_times"]):
                try:
                    cmd = " ".join(p.info["cmdline"] or [])
                    worker = "ray::" in cmd or "default_worker.py" in cmd
                    if p.pid == me.pid:
                        self.cpu[p.pid] = ("driver", sum(p.info["cpu_times"][:2]))
                    elif worker or "/ray/" in cmd:  # Ray's workers, and its daemons for the CPU account
                        workers += p.info["memory_info"].rss if worker else 0
                        self.cpu[p.pid] = (self.role(cmd), sum(p.info["cpu_times"][:2]))
                except (psutil.NoSuchProcess, TypeError):
                    continue
            store = None
            try:
                store = self._store_used()
            except Exception:  # noqa: BLE001 - between runs, or an internal API that moved: no figure
                pass
            self.samples.append({"t": time.perf_counter() - start, "driver_rss": me.memory_info().rss,
                                 "workers_rss": workers, "object_store_used": store})
            self._stop.wait(1.0)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)


def ray_run(work: Path, n: int, decoded: str, cpus: int, steps: int, batch: int, seeds: list[int],
            label: str, sample: bool, stages: str, account: bool = False) -> dict:
    """`generate` on a fresh local Ray with `cpus` CPUs (one editing actor each), the stages `stages`."""
    import shutil

    from cfgen.config import JobConfig
    from cfgen.pipeline.generate import generate
    from cfgen.pipeline.runtime import init_ray

    out = work / label
    shutil.rmtree(out, ignore_errors=True)
    # logical CPUs beyond the editing actors' for the read, measure and commit stages: the physical budget is the
    # process affinity this measurement runs under (`measure`), which every Ray process started from here inherits
    job = JobConfig.model_validate(job_config(work, n, label, cpus + 2, cpus, seeds, steps, batch, stages))
    os.environ["OMP_NUM_THREADS"] = "1"
    init_ray(job.ray)
    started = time.perf_counter()
    # the sampler costs ~1.5% of a core (0.45 s of CPU in 30 s, measured), and the loop runs without one: so a
    # throughput party samples only when asked (`--account`, for its CPU by role), the long run always
    sampler = Sampler() if sample or account else None
    if sampler:
        sampler.__enter__()
    try:
        result = generate(job, str(work / "sd"), decoded, splits=None)
    finally:
        if sampler:
            sampler.__exit__()
    seconds = time.perf_counter() - started
    if result.failed or result.done != result.planned:
        raise RuntimeError(f"the Ray run ended with {result.done} of {result.planned} keys done, "
                           f"{result.failed} failed: see {out / 'generate' / 'failures'}")
    row = {"party": f"Ray Data, {cpus} CPU, {stages}", "cpus": cpus, "stages": stages,
           "counterfactuals": result.done, "seconds": seconds,
           "cf_per_s": result.done / seconds, "planned": result.planned, "done": result.done,
           "failed": result.failed, "summary_seconds": (result.summary or {}).get("seconds"),
           **steady_rate(out / "generate" / "results")}
    if sampler:
        row["cpu_seconds_by_role"] = sampler.cpu_by_role()
    if sample:
        row["samples"] = sampler.samples
    return row


def steady_rate(results_dir: Path) -> dict:
    """Counterfactuals/s after the first fifth of the committed parts (models loaded, actors up), from the parts'
    commit times: the rate a long job settles at, beside the end-to-end rate that includes start-up."""
    import pyarrow.parquet as pq

    parts = sorted((p.stat().st_mtime, pq.read_metadata(p).num_rows) for p in results_dir.glob("*.parquet"))
    if len(parts) < 5:
        return {"parts": len(parts), "steady_cf_per_s": None}
    first = len(parts) // 5  # past the first fifth: parallel actors commit their first parts together
    rows = sum(n for _, n in parts[first + 1:])
    return {"parts": len(parts), "steady_cf_per_s": rows / max(parts[-1][0] - parts[first][0], 1e-9)}


def flat_after_warmup(samples: list[dict], key: str) -> dict:
    values = [s[key] for s in samples if s.get(key) is not None]
    if len(values) < 8:
        return {"peak": max(values, default=0), "flat": None}
    warm = values[len(values) // 5:]  # the first fifth is warm-up: models loading, the first blocks
    half = len(warm) // 2
    first, last = max(warm[:half]), max(warm[half:])
    return {"peak": max(values), "first_half_peak": first, "last_half_peak": last,
            "flat": bool(last <= 1.10 * first)}


def plot(samples: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t"] for s in samples]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(t, [s["driver_rss"] / 2**20 for s in samples], label="driver RSS")
    ax.plot(t, [s["workers_rss"] / 2**20 for s in samples], label="Ray workers RSS (sum)")
    ax.plot(t, [(s["object_store_used"] or 0) / 2**20 for s in samples], label="object store in use")
    ax.set_xlabel("seconds")
    ax.set_ylabel("MiB")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("cfgen generate: memory over a long run")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def worker(args) -> None:
    """One measurement, in this fresh process; prints its JSON row last."""
    work = Path(args.work)
    decoded = str(work / f"ingest-{args.n}" / "ingest" / "decoded")
    if args.worker == "loop":
        row = plain_loop(work, args.n, decoded, args.steps, args.batch)
    else:
        cpus = int(args.worker)
        seeds = list(range(args.seeds))
        row = ray_run(work, args.n, decoded, cpus, args.steps, args.batch, seeds,
                      f"ray-{cpus}-{args.n}-{args.seeds}-{args.stages[0]}", sample=args.sample,
                      stages=args.stages[0], account=args.account)
    print("ROW " + json.dumps(row))


def measure(argv: list[str], cores: int) -> dict:
    """One measurement in a fresh process pinned to `cores` cores (it and every process it starts, Ray's too)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < cores:
        raise SystemExit(f"this measurement needs {cores} cores, the machine gives {len(allowed)}")
    pin = set(allowed[:cores])
    out = subprocess.run([sys.executable, __file__, *argv], env=env, capture_output=True, text=True,
                         preexec_fn=lambda: os.sched_setaffinity(0, pin))
    for line in out.stdout.splitlines()[::-1]:
        if line.startswith("ROW "):
            return json.loads(line[4:])
    raise RuntimeError(f"measurement {argv} failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench-generate"))
    parser.add_argument("--n", type=int, default=500, help="phantoms of the throughput comparison")
    parser.add_argument("--keys", type=int, default=20_000, help="keys of the long run (0: skip it)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps of the throughput comparison")
    parser.add_argument("--long-steps", type=int, default=4, help="sampling steps of the long run")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "generate.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--seeds", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--sample", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--account", action="store_true",
                        help="sample the throughput parties' processes for their CPU seconds by role (costs the Ray "
                             "parties ~1.5%% of a core, which the loop does not pay)")
    parser.add_argument("--stages", nargs="+", default=["fused", "separate"], choices=["fused", "separate"],
                        help="stage layouts of the Ray runs (edit.stages), each at 1 and 2 CPUs")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    common = ["--work", str(work), "--steps", str(args.steps), "--batch", str(args.batch)]
    subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
                    f"from bench.bench_generate import prepare; from pathlib import Path; "
                    f"prepare(Path({str(work)!r}), {args.n})"], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    rows = [measure([*common, "--n", str(args.n), "--worker", "loop"], cores=1)]
    rows += [measure([*common, "--n", str(args.n), "--worker", w, "--stages", st, *(["--account"] * args.account)],
                     cores=int(w))
             for st in args.stages for w in ("1", "2")]
    loop = rows[0]["cf_per_s"]
    print(f"\n{args.n} phantoms x {len(EDITS)} edits, ddpm {args.steps} steps, batch {args.batch}")
    print("| party | CPUs | counterfactuals | seconds | cf/s | x loop | target | steady cf/s | steady x loop |")
    print("|---|---|---|---|---|---|---|---|---|")
    targets = {1: 0.9, 2: 1.6}
    steady_loop = rows[0].get("steady_cf_per_s")
    for r in rows:
        r["ratio"] = r["cf_per_s"] / loop
        r["steady_ratio"] = (r["steady_cf_per_s"] / steady_loop
                             if r.get("steady_cf_per_s") and steady_loop else None)
        target = targets.get(r["cpus"]) if r["party"] != "plain loop" else None
        r["target"] = target
        r["pass"] = None if target is None else bool(r["ratio"] >= target)
        print(f"| {r['party']} | {r['cpus']} | {r['counterfactuals']} | {r['seconds']:.1f} | {r['cf_per_s']:.2f} | "
              f"{r['ratio']:.2f}x | {'-' if target is None else ('PASS' if r['pass'] else 'MISS') + f' >= {target}'} | "
              f"{r['steady_cf_per_s'] or float('nan'):.2f} | {r['steady_ratio'] or float('nan'):.2f}x |")
    result = {"throughput": rows}
    if args.keys:
        images = max(1, args.keys // (len(EDITS) * 5))
        if images != args.n:
            subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
                            f"from bench.bench_generate import prepare; from pathlib import Path; "
                            f"prepare(Path({str(work)!r}), {images})"], check=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        long = measure(["--work", str(work), "--steps", str(args.long_steps), "--batch", str(args.batch),
                        "--n", str(images), "--worker", "2", "--seeds", "5", "--sample", "--stages", args.stages[0]],
                       cores=2)
        samples = long.pop("samples")
        plot(samples, ROOT / "bench" / "results" / "generate_memory.png")
        long["driver_rss"] = flat_after_warmup(samples, "driver_rss")
        long["workers_rss"] = flat_after_warmup(samples, "workers_rss")
        long["object_store"] = flat_after_warmup(samples, "object_store_used")
        long["exact"] = long["planned"] == long["done"] + long["failed"]
        print(f"\nlong run: {long['planned']} keys planned, {long['done']} done, {long['failed']} failed "
              f"({'exact' if long['exact'] else 'NOT EXACT'}), {long['cf_per_s']:.2f} cf/s over {long['seconds']:.0f} s")
        for k in ("driver_rss", "workers_rss", "object_store"):
            v = long[k]
            print(f"  {k}: peak {v['peak'] / 2**20:.0f} MiB, after warm-up first/last half peak "
                  f"{v.get('first_half_peak', 0) / 2**20:.0f}/{v.get('last_half_peak', 0) / 2**20:.0f} MiB, "
                  f"flat {v['flat']}")
        result["long_run"] = long
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
