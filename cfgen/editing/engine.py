"""The editing engine: images + factual prompts + edits -> counterfactuals, the null edit and the UNet work spent.

One entry point (`counterfactuals`) for every method, so the batch job, Serve and the benchmarks edit the same
way. A method returns decoded images (the edited ones and the null edit, i.e. the same procedure with the factual
prompt); the engine then keeps the input outside the change:

- ``composite`` (pixel-space compositing): counterfactual = input + (edited - null edit). The autoencoder's error
  and the sampler's drift are common to both decodes and cancel, so the patient's own pixels (grain, noise, fine
  texture that a 4:1 latent cannot hold, DESIGN.md §3) survive wherever the edit changes nothing.
- ``mask`` (confinement): the change is applied only inside a region (lungs, a device box, a user's mask): in
  latent space during sampling where the method supports it (DDIM: blend with the inversion trajectory outside
  the mask, as RadEdit does), and always in pixel space on the composite.

Methods (each its own module): ``ddim`` (DDIM inversion with the factual prompt + regeneration, `ddim.py`),
``sdedit`` (partial noising at a strength + DDIM denoising, `sdedit.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cfgen.editing.counting import CountingUNet

METHODS = ("ddim", "sdedit")


@dataclass
class EngineResult:
    counterfactuals: list[np.ndarray]  # one float32 [B,H,W] in [0,1] per edit, after compositing / confinement
    null_edit: np.ndarray  # the method's own reconstruction (factual prompt), before compositing
    autoencoded: np.ndarray  # decode(encode(image)): the autoencoder's share of any error
    raw_counterfactuals: list[np.ndarray]  # the decoded edits before compositing
    unet_forward: float  # UNet rows evaluated per counterfactual (shared inversion and null edit amortised)
    unet_backward: float  # rows that a backward pass went through, per counterfactual
    unet_forward_per_image: int  # all edits of one image together

    @property
    def unet_evaluations(self) -> int:
        return self.unet_forward_per_image


def _latent_mask(mask: np.ndarray, latent_shape: tuple[int, ...], device, dtype) -> torch.Tensor:
    m = torch.from_numpy(np.asarray(mask, dtype=np.float32)).unsqueeze(1)
    m = torch.nn.functional.adaptive_max_pool2d(m, latent_shape[-2:])  # a latent cell touching the mask is inside
    return m.to(device=device, dtype=dtype)


def _unit(images: np.ndarray) -> np.ndarray:
    from cfgen.metrics.image import as_unit_float

    return as_unit_float(np.asarray(images))


def keep_input_outside_change(image: np.ndarray, edited: np.ndarray, null_edit: np.ndarray, composite: bool,
                              mask: np.ndarray | None) -> np.ndarray:
    """The engine's pixel-space step: the composite input + (edited - null edit) and/or the mask blend."""
    x = _unit(image)
    out = np.clip(x + (edited - null_edit), 0.0, 1.0) if composite else edited
    if mask is not None:
        m = np.asarray(mask, dtype=np.float32)
        out = x + m * (out - x)
    return out.astype(np.float32)


def counterfactuals(
    pipe,
    images: np.ndarray,
    factual_prompts: list[str],
    counterfactual_prompts: list[list[str]],
    method: str = "ddim",
    num_inference_steps: int = 20,
    guidance_scale: float = 1.0,
    strength: float = 0.6,
    composite: bool = True,
    masks: np.ndarray | None = None,
    seeds: list[int] | None = None,
) -> EngineResult:
    """Edit `images` [B,H,W] once per list of `counterfactual_prompts` (each B prompts).

    `masks` [B,H,W] (values in [0,1]) confine every edit to a region; `seeds` (one per image) seed the noise of
    stochastic methods, so an image's counterfactual does not depend on the batch it was edited in."""
    if method not in METHODS:
        raise ValueError(f"unknown editing method {method!r}; one of {METHODS}")
    from cfgen.models.sd import decode_latents, encode_images

    unet = pipe.unet
    counter = CountingUNet(unet)
    pipe.unet = counter
    try:
        latents = encode_images(pipe, images)
        latent_mask = None if masks is None else _latent_mask(masks, latents.shape, latents.device, latents.dtype)
        if method == "ddim":
            from cfgen.editing.ddim import ddim_edit

            edited, null = ddim_edit(pipe, latents, factual_prompts, counterfactual_prompts, num_inference_steps,
                                     guidance_scale, latent_mask)
        else:
            from cfgen.editing.sdedit import sdedit

            edited, null = sdedit(pipe, latents, factual_prompts, counterfactual_prompts, num_inference_steps,
                                  strength, guidance_scale, seeds or list(range(len(images))))
        autoencoded = decode_latents(pipe, latents)
    finally:
        pipe.unet = unet
    raw = [decode_latents(pipe, z) for z in edited]
    null_image = decode_latents(pipe, null)
    outputs = [keep_input_outside_change(images, r, null_image, composite, masks) for r in raw]
    n_cf = max(1, len(images) * len(counterfactual_prompts))
    return EngineResult(
        counterfactuals=outputs, null_edit=null_image, autoencoded=autoencoded, raw_counterfactuals=raw,
        unet_forward=counter.forward_rows / n_cf, unet_backward=counter.backward_rows / n_cf,
        unet_forward_per_image=counter.forward_rows // max(1, len(images)),
    )
