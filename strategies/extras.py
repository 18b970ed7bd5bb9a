"""Extras of a FedDM strategy: what a strategy adds besides the encoding, aggregator and privacy.

An extra may tell clients something each round (``train_config``), change the
aggregate on the server (``apply``), watch the finished rounds (``observe``)
and keep state across a resume (``state_dict``). The base class does nothing;
``ProximalTerm`` (FedDM-prox) and FedDDPM's calibrations (``strategies.fedddpm``)
are extras.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord

from strategies.encoding import Layer


class Extra(Layer):
    """No-op hooks; subclasses override what they need."""

    def train_config(self, config: ConfigRecord) -> None:
        """Add what clients need to the training ``config`` (in place)."""

    def apply(self, arrays: ArrayRecord, server_round: int) -> ArrayRecord | None:
        """A changed global model after the aggregate, or None (unchanged)."""
        return None

    def observe(self, server_round: int, row: dict) -> None:
        """The round's finished metrics row."""


class ProximalTerm(Extra):
    """FedProx's client side (Li et al. 2020): clients add (mu/2)·‖w − w_global‖² to the loss.

    The strategy sends ``proximal-mu`` in every training ConfigRecord, as
    Flower's ``FedProx`` does; mu = 0 trains exactly as FedDM-vanilla. The
    server side is whatever aggregator the run uses.
    """

    def __init__(self, mu: float = 0.01) -> None:
        if not (math.isfinite(mu) and mu >= 0):
            raise ValueError(f"mu={mu} must be a finite number >= 0")
        self.mu = float(mu)

    @classmethod
    def from_config(cls, strategy: Mapping[str, Any], **context: Any) -> ProximalTerm:
        """From the ``strategy=prox`` config."""
        return cls(float(strategy["mu"]))

    def summary(self) -> list[str]:
        """The proximal weight."""
        return [f"FedDM-prox: proximal term with mu = {self.mu:g} on the clients"]

    def train_config(self, config: ConfigRecord) -> None:
        """Send mu (read by the client's proximal term)."""
        config["proximal-mu"] = self.mu
