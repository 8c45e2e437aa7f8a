"""The run store: SQLAlchemy 2 schema, Alembic migrations, and the RunStore API."""

from server.store.store import RunStore
from veil.env import DEFAULT_STORE_URL

__all__ = ["DEFAULT_STORE_URL", "RunStore"]
