"""Discovery's memory does not grow with the number of counterfactuals: the driver's peak RSS at 1,000 and at
100,000 result rows, measured side by side (each in a fresh process, the same code `cfgen discover` runs).

The results table is synthetic in size only: its rows point, in turn, at 64 real phantom pairs (factual and true
do(smoking=1) counterfactual PNGs, lung masks as the phantom writer wrote them), so every row is read, decoded,
masked and reduced exactly as a generated one would be.

    .venv/bin/python bench/bench_discovery_scale.py                 # 1,000, 10,000 and 100,000 rows
    .venv/bin/python bench/bench_discovery_scale.py --rows 1000 20000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PAIRS = 64


def make_pairs(folder: Path) -> list[dict[str, str]]:
    import pandas as pd

    from cfgen.config import PhantomConfig
    from cfgen.phantoms.scm import PhantomSCM
    from cfgen.phantoms.writers import write_phantoms
    from cfgen.pipeline.generate import png_bytes

    cfg = PhantomConfig(n=PAIRS * 2, size=64, seed=5, formats=["png"], missing_fraction=0.0)
    write_phantoms(cfg, str(folder / "ph"))
    manifest = pd.read_parquet(folder / "ph" / "manifest.parquet")
    scm = PhantomSCM(cfg)
    pairs = []
    for _, row in manifest[manifest["smoking"] == 0].head(PAIRS).iterrows():
        subject = scm.subject(int(row["phantom_index"]))
        factual, _ = scm.render(subject)
        truth, _ = scm.render(scm.intervene(subject, {"smoking": 1}))
        f, c = folder / f"{row['image_id']}_f.png", folder / f"{row['image_id']}_c.png"
        f.write_bytes(png_bytes(factual))
        c.write_bytes(png_bytes(truth))
        pairs.append({"factual_uri": str(f), "counterfactual_uri": str(c), "mask_uri": row["mask_uri"],
                      "age": int(row["age"]), "sex": row["sex"]})
    return pairs


def write_results(folder: Path, pairs: list[dict[str, str]], n: int) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = folder / f"results-{n}"
    out.mkdir()
    shard = 10_000
    for start in range(0, n, shard):
        rows = range(start, min(n, start + shard))
        picked = [pairs[i % len(pairs)] for i in rows]
        table = pa.table({
            "image_id": [f"S{i:07d}" for i in rows], "edit_name": ["smoking=1"] * len(rows),
            "edit_applied": ['{"smoking": 1}'] * len(rows), "seed": [0] * len(rows), "split": ["test"] * len(rows),
            "smoking": [0.0] * len(rows), **{k: [p[k] for p in picked] for k in picked[0]}})
        pq.write_table(table, out / f"part-{start:07d}.parquet")
    return str(out)


def measure(results_uri: str) -> dict[str, float]:
    """In this (fresh) process: stream and summarise, then report the driver's peak RSS."""
    from cfgen.config import JobConfig
    from cfgen.discovery.analysis import stream_subjects, summarize
    from cfgen.discovery.plans import plan
    from cfgen.pipeline.runtime import init_ray

    job = JobConfig.model_validate({"ray": {"num_cpus": 4}, "discovery": {"interventions": [{"smoking": 1}],
                                                                          "bootstrap": 500}})
    init_ray(job.ray)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peaks = {"anon": 0, "shmem": 0, "workers": 0}
    done = threading.Event()

    def rollup() -> dict[str, int]:
        fields = {}
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
            name, value = line.split(":", 1)
            fields[name] = int(value.split()[0]) * 1024
        return fields

    def sample():
        import psutil

        while not done.is_set():
            fields = rollup()
            peaks["anon"] = max(peaks["anon"], fields.get("Anonymous", 0))
            peaks["shmem"] = max(peaks["shmem"], fields.get("Pss_Shmem", 0))
            workers = 0
            for p in psutil.process_iter(["cmdline", "memory_info"]):
                try:
                    if "ray::" in " ".join(p.info["cmdline"] or []):
                        workers += p.info["memory_info"].rss
                except (psutil.Error, TypeError):
                    continue
            peaks["workers"] = max(peaks["workers"], workers)
            done.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.time()
    reduction = stream_subjects(job, results_uri, plan(job))
    streamed_s, after_stream, stream_peak = time.time() - started, rollup().get("Anonymous", 0), peaks["anon"]
    result = summarize(reduction, __import__("pandas").DataFrame())
    done.set()
    sampler.join(5)
    after_summary = rollup().get("Anonymous", 0)
    lungs = result.regions.set_index("region").loc["lungs"]
    return {"rows": int(lungs["n"]), "seconds": round(time.time() - started, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "peak_anon_mb": round(peaks["anon"] / 2**20, 1), "peak_anon_stream_mb": round(stream_peak / 2**20, 1),
            "peak_shmem_mb": round(peaks["shmem"] / 2**20, 1),
            "peak_workers_rss_mb": round(peaks["workers"] / 2**20, 1),
            # what the driver holds once every row is read (the per-subject table the paired statistics need),
            # and after the summary; the peak above also has the batches and buffers in flight
            "anon_after_stream_mb": round(after_stream / 2**20, 1), "anon_after_summary_mb": round(after_summary / 2**20, 1),
            "stream_seconds": round(streamed_s, 1),
            "arrow_pool": __import__("pyarrow").default_memory_pool().backend_name,
            "rss_before_mb": round(before, 1), "lungs_mean_diff": float(lungs["mean_diff"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--rows", nargs="+", type=int, default=[1000, 10_000, 100_000])
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "discovery_scale.json"))
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        pairs = make_pairs(folder)
        print("| result rows | seconds | rows/s | driver peak RSS (MB) | driver's own (anonymous) peak (MB) "
              "| of it while streaming (MB) | driver's own after the stream (MB) | after the summary (MB) "
              "| object-store pages mapped, peak (MB) | Ray workers' RSS, peak (MB) | lungs mean diff |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        measured = []
        for n in args.rows:
            uri = write_results(folder, pairs, n)
            out = subprocess.run([sys.executable, __file__, "--measure", uri], capture_output=True, text=True,
                                 check=True).stdout.strip().splitlines()[-1]
            m = json.loads(out)
            print(f"| {m['rows']:,} | {m['seconds']} | {m['rows'] / m['seconds']:.0f} | {m['peak_rss_mb']} "
                  f"| {m['peak_anon_mb']} | {m['peak_anon_stream_mb']} | {m['anon_after_stream_mb']} "
                  f"| {m['anon_after_summary_mb']} | {m['peak_shmem_mb']} "
                  f"| {m['peak_workers_rss_mb']} "
                  f"| {m['lungs_mean_diff']:.4f} |",
                  flush=True)
            measured.append(m)
    growth = measured[-1]["peak_anon_mb"] / measured[0]["peak_anon_mb"] if len(measured) > 1 else None
    # what each further row costs the driver once read: the slope of its memory after the stream, first to last size
    per_row_kb = ((measured[-1]["anon_after_stream_mb"] - measured[0]["anon_after_stream_mb"]) * 1024
                  / (measured[-1]["rows"] - measured[0]["rows"])) if len(measured) > 1 else None
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"runs": measured, "peak_anon_ratio_last_over_first": growth,
                                           "after_stream_kb_per_row": per_row_kb}, indent=1))
    if per_row_kb is not None:
        print(f"driver's own memory after the stream: {per_row_kb:.2f} KB per further row")
    print(f"\ndriver's own peak memory, {args.rows[-1]:,} rows / {args.rows[0]:,} rows: {growth:.2f}x; "
          f"wrote {args.json}" if growth else f"wrote {args.json}")


if __name__ == "__main__":
    main()
