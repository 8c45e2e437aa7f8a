"""End to end through Flower's simulation engine (Ray), recorded in a real store."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
from sqlalchemy import func, select

from privacy import DpSgdEvent, epsilon
from server.read.summary import load_summary
from server.store import RunStore
from server.store import schema as S
from simulations.simulate import simulate
from tests.scenarios import merged, small_scenario
from veil.errors import RunFailedError
from veil.spec import parse_scenario

SMALL = small_scenario(name="e2e", seed=3, federation={"min_sites": 2}, privacy={"max_grad_norm": 1.0})


def _count(store: RunStore, table: type, **where: object) -> int:
    stmt = select(func.count()).select_from(table)
    for k, v in where.items():
        stmt = stmt.where(getattr(table, k) == v)
    with store.session() as s:
        return int(s.scalar(stmt) or 0)


@pytest.mark.slow
def test_two_sites_two_rounds_are_recorded(tmp_path: Path) -> None:
    store = RunStore(f"sqlite:///{tmp_path / 'veil.db'}")
    result = simulate(parse_scenario(SMALL), store, tmp_path / "artifacts", progress=False,
                      ledger_dir=tmp_path / "ledgers")
    run = store.get_run(result.run_id)
    assert run.status == "completed" and run.error is None
    assert _count(store, S.Round, run_id=run.id, status="completed") == 2
    assert _count(store, S.Site, run_id=run.id) == 2
    assert _count(store, S.Participation, run_id=run.id, status="ok") == 10  # 2 sites x (pre-flight + 2x2)
    assert _count(store, S.Participation, run_id=run.id, phase="preflight", status="ok") == 2
    assert _count(store, S.PrivacyEvent, run_id=run.id) == 4

    summary = load_summary(store, run.id)
    assert [r.number for r in summary.rounds] == [1, 2]
    assert all(r.accuracy is not None and 0 <= r.accuracy <= 1 for r in summary.rounds)
    assert summary.rounds[-1].accuracy > 0.3  # 10 classes: clearly above chance
    assert all(r.bytes_up > 0 and r.bytes_down > 0 for r in summary.rounds)

    # ε per site recomputed from stored events equals what the site reported after round 2
    with store.session() as s:
        rows = s.execute(select(S.Site.site_key, S.PrivacyEvent)
                         .join(S.PrivacyEvent, S.PrivacyEvent.site_id == S.Site.id)
                         .order_by(S.PrivacyEvent.round_number)).all()
    for site in summary.sites:
        mine = [ev for key, ev in rows if key == site.site]
        assert site.epsilon is not None and site.epsilon > 0 and site.rounds_joined == 2
        assert mine[-1].reported_epsilon == pytest.approx(site.epsilon, rel=1e-9)
        recomputed = epsilon([DpSgdEvent(e.noise_multiplier, e.sample_rate, e.steps, e.max_grad_norm)
                              for e in mine], mine[0].delta)
        assert recomputed == pytest.approx(site.epsilon, rel=1e-9)
        assert mine[1].reported_epsilon > mine[0].reported_epsilon  # accounting carried across rounds

    # the checkpoint is a file whose hash and size match the record
    (uri, sha, size), = summary.artifacts
    data = Path(urlparse(uri).path).read_bytes()
    assert len(data) == size and hashlib.sha256(data).hexdigest() == sha


@pytest.mark.slow
def test_failing_sites_mark_the_run_failed_with_their_sentence(tmp_path: Path) -> None:
    # every site's ledger is damaged: each site says so in one line, and the run fails with it
    ledgers = tmp_path / "l"
    ledgers.mkdir()
    for i in range(2):
        (ledgers / f"site-{i}.ledger").write_bytes(bytes(range(256)) * 20)
    store = RunStore(f"sqlite:///{tmp_path / 'veil.db'}")
    with pytest.raises(RunFailedError, match="pre-flight: only 0 of 2 sites answered"):
        simulate(parse_scenario(SMALL), store, tmp_path / "a", progress=False, ledger_dir=ledgers)
    with store.session() as s:
        run = s.scalars(select(S.Run)).one()
        failed = s.execute(select(S.Site.site_key, S.Participation.reason).join(S.Site)
                           .where(S.Participation.status == "failed")).all()
    assert run.status == "failed" and "is damaged or not a Veil ledger" in (run.error or "")
    assert sorted(site for site, _ in failed) == ["site-0", "site-1"]  # named, not node-<id>
    for text in [run.error or "", *(reason for _, reason in failed)]:
        assert "is damaged or not a Veil ledger" in text and "site-error" in text
        assert not any(bad in text for bad in ("\x1b", "Traceback", "ray::", "RayTaskError", "\n"))


def test_cli_invalid_scenario_writes_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("federation:\n  sites: -3\n")
    db = tmp_path / "veil.db"
    proc = subprocess.run(
        [sys.executable, "-m", "veil.cli", "simulate", str(bad), "--store", f"sqlite:///{db}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 2
    assert "federation.sites" in proc.stderr and "got -3" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not db.exists()


@pytest.mark.slow
def test_cli_runs_a_scenario_and_prints_json(tmp_path: Path) -> None:
    spec = tmp_path / "s.yaml"
    import yaml

    spec.write_text(yaml.safe_dump(merged(SMALL, {"federation": {"sites": 3, "rounds": 1}})))
    db = tmp_path / "veil.db"
    proc = subprocess.run(
        [sys.executable, "-m", "veil.cli", "simulate", str(spec), "--sites", "2", "--store",
         f"sqlite:///{db}", "--format", "json", "--ledger-dir", str(tmp_path / "ledgers")],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["status"] == "completed" and len(out["rounds"]) == 1 and len(out["sites"]) == 2
    assert all(site["epsilon"] > 0 for site in out["sites"])
