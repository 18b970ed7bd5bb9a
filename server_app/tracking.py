"""Experiment tracking: per-round metrics and sample grids through one interface.

A :class:`Tracker` wraps the run's :class:`RunFolder`. ``metrics.jsonl`` and
``samples/round_NNNN.png`` are always written, in their usual format; the sinks
chosen by the ``tracking`` config group get the same data as well:

* ``none``: nothing else;
* ``tensorboard``: a scalar per numeric metric and the sample grid as an image,
  step = round, event files in ``RUN_DIR/tensorboard/``;
* ``wandb``: the same in a Weights & Biases run (offline by default), files in
  ``RUN_DIR/wandb/``; needs the optional ``wandb`` package (``feddm[wandb]``).

A new sink is one class with the three methods of :class:`Sink` and an entry in
``SINKS``.
"""

from __future__ import annotations

import hashlib
import numbers
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from server_app.run_folder import RunFolder

GRID_TAG = "samples"  # the sample grid's name in TensorBoard and W&B


class Sink(Protocol):
    """Where a :class:`Tracker` sends what it logs besides the run folder."""

    def metrics(self, step: int, scalars: Mapping[str, float]) -> None:
        """Record numeric metrics of round ``step`` (keys like ``eval_loss``, ``fid_clients/0``)."""

    def image(self, tag: str, step: int, image: np.ndarray) -> None:
        """Record an H x W x 3 uint8 image of round ``step``."""

    def close(self) -> None:
        """Write out what is buffered and release files and processes."""


