"""Run FedDM on a Flower Grid: build the model, run the strategy, write the run folder."""

from __future__ import annotations

import contextlib
import json
import logging
import random
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from flwr.supercore import log
from flwr.supercore.logger import LOGGER_NAME
from omegaconf import DictConfig, OmegaConf

from client_app.adapters import ADAPTER_KEY, BASE_HASH_KEY, PRETRAINED_KEY
from client_app.partition import partition_sizes
from conf.schema import client_values
from models import build_scheduler, build_unet, count_parameters, resolve_device, seeded_unet
from models.adapters import (
    LoraSpec,
    add_lora,
    base_hash,
    exchanged_state,
    has_adapters,
    load_pretrained,
    merged_unet,
    save_adapter,
)
from models.data import dataset_from_config
from models.latent import autoencoder_from_settings, latent_geometry
from models.precision import Precision, resolve_precision
from server_app.auxiliary import auxiliary_images, server_calibration
from server_app.checkpoint import (
    CheckpointError,
    has_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from server_app.config import ConfigError, resolve_paths, resumed_config, to_yaml, validate_config
from server_app.divergence import DivergenceWatch
from server_app.evaluation import GlobalEvaluator
from server_app.global_model import GlobalModel
from server_app.prompt_grid import prompt
from server_app.run_folder import RunFolder, new_run_dir
from server_app.tracking import Tracker, build_tracker
from strategies import Calibration, FedDMStrategy, PrivacyBudgetSpent, build_strategy
from strategies.downlink import view_hash
from strategies.reply_checks import ReplyChecks

# Round-log keys copied to metrics.jsonl, besides round, wall_time_s and fid.
METRIC_KEYS = (
    "train_loss",
    "eval_loss",
    "uplink_bytes",
    "downlink_bytes",
    "num_sampled",
    "sampled_partitions",
    "eval_partitions",
    "num_aggregated",
    "num_rejected",
    "num_late",
    "num_failed",
    "eval_downlink_bytes",
    "train_time_s",
    "calibrated",
    "epsilon",
)


def client_config(cfg: DictConfig, unet: UNet2DModel, scheduler: DDPMScheduler) -> ConfigRecord:
    """Everything a client needs, so remote SuperNodes need no copy of ``conf/``.

    The JSON keys (``conf.schema.CLIENT_JSON_KEYS``), then the typed settings the
    schema marks for clients (``conf.schema.CLIENT_SETTINGS``).
    """
    container = OmegaConf.to_container(cfg, resolve=True)
    return ConfigRecord(
        {
            "unet": json.dumps(dict(unet.config)),
            # Latent diffusion: the frozen autoencoder clients encode their images with.
            "autoencoder": json.dumps(container["model"].get("autoencoder")),
            "scheduler": json.dumps(dict(scheduler.config)),
            "dataset": json.dumps(container["dataset"]),
            "partition": json.dumps(container["partition"]),
            **client_values(cfg),
        }
    )


def client_generation(cfg: DictConfig) -> dict:
    """What clients that keep parts of the model generate at evaluation rounds (grid and FID)."""
    return {
        "sample-count": max(int(cfg.eval.num_samples), int(cfg.eval.grid_size)),
        "sample-seed": int(cfg.eval.seed),
        "sample-ddim-steps": int(cfg.eval.ddim_steps or 0),  # 0: full DDPM
        "sample-batch-size": int(cfg.eval.batch_size),
        "sample-shape": json.dumps(
            [int(cfg.dataset.channels), int(cfg.dataset.image_size), int(cfg.dataset.image_size)]
        ),
    }


def _seed_everything(seed: int) -> None:
    random.seed(seed)  # Flower samples nodes with `random`
    np.random.seed(seed)
    torch.manual_seed(seed)


def _format_round(row: dict) -> str:
    parts = [f"round {row['round']}"]
    for key in ("train_loss", "eval_loss", "fid", "kid"):
        if key in row:
            parts.append(f"{key} {row[key]:.4f}")
    for key in ("uplink_bytes", "downlink_bytes"):
        if key in row:
            parts.append(f"{key.split('_')[0]} {row[key] / 1e6:.2f} MB")
    parts.append(f"{row['wall_time_s']:.1f} s")
    return " | ".join(parts)


def wait_for_nodes(grid: Grid, num_clients: int, timeout_s: float) -> None:
    """Wait until ``num_clients`` nodes are connected, or fail naming what to change."""
    deadline = time.monotonic() + timeout_s
    while (connected := len(list(grid.get_node_ids()))) < num_clients:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"num_clients={num_clients}, but only {connected} SuperNodes connected "
                f"within node_wait_timeout_s={timeout_s:g}. In simulation, run with "
                f"--federation-config 'num-supernodes={num_clients}' (or lower num_clients); "
                "in a deployment, start more SuperNodes."
            )
        time.sleep(1.0)


