"""Driver side of fine-tuning: Ray Train's TorchTrainer around `train_loop_per_worker`, then export.

Rerunning with the same `train.run_name` and output resumes from the last checkpoint (Ray Train V2 restores the
run from `RunConfig(storage_path, name)`). The exported model is a complete diffusers folder: the fine-tuned UNet
(and text encoder, with train.train_text_encoder) next to the frozen VAE, tokenizer and scheduler of the base model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cfgen.config import JobConfig
from cfgen.io.storage import join_uri, pyarrow_filesystem
from cfgen.train.loop import EXPORT_DIR, TEXT_ENCODER_DIR, train_loop_per_worker


@dataclass
class FineTuneResult:
    model_uri: str
    metrics: dict[str, Any]
    checkpoint_path: str


def storage_path_for(job: JobConfig) -> tuple[str, Any]:
    """Where Ray Train keeps runs and checkpoints of this job (object storage or an absolute local path)."""
    uri = join_uri(job.output_uri, "ray_results")
    if "://" in uri and not uri.startswith("file://"):
        fs, path = pyarrow_filesystem(uri, job.storage)
        return path, fs
    from pathlib import Path

    return str(Path(uri.removeprefix("file://")).resolve()), None


def fine_tune(
    job: JobConfig,
    train_ds,
    base_model_uri: str,
    output_model_uri: str,
    mlflow_run_id: str | None = None,
) -> FineTuneResult:
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    train = job.train
    # Ray Data hands out blocks as they finish unless told otherwise, so two runs of one config trained on other
    # batches and came out measurably different (bench/RESULTS.md, session 12): keep the dataset's own order
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True
    resources = {"CPU": train.cpus_per_worker}
    if train.use_gpu:
        resources["GPU"] = 1
    storage_path, storage_fs = storage_path_for(job)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "job": job.model_dump(mode="python"),
            "base_model_uri": base_model_uri,
            "mlflow_run_id": mlflow_run_id,
        },
        scaling_config=ScalingConfig(
            num_workers=train.num_workers, use_gpu=train.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=train.run_name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=0),
        ),
        datasets={"train": train_ds},
        dataset_config=DataConfig(execution_options=ingest),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {train.run_name} finished without a checkpoint")
    export_pipeline(job, result.checkpoint, base_model_uri, output_model_uri)
    return FineTuneResult(output_model_uri, dict(result.metrics or {}), result.checkpoint.path)


def export_pipeline(job: JobConfig, checkpoint, base_model_uri: str, output_model_uri: str) -> str:
    """The final checkpoint's UNet + the base model's frozen parts -> one diffusers pipeline folder."""
    from pathlib import Path

    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from cfgen.models.sd import load_pipeline, save_pipeline

    pipe = load_pipeline(base_model_uri, job.storage)
    with checkpoint.as_directory() as folder:
        pipe.unet = UNet2DConditionModel.from_pretrained(f"{folder}/{EXPORT_DIR}")
        pipe.register_modules(unet=pipe.unet)
        if (Path(folder) / TEXT_ENCODER_DIR).exists():  # train.train_text_encoder
            pipe.text_encoder = CLIPTextModel.from_pretrained(f"{folder}/{TEXT_ENCODER_DIR}")
            pipe.register_modules(text_encoder=pipe.text_encoder)
    return save_pipeline(pipe, output_model_uri, job.storage)
