"""Secure aggregation (SecAgg+) for FedDM-vanilla and FedDM-prox, on Flower's own protocol.

Flower 1.42 implements SecAgg+ only on its legacy workflow path: the server
runs ``SecAggPlusWorkflow`` (which needs a ``LegacyContext`` holding a legacy
``Strategy``) and each client runs ``secaggplus_mod`` (which reads and writes
``fitins.*``/``fitres.*`` records). This module bridges the FedDM strategies to it:

* ``SecAggPlusGrid`` wraps the server's ``Grid``. A round's training messages
  do not go out as they are: the grid runs the four SecAgg+ stages (setup,
  share keys, collect masked vectors, unmask) with the same global model and
  config as their ``FitIns``, and gets back only the weighted mean of the
  clients' updates. As Flower's workflow does for legacy strategies, that mean
  is then handed to the strategy in every participating client's reply, beside
  the client's own metrics (sent in the clear), so the strategy's weighted
  mean, logs and checks run unchanged. Evaluation messages pass straight through.
* ``to_message_api`` and ``to_fit_result`` convert the client's side: the
  ``fitins`` records into the usual ``{"arrays", "config"}`` message, and the
  trained weights into the update Δ = w_local − w_global as ``FitRes``, which
  ``secaggplus_mod`` then weights, quantizes and masks.

Clients send updates rather than weights because SecAgg+ clips each weighted
value to ±``clipping_range`` and quantizes it to 2^22 levels: Δ is small, so a
small range keeps the quantization step (2 · clipping_range / 2^22 on Δ · n /
max_weight) far below the update itself. A client whose update would be
clipped refuses to send it (the round goes on without it, as after a drop-out)
instead of having it silently cut.

The server sees only the sum, so per-client checks of the arrays (shapes,
finite values, DP norms) cannot run; the clients check their own update.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.server import ServerConfig
from flwr.server.client_manager import ClientManager, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import SecAggPlusWorkflow
from flwr.serverapp import Grid
from flwr.supercore import log

from strategies.accounting import RoundFailedError, check_metrics, last_line
from strategies.codec import PayloadError, payload_nbytes

# Settings the clients need to turn their trained weights into a SecAgg+ input.
KEY_NAMES = "secagg-names"  # the global model's array names, in order (legacy Parameters have none)
KEY_CLIPPING_RANGE = "secagg-clipping-range"
KEY_MAX_WEIGHT = "secagg-max-weight"


@dataclass(frozen=True)
class SecAggPlus:
    """SecAgg+ settings of a run (``privacy=secagg`` in ``conf/schema.py``).

    ``num_shares`` and ``reconstruction_threshold`` are Flower's: a float is a
    fraction (of the round's nodes, of the shares), an int a count.
    """

    num_shares: float | int
    reconstruction_threshold: float | int
    clipping_range: float
    max_weight: float

    def workflow(self, timeout: float | None) -> SecAggPlusWorkflow:
        """Flower's server side of the protocol, with these settings."""
        return _EarlyDropOutWorkflow(
            num_shares=self.num_shares,
            reconstruction_threshold=self.reconstruction_threshold,
            clipping_range=self.clipping_range,
            max_weight=self.max_weight,
            timeout=timeout,
        )

    def wrap(self, grid: Grid) -> SecAggPlusGrid:
        """``grid``, with its training round trips run as SecAgg+ rounds."""
        return SecAggPlusGrid(grid, self)


# -- client side ------------------------------------------------------------------


def wants_secagg(msg: Message) -> bool:
    """Whether ``msg`` is a stage of the SecAgg+ protocol (for ``secaggplus_mod``)."""
    return RECORD_KEY_CONFIGS in msg.content.config_records


def to_message_api(msg: Message) -> Message:
    """The collect stage's ``fitins`` records as the usual ``{"arrays", "config"}`` train message."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    names = json.loads(str(fitins.config[KEY_NAMES]))
    values = parameters_to_ndarrays(fitins.parameters)
    if len(values) != len(names):
        raise ValueError(f"SecAgg+ instruction holds {len(values)} arrays for {len(names)} names")
    content = RecordDict(
        {
            "arrays": ArrayRecord({n: Array(v) for n, v in zip(names, values)}),
            "config": ConfigRecord(dict(fitins.config)),
        }
    )
    return Message(content=content, metadata=msg.metadata)


def to_fit_result(reply: Message, instruction: Message) -> Message:
    """The trained weights in ``reply`` as the update Δ that ``secaggplus_mod`` masks.

    Raises ``ValueError`` (the node leaves this round, before anything is masked)
    when the metrics are not what the server accepts, Δ is not finite, the
    client's weight exceeds ``max_weight``, or a weighted value would be clipped:
    once masked, an update can no longer be left out of the mean.
    """
    if reply.has_error():
        return reply
    config, received = instruction.content["config"], instruction.content["arrays"]
    try:
        metrics = check_metrics(reply.content, "train_loss")
    except PayloadError as err:
        raise ValueError(f"the reply's metrics would be refused ({err}); the update is not sent") from err
    if not float(metrics["num-examples"]).is_integer():
        raise ValueError(f"num-examples must be a whole number, got {metrics['num-examples']}")
    trained, num_examples = reply.content["arrays"], int(metrics["num-examples"])
    max_weight, clipping_range = float(config[KEY_MAX_WEIGHT]), float(config[KEY_CLIPPING_RANGE])
    if num_examples > max_weight:
        raise ValueError(f"num-examples {num_examples} exceeds privacy.max_weight={max_weight:g}; raise it")
    update = [trained[n].numpy() - received[n].numpy() for n in received.keys()]
    largest = max(float(np.abs(u).max(initial=0.0)) for u in update)
    if not np.isfinite(largest):
        raise ValueError("the update holds NaN or inf values; it is not sent")
    if largest * num_examples / max_weight > clipping_range:
        raise ValueError(
            f"update value {largest:.3g} weighted by num-examples/max_weight = {num_examples}/{max_weight:g} "
            f"exceeds privacy.clipping_range={clipping_range:g}; SecAgg+ would clip it, so it is not sent. "
            "Raise privacy.clipping_range or lower privacy.max_weight"
        )
    metrics_out = {"train_loss": float(metrics["train_loss"])}
    if "info" in reply.content.config_records:
        metrics_out["partition-id"] = int(reply.content["info"]["partition-id"])
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), num_examples, metrics_out)
    return Message(content=compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=instruction)


# -- server side ------------------------------------------------------------------


class _EarlyDropOutWorkflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, where a node lost before the masking stage just leaves the round.

    Flower counts such a node as dead in the unmask stage and asks the others
    for shares of its key, which it never sent them, so one node that fails at
    setup or key sharing would halt the round. Nothing of it is in any masked
    vector, so it is dropped from the sampled nodes and from every neighbourhood.
    """

    def share_keys_stage(self, grid, context, state) -> bool:
        if not super().share_keys_stage(grid, context, state):
            return False
        keep = set(state.active_node_ids)
        if keep != state.sampled_node_ids:
            log(
                WARNING,
                "SecAgg+: nodes %s left before the masking stage",
                sorted(state.sampled_node_ids - keep),
            )
        state.sampled_node_ids = keep
        state.nid_to_neighbours = {n: ns & keep for n, ns in state.nid_to_neighbours.items() if n in keep}
        return self._check_threshold(state)


class _Instructions(LegacyStrategy):
    """The legacy strategy ``SecAggPlusWorkflow`` asks: fixed FitIns in, the unmasked mean out."""

    def __init__(self, fitins: dict[int, FitIns], grid: Grid) -> None:
        self.fitins = fitins
        self.proxies = {nid: GridClientProxy(nid, grid, grid.run.run_id) for nid in fitins}
        self.results: list[tuple[ClientProxy, FitRes]] | None = None

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: ClientManager):
        return [(self.proxies[nid], ins) for nid, ins in self.fitins.items()]

    def aggregate_fit(self, server_round: int, results, failures):
        # Every FitRes holds the unmasked weighted mean (the workflow copies it in).
        self.results = list(results)
        return None, {}

    def initialize_parameters(self, client_manager):
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


