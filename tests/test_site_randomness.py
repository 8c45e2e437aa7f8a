"""Randomness belongs to the site: a real site never runs seeded noise, whoever asks, and a
site that cannot read its entropy source trains and charges nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict

from privacy.ledger import SiteLedger
from tests.flowerkit import incoming
from tests.sitekit import SiteDriver, make_site, refusal, task
from veil import protocol as P


def _entries(path: Path) -> int:
    if not path.exists():
        return 0
    with SiteLedger(path, create=False, readonly=True) as ledger:
        return len(ledger.entries())


def test_two_sites_with_the_same_task_seed_release_different_updates(tmp_path: Path) -> None:
    updates = []
    for k in range(2):
        reply = SiteDriver(make_site(tmp_path / f"{k}.ledger")).train(task(seed=123))
        report = P.PrivacyReport.from_config(reply[P.PRIVACY])  # type: ignore[arg-type]
        assert report.rng == "os-entropy"
        updates.append(torch.cat([t.flatten() for t in reply[P.ARRAYS].to_torch_state_dict().values()]))  # type: ignore[union-attr]
    assert not torch.equal(updates[0], updates[1])


def test_a_real_site_refuses_seeded_noise_before_anything_is_charged(tmp_path: Path) -> None:
    site = make_site(tmp_path / "site.ledger")  # allow_seeded_noise defaults to False: a real site
    driver = SiteDriver(site)
    seeded = task(rng="seeded")
    status = driver.query(seeded)
    assert status.refusal is not None and status.refusal.code == "seeded-noise"
    reply = driver.train(seeded)
    refusal = P.Refusal.from_config(reply[P.REFUSAL])  # type: ignore[arg-type]
    assert refusal.code == "seeded-noise" and P.ARRAYS not in reply
    assert _entries(site.ledger) == 0
    # a simulated site (veil simulate --reproducible-noise) runs it, and says so in its report
    sim = SiteDriver(make_site(tmp_path / "sim.ledger", allow_seeded_noise=True))
    report = P.PrivacyReport.from_config(sim.train(seeded)[P.PRIVACY])  # type: ignore[arg-type]
    assert report.rng == "seeded"
    with SiteLedger(tmp_path / "sim.ledger", create=False, readonly=True) as ledger:
        assert [e.rng for e in ledger.entries()] == ["seeded"]


def test_an_unreadable_entropy_source_trains_and_charges_nothing(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    site = make_site(tmp_path / "site.ledger")
    driver = SiteDriver(site)
    driver.query(task())  # the ledger exists and is open

    def broken(n: int) -> bytes:
        raise OSError("[Errno 38] getrandom is not implemented")

    monkeypatch.setattr(os, "urandom", broken)
    said = refusal(driver.train(task()))
    assert said.code == "site-error" and "cannot read the operating system's entropy source" in said.detail
    monkeypatch.undo()
    assert _entries(site.ledger) == 0


def test_deployed_runs_refuse_reproducible_noise_before_anything_is_run(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml
    from typer.testing import CliRunner

    from veil.apps.serverapp import main as serverapp_main
    from veil.cli.main import app

    spec = {"privacy": {"target_epsilon": 4.0, "reproducible_noise": True}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    out = CliRunner().invoke(app, ["run", str(tmp_path / "s.yaml"), "--coordinator", "127.0.0.1:1",
                                   "--ca", str(tmp_path / "none.crt"), "--key", str(tmp_path / "no-key")])
    assert out.exit_code == 2 and "reproducible_noise" in out.output and "veil simulate" in out.output
    # the ServerApp `flwr run` and `veil run` load refuses it too, even properly signed: the
    # refusal is recorded, and no run exists
    from sqlalchemy import select

    from privacy.requests import RequestRefused, create_researcher_key, load_private_key, sign_request
    from server.store import RunStore
    from server.store import schema as S

    (tmp_path / "admitted").mkdir()
    create_researcher_key(tmp_path / "admitted" / "alice")
    (tmp_path / "admitted" / "alice").rename(tmp_path / "alice")  # only the .pub stays admitted
    monkeypatch.setenv("VEIL_RESEARCHERS", str(tmp_path / "admitted"))
    request = sign_request(spec, load_private_key(tmp_path / "alice"))
    url = f"sqlite:///{tmp_path / 'store.db'}"
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config={"run-request": request.to_json(), "store": url})
    with pytest.raises(RequestRefused, match="reproducible_noise") as refused:
        serverapp_main(None, context)  # type: ignore[arg-type]
    assert refused.value.code == "invalid-scenario"
    store = RunStore(url)
    with store.session() as s:
        row = s.scalars(select(S.RunRequest)).one()
        assert s.scalars(select(S.Run)).all() == []
    assert (row.status, row.reason_code) == ("refused", "invalid-scenario")
    assert row.researcher is not None and row.researcher.startswith("alice (")
    store.close()


def test_the_flwr_run_client_app_never_runs_seeded_noise(tmp_path: Path) -> None:
    """`flwr run .` loads veil.apps.clientapp:app; its simulated sites are not `veil simulate`'s."""
    from veil.apps.clientapp import app as module_app

    scenario = tmp_path / "s.yaml"
    scenario.write_text("federation: {sites: 2}\nprivacy: {noise_multiplier: 1.0}\n")
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(),
                      run_config={"scenario": str(scenario), "ledger-dir": str(tmp_path / "l")})
    from privacy.requests import ephemeral_request
    from veil.spec import parse_scenario

    # a properly signed (ephemeral) request for seeded noise: the signature is fine, the noise is not
    asked = parse_scenario({"federation": {"sites": 2}, "privacy": {
        "noise_multiplier": 1.0, "reproducible_noise": True}}).model_dump(mode="json")
    config = P.TrainTask.from_scenario(parse_scenario(asked)).for_run("r").to_config()
    config[P.RUN_REQUEST] = ephemeral_request(asked).to_json()
    assert config["rng"] == "seeded"
    reply = module_app(incoming(RecordDict({P.TASK: ConfigRecord(dict(config))}), P.BUDGET_QUERY), context)
    status = P.BudgetStatus.from_config(reply.content[P.BUDGET])  # type: ignore[arg-type]
    assert status.refusal is not None and status.refusal.code == "seeded-noise"
