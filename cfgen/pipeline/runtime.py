"""Starting or joining Ray the same way in every job, test and benchmark."""

from __future__ import annotations

import os

from cfgen.config import RayConfig

#: Set for every process of a cfgen job: no telemetry, no hub downloads, DeepSpeed on CPU where no GPU is asked for.
JOB_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "TOKENIZERS_PARALLELISM": "false",
    # Arrow's default mimalloc pool keeps what Ray Data's batch formatting frees (threads allocate, others free):
    # a driver streaming 10,000 discovery rows grew by ~300 MB of such pages and kept growing with the rows.
    # The system allocator hands large buffers back (bench/RESULTS.md, discovery at scale).
    "ARROW_DEFAULT_MEMORY_POOL": "system",
    # Ray Data lists Parquet footers with a pool of 32 actors per read (its default, sized for listings of many
    # thousands of remote files). cfgen reads its own tables, a few large files each: one actor of 128 concurrent
    # reads is plenty, and each further process (~1 s of CPU to start) was start-up a small job paid for nothing
    # (bench/RESULTS.md, the generation job).
    "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1",
}


def use_arrow_pool_from_env() -> None:
    """Apply ARROW_DEFAULT_MEMORY_POOL in this process too: Arrow reads it when it loads, and a driver has
    usually imported pyarrow before `init_ray` sets it."""
    import pyarrow as pa

    wanted = os.environ.get("ARROW_DEFAULT_MEMORY_POOL")
    if wanted == "system" and pa.default_memory_pool().backend_name != "system":
        pa.set_memory_pool(pa.system_memory_pool())


def init_ray(cfg: RayConfig, use_gpu: bool = False, trains: bool = False):
    """Join the cluster at `cfg.address` (or at RAY_ADDRESS, which `ray job submit` sets for its entrypoint), or
    start a loopback-only local Ray (the embedded default), with the dashboard where `cfg.dashboard` says, or, left
    unset, where the job `trains` with Ray Train."""
    import ray

    for key, value in JOB_ENV.items():
        os.environ.setdefault(key, value)
    use_arrow_pool_from_env()
    env_vars = {key: os.environ.get(key, value) for key, value in JOB_ENV.items()}  # a user's own setting wins
    if not use_gpu:
        env_vars["DS_ACCELERATOR"] = os.environ.get("DS_ACCELERATOR", "cpu")
    if ray.is_initialized():
        return ray
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:  # a cluster started elsewhere: its workers get the environment through the job's runtime env
        ray.init(address=address, runtime_env={"env_vars": env_vars}, log_to_driver=True)
        return ray
    # Ray registers the node under the machine's external address by default; the embedded run stays on
    # loopback. Ray reads this switch when `ray` is first imported, so the already-imported constant is set too
    # (the processes Ray starts inherit the variable).
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
    # A Ray started here inherits this process's environment, so the job needs no runtime environment of its own.
    # With one, none of the workers Ray prestarts at start-up (one per CPU, `ray` already imported) could serve
    # the job: each actor and task waited for a fresh process, ~2.5 s of a 60 s generation job on 2 CPUs
    # (bench/RESULTS.md, the generation job).
    os.environ.update(env_vars)
    ray.init(
        _node_ip_address="127.0.0.1",
        include_dashboard=trains if cfg.dashboard is None else cfg.dashboard,
        dashboard_host="127.0.0.1",
        num_cpus=cfg.num_cpus,
        object_store_memory=cfg.object_store_memory,
        log_to_driver=True,
    )
    return ray
