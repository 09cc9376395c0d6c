"""The tiny SD pipeline: built offline, saved in diffusers format, loaded back with from_pretrained."""

import numpy as np
import pytest
import torch

from cfgen.config import ModelConfig
from cfgen.models.sd import (
    build_tiny_pipeline,
    decode_latents,
    encode_images,
    encode_prompts,
    load_pipeline,
    save_pipeline,
    vae_scale_factor,
)
from cfgen.models.tokenizer import build_domain_tokenizer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    save_pipeline(build_tiny_pipeline(ModelConfig(), seed=0), str(path))
    return path


def test_prompt_words_are_single_tokens():
    tok = build_domain_tokenizer()
    prompt = "a chest x-ray of a 63 year old female patient, smoker, with support devices, without pleural effusion"
    tokens = tok.convert_ids_to_tokens(tok(prompt).input_ids)
    assert "support</w>" in tokens and "effusion</w>" in tokens and "without</w>" in tokens
    assert len(tokens) < 30  # one token per word, not per character
    assert tok.eos_token_id == len(tok) - 1  # pipelines find the pooled token at the highest id


def test_saved_folder_is_a_diffusers_pipeline(tiny_dir):
    for part in ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tiny_dir / part).exists(), part


def test_round_trip_gives_identical_outputs(tiny_dir):
    original = build_tiny_pipeline(ModelConfig(), seed=0)
    loaded = load_pipeline(str(tiny_dir))
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64), dtype=np.uint8)
    assert torch.equal(encode_images(original, images), encode_images(loaded, images))
    assert torch.equal(encode_prompts(original, ["a chest x-ray"]), encode_prompts(loaded, ["a chest x-ray"]))
    assert loaded.scheduler.config.steps_offset == 1
    assert loaded.scheduler.config.beta_schedule == "scaled_linear"


def test_latent_shape_and_decode_range(tiny_dir):
    pipe = load_pipeline(str(tiny_dir))
    latents = encode_images(pipe, np.zeros((3, 64, 64), dtype=np.uint8))
    factor = vae_scale_factor(pipe.vae)
    assert latents.shape == (3, pipe.vae.config.latent_channels, 64 // factor, 64 // factor)
    assert pipe.unet.config.in_channels == pipe.vae.config.latent_channels == 16
    out = decode_latents(pipe, latents)
    assert out.shape == (3, 64, 64) and out.min() >= 0 and out.max() <= 1


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no diffusers pipeline folder"):
        load_pipeline(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_pipeline(str(tmp_path / "empty"))


def test_pipeline_round_trips_through_s3(tiny_dir, s3_storage, bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("CFGEN_CACHE", str(tmp_path / "cache"))
    pipe = load_pipeline(str(tiny_dir))
    uri = f"s3://{bucket}/models/tiny"
    save_pipeline(pipe, uri, s3_storage)
    loaded = load_pipeline(uri, s3_storage)
    images = np.full((1, 64, 64), 128, dtype=np.uint8)
    assert torch.equal(encode_images(pipe, images), encode_images(loaded, images))


def test_tiny_pipeline_build_is_deterministic():
    """The same config builds the same token ids and weights, so a rebuilt model equals a saved one."""
    a, b = build_tiny_pipeline(ModelConfig(), seed=0), build_tiny_pipeline(ModelConfig(), seed=0)
    assert a.tokenizer.get_vocab() == b.tokenizer.get_vocab()
    assert torch.equal(encode_prompts(a, ["a chest x-ray with pleural effusion"]),
                       encode_prompts(b, ["a chest x-ray with pleural effusion"]))
