"""A run killed after round 2 and resumed ends with the same metrics as one that ran through.

The uninterrupted run is in this process and the killed one in another, so the
test also checks that the same seed and config give the same metrics.
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
import torch
from diffusers import UNet2DModel
from safetensors import safe_open

from feddm.simulation import simulate
from server_app.checkpoint import CHECKPOINT_NAME, Checkpoint, save_checkpoint
from server_app.config import compose_config, to_yaml
from tests.conftest import MICRO_MODEL, SHORT_RUN

pytestmark = pytest.mark.slow

OVERRIDES = [*MICRO_MODEL, *SHORT_RUN, "num_rounds=3", "strategy=prox", "ema.decay=0.5"]
COMPARED = ("round", "train_loss", "eval_loss", "uplink_bytes", "downlink_bytes", "num_aggregated")


def _rows(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: r[k] for k in COMPARED} for r in map(json.loads, lines)]


def _checkpoint_round(run_dir: Path) -> int:
    path = run_dir / CHECKPOINT_NAME
    if not path.is_file():
        return 0
    with safe_open(str(path), framework="pt") as file:
        return int(file.metadata()["round"])


def _feddm_run(args: list[str], cwd: Path, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "feddm-run"), *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, so the kill reaches Ray too
        **kwargs,
    )


def test_killed_run_resumes_to_the_same_metrics(tmp_path, data_root):
    through = simulate(compose_config(OVERRIDES), tmp_path / "through")

    killed = tmp_path / "killed"
    process = _feddm_run([*OVERRIDES, f"hydra.run.dir={killed}"], cwd=tmp_path)
    try:
        deadline = time.monotonic() + 300
        while _checkpoint_round(killed) < 2:
            assert process.poll() is None, process.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint of round 2 in time"
            time.sleep(0.2)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    assert not (killed / "model").exists(), "the run finished before it was killed"

    resumed = _feddm_run([f"resume={killed}"], cwd=tmp_path)
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output[-3000:]
    assert "resumes after round 2" in output

    assert _rows(killed) == _rows(through)
    w_through = UNet2DModel.from_pretrained(through / "model" / "unet").state_dict()
    w_resumed = UNet2DModel.from_pretrained(killed / "model" / "unet").state_dict()
    assert all(torch.equal(w_through[n], w_resumed[n]) for n in w_through)


def test_resume_of_a_damaged_checkpoint_fails_clearly(tmp_path, data_root):
    # A run folder as a killed run leaves it: config, a row of metrics, a cut-off checkpoint.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = compose_config([*MICRO_MODEL, *SHORT_RUN])
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    (run_dir / "metrics.jsonl").write_text('{"round": 1}\n')
    save_checkpoint(run_dir, Checkpoint(round=1, global_weights={"w": torch.zeros(3)}))
    checkpoint = run_dir / CHECKPOINT_NAME
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])
    result = subprocess.run(
        [str(Path(sys.executable).parent / "feddm-run"), f"resume={run_dir}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "damaged or incomplete" in result.stdout + result.stderr
    assert "Starting Flower" not in result.stdout + result.stderr  # checked before the simulation
    assert (run_dir / "metrics.jsonl").read_text().count("\n") == 1