def trained_nothing(run_dir: str | Path) -> bool:
    """Whether a run folder stopped before any round was trained: no checkpoint, no row after round 0.

    Resuming such a run (e.g. one that failed after FedDDPM's pretraining) starts
    its training over in the folder, keeping what round 0 left: its row and the
    auxiliary images.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() or has_checkpoint(run_dir) or (run_dir / "model").exists():
        return False  # (a finished run without checkpoints has model/)
    return all(r["round"] == 0 for r in RunFolder(run_dir).read_metrics())


@dataclass
class Run:
    """What one run is made of, built once by :func:`build_run`."""

    cfg: DictConfig
    folder: RunFolder
    device: torch.device
    precision: Precision  # of the server's calibration and sampling
    autoencoder: Any  # latent diffusion: the frozen autoencoder; None in pixel space
    model: GlobalModel
    scheduler: DDPMScheduler
    strategy: FedDMStrategy
    settings: ConfigRecord  # what clients are sent
    done_rounds: int = 0  # rounds a resumed run had finished
    elapsed_before: float = 0.0  # seconds of training before the resume
    tracker: Tracker | None = None


def run_federation(grid: Grid, cfg: DictConfig, run_dir: str | Path | None = None) -> Path:
    """Train until round ``cfg.num_rounds`` and return the run folder.

    The config is checked before anything is trained. The run folder gets the
    resolved config, ``metrics.jsonl`` (a row per round), a sample grid per
    evaluation round, checkpoints, and the final model as a diffusers pipeline.
    With ``cfg.resume=RUN_DIR`` the run continues from that folder's checkpoint
    (or, if it stopped before a round was trained, starts its training anew there).
    """
    cfg = prepare_config(cfg)
    folder = open_run_folder(cfg, run_dir)
    download_dataset(cfg)
    run = build_run(cfg, folder)
    watch = DivergenceWatch(float(cfg.lr), str(cfg.model.name), latent=run.autoencoder is not None)
    restore_progress(run, watch)
    share_initial_model(run)
    log_summary(run)
    run.tracker = build_tracker(
        cfg.get("tracking"), folder, OmegaConf.to_container(cfg, resolve=True), resumed_after=run.done_rounds
    )
    try:
        recorder = RoundRecorder(run, watch)  # the evaluator's FID statistics come first
        grid = prompt(grid, float(cfg.reply_poll_s))  # Flower's deployment grid looks every 3 s
        wait_for_nodes(grid, cfg.num_clients, float(cfg.node_wait_timeout_s))
        bound_num_examples(grid, run)
        place_client_state(grid, run)
        calibration = run.strategy.layer(Calibration)
        if calibration is not None:  # FedDDPM: the clients' own models first
            calibration.calibrate = pretrain(grid, run)
        train_rounds(grid, run, recorder)
        finish(run)
    finally:
        run.tracker.close()
    return folder.path


def prepare_config(cfg: DictConfig) -> DictConfig:
    """The run's config: a resumed run's own saved one, checked, with absolute paths."""
    if cfg.resume:
        cfg = resumed_config(cfg.resume)  # the run's own settings, not today's defaults
    validate_config(cfg)
    return resolve_paths(cfg)


def open_run_folder(cfg: DictConfig, run_dir: str | Path | None) -> RunFolder:
    """The run folder: the resumed one, or a new one holding the resolved config."""
    folder = RunFolder(cfg.resume or cfg.run_dir or run_dir or new_run_dir(cfg.output_dir, cfg.strategy.name))
    log(INFO, "FedDM run folder: %s", folder.path)
    if cfg.resume:  # before anything reads or appends rows
        folder.drop_partial_metrics()
    else:
        if folder.read_metrics():
            raise FileExistsError(
                f"run folder {folder.path} already holds metrics.jsonl; continue it with "
                f"resume={folder.path} or choose another folder"
            )
        folder.write_config(to_yaml(cfg))
    return folder


def download_dataset(cfg: DictConfig) -> None:
    """``dataset.download=true``: download once here, so simulated clients do not race on one folder.

    (``auto`` needs nothing here: whoever misses the files downloads them, one process at a time.)
    """
    if cfg.dataset.download is True:
        for train in (True, False):
            dataset_from_config(cfg.dataset, train=train)
        cfg.dataset.download = False


def build_run(cfg: DictConfig, folder: RunFolder) -> Run:
    """The model, its scheduler, the strategy and the clients' settings, from a seeded start."""
    _seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    plain = OmegaConf.to_container(cfg, resolve=True)
    autoencoder = autoencoder_from_settings(plain["model"].get("autoencoder"))
    size, channels = cfg.dataset.image_size, cfg.dataset.channels
    if autoencoder is not None:  # latent diffusion: the UNet works on the autoencoder's latents
        size, channels = latent_geometry(autoencoder, int(size))
        autoencoder.to(device)
    if cfg.model.get("pretrained"):  # the pipeline's UNet (its config, not model.unet) and scheduler
        unet, scheduler = load_pretrained(str(cfg.model.pretrained))
        check_pretrained_geometry(unet, size, channels, str(cfg.model.pretrained))
    else:
        unet = build_unet(plain["model"]["unet"], image_size=size, channels=channels)
        # Latents are not images: no clipping of the predicted sample to [-1, 1].
        scheduler = build_scheduler({**plain["scheduler"], **({"clip_sample": False} if autoencoder else {})})
    adapter_settings = add_adapter(cfg, unet)
    strategy = build_strategy(
        cfg.strategy,
        num_clients=cfg.num_clients,
        min_clients=cfg.min_clients,
        clients_per_round=cfg.clients_per_round,
        eval_clients_per_round=cfg.eval_clients_per_round,
        over_select=float(cfg.over_select),
        min_replies=cfg.min_replies,
        seed=int(cfg.seed),
        client_generation=client_generation(cfg),
        privacy=cfg.privacy,
        aggregator=cfg.aggregator,
        reply_checks=ReplyChecks.from_config(cfg),
        evaluate_every=int(cfg.eval.every),
        last_round=int(cfg.num_rounds),
    )
    settings = client_config(cfg, unet, scheduler)
    settings.update(adapter_settings)
    model = GlobalModel(unet.to(device), cfg.ema)
    precision = resolve_precision(cfg.precision, device)
    return Run(cfg, folder, device, precision, autoencoder, model, scheduler, strategy, settings)


