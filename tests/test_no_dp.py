"""The labelled non-private baseline (``privacy: none``): sites train without DP only when their
policy promises no ε; no ε is charged or reported, each round is on the site's ledger as a
release without DP, and the coordinator and every view record the run as not private."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from privacy.ledger import SiteLedger
from privacy.policy import SitePolicy
from server import checks
from server.store import RunStore
from tests.sitekit import SiteDriver, make_site, refusal, task
from veil import protocol as P
from veil.errors import ScenarioError
from veil.spec import parse_scenario

NO_DP = {"noise_multiplier": 0.0, "private": False}


def test_privacy_none_is_a_scenario_and_a_task() -> None:
    s = parse_scenario({"privacy": "none", "site_policy": {"epsilon_cap": None}})
    assert not s.private and s.privacy.mechanism == "none"
    t = P.TrainTask.from_scenario(s)
    assert not t.private and t.noise_multiplier == t.target_epsilon == 0.0
    assert P.TrainTask.from_config(t.to_config()) == t
    with pytest.raises(ScenarioError, match="remove target_epsilon"):
        parse_scenario({"privacy": {"mechanism": "none", "target_epsilon": 8.0}})
    rec = t.to_config()
    rec["noise_multiplier"] = 1.0
    with pytest.raises(ValueError, match="non-private task sets no noise_multiplier"):
        P.TrainTask.from_config(rec)
    rec = t.to_config()
    rec["private"] = "no"
    with pytest.raises(ValueError, match=r"task\.private must be true or false"):
        P.TrainTask.from_config(rec)


def test_no_dp_is_the_same_federation_with_plain_fedavg_and_refuses_reproducible_noise(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from veil.cli.main import app
    from veil.spec import NON_PRIVATE_TRAINING, load_scenario, non_private_baseline

    dp = load_scenario()
    base = non_private_baseline(dp)
    assert not base.private and base.site_policy.epsilon_cap is None
    assert base.server_optimizer.rule == "fedavg"
    assert base.training.batch_size == NON_PRIVATE_TRAINING["batch_size"]
    assert (base.data, base.model, base.federation) == (dp.data, dp.model, dp.federation)  # the same federation
    with pytest.raises(ScenarioError, match=r"drop privacy\.reproducible_noise"):
        non_private_baseline(dp.with_overrides(**{"privacy.reproducible_noise": True}))
    out = CliRunner().invoke(app, ["simulate", "--no-dp", "--reproducible-noise", "--store",
                                   f"sqlite:///{tmp_path / 'v.db'}"])
    assert out.exit_code != 0 and "drop privacy.reproducible_noise" in out.output
    assert not (tmp_path / "v.db").exists()  # refused before anything is stored


@pytest.mark.parametrize("policy", [SitePolicy(epsilon_cap=20.0), SitePolicy(min_noise_multiplier=0.5)])
def test_a_site_whose_policy_promises_privacy_refuses_and_charges_nothing(tmp_path: Path,
                                                                          policy: SitePolicy) -> None:
    site = make_site(tmp_path / "l", policy)
    driver = SiteDriver(site)
    status = driver.query(task(**NO_DP))
    assert status.refusal is not None and status.refusal.code == "non-private-refused"
    assert status.affordable_rounds == 0
    content = driver.train(task(**NO_DP))  # the coordinator sends it anyway
    refused = P.Refusal.from_config(content[P.REFUSAL])  # type: ignore[arg-type]
    assert refused.code == "non-private-refused" and P.ARRAYS not in content
    with SiteLedger(site.ledger) as ledger:
        assert ledger.entries() == []


def test_a_site_without_a_cap_trains_plain_sgd_and_reports_no_epsilon(tmp_path: Path) -> None:
    site = make_site(tmp_path / "l", SitePolicy())
    driver = SiteDriver(site)
    status = driver.query(task(**NO_DP))
    assert status.refusal is None and status.noise_multiplier == 0.0 and status.affordable_rounds == 3
    content = driver.train(task(**NO_DP))
    assert isinstance(content[P.ARRAYS], ArrayRecord) and P.PRIVACY not in content
    metrics = content[P.METRICS]
    assert isinstance(metrics, MetricRecord) and P.EPSILON not in metrics and metrics[P.NUM_EXAMPLES] > 0
    with SiteLedger(site.ledger) as ledger:  # the round is on the ledger, as a release without DP
        (entry,) = ledger.entries()
        spend = ledger.spent(site.fingerprint, delta=1e-5)
    assert not entry.private and entry.event is None and entry.round == 1 and entry.epsilon_after == 0.0
    assert spend.without_dp == 1 and spend.epsilon == 0.0 and spend.entries == 0
    reply = checks.check_train_reply(content, encrypted=False, expected=checks.layout(content[P.ARRAYS]),
                                     rng="os-entropy", task=task(**NO_DP))
    assert reply.report is None and reply.num_examples == metrics[P.NUM_EXAMPLES]


@pytest.mark.parametrize("signed", [False, True])
def test_a_non_private_task_is_held_to_its_rounds_and_its_signature(tmp_path: Path, signed: bool) -> None:
    """The same replay and rounds checks as a DP task: one signed request trains one run, for its
    planned rounds only, and each round is on the site's ledger."""
    from privacy.requests import ephemeral_request
    from tests.test_site_rounds import _train

    scenario = parse_scenario({"name": "nodp", "privacy": "none", "site_policy": {"epsilon_cap": None},
                               "federation": {"sites": 2, "rounds": 2}, "training": {"batch_size": 30}})
    extra = {"researchers": (), "accept_ephemeral": True} if signed else {}
    driver = SiteDriver(make_site(tmp_path / "site.ledger", **extra))  # type: ignore[arg-type]
    request = ephemeral_request(scenario.model_dump(mode="json")) if signed else None
    t = P.TrainTask.from_scenario(scenario).for_run("veil-run-1:abc")
    assert not t.private and t.planned_rounds == 2
    assert P.REFUSAL not in _train(driver, t, 1, None, request)
    if signed:  # the same signature, spent on another run
        other = t.for_run("veil-run-2:def")
        assert refusal(_train(driver, other, 1, None, request)).code == "replayed-request"
        assert driver.query(other, request).refusal.code == "replayed-request"  # type: ignore[union-attr]
    assert refusal(_train(driver, t, 2, 1, request)).code == "rounds-exhausted"  # never re-planned
    assert P.REFUSAL not in _train(driver, t, 2, None, request)
    assert refusal(_train(driver, t, 3, None, request)).code in ("rounds-exhausted", "replayed-request")
    assert driver.query(t, request).refusal is not None
    with SiteLedger(driver.site.ledger) as ledger:
        entries = ledger.entries()
    assert [e.round for e in entries] == [1, 2] and not any(e.private for e in entries)


