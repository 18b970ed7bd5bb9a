"""Per-model training defaults, the latent scale check and the divergence warning."""

from __future__ import annotations

import pytest
import torch

from models.latent import latent_scale_warning, load_autoencoder
from server_app.config import ConfigError, compose_config, group_options, validate_config
from server_app.divergence import DivergenceWatch, loss_jump
from tests.test_latent import save_tiny_autoencoder


def test_each_model_group_carries_its_learning_rate():
    rates = {name: compose_config([f"model={name}"]).lr for name in group_options("model")}
    assert rates["tiny"] == 1e-3  # the quick start's rate, unchanged
    assert all(rates[name] <= 2e-4 for name in ("fashion_mnist", "cifar10", "celeba", "ldm"))
    assert all(compose_config([f"model={name}"]).model.lr == rate for name, rate in rates.items())


def test_an_explicit_lr_wins_over_the_model_group_and_presets_keep_theirs():
    assert compose_config(["model=ldm", "lr=5e-4"]).lr == 5e-4
    assert compose_config(["lr=3e-3", "model=cifar10"]).lr == 3e-3
    assert compose_config(["experiment=fashion_mnist_paper"]).lr == 2e-4


def test_a_bad_model_lr_is_named():
    with pytest.raises(ConfigError, match="model.lr=0"):
        validate_config(compose_config(["model.lr=0"]))


def test_scaling_factor_is_checked_and_applied(tmp_path):
    base = ["model=ldm", "model.autoencoder.path=some/vae"]
    with pytest.raises(ConfigError, match="model.autoencoder.scaling_factor=-1"):
        validate_config(compose_config([*base, "model.autoencoder.scaling_factor=-1"]))
    validate_config(compose_config([*base, "model.autoencoder.scaling_factor=2.5"]))
    folder = str(save_tiny_autoencoder(tmp_path / "ae"))
    assert load_autoencoder(folder, "kl").config.scaling_factor == pytest.approx(0.18215)
    assert load_autoencoder(folder, "kl", None, 2.5).config.scaling_factor == 2.5


def test_latents_far_from_unit_variance_get_a_warning_with_the_factor_that_fixes_them():
    small = torch.randn(64, 4, 8, 8) * 0.05
    warning = latent_scale_warning(small, 0.18215)
    assert warning is not None and "model.autoencoder.scaling_factor=" in warning
    suggested = float(warning.rsplit("scaling_factor=", 1)[1].split()[0])
    assert suggested == pytest.approx(0.18215 / float(small.std()), rel=1e-3)
    assert latent_scale_warning(torch.randn(64, 4, 8, 8), 0.18215) is None


@pytest.mark.parametrize(
    ("best", "loss", "jumped"),
    [
        (0.2, 0.999, True),
        (0.1, 0.31, True),
        (0.1, 0.29, False),
        (0.3, 0.8, False),
        (0.95, 1.0, False),
        (0.45, 0.95, True),
        (0.2, float("nan"), False),
    ],
)
def test_loss_jump(best, loss, jumped):
    assert loss_jump(best, loss) is jumped


def test_the_watch_warns_once_per_jump_and_names_the_causes():
    watch = DivergenceWatch(1e-3, "ldm", latent=True)
    assert watch.observe({"round": 1, "train_loss": 0.30, "eval_loss": 0.216}) == []
    warnings = watch.observe({"round": 2, "train_loss": 0.999, "eval_loss": 1.033})
    assert len(warnings) == 2 and all(
        "round 2" in w and "model=ldm" in w and "lr=0.001" in w for w in warnings
    )
    assert "scaling_factor" in warnings[0]
    # the best loss is kept: a third round still at 1.0 is still far above it
    assert len(watch.observe({"round": 3, "train_loss": 0.98})) == 1
    assert DivergenceWatch(1e-3, "tiny").observe({"round": 1, "train_loss": 0.1}) == []


def test_clients_warn_when_their_encoded_latents_are_far_from_unit_variance(tmp_path):
    import numpy as np

    from models import LabeledImages
    from models.latent import CachedLatents

    autoencoder = load_autoencoder(str(save_tiny_autoencoder(tmp_path / "ae")), "kl")  # random: std ~0.06
    dataset = LabeledImages(torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8), np.zeros(8))
    with pytest.warns(UserWarning, match="model.autoencoder.scaling_factor="):
        CachedLatents(dataset, autoencoder, np.arange(8))


def test_the_run_loop_logs_the_watchs_warnings_and_keeps_the_metrics(
    tmp_path, flower_task_identity, data_root, monkeypatch, caplog
):
    import json

    from server_app.divergence import DivergenceWatch
    from tests.conftest import MICRO_OVERRIDES
    from tests.test_resume_strategies import _run

    seen = []

    def observe(self, row):
        seen.append(dict(row))
        return [f"round {row['round']}: jumped"] if row["round"] == 2 else []

    monkeypatch.setattr(DivergenceWatch, "observe", observe)
    with caplog.at_level("WARNING"):
        run_dir = _run(compose_config(MICRO_OVERRIDES), tmp_path / "run")
    assert [r["round"] for r in seen] == [1, 2] and "train_loss" in seen[0]
    assert "FedDM round 2: jumped" in caplog.text and "round 1: jumped" not in caplog.text
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in seen]
