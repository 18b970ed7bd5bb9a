"""Client sampling: which of the connected clients train (and evaluate) in a round.

``clients_per_round`` clients train each round and ``eval_clients_per_round``
evaluate at evaluation rounds (null: every connected client, as before sampling
existed). The draw is Flower's own: ``FedAvg.configure_train`` and
``configure_evaluate`` call ``sample_nodes``, which draws with Python's global
``random``. Two things make it reproducible:

* the global ``random`` is seeded from the run's ``seed``, the true round and the
  phase just for the draw (and restored afterwards, so nothing else that uses
  ``random`` sees a different stream), so a run resumed at round k draws what an
  uninterrupted run draws;
* Flower draws from the list of connected node ids, and node ids are random (a
  simulation makes new ones in every process). The draw therefore sees the nodes
  ordered by their partition id, which each client reports once, before the
  first sampled round, in answer to a ``query`` message. The same seed then
  picks the same partitions in every process.

Over-selection (``over_select``, a fraction) draws ceil(k x (1 + over_select))
clients for training instead of k = ``clients_per_round``, at most the fewest
clients a round runs with, so that k replies still arrive by the round's
deadline on average when some clients are late. Every reply that arrives by the
deadline is aggregated (Flower's ``send_and_receive`` returns them all); the
round does not close early at k. Evaluation draws ``eval_clients_per_round``
without over-selection.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid
from flwr.supercore import log

from strategies.accounting import partition_of
from strategies.reply_checks import PayloadError, check_info

# Flower samples max(int(fraction x connected), min_nodes) nodes. A fraction just above 0
# (0 would switch training off) leaves min_nodes: exactly the configured count, however
# many nodes are connected.
ONLY_MIN_NODES = 1e-12
PHASES = {"train": 0, "evaluate": 1}
# Config key of a sampled training round: its partition ids (JSON), among which USplit forms groups.
SAMPLED_PARTITIONS_KEY = "sampled-partitions"


def round_seed(seed: int, server_round: int, phase: str) -> int:
    """The seed of one draw: the run's ``seed``, the true round and the phase, mixed (SeedSequence)."""
    parts = [int(seed), int(server_round), PHASES[phase]]
    return int(np.random.SeedSequence(parts).generate_state(1, np.uint64)[0] >> 1)


@contextlib.contextmanager
def seeded_random(seed: int) -> Iterator[None]:
    """Inside the block, Python's global ``random`` (Flower's sampling) starts from ``seed``; then it is as before."""
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


class PartitionOrderedGrid:
    """A view of a grid that lists its nodes by partition id (unknown ones last, by node id).

    Flower's ``configure_train`` only asks the grid for its node ids; everything
    else goes to the grid itself.
    """

    def __init__(self, grid: Grid, partitions: dict[int, int]) -> None:
        self.grid, self.partitions = grid, partitions

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def get_node_ids(self) -> list[int]:
        nodes = [int(n) for n in self.grid.get_node_ids()]
        return sorted(nodes, key=lambda n: (n not in self.partitions, self.partitions.get(n, 0), n))


