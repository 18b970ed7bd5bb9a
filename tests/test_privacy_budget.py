"""Privacy accounting of central DP: epsilon against the Gaussian mechanism's RDP, the limit, refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from server_app.config import ConfigError, compose_config, validate_config
from strategies import build_strategy
from strategies.privacy_budget import PrivacyBudget, guarantee_gap

DP = {"name": "dp_server", "clipping_norm": 1.0, "noise_multiplier": 1.0, "delta": 1e-5, "max_epsilon": None}


def gaussian_epsilon(z: float, rounds: int, delta: float) -> float:
    """Epsilon of ``rounds`` Gaussian mechanisms with noise multiplier z, from their RDP, by hand.

    RDP of one round at order a is a / (2 z^2) (Mironov 2017, Prop. 7), composed by
    adding; the conversion to (epsilon, delta) is Canonne, Kamath and Steinke 2020
    (Prop. 12): rdp + log((a - 1) / a) - (log delta + log a) / (a - 1), minimised over a.
    The orders are a fine grid, so the minimum is within 1e-3 of the true one.
    """
    orders = np.arange(1.01, 64.0, 0.01)
    rdp = rounds * orders / (2 * z**2)
    return float(
        np.min(rdp + np.log((orders - 1) / orders) - (np.log(delta) + np.log(orders)) / (orders - 1))
    )


@pytest.fixture
def accountant():
    """Skips where the accountant's package is missing (CI installs it with '.[test]')."""
    pytest.importorskip("dp_accounting", reason="the accountant needs the dp extra: pip install 'feddm[dp]'")


@pytest.mark.parametrize(("z", "rounds"), [(1.0, 10), (1.0, 1), (2.0, 50), (0.7, 3)])
def test_epsilon_is_the_gaussian_mechanisms_composed_in_rdp(z, rounds, accountant):
    budget = PrivacyBudget(z, num_clients=5, delta=1e-5)
    assert budget.epsilon == 0.0
    for _ in range(rounds):
        epsilon = budget.record_release()
    # The library evaluates a coarser set of orders: its bound is at most 2 % above the fine grid's.
    expected = gaussian_epsilon(z, rounds, 1e-5)
    assert expected - 1e-6 <= epsilon <= expected * 1.02
    # ... and below the classic conversion rdp + log(1/delta) / (a - 1) (Mironov 2017, Prop. 3).
    classic = min(rounds * a / (2 * z**2) + math.log(1e5) / (a - 1) for a in np.arange(1.01, 64, 0.01))
    assert epsilon < classic


def test_reference_value_z1_ten_rounds(accountant):
    # z = 1, 10 rounds, delta = 1e-5: order 2.5 gives 12.5 + log(0.6) + (log(1e5) - log(2.5)) / 1.5 = 19.0536.
    budget = PrivacyBudget(1.0, num_clients=3, delta=1e-5)
    for _ in range(10):
        budget.record_release()
    assert budget.epsilon == pytest.approx(19.0536, abs=1e-4)


def test_epsilon_grows_and_the_limit_stops_before_it_is_passed(accountant):
    probe = PrivacyBudget(1.0, num_clients=4)
    eps = [probe.record_release() for _ in range(3)]
    assert eps[0] < eps[1] < eps[2]
    budget = PrivacyBudget(1.0, num_clients=4, max_epsilon=(eps[1] + eps[2]) / 2)
    assert budget.allows_another_round()
    budget.record_release()
    assert budget.allows_another_round()  # round 2 stays within the limit
    budget.record_release()
    assert not budget.allows_another_round()  # round 3 would pass it
    assert budget.epsilon == pytest.approx(eps[1])
    message = budget.stop_message(2)
    assert "round 2" in message and f"{eps[2]:.4g}" in message and "max_epsilon" in message


def test_a_resumed_run_continues_its_epsilon(accountant):
    budget = PrivacyBudget(1.5, num_clients=4)
    for _ in range(4):
        budget.record_release()
    resumed = PrivacyBudget(1.5, num_clients=4)
    resumed.load_state_dict({"rounds_done": 4, **budget.state_dict()})
    assert resumed.epsilon == pytest.approx(budget.epsilon)
    assert resumed.record_release() > budget.epsilon


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"weighting": "examples", "max_update_norm_ratio": None}, "weighting=examples"),
        ({"weighting": "uniform", "max_update_norm_ratio": 10.0}, "max_update_norm_ratio=10.0"),
        ({"weighting": "uniform", "max_update_norm_ratio": None, "noise": 0.0}, "noise_multiplier=0"),
    ],
)
def test_settings_the_accountant_does_not_cover_give_no_epsilon(settings, named):
    privacy = {**DP, "noise_multiplier": settings.get("noise", 1.0)}
    gap = guarantee_gap(privacy, settings["weighting"], settings["max_update_norm_ratio"])
    assert gap and named in gap
    budget = PrivacyBudget.from_config(privacy, 4, settings["weighting"], settings["max_update_norm_ratio"])
    assert budget.record_release() is None and budget.allows_another_round()  # "no guarantee", never a number
    with pytest.raises(ValueError, match="max_epsilon"):
        PrivacyBudget.from_config(
            {**privacy, "max_epsilon": 3.0}, 4, settings["weighting"], settings["max_update_norm_ratio"]
        )


def test_uniform_weighting_without_the_norm_screen_is_covered():
    assert guarantee_gap(DP, "uniform", None) is None


@pytest.mark.parametrize(
    ("overrides", "other"),
    [
        (["privacy=dp_server", "privacy.max_epsilon=5", "max_update_norm_ratio=null"], "weighting=examples"),
        (["privacy=dp_client", "privacy.max_epsilon=5", "weighting=uniform"], "max_update_norm_ratio=10.0"),
    ],
)
def test_a_limit_the_accountant_cannot_keep_is_refused_before_training(overrides, other):
    with pytest.raises(ConfigError) as err:
        validate_config(compose_config(overrides))
    assert "privacy.max_epsilon=5" in str(err.value) and other in str(err.value)


def test_a_covered_limit_passes_the_config_check():
    validate_config(
        compose_config(
            ["privacy=dp_server", "privacy.max_epsilon=5", "weighting=uniform", "max_update_norm_ratio=null"]
        )
    )


def test_the_strategy_carries_the_budget(accountant):
    from strategies.reply_checks import ReplyChecks

    strategy = build_strategy(
        {"name": "vanilla"},
        num_clients=3,
        privacy={**DP, "max_epsilon": 40.0},
        reply_checks=ReplyChecks(weighting="uniform", max_update_norm_ratio=None),
    )
    assert strategy.privacy_budget.max_epsilon == 40.0 and strategy.privacy_budget.no_guarantee is None
    assert build_strategy({"name": "vanilla"}, num_clients=3).privacy_budget is None
