"""Server strategies of FedDM, composed of layers on Flower's strategies, and the int8 codec.

Each ``strategy=`` choice is a ``Recipe``: an encoding (what travels), the
aggregator (a Flower strategy class, ``strategies.aggregators``) and
server-side extras (FedDDPM's calibration). Privacy (``privacy=``) is a layer
of its own. ``build_strategy`` composes them and refuses a combination that
cannot work, naming both choices and why.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from strategies.accounting import RoundFailedError
from strategies.aggregators import AGGREGATORS, composed_class
from strategies.encoding import Encoding
from strategies.fedddpm import Calibration, StallCalibration
from strategies.partial import PartialParts
from strategies.privacy import CentralDP
from strategies.quant import Int8Updates
from strategies.secagg import SecAggPlus
from strategies.strategy import FedDMStrategy


@dataclass(frozen=True)
class Recipe:
    """The layers of one ``strategy=`` choice (its settings: ``conf/schema.py``)."""

    encoding: type[Encoding] = Encoding
    aggregator: str = "fedavg"
    extras: tuple[type, ...] = ()

    def privacy_conflict(self, mode: str) -> str | None:
        """Why privacy ``mode`` cannot work with these layers (the first layer that objects), or None."""
        for layer in (self.encoding, *self.extras):
            reason = layer.privacy_conflict(mode)
            if reason:
                return reason
        return None


RECIPES: dict[str, Recipe] = {
    "vanilla": Recipe(),
    "prox": Recipe(aggregator="fedprox"),
    "quant": Recipe(encoding=Int8Updates),
    "partial": Recipe(encoding=PartialParts),
    "fedddpm": Recipe(extras=(Calibration,)),
    "fedddpm_plus": Recipe(extras=(StallCalibration,)),
}
PRIVACY_MODES = ("none", "dp_server", "dp_client", "secagg")


def composition_error(strategy: str, privacy: str) -> str | None:
    """Why ``strategy`` and ``privacy`` cannot be combined (naming both), or None if they can."""
    if privacy == "none" or strategy not in RECIPES:
        return None
    reason = RECIPES[strategy].privacy_conflict(privacy)
    if reason is None:
        return None
    works = [name for name, recipe in RECIPES.items() if recipe.privacy_conflict(privacy) is None]
    return f"privacy={privacy} works with strategy {' | '.join(works)}, not strategy={strategy}: {reason}"


def combination_table() -> str:
    """The README's strategy x privacy table (markdown), from the layers' own ``privacy_conflict``."""
    modes = [m for m in PRIVACY_MODES if m != "none"]
    lines = [
        "| strategy | `privacy=none` | " + " | ".join(f"`{m}`" for m in modes) + " |",
        "|---|---|" + "---|" * len(modes),
    ]
    for name, recipe in RECIPES.items():
        cells = [f"no: {recipe.privacy_conflict(m)}" if recipe.privacy_conflict(m) else "yes" for m in modes]
        lines.append(f"| `{name}` | yes | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def privacy_layers(privacy: Mapping[str, Any] | None) -> dict[str, Any]:
    """``privacy`` and ``secure_aggregation`` arguments of a FedDM strategy from the ``privacy=`` config."""
    name = (privacy or {}).get("name", "none")
    if name == "secagg":
        return {
            "secure_aggregation": SecAggPlus(
                privacy["num_shares"],
                privacy["reconstruction_threshold"],
                float(privacy["clipping_range"]),
                float(privacy["max_weight"]),
            )
        }
    if name in ("dp_server", "dp_client"):
        return {
            "privacy": CentralDP(name, float(privacy["clipping_norm"]), float(privacy["noise_multiplier"]))
        }
    return {}


def build_strategy(
    strategy: Mapping[str, Any],
    *,
    num_clients: int,
    min_clients: int | None = None,
    seed: int = 0,
    client_generation: dict[str, Any] | None = None,
    privacy: Mapping[str, Any] | None = None,
    evaluate_every: int = 1,
    last_round: int = 0,
) -> FedDMStrategy:
    """The strategy ``strategy['name']`` (``strategy=`` in ``conf/schema.py``) with ``privacy``, sampling all clients.

    Every connected client trains and evaluates each round; a round starts once
    ``min_clients`` (default ``num_clients``) nodes are connected, so it can go
    on after a node has failed. ``seed`` and ``client_generation`` (what clients
    that keep parts of the model generate for FID) go to the partial encoding.
    Clients evaluate on rounds divisible by ``evaluate_every`` and on ``last_round``.
    ``ValueError`` for an unknown name or a combination that cannot work.
    """
    name = strategy.get("name")
    if name not in RECIPES:
        raise ValueError(f"strategy={name!r} is unknown; choose one of {sorted(RECIPES)}")
    conflict = composition_error(name, (privacy or {}).get("name", "none"))
    if conflict:
        raise ValueError(conflict)
    recipe, nodes = RECIPES[name], min_clients or num_clients
    aggregator = AGGREGATORS[recipe.aggregator]
    return composed_class(aggregator.flower_class)(
        encoding=recipe.encoding.from_config(strategy, seed=seed, client_generation=client_generation),
        extras=tuple(extra.from_config(strategy) for extra in recipe.extras),
        **privacy_layers(privacy),
        evaluate_every=evaluate_every,
        last_round=last_round,
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=nodes,
        min_evaluate_nodes=nodes,
        min_available_nodes=nodes,
        **aggregator.options(strategy),
    )


__all__ = [
    "AGGREGATORS",
    "PRIVACY_MODES",
    "RECIPES",
    "Calibration",
    "Encoding",
    "FedDMStrategy",
    "Int8Updates",
    "PartialParts",
    "Recipe",
    "RoundFailedError",
    "StallCalibration",
    "build_strategy",
    "combination_table",
    "composition_error",
]
