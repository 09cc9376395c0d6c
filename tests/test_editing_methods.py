"""The inversion-based editing methods: Prompt-to-Prompt, null-text inversion, Direct Inversion, DDPM inversion.

Exact inversions (with a zero noise prediction, and where the method promises it with the real tiny UNet), the
P2P identity (identical prompts reproduce the plain reconstruction), confinement, determinism across batches,
counted UNet work against a spy, the inversion cache, and the choice of the sweep setting."""

import inspect

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from cfgen.config import EditConfig, ModelConfig
from cfgen.editing.counting import CountingUNet
from cfgen.editing.ddim import ddim_invert, ddim_sample
from cfgen.editing.ddpm_inversion import EditDirection, ddpm_invert, ddpm_sample, implicit_mask
from cfgen.editing.engine import METHODS, counterfactuals, engine_options
from cfgen.editing.inversion_cache import BatchInversions, InversionCache
from cfgen.editing.null_text import null_text_optimise
from cfgen.editing.prompt_to_prompt import (MAX_SELF_REPLACE_QUERIES, AttentionControl, EditLayout,
                                             PromptToPromptSettings, refine_alignment, sweep_edit)
from cfgen.models.sd import build_tiny_pipeline, encode_images, encode_prompts, token_ids

NEW_METHODS = ("p2p", "direct", "null_text", "ddpm")
FACTUAL = ["a chest x-ray of a 63 year old female patient, smoker, with support devices",
           "a chest x-ray of a 40 year old male patient, with pleural effusion"]
EDITS = [["a chest x-ray of a 63 year old female patient, smoker, without support devices",
          "a chest x-ray of a 40 year old male patient, without pleural effusion"]]


class ScaledUNet(torch.nn.Module):
    """The real tiny UNet with its noise prediction multiplied by `scale` (0: a zero prediction that still runs
    every attention layer, so Prompt-to-Prompt's control and null-text's gradients have something to act on)."""

    def __init__(self, unet, scale: float):
        super().__init__()
        self.unet, self.scale = unet, scale

    def forward(self, sample, t, encoder_hidden_states=None):
        out = self.unet(sample, t, encoder_hidden_states=encoder_hidden_states).sample
        return type("Out", (), {"sample": out * self.scale})()

    config = property(lambda self: self.unet.config)
    dtype = property(lambda self: self.unet.dtype)
    device = property(lambda self: self.unet.device)
    attn_processors = property(lambda self: self.unet.attn_processors)

    def set_attn_processor(self, processor):
        self.unet.set_attn_processor(processor)


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline(ModelConfig(), seed=0)


@pytest.fixture
def zero_prediction(pipe):
    real = pipe.unet
    pipe.unet = ScaledUNet(real, 0.0)
    yield pipe
    pipe.unet = real


def _images(seed=1, n=2):
    return np.random.default_rng(seed).integers(0, 256, (n, 64, 64), dtype=np.uint8)


def _edit(pipe, images=None, factual=FACTUAL, edits=EDITS, **kwargs):
    kwargs = {"num_inference_steps": 3, "guidance_scale": 3.0, "null_text_inner_steps": 2,
              "inversion_cache": InversionCache(), **kwargs}
    return counterfactuals(pipe, _images() if images is None else images, factual, edits, **kwargs)


def test_refine_alignment_maps_kept_tokens_and_leaves_inserted_ones_their_own_attention(pipe):
    index, aligned = refine_alignment([0, 5, 6, 7, 9], [0, 5, 6, 1, 2, 7, 9])  # "...6 [1 2] 7..."
    assert aligned == [True, True, True, False, False, True, True]
    assert [i for i, a in zip(index, aligned) if a] == [0, 1, 2, 3, 4]
    # the domain tokenizer: "with" -> "without" is a substitution; a character-level word is an insertion
    for source, target, changed in [("a patient with support devices", "a patient without support devices",
                                     ["without</w>"]),
                                    ("a patient, 63 year old", "a patient, 653 year old", ["5</w>"])]:
        src, tgt = (token_ids(pipe, [p])[0].tolist() for p in (source, target))
        _, aligned = refine_alignment(src, tgt)
        tokens = pipe.tokenizer.convert_ids_to_tokens(tgt)
        assert [tok for tok, a in zip(tokens, aligned) if not a] == changed


def test_p2p_with_identical_prompts_reproduces_the_plain_reconstruction(pipe):
    latents = encode_images(pipe, _images(2))
    cond = encode_prompts(pipe, FACTUAL)
    trajectory = []
    x_t = ddim_invert(pipe.unet, pipe.scheduler, latents, cond, 4, trajectory=trajectory)
    processors = pipe.unet.attn_processors
    for guidance in (1.0, 3.0):
        uncond = encode_prompts(pipe, [""] * 2) if guidance != 1.0 else None
        plain = ddim_sample(pipe.unet, pipe.scheduler, x_t, cond, 4, uncond, guidance)
        edited, source = sweep_edit(pipe, torch.stack(trajectory), FACTUAL, [FACTUAL, FACTUAL],
                                    PromptToPromptSettings(), 4, guidance)
        assert (plain - latents).abs().max() > 0.1  # the random UNet's reconstruction is no copy of the input
        # float tolerance for latents of magnitude ~6: the plain sampler alone, run in a batch of another size,
        # differs by 3e-5
        torch.testing.assert_close(source, plain, atol=1e-5 * float(plain.abs().max()), rtol=0)
        for target in (z for per_edit in edited for z in per_edit):
            torch.testing.assert_close(target, source, atol=1e-6, rtol=1e-5)
    assert pipe.unet.attn_processors == processors  # the layers' own processors are back


