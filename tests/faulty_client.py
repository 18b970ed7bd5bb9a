"""A FedDM ClientApp that misbehaves on purpose (for the fault tests).

``FEDDM_FAULT`` picks what goes wrong from round ``FEDDM_FAULT_ROUND`` (default
1) on, in the client with partition id 1 (``*-all``: in every client):

* ``nan-scales``: int8 update with NaN scales (FedDM-quant);
* ``nan``: weights with NaN values;
* ``shape``: a weight with a wrong shape; ``dtype``: weights as float64;
* ``raise``, ``raise-all``: the train function raises;
* ``slow``: the client replies after ``FEDDM_FAULT_SLEEP`` seconds;
* ``claim-examples``: claims 1e300 examples and sends zeros (full weights);
* ``short-pack``: packed fp32 weights (``strategies.packing``) one value short;
* ``scale-update``: sends w_global + 100·Δ; ``flip-update``: sends w_global − Δ
  (Δ = w_local − w_global; full-weight strategies: vanilla, prox, fedddpm).

It lives in its own importable module so Ray's workers can load it; Ray's
workers inherit the environment of the process that starts the simulation.
"""

from __future__ import annotations

import os
import time

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client_app.app import evaluate as feddm_evaluate
from client_app.app import secagg_mod
from client_app.app import train as feddm_train
from strategies.codec import SCALES_KEY
from strategies.packing import VALUES_KEY, pack_arrays, unpacked

app = ClientApp()


class InjectedFault(RuntimeError):
    """The failure a test asked this client for."""


def _faulty(msg: Message, context: Context) -> str | None:
    fault = os.environ.get("FEDDM_FAULT", "")
    if int(msg.content["config"]["server-round"]) < int(os.environ.get("FEDDM_FAULT_ROUND", "1")):
        return None
    if fault.endswith("-all") or int(context.node_config["partition-id"]) == 1:
        return fault.removesuffix("-all")
    return None


def _corrupt(arrays: dict[str, np.ndarray], fault: str, sent: ArrayRecord) -> dict[str, np.ndarray]:
    if fault in ("scale-update", "flip-update"):
        factor = 100.0 if fault == "scale-update" else -1.0
        return {
            n: (sent[n].numpy() + factor * (a - sent[n].numpy())).astype(a.dtype) for n, a in arrays.items()
        }
    if fault == "claim-examples":
        return {n: np.zeros_like(a) for n, a in arrays.items()}
    if fault == "nan-scales":
        arrays[SCALES_KEY] = np.full_like(arrays[SCALES_KEY], np.nan)
    elif fault == "nan":
        name = next(iter(arrays))
        arrays[name] = np.full_like(arrays[name], np.nan)
    elif fault == "shape":
        name = next(n for n, a in arrays.items() if a.ndim >= 2)
        arrays[name] = arrays[name][:-1].copy()
    elif fault == "dtype":
        arrays = {n: a.astype(np.float64) for n, a in arrays.items()}
    return arrays


@app.train(mods=[secagg_mod])  # privacy=secagg runs need Flower's protocol
def train(msg: Message, context: Context) -> Message:
    """Train as FedDM does, then misbehave as asked."""
    fault = _faulty(msg, context)
    if fault == "raise":
        raise InjectedFault(f"injected failure in round {msg.content['config']['server-round']}")
    reply = feddm_train(msg, context)
    if fault == "slow":
        time.sleep(float(os.environ.get("FEDDM_FAULT_SLEEP", "10")))
    if fault in (None, "slow"):
        return reply
    # A hostile client may send packed or plain arrays: it corrupts the weights, sent as plain arrays.
    weights = unpacked(reply.content["arrays"])
    arrays = _corrupt({n: a.numpy() for n, a in weights.items()}, fault, unpacked(msg.content["arrays"]))
    if fault == "short-pack":
        arrays = {k: a.numpy() for k, a in pack_arrays(weights).items()}
        arrays[VALUES_KEY] = arrays[VALUES_KEY][:-1]
    metrics = reply.content["metrics"]
    if fault == "claim-examples":
        metrics = MetricRecord({**dict(metrics), "num-examples": 1e300})
    content = RecordDict(
        {
            "arrays": ArrayRecord({n: Array(a) for n, a in arrays.items()}),
            "metrics": metrics,
            "info": reply.content["info"],
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate as FedDM does."""
    return feddm_evaluate(msg, context)