def check_pretrained_geometry(unet: UNet2DModel, size: int, channels: int, path: str) -> None:
    """A pretrained UNet must fit the data it fine-tunes on: sample size and channels."""
    found = (int(unet.config.sample_size), int(unet.config.in_channels))
    if found != (int(size), int(channels)):
        raise ConfigError(
            f"model.pretrained={path} is a UNet for {found[0]} px and {found[1]} channels, the dataset (or its "
            f"latents) is {size} px and {channels} channels: pick a matching dataset or pipeline"
        )


def add_adapter(cfg: DictConfig, unet: UNet2DModel) -> dict[str, str]:
    """``adapter=lora``: adapters on the pretrained UNet (in place); what clients need to do the same."""
    if cfg.adapter.name != "lora":
        return {}
    spec = LoraSpec(
        rank=int(cfg.adapter.rank),
        alpha=float(cfg.adapter.alpha if cfg.adapter.alpha is not None else cfg.adapter.rank),
        target_modules=tuple(str(m) for m in cfg.adapter.target_modules),
    )
    base = base_hash(unet)  # of the base alone, before adapters: every node checks its own against it
    add_lora(unet, spec)
    log(
        INFO,
        "FedDM: LoRA rank %d on %s: %d trainable of %d parameters",
        spec.rank,
        list(spec.target_modules),
        count_parameters(unet, trainable=True),
        count_parameters(unet),
    )
    return {ADAPTER_KEY: spec.to_json(), PRETRAINED_KEY: str(cfg.model.pretrained), BASE_HASH_KEY: base}


def in_simulation(grid: Grid) -> bool:
    """Whether ``grid`` is Flower's simulation grid (every node reads this server's data and config)."""
    return type(grid).__name__ == "InMemoryGrid"


CHECKPOINTED_ROUND = "checkpointed-round"  # sent with client_state=disk (client_app.state)


