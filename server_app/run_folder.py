"""The run folder: config, per-round metrics, sample grids and the final model.

Layout::

    RUN_DIR/
      config.yaml        resolved config of the run
      metrics.jsonl      one JSON object per round
      samples/round_NNNN.png
      checkpoint.safetensors   the last checkpoint (weights, EMA, round, RNG states)
      model/             diffusers DDPMPipeline (save_pretrained)
      client_state/      simulated clients' state files while the run lasts (client_state=disk)
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel

from models import save_pipeline
from models.durable import write_text_atomic
from models.grid import save_grid

AUTOENCODER_DIR = "autoencoder"


def read_metrics(metrics_file: Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` file (none if it does not exist)."""
    if not metrics_file.exists():
        return []
    lines = metrics_file.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def new_run_dir(output_dir: str | Path, strategy: str) -> Path:
    """``output_dir/<date>_<time>_<strategy>``, made unique if it exists already."""
    stem = Path(output_dir).expanduser().resolve() / (time.strftime("%Y-%m-%d_%H-%M-%S") + f"_{strategy}")
    path, n = stem, 1
    while path.exists():
        path, n = stem.with_name(f"{stem.name}_{n}"), n + 1
    return path


class RunFolder:
    """Writes one run's outputs; every file is complete once its method returns."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser().resolve()
        self.samples = self.path / "samples"
        self.samples.mkdir(parents=True, exist_ok=True)
        self.metrics_file = self.path / "metrics.jsonl"
        self.model_dir = self.path / "model"
        self.client_state = self.path / "client_state"  # simulated clients' state files (client_state=disk)

    def write_config(self, yaml_text: str) -> None:
        """Keep the resolved config beside the results."""
        self._write_atomic(self.path / "config.yaml", yaml_text)

    def append_metrics(self, row: dict[str, Any]) -> None:
        """Append one round's metrics as a JSON line, flushed to disk."""
        with self.metrics_file.open("a", encoding="utf-8") as file:
            file.write(json.dumps(row, sort_keys=True) + "\n")
            file.flush()
            os.fsync(file.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        """All rows of ``metrics.jsonl``."""
        return read_metrics(self.metrics_file)

    def truncate_metrics(self, last_round: int) -> list[dict[str, Any]]:
        """Keep the rows up to ``last_round`` (a resumed run redoes the later ones)."""
        rows = [r for r in self.read_metrics() if r["round"] <= last_round]
        self._write_atomic(self.metrics_file, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        return rows

    def remove_client_state(self) -> None:
        """Delete the simulated clients' state files (a finished run does not need them)."""
        shutil.rmtree(self.client_state, ignore_errors=True)

    def save_grid(self, images: torch.Tensor, server_round: int, nrow: int | None = None) -> Path:
        """Save uint8 N x C x H x W images as ``samples/round_NNNN.png`` (``nrow`` per row; default square)."""
        return save_grid(images, self.samples / f"round_{server_round:04d}.png", nrow)

    def save_model(self, unet: UNet2DModel, scheduler: DDPMScheduler, autoencoder=None) -> Path:
        """Save the final model as a diffusers DDPMPipeline under ``model/``.

        Latent diffusion: the pipeline's UNet works on latents, and the frozen
        autoencoder that decodes them is saved beside it in ``model/autoencoder/``.
        """
        save_pipeline(unet, scheduler, self.model_dir)
        if autoencoder is not None:
            autoencoder.save_pretrained(str(self.model_dir / AUTOENCODER_DIR), safe_serialization=True)
        return self.model_dir

    @staticmethod
    def _write_atomic(path: Path, text: str) -> None:
        write_text_atomic(path, text)
