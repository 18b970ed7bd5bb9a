"""A local image folder (the layout for datasets without a torchvision download) in a real simulation."""

from __future__ import annotations

import json

import pytest

from feddm.simulation import simulate
from server_app.config import compose_config
from tests.conftest import MICRO_MODEL
from tests.test_data import _image_folder

pytestmark = pytest.mark.slow


def test_two_clients_train_on_an_image_folder(tmp_path):
    _image_folder(tmp_path / "images", [(48, 40)] * 12)
    cfg = compose_config(
        [
            *MICRO_MODEL,
            "dataset=image_folder",
            f"dataset.root={tmp_path / 'images'}",
            "dataset.image_size=16",
            "num_rounds=1",
            "local_steps=2",
            "batch_size=4",
            "eval.grid_size=4",
            "eval.ddim_steps=2",
            "partition=dirichlet",
            "partition.alpha=1.0",
            "partition.min_partition_size=2",
        ]
    )
    run_dir = simulate(cfg, tmp_path / "run")
    (row,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert row["num_aggregated"] == 2 and row["train_loss"] > 0
    assert (run_dir / "samples" / "round_0001.png").is_file()