def test_attention_control_swaps_the_target_maps_for_the_aligned_source_columns_in_its_window():
    # one image: source row 0, target row 1 whose token 2 is inserted (source tokens 0 1 3 -> target 0 1 x 2 3)
    source_ids, target_ids = torch.tensor([[5, 6, 7, 8, 0]]), torch.tensor([[5, 6, 9, 7, 8]])
    layout = EditLayout.build(source_ids, target_ids, [0], cross_steps=[2], self_steps=[1], edit_word_weight=2.0)
    control = AttentionControl(layout, uncond_rows=2)  # guidance: [uncond source, uncond target, source, target]
    heads, queries = 3, 4
    cross = torch.rand(4 * heads, queries, 5, generator=torch.Generator().manual_seed(0))
    self_maps = torch.rand(4 * heads, queries, queries, generator=torch.Generator().manual_seed(1))
    edited = control.edit(cross, is_cross=True).view(4, heads, queries, 5)
    rows = cross.view(4, heads, queries, 5)
    torch.testing.assert_close(edited[:3], rows[:3])  # unconditional rows and the source are left alone
    torch.testing.assert_close(edited[3][..., [0, 1, 3, 4]], rows[2][..., [0, 1, 2, 3]])  # aligned: source's
    torch.testing.assert_close(edited[3][..., 2], 2.0 * rows[3][..., 2])  # inserted: own column, re-weighted
    control.step = 1  # past the self-attention window, still inside the cross-attention one
    assert control.replaces(True, queries) and not control.replaces(False, queries)
    control.step = 0
    swapped = control.edit(self_maps, is_cross=False).view(4, heads, queries, queries)
    torch.testing.assert_close(swapped[3], self_maps.view(4, heads, queries, queries)[2])
    assert not control.replaces(False, MAX_SELF_REPLACE_QUERIES + 1)  # SD's 64 x 64 layers keep their own
    control.step = 2
    assert not control.replaces(True, queries)


def test_p2p_control_changes_what_the_edited_prompt_generates(pipe):
    latents = encode_images(pipe, _images(3))
    trajectory = []
    x_t = ddim_invert(pipe.unet, pipe.scheduler, latents, encode_prompts(pipe, FACTUAL), 4, trajectory=trajectory)
    (controlled,), source = sweep_edit(pipe, torch.stack(trajectory), FACTUAL, EDITS,
                                       PromptToPromptSettings(self_replace=(0.8,)), 4)
    regenerated = ddim_sample(pipe.unet, pipe.scheduler, x_t, encode_prompts(pipe, EDITS[0]), 4)
    assert (controlled[0] - regenerated).abs().mean() > 1e-4
    assert (controlled[0] - source).abs().mean() > 1e-4


@pytest.mark.parametrize("method", ["ddim", *NEW_METHODS])
def test_every_inversion_is_exact_with_a_zero_noise_prediction(zero_prediction, method):
    result = _edit(zero_prediction, method=method, ddpm_skip=0.0)
    np.testing.assert_allclose(result.null_edit, result.autoencoded, atol=1e-5)
    if method == "null_text":  # already reconstructed: early stop before any backward pass
        assert result.unet_backward == 0


def test_direct_inversion_keeps_the_source_branch_on_the_inversion_with_a_real_unet(pipe):
    latents = encode_images(pipe, _images(2))
    trajectory = []
    ddim_invert(pipe.unet, pipe.scheduler, latents, encode_prompts(pipe, FACTUAL), 3, trajectory=trajectory)
    for keep_source, pinned in ((True, True), (False, False)):  # without the correction it drifts under guidance
        (edited,), source = sweep_edit(pipe, torch.stack(trajectory), FACTUAL, EDITS, PromptToPromptSettings(), 3,
                                       3.0, keep_source=keep_source)
        assert torch.equal(source, latents) is pinned
        assert (edited[-1] - latents).abs().mean() > 0.01  # the targets are left to the sampler either way


def test_direct_inversion_s_null_edit_is_the_factual_prompt_s_target_branch_not_the_pinned_source(pipe):
    direct = _edit(pipe, method="direct")
    # the pinned source branch ends exactly on the encoded latent: a null edit equal to the autoencoded image
    # would hide the targets' drift from compositing and from the null-edit SSIM
    assert np.abs(direct.null_edit - direct.autoencoded).mean() > 0.01
    same_prompt = _edit(pipe, method="direct", edits=[FACTUAL], composite=False)
    np.testing.assert_allclose(same_prompt.raw_counterfactuals[0], direct.null_edit, atol=1e-5)
    assert len(direct.null_edits) == 1 and np.array_equal(direct.null_edits[0], direct.null_edit)  # default setting


