"""How the coordinator collects a phase's replies (``server.delivery``) and how the SuperNode's
idle polling is shortened (``client.supervisor._brisk_idle_polling``)."""

from __future__ import annotations

import importlib
import time
from collections.abc import Iterable
from typing import Any

import pytest
from flwr.app import Message, RecordDict

from server import delivery
from tests.flowerkit import _delivered, answer, in_a_run


class PollGrid:
    """A Grid with Flower's push/pull whose reply to message i shows up on pull number ``ready[i]``."""

    def __init__(self, ready: list[int | None]) -> None:
        self.ready, self.pulls, self.sent = ready, 0, []  # type: ignore[var-annotated]

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        self.sent = list(messages)
        ids = []
        for i, m in enumerate(self.sent):
            ids.append(_delivered(m, f"{i:064d}").metadata.message_id)  # what Flower's push assigns
        return ids

    def pull_messages(self, ids: Iterable[str]) -> list[Message]:
        self.pulls += 1
        wanted = set(ids)
        return [answer(m, RecordDict()) for i, (m, r) in enumerate(zip(self.sent, self.ready, strict=True))
                if r is not None and r == self.pulls and f"{i:064d}" in wanted]


def _messages(n: int) -> list[Message]:
    in_a_run()
    return [Message(RecordDict(), dst_node_id=i + 1, message_type="train") for i in range(n)]


def test_replies_are_pulled_until_all_are_in(monkeypatch: pytest.MonkeyPatch) -> None:
    naps: list[float] = []
    monkeypatch.setattr(delivery.time, "sleep", naps.append)
    grid = PollGrid([1, 4, 9])
    replies = delivery.send_and_receive(grid, _messages(3), timeout=None)  # type: ignore[arg-type]
    assert sorted(r.metadata.src_node_id for r in replies) == [1, 2, 3]
    assert grid.pulls == 9 and len(naps) == 8  # stops at the last reply, never a pull more
    assert naps[0] == delivery.FIRST_POLL_S and naps == sorted(naps) and max(naps) <= delivery.MAX_POLL_S
    assert naps[0] < 3.0 / 10  # Flower's own loop sleeps 3 s between pulls


def test_a_reply_that_never_comes_ends_at_the_timeout() -> None:
    grid = PollGrid([1, None])
    start = time.monotonic()
    replies = delivery.send_and_receive(grid, _messages(2), timeout=0.5)  # type: ignore[arg-type]
    waited = time.monotonic() - start
    assert [r.metadata.src_node_id for r in replies] == [1]
    assert grid.pulls >= 2 and 0.5 <= waited < 5.0


def test_messages_the_superlink_did_not_take_are_not_waited_for(caplog: pytest.LogCaptureFixture) -> None:
    class Partial(PollGrid):
        def push_messages(self, messages: Iterable[Message]) -> list[str]:
            ids = super().push_messages(messages)
            return [ids[0], None]  # type: ignore[list-item]  # what Flower returns for a failed push

    grid = Partial([1, 1])
    replies = delivery.send_and_receive(grid, _messages(2), timeout=None)  # type: ignore[arg-type]
    assert [r.metadata.src_node_id for r in replies] == [1] and grid.pulls == 1  # no wait for the lost one
    assert "1 of 2 messages could not be handed to the SuperLink" in caplog.text


def test_a_grid_without_push_and_pull_keeps_its_own_loop() -> None:
    class Plain:
        def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
            return [answer(m, RecordDict()) for m in messages]

    assert len(delivery.send_and_receive(Plain(), _messages(2), timeout=1.0)) == 2  # type: ignore[arg-type]


def test_the_supernodes_idle_sleep_is_shortened_and_nothing_else(monkeypatch: pytest.MonkeyPatch) -> None:
    from client import supervisor

    module: Any = importlib.import_module("flwr.supernode.start_client_internal")
    original = module.time
    assert "time.sleep(3)" in importlib.util.find_spec(module.__name__).loader.get_source(module.__name__)  # type: ignore[union-attr]
    slept: list[float] = []
    try:
        supervisor._brisk_idle_polling(0.4)
        monkeypatch.setattr(time, "sleep", slept.append)
        module.time.sleep(3)  # Flower's idle wait
        module.time.sleep(0.5)  # its other waits stay as they are
        assert slept == [0.4, 0.5] and module.time.monotonic() > 0
    finally:
        module.time = original


def test_a_reply_made_while_the_coordinator_was_away_is_pushed_without_waiting_for_a_message() -> None:
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

    from client import supervisor
    from tests.flowerkit import incoming

    module: Any = importlib.import_module("flwr.supernode.start_client_internal")
    source = importlib.util.find_spec(module.__name__).loader.get_source(module.__name__)  # type: ignore[union-attr]
    loop = source[source.index("run_id = _pull_and_store_message("):]
    assert loop.index("if run_id is None:") < loop.index("_push_messages(")  # the loop this relies on

    state = InMemoryNodeState(ObjectStoreFactory().store())
    request = incoming(RecordDict(), "train")
    state.store_message(request)
    assert not supervisor._has_ready_reply(state)  # a message to answer is not a reply
    reply = answer(request, RecordDict())
    reply.metadata.__dict__["_message_id"] = "r" * 64
    state.store_message(reply)
    assert supervisor._has_ready_reply(state)

    original = module._pull_and_store_message
    module._pull_and_store_message = lambda **kw: None  # the SuperLink has no message for this node
    try:
        supervisor._never_strand_replies()
        assert module._pull_and_store_message(state=state) == supervisor.READY_REPLY  # so the loop pushes
        assert [m.metadata.reply_to_message_id for m in state.get_messages_legacy(is_reply=True)] == ["m" * 64]
        assert module._pull_and_store_message(state=state) is None  # pushed: the idle turn is idle again
    finally:
        module._pull_and_store_message = original
