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
share of the sweep batch and nothing else.

The null edit is not the source branch. Pinned to the inversion, the source ends exactly on the encoded latent,
whereas the target branches are left to the sampler and drift off it; compositing input + (edited - source) kept
all of that drift (measured on the demo's model: 2.4-6.5x the do-nothing error at 5 steps, 1.4-2.6x at 20, against
about 1.05x for plain Prompt-to-Prompt, whose null edit drifts with its targets). So the null edit is one more
target row per setting, with the factual prompt, under the same control (and the same latent mask): it drifts as
an edit does, and with an edit prompt equal to the factual one the two rows are the same computation, so the
composite returns the input (the tests check this with a random UNet). Its cost is n_settings more rows per image
in the sweep batch (k edits: 1 + k x n_settings + n_settings rows), and none when the caller needs no null edit.
"""

from __future__ import annotations

import torch

from cfgen.editing.ddim import ddim_trajectory
from cfgen.editing.inversion_cache import BatchInversions
from cfgen.editing.prompt_to_prompt import PromptToPromptSettings, sweep_edit


def direct_edit(pipe, latents: torch.Tensor, factual_prompts: list[str], counterfactual_prompts: list[list[str]],
                num_inference_steps: int, guidance_scale: float, settings: PromptToPromptSettings,
                inversions: BatchInversions, latent_mask: torch.Tensor | None = None, null_edit: bool = True):
    """The `direct` method: DDIM inversion with the factual prompt (guidance 1), then the Prompt-to-Prompt sweep
    from x_T with the source branch kept on the inversion at every step. (edited latents [edit][setting], the null
    edit [setting]: the factual prompt's target branch at each setting; None without `null_edit`)."""
    trajectory = ddim_trajectory(pipe, latents, factual_prompts, num_inference_steps, inversions)
    prompts = counterfactual_prompts + ([factual_prompts] if null_edit else [])
    edited, _pinned_source = sweep_edit(pipe, trajectory, factual_prompts, prompts, settings, num_inference_steps,
                                        guidance_scale, keep_source=True, latent_mask=latent_mask)
    return (edited[:-1], edited[-1]) if null_edit else (edited, None)
