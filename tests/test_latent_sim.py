"""model=ldm in real 2-client simulations.

A small random autoencoder, generated images, FedDDPM, partial int8 exchange, and the ldm defaults.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from feddm.simulation import simulate
from server_app.config import compose_config
from tests.conftest import REPO_ROOT
from tests.test_data import _image_folder
from tests.test_latent import save_tiny_autoencoder

pytestmark = pytest.mark.slow

FID_WEIGHTS = REPO_ROOT.parent / "shared" / "weights" / "pt_inception-2015-12-05.torchscript.pt"


def _ldm_config(tmp_path, strategy, extra=()):
    """A tiny latent-diffusion run on generated 16x16 RGB images (8x8x4 latents)."""
    _image_folder(tmp_path / "images", [(20, 20)] * 12)
    autoencoder = save_tiny_autoencoder(tmp_path / "autoencoder")
    return compose_config(
        [
            *extra,
            "model=ldm",
            f"model.autoencoder.path={autoencoder}",
            "model.unet.block_out_channels=[8,16]",
            "model.unet.down_block_types=[DownBlock2D,AttnDownBlock2D]",
            "model.unet.up_block_types=[AttnUpBlock2D,UpBlock2D]",
            "model.unet.norm_num_groups=4",
            "model.unet.attention_head_dim=4",
            "model.unet.layers_per_block=1",
            "dataset=image_folder",
            f"dataset.root={tmp_path / 'images'}",
            "dataset.image_size=16",
            f"strategy={strategy}",
            "num_rounds=2",
            "local_steps=2",
            "batch_size=4",
            "eval.grid_size=4",
            "eval.ddim_steps=2",
            "eval.num_samples=4",
            f"eval.fid_weights={FID_WEIGHTS}",
            f"eval.fid_cache={tmp_path / 'fid'}",
        ]
    )


def test_latent_diffusion_trains_on_encoded_images_and_decodes_samples(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # where nodes keep their latents
    fedddpm = [
        "strategy.pretrain_steps=2",
        "strategy.aux_samples=4",
        "strategy.aux_ddim_steps=2",
        "strategy.calibration_steps=2",
        "strategy.calibration_batch_size=2",
    ]
    run_dir = simulate(_ldm_config(tmp_path, "fedddpm", fedddpm), tmp_path / "run")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # FedDDPM: the auxiliary data are latents sampled from the clients' own latent models
    assert rows.pop(0)["phase"] == "pretrain"
    aux = load_file(str(run_dir / "auxiliary.safetensors"))["images"]
    assert tuple(aux.shape) == (4, 4, 8, 8) and aux.dtype == torch.float32
    assert all(r["calibrated"] == 1 for r in rows)
    assert [r["num_aggregated"] for r in rows] == [2, 2]
    assert len(list((tmp_path / "cache" / "feddm" / "latents").glob("*.safetensors"))) == 2  # one per client
    assert all(r["fid"] > 0 for r in rows)
    # the UNet works on 8x8x4 latents of the 16x16 RGB images
    unet_config = json.loads((run_dir / "model" / "unet" / "config.json").read_text())
    assert unet_config["sample_size"] == 8 and unet_config["in_channels"] == 4
    assert (run_dir / "model" / "autoencoder" / "config.json").is_file()
    weights = load_file(str(run_dir / "model" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert weights["conv_in.weight"].shape[1] == 4

    from PIL import Image

    from feddm.sample import main as sample_main

    out = tmp_path / "grid.png"
    sample_main([str(run_dir / "model"), "--num", "4", "--out", str(out), "--ddim-steps", "2"])
    assert Image.open(out).mode == "RGB" and Image.open(out).size[0] > 2 * 16


def test_partial_exchange_on_latents_scores_each_clients_decoded_samples(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    run_dir = simulate(_ldm_config(tmp_path, "partial", ["strategy.quantize=true"]), tmp_path / "run")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["num_aggregated"] for r in rows] == [2, 2]
    assert all(r["uplink_bytes"] < r["downlink_bytes"] for r in rows)  # int8 codes of the shared parts
    # each client samples latents with its own model and decodes them with the shared autoencoder
    for row in rows:
        assert row["fid"] > 0 and len(row["fid_clients"]) == 2 and row["fid_mixture"] > 0
    assert not (run_dir / "model").exists()  # each client keeps its own model


def save_one_level_autoencoder(folder):
    """A random 1-level ``AutoencoderKL`` for grayscale images: 1 x 16 x 16 images, 4 x 16 x 16 latents."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(
        in_channels=1,
        out_channels=1,
        latent_channels=4,
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        norm_num_groups=4,
    ).save_pretrained(str(folder), safe_serialization=True)
    return folder


def test_ldm_defaults_train_and_the_loss_goes_down(tmp_path, monkeypatch):
    """model=ldm with its own learning rate: 2 rounds lower the loss (a smaller UNet of the same blocks).

    The latents are scaled to unit variance, as the client's warning advises for a new autoencoder.
    """
    from models.data import dataset_from_config
    from models.latent import encode, load_autoencoder

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    _image_folder(tmp_path / "images", [(20, 20)] * 40)
    folder = str(save_one_level_autoencoder(tmp_path / "ae"))
    spec = {"name": "image_folder", "root": str(tmp_path / "images"), "image_size": 16, "channels": 1}
    images = dataset_from_config(spec, train=True)
    latents = encode(load_autoencoder(folder, "kl"), torch.stack([images[i] for i in range(len(images))]))
    factor = 0.18215 / float(latents.std())
    cfg = compose_config(
        [
            "model=ldm",
            f"model.autoencoder.path={folder}",
            f"model.autoencoder.scaling_factor={factor}",
            "model.unet.block_out_channels=[32,64,64]",
            "dataset=image_folder",
            f"dataset.root={tmp_path / 'images'}",
            "dataset.image_size=16",
            "dataset.channels=1",
            "client_eval_fraction=0.25",
            "num_rounds=2",
            "local_steps=10",
            "batch_size=8",
            "eval.grid_size=4",
            "eval.ddim_steps=2",
        ]
    )
    assert cfg.lr == cfg.model.lr == 1e-4  # the model group's rate, not the tiny model's 1e-3
    rows = [
        json.loads(line)
        for line in (simulate(cfg, tmp_path / "run") / "metrics.jsonl").read_text().splitlines()
    ]
    assert rows[1]["train_loss"] < rows[0]["train_loss"] < 1.2
    assert rows[1]["eval_loss"] < rows[0]["eval_loss"] < 1.0
