"""Fitting the tiny model's VAE to the data, once, and keeping the fit in object storage.

SD's own VAE reconstructs CXRs well enough to be frozen (PRISM freezes it). A randomly initialised tiny VAE
reconstructs nothing, and one that blurs ribs, device leads or the effusion meniscus makes every edit of those
structures wrong before the UNet has done anything (issue 16). So the CPU path fits it first, with the choices
that buy fidelity per CPU second rather than a smaller model:

- a plain autoencoder on the posterior mean (`deterministic`), the way the engine encodes; the KL term only keeps
  the latent bounded;
- L1 + MSE: L1 keeps edges where MSE alone averages them away;
- a one-cycle learning rate, which reaches a given loss in far fewer steps than a constant one;
- optionally (`crop`) random crops instead of whole images: the network is convolutional, a crop of half the
  side costs about a quarter of a step, and on these 2 cores CPU seconds, not images, are what runs out; then
  (`finish_steps`) a short phase on whole images, because GroupNorm normalises over the extent it is shown, and
  a decoder that only saw crops puts a whole image's intensities off by a constant;
- 16 latent channels at 1/4 of the image size (as many numbers as grey pixels; SD3 and FLUX moved to 16 for the
  same reason), which costs the UNet almost nothing since its work scales with the latent's area.

The fitted VAE is cached under a key of everything that determines it (architecture, fit settings, seed and a
digest of the fit images), so the demo, the benchmark and the tests fit it once per data set, not once per run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from cfgen.config import StorageConfig, TinyModelConfig, VAEPretrainConfig
from cfgen.models.sd import images_to_tensor

log = logging.getLogger(__name__)

FIT_RECORD = "fit.json"  # written last: a cache entry without it is incomplete and is refitted


def fit_vae(vae: AutoencoderKL, images: np.ndarray, cfg: VAEPretrainConfig, seed: int = 0) -> list[float]:
    """Fit `vae` in place on grayscale uint8/uint16 images [N,H,W]; returns the loss per step."""
    if cfg.steps == 0:
        return []
    generator = torch.Generator().manual_seed(seed)
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    data = images_to_tensor(images, vae.device, vae.dtype)
    losses: list[float] = []
    _fit_phase(vae, data, cfg, cfg.crop, optimizer, schedule, cfg.steps, generator, losses)
    if cfg.crop is not None and cfg.finish_steps:
        optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.lr / 10)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.finish_steps)
        _fit_phase(vae, data, cfg, None, optimizer, schedule, cfg.finish_steps, generator, losses)
    vae.eval()
    return losses


def _fit_phase(vae: AutoencoderKL, data: torch.Tensor, cfg: VAEPretrainConfig, crop: int | None, optimizer,
               schedule, steps: int, generator: torch.Generator, losses: list[float]) -> None:
    """`steps` optimiser steps on batches of `data`, cropped to `crop` (None: whole images); appends the losses."""
    for _ in range(steps):
        idx = torch.randint(0, len(data), (min(cfg.batch_size, len(data)),), generator=generator)
        x = data[idx] if crop is None else random_crops(data[idx], crop, generator)
        posterior = vae.encode(x).latent_dist
        z = posterior.mode() if cfg.deterministic else posterior.sample(generator=generator)
        recon = vae.decode(z).sample
        loss = F.mse_loss(recon, x)
        if cfg.loss == "l1_mse":
            loss = loss + F.l1_loss(recon, x)
        loss = loss + cfg.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if len(losses) % 100 == 0:
            log.info("VAE fit step %d: loss %.4f", len(losses), losses[-1])


def random_crops(x: torch.Tensor, size: int, generator: torch.Generator, align: int = 4) -> torch.Tensor:
    """One random `size` x `size` crop of every image of `x` [B,C,H,W], at offsets on the latent grid (`align`);
    images no larger than `size` come back whole."""
    height, width = x.shape[-2:]
    if size >= min(height, width):
        return x
    if size % align:
        raise ValueError(f"vae crop {size} must be a multiple of {align} (the latent's downsampling)")
    rows = torch.randint(0, (height - size) // align + 1, (len(x),), generator=generator) * align
    cols = torch.randint(0, (width - size) // align + 1, (len(x),), generator=generator) * align
    return torch.stack([img[:, r:r + size, c:c + size] for img, r, c in zip(x, rows.tolist(), cols.tolist())])


@torch.no_grad()
def set_latent_scale(vae: AutoencoderKL, images: np.ndarray) -> float:
    """Set `scaling_factor` so the UNet sees unit-variance latents (SD's 0.18215 plays this role for its VAE)."""
    x = images_to_tensor(images[:256], vae.device, vae.dtype)
    std = float(vae.encode(x).latent_dist.mode().std())
    factor = 1.0 / max(std, 1e-6)
    vae.register_to_config(scaling_factor=factor)
    return factor


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """decode(encode(images)) as float32 [N,H,W] in [0,1], the way the engine sees it."""
    from cfgen.models.sd import tensor_to_images

    out = []
    for start in range(0, len(images), batch_size):
        x = images_to_tensor(images[start:start + batch_size], vae.device, vae.dtype)
        out.append(tensor_to_images(vae.decode(vae.encode(x).latent_dist.mode()).sample))
    return np.concatenate(out) if out else np.zeros((0,) + images.shape[1:], np.float32)


def fit_key(tiny: TinyModelConfig, resolution: int, cfg: VAEPretrainConfig, seed: int, images: np.ndarray) -> str:
    """Everything that determines a fitted VAE, hashed: same inputs, same VAE, so a cached one can be reused."""
    digest = hashlib.sha256()
    # unset options (None) are left out, so that adding an option does not change the key of every earlier fit
    settings = cfg.model_dump(mode="json", exclude={"cache_uri", "heldout"}, exclude_none=True)
    digest.update(json.dumps({"tiny": tiny.model_dump(mode="json"), "resolution": resolution, "fit": settings,
                              "seed": seed, "shape": list(images.shape), "dtype": str(images.dtype)},
                             sort_keys=True).encode())
    digest.update(np.ascontiguousarray(images).tobytes())
    return digest.hexdigest()[:20]


def cached_fit(
    vae: AutoencoderKL,
    images: np.ndarray,
    tiny: TinyModelConfig,
    resolution: int,
    cfg: VAEPretrainConfig,
    cache_uri: str,
    storage: StorageConfig | None = None,
    seed: int = 0,
) -> tuple[AutoencoderKL, dict[str, Any]]:
    """The VAE fitted to `images`: loaded from `cache_uri/<key>` when an earlier run fitted it, else fitted (in
    place on `vae`) and stored there. Returns (vae, its fit record)."""
    from cfgen.io.storage import exists, join_uri, read_bytes
    from cfgen.models.cache import local_copy, put_folder

    key = fit_key(tiny, resolution, cfg, seed, images)
    entry = join_uri(cache_uri, key)
    if exists(join_uri(entry, FIT_RECORD), storage):
        record = json.loads(read_bytes(join_uri(entry, FIT_RECORD), storage))
        loaded = AutoencoderKL.from_pretrained(local_copy(entry, storage), local_files_only=True)
        log.info("VAE fit %s reused from %s", key, entry)
        return loaded.to(vae.device).eval(), {**record, "cached": True, "uri": entry}
    started = time.time()
    losses = fit_vae(vae, images, cfg, seed=seed)
    scale = set_latent_scale(vae, images)
    record = {"key": key, "steps": cfg.steps, "images": int(len(images)), "seconds": time.time() - started,
              "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
              "scaling_factor": scale}
    with tempfile.TemporaryDirectory() as tmp:
        vae.save_pretrained(tmp, safe_serialization=True)
        put_folder(tmp, entry, storage)
    from cfgen.io.storage import write_bytes

    write_bytes(join_uri(entry, FIT_RECORD), json.dumps(record).encode(), storage)
    log.info("VAE fitted in %.0f s (%d steps), cached at %s", record["seconds"], cfg.steps, entry)
    return vae, {**record, "cached": False, "uri": entry}
