"""Compose the run's config with Hydra and check it before any training starts."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

import conf
from models.data import IMAGE_FOLDER, SUPPORTED_DATASETS
from models.latent import AUTOENCODERS
from models.parts import PRESETS, SIDES
from strategies.codec import GRANULARITIES, MAX_BITS, MIN_BITS
from strategies.fedddpm import AUX_ALLOCATIONS, SIGNALS
from strategies.privacy import DP_STRATEGIES
from strategies.secagg import SECAGG_STRATEGIES


def group_options(group: str) -> tuple[str, ...]:
    """The choices of a config group: the YAML files in ``conf/<group>/``."""
    return tuple(sorted(p.stem for p in (Path(conf.__file__).parent / group).glob("*.yaml")))


# Image size and channels of the datasets that are used as stored.
NATIVE_GEOMETRY = {"fashion_mnist": (28, 1), "cifar10": (32, 3)}


class ConfigError(ValueError):
    """One or more config values are out of range; the message names each key."""


def compose_config(overrides: Sequence[str] | str = ()) -> DictConfig:
    """``conf/config.yaml`` with Hydra overrides (a list, or one space-separated string).

    Hydra itself rejects unknown keys and unknown group choices, naming them.
    """
    if isinstance(overrides, str):
        overrides = shlex.split(overrides)
    if GlobalHydra.instance().is_initialized():  # e.g. inside a @hydra.main app
        return compose("config", overrides=list(overrides))
    with initialize_config_module(config_module="conf", version_base=None):
        return compose("config", overrides=list(overrides))


def _check(errors: list[str], ok: bool, key: str, value: object, allowed: str) -> None:
    if not ok:
        errors.append(f"{key}={value!r} is not allowed: {allowed}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_config(cfg: DictConfig) -> None:
    """Raise ``ConfigError`` listing every out-of-range value and what is allowed."""
    e: list[str] = []
    _check_run(e, cfg)
    _check_dataset(e, cfg.dataset)
    _check_partition(e, cfg.partition)
    _check_strategy(e, cfg)
    _check_eval(e, cfg)
    _check_privacy(e, cfg)
    _check_tracking(e, cfg.get("tracking"))
    _check_scheduler(e, cfg.scheduler)
    _check_model(e, cfg)
    if e:
        raise ConfigError("invalid config:\n  " + "\n  ".join(e))


def _check_run(e: list[str], cfg: DictConfig) -> None:
    """The top-level keys: rounds, clients, local training, timeouts, client evaluation."""
    for key in ("num_rounds", "num_clients", "batch_size"):
        _check(e, _is_int(cfg[key]) and cfg[key] >= 1, key, cfg[key], "an integer >= 1")
    if cfg.min_clients is not None:
        ok = _is_int(cfg.min_clients) and _is_int(cfg.num_clients) and 1 <= cfg.min_clients <= cfg.num_clients
        _check(e, ok, "min_clients", cfg.min_clients, "null or an integer in 1..num_clients")
    steps, epochs = cfg.local_steps, cfg.local_epochs
    if epochs is None:
        _check(e, _is_int(steps) and steps >= 1, "local_steps", steps, "an integer >= 1")
    else:
        _check(e, _is_int(epochs) and epochs >= 1, "local_epochs", epochs, "null or an integer >= 1")
    _check(e, _is_number(cfg.lr) and cfg.lr > 0, "lr", cfg.lr, "a number > 0")
    if "lr" in cfg.model:  # the model group's rate, which lr follows unless set
        _check(e, _is_number(cfg.model.lr) and cfg.model.lr > 0, "model.lr", cfg.model.lr, "a number > 0")
    for key in ("weight_decay", "max_grad_norm"):
        _check(e, _is_number(cfg[key]) and cfg[key] >= 0, key, cfg[key], "a number >= 0")
    _check(e, _is_int(cfg.seed) and cfg.seed >= 0, "seed", cfg.seed, "an integer >= 0")
    _check(e, cfg.device in ("auto", "cpu", "cuda"), "device", cfg.device, "auto | cpu | cuda")
    for key in ("round_timeout_s", "node_wait_timeout_s"):
        _check(e, _is_number(cfg[key]) and cfg[key] > 0, key, cfg[key], "a number > 0")
    frac = cfg.client_eval_fraction
    _check(e, _is_number(frac) and 0 < frac < 1, "client_eval_fraction", frac, "a number in (0, 1)")
    _check(
        e,
        _is_int(cfg.client_eval_max_examples) and cfg.client_eval_max_examples >= 1,
        "client_eval_max_examples",
        cfg.client_eval_max_examples,
        "an integer >= 1",
    )
    _check(
        e,
        _is_int(cfg.checkpoint_every) and cfg.checkpoint_every >= 0,
        "checkpoint_every",
        cfg.checkpoint_every,
        "an integer >= 0 (0: no checkpoints)",
    )


def _check_dataset(e: list[str], ds: DictConfig) -> None:
    """The dataset's name, geometry and download mode."""
    _check(e, ds.name in SUPPORTED_DATASETS, "dataset.name", ds.name, " | ".join(SUPPORTED_DATASETS))
    native = NATIVE_GEOMETRY.get(ds.name)
    if native:  # these datasets are not resized: the model must match their images
        _check(
            e, ds.image_size == native[0], "dataset.image_size", ds.image_size, f"{native[0]} for {ds.name}"
        )
        _check(e, ds.channels == native[1], "dataset.channels", ds.channels, f"{native[1]} for {ds.name}")
    for key in ("image_size", "channels"):
        _check(e, _is_int(ds[key]) and ds[key] >= 1, f"dataset.{key}", ds[key], "an integer >= 1")
    _check(e, ds.download in (True, False, "auto"), "dataset.download", ds.download, "auto | true | false")
    if ds.name == IMAGE_FOLDER:
        _check(e, ds.channels in (1, 3), "dataset.channels", ds.channels, "1 or 3 for image_folder")
        _check(
            e,
            ds.download is not True,
            "dataset.download",
            ds.download,
            "false or auto for image_folder (nothing to download)",
        )