def test_after_a_release_without_dp_a_cap_refuses_every_charge(tmp_path: Path) -> None:
    """No finite lifetime ε holds once a round went out without DP: a site that sets a cap later
    is refused every further charge in the cap's scope, and its ledger report says why."""
    from dataclasses import replace

    from privacy.ledger import ledger_report

    site = make_site(tmp_path / "l", SitePolicy())
    assert P.REFUSAL not in SiteDriver(site).train(task(**NO_DP))
    assert P.REFUSAL not in SiteDriver(site).train(task(run_ref="run-b"))  # no cap: DP rounds go on
    capped = replace(site, policy=SitePolicy(epsilon_cap=50.0))
    driver = SiteDriver(capped)
    status = driver.query(task(run_ref="run-c"))
    assert status.refusal is not None and status.refusal.code == "budget-exhausted"
    assert "released without DP" in status.refusal.detail
    out = refusal(driver.train(task(run_ref="run-c")))
    assert out.code == "budget-exhausted" and "released without DP" in out.detail
    report = ledger_report(site.ledger)
    assert report.head.seq == 2 and report.datasets[0].without_dp == 1 and report.datasets[0].entries == 2
    assert 0 < report.datasets[0].epsilon < 50  # the DP round's ε, with the release without DP beside it
    from typer.testing import CliRunner

    from veil.cli.main import app

    shown = CliRunner().invoke(app, ["budget", "--ledger", str(site.ledger)], env={"COLUMNS": "250"})
    assert shown.exit_code == 0 and "NOT PRIVATE" in shown.output
    assert "released without differential" in shown.output


