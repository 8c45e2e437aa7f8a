"""One package logger for Veil.

Library code only *gets* loggers; `configure()` is called once by the CLI. The level comes
from ``VEIL_LOG_LEVEL`` (default INFO). Nothing private (raw data, keys, per-record values)
is ever passed to these loggers.
"""

from __future__ import annotations

import logging
import os

from veil import env

LOGGER_NAME = "veil"


def get_logger(name: str | None = None) -> logging.Logger:
    """Return the package logger or a child of it (``veil.<name>``)."""
    return logging.getLogger(LOGGER_NAME if name is None else f"{LOGGER_NAME}.{name}")


def configure(level: str | None = None) -> None:
    """Attach one stderr handler to the ``veil`` logger (idempotent)."""
    logger = logging.getLogger(LOGGER_NAME)
    wanted = (level or os.environ.get(env.LOG_LEVEL, "INFO")).upper()
    logger.setLevel(wanted)
    if not any(getattr(h, "_veil", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler._veil = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.propagate = False
