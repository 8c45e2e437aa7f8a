"""The run store: SQLAlchemy 2 schema, Alembic migrations, and the RunStore API."""

from server.store.store import DEFAULT_STORE_URL, RunStore

__all__ = ["DEFAULT_STORE_URL", "RunStore"]
