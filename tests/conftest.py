"""Shared fixtures. The store suite runs on SQLite and on PostgreSQL.

PostgreSQL: ``VEIL_TEST_PG_URL`` (default ``postgresql://postgres@127.0.0.1:5432/test``).
Each test gets its own throwaway database. Without a reachable server the PostgreSQL cases
skip with the reason, except under ``CI=true``, where they fail.

Accounting results kept across processes (``VEIL_ACCOUNTING_CACHE``) go to a directory of the
session's own, never the user's cache, for this process and every process a test starts.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from veil.env import ACCOUNTING_CACHE

PG_URL = os.environ.get("VEIL_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session", autouse=True)
def _accounting_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    before = os.environ.get(ACCOUNTING_CACHE)
    os.environ[ACCOUNTING_CACHE] = str(tmp_path_factory.mktemp("accounting-cache"))
    yield
    if before is None:
        os.environ.pop(ACCOUNTING_CACHE, None)
    else:
        os.environ[ACCOUNTING_CACHE] = before


def _pg_admin_engine():  # type: ignore[no-untyped-def]
    return create_engine(PG_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})


@contextmanager
def pg_database() -> Iterator[str]:
    """A throwaway PostgreSQL database (URL); skips without a server, except in CI."""
    admin = _pg_admin_engine()  # a missing driver is an install bug: it fails, never skips
    try:
        with admin.connect() as conn:
            conn.execute(text("select 1"))
    except OperationalError as err:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"PostgreSQL at {PG_URL} is required in CI but unreachable: {err}")
        pytest.skip(f"PostgreSQL at {PG_URL} unreachable ({type(err).__name__}); "
                    "set VEIL_TEST_PG_URL to run the PostgreSQL store tests")
    name = f"veil_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"
            ), {"n": name})
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


@pytest.fixture
def pg_url() -> Iterator[str]:
    with pg_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path) -> str:  # type: ignore[no-untyped-def]
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return str(request.getfixturevalue("pg_url"))
