"""FedDM-vanilla: exact weighted averaging, reply validation, byte accounting."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from strategies import (
    RECIPES,
    Encoding,
    PartialParts,
    RoundFailedError,
    build_strategy,
    combination_table,
    composition_errors,
)
from strategies.codec import payload_nbytes
from strategies.packing import pack_arrays
from tests.conftest import reply

pytestmark = pytest.mark.usefixtures("flower_task_identity")


class FakeGrid:
    """The part of Flower's Grid a strategy uses to sample nodes."""

    def __init__(self, node_ids):
        self.node_ids = node_ids

    def get_node_ids(self):
        return list(self.node_ids)


GLOBAL = {
    "conv.weight": np.zeros((2, 3), dtype=np.float32),
    "conv.bias": np.zeros(2, dtype=np.float32),
}


def _record(arrays):
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


def _train_reply(arrays, num_examples, node_id, loss=1.0):
    content = RecordDict(
        {
            "arrays": _record(arrays),
            "metrics": MetricRecord({"train_loss": loss, "num-examples": num_examples}),
        }
    )
    return reply(content, node_id)


def _configured(strategy, node_ids=(1, 2, 3)):
    messages = strategy.configure_train(1, _record(GLOBAL), ConfigRecord(), FakeGrid(node_ids))
    return list(messages)


def _strategy(num_clients=1):
    return build_strategy({"name": "vanilla"}, num_clients=num_clients)


def test_fedavg_weighting_is_exact():
    strategy = _strategy()
    _configured(strategy)
    a = {"conv.weight": np.full((2, 3), 1.0, np.float32), "conv.bias": np.array([1.0, -1.0], np.float32)}
    b = {"conv.weight": np.full((2, 3), 4.0, np.float32), "conv.bias": np.array([4.0, 2.0], np.float32)}
    arrays, metrics = strategy.aggregate_train(
        1, [_train_reply(a, 100, 1, loss=0.5), _train_reply(b, 300, 2, loss=0.1)]
    )
    # weights 1/4 and 3/4
    np.testing.assert_allclose(arrays["conv.weight"].numpy(), np.full((2, 3), 3.25), rtol=0, atol=1e-6)
    np.testing.assert_allclose(arrays["conv.bias"].numpy(), [3.25, 1.25], rtol=0, atol=1e-6)
    assert metrics["train_loss"] == pytest.approx(0.25 * 0.5 + 0.75 * 0.1)


def test_downlink_and_uplink_bytes_are_counted_from_the_messages():
    strategy = _strategy()
    messages = _configured(strategy, node_ids=(1, 2, 3))
    per_message = payload_nbytes(_record(GLOBAL))
    packed = payload_nbytes(pack_arrays(_record(GLOBAL)))  # what travels down (strategies.packing)
    assert len(messages) == 3
    assert strategy.round_log[1]["downlink_bytes"] == 3 * packed
    strategy.aggregate_train(1, [_train_reply(GLOBAL, 10, 1), _train_reply(GLOBAL, 10, 2)])
    assert strategy.round_log[1]["uplink_bytes"] == 2 * per_message


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (
            {"conv.weight": np.zeros((3, 2), np.float32), "conv.bias": np.zeros(2, np.float32)},
            "expected float32",
        ),
        (
            {"conv.weight": np.zeros((2, 3), np.float64), "conv.bias": np.zeros(2, np.float32)},
            "expected float32",
        ),
        ({"conv.weight": np.full((2, 3), np.nan, np.float32), "conv.bias": np.zeros(2, np.float32)}, "NaN"),
        ({"conv.weight": np.zeros((2, 3), np.float32)}, "missing"),
    ],
)
def test_malformed_reply_is_left_out_and_the_round_goes_on(bad, reason, caplog):
    strategy = _strategy()
    _configured(strategy)
    good = {k: np.ones_like(v) for k, v in GLOBAL.items()}
    with caplog.at_level("WARNING"):
        arrays, _ = strategy.aggregate_train(1, [_train_reply(good, 10, 1), _train_reply(bad, 1000, 2)])
    np.testing.assert_array_equal(arrays["conv.weight"].numpy(), np.ones((2, 3)))
    assert strategy.round_log[1]["num_aggregated"] == 1
    assert strategy.round_log[1]["num_rejected"] == 1
    assert "node 2" in caplog.text and reason in caplog.text


@pytest.mark.parametrize("num_examples", [0, -5, float("nan"), "many"])
def test_reply_with_bad_num_examples_is_left_out(num_examples):
    strategy = _strategy()
    _configured(strategy)
    content = RecordDict({"arrays": _record(GLOBAL), "metrics": MetricRecord({"train_loss": 1.0})})
    if not isinstance(num_examples, str):
        content["metrics"]["num-examples"] = num_examples
    arrays, _ = strategy.aggregate_train(1, [reply(content, 3), _train_reply(GLOBAL, 10, 1)])
    assert arrays is not None
    assert strategy.round_log[1]["num_rejected"] == 1


def test_round_without_valid_replies_stops_the_run_with_the_reasons():
    strategy = _strategy()
    _configured(strategy)
    with pytest.raises(RoundFailedError, match="none of the 1 training replies.*node 1"):
        strategy.aggregate_train(1, [_train_reply({"x": np.zeros(1, np.float32)}, 10, 1)])
    with pytest.raises(RoundFailedError, match="No client replied"):
        strategy.aggregate_train(2, [])


