"""Build the denoising UNet and its noise scheduler from config."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel


def build_unet(unet_kwargs: Mapping[str, Any], *, image_size: int, channels: int) -> UNet2DModel:
    """Make a ``diffusers.UNet2DModel`` for ``channels`` x ``image_size`` x ``image_size``.

    ``unet_kwargs`` are ``UNet2DModel`` keyword arguments (``conf/model/*.yaml``);
    the image geometry comes from the dataset so one model size fits several datasets.
    """
    kwargs = dict(unet_kwargs)
    num_levels = len(kwargs.get("block_out_channels", ()))
    if num_levels < 1:
        raise ValueError("model.unet.block_out_channels must list at least one level")
    for key in ("down_block_types", "up_block_types"):
        if len(kwargs.get(key, ())) != num_levels:
            raise ValueError(
                f"model.unet.{key} has {len(kwargs.get(key, ()))} entries; "
                f"block_out_channels has {num_levels}: give one block type per level"
            )
    # Every level but the last halves the resolution; the skips must line up again.
    factor = 2 ** (num_levels - 1)
    if image_size % factor:
        raise ValueError(
            f"image size {image_size} is not divisible by {factor}, which a UNet with "
            f"{num_levels} levels needs; pick a model with fewer levels for this dataset"
        )
    return UNet2DModel(sample_size=image_size, in_channels=channels, out_channels=channels, **kwargs)


def build_scheduler(scheduler_kwargs: Mapping[str, Any]) -> DDPMScheduler:
    """Make the DDPM noise scheduler (noise prediction, ``conf/config.yaml: scheduler``)."""
    return DDPMScheduler(prediction_type="epsilon", **dict(scheduler_kwargs))


def count_parameters(model: torch.nn.Module, trainable: bool = False) -> int:
    """Number of parameters (what FedAvg exchanges, besides buffers); ``trainable``: those that train."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def unet_from_config(config: Mapping[str, Any]) -> UNet2DModel:
    """Rebuild a UNet from ``unet.config`` (what the server sends to clients)."""
    return UNet2DModel.from_config(dict(config))


def seeded_unet(config: Mapping[str, Any], seed: int) -> UNet2DModel:
    """The UNet of ``unet.config`` initialised from ``seed`` alone, leaving torch's global generator as it was.

    A run's server builds its initial model from the seed too, so a client can
    rebuild that model instead of receiving it (the ``int8_delta`` downlink
    checks the two agree by hash).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return unet_from_config(config)


def scheduler_from_config(config: Mapping[str, Any]) -> DDPMScheduler:
    """Rebuild the scheduler from ``scheduler.config``."""
    return DDPMScheduler.from_config(dict(config))


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU; ``cuda`` fails clearly without a GPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was asked for, but torch sees no CUDA GPU")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r} is not one of auto | cpu | cuda")
    return torch.device(device)
