"""RunStore: open (and migrate) the database, write a run's record, read it back.

* One ``session()`` that commits on success and rolls back on any error, so a bad write
  never leaves half a record.
* SQLite (the embedded default) runs in WAL mode with foreign keys on; PostgreSQL for
  shared deployments. The same test suite runs against both.
* The schema is owned by Alembic: opening a store upgrades it to head (an empty database
  is created), and a database from a *newer* Veil is refused rather than touched.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, select, update
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from server.store import schema as S
from veil import __version__, env
from veil.errors import StoreError
from veil.logs import get_logger
from veil.names import RunMode, RunStatus

log = get_logger("store")

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
SCHEMA_HEAD = "0010"  # the newest migration; a test checks it against Alembic's own head
MIGRATION_LOCK = 0x7665696C  # "veil": the PostgreSQL advisory lock key held while migrating


def code_version() -> str:
    """Package version plus the git commit when running from a checkout."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=Path(__file__).parent,
            capture_output=True, text=True, timeout=5, check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+g{sha}" if sha else __version__


def resolve_store_url(url: str | None) -> str:
    """``url`` (a --store option), else ``VEIL_STORE``, else the default SQLite file."""
    return env.store_url(url)


def _alembic_config(connection: Any = None) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def _head_revision() -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None
    return head


