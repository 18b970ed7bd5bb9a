"""Server strategies of FedDM, built on Flower's strategies, and the int8 codec."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from strategies.accounting import RoundAccounting, RoundFailedError
from strategies.fedddpm import FedDDPM, FedDDPMPlus
from strategies.partial import FedDMPartial
from strategies.privacy import DP_STRATEGIES, CentralDP
from strategies.prox import FedDMProx
from strategies.quant import FedDMQuant
from strategies.secagg import SECAGG_STRATEGIES, SecAggPlus
from strategies.vanilla import FedDMVanilla

STRATEGIES = {
    "vanilla": FedDMVanilla,
    "prox": FedDMProx,
    "quant": FedDMQuant,
    "partial": FedDMPartial,
    "fedddpm": FedDDPM,
    "fedddpm_plus": FedDDPMPlus,
}


def strategy_options(strategy: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor arguments of the named strategy from its config group."""
    name = strategy.get("name")
    if name == "prox":
        return {"proximal_mu": float(strategy["mu"])}
    if name == "quant":
        return {
            "bits": int(strategy["bits"]),
            "granularity": str(strategy["granularity"]),
            "stochastic_rounding": bool(strategy["stochastic_rounding"]),
            "error_feedback": bool(strategy["error_feedback"]),
            "quantize_downlink": bool(strategy["quantize_downlink"]),
        }
    if name == "partial":
        return {
            "preset": str(strategy["preset"]),
            "shared": list(strategy["shared"]) if strategy.get("shared") else None,
            "split_ways": int(strategy["split_ways"]),
            "quantize": bool(strategy["quantize"]),
            "bits": int(strategy["bits"]),
            "granularity": str(strategy["granularity"]),
            "stochastic_rounding": bool(strategy["stochastic_rounding"]),
            "error_feedback": bool(strategy["error_feedback"]),
        }
    if name in ("fedddpm", "fedddpm_plus"):
        options = {
            "pretrain_steps": int(strategy["pretrain_steps"]),
            "aux_samples": int(strategy["aux_samples"]),
            "aux_allocation": str(strategy["aux_allocation"]),
        }
        if name == "fedddpm_plus":
            options |= {
                "signal": str(strategy["signal"]),
                "window": int(strategy["window"]),
                "threshold": float(strategy["threshold"]),
            }
        return options
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
) -> RoundAccounting:
    """The strategy named by ``strategy['name']`` (``conf/strategy``), sampling all clients.

    Every connected client trains and evaluates each round; a round starts once
    ``min_clients`` (default ``num_clients``) nodes are connected, so it can go
    on after a node has failed. ``seed`` and ``client_generation`` (what clients
    that keep parts of the model generate for FID) go to the partial strategy;
    ``privacy`` (``conf/privacy``) adds central DP or secure aggregation
    (SecAgg+) to vanilla and prox. Clients evaluate on rounds divisible by
    ``evaluate_every`` and on ``last_round``.
    """
    num_clients = min_clients or num_clients
    name = strategy.get("name")
    if name not in STRATEGIES:
        raise ValueError(f"strategy={name!r} is unknown; choose one of {sorted(STRATEGIES)}")
    dp = secure = None
    if privacy and privacy.get("name") == "secagg":
        if name not in SECAGG_STRATEGIES:
            raise ValueError(
                f"privacy=secagg works with strategy {' | '.join(SECAGG_STRATEGIES)}, not {name!r}"
            )
        secure = SecAggPlus(
            privacy["num_shares"],
            privacy["reconstruction_threshold"],
            float(privacy["clipping_range"]),
            float(privacy["max_weight"]),
        )
    elif privacy and privacy.get("name", "none") != "none":
        if name not in DP_STRATEGIES:
            raise ValueError(
                f"privacy={privacy['name']} works with strategy {' | '.join(DP_STRATEGIES)}, not {name!r}"
            )
        dp = CentralDP(
            str(privacy["name"]), float(privacy["clipping_norm"]), float(privacy["noise_multiplier"])
        )
    strategy = STRATEGIES[name](
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=num_clients,
        min_evaluate_nodes=num_clients,
        min_available_nodes=num_clients,
        **strategy_options(strategy),
        **({"seed": seed, "client_generation": client_generation} if name == "partial" else {}),
    )
    strategy.privacy, strategy.secure_aggregation = dp, secure
    strategy.evaluate_every, strategy.last_round = int(evaluate_every), int(last_round)
    return strategy


__all__ = [
    "STRATEGIES",
    "FedDDPM",
    "FedDDPMPlus",
    "FedDMPartial",
    "FedDMProx",
    "FedDMQuant",
    "FedDMVanilla",
    "RoundAccounting",
    "RoundFailedError",
    "build_strategy",
]
