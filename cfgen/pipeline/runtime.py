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
}


def init_ray(cfg: RayConfig, use_gpu: bool = False):
    """Join the cluster at `cfg.address` (or at RAY_ADDRESS, which `ray job submit` sets for its entrypoint), or
    start a loopback-only local Ray (the embedded default)."""
    import ray

    for key, value in JOB_ENV.items():
        os.environ.setdefault(key, value)
    env_vars = dict(JOB_ENV)
    if not use_gpu:
        env_vars["DS_ACCELERATOR"] = os.environ.get("DS_ACCELERATOR", "cpu")
    if ray.is_initialized():
        return ray
    runtime_env = {"env_vars": env_vars}
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        return ray
    # Ray registers the node under the machine's external address by default; the embedded run stays on
    # loopback. Ray reads this switch when `ray` is first imported, so the already-imported constant is set too
    # (the processes Ray starts inherit the variable).
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        num_cpus=cfg.num_cpus,
        object_store_memory=cfg.object_store_memory,
        runtime_env=runtime_env,
        log_to_driver=True,
    )
    return ray
