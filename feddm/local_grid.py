"""A Grid that delivers messages to client functions in this process (tests and benchmarks).

Flower's simulation runs clients in Ray workers; to follow a protocol message by
message (SecAgg+'s four stages, byte counts) it is simpler to call the
ClientApp's functions directly. Each node keeps its own ``Context``, as a
SuperNode does, and every message is delivered as a copy, as over a network
(the SecAgg+ workflow sends one RecordDict to all nodes, and Flower's client
mod edits what it receives).

Stragglers run on a simulated clock: ``reply_delay(msg)`` is the seconds a
node takes to answer ``msg``. A reply later than ``send_and_receive``'s
``timeout`` is left out of what it returns, as Flower's grids leave out the
replies still missing when the timeout ends (the client has still run, as a real
one finishes its work after the deadline); it is kept in ``late``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from types import SimpleNamespace

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode

ClientFunction = Callable[[Message, Context], Message]
ReplyDelay = Callable[[Message], float]


class LocalGrid:
    """The part of Flower's ``Grid`` that strategies and workflows use, served in-process.

    ``client(msg, context)`` answers every message (train and evaluate); an
    exception becomes an error reply, as Flower's ClientApp runtime makes one.
    ``sent`` and ``received`` keep every message both ways; ``late`` the replies
    that ``reply_delay`` (simulated seconds per message, default 0) made miss the timeout.
    """

    def __init__(
        self,
        node_ids: Iterable[int],
        client: ClientFunction,
        run_id: int = 1,
        reply_delay: ReplyDelay | None = None,
    ) -> None:
        self.contexts = {
            int(n): Context(run_id=run_id, node_id=int(n), node_config={}, state=RecordDict(), run_config={})
            for n in node_ids
        }
        self.client = client
        self.run = SimpleNamespace(run_id=run_id)
        self.sent: list[Message] = []
        self.received: list[Message] = []
        self.late: list[Message] = []
        self.reply_delay = reply_delay

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Every message's reply, but for those later than ``timeout`` (None: no deadline), as Flower's grids."""
        replies = []
        for msg in messages:
            self.sent.append(msg)
            delivered = Message(content=copy.deepcopy(msg.content), metadata=copy.deepcopy(msg.metadata))
            try:
                reply = self.client(delivered, self.contexts[msg.metadata.dst_node_id])
            except Exception as err:  # noqa: BLE001 -- any client failure is an error reply
                reply = Message(
                    Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(err).__name__}: {err}"),
                    reply_to=delivered,
                )
            if self._is_late(delivered, timeout):
                self.late.append(reply)
                continue
            replies.append(reply)
        self.received.extend(replies)
        return replies

    def _is_late(self, message: Message, timeout: float | None) -> bool:
        """Whether the reply to ``message`` arrives after ``timeout`` on the simulated clock."""
        if self.reply_delay is None or timeout is None:
            return False
        return self.reply_delay(message) > timeout
