"""A client's local work: its data partition, local DDPM training and evaluation.

Everything a client needs arrives in the message's ConfigRecord (see
``read_settings``), so a remote SuperNode needs no copy of ``conf/``. The node
config supplies who the client is (``partition-id``, ``num-partitions``) and may
override machine-specific settings (``data-root``, ``device``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import make_dataclass
from importlib.metadata import version
from logging import WARNING
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel
from flwr.common.logger import log
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from conf.schema import CLIENT_JSON_KEYS, CLIENT_SETTINGS
from models import (
    LabeledImages,
    denoising_loss,
    make_optimizer,
    scheduler_from_config,
    train_step,
    unet_from_config,
)
from models.data import dataset_from_config
from models.diffusion import Regularizer
from models.durable import replace_durably
from models.latent import CachedLatents, autoencoder_from_settings
from models.precision import FP32, Precision, resolve_memory_format

if TYPE_CHECKING:
    from flwr_datasets.partitioner import Partitioner

# Settings a client reads from the server's ConfigRecord: the JSON keys (dicts; ``autoencoder`` is None
# in pixel space) and the typed settings declared with ``client=...`` in ``conf/schema.py``
# (``local_epochs`` 0: use ``local_steps``).
_JSON_KEYS = CLIENT_JSON_KEYS
_TYPED_KEYS = {s.key: s.type for s in CLIENT_SETTINGS}
ClientSettings = make_dataclass(
    "ClientSettings",
    [(key, dict[str, Any] | None) for key in _JSON_KEYS] + [(s.attr, s.type) for s in CLIENT_SETTINGS],
    frozen=True,
)
ClientSettings.__doc__ = "Settings a client reads from the server's ConfigRecord (see ``read_settings``)."


def read_settings(config: Mapping[str, Any]) -> ClientSettings:
    """Parse the ConfigRecord sent by the server; a missing key names itself."""
    missing = [k for k in (*_JSON_KEYS, *_TYPED_KEYS) if k not in config]
    if missing:
        raise KeyError(f"the server's config lacks {missing}; is the ServerApp a FedDM one?")
    values = {s.attr: s.type(config[s.key]) for s in CLIENT_SETTINGS}
    values.update({k: json.loads(config[k]) for k in _JSON_KEYS})
    return ClientSettings(**values)


def round_seed(*parts: int) -> int:
    """A 63-bit seed derived from (run seed, round, client, ...), stable across runs."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


@functools.lru_cache(maxsize=4)
def _dataset(spec_json: str, root: str) -> LabeledImages:
    return dataset_from_config(json.loads(spec_json), train=True, root=root)


@functools.lru_cache(maxsize=2)
def _partitioner(dataset_key: tuple, partition_json: str, num_partitions: int, seed: int) -> Partitioner:
    from client_app.partition import loaded_partitioner  # flwr-datasets: only when a split is computed

    # One split of the whole dataset per process, shared by every client it serves: a simulation
    # worker serves many partitions, and recomputing 1000 Dirichlet partitions per client would
    # make a round's cost grow with the population.
    labels = _dataset(*dataset_key).labels
    return loaded_partitioner(labels, json.loads(partition_json), num_partitions, seed)


@functools.lru_cache(maxsize=16)
def _split(
    dataset_key: tuple,
    partition_json: str,
    partition_id: int,
    num_partitions: int,
    seed: int,
    eval_fraction: float,
    cache_dir: str,
) -> tuple[np.ndarray, np.ndarray]:
    # A SuperNode starts a new ClientApp process for every message: the split computed by the first one
    # is kept on the node's disk, so later ones skip importing flwr-datasets and partitioning. The split
    # depends only on the labels and these settings (and on flwr-datasets' version), hence the file name.
    labels = _dataset(*dataset_key).labels
    key = hashlib.sha256(
        json.dumps(
            [partition_json, partition_id, num_partitions, seed, eval_fraction, version("flwr-datasets")]
        ).encode()
    )
    key.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    cache_file = Path(cache_dir) / f"{key.hexdigest()[:32]}.npz" if cache_dir else None
    if cache_file is not None and cache_file.is_file():
        try:
            with np.load(cache_file, allow_pickle=False) as saved:
                return saved["train"], saved["holdout"]
        except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile):
            pass  # damaged: split anew and rewrite it
    from client_app.partition import indices_of, split_train_holdout

    indices = indices_of(_partitioner(dataset_key, partition_json, num_partitions, seed), partition_id)
    train_idx, holdout_idx = split_train_holdout(indices, eval_fraction, seed=round_seed(seed, partition_id))
    if cache_file is not None:
        _save_split(cache_file, train_idx, holdout_idx)
    return train_idx, holdout_idx


