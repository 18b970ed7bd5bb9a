"""The encoding layer of a FedDM strategy: what travels between server and clients.

An ``Encoding`` decides what the server sends for the global model, how a
client's training reply turns into arrays that can be averaged, and how the
average becomes the new global model. The base class is the plain case, full
fp32 weights both ways (FedDM-vanilla, -prox, FedDDPM); ``strategies.quant``
sends int8 codes of updates and ``strategies.partial`` exchanges UNet parts.

The strategy (``strategies.strategy.FedDMStrategy``) calls these hooks from
Flower's round loop; the Flower class that aggregates is a separate layer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

from strategies.accounting import check_full_weights, single_array_record


class Layer:
    """What every layer of a strategy has: built from config, a summary, and what it cannot work with."""

    @classmethod
    def from_config(cls, strategy: Mapping[str, Any], **context: Any) -> Layer:
        """The layer from a ``strategy=`` config (``context``: e.g. ``seed``, ``client_generation``)."""
        return cls()

    def summary(self) -> list[str]:
        """Lines for the strategy's start-up summary."""
        return []

    @classmethod
    def privacy_conflict(cls, mode: str) -> str | None:
        """Why privacy ``mode`` (dp_server, dp_client, secagg) cannot work with this layer; None if it can."""
        return None

    def state_dict(self) -> dict:
        """What must survive a resume (JSON values or tensors; keys unique across layers)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`."""


class Encoding(Layer):
    """Full weights both ways; the new global model is the aggregator's result itself."""

    # Whether each client ends up with a model of its own (parts kept locally).
    personalized = False
    # Whether ``decode`` returns updates w_client − w_global (int8 codes) rather than weights.
    decodes_updates = False

    @classmethod
    def aggregator_conflict(cls, aggregator: Any) -> str | None:
        """Why ``aggregator`` (an ``Aggregator`` entry) cannot aggregate these replies; None if it can."""
        return None

    # -- training -----------------------------------------------------------------
    def train_config(self, config: ConfigRecord, arrays: ArrayRecord) -> None:
        """Add what clients need to encode their reply to the training ``config`` (in place)."""

    def downlink(self, arrays: ArrayRecord) -> ArrayRecord:
        """The fp32 arrays the clients receive for the global ``arrays`` (``strategies.downlink`` picks their form)."""
        return arrays

    def address(self, messages: list[Message], arrays: ArrayRecord, arrays_key: str) -> list[Message]:
        """Last changes to each node's message (e.g. the whole model for a new node)."""
        return messages

    def decode(self, message: Message, global_arrays: ArrayRecord) -> ArrayRecord:
        """The reply's arrays as they enter the average; ``PayloadError`` leaves the reply out.

        ``global_arrays`` here and in ``apply`` is the model the clients started from: the
        global model as they decoded it (``Prepared.base`` of ``strategies.downlink``).
        """
        return check_full_weights(single_array_record(message), global_arrays)

    def average(
        self, strategy: Any, server_round: int, errors: list[Message], accepted: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None] | None:
        """An average of its own, or None to let the aggregator (the Flower strategy) average."""
        return None

    def apply(self, aggregated: ArrayRecord, global_arrays: ArrayRecord) -> ArrayRecord:
        """The new global model from the aggregated replies."""
        return aggregated

    # -- evaluation ---------------------------------------------------------------
    def evaluate_config(self, config: ConfigRecord, arrays: ArrayRecord) -> ConfigRecord:
        """The evaluation ``config`` as sent (default: unchanged)."""
        return config

    def evaluate_replies(self, server_round: int, replies: Iterable[Message]) -> None:
        """Look at the checked evaluate replies of ``server_round`` (e.g. keep client samples)."""
