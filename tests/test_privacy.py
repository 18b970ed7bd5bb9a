"""Central DP with fixed clipping: clipping of each update, noise on the mean, the client mod."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from strategies import build_strategy
from strategies.privacy import KEY_CLIPPING_NORM
from tests.conftest import reply
from tests.test_strategies import FakeGrid

pytestmark = pytest.mark.usefixtures("flower_task_identity")

GLOBAL = {"a": np.zeros((2, 3), np.float32), "b": np.zeros(4, np.float32)}


def _record(arrays):
    return ArrayRecord({k: Array(np.asarray(v, np.float32)) for k, v in arrays.items()})


def _reply(arrays, node):
    return reply(
        RecordDict(
            {"arrays": _record(arrays), "metrics": MetricRecord({"train_loss": 1.0, "num-examples": 10})}
        ),
        node,
    )


def _norm(arrays):
    return float(np.sqrt(sum(np.sum(np.square(v)) for v in arrays.values())))


def _dp(mode, noise=0.0, clip=1.0, strategy="vanilla", clients=2):
    privacy = {"name": mode, "clipping_norm": clip, "noise_multiplier": noise}
    extra = {"mu": 0.1} if strategy == "prox" else {}
    return build_strategy({"name": strategy, **extra}, num_clients=clients, privacy=privacy)


def test_server_side_dp_clips_each_update_before_the_mean():
    strategy = _dp("dp_server", clip=1.0)
    strategy.configure_train(1, _record(GLOBAL), ConfigRecord(), FakeGrid([1, 2]))
    big = {"a": np.full((2, 3), 10.0), "b": np.full(4, 10.0)}
    small = {"a": np.full((2, 3), 0.01), "b": np.zeros(4)}
    arrays, _ = strategy.aggregate_train(1, [_reply(big, 1), _reply(small, 2)])
    mean = {k: v.numpy() for k, v in arrays.items()}
    # the big update is cut to norm 1 (direction kept), the small one passes unchanged
    expected_a = 0.5 * (10.0 / np.sqrt(10 * 100.0)) + 0.5 * 0.01
    np.testing.assert_allclose(mean["a"], expected_a, rtol=1e-5)
    assert _norm(mean) <= 1.0


def test_noise_on_the_mean_has_the_calibrated_std_for_the_replies_averaged():
    strategy = _dp("dp_server", noise=2.0, clip=0.5, clients=4)
    big = {"a": np.zeros((300, 300)), "b": np.zeros(4)}
    strategy.configure_train(1, _record(big), ConfigRecord(), FakeGrid([1, 2, 3, 4]))
    arrays, _ = strategy.aggregate_train(1, [_reply(big, n) for n in (1, 2, 3, 4)])
    assert np.std(arrays["a"].numpy()) == pytest.approx(2.0 * 0.5 / 4, rel=0.02)
    # one reply fewer: the mean is more sensitive to each, so more noise
    arrays, _ = strategy.aggregate_train(1, [_reply(big, n) for n in (1, 2, 3)])
    assert np.std(arrays["a"].numpy()) == pytest.approx(2.0 * 0.5 / 3, rel=0.02)


def test_client_side_dp_sends_the_clipping_norm_and_prox_keeps_its_mu():
    strategy = _dp("dp_client", clip=0.3, strategy="prox")
    (message, _) = strategy.configure_train(1, _record(GLOBAL), ConfigRecord(), FakeGrid([1, 2]))
    config = message.content["config"]
    assert config[KEY_CLIPPING_NORM] == 0.3 and config["proximal-mu"] == 0.1
    clipped = {"a": np.full((2, 3), 0.1), "b": np.zeros(4)}  # norm 0.245
    unclipped = {"a": np.ones((2, 3)), "b": np.ones(4)}  # a client without the clipping mod
    arrays, _ = strategy.aggregate_train(1, [_reply(clipped, 1), _reply(unclipped, 2)])
    assert strategy.round_log[1]["num_rejected"] == 1
    np.testing.assert_allclose(arrays["a"].numpy(), 0.1, rtol=1e-6)


def test_malformed_replies_are_left_out_before_clipping():
    strategy = _dp("dp_server")
    strategy.configure_train(1, _record(GLOBAL), ConfigRecord(), FakeGrid([1, 2]))
    bad = {"a": np.zeros((3, 2)), "b": np.zeros(4)}
    arrays, _ = strategy.aggregate_train(1, [_reply(bad, 1), _reply(GLOBAL, 2)])
    assert strategy.round_log[1]["num_rejected"] == 1 and arrays is not None


def test_dp_is_refused_for_strategies_that_do_not_send_full_weights():
    with pytest.raises(ValueError, match="vanilla | prox"):
        build_strategy(
            {
                "name": "quant",
                "bits": 8,
                "granularity": "channel",
                "stochastic_rounding": False,
                "error_feedback": False,
                "downlink": "weights",
            },
            num_clients=2,
            privacy={"name": "dp_server", "clipping_norm": 1.0, "noise_multiplier": 0.0},
        )
