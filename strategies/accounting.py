"""What every FedDM strategy adds to a Flower strategy: reply checks and a round log.

``RoundAccounting`` is a mixin placed before a Flower strategy class
(``class FedDMVanilla(RoundAccounting, FedAvg)``). It

* counts the bytes of the arrays actually placed in the messages, both ways;
* checks every training reply against the global model before it reaches the
  average, and leaves out (with a logged reason) the ones that do not match;
* lets a strategy change what travels (int8 codes, updates) through three hooks;
* keeps the aggregated metrics per round in ``round_log`` for the ServerApp.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message.message import make_message
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


def _with_content(message: Message, content: RecordDict) -> Message:
    """A copy of a reply with other content (same sender and metadata)."""
    return make_message(metadata=message.metadata, content=content)


class RoundFailedError(RuntimeError):
    """No reply of a training round could be aggregated; the run must stop."""


class RoundAccounting:
    """Mixin for Flower strategies: byte counts, reply validation, per-round log.

    Hooks for strategies that do not exchange plain full weights:

    * ``downlink_payload(arrays)``: what is sent instead of the global arrays;
    * ``decode_train_reply(message)``: the reply's arrays as full-precision
      arrays for the average, raising ``PayloadError`` if it must be left out;
    * ``apply_aggregate(arrays)``: the new global model from the average.
    """

    round_log: dict[int, dict[str, float]]
    _global_arrays: ArrayRecord | None = None
    # Rounds done before this start (a resumed run): Flower counts from 1 again,
    # clients and logs see the true round.
    round_offset: int = 0

    def _log_round(self, server_round: int, **values: float) -> None:
        if not hasattr(self, "round_log"):
            self.round_log = {}
        self.round_log.setdefault(server_round, {}).update(values)

    # -- hooks -----------------------------------------------------------------
    def downlink_payload(self, arrays: ArrayRecord) -> ArrayRecord:
        """What the clients receive for the global ``arrays`` (default: the arrays)."""
        return arrays

    def decode_train_reply(self, message: Message) -> ArrayRecord:
        """Validate a reply and return the arrays that enter the weighted mean."""
        records = list(message.content.array_records.values())
        if len(records) != 1:
            raise PayloadError(f"expected one ArrayRecord, found {len(records)}")
        check_full_weights(records[0], self._global_arrays)
        return records[0]

    def apply_aggregate(self, aggregated: ArrayRecord) -> ArrayRecord:
        """The new global model from the weighted mean (default: the mean itself)."""
        return aggregated

    # -- training --------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global model, then count what Flower's strategy sends."""
        server_round += self.round_offset
        self._global_arrays = arrays
        payload = self.downlink_payload(arrays)
        messages = list(super().configure_train(server_round, payload, config, grid))
        self._log_round(
            server_round,
            downlink_bytes=sum(message_nbytes(m) for m in messages),
            num_sampled=len(messages),
        )
        return messages

    def accepted_replies(
        self, server_round: int, replies: Iterable[Message]
    ) -> list[Message]:
        """Count uplink bytes; return the valid replies with their decoded arrays."""
        replies = list(replies)
        accepted, rejected, reasons = [], 0, []
        for message in replies:
            if message.has_error():
                # Flower logs error replies itself.
                reasons.append(f"node {message.metadata.src_node_id}: {message.error.reason}")
                continue
            try:
                metrics = check_metrics(message.content)
                arrays = self.decode_train_reply(message)
            except PayloadError as err:
                rejected += 1
                reasons.append(f"node {message.metadata.src_node_id}: {err}")
                log(
                    WARNING,
                    "Round %d: left out the reply of node %d: %s",
                    server_round,
                    message.metadata.src_node_id,
                    err,
                )
                continue
            content = RecordDict({"arrays": arrays, "metrics": metrics})
            accepted.append(_with_content(message, content))
        self._log_round(
            server_round,
            uplink_bytes=sum(message_nbytes(m) for m in replies),
            num_replies=len(replies),
            num_aggregated=len(accepted),
            num_rejected=rejected,
        )
        if not accepted:
            raise RoundFailedError(
                f"round {server_round}: none of the {len(replies)} training replies could "
                "be aggregated, so the run stops with the last global model. "
                + ("Reasons: " + "; ".join(reasons[:4]) if reasons else "No client replied.")
            )
        return accepted

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the valid replies with Flower's strategy, then apply the result."""
        server_round += self.round_offset
        replies = list(replies)
        accepted = self.accepted_replies(server_round, replies)
        # Error replies go on to Flower, which logs them and leaves them out.
        errors = [m for m in replies if m.has_error()]
        arrays, metrics = super().aggregate_train(server_round, errors + accepted)
        if arrays is not None:
            arrays = self.apply_aggregate(arrays)
        if metrics is not None:
            self._log_round(server_round, **{k: float(v) for k, v in metrics.items()})
        return arrays, metrics

    # -- evaluation ------------------------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the evaluation model in the same form as the training model."""
        server_round += self.round_offset
        payload = self.downlink_payload(arrays)
        messages = list(super().configure_evaluate(server_round, payload, config, grid))
        self._log_round(
            server_round, eval_downlink_bytes=sum(message_nbytes(m) for m in messages)
        )
        return messages

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Aggregate client evaluation metrics and keep them in the round log."""
        server_round += self.round_offset
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