@dataclass
class Sampling:
    """How many clients train and evaluate in a round (None: all connected), and who they are.

    ``partitions`` maps node ids to partition ids: asked once with a ``query``
    message (:meth:`learn_partitions`), completed by every reply that names its
    partition.
    """

    clients_per_round: int | None = None
    eval_clients_per_round: int | None = None
    seed: int = 0
    over_select: float = 0.0
    partitions: dict[int, int] = field(default_factory=dict)
    _asked: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        for name in ("clients_per_round", "eval_clients_per_round"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r} must be null or an integer >= 1")
        number = not isinstance(self.over_select, bool) and isinstance(self.over_select, (int, float))
        if not (number and self.over_select >= 0):  # NaN fails the comparison too
            raise ValueError(f"over_select={self.over_select!r} must be a number >= 0")
        if self.over_select > 0 and self.clients_per_round is None:
            raise ValueError(
                f"over_select={self.over_select:g} needs clients_per_round: it draws extra clients "
                "beyond clients_per_round, and with clients_per_round=null every connected client trains"
            )

    def per_round(self, phase: str) -> int | None:
        """Clients sampled in ``phase`` (``train`` or ``evaluate``); None: all connected."""
        if phase == "evaluate" and self.eval_clients_per_round is not None:
            return self.eval_clients_per_round
        return self.clients_per_round  # evaluation follows training unless set

    def drawn(self, phase: str, nodes: int) -> int | None:
        """Clients drawn in ``phase``: ``per_round`` plus the over-selected ones, at most ``nodes``.

        ``nodes`` is the fewest connected clients a round runs with: Flower waits
        until as many as it draws are connected, so a larger draw could stall a round.
        """
        count = self.per_round(phase)
        if count is None or phase != "train" or not self.over_select:
            return count
        # The epsilon keeps 10 x 1.3 (13.000000000000002 in floating point) at 13.
        return min(max(math.ceil(count * (1 + self.over_select) - 1e-9), count), max(nodes, count))

    @property
    def enabled(self) -> bool:
        """Whether any phase samples (else every connected client takes part, as before)."""
        return self.per_round("train") is not None or self.per_round("evaluate") is not None

    def flower_options(self, nodes: int) -> dict[str, Any]:
        """``FedAvg``'s sampling arguments; ``nodes``: the fewest connected clients a round runs with."""
        options: dict[str, Any] = {"min_available_nodes": nodes}
        for phase, suffix in (("train", "train"), ("evaluate", "evaluate")):
            count = self.drawn(phase, nodes)
            options[f"fraction_{suffix}"] = 1.0 if count is None else ONLY_MIN_NODES
            options[f"min_{suffix}_nodes"] = nodes if count is None else count
        return options

    def summary(self) -> list[str]:
        """A line for the strategy's start-up summary (Flower's shows the fraction as 0.00)."""
        if not self.enabled:
            return []
        train, evaluate = self.per_round("train"), self.per_round("evaluate")
        extra = ""
        if self.over_select:  # the cap (the fewest clients a round runs with) is Flower's min_train_nodes
            extra = f" (over_select={self.over_select:g}: up to {self.drawn('train', 2**31)} drawn)"
        return [
            f"sampling: {train or 'all'} clients train{extra}, {evaluate or 'all'} evaluate per round "
            f"(seeded by seed {self.seed} and the round)"
        ]

    def learn_partitions(self, grid: Grid, timeout: float | None) -> None:
        """Ask each connected node not asked before for its partition id (nodes that do not answer sort last).

        All nodes before the first sampled round; later only nodes that joined since.
        """
        new = sorted(set(int(n) for n in grid.get_node_ids()) - self._asked - set(self.partitions))
        if not new:
            return
        self._asked |= set(new)
        messages = [Message(content=RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in new]
        self.observe(grid.send_and_receive(messages, timeout=timeout))
        unknown = [n for n in new if n not in self.partitions]
        log(INFO, "Sampling: %d nodes reported their partition id", len(new) - len(unknown))
        if unknown:
            log(
                WARNING, "Sampling: %d nodes did not report a partition id; they are drawn last", len(unknown)
            )

    def observe(self, replies: Iterable[Message]) -> None:
        """Remember the partition id of each reply that names a valid one.

        A malformed ``info`` record is skipped here, never raised: the reply checks
        leave such a reply out, with the reason, where its content matters.
        """
        for message in replies:
            if message.has_error() or "info" not in message.content.config_records:
                continue
            try:
                check_info(message.content)
            except PayloadError:
                continue
            self.partitions[int(message.metadata.src_node_id)] = partition_of(message)

    @contextlib.contextmanager
    def draw(self, phase: str, server_round: int, grid: Grid) -> Iterator[PartitionOrderedGrid]:
        """Seed Flower's draw of ``phase`` in (true) round ``server_round``; draw over the grid it yields."""
        with seeded_random(round_seed(self.seed, server_round, phase)):
            yield PartitionOrderedGrid(grid, self.partitions)

    def partitions_of(self, messages: Iterable[Message]) -> list[int]:
        """The partition ids of the nodes ``messages`` go to (node ids for unknown ones), sorted."""
        nodes = [int(m.metadata.dst_node_id) for m in messages]
        return sorted(self.partitions.get(n, n) for n in nodes)


__all__ = [
    "ONLY_MIN_NODES",
    "SAMPLED_PARTITIONS_KEY",
    "PartitionOrderedGrid",
    "Sampling",
    "round_seed",
    "seeded_random",
]