@pytest.mark.parametrize("method", METHODS)
def test_an_edit_to_the_factual_prompt_composites_to_the_input_with_a_real_unet(pipe, method):
    # the null edit drifts exactly as the edited branch does, so compositing cancels all of it; the random UNet
    # makes every method's raw reconstruction far from the input
    images = _images(8)
    result = _edit(pipe, images, method=method, edits=[FACTUAL, FACTUAL], seeds=[3, 4], ddpm_skip=0.4)
    assert np.abs(result.raw_counterfactuals[0] - images / 255.0).mean() > 0.01
    for counterfactual in result.counterfactuals:
        np.testing.assert_allclose(counterfactual, images / 255.0, atol=1e-4, rtol=0)


def test_without_the_null_edit_direct_inversion_samples_no_factual_target_rows(pipe):
    with_null = _edit(pipe, method="direct", composite=False)
    without = _edit(pipe, method="direct", composite=False, null_edit=False)
    assert without.null_edit is None and without.null_edits is None
    assert with_null.unet_forward_per_image - without.unet_forward_per_image == 2 * 3 * 3  # guided x settings x steps
    for a, b in zip(with_null.raw_counterfactuals, without.raw_counterfactuals):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert _edit(pipe, method="direct", null_edit=False).null_edit is not None  # compositing needs it


@pytest.mark.parametrize("skip", [0.0, 0.4])
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_ddpm_inversion_reconstructs_exactly_with_a_real_unet(pipe, skip, guidance):
    latents = encode_images(pipe, _images(4))
    cond, uncond = encode_prompts(pipe, FACTUAL), encode_prompts(pipe, [""] * 2)
    noise = torch.randn(5, *latents.shape, generator=torch.Generator().manual_seed(0))
    trajectory, maps = ddpm_invert(pipe.unet, pipe.scheduler, latents, cond, noise, 5, uncond, guidance, skip)
    assert maps.abs().max() > 1.0  # the maps carry the image, not a copy of the noise
    null_edit = ddpm_sample(pipe.unet, pipe.scheduler, trajectory, maps, cond, 5, uncond, guidance, skip)
    torch.testing.assert_close(null_edit, latents, atol=1e-4, rtol=0)
    edited = ddpm_sample(pipe.unet, pipe.scheduler, trajectory, maps, encode_prompts(pipe, EDITS[0]), 5, uncond,
                         guidance, skip)
    assert (edited - latents).abs().max() > 1e-3


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_directed_ddpm_edit_reconstructs_with_the_factual_prompt_and_amplifies_the_edit(pipe, guidance):
    latents = encode_images(pipe, _images(4))
    cond, uncond = encode_prompts(pipe, FACTUAL), encode_prompts(pipe, [""] * 2)
    noise = torch.randn(5, *latents.shape, generator=torch.Generator().manual_seed(0))
    trajectory, maps = ddpm_invert(pipe.unet, pipe.scheduler, latents, cond, noise, 5, uncond, guidance, 0.0)
    directed = EditDirection(scale=4.0, threshold=0.8)
    # the factual prompt as the edit: the direction is zero, so the reconstruction stays exact
    null_edit = ddpm_sample(pipe.unet, pipe.scheduler, trajectory, maps, cond, 5, uncond, guidance, 0.0,
                            source=cond, direction=directed)
    torch.testing.assert_close(null_edit, latents, atol=1e-4, rtol=0)
    edit = encode_prompts(pipe, EDITS[0])
    plain = ddpm_sample(pipe.unet, pipe.scheduler, trajectory, maps, edit, 5, uncond, guidance, 0.0)
    unit = ddpm_sample(pipe.unet, pipe.scheduler, trajectory, maps, edit, 5, uncond, guidance, 0.0, source=cond,
                       direction=EditDirection(1.0, 0.0))
    torch.testing.assert_close(unit, plain, atol=1e-4, rtol=0)  # scale 1, no mask: the plain edit
    amplified = ddpm_sample(pipe.unet, pipe.scheduler, trajectory, maps, edit, 5, uncond, guidance, 0.0,
                            source=cond, direction=EditDirection(4.0, 0.0))
    assert (amplified - latents).abs().mean() > 1.2 * (plain - latents).abs().mean()
    masked = ddpm_sample(pipe.unet, pipe.scheduler, trajectory, maps, edit, 5, uncond, guidance, 0.0, source=cond,
                         direction=directed)
    assert (masked - latents).abs().mean() < (amplified - latents).abs().mean()


