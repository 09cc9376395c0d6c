"""The editing engine: exact inversions, counted UNet work, compositing and confinement, determinism."""

import numpy as np
import pytest
import torch

from cfgen.config import EditConfig, ModelConfig
from cfgen.editing.counting import CountingUNet
from cfgen.editing.ddim import ddim_invert, ddim_sample
from cfgen.editing.engine import change_mask, counterfactuals, keep_input_outside_change
from cfgen.models.sd import build_tiny_pipeline


class ZeroUNet(torch.nn.Module):
    """A UNet whose noise prediction is always zero: DDIM inversion is then exactly invertible."""

    def forward(self, latents, t, encoder_hidden_states=None):
        return type("Out", (), {"sample": torch.zeros_like(latents)})()


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline(ModelConfig(), seed=0)


FACTUAL = ["a chest x-ray with support devices"] * 2
EDITS = [["a chest x-ray without support devices"] * 2, ["a chest x-ray with pleural effusion"] * 2]


def _images(seed=1, n=2):
    return np.random.default_rng(seed).integers(0, 256, (n, 64, 64), dtype=np.uint8)


def test_invert_then_denoise_is_exact_with_zero_noise_prediction(pipe):
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = torch.zeros(2, 77, 32)
    trajectory = []
    noisy = ddim_invert(ZeroUNet(), pipe.scheduler, latents, cond, 25, trajectory=trajectory)
    assert (noisy - latents).abs().max() > 0.1  # inversion really moved the latent up the trajectory
    assert len(trajectory) == 26 and torch.equal(trajectory[0], latents) and torch.equal(trajectory[-1], noisy)
    back = ddim_sample(ZeroUNet(), pipe.scheduler, noisy, cond, 25)
    assert torch.allclose(back, latents, atol=1e-5)
    # blending with the trajectory everywhere (an empty mask) walks back down the trajectory exactly too
    kept = ddim_sample(ZeroUNet(), pipe.scheduler, noisy, cond, 25, source=trajectory,
                       latent_mask=torch.zeros(2, 1, 16, 16))
    assert torch.equal(kept, latents)


@pytest.mark.parametrize("method", ["ddim", "sdedit"])
def test_engine_counts_what_the_unet_really_evaluated(pipe, method):
    calls = []
    original = pipe.unet.forward

    def spy(sample, *args, **kwargs):
        calls.append(sample.shape[0])
        return original(sample, *args, **kwargs)

    pipe.unet.forward = spy
    try:
        result = counterfactuals(pipe, _images(), FACTUAL, EDITS, method=method, num_inference_steps=5,
                                 strength=0.6, guidance_scale=2.0)
    finally:
        del pipe.unet.forward
    assert result.unet_forward_per_image * 2 == sum(calls)
    assert result.unet_forward == pytest.approx(sum(calls) / 4)  # 2 images x 2 edits
    expected = (1 + 2 + 1) * 5 * 2 if method == "ddim" else (2 + 1) * 3 * 2  # guidance doubles every row
    assert result.unet_forward_per_image == expected
    assert result.unet_backward == 0


def test_counting_wrapper_counts_rows_forward_and_backward():
    class Lin(torch.nn.Module):
        def forward(self, sample, t, encoder_hidden_states=None):
            return sample * encoder_hidden_states.mean()

    counter = CountingUNet(Lin())
    x = torch.ones(3, 1)
    with torch.no_grad():
        counter(x, 0, encoder_hidden_states=torch.ones(3, 2))
    emb = torch.ones(3, 2, requires_grad=True)
    counter(x, 0, encoder_hidden_states=emb).sum().backward()
    assert (counter.forward_rows, counter.backward_rows) == (6, 3)


def test_compositing_keeps_the_input_where_the_edit_changes_nothing():
    image = _images(3, 1).astype(np.float32) / 255
    null = np.clip(image + 0.05, 0, 1)  # an autoencoder that brightens everything
    edited = null.copy()
    edited[:, 10:20, 10:20] += 0.3  # the edit's own change
    out = keep_input_outside_change(image, edited, null, composite=True, mask=None)
    outside = np.ones_like(image, bool)
    outside[:, 10:20, 10:20] = False
    assert np.abs(out - image)[outside].max() < 1e-6
    assert np.allclose((out - image)[~outside], np.clip(image + 0.3, 0, 1)[~outside] - image[~outside], atol=1e-6)
    assert np.abs(keep_input_outside_change(image, edited, null, False, None) - image)[outside].mean() > 0.04


