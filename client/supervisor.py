"""Keeping a site in the federation: ``veil site start`` supervises its Flower SuperNode.

What Flower 1.41 and 1.42 do (the same code), read from the source, and what this module does about it:

* Without ``--max-retries``/``--max-wait-time`` every Fleet call is retried forever, with
  full-jitter exponential backoff capped at 20 s (``flwr/supercore/retry/http_retry.py``,
  ``MAX_RETRY_DELAY``). The SuperNode then carries on by itself when the SuperLink comes back
  with its database: the node id is still registered and the next heartbeat marks it online
  (``SqlLinkState.acknowledge_node_heartbeat``). So no retry limit is passed.
* Each failed try logs "Connection attempt failed, retrying in X seconds" (waiting); the first
  success after failures logs "Connection successful after X seconds and N tries" and the first
  activation "SuperNode ID: N" (connected).
* When a call gives up anyway (a TLS-looking error message, a non-retryable HTTP status), the
  SuperNode's worker loop ends but the process stays alive and offline: its Runtime API runs
  on a non-daemon thread. ``supernode_main`` (below) turns that into an exit
  (``GAVE_UP``). A dead heartbeat thread ("Heartbeat failed unexpectedly") leaves it polling
  but offline to the SuperLink, so that line restarts it too.
* Flower's own exit codes reach the log as "Exit Code: N"; the process itself exits 1.

So a SuperNode that exits for any reason but our stop is started again after a backoff
(1 s doubling to 60 s, back to 1 s once it has connected); one that says it is waiting but has
not logged a retry for ``STALL_S`` is stopped and restarted. Only a Flower exit code that
names a local configuration error (a bad key, certificate, path or address) ends the daemon,
with ``ExitCode.DEPLOY``. The SuperNode's log lines come out as JSON lines (``supernode-log``,
colour codes removed) and every state change as ``site-state``.

The state lives in a small JSON status file next to site.yaml (``site.yaml`` ->
``site.status.json``), rewritten atomically on every change and every ``STATUS_EVERY_S``:
a file needs no port, no extra thread serving requests and no dependency, outlives the daemon
(so ``veil site status`` can say it died, and in which state), and can be read by a container
health check (``veil site status --config site.yaml`` exits 0 only when connected).
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from veil.exits import ExitCode

State = Literal["starting", "waiting", "connected", "restarting", "stopping", "stopped", "failed"]

GAVE_UP = 75  # supernode_main: Flower's SuperNode stopped trying and would have idled on forever
STALL_S = 300.0  # "waiting" without a retry line this long: the SuperNode is stuck
BACKOFF_FIRST_S, BACKOFF_MAX_S = 1.0, 60.0  # between restarts, doubling
STATUS_EVERY_S = 30.0  # the status file is rewritten at least this often while the daemon lives
STOP_GRACE_S = 20.0
# Flower exit codes (flwr/supercore/exit/exit_code.py) that a restart cannot fix: this site's
# node key, TLS files, paths or address are wrong. 305 (cannot activate) is not among them:
# the coordinator may register the key later.
CONFIG_EXIT_CODES = frozenset({302, 303, 304, 600, 602, 603, 604, 605})
ARGPARSE_EXIT = 2  # flower-supernode rejected its command line

_LINE = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL)\s*:\s?(.*)$")
_NODE_ID = re.compile(r"SuperNode ID: (\d+)")
_RUN = re.compile(r"^\[RUN (\d+)(?:, ROUND ([^\]]+))?\]$")
_RECEIVING = re.compile(r"^Receiving: (\S+) message")
_EXIT_CODE = re.compile(r"Exit Code: (\d+)")
WAITING = "Connection attempt failed, retrying in"
CONNECTED = ("Connection successful after", "SuperNode ID:")
# Lines Flower logs only once the SuperLink has answered. After an outage the first answer can be a
# refusal, not a success (a message pulled before the outage belongs to a run that has since ended:
# 403, "not in `RUNNING` status"), and then no "Connection successful" line ever comes.
ANSWERED = ("is not in `RUNNING` status", "Run transitioned to a non-`RUNNING` status", "Received successfully",
            "Sent successfully")
DEAD_HEARTBEAT = "Heartbeat failed unexpectedly"


def status_path(config_path: Path) -> Path:
    """Where the daemon for ``config_path`` keeps its status: ``NAME.status.json`` beside it."""
    config_path = Path(config_path).expanduser()
    return config_path.with_name(f"{config_path.stem}.status.json")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass
class SiteStatus:
    """What ``veil site status`` shows: the daemon, its SuperNode's state and the last round it saw."""

    site: str
    coordinator: str
    host: str
    pid: int
    pid_token: str | None
    state: State = "starting"
    since: str = field(default_factory=_now)
    updated: str = field(default_factory=_now)
    reason: str = ""
    supernode_pid: int | None = None
    node_id: int | None = None
    restarts: int = 0
    last_connected: str | None = None
    last_message: dict[str, Any] | None = None  # run, round, type, received, replied
    last_error: str | None = None
    worker: dict[str, Any] | None = None  # the site's long-lived worker (client.worker.WorkerKeeper.status)


