"""``feddm-run``: compose the config with Hydra and run the Flower app.

    feddm-run strategy=quant partition=dirichlet partition.alpha=0.1
    feddm-run -m strategy=vanilla,prox,quant          # a sweep, one run folder each
    feddm-run superlink=my-superlink num_rounds=50     # submit to a SuperLink with flwr run
    feddm-run resume=outputs/2026-11-25_10-00-00_quant  # continue a run from its checkpoint
    feddm-run superlink=my-superlink resume=/srv/feddm/run1  # ... in its folder where the ServerApp runs

The run folder is Hydra's output directory (``hydra.run.dir=...`` moves it).
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import conf
from feddm.simulation import simulate
from server_app.config import (
    ConfigError,
    compose_config,
    refuse_simulation_overrides,
    resolve_paths,
    resumed_config,
    validate_config,
)

# Exit status of a config error (as argparse uses for bad arguments).
CONFIG_ERROR_STATUS = 2


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
    refuse_simulation_overrides(app_overrides)
    # Paths must be absolute: the SuperLink runs the app in its own directory.
    absolute = resolve_paths(cfg)
    app_overrides += [f"dataset.root={absolute.dataset.root}", f"eval.fid_cache={absolute.eval.fid_cache}"]
    if absolute.eval.fid_weights:
        app_overrides.append(f"eval.fid_weights={absolute.eval.fid_weights}")
    if absolute.model.get("autoencoder") is not None and absolute.model.autoencoder.get("path"):
        app_overrides.append(f"model.autoencoder.path={absolute.model.autoencoder.path}")
    # run_dir=... names a folder on the SuperLink's machine (e.g. in its container).
    return _flwr_run(str(cfg.superlink), app_overrides, str(cfg.run_dir or run_dir))


def submit_resume(superlink: str, resume: str) -> Path:
    """Continue the run folder ``resume`` on the SuperLink connection ``superlink``; return the folder.

    Only the folder's path travels: the ServerApp reads the run's ``config.yaml``
    and checkpoint where it runs, so nothing of the run is read on this machine.
    """
    run_dir = remote_resume_path(resume, superlink)
    return _flwr_run(superlink, [f"resume={run_dir}"], run_dir)


def remote_resume_path(resume: str, superlink: str) -> str:
    """The run folder ``resume`` names on the ServerApp's machine: an absolute path, sent as given.

    A relative path is resolved here only if it names a folder here (a SuperLink on
    this machine, e.g. ``superlink=local``); elsewhere it would name nothing.
    """
    path = Path(str(resume)).expanduser()
    if path.is_absolute():
        return str(path)
    if path.is_dir():
        return str(path.resolve())
    raise ConfigError(
        f"resume={resume} is not allowed with superlink={superlink}: a relative path that names no folder "
        "here; give the run folder's absolute path on the machine where the SuperLink runs the ServerApp"
    )


def _flwr_run(superlink: str, app_overrides: list[str], remote_run_dir: str) -> Path:
    """``flwr run`` this app on ``superlink`` with the overrides and run folder as its run config."""
    # flwr's --run-config takes TOML literal strings: no single quotes inside.
    if any("'" in o for o in [*app_overrides, remote_run_dir]):
        raise ValueError(
            f"overrides and paths sent to a SuperLink may not contain single quotes: {app_overrides} "
            f"{remote_run_dir}"
        )
    run_config = f"overrides='{' '.join(app_overrides)}' run-dir='{remote_run_dir}'"
    command = ["flwr", "run", str(_app_dir()), superlink, "--stream", "--run-config", run_config]
    print("+", shlex.join(command), flush=True)
    run_id = _stream(command)
    # `flwr run --stream` exits 0 once the logs end, however the run ended: ask the SuperLink.
    status = _final_status(superlink, run_id)
    if status != RUN_COMPLETED:
        raise RemoteRunFailed(
            f"run {run_id} on superlink={superlink} ended {status!r}, not {RUN_COMPLETED!r}: the "
            f"ServerApp failed or was stopped; the log above says why (again: flwr log {run_id} {superlink})",
            Path(remote_run_dir),
        )
    return Path(remote_run_dir)


RUN_COMPLETED = "finished:completed"  # Flower's status of a run whose ServerApp returned
STATUS_WAIT_S = 30.0  # how long a run may still be "running" after its log stream ended


class RemoteRunFailed(RuntimeError):
    """A run submitted to a SuperLink did not complete (its ServerApp failed or was stopped)."""

    def __init__(self, message: str, run_dir: Path) -> None:
        super().__init__(message)
        self.run_dir = run_dir


def _stream(command: list[str]) -> int:
    """Run ``flwr run --stream``, echoing its output; the id of the run it started."""
    run_id = None
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process:
        for line in process.stdout:
            print(line, end="", flush=True)
            found = re.search(r"started run (\d+)", line)
            run_id = run_id if run_id is not None or not found else int(found.group(1))
    if process.returncode != 0:
        raise subprocess.CalledProcessError(process.returncode, command)
    if run_id is None:
        raise RuntimeError(
            "flwr run did not print the id of the run it started ('Successfully started run N')"
        )
    return run_id


def _final_status(superlink: str, run_id: int) -> str:
    """The run's status on the SuperLink (``flwr ls --run-id``), once it has finished."""
    deadline = time.monotonic() + STATUS_WAIT_S
    while True:
        listed = subprocess.run(
            ["flwr", "ls", superlink, "--run-id", str(run_id), "--format", "json"],
            capture_output=True,
            text=True,
            check=True,
        )
        (run,) = json.loads(listed.stdout)["runs"]
        if run["status"].startswith("finished") or time.monotonic() > deadline:
            return run["status"]
        time.sleep(1.0)