def test_the_coordinator_rejects_a_privacy_report_in_a_non_private_run(tmp_path: Path) -> None:
    site = make_site(tmp_path / "l", SitePolicy())
    private = SiteDriver(site).train(task())  # a DP reply, sent to a run that asked for none
    assert P.PRIVACY in private
    with pytest.raises(checks.ReplyRejected, match="non-private run"):
        checks.check_train_reply(private, encrypted=False, expected=checks.layout(private[P.ARRAYS]),
                                 rng="os-entropy", task=task(**NO_DP))
    agg = checks.aggregate_train_metrics(
        [RecordDict({P.METRICS: MetricRecord({P.NUM_EXAMPLES: 2, P.TRAIN_LOSS: 1.0})}),
         RecordDict({P.METRICS: MetricRecord({P.NUM_EXAMPLES: 2, P.TRAIN_LOSS: 3.0})})], P.NUM_EXAMPLES)
    assert agg[P.TRAIN_LOSS] == 2.0 and P.EPSILON not in agg


# -- the read views: a store written as the coordinator writes one (no simulation) ----------------
def _stored_run(store: RunStore, spec: dict[str, Any]) -> int:
    """A completed two-site, two-round run of ``spec`` written through the coordinator's own writer:
    privacy events and ledger heads for a DP run, none for ``privacy: none``."""
    from privacy.accounting import epsilon
    from privacy.events import DpSgdEvent
    from server.checks import EvalReply, TrainReply
    from server.lifecycle import create_run, end_run
    from server.rounds import RoundWriter

    scenario = parse_scenario(spec)
    run_id = create_run(store, scenario, "simulation")
    writer = RoundWriter(store, run_id, num_rounds=2, min_sites=1)
    event = DpSgdEvent(1.0, 0.05, 20, 1.0)
    for rn in (1, 2):
        writer.open_round(rn, [0, 1], 1000)
        eps = epsilon([event] * rn, 1e-5, "pld")
        with store.session() as s:
            for node, site in enumerate(("site-0", "site-1")):
                info = P.SiteInfo(site, "cpu", 0.1, 100)
                if scenario.private:
                    life = P.LifetimeSpend(f"ds{node}", f"e{rn}", eps, 1e-5, "pld", 50.0)
                    report = P.PrivacyReport(event, 1e-5, "pld", "dp-accounting x", eps, lifetime=life)
                    reply = TrainReply(info, report, life, P.LedgerHead(f"ledger{node}", rn, "a" * 64), 500, 1000)
                else:
                    reply = TrainReply(info, None, None, None, 500, 1000)
                writer.trained(s, rn, node, reply, 1000, {"train-loss": 0.5})
                writer.evaluated(s, rn, node, EvalReply(info, 100, 0.4, 0.8), 1000)
        writer.round.ok, writer.round.train_loss = 2, 0.5
        writer.round.max_epsilon = eps if scenario.private else None
        writer.close_round(rn, 0.8, 0.4)
    end_run(store, run_id, "completed")
    return run_id


@pytest.fixture
def views(tmp_path: Path) -> tuple[RunStore, int, int]:
    """A store holding a run without DP (fedavg, the default) and a DP run with FedAdam."""
    from tests.scenarios import small_scenario

    store = RunStore(f"sqlite:///{tmp_path / 'veil.db'}")
    no_dp = _stored_run(store, small_scenario(name="baseline", privacy="none", site_policy={"epsilon_cap": None}))
    adam = _stored_run(store, small_scenario(name="adam", server_optimizer={"rule": "fedadam"}))
    return store, no_dp, adam


def _cli(*args: str) -> str:
    from typer.testing import CliRunner

    from veil.cli.main import app

    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


def test_runs_show_says_not_private_and_names_the_server_optimiser(views: tuple[RunStore, int, int]) -> None:
    store, no_dp, adam = views
    shown = _cli("runs", "show", str(no_dp), "--store", store.url)
    assert "NOT PRIVATE" in shown and "NO DP (not private)" in shown and "worst-case site ε" not in shown
    assert "  server optimiser: fedavg\n" in shown
    site_rows = [line for line in shown.splitlines() if line.lstrip().startswith("site-")]
    assert site_rows and all(line.count("not private") == 2 for line in site_rows)  # run and lifetime ε
    shown = _cli("runs", "show", str(adam), "--store", store.url)
    assert "  server optimiser: fedadam (η=0.1, β1=0.9, β2=0.99, τ=0.001)\n" in shown
    assert "worst-case site ε this run" in shown

    data = json.loads(_cli("runs", "show", str(no_dp), "--store", store.url, "--format", "json"))
    assert data["no_dp"] is True and data["not_private"] is True and data["max_epsilon"] is None
    assert data["server_optimizer"] == "fedavg"
    data = json.loads(_cli("runs", "show", str(adam), "--store", store.url, "--format", "json"))
    assert data["no_dp"] is False and data["not_private"] is False and data["max_epsilon"] > 0
    assert data["server_optimizer"].startswith("fedadam (η=0.1")