def test_build_strategy_rejects_unknown_names():
    with pytest.raises(ValueError, match="vanilla"):
        build_strategy({"name": "fedsomething"}, num_clients=2)
    vanilla = _strategy()
    assert isinstance(vanilla, FedAvg) and type(vanilla.encoding) is Encoding and vanilla.extras == ()


@pytest.mark.parametrize(
    "metrics",
    [
        {"train_loss": float("nan"), "num-examples": 10},
        {"train_loss": [1.0, 2.0], "num-examples": 10},
        {"train_loss": 1.0, "num-examples": 10, "extra": 1.0},
        {"loss": 1.0, "num-examples": 10},
    ],
)
def test_reply_with_odd_metrics_is_left_out_not_fatal(metrics):
    strategy = _strategy()
    _configured(strategy)
    odd = reply(RecordDict({"arrays": _record(GLOBAL), "metrics": MetricRecord(metrics)}), 3)
    arrays, aggregated = strategy.aggregate_train(1, [odd, _train_reply(GLOBAL, 10, 1)])
    assert arrays is not None and set(aggregated.keys()) == {"train_loss"}
    assert strategy.round_log[1]["num_rejected"] == 1


def test_array_whose_data_contradicts_its_metadata_is_left_out():
    strategy = _strategy()
    _configured(strategy)
    honest = np.zeros(2, np.float32)
    lying = Array(
        dtype="float32", shape=(2,), stype="numpy.ndarray", data=Array(np.zeros(5, np.float32)).data
    )
    record = ArrayRecord({"conv.weight": Array(np.zeros((2, 3), np.float32)), "conv.bias": lying})
    content = RecordDict({"arrays": record, "metrics": MetricRecord({"train_loss": 1.0, "num-examples": 5})})
    strategy.aggregate_train(
        1,
        [
            reply(content, 4),
            _train_reply({"conv.weight": np.zeros((2, 3), np.float32), "conv.bias": honest}, 1, 1),
        ],
    )
    assert strategy.round_log[1]["num_rejected"] == 1


def test_replies_are_averaged_in_partition_order():
    from flwr.app import ConfigRecord as Info

    def with_partition(message, partition_id):
        message.content["info"] = Info({"partition-id": partition_id})
        return message

    replies = [
        with_partition(_train_reply(GLOBAL, 10 + i, node_id=100 - i), pid) for i, pid in enumerate([2, 0, 1])
    ]
    strategy = _strategy()
    _configured(strategy)
    accepted = strategy.accepted_replies(1, replies)
    assert [m.content["info"]["partition-id"] for m in accepted] == [0, 1, 2]


def test_clients_evaluate_only_on_evaluation_rounds():
    strategy = _strategy()
    strategy.evaluate_every, strategy.last_round = 2, 5
    asked = [
        r
        for r in range(1, 6)
        if strategy.configure_evaluate(r, _record(GLOBAL), ConfigRecord(), FakeGrid([1, 2]))
    ]
    assert asked == [2, 4, 5]
    assert strategy.aggregate_evaluate(1, []) is None


def test_training_phase_time_is_logged_per_round():
    strategy = _strategy()
    _configured(strategy)
    strategy.aggregate_train(1, [_train_reply(GLOBAL, 10, 1)])
    assert 0 <= strategy.round_log[1]["train_time_s"] < 60


def test_a_reply_without_info_is_known_by_its_node_id():
    from strategies.accounting import partition_of

    with_info = _train_reply(GLOBAL, 10, node_id=7)
    with_info.content["info"] = ConfigRecord({"partition-id": 2})
    assert partition_of(with_info) == 2
    assert partition_of(_train_reply(GLOBAL, 10, node_id=7)) == 7


def test_the_readmes_combination_table_is_the_generated_one():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    table = readme.split("<!-- combinations:start -->\n")[1].split("\n<!-- combinations:end -->")[0]
    assert table == combination_table()


@pytest.mark.parametrize("privacy", ["dp_server", "dp_client", "secagg"])
def test_a_combination_that_cannot_work_is_refused_naming_both_choices(privacy):
    for name, recipe in RECIPES.items():
        errors = composition_errors(name, privacy)
        assert (errors == []) == (recipe.privacy_conflict(privacy) is None)
        for error in errors:
            assert f"privacy={privacy}" in error and f"strategy={name}" in error
            with pytest.raises(ValueError, match=f"strategy={name}"):
                build_strategy({"name": name}, num_clients=2, privacy={"name": privacy})
    assert composition_errors("quant", "none") == []


def test_layers_are_composed_on_the_flower_class_and_log_their_summary(caplog):
    partial = {"name": "partial", "preset": "udec", "shared": None, "split_ways": 2, "quantize": True}
    partial |= {"bits": 4, "granularity": "tensor", "stochastic_rounding": False, "error_feedback": False}
    strategy = build_strategy(partial, num_clients=2)
    assert type(strategy).__name__ == "FedDMFedAvg" and isinstance(strategy.encoding, PartialParts)
    assert type(strategy) is type(_strategy())  # one composed class per Flower class
    strategy.summary()
    assert "FedDM-partial (udec)" in caplog.text and "'quant-bits': 4" in caplog.text


def test_the_layer_registries_are_the_configs_group_options():
    from server_app.config import group_options
    from strategies import AGGREGATORS, PRIVACY_MODES

    assert set(RECIPES) == set(group_options("strategy"))
    assert set(AGGREGATORS) == set(group_options("aggregator"))
    assert set(PRIVACY_MODES) == set(group_options("privacy"))
