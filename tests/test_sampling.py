"""Client sampling (``clients_per_round``, ``eval_clients_per_round``): exact, reproducible, composable.

The draw is Flower's (``sample_nodes``), seeded from the run's seed and the
true round, over the nodes in partition order; the runs drive the real
ClientApp functions over an in-process grid (``feddm.local_grid``).
"""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord

from client_app.app import app, dp_clipping_mod, evaluate, query, secagg_mod, train
from client_app.updates import RESIDUAL_KEY
from feddm.local_grid import LocalGrid
from models.parts import parts_of, usplit_assignment
from server_app.config import ConfigError, compose_config, validate_config
from server_app.federation import run_federation
from strategies import RoundFailedError, Sampling, build_strategy
from strategies.quant import sent_names
from tests.conftest import MICRO_OVERRIDES
from tests.test_partial import _state


def _client(msg, context):
    """The ClientApp's handlers with its train mods (SecAgg+ outermost, then DP clipping)."""
    kind = msg.metadata.message_type
    if kind == "query":
        return query(msg, context)
    if kind == "evaluate":
        return evaluate(msg, context)
    return secagg_mod(msg, context, lambda m, c: dp_clipping_mod(m, c, train))


def _grid(partitions: int, client=_client, first_node: int = 1, grid_class=LocalGrid) -> LocalGrid:
    """A grid of ``partitions`` nodes; node ids start at ``first_node`` and run backwards to the partitions."""
    nodes = range(first_node, first_node + partitions)
    grid = grid_class(nodes, client)
    for partition, context in enumerate(reversed(list(grid.contexts.values()))):
        context.node_config.update({"partition-id": partition, "num-partitions": partitions})
    return grid


def _rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# -- the draw ------------------------------------------------------------------------


def _drawn(strategy, grid, rounds, phase="train") -> list[list[int]]:
    """The partitions ``strategy`` sends ``phase`` messages to in each of ``rounds`` (Flower's local rounds)."""
    arrays = ArrayRecord({"w": Array(np.zeros(2, np.float32))})
    configure = strategy.configure_train if phase == "train" else strategy.configure_evaluate
    drawn = []
    for server_round in rounds:
        messages = list(configure(server_round, arrays, ConfigRecord({}), grid))
        partitions = [grid.contexts[m.metadata.dst_node_id].node_config["partition-id"] for m in messages]
        drawn.append(sorted(partitions))
    return drawn


def test_every_client_takes_part_when_clients_per_round_is_null():
    strategy = build_strategy({"name": "vanilla"}, num_clients=5, min_clients=4)
    assert (strategy.fraction_train, strategy.fraction_evaluate) == (1.0, 1.0)
    assert (strategy.min_train_nodes, strategy.min_evaluate_nodes, strategy.min_available_nodes) == (4, 4, 4)
    assert not strategy.sampling.enabled and strategy.sampling.summary() == []


def test_exactly_clients_per_round_are_drawn_the_same_partitions_in_another_process(flower_task_identity):
    # Another process: other node ids, in another order, for the same partitions.
    draws = []
    for first_node in (1, 9001):
        strategy = build_strategy({"name": "vanilla"}, num_clients=6, seed=7, clients_per_round=2)
        grid = _grid(6, first_node=first_node)
        state = random.getstate()
        draws.append(_drawn(strategy, grid, range(1, 7)))
        assert random.getstate() == state  # the draw leaves the global stream as it was
        assert strategy.round_log[1]["sampled_partitions"] == draws[-1][0]
    assert draws[0] == draws[1]
    assert all(len(set(d)) == 2 for d in draws[0])
    assert len({tuple(d) for d in draws[0]}) > 1  # rounds draw differently
    other_seed = build_strategy({"name": "vanilla"}, num_clients=6, seed=8, clients_per_round=2)
    assert _drawn(other_seed, _grid(6), range(1, 7)) != draws[0]


def test_a_resumed_run_draws_what_an_uninterrupted_one_draws(flower_task_identity):
    through = build_strategy({"name": "vanilla"}, num_clients=6, clients_per_round=3)
    resumed = build_strategy({"name": "vanilla"}, num_clients=6, clients_per_round=3)
    resumed.load_state_dict({"rounds_done": 2})  # Flower counts from 1 again
    assert _drawn(resumed, _grid(6, first_node=50), [1, 2]) == _drawn(through, _grid(6), range(1, 5))[2:]


