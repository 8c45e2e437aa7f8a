"""Two seams in Flower's simulation engine, so a round costs what its sampled sites cost.

Flower 1.41/1.42 (``flwr/server/superlink/fleet/vce/vce_api.py``), measured at 1,000 sites:

* ``add_messages_to_queue`` polls every 0.1 s by calling ``state.get_message_ins(node, limit=1)``
  for *every* node, and the in-memory link state answers each call by scanning every stored
  message (``_check_stored_messages`` on each). That is nodes x messages per poll, under the
  state's lock: a pre-flight of 1,000 messages to 1,000 nodes took minutes, and a round of 10
  messages still spent seconds scanning for 990 idle nodes. ``_feed`` below scans the stored
  messages once per poll and asks Flower for the pending nodes' messages only.
* ``_register_nodes`` makes the nodes and the node -> partition map, and keeps the map to
  itself. ``NodeMap`` records it, so the coordinator knows which simulated site each node is
  (``server.directory``) without asking 1,000 sites who they are.

Both are installed only for the duration of ``seams()`` and fall back to Flower's own code when
the state is not the in-memory one or Flower's names changed (then the coordinator asks).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from veil.logs import get_logger

log = get_logger("simulate")


class NodeMap:
    """The node -> partition map Flower's engine made, once it has made it."""

    def __init__(self, name: Callable[[int], str]) -> None:
        self._name = name
        self._nodes: dict[int, int] = {}
        self._ready = threading.Event()

    def record(self, nodes: Mapping[int, int]) -> None:
        """What ``_register_nodes`` returned: node id -> partition id."""
        self._nodes = dict(nodes)
        self._ready.set()

    def sites(self, timeout: float = 30.0) -> dict[int, str]:
        """Node id -> site id, waiting for the engine to finish making nodes; empty if it never
        said (then the coordinator asks each node instead)."""
        if not self._ready.wait(timeout):
            log.warning("the simulation engine did not share its node map; the coordinator asks each site")
            return {}
        return {node: self._name(partition) for node, partition in self._nodes.items()}


def _pending(state: Any, nodes: Mapping[int, int]) -> list[int] | None:
    """Nodes with an undelivered message, from one pass over the in-memory state's messages;
    None when this is not a state that can be read that way."""
    store, lock = getattr(state, "message_ins_store", None), getattr(state, "lock", None)
    if not isinstance(store, dict) or lock is None:
        return None
    with lock:
        messages = list(store.values())
    return sorted({m.metadata.dst_node_id for m in messages
                   if m.metadata.delivered_at == "" and m.metadata.dst_node_id in nodes})


def _feed(state: Any, queue: Any, nodes_mapping: Mapping[int, int], f_stop: threading.Event) -> None:
    """Flower's ``add_messages_to_queue``, asking only the nodes that have a message waiting."""
    while not f_stop.is_set():
        pending = _pending(state, nodes_mapping)
        for node_id in nodes_mapping if pending is None else pending:
            for msg in state.get_message_ins(node_id=node_id, limit=1):
                queue.put(msg)
        f_stop.wait(0.1)


@contextmanager
def seams(name: Callable[[int], str]) -> Iterator[NodeMap]:
    """Install both seams for one simulation; yields the ``NodeMap`` the coordinator reads."""
    node_map = NodeMap(name)
    try:
        from flwr.server.superlink.fleet.vce import vce_api
    except ImportError:  # pragma: no cover - a Flower without the engine
        yield node_map
        return
    register = getattr(vce_api, "_register_nodes", None)
    feed = getattr(vce_api, "add_messages_to_queue", None)
    if register is None or feed is None:
        log.warning("Flower's simulation engine has changed (no _register_nodes/add_messages_to_queue); "
                    "running it as it is")
        yield node_map
        return

    def recording(*args: Any, **kwargs: Any) -> Any:
        nodes = register(*args, **kwargs)
        node_map.record(nodes)
        return nodes

    vce_api._register_nodes = recording
    vce_api.add_messages_to_queue = _feed
    try:
        yield node_map
    finally:
        vce_api._register_nodes = register
        vce_api.add_messages_to_queue = feed
