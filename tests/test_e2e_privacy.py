"""The guarantee against the coordinator, end to end through Flower's simulation engine.

* Two runs with the same seed release different models: the noise and the batches come from
  each site's own entropy, not from the seed the coordinator chose.
* ``--reproducible-noise`` replays a run exactly, and every record of it says it is not private.
* The coordinator refuses a site whose ledger went backwards (an older copy restored, with
  its witness) or was replaced (deleted and recreated), before anything trains.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from privacy.ledger import SiteLedger
from privacy.randomness import NOT_PRIVATE
from server.read.summary import load_summary
from server.store import RunStore
from server.store import schema as S
from simulations.simulate import simulate
from tests.scenarios import merged, small_scenario
from veil.cli.main import app
from veil.errors import BudgetRefusedError
from veil.spec import parse_scenario

pytestmark = pytest.mark.slow  # Ray simulations

SPEC = small_scenario(name="privacy-e2e", seed=11, federation={"rounds": 1})


def _run(spec: dict, store: RunStore, tmp: Path, ledgers: Path) -> int:
    return simulate(parse_scenario(spec), store, tmp / "art", progress=False, ledger_dir=ledgers).run_id


def _sha(store: RunStore, run_id: int) -> str:
    (_, sha, _), = load_summary(store, run_id).artifacts
    return sha


def _rngs(store: RunStore, run_id: int) -> list[str | None]:
    with store.session() as s:
        return list(s.scalars(select(S.PrivacyEvent.rng).where(S.PrivacyEvent.run_id == run_id)))


def test_same_seed_runs_differ_unless_noise_is_seeded_and_then_every_record_says_so(tmp_path: Path) -> None:
    store = RunStore(f"sqlite:///{tmp_path / 'veil.db'}")
    private = [_run(SPEC, store, tmp_path, tmp_path / "l") for _ in range(2)]
    assert _sha(store, private[0]) != _sha(store, private[1])  # same seed, different noise and batches
    assert all(_rngs(store, r) == ["os-entropy"] * 2 for r in private)
    assert not load_summary(store, private[0]).not_private

    seeded_spec = merged(SPEC, {"privacy": {"reproducible_noise": True}})
    seeded = [_run(seeded_spec, store, tmp_path, tmp_path / "l") for _ in range(2)]
    assert _sha(store, seeded[0]) == _sha(store, seeded[1])  # replays bit for bit
    assert all(_rngs(store, r) == ["seeded"] * 2 for r in seeded)
    with SiteLedger(tmp_path / "l" / "site-0.ledger", create=False, readonly=True) as ledger:
        assert [e.rng for e in ledger.entries()] == ["os-entropy", "os-entropy", "seeded", "seeded"]

    url, cli = f"sqlite:///{tmp_path / 'veil.db'}", CliRunner()
    shown = cli.invoke(app, ["runs", "show", str(seeded[0]), "--store", url])
    assert shown.exit_code == 0 and "NOT PRIVATE: noise reproducible from the seed" in shown.output
    plain = cli.invoke(app, ["runs", "show", str(private[0]), "--store", url])
    assert "NOT PRIVATE" not in plain.output and "from its own OS entropy" in plain.output
    listed = cli.invoke(app, ["runs", "--store", url])
    assert listed.output.count("simulation (seeded)") == 2 and "not private" in listed.output
    exported = json.loads(cli.invoke(app, ["export", str(seeded[0]), "--format", "json", "--store", url]).output)
    assert exported["run"][0]["privacy_note"] == NOT_PRIVATE
    assert {e["rng"] for e in exported["privacy_events"]} == {"seeded"}
    report = cli.invoke(app, ["report", str(seeded[0]), "--out", str(tmp_path / "rep"), "--store", url])
    assert report.exit_code == 0, report.output
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "**Not private: noise reproducible from the seed.**" in text
    summary_json = json.loads(cli.invoke(app, ["runs", "show", str(seeded[0]), "--format", "json",
                                               "--store", url]).output)
    assert summary_json["noise_rng"] == "seeded"


def test_the_coordinator_refuses_a_site_whose_ledger_went_backwards_or_was_replaced(tmp_path: Path) -> None:
    store = RunStore(f"sqlite:///{tmp_path / 'veil.db'}")
    ledgers, saved = tmp_path / "l", tmp_path / "saved"
    _run(SPEC, store, tmp_path, ledgers)
    shutil.copytree(ledgers, saved / "old")  # ledger + witness after run 1
    _run(SPEC, store, tmp_path, ledgers)
    shutil.copytree(ledgers, saved / "new")

    # an older copy restored with its witness: site-0 cannot tell, the coordinator can
    for name in ("site-0.ledger", "site-0.ledger.head"):
        shutil.copy(saved / "old" / name, ledgers / name)
    with pytest.raises(BudgetRefusedError, match="the coordinator refuses site-0: ledger-rolled-back"):
        _run(SPEC, store, tmp_path, ledgers)
    with SiteLedger(ledgers / "site-1.ledger", create=False, readonly=True) as other:
        assert len(other.entries()) == 2  # refused before round 1: nobody was charged

    # the newest copy back, but site-1's ledger deleted (a fresh one appears at the site)
    for name in ("site-0.ledger", "site-0.ledger.head"):
        shutil.copy(saved / "new" / name, ledgers / name)
    for name in ("site-1.ledger", "site-1.ledger.head"):
        (ledgers / name).unlink()
    with pytest.raises(BudgetRefusedError, match="the coordinator refuses site-1: ledger-replaced"):
        _run(SPEC, store, tmp_path, ledgers)
    with store.session() as s:
        codes = s.scalars(select(S.Participation.reason_code).where(S.Participation.status == "rejected")).all()
        runs = s.scalars(select(S.Run.status).order_by(S.Run.id)).all()
    assert sorted(codes) == ["ledger-replaced", "ledger-rolled-back"]
    assert runs == ["completed", "completed", "refused", "refused"]
    with SiteLedger(ledgers / "site-0.ledger", create=False, readonly=True) as ledger:
        assert len(ledger.entries()) == 2
