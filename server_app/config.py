"""Compose the run's config with Hydra and check it before any training starts."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from conf.schema import DOWN_BLOCKS, UP_BLOCKS, is_int, is_number, not_allowed, problems
from conf.schema import group_options as group_options  # the choices of a group (tests, README)
from models.data import IMAGE_FOLDER
from models.parts import SIDES
from strategies import composition_errors
from strategies.privacy_budget import guarantee_gap

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
        errors.append(not_allowed(key, value, allowed))


def validate_config(cfg: DictConfig) -> None:
    """Raise ``ConfigError`` listing every out-of-range value and what is allowed.

    Each key's own rule comes from ``conf/schema.py``; the checks here involve several keys.
    """
    e = problems(cfg)
    _check_clients(e, cfg)
    _check_dataset(e, cfg.dataset)
    _check_scheduler(e, cfg.scheduler)
    _check_model(e, cfg)
    _check_strategy(e, cfg)
    _check_combinations(e, cfg)
    _check_precision(e, cfg)
    _check_adapter(e, cfg)
    if cfg.privacy.get("name") == "secagg":
        _check_secagg(e, cfg)
    if cfg.privacy.get("name") in ("dp_server", "dp_client"):
        _check_privacy_budget(e, cfg)
    if e:
        raise ConfigError("invalid config:\n  " + "\n  ".join(e))


def _check_clients(e: list[str], cfg: DictConfig) -> None:
    """A round's fewest clients are at most the clients training starts with; a round samples at most those."""
    if is_int(cfg.min_clients) and is_int(cfg.num_clients) and cfg.min_clients > cfg.num_clients:
        _check(e, False, "min_clients", cfg.min_clients, "null or an integer in 1..num_clients")
    fewest = cfg.min_clients if cfg.min_clients is not None else cfg.num_clients
    if not is_int(fewest):
        return  # its own rule says what is wrong
    for key in ("clients_per_round", "eval_clients_per_round"):
        # Flower waits until a round's sample is connected: more than the run may run with could hang it.
        value = cfg.get(key)
        _check(
            e,
            not is_int(value) or value <= fewest,
            key,
            value,
            f"null or an integer in 1..{fewest} (min_clients, else num_clients: the clients a round may run with)",
        )
    _check_stragglers(e, cfg)


def _check_stragglers(e: list[str], cfg: DictConfig) -> None:
    """Over-selection draws beyond ``clients_per_round``; ``min_replies`` fits the clients a round runs with."""
    over = cfg.get("over_select")
    if is_number(over) and over > 0 and cfg.get("clients_per_round") is None:
        _check(
            e,
            False,
            "over_select",
            over,
            "0 with clients_per_round=null (every connected client trains: there is no one extra to draw); "
            "set clients_per_round to over-select",
        )
    nodes, source = round_clients(cfg)
    wanted = cfg.get("min_replies")
    if is_int(wanted) and is_int(nodes):
        _check(
            e,
            wanted <= nodes,
            "min_replies",
            wanted,
            f"null or an integer in 1..{nodes} (the replies a round expects, {source}={nodes})",
        )


def round_clients(cfg: DictConfig) -> tuple[object, str]:
    """The clients a training round runs with, and the key that says so.

    ``clients_per_round`` when clients are sampled, else ``min_clients``, else ``num_clients``.
    """
    for key in ("clients_per_round", "min_clients"):
        if cfg.get(key) is not None:
            return cfg[key], key
    return cfg.num_clients, "num_clients"


def _check_dataset(e: list[str], ds: DictConfig) -> None:
    """The geometry of datasets used as stored; image folders' channels and download mode."""
    classes = ds.get("classes")
    if classes is not None:
        labels = list(classes) if isinstance(classes, Sequence) and not isinstance(classes, str) else None
        _check(
            e,
            bool(labels) and all(is_int(c) and c >= 0 for c in labels) and len(set(labels)) == len(labels),
            "dataset.classes",
            classes,
            "null or a non-empty list of distinct labels (integers >= 0)",
        )
    native = NATIVE_GEOMETRY.get(ds.name)
    if native:  # these datasets are not resized: the model must match their images
        _check(
            e, ds.image_size == native[0], "dataset.image_size", ds.image_size, f"{native[0]} for {ds.name}"
        )
        _check(e, ds.channels == native[1], "dataset.channels", ds.channels, f"{native[1]} for {ds.name}")
    if ds.name == IMAGE_FOLDER:
        _check(e, ds.channels in (1, 3), "dataset.channels", ds.channels, "1 or 3 for image_folder")
        _check(
            e,
            ds.download is not True,
            "dataset.download",
            ds.download,
            "false or auto for image_folder (nothing to download)",
        )