def _check_partition(e: list[str], part: DictConfig) -> None:
    """The partitioner and its settings."""
    schemes = group_options("partition")
    _check(e, part.name in schemes, "partition.name", part.name, " | ".join(schemes))
    if part.name == "dirichlet":
        _check(e, _is_number(part.alpha) and part.alpha > 0, "partition.alpha", part.alpha, "a number > 0")
        _check(
            e,
            _is_int(part.min_partition_size) and part.min_partition_size >= 0,
            "partition.min_partition_size",
            part.min_partition_size,
            "an integer >= 0",
        )
    if part.name == "pathological":
        _check(
            e,
            _is_int(part.classes_per_client) and part.classes_per_client >= 1,
            "partition.classes_per_client",
            part.classes_per_client,
            "an integer >= 1",
        )
        modes = ("random", "deterministic", "first-deterministic")
        _check(
            e,
            part.class_assignment_mode in modes,
            "partition.class_assignment_mode",
            part.class_assignment_mode,
            " | ".join(modes),
        )


def _check_strategy(e: list[str], cfg: DictConfig) -> None:
    """The strategy's name and its own settings."""
    st = cfg.strategy
    strategies = group_options("strategy")
    _check(e, st.name in strategies, "strategy.name", st.name, " | ".join(strategies))
    if st.name == "prox":
        _check(e, _is_number(st.mu) and st.mu >= 0, "strategy.mu", st.mu, "a number >= 0")
    if st.name in ("quant", "partial"):
        _check(
            e,
            _is_int(st.bits) and MIN_BITS <= st.bits <= MAX_BITS,
            "strategy.bits",
            st.bits,
            f"an integer in {MIN_BITS}..{MAX_BITS}",
        )
        _check(
            e,
            st.granularity in GRANULARITIES,
            "strategy.granularity",
            st.granularity,
            " | ".join(GRANULARITIES),
        )
        flags = ("stochastic_rounding", "error_feedback") + (
            ("quantize_downlink",) if st.name == "quant" else ("quantize",)
        )
        for key in flags:
            _check(e, isinstance(st[key], bool), f"strategy.{key}", st[key], "true | false")
    if st.name == "partial":
        _check_partial(e, st, len(cfg.model.unet.block_out_channels))
    if st.name in ("fedddpm", "fedddpm_plus"):
        _check_fedddpm(e, st, cfg)


