"""A client's side of partial-UNet exchange (``strategy=partial``).

The server sends the shared parts (a node contacted the first time gets the
whole model); the client puts its own local parts, kept in ``Context.state``
across rounds, beside them, trains the whole model, keeps the new local parts
and sends back only shared parts: all of them, or (USplit) its share of them.
Local parts never leave the client. Clients with local parts also keep an EMA of
their own model (the server keeps the global one), for samples and FID.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from diffusers import UNet2DModel
from diffusers.training_utils import EMAModel
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from client_app.updates import quantized_update, wants_quantized_update
from models.parts import names_in, usplit_assignment
from strategies.sampling import SAMPLED_PARTITIONS_KEY

LOCAL_KEY = "feddm-partial-local"  # the client's local parts
EMA_KEY = "feddm-partial-ema"  # EMA of the client's own model (parameters)
EMA_STEP_KEY = "feddm-partial-ema-step"


class MissingLocalPartsError(RuntimeError):
    """The server sent only shared parts, but this client holds no local parts."""


def wants_partial(config: Mapping[str, Any]) -> bool:
    """True when the strategy exchanges only parts of the UNet."""
    return "partial-shared" in config


def shared_names(config: Mapping[str, Any], names: list[str]) -> list[str]:
    """The names of the shared parameters, from the strategy's ``partial-shared`` parts."""
    return names_in(json.loads(config["partial-shared"]), names)


def assemble(
    record: ArrayRecord, model_state: Mapping[str, torch.Tensor], state: RecordDict
) -> dict[str, torch.Tensor]:
    """This client's full weights: the received parts, and its local parts for the rest."""
    received = record.to_torch_state_dict()
    missing = [n for n in model_state if n not in received]
    if not missing:  # the whole model: first contact, USplit, or nothing local
        if LOCAL_KEY in state and set(state[LOCAL_KEY]) <= set(received):
            # A server that does not know this node holds local parts (a resumed simulation,
            # whose nodes are new to it): the client's own parts, kept on disk, go on.
            local = state[LOCAL_KEY].to_torch_state_dict()
            return {n: local.get(n, received[n]) for n in model_state}
        return received
    if LOCAL_KEY not in state:
        raise MissingLocalPartsError(
            f"the server sent {len(received)} of {len(model_state)} arrays, but this client holds "
            "no local parts (its state was lost, e.g. the SuperNode restarted during the run)"
        )
    local = state[LOCAL_KEY].to_torch_state_dict()
    if sorted(local) != sorted(missing):
        raise MissingLocalPartsError("this client's local parts do not match what the server left out")
    return {n: received[n] if n in received else local[n] for n in model_state}


def keep_local_parts(weights: Mapping[str, torch.Tensor], shared: list[str], state: RecordDict) -> None:
    """Store the parts that are not shared in the client's state (nothing if all are shared)."""
    local = {n: t.detach().cpu() for n, t in weights.items() if n not in set(shared)}
    if local:
        state[LOCAL_KEY] = ArrayRecord(local)


def reply_arrays(
    local: Mapping[str, torch.Tensor],
    received: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    state: RecordDict,
    *,
    partition_id: int,
    num_partitions: int,
    seed: int,
) -> ArrayRecord:
    """The shared parts this client sends: weights, or int8 codes of their update."""
    names = shared_names(config, list(local))
    ways = int(config["partial-split-ways"])
    if ways:
        sizes = {n: t.numel() for n, t in local.items() if n in set(names)}
        assignment = usplit_assignment(
            sizes,
            num_partitions=num_partitions,
            ways=ways,
            seed=int(config["partial-seed"]),
            server_round=int(config["server-round"]),
            # A sampled round: groups are formed among the sampled partitions only.
            members=json.loads(config[SAMPLED_PARTITIONS_KEY]) if SAMPLED_PARTITIONS_KEY in config else None,
        )
        names = names_in(assignment[partition_id], names)
    if wants_quantized_update(config):
        return quantized_update(
            {n: local[n] for n in names}, {n: received[n] for n in names}, config, state, seed
        )
    return ArrayRecord({n: local[n].detach().cpu() for n in names})


def personal_ema(unet: UNet2DModel, state: RecordDict, decay: float, *, persist: bool) -> EMAModel:
    """The EMA of this client's own model, stepped with the current weights.

    Called at every training round (``persist``: the step is kept, on the model
    the client received, i.e. after the last aggregation) and at evaluation
    (a step with the freshly aggregated model, not kept), so it follows the
    same schedule as the server's EMA of the global model.
    """
    ema = EMAModel(unet.parameters(), decay=decay)
    if EMA_KEY in state:
        shadow = state[EMA_KEY].to_torch_state_dict()
        device = next(unet.parameters()).device
        ema.shadow_params = [shadow[n].to(device) for n, _ in unet.named_parameters()]
        ema.optimization_step = int(state[EMA_STEP_KEY]["step"])
        ema.step(unet.parameters())
    if persist:
        names = [n for n, _ in unet.named_parameters()]
        state[EMA_KEY] = ArrayRecord({n: p.detach().cpu() for n, p in zip(names, ema.shadow_params)})
        state[EMA_STEP_KEY] = ConfigRecord({"step": int(ema.optimization_step)})
    return ema


def samples_record(images: torch.Tensor) -> ArrayRecord:
    """Generated uint8 images N x C x H x W, as sent in an evaluate reply."""
    return ArrayRecord({"images": Array(np.ascontiguousarray(images.numpy()))})
