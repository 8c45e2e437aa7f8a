"""The coordinator: one run of a scenario on a Flower grid, from pre-flight to the last round.

``run_federation`` is the whole run: budget pre-flight (each site answers from its own ledger
and policy), the participation plan, then the rounds (``train_rounds``, the one round loop),
then the final checkpoint. ``build_server_app`` wraps it in the ServerApp that ``veil
simulate`` runs; the module-level app that ``flwr run`` loads lives in ``veil.apps.serverapp``.
The run record itself is made and ended by ``server.lifecycle``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from privacy.ckks import CoordinatorContext
from privacy.randomness import describe
from privacy.requests import SignedRequest
from server.budget import ParticipationPlan, TooFewSites, ask_budgets, check_ledgers, check_names, wait_for_nodes
from server.checkpoints import save_checkpoint, save_encrypted_checkpoint
from server.checks import Model, aggregate_train_metrics
from server.delivery import send_and_receive
from server.directory import check_directory, site_names
from server.lifecycle import end_run, first_failure
from server.robust import RobustRule
from server.rounds import ProgressFn, RoundWriter
from server.store import RunStore
from server.strategy import RecordingStrategy
from veil import protocol as P
from veil.logs import get_logger
from veil.models import build_model, count_parameters
from veil.server_opt import STATE_LAYOUT
from veil.spec import Scenario

log = get_logger("server")


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
                   coordinator_key: Path | None = None, request: SignedRequest | None = None,
                   known_sites: Callable[[], Mapping[int, str]] | None = None) -> Model | None:
    """Run ``scenario`` on ``grid`` and record it all under ``run_id``.

    Order: each node's site id (``server.directory``; ``known_sites`` may already know them), the
    participation plan, the budget pre-flight (each site asked answers from its own ledger and
    policy: in refuse mode the scheduled sites, up front, each for its planned rounds; in drop
    mode each round's sampled sites, when first sampled), then the rounds. A run the plan cannot
    honour is marked ``refused`` before anything trains and returns None; a run whose sites run
    out of budget midway (``on_budget_exhausted: drop``) stops early and is marked ``stopped`` with the reason.
    """
    fed = scenario.federation
    model = build_model(scenario.model.key, seed=scenario.seed)
    p = scenario.privacy
    noise = f"sigma={p.noise_multiplier}" if p.noise_multiplier else f"target eps={p.target_epsilon}"
    mechanism = (f"DP-SGD {noise}, C={p.max_grad_norm:g}, accountant={p.accountant}, Poisson sampling; "
                 f"noise and sampling {describe('seeded' if p.reproducible_noise else 'os-entropy')}"
                 if scenario.private else "NO DP (plain SGD: not private)")
    log.info("run %d: %d sites x %d rounds (%d sampled per round), model %s (%d params), %s", run_id, fed.sites,
             fed.rounds, scenario.sites_per_round(), scenario.model.key, count_parameters(model), mechanism)
    log.info("run %d: server optimiser %s%s", run_id, scenario.server_optimizer.optimizer().describe(),
             "; with CKKS on, every site applies its step to the decrypted aggregate"
             if scenario.encryption.aggregation == "ckks" and scenario.server_optimizer.rule != "fedavg" else "")
    if not scenario.private:
        log.warning("run %d: privacy.mechanism none: the sites train WITHOUT differential privacy; this run is "
                    "the NOT private baseline, recorded as such, and every site whose policy caps ε refuses it",
                    run_id)
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
    public: dict[str, str | float | bool] = {}  # what every site is sent beside the task
    if request is not None:  # each site checks whose run this is, and that the task is what they signed
        public[P.RUN_REQUEST] = request.to_json()
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

    try:
        nodes = wait_for_nodes(grid, fed.sites, fed.round_timeout_s)
    except TooFewSites as err:
        end_run(store, run_id, "failed", str(err))
        return None
    # who is who first (no budget question yet): refuse mode draws its schedule now, so only the
    # scheduled sites are asked, each for the rounds planned for it
    standings = site_names(grid, store, nodes, fed.round_timeout_s, known=known_sites() if known_sites else None)
    plan = ParticipationPlan(standings, rounds=fed.rounds, per_round=scenario.sites_per_round(),
                             min_sites=min_sites, mode=fed.on_budget_exhausted, seed=scenario.seed)
    writer = RoundWriter(store, run_id, num_rounds=fed.rounds, min_sites=min_sites, on_round=on_round)
    writer.preflight({n: st for n, st in standings.items() if st.failure})  # no name: never drawn

    def preflight(asked: list[int], server_round: int) -> None:
        """The budget question to ``asked`` (before ``server_round``), checked, admitted, recorded."""
        answers = ask_budgets(grid, asked, task_config(), fed.round_timeout_s, rounds=plan.site_rounds())
        for n, answer in answers.items():
            standings[n].take(answer)
        these = {n: standings[n] for n in asked}
        check_directory(these)
        check_names(store, these)  # before the ledgers: a wrong name must not touch another site's witness
        check_ledgers(store, run_id, these)
        plan.admit(asked)
        writer.preflight(these, server_round)

    # drop mode asks each round's sampled sites as they come up; refuse mode (and CKKS, whose
    # weight norm must cover every site that may train) asks everyone who may train, up front
    eager = plan.mode == "refuse" or cipher is not None
    if eager:
        asked = sorted(plan.joins()) if plan.mode == "refuse" else [n for n, st in standings.items()
                                                                      if not st.asked]
        preflight(asked, 0)
    else:
        plan.ask = preflight
    if cipher is not None:  # sites weight by n / norm: every weighted sum stays within max |value|
        public[P.ENC_WEIGHT_NORM] = float(max(1, sum(st.status.num_examples for st in standings.values()
                                                     if st.status is not None)))
        public[P.ENC_EVAL] = enc.evaluation == "ckks"
        public[P.SERVER_STATE_LAYOUT] = STATE_LAYOUT  # every site must read and write the state alike
    optimizer = scenario.server_optimizer.optimizer()
    params = count_parameters(model)
    strategy = RecordingStrategy(
        inner, writer, plan=plan, cipher=cipher, stream_values=params + optimizer.state_values(params) + 1,
        encrypted_train=enc.aggregation == "ckks", encrypted_eval=enc.evaluation == "ckks",
        weight_norm=float(public.get(P.ENC_WEIGHT_NORM, 0.0)), rng=task.rng, task=task,
        robust=RobustRule(scenario.robustness.rule, scenario.robustness.max_update_norm,
                          scenario.robustness.trim_fraction),
        optimizer=optimizer,
    )
    asked_now = [st for st in standings.values() if st.asked and st.name is not None]
    answered = sum(1 for st in asked_now if st.status is not None)
    if eager and answered < min_sites:  # sites broken, not refusing: a failure, not a budget decision
        failures = "; ".join(f"{st.site_id}: {st.failure}" for st in standings.values() if st.failure)
        message = (f"pre-flight: only {answered} of {len(asked_now)} sites answered the budget "
                   f"question (min_sites {min_sites}): {failures}")
        log.error("run %d %s", run_id, message)
        end_run(store, run_id, "failed", message)
        return None
    reasons = plan.refusal_reasons()
    if reasons:
        message = "refused before training (on_budget_exhausted: refuse): " + "; ".join(reasons)
        log.warning("run %d %s", run_id, message)
        end_run(store, run_id, "refused", message)
        return None
    for st in sorted(asked_now, key=lambda st: st.site_id):
        if st.status is not None:
            b = st.status
            log.info("pre-flight %s: spent ε=%.3f, cap %s, σ=%.3f, q=%.4f, can afford %d of %d rounds%s",
                     b.site_id, b.spent, "none" if b.cap is None else f"{b.cap:g}", b.noise_multiplier,
                     b.sample_rate, b.affordable_rounds, st.planned_rounds or fed.rounds,
                     f"; refuses: {b.refusal}" if b.refusal else "")
        else:
            log.warning("pre-flight node %d: %s", st.node, st.failure)

    arrays = train_rounds(grid, strategy, ArrayRecord(model.state_dict()), task_config,
                          ConfigRecord({"arch": scenario.model.key, **public, **P.server_fields(optimizer)}),
                          fed.rounds, fed.round_timeout_s)
    if strategy.rounds_aggregated == 0:  # nothing trained: a failure, whatever the loop did; no checkpoint
        end_run(store, run_id, "failed", "no round had enough usable site replies; first reason recorded: "
                + first_failure(store, run_id))
        return None
    if isinstance(arrays, ConfigRecord):
        save_encrypted_checkpoint(store, run_id, fed.rounds, arrays, scenario.model.key,
                                  artifacts_dir / f"run-{run_id}", optimizer)
    else:
        save_checkpoint(store, run_id, fed.rounds, arrays, artifacts_dir / f"run-{run_id}")
    if plan.stopped:
        log.warning("run %d %s", run_id, plan.stopped)
        end_run(store, run_id, "stopped", plan.stopped)
    return arrays


def train_rounds(grid: Grid, strategy: RecordingStrategy, initial: Model, task_config: Callable[[], ConfigRecord],
                 eval_config: ConfigRecord, num_rounds: int, timeout: float) -> Model:
    """The round loop, shaped like Flower's ``Strategy.start``: train the planned sites, aggregate,
    evaluate the new global model everywhere. Round 1 starts from the public initial model; a
    round without enough usable replies keeps the model; the loop ends early when the plan has
    nobody left to train. (Why not ``Strategy.start`` itself: see ``server.strategy``.)"""
    arrays = initial
    for server_round in range(1, num_rounds + 1):
        messages = list(strategy.configure_train(server_round, arrays, task_config(), grid))
        if not messages:
            break
        new_arrays, _ = strategy.aggregate_train(server_round, send_and_receive(grid, messages, timeout=timeout))
        if new_arrays is not None:
            arrays = new_arrays
        replies = send_and_receive(
            grid, strategy.configure_evaluate(server_round, arrays, ConfigRecord(dict(eval_config)), grid),
            timeout=timeout,
        )
        strategy.aggregate_evaluate(server_round, replies)
    return arrays


def build_server_app(scenario: Scenario, store_url: str, run_id: int, artifacts_dir: Path,
                     on_round: ProgressFn | None = None, coordinator_key: Path | None = None,
                     request: SignedRequest | None = None,
                     known_sites: Callable[[], Mapping[int, str]] | None = None) -> ServerApp:
    """The ServerApp ``veil simulate`` runs: ``run_federation`` on an already recorded run;
    ``known_sites``: the simulation engine's own node → site map, once it has made the nodes."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        store = RunStore(store_url)
        try:
            run_federation(grid, scenario, store, run_id, artifacts_dir, on_round, coordinator_key, request,
                           known_sites)
        finally:
            store.close()

    return app


