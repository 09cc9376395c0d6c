"""Prompt-to-Prompt (Hertz et al. 2022): edit an image by regenerating it with the edited prompt while the
attention maps of the factual prompt's generation steer the layout.

The source branch (the factual prompt) and the target branches (each edited prompt, at each setting of the
self-attention sweep) denoise together, one UNet call per step: the conditional rows are the B source rows first,
then the targets (edit-major, then setting, then image). Attention processors (`PromptToPromptAttnProcessor`,
installed with `unet.set_attn_processor` for one sampling run and restored afterwards) replace, on every target
row,

- its cross-attention maps by its source's for the first `cross_replace` fraction of the steps (PRISM: 0.8),
- its self-attention maps by its source's for the first `self_replace` fraction (PRISM sweeps 0.4-0.8), on layers
  of at most 32 x 32 queries as the original implementation does (the 64 x 64 layers of SD keep the target's own
  fine detail, and need no explicit attention matrix, so they keep the fast SDPA path),

and re-weight the edited tokens' columns by `edit_word_weight` (PRISM: x2) while cross-attention is replaced.
Unconditional rows (classifier-free guidance) are never controlled, as in the original.

Factual and edited prompts need not be token-aligned ("with support devices" -> "without support devices" is a
substitution; other templates insert words, and sub-word tokenizers split words unevenly): the "refine" mapping
aligns the two token sequences (difflib's SequenceMatcher on the ids); a target token in a matching block takes the
attention column of its aligned source token, an inserted or substituted token keeps its own attention and is the
one re-weighted. With identical prompts every target row equals its source row, so P2P then reproduces the plain
reconstruction, which the tests check.

`p2p_edit` is the engine's `p2p` method: plain DDIM inversion with the factual prompt (guidance 1), then the sweep
from x_T. Null-text inversion (`null_text.py`) and Direct Inversion (`direct_inversion.py`) run the same sweep
(`sweep_edit`) from their own inversions.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler

from cfgen.editing.ddim import ddim_trajectory, guided_noise_prediction
from cfgen.editing.inversion_cache import BatchInversions
from cfgen.models.sd import encode_prompts, token_ids

#: Self-attention is replaced only on layers with at most this many query positions (the original's 32 x 32).
MAX_SELF_REPLACE_QUERIES = 32 * 32


@dataclass(frozen=True)
class PromptToPromptSettings:
    cross_replace: float = 0.8
    self_replace: tuple[float, ...] = (0.4, 0.6, 0.8)
    edit_word_weight: float = 2.0

    def __post_init__(self):
        if not self.self_replace:
            raise ValueError("self_replace needs at least one setting (the sweep), e.g. [0.4, 0.6, 0.8]")
        for name, value in [("cross_replace", self.cross_replace)] + [("self_replace", s) for s in self.self_replace]:
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} is a fraction of the steps, in [0, 1]; got {value}")
        if self.edit_word_weight <= 0:
            raise ValueError(f"edit_word_weight must be positive, got {self.edit_word_weight}")

    @property
    def sweep(self) -> list[dict[str, float]]:
        """One record per setting, as the engine reports the winning one."""
        return [{"self_replace": s} for s in self.self_replace]


def steps_of(fraction: float, num_inference_steps: int) -> int:
    """How many steps, counted from x_T, a fraction of the schedule covers."""
    return int(fraction * num_inference_steps + 0.5)


def refine_alignment(source_ids: list[int], target_ids: list[int]) -> tuple[list[int], list[bool]]:
    """For every target token: the source position whose attention column it takes, and whether it has one (False
    for inserted and substituted tokens, which keep their own attention)."""
    index = list(range(len(target_ids)))
    aligned = [False] * len(target_ids)
    matcher = difflib.SequenceMatcher(a=source_ids, b=target_ids, autojunk=False)
    for block in matcher.get_matching_blocks():
        for offset in range(block.size):
            index[block.b + offset] = block.a + offset
            aligned[block.b + offset] = True
    return index, aligned


@dataclass
class EditLayout:
    """What every conditional row of a Prompt-to-Prompt batch is: B source rows (one per image, its factual prompt)
    first, then the target rows. R = B + targets rows, L tokens."""

    image: torch.Tensor  # [R] long: the image of every row; sources come first, so it is also its source's row
    token_index: torch.Tensor  # [R, L] long: the source token whose attention column each token takes
    from_source: torch.Tensor  # [R, L] 1.0 where the token is aligned with a source token
    token_weight: torch.Tensor  # [R, L] the re-weighting of each token's column
    cross_steps: torch.Tensor  # [R] long: steps (from x_T) with cross-attention replaced; 0 on source rows
    self_steps: torch.Tensor  # [R] long: steps with self-attention replaced; 0 on source rows

    @classmethod
    def build(cls, source_ids: torch.Tensor, target_ids: torch.Tensor, target_image: list[int],
              cross_steps: list[int], self_steps: list[int], edit_word_weight: float) -> EditLayout:
        n_source, length = source_ids.shape
        index = [list(range(length)) for _ in range(n_source)]
        aligned = [[True] * length for _ in range(n_source)]
        for ids, image in zip(target_ids.tolist(), target_image):
            row_index, row_aligned = refine_alignment(source_ids[image].tolist(), ids)
            index.append(row_index)
            aligned.append(row_aligned)
        from_source = torch.tensor(aligned, dtype=torch.float32)
        device = source_ids.device
        return cls(
            image=torch.tensor(list(range(n_source)) + list(target_image), device=device),
            token_index=torch.tensor(index, device=device),
            from_source=from_source.to(device),
            token_weight=torch.where(from_source.bool(), 1.0, edit_word_weight).to(device),
            cross_steps=torch.tensor([0] * n_source + list(cross_steps), device=device),
            self_steps=torch.tensor([0] * n_source + list(self_steps), device=device),
        )


class AttentionControl:
    """What the processors share during one sampling run: the layout, the current step (set by the sampler before
    each UNet call) and how many unconditional rows precede the conditional ones."""

    def __init__(self, layout: EditLayout, uncond_rows: int):
        self.layout = layout
        self.uncond_rows = uncond_rows
        self.step = 0
        # python ints, so that deciding whether a layer needs control never waits on the device
        self._last_cross = int(layout.cross_steps.max())
        self._last_self = int(layout.self_steps.max())

    def replaces(self, is_cross: bool, queries: int) -> bool:
        if is_cross:
            return self.step < self._last_cross
        return queries <= MAX_SELF_REPLACE_QUERIES and self.step < self._last_self

    def edit(self, probs: torch.Tensor, is_cross: bool) -> torch.Tensor:
        """Attention probabilities [rows x heads, Q, K] -> the same with every target row's maps replaced."""
        lay = self.layout
        rows = self.uncond_rows + len(lay.image)
        maps = probs.view(rows, -1, *probs.shape[1:])
        cond = maps[self.uncond_rows:]
        source = cond[lay.image]
        if is_cross:
            mapped = source.gather(-1, lay.token_index[:, None, None, :].expand_as(source))
            aligned = lay.from_source.to(cond.dtype)[:, None, None, :]
            edited = (aligned * mapped + (1 - aligned) * cond) * lay.token_weight.to(cond.dtype)[:, None, None, :]
            active = lay.cross_steps > self.step
        else:
            edited = source
            active = lay.self_steps > self.step
        cond = torch.where(active[:, None, None, None], edited, cond)
        return torch.cat([maps[:self.uncond_rows], cond]).view_as(probs)


