"""The tiny VAE's fit: cached by its inputs in object storage, reused instead of refitted; fidelity per structure."""

import numpy as np
import pytest
import torch

from cfgen.config import DecodeConfig, ModelConfig, PhantomConfig, VAEPretrainConfig
from cfgen.metrics.image import reconstruction_fidelity
from cfgen.models.sd import build_tiny_pipeline
from cfgen.train.vae import FIT_RECORD, cached_fit, fit_key, fit_vae, random_crops, reconstruct


def _images(seed=0, n=16):
    return np.random.default_rng(seed).integers(0, 256, (n, 64, 64), dtype=np.uint8)


def _weights(vae):
    return torch.cat([p.detach().flatten() for p in vae.parameters()])


def test_fit_is_cached_by_its_inputs_and_reused(s3_storage, bucket):
    cfg = VAEPretrainConfig(steps=3, batch_size=4)
    model = ModelConfig()
    images = _images()
    cache = f"s3://{bucket}/vae-cache"
    first, rec1 = cached_fit(build_tiny_pipeline(model).vae, images, model.tiny, 64, cfg, cache, s3_storage)
    assert rec1["cached"] is False and rec1["steps"] == 3
    # the latent scale is set from the data: unit-variance latents for the UNet
    assert abs(first.config.scaling_factor - 0.18215) > 1e-6
    second, rec2 = cached_fit(build_tiny_pipeline(model, seed=5).vae, images, model.tiny, 64, cfg, cache,
                              s3_storage)
    assert rec2["cached"] is True and rec2["key"] == rec1["key"]
    assert torch.equal(_weights(first), _weights(second))  # the stored fit, not the fresh random VAE
    assert second.config.scaling_factor == first.config.scaling_factor
    # other data (or other settings) is another fit
    assert fit_key(model.tiny, 64, cfg, 0, _images(seed=1)) != rec1["key"]
    assert fit_key(model.tiny, 64, cfg.model_copy(update={"steps": 4}), 0, images) != rec1["key"]
    # an option left unset does not enter the key (adding one keeps earlier fits valid); set, it does
    assert fit_key(model.tiny, 64, cfg.model_copy(update={"crop": 32}), 0, images) != rec1["key"]
    # where the fit lives does not change what it is
    assert fit_key(model.tiny, 64, cfg.model_copy(update={"cache_uri": "elsewhere"}), 0, images) == rec1["key"]


def test_incomplete_cache_entry_is_refitted(tmp_path):
    cfg = VAEPretrainConfig(steps=2, batch_size=4)
    model = ModelConfig()
    images = _images()
    _, rec = cached_fit(build_tiny_pipeline(model).vae, images, model.tiny, 64, cfg, str(tmp_path), None)
    (tmp_path / rec["key"] / FIT_RECORD).unlink()  # a crash before the record was written
    _, again = cached_fit(build_tiny_pipeline(model).vae, images, model.tiny, 64, cfg, str(tmp_path), None)
    assert again["cached"] is False and (tmp_path / rec["key"] / FIT_RECORD).exists()


def test_fidelity_per_structure_sees_a_blurred_rib():
    from cfgen.phantoms.scm import PhantomSCM
    from cfgen.phantoms.truth import STRUCTURES, structure_masks, true_counterfactual

    scm = PhantomSCM(PhantomConfig(n=8, size=64))
    decode = DecodeConfig(size=64)
    idx = next(i for i in range(8) if scm.subject(i).support_devices)
    image = true_counterfactual(scm, idx, {}, decode)
    masks = structure_masks(scm, idx, decode)
    assert set(masks) == set(STRUCTURES) and masks["ribs"].sum() > 50 and masks["device"].sum() > 5
    blurred = image.astype(np.float32).copy()
    blurred[masks["ribs"]] = blurred[~masks["ribs"]].mean()  # an autoencoder that loses the ribs
    fid = reconstruction_fidelity(image[None], blurred[None].astype(np.uint8),
                                  {k: v[None] for k, v in masks.items()})
    assert fid["ribs"] > 5 * fid["image"] > 0
    assert fid["device"] < fid["ribs"]  # the lead was kept


def test_reconstruct_returns_unit_images():
    pipe = build_tiny_pipeline(ModelConfig())
    out = reconstruct(pipe.vae, _images(n=3))
    assert out.shape == (3, 64, 64) and out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1


def test_random_crops_are_aligned_pieces_of_each_image_and_whole_images_pass_through():
    x = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).reshape(2, 3, 16, 16)
    crops = random_crops(x, 8, torch.Generator().manual_seed(0))
    assert crops.shape == (2, 3, 8, 8)
    for img, crop in zip(x, crops):
        r, c = divmod(int(crop[0, 0, 0] - img[0, 0, 0]), 16)  # where the crop's corner was in its image
        assert r % 4 == 0 and c % 4 == 0 and torch.equal(crop, img[:, r:r + 8, c:c + 8])
    assert random_crops(x, 16, torch.Generator()) is x
    with pytest.raises(ValueError, match="multiple of 4"):
        random_crops(x, 6, torch.Generator())
    # the fit runs on crops and still reconstructs whole images (a convolutional VAE)
    vae = build_tiny_pipeline(ModelConfig()).vae
    losses = fit_vae(vae, _images(n=8), VAEPretrainConfig(steps=2, batch_size=4, crop=32))
    assert len(losses) == 2 and reconstruct(vae, _images(n=2)).shape == (2, 64, 64)
    # a crop fit can finish on whole images (GroupNorm then sees a whole image's statistics); without crops the
    # fit is on whole images already and there is nothing to finish
    finished = fit_vae(build_tiny_pipeline(ModelConfig()).vae, _images(n=8),
                       VAEPretrainConfig(steps=2, batch_size=4, crop=32, finish_steps=3))
    assert len(finished) == 5
    assert len(fit_vae(build_tiny_pipeline(ModelConfig()).vae, _images(n=8),
                       VAEPretrainConfig(steps=2, batch_size=4, finish_steps=3))) == 2
    tiny, images = ModelConfig().tiny, _images(n=8)
    cfg = VAEPretrainConfig(steps=2, crop=32)
    finishing = cfg.model_copy(update={"finish_steps": 3})
    assert fit_key(tiny, 64, finishing, 0, images) != fit_key(tiny, 64, cfg, 0, images)
