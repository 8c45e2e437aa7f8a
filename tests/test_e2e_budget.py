"""Budgets end to end through Flower's simulation engine: lifetime spend carries across runs
on the same data, and a run the sites cannot afford is refused before anything trains."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from privacy import epsilon
from privacy.ledger import SiteLedger
from server.read.summary import load_summary
from server.store import RunStore
from server.store import schema as S
from simulations.simulate import simulate
from tests.scenarios import merged, small_scenario
from veil.cli.main import app
from veil.cli.render import format_summary
from veil.errors import BudgetRefusedError
from veil.spec import parse_scenario

SPEC = small_scenario(name="budget-e2e", seed=5, privacy={"noise_multiplier": 1.2})


def _events(store: RunStore, run_id: int | None = None) -> list[S.PrivacyEvent]:
    with store.session() as s:
        q = select(S.PrivacyEvent).order_by(S.PrivacyEvent.id)
        if run_id is not None:
            q = q.where(S.PrivacyEvent.run_id == run_id)
        return list(s.scalars(q))


@pytest.mark.slow
def test_lifetime_across_runs_then_refusal(tmp_path: Path) -> None:
    store = RunStore(f"sqlite:///{tmp_path / 'veil.db'}")
    ledgers = tmp_path / "ledgers"
    runs = [simulate(parse_scenario(SPEC), store, tmp_path / "a", progress=False, ledger_dir=ledgers).run_id
            for _ in range(2)]
    assert [store.get_run(r).status for r in runs] == ["completed", "completed"]

    # each site's ledger holds both runs; its lifetime ε is their composition
    for ledger_file in sorted(ledgers.glob("*.ledger")):
        with SiteLedger(ledger_file) as ledger:
            entries = ledger.entries()
        assert len(entries) == 4 and len({e.run_ref for e in entries}) == 2
        last = [e for e in _events(store, runs[1]) if e.ledger_entry == entries[-1].entry_id]
        assert len(last) == 1  # the coordinator recorded the site's own charge
        both_runs = epsilon([e.event for e in entries], entries[-1].delta)
        assert last[0].lifetime_epsilon == pytest.approx(both_runs, rel=1e-12)
        one_run = epsilon([e.event for e in entries[2:]], last[0].delta)
        assert last[0].reported_epsilon == pytest.approx(one_run, rel=1e-9)
        assert last[0].lifetime_epsilon > 1.2 * last[0].reported_epsilon
    spent = {e.dataset_id: e.lifetime_epsilon for e in _events(store, runs[1])}

    # a cap just above what is spent: not one more round fits, so the run is refused
    capped = merged(SPEC, {"site_policy": {"epsilon_cap": max(spent.values()) + 0.01}})  # type: ignore[type-var]
    with pytest.raises(BudgetRefusedError, match="refuses: budget-exhausted") as info:
        simulate(parse_scenario(capped), store, tmp_path / "a", progress=False, ledger_dir=ledgers)
    refused = store.get_run(info.value.run_id)  # type: ignore[arg-type]
    assert refused.status == "refused" and "before training" in (refused.error or "")
    assert _events(store, refused.id) == []
    for ledger_file in ledgers.glob("*.ledger"):
        with SiteLedger(ledger_file) as ledger:
            assert len(ledger.entries()) == 4  # nothing charged
    with store.session() as s:
        codes = s.scalars(select(S.Participation.reason_code).where(
            S.Participation.run_id == refused.id, S.Participation.phase == "preflight")).all()
    assert codes == ["budget-exhausted", "budget-exhausted"]
    summary = load_summary(store, refused.id)
    assert len(summary.refusals) == 2
    assert "refused by sites" in format_summary(summary)

    # `veil budget` answers from the store: latest lifetime spend per data set
    out = CliRunner().invoke(app, ["budget", "--store", store.url, "--format", "json"])
    assert out.exit_code == 0, out.output
    import json

    rows = json.loads(out.output)
    assert {r["dataset_id"]: r["spent"] for r in rows} == pytest.approx(spent)
    text = CliRunner().invoke(app, ["budget", "--ledger", str(next(ledgers.glob("*.ledger")))])
    assert text.exit_code == 0 and "(verified)" in text.output


def test_the_same_seed_samples_the_same_sites_whatever_their_node_ids() -> None:
    import random

    from server.budget import ParticipationPlan, SiteStanding
    from veil import protocol as P

    sites = [f"site-{i}" for i in range(20)]

    def schedule(seed: int, node_seed: int, mode: str) -> list[list[str]]:
        nodes = random.Random(node_seed).sample(range(1, 2**63), len(sites))  # Flower's ids: new every run
        sts = {n: SiteStanding(n, P.BudgetStatus(s, "d", 100, 1e-5, "pld", 50.0, 0.0, 1.0, 0.1, 10, 9.0, 5))
               for n, s in zip(nodes, sites, strict=True)}
        plan = ParticipationPlan(sts, rounds=5, per_round=4, min_sites=1, mode=mode, seed=seed)
        chosen = []
        for rnd in range(1, 6):
            picked = plan.choose(rnd)
            for n in picked:
                plan.trained(n)
            chosen.append(sorted(sts[n].status.site_id for n in picked))  # type: ignore[union-attr]
        return chosen

    for mode in ("refuse", "drop"):
        first = schedule(seed=7, node_seed=1, mode=mode)
        assert all(len(r) == 4 for r in first) and len({s for r in first for s in r}) > 4  # it does sample
        assert schedule(seed=7, node_seed=2, mode=mode) == first  # other node ids, the same sites
        assert schedule(seed=8, node_seed=1, mode=mode) != first  # another seed, other sites


def test_plan_drops_sites_and_stops_when_budgets_run_out() -> None:
    from server.budget import ParticipationPlan, SiteStanding
    from veil import protocol as P

    def standing(node: int, affordable: int, refusal: P.Refusal | None = None) -> SiteStanding:
        status = P.BudgetStatus(f"site-{node}", "d", 100, 1e-5, "pld", 5.0, 0.0, 1.0, 0.1, 10, 9.0,
                                affordable, refusal)
        return SiteStanding(node, status)

    sts = {1: standing(1, 3), 2: standing(2, 1), 3: standing(3, 0, P.Refusal("budget-exhausted", "x"))}
    refuse = ParticipationPlan(dict(sts), rounds=3, per_round=2, min_sites=1, mode="refuse", seed=0)
    assert any("site-2 can afford 1 of the" in r for r in refuse.refusal_reasons())
    assert any("site-3 refuses" in r for r in refuse.refusal_reasons())
    sts = {1: standing(1, 2), 2: standing(2, 1), 3: standing(3, 0, P.Refusal("budget-exhausted", "x"))}
    drop = ParticipationPlan(sts, rounds=4, per_round=2, min_sites=1, mode="drop", seed=0)
    assert drop.refusal_reasons() == []
    trained = []
    for rnd in range(1, 5):
        nodes = drop.choose(rnd)
        for n in nodes:
            drop.trained(n)
        trained.append(nodes)
    assert trained[0] == [1, 2] and trained[1] == [1] and trained[2] == []  # never site-3
    assert drop.stopped and "only 0 sites can still train" in drop.stopped

