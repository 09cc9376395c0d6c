"""Plain diffusers doing what the engine does, for the edit benchmark's speed comparison (DESIGN.md §6).

Each peer is what a diffusers user would write for the method, on the same loaded model, images, prompts, steps
and guidance as the engine:

- SDEdit: `StableDiffusionImg2ImgPipeline` (from_pipe of the loaded pipeline), one call per edit for a batch.
- DDIM inversion + regeneration: a hand loop with `DDIMInverseScheduler` and the UNet (guided like the engine's
  inversion), then the plain `StableDiffusionPipeline` from x_T with the edited prompt's embeddings.
- Edit-friendly DDPM inversion: `LEditsPPPipelineStableDiffusion`, `invert()` then one call per edit. Its quirks
  in diffusers 0.42.1 (DESIGN.md §6): `invert()` fails with DDIMScheduler, so it gets DPMSolverMultistepScheduler
  (SDE-DPM-Solver++, `final_sigmas_type="sigma_min"`, the only setting that reconstructs exactly, with 15+ steps);
  its intersect mask needs an SD-v1-like 4-block UNet, so edits run without masks (plain edit guidance
  uncond + s (edit - uncond), which at the engine's guidance is the engine's sampling); `invert()` takes one source
  prompt per batch and a call applies the same editing prompts to every image of the batch, so per-image prompts
  mean one image per call; `invert()` fails (a None embedding) unless source_guidance_scale > 1, and with a source
  prompt it then takes encode_prompt's outputs in the other order (the source prompt's embedding as the
  unconditional branch), so at guidance 1 the peer inverts the documented way without a source prompt (one UNet
  row per step, as the engine's inversion at guidance 1), and with the factual prompt above it; and it swaps the
  shared UNet's attention processors for the slower `AttnProcessor` and leaves them swapped, so `ledits_pp`
  restores them and must run after the other comparisons.

Every peer returns the counterfactuals as float [B,H,W] in [0,1] per edit, like the engine's raw output, so the
benchmark can check that it did comparable work (the DDIM peer should match the engine's raw DDIM edit).

The engine's side (`engine_edits`) does the same work as a peer: the raw edits only, without compositing, mask or
the null edit (which a plain diffusers loop never makes, and which cost the engine's SDEdit and DDIM a fifth more
UNet rows with the benchmark's 4 edits).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


def _rgb(images: np.ndarray) -> np.ndarray:
    """Grayscale [B,H,W] uint8 -> float [B,H,W,3] in [0,1], the numpy form diffusers' image processor takes."""
    from cfgen.metrics.image import as_unit_float

    return np.repeat(as_unit_float(images)[..., None], 3, axis=-1)


def _gray(images: np.ndarray) -> np.ndarray:
    return np.asarray(images, dtype=np.float32).mean(axis=-1)


def _batches(n: int, size: int) -> list[slice]:
    return [slice(s, s + size) for s in range(0, n, size)]


def sdedit_img2img(pipe, images: np.ndarray, counterfactual_prompts: list[list[str]], strength: float,
                   num_inference_steps: int, guidance_scale: float, seeds: list[int], batch: int) -> list[np.ndarray]:
    """SDEdit with diffusers' img2img pipeline; it runs int(steps x strength) steps, as the engine does."""
    from diffusers import StableDiffusionImg2ImgPipeline

    img2img = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    img2img.set_progress_bar_config(disable=True)
    rgb = _rgb(images)
    out = [[] for _ in counterfactual_prompts]
    for sl in _batches(len(images), batch):
        for e, prompts in enumerate(counterfactual_prompts):
            generators = [torch.Generator().manual_seed(int(s)) for s in seeds[sl]]
            result = img2img(prompt=prompts[sl], image=rgb[sl], strength=strength,
                             num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                             generator=generators, output_type="np")
            out[e].append(_gray(result.images))
    return [np.concatenate(o) for o in out]


