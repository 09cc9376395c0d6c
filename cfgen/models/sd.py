"""Stable Diffusion pipelines for CXRs: build the tiny one, load and save any one, move images in and out of latents.

A pipeline is always a complete diffusers folder (`model_index.json`, `unet/`, `vae/`, `text_encoder/`,
`tokenizer/`, `scheduler/`), so a model fine-tuned here loads in plain diffusers and SD v1.5 loads here.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from cfgen.config import ModelConfig, StorageConfig
from cfgen.models.cache import local_copy, put_folder
from cfgen.models.tokenizer import build_domain_tokenizer

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")

#: SD v1's noise schedule (DESIGN.md §2): scaled-linear betas 0.00085-0.012, steps_offset 1.
SD_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)


def build_tiny_pipeline(cfg: ModelConfig, seed: int = 0) -> StableDiffusionPipeline:
    """An SD-shaped pipeline small enough for CPU: same classes and folder format as SD v1.5, random weights."""
    tiny = cfg.tiny
    torch.manual_seed(seed)
    tokenizer = build_domain_tokenizer(tiny.max_text_length)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=tiny.text_hidden,
            intermediate_size=tiny.text_hidden * 4,
            num_hidden_layers=tiny.text_layers,
            num_attention_heads=4,
            max_position_embeddings=tiny.max_text_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    n_vae = len(tiny.vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n_vae,
        up_block_types=("UpDecoderBlock2D",) * n_vae,
        block_out_channels=tuple(tiny.vae_channels),
        latent_channels=tiny.latent_channels,
        layers_per_block=1,
        norm_num_groups=min(32, *tiny.vae_channels),
        sample_size=cfg.resolution,
        mid_block_add_attention=tiny.vae_attention,
    )
    n_unet = len(tiny.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=cfg.resolution // vae_scale_factor(vae),
        in_channels=tiny.latent_channels,
        out_channels=tiny.latent_channels,
        block_out_channels=tuple(tiny.unet_channels),
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n_unet - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n_unet - 1) + ("UpBlock2D",),
        layers_per_block=1,
        cross_attention_dim=tiny.cross_attention_dim if tiny.cross_attention_dim else tiny.text_hidden,
        attention_head_dim=8,
        norm_num_groups=min(32, *tiny.unet_channels),
    )
    if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
        raise ValueError("tiny.cross_attention_dim must equal tiny.text_hidden (the UNet attends to text states)")
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**SD_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def vae_scale_factor(vae: AutoencoderKL) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def load_pipeline(
    uri: str,
    storage: StorageConfig | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> StableDiffusionPipeline:
    """Load a diffusers SD pipeline from a local folder, an `s3://`/`gs://` folder or a hub id.

    Hub ids only resolve where a hub is reachable (HF_HUB_OFFLINE=1 makes them fail fast, with a clear error).
    """
    if "://" in uri and not uri.startswith("file://"):
        local = local_copy(uri, storage)
    else:
        local = uri.removeprefix("file://")
    is_local = Path(local).exists()
    if is_local and not (Path(local) / "model_index.json").exists():
        raise FileNotFoundError(f"{uri} is not a diffusers pipeline folder (no model_index.json)")
    if not is_local and not _HUB_ID.fullmatch(local):
        raise FileNotFoundError(f"no diffusers pipeline folder at {uri} (and it is not a hub id like org/name)")
    pipe = StableDiffusionPipeline.from_pretrained(
        local,
        dtype=dtype,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        local_files_only=is_local,
    )
    # Editing needs DDIM whatever scheduler the folder ships with; keep its noise schedule.
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def save_pipeline(pipe: StableDiffusionPipeline, uri: str, storage: StorageConfig | None = None) -> str:
    """Save as a diffusers folder, locally or to object storage."""
    if "://" in uri and not uri.startswith("file://"):
        with tempfile.TemporaryDirectory() as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
            return put_folder(tmp, uri, storage)
    local = uri.removeprefix("file://")
    pipe.save_pretrained(local, safe_serialization=True)
    return local


def pick_device(preference: str = "auto") -> torch.device:
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def images_to_tensor(images: np.ndarray, device: torch.device | str = "cpu", dtype=torch.float32) -> torch.Tensor:
    """uint8/uint16 grayscale [B,H,W] -> [-1,1] RGB [B,3,H,W]: CXRs are replicated to 3 channels for SD's VAE."""
    arr = np.asarray(images)
    scale = 65535.0 if arr.dtype == np.uint16 else 255.0
    x = torch.from_numpy(arr.astype(np.float32) / scale).to(device=device, dtype=dtype)
    return (x * 2 - 1).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def tensor_to_images(x: torch.Tensor) -> np.ndarray:
    """[-1,1] RGB [B,3,H,W] -> float32 grayscale [B,H,W] in [0,1] (channel mean)."""
    return ((x.float().mean(dim=1) + 1) / 2).clamp(0, 1).cpu().numpy()


@torch.no_grad()
def encode_images(pipe: StableDiffusionPipeline, images: np.ndarray) -> torch.Tensor:
    """Deterministic latents (the posterior mean), scaled as the UNet expects."""
    vae = pipe.vae
    x = images_to_tensor(images, vae.device, vae.dtype)
    return vae.encode(x).latent_dist.mode() * vae.config.scaling_factor


@torch.no_grad()
def decode_latents(pipe: StableDiffusionPipeline, latents: torch.Tensor) -> np.ndarray:
    vae = pipe.vae
    x = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return tensor_to_images(x)


def token_ids(pipe: StableDiffusionPipeline, prompts: list[str]) -> torch.Tensor:
    """Padded token ids [B, max_length] of `prompts`, on the text encoder's device."""
    tok = pipe.tokenizer
    return tok(
        list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(pipe.text_encoder.device)


@torch.no_grad()
def encode_prompts(pipe: StableDiffusionPipeline, prompts: list[str]) -> torch.Tensor:
    return pipe.text_encoder(token_ids(pipe, prompts))[0]
