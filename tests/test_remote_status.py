"""feddm-run's submit checks how the run ended: Flower's `flwr run --stream` exits 0 either way."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from feddm import cli


def _fake_flwr(tmp_path, monkeypatch, status: str, started: bool = True) -> None:
    """A `flwr` on PATH that 'starts' run 42 and reports ``status`` for it."""
    script = tmp_path / "bin" / "flwr"
    script.parent.mkdir()
    listing = json.dumps({"success": True, "runs": [{"run-id": "42", "status": status}]})
    started_line = "echo 'Successfully started run 42'" if started else "true"
    script.write_text(
        "#!/usr/bin/env bash\n"
        f'if [ "$1" = run ]; then {started_line}; echo "a log line"; exit 0; fi\n'
        f"if [ \"$1\" = ls ]; then echo '{listing}'; exit 0; fi\n"
        "exit 3\n"
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{script.parent}{os.pathsep}{os.environ['PATH']}")


def test_a_completed_run_returns_its_folder(tmp_path, monkeypatch, capsys):
    _fake_flwr(tmp_path, monkeypatch, "finished:completed")
    assert cli._flwr_run("remote", ["num_rounds=2"], "/srv/run1") == cli.Path("/srv/run1")
    assert "a log line" in capsys.readouterr().out  # the log is passed through


@pytest.mark.parametrize("status", ["finished:failed", "finished:stopped"])
def test_a_failed_or_stopped_run_is_an_error_naming_it_and_its_folder(tmp_path, monkeypatch, status):
    _fake_flwr(tmp_path, monkeypatch, status)
    with pytest.raises(cli.RemoteRunFailed, match=f"run 42 on superlink=remote ended '{status}'") as failed:
        cli._flwr_run("remote", [], "/srv/run1")
    assert failed.value.run_dir == cli.Path("/srv/run1") and "flwr log 42 remote" in str(failed.value)


def test_a_run_that_never_started_is_an_error(tmp_path, monkeypatch):
    _fake_flwr(tmp_path, monkeypatch, "finished:completed", started=False)
    with pytest.raises(RuntimeError, match="did not print the id of the run"):
        cli._flwr_run("remote", [], "/srv/run1")


def test_feddm_run_exits_1_and_prints_the_folder_when_the_remote_run_failed(tmp_path, monkeypatch):
    _fake_flwr(tmp_path, monkeypatch, "finished:failed")
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text('[superlink.remote]\naddress = "127.0.0.1:1"\ninsecure = true\n')
    env = dict(os.environ, FLWR_HOME=str(home))
    result = subprocess.run(
        ["feddm-run", "superlink=remote", f"run_dir={tmp_path / 'run'}", f"hydra.run.dir={tmp_path / 'h'}"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"FedDM run folder: {tmp_path / 'run'}" in result.stdout
    assert "ended 'finished:failed'" in result.stderr
