"""models/: builders, the training step, sampling, and the saved pipeline."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMPipeline
from omegaconf import OmegaConf

from models import (
    build_scheduler,
    build_unet,
    count_parameters,
    denoising_loss,
    load_pipeline,
    make_optimizer,
    sample_images,
    save_pipeline,
    train_step,
)
from server_app.config import compose_config


def _unet_kwargs(model: str) -> dict:
    cfg = compose_config([f"model={model}"])
    return OmegaConf.to_container(cfg.model.unet)


def _scheduler():
    return build_scheduler(OmegaConf.to_container(compose_config().scheduler))


@pytest.mark.parametrize(
    ("model", "size", "channels"),
    [("fashion_mnist", 28, 1), ("cifar10", 32, 3), ("celeba", 64, 3), ("tiny", 28, 1)],
)
def test_builder_output_shape_matches_input(model, size, channels):
    unet = build_unet(_unet_kwargs(model), image_size=size, channels=channels)
    x = torch.randn(1, channels, size, size)
    with torch.no_grad():
        out = unet(x, torch.tensor([10])).sample
    assert out.shape == x.shape


def test_cifar10_model_is_the_ddpm_paper_size():
    unet = build_unet(_unet_kwargs("cifar10"), image_size=32, channels=3)
    assert count_parameters(unet) == pytest.approx(35.7e6, rel=0.005)


def test_builder_rejects_incompatible_image_size():
    with pytest.raises(ValueError, match="not divisible by 8"):
        build_unet(_unet_kwargs("cifar10"), image_size=28, channels=1)


def test_scheduler_defaults_are_ddpm_linear_1000():
    scheduler = _scheduler()
    assert scheduler.config.num_train_timesteps == 1000
    assert scheduler.config.beta_schedule == "linear"
    assert scheduler.config.prediction_type == "epsilon"


def _micro_unet():
    torch.manual_seed(0)
    kwargs = _unet_kwargs("tiny") | {
        "block_out_channels": [8, 16],
        "norm_num_groups": 4,
        "attention_head_dim": 4,
    }
    return build_unet(kwargs, image_size=28, channels=1)


def test_training_steps_lower_the_loss_on_a_fixed_batch():
    unet, scheduler = _micro_unet(), _scheduler()
    images = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 2 - 1

    def fixed_noise_loss():
        with torch.no_grad():
            return denoising_loss(unet, scheduler, images, torch.Generator().manual_seed(2)).item()

    before = fixed_noise_loss()
    optimizer = make_optimizer(unet, lr=3e-3)
    generator = torch.Generator().manual_seed(3)
    for _ in range(40):
        train_step(unet, scheduler, optimizer, images, generator=generator, max_grad_norm=1.0)
    after = fixed_noise_loss()
    assert after < 0.7 * before


def test_gradient_clipping_bounds_the_update_norm():
    unet, scheduler = _micro_unet(), _scheduler()
    images = torch.rand(4, 1, 28, 28) * 2 - 1
    before = [p.detach().clone() for p in unet.parameters()]
    optimizer = torch.optim.SGD(unet.parameters(), lr=1.0)
    train_step(
        unet, scheduler, optimizer, images, generator=torch.Generator().manual_seed(0), max_grad_norm=0.01
    )
    step = torch.sqrt(sum(((p - b) ** 2).sum() for p, b in zip(unet.parameters(), before)))
    assert step.item() <= 0.01 + 1e-6


def test_regularizer_shapes_the_update_but_not_the_reported_loss():
    images = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def one_step(regularizer):
        unet, scheduler = _micro_unet(), _scheduler()
        start = [p.detach().clone() for p in unet.parameters()]
        optimizer = torch.optim.SGD(unet.parameters(), lr=1e-2)
        loss = train_step(
            unet,
            scheduler,
            optimizer,
            images,
            generator=torch.Generator().manual_seed(1),
            max_grad_norm=None,
            regularizer=regularizer,
        )
        moved = sum(((p - s) ** 2).sum() for p, s in zip(unet.parameters(), start))
        return loss, moved.item()

    plain_loss, plain_move = one_step(None)
    reg_loss, reg_move = one_step(lambda m: 50.0 * sum((p**2).sum() for p in m.parameters()))
    assert reg_loss == pytest.approx(plain_loss)
    assert reg_move > 10 * plain_move


@pytest.mark.parametrize("ddim_steps", [3, None])
def test_sampling_is_deterministic_uint8(ddim_steps):
    unet, scheduler = _micro_unet(), _scheduler()
    if ddim_steps is None:
        scheduler = build_scheduler({"num_train_timesteps": 10})  # keep full DDPM short
    a = sample_images(unet, scheduler, 3, seed=5, ddim_steps=ddim_steps, batch_size=2)
    b = sample_images(unet, scheduler, 3, seed=5, ddim_steps=ddim_steps, batch_size=2)
    c = sample_images(unet, scheduler, 3, seed=6, ddim_steps=ddim_steps, batch_size=2)
    assert a.shape == (3, 1, 28, 28) and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_saved_pipeline_loads_with_diffusers_and_samples(tmp_path):
    unet, scheduler = _micro_unet(), _scheduler()
    save_pipeline(unet, scheduler, tmp_path / "model")
    pipeline = DDPMPipeline.from_pretrained(tmp_path / "model")
    for name, tensor in unet.state_dict().items():
        assert torch.equal(pipeline.unet.state_dict()[name], tensor)
    images = pipeline(batch_size=1, num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 28, 28, 1)
    assert load_pipeline(tmp_path / "model").unet.config.sample_size == 28


def test_sample_grids_are_upscaled_with_sharp_pixels(tmp_path):
    import numpy as np
    from PIL import Image

    from models.grid import save_grid

    images = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8)
    path = save_grid(images, tmp_path / "grid.png")
    pixels = np.asarray(Image.open(path).convert("L"))
    assert pixels.shape == (366, 366)  # 4 x 28 px + 5 x 2 px padding = 122 px, times 3
    # nearest neighbour: each source pixel is a 3 x 3 block; the first image starts after 2 px padding
    np.testing.assert_array_equal(pixels[6:9, 6:9], np.full((3, 3), int(images[0, 0, 0, 0])))
    np.testing.assert_array_equal(pixels[6 : 6 + 84 : 3, 6 : 6 + 84 : 3], images[0, 0].numpy())
    big = save_grid(torch.zeros(1, 3, 300, 300, dtype=torch.uint8), tmp_path / "big.png")
    assert Image.open(big).size == (300, 300)  # one image (no padding), large enough already: not enlarged
