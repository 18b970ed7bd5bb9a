"""Diffusion models for FedDM: builders, the training step, sampling and data.

Nothing here knows about Flower or federation; clients, the server, tests and
benchmarks all call these functions.
"""

from models.builders import (
    build_scheduler,
    build_unet,
    count_parameters,
    resolve_device,
    scheduler_from_config,
    seeded_unet,
    unet_from_config,
)
from models.data import DatasetNotFoundError, LabeledImages, load_image_dataset
from models.diffusion import denoising_loss, make_optimizer, sample_images, train_step
from models.pipeline import load_pipeline, save_pipeline

__all__ = [
    "DatasetNotFoundError",
    "LabeledImages",
    "build_scheduler",
    "build_unet",
    "count_parameters",
    "denoising_loss",
    "load_image_dataset",
    "load_pipeline",
    "make_optimizer",
    "resolve_device",
    "scheduler_from_config",
    "seeded_unet",
    "unet_from_config",
    "sample_images",
    "save_pipeline",
    "train_step",
]
