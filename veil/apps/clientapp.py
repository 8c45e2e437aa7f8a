"""The ClientApp that ``flwr run`` starts at each site (and in ``flwr run``'s local simulation).

A deployed site names its ``site.yaml`` in the SuperNode's node config (``veil site start``
sets ``site-config``); without it, this is Flower's local simulation of ``flwr run .`` and the
sites are the scenario file's simulated ones.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context

from client.app import build_client_app
from client.daemon import site_from_config
from client.site import Site
from simulations.federation import SimulatedSites
from veil import logs
from veil.apps import app_relative
from veil.spec import load_scenario


def resolve_site(context: Context) -> Site:
    """The site this ClientApp process serves."""
    if "site-config" in context.node_config:
        logs.configure()  # the site's own ClientApp process: its charges and noise source go to the site's log
        return site_from_config(Path(str(context.node_config["site-config"])))
    scenario = load_scenario(app_relative(str(context.run_config["scenario"])))
    key = context.run_config.get("key-file")
    return SimulatedSites(scenario, str(context.run_config.get("ledger-dir", "veil-ledgers")),
                          str(key) if key else None)(context)


app = build_client_app(resolve_site)
