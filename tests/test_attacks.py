"""The attacks of ``feddm.attacks`` on tiny arrays, and the wrapper that makes a client attack."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from feddm.attacks import ATTACKS, CLAIMED_EXAMPLES, SCALE, attack_reply, attacking_client
from strategies.packing import unpacked

GLOBAL = {"w": np.array([[1.0, -2.0], [0.5, 0.0]], np.float32), "b": np.array([3.0, 4.0], np.float32)}
TRAINED = {"w": np.array([[1.5, -2.0], [0.0, 0.25]], np.float32), "b": np.array([3.0, 3.5], np.float32)}


def record(values: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(array_dict={k: Array(v.copy()) for k, v in values.items()})


def values(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in arrays.items()}


METRICS = {"train_loss": 0.25, "num-examples": 10}


def test_claim_examples_sends_zeros_and_claims_1e300():
    arrays, metrics = ATTACKS["claim_examples"](record(TRAINED), MetricRecord(METRICS), record(GLOBAL))
    out = values(arrays)
    assert list(out) == list(TRAINED)
    for name in TRAINED:
        assert out[name].dtype == np.float32 and out[name].shape == TRAINED[name].shape
        assert not out[name].any()
    assert metrics["num-examples"] == CLAIMED_EXAMPLES == 1e300
    assert metrics["train_loss"] == 0.25


def test_scale_update_sends_global_plus_100_times_the_update():
    arrays, metrics = ATTACKS["scale_update"](record(TRAINED), MetricRecord(METRICS), record(GLOBAL))
    out = values(arrays)
    assert SCALE == 100
    for name in TRAINED:
        expected = GLOBAL[name] + 100 * (TRAINED[name] - GLOBAL[name])
        assert out[name].dtype == np.float32
        np.testing.assert_allclose(out[name], expected, rtol=1e-6)
    np.testing.assert_array_equal(out["w"], [[51.0, -2.0], [-49.5, 25.0]])
    assert dict(metrics) == METRICS


def test_flip_update_sends_global_minus_the_update():
    arrays, metrics = ATTACKS["flip_update"](record(TRAINED), MetricRecord(METRICS), record(GLOBAL))
    out = values(arrays)
    np.testing.assert_array_equal(out["w"], [[0.5, -2.0], [1.0, -0.25]])
    np.testing.assert_array_equal(out["b"], [3.0, 4.5])
    assert dict(metrics) == METRICS


def test_attacks_leave_inputs_alone_and_refuse_replies_that_are_not_full_weights():
    trained = record(TRAINED)
    ATTACKS["scale_update"](trained, MetricRecord(METRICS), record(GLOBAL))
    np.testing.assert_array_equal(trained["w"].numpy(), TRAINED["w"])
    partial = record({"w": TRAINED["w"]})  # e.g. partial exchange: fewer arrays than the model
    int8 = record({"w": np.zeros(3, np.int8), "b": TRAINED["b"]})  # e.g. codes of another shape
    for reply in (partial, int8):
        for attack in ATTACKS.values():
            with pytest.raises(ValueError, match="full-weight"):
                attack(reply, MetricRecord(METRICS), record(GLOBAL))


# The wrapper: a fake client that "trains" by adding 1 to every weight.


def fake_client(msg: Message, context: Context) -> Message:
    if msg.metadata.message_type == "evaluate":
        content = RecordDict({"metrics": MetricRecord({"eval_loss": 0.5, "num-examples": 4})})
        return Message(content=content, reply_to=msg)
    trained = {k: v + 1 for k, v in values(unpacked(msg.content["arrays"])).items()}
    content = RecordDict(
        {
            "arrays": record(trained),
            "metrics": MetricRecord(dict(METRICS)),
            "info": ConfigRecord({"partition-id": int(context.node_config["partition-id"])}),
        }
    )
    return Message(content=content, reply_to=msg)


def instruction(message_type: str, server_round: int) -> Message:
    content = RecordDict({"arrays": record(GLOBAL), "config": ConfigRecord({"server-round": server_round})})
    return Message(content=content, dst_node_id=1, message_type=message_type)


def context(partition: int) -> Context:
    return Context(
        run_id=1,
        node_id=partition + 1,
        node_config={"partition-id": partition, "num-partitions": 4},
        state=RecordDict(),
        run_config={},
    )


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_attacking_client_attacks_only_listed_partitions_in_training_rounds(attack, flower_task_identity):
    client = attacking_client(fake_client, attack, attacker_partitions=[1, 3])
    honest = {k: v + 1 for k, v in GLOBAL.items()}
    expected, expected_metrics = ATTACKS[attack](record(honest), MetricRecord(METRICS), record(GLOBAL))
    for partition in range(4):
        reply = client(instruction("train", 2), context(partition))
        if partition in (1, 3):
            for name, value in values(expected).items():
                np.testing.assert_array_equal(reply.content["arrays"][name].numpy(), value)
            assert dict(reply.content["metrics"]) == dict(expected_metrics)
        else:
            for name, value in honest.items():
                np.testing.assert_array_equal(reply.content["arrays"][name].numpy(), value)
            assert dict(reply.content["metrics"]) == METRICS
        assert reply.content["info"]["partition-id"] == partition  # the rest of the reply is kept

    # Evaluate messages and round 0 (before federated training) are answered honestly, attackers included.
    evaluation = client(instruction("evaluate", 2), context(1))
    assert dict(evaluation.content["metrics"]) == {"eval_loss": 0.5, "num-examples": 4}
    round_zero = client(instruction("train", 0), context(1))
    np.testing.assert_array_equal(round_zero.content["arrays"]["w"].numpy(), honest["w"])


def test_attack_reply_replaces_arrays_and_metrics_of_a_message(flower_task_identity):
    msg = instruction("train", 1)
    reply = fake_client(msg, context(0))
    attacked = attack_reply(reply, record(GLOBAL), "claim_examples")
    assert not attacked.content["arrays"]["w"].numpy().any()
    assert attacked.content["metrics"]["num-examples"] == 1e300
    assert attacked.content["info"]["partition-id"] == 0


def test_unknown_attack_is_refused():
    with pytest.raises(ValueError, match="unknown attack"):
        attacking_client(fake_client, "nope", [0])
