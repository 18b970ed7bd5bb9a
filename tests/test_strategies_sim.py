"""Each strategy in a real 2-client Flower simulation, and the feddm-run CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel

from feddm.simulation import simulate
from server_app.config import compose_config
from tests.conftest import MICRO_OVERRIDES, SHORT_RUN

pytestmark = pytest.mark.slow


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return UNet2DModel.from_pretrained(run_dir / "model" / "unet").state_dict()


def test_prox_with_mu_zero_reproduces_vanilla_exactly(tmp_path, data_root):
    vanilla = simulate(compose_config(MICRO_OVERRIDES), tmp_path / "vanilla")
    prox = simulate(compose_config([*MICRO_OVERRIDES, "strategy=prox", "strategy.mu=0"]), tmp_path / "prox")
    keys = ("train_loss", "eval_loss", "uplink_bytes", "downlink_bytes")
    assert [{k: r[k] for k in keys} for r in _rows(vanilla)] == [{k: r[k] for k in keys} for r in _rows(prox)]
    a, b = _weights(vanilla), _weights(prox)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_quant_sends_at_most_a_quarter_of_vanillas_uplink_bytes(tmp_path, data_root):
    # The fashion_mnist UNet (6.8M parameters): per-array npy headers are negligible.
    model = ["model=fashion_mnist", "num_rounds=1", "local_steps=1", "batch_size=2"]
    vanilla = simulate(compose_config([*SHORT_RUN, *model]), tmp_path / "vanilla")
    quant = simulate(compose_config([*SHORT_RUN, *model, "strategy=quant"]), tmp_path / "quant")
    up_vanilla = np.mean([r["uplink_bytes"] for r in _rows(vanilla)])
    up_quant = np.mean([r["uplink_bytes"] for r in _rows(quant)])
    assert up_quant <= up_vanilla / 3.9
    assert _rows(quant)[0]["num_aggregated"] == 2
    assert np.isfinite(_rows(quant)[0]["eval_loss"])


def _feddm_run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    executable = Path(sys.executable).parent / "feddm-run"
    return subprocess.run(
        [str(executable), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, HYDRA_FULL_ERROR="1"),
    )


def test_feddm_run_sweeps_strategies_into_one_folder_each(tmp_path, data_root):
    result = _feddm_run(
        [
            "-m",
            "strategy=vanilla,prox,quant",
            "partition=dirichlet",
            "partition.alpha=0.5",
            f"output_dir={tmp_path}",
            *MICRO_OVERRIDES,
            "num_rounds=1",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    runs = sorted((tmp_path / "multirun").glob("*/*_*"))
    assert [r.name.split("_", 1)[1] for r in runs] == ["vanilla", "prox", "quant"]
    for run in runs:
        assert [r["round"] for r in _rows(run)] == [1]
        assert (run / ".hydra" / "config.yaml").is_file()
        assert (run / "model" / "model_index.json").is_file()
        assert (run / "samples" / "round_0001.png").is_file()


def test_feddm_run_fails_before_training_on_bad_values(tmp_path):
    result = _feddm_run(["partition=dirichlet", "partition.alpha=0", "local_steps=0"], cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "partition.alpha=0" in output and "local_steps=0" in output
    assert "Starting Flower" not in output
    assert not list(tmp_path.rglob("metrics.jsonl")) and not list(tmp_path.rglob("model"))


def test_feddm_run_names_a_missing_dataset_path(tmp_path):
    missing = tmp_path / "no-data"
    result = _feddm_run([*MICRO_OVERRIDES, f"dataset.root={missing}", "dataset.download=false"], cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert str(missing) in output and "dataset.download=true" in output
    assert "Starting Flower" not in output  # found before the simulation starts


def test_a_client_sending_a_corrupted_update_is_left_out_every_round(tmp_path, data_root, monkeypatch):
    from tests.faulty_client import app as faulty_client_app

    monkeypatch.setenv("FEDDM_FAULT", "nan-scales")
    cfg = compose_config([*MICRO_OVERRIDES, "strategy=quant", "num_clients=3"])
    run_dir = simulate(cfg, tmp_path / "run", client_app=faulty_client_app)
    rows = _rows(run_dir)
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["num_aggregated"] == 2 and r["num_rejected"] == 1 for r in rows)
    weights = _weights(run_dir)
    assert all(torch.isfinite(t).all() for t in weights.values())
