"""Latent diffusion with a small randomly initialised autoencoder: encoding, sampling, decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DModel, VQModel

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

TINY = {
    "block_out_channels": (8, 8),
    "down_block_types": ("DownEncoderBlock2D",) * 2,
    "up_block_types": ("UpDecoderBlock2D",) * 2,
    "norm_num_groups": 4,
    "sample_size": 16,
}


def save_tiny_autoencoder(folder, kind="kl"):
    """A 2-level (downsampling 2x) random autoencoder in diffusers' format."""
    torch.manual_seed(0)
    model = (
        AutoencoderKL(latent_channels=4, **TINY)
        if kind == "kl"
        else VQModel(latent_channels=3, num_vq_embeddings=16, vq_embed_dim=3, **TINY)
    )
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
    unet = build_unet(
        {
            "block_out_channels": [8, 16],
            "down_block_types": ["DownBlock2D"] * 2,
            "up_block_types": ["UpBlock2D"] * 2,
            "layers_per_block": 1,
            "norm_num_groups": 4,
        },
        image_size=8,
        channels=4,
    )
    scheduler = build_scheduler({"num_train_timesteps": 50, "clip_sample": False})
    a = sample_latents(unet, scheduler, 3, seed=1, ddim_steps=4, batch_size=2)
    assert a.shape == (3, 4, 8, 8) and torch.equal(
        a, sample_latents(unet, scheduler, 3, seed=1, ddim_steps=4, batch_size=2)
    )
    assert a.abs().max() > 1  # latents are not clamped to [-1, 1]
    images = generate_images(unet, scheduler, 3, seed=1, ddim_steps=4, autoencoder=autoencoder)
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.uint8


def test_latents_cached_on_disk_are_read_back_instead_of_encoded(tmp_path, monkeypatch):
    import models.latent
    from models import LabeledImages

    autoencoder = load_autoencoder(str(save_tiny_autoencoder(tmp_path / "ae")), "kl")
    dataset = LabeledImages(torch.randint(0, 256, (10, 3, 16, 16), dtype=torch.uint8), np.arange(10) % 2)
    cache = tmp_path / "cache" / "client.safetensors"
    first = CachedLatents(dataset, autoencoder, np.array([7, 2, 5]), cache_file=cache)
    assert cache.is_file() and not list(cache.parent.glob("*.tmp"))

    def no_encoding(*args, **kwargs):
        raise AssertionError("encoded again")

    with monkeypatch.context() as m:  # a new process of the same node: read, not encoded
        m.setattr(models.latent, "encode", no_encoding)
        again = CachedLatents(dataset, autoencoder, np.array([7, 2, 5]), cache_file=cache)
    torch.testing.assert_close(again[2], first[2])

    with pytest.warns(UserWarning, match="holds other images"):  # another partition: encoded anew
        other = CachedLatents(dataset, autoencoder, np.array([1, 2]), cache_file=cache)
    torch.testing.assert_close(other[2], first[2])
    cache.write_bytes(cache.read_bytes()[:50])  # a damaged file: encoded anew and rewritten
    with pytest.warns(UserWarning, match="unreadable"):
        CachedLatents(dataset, autoencoder, np.array([7, 2, 5]), cache_file=cache)
    with monkeypatch.context() as m:
        m.setattr(models.latent, "encode", no_encoding)
        torch.testing.assert_close(
            CachedLatents(dataset, autoencoder, np.array([7, 2, 5]), cache_file=cache)[5], first[5]
        )


def test_each_node_caches_its_partitions_latents_under_its_cache_dir(tmp_path, monkeypatch):
    import os

    import models.latent
    from client_app.task import _latents, client_data, read_settings
    from server_app.config import compose_config
    from server_app.federation import client_config
    from tests.test_data import _image_folder

    _image_folder(tmp_path / "images", [(20, 20)] * 6)
    ae = save_tiny_autoencoder(tmp_path / "ae")
    cfg = compose_config(
        [
            "model=ldm",
            f"model.autoencoder.path={ae}",
            "dataset=image_folder",
            f"dataset.root={tmp_path / 'images'}",
            "dataset.image_size=16",
        ]
    )
    unet = UNet2DModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    settings = read_settings(client_config(cfg, unet, build_scheduler({})))
    cache = tmp_path / "cache"

    def node(partition, cache_dir=str(cache)):
        return {"partition-id": partition, "num-partitions": 2, "latent-cache-dir": cache_dir}

    _latents.cache_clear()
    client_data(settings, node(0))
    client_data(settings, node(1))
    files = sorted(cache.glob("*.safetensors"))
    assert len(files) == 2  # one per partition
    _latents.cache_clear()  # a new process of node 0: read from disk
    with monkeypatch.context() as m:
        m.setattr(models.latent, "encode", lambda *a, **k: pytest.fail("encoded again"))
        client_data(settings, node(0))
    os.utime(ae / "diffusion_pytorch_model.safetensors", ns=(1, 1))  # new weights at the same path
    _latents.cache_clear()
    client_data(settings, node(0))
    assert len(list(cache.glob("*.safetensors"))) == 3
    _latents.cache_clear()
    client_data(settings, node(0, cache_dir=""))  # "" turns the disk cache off
    assert len(list(cache.glob("*.safetensors"))) == 3
    _latents.cache_clear()


def test_a_cache_that_cannot_be_written_only_warns(tmp_path):
    from models import LabeledImages

    autoencoder = load_autoencoder(str(save_tiny_autoencoder(tmp_path / "ae")), "kl")
    dataset = LabeledImages(torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8), np.arange(4) % 2)
    (tmp_path / "file").write_text("not a folder")
    with pytest.warns(UserWarning, match="could not be written"):
        latents = CachedLatents(
            dataset, autoencoder, np.array([1, 3]), cache_file=tmp_path / "file" / "c.safetensors"
        )
    assert latents.latents.shape == (2, 4, 8, 8)
