"""The aggregator layer: the Flower strategy class that turns the checked replies into the new model.

A FedDM strategy is this class with ``FedDMStrategy`` (encoding, privacy,
extras, reply checks) placed before it in the method resolution order
(``strategies.composed_class``), so
Flower's own ``aggregate_train`` computes the aggregate from replies that are
already checked and decoded. Three kinds:

* ``mean``: the example-weighted mean (``FedAvg``);
* ``optimizer``: the mean as a pseudo-gradient step of a server optimizer
  (``FedAvgM``; ``FedAdam``, ``FedYogi``, ``FedAdagrad``: Reddi et al., ICLR
  2021). They need whole models as replies and keep state (momentum, moments)
  that checkpoints save;
* ``robust``: a statistic that one bad reply cannot move far (coordinate-wise
  median, trimmed mean, Krum, Multi-Krum, Bulyan). They need each client's
  reply on its own.

To add an aggregator: one ``Aggregator`` entry in ``AGGREGATORS`` below and its
options (constructor arguments of the Flower class, same names) as a dataclass
in ``conf/schema.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
)
from flwr.serverapp.strategy.fedopt import FedOpt

KINDS = ("mean", "optimizer", "robust")


@dataclass(frozen=True)
class Aggregator:
    """A Flower strategy class and its kind (``KINDS``: what it needs of the replies)."""

    flower_class: type
    kind: str = "mean"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r} is not one of {KINDS}")

    def options(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """Constructor arguments of ``flower_class`` from its ``aggregator=`` config (its keys but ``name``)."""
        return {key: value for key, value in dict(config or {}).items() if key != "name"}

    def privacy_conflict(self, mode: str) -> str | None:
        """Why privacy ``mode`` cannot work with this aggregator, or None."""
        name = self.flower_class.__name__
        if mode in ("dp_server", "dp_client") and self.kind != "mean":
            how = "transforms the mean afterwards" if self.kind == "optimizer" else "does not average"
            return f"DP noise is calibrated to the mean of clipped updates, and {name} {how}"
        if mode == "secagg" and self.kind == "robust":
            return (
                f"SecAgg+ hands the server only the sum of the updates, so {name} cannot see single replies"
            )
        return None


AGGREGATORS: dict[str, Aggregator] = {
    "fedavg": Aggregator(FedAvg),
    "fedavgm": Aggregator(FedAvgM, "optimizer"),
    "fedadam": Aggregator(FedAdam, "optimizer"),
    "fedyogi": Aggregator(FedYogi, "optimizer"),
    "fedadagrad": Aggregator(FedAdagrad, "optimizer"),
    "median": Aggregator(FedMedian, "robust"),
    "trimmed_mean": Aggregator(FedTrimmedAvg, "robust"),
    "krum": Aggregator(Krum, "robust"),
    "multikrum": Aggregator(MultiKrum, "robust"),
    "bulyan": Aggregator(Bulyan, "robust"),
}


# -- server optimizers: the model they step from, and their state ------------------------

# The attributes that hold a server optimizer's state between rounds, by Flower class.
STATE_ATTRIBUTES = ((FedAvgM, ("momentum_vector",)), (FedOpt, ("m_t", "v_t")))


def track_global_model(strategy: Any, arrays: ArrayRecord) -> None:
    """Let a server optimizer step from the true global model ``arrays`` (not what was sent).

    Flower's optimizers remember what ``configure_train`` got; FedDM sends an
    encoding of the model (int8 codes, parts) and changes it after the
    aggregate (FedDDPM's calibration, a resume), so the model is set here.
    """
    if isinstance(strategy, FedOpt):
        strategy.current_arrays = {name: array.numpy() for name, array in arrays.items()}
    elif isinstance(strategy, FedAvgM):
        strategy.current_arrays = arrays


def like_global(aggregated: ArrayRecord, global_arrays: ArrayRecord) -> ArrayRecord:
    """``aggregated`` with the global model's dtypes (Flower's optimizers compute in float64)."""
    return ArrayRecord(
        {
            name: Array(np.asarray(array.numpy(), dtype=np.dtype(global_arrays[name].dtype)))
            for name, array in aggregated.items()
        }
    )


def optimizer_state(strategy: Any) -> dict[str, torch.Tensor]:
    """A server optimizer's state as named tensors (``aggregator.<attribute>.<array>``); {} if none yet."""
    state = {}
    for attribute in _state_attributes(strategy):
        value = getattr(strategy, attribute, None)
        if isinstance(value, list):  # FedAvgM keeps a list in the model's array order
            value = {f"{i:05d}": v for i, v in enumerate(value)}
        for name, array in (value or {}).items():
            state[f"aggregator.{attribute}.{name}"] = torch.from_numpy(np.array(array))
    return state


def load_optimizer_state(strategy: Any, state: Mapping[str, Any]) -> None:
    """Restore what :func:`optimizer_state` saved."""
    for attribute in _state_attributes(strategy):
        prefix = f"aggregator.{attribute}."
        saved = {k[len(prefix) :]: np.asarray(v) for k, v in state.items() if k.startswith(prefix)}
        if not saved:
            continue
        if attribute == "momentum_vector":
            setattr(strategy, attribute, [saved[k] for k in sorted(saved)])
        else:
            setattr(strategy, attribute, saved)


def _state_attributes(strategy: Any) -> tuple[str, ...]:
    return next((attrs for cls, attrs in STATE_ATTRIBUTES if isinstance(strategy, cls)), ())
