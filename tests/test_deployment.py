"""The Deployment Engine on 127.0.0.1: docker/local-deployment.sh with TLS and node auth.

Each test checks that no process it started outlives it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from feddm.processes import processes_mentioning
from tests.conftest import MICRO_MODEL, REPO_ROOT, SHORT_RUN

pytestmark = pytest.mark.slow

LAUNCHER = REPO_ROOT / "docker" / "local-deployment.sh"


def _env() -> dict[str, str]:
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")


def _launch(workdir: Path, nodes: int, overrides: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        ["bash", str(LAUNCHER), "--nodes", str(nodes), "--workdir", str(workdir), "--", *overrides],
        cwd=workdir.parent,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _finish(process: subprocess.Popen, workdir: Path, timeout: float) -> str:
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


def _run_dir(output: str) -> Path:
    lines = [line for line in output.splitlines() if line.startswith("Run folder: ")]
    assert lines, output[-3000:]
    return Path(lines[-1].removeprefix("Run folder: "))


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_supernodes_with_tls_train_feddm_quant(tmp_path, data_root):
    workdir = tmp_path / "deployment"
    process = _launch(workdir, 2, [*MICRO_MODEL, *SHORT_RUN, "strategy=quant", f"output_dir={tmp_path / 'out'}"])
    output = _finish(process, workdir, timeout=600)
    assert process.returncode == 0, output[-3000:]
    run_dir = _run_dir(output)
    assert [r["round"] for r in _rows(run_dir)] == [1, 2]
    assert all(r["num_aggregated"] == 2 for r in _rows(run_dir))
    for name in ("config.yaml", "samples/round_0002.png", "model/model_index.json", "checkpoint.safetensors"):
        assert (run_dir / name).is_file(), name
    # TLS and SuperNode authentication were on
    assert (workdir / "credentials" / "certificates" / "ca.crt").is_file()
    assert "registered successfully" in (workdir / "logs" / "register_1.log").read_text()


def test_a_supernode_killed_during_a_round_leaves_the_others_to_finish(tmp_path, data_root):
    workdir = tmp_path / "deployment"
    # One round; once the dead node's heartbeats stop (about a minute), the
    # SuperLink answers its message with an error reply and the round completes.
    overrides = [
        *MICRO_MODEL, *SHORT_RUN, "num_rounds=1", "min_clients=2", "round_timeout_s=150",
        f"output_dir={tmp_path / 'out'}",
    ]
    process = _launch(workdir, 3, overrides)
    run_log = workdir / "logs" / "run.log"
    victim_key = str(workdir / "credentials" / "keys" / "supernode_3")
    try:
        deadline = time.monotonic() + 300
        while not (run_log.is_file() and "configure_train" in run_log.read_text()):
            assert process.poll() is None, process.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "round 1 did not start"
            time.sleep(0.2)
        (victim,) = [p for p in processes_mentioning(victim_key) if b"flower-supernode" in Path(f"/proc/{p}/cmdline").read_bytes()]
        os.killpg(os.getpgid(victim), signal.SIGKILL)
    except BaseException:
        os.killpg(process.pid, signal.SIGINT)
        raise
    output = _finish(process, workdir, timeout=600)
    assert process.returncode == 0, output[-3000:]
    rows = _rows(_run_dir(output))
    assert [r["round"] for r in rows] == [1]
    assert rows[0]["num_sampled"] == 3 and rows[0]["num_aggregated"] == 2
