"""Ray Serve: an ingress deployment (the FastAPI app of `cfgen.serve.app`) and an editing deployment (the engine,
`cfgen.serve.editor.Editor`, with dynamic batching), bound into one application.

    serve run configs/serve/demo.yaml                          # or: serve run cfgen.serve.deployment:app_builder config=<job yaml>
    .venv/bin/python jobs/serve.py --config configs/demo.yaml serve.port=8000

The editing deployment loads the model once per replica (GPU when `serve.num_gpus` > 0), batches requests with
`@serve.batch` (`serve.max_batch_size`, `serve.batch_wait_timeout_s`; `serve.batching: false` edits each request
alone), caps the requests a replica takes at once (`serve.max_ongoing_requests`) and autoscales between
`serve.autoscaling` bounds. A request the engine fails on gets a 500 with the exception's type only, never the
upload; the replica goes on.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ray import serve

from cfgen.config import JobConfig, load_config


class _EditorReplica:
    def __init__(self, job: dict[str, Any]):
        from cfgen.serve.editor import Editor

        self.job = JobConfig.model_validate(job)
        self.editor = Editor(self.job)
        self._batched.set_max_batch_size(self.job.serve.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.job.serve.batch_wait_timeout_s)

    async def info(self) -> dict[str, Any]:
        return self.editor.info()

    async def ready(self) -> bool:
        return True

    async def edit(self, item):
        if self.job.serve.batching:
            out = await self._batched(item)
        else:
            out = (await asyncio.to_thread(self.editor.edit, [item]))[0]
        if isinstance(out, Exception):
            raise out
        return out

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _batched(self, items: list) -> list:
        return await asyncio.to_thread(self.editor.edit, items)


#: Per ingress replica: the editing deployment's handle and its model info. Module state, not a closure: Serve
#: pickles the ingress class by value (with copies of the globals its methods name), so __init__ reaches it through
#: an import and the routes through module-level functions, both the replica's one module.
_STATE: dict[str, Any] = {}


async def _edit(item):
    return await _STATE["handle"].edit.remote(item)


async def _info():
    if "info" not in _STATE:
        _STATE["info"] = await _STATE["handle"].info.remote()
    return _STATE["info"]


async def _ready() -> bool:
    try:
        return bool(await asyncio.wait_for(_STATE["handle"].ready.remote(), timeout=5.0))
    except Exception:  # noqa: BLE001 - not up yet (or no handle yet)
        return False


def _ingress_class(job: JobConfig):
    from cfgen.serve.app import create_app

    @serve.ingress(create_app(job, _edit, _info, _ready))
    class Ingress:
        def __init__(self, editor_handle):
            from cfgen.serve import deployment  # the module itself: a by-value copy of _STATE would be private

            deployment._STATE["handle"] = editor_handle

    return Ingress


def build_app(job: JobConfig):
    """The bound Serve application for `job` (its `serve` section)."""
    s = job.serve
    autoscaling = s.autoscaling
    editor = serve.deployment(
        _EditorReplica, name="cfgen-editor",
        max_ongoing_requests=s.max_ongoing_requests,
        ray_actor_options={"num_cpus": s.num_cpus, "num_gpus": s.num_gpus},
        autoscaling_config={"min_replicas": autoscaling.min_replicas, "max_replicas": autoscaling.max_replicas,
                            "target_ongoing_requests": autoscaling.target_ongoing_requests},
    ).bind(job.model_dump(mode="python"))
    ingress = serve.deployment(_ingress_class(job), name="cfgen-ingress",
                               max_ongoing_requests=max(s.max_ongoing_requests * 4, 32),
                               ray_actor_options={"num_cpus": 0.1})
    return ingress.bind(editor)


def app_builder(args: dict[str, str]):
    """`serve run cfgen.serve.deployment:app_builder config=<job yaml> [overrides='a.b=1 c.d=2']` and a RayService's
    `import_path`: the job config (the same file the batch jobs read) and overrides."""
    overrides = (args.get("overrides") or "").split()
    job = load_config(args["config"], overrides) if args.get("config") else JobConfig()
    return build_app(job)


def run(job: JobConfig, blocking: bool = True):
    """Start Serve on `serve.host:serve.port` and deploy; with `blocking`, serve until interrupted."""
    serve.start(http_options={"host": job.serve.host, "port": job.serve.port})
    handle = serve.run(build_app(job), name="cfgen", route_prefix=job.serve.route_prefix, blocking=blocking)
    return handle
