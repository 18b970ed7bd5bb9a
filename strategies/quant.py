"""FedDM-quant's encoding: clients send int8-quantized updates; the server decodes, averages, applies.

A round, with w the server's fp32 global model:

1. downlink: w, or what ``strategy.downlink`` makes of it (``strategies.downlink``):
   clients start from what they decode, w', which the strategy hands to
   ``decode`` and ``apply`` as their base (w' = w for fp32 weights);
2. each client trains from w' and sends Δ = w_local − w' as int8 codes with one
   fp32 scale per output channel (or per tensor), optionally with stochastic
   rounding and error feedback (the residual stays in the client's state);
   with ``topk``, only that fraction of each tensor's entries, the largest,
   travels (``strategies.sparse``), and error feedback is always on;
3. the server validates and decodes every reply, takes the example-weighted
   mean Δ̄ with the aggregator (Flower's FedAvg), and sets w ← w' + Δ̄.

Flower's ``FedAvg`` averages raw array values, so decoding happens before the
mean, in ``Int8Updates.decode``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message

from strategies.accounting import single_array_record
from strategies.codec import (
    GRANULARITIES,
    MAX_BITS,
    MIN_BITS,
    PayloadError,
    decode_arrays,
    encoded_names,
    is_quantized,
)
from strategies.encoding import Encoding
from strategies.packing import is_packed
from strategies.sparse import TOPK_VALUES, decode_topk, is_topk, topk_names


def to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The arrays of a record by name."""
    return {name: array.numpy() for name, array in record.items()}


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """A record of the given arrays."""
    return ArrayRecord({name: Array(np.ascontiguousarray(a)) for name, a in arrays.items()})


def sent_names(record: ArrayRecord) -> list[str]:
    """The model arrays a record carries: named in its top-k, codec or packing entry, else its keys."""
    if is_topk(record):
        return topk_names(record)
    if is_quantized(record) or is_packed(record):
        return encoded_names(record)
    return list(record.keys())


def reference_of(record: ArrayRecord) -> dict[str, tuple[tuple[int, ...], str]]:
    """Names, shapes and dtypes that a payload must match (codec's ``reference``)."""
    return {name: (tuple(a.shape), str(a.dtype)) for name, a in record.items()}


class Int8Updates(Encoding):
    """Clients send int8 codes of their update; the server decodes, averages, and applies the mean.

    Parameters
    ----------
    bits : int (default: 8)
        Bits per quantized value (1..8): 5 to 8 travel as int8, 4 or fewer
        packed several per byte (``strategies.codec``).
    granularity : str (default: "channel")
        ``"channel"``: one scale per output channel (1-D tensors per tensor);
        ``"tensor"``: one scale per tensor.
    stochastic_rounding : bool (default: False)
        Clients round stochastically (unbiased) instead of to nearest.
    error_feedback : bool (default: False)
        Clients add last round's quantization residual to the next update.
    topk : float (default: 0.0)
        0: dense codes. In (0, 1): clients send only this fraction of each
        tensor's entries, those of largest magnitude, and keep the rest for
        later rounds (error feedback is then always on).
    topk_values : str (default: "quantized")
        With ``topk``: the kept values as ``bits``-bit codes, or ``"float32"``.
    whole_models : bool (default: False)
        Decode each reply to the client's weights w' + Δ (for aggregators that
        need whole models, the server optimizers) instead of the update Δ.
    """

    @property
    def decodes_updates(self) -> bool:
        """``decode`` returns the update Δ (with ``whole_models``, the weights w' + Δ)."""
        return not self.whole_models

    def __init__(
        self,
        *,
        bits: int = 8,
        granularity: str = "channel",
        stochastic_rounding: bool = False,
        error_feedback: bool = False,
        topk: float = 0.0,
        topk_values: str = "quantized",
        whole_models: bool = False,
    ) -> None:
        self.whole_models = whole_models
        self.client_keys = quant_client_keys(
            bits, granularity, stochastic_rounding, error_feedback, topk, topk_values
        )
        self.granularity = granularity

    @classmethod
    def from_config(cls, strategy: Mapping[str, Any], **context: Any) -> Int8Updates:
        """From the ``strategy=quant`` config (``conf/schema.py``)."""
        return cls(
            bits=int(strategy["bits"]),
            granularity=str(strategy["granularity"]),
            stochastic_rounding=bool(strategy["stochastic_rounding"]),
            error_feedback=bool(strategy["error_feedback"]),
            # Hand-built configs (tests, benchmarks) may leave top-k out: off.
            topk=float(strategy.get("topk", 0.0)),
            topk_values=str(strategy.get("topk_values", "quantized")),
            whole_models=bool(context.get("whole_models", False)),
        )

    def summary(self) -> list[str]:
        """The codec's settings."""
        keys = self.client_keys
        return [
            f"FedDM-quant: {keys['quant-bits']}-bit {self.granularity}-wise updates",
            f"stochastic rounding {keys['quant-stochastic']} | error feedback {keys['quant-error-feedback']}",
            *topk_summary(keys),
        ]

    @classmethod
    def privacy_conflict(cls, mode: str) -> str | None:
        """Codes (dense or top-k) with per-client scales: neither clipping full weights nor the masked sum applies."""
        if mode == "secagg":
            return (
                "it sends 1- to 8-bit or top-k codes of updates with per-client scales, and SecAgg+ sums "
                "full-precision field elements of whole models"
            )
        return (
            "it sends 1- to 8-bit or top-k codes of updates with per-client scales, and DP clips and noises "
            "full-precision models"
        )

    def train_config(self, config: ConfigRecord, arrays: ArrayRecord) -> None:
        """Tell clients how to encode their update."""
        config.update(self.client_keys)

    def decode(self, message: Message, global_arrays: ArrayRecord) -> ArrayRecord:
        """Validate and dequantize a client's update Δ (raises ``PayloadError``); with ``whole_models``, w' + Δ.

        ``global_arrays`` is what the clients started from, w'.
        """
        update = decode_update(single_array_record(message), reference_of(global_arrays), self.client_keys)
        if self.whole_models:
            view = to_numpy(global_arrays)
            update = {n: (view[n] + d).astype(view[n].dtype) for n, d in update.items()}
        return to_record(update)

    def apply(self, aggregated: ArrayRecord, global_arrays: ArrayRecord) -> ArrayRecord:
        """w ← w' + mean update, w' being ``global_arrays`` (``whole_models``: the aggregate is the new model)."""
        if self.whole_models:
            return aggregated
        mean_update, view = to_numpy(aggregated), to_numpy(global_arrays)
        return to_record(
            {
                name: (view[name] + mean_update[name]).astype(dtype)
                for name, (_, dtype) in reference_of(global_arrays).items()
            }
        )


