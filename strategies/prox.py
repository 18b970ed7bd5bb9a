"""FedDM-prox: FedAvg with a proximal term on the clients (FedProx, Li et al. 2020)."""

from __future__ import annotations

from logging import INFO

from flwr.serverapp.strategy import FedProx
from flwr.supercore import log

from strategies.accounting import RoundAccounting


class FedDMProx(RoundAccounting, FedProx):
    """Flower's ``FedProx`` for the diffusion UNet.

    The strategy puts ``proximal-mu`` into every training ConfigRecord; clients
    add (mu/2)·‖w − w_global‖² to the diffusion loss (the square is part of the
    term; mu = 0 trains exactly as FedDM-vanilla). Aggregation is FedAvg's.
    """

    def summary(self) -> None:
        """Log the strategy's settings."""
        log(INFO, "\t├──> FedDM-prox (proximal term on the clients)")
        super().summary()
