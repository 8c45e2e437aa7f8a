"""``veil simulate``: a whole federation on this machine through Flower's simulation engine.

Order matters: the scenario is validated and the data partitioned *before* the run record
is created, so an invalid scenario writes nothing. Once the run exists, any failure
(including Ctrl-C) marks it ``failed`` with the error; it is never left ``running``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy as np

from client.app import build_client_app
from client.data import load_builtin
from privacy.requests import ephemeral_request
from server.coordinator import build_server_app
from server.lifecycle import first_failure, record_run
from server.rounds import format_progress
from server.store import RunStore
from simulations.engine import seams
from simulations.federation import SimulatedSites, site_id
from veil.config import clean
from veil.errors import BudgetRefusedError, EncryptionError, LedgerError, RunFailedError, ScenarioError, VeilError
from veil.files import file_kind, resolved, temp_beside
from veil.logs import get_logger
from veil.spec import Scenario

log = get_logger("simulate")


@dataclass
class SimulationResult:
    """A finished simulation: its run id in the store, wall time in seconds, and each round's progress record."""

    run_id: int
    wall_seconds: float
    rounds: list[dict[str, float | int | None]] = field(default_factory=list)


def backend_config(scenario: Scenario) -> dict[str, object]:
    """Ray resources: one CPU per simulated site; a share of the GPU when sites use CUDA."""
    import torch

    cpus = os.cpu_count() or 1
    use_gpu = scenario.device != "cpu" and torch.cuda.is_available()
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.25 if use_gpu else 0.0},
        "init_args": {"num_cpus": cpus, "include_dashboard": False, "logging_level": "ERROR"},
    }


def start_ray(config: dict[str, object]) -> None:
    """Start Ray here with Flower's ``init_args`` (Flower then reuses it) instead of letting Flower
    start it: Flower would add a ``runtime_env``, and Ray then boots a fresh worker process for
    each actor rather than handing it one of the workers it pre-started (~1 s of CPU each). The
    workers find Veil through ``PYTHONPATH``, set as Flower sets it. They run at the driver's
    priority (``RAY_worker_niceness=0`` unless already set): at Ray's default nice 15, any other
    load on the machine starves the sites while the coordinator waits for them."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_worker_niceness", "0")
    paths = os.pathsep.join(sys.path)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (paths, os.environ.get("PYTHONPATH")) if p)
    ray.init(**cast(dict[str, Any], config["init_args"]))


@dataclass(frozen=True)
class KeyPaths:
    """The run's CKKS key files: ``secret.ckks`` for the sites, ``coordinator.ckks`` for the coordinator."""

    secret: Path
    coordinator: Path


