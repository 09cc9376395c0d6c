"""A brief fit of the tiny model's VAE to CXRs.

SD's own VAE reconstructs CXRs well enough to be frozen (PRISM freezes it). A randomly initialised tiny VAE does not
reconstruct anything, which would make every latent edit meaningless, so the CPU path fits it first on the
training images: plain reconstruction + a small KL term, a few hundred steps.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from cfgen.config import VAEPretrainConfig
from cfgen.models.sd import images_to_tensor


def fit_vae(vae: AutoencoderKL, images: np.ndarray, cfg: VAEPretrainConfig, seed: int = 0) -> list[float]:
    """Fit `vae` in place on grayscale uint8 images [N,H,W]; returns the loss per step."""
    if cfg.steps == 0:
        return []
    generator = torch.Generator().manual_seed(seed)
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.steps)
    losses = []
    for _ in range(cfg.steps):
        idx = torch.randint(0, len(images), (min(cfg.batch_size, len(images)),), generator=generator).numpy()
        x = images_to_tensor(images[idx], vae.device, vae.dtype)
        posterior = vae.encode(x).latent_dist
        z = posterior.sample(generator=None)
        recon = vae.decode(z).sample
        loss = F.mse_loss(recon, x) + cfg.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    vae.eval()
    return losses
