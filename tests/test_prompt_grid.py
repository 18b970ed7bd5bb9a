"""PromptGrid: Flower's send_and_receive semantics, polling every poll_s seconds."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from server_app.prompt_grid import PromptGrid, prompt


class SlowLink:
    """A deployment grid stand-in: replies to message ``i`` become visible at ``ready_s[i]``."""

    def __init__(self, ready_s: list[float]) -> None:
        self.ready_s = ready_s
        self.start = 0.0
        self.pulls = 0
        self.sent: dict[str, object] = {}

    def push_messages(self, messages):
        self.start = time.monotonic()
        self.sent = {f"m{i}": m for i, m in enumerate(messages)}
        return list(self.sent)

    def pull_messages(self, message_ids):
        self.pulls += 1
        now = time.monotonic() - self.start
        arrived = []
        for i, message_id in enumerate(self.sent):
            if message_id in set(message_ids) and self.ready_s[i] <= now:
                arrived.append(SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=message_id)))
        return arrived


def messages(n: int) -> list[SimpleNamespace]:
    """Stand-ins for Flower messages (the grid only hands them to the link)."""
    return [SimpleNamespace(dst_node_id=i + 1) for i in range(n)]


def test_replies_are_collected_soon_after_they_arrive() -> None:
    link = SlowLink([0.0, 0.3])
    grid = PromptGrid(link, poll_s=0.05)
    started = time.monotonic()
    replies = list(grid.send_and_receive(messages(2), timeout=10))
    took = time.monotonic() - started
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1"]
    assert 0.3 <= took < 1.0  # Flower's own grid would look again only after 3 s
    assert link.pulls >= 3


def test_the_deadline_leaves_late_replies_out() -> None:
    link = SlowLink([0.0, 5.0])
    started = time.monotonic()
    replies = list(PromptGrid(link, poll_s=0.05).send_and_receive(messages(2), timeout=0.3))
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert time.monotonic() - started < 1.0


def test_without_a_timeout_it_waits_for_every_reply() -> None:
    link = SlowLink([0.2, 0.1, 0.0])
    replies = list(PromptGrid(link, poll_s=0.05).send_and_receive(messages(3), timeout=None))
    assert len(replies) == 3


def test_other_calls_are_flowers() -> None:
    class Inner:
        run = "the run"

        def get_node_ids(self):
            return [7, 8]

    grid = PromptGrid(Inner(), poll_s=1)
    assert grid.run == "the run" and list(grid.get_node_ids()) == [7, 8]
    with pytest.raises(ValueError, match="reply_poll_s"):
        PromptGrid(Inner(), poll_s=0)


def test_only_flowers_deployment_grid_is_wrapped() -> None:
    from flwr.superlink.grid.http_grid import HttpGrid

    deployment = HttpGrid.__new__(HttpGrid)  # not connected: only its type matters here
    assert isinstance(prompt(deployment, 0.2), PromptGrid)
    other = SlowLink([0.0])
    assert prompt(other, 0.2) is other