def test_renoising_keeps_the_reconstruction_exact_and_redraws_only_the_masked_cells(pipe):
    latents = encode_images(pipe, _images(4))
    cond = encode_prompts(pipe, FACTUAL)
    noise = torch.randn(5, *latents.shape, generator=torch.Generator().manual_seed(0))
    fresh = torch.randn(5, *latents.shape, generator=torch.Generator().manual_seed(1))
    trajectory, maps = ddpm_invert(pipe.unet, pipe.scheduler, latents, cond, noise, 5, None, 1.0, 0.0)
    renoised = EditDirection(scale=3.0, threshold=0.8, renoise=1.0)
    # the factual prompt: no direction, so no cell is renoised and the reconstruction stays exact
    null_edit = ddpm_sample(pipe.unet, pipe.scheduler, trajectory, maps, cond, 5, source=cond, direction=renoised,
                            fresh=fresh)
    torch.testing.assert_close(null_edit, latents, atol=1e-4, rtol=0)
    edit = encode_prompts(pipe, [EDITS[0][0], FACTUAL[1]])  # image 1's edit is its factual prompt
    kept = ddpm_sample(pipe.unet, pipe.scheduler, trajectory, maps, edit, 5, source=cond,
                       direction=EditDirection(3.0, 0.8), fresh=fresh)
    new = ddpm_sample(pipe.unet, pipe.scheduler, trajectory, maps, edit, 5, source=cond, direction=renoised,
                      fresh=fresh)
    torch.testing.assert_close(new[1], latents[1], atol=1e-4, rtol=0)
    changed = (new[0] - kept[0]).abs().amax(0)
    assert changed.max() > 0.05  # fresh noise in the masked cells moved the edit
    with pytest.raises(ValueError, match="fresh noise"):
        ddpm_sample(pipe.unet, pipe.scheduler, trajectory, maps, edit, 5, source=cond, direction=renoised)
    with pytest.raises(ValueError, match="share of fresh noise"):
        EditDirection(3.0, 0.8, renoise=1.5)
    with pytest.raises(ValueError, match="directed editing"):
        EditConfig(method="sdedit", edit_renoise=0.5)


def test_implicit_mask_keeps_the_top_cells_per_image_whatever_the_batch():
    direction = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    direction[1] *= 10  # another image's scale must not move this image's mask
    mask = implicit_mask(direction, 0.75)
    assert mask.shape == (3, 1, 8, 8) and set(mask.unique().tolist()) <= {0.0, 1.0}
    for i in range(3):
        assert abs(mask[i].mean().item() - 0.25) < 0.05
        torch.testing.assert_close(implicit_mask(direction[i:i + 1], 0.75), mask[i:i + 1])
    assert implicit_mask(direction, 0.0).min() == 1.0
    with pytest.raises(ValueError, match="quantile"):
        EditDirection(2.0, 1.0)
    with pytest.raises(ValueError, match="directed editing"):
        EditConfig(method="ddim", edit_guidance=3.0)
    with pytest.raises(ValueError, match="directed editing"):
        counterfactuals(build_tiny_pipeline(ModelConfig(), seed=0), _images(), FACTUAL, EDITS, method="ddim",
                        edit_guidance=3.0)


def test_directed_ddpm_through_the_engine_counts_two_rows_a_step_and_composites_to_the_input(pipe):
    images = _images(5)
    out = _edit(pipe, images, edits=[FACTUAL, EDITS[0]], method="ddpm", guidance_scale=1.0, ddpm_skip=0.0,
                **engine_kwargs(EditConfig(method="ddpm", edit_guidance=3.0, edit_threshold=0.5)))
    # inversion: 1 row a step; each of the 2 edits: source + edited rows a step
    assert out.unet_forward_per_image == 3 + 2 * 2 * 3
    np.testing.assert_allclose(out.counterfactuals[0], images / 255.0, atol=2e-3)  # factual edit = the input


def test_a_sweep_of_direction_scales_makes_each_scales_edit_in_one_batch_and_select_keeps_one_per_image(pipe):
    images = _images(5)
    common = dict(images=images, edits=[FACTUAL, EDITS[0]], method="ddpm", guidance_scale=1.0, ddpm_skip=0.0,
                  edit_threshold=0.5)
    singles = [_edit(pipe, edit_guidance=g, **common) for g in (1.5, 3.0)]
    seen = {}

    def select(candidates, image, edit_index):
        seen[edit_index] = [c.copy() for c in candidates]
        scores = np.zeros((len(candidates), 2))
        scores[1, 0] = scores[0, 1] = 1.0  # image 0: scale 3; image 1: scale 1.5
        return scores

    swept = _edit(pipe, edit_guidance=[1.5, 3.0], select=select, **common)
    # each candidate is the single-scale edit, made in the same UNet calls as the other scale's rows
    for s, single in enumerate(singles):
        np.testing.assert_allclose(seen[1][s], single.counterfactuals[1], atol=2e-4)
    assert np.abs(seen[1][0] - seen[1][1]).max() > 1e-3  # the scales really differ
    assert swept.settings[1] == [{"edit_guidance": 3.0}, {"edit_guidance": 1.5}]
    np.testing.assert_array_equal(swept.counterfactuals[1][0], seen[1][1][0])
    np.testing.assert_array_equal(swept.counterfactuals[1][1], seen[1][0][1])
    # inversion 1 row a step; every (edit, scale): source + edited rows a step
    assert swept.unet_forward_per_image == 3 + 2 * 2 * 2 * 3
    np.testing.assert_allclose(swept.counterfactuals[0], images / 255.0, atol=2e-3)  # factual edit = the input
    # without select: the smallest scale, the one that changes the image least
    default = _edit(pipe, edit_guidance=[3.0, 1.5], **common)
    assert default.settings[1] == [{"edit_guidance": 1.5}] * 2
    np.testing.assert_allclose(default.counterfactuals[1], singles[0].counterfactuals[1], atol=2e-4)
    config = EditConfig(method="ddpm", edit_guidance=[3.0, 1.5], edit_threshold=0.5)
    assert config.edit_guidance == [1.5, 3.0] and config.sweep_size == 2 and "1.5/3x (a sweep" in config.describe()
    assert EditConfig(method="ddpm", edit_guidance=[2.0]).sweep_size == 1
    with pytest.raises(ValueError, match="must differ"):
        EditConfig(method="ddpm", edit_guidance=[2.0, 2.0])
    with pytest.raises(ValueError, match="directed editing"):
        EditConfig(method="ddim", edit_guidance=[1.5, 3.0])


