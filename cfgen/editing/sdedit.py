"""SDEdit (Meng et al. 2022): noise the image's latent part of the way up, then denoise with the edited prompt.

Strength s in (0, 1] sets how far: the sampler starts at step round((1 - s) x steps) of the DDIM schedule, so it
costs about s x steps evaluations per prompt. The null edit uses the same noise with the factual prompt, so the
engine's compositing cancels everything the two share. The noise of each image comes from its own seed. Every
edit and the null edit start from the same noisy latent and denoise in one batch (`sample_prompt_lists`).
"""

from __future__ import annotations

import torch

from cfgen.editing.ddim import sample_prompt_lists
from cfgen.models.sd import encode_prompts


def seeded_noise(shape: tuple[int, ...], seeds: list[int], device, dtype) -> torch.Tensor:
    """Gaussian noise [B, ...] drawn image by image from each image's own seed (on the CPU, so that it is the same
    on every device), so an image's noise does not depend on its batch."""
    return torch.stack([torch.randn(shape[1:], generator=torch.Generator().manual_seed(int(s)))
                        for s in seeds]).to(device=device, dtype=dtype)


@torch.no_grad()
def sdedit(pipe, latents: torch.Tensor, factual_prompts: list[str], counterfactual_prompts: list[list[str]],
           num_inference_steps: int, strength: float, guidance_scale: float, seeds: list[int],
           null_edit: bool = True):
    """(edited latents per prompt list, null-edit latents, or None without `null_edit`)."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"SDEdit strength must be in (0, 1], got {strength}")
    from diffusers import DDIMScheduler

    schedule = DDIMScheduler.from_config(pipe.scheduler.config)
    schedule.set_timesteps(num_inference_steps, device=latents.device)
    start = min(num_inference_steps - 1, int(round((1.0 - strength) * num_inference_steps)))
    t_start = schedule.timesteps[start]
    noise = seeded_noise(tuple(latents.shape), seeds, latents.device, latents.dtype)
    noisy = schedule.add_noise(latents, noise, t_start.reshape(1).repeat(len(latents)))
    uncond = encode_prompts(pipe, [""] * len(latents)) if guidance_scale != 1.0 else None
    prompts = counterfactual_prompts + ([factual_prompts] if null_edit else [])
    sampled = sample_prompt_lists(pipe, noisy, [encode_prompts(pipe, p) for p in prompts], num_inference_steps,
                                  uncond, guidance_scale, start_step=start)
    k = len(counterfactual_prompts)
    return sampled[:k], sampled[k] if null_edit else None