def flatten_scalars(row: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """The numeric values of a metrics row as ``(key, value)``; nested dicts give ``outer/inner`` keys.

    Booleans, strings, lists and None are skipped: they are no curves.
    """
    for key, value in row.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from flatten_scalars(value, prefix=f"{name}/")
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            yield name, float(value)


class TensorBoardSink:
    """Scalars and images in ``RUN_DIR/tensorboard/`` via ``torch.utils.tensorboard``."""

    def __init__(self, log_dir: Path, purge_step: int | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:  # torch raises this when the tensorboard package is missing
            raise ImportError(
                "tracking=tensorboard needs the tensorboard package: pip install 'feddm[tracking]'"
            ) from error
        # purge_step: on resume, TensorBoard hides what the interrupted run logged at
        # rounds >= purge_step, as those rounds are trained again (and logged anew).
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def metrics(self, step: int, scalars: Mapping[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()  # rounds are minutes apart: show each at once, not after flush_secs

    def image(self, tag: str, step: int, image: np.ndarray) -> None:
        self.writer.add_image(tag, image, global_step=step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def wandb_run_id(run_dir: Path) -> str:
    """A W&B run id derived from the run folder's name (16 hex digits).

    The same folder always gets the same id, so a resumed run continues its W&B
    run; hashing keeps the id free of characters W&B does not allow.
    """
    return hashlib.sha256(run_dir.name.encode("utf-8")).hexdigest()[:16]


def _import_wandb():
    try:
        import wandb
    except ImportError as error:  # also when sys.modules["wandb"] is None
        raise ImportError(
            "tracking=wandb needs the wandb package: pip install 'feddm[wandb]' "
            "(or choose another sink, e.g. tracking=tensorboard)"
        ) from error
    return wandb


class WandbSink:
    """Scalars and images in a Weights & Biases run whose files are in ``RUN_DIR/wandb/``.

    Offline, every start (and resume) of the run folder is its own
    ``offline-run-*`` folder. Online, a resumed run continues the same W&B run,
    but W&B drops what is logged at a step below the one it saw last: rounds
    redone after an interruption keep their first values there.
    """

    def __init__(self, cfg: Mapping[str, Any], run: RunFolder, run_config: dict | None) -> None:
        self.wandb = _import_wandb()  # imported only here: wandb is an optional extra
        self.run = self.wandb.init(
            project=cfg.get("project", "feddm"),
            entity=cfg.get("entity"),
            mode=cfg.get("mode", "offline"),
            dir=str(run.path),
            config=run_config,
            name=run.path.name,
            resume="allow",
            id=wandb_run_id(run.path),
        )

    def metrics(self, step: int, scalars: Mapping[str, float]) -> None:
        self.run.log(dict(scalars), step=step)

    def image(self, tag: str, step: int, image: np.ndarray) -> None:
        self.run.log({tag: self.wandb.Image(image)}, step=step)

    def close(self) -> None:
        self.run.finish()
        # finish() leaves W&B's service process running until Python exits; a run
        # is over here, and a server process may live on (tests, sweeps).
        teardown = getattr(self.wandb, "teardown", None)
        if teardown is not None:
            teardown()


class Tracker:
    """Logs metrics rows and sample grids to the run folder and to the configured sinks."""

    def __init__(self, run: RunFolder, sinks: list[Sink] | None = None) -> None:
        self.run = run
        self.sinks = list(sinks or [])

    def log_round(self, row: dict[str, Any]) -> None:
        """Append ``row`` to ``metrics.jsonl`` and send its numeric values to the sinks.

        ``row["round"]`` (the server round, 0 for FedDDPM's pretraining) is the step,
        not a scalar. Values keep the row's units (e.g. ``uplink_bytes`` in bytes,
        ``wall_time_s`` in seconds).
        """
        self.run.append_metrics(row)
        if not self.sinks:
            return
        scalars = dict(flatten_scalars({k: v for k, v in row.items() if k != "round"}))
        for sink in self.sinks:
            sink.metrics(int(row["round"]), scalars)

    def log_grid(self, images: torch.Tensor, server_round: int, nrow: int | None = None) -> Path:
        """Save uint8 N x C x H x W images as ``samples/round_NNNN.png`` and send that grid to the sinks."""
        path = self.run.save_grid(images, server_round, nrow)
        if self.sinks:
            # The PNG just written, so every sink shows exactly the saved grid (padding included).
            with Image.open(path) as png:
                grid = np.asarray(png.convert("RGB"))
            for sink in self.sinks:
                sink.image(GRID_TAG, server_round, grid)
        return path

    def close(self) -> None:
        """Flush and close the sinks; later calls do nothing."""
        sinks, self.sinks = self.sinks, []
        errors = []
        for sink in sinks:  # one sink failing to close must not leave the others open
            try:
                sink.close()
            except Exception as error:  # noqa: BLE001 - re-raised below
                errors.append(error)
        if errors:
            raise errors[0]

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _no_sinks(
    cfg: Mapping[str, Any], run: RunFolder, run_config: dict | None, resumed_after: int
) -> list[Sink]:
    return []


def _tensorboard_sinks(
    cfg: Mapping[str, Any], run: RunFolder, run_config: dict | None, resumed_after: int
) -> list[Sink]:
    # A resumed run appends a new events file to the same folder; purge_step hides the
    # interrupted run's events from the first redone round on.
    purge_step = resumed_after + 1 if resumed_after > 0 else None
    return [TensorBoardSink(run.path / "tensorboard", purge_step=purge_step)]


def _wandb_sinks(
    cfg: Mapping[str, Any], run: RunFolder, run_config: dict | None, resumed_after: int
) -> list[Sink]:
    return [WandbSink(cfg, run, run_config)]


SinkFactory = Callable[[Mapping[str, Any], RunFolder, "dict | None", int], list[Sink]]
# tracking.name -> the sinks it builds (a new sink: its class and an entry here).
SINKS: dict[str, SinkFactory] = {"none": _no_sinks, "tensorboard": _tensorboard_sinks, "wandb": _wandb_sinks}


def build_tracker(
    tracking_cfg: Mapping[str, Any] | None,
    run: RunFolder,
    run_config: dict | None = None,
    resumed_after: int = 0,
) -> Tracker:
    """The tracker of ``tracking_cfg`` (the ``tracking`` config group) for ``run``.

    ``tracking_cfg["name"]`` is one of ``SINKS`` (none | tensorboard | wandb); a
    missing group (None, e.g. a run folder older than the group) means ``none``.
    ``run_config`` is the plain resolved config, shown by W&B. ``resumed_after``
    is the round a resumed run continues after (its checkpoint's), 0 for a new
    run: TensorBoard then hides what the interrupted run logged for later rounds.
    """
    cfg = tracking_cfg if tracking_cfg is not None else {"name": "none"}
    name = cfg.get("name")
    if name not in SINKS:
        raise ValueError(f"tracking.name must be one of {' | '.join(SINKS)}; got {name!r}")
    return Tracker(run, SINKS[name](cfg, run, run_config, resumed_after))
