"""A site sampled for k of a run's R rounds is calibrated for its k rounds, and trains no more.

In refuse mode the coordinator fixes the schedule before the pre-flight and tells each scheduled
site its k (``P.SITE_ROUNDS``); the site calibrates σ for k rounds, so its run ε lands at the
target, and refuses round k+1 (and any re-plan of k) whatever the coordinator asks."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from sqlalchemy import select

from privacy import epsilon
from privacy.events import DpSgdEvent
from privacy.ledger import SiteLedger
from privacy.requests import SignedRequest, ephemeral_request
from server.coordinator import run_federation
from server.lifecycle import create_run
from server.store import RunStore
from server.store import schema as S
from tests.flowerkit import AppGrid
from tests.sitekit import SiteDriver, make_site, refusal, task
from veil import protocol as P
from veil.models import build_model
from veil.spec import parse_scenario

TARGET = 3.0
SCENARIO = {"name": "k-of-r", "seed": 4, "device": "cpu", "model": {"arch": "mlp"},
            "federation": {"sites": 6, "rounds": 4, "sites_per_round": 2, "min_sites": 1,
                           "on_budget_exhausted": "refuse"},
            "training": {"batch_size": 30},
            "privacy": {"noise_multiplier": None, "target_epsilon": TARGET}}


def _federation(tmp_path: Path, scenario: dict[str, object]
                ) -> tuple[RunStore, int, dict[int, SiteDriver], AppGrid]:
    parsed = parse_scenario(scenario)
    drivers = {n: SiteDriver(make_site(tmp_path / f"site-{n}.ledger", site_id=f"site-{n}", seed=n,
                                       researchers=(), accept_ephemeral=True)) for n in range(1, 7)}
    sent: list[Message] = []

    def handler(d: SiteDriver):  # type: ignore[no-untyped-def]
        def handle(msg: Message) -> Message:
            sent.append(msg)
            return d.app(msg, d.context)
        return handle

    grid = AppGrid({n: handler(d) for n, d in drivers.items()})
    grid.sent = sent  # type: ignore[attr-defined]
    store = RunStore(f"sqlite:///{tmp_path / 's.db'}")
    run_id = create_run(store, parsed, "simulation")
    run_federation(grid, parsed, store, run_id, tmp_path / "artifacts",
                   request=ephemeral_request(parsed.model_dump(mode="json")))
    return store, run_id, drivers, grid


def test_each_site_is_calibrated_for_the_rounds_it_is_sampled_for(tmp_path: Path) -> None:
    store, run_id, _, grid = _federation(tmp_path, SCENARIO)
    with store.session() as s:
        rows = s.execute(select(S.Site.site_key, S.Site.planned_rounds, S.PrivacyEvent)
                         .join(S.PrivacyEvent, S.PrivacyEvent.site_id == S.Site.id)
                         .where(S.PrivacyEvent.run_id == run_id)).all()
        asked = s.scalars(select(S.Site.site_key).join(S.Participation, S.Participation.site_id == S.Site.id)
                          .where(S.Participation.run_id == run_id, S.Participation.phase == "preflight")).all()
    events: dict[str, list[DpSgdEvent]] = {}
    planned: dict[str, int | None] = {}
    for site, k, ev in rows:
        events.setdefault(site, []).append(DpSgdEvent(ev.noise_multiplier, ev.sample_rate, ev.steps,
                                                      ev.max_grad_norm))
        planned[site], delta = k, ev.delta
    joins = Counter({site: len(evs) for site, evs in events.items()})
    assert sum(joins.values()) == 4 * 2 and len(set(joins.values())) > 1  # sampled unequally
    assert sorted(asked) == sorted(events)  # only the scheduled sites were asked at all
    budget_types = [m for m in grid.sent if m.metadata.message_type == P.BUDGET_QUERY]  # type: ignore[attr-defined]
    assert len(budget_types) == len(events) < 6
    for site, evs in events.items():
        assert planned[site] == (None if len(evs) == 4 else len(evs))  # what the record shows
        run_eps = epsilon(evs, delta)
        assert run_eps <= TARGET, (site, len(evs), run_eps)  # never above the target
        assert run_eps >= 0.95 * TARGET, (site, len(evs), run_eps)  # and not wasted on rounds it never joins
    sigmas = {len(evs): evs[0].noise_multiplier for evs in events.values()}
    assert sorted(sigmas.values()) == [sigmas[k] for k in sorted(sigmas)]  # more rounds, more noise


def _train(driver: SiteDriver, t: P.TrainTask, server_round: int, rounds: object,
           request: SignedRequest | None) -> RecordDict:
    config = t.to_config()
    if request is not None:
        config[P.RUN_REQUEST] = request.to_json()
    config["server-round"] = server_round
    if rounds is not None:
        config[P.SITE_ROUNDS] = rounds  # type: ignore[assignment]
    arrays = ArrayRecord(build_model(t.arch, seed=0).state_dict())
    return driver.send(RecordDict({P.ARRAYS: arrays, P.TASK: ConfigRecord(dict(config))}), "train")


@pytest.mark.parametrize("signed", [False, True])
def test_a_site_refuses_a_round_beyond_its_planned_rounds_or_a_new_plan(tmp_path: Path, signed: bool) -> None:
    scenario = parse_scenario({**SCENARIO, "training": {"batch_size": 30, "learning_rate": 0.1}})
    extra = {"researchers": (), "accept_ephemeral": True} if signed else {}
    driver = SiteDriver(make_site(tmp_path / "site.ledger", **extra))  # type: ignore[arg-type]
    request = ephemeral_request(scenario.model_dump(mode="json")) if signed else None
    t = P.TrainTask.from_scenario(scenario).for_run("veil-run-1:abc")
    assert t.planned_rounds == 4
    assert P.REFUSAL not in _train(driver, t, 1, 2, request)
    assert refusal(_train(driver, t, 2, 3, request)).code == "rounds-exhausted"  # re-planned: less noise
    assert P.REFUSAL not in _train(driver, t, 3, 2, request)
    assert refusal(_train(driver, t, 4, 2, request)).code == "rounds-exhausted"  # round k+1
    assert refusal(_train(driver, t, 4, None, request)).code == "rounds-exhausted"  # "all rounds" now
    with _ledger(driver) as ledger:
        entries = ledger.entries()
    assert len(entries) == 2 and len({e.event.noise_multiplier for e in entries}) == 1
    assert epsilon([e.event for e in entries], entries[0].delta) <= TARGET


def _ledger(driver: SiteDriver) -> SiteLedger:
    return SiteLedger(driver.site.ledger)


@pytest.mark.parametrize("rounds", [0, 5, 2.0, "2", True])
def test_planned_rounds_outside_the_run_are_refused(tmp_path: Path, rounds: object) -> None:
    driver = SiteDriver(make_site(tmp_path / "site.ledger"))
    t = task(noise_multiplier=0.0, target_epsilon=TARGET, planned_rounds=4)
    assert refusal(_train(driver, t, 1, rounds, None)).code == "task-mismatch"
    reply = driver.send(RecordDict({P.TASK: ConfigRecord({**dict(t.to_config()), P.SITE_ROUNDS: rounds})}),
                        P.BUDGET_QUERY)
    status = P.BudgetStatus.from_config(reply[P.BUDGET])  # type: ignore[arg-type]
    assert status.refusal is not None and status.refusal.code == "task-mismatch"
    with _ledger(driver) as ledger:
        assert ledger.entries() == []


def test_the_budget_answer_is_for_the_planned_rounds(tmp_path: Path) -> None:
    driver = SiteDriver(make_site(tmp_path / "site.ledger"))
    t = task(noise_multiplier=0.0, target_epsilon=TARGET, planned_rounds=4)
    answers = {}
    for k in (1, 4):
        reply = driver.send(RecordDict({P.TASK: ConfigRecord({**dict(t.to_config()), P.SITE_ROUNDS: k})}),
                            P.BUDGET_QUERY)
        answers[k] = P.BudgetStatus.from_config(reply[P.BUDGET])  # type: ignore[arg-type]
    assert answers[1].noise_multiplier < answers[4].noise_multiplier
    for k, b in answers.items():
        assert b.refusal is None and b.affordable_rounds == k
        assert 0.95 * TARGET <= b.projected <= TARGET  # k rounds of its σ reach the target, not more
