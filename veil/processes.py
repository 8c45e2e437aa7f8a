"""Starting and supervising Flower's own processes (SuperLink, SuperNode, ``flwr``), with the
app runners pinned to the Veil installed here (``pinned_path``).

Used by the site daemon and by the coordinator command alike: Flower starts its helpers by
name, so this interpreter's scripts directory goes first on ``PATH``; a supervised process
runs in its own process group and is stopped (SIGTERM, then SIGKILL) when we are asked to stop.
``supervise`` runs one process until it exits (the coordinator); the site keeps its SuperNode
running with ``start_group``/``stop_group`` (``client.supervisor``, whose ``supernode_main`` runs it).
"""

from __future__ import annotations

import os
import re
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

SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
"""Flower's SuperExec polls for a ClientApp/ServerApp to start every this many seconds (default 1);
Veil's site and coordinator set 0.2 unless it is set already."""

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
        raise DeployError(f"{name} is not installed in this environment (pip install 'flwr>=1.42,<1.43')")
    return exe


def supervise(cmd: list[str], env: dict[str, str], on_event: Callable[..., None], grace: float = 20.0,
              capture: bool = False) -> int:
    """Run ``cmd`` in its own process group until it exits or SIGTERM/SIGINT asks us to stop;
    then stop it (SIGTERM, SIGKILL after ``grace`` seconds). 0 when asked to stop, else its code.
    With ``capture``, each line it (and its children) print comes back as a ``log`` event,
    without terminal colour codes."""
    import threading

    proc = subprocess.Popen(cmd, env=env, start_new_session=True, text=True, errors="replace",
                            stdout=subprocess.PIPE if capture else None,
                            stderr=subprocess.STDOUT if capture else None)
    on_event("started", pid=proc.pid, command=Path(cmd[0]).name)
    if capture:
        def relay() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                if text := strip_ansi(line).rstrip():
                    on_event("log", line=text)

        threading.Thread(target=relay, name="veil-log-relay", daemon=True).start()
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


# -- a SuperNode that can be kept running ---------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def strip_ansi(text: str) -> str:
    """``text`` without terminal colour and cursor codes (Flower colours its log levels)."""
    return _ANSI.sub("", text)


def start_group(cmd: list[str], env: dict[str, str], *, capture: bool = False) -> subprocess.Popen[str]:
    """Start ``cmd`` as the leader of its own process group; with ``capture`` its stdout and
    stderr come back merged, line by line, on ``proc.stdout``."""
    out = subprocess.PIPE if capture else None
    return subprocess.Popen(cmd, env=env, start_new_session=True, stdout=out,
                            stderr=subprocess.STDOUT if capture else None, text=True, errors="replace",
                            bufsize=1 if capture else -1)


def stop_group(proc: subprocess.Popen[Any], grace: float = 20.0) -> int:
    """Stop ``proc`` and everything in its process group (SIGTERM, SIGKILL after ``grace``
    seconds); also sweeps up helpers left in the group after the leader exited. Its exit code."""
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    with suppress(ProcessLookupError, PermissionError):  # a helper that outlived its leader
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode


# -- who owns a run, and is it still alive -----------------------------------------------------
def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:36]
    except OSError:
        return "noboot"


def _linux_stat(pid: int) -> tuple[int, str] | None:
    """(ppid, start time in clock ticks) of ``pid`` from /proc, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes().decode("ascii", "replace")
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2:].split()  # the name may hold spaces and parentheses
    return int(fields[1]), fields[19]


def process_table() -> dict[int, tuple[int, str]]:
    """Every process on this machine as ``pid -> (ppid, start token)``."""
    table: dict[int, tuple[int, str]] = {}
    if Path("/proc/self/stat").exists():
        for entry in os.scandir("/proc"):
            if entry.name.isdigit() and (stat := _linux_stat(int(entry.name))) is not None:
                table[int(entry.name)] = stat
        return table
    out = subprocess.run(["ps", "-A", "-o", "pid=", "-o", "ppid=", "-o", "lstart="],
                         capture_output=True, text=True, check=False).stdout
    for line in out.splitlines():
        pid, ppid, *start = line.split()
        table[int(pid)] = (int(ppid), "-".join(start))
    return table


def _pid_space() -> str:
    """Which pid numbering this process sees: the boot and the pid namespace (two containers
    with one host name still number their processes apart)."""
    try:
        namespace = os.readlink("/proc/self/ns/pid").removeprefix("pid:")
    except OSError:
        namespace = "-"
    return f"{_boot_id()}:{namespace}"


def process_token(pid: int) -> str | None:
    """What tells process ``pid`` apart from a later one that reuses its number (boot, pid
    namespace and start time), or None when there is no such process."""
    if Path("/proc/self/stat").exists():
        stat = _linux_stat(pid)
        return None if stat is None else f"{_pid_space()}:{stat[1]}"
    entry = process_table().get(pid)
    return None if entry is None else entry[1]


def this_process() -> tuple[str, int, str | None]:
    """(host name, pid, start token) of this process: what a run records as its owner."""
    import socket

    return socket.gethostname()[:255], os.getpid(), process_token(os.getpid())


def owner_alive(host: str | None, pid: int | None, token: str | None) -> bool | None:
    """Whether the recorded owner process still runs: True/False when it was on this host,
    None when it cannot be told from here (another host, or nothing recorded)."""
    import socket

    if host is None or pid is None or host != socket.gethostname()[:255]:
        return None
    if token is not None and Path("/proc/self/stat").exists() and token.rpartition(":")[0] != _pid_space():
        return None  # same host name, another boot or pid namespace: its pids mean nothing here
    current = process_token(pid)
    return current is not None and (token is None or current == token)


def descendants(root: int, table: dict[int, tuple[int, str]]) -> set[int]:
    """Every process below ``root`` in ``table`` (children, their children, ...)."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def start_reaper() -> subprocess.Popen[bytes] | None:
    """A watchdog (``veil.reaper``) that stops every process this one started, Ray's included,
    once this process is gone, however it ends (SIGKILL too). None where it cannot start."""
    try:
        return subprocess.Popen([sys.executable, "-m", "veil.reaper", str(os.getpid())],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True, close_fds=True)
    except OSError:
        return None
