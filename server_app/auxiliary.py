"""FedDDPM's auxiliary data: the clients' own models, uploaded once, and images sampled from them.

The images are cached in the run folder (``auxiliary.safetensors``, uint8), so a
resumed run reuses them instead of asking the clients again.
"""

from __future__ import annotations

import json
import time
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
from models.latent import sample_latents
from strategies.fedddpm import FedDDPM

AUX_NAME = "auxiliary.safetensors"


def auxiliary_images(
    grid: Grid,
    strategy: FedDDPM,
    initial: ArrayRecord,
    settings: ConfigRecord,
    scheduler: DDPMScheduler,
    *,
    run_dir: Path,
    ddim_steps: int | None,
    seed: int,
    timeout: float,
    device: torch.device,
    latent: bool = False,
) -> tuple[torch.Tensor, dict]:
    """The auxiliary images (uint8 N x C x H x W) and a summary row for ``metrics.jsonl``.

    Each client trains its own model from ``initial`` for the strategy's
    ``pretrain_steps`` and uploads it; every valid local model contributes the
    strategy's ``allocation`` of images (DDIM with ``ddim_steps``, seeded per client).
    With ``latent`` (latent diffusion) they are float latents, which is what the
    UNet is trained on.
    """
    cache = Path(run_dir) / AUX_NAME
    wanted = {
        "aux_samples": strategy.aux_samples,
        "aux_allocation": strategy.aux_allocation,
        "pretrain_steps": strategy.pretrain_steps,
        "aux_ddim_steps": ddim_steps,
        "seed": seed,
        "unet": settings["unet"],
        "dataset": settings["dataset"],
        "partition": settings["partition"],
    }
    cached = _load(cache, wanted)
    if cached is not None:
        log(INFO, "FedDDPM: %d auxiliary images from %s", len(cached), cache)
        return cached, {}

    started = time.monotonic()
    log(
        INFO,
        "FedDDPM: every client trains its own model for %d steps and uploads it once",
        strategy.pretrain_steps,
    )
    replies = grid.send_and_receive(strategy.configure_pretrain(initial, settings, grid), timeout=timeout)
    local = strategy.local_models(list(replies), initial)
    counts = strategy.allocation({pid: examples for pid, (_, examples) in local.items()})
    unet_config = json.loads(settings["unet"])
    images = []
    for pid, (arrays, _) in local.items():
        unet = unet_from_config(unet_config).to(device)
        unet.load_state_dict(arrays.to_torch_state_dict())
        log(INFO, "FedDDPM: %d auxiliary images from the model of client %d", counts[pid], pid)
        if counts[pid]:
            sample = sample_latents if latent else sample_images
            images.append(sample(unet, scheduler, counts[pid], seed=seed + 1000 + pid, ddim_steps=ddim_steps))
    aux = torch.cat(images)
    tmp = cache.with_name(cache.name + ".tmp")
    save_file(
        {"images": aux},
        str(tmp),
        metadata={**{k: str(v) for k, v in wanted.items()}, "per_client": json.dumps(counts)},
    )
    tmp.replace(cache)
    row = {
        "round": 0,
        "phase": "pretrain",
        **strategy.round_log.get(0, {}),
        "aux_images": len(aux),
        "wall_time_s": round(time.monotonic() - started, 3),
    }
    return aux, row


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
