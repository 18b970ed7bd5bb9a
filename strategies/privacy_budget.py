"""The privacy a DP run has spent: client-level epsilon at a fixed delta, from Flower's RDP accountant.

Each training round of ``privacy=dp_server|dp_client`` releases one noisy mean:
the clipped updates' sum (each of L2 norm <= clipping_norm C) plus Gaussian
noise of std z · C, divided by the number of replies k (``strategies.privacy``).
That is the Gaussian mechanism with noise multiplier z = noise_multiplier for
one client's update added or removed (zeroed out), and a run of R rounds is its
R-fold composition. Flower 1.42's ``RdpAccountant`` (``flwr.serverapp``, backed
by Google's ``dp-accounting``: the ``flwr[dp]`` extra) composes it in Rényi DP and
converts it to (epsilon, delta).

No amplification by sampling is counted, even when only ``clients_per_round``
clients train: FedDM's draw is seeded from the run's ``seed`` and the round, and
``metrics.jsonl`` names the sampled partitions, so who took part is no secret,
and subsampling bounds assume it is. The epsilon is thus the one of a client
that takes part in every round: an upper bound for every client.

The bound holds only if one client's data moves the sum by at most C. Two
settings break that, and with them the run reports no epsilon (``null`` in
``metrics.jsonl``, the reason logged) and refuses a ``max_epsilon``:
``weighting=examples`` and the norm screen (``max_update_norm_ratio``). The
clients' losses (``train_loss``, ``eval_loss``) are sent in the clear and are
not covered, as in Flower's accountant.
"""

from __future__ import annotations

from collections.abc import Mapping
from logging import WARNING
from typing import Any

from flwr.supercore import log

STATE_KEY = "privacy_releases"  # noisy means released before the checkpoint, in the strategy's state


def guarantee_gap(
    privacy: Mapping[str, Any], weighting: str, max_update_norm_ratio: float | None
) -> str | None:
    """Why these settings give no epsilon (one line naming the settings), or None if the accountant covers them."""
    if float(privacy["noise_multiplier"]) <= 0:
        return "privacy.noise_multiplier=0 adds no noise, so epsilon is infinite"
    if weighting != "uniform":
        return (
            f"weighting={weighting} weighs replies by the num-examples they claim, so one client's clipped "
            "update moves the mean by up to clipping_norm x its share of the examples, not clipping_norm / k "
            "as the noise assumes; use weighting=uniform"
        )
    if max_update_norm_ratio is not None:
        return (
            f"max_update_norm_ratio={max_update_norm_ratio} leaves out replies by comparing them with the "
            "round's median, so one client's data decides whether other clients' updates are averaged (the "
            "sum moves by more than clipping_norm); set max_update_norm_ratio=null"
        )
    return None


class PrivacyBudgetSpent(RuntimeError):
    """The next round would take epsilon above ``privacy.max_epsilon``: the run ends after this round."""