def test_evaluation_draws_its_own_clients(flower_task_identity):
    strategy = build_strategy(
        {"name": "vanilla"}, num_clients=6, clients_per_round=2, eval_clients_per_round=4
    )
    grid = _grid(6)
    assert all(len(d) == 4 for d in _drawn(strategy, grid, [1, 2], phase="evaluate"))
    assert len(strategy.round_log[2]["eval_partitions"]) == 4
    follows = build_strategy({"name": "vanilla"}, num_clients=6, clients_per_round=2)
    assert all(len(d) == 2 for d in _drawn(follows, grid, [1], phase="evaluate"))


def test_a_node_that_joins_later_is_asked_its_partition_once(flower_task_identity):
    strategy = build_strategy({"name": "vanilla"}, num_clients=3, clients_per_round=3)
    grid = _grid(4)
    late = grid.contexts.pop(1)  # partition 3
    _drawn(strategy, grid, [1])
    grid.contexts[1] = late
    _drawn(strategy, grid, [2, 3])
    queries = [m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == "query"]
    assert sorted(queries) == [1, 2, 3, 4]
    assert strategy.sampling.partitions == {4: 0, 3: 1, 2: 2, 1: 3}


def test_the_client_app_answers_the_partition_query(flower_task_identity):
    grid = _grid(3, client=app)  # Flower's own dispatch by message type
    strategy = build_strategy({"name": "vanilla"}, num_clients=3, clients_per_round=1)
    strategy.sampling.learn_partitions(grid, timeout=10)
    assert strategy.sampling.partitions == {3: 0, 2: 1, 1: 2}


def test_a_malformed_partition_id_in_a_reply_is_skipped_not_raised(flower_task_identity):
    def liar(msg, context):
        reply = _client(msg, context)
        reply.content["info"] = ConfigRecord({"partition-id": "zero"})
        return reply

    grid = _grid(3, client=liar)
    strategy = build_strategy({"name": "vanilla"}, num_clients=3, clients_per_round=1)
    strategy.sampling.learn_partitions(grid, timeout=10)  # the query replies lie
    assert strategy.sampling.partitions == {}
    assert len(_drawn(strategy, grid, [1])[0]) == 1  # nodes without a partition id are still drawn


def test_sampling_refuses_counts_below_one():
    with pytest.raises(ValueError, match="clients_per_round=0"):
        Sampling(clients_per_round=0)


def test_usplit_groups_are_formed_among_the_sampled_partitions():
    sizes = {n: t.numel() for n, t in _state().items()}
    # Without a sample the members are all partitions, as before sampling existed.
    assert usplit_assignment(sizes, num_partitions=5, ways=2, seed=3, server_round=2) == usplit_assignment(
        sizes, num_partitions=5, ways=2, seed=3, server_round=2, members=range(5)
    )
    members = [1, 4, 7, 8]
    assignment = usplit_assignment(sizes, num_partitions=10, ways=2, seed=3, server_round=2, members=members)
    assert sorted(assignment) == members
    sent = sorted(part for parts in assignment.values() for part in parts)
    assert sent == sorted(parts_of(sizes) * 2)  # the two pairs each send every part exactly once


