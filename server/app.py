"""The coordinator's Flower ServerApp.

``build_server_app(scenario, store, run_id)`` makes the app that ``veil simulate`` runs;
``app`` (module level) is what ``flwr run .`` loads: it reads the scenario file and store URL
from the run config and creates the run record itself. Both run ``run_federation``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from privacy.ckks import CoordinatorContext
from privacy.randomness import describe
from server.budget import ParticipationPlan, ask_budgets, check_ledgers, wait_for_nodes
from server.recording import Model, RecordingStrategy, aggregate_train_metrics
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


def save_encrypted_checkpoint(store: RunStore, run_id: int, round_number: int, model: ConfigRecord,
                              arch: str, directory: Path) -> Path:
    """The encrypted aggregate as a file (only key holders can read it; ``veil keys decrypt``)."""
    enc = P.encrypted_from(RecordDict({P.ENC_MODEL: model}), P.ENC_MODEL)
    directory.mkdir(parents=True, exist_ok=True)
    path = (directory / f"round-{round_number:04d}.ckks").resolve()
    layout = [[k, list(v.shape), str(v.dtype).removeprefix("torch.")]
              for k, v in build_model(arch).state_dict().items()]
    enc.to_file(path, {"arch": arch, "layout": layout, "run_id": run_id, "round": round_number,
                       "stream": "weighted sum of all layers in state_dict order; last value: total weight"})
    data = path.read_bytes()
    store.add_artifact(run_id, round_number=round_number, kind="encrypted-checkpoint", uri=path.as_uri(),
                       sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data))
    return path


def load_coordinator_context(scenario: Scenario, coordinator_key: Path | None) -> CoordinatorContext | None:
    """The coordinator's CKKS context when the scenario encrypts; a secret key is refused."""
    if not scenario.encryption.enabled:
        return None
    if coordinator_key is None:
        raise ValueError("the scenario turns CKKS on, but the coordinator was given no coordinator.ckks")
    cipher = CoordinatorContext.load(coordinator_key)
    assert not cipher.is_private()
    return cipher


def run_federation(grid: Grid, scenario: Scenario, store: RunStore, run_id: int,
                   artifacts_dir: Path, on_round: ProgressFn | None = None,
                   coordinator_key: Path | None = None) -> Model | None:
    """Run ``scenario`` on ``grid`` and record it all under ``run_id``.

    Order: budget pre-flight (every site answers from its own ledger and policy), then the
    participation plan, then the rounds. A run the plan cannot honour is marked ``refused``
    before anything trains and returns None; a run whose sites run out of budget midway
    (``on_budget_exhausted: drop``) stops early and is marked ``stopped`` with the reason.
    """
    fed = scenario.federation
    model = build_model(scenario.model.key, seed=scenario.seed)
    p = scenario.privacy
    log.info(
        "run %d: %d sites x %d rounds (%d sampled per round), model %s (%d params), DP-SGD %s, "
        "C=%g, accountant=%s, Poisson sampling; noise and sampling %s",
        run_id, fed.sites, fed.rounds, scenario.sites_per_round(), scenario.model.key,
        count_parameters(model),
        f"sigma={p.noise_multiplier}" if p.noise_multiplier else f"target eps={p.target_epsilon}",
        p.max_grad_norm, p.accountant, describe("seeded" if p.reproducible_noise else "os-entropy"),
    )
    if p.reproducible_noise:
        log.warning("run %d: privacy.reproducible_noise is on: every site's DP noise can be recomputed from "
                    "seed %d, so this run is NOT private (simulation research only)", run_id, scenario.seed)
    min_sites = min(fed.min_sites, fed.sites)
    inner = FedAvg(
        fraction_train=1.0,  # who trains is the participation plan's decision, not FedAvg's
        fraction_evaluate=1.0,
        min_train_nodes=1,
        min_evaluate_nodes=1,
        min_available_nodes=1,
        weighted_by_key=P.NUM_EXAMPLES,
        arrayrecord_key=P.ARRAYS,
        configrecord_key=P.TASK,
        train_metrics_aggr_fn=aggregate_train_metrics,
    )
    task = P.TrainTask.from_scenario(scenario).for_run(f"veil-run-{run_id}:{scenario.spec_hash()[:12]}")
    enc = scenario.encryption
    cipher = load_coordinator_context(scenario, coordinator_key)
    public: dict[str, str | float | bool] = {}  # what every site gets to know about the encryption
    if cipher is not None:
        public[P.ENC_KEY_ID] = cipher.key_id
        description = {"aggregation": enc.aggregation, "evaluation": enc.evaluation,
                       "key_id": cipher.key_id, "params": cipher.params.to_dict()}
        store.set_encryption(run_id, json.dumps(description))
        log.info("run %d: CKKS %s, key set %s, N=%d, moduli %s bits, scale 2^%d, %d B/value; coordinator "
                 "context holds no secret key (private: %s)", run_id,
                 "+".join(k for k in ("aggregation", "evaluation") if description[k] == "ckks"),
                 cipher.key_id, cipher.params.poly_modulus_degree, list(cipher.params.coeff_mod_bit_sizes),
                 cipher.params.scale_bits, cipher.params.ciphertext_bytes // cipher.params.slots,
                 cipher.is_private())

    def task_config() -> ConfigRecord:
        config = task.to_config()
        for key, value in public.items():
            config[key] = value
        return config

    nodes = wait_for_nodes(grid, fed.sites, fed.round_timeout_s)
    standings = ask_budgets(grid, nodes, task_config(), fed.round_timeout_s)
    check_ledgers(store, run_id, standings)
    plan = ParticipationPlan(standings, rounds=fed.rounds, per_round=scenario.sites_per_round(),
                             min_sites=min_sites, mode=fed.on_budget_exhausted, seed=scenario.seed)
    if cipher is not None:  # sites weight by n / norm: every weighted sum stays within max |value|
        public[P.ENC_WEIGHT_NORM] = float(max(1, sum(st.status.num_examples for st in standings.values()
                                                     if st.status is not None)))
        public[P.ENC_EVAL] = enc.evaluation == "ckks"
    strategy = RecordingStrategy(
        inner, store, run_id, num_rounds=fed.rounds, min_sites=min_sites, on_round=on_round, plan=plan,
        cipher=cipher, stream_values=count_parameters(model) + 1,
        encrypted_train=enc.aggregation == "ckks", encrypted_eval=enc.evaluation == "ckks",
        weight_norm=float(public.get(P.ENC_WEIGHT_NORM, 0.0)), rng=task.rng,
    )
    strategy.record_preflight(standings)
    answered = sum(1 for st in standings.values() if st.status is not None)
    if answered < min_sites:  # sites broken, not refusing: a failure, not a budget decision
        failures = "; ".join(f"{st.site_id}: {st.failure}" for st in standings.values() if st.failure)
        message = (f"pre-flight: only {answered} of {len(standings)} sites answered the budget "
                   f"question (min_sites {min_sites}): {failures}")
        log.error("run %d %s", run_id, message)
        store.finish_run(run_id, status="failed", error=message[:4000])
        return None
    reasons = plan.refusal_reasons()
    if reasons:
        message = "refused before training (on_budget_exhausted: refuse): " + "; ".join(reasons)
        log.warning("run %d %s", run_id, message)
        store.finish_run(run_id, status="refused", error=message[:4000])
        return None
    for st in sorted(standings.values(), key=lambda st: st.site_id):
        if st.status is not None:
            b = st.status
            log.info("pre-flight %s: spent ε=%.3f, cap %s, σ=%.3f, q=%.4f, can afford %d of %d rounds%s",
                     b.site_id, b.spent, "none" if b.cap is None else f"{b.cap:g}", b.noise_multiplier,
                     b.sample_rate, b.affordable_rounds, fed.rounds,
                     f"; refuses: {b.refusal}" if b.refusal else "")
        else:
            log.warning("pre-flight node %d: %s", st.node, st.failure)

    arrays: Model = ArrayRecord(model.state_dict())  # round 1 starts from the public initial model
    for server_round in range(1, fed.rounds + 1):
        messages = list(strategy.configure_train(server_round, arrays, task_config(), grid))
        if not messages:
            break
        replies = grid.send_and_receive(messages, timeout=fed.round_timeout_s)
        new_arrays, _ = strategy.aggregate_train(server_round, replies)
        if new_arrays is not None:
            arrays = new_arrays
        eval_config = ConfigRecord({"arch": scenario.model.key, **public})
        replies = grid.send_and_receive(
            strategy.configure_evaluate(server_round, arrays, eval_config, grid),
            timeout=fed.round_timeout_s,
        )
        strategy.aggregate_evaluate(server_round, replies)
    if isinstance(arrays, ConfigRecord):
        save_encrypted_checkpoint(store, run_id, fed.rounds, arrays, scenario.model.key,
                                  artifacts_dir / f"run-{run_id}")
    else:
        save_checkpoint(store, run_id, fed.rounds, arrays, artifacts_dir / f"run-{run_id}")
    if plan.stopped:
        log.warning("run %d %s", run_id, plan.stopped)
        store.finish_run(run_id, status="stopped", error=plan.stopped)
    return arrays


