"""Partial-UNet exchange: UNet parts, presets, the USplit assignment, strategy and client sides."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from client_app.partial import (
    LOCAL_KEY,
    MissingLocalPartsError,
    assemble,
    keep_local_parts,
    reply_arrays,
    shared_names,
)
from models import build_unet
from models.parts import PRESETS, expand, names_in, parameter_fraction, part_of, parts_of, usplit_assignment
from strategies import PartialParts, build_strategy
from strategies.codec import is_quantized, payload_nbytes
from strategies.packing import pack_arrays
from strategies.quant import sent_names
from tests.conftest import reply
from tests.test_strategies import FakeGrid

pytestmark = pytest.mark.usefixtures("flower_task_identity")

QUANT = {
    "quant-bits": 8,
    "quant-granularity": "channel",
    "quant-stochastic": False,
    "quant-error-feedback": False,
}


def _unet(seed=0):
    torch.manual_seed(seed)
    return build_unet(
        {
            "block_out_channels": [8, 16],
            "down_block_types": ["DownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "UpBlock2D"],
            "layers_per_block": 1,
            "norm_num_groups": 4,
            "attention_head_dim": 4,
        },
        image_size=28,
        channels=1,
    )


def _state(seed=0):
    return _unet(seed).state_dict()


def _strategy(preset="udec", **options):
    cfg = {
        "name": "partial",
        "preset": preset,
        "shared": None,
        "split_ways": 2,
        "quantize": False,
        "bits": 8,
        "granularity": "channel",
        "stochastic_rounding": False,
        "error_feedback": False,
    }
    return build_strategy(cfg | options, num_clients=1)


def _train_reply(arrays: ArrayRecord, node_id: int, partition_id: int, num_examples: int = 10):
    content = RecordDict(
        {
            "arrays": arrays,
            "metrics": MetricRecord({"train_loss": 0.5, "num-examples": num_examples}),
            "info": ConfigRecord({"partition-id": partition_id}),
        }
    )
    return reply(content, node_id)


# -- parts and presets ------------------------------------------------------------


def test_parameters_map_to_unet_parts():
    assert part_of("down_blocks.1.resnets.0.conv1.weight") == "down_blocks.1"
    assert part_of("conv_out.bias") == "head" and part_of("conv_norm_out.weight") == "head"
    assert part_of("time_embedding.linear_1.weight") == "time_embedding"
    names = list(_state())
    assert parts_of(names) == [
        "conv_in",
        "time_embedding",
        "down_blocks.0",
        "down_blocks.1",
        "up_blocks.0",
        "up_blocks.1",
        "mid_block",
        "head",
    ]
    assert expand(["up_blocks", "head"], names) == ["up_blocks.0", "up_blocks.1", "head"]
    with pytest.raises(ValueError, match="decoder"):
        expand(["decoder"], names)


def test_presets_share_the_papers_parts():
    names = list(_state())
    udec, ulatdec = expand(PRESETS["udec"], names), expand(PRESETS["ulatdec"], names)
    assert udec == ["up_blocks.0", "up_blocks.1", "head"]
    assert ulatdec == ["up_blocks.0", "up_blocks.1", "mid_block", "head"]
    assert set(expand(PRESETS["usplit"], names)) == set(parts_of(names))


@pytest.mark.parametrize("ways", [2, 3, 4])
@pytest.mark.parametrize("clients", [1, 2, 3, 4, 5])
def test_usplit_sends_every_part_once_per_group(ways, clients):
    sizes = {n: t.numel() for n, t in _state().items()}
    assignment = usplit_assignment(sizes, num_partitions=clients, ways=ways, seed=3, server_round=2)
    assert sorted(assignment) == list(range(clients))
    assert assignment == usplit_assignment(sizes, num_partitions=clients, ways=ways, seed=3, server_round=2)
    sent = [p for parts in assignment.values() for p in parts]
    every = parts_of(sizes)
    assert set(sent) == set(every)  # nothing is left out
    full_groups = clients // ways
    # Each full group sends one model's worth: each part exactly once.
    assert len(sent) >= full_groups * len(every)
    if ways == 2 and clients == 2:  # the paper: one side each, the mid block with one of them
        a, b = assignment.values()
        assert {"down_blocks.0", "conv_in"} <= set(a) and {"up_blocks.0", "head"} <= set(b)
        assert ("mid_block" in a) != ("mid_block" in b)


# -- strategy -----------------------------------------------------------------------


def test_first_contact_gets_the_whole_model_then_only_shared_parts():
    from flwr.app import Error
    from flwr.app.message.message import make_message

    strategy = _strategy("udec")
    state = _state()
    full = ArrayRecord(state)
    messages = list(strategy.configure_train(1, full, ConfigRecord(), FakeGrid([1, 2])))
    assert all(set(sent_names(m.content["arrays"])) == set(state) for m in messages)
    shared = names_in(expand(PRESETS["udec"], list(state)), list(state))
    answer = ArrayRecord({n: state[n] for n in shared})
    failed = _train_reply(answer, 2, 1)
    failed = make_message(metadata=failed.metadata, error=Error(code=0, reason="out of memory"))
    strategy.aggregate_train(1, [_train_reply(answer, 1, 0), failed])
    again = list(strategy.configure_train(2, full, ConfigRecord(), FakeGrid([1, 2, 3])))
    by_node = {m.metadata.dst_node_id: set(sent_names(m.content["arrays"])) for m in again}
    # node 1 trained and keeps local parts; node 2 failed (its state may be lost), node 3 is new
    assert by_node[1] == set(shared) and by_node[2] == by_node[3] == set(state)
    assert json.loads(again[0].content["config"]["partial-shared"]) == ["up_blocks.0", "up_blocks.1", "head"]
    # bytes are counted from what each message really carries (fp32 arrays travel packed)
    packed = {n: payload_nbytes(pack_arrays(r)) for n, r in (("answer", answer), ("full", full))}
    assert strategy.round_log[2]["downlink_bytes"] == packed["answer"] + 2 * packed["full"]
    assert strategy.personalized


@pytest.mark.parametrize("preset", ["udec", "ulatdec", "usplit"])
@pytest.mark.parametrize("quantize", [False, True])
def test_bytes_sent_match_the_presets_parameter_fraction(preset, quantize):
    """On the fashion_mnist UNet (6.8M parameters), where npy headers are negligible."""
    from omegaconf import OmegaConf

    from server_app.config import compose_config

    unet_kwargs = OmegaConf.to_container(compose_config(["model=fashion_mnist"]).model.unet)
    torch.manual_seed(0)
    state = build_unet(unet_kwargs, image_size=28, channels=1).state_dict()
    sizes = {n: t.numel() for n, t in state.items()}
    full_bytes = payload_nbytes(ArrayRecord(state))
    strategy = _strategy(preset, quantize=quantize)
    strategy.configure_train(1, ArrayRecord(state), ConfigRecord(), FakeGrid([1, 2]))
    strategy.encoding._initialized = {1, 2}  # both trained in round 1
    (message, _) = strategy.configure_train(2, ArrayRecord(state), ConfigRecord(), FakeGrid([1, 2]))
    fraction = parameter_fraction(strategy.encoding.shared_parts, sizes)
    assert payload_nbytes(message.content["arrays"]) == pytest.approx(fraction * full_bytes, rel=0.01)
    # uplink: both clients together
    config = dict(message.content["config"]) | {"server-round": 2}
    trained = {n: t + 0.01 for n, t in state.items()}
    uplink = sum(
        payload_nbytes(
            reply_arrays(trained, state, config, RecordDict(), partition_id=p, num_partitions=2, seed=p)
        )
        for p in (0, 1)
    )
    sent_fraction = 1.0 if preset == "usplit" else 2 * fraction  # USplit: the pair sends one model
    expected = sent_fraction * full_bytes / (4 if quantize else 1)
    assert uplink == pytest.approx(expected, rel=0.02)
    assert fraction == pytest.approx({"udec": 0.605, "ulatdec": 0.711, "usplit": 1.0}[preset], abs=0.005)


def test_replies_with_local_parts_or_broken_parts_are_left_out():
    strategy = _strategy("udec")
    state = _state()
    strategy.configure_train(1, ArrayRecord(state), ConfigRecord(), FakeGrid([1]))
    local_leak = ArrayRecord(state)  # the whole model: local parts included
    broken = ArrayRecord({n: t for n, t in state.items() if n.startswith("up_blocks.0.resnets.0.conv1")})
    good = ArrayRecord({n: t + 1 for n, t in state.items() if n in strategy.encoding.shared_names})
    arrays, _ = strategy.aggregate_train(
        1,
        [
            _train_reply(local_leak, 1, 0),
            _train_reply(broken, 2, 1),
            _train_reply(good, 3, 2),
        ],
    )
    assert strategy.round_log[1]["num_rejected"] == 2
    new = arrays.to_torch_state_dict()
    for name, tensor in state.items():
        expected = tensor + 1 if name in strategy.encoding.shared_names else tensor
        assert torch.equal(new[name], expected), name


def test_usplit_averages_each_part_over_the_replies_that_carry_it():
    strategy = _strategy("usplit")
    state = _state()
    strategy.configure_train(1, ArrayRecord(state), ConfigRecord(), FakeGrid([1, 2, 3]))
    assert not strategy.personalized
    down = names_in(
        expand(["conv_in", "time_embedding", "down_blocks", "mid_block"], list(state)), list(state)
    )
    up = [n for n in state if n not in down]
    a = ArrayRecord({n: state[n] + 1 for n in down})
    b = ArrayRecord({n: state[n] + 2 for n in up})
    c = ArrayRecord({n: state[n] + 5 for n in up})
    arrays, metrics = strategy.aggregate_train(
        1,
        [
            _train_reply(a, 1, 0, 10),
            _train_reply(b, 2, 1, 30),
            _train_reply(c, 3, 2, 10),
        ],
    )
    new = arrays.to_torch_state_dict()
    for name in down:
        assert torch.allclose(new[name], state[name] + 1), name
    for name in up:  # weights 30 and 10
        assert torch.allclose(new[name], state[name] + 2.75, atol=1e-6), name
    assert metrics["train_loss"] == pytest.approx(0.5)


def test_quantized_partial_moves_the_shared_parts_by_the_mean_update():
    from client_app.updates import quantized_update

    strategy = _strategy("ulatdec", quantize=True)
    state = _state()
    (message,) = strategy.configure_train(1, ArrayRecord(state), ConfigRecord(), FakeGrid([1]))
    assert message.content["config"]["quant-bits"] == 8
    shared = strategy.encoding.shared_names
    local = {n: state[n] + 0.01 * torch.randn_like(state[n]) for n in shared}
    record = quantized_update(local, {n: state[n] for n in shared}, QUANT, RecordDict(), seed=0)
    assert is_quantized(record) and set(sent_names(record)) == set(shared)
    arrays, _ = strategy.aggregate_train(1, [_train_reply(record, 1, 0)])
    new = arrays.to_torch_state_dict()
    for name, tensor in state.items():
        if name in shared:
            bound = (local[name] - tensor).abs().max() / 127 + 1e-7
            assert (new[name] - local[name]).abs().max() <= bound, name
        else:
            assert torch.equal(new[name], tensor), name


def test_client_samples_are_checked_and_kept_per_round():
    from flwr.app import Array

    sampling = {
        "sample-count": 4,
        "sample-seed": 1,
        "sample-ddim-steps": 2,
        "sample-batch-size": 4,
        "sample-shape": json.dumps([1, 28, 28]),
    }
    strategy = build_strategy(
        {
            "name": "partial",
            "preset": "udec",
            "shared": None,
            "split_ways": 2,
            "quantize": False,
            "bits": 8,
            "granularity": "channel",
            "stochastic_rounding": False,
            "error_feedback": False,
        },
        num_clients=1,
        client_generation=sampling,
    )
    state = _state()
    strategy.configure_train(1, ArrayRecord(state), ConfigRecord(), FakeGrid([1, 2]))
    (message, _) = strategy.configure_evaluate(1, ArrayRecord(state), ConfigRecord(), FakeGrid([1, 2]))
    assert message.content["config"]["sample-count"] == 4

    def evaluate_reply(images, node_id, partition_id):
        content = RecordDict(
            {
                "metrics": MetricRecord({"eval_loss": 0.1, "num-examples": 5}),
                "info": ConfigRecord({"partition-id": partition_id}),
                "samples": ArrayRecord({"images": Array(images)}),
            }
        )
        return reply(content, node_id, "evaluate")

    good = np.zeros((4, 1, 28, 28), np.uint8)
    wrong = np.zeros((4, 3, 28, 28), np.uint8)
    metrics = strategy.aggregate_evaluate(1, [evaluate_reply(good, 1, 0), evaluate_reply(wrong, 2, 1)])
    assert metrics["eval_loss"] == pytest.approx(0.1)
    assert list(strategy.encoding.client_samples[1]) == [0]


def test_partial_strategy_rejects_inconsistent_settings():
    with pytest.raises(ValueError, match="shared"):
        PartialParts(preset="custom")
    with pytest.raises(ValueError, match="shared"):
        PartialParts(preset="udec", shared=["mid_block"])
    with pytest.raises(ValueError, match="preset"):
        PartialParts(preset="decoder")


# -- client side ----------------------------------------------------------------------


def test_client_assembles_received_and_local_parts_and_keeps_local_ones():
    state, other = _state(0), _state(1)
    shared = names_in(expand(PRESETS["udec"], list(state)), list(state))
    context_state = RecordDict()
    # first contact: the whole model; nothing local is needed yet
    weights = assemble(ArrayRecord(state), state, context_state)
    keep_local_parts(other, shared, context_state)  # "after training"
    assert set(context_state[LOCAL_KEY].keys()) == set(state) - set(shared)
    # later: shared parts only, local parts from the state
    weights = assemble(ArrayRecord({n: state[n] for n in shared}), state, context_state)
    for name in state:
        assert torch.equal(weights[name], state[name] if name in shared else other[name]), name
    with pytest.raises(MissingLocalPartsError, match="state was lost"):
        assemble(ArrayRecord({n: state[n] for n in shared}), state, RecordDict())


@pytest.mark.parametrize("quantize", [False, True])
def test_client_sends_only_shared_parts(quantize):
    state = _state(0)
    trained = {n: t + 0.01 for n, t in state.items()}
    config = {
        "partial-shared": json.dumps(["up_blocks", "head"]),
        "partial-split-ways": 0,
        "partial-seed": 0,
        "server-round": 1,
    } | (QUANT if quantize else {})
    record = reply_arrays(trained, state, config, RecordDict(), partition_id=0, num_partitions=2, seed=0)
    assert is_quantized(record) == quantize
    sent = set(sent_names(record))
    assert sent == set(shared_names(config, list(state)))
    assert all(n.startswith(("up_blocks", "conv_out", "conv_norm_out")) for n in sent)


def test_usplit_client_sends_its_assigned_share():
    state = _state(0)
    config = {
        "partial-shared": json.dumps(parts_of(state)),
        "partial-split-ways": 2,
        "partial-seed": 7,
        "server-round": 3,
    }
    sizes = {n: t.numel() for n, t in state.items()}
    assignment = usplit_assignment(sizes, num_partitions=2, ways=2, seed=7, server_round=3)
    sent = {}
    for pid in (0, 1):
        record = reply_arrays(state, state, config, RecordDict(), partition_id=pid, num_partitions=2, seed=0)
        sent[pid] = set(record.keys())
        assert sent[pid] == set(names_in(assignment[pid], list(state)))
    assert sent[0].isdisjoint(sent[1]) and sent[0] | sent[1] == set(state)


# -- top-k (strategy.topk with strategy.quantize=true) ----------------------------------


def test_usplit_with_topk_moves_each_part_by_the_mean_of_what_its_senders_sent(caplog):
    from strategies.sparse import TOPK_KEY, decode_topk, topk_names

    strategy = _strategy("usplit", split_ways=2, quantize=True, topk=0.1, topk_values="float32")
    state = _state()
    messages = strategy.configure_train(1, ArrayRecord(state), ConfigRecord(), FakeGrid([1, 2]))
    config = dict(messages[0].content["config"])
    assert config["quant-topk"] == 0.1 and config["quant-error-feedback"] is True
    torch.manual_seed(1)
    trained = [{n: t + 0.01 * torch.randn_like(t) for n, t in state.items()} for _ in range(2)]
    states = [RecordDict(), RecordDict()]
    records = [
        reply_arrays(trained[p], state, config, states[p], partition_id=p, num_partitions=2, seed=p)
        for p in range(2)
    ]
    sent = [topk_names(r) for r in records]
    assert set(sent[0]).isdisjoint(sent[1]) and set(sent[0]) | set(sent[1]) == set(state)
    assert all(len(r.keys()) == 3 and TOPK_KEY in r for r in records)  # names, positions, float32 values
    # what was not sent stays in each client's residual, for a later round
    assert all(set(s["feddm-quant-residual"].keys()) == set(n) for s, n in zip(states, sent))
    dense = ArrayRecord({n: state[n] + 1 for n in sent[0]})  # weights, where update codes were asked
    arrays, _ = strategy.aggregate_train(
        1, [_train_reply(records[0], 1, 0), _train_reply(records[1], 2, 1), _train_reply(dense, 3, 0)]
    )
    assert strategy.round_log[1]["num_rejected"] == 1 and "not a top-k record" in caplog.text
    new = arrays.to_torch_state_dict()
    for record in records:
        reference = {n: (tuple(state[n].shape), "float32") for n in topk_names(record)}
        for name, update in decode_topk(record, reference, 0.1).items():
            assert np.count_nonzero(update) == max(1, int(np.ceil(0.1 * update.size - 1e-6)))
            np.testing.assert_allclose(new[name].numpy(), state[name].numpy() + update, rtol=0, atol=1e-7)


def test_partial_topk_needs_quantize():
    with pytest.raises(ValueError, match=r"strategy.topk=0.01 needs strategy.quantize=true"):
        PartialParts(preset="udec", topk=0.01, quantize=False)
    with pytest.raises(ValueError, match="topk"):
        PartialParts(preset="udec", topk=1.0, quantize=True)