def _check_scheduler(e: list[str], sc: DictConfig) -> None:
    """The DDPM noise schedule rises within (0, 1): 0 < beta_start < beta_end < 1."""
    start, end = sc.beta_start, sc.beta_end
    if is_number(start) and is_number(end):  # else their own rules say what is wrong
        _check(e, 0 < start < end < 1, "scheduler.beta_start", (start, end), "0 < beta_start < beta_end < 1")


def _check_model(e: list[str], cfg: DictConfig) -> None:
    """The UNet; for latent diffusion its size comes from the autoencoder, not the dataset."""
    latent = cfg.model.get("autoencoder") is not None
    _check_unet(e, cfg.model.unet, None if latent else cfg.dataset.image_size)


def _check_strategy(e: list[str], cfg: DictConfig) -> None:
    """Strategy settings that depend on the UNet, the clients or the evaluation."""
    st = cfg.strategy
    if st.name == "partial":
        _check_partial(e, st, len(cfg.model.unet.get("block_out_channels") or ()))
    if st.name in ("fedddpm", "fedddpm_plus") and is_int(st.aux_samples) and is_int(cfg.num_clients):
        _check(
            e,
            st.aux_samples >= cfg.num_clients,
            "strategy.aux_samples",
            st.aux_samples,
            f">= num_clients ({cfg.num_clients})",
        )
    if st.name == "fedddpm_plus" and st.signal == "fid":
        num_samples = cfg.eval.num_samples
        ok = is_int(num_samples) and num_samples > 0
        _check(e, ok, "strategy.signal", st.signal, "fid only with eval.num_samples > 0")


# Strategies that need the whole UNet: partial exchange splits it by parts, FedDDPM's server trains it.
WHOLE_MODEL_STRATEGIES = {
    "partial": "partial exchange splits the whole UNet into shared and local parts",
    "fedddpm": "FedDDPM's server calibrates the whole UNet on auxiliary images",
    "fedddpm_plus": "FedDDPM+'s server calibrates the whole UNet on auxiliary images",
}


def _check_adapter(e: list[str], cfg: DictConfig) -> None:
    """LoRA needs a pretrained base, and a strategy that exchanges what the model trains."""
    if cfg.get("adapter", {}).get("name") != "lora":
        return
    _check(
        e,
        bool(cfg.model.get("pretrained")),
        "adapter",
        "lora",
        "none without model.pretrained (adapters fine-tune a pretrained UNet: set model.pretrained=PIPELINE)",
    )
    reason = WHOLE_MODEL_STRATEGIES.get(str(cfg.strategy.name))
    if reason:
        _check(e, False, "adapter", "lora", f"none with strategy={cfg.strategy.name} ({reason})")
    targets = cfg.adapter.target_modules
    if isinstance(targets, str) or not (isinstance(targets, Sequence) and len(targets) > 0):
        _check(
            e, False, "adapter.target_modules", cfg.adapter.target_modules, "a non-empty list of module names"
        )


def _check_precision(e: list[str], cfg: DictConfig) -> None:
    """fp16 needs a GPU: with ``device=cpu`` it is refused before training (with ``auto``, where it runs)."""
    _check(
        e,
        not (cfg.get("precision") == "fp16" and cfg.get("device") == "cpu"),
        "precision",
        "fp16",
        "fp32, bf16 or auto with device=cpu (fp16 autocast on a CPU is emulated and slower than fp32; it needs "
        "a CUDA GPU and a gradient scaler)",
    )


def _check_combinations(e: list[str], cfg: DictConfig) -> None:
    """The strategy, downlink, aggregator and privacy layers must work together (``strategies.composition_errors``)."""
    aggregator = cfg.aggregator
    downlink = str(cfg.strategy.get("downlink"))
    for reason in composition_errors(
        str(cfg.strategy.name), str(cfg.privacy.name), str(aggregator.name), downlink
    ):
        key = "privacy" if reason.startswith("privacy=") else "aggregator"
        _check(e, False, key, cfg.privacy.name if key == "privacy" else aggregator.name, reason)
    _check_byzantine(e, cfg, aggregator)


