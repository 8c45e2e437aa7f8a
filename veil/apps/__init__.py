"""The module-level Flower apps that ``flwr run`` loads (``[tool.flwr.app.components]``).

They sit above ``server/``, ``client/`` and ``simulations/`` so that nothing below needs to
know how a run was started; nothing imports them.
"""

from __future__ import annotations

from pathlib import Path

APP_ROOT = Path(__file__).resolve().parents[2]  # the app: Veil's tree, or the installed FAB `flwr run` sent


def app_relative(path: str) -> Path:
    """A relative scenario path from the run config, against the app (where ``simulations/scenarios``
    lives), not the working directory of the SuperLink or SuperNode that started this process;
    an absolute one as is. Both apps read ``scenario`` this way."""
    given = Path(path).expanduser()
    return given if given.is_absolute() else APP_ROOT / given
