"""The deployment grid wrapper that looks for replies every 0.5 s instead of Flower's 3 s."""

from __future__ import annotations

from types import SimpleNamespace

from server_app import federation
from server_app.federation import PromptGrid, in_simulation


class _Grid:
    """Replies to message i after i + 1 pulls; records the sleeps between pulls."""

    run_id = 7

    def __init__(self) -> None:
        self.pulls = 0

    def push_messages(self, messages):
        return [f"id{m}" for m in messages]

    def pull_messages(self, ids):
        self.pulls += 1
        ready = {f"id{i}" for i in range(self.pulls)} & set(ids)
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in sorted(ready)]


def test_prompt_grid_pulls_every_poll_s_until_all_replied(monkeypatch):
    sleeps = []
    monkeypatch.setattr(federation.time, "sleep", sleeps.append)
    grid = PromptGrid(_Grid(), poll_s=0.5)
    replies = grid.send_and_receive([0, 1, 2], timeout=None)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["id0", "id1", "id2"]
    assert sleeps == [0.5, 0.5]  # three pulls, no sleep after the last reply
    assert grid.run_id == 7  # everything else is Flower's grid
    assert not in_simulation(grid)


def test_prompt_grid_stops_at_the_timeout(monkeypatch):
    clock = iter(range(0, 100, 10))  # 10 s per look at the clock
    monkeypatch.setattr(federation.time, "time", lambda: next(clock))
    monkeypatch.setattr(federation.time, "sleep", lambda s: None)
    replies = PromptGrid(_Grid()).send_and_receive([0, 1, 2, 3, 4], timeout=25)
    assert len(replies) < 5
