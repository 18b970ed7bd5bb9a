"""Hydra config: defaults, overrides, and errors that name the bad key before training."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException

from server_app.config import ConfigError, compose_config, group_options, validate_config


def test_default_is_the_small_cpu_run():
    cfg = compose_config()
    validate_config(cfg)
    assert cfg.model.name == "tiny" and cfg.dataset.name == "fashion_mnist"
    assert 2 <= cfg.num_clients <= 4 and cfg.num_rounds <= 5
    assert cfg.strategy.name == "vanilla" and cfg.partition.name == "iid"


def test_overrides_from_a_string_or_a_list():
    a = compose_config("partition=dirichlet partition.alpha=0.1 num_rounds=7")
    b = compose_config(["partition=dirichlet", "partition.alpha=0.1", "num_rounds=7"])
    assert a == b and a.partition.alpha == 0.1 and a.num_rounds == 7


def test_every_group_option_composes_and_validates():
    for group in ("dataset", "model", "partition", "strategy", "experiment"):
        for option in group_options(group):
            validate_config(compose_config([f"{group}={option}"]))


def test_experiment_presets_set_paper_scale_models():
    cfg = compose_config(["experiment=cifar10_paper", "strategy=quant"])
    assert cfg.model.name == "cifar10" and cfg.dataset.name == "cifar10"
    assert cfg.num_clients == 10 and cfg.strategy.name == "quant"
    assert set(group_options("experiment")) >= {"fashion_mnist_paper", "cifar10_paper", "celeba_paper"}


def test_unknown_key_is_named():
    with pytest.raises(ConfigCompositionException, match="num_roundz"):
        compose_config(["num_roundz=3"])


def test_unknown_group_choice_lists_the_options():
    with pytest.raises(MissingConfigException, match="vanilla"):
        compose_config(["strategy=bogus"])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("partition.alpha=0", "partition.alpha"),
        ("partition.alpha=-1", "partition.alpha"),
        ("local_steps=0", "local_steps"),
        ("local_epochs=0", "local_epochs"),
        ("num_rounds=0", "num_rounds"),
        ("num_clients=0", "num_clients"),
        ("lr=0", "lr"),
        ("batch_size=0", "batch_size"),
        ("device=tpu", "device"),
        ("eval.every=0", "eval.every"),
        ("eval.ddim_steps=0", "eval.ddim_steps"),
        ("client_eval_fraction=1.0", "client_eval_fraction"),
        ("partition.classes_per_client=0", "partition.classes_per_client"),
        ("dataset.name=mnist", "dataset.name"),
    ],
)
def test_out_of_range_values_name_the_key_and_what_is_allowed(override, key):
    group = []
    if override.startswith("partition.alpha"):
        group = ["partition=dirichlet"]
    if override.startswith("partition.classes"):
        group = ["partition=pathological"]
    cfg = compose_config([*group, override])
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    assert f"{key}=" in str(err.value) and "allowed" in str(err.value)


def test_all_errors_are_reported_at_once():
    cfg = compose_config(["lr=-1", "num_rounds=0"])
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    assert "lr=" in str(err.value) and "num_rounds=" in str(err.value)


def test_datasets_used_as_stored_must_keep_their_geometry():
    with pytest.raises(ConfigError, match="dataset.image_size=32"):
        validate_config(compose_config(["dataset.image_size=32"]))
    with pytest.raises(ConfigError, match="dataset.channels=3"):
        validate_config(compose_config(["dataset.channels=3"]))


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["strategy.preset=ulat"], "strategy.preset"),
        (["strategy.preset=custom"], "strategy.shared"),
        (["strategy.preset=custom", "strategy.shared=[up_blocks.7]"], "strategy.shared"),
        (["strategy.preset=custom", "strategy.shared=[decoder]"], "strategy.shared"),
        (["strategy.shared=[up_blocks]"], "strategy.shared"),
        (["strategy.split_ways=1"], "strategy.split_ways"),
        (["strategy.bits=9"], "strategy.bits"),
        (["strategy.quantize=yes"], "strategy.quantize"),
    ],
)
def test_partial_strategy_settings_are_checked(overrides, key):
    cfg = compose_config(["strategy=partial", *overrides])
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    assert f"{key}=" in str(err.value) and "allowed" in str(err.value)


def test_partial_custom_parts_compose():
    validate_config(compose_config(["strategy=partial", "strategy.preset=custom", "strategy.shared=[mid_block,up_blocks.1,head]"]))


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["strategy=fedddpm", "strategy.pretrain_steps=0"], "strategy.pretrain_steps"),
        (["strategy=fedddpm", "strategy.aux_samples=1"], "strategy.aux_samples"),
        (["strategy=fedddpm", "strategy.aux_allocation=random"], "strategy.aux_allocation"),
        (["strategy=fedddpm", "strategy.calibration_lr=0"], "strategy.calibration_lr"),
        (["strategy=fedddpm", "strategy.aux_ddim_steps=0"], "strategy.aux_ddim_steps"),
        (["strategy=fedddpm_plus", "strategy.signal=accuracy"], "strategy.signal"),
        (["strategy=fedddpm_plus", "strategy.signal=fid"], "strategy.signal"),
        (["strategy=fedddpm_plus", "strategy.window=0"], "strategy.window"),
        (["strategy=fedddpm_plus", "strategy.threshold=-0.1"], "strategy.threshold"),
    ],
)
def test_fedddpm_settings_are_checked(overrides, key):
    with pytest.raises(ConfigError) as err:
        validate_config(compose_config(overrides))
    assert f"{key}=" in str(err.value) and "allowed" in str(err.value)