def _check_byzantine(e: list[str], cfg: DictConfig, aggregator: DictConfig) -> None:
    """Krum needs n >= 2f + 3 replies a round, Bulyan n >= 4f + 3, Multi-Krum m <= n."""
    f = aggregator.get("num_malicious_nodes")
    nodes, source = round_clients(cfg)
    if not (is_int(f) and is_int(nodes)):
        return  # their own rules say what is wrong
    need = 4 * f + 3 if aggregator["name"] == "bulyan" else 2 * f + 3
    if source == "clients_per_round":  # the sample is too small for the aggregator: name both
        _check(
            e,
            nodes >= need,
            "clients_per_round",
            nodes,
            f">= {need} with aggregator={aggregator['name']} and aggregator.num_malicious_nodes={f} "
            f"({aggregator['name']} needs >= {need} replies a round"
            # The extra clients may all be late: the minimum must hold without them.
            + ("; over-selected clients do not count: they may be late)" if _over_selects(cfg) else ")"),
        )
    else:
        _check(
            e,
            nodes >= need,
            "aggregator.num_malicious_nodes",
            f,
            f"at most what the round's {nodes} clients allow: {aggregator['name']} needs >= {need} replies",
        )
    m = aggregator.get("num_nodes_to_select")
    if is_int(m):
        _check(
            e,
            m <= nodes,
            "aggregator.num_nodes_to_select",
            m,
            f"at most the round's {nodes} clients ({source}={nodes})",
        )


def _over_selects(cfg: DictConfig) -> bool:
    """Whether training rounds draw clients beyond ``clients_per_round``."""
    over = cfg.get("over_select")
    return is_number(over) and over > 0 and cfg.get("clients_per_round") is not None


def _check_privacy_budget(e: list[str], cfg: DictConfig) -> None:
    """A ``privacy.max_epsilon`` needs settings under which the accountant's epsilon holds."""
    pv = cfg.privacy
    if pv.get("max_epsilon") is None or not is_number(pv.noise_multiplier):
        return  # no limit to keep, or the noise's own rule says what is wrong
    gap = guarantee_gap(pv, str(cfg.weighting), cfg.max_update_norm_ratio)
    _check(
        e, gap is None, "privacy.max_epsilon", pv.max_epsilon, f"null, since no epsilon can be stated: {gap}"
    )


def _check_secagg(e: list[str], cfg: DictConfig) -> None:
    """SecAgg+: at least 2 clients, and share counts that fit the nodes of a round."""
    pv = cfg.privacy
    _check(
        e,
        is_int(cfg.num_clients) and cfg.num_clients >= 2,
        "num_clients",
        cfg.num_clients,
        "at least 2 with privacy=secagg",
    )
    for key in ("min_clients", "clients_per_round"):  # SecAgg+ masks among the round's nodes
        if cfg.get(key) is not None:
            _check(e, is_int(cfg[key]) and cfg[key] >= 2, key, cfg[key], "at least 2 with privacy=secagg")
    # The masked sum is weighted by num-examples inside the protocol, before the server sees any reply.
    _check(
        e,
        cfg.weighting == "examples",
        "weighting",
        cfg.weighting,
        "examples with privacy=secagg (SecAgg+ weighs inside the masked sum, bounded by privacy.max_weight)",
    )
    shares, threshold = pv.num_shares, pv.reconstruction_threshold
    # Counts must fit the nodes of a round (the sample, else at least min_clients); Flower's clients
    # split a secret into exactly num_shares parts, one per neighbour, so an even count breaks it.
    nodes, source = round_clients(cfg)
    nodes = nodes if is_int(nodes) else 0
    _check(
        e,
        (isinstance(shares, float) and 0 < shares <= 1)
        or (is_int(shares) and shares >= 3 and shares % 2 == 1 and shares <= nodes),
        "privacy.num_shares",
        shares,
        f"a fraction in (0, 1] or an odd integer in 3..{nodes} (the nodes of a round, {source}={nodes})",
    )
    ok = (isinstance(threshold, float) and 0 < threshold <= 1) or (
        is_int(threshold) and 2 <= threshold < nodes
    )
    if ok and is_int(shares) and is_int(threshold):
        ok = threshold < shares
    _check(
        e,
        ok,
        "privacy.reconstruction_threshold",
        threshold,
        f"a fraction in (0, 1] or an integer in 2..{nodes - 1} (below privacy.num_shares when that is an integer)",
    )


