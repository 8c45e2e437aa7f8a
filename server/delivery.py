"""Sending one phase's messages to the sites and collecting their replies, without dawdling.

Flower's deployed ``Grid.send_and_receive`` (1.41 and 1.42, ``flwr/superlink/grid/http_grid.py``)
pulls the replies every 3 s: a phase whose last reply lands just after a pull waits almost 3 s
more, and a round has two phases (train, evaluate) plus the pre-flight before the first.
``send_and_receive`` here pushes the same messages and pulls with Flower's own
``push_messages``/``pull_messages``, every ``FIRST_POLL_S`` at first, backing off to
``MAX_POLL_S`` for a long wait. A pull is one small call to the local SuperLink. Flower's
in-memory simulation grid already pulls every 0.1 s and keeps its own loop; so does any grid
without push and pull (test doubles).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

from veil.logs import get_logger

log = get_logger("server")

FIRST_POLL_S = 0.1  # while replies may come at any moment
MAX_POLL_S = 1.0  # a long training: one pull a second at most
BACKOFF = 1.25


def send_and_receive(grid: Grid, messages: Iterable[Message], *, timeout: float | None) -> list[Message]:
    """Push ``messages``; the replies that arrive within ``timeout`` seconds (None: until all do)."""
    if not _brisk(grid):
        return list(grid.send_and_receive(messages, timeout=timeout))
    messages = list(messages)
    waiting = {i for i in grid.push_messages(messages) if i}  # Flower gives None for a message it could not push
    if len(waiting) < len(messages):  # those sites count as no reply; say why here, once
        log.warning("%d of %d messages could not be handed to the SuperLink (too large, or it refused them); "
                    "those sites will show no reply", len(messages) - len(waiting), len(messages))
    deadline = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    interval = FIRST_POLL_S
    while waiting:
        got = list(grid.pull_messages(waiting))
        replies.extend(got)
        waiting.difference_update(m.metadata.reply_to_message_id for m in got)
        if not waiting:
            break
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            break
        time.sleep(interval if deadline is None else max(0.0, min(interval, deadline - now)))
        interval = min(interval * BACKOFF, MAX_POLL_S)
    return replies


def _brisk(grid: Grid) -> bool:
    """Whether to poll here: a deployed grid that has Flower's push and pull."""
    try:
        from flwr.superlink.grid.inmemory_grid import InMemoryGrid
    except ImportError:  # pragma: no cover - a Flower without it
        InMemoryGrid = ()  # type: ignore[assignment,misc]
    return hasattr(grid, "push_messages") and hasattr(grid, "pull_messages") and not isinstance(grid, InMemoryGrid)
