"""The ClientApp that ``flwr run`` starts at each site (and in ``flwr run``'s local simulation).

A deployed site (``veil site start``) names its worker's socket (``site-socket``) and its
``site.yaml`` (``site-config``) in the SuperNode's node config. Flower starts a new process
for every message; here that process only forwards the message to the site's long-lived
worker (``client.worker``), so it imports Flower and no torch. When the worker does not
answer within ``client.worker.CONNECT_WAIT_S`` (it is being restarted) the message is
answered in this process from ``site-config``, the slow way. Without either, this is
Flower's local simulation of ``flwr run .`` and the sites are the scenario file's simulated
ones.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from client import worker
from veil import logs
from veil import protocol as P
from veil.apps import app_relative


def resolve_site(context: Context) -> Any:
    """The site this ClientApp process serves (in-process answers only)."""
    if "site-config" in context.node_config:
        from client.daemon import site_from_config

        logs.configure()  # the site's own ClientApp process: its charges and noise source go to the site's log
        return site_from_config(Path(str(context.node_config["site-config"])))
    from simulations.federation import SimulatedSites
    from veil.spec import load_scenario

    scenario = load_scenario(app_relative(str(context.run_config["scenario"])))
    key = context.run_config.get("key-file")
    return SimulatedSites(scenario, str(context.run_config.get("ledger-dir", "veil-ledgers")),
                          str(key) if key else None)(context)


@functools.cache
def _in_process() -> ClientApp:
    """The whole site app in this process (imports torch): simulations, and a worker that is down."""
    from client.app import build_client_app

    return build_client_app(resolve_site)


def _site_error(msg: Message, context: Context, detail: str) -> Message:
    label = str(context.node_config.get("site-id") or f"node-{context.node_id}")
    return Message(content=RecordDict({P.REFUSAL: P.Refusal("site-error", detail).to_config(),
                                       P.SITE: P.SiteInfo(label, "?", 0.0, 0).to_config()}), reply_to=msg)


def handle(msg: Message, context: Context) -> Message:
    """Every message type: to the site's worker when it has one, else answered here."""
    path = context.node_config.get("site-socket")
    if path:
        try:
            return worker.forward(msg, context, str(path))
        except worker.WorkerUnavailable as err:
            logs.configure()
            logs.get_logger("client").warning("%s; answering this %s message in the ClientApp process "
                                               "instead", err, msg.metadata.message_type)
        except worker.WorkerBroke as err:  # it may have charged: never run the message twice
            logs.configure()
            logs.get_logger("client").error("site worker: %s", err)
            return _site_error(msg, context, str(err))
    return _in_process()(msg, context)


app = ClientApp()
app.query("budget")(handle)
app.query("identity")(handle)
app.train()(handle)
app.evaluate()(handle)
