"""SecAgg+ (privacy=secagg): Flower's protocol run in-process between the FedDM strategy and clients.

A ``LocalGrid`` delivers each message to a client function wrapped in the
ClientApp's ``secagg_mod``, with a Context per node, so the four SecAgg+ stages,
the masking and the unmasking are Flower's real code; only the transport is
replaced (the Ray simulations are in test_secagg_sim.py).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat

from client_app.app import secagg_mod
from feddm.local_grid import LocalGrid
from strategies import RoundFailedError, build_strategy
from strategies.secagg import (
    KEY_CLIPPING_RANGE,
    KEY_MAX_WEIGHT,
    KEY_NAMES,
    recorddict_nbytes,
    to_fit_result,
    to_message_api,
)

# Messages made outside a ServerApp need a run id.
pytestmark = pytest.mark.usefixtures("flower_task_identity")

GLOBAL = {"conv.weight": np.full((2, 3), 0.5, dtype=np.float32), "conv.bias": np.zeros(2, dtype=np.float32)}
SECAGG = {
    "name": "secagg",
    "num_shares": 1.0,
    "reconstruction_threshold": 0.67,
    "clipping_range": 1.0,
    "max_weight": 100,
}


def _record(arrays):
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


def _update(node: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(node)
    return {k: rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in GLOBAL.items()}


class Clients:
    """Client nodes for a ``LocalGrid``: the ClientApp's ``secagg_mod`` around a train function
    whose update is known (``_update``). Nodes in ``fail`` raise in SecAgg+ stage ``stage``
    ("train": while training, in the masking stage); nodes in ``nan_loss`` skip FedDM's
    client-side checks and mask their update with a NaN loss, as a tampered client could."""

    def __init__(
        self, nodes: dict[int, int], fail=frozenset(), stage: str = "train", nan_loss=frozenset()
    ) -> None:
        self.nodes, self.fail, self.stage, self.nan_loss = (
            nodes,
            fail,
            stage,
            nan_loss,
        )  # nodes: id -> num-examples

    def __call__(self, msg: Message, context: Context) -> Message:
        if msg.metadata.message_type == "evaluate":
            metrics = MetricRecord({"eval_loss": 1.0, "num-examples": self.nodes[context.node_id]})
            return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
        if context.node_id in self.fail and msg.content["secaggplus_configs"]["stage"] == self.stage:
            raise RuntimeError(f"node {context.node_id} crashed in stage {self.stage}")
        if context.node_id in self.nan_loss:
            return secaggplus_mod(msg, context, self._tampered)
        return secagg_mod(msg, context, self._train)

    def _tampered(self, msg: Message, context: Context) -> Message:
        update = list(_update(context.node_id).values())
        fitres = FitRes(
            Status(Code.OK, ""),
            ndarrays_to_parameters(update),
            self.nodes[context.node_id],
            {"train_loss": float("nan")},
        )
        return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)

    def _train(self, msg: Message, context: Context) -> Message:
        node = context.node_id
        if node in self.fail and self.stage == "train":
            raise RuntimeError(f"node {node} crashed while training")
        received, update = msg.content["arrays"], _update(node)
        trained = {k: received[k].numpy() + update[k] for k in received.keys()}
        content = RecordDict(
            {
                "arrays": _record(trained),
                "metrics": MetricRecord({"train_loss": float(node), "num-examples": self.nodes[node]}),
                "info": ConfigRecord({"partition-id": node}),
            }
        )
        return Message(content=content, reply_to=msg)


def _grid(nodes: dict[int, int], **faults) -> LocalGrid:
    return LocalGrid(nodes, Clients(nodes, **faults))


def _stages(grid: LocalGrid) -> list[str]:
    return [
        m.content["secaggplus_configs"]["stage"]
        for m in grid.sent
        if "secaggplus_configs" in m.content.config_records
    ]


def _train_replies(grid: LocalGrid) -> list[Message]:
    return [m for m in grid.received if not m.has_error() and m.metadata.message_type == "train"]


def _start(grid, privacy=SECAGG, strategy="vanilla"):
    fed = build_strategy(
        {"name": strategy, "mu": 0.01}, num_clients=len(grid.get_node_ids()), privacy=privacy
    )
    result = fed.start(
        grid=grid,
        initial_arrays=_record(GLOBAL),
        num_rounds=1,
        timeout=10,
        train_config=ConfigRecord({"lr": 0.1}),
        evaluate_config=ConfigRecord({}),
    )
    return fed, result


def _weighted_mean(nodes):
    total = sum(nodes.values())
    return {k: GLOBAL[k] + sum(n * _update(i)[k] for i, n in nodes.items()) / total for k in GLOBAL}


def test_the_unmasked_mean_is_the_weighted_mean_of_the_updates():
    nodes = {1: 40, 2: 60, 3: 100}
    grid = _grid(nodes)
    fed, result = _start(grid)
    expected = _weighted_mean(nodes)
    arrays = result.arrays
    # SecAgg+ quantizes each weighted value to 2^22 levels over +-clipping_range.
    step = 2 * SECAGG["clipping_range"] / 2**22
    for k, v in expected.items():
        np.testing.assert_allclose(arrays[k].numpy(), v, atol=4 * step * 100 / 40, rtol=0)
    log = fed.round_log[1]
    assert log["num_aggregated"] == 3 and log["num_sampled"] == 3
    assert log["train_loss"] == pytest.approx((40 * 1 + 60 * 2 + 100 * 3) / 200)
    # Four round trips; the masked vectors are int64, so the uplink is >= 2x the fp32 updates.
    assert log["uplink_bytes"] >= 3 * 2 * 8 * 4
    assert log["uplink_bytes"] == sum(recorddict_nbytes(m.content) for m in _train_replies(grid))


def test_the_server_never_receives_a_clients_arrays():
    grid = _grid({1: 10, 2: 10, 3: 10})
    _start(grid)
    assert (
        _stages(grid) == ["setup"] * 3 + ["share_keys"] * 3 + ["collect_masked_vectors"] * 3 + ["unmask"] * 3
    )
    for message in _train_replies(grid):
        assert all(len(record) == 0 for record in message.content.array_records.values())
    masked = [m for m in _train_replies(grid) if "masked_params" in m.content["secaggplus_configs"]]
    assert len(masked) == 3


def test_prox_runs_over_secagg_and_sends_its_mu():
    grid = _grid({1: 10, 2: 30})
    _, result = _start(grid, strategy="prox")
    fit = [m for m in grid.sent if "fitins.config" in m.content.config_records]
    assert fit and all(m.content["fitins.config"]["proximal-mu"] == 0.01 for m in fit)
    np.testing.assert_allclose(
        result.arrays["conv.bias"].numpy(), _weighted_mean({1: 10, 2: 30})["conv.bias"], atol=1e-5
    )


@pytest.mark.parametrize("stage", ["setup", "share_keys", "train", "collect_masked_vectors", "unmask"])
def test_a_node_that_drops_out_at_any_stage_leaves_the_others_to_be_unmasked(stage):
    nodes = {1: 10, 2: 20, 3: 30, 4: 40}
    grid = _grid(nodes, fail={2}, stage=stage)
    fed, result = _start(grid)
    # Until its masked update is in, a node that fails is left out; in the unmask stage
    # its update is already in the sum, and the others' shares remove its masks.
    expected = _weighted_mean(nodes if stage == "unmask" else {1: 10, 3: 30, 4: 40})
    for k, v in expected.items():
        np.testing.assert_allclose(result.arrays[k].numpy(), v, atol=1e-5)
    assert fed.round_log[1]["num_aggregated"] == (4 if stage == "unmask" else 3)
    assert fed.round_log[1]["num_sampled"] == 4


def test_malformed_metrics_with_a_masked_update_fail_the_round():
    # the update is in the sum and cannot be taken out, so nothing of the round is applied
    grid = _grid({1: 10, 2: 20, 3: 30}, nan_loss={3})
    with pytest.raises(RoundFailedError, match="node 3 sent malformed metrics .*cannot be left out"):
        _start(grid)


def test_too_few_nodes_left_stops_the_round_with_a_clear_error():
    grid = _grid({1: 10, 2: 20}, fail={2})
    with pytest.raises(RoundFailedError, match="SecAgg\\+\\) halted") as failed:
        _start(grid)
    assert "node 2 crashed while training" in str(failed.value)


def test_evaluation_messages_pass_straight_through():
    grid = _grid({1: 10, 2: 20})
    fed = build_strategy({"name": "vanilla"}, num_clients=2, privacy=SECAGG)
    wrapped = fed.secure_aggregation.wrap(grid)
    msg = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=1, message_type="evaluate")
    calls = []
    grid.send_and_receive = lambda messages, timeout=None: calls.append(messages) or []
    wrapped.send_and_receive([msg])
    assert calls == [[msg]]


@pytest.mark.parametrize("strategy", ["quant", "partial", "fedddpm"])
def test_secagg_is_refused_for_strategies_that_do_not_send_full_model_updates(strategy):
    with pytest.raises(ValueError, match="privacy=secagg works with strategy vanilla | prox"):
        build_strategy({"name": strategy}, num_clients=2, privacy=SECAGG)


# -- the client-side conversion ------------------------------------------------------


def _instruction(extra=None):
    config = {
        "server-round": 1,
        KEY_NAMES: json.dumps(list(GLOBAL)),
        KEY_CLIPPING_RANGE: 0.1,
        KEY_MAX_WEIGHT: 50.0,
        **(extra or {}),
    }
    fitins = FitIns(ndarrays_to_parameters(list(GLOBAL.values())), config)
    return Message(compat.fitins_to_recorddict(fitins, keep_input=True), dst_node_id=1, message_type="train")


def _trained(instruction, delta, num_examples=25):
    trained = {k: instruction.content["arrays"][k].numpy() + delta for k in GLOBAL}
    content = RecordDict(
        {
            "arrays": _record(trained),
            "metrics": MetricRecord({"train_loss": 0.5, "num-examples": num_examples}),
            "info": ConfigRecord({"partition-id": 3}),
        }
    )
    return Message(content=content, reply_to=instruction)


def test_the_instruction_is_named_and_the_reply_is_the_update():
    instruction = to_message_api(_instruction())
    assert list(instruction.content["arrays"].keys()) == list(GLOBAL)
    np.testing.assert_array_equal(instruction.content["arrays"]["conv.weight"].numpy(), GLOBAL["conv.weight"])
    fitres = compat.recorddict_to_fitres(
        to_fit_result(_trained(instruction, 0.01), instruction).content, True
    )
    update = parameters_to_ndarrays(fitres.parameters)
    np.testing.assert_allclose(update[0], np.full((2, 3), 0.01), rtol=1e-5)
    assert fitres.num_examples == 25 and fitres.metrics == {"train_loss": 0.5, "partition-id": 3}


@pytest.mark.parametrize(
    ("delta", "num_examples", "error"),
    [
        (np.nan, 25, "NaN or inf"),
        (0.5, 25, "privacy.clipping_range=0.1"),  # 0.5 * 25/50 > 0.1
        (0.01, 51, "privacy.max_weight=50"),
        (0.01, 0, "num-examples' must be > 0"),
        (0.01, -20, "num-examples' must be > 0"),
        (0.01, 2.5, "whole number"),
    ],
)
def test_an_update_secagg_would_clip_or_garble_is_not_sent(delta, num_examples, error):
    instruction = to_message_api(_instruction())
    with pytest.raises(ValueError, match=error):
        to_fit_result(_trained(instruction, delta, num_examples), instruction)


def test_an_instruction_whose_arrays_do_not_match_its_names_is_refused():
    with pytest.raises(ValueError, match="holds 2 arrays for 1 names"):
        to_message_api(_instruction({KEY_NAMES: json.dumps(["conv.weight"])}))


def test_bytes_in_config_records_are_counted():
    content = RecordDict({"c": ConfigRecord({"masked": [b"1234", b"56"], "stage": "masking", "n": 3})})
    assert recorddict_nbytes(content) == 6 + 7
