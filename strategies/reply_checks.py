"""Trust in client replies: checks of what a client claims and sends, beyond its format.

``strategies.accounting`` checks that a reply is well formed (names, shapes,
dtypes, finite values, a positive ``num-examples``). A well-formed reply can
still poison the average; the checks here bound what one reply can do:

* ``num-examples`` (the weight of a reply in the mean) must not exceed a bound
  (``max_num_examples``), so one client cannot outweigh the others at will and
  the sum of weights (bound × replies) stays finite; with ``weighting=uniform``
  every accepted reply counts once whatever it claims;
* the ``info`` record must name the client's partition as an integer;
* decoded values must lie within float32's range (no inf, |value| ≤ 3.4e38);
* the size of a reply's update, as the root mean square of w_client − w_global
  per value, must not exceed ``max_update_norm_ratio`` times the median of the
  round's replies (checked once at least ``MIN_REPLIES_FOR_NORM`` came in);
* the new global model must be finite, or the round fails naming its replies.

``strategies.strategy.FedDMStrategy`` runs them on every training reply and
leaves out (logged, counted in ``num_rejected``) the ones that fail.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

from strategies.accounting import NUM_EXAMPLES_KEY
from strategies.codec import PayloadError

WEIGHTINGS = ("examples", "uniform")
# The bound on num-examples when none is configured and the server cannot compute the partitions
# (a deployment, or a strategy built outside a run): larger than any real partition, and small enough that
# the sum of the weights of any number of replies stays finite.
FALLBACK_MAX_NUM_EXAMPLES = 10**9
MIN_REPLIES_FOR_NORM = 3
FLOAT32_MAX = float(np.finfo(np.float32).max)
INFO_KEY = "info"
PARTITION_ID_KEY = "partition-id"


@dataclass
class ReplyChecks:
    """What a FedDM strategy trusts in a client's training reply (the config keys of the same names).

    Parameters
    ----------
    weighting : str (default: "examples")
        ``examples``: a reply weighs its ``num-examples`` in the mean; ``uniform``:
        each accepted reply's ``num-examples`` is set to 1 before averaging.
    max_num_examples : float (default: ``FALLBACK_MAX_NUM_EXAMPLES``)
        The largest ``num-examples`` (images) a reply may claim; more is left out.
    max_update_norm_ratio : float | None (default: 10)
        A reply whose update (RMS per value) is more than this times the median
        of the round's replies is left out; None turns the check off.
    """

    weighting: str = "examples"
    max_num_examples: float = FALLBACK_MAX_NUM_EXAMPLES
    max_update_norm_ratio: float | None = 10.0

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting={self.weighting!r} is not one of {WEIGHTINGS}")
        if not (np.isfinite(self.max_num_examples) and self.max_num_examples >= 1):
            raise ValueError(f"max_num_examples={self.max_num_examples} must be a finite number >= 1")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> ReplyChecks:
        """From the run config's ``weighting``, ``max_num_examples`` (null: the fallback) and ratio."""
        bound, ratio = cfg["max_num_examples"], cfg["max_update_norm_ratio"]
        return cls(
            weighting=str(cfg["weighting"]),
            max_num_examples=FALLBACK_MAX_NUM_EXAMPLES if bound is None else float(bound),
            max_update_norm_ratio=None if ratio is None else float(ratio),
        )

    def screen_norms(
        self, checked: Sequence[Message], global_arrays: ArrayRecord, encoding: Any
    ) -> tuple[list[Message], list[tuple[Message, PayloadError]]]:
        """(kept, left out with the reason): the checked replies whose update is not an outlier.

        ``encoding.decodes_updates`` says whether the decoded arrays are updates or weights.
        """
        checked = list(checked)
        norms = [update_rms(m.content["arrays"], global_arrays, encoding.decodes_updates) for m in checked]
        outliers, median = norm_outliers(norms, self.max_update_norm_ratio)
        reasons = [
            (
                checked[i],
                PayloadError(
                    f"its update (RMS {norms[i]:.3g} per value) is more than max_update_norm_ratio="
                    f"{self.max_update_norm_ratio:g} times the median of the round's {len(norms)} replies "
                    f"({median:.3g})"
                ),
            )
            for i in outliers
        ]
        return [m for i, m in enumerate(checked) if i not in outliers], reasons

    def weighted(self, accepted: list[Message]) -> list[Message]:
        """The accepted replies as the aggregator weighs them: ``uniform`` sets each ``num-examples`` to 1."""
        if self.weighting == "uniform":
            for message in accepted:
                metrics = message.content["metrics"]
                message.content["metrics"] = MetricRecord({**dict(metrics), NUM_EXAMPLES_KEY: 1})
        return accepted

    def summary(self) -> str:
        """One line for the strategy's start-up summary."""
        ratio = "off" if self.max_update_norm_ratio is None else f"{self.max_update_norm_ratio:g}x the median"
        return (
            f"reply checks: weighting {self.weighting}, num-examples <= {self.max_num_examples:g}, "
            f"update norm <= {ratio}"
        )


