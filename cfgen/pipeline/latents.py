"""Cached latents: encode the training images with the frozen VAE once, train the UNet on the stored latents.

PRISM's recipe freezes the VAE (and CLIP), so every epoch would otherwise run the same encoder over the same
images (DESIGN.md §6; Anyscale's SD pre-training pipeline caches them the same way). The cache is a Parquet data
set of (latents, prompt) under the model's own key, written by Ray Data actors and finished by a `_SUCCESS`
marker, so a rerun or another job on the same base model reads it instead of encoding again, and a half-written
cache is never trained on.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import numpy as np

from cfgen.config import JobConfig
from cfgen.io.storage import exists, join_uri, pyarrow_filesystem, write_bytes

log = logging.getLogger(__name__)


class LatentEncoder:
    """Ray Data callable: uint8 images -> scaled VAE latents (float32 [B,C,h,w]), prompts passed through."""

    def __init__(self, model_uri: str, job: dict[str, Any]):
        import torch

        from cfgen.models.sd import load_pipeline, pick_device

        cfg = JobConfig.model_validate(job)
        torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
        self.pipe = load_pipeline(model_uri, cfg.storage, device=pick_device(cfg.model.device))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from cfgen.models.sd import encode_images

        latents = encode_images(self.pipe, np.asarray(batch["image"])).float().cpu().numpy()
        return {"latents": latents, "prompt": batch["prompt"]}


def latents_uri(job: JobConfig, base_model_uri: str) -> str:
    """Keyed by the base model, its VAE's config (whose fitted latent scale differs per fit) and the data settings."""
    from cfgen.io.storage import read_bytes

    vae_config = read_bytes(join_uri(base_model_uri, "vae", "config.json"), job.storage)
    key = hashlib.sha256(base_model_uri.encode() + vae_config + job.data.model_dump_json().encode()).hexdigest()
    return join_uri(job.output_uri, "latents", key[:16])


def latent_dataset(job: JobConfig, decoded_uri: str, base_model_uri: str, splits=("train",)):
    """The (latents, prompt) training set of `base_model_uri`'s VAE: read from the cache, encoded first if absent."""
    import ray.data

    from cfgen.pipeline.ingest import training_dataset
    from cfgen.pipeline.ordered_parquet import write_parquet_in_order

    uri = latents_uri(job, base_model_uri)
    fs, path = pyarrow_filesystem(uri, job.storage)
    if not exists(join_uri(uri, "_SUCCESS"), job.storage):
        try:
            fs.delete_dir_contents(path, missing_dir_ok=True)  # a half-written earlier attempt
        except OSError:
            pass
        encoded = training_dataset(job, decoded_uri, splits).map_batches(
            LatentEncoder,
            fn_constructor_kwargs={"model_uri": base_model_uri, "job": job.model_dump(mode="python")},
            compute=ray.data.ActorPoolStrategy(size=1),
            batch_size=128,
            num_cpus=job.train.cpus_per_worker,
            num_gpus=1 if job.train.use_gpu else None,
        )
        # the cache keeps the images' order, so that two builds of one config train on the same batches
        write_parquet_in_order(encoded, path, fs)
        write_bytes(join_uri(uri, "_SUCCESS"), b"", job.storage)
        log.info("latents of %s cached at %s", base_model_uri, uri)
    return ray.data.read_parquet(path, filesystem=fs, file_extensions=["parquet"])
