"""FedDM-quant: clients send int8-quantized updates; the server decodes, averages, applies.

A round, with w the server's fp32 global model:

1. downlink: w (or, with ``quantize_downlink``, its int8 codes; clients then
   start from the decoded weights w' and the server keeps w' as their view);
2. each client trains from w' and sends Δ = w_local − w' as int8 codes with one
   fp32 scale per output channel (or per tensor), optionally with stochastic
   rounding and error feedback (the residual stays in the client's state);
3. the server validates and decodes every reply, takes the example-weighted
   mean Δ̄ with Flower's FedAvg, and sets w ← w' + Δ̄.

Flower's ``FedAvg`` averages raw array values, so decoding happens before the
mean, in ``decode_train_reply``.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from strategies.accounting import RoundAccounting, single_array_record
from strategies.codec import GRANULARITIES, MAX_BITS, MIN_BITS, decode_arrays, encode_arrays


def to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The arrays of a record by name."""
    return {name: array.numpy() for name, array in record.items()}


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """A record of the given arrays."""
    return ArrayRecord({name: Array(np.ascontiguousarray(a)) for name, a in arrays.items()})


def reference_of(record: ArrayRecord) -> dict[str, tuple[tuple[int, ...], str]]:
    """Names, shapes and dtypes that a payload must match (codec's ``reference``)."""
    return {name: (tuple(a.shape), str(a.dtype)) for name, a in record.items()}


class FedDMQuant(RoundAccounting, FedAvg):
    """FedAvg of int8-quantized client updates (FedDM-quant).

    Parameters
    ----------
    bits : int (default: 8)
        Bits per quantized value (2..8); values travel as int8 either way.
    granularity : str (default: "channel")
        ``"channel"``: one scale per output channel (1-D tensors per tensor);
        ``"tensor"``: one scale per tensor.
    stochastic_rounding : bool (default: False)
        Clients round stochastically (unbiased) instead of to nearest.
    error_feedback : bool (default: False)
        Clients add last round's quantization residual to the next update.
    quantize_downlink : bool (default: False)
        The server sends the global model as int8 codes too.
    **kwargs
        Passed to Flower's ``FedAvg``.
    """

    def __init__(
        self,
        *,
        bits: int = 8,
        granularity: str = "channel",
        stochastic_rounding: bool = False,
        error_feedback: bool = False,
        quantize_downlink: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if not MIN_BITS <= bits <= MAX_BITS:
            raise ValueError(f"bits={bits} is not in {MIN_BITS}..{MAX_BITS}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity={granularity!r} is not one of {GRANULARITIES}")
        self.bits = bits
        self.granularity = granularity
        self.stochastic_rounding = stochastic_rounding
        self.error_feedback = error_feedback
        self.quantize_downlink = quantize_downlink
        self._client_view: dict[str, np.ndarray] | None = None

    def summary(self) -> None:
        """Log the strategy's settings."""
        log(INFO, "\t├──> FedDM-quant: %d-bit %s-wise updates", self.bits, self.granularity)
        log(
            INFO,
            "\t│\t└── stochastic rounding %s | error feedback %s | quantized downlink %s",
            self.stochastic_rounding,
            self.error_feedback,
            self.quantize_downlink,
        )
        super().summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Tell clients how to encode their update, then send the model."""
        config["quant-bits"] = self.bits
        config["quant-granularity"] = self.granularity
        config["quant-stochastic"] = self.stochastic_rounding
        config["quant-error-feedback"] = self.error_feedback
        return super().configure_train(server_round, arrays, config, grid)

    def downlink_payload(self, arrays: ArrayRecord) -> ArrayRecord:
        """int8 codes of the global model when the downlink is quantized."""
        weights = to_numpy(arrays)
        if not self.quantize_downlink:
            self._client_view = weights
            return arrays
        # Weights always travel as full 8-bit codes; `bits` applies to the updates.
        record, _ = encode_arrays(weights, bits=8, granularity=self.granularity)
        # Exactly what the clients decode: they train from it and send Δ against it.
        self._client_view = decode_arrays(record, reference_of(arrays))
        return record

    def decode_train_reply(self, message: Message) -> ArrayRecord:
        """Validate and dequantize a client's update (raises ``PayloadError``)."""
        update = decode_arrays(single_array_record(message), reference_of(self._global_arrays))
        return to_record(update)

    def apply_aggregate(self, aggregated: ArrayRecord) -> ArrayRecord:
        """w ← w' + mean update."""
        mean_update = to_numpy(aggregated)
        reference = reference_of(self._global_arrays)
        return to_record(
            {
                name: (self._client_view[name] + mean_update[name]).astype(dtype)
                for name, (_, dtype) in reference.items()
            }
        )