def recorddict_nbytes(content: RecordDict) -> int:
    """Bytes of a message's arrays and of the bytes and strings in its configs (SecAgg+ sends both)."""
    total = sum(payload_nbytes(r) for r in content.array_records.values())
    for record in content.config_records.values():
        for value in record.values():
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, (bytes, str)):
                    total += len(item)
    return total


class _CountingGrid:
    """The grid the workflow talks through: counts bytes both ways and keeps why nodes failed."""

    def __init__(self, grid: Grid) -> None:
        self.grid, self.downlink, self.uplink = grid, 0, 0
        self.errors: dict[int, str] = {}  # node id -> the last line of its error

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.downlink += sum(recorddict_nbytes(m.content) for m in messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.uplink += sum(recorddict_nbytes(m.content) for m in replies if not m.has_error())
        self.errors |= {m.metadata.src_node_id: last_line(m.error.reason) for m in replies if m.has_error()}
        return replies


@dataclass
class SecAggPlusGrid:
    """A ``Grid`` whose training round trips run Flower's SecAgg+ protocol (see module doc)."""

    grid: Grid
    settings: SecAggPlus
    # Bytes of all four stages of the last secure round, both ways.
    round_bytes: dict[str, int] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def send_and_receive(self, messages, *, timeout: float | None = None):
        messages = list(messages)
        if not messages or any(m.metadata.message_type != MessageType.TRAIN for m in messages):
            return self.grid.send_and_receive(messages, timeout=timeout)
        return self._secure_round(messages, timeout)

    def _secure_round(self, messages: list[Message], timeout: float | None) -> list[Message]:
        by_node = {m.metadata.dst_node_id: m for m in messages}
        global_arrays = messages[0].content["arrays"]
        server_round = int(messages[0].content["config"]["server-round"])
        extra = {
            KEY_NAMES: json.dumps(list(global_arrays.keys())),
            KEY_CLIPPING_RANGE: float(self.settings.clipping_range),
            KEY_MAX_WEIGHT: float(self.settings.max_weight),
        }
        # Vanilla and prox send every node the same global model: convert it once.
        parameters = compat.arrayrecord_to_parameters(global_arrays, keep_input=True)
        instructions = _Instructions(
            {nid: FitIns(parameters, {**dict(m.content["config"]), **extra}) for nid, m in by_node.items()},
            self.grid,
        )
        counting = _CountingGrid(self.grid)
        context = _legacy_context(instructions, counting.run.run_id)
        context.state.array_records[MAIN_PARAMS_RECORD] = global_arrays
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {WorkflowKey.CURRENT_ROUND: server_round}
        )
        try:
            self.settings.workflow(timeout)(counting, context)
        except (KeyError, ValueError, IndexError, TypeError) as err:  # a malformed protocol reply
            raise RoundFailedError(
                f"round {server_round}: SecAgg+ failed on a malformed reply: {err!r}"
            ) from err
        self.round_bytes = {"uplink_bytes": counting.uplink, "downlink_bytes": counting.downlink}
        if instructions.results is None:
            reasons = "; ".join(f"node {n}: {r}" for n, r in list(counting.errors.items())[:4])
            raise RoundFailedError(
                f"round {server_round}: secure aggregation (SecAgg+) halted before the mean could be "
                f"unmasked: too few of the {len(messages)} nodes took part in every stage (at least 2, and "
                f"enough for privacy.reconstruction_threshold). Failures: "
                f"{reasons or f'no error replies (a node silent for {timeout} s drops out)'}"
            )
        return self._replies(server_round, instructions, by_node, global_arrays, counting.errors)

    @staticmethod
    def _replies(
        server_round: int,
        instructions: _Instructions,
        by_node: dict[int, Message],
        global_arrays: ArrayRecord,
        errors: dict[int, str],
    ) -> list[Message]:
        """Each participant's reply: its metrics and the new global weights (w + mean Δ)."""
        mean_update = parameters_to_ndarrays(instructions.results[0][1].parameters)
        names = list(global_arrays.keys())
        if len(mean_update) != len(names):
            raise RoundFailedError(f"SecAgg+ returned {len(mean_update)} arrays for a model of {len(names)}")
        weights = {}
        for name, update in zip(names, mean_update):
            current = global_arrays[name].numpy()
            weights[name] = Array((current + update).astype(current.dtype))
        weights = ArrayRecord(weights)
        replies = []
        for proxy, fitres in instructions.results:
            # The metrics came in the clear, but the update is already in the masked sum:
            # a reply the strategy would leave out fails the whole round instead.
            try:
                metrics = MetricRecord(
                    {"train_loss": fitres.metrics.get("train_loss"), "num-examples": fitres.num_examples}
                )
                check_metrics(RecordDict({"metrics": metrics}), "train_loss")
            except (PayloadError, TypeError) as err:
                raise RoundFailedError(
                    f"round {server_round}: node {proxy.node_id} sent malformed metrics ({err}) with an update "
                    "that is already in the SecAgg+ sum and cannot be left out"
                ) from err
            content = RecordDict({"arrays": weights, "metrics": metrics})
            if "partition-id" in fitres.metrics:
                content["info"] = ConfigRecord({"partition-id": int(fitres.metrics["partition-id"])})
            replies.append(Message(content=content, reply_to=by_node.pop(proxy.node_id)))
        for nid, message in by_node.items():  # nodes that dropped out of the protocol
            if nid not in errors:  # silent past a stage's timeout: late, no reply (as Flower's grids give)
                log(WARNING, "SecAgg+: node %d dropped out of the round: no reply in time", nid)
                continue
            log(WARNING, "SecAgg+: node %d dropped out of the round", nid)
            reason = f"dropped out of the SecAgg+ round: {errors[nid]}"
            replies.append(Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason=reason), reply_to=message))
        return replies


def _legacy_context(instructions: _Instructions, run_id: int) -> LegacyContext:
    client_manager = SimpleClientManager()
    for proxy in instructions.proxies.values():
        client_manager.register(proxy)
    base = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config={})
    return LegacyContext(
        base, config=ServerConfig(num_rounds=1), strategy=instructions, client_manager=client_manager
    )


__all__ = [
    "SecAggPlus",
    "SecAggPlusGrid",
    "to_fit_result",
    "to_message_api",
    "wants_secagg",
]
