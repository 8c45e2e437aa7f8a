"""The ServerApp that ``flwr run`` and ``veil run`` start on the coordinator.

On a deployed coordinator (``veil coordinator start`` sets ``VEIL_RESEARCHERS``) a run must
come as ``run-request``: a researcher's signed request holding the whole scenario (``veil
run`` signs and sends it). It is admitted (``server.admission``) before anything is recorded
as a run or asked of a site. Without ``VEIL_RESEARCHERS`` this is ``flwr run .``'s local
simulation of the ``scenario`` file, signed with an ephemeral key only simulated sites accept.
The store is the coordinator's own (``VEIL_STORE``), falling back to the run config's
``store``; likewise its CKKS parameters file (``VEIL_COORDINATOR_KEY``).
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from privacy.requests import ephemeral_request
from server.admission import admit, admitted_researchers, bind
from server.coordinator import run_federation
from server.lifecycle import note_flower_run, record_run
from server.rounds import format_progress
from server.store import RunStore
from veil import env, logs
from veil.apps import app_relative
from veil.errors import ScenarioError
from veil.names import RunMode
from veil.spec import REPRODUCIBLE_REFUSED, load_scenario, parse_scenario

log = logs.get_logger("server")
app = ServerApp()


def _deployable(raw: dict[str, object]) -> None:
    """A deployed run's scenario: valid, and never reproducible (seeded) noise."""
    if parse_scenario(raw, "veil run").privacy.reproducible_noise:
        raise ScenarioError(REPRODUCIBLE_REFUSED)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Admit the signed request (or sign a local simulation), record the run and run it."""
    logs.configure()  # the ServerApp's own process: its log is what `veil run` streams
    deployed = env.get(env.RESEARCHERS) is not None or bool(context.run_config.get("run-request"))
    store = RunStore(env.store_url(None, fallback=str(context.run_config.get("store", env.DEFAULT_STORE_URL))))
    key = env.get(env.COORDINATOR_KEY) or context.run_config.get("coordinator-key")
    try:
        if deployed:
            request, signer = admit(store, context.run_config.get("run-request"),
                                    admitted_researchers(env.get(env.RESEARCHERS)), validate=_deployable)
            scenario = parse_scenario(request.scenario, "veil run")
        else:
            scenario = load_scenario(app_relative(str(context.run_config["scenario"])))
            request = ephemeral_request(scenario.model_dump(mode="json"))
            signer = request.verify({}, accept_ephemeral=True)
        if scenario.privacy.reproducible_noise:
            raise ScenarioError(REPRODUCIBLE_REFUSED)
        mode: RunMode = "deployment"  # only `veil simulate` records "simulation" (its own ServerApp)
        with record_run(store, scenario, mode=mode, researcher=signer) as run_id:
            bind(store, request, run_id)
            note_flower_run(store, run_id, context.run_id)
            log.info("run %d (%s) for %s recorded in %s", run_id, scenario.name, signer.label(), store.safe_url)
            run_federation(grid, scenario, store, run_id, env.artifacts_dir().resolve(),
                           on_round=lambda info: log.info("%s", format_progress(info)),
                           coordinator_key=Path(str(key)) if key else None, request=request)
    finally:
        store.close()
