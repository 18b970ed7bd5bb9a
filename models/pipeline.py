"""Save and load a trained model as a diffusers ``DDPMPipeline`` folder."""

from __future__ import annotations

from pathlib import Path

from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel


def save_pipeline(unet: UNet2DModel, scheduler: DDPMScheduler, folder: Path) -> Path:
    """Write ``folder`` so that ``DDPMPipeline.from_pretrained(folder)`` works (safetensors)."""
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(folder), safe_serialization=True)
    return folder


def load_pipeline(folder: Path) -> DDPMPipeline:
    """Load a pipeline written by :func:`save_pipeline`."""
    return DDPMPipeline.from_pretrained(str(folder), use_safetensors=True)
