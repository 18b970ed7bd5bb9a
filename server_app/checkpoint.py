"""Checkpoints of a run: global weights, EMA weights, round, strategy and RNG states.

One safetensors file, ``RUN_DIR/checkpoint.safetensors``, replaced atomically
(written beside it, fsynced, renamed, its folder fsynced: ``models.durable``), so
a kill or a power cut at any moment leaves either the previous or the new checkpoint.
Tensors go in the file's tensors, everything else as JSON in its metadata;
nothing is pickled.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from models.durable import write_atomic

CHECKPOINT_NAME = "checkpoint.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated or does not match the run."""


@dataclass
class Checkpoint:
    """What a run needs to continue after ``round``."""

    round: int
    global_weights: dict[str, torch.Tensor]
    ema_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    ema_step: int = 0
    strategy_state: dict[str, Any] = field(default_factory=dict)  # JSON values and tensors
    rng_state: dict[str, Any] = field(default_factory=dict)


def capture_rng_state() -> tuple[dict[str, Any], torch.Tensor]:
    """Python, NumPy and torch RNG states (the torch one as a tensor)."""
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    return state, torch.get_rng_state()


def restore_rng_state(state: dict[str, Any], torch_state: torch.Tensor) -> None:
    """Undo :func:`capture_rng_state`."""
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(torch_state)


def save_checkpoint(run_dir: Path, checkpoint: Checkpoint) -> Path:
    """Write ``run_dir/checkpoint.safetensors`` atomically."""
    rng_state, torch_rng = capture_rng_state()
    tensors = {f"global/{k}": v.detach().cpu().contiguous() for k, v in checkpoint.global_weights.items()}
    tensors.update({f"ema/{k}": v.detach().cpu().contiguous() for k, v in checkpoint.ema_weights.items()})
    tensors["rng/torch"] = torch_rng
    state = {k: v for k, v in checkpoint.strategy_state.items() if not isinstance(v, torch.Tensor)}
    tensors.update(
        {
            f"strategy/{k}": v.detach().cpu().contiguous()
            for k, v in checkpoint.strategy_state.items()
            if isinstance(v, torch.Tensor)
        }
    )
    metadata = {
        "round": str(checkpoint.round),
        "ema_step": str(checkpoint.ema_step),
        "strategy_state": json.dumps(state),
        "rng_state": json.dumps(rng_state),
    }
    # Written beside the old one, flushed, then renamed: a crash leaves the old or the new, whole.
    return write_atomic(
        Path(run_dir) / CHECKPOINT_NAME, lambda tmp: save_file(tensors, str(tmp), metadata=metadata)
    )


def has_checkpoint(run_dir: Path) -> bool:
    """Whether the run folder holds a checkpoint (damaged or not)."""
    return (Path(run_dir) / CHECKPOINT_NAME).is_file()


def load_checkpoint(run_dir: Path) -> tuple[Checkpoint, torch.Tensor]:
    """Read a checkpoint (and the torch RNG state); a damaged file raises ``CheckpointError``."""
    path = Path(run_dir) / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; was checkpoint_every set for this run?")
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
        tensors = load_file(str(path))
        checkpoint = Checkpoint(
            round=int(metadata["round"]),
            global_weights={k[7:]: v for k, v in tensors.items() if k.startswith("global/")},
            ema_weights={k[4:]: v for k, v in tensors.items() if k.startswith("ema/")},
            ema_step=int(metadata["ema_step"]),
            strategy_state={
                **json.loads(metadata["strategy_state"]),
                **{k[9:]: v for k, v in tensors.items() if k.startswith("strategy/")},
            },
            rng_state=json.loads(metadata["rng_state"]),
        )
        torch_rng = tensors["rng/torch"]
    except (SafetensorError, OSError, KeyError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} is damaged or incomplete: {err}") from err
    if not checkpoint.global_weights:
        raise CheckpointError(f"checkpoint {path} holds no global weights")
    return checkpoint, torch_rng
