"""Resume where the run folder is: a resume sent to a SuperLink carries only the folder's path.

Flower is not started: ``flwr run`` (the submit) and ``run_federation`` (the
ServerApp's training) are replaced by recorders; what they are given is checked.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import feddm.cli
import server_app.app
from feddm.cli import CONFIG_ERROR_STATUS, main
from server_app.config import compose_config, to_yaml
from server_app.federation import prepare_config
from tests.conftest import MICRO_MODEL


def _feddm_run(monkeypatch, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", ["feddm-run", *args])
    main()


@pytest.fixture
def submitted(monkeypatch):
    """The ``flwr run`` commands feddm-run would start (none is started; each run "completes")."""
    commands: list[list[str]] = []

    def stream(command: list[str]) -> int:
        commands.append(command)
        return len(commands)  # the run id

    monkeypatch.setattr(feddm.cli, "_stream", stream)
    monkeypatch.setattr(feddm.cli, "_final_status", lambda superlink, run_id: feddm.cli.RUN_COMPLETED)
    return commands


def _run_config(command: list[str]) -> dict[str, str]:
    text = command[command.index("--run-config") + 1]
    return dict(item.split("=", 1) for item in shlex.split(text))


def _run_folder(path: Path, *overrides: str) -> Path:
    """A run folder as the ServerApp left it: its resolved config (no checkpoint needed here)."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(to_yaml(compose_config([*MICRO_MODEL, *overrides])))
    return path


def test_a_resume_sent_to_a_superlink_reads_and_writes_nothing_here(tmp_path, monkeypatch, submitted, capsys):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    remote = tmp_path / "on-the-superlink" / "run1"  # does not exist on this machine
    _feddm_run(monkeypatch, "superlink=my-link", f"resume={remote}", "num_rounds=9")
    (command,) = submitted
    assert command[:2] == ["flwr", "run"] and command[3] == "my-link"
    assert _run_config(command) == {"overrides": f"resume={remote}", "run-dir": str(remote)}
    assert not remote.parent.exists()  # no folder made for the remote path (Hydra's run dir)
    assert list(here.iterdir()) == []  # and no .hydra/ here
    out, err = capsys.readouterr()
    assert f"FedDM run folder: {remote}" in out
    assert "ignored: num_rounds=9" in err  # the run's saved config wins, as in a local resume


def test_a_relative_resume_path_is_resolved_only_if_it_is_a_folder_here(
    tmp_path, monkeypatch, submitted, capsys
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "run1").mkdir(parents=True)  # a SuperLink on this machine (superlink=local)
    _feddm_run(monkeypatch, "superlink=local", "resume=runs/run1")
    assert _run_config(submitted[0])["overrides"] == f"resume={tmp_path / 'runs' / 'run1'}"
    with pytest.raises(SystemExit) as exit_:
        _feddm_run(monkeypatch, "superlink=my-link", "resume=runs/elsewhere")
    assert exit_.value.code == CONFIG_ERROR_STATUS
    err = capsys.readouterr().err
    assert "resume=runs/elsewhere is not allowed with superlink=my-link" in err and "absolute path" in err
    assert len(submitted) == 1


def test_the_server_app_reads_the_resumed_runs_config_where_it_runs(tmp_path, monkeypatch):
    run = _run_folder(tmp_path / "run1", "num_rounds=7", "strategy=prox")
    given = {}

    def run_federation(grid, cfg, run_dir):  # its first step, then stop
        given.update(cfg=prepare_config(cfg), run_dir=run_dir)

    monkeypatch.setattr(server_app.app, "run_federation", run_federation)
    context = SimpleNamespace(run_config={"overrides": f"resume={run}", "run-dir": str(run)})
    server_app.app.main(None, context)
    cfg = given["cfg"]
    assert (cfg.num_rounds, cfg.strategy.name, cfg.resume) == (7, "prox", str(run))
    assert list(cfg.model.unet.block_out_channels) == [8, 16]
    assert given["run_dir"] == str(run)


def test_a_local_resume_still_reads_the_config_here(tmp_path, monkeypatch):
    run = _run_folder(tmp_path / "run1", "num_rounds=7")
    simulated = {}
    monkeypatch.setattr(feddm.cli, "simulate", lambda cfg, run_dir: simulated.update(cfg=cfg) or run_dir)
    monkeypatch.chdir(tmp_path)
    _feddm_run(monkeypatch, f"resume={run}")
    assert simulated["cfg"].num_rounds == 7 and simulated["cfg"].resume == str(run)
    assert (run / ".hydra" / "overrides.yaml").is_file()  # Hydra's record stays in the run folder