def test_the_edit_s_own_change_mask_keeps_the_strong_change_and_drops_the_diffuse_drift():
    image = _images(5, 2).astype(np.float32) / 255 * 0.3 + 0.3  # no clipping at 0 or 1 below
    null = image + 0.02  # the autoencoder's shift, common to both decodes
    drift = np.random.default_rng(0).normal(0, 0.01, image.shape).astype(np.float32)
    edited = null + drift  # a strong edit moves the whole image a little ...
    edited[0, 20:30, 20:30] += 0.3  # ... and the structure it was asked to move a lot
    edited[1, 40:44, 5:25] -= 0.2
    out = keep_input_outside_change(image, edited, null, True, None, change_threshold=0.5, change_smoothing=2)
    region = np.zeros_like(image, bool)
    region[0, 20:30, 20:30] = region[1, 40:44, 5:25] = True
    far = ~np.asarray(change_mask(np.where(region, 1.0, 0.0), 0.01, 4), bool)  # beyond the mask's grown edge
    assert np.abs(out - image)[far].max() == 0.0  # the drift outside the change is gone
    assert np.abs((out - image)[0, 22:28, 22:28] - 0.3 - drift[0, 22:28, 22:28]).max() < 1e-5  # the change kept
    assert np.abs((out - image)[1, 41:43, 8:22] + 0.2 - drift[1, 41:43, 8:22]).max() < 1e-5
    plain = keep_input_outside_change(image, edited, null, True, None)
    assert np.abs(plain - image)[far].mean() > 0.005  # without it the drift stays
    # per image: an image's mask does not depend on its batch neighbours; no change, no mask
    alone = change_mask((edited - null)[1:], 0.5, 2)
    assert np.array_equal(change_mask(edited - null, 0.5, 2)[1:], alone)
    assert change_mask(np.zeros((1, 8, 8), np.float32), 0.5, 2).max() == 0.0
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="change_threshold"):
            change_mask(edited, bad)


def test_the_grown_change_mask_keeps_a_removed_line_and_still_drops_the_drift():
    rng = np.random.default_rng(1)
    change = rng.normal(0, 0.01, (2, 64, 64)).astype(np.float32)  # the drift
    change[:, 10:16, 40:48] -= 0.8  # a device's box removed ...
    change[:, 16:50, 41] -= 0.7  # ... and its lead, one pixel wide, running down from it
    change[:, 55:57, 5:7] -= 0.7  # a bright speck elsewhere, not connected to the box
    change[1] = 0.0
    plain = change_mask(change, 0.5, 2)
    grown = change_mask(change, 0.5, 2, grow=0.25)
    assert plain[0, 12, 44] == grown[0, 12, 44] == 1.0  # the box, either way
    assert plain[0, 40, 41] == 0.0 and grown[0, 40, 41] == 1.0  # smoothing thins the lead out; hysteresis keeps it
    assert grown[0, 56, 6] == 0.0  # a strong pixel that does not connect to the kept change stays out
    assert grown[0, 30, 20] == 0.0 and grown[0, 60, 60] == 0.0  # so does the drift
    assert grown[1].max() == 0.0  # no change, no mask
    assert np.array_equal(change_mask(change[:1], 0.5, 2, grow=0.25), grown[:1])  # per image
    np.testing.assert_array_equal(change_mask(change, 0.5, 2, grow=0.0), plain)
    with pytest.raises(ValueError, match="change_grow"):
        change_mask(change, 0.5, 2, grow=1.0)
    with pytest.raises(ValueError, match="change_grow"):
        EditConfig(method="ddpm", change_grow=0.25)  # it grows the change mask: needs one
    assert "grown to 0.25" in EditConfig(method="ddpm", change_threshold=0.5, change_grow=0.25).describe()


def test_change_mask_through_the_engine_and_config_needs_compositing(pipe):
    from cfgen.config import EditConfig

    with pytest.raises(ValueError, match="composite"):
        EditConfig(method="ddpm", change_threshold=0.5, composite=False)
    with pytest.raises(ValueError, match="composite"):
        counterfactuals(pipe, _images(), FACTUAL, EDITS, method="ddpm", num_inference_steps=3, composite=False,
                        change_threshold=0.5)
    with pytest.raises(ValueError, match="change_threshold"):  # before any UNet work
        counterfactuals(pipe, _images(), FACTUAL, EDITS, method="ddpm", num_inference_steps=3, change_threshold=1.5)
    same = counterfactuals(pipe, _images(), FACTUAL, [FACTUAL], method="ddpm", num_inference_steps=3,
                           change_threshold=0.5)  # the factual prompt as the edit: nothing to keep
    assert np.abs(same.counterfactuals[0] - _images().astype(np.float32) / 255).max() < 1e-5
    masked = counterfactuals(pipe, _images(), FACTUAL, EDITS, method="ddpm", num_inference_steps=3,
                             change_threshold=0.5)
    plain = counterfactuals(pipe, _images(), FACTUAL, EDITS, method="ddpm", num_inference_steps=3)
    x = _images().astype(np.float32) / 255
    for k, (m, p) in enumerate(zip(masked.counterfactuals, plain.counterfactuals)):
        changed = np.abs(m - x) > 1e-4
        assert 0 < changed.mean() < (np.abs(p - x) > 1e-4).mean()  # kept less of the image than the plain edit
        expected = keep_input_outside_change(x, plain.raw_counterfactuals[k], plain.null_edits[k], True, None, 0.5, 2)
        assert np.abs(m - expected).max() < 1e-5  # the same edit, confined to its own change


