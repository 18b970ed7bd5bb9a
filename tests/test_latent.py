"""Latent diffusion with a small randomly initialised autoencoder: encoding, sampling, decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, VQModel

from models import build_scheduler, build_unet
from models.latent import (
    CachedLatents,
    decode_to_uint8,
    encode,
    generate_images,
    latent_geometry,
    load_autoencoder,
    sample_latents,
)

TINY = {"block_out_channels": (8, 8), "down_block_types": ("DownEncoderBlock2D",) * 2,
        "up_block_types": ("UpDecoderBlock2D",) * 2, "norm_num_groups": 4, "sample_size": 16}


def save_tiny_autoencoder(folder, kind="kl"):
    """A 2-level (downsampling 2x) random autoencoder in diffusers' format."""
    torch.manual_seed(0)
    model = AutoencoderKL(latent_channels=4, **TINY) if kind == "kl" else VQModel(
        latent_channels=3, num_vq_embeddings=16, vq_embed_dim=3, **TINY)
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_autoencoder_round_trip_and_geometry(kind, tmp_path):
    autoencoder = load_autoencoder(str(save_tiny_autoencoder(tmp_path / kind, kind)), kind)
    assert not any(p.requires_grad for p in autoencoder.parameters())  # frozen
    size, channels = latent_geometry(autoencoder, 16)
    assert (size, channels) == (8, 4 if kind == "kl" else 3)
    images = torch.rand(5, 3, 16, 16) * 2 - 1
    latents = encode(autoencoder, images, batch_size=2)
    assert latents.shape == (5, channels, 8, 8)
    decoded = decode_to_uint8(autoencoder, latents, batch_size=2)
    assert decoded.shape == (5, 3, 16, 16) and decoded.dtype == torch.uint8
    with pytest.raises(ValueError, match="not divisible"):
        latent_geometry(autoencoder, 15)


def test_missing_autoencoder_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.autoencoder.path"):
        load_autoencoder(str(tmp_path / "nothing"), "kl")


def test_cached_latents_encode_only_the_clients_images_once(tmp_path):
    from models import LabeledImages

    autoencoder = load_autoencoder(str(save_tiny_autoencoder(tmp_path / "ae")), "kl")
    pixels = torch.randint(0, 256, (10, 3, 16, 16), dtype=torch.uint8)
    dataset = LabeledImages(pixels, np.arange(10) % 2)
    latents = CachedLatents(dataset, autoencoder, np.array([7, 2, 5]))
    assert len(latents) == 10 and latents.latents.shape == (3, 4, 8, 8)
    torch.testing.assert_close(latents[5], encode(autoencoder, dataset[5][None])[0])
    with pytest.raises(KeyError):
        latents[0]  # not this client's image


def test_latent_sampling_is_deterministic_and_unclamped(tmp_path):
    autoencoder = load_autoencoder(str(save_tiny_autoencoder(tmp_path / "ae")), "kl")
    torch.manual_seed(0)
    unet = build_unet({"block_out_channels": [8, 16], "down_block_types": ["DownBlock2D"] * 2,
                       "up_block_types": ["UpBlock2D"] * 2, "layers_per_block": 1, "norm_num_groups": 4},
                      image_size=8, channels=4)
    scheduler = build_scheduler({"num_train_timesteps": 50, "clip_sample": False})
    a = sample_latents(unet, scheduler, 3, seed=1, ddim_steps=4, batch_size=2)
    assert a.shape == (3, 4, 8, 8) and torch.equal(a, sample_latents(unet, scheduler, 3, seed=1, ddim_steps=4, batch_size=2))
    assert a.abs().max() > 1  # latents are not clamped to [-1, 1]
    images = generate_images(unet, scheduler, 3, seed=1, ddim_steps=4, autoencoder=autoencoder)
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.uint8
