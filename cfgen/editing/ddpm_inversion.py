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

Directed editing (`EditDirection`, LEDITS++'s idea with the factual prompt as the reference): the image's own
noise maps hold its structure so firmly that a small object (a device lead, a fluid meniscus) barely moves at
guidance 1, while plain classifier-free guidance strong enough to move it drives the whole image towards the
prompt. Instead every step predicts eps(x, factual) + scale * M * (eps(x, edited) - eps(x, factual)): the edit's
own direction, amplified, and applied only where it is large (M: the cells whose smoothed direction magnitude is
in the top `1 - threshold` of the image, an implicit mask). With the factual prompt the direction is zero, so
reconstruction stays exact; scale 1 and threshold 0 is the plain edit.

Held attributes (`Hold`): a model trained on data where two findings co-occur (effusion with support devices)
learns to draw both for either word, so its edit direction for one carries the other (bench/RESULTS.md measured
do(effusion) adding the device). An intervention must keep every other attribute as it is, so for each attribute
the edit holds, the same UNet call also evaluates the counterfactual prompt with that attribute changed; the
difference gamma = eps(x, edited with B changed) - eps(x, edited) is the direction "B changes too" at this x, and
its component is removed from the edit's direction in every latent cell (over channels), weighted by where B acts:
by |gamma|^2 / (|gamma|^2 + mean |gamma|^2) of the image, so cells where B has no direction lose nothing. Read in
the edited context, gamma carries little of the edit itself even where the model ties A to B both ways; read off
the factual prompt it carried A too (the model's "device" direction adds effusion) and took the whole edit away
(bench/RESULTS.md). The idea is the negative concept of SEGA/LEDITS++, applied as a projection so that an edit
that does not move B is left alone. An image whose edit is its factual prompt gets no held rows: its direction is
zero, and reconstruction stays exact. It costs one UNet row per held attribute per step.

Renoising (`EditDirection.renoise`): inside the implicit mask the noise maps still hold what the edit should take
away (a removed device's outline is in them, so the sampler redraws part of it). With renoise r, the map of a
masked cell becomes sqrt(1 - r) z_t + sqrt(r) n_t with fresh noise n_t from the image's own seed: still unit
variance, less of the image's structure, so the model's prior for the edited prompt fills the masked cells, as
an inpainting sampler would. Outside the mask, and for a row whose edit is its factual prompt, the maps are kept,
so reconstruction stays exact. It costs no UNet work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler

from cfgen.editing.ddim import guided_noise_prediction
from cfgen.editing.inversion_cache import BatchInversions, split_images
from cfgen.editing.sdedit import seeded_noise
from cfgen.models.sd import encode_prompts


@dataclass(frozen=True)
class EditDirection:
    """Directed editing's settings (module docstring): `scale` on the edit's direction, implicit-mask `threshold`
    (the quantile of the direction's magnitude below which a latent cell is left alone; 0: no mask). A tuple of
    scales is a sweep: every edit is made at each of them, one candidate per scale (`ddpm_edit`)."""

    scale: float | tuple[float, ...] = 1.0
    threshold: float = 0.0
    renoise: float = 0.0  # share of fresh noise in the masked cells' noise maps (module docstring)

    def __post_init__(self):
        scales = tuple(float(s) for s in self.scale) if isinstance(self.scale, (tuple, list)) else (float(self.scale),)
        if not scales:
            raise ValueError("edit_guidance: a sweep needs at least one scale")
        if min(scales) < 0:
            raise ValueError(f"edit_guidance must be >= 0, got {self.scale}")
        if len(set(scales)) != len(scales):
            raise ValueError(f"edit_guidance: a sweep's scales must differ, got {list(scales)}")
        object.__setattr__(self, "scale", scales if len(scales) > 1 else scales[0])
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"edit_threshold is a quantile in [0, 1), got {self.threshold}")
        if not 0.0 <= self.renoise <= 1.0:
            raise ValueError(f"edit_renoise is a share of fresh noise in [0, 1], got {self.renoise}")

    @property
    def scales(self) -> tuple[float, ...]:
        """The scales the edit is made at: one, or a sweep's."""
        return self.scale if isinstance(self.scale, tuple) else (self.scale,)

    @property
    def plain(self) -> bool:
        return self.scales == (1.0,) and self.threshold == 0.0 and self.renoise == 0.0


def implicit_mask(direction: torch.Tensor, threshold: float) -> torch.Tensor:
    """[B,1,h,w] 1 where the direction's channel-mean magnitude, smoothed over 3x3 cells, reaches the image's
    `threshold` quantile (per image, so a batch's composition does not change it)."""
    magnitude = F.avg_pool2d(direction.abs().mean(1, keepdim=True), 3, stride=1, padding=1,
                             count_include_pad=False)
    if threshold <= 0:
        return torch.ones_like(magnitude)
    cut = torch.quantile(magnitude.flatten(1), threshold, dim=1)[:, None, None, None]
    return (magnitude >= cut).to(direction.dtype)


@dataclass(frozen=True)
class Hold:
    """One held attribute for some rows of a batch: `rows` (indices into the batch) and `embeddings` [len(rows), L,
    D] of their edited prompts with that attribute changed (module docstring). Rows are unique within a Hold."""

    rows: torch.Tensor
    embeddings: torch.Tensor


def remove_held_direction(delta: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """`delta` [B,C,h,w] without its component along `gamma` (per latent cell, over channels), weighted by where
    gamma acts: |gamma|^2 / (|gamma|^2 + the image's mean |gamma|^2)."""
    power = (gamma * gamma).sum(1, keepdim=True)
    along = (delta * gamma).sum(1, keepdim=True) / power.clamp_min(1e-20)
    weight = power / (power + power.mean(dim=(2, 3), keepdim=True)).clamp_min(1e-20)
    return delta - weight * along * gamma


def directed_noise_prediction(unet, x: torch.Tensor, t, cond: torch.Tensor, source: torch.Tensor,
                              uncond: torch.Tensor | None, guidance_scale: float,
                              direction: EditDirection, holds: list[Hold] = (),
                              scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps(x, source) (classifier-free guided at `guidance_scale`) + scale * M * delta, M [B,1,h,w]) with delta =
    eps(x, cond) - eps(x, source) without the directions of the `holds`, in one UNet call on [uncond; source; cond;
    held] rows. M is 0 on a row whose delta is 0 (its edit is its factual prompt). `scale` [B,1,1,1]: each row's
    own (a sweep's rows), else the direction's one scale."""
    guided = uncond is not None and guidance_scale != 1.0
    contexts = [uncond, source, cond] if guided else [source, cond]
    inputs = [x] * len(contexts) + [x[h.rows] for h in holds]
    out = unet(torch.cat(inputs).to(unet.dtype), t,
               encoder_hidden_states=torch.cat(contexts + [h.embeddings for h in holds])).sample.float()
    out, held = out[:len(contexts) * len(x)].chunk(len(contexts)), out[len(contexts) * len(x):]
    eps_source, eps_cond = out[-2], out[-1]
    base = out[0] + guidance_scale * (eps_source - out[0]) if guided else eps_source
    delta = eps_cond - eps_source
    for hold, eps_held in zip(holds, held.split([len(h.rows) for h in holds])):
        delta = delta.index_copy(0, hold.rows, remove_held_direction(delta[hold.rows],
                                                                     eps_held - eps_cond[hold.rows]))
    mask = implicit_mask(delta, direction.threshold) * (delta.flatten(1).abs().amax(1) > 0)[:, None, None, None]
    if scale is None:
        (scale,) = direction.scales
    return base + scale * mask * delta, mask


#: mixed into an image's seed for its renoising noise, so that it differs from the inversion's eps_t
_RENOISE_SEED = 0x5EED_F4E5


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
                skip: float = 0.0, latent_mask: torch.Tensor | None = None, source: torch.Tensor | None = None,
                direction: EditDirection | None = None, holds: list[Hold] = (),
                fresh: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> torch.Tensor:
    """The DDPM sampler driven by the inversion's noise `maps` from the trajectory's level at `skip`; with the
    factual prompt it retraces `trajectory`. With `latent_mask` [B,1,h,w], the trajectory is kept outside it.
    With `direction` (not plain) or `holds`, and the factual embeddings `source`, every step is a directed edit;
    `fresh` (shaped like `maps`) is the new noise a renoising direction mixes into its masked cells; `scale`
    [B,1,1,1] each row's direction scale (a sweep's rows)."""
    schedule = _schedule(scheduler, num_inference_steps, trajectory.device)
    start = start_step(skip, num_inference_steps)
    direction = direction or EditDirection()
    directed = not direction.plain or bool(holds)
    if directed and source is None:
        raise ValueError("a directed DDPM edit (or one that holds attributes) needs the factual prompt's "
                         "embeddings (source)")
    if direction.renoise and fresh is None:
        raise ValueError("a renoising DDPM edit needs fresh noise shaped like the noise maps")
    x = trajectory[num_inference_steps - start]
    for k in range(start, num_inference_steps):
        t = schedule.timesteps[k]
        z = maps[k]
        if directed:
            eps, mask = directed_noise_prediction(unet, x, t, cond, source, uncond, guidance_scale, direction, holds,
                                                  scale)
            if direction.renoise:
                r = direction.renoise
                z = z + mask * (((1 - r) ** 0.5 - 1) * z + r ** 0.5 * fresh[k])
        else:
            eps = _eps(unet, x, t, cond, uncond, guidance_scale)
        mean, sigma = ddpm_posterior(schedule, eps, int(t), x)
        x = mean + sigma * z
        if latent_mask is not None:
            x = latent_mask * x + (1 - latent_mask) * trajectory[num_inference_steps - 1 - k]
    return x


def ddpm_edit(pipe, latents: torch.Tensor, factual_prompts: list[str], counterfactual_prompts: list[list[str]],
              num_inference_steps: int, guidance_scale: float, skip: float, seeds: list[int],
              inversions: BatchInversions, latent_mask: torch.Tensor | None = None,
              direction: EditDirection | None = None, hold_prompts: list[list[list[str]]] | None = None):
    """The `ddpm` method: (edited latents [edit][scale of the direction's sweep; one without a sweep], null edit =
    the encoded latents). Every edit at every scale runs in one batch with the same noise maps; the noise of each
    image comes from its own seed. `direction`: directed editing; `hold_prompts` [edit][held attribute][image]:
    the edited prompts with each held attribute changed (module docstring)."""
    n, steps = len(latents), num_inference_steps
    direction = direction or EditDirection()
    scales = direction.scales
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
    # a sweep's rows: every edit once per scale, scale-major (row (s * k + e) * n + i)
    k, m = len(counterfactual_prompts), len(counterfactual_prompts) * len(scales)
    prompts = [p for _ in scales for p in counterfactual_prompts]
    holds = [h for _ in scales for h in hold_prompts] if hold_prompts else []
    cond = torch.cat([encode_prompts(pipe, p) for p in prompts])
    row_scale = None
    if len(scales) > 1:
        row_scale = torch.tensor(scales, device=latents.device).repeat_interleave(k * n)[:, None, None, None]
    fresh = None
    if direction.renoise:  # from the image's seed, apart from the inversion's noise
        fresh = seeded_noise((n, steps, *latents.shape[1:]), [_RENOISE_SEED ^ int(s) for s in seeds],
                             latents.device, torch.float32).transpose(0, 1).repeat(1, m, 1, 1, 1)
    edited = ddpm_sample(pipe.unet, pipe.scheduler, inverted["trajectory"].repeat(1, m, 1, 1, 1),
                         inverted["noise_maps"].repeat(1, m, 1, 1, 1), cond, steps,
                         None if uncond is None else uncond.repeat(m, 1, 1), guidance_scale, skip,
                         None if latent_mask is None else latent_mask.repeat(m, 1, 1, 1),
                         encode_prompts(pipe, factual_prompts).repeat(m, 1, 1), direction,
                         held_rows(pipe, factual_prompts, prompts, holds, latents.device),
                         fresh, row_scale)
    chunks = [z.to(latents.dtype) for z in edited.split(n)]
    return [[chunks[s * k + e] for s in range(len(scales))] for e in range(k)], \
        inverted["trajectory"][0].to(latents.dtype)


def held_rows(pipe, factual_prompts: list[str], counterfactual_prompts: list[list[str]],
              hold_prompts: list[list[list[str]]], device) -> list[Hold]:
    """One `Hold` per (edit, held attribute) over the batch of every edit's rows (edit e's image i is row
    e * n + i); an image whose edit is its factual prompt (nothing to hold) or whose held prompt is its edited one
    is left out, at no UNet cost."""
    n, holds = len(factual_prompts), []
    for e, per_edit in enumerate(hold_prompts):
        for prompts in per_edit:
            if len(prompts) != n:
                raise ValueError(f"hold_prompts: {len(prompts)} prompts for a batch of {n} images")
            edited = counterfactual_prompts[e]
            rows = [i for i in range(n) if edited[i] != factual_prompts[i] and prompts[i] != edited[i]]
            if rows:
                holds.append(Hold(torch.tensor([e * n + i for i in rows], device=device),
                                  encode_prompts(pipe, [prompts[i] for i in rows])))
    return holds
