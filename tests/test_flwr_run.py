"""`flwr run .` end to end: the Flower CLI, a local SuperLink, the default federation.

The test gives Flower its own FLWR_HOME and stops the background SuperLink (and
everything it started) afterwards, pass or fail.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from feddm.processes import processes_mentioning, stop_process_groups
from tests.conftest import MICRO_OVERRIDES, REPO_ROOT

pytestmark = pytest.mark.slow

LOCAL_SUPERLINK_PORT = 39091  # flwr's fixed port for the managed local SuperLink


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _flower_env(flwr_home: Path) -> dict[str, str]:
    return dict(
        os.environ,
        FLWR_HOME=str(flwr_home),
        # The test's venv already holds every dependency; skip Flower's per-run uv env.
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    )


@pytest.fixture
def flwr_home(tmp_path):
    if _port_open(LOCAL_SUPERLINK_PORT):
        pytest.skip(f"a local SuperLink already listens on {LOCAL_SUPERLINK_PORT}")
    home = tmp_path / "flwr-home"
    yield home
    stop_process_groups(processes_mentioning(str(home)))
    assert not processes_mentioning(str(home)), "a process of the test outlived it"


def _run(command: list[str], cwd: Path, flwr_home: Path) -> str:
    result = subprocess.run(
        command, cwd=cwd, env=_flower_env(flwr_home), capture_output=True, text=True, timeout=480
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    return output


def test_flwr_run_completes_with_the_app_config(flwr_home, tmp_path, data_root):
    run_dir = tmp_path / "run"
    overrides = " ".join(MICRO_OVERRIDES)
    run_config = f"overrides='{overrides}' run-dir='{run_dir}'"
    output = _run(["flwr", "run", ".", "--stream", "--run-config", run_config], REPO_ROOT, flwr_home)
    assert "FedDM run finished" in output, output[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert (run_dir / "samples" / "round_0002.png").is_file()
    assert (run_dir / "model" / "model_index.json").is_file()


def test_feddm_run_submits_to_a_named_superlink(flwr_home, tmp_path, data_root):
    """feddm-run superlink=local: the same app, submitted with flwr run."""
    command = ["feddm-run", "superlink=local", "strategy=quant", f"output_dir={tmp_path}", *MICRO_OVERRIDES]
    output = _run(command, tmp_path, flwr_home)
    assert "FedDM run folder:" in output
    (run_dir,) = [p for p in tmp_path.iterdir() if p.name.endswith("_quant")]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert (run_dir / ".hydra" / "overrides.yaml").is_file()
    assert "name: quant" in (run_dir / "config.yaml").read_text()