class Supervisor:
    """Runs ``cmd`` (a SuperNode) until SIGTERM/SIGINT, restarting it whenever it is lost."""

    def __init__(self, cmd: list[str], env: dict[str, str], status: SiteStatus, path: Path,
                 emit: Callable[..., None]) -> None:
        self.cmd, self.env, self.status, self.path, self.emit = cmd, env, status, path, emit
        self.stop_signal: str | None = None
        self._written = 0.0
        self._last_line = time.monotonic()
        self._run: dict[str, Any] = {}
        self._connected = False  # the current SuperNode has connected at least once
        self._write_lock = threading.Lock()  # the worker's keeper writes too

    # -- the status file and state changes --------------------------------------------------
    def write(self) -> None:
        """Rewrite the status file (atomically); a failure is logged, never fatal."""
        from veil.files import atomic_write

        with self._write_lock:
            self.status.updated = _now()
            try:
                atomic_write(self.path, (json.dumps(asdict(self.status), indent=2) + "\n").encode(), mode=0o644)
            except OSError as err:  # a full or read-only disk must not take the site offline
                self.emit("status-file-unwritable", path=str(self.path), error=str(err))
            self._written = time.monotonic()

    def to(self, state: State, reason: str, *, quiet: bool = False) -> None:
        """Enter ``state`` (logged as ``site-state`` unless ``quiet``) and record it in the status file."""
        if state == self.status.state and reason == self.status.reason:
            return
        if not quiet:
            was = {"previous": self.status.state} if self.status.state != state else {}
            self.emit("site-state", state=state, **was, reason=reason)
        self.status.state, self.status.reason, self.status.since = state, reason, _now()
        if state == "connected":
            self.status.last_connected = self.status.since
            self._connected = True
        self.write()

    # -- one SuperNode log line ---------------------------------------------------------------
    def on_line(self, raw: str) -> str | None:
        """Re-emit one log line; returns why the SuperNode must be restarted, if it says so."""
        from veil.processes import strip_ansi

        text = strip_ansi(raw).rstrip()
        if not text.strip():
            return None
        self._last_line = time.monotonic()
        m = _LINE.match(text)
        level, message = (m.group(1), m.group(2).strip()) if m else ("", text.strip())
        self.emit("supernode-log", level=level, message=message[:2000])
        if code := _EXIT_CODE.search(message):
            self.status.last_error = f"Flower exit code {code.group(1)}"
            self._run["exit_code"] = int(code.group(1))
        elif level in ("ERROR", "CRITICAL"):
            self.status.last_error = message[:500]
        if message.startswith(WAITING):
            self.to("waiting", "the coordinator is unreachable; Flower retries with backoff")
        elif message.startswith(CONNECTED):
            if node := _NODE_ID.search(message):
                self.status.node_id = int(node.group(1))
            self.to("connected", "the SuperNode reaches the coordinator")
        elif run := _RUN.match(message):
            self._run.update(run=int(run.group(1)), round=run.group(2))
        elif received := _RECEIVING.match(message):
            self.status.last_message = {"run": self._run.get("run"), "round": self._run.get("round"),
                                        "type": received.group(1), "received": _now(), "replied": None}
            self.write()
        elif message.startswith("Sent successfully") and self.status.last_message:
            self.status.last_message["replied"] = _now()
            self.write()
        elif DEAD_HEARTBEAT in message:
            return "its heartbeat thread died, so the coordinator sees it offline"
        if self.status.state == "waiting" and (_RECEIVING.match(message) or any(m in message for m in ANSWERED)):
            self.to("connected", "the SuperNode reaches the coordinator")
        return None

    def until_ready(self, keeper: Any) -> str | None:
        """Wait (signals honoured) until the site's worker answers; why not, if it cannot start."""
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.to("starting", "loading the site into its worker")
            return keeper.wait_ready(cancelled=lambda: self.stop_signal is not None)
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    # -- the loop -------------------------------------------------------------------------------
    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self.stop_signal is None:
            self.stop_signal = signal.Signals(signum).name

    def run(self) -> int:
        """Supervise until asked to stop (0) or until a configuration error (``ExitCode.DEPLOY``)."""
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            return self._loop()
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def _loop(self) -> int:
        from veil.processes import start_group, stop_group

        delay = BACKOFF_FIRST_S
        self.write()
        while True:
            self._run, self._connected = {}, False
            try:
                proc = start_group(self.cmd, self.env, capture=True)
            except OSError as err:
                from veil.errors import DeployError

                raise DeployError(f"cannot start the SuperNode ({self.cmd[0]}): {err}") from err
            lines: queue.Queue[str | None] = queue.Queue()
            threading.Thread(target=_pump, args=(proc, lines), daemon=True, name="supernode-log").start()
            self.status.supernode_pid = proc.pid
            self.emit("supernode-started", pid=proc.pid, command=Path(self.cmd[0]).name)
            self.to("starting", "SuperNode started; connecting to the coordinator")
            self._last_line = time.monotonic()
            why: str | None = None
            while why is None and self.stop_signal is None:
                try:
                    line = lines.get(timeout=0.5)
                except queue.Empty:
                    line = None
                if line is not None:
                    why = self.on_line(line)
                if why is None and proc.poll() is not None:
                    why = "exited"
                if why is None and self.status.state == "waiting" and time.monotonic() - self._last_line > STALL_S:
                    why = f"no retry logged for {STALL_S:.0f} s while waiting: stuck"
                if time.monotonic() - self._written > STATUS_EVERY_S:
                    self.write()
            requested = self.stop_signal is not None
            if requested:
                self.emit("site-state", state="stopping", previous=self.status.state,
                          reason=f"{self.stop_signal} received")
                self.status.state = "stopping"
            code = stop_group(proc, STOP_GRACE_S)
            self._drain(lines)
            flower_code = self._run.get("exit_code")
            if requested:
                self.emit("supernode-exited", code=code, requested=True)
                self.status.supernode_pid = None
                self.to("stopped", f"stopped on {self.stop_signal}", quiet=True)
                return 0
            reason = ("it gave up reaching the coordinator" if code == GAVE_UP else
                      f"it exited with {code}" + (f" (Flower exit code {flower_code})" if flower_code else "")
                      if why == "exited" else why)
            self.emit("supernode-exited", code=code, requested=False, reason=reason)
            self.status.supernode_pid = None
            if flower_code in CONFIG_EXIT_CODES or (why == "exited" and code == ARGPARSE_EXIT):
                self.to("failed", f"configuration error: {reason}; fix it and start the site again")
                return int(ExitCode.DEPLOY)
            delay = BACKOFF_FIRST_S if self._connected else delay
            self.status.restarts += 1
            self.to("restarting", f"SuperNode lost ({reason}); starting a new one in {delay:.0f} s")
            deadline = time.monotonic() + delay
            while self.stop_signal is None and time.monotonic() < deadline:
                time.sleep(0.2)
            if self.stop_signal is not None:
                self.to("stopped", f"stopped on {self.stop_signal}")
                return 0
            delay = min(delay * 2, BACKOFF_MAX_S)

    def _drain(self, lines: queue.Queue[str | None]) -> None:
        """The lines the stopped SuperNode still wrote (its exit code among them)."""
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return
            if line is None:
                return
            self.on_line(line)


