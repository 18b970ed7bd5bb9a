"""Trust in client replies: bounded num-examples, uniform weighting, update-norm outliers,
float32 overflow, bad info records, and a non-finite global model (strategies/reply_checks.py)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from strategies import RoundFailedError, build_strategy
from strategies.codec import SCALES_KEY, encode_arrays
from strategies.reply_checks import (
    FALLBACK_MAX_NUM_EXAMPLES,
    PayloadError,
    ReplyChecks,
    check_float32_range,
    norm_outliers,
    update_rms,
)
from tests.conftest import reply

pytestmark = pytest.mark.usefixtures("flower_task_identity")

GLOBAL = {
    "conv.weight": np.full((2, 3), 0.5, dtype=np.float32),
    "conv.bias": np.zeros(2, dtype=np.float32),
}


class FakeGrid:
    """Sampling, and (for ``Strategy.start``) replies made by ``answer(message)``."""

    def __init__(self, node_ids, answer=None):
        self.node_ids, self.answer = list(node_ids), answer

    def get_node_ids(self):
        return list(self.node_ids)

    def send_and_receive(self, messages, *, timeout=None):
        return [self.answer(m) for m in messages if m.metadata.message_type == "train"]


def _record(arrays):
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def _reply(arrays, num_examples, node_id, loss=1.0, info=None):
    content = RecordDict(
        {
            "arrays": arrays if isinstance(arrays, ArrayRecord) else _record(arrays),
            "metrics": MetricRecord({"train_loss": loss, "num-examples": num_examples}),
        }
    )
    if info is not None:
        content["info"] = info
    return reply(content, node_id)


def _moved(delta):
    """The global model moved by ``delta`` everywhere."""
    return {k: (v + np.float32(delta)).astype(np.float32) for k, v in GLOBAL.items()}


def _strategy(name="vanilla", **checks):
    strategy = build_strategy({"name": name, **_QUANT}, num_clients=1)
    if checks:
        strategy.reply_checks = ReplyChecks(**checks)
    strategy.configure_train(1, _record(GLOBAL), ConfigRecord(), FakeGrid([1, 2, 3, 4]))
    return strategy


_QUANT = {
    "bits": 8,
    "granularity": "tensor",
    "stochastic_rounding": False,
    "error_feedback": False,
    "downlink": "weights",
}


def _int8_reply(delta, num_examples, node_id):
    record, _ = encode_arrays(
        {k: np.full_like(v, delta) for k, v in GLOBAL.items()}, bits=8, granularity="tensor"
    )
    return _reply(record, num_examples, node_id)


# -- num-examples a client cannot inflate --------------------------------------------


def test_a_reply_claiming_1e300_examples_with_zeros_is_left_out(caplog):
    strategy = _strategy()
    honest = [_reply(_moved(0.1), 10, 1), _reply(_moved(0.3), 30, 2)]
    zeros = _reply({k: np.zeros_like(v) for k, v in GLOBAL.items()}, 1e300, 3)
    with caplog.at_level("WARNING"):
        arrays, _ = strategy.aggregate_train(1, [*honest, zeros])
    np.testing.assert_allclose(arrays["conv.bias"].numpy(), [0.25, 0.25], rtol=1e-6)
    assert strategy.round_log[1]["num_rejected"] == 1 and strategy.round_log[1]["num_aggregated"] == 2
    assert "node 3" in caplog.text and "num-examples 1e+300 is over max_num_examples" in caplog.text


def test_two_claims_of_1_7e308_cannot_overflow_the_sum_of_weights():
    strategy = _strategy()
    claims = [_reply(_moved(1.0), 1.7e308, 1), _reply(_moved(2.0), 1.7e308, 2)]
    arrays, _ = strategy.aggregate_train(1, [*claims, _reply(_moved(0.5), 10, 3)])
    np.testing.assert_allclose(arrays["conv.bias"].numpy(), [0.5, 0.5])
    assert strategy.round_log[1]["num_rejected"] == 2
    # At the bound itself the sum stays finite: bound × replies.
    strategy = _strategy()
    at_bound = [_reply(_moved(1.0), FALLBACK_MAX_NUM_EXAMPLES, i) for i in (1, 2)]
    arrays, metrics = strategy.aggregate_train(1, at_bound)
    assert np.all(np.isfinite(arrays["conv.weight"].numpy())) and np.isfinite(metrics["train_loss"])
    # Only claims beyond 1.7e308: nothing to average, the round fails naming why (no inf, no crash).
    strategy = _strategy()
    with pytest.raises(RoundFailedError, match="over max_num_examples"):
        strategy.aggregate_train(1, claims)


def test_a_configured_bound_leaves_out_larger_claims():
    strategy = _strategy(max_num_examples=100)
    strategy.aggregate_train(1, [_reply(_moved(0.1), 100, 1), _reply(_moved(0.1), 101, 2)])
    assert strategy.round_log[1]["num_rejected"] == 1


def test_uniform_weighting_averages_every_accepted_reply_once():
    strategy = _strategy(weighting="uniform")
    arrays, metrics = strategy.aggregate_train(
        1, [_reply(_moved(0.1), 100, 1, loss=0.5), _reply(_moved(0.3), 300, 2, loss=0.1)]
    )
    np.testing.assert_allclose(arrays["conv.bias"].numpy(), [0.2, 0.2], rtol=1e-6)
    assert metrics["train_loss"] == pytest.approx(0.3)


def test_examples_weighting_is_unchanged_by_the_checks():
    arrays, _ = _strategy().aggregate_train(1, [_reply(_moved(0.1), 100, 1), _reply(_moved(0.3), 300, 2)])
    np.testing.assert_allclose(arrays["conv.bias"].numpy(), [0.25, 0.25], rtol=1e-6)


# -- update norms ---------------------------------------------------------------------


def test_a_norm_outlier_is_left_out_only_once_three_replies_came_in(caplog):
    replies = [_reply(_moved(0.01), 10, 1), _reply(_moved(0.02), 10, 2), _reply(_moved(5.0), 10, 3)]
    strategy = _strategy()
    with caplog.at_level("WARNING"):
        arrays, _ = strategy.aggregate_train(1, replies)
    assert strategy.round_log[1]["num_rejected"] == 1
    assert "node 3" in caplog.text and "max_update_norm_ratio=10" in caplog.text
    np.testing.assert_allclose(arrays["conv.bias"].numpy(), [0.015, 0.015], rtol=1e-5)
    # Two replies: no median to compare with, both are averaged.
    strategy = _strategy()
    strategy.aggregate_train(1, replies[1:])
    assert strategy.round_log[1]["num_rejected"] == 0
    # Turned off: nothing is left out.
    strategy = _strategy(max_update_norm_ratio=None)
    strategy.aggregate_train(1, replies)
    assert strategy.round_log[1]["num_rejected"] == 0


def test_int8_updates_are_measured_as_the_decoded_update_itself():
    strategy = _strategy("quant")
    assert strategy.encoding.decodes_updates
    replies = [_int8_reply(0.01, 10, 1), _int8_reply(0.02, 10, 2), _int8_reply(0.015, 10, 3)]
    strategy.aggregate_train(1, [*replies, _int8_reply(1.0, 10, 4)])
    assert strategy.round_log[1]["num_rejected"] == 1 and strategy.round_log[1]["num_aggregated"] == 3


def test_update_size_is_the_rms_against_the_same_names_of_the_global_model():
    global_arrays = _record(GLOBAL)
    partial = _record({"conv.bias": np.array([3.0, 4.0], np.float32)})  # the global bias is 0
    assert update_rms(partial, global_arrays, decodes_updates=False) == pytest.approx(np.sqrt(12.5))
    assert update_rms(partial, global_arrays, decodes_updates=True) == pytest.approx(np.sqrt(12.5))
    assert update_rms(_record(_moved(0.5)), global_arrays, decodes_updates=False) == pytest.approx(0.5)
    assert norm_outliers([1.0, 1.0, 11.0], 10.0) == ([2], 1.0)
    assert norm_outliers([0.0, 0.0, 5.0], 10.0) == ([], 0.0)  # nothing moved: nothing to compare with


# -- float32 overflow -------------------------------------------------------------------


def test_values_beyond_float32_after_decoding_are_left_out(caplog):
    with pytest.raises(PayloadError, match="overflows float32"):
        check_float32_range(_record({"w": np.array([1e39], np.float64)}))
    with pytest.raises(PayloadError, match="overflows float32"):
        check_float32_range(_record({"w": np.array([np.inf], np.float32)}))
    check_float32_range(_record({"w": np.array([3e38], np.float32), "n": np.array([7], np.int64)}))
    # int8 codes whose scales make the decoded update overflow
    strategy = _strategy("quant")
    record, _ = encode_arrays({k: np.full_like(v, 0.1) for k, v in GLOBAL.items()}, granularity="tensor")
    codes = {k: a.numpy() for k, a in record.items()}
    codes[SCALES_KEY] = np.full_like(codes[SCALES_KEY], 3e38)
    with caplog.at_level("WARNING"), np.errstate(over="ignore"):
        strategy.aggregate_train(1, [_reply(_record(codes), 10, 2), _int8_reply(0.01, 10, 1)])
    assert strategy.round_log[1]["num_rejected"] == 1 and "node 2" in caplog.text


# -- bad info records -------------------------------------------------------------------


@pytest.mark.parametrize("partition_id", ["one", 1.5, True, -1])
def test_a_bad_info_record_is_left_out_not_a_crash(partition_id, caplog):
    strategy = _strategy()
    bad = _reply(_moved(0.1), 10, 2, info=ConfigRecord({"partition-id": partition_id}))
    good = _reply(_moved(0.1), 10, 1, info=ConfigRecord({"partition-id": 0}))
    with caplog.at_level("WARNING"):
        arrays, _ = strategy.aggregate_train(1, [bad, good])
    assert arrays is not None and strategy.round_log[1]["num_rejected"] == 1
    assert "partition-id must be an integer" in caplog.text
    # the same in an evaluate reply
    content = RecordDict({"metrics": MetricRecord({"eval_loss": 0.5, "num-examples": 4})})
    content["info"] = ConfigRecord({"partition-id": partition_id})
    ok = RecordDict({"metrics": MetricRecord({"eval_loss": 0.25, "num-examples": 4})})
    metrics = strategy.aggregate_evaluate(1, [reply(content, 2, "evaluate"), reply(ok, 1, "evaluate")])
    assert metrics["eval_loss"] == pytest.approx(0.25)


# -- a global model that is not finite ------------------------------------------------------


def _huge_quant_strategy():
    strategy = build_strategy({"name": "quant", **_QUANT}, num_clients=2)
    huge = {k: np.full_like(v, 3e38) for k, v in GLOBAL.items()}
    return strategy, huge


def test_a_non_finite_new_global_model_fails_the_round_naming_the_replies():
    strategy, huge = _huge_quant_strategy()
    strategy.configure_train(1, _record(huge), ConfigRecord(), FakeGrid([5, 6]))
    replies = [_int8_reply(3e38, 10, node) for node in (5, 6)]
    for pid, message in enumerate(replies):
        message.content["info"] = ConfigRecord({"partition-id": pid})
    with np.errstate(over="ignore"), pytest.raises(RoundFailedError, match="NaN or inf") as failed:
        strategy.aggregate_train(1, replies)
    assert "node 5 (partition 0), node 6 (partition 1)" in str(failed.value)


def test_the_failed_round_never_reaches_the_evaluation_callback_that_checkpoints():
    strategy, huge = _huge_quant_strategy()

    def answer(message):
        return _int8_reply(3e38, 10, message.metadata.dst_node_id)

    called = []
    with np.errstate(over="ignore"), pytest.raises(RoundFailedError, match="node 5, node 6"):
        strategy.start(
            grid=FakeGrid([5, 6], answer),
            initial_arrays=_record(huge),
            num_rounds=2,
            evaluate_fn=lambda rnd, arrays: called.append(rnd),
        )
    assert called == [0]  # RoundRecorder (metrics row, checkpoint) runs for no trained round