def test_mask_confined_edit_leaves_pixels_outside_the_mask_as_they_were(pipe):
    images = _images(4)
    masks = np.zeros((2, 64, 64), np.float32)
    masks[:, 16:40, 8:30] = 1.0
    for method in ("ddim", "sdedit"):
        for composite in (True, False):
            result = counterfactuals(pipe, images, FACTUAL, EDITS, method=method, num_inference_steps=3,
                                     composite=composite, masks=masks, seeds=[11, 12])
            for cf in result.counterfactuals:
                assert np.abs(cf - images / 255.0)[masks == 0].max() < 1e-6


def test_counterfactuals_do_not_depend_on_the_batch_they_were_made_in(pipe):
    images = _images(5, 3)
    prompts = ["a chest x-ray of a patient, smoker", "a chest x-ray", "a chest x-ray with cardiomegaly"]
    edits = [["a chest x-ray of a patient, non-smoker"] * 3]
    for method in ("ddim", "sdedit"):
        whole = counterfactuals(pipe, images, prompts, edits, method=method, num_inference_steps=3, seeds=[7, 8, 9])
        alone = counterfactuals(pipe, images[1:2], prompts[1:2], [edits[0][1:2]], method=method,
                                num_inference_steps=3, seeds=[8])
        np.testing.assert_allclose(whole.counterfactuals[0][1], alone.counterfactuals[0][0], atol=2e-5)
        again = counterfactuals(pipe, images, prompts, edits, method=method, num_inference_steps=3, seeds=[7, 8, 9])
        assert np.array_equal(whole.counterfactuals[0], again.counterfactuals[0])


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_fillers_are_all_different_however_many(dtype):
    """Two alike would be inverted once, shrinking the padded batch: 300 fillers (more than 8 bits of grey)."""
    from cfgen.editing.padding import fillers

    out = fillers(np.zeros((8, 8), dtype=dtype), 300)
    assert out.shape == (300, 8, 8) and out.dtype == dtype
    assert len({f.tobytes() for f in out}) == 300


@pytest.mark.parametrize("method", ["ddpm", "direct"])
def test_padded_calls_give_an_image_the_same_counterfactual_to_the_bit_in_any_batch(pipe, method):
    """Unpadded, an image edited alone differs from itself edited in a batch of 4 by rounding (here up to 0.015 grey
    levels with ddpm, 0.008 with direct); padded to 4, alone, second of two or in the full batch, it is the same to
    the bit."""
    from cfgen.editing.inversion_cache import InversionCache
    from cfgen.editing.padding import counterfactuals_padded

    images = _images(6, 4)
    prompts = ["a chest x-ray of a patient, smoker", "a chest x-ray", "a chest x-ray with cardiomegaly",
               "a chest x-ray, support devices"]
    edits = [["a chest x-ray of a patient, non-smoker"] * 4, ["a chest x-ray with pleural effusion"] * 4]
    options = dict(method=method, num_inference_steps=6, guidance_scale=3.0, self_replace=(0.6,))

    def edit(rows, pad_to=None):
        args = (pipe, images[rows], [prompts[r] for r in rows], [[e[r] for r in rows] for e in edits])
        if pad_to:
            return counterfactuals_padded(*args, pad_to, seeds=[20 + r for r in rows], **options)
        return counterfactuals(*args, seeds=[20 + r for r in rows], inversion_cache=InversionCache(), **options)

    whole, alone, pair = edit([0, 1, 2, 3], 4), edit([1], 4), edit([3, 1], 4)
    for e in range(len(edits)):
        assert np.array_equal(whole.counterfactuals[e][1], alone.counterfactuals[e][0])
        assert np.array_equal(whole.counterfactuals[e][1], pair.counterfactuals[e][1])
        assert alone.counterfactuals[e].shape == (1, *images.shape[1:]) and len(alone.settings[e]) == 1
    assert np.array_equal(whole.null_edit[1], alone.null_edit[0])
    assert alone.unet_forward == pytest.approx(4 * whole.unet_forward)  # the fillers' rows are charged to it
    unpadded_whole, unpadded_alone = edit([0, 1, 2, 3]), edit([1])
    assert not np.array_equal(unpadded_whole.counterfactuals[0][1], unpadded_alone.counterfactuals[0][0])
    with pytest.raises(ValueError, match="no images to edit"):
        counterfactuals_padded(pipe, images[:0], [], [[], []], 4, **options)
    chunked = edit([0, 1, 2, 3, 1], 2)  # more images than a call holds: calls of 2, the last one padded
    assert np.array_equal(chunked.counterfactuals[1][4], edit([1], 2).counterfactuals[1][0])
    assert [len(c) for c in chunked.counterfactuals] == [5, 5] and len(chunked.settings[0]) == 5