def place_client_state(grid: Grid, run: Run) -> None:
    """``client_state=disk`` with no folder set: in simulation, the run folder's ``client_state/``.

    Simulated clients share this machine's disk, so their state sits beside the
    run's other files (and is removed when the run finishes). On SuperNodes each
    node chooses its own folder (``client_state.default_state_dir``). Clients name
    their files by the run folder's key, which a resumed run keeps, and keep those
    of the last checkpointed round (``client_app.state``), so a resume or a
    restarted SuperNode continues with the state each client had.
    """
    cfg = run.cfg
    if cfg.client_state != "disk":
        return
    run.settings["run-key"] = run.folder.run_key()
    run.settings[CHECKPOINTED_ROUND] = run.done_rounds
    if cfg.client_state_dir is None and in_simulation(grid):
        run.settings["client-state-dir"] = str(run.folder.client_state)
        log(INFO, "FedDM: clients keep their state between rounds in %s", run.folder.client_state)


def bound_num_examples(grid: Grid, run: Run) -> None:
    """``max_num_examples: null`` in simulation: the largest partition's image count bounds ``num-examples``.

    The nodes split this server's training set with the same partitioner, seed and
    ``num-partitions`` (the simulation's node count), so no honest reply claims
    more (each trains on its partition less the held-out share). Elsewhere the
    nodes' data is unknown here: the bound stays ``max_num_examples`` or 10^9.
    """
    cfg = run.cfg
    if cfg.max_num_examples is not None or not in_simulation(grid):
        return
    labels = dataset_from_config(cfg.dataset, train=True).labels
    num_partitions = len(list(grid.get_node_ids()))
    partition = OmegaConf.to_container(cfg.partition, resolve=True)
    bound = max(partition_sizes(labels, partition, num_partitions=num_partitions, seed=int(cfg.seed)))
    run.strategy.reply_checks.max_num_examples = bound
    log(
        INFO,
        "FedDM: replies may claim at most %d examples (the largest of %d partitions)",
        bound,
        num_partitions,
    )


def share_initial_model(run: Run) -> None:
    """``int8_delta``: if every client can rebuild the initial model from the seed, none is sent it in fp32.

    The server checks by hash that ``models.seeded_unet`` gives exactly this
    model; a pretrained or adapted start fails the check, a resumed run does
    not make it, and their first messages carry fp32 weights as before.
    """
    downlink = run.strategy.downlink
    if downlink.mode != "int8_delta" or run.done_rounds:
        return
    initial = {name: array.numpy() for name, array in run.model.arrays().items()}
    unet_config = json.loads(str(run.settings["unet"]))
    rebuilt = {n: t.numpy() for n, t in exchanged_state(seeded_unet(unet_config, int(run.cfg.seed))).items()}
    if rebuilt.keys() == initial.keys() and view_hash(rebuilt) == view_hash(initial):
        downlink.hold_initial(initial)
        log(
            INFO,
            "FedDM: clients rebuild the initial model from seed %d; round 1 sends its int8 change",
            run.cfg.seed,
        )
    else:
        log(
            INFO, "FedDM: clients cannot rebuild this initial model from the seed; round 1 sends fp32 weights"
        )


def restore_progress(run: Run, watch: DivergenceWatch) -> None:
    """Resume: the checkpoint's weights, EMA and RNG states; the rounds and metrics before it."""
    cfg = run.cfg
    if not cfg.resume:
        return
    if trained_nothing(run.folder.path):
        log(
            INFO,
            "FedDM: %s has no checkpoint and no trained round; training starts at round 1",
            run.folder.path,
        )
        return
    checkpoint, torch_rng = load_checkpoint(run.folder.path)
    if checkpoint.strategy_state.get("name") != cfg.strategy.name:
        raise CheckpointError(
            f"the checkpoint is of strategy {checkpoint.strategy_state.get('name')!r}, "
            f"the config says {cfg.strategy.name!r}"
        )
    run.model.restore(checkpoint)
    restore_rng_state(checkpoint.rng_state, torch_rng)
    run.done_rounds = checkpoint.round
    # Checkpoints from before strategies had a state_dict hold only the name: the round is the checkpoint's.
    run.strategy.load_state_dict({"rounds_done": checkpoint.round, **checkpoint.strategy_state})
    rows = run.folder.truncate_metrics(run.done_rounds)
    for row in rows:  # what the loss watch saw before the interruption
        if row["round"] > 0:
            watch.observe(row)
    run.elapsed_before = rows[-1]["wall_time_s"] if rows else 0.0
    log(INFO, "FedDM resumes after round %d of %d", run.done_rounds, cfg.num_rounds)