def _save_split(path: Path, train_idx: np.ndarray, holdout_idx: np.ndarray) -> None:
    """Write a split atomically (a process reading it sees all of it or nothing); a failure only warns."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as tmp:
            np.savez(tmp, train=train_idx, holdout=holdout_idx)
        replace_durably(tmp.name, path)  # unique name: several processes may split at once
    except OSError as err:
        log(WARNING, "FedDM: cannot keep the data split in %s (%s); each process splits anew", path, err)
        if tmp is not None:
            Path(tmp.name).unlink(missing_ok=True)


def client_data(
    settings: ClientSettings, node_config: Mapping[str, Any]
) -> tuple[LabeledImages, np.ndarray, np.ndarray]:
    """(dataset, train indices, held-out indices) of this node's partition."""
    spec = settings.dataset
    root = str(node_config.get("data-root", spec["root"]))
    dataset_key = (json.dumps(spec, sort_keys=True), root)
    train_idx, holdout_idx = _split(
        dataset_key,
        json.dumps(settings.partition, sort_keys=True),
        int(node_config["partition-id"]),
        int(node_config["num-partitions"]),
        settings.seed,
        settings.eval_fraction,
        _default_cache_dir("splits"),
    )
    if len(train_idx) == 0:
        raise ValueError(
            f"partition {node_config['partition-id']} has no training images; "
            "use fewer clients or a less skewed partition"
        )
    if settings.autoencoder:  # latent diffusion: this client's images, encoded once
        latents = _latents(
            dataset_key,
            json.dumps(settings.autoencoder, sort_keys=True),
            _autoencoder_path(settings, node_config),
            tuple(np.concatenate([train_idx, holdout_idx]).tolist()),
            str(node_config.get("latent-cache-dir", default_latent_cache_dir())),
        )
        return latents, train_idx, holdout_idx
    return _dataset(*dataset_key), train_idx, holdout_idx


def default_latent_cache_dir() -> str:
    """Where a node keeps its encoded latents unless its node config says ``latent-cache-dir`` ("" if none)."""
    return _default_cache_dir("latents")


def _default_cache_dir(kind: str) -> str:
    """``~/.cache/feddm/<kind>`` (or under ``$XDG_CACHE_HOME``); "" without a home directory."""
    try:
        return str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "feddm" / kind)
    except RuntimeError:  # no home directory (some containers): memory only
        return ""


@functools.lru_cache(maxsize=2)
def _latents(
    dataset_key: tuple, autoencoder_json: str, path: str, indices: tuple[int, ...], cache_dir: str
) -> CachedLatents:
    autoencoder = autoencoder_from_settings(json.loads(autoencoder_json), path)
    cache_file = None
    if cache_dir:  # "" turns the disk cache off
        # Another dataset, autoencoder (or new weights at its path) or partition: another file.
        source = hashlib.sha256(json.dumps([dataset_key, autoencoder_json, path, _stamp(path)]).encode())
        images = hashlib.sha256(np.asarray(indices, dtype=np.int64).tobytes())
        cache_file = Path(cache_dir) / f"{source.hexdigest()[:20]}-{images.hexdigest()[:20]}.safetensors"
    return CachedLatents(_dataset(*dataset_key), autoencoder, np.asarray(indices), cache_file=cache_file)


def _stamp(path: str) -> list:
    """Names, sizes and times of a local autoencoder's files (a hub id: nothing)."""
    folder = Path(path)
    if not folder.is_dir():
        return []
    stats = {str(f.relative_to(folder)): f.stat() for f in folder.rglob("*") if f.is_file()}
    return sorted([name, stat.st_size, stat.st_mtime_ns] for name, stat in stats.items())


def _autoencoder_path(settings: ClientSettings, node_config: Mapping[str, Any]) -> str:
    # A SuperNode's own node config wins: the autoencoder is a file on its machine.
    return str(node_config.get("autoencoder-path", settings.autoencoder["path"]))


def client_autoencoder(settings: ClientSettings, node_config: Mapping[str, Any]):
    """The frozen autoencoder (latent diffusion), or None."""
    if not settings.autoencoder:
        return None
    return autoencoder_from_settings(settings.autoencoder, _autoencoder_path(settings, node_config))


