"""Null-text inversion (Mokady et al. 2023) + Prompt-to-Prompt: PRISM's editing recipe (DESIGN.md §2).

DDIM inversion retraces the image closely only without guidance, while edits want classifier-free guidance
(PRISM: 7.5): guided sampling from the inverted x_T drifts off the inversion and the reconstruction loses the
patient. Null-text inversion keeps the prompt and the weights and instead optimises the unconditional ("null")
embedding, one per timestep: at step t, Adam moves it until the guided DDIM step from the current latent lands on
the inversion's x_{t-1}; sampling then continues from that guided step. The optimised embeddings, fed to
Prompt-to-Prompt's unconditional rows, make its source branch reproduce the image, and the targets inherit that
fidelity.

Choices, from the paper's public code where it made one: `inner_steps` Adam steps per timestep (10), learning
rate 1e-2 decaying linearly to half over the schedule, an early stop once an image's loss is below `early_stop`
(checked before the step, so a converged image spends no backward pass and its last forward serves the guided
step; the original steps once more and then re-evaluates both branches). The schedule's early-stop threshold
does not loosen with the step as the original's does (1e-5 + 2e-5 x step): one threshold, from the config. Every image has its own embedding, optimiser state and early stop, so an image's result does not depend on
its batch companions' losses. The optimisation runs in fp32 whatever the pipeline's dtype (bf16 gradients of a
loss this small are noise); gradients are taken for the embeddings only, never accumulated into the UNet's
weights. At guidance 1 the unconditional embedding has no effect, so nothing is optimised.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers import DDIMScheduler

from cfgen.editing.ddim import ddim_trajectory
from cfgen.editing.inversion_cache import BatchInversions, split_images
from cfgen.editing.prompt_to_prompt import PromptToPromptSettings, sweep_edit
from cfgen.models.sd import encode_prompts

LEARNING_RATE = 1e-2


@contextmanager
def float32(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The module in fp32 for the duration (bf16 -> fp32 -> bf16 is lossless), then back in its own dtype."""
    dtype = module.dtype
    if dtype == torch.float32:  # diffusers warns on every `to()` of a UNet, even a no-op one
        yield module
        return
    module.to(torch.float32)
    try:
        yield module
    finally:
        module.to(dtype)


def _per_image_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).pow(2).flatten(1).mean(dim=1)


def null_text_optimise(unet, scheduler, trajectory: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                       guidance_scale: float, num_inference_steps: int, inner_steps: int = 10,
                       early_stop: float = 1e-5) -> torch.Tensor:
    """Null embeddings [N, B, L, D] (fp32, step 0 = x_T's) under which guided DDIM sampling from trajectory[-1]
    retraces the inversion `trajectory` [N+1, B, C, h, w]. `cond`/`uncond` [B, L, D]: factual and empty prompt."""
    forward = DDIMScheduler.from_config(scheduler.config)
    forward.set_timesteps(num_inference_steps, device=trajectory.device)
    trajectory, cond = trajectory.float(), cond.float()
    nulls = [e.detach().float().clone() for e in uncond]
    per_step: list[torch.Tensor] = []
    x = trajectory[-1]
    with float32(unet):
        for k, t in enumerate(forward.timesteps):
            target = trajectory[num_inference_steps - 1 - k]
            with torch.no_grad():
                eps_cond = unet(x, t, encoder_hidden_states=cond).sample
            lr = LEARNING_RATE * (1.0 - k / (2 * num_inference_steps))
            nulls, eps_uncond = _fit_nulls(unet, forward, x, t, target, eps_cond, nulls, guidance_scale, lr,
                                           inner_steps, early_stop)
            per_step.append(torch.stack(nulls))
            with torch.no_grad():
                eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
                x = forward.step(eps, t, x, eta=0.0).prev_sample
    return torch.stack(per_step)


