"""Stragglers and over-selection: the round deadline (``round_timeout_s``), ``num_late``,
``min_replies`` and ``over_select``.

Clients answer in-process over a ``LocalGrid`` whose simulated clock makes a
chosen client's reply miss the deadline: the strategy then gets exactly what
Flower's grids give it, every reply but the late one (the real-simulation slow
client is in ``test_faults.py``).
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from feddm.local_grid import LocalGrid
from server_app.config import ConfigError, compose_config, validate_config
from strategies import RoundFailedError, Sampling, build_strategy
from strategies.packing import unpacked
from tests.test_secagg import GLOBAL as SECAGG_GLOBAL
from tests.test_secagg import SECAGG, Clients, _weighted_mean
from tests.test_strategies import GLOBAL, _record

pytestmark = pytest.mark.usefixtures("flower_task_identity")

DEADLINE = 60.0


def _partition(context: Context) -> int:
    return int(context.node_config["partition-id"])


def _client(msg: Message, context: Context) -> Message:
    """A client that adds partition + 1 to every weight (10 examples), or raises for partition 0 with ``fail``."""
    pid = _partition(context)
    info = ConfigRecord({"partition-id": pid})
    kind = msg.metadata.message_type
    if kind == "query":
        return Message(content=RecordDict({"info": info}), reply_to=msg)
    if kind == "evaluate":
        metrics = MetricRecord({"eval_loss": 1.0, "num-examples": 10})
        return Message(content=RecordDict({"metrics": metrics, "info": info}), reply_to=msg)
    if context.node_config.get("fail"):
        raise RuntimeError("injected failure")
    arrays = {k: a.numpy() + (pid + 1) for k, a in unpacked(msg.content["arrays"]).items()}
    metrics = MetricRecord({"train_loss": 0.5, "num-examples": 10})
    return Message(
        content=RecordDict({"arrays": _record(arrays), "metrics": metrics, "info": info}), reply_to=msg
    )


def _grid(clients: int, slow=(), failing=(), first_node: int = 1) -> LocalGrid:
    """``clients`` nodes (partition i on node ``first_node + i``); ``slow`` partitions reply after the deadline."""
    nodes = list(range(first_node, first_node + clients))
    partition = {node: i for i, node in enumerate(nodes)}

    def delay(message: Message) -> float:
        late = partition[message.metadata.dst_node_id] in slow and message.metadata.message_type == "train"
        return 2 * DEADLINE if late else 1.0

    grid = LocalGrid(nodes, _client, reply_delay=delay)
    for node, context in grid.contexts.items():
        context.node_config.update({"partition-id": partition[node], "fail": partition[node] in failing})
    return grid


def _start(strategy, grid: LocalGrid, rounds: int = 1):
    return strategy.start(
        grid=grid,
        initial_arrays=_record(GLOBAL),
        num_rounds=rounds,
        timeout=DEADLINE,
        train_config=ConfigRecord({}),
        evaluate_config=ConfigRecord({}),
    )


def _value(arrays) -> float:
    values = np.concatenate([a.numpy().ravel() for a in arrays.values()])
    assert np.allclose(values, values[0])
    return float(values[0])


# -- the deadline --------------------------------------------------------------------


def test_a_reply_later_than_the_deadline_is_discarded_counted_and_the_others_aggregated(caplog):
    strategy = build_strategy({"name": "vanilla"}, num_clients=3)
    grid = _grid(3, slow={2})
    with caplog.at_level("WARNING"):
        result = _start(strategy, grid, rounds=2)
    for server_round in (1, 2):
        row = strategy.round_log[server_round]
        assert (row["num_sampled"], row["num_aggregated"], row["num_late"]) == (3, 2, 1)
        assert (row["num_failed"], row["num_rejected"]) == (0, 0)
    # Each round adds the mean of partitions 0 and 1 (+1, +2): 1.5, not the 2 of all three.
    assert _value(result.arrays) == pytest.approx(3.0)
    # The slow client still trained (as a real one finishes after the deadline); its replies went nowhere.
    assert len(grid.late) == 2 and all(not m.has_error() for m in grid.late)
    assert "1 of the 3 training messages got no reply within round_timeout_s=60" in caplog.text


def test_without_a_deadline_every_reply_is_waited_for():
    grid = _grid(3, slow={2})
    strategy = build_strategy({"name": "vanilla"}, num_clients=3)
    strategy.start(grid=grid, initial_arrays=_record(GLOBAL), num_rounds=1, timeout=None)
    assert strategy.round_log[1]["num_late"] == 0 and strategy.round_log[1]["num_aggregated"] == 3
    assert grid.late == []


def test_an_error_reply_is_failed_not_late():
    strategy = build_strategy({"name": "vanilla"}, num_clients=4)
    _start(strategy, _grid(4, slow={3}, failing={0}))
    row = strategy.round_log[1]
    assert (row["num_sampled"], row["num_aggregated"], row["num_failed"], row["num_late"]) == (4, 2, 1, 1)


def test_fewer_replies_than_min_replies_fail_the_round_naming_the_late_ones():
    strategy = build_strategy({"name": "vanilla"}, num_clients=3, min_replies=3)
    with pytest.raises(RoundFailedError) as failed:
        _start(strategy, _grid(3, slow={1}))
    message = str(failed.value)
    assert "round 1: 2 training replies could be aggregated, fewer than min_replies=3" in message
    assert "(1 late, 0 failed, 0 left out)" in message
    assert "1 clients sent no reply within round_timeout_s=60: raise it, or draw extra clients" in message


def test_min_replies_that_arrive_let_the_round_go_on():
    strategy = build_strategy({"name": "vanilla"}, num_clients=3, min_replies=2)
    _start(strategy, _grid(3, slow={1}))
    assert strategy.round_log[1]["num_aggregated"] == 2


def test_a_round_where_every_reply_is_late_fails_saying_so():
    strategy = build_strategy({"name": "vanilla"}, num_clients=2)
    with pytest.raises(RoundFailedError, match="none of the 0 training replies") as failed:
        _start(strategy, _grid(2, slow={0, 1}))
    assert "No client replied. 2 clients sent no reply within round_timeout_s=60" in str(failed.value)


def test_a_node_silent_in_secagg_is_late_and_the_others_are_unmasked():
    nodes = {1: 10, 2: 20, 3: 30, 4: 40}
    # Node 4 misses the deadline from the first stage on: SecAgg+ leaves it out as a drop-out.
    grid = LocalGrid(
        nodes, Clients(nodes), reply_delay=lambda m: 100.0 if m.metadata.dst_node_id == 4 else 0.0
    )
    strategy = build_strategy({"name": "vanilla"}, num_clients=4, privacy=SECAGG)
    result = strategy.start(
        grid=grid,
        initial_arrays=_record(SECAGG_GLOBAL),
        num_rounds=1,
        timeout=10,
        evaluate_config=ConfigRecord(),
    )
    row = strategy.round_log[1]
    assert (row["num_sampled"], row["num_aggregated"], row["num_late"], row["num_failed"]) == (4, 3, 1, 0)
    expected = _weighted_mean({n: w for n, w in nodes.items() if n != 4})
    for name, value in expected.items():
        np.testing.assert_allclose(result.arrays[name].numpy(), value, atol=1e-5)


# -- over-selection ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("per_round", "over", "nodes", "drawn"),
    [(4, 0.0, 10, 4), (4, 0.5, 10, 6), (10, 0.3, 100, 13), (3, 0.1, 10, 4), (4, 1.0, 6, 6), (4, 0.5, 4, 4)],
)
def test_over_select_draws_ceil_k_times_one_plus_over_select_at_most_the_rounds_clients(
    per_round, over, nodes, drawn
):
    sampling = Sampling(per_round, seed=1, over_select=over)
    assert sampling.drawn("train", nodes) == drawn
    assert sampling.drawn("evaluate", nodes) == per_round  # evaluation is not over-selected
    options = sampling.flower_options(nodes)
    assert (options["min_train_nodes"], options["min_evaluate_nodes"]) == (drawn, per_round)


def test_over_selected_rounds_draw_the_same_partitions_in_another_process_and_aggregate_every_reply_in_time():
    rows = []
    for first_node in (1, 5001):  # another process: other node ids for the same partitions
        strategy = build_strategy(
            {"name": "vanilla"},
            num_clients=10,
            seed=3,
            clients_per_round=4,
            over_select=0.5,
            evaluate_every=99,
        )
        _start(strategy, _grid(10, slow={0, 1, 2}, first_node=first_node), rounds=3)
        rows.append([strategy.round_log[r] for r in (1, 2, 3)])
    assert [r["sampled_partitions"] for r in rows[0]] == [r["sampled_partitions"] for r in rows[1]]
    for row in rows[0]:
        late = len(set(row["sampled_partitions"]) & {0, 1, 2})
        assert row["num_sampled"] == len(row["sampled_partitions"]) == 6
        # Every reply that arrived is aggregated, also beyond clients_per_round.
        assert (row["num_late"], row["num_aggregated"]) == (late, 6 - late)
    assert any(row["num_aggregated"] > 4 for row in rows[0])


def test_over_select_needs_clients_per_round():
    with pytest.raises(ValueError, match="over_select=0.2 needs clients_per_round"):
        build_strategy({"name": "vanilla"}, num_clients=4, over_select=0.2)
    for bad in (-0.1, float("nan"), True):
        with pytest.raises(ValueError, match="must be a number >= 0"):
            Sampling(2, over_select=bad)


@pytest.mark.parametrize(
    ("overrides", "key", "allowed"),
    [
        (["over_select=0.5"], "over_select", "0 with clients_per_round=null"),
        (["clients_per_round=2", "over_select=-1"], "over_select", "a number >= 0"),
        (["num_clients=4", "clients_per_round=2", "min_replies=3"], "min_replies", "1..2"),
        (["num_clients=4", "min_clients=3", "min_replies=4"], "min_replies", "1..3"),
        (
            [
                "num_clients=8",
                "clients_per_round=3",
                "over_select=1",
                "aggregator=krum",
                "aggregator.num_malicious_nodes=1",
            ],
            "clients_per_round",
            "over-selected clients do not count",
        ),
    ],
)
def test_bad_straggler_settings_fail_before_training_naming_the_keys(overrides, key, allowed):
    with pytest.raises(ConfigError) as failed:
        validate_config(compose_config(overrides))
    assert f"{key}=" in str(failed.value) and allowed in str(failed.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ["num_clients=6", "clients_per_round=3", "over_select=0.5", "min_replies=3"],
        [
            "num_clients=8",
            "clients_per_round=5",
            "over_select=0.4",
            "aggregator=krum",
            "aggregator.num_malicious_nodes=1",
        ],
        ["num_clients=6", "clients_per_round=3", "over_select=0.5", "privacy=secagg"],
    ],
)
def test_straggler_settings_compose(overrides):
    validate_config(compose_config(overrides))


# -- a whole run ---------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_with_a_slow_client_records_num_late_and_trains_on(tmp_path, data_root):
    from tests.test_sampling import _grid as _client_app_grid
    from tests.test_sampling import _rows, _sampled_run

    grid = _client_app_grid(6)  # the real ClientApp handlers; partition 0 trains past the deadline
    slow = {n for n, c in grid.contexts.items() if c.node_config["partition-id"] == 0}
    grid.reply_delay = lambda m: (
        1e9 if m.metadata.dst_node_id in slow and m.metadata.message_type == "train" else 0
    )
    # run_federation over 6 in-process clients, 2 per round, over-selected to 4
    rows = _rows(_sampled_run(["over_select=1", "num_rounds=3", "seed=1"], tmp_path / "run", grid))
    assert [r["round"] for r in rows] == [1, 2, 3]
    for row in rows:
        late = int(0 in row["sampled_partitions"])
        assert row["num_sampled"] == 4 and (row["num_late"], row["num_failed"]) == (late, 0)
        assert row["num_aggregated"] == 4 - late and np.isfinite(row["eval_loss"])
    assert any(r["num_late"] for r in rows)
