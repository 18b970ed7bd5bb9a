"""SecAgg+ in real Ray simulations: the secure mean is the plain mean up to SecAgg+'s
quantization, and a client that fails mid-protocol drops out while the round goes on."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DModel
from omegaconf import OmegaConf

from feddm.simulation import simulate
from models import build_unet
from server_app.config import compose_config
from tests.conftest import MICRO_OVERRIDES
from tests.faulty_client import app as faulty_app

pytestmark = pytest.mark.slow

THREE_CLIENTS = [*MICRO_OVERRIDES, "num_clients=3", "ema.enabled=false", "eval.num_samples=0"]


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _weights(run_dir):
    return UNet2DModel.from_pretrained(run_dir / "model" / "unet").state_dict()


def test_the_secure_mean_is_the_plain_mean_up_to_quantization(tmp_path, data_root):
    cfg = compose_config([*THREE_CLIENTS, "num_rounds=1"])
    plain = simulate(cfg, tmp_path / "plain")
    secure = simulate(compose_config([*THREE_CLIENTS, "num_rounds=1", "privacy=secagg"]), tmp_path / "secure")
    a, b = _weights(plain), _weights(secure)
    torch.manual_seed(cfg.seed)  # the server's initial model
    initial = build_unet(OmegaConf.to_container(cfg.model.unet), image_size=28, channels=1).state_dict()
    update = max((a[k] - initial[k]).abs().max().item() for k in a)
    difference = max((a[k] - b[k]).abs().max().item() for k in a)
    # SecAgg+ quantizes Δ·n/max_weight to 2^22 levels over ±clipping_range: steps of about 2.5e-6 here.
    assert difference < 1e-5 < update / 100
    plain_row, secure_row = _rows(plain)[0], _rows(secure)[0]
    assert secure_row["train_loss"] == pytest.approx(plain_row["train_loss"])
    assert secure_row["num_aggregated"] == 3
    # Masked vectors are int64: about twice the fp32 weights (less their npy headers), plus the keys.
    assert 1.8 * plain_row["uplink_bytes"] < secure_row["uplink_bytes"] < 2.2 * plain_row["uplink_bytes"]


def test_a_client_failing_mid_protocol_drops_out_and_the_round_goes_on(tmp_path, monkeypatch, data_root):
    monkeypatch.setenv("FEDDM_FAULT", "raise")  # the client with partition id 1, from round 2
    monkeypatch.setenv("FEDDM_FAULT_ROUND", "2")
    run_dir = simulate(
        compose_config([*THREE_CLIENTS, "privacy=secagg"]), tmp_path / "run", client_app=faulty_app
    )
    rows = _rows(run_dir)
    assert [r["num_aggregated"] for r in rows] == [3, 2]
    assert all(torch.isfinite(t).all() for t in _weights(run_dir).values())
