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
    # each model size with a dataset its levels fit (celeba's 5 levels need 64 px)
    fits = {
        "tiny": "fashion_mnist",
        "fashion_mnist": "fashion_mnist",
        "cifar10": "cifar10",
        "celeba": "celeba",
        "ldm": "image_folder",
    }
    assert set(fits) == set(group_options("model"))
    for group in ("dataset", "partition", "strategy", "experiment", "tracking"):
        for option in group_options(group):
            validate_config(compose_config([f"{group}={option}"]))
    for model, dataset in fits.items():
        extra = ["model.autoencoder.path=some/vae"] if model == "ldm" else []
        validate_config(compose_config([f"model={model}", f"dataset={dataset}", *extra]))
    with pytest.raises(ConfigError, match="does not divide image size 28"):
        validate_config(compose_config(["model=celeba"]))


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
        (["strategy.topk=0.01"], "strategy.topk"),  # top-k sparsifies updates: needs strategy.quantize=true
        (["strategy.quantize=true", "strategy.topk=1"], "strategy.topk"),
        (
            ["strategy.quantize=true", "strategy.topk=0.01", "strategy.topk_values=int4"],
            "strategy.topk_values",
        ),
    ],
)
def test_partial_strategy_settings_are_checked(overrides, key):
    cfg = compose_config(["strategy=partial", *overrides])
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    assert f"{key}=" in str(err.value) and "allowed" in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["strategy.topk=1.0"], "strategy.topk"),
        (["strategy.topk=-0.01"], "strategy.topk"),
        (["strategy.topk=many"], "strategy.topk"),
        (["strategy.topk=0.01", "strategy.topk_values=float16"], "strategy.topk_values"),
    ],
)
def test_quant_topk_settings_are_checked(overrides, key):
    with pytest.raises(ConfigError) as err:
        validate_config(compose_config(["strategy=quant", *overrides]))
    assert f"{key}=" in str(err.value) and "allowed" in str(err.value)


def test_topk_composes_with_quant_and_with_quantized_partial():
    validate_config(compose_config(["strategy=quant", "strategy.topk=0.01", "strategy.topk_values=float32"]))
    validate_config(
        compose_config(
            ["strategy=partial", "strategy.preset=usplit", "strategy.quantize=true", "strategy.topk=0.1"]
        )
    )


def test_partial_custom_parts_compose():
    validate_config(
        compose_config(
            ["strategy=partial", "strategy.preset=custom", "strategy.shared=[mid_block,up_blocks.1,head]"]
        )
    )


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