def check_num_examples(value: float, bound: float) -> None:
    """``PayloadError`` if a reply claims more than ``bound`` examples (images)."""
    if value > bound:
        raise PayloadError(
            f"num-examples {value:g} is over max_num_examples={bound:g} (the largest partition's images)"
        )


def check_info(content: Any) -> None:
    """``PayloadError`` unless the reply's ``info`` record is absent or names its partition as an integer >= 0."""
    if INFO_KEY not in content:
        return
    info = content[INFO_KEY]
    if not isinstance(info, ConfigRecord):
        raise PayloadError(f"'info' must be a ConfigRecord, got {type(info).__name__}")
    pid = info.get(PARTITION_ID_KEY)
    if PARTITION_ID_KEY in info and (isinstance(pid, bool) or not isinstance(pid, int) or pid < 0):
        raise PayloadError(f"'info' partition-id must be an integer >= 0, got {pid!r}")


def check_float32_range(arrays: ArrayRecord) -> None:
    """``PayloadError`` naming the first decoded float array with inf or NaN or a value beyond float32's range."""
    for name, array in arrays.items():
        values = array.numpy()
        if not np.issubdtype(values.dtype, np.floating) or values.size == 0:
            continue
        largest = float(np.max(np.abs(values.astype(np.float64))))
        if not np.isfinite(largest) or largest > FLOAT32_MAX:
            raise PayloadError(
                f"array {name!r} overflows float32 after decoding (largest |value| {largest:.3g})"
            )


def update_rms(decoded: ArrayRecord, global_arrays: ArrayRecord, decodes_updates: bool) -> float:
    """The size of a reply's update: sqrt(mean of (w_client − w_global)²) over its values (weight units).

    ``decoded`` holds the reply's arrays as they enter the average: the update Δ
    itself when ``decodes_updates`` (int8 codes), else weights, compared with the
    global model's arrays of the same names (a partial reply holds some of them).
    Computed in float64, so it is finite for any float32 input. Per value rather
    than the plain norm ‖Δ‖, so that replies of different parts (USplit) compare;
    for replies of the same arrays the ratio of two RMS is the ratio of the norms.
    """
    total, count = 0.0, 0
    for name, array in decoded.items():
        values = array.numpy().astype(np.float64)
        if not decodes_updates:
            values = values - global_arrays[name].numpy().astype(np.float64)
        total += float(np.sum(values * values))
        count += values.size
    return float(np.sqrt(total / count)) if count else 0.0


def norm_outliers(norms: Sequence[float], ratio: float | None) -> tuple[list[int], float]:
    """Indices of the norms over ``ratio`` × their median, and the median.

    None when ``ratio`` is None, fewer than ``MIN_REPLIES_FOR_NORM`` norms came
    in, or the median is 0 (most clients did not move the model: nothing to compare with).
    """
    if ratio is None or len(norms) < MIN_REPLIES_FOR_NORM:
        return [], 0.0
    median = float(np.median(norms))
    if median <= 0:
        return [], median
    return [i for i, norm in enumerate(norms) if not norm <= ratio * median], median


def non_finite_arrays(arrays: ArrayRecord) -> list[str]:
    """Names of the arrays of a (new global) model that hold NaN or inf."""
    return [
        name
        for name, array in arrays.items()
        if np.issubdtype(array.numpy().dtype, np.floating) and not np.all(np.isfinite(array.numpy()))
    ]


def reply_names(messages: Sequence[Message]) -> str:
    """``node N (partition P)`` for each reply, for error messages."""
    names = []
    for message in messages:
        info = message.content.config_records.get(INFO_KEY, {}) if not message.has_error() else {}
        pid = info.get(PARTITION_ID_KEY)
        names.append(f"node {message.metadata.src_node_id}" + ("" if pid is None else f" (partition {pid})"))
    return ", ".join(names)