def _fit_nulls(unet, forward: DDIMScheduler, x: torch.Tensor, t, target: torch.Tensor, eps_cond: torch.Tensor,
               nulls: list[torch.Tensor], guidance_scale: float, lr: float, inner_steps: int, early_stop: float):
    """One timestep's optimisation: (the images' null embeddings, their unconditional noise predictions)."""
    params = [n.clone().requires_grad_(True) for n in nulls]
    optimiser = torch.optim.Adam(params, lr=lr)
    eps_uncond: list[torch.Tensor | None] = [None] * len(params)
    active = list(range(len(params)))
    for _ in range(inner_steps):
        with torch.enable_grad():
            pred = unet(x[active], t, encoder_hidden_states=torch.stack([params[i] for i in active])).sample
            guided = pred + guidance_scale * (eps_cond[active] - pred)
            loss = _per_image_mse(forward.step(guided, t, x[active], eta=0.0).prev_sample, target[active])
        converged = (loss < early_stop).tolist()
        for i, done, e in zip(active, converged, pred):
            if done:
                eps_uncond[i] = e.detach()
        still = [j for j, done in enumerate(converged) if not done]
        if not still:
            active = []
            break
        grads = torch.autograd.grad(loss[still].sum(), [params[active[j]] for j in still])
        for j, g in zip(still, grads):
            params[active[j]].grad = g
        optimiser.step()  # parameters without a gradient (converged images) are left as they are
        optimiser.zero_grad(set_to_none=True)
        active = [active[j] for j in still]
    if active:  # the last Adam step moved these embeddings: their prediction is made once more
        with torch.no_grad():
            pred = unet(x[active], t, encoder_hidden_states=torch.stack([params[i] for i in active])).sample
        for i, e in zip(active, pred):
            eps_uncond[i] = e
    return [p.detach() for p in params], torch.stack(eps_uncond)


def null_text_embeddings(pipe, trajectory: torch.Tensor, factual_prompts: list[str], num_inference_steps: int,
                         guidance_scale: float, inner_steps: int, early_stop: float,
                         inversions: BatchInversions) -> torch.Tensor:
    """[N, B, L, D] optimised null embeddings, reused from `inversions` where an image's were made before."""

    def optimise(indices: list[int]):
        nulls = null_text_optimise(pipe.unet, pipe.scheduler, trajectory[:, indices],
                                   encode_prompts(pipe, [factual_prompts[i] for i in indices]),
                                   encode_prompts(pipe, [""] * len(indices)), guidance_scale, num_inference_steps,
                                   inner_steps, early_stop)
        return split_images({"null_embeddings": nulls})

    settings = {"steps": num_inference_steps, "guidance": guidance_scale, "inner_steps": inner_steps,
                "early_stop": early_stop}
    return inversions.stacked("null_text", factual_prompts, settings, optimise)["null_embeddings"]


def null_text_edit(pipe, latents: torch.Tensor, factual_prompts: list[str], counterfactual_prompts: list[list[str]],
                   num_inference_steps: int, guidance_scale: float, settings: PromptToPromptSettings,
                   inner_steps: int, early_stop: float, inversions: BatchInversions,
                   latent_mask: torch.Tensor | None = None):
    """The `null_text` method: DDIM inversion (guidance 1), null-text optimisation at `guidance_scale`, then the
    Prompt-to-Prompt sweep from x_T with the optimised null embeddings."""
    trajectory = ddim_trajectory(pipe, latents, factual_prompts, num_inference_steps, inversions)
    nulls = None  # at guidance 1 the unconditional embedding plays no part: nothing to optimise
    if guidance_scale != 1.0:
        nulls = null_text_embeddings(pipe, trajectory, factual_prompts, num_inference_steps, guidance_scale,
                                     inner_steps, early_stop, inversions)
    return sweep_edit(pipe, trajectory, factual_prompts, counterfactual_prompts, settings, num_inference_steps,
                      guidance_scale, null_embeddings=nulls, latent_mask=latent_mask)
