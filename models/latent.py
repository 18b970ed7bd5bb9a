"""Latent diffusion: a frozen diffusers autoencoder between images and the UNet.

The autoencoder (``AutoencoderKL`` or ``VQModel``) is loaded from a diffusers
folder (or, online, a hub id), is the same on every client and on the server,
and is never trained. Images in [-1, 1] become latents ``scaling_factor * z``
(the KL posterior's mean, or the VQ encoder's output); the UNet is trained and
sampled on latents, and samples are decoded back to pixels.
"""

from __future__ import annotations

import functools
import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DModel, VQModel
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from models.durable import replace_durably

AUTOENCODERS = {"kl": AutoencoderKL, "vq": VQModel}

Autoencoder = AutoencoderKL | VQModel


@functools.lru_cache(maxsize=2)
def load_autoencoder(
    path: str, kind: str, subfolder: str | None = None, scaling_factor: float | None = None
) -> Autoencoder:
    """The frozen autoencoder at ``path`` (a diffusers folder or hub id), in eval mode on the CPU.

    ``scaling_factor`` replaces the one in its config (what latents are multiplied
    by; diffusion expects latents of about unit variance), and is saved with it.
    """
    if kind not in AUTOENCODERS:
        raise ValueError(f"model.autoencoder.kind={kind!r} is not one of {tuple(AUTOENCODERS)}")
    try:
        model = AUTOENCODERS[kind].from_pretrained(path, subfolder=subfolder, use_safetensors=True)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"model.autoencoder.path={path!r}: no {AUTOENCODERS[kind].__name__} could be loaded there "
            "(a diffusers folder with config.json and diffusion_pytorch_model.safetensors, "
            f"or a hub id when online): {err}"
        ) from err
    if scaling_factor is not None:
        model.register_to_config(scaling_factor=float(scaling_factor))
    return model.eval().requires_grad_(False)


# Scaled latents whose standard deviation lies outside this range get a warning.
LATENT_STD_RANGE = (0.5, 2.0)


def latent_scale_warning(latents: torch.Tensor, scaling_factor: float) -> str | None:
    """A warning if scaled ``latents`` are far from unit variance, naming the factor that would fix it."""
    std = float(latents.float().std()) if latents.numel() > 1 else 1.0
    low, high = LATENT_STD_RANGE
    if low <= std <= high or std == 0:
        return None
    return (
        f"the encoded latents have a standard deviation of {std:.3g} (scaling_factor {scaling_factor:g}); "
        f"diffusion assumes about 1, so the noise drowns the data (or the reverse). Set "
        f"model.autoencoder.scaling_factor={scaling_factor / std:.4g} (as latent diffusion does for a new autoencoder)"
    )


def latent_geometry(autoencoder: Autoencoder, image_size: int) -> tuple[int, int]:
    """(latent size, latent channels) of ``image_size`` pixel images."""
    factor = 2 ** (len(autoencoder.config.block_out_channels) - 1)
    if image_size % factor:
        raise ValueError(
            f"dataset.image_size={image_size} is not divisible by the autoencoder's downsampling {factor}"
        )
    return image_size // factor, int(autoencoder.config.latent_channels)


def _device(autoencoder: Autoencoder) -> torch.device:
    return next(autoencoder.parameters()).device


