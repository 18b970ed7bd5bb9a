"""Malicious clients: attacks on a client's honest training reply (benchmarks and tests).

Each attack takes what an honest client would send back after training (its
``arrays`` and ``metrics``) and the global arrays it received, and returns the
malicious ``(arrays, metrics)``. With Δ = w_client − w_global the honest update:

* ``claim_examples``: every array is zeros (same names, shapes, dtypes) and the
  reply claims ``CLAIMED_EXAMPLES`` (1e300) examples, so in an example-weighted
  mean it outweighs every honest client;
* ``scale_update``: sends w_global + ``SCALE`` · Δ (``SCALE`` = 100);
* ``flip_update``: sends w_global − Δ (the update with its sign flipped).

The attacks work on full-weight replies, as FedDM-vanilla (``strategy=vanilla``)
and prox send them: the reply's arrays must have the global arrays' names and
shapes. Replies that carry int8 codes of an update (``quant``) or parts of the
model (``partial``) are refused with ``ValueError``. Arrays that are not
floating point (none in a UNet) are sent unchanged.

``attacking_client(client_fn, attack, attacker_partitions)`` wraps a client
function ``(msg, context) -> Message`` (e.g. ``client_app.app.train`` /
``evaluate`` behind one dispatcher, as ``feddm.local_grid.LocalGrid`` calls it):
the nodes whose ``partition-id`` is listed reply maliciously to ``train``
messages of federated rounds (``server-round`` >= 1); every other message, and
every other node, is answered by ``client_fn`` untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict

from strategies.packing import unpacked

NUM_EXAMPLES_KEY = "num-examples"
CLAIMED_EXAMPLES = 1e300
SCALE = 100.0

Attack = Callable[[ArrayRecord, MetricRecord, ArrayRecord], tuple[ArrayRecord, MetricRecord]]
ClientFunction = Callable[[Message, Context], Message]


def _pairs(arrays: ArrayRecord, global_arrays: ArrayRecord) -> Iterable[tuple[str, np.ndarray, np.ndarray]]:
    """(name, client value, global value) per array; the reply must hold full weights like the global's."""
    if list(arrays.keys()) != list(global_arrays.keys()):
        raise ValueError(
            "the attacks work on full-weight replies (strategy=vanilla or prox): the reply's arrays "
            f"({len(arrays)}) are not the global model's ({len(global_arrays)}) by name"
        )
    for name in arrays.keys():
        mine, glob = arrays[name].numpy(), global_arrays[name].numpy()
        if mine.shape != glob.shape:
            raise ValueError(
                f"the attacks work on full-weight replies: {name} has shape {mine.shape} in the reply, "
                f"{glob.shape} in the global model"
            )
        yield name, mine, glob


def _record(values: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(array_dict={name: Array(np.ascontiguousarray(v)) for name, v in values.items()})


def _map_update(arrays: ArrayRecord, global_arrays: ArrayRecord, factor: float) -> ArrayRecord:
    """w_global + factor · (w_client − w_global), computed in float64, in each array's own dtype."""
    out = {}
    for name, mine, glob in _pairs(arrays, global_arrays):
        if np.issubdtype(mine.dtype, np.floating):
            g = glob.astype(np.float64)
            out[name] = (g + factor * (mine.astype(np.float64) - g)).astype(mine.dtype)
        else:
            out[name] = mine
    return _record(out)


def claim_examples(
    arrays: ArrayRecord, metrics: MetricRecord, global_arrays: ArrayRecord
) -> tuple[ArrayRecord, MetricRecord]:
    """Zeros for every array, and a claim of ``CLAIMED_EXAMPLES`` (1e300) examples."""
    zeros = {
        name: (np.zeros_like(mine) if np.issubdtype(mine.dtype, np.floating) else mine)
        for name, mine, _ in _pairs(arrays, global_arrays)
    }
    return _record(zeros), MetricRecord({**dict(metrics), NUM_EXAMPLES_KEY: CLAIMED_EXAMPLES})


def scale_update(
    arrays: ArrayRecord, metrics: MetricRecord, global_arrays: ArrayRecord
) -> tuple[ArrayRecord, MetricRecord]:
    """w_global + ``SCALE`` · Δ (100 times the honest update); the metrics unchanged."""
    return _map_update(arrays, global_arrays, SCALE), MetricRecord(dict(metrics))


def flip_update(
    arrays: ArrayRecord, metrics: MetricRecord, global_arrays: ArrayRecord
) -> tuple[ArrayRecord, MetricRecord]:
    """w_global − Δ (the honest update with its sign flipped); the metrics unchanged."""
    return _map_update(arrays, global_arrays, -1.0), MetricRecord(dict(metrics))


ATTACKS: dict[str, Attack] = {
    "claim_examples": claim_examples,
    "scale_update": scale_update,
    "flip_update": flip_update,
}


def attack_reply(reply: Message, global_arrays: ArrayRecord, attack: str | Attack) -> Message:
    """``reply`` (an honest training reply) with its arrays and metrics replaced by the attack's."""
    fn = ATTACKS[attack] if isinstance(attack, str) else attack
    # Packed fp32 replies (strategies.packing) are attacked as the weights they carry, and sent plain.
    arrays, metrics = fn(unpacked(reply.content["arrays"]), reply.content["metrics"], unpacked(global_arrays))
    content = RecordDict({k: v for k, v in reply.content.items() if k not in ("arrays", "metrics")})
    content["arrays"], content["metrics"] = arrays, metrics
    reply.content = content
    return reply


def is_attacked(msg: Message, context: Context, attacker_partitions: Iterable[int]) -> bool:
    """Whether this node answers ``msg`` maliciously: a train message of round >= 1 to a listed partition."""
    if not msg.metadata.message_type.startswith("train"):
        return False
    if int(context.node_config["partition-id"]) not in set(attacker_partitions):
        return False
    return int(msg.content["config"].get("server-round", 0)) >= 1


def attacking_client(
    client_fn: ClientFunction, attack: str | Attack, attacker_partitions: Iterable[int]
) -> ClientFunction:
    """A client function that runs ``client_fn`` and, on the listed partitions' train messages, attacks.

    The attacker trains honestly first (its reply carries the honest update Δ the
    attack transforms), so an attacking round costs as much as an honest one.
    Error replies stay as they are.
    """
    if isinstance(attack, str) and attack not in ATTACKS:
        raise ValueError(f"unknown attack {attack!r}; choose from {sorted(ATTACKS)}")
    attackers = frozenset(int(p) for p in attacker_partitions)

    def client(msg: Message, context: Context) -> Message:
        if not is_attacked(msg, context, attackers):
            return client_fn(msg, context)
        sent = unpacked(msg.content["arrays"])
        received = ArrayRecord(array_dict={name: Array(a.numpy().copy()) for name, a in sent.items()})
        reply = client_fn(msg, context)
        if reply.has_error():
            return reply
        return attack_reply(reply, received, attack)

    return client
