"""fp32 arrays packed on the wire (``strategies.packing``): lossless, checked, used both ways by default."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from client_app.downlink import received_arrays
from strategies import build_strategy
from strategies.codec import NAMES_KEY, PayloadError, encode_arrays, names_array
from strategies.packing import (
    PACK_KEY,
    SHAPES_KEY,
    VALUES_KEY,
    can_pack,
    is_packed,
    pack_arrays,
    unpack_arrays,
)
from tests.conftest import reply
from tests.test_strategies import GLOBAL, FakeGrid, _record

pytestmark = pytest.mark.usefixtures("flower_task_identity")

ARRAYS = {
    "up.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 4) - 7.5,
    "down.bias": np.array([np.float32(1e-38), -0.0, 3.25], dtype=np.float32),
    "scalar": np.array(2.5, dtype=np.float32),
    "empty": np.zeros((0, 5), dtype=np.float32),
}


def test_packing_keeps_every_value_bit_for_bit_in_three_arrays():
    packed = pack_arrays(_record(ARRAYS))
    assert list(packed.keys()) == [NAMES_KEY, SHAPES_KEY, VALUES_KEY] and is_packed(packed)
    back = unpack_arrays(packed)
    assert list(back.keys()) == sorted(ARRAYS)
    for name, array in ARRAYS.items():
        got = back[name].numpy()
        assert got.shape == array.shape and got.dtype == np.float32
        assert got.tobytes() == array.tobytes(), name
    ordered = unpack_arrays(packed, order=["up.weight", "scalar", "not-sent"])
    assert list(ordered.keys()) == ["up.weight", "scalar", "down.bias", "empty"]


def test_only_plain_float32_records_are_packed():
    assert can_pack(_record(ARRAYS))
    assert not can_pack(ArrayRecord())
    assert not can_pack(_record({"a": np.zeros(3, np.float64)}))
    codes, _ = encode_arrays({"w": np.ones((2, 3), np.float32)}, bits=8, granularity="channel")
    assert not can_pack(codes) and not is_packed(codes)
    assert not can_pack(pack_arrays(_record(ARRAYS)))  # never twice


def _tampered(**entries) -> ArrayRecord:
    arrays = {k: a.numpy() for k, a in pack_arrays(_record(ARRAYS)).items()}
    arrays.update(entries)
    return ArrayRecord(
        {k: v if isinstance(v, Array) else Array(v) for k, v in arrays.items() if v is not None}
    )


@pytest.mark.parametrize(
    ("entries", "reason"),
    [
        ({"extra": np.zeros(1, np.float32)}, "unexpected array"),
        ({SHAPES_KEY: None}, "no '@shapes'"),
        ({SHAPES_KEY: np.zeros(3, np.int32)}, "expected 1-D int64"),
        ({SHAPES_KEY: np.array([2, 2, 3], np.int64)}, "does not describe array 1"),
        ({SHAPES_KEY: np.array([9] + [1] * 9 + [0, 0, 0], np.int64)}, "does not describe array 0"),
        ({SHAPES_KEY: np.array([1, -1, 0, 0, 0], np.int64)}, "does not describe array 0"),
        ({SHAPES_KEY: np.array([2, 0, 5, 1, 3, 0, 3, 2, 3, 4, 0], np.int64)}, "describes more than"),
        ({VALUES_KEY: np.zeros(27, np.float32)}, "holds 27 values, the shapes of its 4 arrays 28"),
        ({VALUES_KEY: np.zeros(28, np.float64)}, "expected 1-D float32"),
        ({NAMES_KEY: names_array(["a", "b", "c"])}, "describes more than the 3 named arrays"),
    ],
    ids=[
        "extra_entry",
        "no_shapes",
        "shapes_dtype",
        "short_shapes",
        "too_many_dims",
        "negative_dim",
        "trailing_shapes",
        "short_values",
        "values_dtype",
        "fewer_names",
    ],
)
def test_a_malformed_packed_payload_names_what_is_wrong(entries, reason):
    with pytest.raises(PayloadError, match=reason):
        unpack_arrays(_tampered(**entries))


def _strategy(**options):
    return build_strategy({"name": "vanilla"}, num_clients=1, **options)


def test_the_server_packs_fp32_messages_and_asks_for_packed_replies():
    strategy = _strategy()
    messages = list(strategy.configure_train(1, _record(GLOBAL), ConfigRecord(), FakeGrid([1, 2])))
    for message in messages:
        assert is_packed(message.content["arrays"]) and message.content["config"][PACK_KEY] is True
    # A client reads them as the fp32 weights they are.
    got = received_arrays(
        messages[0].content["arrays"], messages[0].content["config"], {}, RecordDict(), keep=True
    )
    assert {n: a.numpy().tolist() for n, a in got.items()} == {n: a.tolist() for n, a in GLOBAL.items()}
    # Packed and plain replies are averaged alike, in the global model's order.
    a = {name: np.full_like(value, 1.0) for name, value in GLOBAL.items()}
    b = {name: np.full_like(value, 3.0) for name, value in GLOBAL.items()}
    replies = [_reply(pack_arrays(_record(a)), 1), _reply(_record(b), 2)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert list(arrays.keys()) == list(GLOBAL)
    assert all(np.array_equal(arrays[n].numpy(), np.full_like(v, 2.0)) for n, v in GLOBAL.items())
    assert strategy.round_log[1]["uplink_bytes"] == sum(
        sum(len(x.data) for _, x in r.content["arrays"].items()) for r in replies
    )


def test_a_malformed_packed_reply_is_left_out_with_the_reason(caplog):
    strategy = _strategy()
    list(strategy.configure_train(1, _record(GLOBAL), ConfigRecord(), FakeGrid([1, 2])))
    short = {k: a.numpy() for k, a in pack_arrays(_record(GLOBAL)).items()}
    short[VALUES_KEY] = short[VALUES_KEY][:-1]
    good = pack_arrays(_record(GLOBAL))
    with caplog.at_level("WARNING"):
        strategy.aggregate_train(1, [_reply(_record(short), 1), _reply(good, 2)])
    assert strategy.round_log[1]["num_rejected"] == 1 and strategy.round_log[1]["num_aggregated"] == 1
    assert "left out the reply of node 1" in caplog.text and "holds 7 values" in caplog.text


def test_client_side_dp_keeps_arrays_as_they_are():
    """Flower's fixedclipping_mod clips a reply against the message's arrays, one by one."""
    strategy = _strategy(privacy={"name": "dp_client", "clipping_norm": 1.0, "noise_multiplier": 0.0})
    (message,) = strategy.configure_train(1, _record(GLOBAL), ConfigRecord(), FakeGrid([1]))
    assert not is_packed(message.content["arrays"]) and PACK_KEY not in message.content["config"]


def _reply(arrays: ArrayRecord, node: int):
    metrics = MetricRecord({"train_loss": 0.1, "num-examples": 10})
    return reply(RecordDict({"arrays": arrays, "metrics": metrics}), node)