# Every key of the default config with a bad value, and the key the error names.
# Paths (dataset.root, eval.fid_cache, output_dir, run_dir, resume) and
# superlink accept any string; a wrong one is caught where it is used (missing
# data, checkpoint or connection: tests/test_strategies_sim.py, test_resume.py).
EVERY_KEY = [
    ("dataset.name=imagenet", "dataset.name"),
    ("dataset.download=maybe", "dataset.download"),
    ("dataset.image_size=0", "dataset.image_size"),
    ("dataset.channels=0", "dataset.channels"),
    ("model.unet.block_out_channels=[]", "model.unet.block_out_channels"),
    ("model.unet.block_out_channels=[32,64,64]", "model.unet.down_block_types"),
    ("model.unet.down_block_types=[DownBlock2D,CrossAttnDownBlock2D]", "model.unet.down_block_types"),
    ("model.unet.up_block_types=[UpBlock2D]", "model.unet.up_block_types"),
    ("model.unet.layers_per_block=0", "model.unet.layers_per_block"),
    ("model.unet.norm_num_groups=7", "model.unet.norm_num_groups"),
    ("model.unet.attention_head_dim=0", "model.unet.attention_head_dim"),
    ("model.unet.dropout=1.5", "model.unet.dropout"),
    ("strategy.name=fedsgd", "strategy.name"),
    ("strategy.downlink=int4_delta", "strategy.downlink"),
    ("partition.name=shards", "partition.name"),
    ("num_rounds=-1", "num_rounds"),
    ("num_clients=0", "num_clients"),
    ("min_clients=5", "min_clients"),
    ("clients_per_round=0", "clients_per_round"),
    ("eval_clients_per_round=3", "eval_clients_per_round"),
    ("over_select=-0.5", "over_select"),
    ("min_replies=0", "min_replies"),
    ("local_steps=-3", "local_steps"),
    ("local_epochs=0", "local_epochs"),
    ("lr=0", "lr"),
    ("model.lr=-1", "model.lr"),
    ("weight_decay=-1", "weight_decay"),
    ("batch_size=0", "batch_size"),
    ("max_grad_norm=-1", "max_grad_norm"),
    ("seed=-1", "seed"),
    ("device=tpu", "device"),
    ("precision=fp8", "precision"),
    ("compile=maybe", "compile"),
    ("memory_format=sideways", "memory_format"),
    ("dataloader_workers=-1", "dataloader_workers"),
    ("round_timeout_s=0", "round_timeout_s"),
    ("client_state=ssd", "client_state"),
    ("node_wait_timeout_s=0", "node_wait_timeout_s"),
    ("reply_poll_s=0", "reply_poll_s"),
    ("client_eval_fraction=0", "client_eval_fraction"),
    ("client_eval_max_examples=0", "client_eval_max_examples"),
    ("weighting=equal", "weighting"),
    ("max_num_examples=0", "max_num_examples"),
    ("max_update_norm_ratio=1", "max_update_norm_ratio"),
    ("scheduler.num_train_timesteps=1", "scheduler.num_train_timesteps"),
    ("scheduler.beta_schedule=cosine", "scheduler.beta_schedule"),
    ("scheduler.beta_start=0.5", "scheduler.beta_start"),
    ("scheduler.beta_end=2", "scheduler.beta_start"),
    ("eval.every=0", "eval.every"),
    ("eval.grid_size=0", "eval.grid_size"),
    ("eval.num_samples=1", "eval.num_samples"),
    ("eval.ddim_steps=0", "eval.ddim_steps"),
    ("eval.batch_size=0", "eval.batch_size"),
    ("eval.fid_weights=/no/such/inception.pt", "eval.fid_weights"),
    ("eval.seed=-2", "eval.seed"),
    ("ema.enabled=sometimes", "ema.enabled"),
    ("ema.decay=1.0", "ema.decay"),
    ("checkpoint_every=-1", "checkpoint_every"),
    ("simulation.client_resources.num_cpus=0", "simulation.client_resources.num_cpus"),
    ("simulation.client_resources.num_gpus=1.5", "simulation.client_resources.num_gpus"),
    ("simulation.ray_address=head", "simulation.ray_address"),
    ("privacy.name=secret", "privacy.name"),
    ("tracking.name=mlflow", "tracking.name"),
    ("adapter.name=qlora", "adapter.name"),
    ("model.pretrained=''", "model.pretrained"),
    ("dataset.classes=[]", "dataset.classes"),
    ("aggregator.name=fedsgd", "aggregator.name"),
]


@pytest.mark.parametrize(("override", "key"), EVERY_KEY, ids=[k for _, k in EVERY_KEY])
def test_every_key_with_a_bad_value_is_named_before_training(override, key):
    try:
        cfg = compose_config([override])
    except (ConfigCompositionException, MissingConfigException) as err:  # Hydra: unknown group option
        assert key in str(err)
        return
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    assert f"{key}=" in str(err.value) and "allowed" in str(err.value)