# -- the config check -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["clients_per_round=0"], r"clients_per_round=0 is not allowed: null .* an integer >= 1"),
        (["clients_per_round=-2"], r"clients_per_round=-2 is not allowed"),
        (["clients_per_round=2.5"], r"clients_per_round=2.5 is not allowed"),
        (["num_clients=4", "clients_per_round=5"], r"clients_per_round=5 is not allowed: .*1\.\.4"),
        (["num_clients=6", "min_clients=3", "clients_per_round=4"], r"clients_per_round=4 .*1\.\.3"),
        (["num_clients=4", "eval_clients_per_round=6"], r"eval_clients_per_round=6 is not allowed: .*1\.\.4"),
        (["eval_clients_per_round=0"], r"eval_clients_per_round=0 is not allowed"),
        (
            ["num_clients=6", "clients_per_round=2", "aggregator=krum"],
            r"clients_per_round=2 is not allowed: >= 3 with aggregator=krum",
        ),
        (
            ["num_clients=9", "clients_per_round=6", "aggregator=bulyan", "aggregator.num_malicious_nodes=1"],
            r"clients_per_round=6 is not allowed: >= 7 with aggregator=bulyan",
        ),
        (
            [
                "num_clients=6",
                "clients_per_round=3",
                "aggregator=multikrum",
                "aggregator.num_nodes_to_select=4",
            ],
            r"num_nodes_to_select=4 .*clients_per_round=3",
        ),
        (["num_clients=6", "clients_per_round=1", "privacy=secagg"], r"clients_per_round=1 .*privacy=secagg"),
        (
            ["num_clients=6", "clients_per_round=3", "privacy=secagg", "privacy.num_shares=5"],
            r"privacy.num_shares=5 .*3\.\.3 .*clients_per_round=3",
        ),
    ],
)
def test_a_bad_sample_size_fails_before_training_naming_the_keys(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(compose_config(overrides))


def test_sample_sizes_that_fit_are_accepted():
    for overrides in (
        ["num_clients=6", "clients_per_round=2"],
        ["num_clients=6", "clients_per_round=6", "eval_clients_per_round=1"],
        ["num_clients=6", "clients_per_round=3", "aggregator=krum"],
        ["num_clients=6", "clients_per_round=3", "privacy=secagg"],
        ["num_clients=6", "clients_per_round=2", "strategy=partial", "strategy.preset=usplit"],
    ):
        validate_config(compose_config(overrides))


# -- real runs -----------------------------------------------------------------------------

FEDDDPM = [
    "strategy=fedddpm",
    "strategy.pretrain_steps=2",
    "strategy.aux_samples=12",
    "strategy.aux_ddim_steps=2",
    "strategy.calibration_steps=2",
    "strategy.calibration_batch_size=4",
]
RUNS = {
    "vanilla": [],
    "prox": ["strategy=prox"],
    "quant": ["strategy=quant"],
    "partial_udec": ["strategy=partial", "strategy.preset=udec", "strategy.quantize=true"],
    "partial_usplit": ["strategy=partial", "strategy.preset=usplit"],
    "fedddpm": FEDDDPM,
    "dp_server": ["privacy=dp_server", "privacy.noise_multiplier=0.1"],
    "dp_client": ["privacy=dp_client"],
    "secagg": ["privacy=secagg", "clients_per_round=3"],
    "fedadam": ["aggregator=fedadam"],
    "median": ["aggregator=median"],
    "krum": ["aggregator=krum", "clients_per_round=3"],
}


def _sampled_run(overrides, run_dir, grid=None, clients=6):
    # One small step per client and round: the point is who trains, not how well.
    cheap = ["local_steps=1", "batch_size=2", "client_eval_max_examples=4"]
    cfg = compose_config(
        [*MICRO_OVERRIDES, *cheap, f"num_clients={clients}", "clients_per_round=2", *overrides]
    )
    return run_federation(grid or _grid(clients), cfg, run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(RUNS))
def test_every_accepted_combination_trains_two_sampled_rounds(
    case, tmp_path, flower_task_identity, data_root
):
    # A population of 12, 3 a round (USplit: 4, two groups of 2, each sending one model between them).
    per_round = 4 if case == "partial_usplit" else 3
    grid = _grid(12)
    overrides = [*RUNS[case], f"clients_per_round={per_round}"]
    rows = [r for r in _rows(_sampled_run(overrides, tmp_path / "run", grid, clients=12)) if r["round"] > 0]
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert row["num_sampled"] == row["num_aggregated"] == per_round
        assert len(set(row["sampled_partitions"])) == per_round
        assert len(row["eval_partitions"]) == per_round and np.isfinite(row["eval_loss"])
    trained = {m.metadata.src_node_id for m in grid.received if m.metadata.message_type == "train"}
    if case == "partial_usplit":  # each round, every array of the model comes from exactly 2 clients
        model = sorted(sent_names(grid.sent[-1].content["arrays"]))  # (an evaluate message: the whole model)
        replies = [m for m in grid.received if m.metadata.message_type == "train"]
        assert len(replies) == 2 * per_round  # two rounds, in order
        for group in (replies[:per_round], replies[per_round:]):
            sent = Counter(n for reply in group for n in sent_names(reply.content["arrays"]))
            assert sorted(sent) == model and set(sent.values()) == {2}
    if case != "fedddpm":  # FedDDPM's pretraining is every client's
        assert len(trained) <= 2 * per_round


@pytest.mark.slow
def test_two_runs_with_the_same_seed_sample_the_same_partitions(tmp_path, flower_task_identity, data_root):
    first = _rows(_sampled_run(["num_rounds=3"], tmp_path / "a"))
    second = _rows(_sampled_run(["num_rounds=3"], tmp_path / "b", _grid(6, first_node=700)))
    assert [r["sampled_partitions"] for r in first] == [r["sampled_partitions"] for r in second]
    assert [r["train_loss"] for r in first] == [r["train_loss"] for r in second]


@pytest.mark.slow
def test_a_resumed_sampled_run_samples_and_trains_as_an_uninterrupted_one(
    tmp_path, flower_task_identity, data_root
):
    overrides = ["num_rounds=3", "eval_clients_per_round=3"]
    through = _rows(_sampled_run(overrides, tmp_path / "through"))

    def failing(msg, context):  # every client fails from round 3: the run stops after round 2
        if msg.metadata.message_type == "train" and int(msg.content["config"]["server-round"]) >= 3:
            raise RuntimeError("injected failure")
        return _client(msg, context)

    stopped = tmp_path / "stopped"
    with pytest.raises(RoundFailedError, match="injected failure"):
        _sampled_run(overrides, stopped, _grid(6, failing))
    # After a restart the nodes have other ids.
    resumed = run_federation(_grid(6, first_node=300), compose_config([f"resume={stopped}"]))
    keys = ("round", "sampled_partitions", "eval_partitions", "train_loss", "eval_loss")
    assert [{k: r[k] for k in keys} for r in _rows(resumed)] == [{k: r[k] for k in keys} for r in through]


@pytest.mark.slow
def test_a_quant_clients_residual_waits_for_its_next_turn(tmp_path, flower_task_identity, data_root):
    seen: dict[int, list[tuple[int, dict, dict]]] = {}  # partition -> (round, residual before, after)

    def recording(msg, context):
        if msg.metadata.message_type != "train":
            return _client(msg, context)

        def residual():
            record = context.state.array_records.get(RESIDUAL_KEY)
            return {n: a.numpy().copy() for n, a in record.items()} if record else {}

        before = residual()
        reply = _client(msg, context)
        partition = context.node_config["partition-id"]
        seen.setdefault(partition, []).append(
            (int(msg.content["config"]["server-round"]), before, residual())
        )
        return reply

    _sampled_run(
        ["num_rounds=5", "strategy=quant", "strategy.error_feedback=true"],
        tmp_path / "run",
        _grid(4, recording),
        clients=4,
    )
    gaps = 0
    for turns in seen.values():
        assert turns[0][1] == {} and turns[0][2]  # no residual before the first turn, one after it
        for (r1, _, after), (r2, before, _) in zip(turns, turns[1:]):
            gaps += r2 > r1 + 1
            assert before.keys() == after.keys()
            assert all(np.array_equal(before[n], after[n]) for n in after)  # kept while not sampled
    assert gaps > 0  # some client sat out a round between two turns


class _JoinsAfterRoundOne(LocalGrid):
    """A grid whose first node (the last partition) connects only after round 1's training replies."""

    def get_node_ids(self) -> list[int]:
        nodes = super().get_node_ids()
        if not any(m.metadata.message_type == "train" for m in self.received):
            return nodes[1:]
        return nodes


@pytest.mark.slow
def test_a_client_joining_after_round_one_is_asked_its_partition_and_gets_the_whole_model(
    tmp_path, flower_task_identity, data_root
):
    # Partial udec: a newcomer has no local parts, so its first message must carry the whole model.
    grid = _grid(5, grid_class=_JoinsAfterRoundOne)
    joiner = next(iter(grid.contexts))
    assert grid.contexts[joiner].node_config["partition-id"] == 4
    overrides = ["num_rounds=4", "clients_per_round=4", "strategy=partial", "strategy.preset=udec"]
    rows = [r for r in _rows(_sampled_run(overrides, tmp_path / "run", grid, clients=4)) if r["round"] > 0]
    assert 4 not in rows[0]["sampled_partitions"]
    joined = [r["round"] for r in rows if 4 in r["sampled_partitions"]]
    assert joined and joined[0] >= 2  # drawn once connected (seeded: the same rounds every run)
    assert all(r["num_aggregated"] == 4 for r in rows)  # its replies were used, nobody's was lost
    to_joiner = [m for m in grid.sent if m.metadata.dst_node_id == joiner]
    assert [m.metadata.message_type for m in to_joiner].count("query") == 1  # asked its partition once
    first_train = next(m for m in to_joiner if m.metadata.message_type == "train")
    # Round 1's training messages carry the whole model to every node (all newcomers then).
    whole = next(m for m in grid.sent if m.metadata.message_type == "train").content["arrays"].keys()
    assert sorted(first_train.content["arrays"].keys()) == sorted(whole)