def build_server_app(scenario: Scenario, store_url: str, run_id: int, artifacts_dir: Path,
                     on_round: ProgressFn | None = None, coordinator_key: Path | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        store = RunStore(store_url)
        try:
            run_federation(grid, scenario, store, run_id, artifacts_dir, on_round, coordinator_key)
        finally:
            store.close()

    return app


app = ServerApp()


@app.main()
def _flwr_run_main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run`` and ``veil run``.

    ``veil run`` sends the whole scenario as ``scenario-json`` (the coordinator's machine need
    not have the researcher's file); ``flwr run .`` names a ``scenario`` file. The store is
    the coordinator's own (``VEIL_STORE``, set by ``veil coordinator start``), falling back
    to the run config's ``store``; likewise its CKKS parameters file (``VEIL_COORDINATOR_KEY``).
    """
    import json
    import os

    from simulations.simulate import record_run
    from veil import logs
    from veil.errors import ScenarioError
    from veil.spec import REPRODUCIBLE_REFUSED, load_scenario, parse_scenario

    logs.configure()  # the ServerApp's own process: its log is what `veil run` streams
    deployed = bool(context.run_config.get("scenario-json"))
    scenario = (parse_scenario(json.loads(str(context.run_config["scenario-json"])), "veil run")
                if deployed else load_scenario(str(context.run_config["scenario"])))
    if scenario.privacy.reproducible_noise:  # refused before anything is recorded, asked or trained
        raise ScenarioError(REPRODUCIBLE_REFUSED)
    store = RunStore(os.environ.get("VEIL_STORE") or str(context.run_config.get("store", "sqlite:///veil.db")))
    key = os.environ.get("VEIL_COORDINATOR_KEY") or context.run_config.get("coordinator-key")
    artifacts = Path(os.environ.get("VEIL_ARTIFACTS", "veil-artifacts"))
    try:
        with record_run(store, scenario, mode="deployment" if deployed else "simulation") as run_id:
            log.info("run %d (%s) recorded in %s", run_id, scenario.name, store.safe_url)
            run_federation(grid, scenario, store, run_id, artifacts.resolve(),
                           coordinator_key=Path(str(key)) if key else None)
    finally:
        store.close()