def test_the_null_edit_is_the_input_after_compositing(pipe):
    images = _images(6)
    result = counterfactuals(pipe, images, FACTUAL, [FACTUAL], num_inference_steps=3)
    np.testing.assert_allclose(result.counterfactuals[0], images / 255.0, atol=1e-6)
    assert np.abs(result.null_edit - images / 255.0).mean() > 0.01  # the raw reconstruction is not


@pytest.mark.parametrize("method", ["ddim", "sdedit"])
def test_without_the_null_edit_only_the_edits_are_sampled_unless_compositing_needs_it(pipe, method):
    kwargs = dict(method=method, num_inference_steps=5, strength=0.6, guidance_scale=2.0, seeds=[1, 2])
    full = counterfactuals(pipe, _images(7), FACTUAL, EDITS, composite=False, **kwargs)
    edits_only = counterfactuals(pipe, _images(7), FACTUAL, EDITS, composite=False, null_edit=False, **kwargs)
    assert edits_only.null_edit is None and full.null_edit is not None
    sampled = 5 if method == "ddim" else 3  # SDEdit at strength 0.6 samples 3 of the 5 steps
    assert full.unet_forward_per_image - edits_only.unet_forward_per_image == sampled * 2  # one prompt list, guided
    for a, b in zip(full.counterfactuals, edits_only.counterfactuals):
        np.testing.assert_allclose(a, b, atol=1e-5)  # the same edits, sampled in a smaller batch
    composited = counterfactuals(pipe, _images(7), FACTUAL, EDITS, composite=True, null_edit=False, **kwargs)
    assert composited.unet_forward_per_image == full.unet_forward_per_image
    np.testing.assert_allclose(composited.null_edit, full.null_edit, atol=1e-5)


def test_unknown_method_and_bad_strength_are_clear_errors(pipe):
    with pytest.raises(ValueError, match="unknown editing method"):
        counterfactuals(pipe, _images(), FACTUAL, EDITS, method="magic")
    with pytest.raises(ValueError, match="strength"):
        counterfactuals(pipe, _images(), FACTUAL, EDITS, method="sdedit", strength=0.0)


def test_change_fill_edited_puts_the_edit_itself_inside_the_change_and_the_input_outside(pipe):
    from cfgen.config import EditConfig

    image = _images(6, 1).astype(np.float32) / 255 * 0.3 + 0.3
    null = image * 0.5 + 0.2  # a null edit that kept only a blur of the input
    edited = null.copy()
    edited[0, 20:30, 20:30] -= 0.25  # the edit removes a structure there
    inside = change_mask(edited - null, 0.5, 2) > 0.999
    out = keep_input_outside_change(image, edited, null, True, None, 0.5, 2, change_fill="edited")
    composite = keep_input_outside_change(image, edited, null, True, None, 0.5, 2)
    assert inside.any() and np.abs(out - edited)[inside].max() < 1e-6  # the edit itself, not input + difference
    assert np.abs(composite - (image + edited - null))[inside].max() < 1e-6
    outside = change_mask(edited - null, 0.5, 2) == 0
    assert np.array_equal(out[outside], image[outside]) and np.array_equal(composite[outside], image[outside])
    with pytest.raises(ValueError, match="change_fill"):
        EditConfig(method="ddpm", change_fill="edited")  # no change mask to fill
    with pytest.raises(ValueError, match="change_fill"):  # before any UNet work
        counterfactuals(pipe, _images(), FACTUAL, EDITS, method="ddpm", num_inference_steps=2, change_threshold=0.5,
                        change_fill="blend")
