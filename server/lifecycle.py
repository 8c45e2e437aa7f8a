"""A run's life on the record: created ``running``, ended exactly once.

``record_run`` wraps everything a coordinator does with a run: the run row exists before any
site is asked anything, and whatever happens inside (an exception, Ctrl-C) it ends with a
final status, never ``running``. A status the run reached on its own (``refused``,
``stopped``, ``failed``) is kept. ``end_run`` is the one way to end a run: the store stores the
status; the coordinator then derives each site's run ε from the recorded events once, so
readers need not rerun the accountant (they recompute if it is missing or stale).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from sqlalchemy import select, update

from privacy.requests import Researcher
from server.read.summary import site_epsilons
from server.sentences import one_line
from server.store import RunStore
from server.store import schema as S
from veil.errors import StoreError, VeilError
from veil.logs import get_logger
from veil.names import RunMode, RunStatus
from veil.processes import owner_alive, this_process
from veil.spec import Scenario

log = get_logger("server")
MAX_ERROR = 4000
RUN_END_MARK = "veil run ended:"  # the last line a ServerApp logs for a run; `veil run` reads it
HEARTBEAT_S = 15.0  # a running run's owner touches runs.heartbeat_at this often
STALE_S = 300.0  # an owner on another host that has not beaten for this long is gone
UNOWNED_STALE_S = 24 * 3600.0  # a run from a Veil that recorded no owner


def create_run(store: RunStore, scenario: Scenario, mode: RunMode, researcher: Researcher | None = None) -> int:
    """The run row for ``scenario`` (spec snapshot and hash, seed, sizes, who asked), status ``running``."""
    run_id = store.create_run(
        name=scenario.name, spec=scenario.model_dump(mode="json"), spec_hash=scenario.spec_hash(),
        seed=scenario.seed, num_sites=scenario.federation.sites,
        num_rounds=scenario.federation.rounds, mode=mode,
        researcher=researcher.name[:120] if researcher else None,
        researcher_key_id=researcher.key_id if researcher else None,
    )
    host, pid, token = this_process()
    with store.session() as s:
        s.execute(update(S.Run).where(S.Run.id == run_id).values(
            owner_host=host, owner_pid=pid, owner_token=token, heartbeat_at=datetime.now(UTC)))
    return run_id


def first_failure(store: RunStore, run_id: int) -> str:
    """The first recorded reason a site did not take part (for a run where no round trained)."""
    with store.session() as s:
        reason = s.scalar(
            select(S.Participation.reason)
            .where(S.Participation.run_id == run_id, S.Participation.status != "ok")
            .order_by(S.Participation.id).limit(1)
        )
    return reason or "none recorded"


def note_flower_run(store: RunStore, run_id: int, flower_run_id: int | str) -> None:
    """Keep Flower's own id of the run beside Veil's (what ``flwr ls`` shows)."""
    with store.session() as s:
        s.execute(update(S.Run).where(S.Run.id == run_id).values(flower_run_id=str(flower_run_id)[:32]))


def _aware(when: datetime | None) -> datetime | None:
    return when.replace(tzinfo=UTC) if when is not None and when.tzinfo is None else when


def orphan_reason(run: S.Run, now: datetime) -> str | None:
    """Why ``run`` (status ``running``) has no live owner, or None while it may still be running.

    On the owner's own host the process table decides (a pid reused by another process does
    not count: its start token differs); elsewhere the heartbeat does."""
    alive = owner_alive(run.owner_host, run.owner_pid, run.owner_token)
    where = f"pid {run.owner_pid} on {run.owner_host}"
    if alive is False:
        return f"process ended without finishing ({where})"
    if alive is True:
        return None
    beat = _aware(run.heartbeat_at)
    if beat is not None:
        if (now - beat).total_seconds() > STALE_S:
            return f"process ended without finishing: no heartbeat from {where} since {beat:%Y-%m-%d %H:%M:%S} UTC"
        return None
    started = _aware(run.started_at or run.created_at)
    if started is not None and (now - started).total_seconds() > UNOWNED_STALE_S:
        return "process ended without finishing: no owner recorded and started over 24 h ago"
    return None


def close_orphans(store: RunStore, cause: str | None = None) -> list[int]:
    """Mark every run left ``running`` by a process that is gone as ``failed`` (with why).

    Called when ``veil simulate`` or a coordinator starts and by ``veil runs``; a run whose
    owner still runs (or beats) is left alone, and two callers at once close a run once. ``cause``
    (e.g. "coordinator restarted") goes before the reason."""
    now = datetime.now(UTC)
    with store.session() as s:
        running = s.scalars(select(S.Run).where(S.Run.status == "running")).all()
        found = [(run.id, f"{cause}: {reason}" if cause else reason)
                 for run in running if (reason := orphan_reason(run, now)) is not None]
    closed = []
    for run_id, reason in found:
        with store.session() as s:
            hit = s.execute(update(S.Run).where(S.Run.id == run_id, S.Run.status == "running")
                            .values(status="failed", error=reason, ended_at=now))
            if not getattr(hit, "rowcount", 0):
                continue
            store.interrupt_rounds(s, run_id, now)
        closed.append(run_id)
        log.warning("run %d was left running: marked failed (%s)", run_id, reason)
        derive_quietly(store, run_id)
    return closed


def mark_stopped(store: RunStore, run_id: int, reason: str) -> bool:
    """End a ``running`` run as ``stopped`` with ``reason`` (False when it was not running).

    Recorded before its process is told to stop, so whatever that process does on the way out
    (``record_run`` keeps a status it did not set) the record says stopped, and why."""
    now = datetime.now(UTC)
    with store.session() as s:
        hit = s.execute(update(S.Run).where(S.Run.id == run_id, S.Run.status == "running")
                        .values(status="stopped", error=reason[:MAX_ERROR], ended_at=now))
        if not getattr(hit, "rowcount", 0):
            return False
        store.interrupt_rounds(s, run_id, now)
    log.info("%s run %d stopped: %s", RUN_END_MARK, run_id, one_line(reason, 1000))
    derive_quietly(store, run_id)
    return True


def close_orphans_quietly(store: RunStore) -> list[int]:
    """``close_orphans`` for read commands: a store that refuses the write is logged, not fatal."""
    try:
        return close_orphans(store)
    except StoreError as err:
        log.warning("could not close runs left running: %s", err)
        return []


class Heartbeat:
    """While a run is open, touch its ``heartbeat_at`` every ``HEARTBEAT_S`` seconds (a daemon thread)."""

    def __init__(self, store: RunStore, run_id: int, every: float = HEARTBEAT_S) -> None:
        self._store, self._run_id, self._every = store, run_id, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"veil-heartbeat-{run_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _beat(self) -> None:
        while not self._stop.wait(self._every):
            try:
                with self._store.session() as s:
                    s.execute(update(S.Run).where(S.Run.id == self._run_id, S.Run.status == "running")
                              .values(heartbeat_at=datetime.now(UTC)))
            except StoreError as err:  # the store is down for a while: the run goes on
                log.warning("run %d: heartbeat not recorded (%s)", self._run_id, err)


def derive_site_epsilons(store: RunStore, run_id: int) -> None:
    """Recompute every site's run ε from its events and keep it with the site row."""
    derived = site_epsilons(store, run_id, use_derived=False)
    with store.session() as s:
        for spend in derived:
            row = s.get(S.Site, spend.site_row)
            if row is not None:
                row.derived_epsilon, row.derived_events = spend.epsilon, spend.events