class RunStore:
    """The coordinator's record of runs, rounds, sites, participation, metrics and privacy."""

    def __init__(self, url: str | None = None, *, migrate: bool = True) -> None:
        self.url = resolve_store_url(url)
        try:
            parsed = make_url(self.url)
        except ArgumentError:
            raise StoreError(
                f"store URL {self.url!r} is not a database URL; use e.g. sqlite:///veil.db or "
                "postgresql://user@host:5432/db"
            ) from None
        kwargs: dict[str, Any] = {}
        if parsed.get_backend_name() == "sqlite":
            db = parsed.database
            if db and db != ":memory:":
                Path(db).expanduser().parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"timeout": 30}
        else:
            kwargs["pool_pre_ping"] = True
        try:
            self.engine: Engine = create_engine(parsed, **kwargs)
        except (ArgumentError, ImportError) as err:
            raise StoreError(f"cannot open store {parsed.render_as_string()}: {err}") from None
        if parsed.get_backend_name() == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._check_schema(migrate)

    # -- schema --------------------------------------------------------------------------
    def _check_schema(self, migrate: bool) -> None:
        safe = make_url(self.url).render_as_string(hide_password=True)
        try:
            with self.engine.begin() as conn:
                current = _stamped_revision(conn)  # the common case, without importing Alembic
            if current != SCHEMA_HEAD:
                engine = self._migration_engine()
                try:
                    with engine.begin() as conn:
                        self._migrate(conn, safe, migrate)
                finally:
                    if engine is not self.engine:
                        engine.dispose()
            if self.engine.dialect.name == "sqlite":  # only now that it is known to be a run store
                with self.engine.connect() as conn:
                    conn.exec_driver_sql("PRAGMA journal_mode=WAL")
        except DBAPIError as err:
            why = " ".join(str(err.orig).split())  # drivers' messages span lines: keep one
            if "file is not a database" in why:
                raise StoreError(f"store {safe} is not an SQLite database; point --store (or VEIL_STORE) "
                                 "at a Veil run store, or at a new file to create one") from None
            raise StoreError(f"cannot reach store {safe}: {why}; check that the database server is up "
                             "and the URL (--store or VEIL_STORE) is right") from None

    def _migration_engine(self) -> Engine:
        """An engine whose transactions hold the database's write lock from their first statement:
        SQLite begins IMMEDIATE (a second process waits for the busy timeout); PostgreSQL takes a
        transaction-scoped advisory lock in ``_migrate``. So two first runs on an empty store
        migrate it once, and the second finds it at head."""
        if self.engine.dialect.name != "sqlite":
            return self.engine
        engine = create_engine(self.engine.url, connect_args={"timeout": 60})

        def autocommit(dbapi_conn: Any, _record: Any) -> None:
            _sqlite_pragmas(dbapi_conn, _record)
            dbapi_conn.isolation_level = None  # the driver's implicit BEGIN is replaced below

        def begin_immediate(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        event.listen(engine, "connect", autocommit)
        event.listen(engine, "begin", begin_immediate)
        return engine

    def _migrate(self, conn: Any, safe: str, migrate: bool) -> None:
        from alembic import command
        from alembic.runtime.migration import MigrationContext
        from sqlalchemy import inspect, text

        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        head = _head_revision()
        current = MigrationContext.configure(conn).get_current_revision()
        if current == head:
            return
        if current is None:
            tables = set(inspect(conn).get_table_names())
            foreign = tables if conn.dialect.name == "sqlite" else tables & set(S.Base.metadata.tables)
            if foreign:
                shown = ", ".join(sorted(foreign)[:6])
                ledger = {"ledger_meta", "ledger_entries"} <= tables
                hint = " (it looks like a site's privacy ledger)" if ledger else ""
                raise StoreError(f"store {safe} is not a Veil run store: it holds other tables ({shown})"
                                 f"{hint}; point --store (or VEIL_STORE) at a run store, or at a new file")
        known = _known_revisions()
        if current is not None and current not in known:
            raise StoreError(
                f"store {safe} has schema revision {current}, newer than this Veil "
                f"(head {head}); upgrade Veil to use it"
            )
        if not migrate:
            raise StoreError(
                f"store {safe} is at schema {current or 'empty'}, expected {head}; "
                f"run: veil db upgrade --store '{safe}'"
            )
        command.upgrade(_alembic_config(conn), "head")

    @property
    def safe_url(self) -> str:
        """The URL with any password hidden: for messages and logs."""
        return make_url(self.url).render_as_string(hide_password=True)

    def upgrade(self) -> None:
        """Migrate the schema to this Veil's head; a store from a newer Veil is refused."""
        self._check_schema(migrate=True)

    def close(self) -> None:
        """Dispose of the engine and its pooled connections."""
        self.engine.dispose()

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A unit of work: commits when the block ends, rolls back if it raises."""
        session = self._sessions()
        try:
            yield session
            session.commit()
        except SQLAlchemyError as err:
            session.rollback()
            raise StoreError(f"store write failed and was rolled back: {err}") from err
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    # -- runs ----------------------------------------------------------------------------
    def create_run(self, *, name: str, spec: dict[str, Any], spec_hash: str, seed: int,
                   num_sites: int, num_rounds: int, mode: RunMode = "simulation",
                   researcher: str | None = None, researcher_key_id: str | None = None) -> int:
        """A new run row, ``running`` from now; returns its id."""
        with self.session() as s:
            run = S.Run(
                name=name, status="running", spec_json=json.dumps(spec, sort_keys=True),
                spec_hash=spec_hash, code_version=code_version(), seed=seed,
                num_sites=num_sites, num_rounds=num_rounds, mode=mode,
                started_at=datetime.now(UTC), researcher=researcher, researcher_key_id=researcher_key_id,
            )
            s.add(run)
            s.flush()
            return run.id

    def finish_run(self, run_id: int, *, status: RunStatus, error: str | None = None) -> None:
        """Store the run's final status, error and wall time (``server.lifecycle`` decides them)."""
        with self.session() as s:
            run = s.get(S.Run, run_id)
            if run is None:
                raise StoreError(f"no run {run_id} in store")
            run.status = status
            run.error = error
            run.ended_at = datetime.now(UTC)
            self.interrupt_rounds(s, run_id, run.ended_at)
            if run.started_at is not None:
                started = run.started_at if run.started_at.tzinfo else run.started_at.replace(tzinfo=UTC)
                run.wall_seconds = (run.ended_at - started).total_seconds()

    @staticmethod
    def interrupt_rounds(s: Session, run_id: int, when: datetime) -> None:
        """A run that ends leaves no round ``running``: those are ``interrupted`` at ``when``."""
        s.execute(update(S.Round).where(S.Round.run_id == run_id, S.Round.status == "running")
                  .values(status="interrupted", ended_at=when))

    def get_run(self, run_id: int) -> S.Run:
        """The run's row, readable after its session closes; ``StoreError`` if there is no such run."""
        with self.session() as s:
            run = s.get(S.Run, run_id)
            if run is None:
                raise StoreError(f"no run {run_id} in store {self.url}")
            return run

    # -- sites & rounds ------------------------------------------------------------------
    def site_row(self, s: Session, run_id: int, site_key: str) -> S.Site:
        """The row of ``site_key`` in the run, added and flushed (for its id) in session ``s`` if missing."""
        row = s.scalar(select(S.Site).where(S.Site.run_id == run_id, S.Site.site_key == site_key))
        if row is None:
            row = S.Site(run_id=run_id, site_key=site_key)
            s.add(row)
            s.flush()
        return row

    def set_encryption(self, run_id: int, description_json: str) -> None:
        """The run's public CKKS description (key id, parameters): never a key."""
        with self.session() as s:
            run = s.get(S.Run, run_id)
            if run is None:
                raise StoreError(f"no run {run_id} in the store")
            run.encryption_json = description_json

    def round_row(self, s: Session, run_id: int, number: int) -> S.Round:
        """The row of round ``number``, added as ``running`` and flushed in session ``s`` if missing."""
        row = s.scalar(select(S.Round).where(S.Round.run_id == run_id, S.Round.number == number))
        if row is None:
            row = S.Round(run_id=run_id, number=number, status="running")
            s.add(row)
            s.flush()
        return row

    def add_artifact(self, run_id: int, *, round_number: int | None, kind: str, uri: str,
                     sha256: str, size_bytes: int) -> None:
        """Record a file the run produced by its URI, sha256 and size (never its bytes)."""
        with self.session() as s:
            s.add(S.Artifact(run_id=run_id, round_number=round_number, kind=kind, uri=uri,
                             sha256=sha256, size_bytes=size_bytes))


def _stamped_revision(conn: Any) -> str | None:
    """The store's Alembic revision when it has exactly one, read with plain SQL; else None."""
    from sqlalchemy import inspect, text

    if not inspect(conn).has_table("alembic_version"):
        return None
    rows = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    return rows[0] if len(rows) == 1 else None


def _known_revisions() -> set[str]:
    from alembic.script import ScriptDirectory

    return {rev.revision for rev in ScriptDirectory.from_config(_alembic_config()).walk_revisions()}


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()  # journal_mode=WAL is set once the file is known to be a run store
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()

