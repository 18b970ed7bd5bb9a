"""The Deployment Engine on 127.0.0.1: a SuperNode killed mid-round, the others finish the round."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from feddm.processes import processes_mentioning
from tests.conftest import MICRO_MODEL, SHORT_RUN
from tests.deployment import finish, launch, metrics_rows, run_folder_of

pytestmark = pytest.mark.slow


def test_a_supernode_killed_during_a_round_leaves_the_others_to_finish(tmp_path, data_root):
    workdir = tmp_path / "deployment"
    # One round; once the dead node's heartbeats stop (about a minute), the
    # SuperLink answers its message with an error reply and the round completes.
    overrides = [
        *MICRO_MODEL,
        *SHORT_RUN,
        "num_rounds=1",
        "min_clients=2",
        "round_timeout_s=150",
        f"output_dir={tmp_path / 'out'}",
    ]
    process = launch(workdir, 3, overrides)
    run_log = workdir / "logs" / "run.log"
    victim_key = str(workdir / "credentials" / "keys" / "supernode_3")
    try:
        deadline = time.monotonic() + 300
        while not (run_log.is_file() and "configure_train" in run_log.read_text()):
            assert process.poll() is None, process.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "round 1 did not start"
            time.sleep(0.2)
        (victim,) = [
            p
            for p in processes_mentioning(victim_key)
            if b"flower-supernode" in Path(f"/proc/{p}/cmdline").read_bytes()
        ]
        os.killpg(os.getpgid(victim), signal.SIGKILL)
    except BaseException:
        os.killpg(process.pid, signal.SIGINT)
        raise
    output = finish(process, workdir, timeout=600)
    assert process.returncode == 0, output[-3000:]
    rows = metrics_rows(run_folder_of(output))
    assert [r["round"] for r in rows] == [1]
    assert rows[0]["num_sampled"] == 3 and rows[0]["num_aggregated"] == 2