def test_every_config_key_has_a_bad_value_case():
    from omegaconf import OmegaConf

    def keys(node, prefix=""):
        for k, v in node.items():
            if isinstance(v, dict):
                yield from keys(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}"

    config = OmegaConf.to_container(compose_config(), resolve=False)
    config.pop("hydra", None)
    free = {
        "dataset.root",
        "eval.fid_cache",
        "output_dir",
        "run_dir",
        "client_state_dir",
        "resume",
        "superlink",
        "model.name",
        "scheduler.beta_end",
    }  # beta_end: checked with beta_start
    covered = {o.split("=")[0] for o, _ in EVERY_KEY} | free
    assert set(keys(config)) <= covered, sorted(set(keys(config)) - covered)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["privacy=dp_server", "privacy.clipping_norm=0"], "privacy.clipping_norm"),
        (["privacy=dp_client", "privacy.noise_multiplier=-1"], "privacy.noise_multiplier"),
        (["privacy=dp_server", "privacy.delta=1"], "privacy.delta"),
        (["privacy=dp_client", "privacy.delta=0"], "privacy.delta"),
        (["privacy=dp_server", "privacy.max_epsilon=0"], "privacy.max_epsilon"),
        (["privacy=dp_server", "strategy=quant"], "privacy"),
        (["privacy=dp_client", "strategy=partial"], "privacy"),
        (["privacy=dp_server", "strategy=fedddpm"], "privacy"),
        (["privacy=secagg", "strategy=quant"], "privacy"),
        (["privacy=dp_client", "strategy=quant", "strategy.topk=0.01"], "privacy"),
        (["privacy=secagg", "strategy=partial"], "privacy"),
        (["privacy=secagg", "strategy.downlink=int8_weights"], "privacy"),
        (["privacy=dp_client", "strategy.downlink=int8_delta"], "privacy"),
        (["privacy=secagg", "num_clients=1"], "num_clients"),
        (["privacy=secagg", "min_clients=1"], "min_clients"),
        (["privacy=secagg", "weighting=uniform"], "weighting"),
        (["privacy=secagg", "privacy.num_shares=2"], "privacy.num_shares"),
        (["privacy=secagg", "num_clients=8", "privacy.num_shares=4"], "privacy.num_shares"),  # even
        (["privacy=secagg", "num_clients=4", "privacy.num_shares=5"], "privacy.num_shares"),  # > nodes
        (
            ["privacy=secagg", "num_clients=3", "privacy.reconstruction_threshold=3"],
            "privacy.reconstruction_threshold",
        ),
        (["privacy=secagg", "privacy.num_shares=1.5"], "privacy.num_shares"),
        (["privacy=secagg", "privacy.reconstruction_threshold=0.0"], "privacy.reconstruction_threshold"),
        (
            ["privacy=secagg", "privacy.num_shares=5", "privacy.reconstruction_threshold=5"],
            "privacy.reconstruction_threshold",
        ),
        (["privacy=secagg", "privacy.clipping_range=0"], "privacy.clipping_range"),
        (["privacy=secagg", "privacy.max_weight=0"], "privacy.max_weight"),
    ],
)
def test_privacy_settings_and_combinations_are_checked(overrides, key):
    with pytest.raises(ConfigError) as err:
        validate_config(compose_config(overrides))
    assert f"{key}=" in str(err.value) and "allowed" in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["model=ldm"], "model.autoencoder.path"),
        (["model=ldm", "model.autoencoder.path=vae", "model.autoencoder.kind=gan"], "model.autoencoder.kind"),
        (["dataset=image_folder", "dataset.channels=2"], "dataset.channels"),
        (["dataset=image_folder", "dataset.download=true"], "dataset.download"),
    ],
)
def test_latent_and_image_folder_settings_are_checked(overrides, key):
    with pytest.raises(ConfigError) as err:
        validate_config(compose_config(overrides))
    assert f"{key}=" in str(err.value) and "allowed" in str(err.value)


def test_autoencoder_path_is_made_absolute_when_local_and_kept_as_a_hub_id(tmp_path, monkeypatch):
    from server_app.config import resolve_paths

    (tmp_path / "vae").mkdir()
    monkeypatch.chdir(tmp_path)
    local = resolve_paths(compose_config(["model=ldm", "model.autoencoder.path=vae"]))
    assert local.model.autoencoder.path == str(tmp_path / "vae")
    hub = resolve_paths(compose_config(["model=ldm", "model.autoencoder.path=stabilityai/sd-vae-ft-mse"]))
    assert hub.model.autoencoder.path == "stabilityai/sd-vae-ft-mse"


def test_tracking_sinks_and_wandb_mode_are_checked():
    validate_config(compose_config(["tracking=wandb"]))
    with pytest.raises(ConfigError, match="tracking.mode='live' is not allowed: online | offline | disabled"):
        validate_config(compose_config(["tracking=wandb", "tracking.mode=live"]))


def test_a_run_folder_from_before_new_keys_resumes_with_their_defaults(tmp_path):
    from omegaconf import OmegaConf

    from server_app.config import resumed_config, to_yaml

    old = OmegaConf.create(to_yaml(compose_config(["strategy=quant", "num_rounds=7"])))
    for key in ("aggregator", "weighting", "max_num_examples", "max_update_norm_ratio"):
        old.pop(key)
    (tmp_path / "config.yaml").write_text(to_yaml(old))
    cfg = resumed_config(tmp_path)
    assert cfg.strategy.name == "quant" and cfg.num_rounds == 7  # the run's own settings
    assert cfg.aggregator.name == "fedavg" and cfg.weighting == "examples"
    assert cfg.max_update_norm_ratio == compose_config().max_update_norm_ratio
    assert OmegaConf.select(cfg, "resume") == str(tmp_path.resolve())
    validate_config(cfg)
