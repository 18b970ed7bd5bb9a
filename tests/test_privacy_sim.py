"""Central DP in real 2-client simulations: the global model moves at most clipping_norm per round."""

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

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("mode", ["dp_client", "dp_server"])
def test_one_round_moves_the_model_by_at_most_the_clipping_norm(mode, tmp_path, data_root):
    cfg = compose_config(
        [
            *MICRO_OVERRIDES,
            "num_rounds=1",
            "ema.enabled=false",
            f"privacy={mode}",
            "privacy.clipping_norm=0.05",
            "privacy.noise_multiplier=0",
        ]
    )
    run_dir = simulate(cfg, tmp_path / "run")
    torch.manual_seed(cfg.seed)  # the server's initial model
    initial = build_unet(OmegaConf.to_container(cfg.model.unet), image_size=28, channels=1).state_dict()
    trained = UNet2DModel.from_pretrained(run_dir / "model" / "unet").state_dict()
    step = torch.sqrt(sum(((trained[k] - v) ** 2).sum() for k, v in initial.items()))
    # each client's update is cut to norm 0.05, so their weighted mean is at most that;
    # unclipped, 2 steps of AdamW at lr 1e-3 move this model much further.
    assert 0.01 < step <= 0.05 * (1 + 1e-4)


def test_epsilon_is_recorded_and_max_epsilon_ends_the_run_after_the_last_round_within_it(tmp_path, data_root):
    pytest.importorskip("dp_accounting", reason="the accountant needs the dp extra: pip install 'feddm[dp]'")
    from server_app.checkpoint import load_checkpoint
    from strategies.privacy_budget import PrivacyBudget

    probe = PrivacyBudget(1.0, num_clients=2)
    eps = [probe.record_release() for _ in range(3)]
    cfg = compose_config(
        [
            *MICRO_OVERRIDES,
            "num_rounds=4",
            "checkpoint_every=4",  # the checkpoint of round 2 is the budget stop's own
            "eval.every=4",  # ... and so is its evaluation
            "privacy=dp_server",
            "privacy.clipping_norm=0.01",
            "privacy.noise_multiplier=1.0",
            f"privacy.max_epsilon={(eps[1] + eps[2]) / 2}",  # 2 rounds fit, a third would not
            "weighting=uniform",
            "max_update_norm_ratio=null",
        ]
    )
    run_dir = simulate(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert [r["epsilon"] for r in rows] == pytest.approx(eps[:2])
    # The last round is evaluated like a run's final one (eval.every=4 would skip it).
    assert (run_dir / "samples" / "round_0002.png").is_file()
    assert not (run_dir / "samples" / "round_0001.png").exists()
    checkpoint, _ = load_checkpoint(run_dir)
    assert checkpoint.round == 2 and checkpoint.strategy_state["privacy_releases"] == 2
    assert (run_dir / "model" / "unet").is_dir()
