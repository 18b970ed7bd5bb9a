"""Sample grids: uint8 images tiled into one picture, upscaled so that 28 px images can be seen."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.utils import make_grid, save_image

from models.durable import write_atomic

MIN_GRID_SIDE = 256  # px: smaller grids are upscaled (nearest neighbour) to at least this


def image_grid(images: torch.Tensor, nrow: int | None = None, min_side: int = MIN_GRID_SIDE) -> torch.Tensor:
    """uint8 N x C x H x W images as one float C x H x W grid in [0, 1], ``nrow`` per row (default square).

    A grid whose shorter side is below ``min_side`` pixels is enlarged by a whole
    factor with nearest-neighbour interpolation, so pixels stay sharp squares.
    """
    nrow = nrow or max(1, int(len(images) ** 0.5))
    grid = make_grid(images.float() / 255.0, nrow=nrow, padding=2, pad_value=1.0)
    factor = math.ceil(min_side / min(grid.shape[-2:]))
    if factor > 1:
        grid = F.interpolate(grid[None], scale_factor=factor, mode="nearest")[0]
    return grid


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Write :func:`image_grid` of ``images`` as the PNG ``path``; replaced whole, never half written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temporary name ends in .png: save_image picks the format from it.
    return write_atomic(path, lambda tmp: save_image(image_grid(images, nrow), tmp), suffix=".tmp.png")
