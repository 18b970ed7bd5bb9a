"""The run folder: config, per-round metrics, sample grids and the final model.

Layout::

    RUN_DIR/
      config.yaml        resolved config of the run
      metrics.jsonl      one JSON object per round
      samples/round_NNNN.png
      checkpoint.safetensors   the last checkpoint (weights, EMA, round, RNG states)
      model/             diffusers DDPMPipeline (save_pretrained)
      client_state/      simulated clients' state files while the run lasts (client_state=disk)
      run-key            the run's name for clients' state files (client_state=disk; kept on resume)
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from logging import WARNING
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel
from flwr.supercore import log

from models import save_pipeline
from models.durable import write_text_atomic
from models.grid import save_grid

AUTOENCODER_DIR = "autoencoder"


class MetricsError(ValueError):
    """A line of ``metrics.jsonl`` other than the last is not a round's JSON object."""


def parse_metrics(metrics_file: Path) -> tuple[list[dict[str, Any]], int | None]:
    """The rows of a ``metrics.jsonl`` file, and the number (from 1) of a partial last line, if any.

    Rows are appended one line at a time, so only the last can be cut short (a
    disk that filled up, a power cut mid-write): it is left out, and its number
    returned. A bad line before it is damage this run did not make: ``MetricsError``.
    """
    if not metrics_file.exists():
        return [], None
    # Undecodable bytes (a cut-off or zero-filled tail) become U+FFFD, which no JSON line holds.
    text = metrics_file.read_text(encoding="utf-8", errors="replace")
    lines = [(number, line) for number, line in enumerate(text.split("\n"), 1) if line.strip()]
    rows: list[dict[str, Any]] = []
    for index, (number, line) in enumerate(lines):
        row = _parse_row(line)
        if row is None and index == len(lines) - 1:
            return rows, number
        if row is None:
            raise MetricsError(
                f"{metrics_file} line {number} is not a JSON object with a round: {line[:80]!r}; "
                "only a partial last line is dropped on its own: repair or remove the line"
            )
        rows.append(row)
    return rows, None


def _parse_row(line: str) -> dict[str, Any] | None:
    """One line's row; None if it is not a JSON object with a ``round``."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) and "round" in row else None


def read_metrics(metrics_file: Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` file (none if it does not exist), without a partial last line.

    A partial last line is logged as a WARNING naming the file and the line.
    """
    rows, partial = parse_metrics(metrics_file)
    if partial is not None:
        log(
            WARNING,
            "FedDM: %s line %d is cut short (a write that did not finish); ignored",
            metrics_file,
            partial,
        )
    return rows


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

    def drop_partial_metrics(self) -> None:
        """Rewrite ``metrics.jsonl`` without a partial last line (logged as a WARNING), before rows follow it.

        Appending after a line cut short would glue the next row onto it.
        """
        rows, partial = parse_metrics(self.metrics_file)
        if partial is None:
            return
        log(
            WARNING,
            "FedDM: %s line %d is cut short (a write that did not finish, e.g. a full disk); dropped",
            self.metrics_file,
            partial,
        )
        self._write_rows(rows)

    def truncate_metrics(self, last_round: int) -> list[dict[str, Any]]:
        """Keep the rows up to ``last_round`` (a resumed run redoes the later ones)."""
        rows = [r for r in self.read_metrics() if r["round"] <= last_round]
        self._write_rows(rows)
        return rows

    def run_key(self) -> str:
        """This run's name for clients' state files: made once, kept by a resumed run (``run-key``)."""
        key_file = self.path / "run-key"
        if not key_file.exists():
            self._write_atomic(key_file, uuid.uuid4().hex + "\n")
        key = key_file.read_text(encoding="utf-8").strip()
        if not key.isalnum():
            raise ValueError(f"{key_file} holds {key!r}, not a run key (letters and digits)")
        return key

    def _write_rows(self, rows: list[dict[str, Any]]) -> None:
        """Replace ``metrics.jsonl`` with ``rows``, atomically."""
        self._write_atomic(self.metrics_file, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))

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
