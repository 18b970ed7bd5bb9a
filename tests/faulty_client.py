"""A ClientApp whose node with partition-id 1 corrupts its int8 update (for tests).

It lives in its own importable module so Ray's workers can load it.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from client_app.app import evaluate as feddm_evaluate
from client_app.app import train as feddm_train
from strategies.codec import SCALES_KEY

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train as FedDM does; partition 1 then sends NaN scales."""
    reply = feddm_train(msg, context)
    if int(context.node_config["partition-id"]) != 1:
        return reply
    arrays = {name: array.numpy() for name, array in reply.content["arrays"].items()}
    arrays[SCALES_KEY] = np.full_like(arrays[SCALES_KEY], np.nan)
    corrupted = ArrayRecord({name: Array(a) for name, a in arrays.items()})
    content = RecordDict({"arrays": corrupted, "metrics": reply.content["metrics"]})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate as FedDM does."""
    return feddm_evaluate(msg, context)
