"""Run the FedDM Flower app in Flower's simulation engine, in this process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation
from omegaconf import DictConfig

from client_app.app import app as feddm_client_app
from models.data import dataset_from_config
from server_app.checkpoint import load_checkpoint
from server_app.config import ConfigError, validate_config
from server_app.federation import run_federation, trained_nothing


def preflight(cfg: DictConfig) -> None:
    """Fail before Ray starts on what can be checked here: the data, its size and a resume checkpoint.

    In simulation the clients read the same data root as this process.
    """
    if cfg.resume and not trained_nothing(Path(cfg.resume).expanduser()):
        load_checkpoint(Path(cfg.resume).expanduser())
    if cfg.dataset.download is not True:  # auto: downloaded here once if missing, before the clients need it
        train = dataset_from_config(cfg.dataset, train=True)
        if cfg.num_clients > len(train):
            raise ConfigError(
                f"num_clients={cfg.num_clients} is not allowed: more partitions than the "
                f"{len(train)} training images of {cfg.dataset.name}"
            )


def simulate(
    cfg: DictConfig,
    run_dir: str | Path | None = None,
    *,
    backend_config: dict[str, Any] | None = None,
    verbose: bool = False,
    client_app: ClientApp = feddm_client_app,
) -> Path:
    """Train with ``cfg.num_clients`` simulated SuperNodes; return the run folder.

    The config is checked here too, so a bad value fails before Ray starts.
    ``client_app`` replaces the FedDM ClientApp (tests use it to inject faults).
    """
    validate_config(cfg)
    preflight(cfg)
    if backend_config is None and torch.cuda.is_available() and cfg.device != "cpu":
        # Ray hides GPUs from actors that reserve none: share the GPU between clients.
        backend_config = {"client_resources": {"num_cpus": 1, "num_gpus": 1.0 / int(cfg.num_clients)}}
    finished: dict[str, Path] = {}
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        finished["run_dir"] = run_federation(grid, cfg, run_dir)

    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=int(cfg.num_clients),
        backend_config=backend_config,
        verbose_logging=verbose,
    )
    if "run_dir" not in finished:
        raise RuntimeError("the simulation ended before the run finished; see the log above")
    return finished["run_dir"]
