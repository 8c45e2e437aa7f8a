"""Flower messages as a run would carry them, for tests that drive the apps without a SuperLink.

Flower stamps every message it creates with the task identity of the process it runs in, and
the SuperLink gives each message its id on delivery. Flower has no public API for either, so
``in_a_run()`` and ``_delivered()`` are the only places tests touch Flower's internals; every test
goes through the helpers below. Replies are made with Flower's public ``Message(content, reply_to=...)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.app import Message, RecordDict


def in_a_run() -> None:
    """Give this process the task identity Flower sets inside a run (run 1, node 0, task 1)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def _delivered(msg: Message, message_id: str) -> Message:
    """``msg`` with the id the SuperLink gives a message on delivery (Flower does the same, by hand:
    ``Metadata.message_id`` has no setter)."""
    msg.metadata.__dict__["_message_id"] = message_id
    return msg


def incoming(content: RecordDict, message_type: str, dst_node_id: int = 1) -> Message:
    """A message as a ClientApp receives it (with a message id, so it can be answered)."""
    in_a_run()
    return _delivered(Message(content, dst_node_id=dst_node_id, message_type=message_type), "m" * 64)


def answer(to: Message, content: RecordDict) -> Message:
    """``to``'s reply from the node it was sent to (Flower's own reply_to seam)."""
    if not to.metadata.message_id:
        _delivered(to, f"{to.metadata.dst_node_id:064d}")
    return Message(content, reply_to=to)


def answers(sent: Iterable[Message], content_for: dict[int, RecordDict]) -> list[Message]:
    """Replies from the nodes in ``content_for``; the other nodes stay silent (no reply)."""
    return [answer(m, content_for[m.metadata.dst_node_id]) for m in sent if m.metadata.dst_node_id in content_for]


class LocalGrid:
    """The one thing the strategy asks a Flower ``Grid``: which nodes are connected. Like a
    ServerApp process, it runs inside a run, so the messages sent to it carry an identity."""

    def __init__(self, nodes: Iterable[int]) -> None:
        in_a_run()
        self.nodes = list(nodes)

    def get_node_ids(self) -> list[int]:
        """The connected nodes."""
        return self.nodes


class AppGrid(LocalGrid):
    """A Grid that delivers each message to an in-process ClientApp handler per node and
    returns its reply: the coordinator's whole round loop, without Flower's engine."""

    def __init__(self, handlers: dict[int, Callable[[Message], Message]]) -> None:
        super().__init__(handlers)
        self.handlers = handlers
        self._sent = 0

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Every message answered by its node's handler, in order."""
        replies = []
        for msg in messages:
            self._sent += 1
            node = msg.metadata.dst_node_id
            delivered = _delivered(Message(msg.content, dst_node_id=node, message_type=msg.metadata.message_type),
                                   f"{self._sent:064d}")
            replies.append(self.handlers[node](delivered))
        return replies
