"""Server strategies of FedDM, built on Flower's strategies, and the int8 codec."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from strategies.accounting import RoundAccounting
from strategies.vanilla import FedDMVanilla

STRATEGIES = {"vanilla": FedDMVanilla}


def build_strategy(
    strategy: Mapping[str, Any], *, num_clients: int
) -> RoundAccounting:
    """The strategy named by ``strategy['name']`` (``conf/strategy``), sampling all clients.

    Every connected client trains and evaluates each round; the round waits for
    ``num_clients`` nodes to be connected.
    """
    name = strategy.get("name")
    if name not in STRATEGIES:
        raise ValueError(f"strategy={name!r} is unknown; choose one of {sorted(STRATEGIES)}")
    return STRATEGIES[name](
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=num_clients,
        min_evaluate_nodes=num_clients,
        min_available_nodes=num_clients,
    )


__all__ = ["STRATEGIES", "FedDMVanilla", "RoundAccounting", "build_strategy"]
