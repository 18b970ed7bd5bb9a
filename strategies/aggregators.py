"""The aggregator layer: the Flower strategy class that turns the checked replies into the average.

A FedDM strategy is this class with ``FedDMStrategy`` (encoding, privacy,
extras, reply checks) placed before it in the method resolution order, so
Flower's own ``aggregate_train`` computes the average from replies that are
already checked and decoded.

To add an aggregator: one ``Aggregator`` entry below, naming Flower's class
and turning its config into that class's constructor arguments.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flwr.serverapp.strategy import FedAvg, FedProx

from strategies.strategy import FedDMStrategy


def _no_options(config: Mapping[str, Any]) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Aggregator:
    """A Flower strategy class and how its constructor arguments come from config.

    ``options(config)`` maps the config that selected the aggregator to keyword
    arguments of ``flower_class`` (beyond the node counts every strategy gets).
    """

    flower_class: type
    options: Callable[[Mapping[str, Any]], dict[str, Any]] = field(default=_no_options)


AGGREGATORS: dict[str, Aggregator] = {
    "fedavg": Aggregator(FedAvg),
    # FedProx aggregates as FedAvg; it sends `proximal-mu` for the clients' proximal term.
    "fedprox": Aggregator(FedProx, lambda config: {"proximal_mu": float(config["mu"])}),
}


@functools.cache
def composed_class(flower_class: type) -> type:
    """``FedDMStrategy`` on top of ``flower_class`` (one class per Flower strategy, made once)."""
    return type(
        f"FedDM{flower_class.__name__}",
        (FedDMStrategy, flower_class),
        {"__doc__": f"FedDM's layers on Flower's ``{flower_class.__name__}``.", "__module__": __name__},
    )
