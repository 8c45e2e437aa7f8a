"""The ServerApp that ``flwr run`` and ``veil run`` start on the coordinator.

``veil run`` sends the whole scenario as ``scenario-json`` (the coordinator's machine need
not have the researcher's file); ``flwr run .`` names a ``scenario`` file. The store is the
coordinator's own (``VEIL_STORE``, set by ``veil coordinator start``), falling back to the
run config's ``store``; likewise its CKKS parameters file (``VEIL_COORDINATOR_KEY``).
"""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.coordinator import run_federation
from server.lifecycle import record_run
from server.store import RunStore
from veil import env, logs
from veil.errors import ScenarioError
from veil.spec import REPRODUCIBLE_REFUSED, load_scenario, parse_scenario

log = logs.get_logger("server")
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Read the scenario, refuse reproducible noise, record the run and run it."""
    logs.configure()  # the ServerApp's own process: its log is what `veil run` streams
    deployed = bool(context.run_config.get("scenario-json"))
    scenario = (parse_scenario(json.loads(str(context.run_config["scenario-json"])), "veil run")
                if deployed else load_scenario(str(context.run_config["scenario"])))
    if scenario.privacy.reproducible_noise:  # refused before anything is recorded, asked or trained
        raise ScenarioError(REPRODUCIBLE_REFUSED)
    store = RunStore(env.store_url(None, fallback=str(context.run_config.get("store", env.DEFAULT_STORE_URL))))
    key = env.get(env.COORDINATOR_KEY) or context.run_config.get("coordinator-key")
    try:
        with record_run(store, scenario, mode="deployment" if deployed else "simulation") as run_id:
            log.info("run %d (%s) recorded in %s", run_id, scenario.name, store.safe_url)
            run_federation(grid, scenario, store, run_id, env.artifacts_dir().resolve(),
                           coordinator_key=Path(str(key)) if key else None)
    finally:
        store.close()
