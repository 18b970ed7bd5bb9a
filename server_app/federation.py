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
from diffusers.training_utils import EMAModel
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from flwr.supercore import log
from omegaconf import DictConfig, OmegaConf

from models import build_scheduler, build_unet, resolve_device
from models.latent import autoencoder_from_settings, latent_geometry
from models.data import dataset_from_config
from server_app.checkpoint import (
    Checkpoint,
    CheckpointError,
    has_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from server_app.auxiliary import auxiliary_images
from server_app.config import resolve_paths, resumed_config, to_yaml, validate_config
from server_app.evaluation import GlobalEvaluator
from server_app.run_folder import RunFolder, new_run_dir
from strategies import FedDDPM, build_strategy
from strategies.fedddpm import server_calibration

# Round-log keys copied to metrics.jsonl, besides round, wall_time_s and fid.
METRIC_KEYS = (
    "train_loss",
    "eval_loss",
    "uplink_bytes",
    "downlink_bytes",
    "num_sampled",
    "num_aggregated",
    "num_rejected",
    "eval_downlink_bytes",
    "train_time_s",
    "calibrated",
)


def client_config(cfg: DictConfig, unet: UNet2DModel, scheduler: DDPMScheduler) -> ConfigRecord:
    """Everything a client needs, so remote SuperNodes need no copy of ``conf/``."""
    container = OmegaConf.to_container(cfg, resolve=True)
    return ConfigRecord(
        {
            "unet": json.dumps(dict(unet.config)),
            # Latent diffusion: the frozen autoencoder clients encode their images with.
            "autoencoder": json.dumps(container["model"].get("autoencoder")),
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
            # Clients that keep parts of the model (strategy=partial) keep an EMA of their own.
            "ema-enabled": bool(cfg.ema.enabled),
            "ema-decay": float(cfg.ema.decay),
        }
    )


def client_sampling(cfg: DictConfig) -> dict:
    """What clients that keep parts of the model generate at evaluation rounds (grid and FID)."""
    return {
        "sample-count": max(int(cfg.eval.num_samples), int(cfg.eval.grid_size)),
        "sample-seed": int(cfg.eval.seed),
        "sample-ddim-steps": int(cfg.eval.ddim_steps or 0),  # 0: full DDPM
        "sample-batch-size": int(cfg.eval.batch_size),
        "sample-shape": json.dumps([int(cfg.dataset.channels), int(cfg.dataset.image_size), int(cfg.dataset.image_size)]),
    }


def _seed_everything(seed: int) -> None:
    random.seed(seed)  # Flower samples nodes with `random`
    np.random.seed(seed)
    torch.manual_seed(seed)


def _format_round(row: dict) -> str:
    parts = [f"round {row['round']}"]
    for key in ("train_loss", "eval_loss", "fid"):
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


class GlobalModel:
    """The server's copy of the global UNet, its EMA, and what is saved of them."""

    def __init__(self, unet: UNet2DModel, ema_cfg: DictConfig) -> None:
        self.unet = unet
        self.ema = (
            EMAModel(unet.parameters(), decay=float(ema_cfg.decay)) if ema_cfg.enabled else None
        )

    def update(self, arrays: ArrayRecord) -> None:
        """Load the new global weights and take an EMA step."""
        self.unet.load_state_dict(arrays.to_torch_state_dict())
        if self.ema is not None:
            self.ema.step(self.unet.parameters())

    def evaluation_weights(self):
        """Context manager: the UNet holds the EMA weights (if on) inside the block."""
        return _EMAWeights(self)

    def checkpoint(self, server_round: int, strategy_name: str) -> Checkpoint:
        names = [n for n, _ in self.unet.named_parameters()]
        return Checkpoint(
            round=server_round,
            global_weights=self.unet.state_dict(),
            ema_weights=dict(zip(names, self.ema.shadow_params)) if self.ema else {},
            ema_step=self.ema.optimization_step if self.ema else 0,
            strategy_state={"name": strategy_name},
        )

    def restore(self, checkpoint: Checkpoint) -> None:
        expected = {n: tuple(t.shape) for n, t in self.unet.state_dict().items()}
        found = {n: tuple(t.shape) for n, t in checkpoint.global_weights.items()}
        if expected != found:
            raise CheckpointError("the checkpoint's weights do not match the run's model config")
        self.unet.load_state_dict(checkpoint.global_weights)
        if self.ema is not None:
            params = dict(self.unet.named_parameters())
            shapes = {n: tuple(t.shape) for n, t in checkpoint.ema_weights.items()}
            if shapes != {n: tuple(p.shape) for n, p in params.items()}:
                raise CheckpointError("the checkpoint holds no EMA weights for this model")
            state = self.ema.state_dict()
            state["shadow_params"] = [checkpoint.ema_weights[n].to(p.device) for n, p in params.items()]
            state["optimization_step"] = checkpoint.ema_step
            self.ema.load_state_dict(state)


class _EMAWeights:
    def __init__(self, model: GlobalModel) -> None:
        self.model = model

    def __enter__(self) -> UNet2DModel:
        if self.model.ema is not None:
            self.model.ema.store(self.model.unet.parameters())
            self.model.ema.copy_to(self.model.unet.parameters())
        return self.model.unet

    def __exit__(self, *exc) -> None:
        if self.model.ema is not None:
            self.model.ema.restore(self.model.unet.parameters())


def _calibration(grid, strategy, cfg, run, unet, scheduler, settings, device, latent):
    """FedDDPM: the clients' own models, the auxiliary images, and the server's calibration step."""
    st = cfg.strategy
    images, row = auxiliary_images(
        grid, strategy, ArrayRecord(unet.state_dict()), settings, scheduler, run_dir=run.path,
        ddim_steps=st.aux_ddim_steps, seed=int(cfg.seed), timeout=float(cfg.round_timeout_s), device=device,
        latent=latent,
    )
    if row and not any(r["round"] == 0 for r in run.read_metrics()):  # one pretraining row per run
        run.append_metrics(row)
    if row:
        log(INFO, "FedDM %s", _format_round(row))
    return server_calibration(
        dict(unet.config), scheduler, images, steps=int(st.calibration_steps), lr=float(st.calibration_lr),
        batch_size=int(st.calibration_batch_size), seed=int(cfg.seed), device=device,
        max_grad_norm=float(cfg.max_grad_norm),
    )


def trained_nothing(run_dir: str | Path) -> bool:
    """Whether a run folder stopped before any round was trained: no checkpoint, no row after round 0.

    Resuming such a run (e.g. one that failed after FedDDPM's pretraining) starts
    its training over in the folder, keeping what round 0 left: its row and the
    auxiliary images.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() or has_checkpoint(run_dir) or (run_dir / "model").exists():
        return False  # (a finished run without checkpoints has model/)
    return all(r["round"] == 0 for r in RunFolder(run_dir).read_metrics())


def run_federation(grid: Grid, cfg: DictConfig, run_dir: str | Path | None = None) -> Path:
    """Train until round ``cfg.num_rounds`` and return the run folder.

    The config is checked before anything is trained. The run folder gets the
    resolved config, ``metrics.jsonl`` (a row per round), a sample grid per
    evaluation round, checkpoints, and the final model as a diffusers pipeline.
    With ``cfg.resume=RUN_DIR`` the run continues from that folder's checkpoint
    (or, if it stopped before a round was trained, starts its training anew there).
    """
    if cfg.resume:
        cfg = resumed_config(cfg.resume)  # the run's own settings, not today's defaults
    validate_config(cfg)
    cfg = resolve_paths(cfg)
    folder = cfg.resume or cfg.run_dir or run_dir or new_run_dir(cfg.output_dir, cfg.strategy.name)
    run = RunFolder(folder)
    log(INFO, "FedDM run folder: %s", run.path)
    if not cfg.resume:
        if run.read_metrics():
            raise FileExistsError(
                f"run folder {run.path} already holds metrics.jsonl; continue it with "
                f"resume={run.path} or choose another folder"
            )
        run.write_config(to_yaml(cfg))
    if cfg.dataset.download:
        # Download once here, so simulated clients do not race on the same folder.
        for train in (True, False):
            dataset_from_config(cfg.dataset, train=train)
        cfg.dataset.download = False

    _seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    plain = OmegaConf.to_container(cfg, resolve=True)
    autoencoder = autoencoder_from_settings(plain["model"].get("autoencoder"))
    size, channels = cfg.dataset.image_size, cfg.dataset.channels
    if autoencoder is not None:  # latent diffusion: the UNet works on the autoencoder's latents
        size, channels = latent_geometry(autoencoder, int(size))
        autoencoder.to(device)
    unet = build_unet(plain["model"]["unet"], image_size=size, channels=channels)
    # Latents are not images: no clipping of the predicted sample to [-1, 1].
    scheduler = build_scheduler({**plain["scheduler"], **({"clip_sample": False} if autoencoder else {})})
    strategy = build_strategy(
        cfg.strategy, num_clients=cfg.num_clients, min_clients=cfg.min_clients, seed=int(cfg.seed),
        client_sampling=client_sampling(cfg), privacy=cfg.privacy,
    )
    strategy.evaluate_every, strategy.last_round = int(cfg.eval.every), int(cfg.num_rounds)
    settings = client_config(cfg, unet, scheduler)
    model = GlobalModel(unet.to(device), cfg.ema)

    done_rounds, elapsed_before = 0, 0.0
    if cfg.resume and trained_nothing(run.path):
        log(INFO, "FedDM: %s has no checkpoint and no trained round; training starts at round 1", run.path)
    elif cfg.resume:
        checkpoint, torch_rng = load_checkpoint(run.path)
        if checkpoint.strategy_state.get("name") != cfg.strategy.name:
            raise CheckpointError(
                f"the checkpoint is of strategy {checkpoint.strategy_state.get('name')!r}, "
                f"the config says {cfg.strategy.name!r}"
            )
        model.restore(checkpoint)
        restore_rng_state(checkpoint.rng_state, torch_rng)
        done_rounds = checkpoint.round
        rows = run.truncate_metrics(done_rounds)
        for row in rows:  # what adaptive strategies (FedDDPM+) saw before the interruption
            if row["round"] > 0:
                strategy.observe(row["round"], row)
        elapsed_before = rows[-1]["wall_time_s"] if rows else 0.0
        strategy.round_offset = done_rounds
        log(INFO, "FedDM resumes after round %d of %d", done_rounds, cfg.num_rounds)

    evaluator = GlobalEvaluator(cfg, run, device, autoencoder)
    wait_for_nodes(grid, cfg.num_clients, float(cfg.node_wait_timeout_s))
    if isinstance(strategy, FedDDPM):
        strategy.calibrate = _calibration(
            grid, strategy, cfg, run, model.unet, scheduler, settings, device, latent=autoencoder is not None
        )
    started = time.monotonic()

    def after_round(local_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Called by Flower after each round: EMA, evaluation, metrics, checkpoint."""
        if local_round == 0:
            return None
        server_round = local_round + done_rounds
        model.update(arrays)
        row = {"round": server_round}
        row.update({k: v for k, v in strategy.round_log.get(server_round, {}).items() if k in METRIC_KEYS})
        if server_round % cfg.eval.every == 0 or server_round == cfg.num_rounds:
            if getattr(strategy, "personalized", False):  # each client has its own model
                row.update(evaluator.clients(strategy.client_samples.pop(server_round, {}), server_round))
            else:
                with model.evaluation_weights() as weights:
                    row.update(evaluator(weights, scheduler, server_round))
        row["wall_time_s"] = round(elapsed_before + time.monotonic() - started, 3)
        run.append_metrics(row)
        strategy.observe(server_round, row)
        log(INFO, "FedDM %s", _format_round(row))
        last = server_round == cfg.num_rounds
        if cfg.checkpoint_every and (server_round % cfg.checkpoint_every == 0 or last):
            save_checkpoint(run.path, model.checkpoint(server_round, cfg.strategy.name))
        return None

    if cfg.num_rounds > done_rounds:
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(model.unet.state_dict()),
            num_rounds=cfg.num_rounds - done_rounds,
            timeout=float(cfg.round_timeout_s),
            train_config=settings,
            evaluate_config=ConfigRecord(dict(settings)),
            evaluate_fn=after_round,
        )
    if getattr(strategy, "personalized", False):
        log(INFO, "Each client keeps its own model (shared and local parts); the run folder has no model/")
    else:
        with model.evaluation_weights() as weights:
            run.save_model(weights.cpu(), scheduler, autoencoder.cpu() if autoencoder else None)
    log(INFO, "FedDM run finished; results in %s", run.path)
    return run.path