def test_compare_flags_the_run_without_dp_and_shows_each_server_optimiser(
        views: tuple[RunStore, int, int]) -> None:
    store, no_dp, adam = views
    rows = json.loads(_cli("compare", str(no_dp), str(adam), "--store", store.url, "--format", "json"))
    assert [(r["no_dp"], r["max_epsilon"] is None) for r in rows] == [(True, True), (False, False)]
    assert [r["server_optimizer"] for r in rows] == ["fedavg", "fedadam (η=0.1, β1=0.9, β2=0.99, τ=0.001)"]
    shown = _cli("compare", str(no_dp), str(adam), "--store", store.url)
    (eps_line,) = [line for line in shown.splitlines() if line.lstrip().startswith("max site ε")]
    assert "not private (no DP)" in eps_line and eps_line.rstrip()[-5:].replace(".", "").isdigit()
    (opt_line,) = [line for line in shown.splitlines() if line.lstrip().startswith("server optimiser")]
    assert "fedavg" in opt_line and "fedadam (η=0.1, β1=0.9, β2=0.99, τ=0.001)" in opt_line
    assert "runs marked (no DP) are not private" in shown


def test_report_of_a_run_without_dp_states_no_epsilon(views: tuple[RunStore, int, int], tmp_path: Path) -> None:
    store, no_dp, adam = views
    _cli("report", str(no_dp), "--out", str(tmp_path / "r"), "--store", store.url)
    md = (tmp_path / "r" / "report.md").read_text()
    assert "This run is NOT private" in md and "What this run does not protect" in md
    assert "No ε or δ applies to it" in md and "| site-0 | 500 | 2 | none (not private) |" in md
    for dp_only in ("over all planned rounds", "holds at that site's δ", "δ·n", "sample-level", "Accountant",
                    "run ε", "Worst-case site", "No site trained", "DP-SGD model update", "expected batch"):
        assert dp_only not in md, dp_only
    assert "Server optimiser: fedavg (the weighted mean of the sites' models is the new model)." in md

    _cli("report", str(adam), "--out", str(tmp_path / "a"), "--store", store.url)
    md = (tmp_path / "a" / "report.md").read_text()
    assert ("Server optimiser: fedadam (η=0.1, β1=0.9, β2=0.99, τ=0.001) (the coordinator applied this step "
            "to each round's weighted mean).") in md
    assert "NOT private" not in md and "Worst-case site: **ε = " in md and "sample-level" in md


def test_a_png_of_a_run_without_dp_draws_no_epsilon_panel(views: tuple[RunStore, int, int],
                                                          tmp_path: Path) -> None:
    from server.read.dashboard import metric_series
    from veil.cli.plots import png

    store, no_dp, _ = views
    titles = png(metric_series(store, no_dp), tmp_path / "m.png", without_dp=True)
    assert titles[-1] == "no ε (not private)" and "run ε per site" not in titles


def test_a_run_stored_without_a_server_optimiser_section_ran_fedavg(views: tuple[RunStore, int, int]) -> None:
    """Runs from before server optimisers have no section: they took the mean, and say so; a section
    this Veil rejects is shown as invalid, with the reason as a warning."""
    from sqlalchemy import update

    from server.store import schema as S

    store, _, adam = views
    with store.session() as s:
        spec = json.loads(store.get_run(adam).spec_json)
        del spec["server_optimizer"]
        s.execute(update(S.Run).where(S.Run.id == adam).values(spec_json=json.dumps(spec)))
    assert "  server optimiser: fedavg\n" in _cli("runs", "show", str(adam), "--store", store.url)
    with store.session() as s:
        spec["server_optimizer"] = {"rule": "fedsgd\x1b[2J"}
        s.execute(update(S.Run).where(S.Run.id == adam).values(spec_json=json.dumps(spec)))
    shown = _cli("runs", "show", str(adam), "--store", store.url)
    assert "  server optimiser: invalid\n" in shown and "warning: run " in shown and "\x1b[" not in shown
    compared = _cli("compare", str(adam), str(adam), "--store", store.url)
    assert "server optimiser" in compared and "invalid" in compared


