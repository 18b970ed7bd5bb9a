"""``feddm-run``: compose the config with Hydra and run the Flower app.

    feddm-run strategy=quant partition=dirichlet partition.alpha=0.1
    feddm-run -m strategy=vanilla,prox,quant          # a sweep, one run folder each
    feddm-run superlink=my-superlink num_rounds=50     # submit to a SuperLink with flwr run
    feddm-run resume=outputs/2026-11-25_10-00-00_quant  # continue a run from its checkpoint

The run folder is Hydra's output directory (``hydra.run.dir=...`` moves it).
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

import conf
from feddm.simulation import simulate
from server_app.config import local_path_or_id, resumed_config, validate_config


def _app_dir() -> Path:
    """The project folder holding ``pyproject.toml`` (what ``flwr run`` builds)."""
    root = Path(conf.__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        raise FileNotFoundError(
            f"no pyproject.toml in {root}: submitting to a SuperLink needs the project "
            "checkout (install it with `pip install -e .`)"
        )
    return root


def submit(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> Path:
    """Run the app on the SuperLink connection ``cfg.superlink`` with ``flwr run``.

    Returns the run folder (a path on the SuperLink's machine).
    """
    app_overrides = [o for o in overrides if not o.lstrip("+~").startswith("superlink=")]
    if cfg.resume:
        app_overrides = [f"resume={cfg.resume}"]
    # Paths must be absolute: the SuperLink runs the app in its own directory.
    app_overrides.append(f"dataset.root={Path(cfg.dataset.root).expanduser().resolve()}")
    app_overrides.append(f"eval.fid_cache={Path(cfg.eval.fid_cache).expanduser().resolve()}")
    if cfg.eval.fid_weights:
        app_overrides.append(f"eval.fid_weights={Path(cfg.eval.fid_weights).expanduser().resolve()}")
    if cfg.model.get("autoencoder") is not None and cfg.model.autoencoder.get("path"):
        app_overrides.append(f"model.autoencoder.path={local_path_or_id(cfg.model.autoencoder.path)}")
    # flwr's --run-config takes TOML literal strings: no single quotes inside.
    if any("'" in o for o in app_overrides):
        raise ValueError(f"overrides sent to a SuperLink may not contain single quotes: {app_overrides}")
    # run_dir=... names a folder on the SuperLink's machine (e.g. in its container).
    remote_run_dir = cfg.run_dir or run_dir
    run_config = f"overrides='{' '.join(app_overrides)}' run-dir='{remote_run_dir}'"
    command = ["flwr", "run", str(_app_dir()), str(cfg.superlink), "--stream", "--run-config", run_config]
    print("+", shlex.join(command), flush=True)
    subprocess.run(command, check=True)
    return Path(remote_run_dir)


# hydra.run.dir in conf/config.yaml: a resumed run writes into its own folder.
OmegaConf.register_new_resolver(
    "feddm_run_dir", lambda resume, default: str(resume) if resume else default, replace=True
)


@hydra.main(version_base=None, config_path="pkg://conf", config_name="config")
def main(cfg: DictConfig) -> None:
    """Entry point of ``feddm-run``."""
    superlink = cfg.superlink
    if cfg.resume:
        cfg = resumed_config(cfg.resume)
        cfg.superlink = superlink
    validate_config(cfg)
    hydra_cfg = HydraConfig.get()
    run_dir = Path(cfg.run_dir or hydra_cfg.runtime.output_dir).resolve()
    if cfg.superlink:
        run_dir = submit(cfg, run_dir, list(hydra_cfg.overrides.task))
    else:
        run_dir = simulate(cfg, run_dir)
    print(f"FedDM run folder: {run_dir}", flush=True)


if __name__ == "__main__":
    main()