class PromptToPromptAttnProcessor:
    """Attention with an explicit probability matrix that `AttentionControl` edits; layers and steps it does not
    control go to the layer's own processor (SDPA), so the control costs nothing where it does nothing."""

    def __init__(self, control: AttentionControl, default):
        self.control = control
        self.default = default

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
        is_cross = encoder_hidden_states is not None
        spatial = hidden_states.ndim == 4
        queries = hidden_states.shape[2] * hidden_states.shape[3] if spatial else hidden_states.shape[1]
        if not self.control.replaces(is_cross, queries):
            return self.default(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        if spatial:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if not is_cross:
            context = hidden_states
        else:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else \
                encoder_hidden_states
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        mask = attn.prepare_attention_mask(attention_mask, context.shape[1], hidden_states.shape[0])
        probs = self.control.edit(attn.get_attention_scores(query, key, mask), is_cross)
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        if spatial:
            out = out.transpose(1, 2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


@contextmanager
def attention_control(unet, control: AttentionControl) -> Iterator[AttentionControl]:
    """Every attention layer of `unet` under `control` for the duration; the layers' own processors afterwards."""
    original = unet.attn_processors
    unet.set_attn_processor({name: PromptToPromptAttnProcessor(control, p) for name, p in original.items()})
    try:
        yield control
    finally:
        unet.set_attn_processor(dict(original))  # diffusers pops from the dict it is given


@torch.no_grad()
def p2p_sample(unet, scheduler, trajectory: torch.Tensor, cond: torch.Tensor, layout: EditLayout,
               num_inference_steps: int, guidance_scale: float = 1.0, null_embeddings: torch.Tensor | None = None,
               keep_source: bool = False, latent_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Denoise every row of `layout` from its image's x_T = trajectory[-1] under attention control; x_0 of each row.

    `trajectory` [N+1, B, C, h, w] is the inversion (x_0 first); `cond` [R, L, D] the rows' prompt embeddings;
    `null_embeddings` [N, B, L, D] the unconditional embedding per step and image (null-text's optimised ones, or
    the empty prompt's), used where guidance_scale != 1. `keep_source` puts the source rows back on the inversion
    after every step (Direct Inversion); `latent_mask` [B,1,h,w] keeps the inversion outside the mask on the
    target rows (RadEdit-style confinement)."""
    forward = DDIMScheduler.from_config(scheduler.config)
    forward.set_timesteps(num_inference_steps, device=trajectory.device)
    n_source = trajectory.shape[1]
    image = layout.image
    latents = trajectory[-1][image]
    guided = guidance_scale != 1.0
    control = AttentionControl(layout, uncond_rows=len(image) if guided else 0)
    with attention_control(unet, control):
        for k, t in enumerate(forward.timesteps):
            control.step = k
            uncond = null_embeddings[k][image] if guided else None
            eps = guided_noise_prediction(unet, latents, t, cond, uncond, guidance_scale)
            latents = forward.step(eps, t, latents, eta=0.0).prev_sample
            # after step k the rows sit at the inversion's level N - 1 - k
            inverted = trajectory[num_inference_steps - 1 - k]
            if keep_source:
                # Direct Inversion: adding (inverted - source) puts the source branch back on the trajectory
                latents[:n_source] = inverted
            if latent_mask is not None:
                m = latent_mask[image[n_source:]]
                latents[n_source:] = m * latents[n_source:] + (1 - m) * inverted[image[n_source:]]
    return latents


def sweep_edit(pipe, trajectory: torch.Tensor, factual_prompts: list[str], counterfactual_prompts: list[list[str]],
               settings: PromptToPromptSettings, num_inference_steps: int, guidance_scale: float = 1.0,
               null_embeddings: torch.Tensor | None = None, keep_source: bool = False,
               latent_mask: torch.Tensor | None = None) -> tuple[list[list[torch.Tensor]], torch.Tensor]:
    """(edited latents [edit][setting] each [B,...], the source branch [B,...] = the null edit): one source branch
    shared by every edit and every setting of the self-attention sweep, all in one batch."""
    n = len(factual_prompts)
    sweep = settings.self_replace
    cross = steps_of(settings.cross_replace, num_inference_steps)
    target_image = [i for _ in counterfactual_prompts for _ in sweep for i in range(n)]
    target_self = [steps_of(s, num_inference_steps) for _ in counterfactual_prompts for s in sweep for _ in range(n)]
    source_ids = token_ids(pipe, factual_prompts)
    target_ids = torch.cat([token_ids(pipe, p) for p in counterfactual_prompts for _ in sweep])
    layout = EditLayout.build(source_ids.to(trajectory.device), target_ids.to(trajectory.device), target_image,
                              [cross] * len(target_image), target_self, settings.edit_word_weight)
    edit_cond = [encode_prompts(pipe, p) for p in counterfactual_prompts]
    cond = torch.cat([encode_prompts(pipe, factual_prompts)] + [c for c in edit_cond for _ in sweep])
    if guidance_scale != 1.0 and null_embeddings is None:
        null_embeddings = encode_prompts(pipe, [""] * n).expand(num_inference_steps, -1, -1, -1)
    if null_embeddings is not None:
        null_embeddings = null_embeddings.to(cond.dtype)
    latents = p2p_sample(pipe.unet, pipe.scheduler, trajectory, cond.to(pipe.unet.dtype), layout,
                         num_inference_steps, guidance_scale, null_embeddings, keep_source, latent_mask)
    targets = latents[n:].split(n)
    edited = [list(targets[e * len(sweep):(e + 1) * len(sweep)]) for e in range(len(counterfactual_prompts))]
    return edited, latents[:n]


def p2p_edit(pipe, latents: torch.Tensor, factual_prompts: list[str], counterfactual_prompts: list[list[str]],
             num_inference_steps: int, guidance_scale: float, settings: PromptToPromptSettings,
             inversions: BatchInversions, latent_mask: torch.Tensor | None = None):
    """The `p2p` method: DDIM inversion with the factual prompt, then the sweep from x_T with the empty prompt as
    the unconditional one (its source branch drifts from the inversion under guidance > 1; the other two methods
    correct that)."""
    trajectory = ddim_trajectory(pipe, latents, factual_prompts, num_inference_steps, inversions)
    return sweep_edit(pipe, trajectory, factual_prompts, counterfactual_prompts, settings, num_inference_steps,
                      guidance_scale, latent_mask=latent_mask)
