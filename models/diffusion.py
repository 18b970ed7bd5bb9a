"""One DDPM training step, the denoising loss, and sampling (DDPM or DDIM).

The training step follows diffusers' ``train_unconditional.py``: sample a timestep
and Gaussian noise per image, noise the images with the scheduler, predict the
noise with the UNet and regress it with MSE.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    UNet2DModel,
)

from models.precision import FP32, Precision

Regularizer = Callable[[UNet2DModel], torch.Tensor]


def make_optimizer(unet: UNet2DModel, *, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """AdamW over the UNet's trainable parameters (the optimizer of the DDPM recipe; with LoRA: the adapters)."""
    return torch.optim.AdamW(
        [p for p in unet.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay
    )


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on ``device``; to a GPU through pinned memory, without waiting for the GPU's queue.

    A plain copy from pageable memory synchronizes with the GPU, which would
    stall the host once per training step.
    """
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def denoising_loss(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    images: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """MSE between the true and the predicted noise for random timesteps.

    ``images`` are in [-1, 1]. Noise and timesteps are drawn on the CPU from
    ``generator`` and then moved, so a seed gives the same loss on any device.
    """
    noise = to_device(torch.randn(images.shape, generator=generator), images.device).to(images.dtype)
    timesteps = torch.randint(
        0, scheduler.config.num_train_timesteps, (images.shape[0],), generator=generator
    )
    timesteps = to_device(timesteps, images.device)
    noisy = scheduler.add_noise(images, noise, timesteps)
    predicted = unet(noisy, timesteps).sample
    return F.mse_loss(predicted, noise)


def train_step(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    *,
    generator: torch.Generator,
    max_grad_norm: float | None = 1.0,
    regularizer: Regularizer | None = None,
    precision: Precision = FP32,
    scaler: torch.amp.GradScaler | None = None,
) -> torch.Tensor:
    """One optimizer step on a batch; returns the diffusion loss (without regularizer), detached.

    The loss stays on the device: reading it (``.item()``) would wait for the
    GPU, so callers sum it and read it once. ``regularizer(unet)`` is added to
    the loss before the backward pass; FedDM-prox uses it for its proximal
    term. The forward pass runs in ``precision``; with fp16, ``scaler`` (from
    ``precision.grad_scaler()``) scales the loss and skips steps whose
    gradients overflowed.
    """
    unet.train()
    with precision.autocast():
        loss = denoising_loss(unet, scheduler, images, generator)
        objective = loss if regularizer is None else loss + regularizer(unet)
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        objective.backward()
    else:
        scaler.scale(objective).backward()
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(unet.parameters(), max_grad_norm)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    return loss.detach().float()


def train_on_images(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    data: torch.Tensor,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: tuple[int, int],
    max_grad_norm: float | None = 1.0,
    precision: Precision = FP32,
) -> None:
    """``steps`` DDPM steps in place on random batches of ``data`` (N x C x H x W in [-1, 1], or latents).

    A fresh AdamW optimizer; batches, noise and timesteps follow ``seed`` (e.g.
    (run seed, round)), and dropout ``sum(seed)``, so a run is reproducible.
    """
    device = next(unet.parameters()).device
    optimizer = make_optimizer(unet, lr=lr)
    scaler = precision.grad_scaler()
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence(list(seed)).generate_state(1)[0]))
    data = data.to(device)  # once: the auxiliary set is small, and per-batch copies would wait for the GPU
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(sum(seed))  # dropout
        for _ in range(steps):
            batch = data[to_device(torch.randint(len(data), (batch_size,), generator=generator), device)]
            train_step(
                unet,
                scheduler,
                optimizer,
                batch,
                generator=generator,
                max_grad_norm=max_grad_norm,
                precision=precision,
                scaler=scaler,
            )


@torch.no_grad()
def sample_images(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    num_images: int,
    *,
    seed: int,
    ddim_steps: int | None = None,
    batch_size: int = 64,
    show_progress: bool = False,
) -> torch.Tensor:
    """Generate ``num_images`` as a uint8 tensor N x C x H x W.

    ``ddim_steps=None`` runs the full ancestral DDPM chain; an integer runs DDIM
    (eta = 0) with that many steps, which is what evaluation uses for speed. The
    noise comes from one CPU generator seeded with ``seed``, so the same seed gives
    the same images for the same weights.
    """
    if ddim_steps is not None:
        pipeline = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(scheduler.config))
        steps = int(ddim_steps)
    else:
        pipeline = DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_config(scheduler.config))
        steps = scheduler.config.num_train_timesteps
    pipeline.set_progress_bar_config(disable=not show_progress, leave=False)
    was_training = unet.training
    unet.eval()
    generator = torch.Generator(device="cpu").manual_seed(seed)
    batches = []
    for start in range(0, num_images, batch_size):
        images = pipeline(
            batch_size=min(batch_size, num_images - start),
            generator=generator,
            num_inference_steps=steps,
            output_type="np",
        ).images  # N x H x W x C floats in [0, 1]
        batches.append(np.rint(images * 255).astype(np.uint8))
    unet.train(was_training)
    return torch.from_numpy(np.concatenate(batches)).permute(0, 3, 1, 2).contiguous()
