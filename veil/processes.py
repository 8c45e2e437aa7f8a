"""Starting and supervising Flower's own processes (SuperLink, SuperNode, ``flwr``), with the
app runners pinned to the Veil installed here (``pinned_path``).

Used by the site daemon and by the coordinator command alike: Flower starts its helpers by
name, so this interpreter's scripts directory goes first on ``PATH``; a supervised process
runs in its own process group and is stopped (SIGTERM, then SIGKILL) when we are asked to stop.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

from veil.errors import DeployError


def bin_path() -> str:
    """This interpreter's scripts directory first: Flower starts its helpers by name."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def pinned_path(directory: Path) -> str:
    """A ``PATH`` whose ``flwr-clientapp`` and ``flwr-serverapp`` run the Veil installed here
    (``veil.apps.pinned``), never code from a run's app bundle; then this interpreter's scripts.

    Flower starts those runners by name for every message; the scripts are written into
    ``directory`` (the caller's own, e.g. a temporary directory that lives as long as it does)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, entry in (("flwr-clientapp", "clientapp"), ("flwr-serverapp", "serverapp")):
        script = directory / name
        script.write_text(f"#!{sys.executable}\nfrom veil.apps.pinned import {entry}\n\n{entry}()\n")
        script.chmod(0o755)
    return os.pathsep.join([str(directory), bin_path()])


def flower_exe(name: str) -> str:
    """The path of Flower executable ``name`` in this environment, or a DeployError with the fix."""
    exe = shutil.which(name, path=bin_path())
    if exe is None:
        raise DeployError(f"{name} is not installed in this environment (pip install 'flwr>=1.41,<1.42')")
    return exe


def supervise(cmd: list[str], env: dict[str, str], on_event: Callable[..., None], grace: float = 20.0) -> int:
    """Run ``cmd`` in its own process group until it exits or SIGTERM/SIGINT asks us to stop;
    then stop it (SIGTERM, SIGKILL after ``grace`` seconds). 0 when asked to stop, else its code."""
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    on_event("started", pid=proc.pid, command=Path(cmd[0]).name)
    stopping: list[float] = []

    def stop(signum: int, _frame: Any) -> None:
        if not stopping:
            stopping.append(time.monotonic())
            on_event("stopping", signal=signal.Signals(signum).name)
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while (code := proc.poll()) is None:
            time.sleep(0.2)
            if stopping and time.monotonic() - stopping[0] > grace:  # it ignored SIGTERM
                os.killpg(proc.pid, signal.SIGKILL)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    on_event("exited", code=code, requested=bool(stopping))
    return 0 if stopping else code