def _pump(proc: Any, lines: queue.Queue[str | None]) -> None:
    """Hand ``proc``'s output to the supervisor line by line; None at its end."""
    try:
        for line in proc.stdout:
            lines.put(line)
    except (OSError, ValueError):
        pass
    finally:
        lines.put(None)


def read_status(config_path: Path) -> dict[str, Any]:
    """The status file of the daemon for ``config_path``, with ``alive`` (is the daemon still
    running) and ``state`` corrected to ``down`` when it is not, or ``stale`` when it has
    stopped writing; ``{"state": "never-started"}`` when there is no file."""
    from veil.processes import owner_alive

    path = status_path(config_path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {"state": "never-started", "status_file": str(path), "alive": False}
    except (OSError, ValueError) as err:
        return {"state": "unreadable", "status_file": str(path), "alive": None, "reason": str(err)}
    if not isinstance(raw, dict):
        return {"state": "unreadable", "status_file": str(path), "alive": None, "reason": "not a JSON object"}
    out: dict[str, Any] = {**raw, "status_file": str(path)}
    pid, token, host = raw.get("pid"), raw.get("pid_token"), raw.get("host")
    alive = owner_alive(host if isinstance(host, str) else None, pid if isinstance(pid, int) else None,
                        token if isinstance(token, str) else None)
    out["alive"] = alive
    if alive is False and raw.get("state") not in ("stopped", "failed"):
        out.update(state="down", reason=f"the daemon (pid {pid}) is gone; it was {raw.get('state')}")
    elif alive and isinstance(raw.get("updated"), str):
        try:
            age = (datetime.now(UTC) - datetime.fromisoformat(raw["updated"])).total_seconds()
        except ValueError:
            age = 0.0
        if age > 4 * STATUS_EVERY_S:
            out.update(state="stale", reason=f"the daemon (pid {pid}) lives but has not written for {age:.0f} s")
    return out


POLL_ENV = "VEIL_SUPERNODE_POLL_S"  # set by ``veil site start`` from site.yaml's poll_interval_s
DEFAULT_POLL_S = 0.5
FLOWER_IDLE_S = 3  # Flower 1.41/1.42: ``time.sleep(3)`` between pulls when no message came


class _BriskTime:
    """``time`` for Flower's SuperNode loop, with its 3 s idle sleep shortened to ``interval``."""

    def __init__(self, interval: float) -> None:
        self.interval = interval

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(self.interval if seconds == FLOWER_IDLE_S else seconds)


def _brisk_idle_polling(interval: float) -> None:
    """Poll the coordinator every ``interval`` s while idle, not Flower's fixed 3 s.

    An idle SuperNode pulls the SuperLink for a message, and sleeps 3 s when there is none
    (``flwr/supernode/start_client_internal.py``): a message waits up to 3 s to be picked up, two
    messages a round. (Its reply is pushed as soon as the ClientApp has answered: that wait polls
    every 0.5 s.) Nothing else in that loop sleeps 3 s; a Flower whose loop no longer does is
    left as it is."""
    import importlib

    module: Any = importlib.import_module("flwr.supernode.start_client_internal")
    if isinstance(getattr(module, "time", None), type(time)) and interval != FLOWER_IDLE_S:
        module.time = _BriskTime(interval)


def _has_ready_reply(state: Any) -> bool:
    """Whether Flower's in-memory NodeState holds a reply no push has taken yet (False when its
    internals are not the ones read here: then nothing changes)."""
    lock, store = getattr(state, "lock_msg_store", None), getattr(state, "msg_store", None)
    if lock is None or not isinstance(store, dict):
        return False
    with lock:
        return any(not getattr(e, "is_retrieved", True) and getattr(e.message.metadata, "reply_to_message_id", "")
                   for e in store.values())


def _never_strand_replies() -> None:
    """Push a ready reply even on a turn that pulled no message.

    Flower's SuperNode loop pushes replies only on a turn that pulled a message, and then only
    those ready at that moment. A reply made while the coordinator was away goes out on the
    turn of the next message pulled after it returns; that message's own reply is not ready yet,
    so it waits for another message that never comes when the coordinator is waiting for exactly
    that reply. Seen: a pre-flight after a coordinator restart timing out. Here a turn that
    pulled nothing still runs the push step when a reply is ready (the loop only tests the pulled
    run id against None)."""
    import importlib

    module: Any = importlib.import_module("flwr.supernode.start_client_internal")
    original = getattr(module, "_pull_and_store_message", None)
    if original is None or getattr(original, "_veil", False):
        return

    def pull(*args: Any, **kwargs: Any) -> Any:
        run_id = original(*args, **kwargs)
        if run_id is None and _has_ready_reply(kwargs.get("state")):
            return READY_REPLY
        return run_id

    pull._veil = True  # type: ignore[attr-defined]
    module._pull_and_store_message = pull


READY_REPLY = -1  # what the wrapped pull returns when it pulled nothing but a reply waits


def supernode_main() -> None:
    """``flower-supernode`` that exits once it gives up (run as ``python -c``; arguments as for it).

    In Flower 1.41 and 1.42 the SuperNode's worker loop ends when a Fleet call gives up (a retry limit,
    a TLS-looking error, a non-retryable HTTP status: ``supercore/retry/http_retry.py``), and
    ``flower_supernode()`` returns, but the process lives on, offline, because its Runtime API
    runs on a non-daemon thread (``supernode/cli/flower_supernode.py``). Here that return ends
    the process with ``GAVE_UP``, so whoever supervises it can start a fresh one."""
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv[0] = "flower-supernode"
    _brisk_idle_polling(float(os.environ.get(POLL_ENV, DEFAULT_POLL_S)))
    _never_strand_replies()
    flower_supernode()
    print("veil: the SuperNode stopped trying to reach the SuperLink; exiting so it can be restarted",
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(GAVE_UP)  # the Runtime API thread would keep a plain exit waiting forever
