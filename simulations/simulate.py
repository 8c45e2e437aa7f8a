"""``veil simulate``: a whole federation on this machine through Flower's simulation engine.

Order matters: the scenario is validated and the data partitioned *before* the run record
is created, so an invalid scenario writes nothing. Once the run exists, any failure
(including Ctrl-C) marks it ``failed`` with the error; it is never left ``running``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from server.store import RunStore
from veil.errors import BudgetRefusedError
from veil.logs import get_logger
from veil.spec import Scenario

log = get_logger("simulate")


@contextmanager
def record_run(store: RunStore, scenario: Scenario) -> Iterator[int]:
    """Create the run; mark it completed on success, failed (with the error) otherwise.

    A status the run already reached on its own (``refused``, ``stopped``) is kept.
    """
    run_id = store.create_run(
        name=scenario.name, spec=scenario.model_dump(mode="json"), spec_hash=scenario.spec_hash(),
        seed=scenario.seed, num_sites=scenario.federation.sites,
        num_rounds=scenario.federation.rounds,
    )
    try:
        yield run_id
    except BaseException as err:
        if store.get_run(run_id).status == "running":
            reason = "interrupted" if isinstance(err, KeyboardInterrupt) else f"{type(err).__name__}: {err}"
            store.finish_run(run_id, status="failed", error=reason[:4000])
        raise
    if store.get_run(run_id).status == "running":
        store.finish_run(run_id, status="completed")


@dataclass
class SimulationResult:
    run_id: int
    wall_seconds: float
    rounds: list[dict[str, float | int | None]] = field(default_factory=list)


def first_failure(store: RunStore, run_id: int) -> str:
    from sqlalchemy import select

    from server.store import schema as S

    with store.session() as s:
        reason = s.scalar(
            select(S.Participation.reason)
            .where(S.Participation.run_id == run_id, S.Participation.status != "ok")
            .order_by(S.Participation.id).limit(1)
        )
    return reason or "none"


def format_progress(info: dict[str, float | int | None]) -> str:
    parts = [f"round {info['round']}/{info['rounds']}:"]
    if info["accuracy"] is not None:
        parts.append(f"accuracy {info['accuracy']:.4f}, loss {info['loss']:.4f},")
    if info["max_epsilon"] is not None:
        parts.append(f"max ε {info['max_epsilon']:.3f},")
    parts.append(f"{info['sites_ok']}/{info['sites_sampled']} sites trained, {info['seconds']:.1f}s")
    return " ".join(parts)


def backend_config(scenario: Scenario) -> dict[str, object]:
    """Ray resources: one CPU per simulated site; a share of the GPU when sites use CUDA."""
    import torch

    cpus = os.cpu_count() or 1
    use_gpu = scenario.device != "cpu" and torch.cuda.is_available()
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.25 if use_gpu else 0.0},
        "init_args": {"num_cpus": cpus, "include_dashboard": False, "logging_level": "ERROR"},
    }


def simulate(scenario: Scenario, store: RunStore, artifacts_dir: Path,
             progress: bool = True, ledger_dir: Path | str = "veil-ledgers") -> SimulationResult:
    """Run ``scenario`` end to end and return its run id; everything lands in ``store``."""
    from flwr.simulation import run_simulation

    from client.app import build_client_app
    from server.app import build_server_app
    from simulations.federation import SimulatedSites

    sites = SimulatedSites(scenario, str(Path(ledger_dir).expanduser().resolve()))
    parts = sites.partitions()  # fails here, before any record, if the data cannot be split
    log.info("partitioned %s into %d sites (%s): train sizes %s", scenario.data.source,
             len(parts), scenario.data.partitioner, [len(p.train) for p in parts])

    rounds: list[dict[str, float | int | None]] = []

    def on_round(info: dict[str, float | int | None]) -> None:
        rounds.append(info)
        if progress:
            print(format_progress(info), flush=True)

    start = time.perf_counter()
    with record_run(store, scenario) as run_id:
        server_app = build_server_app(scenario, store.url, run_id, artifacts_dir, on_round)
        client_app = build_client_app(sites)
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=scenario.federation.sites,
            backend_config=backend_config(scenario),  # type: ignore[arg-type]
        )
        run = store.get_run(run_id)
        if run.status == "refused":
            raise BudgetRefusedError(f"run {run_id} {run.error}", run_id=run_id)
        if run.status == "failed":
            raise RuntimeError(f"run {run_id} failed: {run.error}")
        if len(rounds) != scenario.federation.rounds and run.status != "stopped":
            raise RuntimeError(
                f"the simulation ended after {len(rounds)} of {scenario.federation.rounds} rounds"
            )
        if not any(int(r["sites_ok"] or 0) >= scenario.federation.min_sites for r in rounds):
            raise RuntimeError(
                "no round had enough usable site replies; first reason recorded: "
                f"{first_failure(store, run_id)}"
            )
    return SimulationResult(run_id, time.perf_counter() - start, rounds)
