"""FedDDPM and FedDDPM+ (Peng et al. 2025, arXiv 2503.06426): server calibration on synthetic data.

Before federated training every client trains a diffusion model of its own on
its own data (``pretrain_steps``, starting from the initial global model) and
uploads it once. The server samples an auxiliary dataset from these local
models, which stands in for the global data distribution. Then training runs
as FedAvg, and

* **FedDDPM** fine-tunes the aggregated model on the auxiliary data for
  ``calibration_steps`` after every aggregation, before sending it out;
* **FedDDPM+** does so only when progress stalls: when a progress signal
  (``eval_loss``, ``train_loss`` or ``fid``) improved by less than
  ``threshold`` (relative) over the last ``window`` observations. It then
  calibrates once and waits for a full new window before it can fire again
  (one-shot correction per stall).

The strategy builds the pretraining messages and checks the replies; the
ServerApp sends them, generates and caches the auxiliary images and gives the
strategy a ``calibrate(arrays, server_round)`` function.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from logging import INFO

import numpy as np
import torch
from diffusers import DDPMScheduler
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from models import unet_from_config
from models.diffusion import train_on_images
from strategies.accounting import RoundAccounting, message_nbytes, partition_of

SIGNALS = ("eval_loss", "train_loss", "fid")
AUX_ALLOCATIONS = ("balanced", "weighted")

Calibrate = Callable[[ArrayRecord, int], ArrayRecord]


class FedDDPM(RoundAccounting, FedAvg):
    """FedAvg, then a server fine-tune on auxiliary data after every aggregation.

    Parameters
    ----------
    pretrain_steps : int
        Local steps each client trains its own model for, before federated training.
    aux_samples : int
        Auxiliary images the server generates from the local models.
    aux_allocation : str
        ``balanced`` (as many images from each local model) or ``weighted`` (by
        each client's number of training examples).
    **kwargs
        Passed to Flower's ``FedAvg``.
    """

    def __init__(
        self, *, pretrain_steps: int = 200, aux_samples: int = 512, aux_allocation: str = "balanced", **kwargs
    ) -> None:
        super().__init__(**kwargs)
        if aux_allocation not in AUX_ALLOCATIONS:
            raise ValueError(f"aux_allocation={aux_allocation!r} is not one of {AUX_ALLOCATIONS}")
        self.pretrain_steps = pretrain_steps
        self.aux_samples = aux_samples
        self.aux_allocation = aux_allocation
        self.calibrate: Calibrate | None = None

    def summary(self) -> None:
        """Log the strategy's settings."""
        log(
            INFO,
            "\t├──> FedDDPM: %d local pretraining steps, %d auxiliary images (%s)",
            self.pretrain_steps,
            self.aux_samples,
            self.aux_allocation,
        )
        super().summary()

    # -- before federated training: the clients' own models ----------------------
    def configure_pretrain(self, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> list[Message]:
        """A training message to every connected node: train your own model for ``pretrain_steps``."""
        config = ConfigRecord(dict(config))
        config.update({"server-round": 0, "local-steps": self.pretrain_steps, "local-epochs": 0})
        nodes = sorted(grid.get_node_ids())
        messages = [
            Message(
                content=RecordDict({"arrays": arrays, "config": config}),
                dst_node_id=node,
                message_type="train",
            )
            for node in nodes
        ]
        self._log_round(0, downlink_bytes=sum(message_nbytes(m) for m in messages), num_sampled=len(messages))
        return messages

    def local_models(
        self, replies: list[Message], reference: ArrayRecord
    ) -> dict[int, tuple[ArrayRecord, int]]:
        """The valid uploaded local models by partition id, with their example counts.

        Checked like training replies (and counted as round 0); ``RoundFailedError``
        if none is usable.
        """
        self._global_arrays = reference
        accepted = self.accepted_replies(0, replies)
        return {
            partition_of(m): (m.content["arrays"], int(m.content["metrics"]["num-examples"]))
            for m in accepted
        }

    def allocation(self, examples: dict[int, int]) -> dict[int, int]:
        """Auxiliary images to draw from each local model (they sum to ``aux_samples``)."""
        ids = list(examples)
        if self.aux_allocation == "balanced":
            shares = np.full(len(ids), 1.0 / len(ids))
        else:
            counts = np.array([examples[i] for i in ids], dtype=float)
            shares = counts / counts.sum()
        exact = shares * self.aux_samples
        counts = np.floor(exact).astype(int)
        for i in np.argsort(counts - exact)[: self.aux_samples - counts.sum()]:  # largest remainders
            counts[i] += 1
        return {i: int(c) for i, c in zip(ids, counts)}

    # -- federated training ---------------------------------------------------------
    def should_calibrate(self, server_round: int) -> bool:
        """FedDDPM: after every aggregation."""
        return True

    def apply_aggregate(self, aggregated: ArrayRecord) -> ArrayRecord:
        """Fine-tune the aggregated model on the auxiliary data (when it is time to)."""
        if self.calibrate is None:
            raise RuntimeError("FedDDPM needs its auxiliary data before training (calibrate is unset)")
        if not self.should_calibrate(self._round):
            return aggregated
        self._log_round(self._round, calibrated=1)
        return self.calibrate(aggregated, self._round)


class FedDDPMPlus(FedDDPM):
    """FedDDPM+: calibrate once when the progress signal stalls.

    Parameters
    ----------
    signal : str
        ``eval_loss`` (clients' held-out loss), ``train_loss`` or ``fid``.
    window : int
        Observations over which progress is measured.
    threshold : float
        Relative improvement over ``window`` observations below which progress stalls.
    """

    def __init__(
        self, *, signal: str = "eval_loss", window: int = 2, threshold: float = 0.02, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        if signal not in SIGNALS:
            raise ValueError(f"signal={signal!r} is not one of {SIGNALS}")
        self.signal, self.window, self.threshold = signal, window, threshold
        self.history: list[float] = []  # signal values since the last correction

    def observe(self, server_round: int, row: dict) -> None:
        """Take the round's value of the progress signal (metrics.jsonl row).

        A row of a calibrated round starts a new window. The history is part of
        :meth:`state_dict`, so a resumed run continues with the same one.
        """
        if row.get("calibrated"):
            self.history = []
        value = row.get(self.signal)
        if value is not None and math.isfinite(value):
            self.history.append(float(value))

    def state_dict(self) -> dict:
        """The round count and the progress signal's values since the last calibration."""
        return {**super().state_dict(), "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.history = [float(v) for v in state.get("history", [])]

    def should_calibrate(self, server_round: int) -> bool:
        """True once per stall: too little improvement over the last ``window`` observations."""
        if len(self.history) <= self.window:
            return False
        before, now = self.history[-self.window - 1], self.history[-1]
        improvement = (before - now) / abs(before) if before else 0.0
        if improvement >= self.threshold:
            return False
        log(
            INFO,
            "FedDDPM+: %s improved %.2f%% over %d observations (< %.2f%%): one-shot calibration "
            "after round %d",
            self.signal,
            100 * improvement,
            self.window,
            100 * self.threshold,
            server_round,
        )
        self.history = []  # a full new window before the next correction
        return True


def server_calibration(
    unet_config: dict,
    scheduler: DDPMScheduler,
    images: torch.Tensor,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    device: torch.device,
    max_grad_norm: float = 1.0,
) -> Calibrate:
    """``calibrate(arrays, round)``: ``steps`` DDPM training steps on the auxiliary ``images``.

    ``images`` are uint8 N x C x H x W, or (latent diffusion) float latents that
    are already what the UNet is trained on; batches are drawn with a generator
    seeded by (``seed``, round), so a run is reproducible. A fresh AdamW
    optimizer each time.
    """
    data = images.float() / 127.5 - 1.0 if images.dtype == torch.uint8 else images.float()

    def calibrate(arrays: ArrayRecord, server_round: int) -> ArrayRecord:
        unet = unet_from_config(unet_config).to(device)
        unet.load_state_dict(arrays.to_torch_state_dict())
        train_on_images(
            unet,
            scheduler,
            data,
            steps=steps,
            lr=lr,
            batch_size=batch_size,
            seed=(seed, server_round),
            max_grad_norm=max_grad_norm,
        )
        return ArrayRecord({k: v.detach().cpu() for k, v in unet.state_dict().items()})

    return calibrate
