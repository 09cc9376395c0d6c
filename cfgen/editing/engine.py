"""The editing engine: images + factual prompts + edits -> counterfactuals, the null edit and the UNet work spent.

One entry point (`counterfactuals`) for every method, so the batch job, Serve and the benchmarks edit the same
way. A method returns latents (the edited ones and the null edit, i.e. the same procedure with the factual
prompt in place of the edited one), which the engine decodes; it then keeps the input outside the change:

- ``composite`` (pixel-space compositing): counterfactual = input + (edited - null edit). The autoencoder's error
  and the sampler's drift are common to both decodes and cancel, so the patient's own pixels (grain, noise, fine
  texture that a 4:1 latent cannot hold, DESIGN.md §3) survive wherever the edit changes nothing. That holds only
  if the null edit drifts exactly as the edited branch does: with an edit prompt equal to the factual one, the
  composite must return the input (the tests check it for every method with a random UNet). For the sweep
  methods the null edit is therefore per setting where the setting changes the drift (`direct`), and each
  candidate is composited against its own setting's.
- ``mask`` (confinement): the change is applied only inside a region (lungs, a device box, a user's mask): in
  latent space during sampling where the method has a source trajectory to blend with (RadEdit-style: outside the
  mask every step keeps the inversion's latent), and always in pixel space on the composite.
- ``change_threshold`` (the edit's own mask, DiffEdit's idea moved to pixel space and to after sampling): an edit
  strong enough to move a small structure (a lead, a fluid level) also shifts the whole image a little, and that
  diffuse drift outweighs the change itself in the error. The composite's difference |edited - null edit|,
  smoothed over `change_smoothing` pixels, is compared with its own maximum per image; only where it reaches
  `change_threshold` of it (grown by `change_smoothing`, with a soft edge) is the change kept; with `change_grow`,
  also the pixels connected to it whose own change reaches that fraction of the largest (hysteresis, so a line
  one pixel wide that smoothing thins below the threshold stays in). No mask or model is
  needed, so it works on any edit, including ones no segmentation covers; it cannot keep a change that is weak and
  everywhere (a diffuse one is better confined by a region mask), and it keeps whatever the edit moves most,
  wanted or not. `change_fill` says what fills the mask: ``composite`` (input + edited - null edit, the input's
  grain kept) or ``edited`` (the decoded edit itself). A removal needs the second where the autoencoder could not
  hold the structure removed (a device lead: its null edit keeps only a blur of it, so the composite subtracts the
  blur and leaves the rest of the lead standing); an addition keeps the grain better with the first.
- ``hold_prompts`` (ddpm): attributes the edit must keep (`ddpm_inversion.Hold`): a model that learned two
  findings together edits both; the direction of each held attribute is removed from the edit's at every step.

Methods (each its own module and function):

- ``ddim`` (`ddim.py`): DDIM inversion with the factual prompt + regeneration with the edited one; 150 UNet rows
  per image at 50 steps, guidance 1.
- ``sdedit`` (`sdedit.py`): partial noising at `strength`, then DDIM denoising; no inversion.
- ``p2p`` (`prompt_to_prompt.py`): DDIM inversion (guidance 1), then Prompt-to-Prompt from x_T: the source branch
  (factual prompt) and every edit at every setting of the self-attention sweep in one batch, attention maps
  swapped by attention processors.
- ``null_text`` (`null_text.py`): PRISM's recipe: DDIM inversion, null-text optimisation (fp32, early stop) at the
  guidance scale, then the Prompt-to-Prompt sweep with the optimised null embeddings.
- ``direct`` (`direct_inversion.py`): Direct Inversion (PnP Inversion): the same sweep with the source branch put
  back on the inversion at every step; no optimisation. Its null edit is a factual-prompt target row per setting
  (the pinned source is the inversion itself, no reconstruction).
- ``ddpm`` (`ddpm_inversion.py`): edit-friendly DDPM inversion (LEDITS++, RadEdit): noise maps that make the DDPM
  sampler reproduce the image exactly, re-used with the edited prompt; optional skip of the first steps; optional
  directed editing (`edit_guidance`, `edit_threshold`): the edit's direction from the factual prompt amplified
  where it is large (an implicit mask), 2 UNet rows per step instead of 1, and with a list of scales a sweep (each
  scale its own rows in the same calls, one candidate each); optional renoising (`edit_renoise`):
  fresh noise in the masked cells' noise maps, so what the edit removes is not redrawn from them (worse on every
  phantom edit so far: bench/RESULTS.md).

Inversions are cached per (image, model version, factual prompt, settings) (`inversion_cache.py`), so k edits and
every sweep setting share one, and a later call on the same image reuses it. The sweep methods return one
candidate per self-replace setting (ddpm: per direction scale); `select` (a callable scoring the candidates, e.g.
with the project's attribute classifier, DESIGN.md §2, `cfgen.metrics.selection`) picks one per image, by default
the most preserving setting (the largest self-replace, the smallest scale), and the result records the winner.

The null edit costs UNet work in `ddim` and `sdedit` (one more prompt list in the batch) and `direct` (one more row
per setting); a caller that neither composites nor reads it (a speed comparison with a plain diffusers loop that
makes only the edits) passes ``null_edit=False`` and gets None in its place.

`engine_options` maps an `EditConfig` to the engine's keyword arguments, so that every caller (the batch job, Serve,
the benchmarks) edits with the same settings from the same config.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cfgen.editing.counting import CountingUNet
from cfgen.editing.ddim import ddim_edit
from cfgen.editing.ddpm_inversion import EditDirection, ddpm_edit, start_step
from cfgen.editing.direct_inversion import direct_edit
from cfgen.editing.inversion_cache import BatchInversions, InversionCache, image_digest, model_fingerprint, \
    shared_cache
from cfgen.editing.null_text import null_text_edit
from cfgen.editing.prompt_to_prompt import PromptToPromptSettings, p2p_edit
from cfgen.editing.sdedit import sdedit
from cfgen.models.sd import decode_latents, encode_images

if TYPE_CHECKING:
    from cfgen.config import EditConfig

METHODS = ("ddim", "sdedit", "p2p", "null_text", "direct", "ddpm")
#: select(candidates, image, edit_index) -> scores [n_settings, B]: candidates is one [B,H,W] float image in [0,1]
#: per sweep setting (after compositing and confinement, i.e. what would be returned), image the input [B,H,W].
Select = Callable[[list[np.ndarray], np.ndarray, int], np.ndarray]


@dataclass
class EngineResult:
    counterfactuals: list[np.ndarray]  # one float32 [B,H,W] in [0,1] per edit, after compositing / confinement
    # the null edit: the method run with the factual prompt as the edit, decoded, before compositing; for the sweep
    # methods at the most preserving setting (the largest self_replace, the default choice): p2p's and null_text's
    # source branch (the same at every setting), direct's factual-prompt target branch. None when the call passed
    # null_edit=False and did not composite.
    null_edit: np.ndarray | None
    autoencoded: np.ndarray  # decode(encode(image)): the autoencoder's share of any error
    raw_counterfactuals: list[np.ndarray]  # the decoded edits before compositing
    unet_forward: float  # UNet rows evaluated per counterfactual (shared inversion and null edit amortised)
    unet_backward: float  # rows that a backward pass went through, per counterfactual
    unet_forward_per_image: int  # all edits of one image together
    settings: list[list[dict]] = field(default_factory=list)  # per edit, per image: the winning sweep setting
    # (e.g. {"self_replace": 0.6}); {} where the method has no sweep
    # per edit, [B,H,W]: the null edit at the setting each counterfactual was chosen at, i.e. what compositing
    # subtracted (equal to null_edit except for direct with another setting chosen); None with null_edit
    null_edits: list[np.ndarray] | None = None

    @property
    def unet_evaluations(self) -> int:
        return self.unet_forward_per_image


def engine_options(edit: EditConfig) -> dict[str, Any]:
    """`counterfactuals`' settings from the config, by name; what varies per call (the images' masks and seeds,
    `select`, the cache, the held attributes' prompts) is the caller's."""
    return dict(
        method=edit.method, num_inference_steps=edit.num_inference_steps, guidance_scale=edit.guidance_scale,
        strength=edit.strength, composite=edit.composite, cross_replace=edit.cross_replace,
        self_replace=tuple(edit.self_replace), edit_word_weight=edit.edit_word_weight,
        null_text_inner_steps=edit.null_text_inner_steps, null_text_early_stop=edit.null_text_early_stop,
        ddpm_skip=edit.ddpm_skip, edit_guidance=edit.edit_guidance, edit_threshold=edit.edit_threshold,
        edit_renoise=edit.edit_renoise,
        change_threshold=edit.change_threshold, change_smoothing=edit.change_smoothing,
        change_fill=edit.change_fill, change_grow=edit.change_grow,
    )


def _latent_mask(mask: np.ndarray, latent_shape: tuple[int, ...], device, dtype) -> torch.Tensor:
    m = torch.from_numpy(np.asarray(mask, dtype=np.float32)).unsqueeze(1)
    m = torch.nn.functional.adaptive_max_pool2d(m, latent_shape[-2:])  # a latent cell touching the mask is inside
    return m.to(device=device, dtype=dtype)


def _unit(images: np.ndarray) -> np.ndarray:
    from cfgen.metrics.image import as_unit_float

    return as_unit_float(np.asarray(images))


CHANGE_FILLS = ("composite", "edited")


def check_change_settings(threshold: float, smoothing: int, fill: str = "composite", grow: float = 0.0) -> None:
    """The change mask's settings, checked before any work (and by `change_mask` itself)."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"change_threshold is a fraction of the largest change in (0, 1), got {threshold}")
    if not 0.0 <= grow < 1.0:
        raise ValueError(f"change_grow is a fraction of the largest change in [0, 1) (0: off), got {grow}")
    if smoothing < 0:
        raise ValueError(f"change_smoothing must be >= 0 pixels, got {smoothing}")
    if fill not in CHANGE_FILLS:
        raise ValueError(f"change_fill is one of {CHANGE_FILLS}, got {fill!r}")