def prepare_keys(scenario: Scenario, fresh_dir: Path) -> KeyPaths | None:
    """The run's CKKS key set: the scenario's ``encryption.keys``, or a fresh one in ``fresh_dir``.

    A fresh key set is made in a child process (``veil keys create``'s code), so this process,
    which also runs the coordinator, never generates or holds a secret key."""
    enc = scenario.encryption
    if not enc.enabled:
        return None
    if enc.keys is not None:
        directory = Path(enc.keys).expanduser().resolve()
        paths = KeyPaths(directory / "secret.ckks", directory / "coordinator.ckks")
        for p in (paths.secret, paths.coordinator):
            if not p.is_file():
                raise EncryptionError(f"encryption.keys: {p} not found "
                                      "(make a key set with: veil keys create DIR)")
        return paths
    code = ("import json, sys; from pathlib import Path; from privacy.ckks import CkksParams, create_keyset; "
            "create_keyset(Path(sys.argv[1]), CkksParams.from_dict(json.loads(sys.argv[2])))")
    proc = subprocess.run([sys.executable, "-c", code, str(fresh_dir), json.dumps(enc.params().to_dict())],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise EncryptionError(f"could not create a CKKS key set in {fresh_dir}: {proc.stderr.strip()[-800:]}")
    log.info("created a fresh CKKS key set for this run in %s", fresh_dir)
    return KeyPaths(fresh_dir / "secret.ckks", fresh_dir / "coordinator.ckks")


def check_model_fits(scenario: Scenario) -> None:
    """The data's records fit the scenario's model (features per record, label classes), or a
    ScenarioError naming the setting to change."""
    model, data = scenario.model, load_builtin(scenario.data.source)
    features = int(np.prod(data.features.shape[1:]))
    if features != model.in_features:
        raise ScenarioError(f"model.in_features is {model.in_features} but {scenario.data.source} records "
                            f"have {features} features; set model.in_features: {features}")
    classes = int(data.labels.max()) + 1
    if classes > model.num_classes:
        raise ScenarioError(f"model.num_classes is {model.num_classes} but {scenario.data.source} has "
                            f"{classes} classes; set model.num_classes: {classes}")


def usable_dir(path: Path | str, option: str, error: type[VeilError], *, make: bool) -> Path:
    """``path`` resolved; a directory or nothing yet, else ``error`` in one line (a regular file or
    a device in its place, a symlink loop). With ``make``, it is created and must be writable."""
    where = clean(str(path))
    try:
        directory = resolved(path)
    except OSError as err:
        raise error(f"{option} {where}: {clean(err.strerror or str(err), 120)}") from None
    if directory.exists() and not directory.is_dir():
        raise error(f"{option} {where} is {file_kind(directory.stat().st_mode)}, not a directory; "
                    "name a directory (it is created if missing)")
    if make:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            probe = temp_beside(directory / "write-check")
            probe.touch(mode=0o600, exist_ok=False)
            probe.unlink()
        except OSError as err:
            raise error(f"{option} {where} cannot be used as a directory: "
                        f"{clean(err.strerror or str(err), 120)}") from None
    return directory


def check_runnable(scenario: Scenario, ledger_dir: Path | str, artifacts_dir: Path | str) -> SimulatedSites:
    """Everything a simulation needs that can be checked before it is recorded: the data splits
    into the scenario's sites, its records fit the model, a named key set exists. Raises a
    VeilError with one line; writes nothing to the store and no ledger. The ledger and artifacts
    directories are made here (when missing) and must be writable directories, so a bad one is
    refused before any site is charged."""
    ledgers = usable_dir(ledger_dir, "--ledger-dir", LedgerError, make=False)
    usable_dir(artifacts_dir, "--artifacts-dir", VeilError, make=False)
    sites = SimulatedSites(scenario, str(ledgers), allow_seeded_noise=True).with_partitions()
    parts = sites.partitions()
    log.info("partitioned %s into %d sites (%s): train sizes %s", scenario.data.source,
             len(parts), scenario.data.partitioner, [len(p.train) for p in parts])
    check_model_fits(scenario)
    if scenario.encryption.enabled and scenario.encryption.keys is not None:
        prepare_keys(scenario, Path(artifacts_dir))  # only checks that the named key set exists
    usable_dir(ledger_dir, "--ledger-dir", LedgerError, make=True)  # last: a refused scenario makes nothing
    usable_dir(artifacts_dir, "--artifacts-dir", VeilError, make=True)
    return sites


def simulate(scenario: Scenario, store: RunStore, artifacts_dir: Path,
             progress: bool = True, ledger_dir: Path | str = "veil-ledgers") -> SimulationResult:
    """Run ``scenario`` end to end and return its run id; everything lands in ``store``."""
    from flwr.simulation import run_simulation

    sites = check_runnable(scenario, ledger_dir, artifacts_dir)

    rounds: list[dict[str, float | int | None]] = []

    def on_round(info: dict[str, float | int | None]) -> None:
        rounds.append(info)
        if progress:
            print(format_progress(info), flush=True)

    start = time.perf_counter()
    request = ephemeral_request(scenario.model_dump(mode="json"))  # the simulated sites check it too
    signer = request.verify({}, accept_ephemeral=True)
    with record_run(store, scenario, researcher=signer) as run_id:
        keys = prepare_keys(scenario, resolved(artifacts_dir) / f"run-{run_id}" / "keys")
        with seams(site_id) as nodes:  # a round costs its sampled sites, not every node (simulations.engine)
            server_app = build_server_app(scenario, store.url, run_id, artifacts_dir, on_round,
                                          coordinator_key=keys.coordinator if keys else None, request=request,
                                          known_sites=nodes.sites)
            client_app = build_client_app(replace(sites, keys=str(keys.secret)) if keys else sites)
            ray_config = backend_config(scenario)
            start_ray(ray_config)  # Flower shuts it down when the run ends
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=scenario.federation.sites,
                backend_config=ray_config,  # type: ignore[arg-type]
            )
        run = store.get_run(run_id)
        if run.status == "refused":
            raise BudgetRefusedError(f"run {run_id} {run.error}", run_id=run_id)
        if run.status == "failed":
            raise RunFailedError(f"run {run_id} failed: {run.error}", run_id=run_id)
        if len(rounds) != scenario.federation.rounds and run.status != "stopped":
            raise RunFailedError(
                f"run {run_id} ended after {len(rounds)} of {scenario.federation.rounds} rounds", run_id=run_id)
        if not any(int(r["sites_ok"] or 0) >= scenario.federation.min_sites for r in rounds):
            raise RunFailedError(
                f"run {run_id} failed: no round had enough usable site replies; first reason recorded: "
                f"{first_failure(store, run_id)}", run_id=run_id)
    return SimulationResult(run_id, time.perf_counter() - start, rounds)
