"""The Deployment Engine on 127.0.0.1 through its own failures, in one run of 4 rounds:

a SuperNode frozen past the round deadline (round 2 goes on without it), the same
SuperNode killed and restarted (it rejoins with its clients' state on disk), and
the SuperLink killed during round 4 with its ServerApp, restarted on its database
while the SuperNodes keep running, and the run resumed from its folder. The run
ends with each round once in ``metrics.jsonl``, its checkpoint and model, and no
process left behind.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from client_app.state import round_files
from feddm.processes import processes_mentioning
from server_app.checkpoint import load_checkpoint
from tests.conftest import MICRO_MODEL, SHORT_RUN
from tests.deployment import LocalFederation

pytestmark = pytest.mark.slow


def _rows(run_dir: Path) -> list[dict]:
    metrics = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []


def _wait_for_round(run_dir: Path, server_round: int, run: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not any(r["round"] == server_round for r in _rows(run_dir)):
        assert run.poll() is None, f"the run ended (status {run.returncode}) before round {server_round}"
        assert time.monotonic() < deadline, f"round {server_round} did not finish within {timeout} s"
        time.sleep(0.5)


def _state_rounds(workdir: Path, node: int) -> list[int]:
    folders = list((workdir / f"state_{node}").glob("run-*/partition-*"))
    return sorted(n for folder in folders for n in round_files(folder))


def test_a_deployment_survives_a_frozen_node_a_restarted_node_and_a_restarted_superlink(tmp_path, data_root):
    # The deadline is far above a round's time on a loaded 2-core machine (a round of this micro
    # model took up to 82 s beside the other tests): only the frozen node may miss it.
    fed = LocalFederation(tmp_path / "fed", 2, data_root)
    run_dir = tmp_path / "run"
    overrides = [
        *MICRO_MODEL, *SHORT_RUN, "num_rounds=4", "num_clients=2", "strategy=quant",
        "strategy.error_feedback=true", "client_state=disk", "round_timeout_s=150", "eval.every=4",
        f"run_dir={run_dir}",
    ]  # fmt: skip
    try:
        fed.start_superlink()
        fed.start_gateway()
        fed.register_supernodes()
        fed.start_supernode(1)
        fed.start_supernode(2)
        run = fed.submit(overrides)
        _wait_for_round(run_dir, 1, run)
        fed.signal("supernode_2", signal.SIGSTOP)  # frozen: its round-2 reply comes too late or never
        _wait_for_round(run_dir, 2, run)
        assert _state_rounds(fed.workdir, 2) == [1]  # what it trained in round 1, on its disk
        fed.kill("supernode_2")
        fed.start_supernode(2)  # rejoins under its key, with the state on its disk
        _wait_for_round(run_dir, 3, run)
        time.sleep(3)  # into round 4
        fed.kill("superlink")  # with its ServerApp
        run.wait(timeout=120)
        assert 4 not in [r["round"] for r in _rows(run_dir)]
        fed.start_superlink()  # its database: the run, the registered SuperNodes
        # The SuperNodes finish the dead run's round 4 (a ClientApp may need the SuperLink for that;
        # its reply is then refused). On a loaded machine that plus the resumed round 4 took over
        # the deadline, so the resume waits for it.
        fed.wait_for_clientapps()
        resumed = fed.submit([f"resume={run_dir}"])
        assert resumed.wait(timeout=600) == 0, (fed.logs / "run.log").read_text()[-3000:]
    finally:
        fed.stop_all()
        leftovers = processes_mentioning(str(fed.workdir))
    assert not leftovers, "a Flower process outlived the test"
    rows = _rows(run_dir)
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["num_aggregated"] == 2 and rows[3]["num_aggregated"] == 2, f"{rows}\n{fed.log_tails()}"
    assert rows[1]["num_aggregated"] == 1 and rows[1]["num_sampled"] == 2  # the frozen node left out
    assert "eval_loss" in rows[3]
    assert load_checkpoint(run_dir)[0].round == 4 and (run_dir / "model" / "model_index.json").is_file()
    assert 4 in _state_rounds(fed.workdir, 1) and 4 in _state_rounds(fed.workdir, 2)