@pytest.mark.slow  # Ray simulations
def test_a_simulated_baseline_is_recorded_and_shown_as_not_private(tmp_path: Path) -> None:
    from sqlalchemy import func, select
    from typer.testing import CliRunner

    from server.read.dashboard import list_runs
    from server.read.summary import load_summary
    from server.store import RunStore
    from server.store import schema as S
    from simulations.simulate import simulate
    from tests.scenarios import small_scenario
    from veil.cli.main import app
    from veil.errors import BudgetRefusedError

    store = RunStore(f"sqlite:///{tmp_path / 'veil.db'}")
    spec = small_scenario(name="baseline", privacy="none", site_policy={"epsilon_cap": None})
    run = simulate(parse_scenario(spec), store, tmp_path / "art", progress=False, ledger_dir=tmp_path / "l")
    summary = load_summary(store, run.run_id)
    assert summary.status == "completed" and summary.without_dp and summary.not_private
    assert summary.max_epsilon is None and summary.final is not None and summary.final.accuracy is not None
    with store.session() as s:
        assert s.scalar(select(func.count()).select_from(S.PrivacyEvent)) == 0
    (row,) = list_runs(store)
    assert row.no_dp
    shown = CliRunner().invoke(app, ["runs", "--store", store.url])
    assert shown.exit_code == 0 and "(no DP)" in shown.output and "not private" in shown.output
    capped = small_scenario(name="baseline-capped", privacy="none", site_policy={"epsilon_cap": 20.0})
    with pytest.raises(BudgetRefusedError):
        simulate(parse_scenario(capped), store, tmp_path / "art", progress=False, ledger_dir=tmp_path / "l")
    refused = load_summary(store, run.run_id + 1)
    assert refused.status == "refused" and all(m.code == "non-private-refused" for m in refused.refusals)


@pytest.mark.slow  # three in-process federations
def test_a_dp_run_after_the_baseline_says_its_lifetime_epsilon_is_no_guarantee(tmp_path: Path) -> None:
    """A site without a cap trains the baseline, then a DP run: its ledger's lifetime ε (the DP
    rounds composed) comes with the count of rounds released without DP, and every view marks it."""
    import json

    from privacy.requests import ephemeral_request
    from server.coordinator import run_federation
    from server.lifecycle import create_run
    from server.read.summary import budget_rows, load_summary
    from server.store import RunStore
    from tests.flowerkit import AppGrid

    drivers = {n: SiteDriver(make_site(tmp_path / f"site-{n}.ledger", site_id=f"site-{n}", seed=n, researchers=(),
                                       accept_ephemeral=True)) for n in (1, 2)}
    store = RunStore(f"sqlite:///{tmp_path / 's.db'}")

    def run(privacy: object) -> int:
        parsed = parse_scenario({"name": "after", "seed": 1, "device": "cpu", "model": {"arch": "mlp"},
                                 "federation": {"sites": 2, "rounds": 1, "min_sites": 1},
                                 "training": {"batch_size": 30}, "privacy": privacy,
                                 "site_policy": {"epsilon_cap": None}})
        for d in drivers.values():
            d.new_run()
        run_id = create_run(store, parsed, "simulation")
        grid = AppGrid({n: _answering(d) for n, d in drivers.items()})
        run_federation(grid, parsed, store, run_id, tmp_path / "art",
                       request=ephemeral_request(parsed.model_dump(mode="json")))
        return run_id

    first = run({"noise_multiplier": 1.0})
    assert all(site.lifetime_without_dp == 0 for site in load_summary(store, first).sites)
    run("none")
    dp = run({"noise_multiplier": 1.0})
    summary = load_summary(store, dp)
    assert [site.lifetime_without_dp for site in summary.sites] == [1, 1]
    assert all(site.lifetime_epsilon is not None and site.lifetime_epsilon > 0 for site in summary.sites)
    assert [r.without_dp for r in budget_rows(store)] == [1, 1]
    shown = _cli("runs", "show", str(dp), "--store", store.url)
    assert shown.count("NOT PRIVATE (+1 without DP)") == 2 and "no lifetime ε holds" in shown
    budget = _cli("budget", "--store", store.url)
    assert budget.count("NOT PRIVATE (+1 without DP)") == 2 and "no lifetime ε holds" in budget
    sites = json.loads(_cli("runs", "show", str(dp), "--store", store.url, "--format", "json"))["sites"]
    assert [s["lifetime_without_dp"] for s in sites] == [1, 1]


def _answering(driver: SiteDriver):  # type: ignore[no-untyped-def]
    """A grid handler: ``driver``'s ClientApp answers each message in its current run's context."""
    return lambda msg: driver.app(msg, driver.context)
