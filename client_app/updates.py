"""What a client sends: full weights, or codes of its update (FedDM-quant; what it receives: client_app.downlink).

The encoding settings come from the strategy's ConfigRecord (``quant-*`` keys);
the codec is ``strategies.codec`` (dense codes) or ``strategies.sparse`` (top-k,
with ``quant-topk``), the same ones the server decodes with.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict

from strategies.codec import encode_arrays
from strategies.sparse import encode_topk

# Key of the quantization residual in the client's persistent state (Context.state).
RESIDUAL_KEY = "feddm-quant-residual"


def wants_quantized_update(config: Mapping[str, Any]) -> bool:
    """True when the strategy asked for int8 updates (FedDM-quant)."""
    return "quant-bits" in config


def quantized_update(
    local: Mapping[str, torch.Tensor],
    received: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    state: RecordDict,
    seed: int,
) -> ArrayRecord:
    """int8 codes (or, with ``quant-topk``, the top-k entries) of Δ = local − received, as the strategy asked.

    With error feedback, last round's residual (kept in ``state``) is added to Δ
    before encoding, and this round's residual replaces it. The strategy turns
    error feedback on with top-k (``strategies.quant.quant_client_keys``), so
    that the entries not sent this round are sent in a later one.
    """
    # On the device of the trained weights: the codec encodes there, only the codes leave it.
    update = {name: local[name].detach() - received[name].to(local[name].device) for name in received}
    error_feedback = bool(config["quant-error-feedback"])
    kept: dict[str, torch.Tensor] = {}
    if error_feedback and RESIDUAL_KEY in state:
        # Per name: an array not sent this round (partial exchange, USplit) keeps its residual.
        kept = {name: torch.from_numpy(array.numpy()) for name, array in state[RESIDUAL_KEY].items()}
        for name, residual in kept.items():
            if name in update and residual.shape == update[name].shape:
                update[name] += residual.to(update[name].device)
    codes = {
        "bits": int(config["quant-bits"]),
        "stochastic": bool(config["quant-stochastic"]),
        "rng": np.random.default_rng(seed),
    }
    if "quant-topk" in config:
        # Top-k selects on the host (NumPy); its residuals come back as NumPy arrays.
        record, residual = encode_topk(
            {name: u.cpu().numpy() for name, u in update.items()},
            float(config["quant-topk"]),
            values=str(config["quant-topk-values"]),
            **codes,
        )
    else:
        record, residual = encode_arrays(update, granularity=str(config["quant-granularity"]), **codes)
    if error_feedback:
        kept.update(residual)
        state[RESIDUAL_KEY] = ArrayRecord(
            {n: Array(torch.as_tensor(r).cpu().numpy()) for n, r in kept.items()}
        )
    return record