def engine_kwargs(edit: EditConfig) -> dict:
    return {k: v for k, v in engine_options(edit).items() if k in ("edit_guidance", "edit_threshold")}


def test_null_text_optimisation_retraces_a_trajectory_that_null_embeddings_can_produce(pipe):
    unet, steps, guidance = pipe.unet, 4, 3.0
    forward = DDIMScheduler.from_config(pipe.scheduler.config)
    forward.set_timesteps(steps)
    cond, uncond = encode_prompts(pipe, FACTUAL), encode_prompts(pipe, [""] * 2)

    @torch.no_grad()
    def guided_path(x, nulls):
        path = [x]
        for k, t in enumerate(forward.timesteps):
            eps_u = unet(x, t, encoder_hidden_states=nulls[k]).sample
            eps_c = unet(x, t, encoder_hidden_states=cond).sample
            x = forward.step(eps_u + guidance * (eps_c - eps_u), t, x).prev_sample
            path.append(x)
        return torch.stack(path[::-1])  # x_0 first, like an inversion

    x_t = torch.randn(2, unet.config.in_channels, 16, 16, generator=torch.Generator().manual_seed(0))
    hidden = uncond + 0.05 * torch.randn(uncond.shape, generator=torch.Generator().manual_seed(1))
    trajectory = guided_path(x_t, hidden.expand(steps, -1, -1, -1))
    counter = CountingUNet(unet)
    # 30 Adam steps per timestep, not the method's 10. With 16 latent channels 10 steps leave the error at 0.49 of
    # its start (with 4 it was 0.348, on the bound's edge): at the paper's learning rate 1e-2 the first Adam step at
    # x_T overshoots this small offset (its loss rises x1.7) and 10 steps do not settle it (20: 0.30, 30: 0.17). A
    # smaller rate fits this trajectory better (5e-3: 0.26) but the demo's trained model at guidance 7.5 worse (the
    # null edit's L1 to the autoencoded image 0.021 vs 0.019 at 10 steps), so the method keeps 1e-2.
    inner = 30
    nulls = null_text_optimise(counter, pipe.scheduler, trajectory, cond, uncond, guidance, steps, inner, 0.0)
    assert nulls.dtype == torch.float32 and nulls.shape == (steps, *uncond.shape)
    before = (guided_path(x_t, uncond.expand(steps, -1, -1, -1))[0] - trajectory[0]).abs().max()
    after = (guided_path(x_t, nulls)[0] - trajectory[0]).abs().max()
    assert after < 0.35 * before
    assert (counter.forward_rows, counter.backward_rows) == (steps * 2 * (1 + inner + 1), steps * 2 * inner)


@pytest.mark.parametrize("method", NEW_METHODS)
def test_mask_confined_edit_leaves_pixels_outside_the_mask_as_they_were(pipe, method):
    images = _images(5)
    masks = np.zeros((2, 64, 64), np.float32)
    masks[:, 16:40, 8:30] = 1.0
    for composite in (True, False):
        result = _edit(pipe, images, method=method, composite=composite, masks=masks, seeds=[11, 12])
        assert np.abs(result.counterfactuals[0] - images / 255.0)[masks == 0].max() < 1e-6
        assert np.abs(result.counterfactuals[0] - images / 255.0)[masks == 1].mean() > 1e-3


def test_latent_confinement_keeps_the_inversion_outside_the_mask(pipe):
    latents = encode_images(pipe, _images(6))
    trajectory = []
    ddim_invert(pipe.unet, pipe.scheduler, latents, encode_prompts(pipe, FACTUAL), 3, trajectory=trajectory)
    mask = torch.zeros(2, 1, 16, 16)
    mask[:, :, 4:10, 2:8] = 1.0
    (edited,), _ = sweep_edit(pipe, torch.stack(trajectory), FACTUAL, EDITS, PromptToPromptSettings(), 3, 3.0,
                              latent_mask=mask)
    for z in edited:
        assert torch.equal(z * (1 - mask), latents * (1 - mask))
        assert (z - latents)[mask.expand_as(z) == 1].abs().mean() > 1e-3