@torch.no_grad()
def ddim_inverse_then_generate(pipe, images: np.ndarray, factual_prompts: list[str],
                               counterfactual_prompts: list[list[str]], num_inference_steps: int,
                               guidance_scale: float, batch: int) -> list[np.ndarray]:
    """DDIM inversion by hand with `DDIMInverseScheduler`, then `pipe(prompt_embeds=..., latents=x_T)`."""
    from diffusers import DDIMInverseScheduler

    device = pipe.unet.device
    guided = guidance_scale > 1.0
    inverse = DDIMInverseScheduler.from_config(pipe.scheduler.config)
    inverse.set_timesteps(num_inference_steps, device=device)
    x = torch.from_numpy(_rgb(images)).permute(0, 3, 1, 2).to(device=device, dtype=pipe.vae.dtype) * 2 - 1
    out = [[] for _ in counterfactual_prompts]
    for sl in _batches(len(images), batch):
        latents = pipe.vae.encode(x[sl]).latent_dist.mode() * pipe.vae.config.scaling_factor
        cond, uncond = pipe.encode_prompt(factual_prompts[sl], device, 1, guided)
        for t in inverse.timesteps:
            if guided:
                eps_uncond, eps_cond = pipe.unet(torch.cat([latents] * 2), t,
                                                 encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
                eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
            else:
                eps = pipe.unet(latents, t, encoder_hidden_states=cond).sample
            latents = inverse.step(eps, t, latents).prev_sample
        for e, prompts in enumerate(counterfactual_prompts):
            edit_cond, edit_uncond = pipe.encode_prompt(prompts[sl], device, 1, guided)
            result = pipe(prompt_embeds=edit_cond, negative_prompt_embeds=edit_uncond, latents=latents,
                          num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, output_type="np")
            out[e].append(_gray(result.images))
    return [np.concatenate(o) for o in out]


def ledits_pp(pipe, images: np.ndarray, factual_prompts: list[str], counterfactual_prompts: list[list[str]],
              num_inference_steps: int, guidance_scale: float, skip: float, seeds: list[int]) -> list[np.ndarray]:
    """Edit-friendly DDPM inversion with LEDITS++, one image per call (see the module's docstring). It samples as
    many steps as the engine does after its skip, on the same `num_inference_steps` schedule."""
    from diffusers import DPMSolverMultistepScheduler, LEditsPPPipelineStableDiffusion

    from cfgen.editing.ddpm_inversion import start_step

    scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="sde-dpmsolver++",
                                                        solver_order=2, final_sigmas_type="sigma_min")
    saved = pipe.unet.attn_processors
    ledits = LEditsPPPipelineStableDiffusion.from_pipe(pipe, scheduler=scheduler)
    ledits.set_progress_bar_config(disable=True)
    sampled = num_inference_steps - start_step(skip, num_inference_steps)
    # LEDITS schedules int(sampled x (1 + skip)) steps and samples the last `sampled`: this skip makes that
    # schedule the engine's `num_inference_steps` (the 0.5 keeps int() off the rounding edge)
    ledits_skip = (num_inference_steps + 0.5 - sampled) / sampled
    rgb = _rgb(images)
    out = [[] for _ in counterfactual_prompts]
    try:
        for i in range(len(images)):
            guided = guidance_scale > 1.0
            ledits.invert(image=rgb[i:i + 1], source_prompt=factual_prompts[i] if guided else "",
                          source_guidance_scale=guidance_scale if guided else 3.5,  # unused without a prompt
                          num_inversion_steps=sampled, skip=ledits_skip,
                          generator=torch.Generator().manual_seed(int(seeds[i])))
            for e, prompts in enumerate(counterfactual_prompts):
                result = ledits(editing_prompt=[prompts[i]], edit_guidance_scale=guidance_scale,
                                use_cross_attn_mask=False, use_intersect_mask=False, output_type="np")
                out[e].append(_gray(result.images))
    finally:
        pipe.unet.set_attn_processor(dict(saved))  # LEDITS leaves its slow processors on the shared UNet
    return [np.concatenate(o) for o in out]


def engine_edits(pipe, images: np.ndarray, factual_prompts: list[str], counterfactual_prompts: list[list[str]],
                 edit, seeds: list[int], batch: int) -> list[np.ndarray]:
    """The engine's raw counterfactuals per edit with `edit`'s (an `EditConfig`) method and settings, in batches of
    `batch` images as the peers run, with a fresh inversion cache (a peer reuses nothing either)."""
    from cfgen.editing.engine import counterfactuals, engine_options
    from cfgen.editing.inversion_cache import InversionCache

    options = {**engine_options(edit), "composite": False}
    cache = InversionCache()
    out = [[] for _ in counterfactual_prompts]
    for sl in _batches(len(images), batch):
        result = counterfactuals(pipe, images[sl], factual_prompts[sl], [p[sl] for p in counterfactual_prompts],
                                 seeds=seeds[sl], inversion_cache=cache, null_edit=False, **options)
        for e, raw in enumerate(result.raw_counterfactuals):
            out[e].append(raw)
    return [np.concatenate(o) for o in out]


def counted(pipe, run: Callable[[], list[np.ndarray]]) -> tuple[list[np.ndarray], float, int]:
    """(outputs, seconds, UNet rows evaluated) of `run()`, with the pipeline's UNet counted as the engine counts
    its own (`CountingUNet`); pipelines made with from_pipe during `run` share the wrapper."""
    import time

    from cfgen.editing.counting import CountingUNet

    unet = pipe.unet
    counter = CountingUNet(unet)
    pipe.unet = counter
    try:
        started = time.perf_counter()
        outputs = run()
        seconds = time.perf_counter() - started
    finally:
        pipe.unet = unet
    return outputs, seconds, counter.forward_rows
