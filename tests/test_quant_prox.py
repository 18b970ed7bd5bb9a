"""FedDM-prox and FedDM-quant: client-side terms and encodings, server-side decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from omegaconf import OmegaConf

from client_app.downlink import received_arrays
from client_app.task import proximal_term
from client_app.updates import RESIDUAL_KEY, quantized_update
from models import build_unet
from server_app.config import compose_config
from strategies import Int8Updates, ProximalTerm, build_strategy
from strategies.codec import BITS_KEY, CODEC_KEYS, CODES_KEY, SCALES_KEY, decode_arrays, payload_nbytes
from strategies.quant import sent_names
from tests.conftest import reply
from tests.test_strategies import FakeGrid

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def _micro_state(seed=0):
    torch.manual_seed(seed)
    unet = build_unet(
        {
            "block_out_channels": [8, 16],
            "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
            "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
            "layers_per_block": 1,
            "norm_num_groups": 4,
            "attention_head_dim": 4,
        },
        image_size=28,
        channels=1,
    )
    return unet


# -- FedDM-prox ----------------------------------------------------------------


def test_proximal_term_is_half_mu_times_squared_distance():
    unet = _micro_state()
    term = proximal_term(unet, mu=0.3)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.01)
    num_params = sum(p.numel() for p in unet.parameters())
    expected = 0.5 * 0.3 * num_params * 0.01**2
    assert term(unet).item() == pytest.approx(expected, rel=1e-4)


def test_proximal_term_is_off_for_mu_zero_and_rejects_negative_mu():
    unet = _micro_state()
    assert proximal_term(unet, 0.0) is None
    with pytest.raises(ValueError, match="proximal-mu"):
        proximal_term(unet, -1.0)


def test_prox_strategy_sends_mu_to_clients():
    strategy = build_strategy({"name": "prox", "mu": 0.05}, num_clients=1)
    assert strategy.layer(ProximalTerm).mu == 0.05  # the client side of FedProx, on any aggregator
    weights = ArrayRecord({"w": Array(np.zeros(3, np.float32))})
    (message,) = strategy.configure_train(1, weights, ConfigRecord(), FakeGrid([1]))
    assert message.content["config"]["proximal-mu"] == 0.05


# -- FedDM-quant -----------------------------------------------------------------

QUANT_CONFIG = {
    "quant-bits": 8,
    "quant-granularity": "channel",
    "quant-stochastic": False,
    "quant-error-feedback": False,
}


def _quant_strategy(**options):
    return build_strategy(
        {
            "name": "quant",
            "bits": 8,
            "granularity": "channel",
            "stochastic_rounding": False,
            "error_feedback": False,
            "downlink": "weights",
        }
        | options,
        num_clients=1,
    )


def _client_reply(global_state, local_state, num_examples, node_id, config=QUANT_CONFIG, state=None):
    record = quantized_update(
        local_state, global_state, config, state if state is not None else RecordDict(), seed=node_id
    )
    metrics = MetricRecord({"train_loss": 0.1, "num-examples": num_examples})
    return reply(RecordDict({"arrays": record, "metrics": metrics}), node_id)


def test_quant_round_applies_the_weighted_mean_update_within_quantization_error():
    global_state = _micro_state(0).state_dict()
    local_a = {k: v + 0.01 * torch.randn_like(v) for k, v in global_state.items()}
    local_b = {k: v + 0.01 * torch.randn_like(v) for k, v in global_state.items()}
    strategy = _quant_strategy()
    (message,) = strategy.configure_train(1, ArrayRecord(global_state), ConfigRecord(), FakeGrid([1]))
    assert message.content["config"]["quant-bits"] == 8
    arrays, _ = strategy.aggregate_train(
        1, [_client_reply(global_state, local_a, 30, 1), _client_reply(global_state, local_b, 10, 2)]
    )
    new = arrays.to_torch_state_dict()
    for name, g in global_state.items():
        expected = 0.75 * local_a[name] + 0.25 * local_b[name]
        # each update carries at most scale/2 error per element, scale <= max|Δ|/127
        bound = max((local_a[name] - g).abs().max(), (local_b[name] - g).abs().max()) / 127
        assert (new[name] - expected).abs().max() <= bound + 1e-7, name
        assert new[name].dtype == g.dtype


def test_quant_reply_is_int8_and_about_four_times_smaller():
    # the fashion_mnist UNet (6.8M parameters): npy headers are negligible
    cfg = compose_config(["model=fashion_mnist"])
    unet = build_unet(OmegaConf.to_container(cfg.model.unet), image_size=28, channels=1)
    global_state = unet.state_dict()
    local = {k: v + 1e-3 for k, v in global_state.items()}
    record = quantized_update(local, global_state, QUANT_CONFIG, RecordDict(), seed=0)
    assert record[CODES_KEY].dtype == "int8" and sent_names(record) == sorted(global_state)
    assert payload_nbytes(ArrayRecord(global_state)) / payload_nbytes(record) >= 3.9


@pytest.mark.parametrize(("bits", "ratio"), [(4, 7.5), (2, 14.5), (1, 27.0)])
def test_packed_quant_reply_is_smaller_by_its_bit_width(bits, ratio):
    cfg = compose_config(["model=fashion_mnist"])
    unet = build_unet(OmegaConf.to_container(cfg.model.unet), image_size=28, channels=1)
    global_state = unet.state_dict()
    local = {k: v + 1e-3 * torch.randn_like(v) for k, v in global_state.items()}
    config = QUANT_CONFIG | {"quant-bits": bits}
    record = quantized_update(local, global_state, config, RecordDict(), seed=0)
    assert int(record[BITS_KEY].numpy()) == bits
    assert set(record.keys()) == set(CODEC_KEYS) and record[CODES_KEY].dtype == "uint8"
    assert payload_nbytes(ArrayRecord(global_state)) / payload_nbytes(record) >= ratio


@pytest.mark.parametrize("bits", [4, 1])
def test_a_packed_quant_round_applies_the_mean_of_what_the_clients_coded(bits):
    global_state = _micro_state(0).state_dict()
    local_a = {k: v + 0.01 * torch.randn_like(v) for k, v in global_state.items()}
    local_b = {k: v + 0.01 * torch.randn_like(v) for k, v in global_state.items()}
    config = QUANT_CONFIG | {"quant-bits": bits}
    strategy = _quant_strategy(bits=bits)
    (message,) = strategy.configure_train(1, ArrayRecord(global_state), ConfigRecord(), FakeGrid([1]))
    assert message.content["config"]["quant-bits"] == bits
    replies = [
        _client_reply(global_state, local, n, node, config)
        for local, n, node in ((local_a, 30, 1), (local_b, 10, 2))
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    new = arrays.to_torch_state_dict()
    reference = {k: (tuple(v.shape), "float32") for k, v in global_state.items()}
    coded = [decode_arrays(r.content["arrays"], reference) for r in replies]
    for name, g in global_state.items():
        expected = g.numpy() + 0.75 * coded[0][name] + 0.25 * coded[1][name]
        np.testing.assert_allclose(new[name].numpy(), expected, rtol=1e-6, atol=1e-7)


def test_error_feedback_keeps_the_residual_in_client_state():
    global_state = _micro_state(0).state_dict()
    local = {k: v + 0.013 * torch.randn_like(v) for k, v in global_state.items()}
    state = RecordDict()
    config = QUANT_CONFIG | {"quant-error-feedback": True}
    first = quantized_update(local, global_state, config, state, seed=0)
    assert RESIDUAL_KEY in state
    residual = {k: a.numpy() for k, a in state[RESIDUAL_KEY].items()}
    assert max(np.abs(r).max() for r in residual.values()) > 0
    # Round 2 with no training: the update is exactly the carried residual.
    second = quantized_update(global_state, global_state, config, state, seed=1)
    no_feedback = quantized_update(global_state, global_state, QUANT_CONFIG, RecordDict(), seed=1)
    assert not np.array_equal(second[CODES_KEY].numpy(), no_feedback[CODES_KEY].numpy())
    assert first.keys() == second.keys()


def test_quantized_downlink_is_what_clients_decode():
    global_state = _micro_state(0).state_dict()
    strategy = _quant_strategy(downlink="int8_weights")
    (message,) = strategy.configure_train(1, ArrayRecord(global_state), ConfigRecord(), FakeGrid([1]))
    payload, config = message.content["arrays"], message.content["config"]
    assert SCALES_KEY in payload.keys()
    model = _micro_state(1).state_dict()
    received = received_arrays(payload, config, model, RecordDict(), keep=True).to_torch_state_dict()
    view = strategy._base_arrays.to_torch_state_dict()
    for name, tensor in received.items():
        assert torch.equal(tensor, view[name])
        assert (tensor - global_state[name]).abs().max() <= global_state[name].abs().max() / 127 + 1e-7
    # A client that did not train sends a zero update; the server keeps the client view.
    arrays, _ = strategy.aggregate_train(1, [_client_reply(received, received, 5, 1)])
    for name, tensor in arrays.to_torch_state_dict().items():
        assert torch.equal(tensor, view[name])


def _corrupt(record: ArrayRecord, how: str) -> ArrayRecord:
    arrays = {k: a.numpy() for k, a in record.items()}
    if how == "nan-scale":
        arrays[SCALES_KEY][0] = np.nan
    elif how == "zero-scale":
        arrays[SCALES_KEY][-1] = 0.0
    elif how == "float-values":
        arrays[CODES_KEY] = arrays[CODES_KEY].astype(np.float32)
    elif how == "wrong-shape":
        arrays[CODES_KEY] = arrays[CODES_KEY][:-1].copy()
    elif how == "missing":
        del arrays[SCALES_KEY]
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


@pytest.mark.parametrize("how", ["nan-scale", "zero-scale", "float-values", "wrong-shape", "missing"])
def test_corrupted_quantized_update_is_left_out(how, caplog):
    global_state = _micro_state(0).state_dict()
    local = {k: v + 0.01 for k, v in global_state.items()}
    strategy = _quant_strategy()
    strategy.configure_train(1, ArrayRecord(global_state), ConfigRecord(), FakeGrid([1]))
    good = _client_reply(global_state, local, 10, 1)
    record = quantized_update(local, global_state, QUANT_CONFIG, RecordDict(), seed=0)
    metrics = MetricRecord({"train_loss": 0.1, "num-examples": 1000})
    bad = reply(RecordDict({"arrays": _corrupt(record, how), "metrics": metrics}), 2)
    with caplog.at_level("WARNING"):
        arrays, _ = strategy.aggregate_train(1, [good, bad])
    assert strategy.round_log[1]["num_rejected"] == 1
    assert "node 2" in caplog.text
    for name, tensor in arrays.to_torch_state_dict().items():
        assert (tensor - local[name]).abs().max() < 1e-3


def test_quant_strategy_rejects_bad_settings():
    with pytest.raises(ValueError, match="bits"):
        Int8Updates(bits=9)
    with pytest.raises(ValueError, match="granularity"):
        Int8Updates(granularity="row")


def test_error_feedback_keeps_the_residual_of_arrays_not_sent_this_round():
    global_state = _micro_state(0).state_dict()
    local = {k: v + 0.013 * torch.randn_like(v) for k, v in global_state.items()}
    config = QUANT_CONFIG | {"quant-error-feedback": True}
    names = list(global_state)
    first, second = names[: len(names) // 2], names[len(names) // 2 :]
    state = RecordDict()
    quantized_update({n: local[n] for n in first}, {n: global_state[n] for n in first}, config, state, seed=0)
    kept = {n: state[RESIDUAL_KEY][n].numpy().copy() for n in first}
    quantized_update(
        {n: local[n] for n in second}, {n: global_state[n] for n in second}, config, state, seed=1
    )
    assert set(state[RESIDUAL_KEY].keys()) == set(names)  # both halves' residuals are kept
    assert all(np.array_equal(state[RESIDUAL_KEY][n].numpy(), kept[n]) for n in first)


# -- top-k (strategy.topk) ---------------------------------------------------------

TOPK_CONFIG = QUANT_CONFIG | {
    "quant-error-feedback": True,
    "quant-topk": 0.05,
    "quant-topk-values": "quantized",
}


@pytest.mark.parametrize(
    "aggregator",
    [None, {"name": "fedavgm", "server_learning_rate": 1.0, "server_momentum": 0.0}],
    ids=["fedavg", "fedavgm-whole-models"],
)
def test_a_topk_round_applies_the_weighted_mean_of_the_decoded_updates(aggregator, caplog):
    from strategies.sparse import decode_topk, is_topk

    global_state = _micro_state(0).state_dict()
    local_a = {k: v + 0.01 * torch.randn_like(v) for k, v in global_state.items()}
    local_b = {k: v + 0.01 * torch.randn_like(v) for k, v in global_state.items()}
    options = {"name": "quant", "bits": 8, "granularity": "channel", "stochastic_rounding": False}
    options |= {"error_feedback": False, "quantize_downlink": False, "topk": 0.05, "topk_values": "quantized"}
    strategy = build_strategy(options, num_clients=1, aggregator=aggregator)
    (message,) = strategy.configure_train(1, ArrayRecord(global_state), ConfigRecord(), FakeGrid([1]))
    config = dict(message.content["config"])
    assert config["quant-topk"] == 0.05 and config["quant-error-feedback"] is True  # top-k implies it
    strategy.summary()
    assert "top-k: 0.05 of each tensor's entries, values as 8-bit codes" in caplog.text
    replies = [
        _client_reply(global_state, local, n, node, config)
        for local, n, node in ((local_a, 30, 1), (local_b, 10, 2))
    ]
    assert all(is_topk(r.content["arrays"]) for r in replies)
    dense = _client_reply(global_state, local_a, 1000, 3)  # int8 codes, where top-k was asked
    arrays, _ = strategy.aggregate_train(1, [*replies, dense])
    assert strategy.round_log[1]["num_rejected"] == 1 and "not a top-k record" in caplog.text
    reference = {k: (tuple(v.shape), "float32") for k, v in global_state.items()}
    coded = [decode_topk(r.content["arrays"], reference, 0.05) for r in replies]
    new = arrays.to_torch_state_dict()
    for name, g in global_state.items():
        expected = g.numpy() + 0.75 * coded[0][name] + 0.25 * coded[1][name]
        np.testing.assert_allclose(new[name].numpy(), expected, rtol=1e-6, atol=1e-7)
        assert np.count_nonzero(new[name].numpy() - g.numpy()) <= 2 * np.ceil(0.05 * g.numel())


def test_a_dense_quant_strategy_leaves_out_a_topk_reply(caplog):
    global_state = _micro_state(0).state_dict()
    local = {k: v + 0.01 for k, v in global_state.items()}
    strategy = _quant_strategy()
    strategy.configure_train(1, ArrayRecord(global_state), ConfigRecord(), FakeGrid([1]))
    good = _client_reply(global_state, local, 10, 1)
    sparse = _client_reply(global_state, local, 10, 2, TOPK_CONFIG)
    with caplog.at_level("WARNING"):
        strategy.aggregate_train(1, [good, sparse])
    assert strategy.round_log[1]["num_rejected"] == 1
    assert "top-k record, but strategy.topk=0 asked for dense arrays" in caplog.text


def test_quant_strategy_rejects_bad_topk_settings():
    with pytest.raises(ValueError, match="topk"):
        Int8Updates(topk=1.0)
    with pytest.raises(ValueError, match="topk"):
        Int8Updates(topk=-0.1)
    with pytest.raises(ValueError, match="topk_values"):
        Int8Updates(topk=0.1, topk_values="int4")


def test_topk_residual_survives_client_state_on_disk(tmp_path):
    from client_app.state import load_state, save_state

    global_state = _micro_state(0).state_dict()
    local = {k: v + 0.01 * torch.randn_like(v) for k, v in global_state.items()}
    state = RecordDict()
    quantized_update(local, global_state, TOPK_CONFIG, state, seed=0)
    save_state(state, tmp_path / "client.safetensors")
    loaded = load_state(tmp_path / "client.safetensors")
    for name, array in state[RESIDUAL_KEY].items():
        np.testing.assert_array_equal(loaded[RESIDUAL_KEY][name].numpy(), array.numpy())