def log_summary(run: Run) -> None:
    """One short summary of what is about to run (the full config is in the run folder's config.yaml)."""
    cfg = run.cfg
    parameters = count_parameters(run.model.unet)
    privacy = "" if cfg.privacy.name == "none" else f", privacy {cfg.privacy.name}"
    log(
        INFO,
        "FedDM: strategy %s (aggregation %s%s), model %s (%.2fM parameters%s), dataset %s, "
        "%d clients, %d rounds of %s, lr %g, device %s (%s); run folder %s",
        cfg.strategy.name,
        flower_strategy(run.strategy),
        privacy,
        cfg.model.name,
        parameters / 1e6,
        ", latent" if run.autoencoder is not None else "",
        cfg.dataset.name,
        cfg.num_clients,
        cfg.num_rounds,
        f"{cfg.local_epochs} local epochs" if cfg.local_epochs else f"{cfg.local_steps} local steps",
        cfg.lr,
        run.device,
        run.precision.name,
        run.folder.path,
    )


def flower_strategy(strategy: FedDMStrategy) -> str:
    """The name of the Flower strategy class that ``strategy`` aggregates with (e.g. FedAvg)."""
    return next((c.__name__ for c in type(strategy).__mro__ if c.__module__.startswith("flwr.")), "?")


def pretrain(grid: Grid, run: Run):
    """FedDDPM: the clients' own models, the auxiliary images, and the server's calibration step."""
    cfg, st = run.cfg, run.cfg.strategy
    images, row = auxiliary_images(
        grid,
        run.strategy,
        ArrayRecord(run.model.unet.state_dict()),
        run.settings,
        run.scheduler,
        run_dir=run.folder.path,
        ddim_steps=st.aux_ddim_steps,
        seed=int(cfg.seed),
        timeout=float(cfg.round_timeout_s),
        device=run.device,
        precision=run.precision,
        latent=run.autoencoder is not None,
    )
    if row and not any(r["round"] == 0 for r in run.folder.read_metrics()):  # one pretraining row per run
        run.tracker.log_round(row)
    if row:
        log(INFO, "FedDM %s", _format_round(row))
    return server_calibration(
        dict(run.model.unet.config),
        run.scheduler,
        images,
        steps=int(st.calibration_steps),
        lr=float(st.calibration_lr),
        batch_size=int(st.calibration_batch_size),
        seed=int(cfg.seed),
        device=run.device,
        precision=run.precision,
        max_grad_norm=float(cfg.max_grad_norm),
    )


