"""FedDDPM and FedDDPM+ (Peng et al. 2025, arXiv 2503.06426): server calibration on synthetic data.

Before federated training every client trains a diffusion model of its own on
its own data (``pretrain_steps``, starting from the initial global model) and
uploads it once. The server samples an auxiliary dataset from these local
models, which stands in for the global data distribution. Then training runs
with the run's aggregator (FedAvg), and

* **FedDDPM** fine-tunes the aggregated model on the auxiliary data for
  ``calibration_steps`` after every aggregation, before sending it out;
* **FedDDPM+** does so only when progress stalls: when a progress signal
  (``eval_loss``, ``train_loss`` or ``fid``) improved by less than
  ``threshold`` (relative) over the last ``window`` observations. It then
  calibrates once and waits for a full new window before it can fire again
  (one-shot correction per stall).

Both are a server-side extra layer of a FedDM strategy (``Calibration``,
``StallCalibration``). The strategy builds the pretraining messages and checks
the replies; the ServerApp sends them, generates and caches the auxiliary
images and gives the layer a ``calibrate(arrays, server_round)`` function.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import ArrayRecord
from flwr.supercore import log

from strategies.extras import Extra

SIGNALS = ("eval_loss", "train_loss", "fid")
AUX_ALLOCATIONS = ("balanced", "weighted")

Calibrate = Callable[[ArrayRecord, int], ArrayRecord]


class Calibration(Extra):
    """FedDDPM: after every aggregation, fine-tune the aggregate on the auxiliary data.

    A server-side extra of a FedDM strategy (``FedDMStrategy(extras=...)``).

    Parameters
    ----------
    pretrain_steps : int
        Local steps each client trains its own model for, before federated training.
    aux_samples : int
        Auxiliary images the server generates from the local models.
    aux_allocation : str
        ``balanced`` (as many images from each local model) or ``weighted`` (by
        each client's number of training examples).
    """

    def __init__(
        self, *, pretrain_steps: int = 200, aux_samples: int = 512, aux_allocation: str = "balanced"
    ) -> None:
        if aux_allocation not in AUX_ALLOCATIONS:
            raise ValueError(f"aux_allocation={aux_allocation!r} is not one of {AUX_ALLOCATIONS}")
        self.pretrain_steps = pretrain_steps
        self.aux_samples = aux_samples
        self.aux_allocation = aux_allocation
        # Set by the ServerApp once the auxiliary data exists (``server_app.auxiliary``).
        self.calibrate: Calibrate | None = None

    @classmethod
    def from_config(cls, strategy: Mapping[str, Any], **options: Any) -> Calibration:
        """From the ``strategy=fedddpm`` config (subclasses pass their own ``options``)."""
        return cls(
            pretrain_steps=int(strategy["pretrain_steps"]),
            aux_samples=int(strategy["aux_samples"]),
            aux_allocation=str(strategy["aux_allocation"]),
            **options,
        )

    def summary(self) -> list[str]:
        """The pretraining and the auxiliary data."""
        return [
            f"FedDDPM: {self.pretrain_steps} local pretraining steps, "
            f"{self.aux_samples} auxiliary images ({self.aux_allocation})"
        ]

    @classmethod
    def privacy_conflict(cls, mode: str) -> str | None:
        """The clients' own models are uploaded once before training, unclipped and unmasked."""
        return "its clients upload their own local models before training, outside any clipping or masking"

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

    def should_calibrate(self, server_round: int) -> bool:
        """FedDDPM: after every aggregation."""
        return True

    def apply(self, arrays: ArrayRecord, server_round: int) -> ArrayRecord | None:
        """The calibrated model when it is time to calibrate, else None (the aggregate stays)."""
        if self.calibrate is None:
            raise RuntimeError("FedDDPM needs its auxiliary data before training (calibrate is unset)")
        if not self.should_calibrate(server_round):
            return None
        return self.calibrate(arrays, server_round)


class StallCalibration(Calibration):
    """FedDDPM+: calibrate once when the progress signal stalls.

    Parameters
    ----------
    signal : str
        ``eval_loss`` (clients' held-out loss), ``train_loss`` or ``fid``.
    window : int
        Observations over which progress is measured.
    threshold : float
        Relative improvement over ``window`` observations below which progress stalls.
    **kwargs
        As for ``Calibration``.
    """

    def __init__(
        self, *, signal: str = "eval_loss", window: int = 2, threshold: float = 0.02, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        if signal not in SIGNALS:
            raise ValueError(f"signal={signal!r} is not one of {SIGNALS}")
        self.signal, self.window, self.threshold = signal, window, threshold
        self.history: list[float] = []  # signal values since the last correction

    @classmethod
    def from_config(cls, strategy: Mapping[str, Any], **options: Any) -> StallCalibration:
        """From the ``strategy=fedddpm_plus`` config."""
        return super().from_config(
            strategy,
            signal=str(strategy["signal"]),
            window=int(strategy["window"]),
            threshold=float(strategy["threshold"]),
            **options,
        )

    def summary(self) -> list[str]:
        """FedDDPM's lines and the stall detection."""
        return [
            *super().summary(),
            f"FedDDPM+: calibrate once when {self.signal} improves by < {100 * self.threshold:.2f}% "
            f"over {self.window} observations",
        ]

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
        """The progress signal's values since the last calibration."""
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        """Continue with the saved history."""
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
