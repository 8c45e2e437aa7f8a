"""Run only the Veil installed on this machine, whatever app bundle (FAB) a run names.

Flower ships each run's app as a FAB and, by default, imports the ServerApp and ClientApp from
it: whoever can submit a run (anyone who reaches the SuperLink's Control API with the CA
certificate) would choose the code that runs at the coordinator and at every site, and could
skip every check Veil makes. Veil's site daemon and coordinator therefore put their own
``flwr-clientapp`` / ``flwr-serverapp`` first on Flower's ``PATH`` (``veil.processes.pinned_path``):
Flower's own runners, with the app loader replaced by the apps installed here. A FAB still
carries its run config (data); its code is never imported.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def _installed_client_loader(*_args: Any, **_kwargs: Any) -> Callable[[str, str, str], Any]:
    def load(fab_id: str, fab_version: str, fab_hash: str) -> Any:
        from veil.apps.clientapp import app

        return app

    return load


def clientapp() -> None:
    """``flwr-clientapp``, loading ``veil.apps.clientapp:app`` from this installation."""
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    runtime: Any = importlib.import_module("flwr.supernode.runtime.run_clientapp")  # the module, not its function
    if not hasattr(runtime, "get_load_client_app_fn"):
        raise RuntimeError("Flower's ClientApp runner changed; Veil cannot pin its app (upgrade Veil)")

    runtime.get_load_client_app_fn = _installed_client_loader
    flwr_clientapp()


def serverapp() -> None:
    """``flwr-serverapp``, running ``veil.apps.serverapp:app`` from this installation."""
    from flwr.superlink.cli.flwr_serverapp import flwr_serverapp

    runtime: Any = importlib.import_module("flwr.superlink.runtime.run_serverapp")  # the module, not its function
    if not hasattr(runtime, "run_"):
        raise RuntimeError("Flower's ServerApp runner changed; Veil cannot pin its app (upgrade Veil)")

    original = runtime.run_

    def run_installed(grid: Any, context: Any, server_app_dir: str, server_app_attr: str | None = None,
                      loaded_server_app: Any = None) -> Any:
        from veil.apps.serverapp import app

        return original(grid=grid, context=context, server_app_dir=server_app_dir, loaded_server_app=app)

    runtime.run_ = run_installed
    flwr_serverapp()
