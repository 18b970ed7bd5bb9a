"""What every FedDM strategy adds to a Flower strategy: reply checks and a round log.

``RoundAccounting`` is a mixin placed before a Flower strategy class
(``class FedDMVanilla(RoundAccounting, FedAvg)``). It

* counts the bytes of the arrays actually placed in the messages, both ways;
* checks every training reply against the global model before it reaches the
  average, and leaves out (with a logged reason) the ones that do not match;
* lets a strategy change what travels (int8 codes, updates) through three hooks;
* keeps the aggregated metrics per round in ``round_log`` for the ServerApp,
  with the wall time of each round's training phase (``train_time_s``);
* asks clients to evaluate only on evaluation rounds (``evaluate_every``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message.message import make_message
from flwr.serverapp import Grid
from flwr.supercore import log

from strategies.codec import PayloadError, payload_nbytes
from strategies.privacy import KEY_CLIPPING_NORM, CentralDP

NUM_EXAMPLES_KEY = "num-examples"


def message_nbytes(message: Message) -> int:
    """Bytes of all arrays carried by ``message`` (0 for an error reply)."""
    if message.has_error():
        return 0
    return sum(payload_nbytes(r) for r in message.content.array_records.values())


def check_full_weights(record: ArrayRecord, reference: ArrayRecord) -> ArrayRecord:
    """``record`` itself, once its arrays are known to match ``reference``.

    Names, decoded shapes and dtypes must equal the global model's and every
    value must be finite; otherwise ``PayloadError`` names the array.
    """
    missing = set(reference.keys()) - set(record.keys())
    extra = set(record.keys()) - set(reference.keys())
    if missing or extra:
        raise PayloadError(
            f"array names differ from the global model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(extra)[:5]}"
        )
    for name, expected in reference.items():
        try:
            values = record[name].numpy()
        except (TypeError, ValueError, OSError) as err:
            raise PayloadError(f"array {name!r} cannot be decoded: {err}") from err
        if values.shape != tuple(expected.shape) or str(values.dtype) != expected.dtype:
            raise PayloadError(
                f"array {name!r} is {values.dtype}{list(values.shape)}, expected "
                f"{expected.dtype}{list(expected.shape)}"
            )
        if not np.all(np.isfinite(values)):
            raise PayloadError(f"array {name!r} holds NaN or inf")
    return record


def check_metrics(content: Any, loss_key: str) -> MetricRecord:
    """The reply's single MetricRecord: exactly ``loss_key`` and a positive ``num-examples``.

    Exact keys keep Flower's averaging from failing on one odd reply; every value
    must be a finite number.
    """
    records = list(content.metric_records.values())
    if len(records) != 1:
        raise PayloadError(f"expected one MetricRecord, found {len(records)}")
    metrics = records[0]
    if set(metrics.keys()) != {loss_key, NUM_EXAMPLES_KEY}:
        raise PayloadError(
            f"metrics must be exactly {sorted([loss_key, NUM_EXAMPLES_KEY])}, got {sorted(metrics.keys())}"
        )
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
            raise PayloadError(f"metric {key!r} must be a finite number, got {value!r}")
    if metrics[NUM_EXAMPLES_KEY] <= 0:
        raise PayloadError(f"metric {NUM_EXAMPLES_KEY!r} must be > 0, got {metrics[NUM_EXAMPLES_KEY]}")
    return metrics


def partition_of(message: Message) -> int:
    """The client's partition id (sent in its ``info`` record), else its node id."""
    info = message.content.config_records.get("info", {})
    return int(info.get("partition-id", message.metadata.src_node_id))


def reply_order(message: Message) -> tuple[int, int]:
    """Sort key of replies: the client's partition id, then its node id.

    Flower hands replies over in arrival order; summing them in a fixed order
    makes the average, and so the run, reproducible.
    """
    return partition_of(message), int(message.metadata.src_node_id)


