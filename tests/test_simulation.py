"""A real Flower simulation: 2 clients, 2 rounds, micro UNet, a few steps."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline
from omegaconf import OmegaConf
from PIL import Image

from feddm.simulation import simulate
from models import build_unet
from server_app.config import compose_config
from tests.conftest import MICRO_OVERRIDES, REPO_ROOT

FID_WEIGHTS = REPO_ROOT.parent / "shared" / "weights" / "pt_inception-2015-12-05.torchscript.pt"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_root):
    cfg = compose_config(
        [
            *MICRO_OVERRIDES,
            "partition=dirichlet",
            "partition.alpha=0.5",
            "eval.num_samples=8",  # FID on 8 images: too few to mean much, enough to run the path
            f"eval.fid_weights={FID_WEIGHTS}",
            f"eval.fid_cache={tmp_path_factory.mktemp('fid')}",
        ]
    )
    run_dir = simulate(cfg, tmp_path_factory.mktemp("run") / "run")
    return cfg, run_dir


def test_run_folder_is_complete(finished_run):
    cfg, run_dir = finished_run
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        for key in (
            "train_loss",
            "eval_loss",
            "wall_time_s",
            "train_time_s",
            "uplink_bytes",
            "downlink_bytes",
            "fid",
        ):
            assert np.isfinite(row[key]), key
        assert row["num_aggregated"] == 2 and row["num_rejected"] == 0
    assert rows[1]["wall_time_s"] > rows[0]["wall_time_s"]
    for n in (1, 2):
        grid = Image.open(run_dir / "samples" / f"round_{n:04d}.png")
        assert grid.size[0] > 28 and grid.size[1] > 28
    saved = OmegaConf.load(run_dir / "config.yaml")
    assert saved.num_rounds == 2 and saved.partition.name == "dirichlet"


def test_bytes_match_the_model_size_both_ways(finished_run):
    _, run_dir = finished_run
    row = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    pipeline = DDPMPipeline.from_pretrained(run_dir / "model")
    fp32_bytes = sum(t.numel() * 4 for t in pipeline.unet.state_dict().values())
    # Two clients each way; npy headers add a little per array.
    assert 2 * fp32_bytes <= row["uplink_bytes"] <= 2 * fp32_bytes * 1.2
    assert row["downlink_bytes"] == row["uplink_bytes"]


def test_global_weights_changed_and_pipeline_samples(finished_run):
    cfg, run_dir = finished_run
    torch.manual_seed(cfg.seed)  # the server builds its initial model after this seed
    initial = build_unet(
        OmegaConf.to_container(cfg.model.unet),
        image_size=cfg.dataset.image_size,
        channels=cfg.dataset.channels,
    )
    pipeline = DDPMPipeline.from_pretrained(run_dir / "model")
    trained = pipeline.unet.state_dict()
    changed = [n for n, t in initial.state_dict().items() if not torch.equal(t, trained[n])]
    assert len(changed) > 0.9 * len(trained)
    # A few small AdamW steps moved the seeded initial weights a little, not wholesale.
    drift = max((initial.state_dict()[n] - trained[n]).abs().max().item() for n in changed)
    assert drift < 0.05
    images = pipeline(batch_size=2, num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 28, 28, 1) and np.isfinite(images).all()


def test_feddm_plot_draws_the_runs(finished_run, tmp_path):
    from feddm.plot import main as plot_main

    _, run_dir = finished_run
    out = tmp_path / "plot.png"
    plot_main([str(run_dir), str(run_dir), "--out", str(out)])
    image = Image.open(out)
    assert image.size[0] > 1000 and image.size[1] > 300


def test_feddm_plot_rejects_a_folder_without_metrics(tmp_path):
    from feddm.plot import main as plot_main

    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot_main([str(tmp_path), "--out", str(tmp_path / "x.png")])


def test_feddm_sample_writes_a_grid_from_the_saved_model(finished_run, tmp_path):
    from feddm.sample import main as sample_main

    _, run_dir = finished_run
    out = tmp_path / "grid.png"
    sample_main([str(run_dir / "model"), "--num", "4", "--out", str(out), "--ddim-steps", "2", "--seed", "3"])
    first = np.asarray(Image.open(out))
    sample_main([str(run_dir / "model"), "--num", "4", "--out", str(out), "--ddim-steps", "2", "--seed", "3"])
    assert first.shape[0] > 2 * 28 and np.array_equal(first, np.asarray(Image.open(out)))
    bf16 = tmp_path / "bf16.png"
    sample_main(
        [str(run_dir / "model"), "--num", "4", "--out", str(bf16), "--ddim-steps", "2", "--seed", "3"]
        + ["--precision", "bf16"]
    )
    assert np.asarray(Image.open(bf16)).shape == first.shape  # the same grid, drawn with bf16 forward passes


def test_checkpoint_is_written_every_round(finished_run):
    from server_app.checkpoint import load_checkpoint

    _, run_dir = finished_run
    checkpoint, _ = load_checkpoint(run_dir)
    assert checkpoint.round == 2 and checkpoint.ema_weights
