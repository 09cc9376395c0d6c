"""A bounded load test of the Serve app on 127.0.0.1: batching on and off, side by side in one run.

For each setting the app is deployed on a fresh Serve (the tiny model built from configs, ddpm at `--steps`), warmed
up, then `--requests` POSTs (PNG phantoms, do(smoking=1), each with its own seed) are sent by `--concurrency`
client threads. Reported per setting: latency p50/p90/p99, requests/s, failed requests (must be 0), and the RSS of
the editing replica's process sampled every 0.5 s (flat: the last half's peak within 10% of the first half's).

    .venv/bin/python bench/bench_serve.py                                  # 200 requests at concurrency 8
    .venv/bin/python bench/bench_serve.py --requests 40 --concurrency 4    # smoke run
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _replica_rss() -> int:
    import psutil

    total = 0
    for p in psutil.process_iter(["cmdline", "memory_info"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "cfgen-editor" in cmd or "_EditorReplica" in cmd:
            total += p.info["memory_info"].rss
    return total


def run_setting(batching: bool, args, model: str, images: list[bytes]) -> dict:
    import requests
    from ray import serve

    from cfgen.config import JobConfig
    from cfgen.serve.deployment import run

    port = _free_port()
    job = JobConfig.model_validate({
        "model": {"pretrained": model},
        "edit": {"method": "ddpm", "num_inference_steps": args.steps},
        "serve": {"port": port, "batching": batching, "max_batch_size": args.concurrency, "num_cpus": 1,
                  "batch_wait_timeout_s": 0.02, "max_ongoing_requests": 2 * args.concurrency},
        "tracking": {"tracking_uri": f"sqlite:///{tempfile.mkdtemp()}/mlflow.db"},
    })
    run(job, blocking=False)
    base = f"http://127.0.0.1:{port}"
    while requests.get(f"{base}/v1/ready", timeout=10).status_code != 200:
        time.sleep(0.5)

    def one(i: int):
        spec = json.dumps({"set": {"smoking": 1}, "seed": i, "factual": {"smoking": 0}})
        started = time.perf_counter()
        try:
            r = requests.post(f"{base}/v1/counterfactual", params={"format": "png"},
                              files={"file": ("x.png", images[i % len(images)], "image/png")}, data={"spec": spec},
                              timeout=300)
            ok = r.status_code == 200
        except requests.RequestException:
            ok = False
        return time.perf_counter() - started, ok

    for i in range(args.concurrency):  # warm-up, not counted
        one(i)
    samples, stop = [], threading.Event()

    def sample():
        while not stop.is_set():
            samples.append(_replica_rss())
            stop.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        results = list(pool.map(one, range(args.requests)))
    seconds = time.perf_counter() - started
    stop.set()
    sampler.join(2)
    serve.shutdown()
    latencies = np.array([r[0] for r in results])
    failed = sum(not r[1] for r in results)
    half = max(1, len(samples) // 2)
    first, last = max(samples[:half] or [0]), max(samples[half:] or [0])
    return {"batching": batching, "requests": args.requests, "concurrency": args.concurrency, "steps": args.steps,
            "seconds": seconds, "requests_per_s": args.requests / seconds, "failed": int(failed),
            "p50_s": float(np.percentile(latencies, 50)), "p90_s": float(np.percentile(latencies, 90)),
            "p99_s": float(np.percentile(latencies, 99)), "replica_rss_first_half_peak": first,
            "replica_rss_last_half_peak": last, "rss_flat": bool(last <= 1.10 * first) if first else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "serve.json"))
    args = parser.parse_args()

    from cfgen.config import ModelConfig, PhantomConfig, RayConfig
    from cfgen.models.sd import build_tiny_pipeline, save_pipeline
    from cfgen.phantoms.writers import write_phantoms
    from cfgen.pipeline.runtime import init_ray

    work = Path(tempfile.mkdtemp(prefix="cfgen-serve-bench-"))
    save_pipeline(build_tiny_pipeline(ModelConfig(), seed=0), str(work / "sd"))
    write_phantoms(PhantomConfig(n=16, size=64, seed=3, formats=["png"]), str(work / "ph"))
    images = [p.read_bytes() for p in sorted((work / "ph" / "images").glob("*.png"))]
    init_ray(RayConfig(num_cpus=4))
    rows = [run_setting(b, args, str(work / "sd"), images) for b in (True, False)]
    print(f"\n{args.requests} requests at concurrency {args.concurrency}, tiny model, ddpm {args.steps} steps")
    print("| batching | requests/s | p50 s | p90 s | p99 s | failed | replica RSS first/last half peak MiB | flat |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {'on' if r['batching'] else 'off'} | {r['requests_per_s']:.2f} | {r['p50_s']:.2f} | {r['p90_s']:.2f} | "
              f"{r['p99_s']:.2f} | {r['failed']} | {r['replica_rss_first_half_peak'] / 2**20:.0f}/"
              f"{r['replica_rss_last_half_peak'] / 2**20:.0f} | {r['rss_flat']} |")
    ratio = rows[0]["requests_per_s"] / rows[1]["requests_per_s"]
    print(f"batching on / off: {ratio:.2f}x requests/s")
    Path(args.json).write_text(json.dumps({"settings": rows, "batching_speedup": ratio}, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
