"""Edit-friendly DDPM inversion (Huberman-Spiegelglas et al. 2023), the inversion of LEDITS++ and RadEdit.

DDIM inversion runs the deterministic sampler backwards and is exact only approximately (the noise prediction at
x_t stands in for the one at x_{t-1}). The DDPM sampler (eta = 1) instead adds fresh noise z_t at every step, and
that freedom makes an exact inversion easy: draw the noisy latents independently, x_t = sqrt(abar_t) x_0 +
sqrt(1 - abar_t) eps_t with eps_t ~ N(0, I) from the image's seed, then solve every step for the noise map
z_t = (x_{t-1} - mu_t(x_t)) / sigma_t that takes the sampler from x_t to x_{t-1} under the factual prompt. The
maps are "edit-friendly": they carry the image's structure (they are far from Gaussian), so running the same
sampler with the same maps and the edited prompt changes what the prompt changes and keeps the rest.

Reconstruction with the factual prompt is exact by construction (the tests check it with a real UNet), so the
null edit is the encoded latent itself and costs no UNet work. Like SDEdit, the inversion may skip the first,
noisiest steps (`skip`, a fraction of the schedule; diffusers' LEDITS++ defaults to 0.15): the edit then starts
from the sampled x_t at that level, costs (1 - skip) x steps per prompt, and changes the layout less. The
sampler's arithmetic runs in fp32 whatever the UNet's dtype: in bf16 the residuals z_t would not survive rounding.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler

from cfgen.editing.ddim import guided_noise_prediction
from cfgen.editing.inversion_cache import BatchInversions, split_images
from cfgen.editing.sdedit import seeded_noise
from cfgen.models.sd import encode_prompts


def start_step(skip: float, num_inference_steps: int) -> int:
    if not 0.0 <= skip < 1.0:
        raise ValueError(f"ddpm_skip is the fraction of the first steps skipped, in [0, 1); got {skip}")
    return min(num_inference_steps - 1, int(skip * num_inference_steps + 0.5))


def _schedule(scheduler, num_inference_steps: int, device) -> DDIMScheduler:
    schedule = DDIMScheduler.from_config(scheduler.config)
    schedule.set_timesteps(num_inference_steps, device=device)
    return schedule


def _alpha_bar(schedule: DDIMScheduler, t: int) -> torch.Tensor:
    # the level after the last step is the clean latent; DDIM's convention gives it abar = alphas_cumprod[0]
    return schedule.alphas_cumprod[t] if t >= 0 else schedule.final_alpha_cumprod


def ddpm_posterior(schedule: DDIMScheduler, eps: torch.Tensor, t: int, x_t: torch.Tensor):
    """(mu_t, sigma_t) of the DDPM step x_t -> x_{t-1} on the strided schedule (DDIM's step with eta = 1)."""
    prev = t - schedule.config.num_train_timesteps // schedule.num_inference_steps
    abar, abar_prev = _alpha_bar(schedule, t).float(), _alpha_bar(schedule, prev).float()
    x0 = (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()
    variance = (1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)
    mean = abar_prev.sqrt() * x0 + (1 - abar_prev - variance).sqrt() * eps
    return mean, variance.sqrt()


def _eps(unet, x: torch.Tensor, t, cond, uncond, guidance_scale: float) -> torch.Tensor:
    return guided_noise_prediction(unet, x.to(unet.dtype), t, cond, uncond, guidance_scale).float()


@torch.no_grad()
def ddpm_invert(unet, scheduler, x0: torch.Tensor, cond: torch.Tensor, noise: torch.Tensor,
                num_inference_steps: int, uncond: torch.Tensor | None = None, guidance_scale: float = 1.0,
                skip: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(trajectory [N+1, B, C, h, w], x_0 first; noise maps [N, B, C, h, w], step 0 = x_T's) for latents `x0`.

    `noise` [N, B, C, h, w]: the independent eps_t of every timestep. Maps of skipped steps are zero (unused)."""
    schedule = _schedule(scheduler, num_inference_steps, x0.device)
    x0 = x0.float()
    abar = schedule.alphas_cumprod.to(x0.device)[schedule.timesteps].float()  # [N], x_T's first
    noisy = abar.sqrt()[:, None, None, None, None] * x0 + (1 - abar).sqrt()[:, None, None, None, None] * noise
    trajectory = torch.cat([x0[None], noisy.flip(0)])
    maps = torch.zeros_like(noise)
    for k in range(start_step(skip, num_inference_steps), num_inference_steps):
        t = schedule.timesteps[k]
        x_t, x_prev = trajectory[num_inference_steps - k], trajectory[num_inference_steps - 1 - k]
        mean, sigma = ddpm_posterior(schedule, _eps(unet, x_t, t, cond, uncond, guidance_scale), int(t), x_t)
        maps[k] = (x_prev - mean) / sigma
    return trajectory, maps


@torch.no_grad()
def ddpm_sample(unet, scheduler, trajectory: torch.Tensor, maps: torch.Tensor, cond: torch.Tensor,
                num_inference_steps: int, uncond: torch.Tensor | None = None, guidance_scale: float = 1.0,
                skip: float = 0.0, latent_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The DDPM sampler driven by the inversion's noise `maps` from the trajectory's level at `skip`; with the
    factual prompt it retraces `trajectory`. With `latent_mask` [B,1,h,w], the trajectory is kept outside it."""
    schedule = _schedule(scheduler, num_inference_steps, trajectory.device)
    start = start_step(skip, num_inference_steps)
    x = trajectory[num_inference_steps - start]
    for k in range(start, num_inference_steps):
        t = schedule.timesteps[k]
        mean, sigma = ddpm_posterior(schedule, _eps(unet, x, t, cond, uncond, guidance_scale), int(t), x)
        x = mean + sigma * maps[k]
        if latent_mask is not None:
            x = latent_mask * x + (1 - latent_mask) * trajectory[num_inference_steps - 1 - k]
    return x


def ddpm_edit(pipe, latents: torch.Tensor, factual_prompts: list[str], counterfactual_prompts: list[list[str]],
              num_inference_steps: int, guidance_scale: float, skip: float, seeds: list[int],
              inversions: BatchInversions, latent_mask: torch.Tensor | None = None):
    """The `ddpm` method: (edited latents per prompt list, null edit = the encoded latents). Every edit runs in
    one batch with the same noise maps; the noise of each image comes from its own seed."""
    n, steps = len(latents), num_inference_steps
    uncond = encode_prompts(pipe, [""] * n) if guidance_scale != 1.0 else None

    def invert(indices: list[int]):
        noise = seeded_noise((len(indices), steps, *latents.shape[1:]), [seeds[i] for i in indices],
                             latents.device, torch.float32).transpose(0, 1)
        trajectory, maps = ddpm_invert(pipe.unet, pipe.scheduler, latents[indices],
                                       encode_prompts(pipe, [factual_prompts[i] for i in indices]), noise, steps,
                                       None if uncond is None else uncond[indices], guidance_scale, skip)
        return split_images({"trajectory": trajectory, "noise_maps": maps})

    settings = {"steps": steps, "guidance": guidance_scale, "skip": start_step(skip, steps)}
    conditions = [(p, int(s)) for p, s in zip(factual_prompts, seeds)]
    inverted = inversions.stacked("ddpm", conditions, settings, invert)
    k = len(counterfactual_prompts)
    cond = torch.cat([encode_prompts(pipe, p) for p in counterfactual_prompts])
    edited = ddpm_sample(pipe.unet, pipe.scheduler, inverted["trajectory"].repeat(1, k, 1, 1, 1),
                         inverted["noise_maps"].repeat(1, k, 1, 1, 1), cond, steps,
                         None if uncond is None else uncond.repeat(k, 1, 1), guidance_scale, skip,
                         None if latent_mask is None else latent_mask.repeat(k, 1, 1, 1))
    return [z.to(latents.dtype) for z in edited.split(n)], inverted["trajectory"][0].to(latents.dtype)
