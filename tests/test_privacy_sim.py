"""Central DP in real 2-client simulations: the global model moves at most clipping_norm per round."""

from __future__ import annotations

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