def change_mask(change: np.ndarray, threshold: float, smoothing: int = 2, grow: float = 0.0) -> np.ndarray:
    """[B,H,W] soft mask in [0,1] of where a change [B,H,W] is large: |change| box-smoothed over (2 smoothing + 1)
    pixels, 1 where it reaches `threshold` x its image's maximum, grown by `smoothing` pixels and feathered over as
    many. Per image, so a batch's other images do not move it; an image with no change at all gets no mask.

    `grow` > 0 adds hysteresis: the pixels whose unsmoothed |change| reaches `grow` x its image's maximum and that
    connect (8-neighbourhood) to the smoothed mask join it. Smoothing is what drops the diffuse drift, but it also
    thins a change one or two pixels wide (a lead, a line, a tube) below the threshold, and the removal then keeps
    the line; a line's own pixels change as much as the structure it leads to, the drift's do not."""
    check_change_settings(threshold, smoothing, grow=grow)
    a = torch.from_numpy(np.abs(np.asarray(change, dtype=np.float32))).unsqueeze(1)
    k = 2 * smoothing + 1

    def box(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(t, k, stride=1, padding=smoothing, count_include_pad=False) \
            if smoothing else t

    smooth = box(a)
    peak = smooth.amax(dim=(2, 3), keepdim=True)
    inside = ((smooth >= threshold * peak) & (peak > 0)).float()
    if grow > 0:
        inside = torch.from_numpy(_grown(inside.squeeze(1).numpy() > 0, a.squeeze(1).numpy(), grow)).unsqueeze(1)
    if smoothing:
        inside = torch.nn.functional.max_pool2d(inside, k, stride=1, padding=smoothing)
    return box(inside).squeeze(1).numpy().astype(np.float32)


def _grown(seed: np.ndarray, magnitude: np.ndarray, grow: float) -> np.ndarray:
    """[B,H,W] float: `seed` plus the pixels with `magnitude` >= grow x the image's maximum connected to it."""
    from scipy.ndimage import label

    out = seed.astype(np.float32)
    for i, (s, m) in enumerate(zip(seed, magnitude)):
        if not s.any():
            continue
        labels, _ = label(s | (m >= grow * m.max()), structure=np.ones((3, 3), dtype=bool))
        out[i] = np.isin(labels, np.unique(labels[s]))
    return out


def keep_input_outside_change(image: np.ndarray, edited: np.ndarray, null_edit: np.ndarray | None, composite: bool,
                              mask: np.ndarray | None, change_threshold: float = 0.0,
                              change_smoothing: int = 2, change_fill: str = "composite",
                              change_grow: float = 0.0) -> np.ndarray:
    """The engine's pixel-space step: the composite input + (edited - null edit), confined to the edit's own
    change mask (`change_threshold` > 0; inside it the composite or, with `change_fill` "edited", the edit
    itself) and/or to `mask` (the null edit is needed only to composite)."""
    x = _unit(image)
    if composite:
        delta = edited - null_edit
        if change_threshold > 0:
            inside = change_mask(delta, change_threshold, change_smoothing, change_grow)
            delta = inside * (edited - x if change_fill == "edited" else delta)
        out = np.clip(x + delta, 0.0, 1.0)
    else:
        out = edited
    if mask is not None:
        m = np.asarray(mask, dtype=np.float32)
        out = x + m * (out - x)
    return out.astype(np.float32)


def _edit_latents(method: str, pipe, latents: torch.Tensor, factual_prompts: list[str],
                  counterfactual_prompts: list[list[str]], steps: int, guidance_scale: float, strength: float,
                  seeds: list[int], latent_mask: torch.Tensor | None, p2p: PromptToPromptSettings,
                  inner_steps: int, early_stop: float, ddpm_skip: float, inversions: BatchInversions,
                  null_edit: bool, direction: EditDirection, hold_prompts: list[list[list[str]]] | None):
    """(edited latents [edit][sweep setting], null-edit latents [sweep setting] or None without `null_edit`, the
    sweep's settings) of one method."""
    common = (pipe, latents, factual_prompts, counterfactual_prompts, steps, guidance_scale)
    if method == "direct":
        edited, nulls = direct_edit(*common, p2p, inversions, latent_mask, null_edit)
        return edited, nulls, p2p.sweep
    if method in ("p2p", "null_text"):  # the source branch, which every setting shares, is the null edit
        edited, source = p2p_edit(*common, p2p, inversions, latent_mask) if method == "p2p" else \
            null_text_edit(*common, p2p, inner_steps, early_stop, inversions, latent_mask)
        return edited, [source] * len(p2p.sweep) if null_edit else None, p2p.sweep
    if method == "ddpm":  # a sweep of direction scales: one candidate per scale, the null edit the same for all
        edited, null = ddpm_edit(*common, ddpm_skip, seeds, inversions, latent_mask, direction, hold_prompts)
        sweep = [{"edit_guidance": s} for s in direction.scales] if len(direction.scales) > 1 else [{}]
        return edited, [null] * len(sweep) if null_edit else None, sweep
    if method == "sdedit":
        edited, null = sdedit(pipe, latents, factual_prompts, counterfactual_prompts, steps, strength,
                              guidance_scale, seeds, null_edit)
    else:
        edited, null = ddim_edit(*common, latent_mask, null_edit)
    return [[z] for z in edited], [null] if null_edit else None, [{}]


def _decode_once(pipe, latents: list[torch.Tensor]) -> list[np.ndarray]:
    """Every latent decoded; one shared by several settings is decoded once."""
    decoded: dict[int, np.ndarray] = {}
    for z in latents:
        if id(z) not in decoded:
            decoded[id(z)] = decode_latents(pipe, z)
    return [decoded[id(z)] for z in latents]


def _most_preserving(sweep: list[dict]) -> int:
    """The sweep setting that changes the image least: the largest self-replace fraction, the smallest direction
    scale (the one setting of a method without a sweep)."""
    if any("edit_guidance" in s for s in sweep):
        return int(np.argmin([s["edit_guidance"] for s in sweep]))
    return int(np.argmax([s.get("self_replace", 0.0) for s in sweep]))


def _winners(candidates: list[np.ndarray], images: np.ndarray, edit_index: int, sweep: list[dict],
             select: Select | None) -> np.ndarray:
    """The index of the chosen sweep setting for every image."""
    n_settings, n = len(candidates), len(images)
    if n_settings == 1:
        return np.zeros(n, dtype=int)
    if select is None:
        return np.full(n, _most_preserving(sweep))
    scores = np.asarray(select(candidates, images, edit_index), dtype=np.float64)
    if scores.shape != (n_settings, n):
        raise ValueError(f"select must return scores of shape (n_settings, B) = {(n_settings, n)}, got "
                         f"{scores.shape}")
    return scores.argmax(axis=0)


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
    *,
    cross_replace: float = 0.8,
    self_replace: Sequence[float] = (0.4, 0.6, 0.8),
    edit_word_weight: float = 2.0,
    null_text_inner_steps: int = 10,
    null_text_early_stop: float = 1e-5,
    ddpm_skip: float = 0.2,
    edit_guidance: float | Sequence[float] = 1.0,
    edit_threshold: float = 0.0,
    edit_renoise: float = 0.0,
    change_threshold: float = 0.0,
    change_smoothing: int = 2,
    change_fill: str = "composite",
    change_grow: float = 0.0,
    hold_prompts: list[list[list[str]]] | None = None,
    select: Select | None = None,
    inversion_cache: InversionCache | None = None,
    null_edit: bool = True,
) -> EngineResult:
    """Edit `images` [B,H,W] once per list of `counterfactual_prompts` (each B prompts).

    `masks` [B,H,W] (values in [0,1]) confine every edit to a region; `seeds` (one per image) seed the noise of
    stochastic methods, so an image's counterfactual does not depend on the batch it was edited in. The
    keyword-only settings are `EditConfig`'s fields of the same names; `hold_prompts` [edit][held attribute]
    [image] (ddpm; `cfgen.io.prompts.hold_prompts` per row) the edited prompts with each attribute the edit must
    keep changed; `select` scores the sweep's candidates (see `Select`); `inversion_cache` defaults to the
    process's shared cache. `null_edit=False`: no null edit unless compositing needs one (the result's `null_edit`
    is then None)."""
    if method not in METHODS:
        raise ValueError(f"unknown editing method {method!r}; one of {METHODS}")
    if not len(images):
        raise ValueError("no images to edit: counterfactuals needs at least one image")
    if null_text_inner_steps < 0:
        raise ValueError(f"null_text_inner_steps must be >= 0, got {null_text_inner_steps}")
    p2p = PromptToPromptSettings(cross_replace, tuple(self_replace), edit_word_weight)
    direction = EditDirection(edit_guidance, edit_threshold, edit_renoise)  # bad settings fail before any work
    if not direction.plain and method != "ddpm":
        raise ValueError(f"edit_guidance, edit_threshold and edit_renoise (directed editing) apply to method "
                         f"'ddpm', not {method!r}")
    if method == "ddpm":
        start_step(ddpm_skip, num_inference_steps)
    if change_threshold:
        if not composite:
            raise ValueError("change_threshold (the edit's own mask) confines the composite's difference: it needs "
                             "composite=True")
        check_change_settings(change_threshold, change_smoothing, change_fill, change_grow)
    if hold_prompts is not None and any(hold_prompts):
        if method != "ddpm":
            raise ValueError(f"holding attributes (hold) applies to method 'ddpm', not {method!r}")
        if len(hold_prompts) != len(counterfactual_prompts):
            raise ValueError(f"hold_prompts has {len(hold_prompts)} edits, counterfactual_prompts "
                             f"{len(counterfactual_prompts)}")
    seeds = list(seeds) if seeds is not None else list(range(len(images)))
    fingerprint = model_fingerprint(pipe)
    inversions = BatchInversions(inversion_cache if inversion_cache is not None else shared_cache(),
                                 [(fingerprint, image_digest(image)) for image in np.asarray(images)])
    unet = pipe.unet
    counter = CountingUNet(unet)
    pipe.unet = counter
    try:
        latents = encode_images(pipe, images)
        latent_mask = None if masks is None else _latent_mask(masks, latents.shape, latents.device, latents.dtype)
        edited, nulls, sweep = _edit_latents(method, pipe, latents, factual_prompts, counterfactual_prompts,
                                             num_inference_steps, guidance_scale, strength, seeds, latent_mask, p2p,
                                             null_text_inner_steps, null_text_early_stop, ddpm_skip, inversions,
                                             null_edit or composite, direction, hold_prompts)
        autoencoded = decode_latents(pipe, latents)
    finally:
        pipe.unet = unet
    null_images = None if nulls is None else _decode_once(pipe, nulls)  # [setting]
    unit = _unit(images)
    rows = np.arange(len(images))
    outputs, raw, chosen, null_edits = [], [], [], []
    for e, candidates in enumerate(edited):
        decoded = [decode_latents(pipe, z) for z in candidates]
        kept = [keep_input_outside_change(images, r, None if null_images is None else null_images[s], composite,
                                          masks, change_threshold, change_smoothing, change_fill, change_grow)
                for s, r in enumerate(decoded)]
        winner = _winners(kept, unit, e, sweep, select)
        outputs.append(np.stack(kept)[winner, rows])
        raw.append(np.stack(decoded)[winner, rows])
        chosen.append([dict(sweep[w]) for w in winner])
        if null_images is not None:
            null_edits.append(np.stack(null_images)[winner, rows])
    n_cf = max(1, len(images) * len(counterfactual_prompts))
    return EngineResult(
        counterfactuals=outputs, null_edit=None if null_images is None else null_images[_most_preserving(sweep)],
        autoencoded=autoencoded, raw_counterfactuals=raw,
        unet_forward=counter.forward_rows / n_cf, unet_backward=counter.backward_rows / n_cf,
        unet_forward_per_image=counter.forward_rows // max(1, len(images)), settings=chosen,
        null_edits=null_edits if null_images is not None else None,
    )
