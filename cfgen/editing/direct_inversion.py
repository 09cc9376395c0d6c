"""Direct Inversion (Ju et al. 2023, "PnP Inversion: boosting diffusion-based editing with 3 lines of code").

Null-text inversion spends some 500 forward and 500 backward UNet passes per image (at 50 steps) to make guided
sampling retrace the DDIM inversion. Ju et al. observe that the editing only needs the *source* branch on the
inversion, and that this can be had for free: at every step, add to the source branch the difference between
the inverted latent and the source branch's own denoised latent, which puts it back on the trajectory exactly.
The target branches are left to the guided sampler, steered by the source's attention maps through
Prompt-to-Prompt as in PRISM's recipe; on PIE-Bench this matches or beats null-text inversion on every
preservation figure at the cost of plain DDIM inversion + P2P (DESIGN.md §6).

The correction is computed in the same UNet call as the edit (the original precomputes the per-step offsets in a
separate pass of the source branch, which is the same computation done twice), so the source branch costs its
share of the sweep batch and nothing else; the null edit is the encoded latent itself.
"""

from __future__ import annotations

import torch

from cfgen.editing.ddim import ddim_trajectory
from cfgen.editing.inversion_cache import BatchInversions
from cfgen.editing.prompt_to_prompt import PromptToPromptSettings, sweep_edit


def direct_edit(pipe, latents: torch.Tensor, factual_prompts: list[str], counterfactual_prompts: list[list[str]],
                num_inference_steps: int, guidance_scale: float, settings: PromptToPromptSettings,
                inversions: BatchInversions, latent_mask: torch.Tensor | None = None):
    """The `direct` method: DDIM inversion with the factual prompt (guidance 1), then the Prompt-to-Prompt sweep
    from x_T with the source branch kept on the inversion at every step."""
    trajectory = ddim_trajectory(pipe, latents, factual_prompts, num_inference_steps, inversions)
    return sweep_edit(pipe, trajectory, factual_prompts, counterfactual_prompts, settings, num_inference_steps,
                      guidance_scale, keep_source=True, latent_mask=latent_mask)
