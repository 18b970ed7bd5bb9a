"""Server strategies of FedDM, composed of layers on Flower's strategies, and the int8 codec.

Each ``strategy=`` choice is a ``Recipe``: an encoding (what travels), the
aggregator (a Flower strategy class, ``strategies.aggregators``) and
server-side extras (FedDDPM's calibration). The downlink's form
(``strategy.downlink``, ``strategies.downlink``) is the same layer for every
strategy, and privacy (``privacy=``) is a layer of its own. ``build_strategy``
composes them and refuses a combination that cannot work, naming both choices
and why.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from strategies.accounting import RoundFailedError
from strategies.aggregators import AGGREGATORS
from strategies.downlink import DOWNLINK_MODES, Downlink
from strategies.encoding import Encoding
from strategies.extras import Extra, ProximalTerm
from strategies.fedddpm import Calibration, StallCalibration
from strategies.partial import PartialParts
from strategies.privacy import CentralDP
from strategies.privacy_budget import PrivacyBudget, PrivacyBudgetSpent
from strategies.quant import Int8Updates
from strategies.reply_checks import ReplyChecks
from strategies.sampling import Sampling
from strategies.secagg import SecAggPlus
from strategies.strategy import FedDMStrategy


@functools.cache
def composed_class(flower_class: type) -> type:
    """``FedDMStrategy`` on top of ``flower_class`` (one class per Flower strategy, made once)."""
    return type(
        f"FedDM{flower_class.__name__}",
        (FedDMStrategy, flower_class),
        {"__doc__": f"FedDM's layers on Flower's ``{flower_class.__name__}``.", "__module__": __name__},
    )


@dataclass(frozen=True)
class Recipe:
    """The layers of one ``strategy=`` choice (its settings: ``conf/schema.py``)."""

    encoding: type[Encoding] = Encoding
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
    "prox": Recipe(extras=(ProximalTerm,)),
    "quant": Recipe(encoding=Int8Updates),
    "partial": Recipe(encoding=PartialParts),
    "fedddpm": Recipe(extras=(Calibration,)),
    "fedddpm_plus": Recipe(extras=(StallCalibration,)),
}
PRIVACY_MODES = ("none", "dp_server", "dp_client", "secagg")


def composition_errors(
    strategy: str, privacy: str = "none", aggregator: str = "fedavg", downlink: str = "weights"
) -> list[str]:
    """Why the chosen layers cannot work together, one line per clash naming both choices; [] if they can."""
    if strategy not in RECIPES or aggregator not in AGGREGATORS or downlink not in DOWNLINK_MODES:
        return []  # unknown names are reported by the config check
    errors = []
    recipe, agg = RECIPES[strategy], AGGREGATORS[aggregator]
    if privacy != "none" and recipe.privacy_conflict(privacy):
        works = [n for n, r in RECIPES.items() if r.privacy_conflict(privacy) is None]
        errors.append(
            f"privacy={privacy} works with strategy {' | '.join(works)}, not strategy={strategy}: "
            + recipe.privacy_conflict(privacy)
        )
    if recipe.encoding.aggregator_conflict(agg):
        works = [n for n, a in AGGREGATORS.items() if recipe.encoding.aggregator_conflict(a) is None]
        errors.append(
            f"strategy={strategy} works with aggregator {' | '.join(works)}, not aggregator={aggregator}: "
            + recipe.encoding.aggregator_conflict(agg)
        )
    if privacy != "none" and agg.privacy_conflict(privacy):
        works = [n for n, a in AGGREGATORS.items() if a.privacy_conflict(privacy) is None]
        errors.append(
            f"privacy={privacy} works with aggregator {' | '.join(works)}, not aggregator={aggregator}: "
            + agg.privacy_conflict(privacy)
        )
    if privacy != "none" and Downlink.mode_privacy_conflict(downlink, privacy):
        works = [m for m in DOWNLINK_MODES if Downlink.mode_privacy_conflict(m, privacy) is None]
        errors.append(
            f"privacy={privacy} works with strategy.downlink {' | '.join(works)}, not "
            f"strategy.downlink={downlink}: " + Downlink.mode_privacy_conflict(downlink, privacy)
        )
    return errors


def _cells(conflicts: list[str | None]) -> str:
    return " | ".join(f"no: {reason}" if reason else "yes" for reason in conflicts)


def combination_table() -> str:
    """The README's tables (markdown) of which layers combine, from the layers' own conflicts.

    Strategy x privacy (with ``aggregator=fedavg``), then aggregator x the
    strategies and privacy modes that restrict it, then downlink x privacy
    (the downlink works with every strategy and aggregator).
    """
    modes = [m for m in PRIVACY_MODES if m != "none"]
    lines = [
        "| strategy | `privacy=none` | " + " | ".join(f"`{m}`" for m in modes) + " |",
        "|---|---|" + "---|" * len(modes),
    ]
    for name, recipe in RECIPES.items():
        lines.append(f"| `{name}` | yes | " + _cells([recipe.privacy_conflict(m) for m in modes]) + " |")
    encodings: dict[type, list[str]] = {}  # one column per encoding, naming its strategies
    for name, recipe in RECIPES.items():
        encodings.setdefault(recipe.encoding, []).append(f"`{name}`")
    lines += [
        "",
        "| aggregator | kind | "
        + " | ".join(", ".join(names) for names in encodings.values())
        + " | "
        + " | ".join(f"`{m}`" for m in modes)
        + " |",
        "|---|---|" + "---|" * (len(encodings) + len(modes)),
    ]
    for name, agg in AGGREGATORS.items():
        row = [e.aggregator_conflict(agg) for e in encodings] + [agg.privacy_conflict(m) for m in modes]
        lines.append(f"| `{name}` | {agg.kind} | " + _cells(row) + " |")
    lines += [
        "",
        "| `strategy.downlink` | `privacy=none` | " + " | ".join(f"`{m}`" for m in modes) + " |",
        "|---|---|" + "---|" * len(modes),
    ]
    for mode in DOWNLINK_MODES:
        lines.append(
            f"| `{mode}` | yes | " + _cells([Downlink.mode_privacy_conflict(mode, m) for m in modes]) + " |"
        )
    return "\n".join(lines)


def privacy_layers(
    privacy: Mapping[str, Any] | None, num_clients: int = 1, reply_checks: ReplyChecks | None = None
) -> dict[str, Any]:
    """``privacy``, ``privacy_budget`` and ``secure_aggregation`` arguments of a FedDM strategy.

    From the ``privacy=`` config; central DP's budget also depends on the clients
    (``num_clients``) and on how replies are weighed and screened (``reply_checks``).
    """
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
        checks = reply_checks or ReplyChecks()
        return {
            "privacy": CentralDP(name, float(privacy["clipping_norm"]), float(privacy["noise_multiplier"])),
            "privacy_budget": PrivacyBudget.from_config(
                privacy, num_clients, checks.weighting, checks.max_update_norm_ratio
            ),
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
    aggregator: Mapping[str, Any] | None = None,
    reply_checks: ReplyChecks | None = None,
    evaluate_every: int = 1,
    last_round: int = 0,
    clients_per_round: int | None = None,
    eval_clients_per_round: int | None = None,
    over_select: float = 0.0,
    min_replies: int | None = None,
) -> FedDMStrategy:
    """The strategy ``strategy['name']`` with ``privacy`` and ``aggregator``, and its client sampling.

    The three are the ``strategy=``, ``privacy=`` and ``aggregator=`` configs
    (``conf/schema.py``; no ``aggregator``: FedAvg). ``reply_checks`` bounds what
    one reply may claim and send (default: ``ReplyChecks()``).

    ``clients_per_round`` of the connected clients train each round and
    ``eval_clients_per_round`` (None: as many as train) evaluate, drawn with
    ``seed`` and the round (``strategies.sampling``); None: every connected
    client. A round starts once ``min_clients`` (default ``num_clients``) nodes
    are connected, so it can go on after a node has failed. ``over_select``
    draws ceil(clients_per_round x (1 + over_select)) clients to train, at most
    ``min_clients``, and every reply that arrives by the deadline is aggregated;
    a round with fewer than ``min_replies`` (None: 1) aggregatable replies fails. ``seed`` and
    ``client_generation`` (what clients that keep parts of the model generate
    for FID) go to the partial encoding.
    Clients evaluate on rounds divisible by ``evaluate_every`` and on ``last_round``.
    ``ValueError`` for an unknown name or a combination that cannot work.
    """
    name = strategy.get("name")
    if name not in RECIPES:
        raise ValueError(f"strategy={name!r} is unknown; choose one of {sorted(RECIPES)}")
    aggregator = aggregator or {"name": "fedavg"}
    if aggregator.get("name") not in AGGREGATORS:
        raise ValueError(
            f"aggregator={aggregator.get('name')!r} is unknown; choose one of {list(AGGREGATORS)}"
        )
    downlink = Downlink.from_config(strategy)
    conflicts = composition_errors(
        name, (privacy or {}).get("name", "none"), aggregator["name"], downlink.mode
    )
    if conflicts:
        raise ValueError("; ".join(conflicts))
    recipe, nodes, agg = RECIPES[name], min_clients or num_clients, AGGREGATORS[aggregator["name"]]
    if min_replies is not None and (
        isinstance(min_replies, bool) or not isinstance(min_replies, int) or min_replies < 1
    ):
        raise ValueError(f"min_replies={min_replies!r} must be null or an integer >= 1")
    sampling = Sampling(clients_per_round, eval_clients_per_round, seed=seed, over_select=over_select)
    encoding = recipe.encoding.from_config(
        strategy, seed=seed, client_generation=client_generation, whole_models=agg.kind == "optimizer"
    )
    return composed_class(agg.flower_class)(
        encoding=encoding,
        downlink=downlink,
        aggregator=agg,
        reply_checks=reply_checks,
        extras=tuple(extra.from_config(strategy) for extra in recipe.extras),
        **privacy_layers(privacy, num_clients, reply_checks),
        evaluate_every=evaluate_every,
        last_round=last_round,
        sampling=sampling,
        min_replies=min_replies or 1,
        **sampling.flower_options(nodes),
        **agg.options(aggregator),
    )


__all__ = [
    "AGGREGATORS",
    "PRIVACY_MODES",
    "RECIPES",
    "Calibration",
    "Downlink",
    "Encoding",
    "Extra",
    "ProximalTerm",
    "FedDMStrategy",
    "Int8Updates",
    "PartialParts",
    "PrivacyBudget",
    "PrivacyBudgetSpent",
    "Recipe",
    "RoundFailedError",
    "Sampling",
    "StallCalibration",
    "build_strategy",
    "combination_table",
    "composition_errors",
    "composed_class",
]
