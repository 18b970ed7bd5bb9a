"""Run the FedDM Flower app in Flower's simulation engine, in this process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation
from flwr.supercore.constant import DEFAULT_SIMULATION_CONFIG
from omegaconf import DictConfig

from client_app.app import app as feddm_client_app
from conf.schema import CLIENTS_PER_GPU, not_allowed
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


def client_resources(cfg: DictConfig, gpu_available: bool) -> dict[str, int | float]:
    """What Ray reserves for each simulated client: ``simulation.client_resources``, null keys filled in.

    Without a GPU (or with ``device=cpu``) the automatic values are Flower's own defaults, so a
    run that sets nothing starts exactly as it did before these keys existed. With one, each client
    reserves a share that lets ``CLIENTS_PER_GPU`` of them (at most ``num_clients``) train at once:
    Ray hides GPUs from actors that reserve none, and 1/num_clients would pack a whole population
    of replicas onto one device.
    """
    wanted = cfg.simulation.client_resources
    gpu = gpu_available and cfg.device != "cpu"
    num_cpus = wanted.num_cpus
    if num_cpus is None:
        num_cpus = 1 if gpu else DEFAULT_SIMULATION_CONFIG.client_resources_num_cpus
    num_gpus = wanted.num_gpus
    if num_gpus is None:
        num_gpus = 1.0 / min(CLIENTS_PER_GPU, int(cfg.num_clients)) if gpu else 0.0
    return {"num_cpus": num_cpus, "num_gpus": num_gpus}


def _check_resources(cfg: DictConfig, resources: dict[str, int | float], gpu_available: bool) -> None:
    """Refuse GPU shares this machine cannot honour, before Ray starts (Ray would hide the GPU or stall)."""
    key, num_gpus = "simulation.client_resources.num_gpus", resources["num_gpus"]
    if num_gpus == 0 and cfg.device == "cuda":
        automatic = cfg.simulation.client_resources.num_gpus is None and not gpu_available
        why = "null means 0 here: this machine has no CUDA GPU" if automatic else "set it, e.g. 0.25"
        raise ConfigError(
            not_allowed(
                key,
                num_gpus,
                f"more than 0 with device=cuda: Ray hides the GPU from clients that reserve none ({why})",
            )
        )
    if num_gpus > 0 and not gpu_available and cfg.simulation.ray_address is None:
        raise ConfigError(
            not_allowed(
                key,
                num_gpus,
                "0 or null on a machine without a CUDA GPU, unless simulation.ray_address names a Ray cluster "
                "whose machines have GPUs",
            )
        )


def ray_backend_config(cfg: DictConfig, gpu_available: bool | None = None) -> dict[str, Any]:
    """Flower's Ray backend config for ``cfg``: each client's resources and, if set, the cluster to join.

    Flower's RayBackend passes ``init_args`` to ``ray.init``, so ``address`` there connects to a
    cluster started with ``ray start`` instead of starting a local Ray instance.
    ``gpu_available`` defaults to whether torch sees a CUDA GPU here.
    """
    if gpu_available is None:
        gpu_available = torch.cuda.is_available()
    resources = client_resources(cfg, gpu_available)
    _check_resources(cfg, resources, gpu_available)
    address = cfg.simulation.ray_address
    # In the order Flower fills in its defaults, so that at the defaults the config Flower hands
    # its engine is the very text it was before these keys existed.
    return {"init_args": {} if address is None else {"address": address}, "client_resources": resources}


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
    ``backend_config`` replaces the Ray backend config built from ``cfg.simulation``;
    ``client_app`` replaces the FedDM ClientApp (tests use it to inject faults).
    """
    validate_config(cfg)
    preflight(cfg)
    if backend_config is None:
        backend_config = ray_backend_config(cfg)
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
