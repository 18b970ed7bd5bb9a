"""Run FedDM on a Flower Grid: build the model, run the strategy, write the run folder."""

from __future__ import annotations

import json
import random
import time
from logging import INFO
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from flwr.supercore import log
from omegaconf import DictConfig, OmegaConf

from models import build_scheduler, build_unet, resolve_device, sample_images
from server_app.config import resolve_paths, to_yaml, validate_config
from server_app.run_folder import RunFolder, new_run_dir
from strategies import build_strategy

# Round-log keys copied to metrics.jsonl, besides round and wall_time_s.
METRIC_KEYS = (
    "train_loss",
    "eval_loss",
    "uplink_bytes",
    "downlink_bytes",
    "num_sampled",
    "num_aggregated",
    "num_rejected",
)


def client_config(cfg: DictConfig, unet: UNet2DModel, scheduler: DDPMScheduler) -> ConfigRecord:
    """Everything a client needs, so remote SuperNodes need no copy of ``conf/``."""
    container = OmegaConf.to_container(cfg, resolve=True)
    return ConfigRecord(
        {
            "unet": json.dumps(dict(unet.config)),
            "scheduler": json.dumps(dict(scheduler.config)),
            "dataset": json.dumps(container["dataset"]),
            "partition": json.dumps(container["partition"]),
            "lr": float(cfg.lr),
            "weight-decay": float(cfg.weight_decay),
            "local-steps": int(cfg.local_steps),
            "local-epochs": int(cfg.local_epochs or 0),
            "batch-size": int(cfg.batch_size),
            "max-grad-norm": float(cfg.max_grad_norm),
            "seed": int(cfg.seed),
            "device": str(cfg.device),
            "eval-fraction": float(cfg.client_eval_fraction),
            "eval-max-examples": int(cfg.client_eval_max_examples),
        }
    )


def _seed_everything(seed: int) -> None:
    random.seed(seed)  # Flower samples nodes with `random`
    np.random.seed(seed)
    torch.manual_seed(seed)


def _format_round(row: dict) -> str:
    parts = [f"round {row['round']}"]
    for key in ("train_loss", "eval_loss"):
        if key in row:
            parts.append(f"{key} {row[key]:.4f}")
    for key in ("uplink_bytes", "downlink_bytes"):
        if key in row:
            parts.append(f"{key.split('_')[0]} {row[key] / 1e6:.2f} MB")
    parts.append(f"{row['wall_time_s']:.1f} s")
    return " | ".join(parts)


def wait_for_nodes(grid: Grid, num_clients: int, timeout_s: float) -> None:
    """Wait until ``num_clients`` nodes are connected, or fail naming what to change."""
    deadline = time.monotonic() + timeout_s
    while (connected := len(list(grid.get_node_ids()))) < num_clients:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"num_clients={num_clients}, but only {connected} SuperNodes connected "
                f"within node_wait_timeout_s={timeout_s:g}. In simulation, run with "
                f"--federation-config 'num-supernodes={num_clients}' (or lower num_clients); "
                "in a deployment, start more SuperNodes."
            )
        time.sleep(1.0)


def run_federation(grid: Grid, cfg: DictConfig, run_dir: str | Path | None = None) -> Path:
    """Train for ``cfg.num_rounds`` rounds and return the run folder.

    The config is checked before anything is trained; the run folder gets the
    resolved config, ``metrics.jsonl`` (a row per round), a sample grid per
    evaluation round and the final model as a diffusers pipeline.
    """
    validate_config(cfg)
    cfg = resolve_paths(cfg)
    run = RunFolder(run_dir or cfg.run_dir or new_run_dir(cfg.output_dir, cfg.strategy.name))
    log(INFO, "FedDM run folder: %s", run.path)
    run.write_config(to_yaml(cfg))

    _seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    plain = OmegaConf.to_container(cfg, resolve=True)
    unet = build_unet(
        plain["model"]["unet"],
        image_size=cfg.dataset.image_size,
        channels=cfg.dataset.channels,
    )
    scheduler = build_scheduler(plain["scheduler"])
    strategy = build_strategy(cfg.strategy, num_clients=cfg.num_clients)
    settings = client_config(cfg, unet, scheduler)
    unet.to(device)
    wait_for_nodes(grid, cfg.num_clients, float(cfg.node_wait_timeout_s))
    started = time.monotonic()

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Called by Flower after each round: grid, metrics row, progress line."""
        if server_round == 0:
            return None
        row = {"round": server_round}
        row.update(
            {k: v for k, v in strategy.round_log.get(server_round, {}).items() if k in METRIC_KEYS}
        )
        if server_round % cfg.eval.every == 0 or server_round == cfg.num_rounds:
            unet.load_state_dict(arrays.to_torch_state_dict())
            images = sample_images(
                unet,
                scheduler,
                cfg.eval.num_samples,
                seed=cfg.eval.seed,
                ddim_steps=cfg.eval.ddim_steps,
            )
            run.save_grid(images, server_round)
        row["wall_time_s"] = round(time.monotonic() - started, 3)
        run.append_metrics(row)
        log(INFO, "FedDM %s", _format_round(row))
        return None

    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(unet.state_dict()),
        num_rounds=cfg.num_rounds,
        timeout=float(cfg.round_timeout_s),
        train_config=settings,
        evaluate_config=ConfigRecord(dict(settings)),
        evaluate_fn=evaluate_global,
    )
    unet.load_state_dict(result.arrays.to_torch_state_dict())
    run.save_model(unet.cpu(), scheduler)
    log(INFO, "FedDM run finished; results in %s", run.path)
    return run.path
