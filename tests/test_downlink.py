"""The downlink's forms (``strategy.downlink``): fp32 weights, int8 weights, int8 changes of a kept view.

Unit tests drive a strategy's ``configure_train``/``aggregate_train`` and the
client's ``received_arrays`` node by node, each node with a state of its own;
the runs drive the real ClientApp functions over an in-process grid
(``tests/test_sampling.py``'s helpers).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from omegaconf import OmegaConf

from client_app.downlink import VIEW_KEY, DownlinkMismatchError, received_arrays
from client_app.partial import assemble, keep_local_parts
from client_app.updates import quantized_update
from models import build_unet
from server_app.config import ConfigError, compose_config, validate_config
from server_app.federation import run_federation
from strategies import RoundFailedError, build_strategy
from strategies.accounting import message_nbytes
from strategies.codec import decode_arrays, is_quantized, payload_nbytes
from strategies.downlink import BASE_HASH_KEY, view_hash
from strategies.quant import to_record
from tests.conftest import reply
from tests.test_partial import _state
from tests.test_quant_prox import QUANT_CONFIG
from tests.test_sampling import _client, _grid, _rows, _sampled_run
from tests.test_strategies import FakeGrid

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def _strategy(downlink="int8_delta", name="vanilla", **options):
    codec = {"bits": 8, "granularity": "channel", "stochastic_rounding": False, "error_feedback": False}
    config = {"name": name, "downlink": downlink} | (codec if name in ("quant", "partial") else {}) | options
    return build_strategy(config, num_clients=1)


class Client:
    """One node: its state between rounds, what it decoded last, and a reply that moves the model."""

    def __init__(self, node: int, model: dict[str, torch.Tensor]) -> None:
        self.node, self.model, self.state = node, model, RecordDict()
        self.received: dict[str, torch.Tensor] = {}
        self.initial = None  # rebuilds the run's initial model (a change since round 0)

    def receive(self, message: Message, keep: bool = True) -> dict[str, torch.Tensor]:
        config = message.content["config"]
        arrays = received_arrays(
            message.content["arrays"], config, self.model, self.state, keep=keep, initial=self.initial
        )
        self.received = arrays.to_torch_state_dict()
        return self.received

    def train_reply(self, seed: int, quant: bool = False) -> Message:
        """Weights (or an int8 update) a small random step away from what it received."""
        generator = torch.Generator().manual_seed(seed)
        local = {k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in self.received.items()}
        if quant:
            arrays = quantized_update(local, self.received, QUANT_CONFIG, self.state, seed)
        else:
            arrays = ArrayRecord(local)
        metrics = MetricRecord({"train_loss": 0.1, "num-examples": 10})
        return reply(RecordDict({"arrays": arrays, "metrics": metrics}), self.node)


def _train_round(strategy, server_round, global_arrays, clients, nodes, quant=False, fail=()):
    """One training round among ``nodes``: each decodes its message, trains (``fail``: raises), replies."""
    messages = list(strategy.configure_train(server_round, global_arrays, ConfigRecord(), FakeGrid(nodes)))
    replies, forms = [], {}
    for message in messages:
        client = clients[message.metadata.dst_node_id]
        forms[client.node] = "delta" if is_quantized(message.content["arrays"]) else "full"
        client.receive(message)
        if client.node in fail:
            replies.append(Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "boom"), reply_to=message))
        else:
            replies.append(client.train_reply(server_round * 100 + client.node, quant))
    arrays, _ = strategy.aggregate_train(server_round, replies)
    return arrays, messages, forms


def _same(received: dict[str, torch.Tensor], record: ArrayRecord) -> bool:
    return all(np.array_equal(received[n].numpy(), a.numpy()) for n, a in record.items())


def test_int8_delta_views_agree_bit_for_bit_and_a_node_that_missed_a_round_gets_full_weights():
    model = _state(0)
    clients = {node: Client(node, _state(1)) for node in (1, 2, 3)}
    strategy = _strategy()
    arrays = ArrayRecord(model)
    # Round 2 samples node 3 out; it is back in round 3.
    plan = {1: (1, 2, 3), 2: (1, 2), 3: (1, 2, 3), 4: (1, 2, 3)}
    expected_forms = {
        1: {1: "full", 2: "full", 3: "full"},  # nobody holds a view yet
        2: {1: "delta", 2: "delta"},
        3: {1: "delta", 2: "delta", 3: "full"},  # node 3 missed round 2
        4: {1: "delta", 2: "delta", 3: "delta"},
    }
    previous_view = None
    for server_round, nodes in plan.items():
        weights = {n: a.numpy() for n, a in arrays.items()}
        new, messages, forms = _train_round(strategy, server_round, arrays, clients, nodes)
        assert forms == expected_forms[server_round]
        view = strategy._base_arrays
        for node in nodes:  # every node starts from the server's view, bit for bit, whatever its form
            assert _same(clients[node].received, view)
            assert clients[node].state[VIEW_KEY].keys() == view.keys()
        assert view_hash({n: a.numpy() for n, a in view.items()}) == strategy.downlink.view_hash
        # The view is within one change's quantization step of the model: the error does not pile up.
        for name, w in weights.items():
            change = np.abs(w - previous_view[name]).max() if previous_view else 0.0
            assert np.abs(view[name].numpy() - w).max() <= change / 254 * 1.001 + 1e-12, (server_round, name)
        # Bytes: what each message carried, the full ones included.
        full, delta = (
            [message_nbytes(m) for m in messages if forms[m.metadata.dst_node_id] == kind]
            for kind in ("full", "delta")
        )
        assert strategy.round_log[server_round]["downlink_bytes"] == sum(full) + sum(delta)
        if full and delta:  # (this micro model's npy headers weigh; a UNet's ratio is below)
            assert min(full) > 3 * max(delta)
        previous_view = {n: a.numpy() for n, a in view.items()}
        arrays = new


def test_every_node_rebuilds_the_initial_model_so_round_1_sends_its_change():
    model = _state(0)
    initial = {n: t.numpy() for n, t in model.items()}
    clients = {node: Client(node, _state(1)) for node in (1, 2, 3)}
    for client in clients.values():
        client.initial = lambda: initial
    full_message = next(
        iter(_strategy().configure_train(1, ArrayRecord(model), ConfigRecord(), FakeGrid([1])))
    )
    strategy = _strategy()
    strategy.downlink.hold_initial(initial)
    arrays, messages, forms = _train_round(strategy, 1, ArrayRecord(model), clients, (1, 2, 3))
    assert forms == {1: "delta", 2: "delta", 3: "delta"}
    assert {int(m.content["config"]["downlink-base-round"]) for m in messages} == {0}
    for client in clients.values():  # each decoded the server's view from the model it rebuilt
        assert _same(client.received, strategy._base_arrays)
    assert max(message_nbytes(m) for m in messages) * 3 < message_nbytes(full_message)
    # From round 2 on, as before: the nodes that trained hold round 1's view; a new one gets weights.
    clients[4] = Client(4, _state(1))
    _, _, forms = _train_round(strategy, 2, arrays, clients, (1, 4))
    assert forms == {1: "delta", 4: "full"}


def test_an_initial_model_the_client_rebuilds_differently_is_refused():
    strategy = _strategy()
    strategy.downlink.hold_initial({n: t.numpy() for n, t in _state(0).items()})
    (message,) = strategy.configure_train(1, ArrayRecord(_state(0)), ConfigRecord(), FakeGrid([1]))
    client = Client(1, _state(1))
    with pytest.raises(DownlinkMismatchError, match="cannot rebuild"):
        client.receive(message)
    client.initial = lambda: {n: t.numpy() for n, t in _state(2).items()}  # another torch, another init
    with pytest.raises(DownlinkMismatchError, match="initial model rebuilt from the run's seed has hash"):
        client.receive(message)


def test_a_node_whose_training_failed_or_that_is_new_gets_full_weights():
    clients = {node: Client(node, _state(1)) for node in (1, 2, 3, 4)}
    strategy = _strategy()
    arrays, _, _ = _train_round(strategy, 1, ArrayRecord(_state(0)), clients, (1, 2, 3), fail=(2,))
    arrays, _, forms = _train_round(strategy, 2, arrays, clients, (1, 2, 3, 4))
    assert forms == {1: "delta", 2: "full", 3: "delta", 4: "full"}
    # After a resume the strategy is new: every node gets full weights in its first round.
    resumed = _strategy()
    resumed.load_state_dict({"rounds_done": 2})
    _, _, forms = _train_round(resumed, 1, arrays, clients, (1, 2, 3, 4))
    assert set(forms.values()) == {"full"}


def test_a_change_against_a_view_the_client_does_not_hold_is_refused_with_a_clear_error():
    clients = {node: Client(node, _state(1)) for node in (1, 2)}
    strategy = _strategy()
    arrays, _, _ = _train_round(strategy, 1, ArrayRecord(_state(0)), clients, (1, 2))
    (to_one, to_two) = strategy.configure_train(2, arrays, ConfigRecord(), FakeGrid([1, 2]))
    assert is_quantized(to_one.content["arrays"]) and BASE_HASH_KEY in to_one.content["config"]
    # Node 1's kept view was altered (one value): the base hash no longer matches.
    kept = {n: a.numpy().copy() for n, a in clients[1].state[VIEW_KEY].items()}
    name = next(iter(kept))
    kept[name].flat[0] += 1.0
    clients[1].state[VIEW_KEY] = to_record(kept)
    with pytest.raises(
        DownlinkMismatchError, match=r"change since the model of round 1 .* holds the model of round 1"
    ):
        clients[1].receive(to_one)
    # Node 2 lost its state (a restarted SuperNode).
    kept_two, clients[2].state = clients[2].state, RecordDict()
    with pytest.raises(DownlinkMismatchError, match="holds no model from an earlier round"):
        clients[2].receive(to_two)
    # A message whose arrays decode to another model than the server's view.
    fresh = Client(3, _state(1))
    fresh.state = RecordDict({VIEW_KEY: ArrayRecord(_state(0))})
    tampered = Message(
        content=RecordDict({"arrays": ArrayRecord(_state(2)), "config": to_two.content["config"]}),
        dst_node_id=3,
        message_type="train",
    )
    with pytest.raises(DownlinkMismatchError, match="server's has"):
        fresh.receive(tampered)
    # Node 1's error reply leaves it out of the holders: next round it gets full weights.
    clients[2].state = kept_two
    clients[2].receive(to_two)
    failed = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "mismatch"), reply_to=to_one)
    arrays, _ = strategy.aggregate_train(2, [failed, clients[2].train_reply(7)])
    _, _, forms = _train_round(strategy, 3, arrays, clients, (1, 2))
    assert forms == {1: "full", 2: "delta"}


def test_evaluation_leaves_the_view_as_it_was():
    clients = {node: Client(node, _state(1)) for node in (1, 2, 3)}
    strategy = _strategy()
    arrays, _, _ = _train_round(strategy, 1, ArrayRecord(_state(0)), clients, (1, 2))
    held, held_hash = strategy.downlink.view, strategy.downlink.view_hash
    before = {n: a.numpy().copy() for n, a in clients[1].state[VIEW_KEY].items()}
    messages = list(strategy.configure_evaluate(1, arrays, ConfigRecord(), FakeGrid([1, 3])))
    forms = {m.metadata.dst_node_id: is_quantized(m.content["arrays"]) for m in messages}
    assert forms == {1: True, 3: False}  # a holder gets the change, node 3 the weights
    evaluated = {
        m.metadata.dst_node_id: clients[m.metadata.dst_node_id].receive(m, keep=False) for m in messages
    }
    assert all(torch.equal(evaluated[1][n], evaluated[3][n]) for n in evaluated[1])  # one model for all
    assert strategy.downlink.view is held and strategy.downlink.view_hash == held_hash
    assert all(np.array_equal(clients[1].state[VIEW_KEY][n].numpy(), before[n]) for n in before)
    assert VIEW_KEY not in clients[3].state
    _, _, forms = _train_round(strategy, 2, arrays, clients, (1, 2, 3))  # node 1's base still matches
    assert forms == {1: "delta", 2: "delta", 3: "full"}


def test_int8_weights_are_decoded_by_every_client_and_evaluated_alike():
    clients = {node: Client(node, _state(1)) for node in (1, 2)}
    strategy = _strategy("int8_weights")
    arrays, messages, forms = _train_round(strategy, 1, ArrayRecord(_state(0)), clients, (1, 2))
    assert set(forms.values()) == {"delta"}  # codes (of the weights) for everyone, every round
    assert all(_same(c.received, strategy._base_arrays) for c in clients.values())
    assert all(VIEW_KEY not in c.state for c in clients.values())  # nothing kept between rounds
    (evaluation,) = strategy.configure_evaluate(1, arrays, ConfigRecord(), FakeGrid([1]))
    assert is_quantized(evaluation.content["arrays"])


def test_quant_with_int8_delta_applies_the_mean_update_to_the_clients_view():
    clients = {node: Client(node, _state(1)) for node in (1, 2)}
    strategy = _strategy(name="quant")
    arrays, _, _ = _train_round(strategy, 1, ArrayRecord(_state(0)), clients, (1, 2), quant=True)
    new, messages, forms = _train_round(strategy, 2, arrays, clients, (1, 2), quant=True)
    assert forms == {1: "delta", 2: "delta"}
    view = strategy._base_arrays.to_torch_state_dict()
    replies = [clients[n].train_reply(200 + n, quant=True) for n in (1, 2)]  # what round 2 decoded
    reference = {n: (tuple(t.shape), "float32") for n, t in view.items()}
    updates = [decode_arrays(r.content["arrays"], reference) for r in replies]
    for name, tensor in new.to_torch_state_dict().items():
        expected = view[name].numpy() + 0.5 * updates[0][name] + 0.5 * updates[1][name]
        np.testing.assert_allclose(tensor.numpy(), expected, rtol=1e-6, atol=1e-7)


def test_partial_udec_with_int8_delta_sends_the_change_of_the_shared_parts():
    strategy = _strategy(name="partial", preset="udec", shared=None, split_ways=2, quantize=True)
    model = _state(0)
    clients = {node: Client(node, _state(1)) for node in (1, 2, 3)}
    arrays = ArrayRecord(model)
    for server_round, nodes in ((1, (1, 2)), (2, (1, 2, 3))):
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), FakeGrid(nodes)))
        replies = []
        for message in messages:
            client = clients[message.metadata.dst_node_id]
            received = received_arrays(
                message.content["arrays"], message.content["config"], client.model, client.state, keep=True
            )
            if client.node not in strategy.encoding._initialized:
                assert sorted(received.keys()) == sorted(model)  # first contact: the whole model
            weights = assemble(received, client.model, client.state)
            shared = strategy.encoding.shared_names
            base = strategy._base_arrays.to_torch_state_dict()
            assert all(torch.equal(weights[n], base[n]) for n in shared)  # the view, bit for bit
            assert sorted(client.state[VIEW_KEY].keys()) == sorted(shared)  # only what later changes touch
            client.received = {n: weights[n] for n in shared}
            keep_local_parts(weights, shared, client.state)
            replies.append(client.train_reply(server_round * 10 + client.node, quant=True))
        forms = {m.metadata.dst_node_id: is_quantized(m.content["arrays"]) for m in messages}
        if server_round == 2:
            assert forms == {1: True, 2: True, 3: False}
        arrays, _ = strategy.aggregate_train(server_round, replies)


def test_steady_state_int8_delta_downlink_is_at_least_3_9x_smaller_than_fp32():
    # The fashion_mnist UNet (6.8M parameters), as configured.
    cfg = compose_config(["model=fashion_mnist"])
    unet = build_unet(OmegaConf.to_container(cfg.model.unet), image_size=28, channels=1)
    model = unet.state_dict()
    strategy = _strategy()
    clients = {1: Client(1, model)}
    arrays, (first,), _ = _train_round(strategy, 1, ArrayRecord(model), clients, (1,))
    (second,) = strategy.configure_train(2, arrays, ConfigRecord(), FakeGrid([1]))
    assert is_quantized(second.content["arrays"])
    ratio = payload_nbytes(first.content["arrays"]) / payload_nbytes(second.content["arrays"])
    assert ratio >= 3.9, ratio
    assert strategy.round_log[2]["downlink_bytes"] == message_nbytes(second)


# -- the config check ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["strategy.downlink=int4"], r"strategy.downlink='int4' is not allowed: weights \| int8_weights"),
        (
            ["privacy=secagg", "strategy.downlink=int8_delta"],
            r"privacy=secagg works with strategy.downlink weights, not strategy.downlink=int8_delta: SecAgg\+",
        ),
        (
            ["privacy=dp_client", "strategy.downlink=int8_weights"],
            r"privacy=dp_client works with strategy.downlink weights, not strategy.downlink=int8_weights",
        ),
    ],
)
def test_a_downlink_that_cannot_work_is_refused_before_training(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(compose_config(overrides))


def test_every_strategy_takes_every_downlink():
    for strategy in ("vanilla", "prox", "quant", "partial", "fedddpm", "fedddpm_plus"):
        for mode in ("weights", "int8_weights", "int8_delta"):
            validate_config(compose_config([f"strategy={strategy}", f"strategy.downlink={mode}"]))
    validate_config(compose_config(["privacy=dp_server", "strategy.downlink=int8_delta"]))


def test_a_run_folder_with_quantize_downlink_resumes_with_int8_weights(tmp_path):
    from server_app.config import resumed_config, to_yaml

    old = OmegaConf.create(to_yaml(compose_config(["strategy=quant"])))
    old.strategy.pop("downlink")
    old.strategy.quantize_downlink = True
    (tmp_path / "config.yaml").write_text(to_yaml(old))
    cfg = resumed_config(tmp_path)
    assert cfg.strategy.downlink == "int8_weights" and "quantize_downlink" not in cfg.strategy
    validate_config(cfg)


# -- runs: the real ClientApp over an in-process grid ------------------------------------

RUNS = {
    "vanilla": [],
    "quant": ["strategy=quant", "strategy.error_feedback=true"],
    "partial_udec": ["strategy=partial", "strategy.preset=udec", "strategy.quantize=true"],
    "dp_server": ["privacy=dp_server", "privacy.noise_multiplier=0.1"],
}


def _recording(delivered: dict[int, list[tuple[int, bool, int]]]):
    """The ClientApp, noting each training message as delivered: round -> (node, a change?, bytes)."""

    def client(msg, context):
        if msg.metadata.message_type == "train":
            entry = (msg.metadata.dst_node_id, is_quantized(msg.content["arrays"]), message_nbytes(msg))
            delivered.setdefault(int(msg.content["config"]["server-round"]), []).append(entry)
        return _client(msg, context)

    return client


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(RUNS))
def test_sampled_int8_delta_runs_send_changes_to_last_rounds_clients_only(case, tmp_path, data_root):
    # 6 clients, 2 a round: most are drawn after sitting out, some twice in a row.
    sent: dict[int, list[tuple[int, bool, int]]] = {}
    grid = _grid(6, _recording(sent))
    overrides = ["num_rounds=5", "strategy.downlink=int8_delta", *RUNS[case]]
    rows = [r for r in _rows(_sampled_run(overrides, tmp_path / "run", grid)) if r["round"] > 0]
    assert [r["round"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(r["num_aggregated"] == 2 and np.isfinite(r["eval_loss"]) for r in rows)
    assert not any(m.has_error() for m in grid.received)  # every client agreed with the server's view
    # Each rebuilt the initial model from the seed; UDec's nodes first get the whole model in fp32
    # (the start of the parts they keep), as a node new to a partial exchange always does.
    assert [delta for _, delta, _ in sent[1]] == [case != "partial_udec"] * 2
    forms = {True: 0, False: 0}
    for server_round in range(2, 6):
        trained_before = {node for node, _, _ in sent[server_round - 1]}
        for node, delta, _ in sent[server_round]:
            assert delta == (node in trained_before), (server_round, node)
            forms[delta] += 1
    assert forms[True] and forms[False]  # seeded draw: both forms occur
    for server_round, row in zip(range(1, 6), rows):
        assert row["downlink_bytes"] == sum(nbytes for _, _, nbytes in sent[server_round])


@pytest.mark.slow
def test_after_a_resume_every_client_gets_full_weights_then_changes(tmp_path, data_root):
    overrides = ["num_rounds=4", "clients_per_round=3", "strategy.downlink=int8_delta"]

    def failing(msg, context):  # every client fails in round 3: the run stops after round 2
        if msg.metadata.message_type == "train" and int(msg.content["config"]["server-round"]) == 3:
            raise RuntimeError("injected failure")
        return _client(msg, context)

    stopped = tmp_path / "stopped"
    with pytest.raises(RoundFailedError, match="injected failure"):
        _sampled_run(overrides, stopped, _grid(4, failing), clients=4)
    sent: dict[int, list[tuple[int, bool, int]]] = {}
    grid = _grid(4, _recording(sent), first_node=300)  # other node ids after the restart
    rows = _rows(run_federation(grid, compose_config([f"resume={stopped}"])))
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert sorted(sent) == [3, 4]
    assert not any(delta for _, delta, _ in sent[3])  # no view survives a resume
    trained = {node for node, _, _ in sent[3]}
    assert [delta for node, delta, _ in sent[4]] == [node in trained for node, _, _ in sent[4]]
    assert any(delta for _, delta, _ in sent[4])
    assert not any(m.has_error() for m in grid.received)
