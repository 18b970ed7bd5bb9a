"""The aggregator layer (``aggregator=``): each Flower class's result against a hand computation,
server optimizer state in the strategy's state_dict, int8 replies as whole models, and refused
combinations."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord

from server_app.config import ConfigError, compose_config, validate_config
from strategies import AGGREGATORS, build_strategy, composition_errors
from tests.test_strategies import GLOBAL, FakeGrid, _record, _train_reply

pytestmark = pytest.mark.usefixtures("flower_task_identity")

QUANT = dict(compose_config(["strategy=quant"]).strategy)


def _filled(value: float) -> dict[str, np.ndarray]:
    return {name: np.full(a.shape, value, np.float32) for name, a in GLOBAL.items()}


def _round(strategy, server_round, global_value, reply_values, examples=None):
    """One round from a global model filled with ``global_value``; replies filled with ``reply_values``."""
    nodes = list(range(1, len(reply_values) + 1))
    strategy.configure_train(server_round, _record(_filled(global_value)), ConfigRecord(), FakeGrid(nodes))
    examples = examples or [10] * len(reply_values)
    replies = [_train_reply(_filled(v), n, i + 1) for i, (v, n) in enumerate(zip(reply_values, examples))]
    arrays, _ = strategy.aggregate_train(server_round, replies)
    return arrays


def _value(arrays) -> float:
    values = np.concatenate([a.numpy().ravel() for a in arrays.values()])
    assert np.allclose(values, values[0], rtol=0, atol=1e-6), values
    assert all(a.numpy().dtype == np.float32 for a in arrays.values())  # optimizers compute in float64
    return float(values[0])


def _build(aggregator, strategy=None, clients=2):
    return build_strategy(strategy or {"name": "vanilla"}, num_clients=clients, aggregator=aggregator)


def test_fedavgm_is_sgd_with_momentum_on_the_mean_update():
    strategy = _build({"name": "fedavgm", "server_learning_rate": 0.5, "server_momentum": 0.9})
    # round 1: mean 2, pseudo-gradient 0 - 2 = -2, momentum -2, w = 0 - 0.5 * -2 = 1
    assert _value(_round(strategy, 1, 0.0, [1.0, 3.0])) == pytest.approx(1.0)
    # round 2: mean 2, pseudo-gradient 1 - 2 = -1, momentum 0.9 * -2 - 1 = -2.8, w = 1 + 1.4
    assert _value(_round(strategy, 2, 1.0, [2.0, 2.0])) == pytest.approx(2.4)


def test_fedadam_is_adam_on_the_mean_update():
    eta, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    strategy = _build({"name": "fedadam", "eta": eta, "beta_1": b1, "beta_2": b2, "tau": tau})
    delta = 2.0  # mean 2 - global 0
    m, v = (1 - b1) * delta, (1 - b2) * delta**2
    eta_norm = eta * np.sqrt(1 - b2**2) / (1 - b1**2)  # Flower's bias correction at server round 1
    assert _value(_round(strategy, 1, 0.0, [1.0, 3.0])) == pytest.approx(eta_norm * m / (np.sqrt(v) + tau))


def test_robust_aggregators_ignore_the_outlier():
    median = _build({"name": "median"}, clients=3)
    # (outliers within max_update_norm_ratio of the median norm, so the reply checks keep them)
    assert _value(_round(median, 1, 0.0, [1.0, 5.0, 40.0], examples=[1, 1, 1000])) == 5.0
    trimmed = _build({"name": "trimmed_mean", "beta": 0.2}, clients=5)
    assert _value(_round(trimmed, 1, 0.0, [1.0, 2.0, 3.0, 4.0, 25.0])) == pytest.approx(3.0)
    # Krum, f = 1, n = 5: scores over the n - f - 2 = 2 nearest; 0.3 has the smallest (0.0025 + 0.04)
    krum = _build({"name": "krum", "num_malicious_nodes": 1}, clients=5)
    assert _value(_round(krum, 1, 0.0, [0.0, 0.1, 0.3, 0.35, 2.5])) == pytest.approx(0.3)
    # Multi-Krum, m = 2: the two best scores, 0.3 (0.0425) and 0.1 (0.05), averaged
    multikrum = _build({"name": "multikrum", "num_malicious_nodes": 1, "num_nodes_to_select": 2}, clients=5)
    assert _value(_round(multikrum, 1, 0.0, [0.0, 0.1, 0.3, 0.35, 2.5])) == pytest.approx(0.2)


def test_server_sgd_without_momentum_at_rate_one_is_fedavg_also_with_int8_replies():
    plain = {"name": "fedavgm", "server_learning_rate": 1.0, "server_momentum": 0.0}
    for strategy in ({"name": "vanilla"}, QUANT):
        fedavg, fedavgm = _build(None, strategy), _build(plain, strategy)
        assert fedavgm.encoding.__class__ is fedavg.encoding.__class__
        for s in (fedavg, fedavgm):
            s.configure_train(1, _record(GLOBAL), ConfigRecord(), FakeGrid([1, 2]))
        if strategy is QUANT:  # an int8 update, decoded to w' + Δ for the optimizer
            assert fedavgm.encoding.whole_models and not fedavg.encoding.whole_models
            replies = _quant_replies()
        else:
            replies = [_train_reply(_filled(1.0), 10, 1), _train_reply(_filled(3.0), 30, 2)]
        a, _ = fedavg.aggregate_train(1, replies)
        b, _ = fedavgm.aggregate_train(1, replies)
        for name in GLOBAL:
            np.testing.assert_allclose(a[name].numpy(), b[name].numpy(), rtol=0, atol=1e-6)


def _quant_replies():
    from strategies.codec import encode_arrays

    replies = []
    for node, value in ((1, 0.5), (2, -0.25)):
        record, _ = encode_arrays(_filled(value), bits=8, granularity="channel")
        replies.append(_train_reply({n: a.numpy() for n, a in record.items()}, 10, node))
    return replies


def test_a_server_optimizers_state_round_trips_through_state_dict():
    adam = {"name": "fedadam", "eta": 0.1, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}
    live = _build(adam)
    _round(live, 1, 0.0, [1.0, 3.0])
    state = live.state_dict()
    assert {k for k in state if k.startswith("aggregator.")} == {
        f"aggregator.{moment}.{name}" for moment in ("m_t", "v_t") for name in GLOBAL
    }
    assert all(isinstance(state[k], torch.Tensor) for k in state if k.startswith("aggregator."))
    restored = _build(adam)
    restored.load_state_dict(state)
    # Flower counts from 1 again after a resume; the strategy adds the rounds done
    a, b = _round(live, 2, 0.5, [1.0, 2.0]), _round(restored, 1, 0.5, [1.0, 2.0])
    assert _value(a) == _value(b)
    momentum = _build({"name": "fedavgm", "server_learning_rate": 1.0, "server_momentum": 0.9})
    _round(momentum, 1, 0.0, [1.0, 3.0])
    assert sorted(k for k in momentum.state_dict() if k.startswith("aggregator.")) == [
        "aggregator.momentum_vector.00000",
        "aggregator.momentum_vector.00001",
    ]


@pytest.mark.parametrize(
    ("strategy", "privacy", "aggregator", "named"),
    [
        ("partial", "none", "fedavgm", ["strategy=partial", "aggregator=fedavgm"]),
        ("vanilla", "secagg", "median", ["privacy=secagg", "aggregator=median"]),
        ("vanilla", "dp_server", "fedadam", ["privacy=dp_server", "aggregator=fedadam"]),
        ("vanilla", "dp_client", "krum", ["privacy=dp_client", "aggregator=krum"]),
    ],
)
def test_a_combination_that_cannot_work_fails_before_training(strategy, privacy, aggregator, named):
    (error,) = composition_errors(strategy, privacy, aggregator)
    assert all(choice in error for choice in named)
    overrides = [f"strategy={strategy}", f"privacy={privacy}", f"aggregator={aggregator}", "num_clients=5"]
    with pytest.raises(ConfigError) as err:
        validate_config(compose_config(overrides))
    assert all(choice in str(err.value) for choice in named)


def test_every_aggregator_composes_with_every_strategy_that_takes_it():
    for name in AGGREGATORS:
        for strategy in ("vanilla", "prox", "quant", "fedddpm"):
            validate_config(compose_config([f"aggregator={name}", f"strategy={strategy}", "num_clients=7"]))
    assert composition_errors("vanilla", "secagg", "fedadam") == []  # the unmasked mean steps the optimizer


def test_byzantine_counts_must_fit_the_rounds_clients():
    with pytest.raises(ConfigError, match="aggregator.num_malicious_nodes=1.*needs >= 7"):
        validate_config(
            compose_config(["aggregator=bulyan", "aggregator.num_malicious_nodes=1", "num_clients=6"])
        )
    with pytest.raises(ConfigError, match="aggregator.num_nodes_to_select=3"):
        validate_config(compose_config(["aggregator=multikrum", "aggregator.num_nodes_to_select=3"]))


@pytest.mark.slow
def test_a_robust_aggregator_trains_with_int8_updates_in_a_real_run(tmp_path, data_root):
    # The ServerApp's run and the ClientApp's functions, over an in-process grid (no Ray start);
    # fedadam with int8 updates runs the same way in tests/test_resume_strategies.py.
    from tests.conftest import MICRO_OVERRIDES
    from tests.test_resume_strategies import _run

    overrides = [*MICRO_OVERRIDES, "num_clients=3", "strategy=quant", "aggregator=median"]
    run_dir = _run(compose_config(overrides), tmp_path / "run", clients=3)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and all(r["num_aggregated"] == 3 for r in rows)
    assert all(np.isfinite(r["eval_loss"]) for r in rows)


def test_an_aggregator_that_makes_no_model_stops_the_run_instead_of_skipping_rounds():
    # Bulyan with f = 1 needs 7 replies; with 5 Flower logs a warning and returns nothing, which
    # would leave the model untrained round after round.
    from strategies import RoundFailedError

    bulyan = _build({"name": "bulyan", "num_malicious_nodes": 1}, clients=5)
    with pytest.raises(RoundFailedError, match="round 1: Bulyan made no model from the 5 accepted replies"):
        _round(bulyan, 1, 0.0, [1.0, 1.1, 1.2, 1.3, 1.4])


def _attacked_run(cfg, run_dir, attack: str | None, clients: int = 4):
    """``run_federation`` over 4 in-process clients (the real ClientApp functions); partition 1 attacks."""
    from client_app.app import evaluate, train
    from feddm.attacks import attacking_client
    from feddm.local_grid import LocalGrid
    from server_app.federation import run_federation

    def honest(msg, context):
        return (evaluate if msg.metadata.message_type == "evaluate" else train)(msg, context)

    grid = LocalGrid(range(1, clients + 1), attacking_client(honest, attack, [1]) if attack else honest)
    for partition, context in enumerate(grid.contexts.values()):
        context.node_config.update({"partition-id": partition, "num-partitions": clients})
    run_federation(grid, cfg, run_dir)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize(("attack", "aggregator"), [("flip_update", "median"), ("scale_update", "krum")])
def test_an_update_attack_under_a_robust_aggregator_leaves_the_run_as_without_it(
    attack, aggregator, tmp_path, data_root
):
    # 4 clients, one flipping its update's sign (or scaling it 100x, with the norm check off so that
    # only the aggregator stands in the way): the model stays finite, the held-out loss within 10 %.
    from tests.conftest import MICRO_OVERRIDES

    overrides = [*MICRO_OVERRIDES, "num_clients=4", f"aggregator={aggregator}", "max_update_norm_ratio=null"]
    cfg = compose_config(overrides)
    clean = _attacked_run(cfg, tmp_path / "clean", None)
    attacked = _attacked_run(compose_config(overrides), tmp_path / "attacked", attack)
    assert all(r["num_aggregated"] == 4 for r in attacked)  # nothing left out: the aggregator copes
    assert attacked[-1]["eval_loss"] == pytest.approx(clean[-1]["eval_loss"], rel=0.1)
    assert all(np.isfinite(r["train_loss"]) and np.isfinite(r["eval_loss"]) for r in attacked)