@pytest.mark.parametrize("method", NEW_METHODS)
def test_counterfactuals_do_not_depend_on_the_batch_they_were_made_in(pipe, method):
    images = _images(7, 3)
    prompts = ["a chest x-ray of a patient, smoker", "a chest x-ray", "a chest x-ray with cardiomegaly"]
    edits = [["a chest x-ray of a patient, non-smoker", "a chest x-ray without support devices",
              "a chest x-ray without cardiomegaly"]]
    whole = _edit(pipe, images, prompts, edits, method=method, seeds=[7, 8, 9])
    alone = _edit(pipe, images[1:2], prompts[1:2], [edits[0][1:2]], method=method, seeds=[8])
    # the random VAE decoder multiplies latent float noise (~1e-6 between batch shapes) by about 40; an image
    # coupled to its companions (a shared loss, early stop or row mix-up) differs by orders of magnitude more
    np.testing.assert_allclose(whole.counterfactuals[0][1], alone.counterfactuals[0][0], atol=2e-4)
    again = _edit(pipe, images, prompts, edits, method=method, seeds=[7, 8, 9])
    assert np.array_equal(whole.counterfactuals[0], again.counterfactuals[0])


def _expected_rows(method, steps, guidance, edits, settings, inner_steps, skip_steps=0):
    branches = 2 if guidance != 1.0 else 1
    if method == "ddpm":
        return branches * (steps - skip_steps) * (1 + edits), 0
    null_edits = settings if method == "direct" else 0  # direct's factual-prompt target row per setting
    sweep = branches * (1 + edits * settings + null_edits) * steps
    if method == "null_text" and guidance != 1.0:  # conditional pass, inner steps, last prediction per step
        return steps + steps * (1 + inner_steps + 1) + sweep, steps * inner_steps
    return steps + sweep, 0


@pytest.mark.parametrize("guidance", [1.0, 2.0])
@pytest.mark.parametrize("method", NEW_METHODS)
def test_engine_counts_what_the_unet_really_evaluated_forward_and_backward(pipe, method, guidance):
    calls = {"forward": 0, "backward": 0}
    original = pipe.unet.forward

    def spy(sample, *args, **kwargs):
        calls["forward"] += sample.shape[0]
        out = original(sample, *args, **kwargs)
        if out.sample.requires_grad:
            out.sample.register_hook(lambda g: calls.__setitem__("backward", calls["backward"] + sample.shape[0]))
        return out

    pipe.unet.forward = spy
    edits = EDITS + [FACTUAL]
    try:
        result = _edit(pipe, method=method, guidance_scale=guidance, edits=edits, null_text_early_stop=0.0,
                       ddpm_skip=0.4)
    finally:
        del pipe.unet.forward
    assert (result.unet_forward_per_image * 2, result.unet_backward * 4) == (calls["forward"], calls["backward"])
    assert result.unet_forward == pytest.approx(calls["forward"] / 4)  # 2 images x 2 edits
    forward, backward = _expected_rows(method, 3, guidance, 2, 3, 2, skip_steps=1)
    assert (result.unet_forward_per_image, result.unet_backward * 2) == (forward, backward)


def test_an_inversion_is_made_once_and_reused_by_later_edits_of_the_same_image(pipe):
    cache = InversionCache()
    first = _edit(pipe, method="null_text", inversion_cache=cache)
    assert (cache.misses, cache.hits, len(cache)) == (4, 0, 4)  # DDIM trajectory + null embeddings, 2 images
    other_edit = [["a chest x-ray with cardiomegaly"] * 2]
    second = _edit(pipe, method="null_text", edits=other_edit, inversion_cache=cache)
    assert cache.hits == 4
    assert second.unet_forward_per_image == 2 * (1 + 3) * 3  # only the sweep: source + 3 settings, guided
    assert second.unet_backward == 0 < first.unet_backward
    direct = _edit(pipe, method="direct", inversion_cache=cache)  # Direct Inversion shares the DDIM trajectory
    assert direct.unet_forward_per_image == 2 * (1 + 3 + 3) * 3  # source, 3 settings, their 3 null edits
    with torch.no_grad():
        next(pipe.unet.parameters()).add_(0.0)  # any in-place weight change is a new model version
    _edit(pipe, method="direct", inversion_cache=cache)
    assert cache.misses == 6


def test_the_selection_score_picks_the_setting_per_image_and_the_winner_is_recorded(pipe):
    seen = {}

    def select(candidates, image, edit_index):
        seen[edit_index] = [c.copy() for c in candidates]
        assert image.shape == (2, 64, 64) and image.max() <= 1.0
        scores = np.zeros((len(candidates), 2))
        scores[0, 0] = scores[2, 1] = 1.0  # image 0: self_replace 0.4; image 1: 0.8
        return scores

    result = _edit(pipe, method="direct", edits=EDITS + EDITS, select=select)
    assert sorted(seen) == [0, 1] and len(seen[0]) == 3
    assert result.settings == [[{"self_replace": 0.4}, {"self_replace": 0.8}]] * 2
    np.testing.assert_array_equal(result.counterfactuals[0][0], seen[0][0][0])
    np.testing.assert_array_equal(result.counterfactuals[0][1], seen[0][2][1])
    assert np.abs(seen[0][0][0] - seen[0][2][0]).max() > 1e-4  # the settings really differ
    default = _edit(pipe, method="direct")
    assert default.settings == [[{"self_replace": 0.8}] * 2]  # the most preserving setting
    assert _edit(pipe, method="ddpm").settings == [[{}, {}]]
    with pytest.raises(ValueError, match="shape"):
        _edit(pipe, method="direct", select=lambda c, i, e: np.zeros(3))


