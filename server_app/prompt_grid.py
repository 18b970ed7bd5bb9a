"""A Flower Grid that looks for replies more often than Flower's deployment grid.

Flower 1.42's deployment grid (``flwr/superlink/grid/http_grid.py``) sleeps 3 s
between two looks for replies in ``send_and_receive``, so on average a round
waits 1.5 s after its last reply has reached the SuperLink (and once more for
each evaluation and SecAgg+ stage). ``PromptGrid`` keeps every other call as
Flower's and only polls every ``poll_s`` seconds; a pull that finds nothing is
one small request to the SuperLink. Other grids are left as they are (the
simulation grid already polls every 0.1 s).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid
from flwr.superlink.grid.http_grid import HttpGrid


class PromptGrid(Grid):
    """``grid`` with ``send_and_receive`` looking for replies every ``poll_s`` seconds."""

    def __init__(self, grid: Grid, poll_s: float) -> None:
        if poll_s <= 0:
            raise ValueError(f"reply_poll_s must be > 0 seconds, got {poll_s}")
        self.grid = grid
        self.poll_s = poll_s

    def set_run(self, run) -> None:  # noqa: D102 (Flower's)
        self.grid.set_run(run)

    @property
    def run(self):  # noqa: D102
        return self.grid.run

    def create_message(self, *args, **kwargs) -> Message:  # noqa: D102
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return self.grid.get_node_ids()

    def get_nodes(self):  # noqa: D102
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push ``messages`` and return the replies that arrive within ``timeout`` seconds (None: all).

        Flower's semantics: replies are matched by ``reply_to_message_id``; the
        ones still missing at the deadline are not waited for.
        """
        waiting = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting:
            arrived = list(self.pull_messages(waiting))
            replies.extend(arrived)
            waiting.difference_update(m.metadata.reply_to_message_id for m in arrived)
            if not waiting or (deadline is not None and time.monotonic() >= deadline):
                break
            pause = (
                self.poll_s if deadline is None else min(self.poll_s, max(0.0, deadline - time.monotonic()))
            )
            time.sleep(pause)
        return replies


def prompt(grid: Grid, poll_s: float) -> Grid:
    """Flower's deployment grid polling every ``poll_s`` seconds; any other grid as it is."""
    return PromptGrid(grid, poll_s) if isinstance(grid, HttpGrid) else grid
