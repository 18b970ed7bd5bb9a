"""FedDDPM's auxiliary data and the server's calibration step on it.

The clients' own models are uploaded once and images sampled from them; the
calibration fine-tunes the aggregate on those images. The images are cached
in the run folder (``auxiliary.safetensors``, uint8), so a resumed run reuses
them instead of asking the clients again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from logging import INFO
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from flwr.supercore import log
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from models import sample_images, unet_from_config
from models.diffusion import train_on_images
from models.durable import write_atomic
from models.latent import sample_latents
from models.precision import FP32, Precision
from strategies import Calibration, FedDMStrategy

AUX_NAME = "auxiliary.safetensors"


def auxiliary_images(
    grid: Grid,
    strategy: FedDMStrategy,
    initial: ArrayRecord,
    settings: ConfigRecord,
    scheduler: DDPMScheduler,
    *,
    run_dir: Path,
    ddim_steps: int | None,
    seed: int,
    timeout: float,
    device: torch.device,
    precision: Precision = FP32,
    latent: bool = False,
) -> tuple[torch.Tensor, dict]:
    """The auxiliary images (uint8 N x C x H x W) and a summary row for ``metrics.jsonl``.

    Each client trains its own model from ``initial`` for the calibration
    layer's ``pretrain_steps`` and uploads it; every valid local model contributes
    the layer's ``allocation`` of images (DDIM with ``ddim_steps``, seeded per client).
    With ``latent`` (latent diffusion) they are float latents, which is what the
    UNet is trained on. Sampling runs in ``precision``.
    """
    cache = Path(run_dir) / AUX_NAME
    calibration = strategy.layer(Calibration)
    wanted = _made_with(calibration, ddim_steps, seed, settings)
    cached = _load(cache, wanted)
    if cached is not None:
        log(INFO, "FedDDPM: %d auxiliary images from %s", len(cached), cache)
        return cached, {}

    started = time.monotonic()
    log(
        INFO,
        "FedDDPM: every client trains its own model for %d steps and uploads it once",
        calibration.pretrain_steps,
    )
    messages = strategy.pretrain_messages(initial, settings, grid, calibration.pretrain_steps)
    replies = grid.send_and_receive(messages, timeout=timeout)
    local = strategy.local_models(list(replies), initial)
    counts = calibration.allocation({pid: examples for pid, (_, examples) in local.items()})
    sample = sample_latents if latent else sample_images
    with precision.autocast():
        aux = _sample_local_models(
            local, counts, json.loads(settings["unet"]), scheduler, sample, ddim_steps, seed, device
        )
    _save(cache, aux, {**{k: str(v) for k, v in wanted.items()}, "per_client": json.dumps(counts)})
    row = {
        "round": 0,
        "phase": "pretrain",
        **strategy.round_log.get(0, {}),
        "aux_images": len(aux),
        "wall_time_s": round(time.monotonic() - started, 3),
    }
    return aux, row


def _made_with(calibration: Calibration, ddim_steps: int | None, seed: int, settings: ConfigRecord) -> dict:
    """The settings the auxiliary images depend on (a cache made with others is not reused)."""
    return {
        "aux_samples": calibration.aux_samples,
        "aux_allocation": calibration.aux_allocation,
        "pretrain_steps": calibration.pretrain_steps,
        "aux_ddim_steps": ddim_steps,
        "seed": seed,
        "unet": settings["unet"],
        "dataset": settings["dataset"],
        "partition": settings["partition"],
    }


def _sample_local_models(
    local: dict, counts: dict, unet_config: dict, scheduler, sample, ddim_steps, seed: int, device
) -> torch.Tensor:
    """``counts[pid]`` images (DDIM with ``ddim_steps``, seeded per client) from each client's local model."""
    images = []
    for pid, (arrays, _) in local.items():
        unet = unet_from_config(unet_config).to(device)
        unet.load_state_dict(arrays.to_torch_state_dict())
        log(INFO, "FedDDPM: %d auxiliary images from the model of client %d", counts[pid], pid)
        if counts[pid]:
            images.append(sample(unet, scheduler, counts[pid], seed=seed + 1000 + pid, ddim_steps=ddim_steps))
    return torch.cat(images)


def _save(cache: Path, images: torch.Tensor, metadata: dict[str, str]) -> None:
    """Write the images with the settings they were made with, atomically."""
    write_atomic(cache, lambda tmp: save_file({"images": images}, str(tmp), metadata=metadata))


def _load(cache: Path, wanted: dict) -> torch.Tensor | None:
    """The cached images if ``cache`` exists and was made with the same settings."""
    if not cache.is_file():
        return None
    try:
        with safe_open(str(cache), framework="pt") as file:
            metadata = file.metadata() or {}
        if any(metadata.get(k) != str(v) for k, v in wanted.items()):
            log(INFO, "FedDDPM: %s was made with other settings; pretraining again", cache)
            return None
        return load_file(str(cache))["images"]
    except (SafetensorError, OSError, KeyError) as err:
        log(INFO, "FedDDPM: %s is unreadable (%s); pretraining again", cache, err)
        return None


def server_calibration(
    unet_config: dict,
    scheduler: DDPMScheduler,
    images: torch.Tensor,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    device: torch.device,
    precision: Precision = FP32,
    max_grad_norm: float = 1.0,
) -> Callable[[ArrayRecord, int], ArrayRecord]:
    """``calibrate(arrays, round)``: ``steps`` DDPM training steps on the auxiliary ``images``.

    ``images`` are uint8 N x C x H x W, or (latent diffusion) float latents that
    are already what the UNet is trained on; batches are drawn with a generator
    seeded by (``seed``, round), so a run is reproducible. A fresh AdamW
    optimizer each time; forward passes in ``precision``.
    """
    data = images.float() / 127.5 - 1.0 if images.dtype == torch.uint8 else images.float()

    def calibrate(arrays: ArrayRecord, server_round: int) -> ArrayRecord:
        unet = unet_from_config(unet_config).to(device)
        unet.load_state_dict(arrays.to_torch_state_dict())
        train_on_images(
            unet,
            scheduler,
            data,
            steps=steps,
            lr=lr,
            batch_size=batch_size,
            seed=(seed, server_round),
            max_grad_norm=max_grad_norm,
            precision=precision,
        )
        return ArrayRecord({k: v.detach().cpu() for k, v in unet.state_dict().items()})

    return calibrate
