"""The coordinator's Flower ServerApp.

``build_server_app(scenario, store, run_id)`` makes the app that ``veil simulate`` runs;
``app`` (module level) is what ``flwr run .`` loads: it reads the scenario file and store URL
from the run config and creates the run record itself. Both run ``run_federation``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from server.recording import RecordingStrategy, aggregate_train_metrics
from server.store import RunStore
from veil import protocol as P
from veil.logs import get_logger
from veil.models import build_model, count_parameters
from veil.spec import Scenario

log = get_logger("server")
ProgressFn = Callable[[dict[str, float | int | None]], None]


def save_checkpoint(store: RunStore, run_id: int, round_number: int | None, arrays: ArrayRecord,
                    directory: Path) -> Path:
    """Write a checkpoint file and record its URI, sha256 and size (never a blob in the DB).

    Written to a temporary name and renamed, so a crash never leaves a truncated file
    behind a recorded hash.
    """
    directory.mkdir(parents=True, exist_ok=True)
    name = f"round-{round_number:04d}.pt" if round_number is not None else "final.pt"
    path = (directory / name).resolve()
    tmp = path.with_suffix(".tmp")
    torch.save(arrays.to_torch_state_dict(), tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    tmp.replace(path)
    data = path.read_bytes()
    store.add_artifact(run_id, round_number=round_number, kind="checkpoint", uri=path.as_uri(),
                       sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data))
    return path


def run_federation(grid: Grid, scenario: Scenario, store: RunStore, run_id: int,
                   artifacts_dir: Path, on_round: ProgressFn | None = None) -> ArrayRecord:
    """Run every round of ``scenario`` on ``grid``; record it all under ``run_id``."""
    fed = scenario.federation
    model = build_model(scenario.model.arch, seed=scenario.seed)
    p = scenario.privacy
    log.info(
        "run %d: %d sites x %d rounds, model %s (%d params), DP-SGD %s, C=%g, accountant=%s, "
        "Poisson sampling; Opacus secure_mode off (simulation-grade RNG)",
        run_id, fed.sites, fed.rounds, scenario.model.arch, count_parameters(model),
        f"sigma={p.noise_multiplier}" if p.noise_multiplier else f"target eps={p.target_epsilon}",
        p.max_grad_norm, p.accountant,
    )
    min_sites = min(fed.min_sites, fed.sites)
    inner = FedAvg(
        fraction_train=fed.fraction_train,
        fraction_evaluate=1.0,
        min_train_nodes=min_sites,
        min_evaluate_nodes=min_sites,
        min_available_nodes=fed.sites,
        weighted_by_key=P.NUM_EXAMPLES,
        arrayrecord_key=P.ARRAYS,
        configrecord_key=P.TASK,
        train_metrics_aggr_fn=aggregate_train_metrics,
    )
    strategy = RecordingStrategy(inner, store, run_id, num_rounds=fed.rounds, min_sites=min_sites,
                                 on_round=on_round)
    task = P.TrainTask.from_scenario(scenario)
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=fed.rounds,
        timeout=fed.round_timeout_s,
        train_config=task.to_config(),
        evaluate_config=ConfigRecord({"arch": scenario.model.arch}),
    )
    save_checkpoint(store, run_id, fed.rounds, result.arrays, artifacts_dir / f"run-{run_id}")
    return result.arrays


def build_server_app(scenario: Scenario, store_url: str, run_id: int, artifacts_dir: Path,
                     on_round: ProgressFn | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        store = RunStore(store_url)
        try:
            run_federation(grid, scenario, store, run_id, artifacts_dir, on_round)
        finally:
            store.close()

    return app


app = ServerApp()


@app.main()
def _flwr_run_main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run .``: scenario and store come from the run config."""
    from simulations.simulate import record_run
    from veil.spec import load_scenario

    scenario = load_scenario(str(context.run_config["scenario"]))
    store = RunStore(str(context.run_config.get("store", "sqlite:///veil.db")))
    try:
        with record_run(store, scenario) as run_id:
            run_federation(grid, scenario, store, run_id, Path("veil-artifacts"))
    finally:
        store.close()