def derive_quietly(store: RunStore, run_id: int) -> None:
    """``derive_site_epsilons`` where the run's status must land whatever happens: a failure is
    logged, not raised (readers recompute ε from the events anyway)."""
    try:
        derive_site_epsilons(store, run_id)
    except (ValueError, ArithmeticError, StoreError) as err:
        log.warning("run %d: could not derive site ε (%s); readers will recompute", run_id, err)


def end_run(store: RunStore, run_id: int, status: RunStatus, error: str | None = None) -> None:
    """Record the final status, then derive the sites' ε (a failure there is logged, not raised:
    the status must land, and readers recompute ε from the events anyway)."""
    store.finish_run(run_id, status=status, error=error[:MAX_ERROR] if error else None)
    log.log(logging.INFO if status in ("completed", "stopped") else logging.ERROR, "%s run %d %s%s",
            RUN_END_MARK, run_id, status, f": {one_line(error, 1000)}" if error else "")
    derive_quietly(store, run_id)


STOPPED_BY_SIGNAL = "interrupted: stopped by a signal (a deployed run: its coordinator was stopped or went down)"


def _failure(err: BaseException) -> str:
    """What a run's record says when ``err`` ended it."""
    if isinstance(err, KeyboardInterrupt):  # Ctrl-C, or SIGTERM in `veil simulate`
        return "interrupted"
    if isinstance(err, SystemExit):  # Flower's runtimes exit on SIGTERM/SIGINT/SIGQUIT (flwr_exit), e.g. a
        return STOPPED_BY_SIGNAL     # ServerApp whose coordinator died, stopped by the coordinator's reaper
    return str(err) if isinstance(err, VeilError) else f"{type(err).__name__}: {err}"


@contextmanager
def record_run(store: RunStore, scenario: Scenario, mode: RunMode = "simulation",
               researcher: Researcher | None = None) -> Iterator[int]:
    """Create the run; end it ``completed`` on success, ``failed`` (with the error) otherwise.

    Runs that earlier processes left ``running`` are closed first; this one records its owner
    and beats while it lasts, so a SIGKILL leaves something the next caller can close."""
    close_orphans(store)
    run_id = create_run(store, scenario, mode, researcher)
    try:
        with Heartbeat(store, run_id):
            yield run_id
    except BaseException as err:
        if store.get_run(run_id).status == "running":
            end_run(store, run_id, "failed", _failure(err))
            if isinstance(err, KeyboardInterrupt):
                log.warning("run %d interrupted: recorded as failed", run_id)
        raise
    if store.get_run(run_id).status == "running":
        end_run(store, run_id, "completed")
