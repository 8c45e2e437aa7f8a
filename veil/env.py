"""The environment variables Veil reads: the contract between ``veil coordinator start``,
the ServerApp that Flower starts for each run, and a user's shell. One place, one name each.
"""

from __future__ import annotations

import os
from pathlib import Path

STORE = "VEIL_STORE"
"""SQLAlchemy URL of the run store (``--store`` wins; default ``sqlite:///veil.db``)."""
COORDINATOR_KEY = "VEIL_COORDINATOR_KEY"
"""The coordinator's CKKS parameters file (``coordinator.ckks``; a secret key is refused)."""
ARTIFACTS = "VEIL_ARTIFACTS"
"""Where the coordinator writes checkpoints (default ``veil-artifacts``)."""
RESEARCHERS = "VEIL_RESEARCHERS"
"""The directory of researcher public keys (NAME.pub) the coordinator admits runs from."""
LOG_LEVEL = "VEIL_LOG_LEVEL"
"""Level of the ``veil`` logger (default INFO)."""
SITE_WORKER = "VEIL_SITE_WORKER"
"""``off``: ``veil site start`` runs no long-lived worker, and every Flower message is answered
in its own process (slow: the way Flower runs apps; for measuring, ``benchmarks/deployment.py``)."""
ACCOUNTING_CACHE = "VEIL_ACCOUNTING_CACHE"
"""Directory of accounting results kept across processes (``privacy.accounting_cache``; default
``~/.cache/veil/accounting``); ``off`` disables it."""

CACHE_DIR = "VEIL_CACHE_DIR"
"""Where parsed built-in data sets are cached (default ``$XDG_CACHE_HOME/veil``, else ``~/.cache/veil``)."""

DEFAULT_STORE_URL = "sqlite:///veil.db"
DEFAULT_ARTIFACTS = "veil-artifacts"


def get(name: str) -> str | None:
    """The variable's value, or None when it is unset or empty."""
    return os.environ.get(name) or None


def store_url(explicit: str | None = None, fallback: str = DEFAULT_STORE_URL) -> str:
    """``explicit`` (a --store option), else ``VEIL_STORE``, else ``fallback``."""
    return explicit or get(STORE) or fallback


def artifacts_dir() -> Path:
    """``VEIL_ARTIFACTS`` or the default, as given (callers resolve it)."""
    return Path(get(ARTIFACTS) or DEFAULT_ARTIFACTS)


def coordinator_env(store: str, artifacts: Path, coordinator_key: Path | None, researchers: Path
                    ) -> dict[str, str]:
    """What ``veil coordinator start`` hands the SuperLink, and through it every run's ServerApp."""
    env = {STORE: store, ARTIFACTS: str(artifacts), RESEARCHERS: str(researchers)}
    if coordinator_key is not None:
        env[COORDINATOR_KEY] = str(coordinator_key)
    return env