def quant_client_keys(
    bits: int,
    granularity: str,
    stochastic_rounding: bool,
    error_feedback: bool,
    topk: float = 0.0,
    topk_values: str = "quantized",
) -> dict[str, int | float | str | bool]:
    """The training ConfigRecord keys that tell clients how to encode their update (checked).

    ``quant-topk`` and ``quant-topk-values`` are sent with top-k only; top-k
    turns ``quant-error-feedback`` on, so that what is not sent is sent later.
    """
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits={bits} is not in {MIN_BITS}..{MAX_BITS}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r} is not one of {GRANULARITIES}")
    if isinstance(topk, bool) or not isinstance(topk, (int, float)) or not 0 <= topk < 1:
        raise ValueError(f"topk={topk!r} is not a number in [0, 1) (0: off)")
    if topk_values not in TOPK_VALUES:
        raise ValueError(f"topk_values={topk_values!r} is not one of {TOPK_VALUES}")
    keys: dict[str, int | float | str | bool] = {
        "quant-bits": int(bits),
        "quant-granularity": str(granularity),
        "quant-stochastic": bool(stochastic_rounding),
        "quant-error-feedback": bool(error_feedback or topk > 0),
    }
    if topk > 0:
        keys |= {"quant-topk": float(topk), "quant-topk-values": str(topk_values)}
    return keys


def topk_summary(client_keys: Mapping[str, Any]) -> list[str]:
    """A line on top-k for a strategy's summary (none without top-k)."""
    if "quant-topk" not in client_keys:
        return []
    values = client_keys["quant-topk-values"]
    kind = f"{client_keys['quant-bits']}-bit codes" if values == "quantized" else "float32"
    return [f"top-k: {client_keys['quant-topk']:.4g} of each tensor's entries, values as {kind}"]


def check_topk_mode(record: ArrayRecord, client_keys: Mapping[str, Any]) -> bool:
    """Whether the reply must be a top-k record (``client_keys`` asked for one); ``PayloadError`` if it is not."""
    asked = "quant-topk" in client_keys
    if is_topk(record) and not asked:
        raise PayloadError("the reply is a top-k record, but strategy.topk=0 asked for dense arrays")
    if asked and not is_topk(record):
        raise PayloadError(
            f"the reply is not a top-k record, but strategy.topk={client_keys['quant-topk']} was asked for"
        )
    return asked


def decode_update(
    record: ArrayRecord, reference: dict[str, tuple[tuple[int, ...], str]], client_keys: Mapping[str, Any]
) -> dict[str, np.ndarray]:
    """A reply's update, decoded as ``client_keys`` told the client to encode it (``PayloadError`` if not)."""
    if not check_topk_mode(record, client_keys):
        return decode_arrays(record, reference)
    return decode_topk(
        record, reference, float(client_keys["quant-topk"]), values=str(client_keys["quant-topk-values"])
    )
