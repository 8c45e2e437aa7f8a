"""The run store, on SQLite and PostgreSQL alike (the ``store_url`` fixture runs both)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import func, inspect, select, text

from server.lifecycle import record_run
from server.store import RunStore
from server.store import schema as S
from veil.errors import StoreError
from veil.spec import parse_scenario

TABLES = {"runs", "sites", "rounds", "participation", "metrics", "privacy_events", "artifacts",
          "alembic_version"}


def _run(store: RunStore) -> int:
    return store.create_run(name="t", spec={"a": 1}, spec_hash="h" * 64, seed=1, num_sites=2,
                            num_rounds=1)


def test_migrates_an_empty_database_to_head(store_url: str) -> None:
    store = RunStore(store_url)
    assert set(inspect(store.engine).get_table_names()) >= TABLES
    RunStore(store_url, migrate=False)  # already at head: opens without migrating
    store.close()


def test_run_lifecycle_and_records(store_url: str) -> None:
    store = RunStore(store_url)
    run_id = _run(store)
    with store.session() as s:
        site = store.site_row(s, run_id, "site-0")
        assert store.site_row(s, run_id, "site-0").id == site.id  # get-or-create
        rnd = store.round_row(s, run_id, 1)
        rnd.status, rnd.bytes_up = "completed", 5_000_000_000  # > 2^31 fits
        s.add(S.Participation(run_id=run_id, round_number=1, site_id=site.id, phase="train",
                              status="ok", num_examples=10))
        s.add(S.PrivacyEvent(run_id=run_id, round_number=1, site_id=site.id, noise_multiplier=1.0,
                             sample_rate=0.1, steps=10, max_grad_norm=1.0, delta=1e-5,
                             accountant="pld", accountant_version="x", reported_epsilon=0.5))
    store.add_artifact(run_id, round_number=1, kind="checkpoint", uri="file:///x", sha256="0" * 64,
                       size_bytes=3)
    store.finish_run(run_id, status="completed")
    run = store.get_run(run_id)
    assert run.status == "completed" and run.wall_seconds is not None and run.wall_seconds >= 0
    with store.session() as s:
        assert s.scalar(select(S.Round.bytes_up)) == 5_000_000_000
        assert s.scalar(select(func.count()).select_from(S.PrivacyEvent)) == 1
    store.close()


def test_failed_write_rolls_back_whole_unit(store_url: str) -> None:
    store = RunStore(store_url)
    run_id = _run(store)
    with pytest.raises(StoreError, match="rolled back"), store.session() as s:
        site = store.site_row(s, run_id, "site-0")
        s.add(S.Participation(run_id=run_id, round_number=1, site_id=site.id, phase="train",
                              status="ok"))
        s.flush()
        # duplicate (run, round, site, phase) violates the unique constraint
        s.add(S.Participation(run_id=run_id, round_number=1, site_id=site.id, phase="train",
                              status="ok"))
    with store.session() as s:
        assert s.scalar(select(func.count()).select_from(S.Site)) == 0
        assert s.scalar(select(func.count()).select_from(S.Participation)) == 0
    store.close()


def test_failed_run_is_marked_failed_with_error(store_url: str) -> None:
    store = RunStore(store_url)
    scenario = parse_scenario({"name": "boom"})
    with pytest.raises(RuntimeError), record_run(store, scenario) as run_id:
        raise RuntimeError("site exploded")
    run = store.get_run(run_id)
    assert run.status == "failed" and run.error == "RuntimeError: site exploded"
    assert run.spec_hash == scenario.spec_hash() and run.ended_at is not None
    with pytest.raises(KeyboardInterrupt), record_run(store, scenario) as run2:
        raise KeyboardInterrupt
    assert store.get_run(run2).error == "interrupted"
    store.close()


def test_store_from_a_newer_veil_is_refused(store_url: str) -> None:
    store = RunStore(store_url)
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999_future'"))
    with pytest.raises(StoreError, match="newer than this Veil"):
        RunStore(store_url)
    store.close()


def test_old_schema_without_migrate_names_the_command(tmp_path) -> None:  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    with pytest.raises(StoreError, match="veil db upgrade"):
        RunStore(url, migrate=False)


def test_unreachable_or_bad_urls_give_clear_errors() -> None:
    with pytest.raises(StoreError, match="not a database URL"):
        RunStore("not a url")
    with pytest.raises(StoreError, match="cannot reach store"):
        RunStore("postgresql://nobody@127.0.0.1:1/none?connect_timeout=2")


def test_migrations_build_exactly_the_models_schema(store_url: str) -> None:
    """Alembic's autogenerate finds nothing to change after a fresh upgrade: no model drifted."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    store = RunStore(store_url)
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), S.Base.metadata)
    assert diff == []