@torch.no_grad()
def encode(autoencoder: Autoencoder, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Scaled latents of images in [-1, 1] (N x C x H x W), on the CPU."""
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].to(_device(autoencoder))
        encoded = autoencoder.encode(batch)
        z = encoded.latent_dist.mean if isinstance(autoencoder, AutoencoderKL) else encoded.latents
        out.append((z * autoencoder.config.scaling_factor).cpu())
    return torch.cat(out)


@torch.no_grad()
def decode_to_uint8(autoencoder: Autoencoder, latents: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Images (uint8 N x C x H x W) of scaled latents."""
    out = []
    for start in range(0, len(latents), batch_size):
        z = latents[start : start + batch_size].to(_device(autoencoder)) / autoencoder.config.scaling_factor
        images = autoencoder.decode(z).sample.clamp(-1, 1)
        out.append(((images + 1) * 127.5).round().to(torch.uint8).cpu())
    return torch.cat(out)


@torch.no_grad()
def sample_latents(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    num: int,
    *,
    seed: int,
    ddim_steps: int | None = None,
    batch_size: int = 64,
) -> torch.Tensor:
    """``num`` latents from noise: DDIM (eta 0) with ``ddim_steps``, or the full DDPM chain.

    Unlike the pixel pipelines, nothing is clamped to [-1, 1]: latents are not images.
    """
    sampler = (DDIMScheduler if ddim_steps else DDPMScheduler).from_config(
        scheduler.config, clip_sample=False
    )
    sampler.set_timesteps(ddim_steps or scheduler.config.num_train_timesteps)
    generator = torch.Generator().manual_seed(seed)
    device = next(unet.parameters()).device
    was_training = unet.training
    unet.eval()
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    out = []
    for start in range(0, num, batch_size):
        x = torch.randn((min(batch_size, num - start), *shape), generator=generator).to(device)
        for t in sampler.timesteps:
            eps = unet(x, t).sample
            step = (
                sampler.step(eps, t, x, generator=generator)
                if not ddim_steps
                else sampler.step(eps, t, x, eta=0.0)
            )
            x = step.prev_sample
        out.append(x.cpu())
    unet.train(was_training)
    return torch.cat(out)


class CachedLatents(Dataset):
    """Latents of some images of a dataset, encoded once; indexed like the dataset.

    ``indices`` are the images a client uses (its partition); asking for
    another index raises ``KeyError``. ``labels`` are the dataset's.

    With ``cache_file`` the latents are also kept on disk (safetensors, with
    the indices they belong to), so a node that starts a new process for each
    message (a SuperNode) encodes its images once, not every round. A cache
    file that cannot be read or holds other indices is encoded anew.
    """

    def __init__(
        self,
        dataset: Dataset,
        autoencoder: Autoencoder,
        indices: np.ndarray,
        batch_size: int = 64,
        cache_file: Path | None = None,
    ) -> None:
        self.labels = dataset.labels
        self._length = len(dataset)
        self._row = {int(i): row for row, i in enumerate(indices)}
        cached = _read_latents(cache_file, indices) if cache_file else None
        if cached is not None:
            self.latents = cached
            return
        images = torch.stack([dataset[int(i)] for i in indices]) if len(indices) else torch.zeros(0)
        self.latents = encode(autoencoder, images, batch_size) if len(indices) else images
        if (warning := latent_scale_warning(self.latents, autoencoder.config.scaling_factor)) is not None:
            warnings.warn(warning, stacklevel=2)
        if cache_file and len(indices):
            _write_latents(cache_file, indices, self.latents)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.latents[self._row[int(index)]]


def _read_latents(path: Path, indices: np.ndarray) -> torch.Tensor | None:
    """The cached latents of ``indices``, or None (no file, unreadable, or other images)."""
    if not path.is_file():
        return None
    try:
        stored = load_file(path)
    except (OSError, SafetensorError, ValueError) as err:
        warnings.warn(f"latent cache {path} is unreadable ({err}); encoding the images again", stacklevel=3)
        return None
    if (
        "indices" not in stored
        or "latents" not in stored
        or not np.array_equal(stored["indices"].numpy(), indices)
    ):
        warnings.warn(f"latent cache {path} holds other images; encoding the images again", stacklevel=3)
        return None
    return stored["latents"]


def _write_latents(path: Path, indices: np.ndarray, latents: torch.Tensor) -> None:
    """Write atomically (a node stopped mid-write leaves no half file); a cache that cannot be written only warns."""
    partial = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, partial = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        os.close(handle)
        tensors = {
            "indices": torch.as_tensor(np.asarray(indices, dtype=np.int64)),
            "latents": latents.contiguous(),
        }
        save_file(tensors, partial)
        replace_durably(partial, path)
    except (OSError, SafetensorError) as err:
        warnings.warn(
            f"latent cache {path} could not be written ({err}); the latents stay in memory only", stacklevel=3
        )
        if partial is not None and os.path.exists(partial):
            os.remove(partial)


def autoencoder_from_settings(
    settings: Mapping[str, Any] | None, path: str | None = None
) -> Autoencoder | None:
    """The autoencoder of ``model.autoencoder`` settings (``path`` overrides theirs), or None (pixel space)."""
    if not settings:
        return None
    scaling_factor = settings.get("scaling_factor")
    return load_autoencoder(
        str(path or settings["path"]),
        str(settings.get("kind", "kl")),
        settings.get("subfolder"),
        None if scaling_factor is None else float(scaling_factor),
    )


def generate_images(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    num: int,
    *,
    seed: int,
    ddim_steps: int | None = None,
    batch_size: int = 64,
    autoencoder: Autoencoder | None = None,
    show_progress: bool = False,
) -> torch.Tensor:
    """``num`` uint8 images: sampled in pixel space, or as latents decoded by ``autoencoder``."""
    from models.diffusion import sample_images

    if autoencoder is None:
        return sample_images(
            unet,
            scheduler,
            num,
            seed=seed,
            ddim_steps=ddim_steps,
            batch_size=batch_size,
            show_progress=show_progress,
        )
    latents = sample_latents(unet, scheduler, num, seed=seed, ddim_steps=ddim_steps, batch_size=batch_size)
    return decode_to_uint8(autoencoder.to(next(unet.parameters()).device), latents, batch_size)