def test_a_bf16_pipeline_edits_with_null_text_optimised_in_fp32():
    pipe = build_tiny_pipeline(ModelConfig(), seed=0).to(dtype=torch.bfloat16)
    result = _edit(pipe, _images(n=1), FACTUAL[:1], [EDITS[0][:1]], method="null_text", num_inference_steps=2,
                   self_replace=[0.8], null_text_early_stop=0.0)
    assert pipe.unet.dtype == torch.bfloat16 and result.unet_backward == 2 * 2  # 2 steps x 2 inner steps
    assert all(np.isfinite(c).all() for c in result.counterfactuals)
    assert {type(p).__name__ for p in pipe.unet.attn_processors.values()} == {"AttnProcessor2_0"}


def test_the_engine_defaults_are_the_config_defaults_and_bad_settings_are_clear_errors(pipe):
    defaults = EditConfig()
    params = inspect.signature(counterfactuals).parameters
    for name in ("cross_replace", "edit_word_weight", "null_text_inner_steps", "null_text_early_stop", "ddpm_skip",
                 "num_inference_steps", "guidance_scale", "strength", "composite"):
        assert params[name].default == getattr(defaults, name), name
    assert list(params["self_replace"].default) == defaults.self_replace
    for method in NEW_METHODS:
        assert EditConfig(method=method).method == method
    with pytest.raises(ValueError, match="self_replace"):
        _edit(pipe, method="p2p", self_replace=[1.5])
    with pytest.raises(ValueError, match="ddpm_skip"):
        _edit(pipe, method="ddpm", ddpm_skip=1.0)
    with pytest.raises(ValueError):
        EditConfig(self_replace=[0.4, 1.2])


def test_engine_options_carry_every_setting_of_the_config_the_engine_takes():
    edit = EditConfig(method="null_text", num_inference_steps=7, guidance_scale=3.0, strength=0.3, composite=False,
                      cross_replace=0.5, self_replace=[0.3, 0.7], edit_word_weight=1.5, null_text_inner_steps=4,
                      null_text_early_stop=1e-3, ddpm_skip=0.1)
    options = engine_options(edit)
    assert set(options) == set(inspect.signature(counterfactuals).parameters) & set(EditConfig.model_fields)
    for name, value in options.items():
        assert value == (tuple(edit.self_replace) if name == "self_replace" else getattr(edit, name)), name


def test_batch_inversions_compute_only_the_missing_images_once():
    cache = InversionCache(max_images=2)
    computed = []

    def compute(indices):
        computed.append(indices)
        return [{"x": torch.full((1,), float(i))} for i in indices]

    batch = BatchInversions(cache, [("model", "a"), ("model", "b"), ("model", "a")])
    out = batch.per_image("ddim", ["p", "p", "p"], {"steps": 3}, compute)
    assert computed == [[0, 1]] and [float(o["x"]) for o in out] == [0.0, 1.0, 0.0]
    batch.per_image("ddim", ["p", "q", "p"], {"steps": 3}, compute)  # another prompt is another inversion
    assert computed[-1] == [1] and len(cache) == 2  # the LRU bound holds


def test_removing_a_held_direction_takes_out_its_component_where_it_acts_and_nothing_elsewhere():
    from cfgen.editing.ddpm_inversion import remove_held_direction

    g = torch.Generator().manual_seed(0)
    gamma = torch.zeros(2, 4, 8, 8)
    gamma[:, :, 2:4, 2:4] = torch.randn(2, 4, 2, 2, generator=g) * 5  # the held attribute acts in 4 cells
    other = torch.randn(2, 4, 8, 8, generator=g)
    other -= (other * gamma).sum(1, keepdim=True) / (gamma * gamma).sum(1, keepdim=True).clamp_min(1e-20) * gamma
    delta = other + 0.7 * gamma  # the edit: its own direction plus some of the held attribute's
    kept = remove_held_direction(delta, gamma)
    power = (gamma * gamma).sum(1)
    along = (kept * gamma).sum(1) / power.clamp_min(1e-20)
    # where gamma acts, 0.7 of it is taken out with the weight power / (power + the image's mean power): the
    # strongest of the 4 cells keeps a few percent, and none keeps more than a quarter
    mean = power.mean(dim=(1, 2), keepdim=True)
    torch.testing.assert_close(along[:, 2:4, 2:4], (0.7 * mean / (power + mean))[:, 2:4, 2:4])
    assert along[:, 2:4, 2:4].max() < 0.25 * 0.7 and along[:, 2:4, 2:4].min() < 0.05 * 0.7
    torch.testing.assert_close(kept[:, :, 4:, :], delta[:, :, 4:, :])  # nothing held there: untouched
    torch.testing.assert_close(remove_held_direction(other, gamma), other)  # an edit that does not move it: kept
    torch.testing.assert_close(remove_held_direction(delta, torch.zeros_like(gamma)), delta)