def _check_unet(e: list[str], unet: DictConfig, image_size: object) -> None:
    """``UNet2DModel`` arguments: one block type per level, channels that fit the group norm and the image size."""
    channels = unet.get("block_out_channels")
    ok = (
        channels is not None
        and not isinstance(channels, str)
        and len(channels) >= 1
        and all(is_int(c) and c >= 1 for c in channels)
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
    _check_unet_scalars(e, unet, channels)
    factor = 2 ** (len(channels) - 1)
    if is_int(image_size) and image_size % factor:
        _check(
            e,
            False,
            "model.unet.block_out_channels",
            list(channels),
            f"fewer levels: {len(channels)} levels downsample {factor}x, which does not divide image size {image_size}",
        )


def _check_unet_scalars(e: list[str], unet: DictConfig, channels: list[int]) -> None:
    """Group norm, layers per block, attention head size and dropout of ``UNet2DModel``."""
    groups = unet.get("norm_num_groups", 32)
    _check(
        e,
        is_int(groups) and groups >= 1 and all(c % groups == 0 for c in channels),
        "model.unet.norm_num_groups",
        groups,
        "an integer >= 1 that divides every block_out_channels entry",
    )
    _check(
        e,
        is_int(unet.get("layers_per_block", 2)) and unet.get("layers_per_block", 2) >= 1,
        "model.unet.layers_per_block",
        unet.get("layers_per_block"),
        "an integer >= 1",
    )
    head = unet.get("attention_head_dim")
    _check(
        e,
        head is None or (is_int(head) and head >= 1),
        "model.unet.attention_head_dim",
        head,
        "null or an integer >= 1",
    )
    dropout = unet.get("dropout", 0.0)
    _check(e, is_number(dropout) and 0 <= dropout < 1, "model.unet.dropout", dropout, "a number in [0, 1)")


def _check_partial(e: list[str], st: DictConfig, num_levels: int) -> None:
    """The partial strategy's shared parts: ``models.parts`` names of this UNet, for the custom preset only."""
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
    # Top-k sparsifies the update; without `quantize` a partial reply is weights.
    topk_off = not is_number(st.topk) or st.topk == 0
    _check(e, topk_off or st.quantize is True, "strategy.topk", st.topk, "0 unless strategy.quantize=true")


def refuse_simulation_overrides(overrides: Sequence[str] | str) -> None:
    """Raise ``ConfigError`` for ``simulation.*`` overrides where they would be ignored: under ``flwr run``.

    They configure ``feddm-run``'s in-process simulation. A SuperLink's simulation runtime starts
    Ray before the app reads its config, from its federation config and its environment.
    """
    if isinstance(overrides, str):
        overrides = shlex.split(overrides)
    given = [o for o in overrides if o.lstrip("+~").split("=")[0].split(".")[0] == "simulation"]
    if given:
        raise ConfigError(
            f"{' '.join(given)} is not allowed with flwr run (feddm-run superlink=... or plain flwr run): "
            "simulation.* keys set up feddm-run's in-process simulation. A SuperLink's simulation runtime "
            "takes its clients' resources from flwr run --federation-config \"client-resources-num-cpus=1 "
            "client-resources-num-gpus=0.25\" and a Ray cluster from RAY_ADDRESS=HEAD:PORT in the SuperLink's "
            "environment"
        )


def resumed_config(run_dir: str | Path) -> DictConfig:
    """The saved config of the run folder ``run_dir``, set to resume there."""
    run_dir = Path(run_dir).expanduser().resolve()
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise FileNotFoundError(f"resume={run_dir}: no config.yaml there; is it a FedDM run folder?")
    cfg = OmegaConf.load(saved)
    # Keys (and groups, e.g. aggregator) added since the folder was made: today's defaults, which
    # leave such a run as it was (FedAvg, weighting by examples, ...).
    defaults = compose_config()
    for key in defaults:
        if key not in cfg and key != "hydra":
            cfg[key] = defaults[key]
    # FedDM-quant's quantize_downlink became strategy.downlink, a setting of every strategy.
    quantized = cfg.strategy.pop("quantize_downlink", None)
    if "downlink" not in cfg.strategy:
        cfg.strategy.downlink = "int8_weights" if quantized else defaults.strategy.downlink
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
