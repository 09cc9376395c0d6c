"""The per-worker fine-tuning loop (runs inside Ray Train workers).

Noise-prediction loss on (CXR, prompt) pairs, VAE and text encoder frozen as in PRISM's recipe, the UNet trained
with DeepSpeed (ZeRO 0-3) or DDP. Checkpoints follow the DeepSpeed-on-Ray protocol: every rank saves its shard,
barrier, then every rank reports, so the checkpoint folder in storage holds all shards.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cfgen.config import JobConfig, TrainConfig

CHECKPOINT_TAG = "deepspeed"  # not "latest": DeepSpeed writes a file of that name beside the tag folder
EXPORT_DIR = "unet"
TEXT_ENCODER_DIR = "text_encoder"


def deepspeed_config(train: TrainConfig) -> dict[str, Any]:
    """The DeepSpeed config a run uses; also logged to MLflow."""
    return {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation,
        "gradient_clipping": train.gradient_clipping,
        "zero_optimization": {"stage": train.zero_stage},
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {"enabled": train.precision == "fp16"},
        # torch's AdamW: DeepSpeed's fused CPU Adam would compile a C++ extension on first use.
        "optimizer": {"type": "AdamW", "params": {"lr": train.lr, "weight_decay": 1e-2, "torch_adam": True}},
        "steps_per_print": 1_000_000_000,
        "wall_clock_breakdown": False,
    }


def _dropout_prompts(prompts: list[str], rate: float, rng: np.random.Generator) -> list[str]:
    """Empty prompts at `rate`, so the model also learns the unconditional score (classifier-free guidance)."""
    keep = rng.random(len(prompts)) >= rate
    return [p if k else "" for p, k in zip(prompts, keep)]


class ConditionedUNet(torch.nn.Module):
    """UNet and text encoder as one trainable module (train.train_text_encoder): the prompt's token ids go in, so
    DeepSpeed or DDP sees, partitions and reduces the text encoder's parameters with the UNet's. PRISM freezes CLIP
    because CLIP is pretrained; a randomly initialised domain text encoder has to learn what the words mean."""

    def __init__(self, unet: torch.nn.Module, text_encoder: torch.nn.Module):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, input_ids: torch.Tensor):
        hidden = self.text_encoder(input_ids)[0]
        return self.unet(sample, timestep, encoder_hidden_states=hidden.to(sample.dtype))

    def save_pretrained(self, folder: Path) -> None:
        self.unet.save_pretrained(Path(folder))
        self.text_encoder.save_pretrained(Path(folder).parent / TEXT_ENCODER_DIR)


class _Model:
    """The UNet (or `ConditionedUNet`) under DeepSpeed or DDP behind one small interface."""

    def __init__(self, unet: torch.nn.Module, train: TrainConfig, device: torch.device):
        self.train = train
        self.strategy = train.strategy
        if self.strategy == "deepspeed":
            import deepspeed

            self.engine, *_ = deepspeed.initialize(
                model=unet,
                model_parameters=[p for p in unet.parameters() if p.requires_grad],
                config=deepspeed_config(train),
                dist_init_required=False,
            )
            self.module = self.engine.module
            self.dtype = torch.bfloat16 if train.precision == "bf16" else (
                torch.float16 if train.precision == "fp16" else torch.float32
            )
        else:
            import ray.train.torch

            self.engine = ray.train.torch.prepare_model(unet)
            self.module = unet
            self.optimizer = torch.optim.AdamW(unet.parameters(), lr=train.lr, weight_decay=1e-2)
            self.dtype = torch.float32
            self._micro = 0

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def backward_and_step(self, loss: torch.Tensor) -> None:
        if self.strategy == "deepspeed":
            self.engine.backward(loss)
            self.engine.step()
            return
        (loss / self.train.gradient_accumulation).backward()
        self._micro += 1
        if self._micro % self.train.gradient_accumulation == 0:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.train.gradient_clipping)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def save(self, folder: str, step: int, rank: int) -> None:
        if self.strategy == "deepspeed":
            self.engine.save_checkpoint(folder, tag=CHECKPOINT_TAG, client_state={"step": step})
        elif rank == 0:
            torch.save(
                {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(), "step": step},
                Path(folder) / "ddp.pt",
            )

    def load(self, folder: str) -> int:
        if self.strategy == "deepspeed":
            _, client_state = self.engine.load_checkpoint(folder, tag=CHECKPOINT_TAG)
            return int(client_state["step"])
        state = torch.load(Path(folder) / "ddp.pt", map_location="cpu", weights_only=False)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        return int(state["step"])

    def export(self, folder: str, rank: int) -> None:
        """Write the full UNet (ZeRO-3 shards gathered) as a diffusers folder on rank 0."""
        if self.strategy == "deepspeed" and self.train.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
                if rank == 0:
                    self.module.save_pretrained(Path(folder) / EXPORT_DIR)
        elif rank == 0:
            self.module.save_pretrained(Path(folder) / EXPORT_DIR)


def noise_loss(pred: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, scheduler, snr_gamma: float | None
               ) -> torch.Tensor:
    """MSE of the noise prediction; with `snr_gamma`, each sample weighted by min(SNR_t, gamma) / SNR_t, the
    Min-SNR weighting for an epsilon-predicting model (SNR_t = alpha_bar_t / (1 - alpha_bar_t))."""
    if snr_gamma is None:
        return F.mse_loss(pred, noise)
    alpha_bar = scheduler.alphas_cumprod.to(t.device)[t].float()
    snr = alpha_bar / (1 - alpha_bar)
    weight = torch.clamp(snr, max=snr_gamma) / snr
    per_sample = ((pred - noise) ** 2).flatten(1).mean(1)
    return (weight * per_sample).mean()


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    job = JobConfig.model_validate(loop_config["job"])
    train = job.train
    if not train.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        torch.set_num_threads(max(1, int(train.cpus_per_worker)))
    from cfgen.models.sd import encode_images, encode_prompts, load_pipeline, token_ids

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(train.seed)

    pipe = load_pipeline(loop_config["base_model_uri"], job.storage, device=device)
    pipe.vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(train.train_text_encoder)
    unet = pipe.unet
    unet.train()
    if train.train_text_encoder:
        pipe.text_encoder.train()
        model = _Model(ConditionedUNet(unet, pipe.text_encoder), train, device)
    else:
        model = _Model(unet, train, device)
    scheduler = pipe.scheduler

    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            step = model.load(folder)

    tracker = None
    if rank == 0 and loop_config.get("mlflow_run_id"):
        from cfgen.tracking.runs import StepLogger

        tracker = StepLogger(job.tracking, loop_config["mlflow_run_id"])

    def save_checkpoint(metrics: dict[str, Any], final: bool) -> None:
        with tempfile.TemporaryDirectory() as folder:
            model.save(folder, step, rank)
            if final:
                model.export(folder, rank)
            torch.distributed.barrier()
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))

    if step >= train.max_steps:  # resumed with max_steps lowered to or below the checkpoint: export it as is
        save_checkpoint({"step": step}, final=True)
    shard = ray.train.get_dataset_shard("train")
    while step < train.max_steps:
        batches_this_epoch = 0
        for batch in shard.iter_batches(batch_size=train.batch_size, batch_format="numpy", drop_last=True):
            if step >= train.max_steps:
                break
            batches_this_epoch += 1
            rng = np.random.default_rng([train.seed, rank, step])
            generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
            prompts = _dropout_prompts([str(p) for p in batch["prompt"]], train.prompt_dropout, rng)
            with torch.no_grad():
                if "latents" in batch:  # the cached latents of the frozen VAE (cfgen.pipeline.latents)
                    latents = torch.from_numpy(np.asarray(batch["latents"], dtype=np.float32)).to(device)
                else:
                    latents = encode_images(pipe, batch["image"])
                text = None if train.train_text_encoder else encode_prompts(pipe, prompts)
            noise = torch.randn(latents.shape, generator=generator).to(device)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
            t = t.to(device)
            noisy = scheduler.add_noise(latents, noise, t)
            if train.train_text_encoder:
                pred = model(noisy.to(model.dtype), t, token_ids(pipe, prompts)).sample
            else:
                pred = model(noisy.to(model.dtype), t, encoder_hidden_states=text.to(model.dtype)).sample
            loss = noise_loss(pred.float(), noise, t, scheduler, train.snr_gamma)
            model.backward_and_step(loss)
            step += 1
            metrics = {"loss": loss.item(), "step": step}
            if tracker is not None:
                tracker.log(metrics, step)
            final = step >= train.max_steps
            if step % train.checkpoint_every == 0 or final:
                save_checkpoint(metrics, final)
            elif step % 10 == 0:
                ray.train.report(metrics)
        if batches_this_epoch == 0 and step < train.max_steps:
            raise ValueError(
                f"worker {rank} got no full batch of {train.batch_size}: the training set is too small for "
                f"{world} workers; lower train.batch_size or train.num_workers"
            )
    if tracker is not None:
        tracker.flush()