def test_site_epsilon_is_derived_at_run_end_and_recomputed_when_stale(store_url: str) -> None:
    from privacy.accounting import DpSgdEvent, epsilon
    from server.lifecycle import end_run
    from server.read.summary import load_summary, site_epsilons

    store = RunStore(store_url)
    run_id = store.create_run(name="d", spec={}, spec_hash="h", seed=0, num_sites=1, num_rounds=2)

    def event(rn: int) -> None:
        with store.session() as s:
            site = store.site_row(s, run_id, "site-0")
            s.add(S.PrivacyEvent(run_id=run_id, round_number=rn, site_id=site.id, noise_multiplier=1.1,
                                 sample_rate=0.05, steps=20, max_grad_norm=1.0, delta=1e-5, accountant="rdp",
                                 accountant_version="x", reported_epsilon=0.0))

    event(1)
    end_run(store, run_id, "completed")
    one = epsilon([DpSgdEvent(1.1, 0.05, 20, 1.0)], 1e-5, "rdp")
    with store.session() as s:
        row = s.scalars(select(S.Site).where(S.Site.run_id == run_id)).one()
        assert row.derived_epsilon == pytest.approx(one) and row.derived_events == 1
    assert load_summary(store, run_id).sites[0].epsilon == pytest.approx(one)
    event(2)  # an event after the run ended: the derived value is stale and not used
    two = epsilon([DpSgdEvent(1.1, 0.05, 20, 1.0)] * 2, 1e-5, "rdp")
    (now,) = site_epsilons(store, run_id)
    assert now.site == "site-0" and now.epsilon == pytest.approx(two) and two > one
    assert load_summary(store, run_id).sites[0].epsilon == pytest.approx(two)


def test_schema_head_constant_is_alembics_head() -> None:
    from alembic.script import ScriptDirectory

    from server.store.store import MIGRATIONS, SCHEMA_HEAD

    assert ScriptDirectory(str(MIGRATIONS)).get_current_head() == SCHEMA_HEAD


def test_first_runs_at_once_migrate_an_empty_store_once(store_url: str) -> None:
    """Four processes open the same empty store together: all succeed, one migrates it."""
    code = "import sys; from server.store import RunStore; RunStore(sys.argv[1]).close(); print('ok')"
    procs = [subprocess.Popen([sys.executable, "-c", code, store_url], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err[-400:] for _, err in results]
    store = RunStore(store_url, migrate=False)
    with store.session() as s:
        assert s.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1
    store.close()


def test_a_ledger_or_another_file_is_not_a_store(tmp_path: Path) -> None:
    from privacy.ledger import SiteLedger

    ledger = tmp_path / "site.ledger"
    SiteLedger(ledger, create=True, site_id="site-a").close()
    other = tmp_path / "data.csv"
    other.write_text("a,b\n1,2\n" * 200)
    for path, why in ((ledger, "not a Veil run store.*site's privacy ledger"),
                      (other, "not an SQLite database")):
        before = hashlib.sha256(path.read_bytes()).hexdigest()
        with pytest.raises(StoreError, match=why):
            RunStore(f"sqlite:///{path}")
        assert hashlib.sha256(path.read_bytes()).hexdigest() == before  # untouched
