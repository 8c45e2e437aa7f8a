"""``veil coordinator sites``: the registered sites, from the run store and from the SuperLink.

The store says who each site is (``veil coordinator register``: name, node id, key fingerprint,
when) and the last round it answered; the SuperLink says whether its node is online and when it
was last seen. The two are joined on the node id. A coordinator that cannot be asked costs one
line, and the store's view is printed all the same; a node the SuperLink lists that the store
does not know is shown too (registered without this store). Every stored value is checked
(``server.read.sites``) and every string is made safe for the terminal (``render.clean``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from veil.cli.common import FormatOpt, StoreOpt, errors

if TYPE_CHECKING:
    from rich.console import Console

    from server.read.sites import RegisteredSiteRow
    from veil.cli.flower import FlowerNode


@dataclass(frozen=True)
class SitesView:
    """What ``veil coordinator sites`` shows: the store's sites, the SuperLink's nodes (None when it
    could not be asked, with ``unreachable`` saying why), and the nodes the store does not know."""

    store: str
    coordinator: str
    sites: list[RegisteredSiteRow]
    nodes: dict[str, FlowerNode] | None
    unreachable: str | None = None

    def node_of(self, site: RegisteredSiteRow) -> FlowerNode | None:
        """The SuperLink's entry for ``site``'s node, if it lists one."""
        return None if self.nodes is None or site.node_id is None else self.nodes.get(site.node_id)

    def unrecorded(self) -> list[FlowerNode]:
        """Nodes the SuperLink lists that no registered site in the store names."""
        known = {site.node_id for site in self.sites}
        return [n for n in (self.nodes or {}).values() if n.node_id not in known]


def sites_json(view: SitesView) -> dict[str, Any]:
    """The view as JSON-ready data."""
    return {"store": view.store,
            "coordinator": {"address": view.coordinator, "reachable": view.nodes is not None,
                            "error": view.unreachable},
            "sites": [asdict(site) | {"flower": _node_json(view.node_of(site)) if view.nodes is not None
                                      else None} for site in view.sites],
            "unrecorded_nodes": [_node_json(n) for n in view.unrecorded()]}


def _node_json(node: FlowerNode | None) -> dict[str, Any]:
    if node is None:
        return {"status": "not at the SuperLink"}
    return asdict(node) | {"last_seen": node.last_seen}


def _answered(site: RegisteredSiteRow) -> str:
    if site.last_run is None:
        return "-"
    return f"run {site.last_run} " + ("pre-flight" if site.last_round == 0 else f"round {site.last_round}")


def draw_sites(con: Console, view: SitesView) -> None:
    """The table of registered sites, then one warning line per stored value that failed its check."""
    from server.read.stored import problem_lines
    from veil.cli.render import checked, draw_warnings, say, table

    def flower(site: RegisteredSiteRow) -> tuple[str, str]:
        if view.nodes is None:
            return "?", "?"
        node = view.node_of(site)
        if node is None:
            return "not at the SuperLink", "-"
        return node.status, node.last_seen or ("never" if node.status == "registered" else "-")

    rows = []
    for site in view.sites:
        status, seen = flower(site)
        fingerprint = site.key_fingerprint
        short = f"{fingerprint[:19]}…" if fingerprint else "-"
        rows.append([checked(site.problems, "name", site.name),
                     checked(site.problems, "node_id", site.node_id or ""),
                     checked(site.problems, "key_fingerprint", short),
                     checked(site.problems, "registered_at", (site.registered_at or "-")[:19].replace("T", " ")),
                     status, seen, _answered(site)])
    for node in view.unrecorded():
        rows.append(["(not in the store)", node.node_id, "-", (node.registered_at or "-").rstrip("Z"),
                     node.status, node.last_seen or "-", "-"])
    if not rows:
        say(con, f"no sites registered in {view.store}: register one with `veil coordinator register "
                 "NAME.node-key.pub --store URL`")
        return
    con.print(table(["site", "node", "key", "registered (UTC)", "status", "last seen (UTC)", "last answered"],
                    rows, left=7))
    if view.unrecorded():
        say(con, " nodes marked (not in the store) were registered at the SuperLink without this store: "
                 "`veil coordinator register --store URL` records the sites it registers")
    draw_warnings(con, [line for site in view.sites
                        for line in problem_lines(f"site {site.name}", site.problems)])


def coordinator_sites(
    store: StoreOpt = None,
    coordinator: Annotated[str, typer.Option(help="the SuperLink as HOST:PORT")] = "127.0.0.1:8000",
    ca: Annotated[Path, typer.Option(help="the federation's ca.crt")] = Path("certs/ca.crt"),
    output: FormatOpt = "text",
) -> None:
    """The registered sites: name, node id, key fingerprint, when registered, the SuperLink's status and
    last contact, and the last round each answered (from the run store's participation)."""
    from server.read.dashboard import open_store
    from server.read.sites import registered_sites
    from veil.cli.common import echo_json
    from veil.cli.flower import list_nodes
    from veil.cli.render import LINE, clean, console, say
    from veil.errors import DeployError

    with errors():
        run_store = open_store(store)
        try:
            sites, safe = registered_sites(run_store), run_store.safe_url
        finally:
            run_store.close()
        try:
            nodes: dict[str, FlowerNode] | None = {n.node_id: n for n in list_nodes(coordinator, ca)}
            unreachable = None
        except DeployError as err:
            nodes, unreachable = None, str(err)
    view = SitesView(safe, coordinator, sites, nodes, unreachable)
    if unreachable is not None:
        typer.echo(f"coordinator not reachable ({clean(unreachable, LINE)}): showing the store's view only",
                   err=True)
    if output == "json":
        echo_json(sites_json(view))
        return
    con = console()
    draw_sites(con, view)
    say(con, f"\nregistered sites from {clean(safe)}")
