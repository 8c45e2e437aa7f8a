"""Which site is behind which Flower node, learnt before any budget question.

The participation plan draws sites by site id and seed (``server.budget.ParticipationPlan``), and
in refuse mode it is drawn *before* the pre-flight so that only the scheduled sites are asked,
each for its own number of rounds. So the coordinator needs each node's site id first, as
cheaply as it can get it:

1. ``known``: a map the caller vouches for. ``veil simulate`` passes the one Flower's simulation
   engine made when it created the nodes (``simulations.engine``): no message at all.
2. the register (``veil coordinator register``): a deployed node whose key was registered under
   a name is that site (SuperNode authentication ties the key to the node).
3. everyone else is asked ``query.identity``, a question a site answers with its ``site``
   record and no other work.

Nothing here is trusted for budgets: a name only orders the draw. Each site's budget answer must
then name the same site (``check_directory``), or the node is rejected.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from sqlalchemy import select

from server.budget import SiteStanding
from server.delivery import send_and_receive
from server.sentences import error_sentence, one_line
from server.store import RunStore
from server.store import schema as S
from veil import protocol as P
from veil.logs import get_logger

log = get_logger("server")


def site_names(grid: Grid, store: RunStore, nodes: Iterable[int], timeout: float,
               known: Mapping[int, str] | None = None) -> dict[int, SiteStanding]:
    """A standing per node, not yet asked about its budget, named by ``known``, the register, or
    its answer to ``query.identity``; a node with no name carries the failure instead."""
    nodes = list(nodes)
    with store.session() as s:
        registered = {row.node_id: row.name for row in s.scalars(select(S.RegisteredSite))}
    names = {n: known[n] for n in nodes if known and n in known}
    names.update({n: registered[str(n)] for n in nodes if n not in names and str(n) in registered})
    failures: dict[int, str] = {}
    rest = [n for n in nodes if n not in names]
    if rest:
        log.info("asking %d of %d sites who they are (%d known from the simulation or the register)",
                 len(rest), len(nodes), len(nodes) - len(rest))
        messages = [Message(content=RecordDict({P.TASK: ConfigRecord()}), dst_node_id=n,
                            message_type=P.IDENTITY_QUERY) for n in rest]
        for reply in send_and_receive(grid, messages, timeout=timeout):
            node = reply.metadata.src_node_id
            if node not in rest:
                continue
            if reply.has_error():
                failures[node] = f"identity query failed at the site: {error_sentence(reply.error.reason)}"
                continue
            if P.REFUSAL in reply.content:  # it could not say who it is (its site cannot be set up)
                failures[node] = "the site could not answer the identity question"
                continue
            try:
                names[node] = P.site_info(reply.content).site_id
            except ValueError as err:
                failures[node] = f"malformed identity answer: {one_line(str(err))}"
    standings = {}
    for n in nodes:
        if n in names:
            standings[n] = SiteStanding(n, name=names[n], asked=False)
        else:  # never drawn: the plan excludes it with this reason, and the pre-flight records it
            standings[n] = SiteStanding(n, failure=failures.get(n, "no answer to the identity question "
                                                                     "before the timeout"))
    return standings


def check_directory(standings: Mapping[int, SiteStanding]) -> None:
    """A node's budget answer must name the site it was drawn as; otherwise it is rejected (its
    draw was keyed by a name it does not hold)."""
    for node, st in standings.items():
        if st.status is None or st.rejection is not None or st.name is None:
            continue
        if st.status.site_id != st.name:
            why = f"node {node} was known as {st.name!r} but its budget answer names {st.status.site_id!r}"
            st.rejection = P.Refusal("unregistered-name", why)
            log.error("pre-flight: %s", why)