def _check_eval(e: list[str], cfg: DictConfig) -> None:
    """Evaluation (grids, FID) and the server's EMA."""
    ev = cfg.eval
    for key in ("every", "grid_size", "batch_size"):
        _check(e, _is_int(ev[key]) and ev[key] >= 1, f"eval.{key}", ev[key], "an integer >= 1")
    _check(
        e,
        _is_int(ev.num_samples) and (ev.num_samples == 0 or ev.num_samples >= 2),
        "eval.num_samples",
        ev.num_samples,
        "0 (no FID) or an integer >= 2",
    )
    if ev.fid_weights is not None:
        _check(
            e,
            Path(str(ev.fid_weights)).expanduser().is_file(),
            "eval.fid_weights",
            ev.fid_weights,
            "null or the path of an existing TorchScript file",
        )
    _check(e, isinstance(cfg.ema.enabled, bool), "ema.enabled", cfg.ema.enabled, "true | false")
    _check(
        e,
        _is_number(cfg.ema.decay) and 0 <= cfg.ema.decay < 1,
        "ema.decay",
        cfg.ema.decay,
        "a number in [0, 1)",
    )
    _check(
        e,
        ev.ddim_steps is None or (_is_int(ev.ddim_steps) and ev.ddim_steps >= 1),
        "eval.ddim_steps",
        ev.ddim_steps,
        "null (full DDPM) or an integer >= 1",
    )
    _check(e, _is_int(ev.seed) and ev.seed >= 0, "eval.seed", ev.seed, "an integer >= 0")


def _check_model(e: list[str], cfg: DictConfig) -> None:
    """The UNet, and for latent diffusion its autoencoder (the UNet's size then comes from it)."""
    autoencoder = cfg.model.get("autoencoder")
    if autoencoder is not None:
        _check(
            e,
            autoencoder.get("path") not in (None, ""),
            "model.autoencoder.path",
            autoencoder.get("path"),
            "the diffusers folder (or, online, hub id) of the frozen autoencoder",
        )
        _check(
            e,
            autoencoder.get("kind") in AUTOENCODERS,
            "model.autoencoder.kind",
            autoencoder.get("kind"),
            " | ".join(AUTOENCODERS),
        )
        factor = autoencoder.get("scaling_factor")
        _check(
            e,
            factor is None or (_is_number(factor) and factor > 0),
            "model.autoencoder.scaling_factor",
            factor,
            "null (the autoencoder's own) or a number > 0",
        )
    _check_unet(e, cfg.model.unet, None if autoencoder is not None else cfg.dataset.image_size)


# diffusers' DDPMScheduler beta schedules, and the UNet2DModel blocks that need no conditioning.
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "laplace", "sigmoid")
DOWN_BLOCKS = (
    "DownBlock2D",
    "AttnDownBlock2D",
    "ResnetDownsampleBlock2D",
    "SkipDownBlock2D",
    "AttnSkipDownBlock2D",
)
UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D", "SkipUpBlock2D", "AttnSkipUpBlock2D")