def _hydra_run_dir(resume: str | None, superlink: str | None, default: str) -> str:
    """hydra.run.dir in conf/config.yaml: a resumed run writes into its own folder.

    A resume submitted to a SuperLink writes nothing here (its folder is on the
    ServerApp's machine, maybe not even a path that could exist here): the current
    directory, with no ``.hydra/`` (see :func:`_hydra_output_subdir`).
    """
    if resume and superlink:
        return "."
    return str(resume) if resume else default


def _hydra_output_subdir(resume: str | None, superlink: str | None) -> str | None:
    """hydra.output_subdir: ``.hydra`` in the run folder; none for a resume submitted to a SuperLink."""
    return None if resume and superlink else ".hydra"


OmegaConf.register_new_resolver("feddm_run_dir", _hydra_run_dir, replace=True)
OmegaConf.register_new_resolver("feddm_output_subdir", _hydra_output_subdir, replace=True)


def _jobs(args: list[str]) -> list[list[str]] | None:
    """The overrides of each job ``args`` asks for (a sweep: one list per job); None if not a plain run."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in args):
        return None  # --help, --cfg, --info ...: Hydra's own output
    overrides = [a for a in args if not a.startswith(("-", "hydra.", "hydra/", "+hydra", "~hydra"))]
    parsed = OverridesParser.create().parse_overrides(overrides)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def check_overrides(args: list[str]) -> list[str]:
    """Config errors of every job ``args`` would run (each message once); empty if all are valid."""
    errors: list[str] = []
    try:
        jobs = _jobs(args)
    except (HydraException, OmegaConfBaseException) as err:
        return [str(err)]
    for job in jobs or []:
        try:
            cfg = compose_config(job)
            if not cfg.resume:  # a resumed run is checked with its own saved config
                validate_config(cfg)
        except (ConfigError, HydraException, OmegaConfBaseException) as err:
            label = f"[{' '.join(job)}] " if len(jobs) > 1 else ""
            errors.append(label + str(err).strip())
    return list(dict.fromkeys(errors))


def main() -> None:
    """Entry point of ``feddm-run``: config errors print alone (no traceback) and exit with status 2."""
    errors = check_overrides(sys.argv[1:])
    if errors:
        print("feddm-run: " + "\n".join(errors), file=sys.stderr)
        sys.exit(CONFIG_ERROR_STATUS)
    _hydra_main()


@hydra.main(version_base=None, config_path="pkg://conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        _run(cfg)
    except ConfigError as err:  # e.g. a resumed run's saved config; SystemExit passes Hydra by
        print(f"feddm-run: {err}", file=sys.stderr)
        sys.exit(CONFIG_ERROR_STATUS)
    except RemoteRunFailed as err:  # the folder holds what the run did before it failed
        print(f"FedDM run folder: {err.run_dir}", flush=True)
        print(f"feddm-run: {err}", file=sys.stderr)
        sys.exit(1)


def _run(cfg: DictConfig) -> None:
    """Check, then simulate here or submit to a SuperLink; print the run folder."""
    superlink = cfg.superlink
    hydra_cfg = HydraConfig.get()
    if cfg.resume:
        _warn_ignored_on_resume(list(hydra_cfg.overrides.task))
    if cfg.resume and superlink:  # the run folder and its config.yaml are where the ServerApp runs
        run_dir = submit_resume(str(superlink), str(cfg.resume))
        print(f"FedDM run folder: {run_dir}", flush=True)
        return
    if cfg.resume:
        cfg = resumed_config(cfg.resume)
        cfg.superlink = superlink
    validate_config(cfg)
    run_dir = Path(cfg.run_dir or hydra_cfg.runtime.output_dir).resolve()
    if cfg.superlink:
        run_dir = submit(cfg, run_dir, list(hydra_cfg.overrides.task))
    else:
        run_dir = simulate(cfg, run_dir)
    print(f"FedDM run folder: {run_dir}", flush=True)


def _warn_ignored_on_resume(overrides: list[str]) -> None:
    """Say which overrides a resume ignores: the run continues with its own saved config."""
    ignored = [o for o in overrides if o.lstrip("+~").split("=")[0] not in ("resume", "superlink")]
    if ignored:
        print(
            f"feddm-run: resume continues with the run folder's config.yaml; ignored: {' '.join(ignored)}",
            file=sys.stderr,
            flush=True,
        )


if __name__ == "__main__":
    main()