def single_array_record(message: Message) -> ArrayRecord:
    """The reply's only ArrayRecord (``PayloadError`` otherwise)."""
    records = list(message.content.array_records.values())
    if len(records) != 1:
        raise PayloadError(f"expected one ArrayRecord, found {len(records)}")
    return records[0]


def last_line(text: str, limit: int = 300) -> str:
    """The last non-empty line of a (traceback) text, at most ``limit`` characters."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip().strip("'>")]
    return (lines[-1] if lines else str(text))[:limit]


def _errors_last(message: Message) -> tuple[bool, tuple[int, int]]:
    """Sort key for evaluate replies: valid ones by ``reply_order``, errors after them."""
    return message.has_error(), (0, 0) if message.has_error() else reply_order(message)


def _with_content(message: Message, content: RecordDict) -> Message:
    """A copy of a reply with other content (same sender and metadata)."""
    return make_message(metadata=message.metadata, content=content)


class RoundFailedError(RuntimeError):
    """No reply of a training round could be aggregated; the run must stop."""


class RoundAccounting:
    """Mixin for Flower strategies: byte counts, reply validation, per-round log.

    Hooks for strategies that do not exchange plain full weights:

    * ``downlink_payload(arrays)``: what is sent instead of the global arrays;
    * ``address(messages, arrays)``: last changes to the messages for each node
      (e.g. the full model for a node contacted the first time);
    * ``decode_train_reply(message)``: the reply's arrays as full-precision
      arrays for the average, raising ``PayloadError`` if it must be left out;
    * ``average(server_round, errors, accepted)``: the weighted mean (default:
      the Flower strategy's ``aggregate_train``);
    * ``apply_aggregate(arrays)``: the new global model from the average.
    """

    round_log: dict[int, dict[str, float]]
    _global_arrays: ArrayRecord | None = None
    # Rounds done before this start (a resumed run): Flower counts from 1 again,
    # clients and logs see the true round.
    round_offset: int = 0
    # Clients evaluate on rounds divisible by `evaluate_every` and on `last_round`.
    evaluate_every: int = 1
    last_round: int = 0
    # Central DP (clipping and noise), for strategies whose replies are full weights.
    privacy: CentralDP | None = None
    # SecAgg+ (``strategies.secagg.SecAggPlus``): training rounds run Flower's protocol.
    secure_aggregation: Any = None
    _secure_grid: Any = None
    _round: int = 0
    _train_started: float = 0.0

    def is_evaluation_round(self, server_round: int) -> bool:
        """Whether clients evaluate after ``server_round`` (a true round number)."""
        return server_round % self.evaluate_every == 0 or server_round == self.last_round

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
        return check_full_weights(single_array_record(message), self._global_arrays)

    def address(self, messages: list[Message], arrays: ArrayRecord) -> list[Message]:
        """The messages as sent to each node (default: unchanged)."""
        return messages

    def average(
        self, server_round: int, errors: list[Message], accepted: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Weighted mean of the accepted replies (Flower's strategy logs the errors)."""
        return super().aggregate_train(server_round, errors + accepted)

    def apply_aggregate(self, aggregated: ArrayRecord) -> ArrayRecord:
        """The new global model from the weighted mean (default: the mean itself)."""
        return aggregated

    def observe(self, server_round: int, row: dict[str, Any]) -> None:
        """The round's finished metrics row (FID included); strategies that adapt use it."""

    # -- state kept in checkpoints -------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What the strategy needs to continue after the last round it ran.

        Values are JSON values or tensors (a checkpoint keeps tensors in
        safetensors and the rest as JSON metadata; nothing is pickled).
        Strategies with state of their own extend this.
        """
        return {"rounds_done": self._round}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`: Flower counts rounds from 1 again, clients and logs see the true round."""
        self.round_offset = int(state.get("rounds_done", 0))

    # -- the round loop ----------------------------------------------------------
    def start(self, *, grid: Grid, timeout: float = 3600, **kwargs: Any) -> Any:
        """Flower's round loop; with SecAgg+, over a grid that runs the protocol for training."""
        if self.secure_aggregation is not None:
            grid = self._secure_grid = self.secure_aggregation.wrap(grid)
        return super().start(grid=grid, timeout=timeout, **kwargs)

    # -- training --------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global model, then count what Flower's strategy sends."""
        server_round += self.round_offset
        self._round = server_round  # the true round, for hooks that run later in it
        self._train_started = time.monotonic()
        self._global_arrays = arrays
        if self.privacy is not None and self.privacy.mode == "dp_client":
            config[KEY_CLIPPING_NORM] = self.privacy.clipping_norm  # read by fixedclipping_mod
        payload = self.downlink_payload(arrays)
        messages = self.address(list(super().configure_train(server_round, payload, config, grid)), arrays)
        self._log_round(
            server_round,
            downlink_bytes=sum(message_nbytes(m) for m in messages),
            num_sampled=len(messages),
        )
        return messages

    def accepted_replies(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """Count uplink bytes; return the valid replies with their decoded arrays."""
        replies = list(replies)
        accepted, rejected, reasons = [], 0, []
        for message in replies:
            if message.has_error():
                # Flower logs error replies itself, traceback included; keep the last line.
                reasons.append(f"node {message.metadata.src_node_id}: {last_line(message.error.reason)}")
                continue
            try:
                metrics = check_metrics(message.content, "train_loss")
                arrays = self.decode_train_reply(message)
                if self.privacy is not None:
                    self.privacy.check_clipped(arrays, self._global_arrays)
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
            if "info" in message.content.config_records:
                content["info"] = message.content.config_records["info"]
            accepted.append(_with_content(message, content))
        self._log_round(
            server_round,
            uplink_bytes=sum(message_nbytes(m) for m in replies),
            num_aggregated=len(accepted),
            num_rejected=rejected,
        )
        accepted.sort(key=reply_order)
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
        if self._secure_grid is not None:  # the replies hold the unmasked mean; count what SecAgg+ sent
            self._log_round(server_round, **self._secure_grid.round_bytes)
        # Error replies go on to Flower, which logs them and leaves them out.
        errors = [m for m in replies if m.has_error()]
        if self.privacy is not None:  # checked replies are clipped (server-side DP), then averaged
            for message in accepted:
                message.content["arrays"] = self.privacy.clip(message.content["arrays"], self._global_arrays)
        arrays, metrics = self.average(server_round, errors, accepted)
        if arrays is not None and self.privacy is not None:
            arrays = self.privacy.add_noise(arrays, len(accepted))
        if arrays is not None:
            arrays = self.apply_aggregate(arrays)
        if metrics is not None:
            self._log_round(server_round, **{k: float(v) for k, v in metrics.items()})
        # Sending, client work, replies, checks and the average: the round's training phase.
        self._log_round(server_round, train_time_s=round(time.monotonic() - self._train_started, 3))
        return arrays, metrics

    # -- evaluation ------------------------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the evaluation model in the same form as the training model.

        Nothing is sent on rounds that are not evaluation rounds.
        """
        server_round += self.round_offset
        if not self.is_evaluation_round(server_round):
            return []
        payload = self.downlink_payload(arrays)
        messages = self.address(list(super().configure_evaluate(server_round, payload, config, grid)), arrays)
        self._log_round(server_round, eval_downlink_bytes=sum(message_nbytes(m) for m in messages))
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Aggregate client evaluation metrics and keep them in the round log."""
        server_round += self.round_offset
        valid = []
        for message in replies:
            if message.has_error():
                valid.append(message)
                continue
            try:
                check_metrics(message.content, "eval_loss")
                valid.append(message)
            except PayloadError as err:
                log(WARNING, "Round %d: left out an evaluate reply: %s", server_round, err)
        metrics = super().aggregate_evaluate(server_round, sorted(valid, key=_errors_last))
        if metrics is not None:
            self._log_round(server_round, **{k: float(v) for k, v in metrics.items()})
        return metrics