HOLD = [["a chest x-ray of a 63 year old female patient, smoker",  # devices removed
         "a chest x-ray of a 40 year old male patient, with pleural effusion, with support devices"]]


def test_held_ddpm_edit_reconstructs_with_the_factual_prompt_and_counts_one_row_per_held_image(pipe):
    images = _images(8)
    kwargs = dict(method="ddpm", guidance_scale=1.0, ddpm_skip=0.0, null_edit=False)
    # edit 0 is the factual prompt (nothing to hold: its direction is zero, so no held rows), edit 1 a real one; in
    # edit 1 image 1's held prompt is its edited one, which holds nothing and costs no row either
    holds = [HOLD, [[HOLD[0][0], EDITS[0][1]]]]
    out = _edit(pipe, images, edits=[FACTUAL, EDITS[0]], hold_prompts=holds, **kwargs)
    np.testing.assert_allclose(out.counterfactuals[0], images / 255.0, atol=2e-3)  # composited factual edit
    # inversion 2 rows a step; sampling: 2 edits x 2 images x (source + edited) + 1 held row, 3 steps
    assert out.unet_forward == (3 * 2 + 3 * (2 * 2 * 2 + 1)) / 4
    plain = _edit(pipe, images, edits=[EDITS[0]], **kwargs)
    nothing_held = _edit(pipe, images, edits=[EDITS[0]], hold_prompts=[EDITS], **kwargs)
    np.testing.assert_allclose(nothing_held.raw_counterfactuals[0], plain.raw_counterfactuals[0], atol=1e-5)
    assert nothing_held.unet_forward == plain.unet_forward
    # holding the edit's own attribute (the edited prompt with it changed back: the factual one) takes much of the
    # edit away (all of it where it is strongest)
    own = _edit(pipe, images, edits=[EDITS[0]], hold_prompts=[[FACTUAL]], **kwargs)
    x = plain.autoencoded
    assert np.abs(own.raw_counterfactuals[0] - x).mean() < 0.8 * np.abs(plain.raw_counterfactuals[0] - x).mean()


def test_holding_attributes_is_for_ddpm_and_held_attributes_must_be_binary_ones_the_template_says(pipe):
    from cfgen.config import PromptConfig
    from cfgen.pipeline.generate import edit_hold_prompts
    from cfgen.pipeline.plan import rules

    with pytest.raises(ValueError, match="hold"):
        _edit(pipe, method="ddim", hold_prompts=HOLD)
    with pytest.raises(ValueError, match="hold_prompts has 2 edits"):
        _edit(pipe, method="ddpm", hold_prompts=HOLD * 2)
    with pytest.raises(ValueError, match="hold"):
        EditConfig(method="sdedit", hold=["support_devices"])
    with pytest.raises(ValueError, match="only binary attributes"):
        rules(EditConfig(method="ddpm", hold=["age"]), PromptConfig())
    config = EditConfig(method="ddpm", hold=["support_devices", "smoking"])
    rows = [{"support_devices": 1, "smoking": 0}, {"support_devices": 0, "smoking": 1}]
    held = edit_hold_prompts(rows, [{"smoking": 1}, {"cardiomegaly": 1}], config, PromptConfig(negatives="omit"))
    # [edit][held attribute][row]: smoking's edit holds devices only; cardiomegaly's holds both
    assert [len(e) for e in held] == [1, 2] and all(len(c) == 2 for e in held for c in e)
    assert held[0][0] == ["a chest x-ray of a patient, smoker",
                          "a chest x-ray of a patient, smoker, with support devices"]
    # one edit per row (the way back of a reversibility check: each row to its own factual values)
    back = edit_hold_prompts(rows, [[{"smoking": 0}, {"smoking": 1}]], config, PromptConfig(negatives="omit"))
    assert back[0][0] == ["a chest x-ray of a patient, non-smoker",
                          "a chest x-ray of a patient, smoker, with support devices"]
    assert edit_hold_prompts(rows, [{"smoking": 1}], EditConfig(method="ddpm"), PromptConfig()) is None


def test_a_server_that_holds_attributes_refuses_requests_for_other_methods_with_a_clear_422():
    from cfgen.config import JobConfig
    from cfgen.serve.inputs import EditSpec, RequestError, check_spec

    job = JobConfig.model_validate({"edit": {"method": "ddpm", "hold": ["support_devices"]}})
    assert check_spec(EditSpec(set={"smoking": 1}), job)[0] == "ddpm"
    with pytest.raises(RequestError, match="holds") as err:
        check_spec(EditSpec(set={"smoking": 1}, method="sdedit"), job)
    assert err.value.status == 422
    plain = JobConfig.model_validate({"edit": {"method": "ddpm"}})
    assert check_spec(EditSpec(set={"smoking": 1}, method="sdedit"), plain)[0] == "sdedit"