def _check_privacy(e: list[str], cfg: DictConfig) -> None:
    """Central DP or SecAgg+: their settings, and only with strategies whose replies are full weights."""
    pv = cfg.privacy
    modes = group_options("privacy")
    _check(e, pv.name in modes, "privacy.name", pv.name, " | ".join(modes))
    if pv.name in ("dp_server", "dp_client"):
        _check(
            e,
            cfg.strategy.name in DP_STRATEGIES,
            "privacy",
            pv.name,
            f"with strategy {' | '.join(DP_STRATEGIES)} only (strategy={cfg.strategy.name} sends updates, int8 codes, "
            "parts or local models that fixed clipping of full weights does not apply to)",
        )
        _check(
            e,
            _is_number(pv.clipping_norm) and pv.clipping_norm > 0,
            "privacy.clipping_norm",
            pv.clipping_norm,
            "a number > 0",
        )
        _check(
            e,
            _is_number(pv.noise_multiplier) and pv.noise_multiplier >= 0,
            "privacy.noise_multiplier",
            pv.noise_multiplier,
            "a number >= 0",
        )
    if pv.name == "secagg":
        _check_secagg(e, cfg)


def _check_secagg(e: list[str], cfg: DictConfig) -> None:
    """SecAgg+: Flower's protocol settings, at least 2 clients, and strategies that send full-model updates."""
    pv = cfg.privacy
    _check(
        e,
        cfg.strategy.name in SECAGG_STRATEGIES,
        "privacy",
        pv.name,
        f"with strategy {' | '.join(SECAGG_STRATEGIES)} only (strategy={cfg.strategy.name} sends int8 codes "
        "with per-client scales, parts that differ between clients, or local models that the masked sum cannot carry)",
    )
    _check(
        e,
        _is_int(cfg.num_clients) and cfg.num_clients >= 2,
        "num_clients",
        cfg.num_clients,
        "at least 2 with privacy=secagg",
    )
    if cfg.get("min_clients") is not None:
        _check(
            e,
            _is_int(cfg.min_clients) and cfg.min_clients >= 2,
            "min_clients",
            cfg.min_clients,
            "at least 2 with privacy=secagg",
        )
    shares, threshold = pv.num_shares, pv.reconstruction_threshold
    # Counts must fit the nodes of a round (at least min_clients); Flower's clients split a
    # secret into exactly num_shares parts, one per neighbour, so an even count breaks it.
    nodes = cfg.get("min_clients") or cfg.num_clients
    nodes = nodes if _is_int(nodes) else 0
    _check(
        e,
        (isinstance(shares, float) and 0 < shares <= 1)
        or (_is_int(shares) and shares >= 3 and shares % 2 == 1 and shares <= nodes),
        "privacy.num_shares",
        shares,
        f"a fraction in (0, 1] or an odd integer in 3..{nodes} (the nodes of a round)",
    )
    ok = (isinstance(threshold, float) and 0 < threshold <= 1) or (
        _is_int(threshold) and 2 <= threshold < nodes
    )
    if ok and _is_int(shares) and _is_int(threshold):
        ok = threshold < shares
    _check(
        e,
        ok,
        "privacy.reconstruction_threshold",
        threshold,
        f"a fraction in (0, 1] or an integer in 2..{nodes - 1} (below privacy.num_shares when that is an integer)",
    )
    _check(
        e,
        _is_number(pv.clipping_range) and pv.clipping_range > 0,
        "privacy.clipping_range",
        pv.clipping_range,
        "a number > 0",
    )
    _check(
        e,
        _is_number(pv.max_weight) and pv.max_weight >= 1,
        "privacy.max_weight",
        pv.max_weight,
        "a number >= 1",
    )


def _check_tracking(e: list[str], tracking: DictConfig | None) -> None:
    """Where metrics and grids go besides the run folder (a config without the group: nowhere else)."""
    if tracking is None:
        return
    sinks = group_options("tracking")
    _check(e, tracking.get("name") in sinks, "tracking.name", tracking.get("name"), " | ".join(sinks))
    if tracking.get("name") == "wandb":
        modes = ("online", "offline", "disabled")
        _check(e, tracking.get("mode") in modes, "tracking.mode", tracking.get("mode"), " | ".join(modes))


