"""FedDM-vanilla: Federated Averaging of full UNet weights, weighted by num-examples."""

from __future__ import annotations

from logging import INFO

from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from strategies.accounting import RoundAccounting


class FedDMVanilla(RoundAccounting, FedAvg):
    """FedAvg (McMahan et al. 2017) applied to a diffusion UNet, as in FedDM.

    Clients reply with their full local weights and ``num-examples``; the new
    global model is the example-weighted mean. Replies whose arrays do not match
    the global model are left out of the mean (see ``RoundAccounting``).
    """

    def summary(self) -> None:
        """Log the strategy's settings."""
        log(INFO, "\t├──> FedDM-vanilla (FedAvg of full weights)")
        super().summary()
