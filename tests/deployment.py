"""Helpers for the deployment tests: run docker/local-deployment.sh and stop all it started.

Each test checks that no process it started outlives it. The tests live in two
modules so that pytest-xdist runs them side by side (most of their time is
spent waiting on Flower's polling and heartbeats).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from feddm.processes import processes_mentioning
from tests.conftest import REPO_ROOT

LAUNCHER = REPO_ROOT / "docker" / "local-deployment.sh"


def _env() -> dict[str, str]:
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")


def launch(workdir: Path, nodes: int, overrides: list[str]) -> subprocess.Popen:
    """Start the launcher with ``nodes`` SuperNodes in its own process group."""
    return subprocess.Popen(
        ["bash", str(LAUNCHER), "--nodes", str(nodes), "--workdir", str(workdir), "--", *overrides],
        cwd=workdir.parent,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finish(process: subprocess.Popen, workdir: Path, timeout: float) -> str:
    """Wait for the launcher; stop it if the test failed; nothing under ``workdir`` may outlive it."""
    try:
        output, _ = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:  # the test failed: stop the launcher (it stops the rest)
            os.killpg(process.pid, signal.SIGINT)
            process.wait(timeout=60)
        deadline = time.monotonic() + 30
        while processes_mentioning(str(workdir)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not processes_mentioning(str(workdir)), "a Flower process outlived the launcher"
    return output


def run_folder_of(output: str) -> Path:
    """The run folder the launcher printed."""
    lines = [line for line in output.splitlines() if line.startswith("Run folder: ")]
    assert lines, output[-3000:]
    return Path(lines[-1].removeprefix("Run folder: "))


def metrics_rows(run_dir: Path) -> list[dict]:
    """The rows of the run's metrics.jsonl."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
