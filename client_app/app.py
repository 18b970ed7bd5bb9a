"""The FedDM ClientApp (Flower Message API).

``train``: load the global weights, train on the local partition, reply with the
new weights (or, for FedDM-quant, the int8 codes of the update) and the training
loss. ``evaluate``: reply with the denoising loss on the client's held-out images.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client_app.task import (
    ClientSettings,
    build_model,
    client_data,
    local_evaluate,
    local_train,
    proximal_term,
    read_settings,
    round_seed,
)
from client_app.updates import quantized_update, received_weights, wants_quantized_update
from models import resolve_device

app = ClientApp()


def _device(settings: ClientSettings, context: Context) -> torch.device:
    # A SuperNode's own node config wins: it knows its hardware.
    return resolve_device(str(context.node_config.get("device", settings.device)))


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this client's data."""
    config = msg.content["config"]
    settings = read_settings(config)
    unet, scheduler = build_model(settings, _device(settings, context))
    received = received_weights(msg.content["arrays"], unet.state_dict())
    unet.load_state_dict(received)
    dataset, train_idx, _ = client_data(settings, context.node_config)

    partition_id = int(context.node_config["partition-id"])
    seed = round_seed(settings.seed, int(config["server-round"]), partition_id)
    regularizer = proximal_term(unet, float(config.get("proximal-mu", 0.0)))
    train_loss, _ = local_train(
        unet, scheduler, dataset, train_idx, settings, seed=seed, regularizer=regularizer
    )

    if wants_quantized_update(config):
        arrays = quantized_update(unet.state_dict(), received, config, context.state, seed)
    else:
        arrays = ArrayRecord(unet.state_dict())
    metrics = MetricRecord({"train_loss": train_loss, "num-examples": len(train_idx)})
    # The partition id lets the server sum replies in a fixed order (reproducible runs).
    info = ConfigRecord({"partition-id": partition_id})
    content = RecordDict({"arrays": arrays, "metrics": metrics, "info": info})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Report the denoising loss of the received model on held-out local images."""
    settings = read_settings(msg.content["config"])
    unet, scheduler = build_model(settings, _device(settings, context))
    unet.load_state_dict(received_weights(msg.content["arrays"], unet.state_dict()))
    dataset, _, holdout_idx = client_data(settings, context.node_config)

    # The same noise every round, so the loss is comparable across rounds.
    seed = round_seed(settings.seed, int(context.node_config["partition-id"]), 1)
    eval_loss, num_examples = local_evaluate(
        unet, scheduler, dataset, holdout_idx, settings, seed=seed
    )
    metrics = MetricRecord({"eval_loss": eval_loss, "num-examples": num_examples})
    info = ConfigRecord({"partition-id": int(context.node_config["partition-id"])})
    return Message(content=RecordDict({"metrics": metrics, "info": info}), reply_to=msg)
