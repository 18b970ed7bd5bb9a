"""A FedDM ClientApp that writes down what each reply carries (for tests).

Every reply's ArrayRecords (name -> the model arrays it carries, and name ->
its entries: for encoded records the codec's) are appended as a JSON line to
the file named by ``FEDDM_RECORD_REPLIES``; the replies themselves are
FedDM's, unchanged. It lives in its own module so Ray's workers can load it.
"""

from __future__ import annotations

import json
import os

from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from client_app.app import evaluate as feddm_evaluate
from client_app.app import train as feddm_train
from strategies.quant import sent_names

app = ClientApp()


def _record(kind: str, reply: Message, context: Context) -> Message:
    records = {key: value for key, value in reply.content.items() if isinstance(value, ArrayRecord)}
    line = {
        "kind": kind,
        "partition": int(context.node_config["partition-id"]),
        "arrays": {key: sent_names(record) for key, record in records.items()},
        "entries": {key: list(record.keys()) for key, record in records.items()},
    }
    with open(os.environ["FEDDM_RECORD_REPLIES"], "a", encoding="utf-8") as file:
        file.write(json.dumps(line) + "\n")
    return reply


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train as FedDM does; write down the reply's arrays."""
    return _record("train", feddm_train(msg, context), context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate as FedDM does; write down the reply's arrays."""
    return _record("evaluate", feddm_evaluate(msg, context), context)
