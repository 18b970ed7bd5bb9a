"""Checks of client replies and byte counts, used by every FedDM strategy.

Each function looks at one message: its bytes, its arrays against the global
model, its metrics, who sent it. ``strategies.strategy.FedDMStrategy`` uses
them to leave out (with a logged reason) the replies that do not match.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord

from strategies.codec import PayloadError, payload_nbytes

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


class RoundFailedError(RuntimeError):
    """No reply of a training round could be aggregated; the run must stop."""