class RoundRecorder:
    """Flower's evaluation callback: after each round, the EMA step, evaluation, metrics and checkpoint."""

    def __init__(self, run: Run, watch: DivergenceWatch) -> None:
        self.run, self.watch = run, watch
        self.evaluator = GlobalEvaluator(run.cfg, run.tracker, run.device, run.precision, run.autoencoder)
        self.started = 0.0  # set by train_rounds when the rounds start: wall_time_s counts from there

    def __call__(self, local_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """``local_round`` counts from 1 in this process (0: before training, nothing to do)."""
        if local_round == 0:
            return None
        run, cfg = self.run, self.run.cfg
        server_round = local_round + run.done_rounds
        run.model.update(arrays)
        row = {"round": server_round}
        row.update(
            {k: v for k, v in run.strategy.round_log.get(server_round, {}).items() if k in METRIC_KEYS}
        )
        # Checked before the next round runs, so that no round takes epsilon above privacy.max_epsilon.
        last = server_round == cfg.num_rounds or not privacy_allows_another_round(run)
        if server_round % cfg.eval.every == 0 or last:
            row.update(self.evaluate(server_round))
        row["wall_time_s"] = round(run.elapsed_before + time.monotonic() - self.started, 3)
        run.tracker.log_round(row)
        run.strategy.observe(server_round, row)
        log(INFO, "FedDM %s", _format_round(row))
        for warning in self.watch.observe(row):
            log(WARNING, "FedDM %s", warning)
        if cfg.checkpoint_every and (server_round % cfg.checkpoint_every == 0 or last):
            state = run.strategy.state_dict()
            save_checkpoint(run.folder.path, run.model.checkpoint(server_round, cfg.strategy.name, state))
            if CHECKPOINTED_ROUND in run.settings:  # the next round's clients may forget older state
                run.settings[CHECKPOINTED_ROUND] = server_round
        if last and server_round < cfg.num_rounds:  # leaves Flower's loop; train_rounds ends the run
            raise PrivacyBudgetSpent(run.strategy.privacy_budget.stop_message(server_round))
        return None

    def evaluate(self, server_round: int) -> dict:
        """Grid and FID of the global (EMA) model, or of the clients' own models when parts stay local."""
        run = self.run
        if run.strategy.personalized:  # each client has its own model
            return self.evaluator.clients(
                run.strategy.encoding.client_samples.pop(server_round, {}), server_round
            )
        with run.model.evaluation_weights() as weights:
            return self.evaluator(weights, run.scheduler, server_round)


def privacy_allows_another_round(run: Run) -> bool:
    """Whether one more round keeps epsilon within ``privacy.max_epsilon`` (always without DP or a limit)."""
    budget = run.strategy.privacy_budget
    return budget is None or budget.allows_another_round()


def train_rounds(grid: Grid, run: Run, recorder: RoundRecorder) -> None:
    """The federated rounds left to train, with Flower's ``Strategy.start``.

    A DP run with ``privacy.max_epsilon`` ends after the last round that keeps
    epsilon within it (``PrivacyBudgetSpent``, logged); ``finish`` then saves the
    model as at the end of any run.
    """
    cfg = run.cfg
    if cfg.num_rounds <= run.done_rounds:
        return
    budget = run.strategy.privacy_budget
    if budget is not None:
        budget.warn_if_no_guarantee()
    if not privacy_allows_another_round(run):
        message = budget.stop_message(run.done_rounds)
        if not run.done_rounds:  # nothing trained: say what to change rather than save an untrained model
            raise ValueError(
                f"{message}; a single round spends more than privacy.max_epsilon: raise it or "
                "privacy.noise_multiplier"
            )
        log(WARNING, "FedDM %s", message)
        return
    recorder.started = time.monotonic()
    try:
        _start(grid, run, recorder)
    except PrivacyBudgetSpent as stop:
        log(WARNING, "FedDM %s", stop)


def _start(grid: Grid, run: Run, recorder: RoundRecorder) -> None:
    """Flower's round loop over the rounds left, with the run's settings and the recorder as callback."""
    cfg = run.cfg
    with quiet_config_records():
        run.strategy.start(
            grid=grid,
            initial_arrays=run.model.arrays(),
            num_rounds=cfg.num_rounds - run.done_rounds,
            timeout=float(cfg.round_timeout_s),
            train_config=run.settings,
            evaluate_config=ConfigRecord(dict(run.settings)),
            evaluate_fn=recorder,
        )


def finish(run: Run) -> None:
    """Save the final (EMA) model as a diffusers pipeline, unless every client keeps its own."""
    if run.strategy.personalized:
        log(INFO, "Each client keeps its own model (shared and local parts); the run folder has no model/")
    else:
        with run.model.evaluation_weights() as weights:
            unet = merged_unet(weights) if has_adapters(weights) else weights
            run.folder.save_model(
                unet.cpu(), run.scheduler, run.autoencoder.cpu() if run.autoencoder else None
            )
            if has_adapters(weights):  # and the adapters alone, for peft
                spec = LoraSpec.from_json(str(run.settings[ADAPTER_KEY]))
                save_adapter(weights, spec, str(run.cfg.model.pretrained), run.folder.model_dir / "adapter")
    if run.cfg.client_state_dir is None and run.settings["client-state-dir"] == str(run.folder.client_state):
        run.folder.remove_client_state()  # placed there by this run, which no longer needs it
    log(INFO, "FedDM run finished; results in %s", run.folder.path)


class _ShortConfigRecords(logging.Filter):
    """Flower logs the whole train ConfigRecord at the start (kilobytes of JSON): log its keys instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and "ConfigRecord (" in record.msg and record.args:
            text = str(record.args[0])
            if len(text) > 200:
                keys = re.findall(r"'([\w-]+)': ", text)
                record.args = (f"{len(keys)} keys ({', '.join(keys)})",)
        return True


@contextlib.contextmanager
def quiet_config_records() -> Iterator[None]:
    """Inside the block, Flower's start-up log lists the ConfigRecord's keys, not its values."""
    logger, short = logging.getLogger(LOGGER_NAME), _ShortConfigRecords()
    logger.addFilter(short)
    try:
        yield
    finally:
        logger.removeFilter(short)