def build_model(settings: ClientSettings, device: torch.device) -> tuple[UNet2DModel, DDPMScheduler]:
    """The UNet and scheduler described by the server's config."""
    return unet_from_config(settings.unet).to(device), scheduler_from_config(settings.scheduler)


def proximal_term(unet: UNet2DModel, mu: float) -> Regularizer | None:
    """(mu/2)·‖w − w_global‖², anchored at the weights the client received.

    ``None`` for mu = 0, so FedDM-prox with mu = 0 trains exactly as FedDM-vanilla.
    """
    if mu < 0 or not math.isfinite(mu):
        raise ValueError(f"proximal-mu must be a finite number >= 0, got {mu}")
    if mu == 0:
        return None
    anchors = [p.detach().clone() for p in unet.parameters()]

    def term(model: UNet2DModel) -> torch.Tensor:
        squared = sum(torch.sum((p - a) ** 2) for p, a in zip(model.parameters(), anchors))
        return 0.5 * mu * squared

    return term


def _batches(loader: DataLoader) -> Iterator[torch.Tensor]:
    while True:  # cycle: local steps may exceed one pass over a small partition
        yield from loader


@contextlib.contextmanager
def seeded_global_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's global generator (dropout draws from it) inside the block, restoring it after."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def local_train(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    dataset: LabeledImages,
    indices: np.ndarray,
    settings: ClientSettings,
    *,
    seed: int,
    regularizer: Regularizer | None = None,
    precision: Precision = FP32,
    dataloader_workers: int = 0,
) -> tuple[float, int]:
    """Train ``unet`` in place on ``dataset[indices]``; returns (mean loss, steps).

    Everything random (order, noise, timesteps, dropout) follows ``seed``. The
    forward passes run in ``precision`` (the weights stay fp32); the UNet and
    the batches take ``settings.memory_format`` (``auto``: channels-last on a
    GPU) and the losses are read once, at the end, so the loop never waits for
    the GPU; ``settings.compile`` compiles the UNet with ``torch.compile`` first.
    """
    device = next(unet.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    on_gpu = device.type == "cuda"
    loader = DataLoader(
        Subset(dataset, indices.tolist()),
        batch_size=settings.batch_size,
        shuffle=True,
        generator=generator,
        drop_last=len(indices) >= settings.batch_size,
        num_workers=dataloader_workers,
        pin_memory=on_gpu,
    )
    steps = settings.local_steps
    if settings.local_epochs > 0:
        steps = settings.local_epochs * len(loader)
    memory_format = resolve_memory_format(settings.memory_format, device)
    unet.to(memory_format=memory_format)
    if settings.compile:
        unet.compile()  # in place: the state dict keeps its names
    optimizer = make_optimizer(unet, lr=settings.lr, weight_decay=settings.weight_decay)
    scaler = precision.grad_scaler()
    total = torch.zeros((), device=device)
    batches = _batches(loader)
    with seeded_global_rng(seed, device):
        # A bar on terminals only (disable=None); in Ray workers and CI logs it stays quiet.
        for _ in tqdm(range(steps), desc="local training", leave=False, disable=None, mininterval=2):
            images = next(batches).to(device, non_blocking=on_gpu, memory_format=memory_format)
            total += train_step(
                unet,
                scheduler,
                optimizer,
                images,
                generator=generator,
                max_grad_norm=settings.max_grad_norm,
                regularizer=regularizer,
                precision=precision,
                scaler=scaler,
            )
    unet.to(memory_format=torch.contiguous_format)  # the state dict goes on the wire as plain arrays
    return total.item() / steps, steps


@torch.no_grad()
def local_evaluate(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    dataset: LabeledImages,
    indices: np.ndarray,
    settings: ClientSettings,
    *,
    seed: int,
    precision: Precision = FP32,
) -> tuple[float, int]:
    """Denoising loss on held-out images with fixed noise, forward passes in ``precision``; returns (loss, examples)."""
    indices = indices[: settings.eval_max_examples]
    if len(indices) == 0:
        raise ValueError("this client has no held-out images; raise eval_fraction")
    device = next(unet.parameters()).device
    unet.eval()
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(Subset(dataset, indices.tolist()), batch_size=max(settings.batch_size, 64))
    total = torch.zeros((), device=device)
    with precision.autocast():
        for images in loader:
            total += denoising_loss(unet, scheduler, images.to(device), generator).float() * len(images)
    return total.item() / len(indices), len(indices)