def _check_scheduler(e: list[str], sc: DictConfig) -> None:
    """The DDPM noise schedule: steps, schedule name, 0 < beta_start < beta_end < 1."""
    _check(
        e,
        _is_int(sc.num_train_timesteps) and sc.num_train_timesteps >= 2,
        "scheduler.num_train_timesteps",
        sc.num_train_timesteps,
        "an integer >= 2",
    )
    _check(
        e,
        sc.beta_schedule in BETA_SCHEDULES,
        "scheduler.beta_schedule",
        sc.beta_schedule,
        " | ".join(BETA_SCHEDULES),
    )
    ok = _is_number(sc.beta_start) and _is_number(sc.beta_end) and 0 < sc.beta_start < sc.beta_end < 1
    _check(e, ok, "scheduler.beta_start", (sc.beta_start, sc.beta_end), "0 < beta_start < beta_end < 1")


def _check_unet(e: list[str], unet: DictConfig, image_size: object) -> None:
    """``UNet2DModel`` arguments: one block type per level, channels that fit the group norm and the image size."""
    channels = unet.get("block_out_channels")
    ok = (
        channels is not None
        and not isinstance(channels, str)
        and len(channels) >= 1
        and all(_is_int(c) and c >= 1 for c in channels)
    )
    _check(e, ok, "model.unet.block_out_channels", channels, "a non-empty list of integers >= 1")
    if not ok:
        return
    for key, allowed in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
        types = unet.get(key)
        good = (
            types is not None
            and not isinstance(types, str)
            and len(types) == len(channels)
            and all(t in allowed for t in types)
        )
        _check(
            e,
            good,
            f"model.unet.{key}",
            types,
            f"{len(channels)} entries (one per level) from {' | '.join(allowed)}",
        )
    groups = unet.get("norm_num_groups", 32)
    _check(
        e,
        _is_int(groups) and groups >= 1 and all(c % groups == 0 for c in channels),
        "model.unet.norm_num_groups",
        groups,
        "an integer >= 1 that divides every block_out_channels entry",
    )
    _check(
        e,
        _is_int(unet.get("layers_per_block", 2)) and unet.get("layers_per_block", 2) >= 1,
        "model.unet.layers_per_block",
        unet.get("layers_per_block"),
        "an integer >= 1",
    )
    head = unet.get("attention_head_dim")
    _check(
        e,
        head is None or (_is_int(head) and head >= 1),
        "model.unet.attention_head_dim",
        head,
        "null or an integer >= 1",
    )
    dropout = unet.get("dropout", 0.0)
    _check(e, _is_number(dropout) and 0 <= dropout < 1, "model.unet.dropout", dropout, "a number in [0, 1)")
    factor = 2 ** (len(channels) - 1)
    if _is_int(image_size) and image_size % factor:
        _check(
            e,
            False,
            "model.unet.block_out_channels",
            list(channels),
            f"fewer levels: {len(channels)} levels downsample {factor}x, which does not divide image size {image_size}",
        )


def _check_partial(e: list[str], st: DictConfig, num_levels: int) -> None:
    """The partial strategy's preset, shared parts (``models.parts`` names) and split."""
    presets = (*PRESETS, "custom")
    _check(e, st.preset in presets, "strategy.preset", st.preset, " | ".join(presets))
    parts = [part for side in SIDES.values() for part in side]
    parts += [f"{side}_blocks.{i}" for side in ("down", "up") for i in range(num_levels)]
    if st.preset == "custom":
        shared = st.shared
        ok = (
            shared is not None
            and not isinstance(shared, str)
            and len(shared) > 0
            and all(p in parts for p in shared)
        )
        _check(e, ok, "strategy.shared", shared, f"a non-empty list of UNet parts from {parts}")
    else:
        _check(e, st.shared is None, "strategy.shared", st.shared, "null unless strategy.preset=custom")
    _check(
        e,
        _is_int(st.split_ways) and st.split_ways >= 2,
        "strategy.split_ways",
        st.split_ways,
        "an integer >= 2",
    )