class PrivacyBudget:
    """Epsilon spent by a DP run's rounds (Flower's ``RdpAccountant``), and the limit on it.

    Parameters
    ----------
    noise_multiplier : float
        z: the noise's std divided by the clipping norm (on the sum of the updates).
    num_clients : int
        Clients of the run (the accountant's population; no amplification is counted).
    delta : float
        The delta epsilon is reported at, in (0, 1).
    max_epsilon : float | None
        No round may take epsilon above this; None: no limit.
    no_guarantee : str | None
        Why the settings give no epsilon (``guarantee_gap``); then nothing is accounted.
    """

    def __init__(
        self,
        noise_multiplier: float,
        num_clients: int,
        delta: float = 1e-5,
        max_epsilon: float | None = None,
        no_guarantee: str | None = None,
    ) -> None:
        if no_guarantee and max_epsilon is not None:
            raise ValueError(f"privacy.max_epsilon={max_epsilon:g} cannot be kept: {no_guarantee}")
        self.noise_multiplier, self.delta = float(noise_multiplier), float(delta)
        self.max_epsilon = max_epsilon
        self.no_guarantee = no_guarantee
        self.releases = 0
        self._accountant = self._event = None
        if not no_guarantee:
            self._accountant, self._event = _flower_accountant(
                self.noise_multiplier, int(num_clients), self.delta
            )

    @classmethod
    def from_config(
        cls, privacy: Mapping[str, Any], num_clients: int, weighting: str, max_update_norm_ratio: float | None
    ) -> PrivacyBudget:
        """From the ``privacy=dp_*`` config and the reply checks' settings."""
        max_epsilon = privacy.get("max_epsilon")
        return cls(
            float(privacy["noise_multiplier"]),
            num_clients,
            delta=float(privacy.get("delta", 1e-5)),
            max_epsilon=None if max_epsilon is None else float(max_epsilon),
            no_guarantee=guarantee_gap(privacy, weighting, max_update_norm_ratio),
        )

    @property
    def epsilon(self) -> float | None:
        """Epsilon spent so far at ``delta`` (0 before any round); None without a guarantee."""
        if self._accountant is None:
            return None
        return self._accountant.get_epsilon(self.delta) if self.releases else 0.0

    def record_release(self) -> float | None:
        """Count one noisy mean (a finished round's aggregation); the epsilon spent after it."""
        self.releases += 1
        if self._accountant is not None:
            self._accountant.compose(self._event)
        return self.epsilon

    def allows_another_round(self) -> bool:
        """Whether one more round keeps epsilon within ``max_epsilon`` (always, without a limit)."""
        if self.max_epsilon is None or self._accountant is None:
            return True
        return not self._accountant.would_exceed(self._event, self.max_epsilon)

    def next_epsilon(self) -> float:
        """The epsilon one more round would reach (for the stop message)."""
        accountant, _ = _flower_accountant(self.noise_multiplier, self._event.population_size, self.delta)
        accountant.compose(self._event, self.releases + 1)
        return accountant.get_epsilon(self.delta)

    def stop_message(self, done_round: int) -> str:
        """Why the run ends after ``done_round``, with the figures."""
        return (
            f"privacy budget: after round {done_round} epsilon is {self.epsilon:.4g} at delta={self.delta:g}; "
            f"one more round would reach {self.next_epsilon():.4g} > privacy.max_epsilon={self.max_epsilon:g}, "
            "so the run stops here with its checkpoint and model"
        )

    def state_dict(self) -> dict[str, int]:
        """The releases so far, for the checkpoint (every release is the same event)."""
        return {STATE_KEY: self.releases}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue after a checkpoint's releases (checkpoints from before accounting: its rounds)."""
        releases = int(state.get(STATE_KEY, state.get("rounds_done", 0)))
        self.releases = 0
        if self._accountant is not None:
            self._accountant, _ = _flower_accountant(
                self.noise_multiplier, self._event.population_size, self.delta
            )
            if releases:
                self._accountant.compose(self._event, releases)
        self.releases = releases

    def summary(self) -> str:
        """One line for the start-up log."""
        if self.no_guarantee:
            return f"privacy accounting: no guarantee ({self.no_guarantee})"
        limit = "no limit" if self.max_epsilon is None else f"at most {self.max_epsilon:g}"
        return (
            f"privacy accounting: client-level epsilon at delta={self.delta:g} (RDP, noise multiplier "
            f"{self.noise_multiplier:g}, no sampling amplification), {limit}"
        )

    def warn_if_no_guarantee(self) -> None:
        """Say, once per run, why ``metrics.jsonl`` records ``epsilon: null``."""
        if self.no_guarantee:
            log(
                WARNING,
                "FedDM: epsilon is null in metrics.jsonl, no privacy guarantee: %s",
                self.no_guarantee,
            )


def _flower_accountant(noise_multiplier: float, num_clients: int, delta: float) -> tuple[Any, Any]:
    """Flower's ``RdpAccountant`` and the event of one round: Gaussian, z = ``noise_multiplier``, no amplification.

    The import is here because the accountant needs the optional ``dp-accounting``
    package; the error says how to install it.
    """
    try:
        from flwr.serverapp import (
            GaussianPrivacyEvent,
            NeighboringRelation,
            PrivacyConfig,
            RdpAccountant,
            SamplingMethod,
        )

        accountant = RdpAccountant(
            PrivacyConfig(
                target_delta=delta,
                population_size=num_clients,
                neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                sampling_method=SamplingMethod.NO_AMPLIFICATION,
            )
        )
    except ImportError as err:
        raise ImportError(
            "privacy=dp_server|dp_client accounts epsilon with Flower's RdpAccountant, which needs the "
            "dp-accounting package: pip install 'feddm[dp]' (or 'flwr[dp]')"
        ) from err
    # Without amplification the sample size is only reported; every client counts as taking part.
    return accountant, GaussianPrivacyEvent(noise_multiplier, num_clients, num_clients)
