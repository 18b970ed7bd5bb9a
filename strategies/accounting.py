"""What every FedDM strategy adds to a Flower strategy: reply checks and a round log.

``RoundAccounting`` is a mixin placed before a Flower strategy class
(``class FedDMVanilla(RoundAccounting, FedAvg)``). It

* counts the bytes of the arrays actually placed in the messages, both ways;
* checks every training reply against the global model before it reaches the
  average, and leaves out (with a logged reason) the ones that do not match;
* keeps the aggregated metrics per round in ``round_log`` for the ServerApp.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.supercore import log

from strategies.codec import PayloadError, payload_nbytes

NUM_EXAMPLES_KEY = "num-examples"


def message_nbytes(message: Message) -> int:
    """Bytes of all arrays carried by ``message`` (0 for an error reply)."""
    if message.has_error():
        return 0
    return sum(payload_nbytes(r) for r in message.content.array_records.values())


def check_full_weights(record: ArrayRecord, reference: ArrayRecord) -> None:
    """Raise ``PayloadError`` unless ``record`` holds finite arrays shaped like ``reference``."""
    missing = set(reference.keys()) - set(record.keys())
    extra = set(record.keys()) - set(reference.keys())
    if missing or extra:
        raise PayloadError(
            f"array names differ from the global model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(extra)[:5]}"
        )
    for name, expected in reference.items():
        got = record[name]
        if tuple(got.shape) != tuple(expected.shape) or got.dtype != expected.dtype:
            raise PayloadError(
                f"array {name!r} is {got.dtype}{list(got.shape)}, expected "
                f"{expected.dtype}{list(expected.shape)}"
            )
        if not np.all(np.isfinite(got.numpy())):
            raise PayloadError(f"array {name!r} holds NaN or inf")


def check_metrics(content: Any) -> MetricRecord:
    """The reply's single MetricRecord, with a positive ``num-examples``."""
    records = list(content.metric_records.values())
    if len(records) != 1:
        raise PayloadError(f"expected one MetricRecord, found {len(records)}")
    metrics = records[0]
    num_examples = metrics.get(NUM_EXAMPLES_KEY)
    if isinstance(num_examples, bool) or not isinstance(num_examples, (int, float)):
        raise PayloadError(f"metric {NUM_EXAMPLES_KEY!r} is missing or not a number")
    if not np.isfinite(num_examples) or num_examples <= 0:
        raise PayloadError(f"metric {NUM_EXAMPLES_KEY!r} must be > 0, got {num_examples}")
    return metrics


class RoundAccounting:
    """Mixin for Flower strategies: byte counts, reply validation, per-round log."""

    round_log: dict[int, dict[str, float]]
    _global_arrays: ArrayRecord | None = None

    def _log_round(self, server_round: int, **values: float) -> None:
        if not hasattr(self, "round_log"):
            self.round_log = {}
        self.round_log.setdefault(server_round, {}).update(values)

    # -- training --------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global model, then count what Flower's strategy sends."""
        self._global_arrays = arrays
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._log_round(
            server_round,
            downlink_bytes=sum(message_nbytes(m) for m in messages),
            num_sampled=len(messages),
        )
        return messages

    def validate_train_reply(self, message: Message) -> None:
        """Raise ``PayloadError`` if a training reply must not enter the average.

        Strategies that send something other than full weights override this.
        """
        check_metrics(message.content)
        records = list(message.content.array_records.values())
        if len(records) != 1:
            raise PayloadError(f"expected one ArrayRecord, found {len(records)}")
        check_full_weights(records[0], self._global_arrays)

    def accepted_replies(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """Count uplink bytes and keep the replies that pass ``validate_train_reply``."""
        replies = list(replies)
        accepted, rejected = [], 0
        for message in replies:
            if message.has_error():
                continue  # Flower logs error replies itself.
            try:
                self.validate_train_reply(message)
            except PayloadError as err:
                rejected += 1
                log(
                    WARNING,
                    "Round %d: left out the reply of node %d: %s",
                    server_round,
                    message.metadata.src_node_id,
                    err,
                )
                continue
            accepted.append(message)
        self._log_round(
            server_round,
            uplink_bytes=sum(message_nbytes(m) for m in replies),
            num_replies=len(replies),
            num_aggregated=len(accepted),
            num_rejected=rejected,
        )
        return accepted

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate only the valid replies (Flower's averaging does the rest)."""
        replies = list(replies)
        accepted = self.accepted_replies(server_round, replies)
        # Error replies go on to Flower, which logs them and leaves them out.
        errors = [m for m in replies if m.has_error()]
        arrays, metrics = super().aggregate_train(server_round, errors + accepted)
        if metrics is not None:
            self._log_round(server_round, **{k: float(v) for k, v in metrics.items()})
        return arrays, metrics

    # -- evaluation ------------------------------------------------------------
    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Aggregate client evaluation metrics and keep them in the round log."""
        valid = []
        for message in replies:
            if message.has_error():
                valid.append(message)
                continue
            try:
                check_metrics(message.content)
                valid.append(message)
            except PayloadError as err:
                log(WARNING, "Round %d: left out an evaluate reply: %s", server_round, err)
        metrics = super().aggregate_evaluate(server_round, valid)
        if metrics is not None:
            self._log_round(server_round, **{k: float(v) for k, v in metrics.items()})
        return metrics