def _check_fedddpm(e: list[str], st: DictConfig, cfg: DictConfig) -> None:
    """FedDDPM's pretraining, auxiliary data and calibration; FedDDPM+'s stall detection."""
    for key in ("pretrain_steps", "aux_samples", "calibration_steps", "calibration_batch_size"):
        _check(e, _is_int(st[key]) and st[key] >= 1, f"strategy.{key}", st[key], "an integer >= 1")
    _check(
        e,
        st.aux_allocation in AUX_ALLOCATIONS,
        "strategy.aux_allocation",
        st.aux_allocation,
        " | ".join(AUX_ALLOCATIONS),
    )
    _check(
        e,
        st.aux_ddim_steps is None or (_is_int(st.aux_ddim_steps) and st.aux_ddim_steps >= 1),
        "strategy.aux_ddim_steps",
        st.aux_ddim_steps,
        "null (full DDPM) or an integer >= 1",
    )
    _check(
        e,
        _is_number(st.calibration_lr) and st.calibration_lr > 0,
        "strategy.calibration_lr",
        st.calibration_lr,
        "a number > 0",
    )
    if _is_int(st.aux_samples) and _is_int(cfg.num_clients):
        _check(
            e,
            st.aux_samples >= cfg.num_clients,
            "strategy.aux_samples",
            st.aux_samples,
            f">= num_clients ({cfg.num_clients})",
        )
    if st.name == "fedddpm_plus":
        _check(e, st.signal in SIGNALS, "strategy.signal", st.signal, " | ".join(SIGNALS))
        if st.signal == "fid":
            _check(
                e,
                cfg.eval.num_samples > 0,
                "strategy.signal",
                st.signal,
                "fid only with eval.num_samples > 0",
            )
        _check(e, _is_int(st.window) and st.window >= 1, "strategy.window", st.window, "an integer >= 1")
        _check(
            e,
            _is_number(st.threshold) and st.threshold >= 0,
            "strategy.threshold",
            st.threshold,
            "a number >= 0",
        )


def resumed_config(run_dir: str | Path) -> DictConfig:
    """The saved config of the run folder ``run_dir``, set to resume there."""
    run_dir = Path(run_dir).expanduser().resolve()
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise FileNotFoundError(f"resume={run_dir}: no config.yaml there; is it a FedDM run folder?")
    cfg = OmegaConf.load(saved)
    cfg.resume = str(run_dir)
    return cfg


def local_path_or_id(value: str) -> str:
    """``value`` as an absolute path if it names a local file or folder, else unchanged (a hub id)."""
    path = Path(str(value)).expanduser()
    return str(path.resolve()) if path.exists() else str(value)


def resolve_paths(cfg: DictConfig) -> DictConfig:
    """Make ``dataset.root`` absolute against the current directory.

    Also ``eval.fid_cache``, ``eval.fid_weights`` and a local
    ``model.autoencoder.path``. The ServerApp may run in
    another directory than the one the user typed the command in (a background
    SuperLink keeps its own), and clients in simulation share the server's view,
    so they get absolute paths.
    """
    cfg = cfg.copy()
    cfg.dataset.root = str(Path(cfg.dataset.root).expanduser().resolve())
    cfg.eval.fid_cache = str(Path(cfg.eval.fid_cache).expanduser().resolve())
    if cfg.model.get("autoencoder") is not None and cfg.model.autoencoder.get("path"):
        cfg.model.autoencoder.path = local_path_or_id(cfg.model.autoencoder.path)
    if cfg.eval.fid_weights:
        cfg.eval.fid_weights = str(Path(cfg.eval.fid_weights).expanduser().resolve())
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML (what the run folder keeps)."""
    return OmegaConf.to_yaml(cfg, resolve=True)
