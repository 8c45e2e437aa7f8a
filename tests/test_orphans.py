"""A run is never left ``running`` by a process that is gone: its owner (host, pid, start
token) and heartbeat are recorded, and the next ``veil simulate``, coordinator or ``veil runs``
closes it as ``failed`` with why. On SQLite and PostgreSQL alike (``store_url``)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update

from server import lifecycle
from server.lifecycle import Heartbeat, close_orphans, create_run, record_run
from server.store import RunStore
from server.store import schema as S
from veil.processes import process_token, this_process
from veil.spec import parse_scenario

SCENARIO = parse_scenario({"federation": {"sites": 2, "rounds": 1}})


def _owned_by(store: RunStore, run_id: int, **owner: object) -> None:
    with store.session() as s:
        s.execute(update(S.Run).where(S.Run.id == run_id).values(**owner))


def _dead_pid() -> tuple[int, str]:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    token = process_token(child.pid)
    assert token is not None
    child.kill()
    child.wait()
    return child.pid, token


def test_a_run_records_its_owner_and_beats(store_url: str) -> None:
    store = RunStore(store_url)
    run_id = create_run(store, SCENARIO, "simulation")
    run = store.get_run(run_id)
    host, pid, token = this_process()
    assert (run.owner_host, run.owner_pid, run.owner_token) == (host, pid, token) and token
    first = run.heartbeat_at
    with Heartbeat(store, run_id, every=0.05):
        deadline = time.monotonic() + 10
        while store.get_run(run_id).heartbeat_at == first and time.monotonic() < deadline:
            time.sleep(0.05)
    assert store.get_run(run_id).heartbeat_at != first
    assert close_orphans(store) == []  # this process owns it and is alive
    assert store.get_run(run_id).status == "running"
    store.close()


def test_dead_owner_is_closed_with_why(store_url: str) -> None:
    store = RunStore(store_url)
    dead = create_run(store, SCENARIO, "simulation")
    pid, token = _dead_pid()
    _owned_by(store, dead, owner_pid=pid, owner_token=token)
    reused = create_run(store, SCENARIO, "simulation")  # a live pid, but another process's start
    _owned_by(store, reused, owner_token=token.rpartition(":")[0] + ":1")  # this pid space, another start
    live = create_run(store, SCENARIO, "simulation")
    with store.session() as s:  # the dead run was mid-round 2; the live one is mid-round 1
        s.add_all([S.Round(run_id=dead, number=1, status="completed"),
                   S.Round(run_id=dead, number=2, status="running"),
                   S.Round(run_id=live, number=1, status="running")])
    assert sorted(close_orphans(store)) == sorted([dead, reused])
    with store.session() as s:
        rounds = {(r.run_id, r.number): (r.status, r.ended_at is not None) for r in s.query(S.Round)}
    assert rounds == {(dead, 1): ("completed", False), (dead, 2): ("interrupted", True),
                      (live, 1): ("running", False)}  # an ended run leaves no round running
    for run_id in (dead, reused):
        run = store.get_run(run_id)
        assert run.status == "failed" and run.ended_at is not None
        assert run.error is not None and run.error.startswith("process ended without finishing")
    assert f"pid {pid}" in (store.get_run(dead).error or "")
    assert store.get_run(live).status == "running"
    assert close_orphans(store) == []  # closed once
    store.close()


def test_other_hosts_are_judged_by_their_heartbeat(store_url: str) -> None:
    store = RunStore(store_url)
    now = datetime.now(UTC)
    fresh = create_run(store, SCENARIO, "deployment")
    _owned_by(store, fresh, owner_host="coordinator-elsewhere", heartbeat_at=now - timedelta(seconds=30))
    stale = create_run(store, SCENARIO, "deployment")
    _owned_by(store, stale, owner_host="coordinator-elsewhere",
              heartbeat_at=now - timedelta(seconds=lifecycle.STALE_S + 60))
    unowned_old = create_run(store, SCENARIO, "deployment")  # written by a Veil without owners
    _owned_by(store, unowned_old, owner_host=None, owner_pid=None, owner_token=None, heartbeat_at=None,
              started_at=now - timedelta(days=2))
    unowned_new = create_run(store, SCENARIO, "deployment")
    _owned_by(store, unowned_new, owner_host=None, owner_pid=None, owner_token=None, heartbeat_at=None)
    assert sorted(close_orphans(store)) == sorted([stale, unowned_old])
    assert "no heartbeat from pid" in (store.get_run(stale).error or "")
    assert store.get_run(fresh).status == store.get_run(unowned_new).status == "running"
    store.close()


def test_two_closers_at_once_close_each_run_once(store_url: str) -> None:
    store = RunStore(store_url)
    runs = [create_run(store, SCENARIO, "simulation") for _ in range(6)]
    pid, token = _dead_pid()
    for run_id in runs:
        _owned_by(store, run_id, owner_pid=pid, owner_token=token)
    results: list[list[int]] = []
    threads = [threading.Thread(target=lambda: results.append(close_orphans(RunStore(store_url))))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    closed = [run_id for got in results for run_id in got]
    assert sorted(closed) == sorted(runs)  # every run once, whoever got there first
    store.close()


def test_record_run_closes_orphans_before_starting(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = RunStore(f"sqlite:///{tmp_path}/s.db")
    orphan = create_run(store, SCENARIO, "simulation")
    pid, token = _dead_pid()
    _owned_by(store, orphan, owner_pid=pid, owner_token=token)
    with record_run(store, SCENARIO) as run_id:
        assert store.get_run(orphan).status == "failed"
        assert store.get_run(run_id).status == "running"
    assert store.get_run(run_id).status == "completed"
    with pytest.raises(KeyboardInterrupt), record_run(store, SCENARIO) as interrupted:
        raise KeyboardInterrupt
    assert (store.get_run(interrupted).status, store.get_run(interrupted).error) == ("failed", "interrupted")
    store.close()


def test_a_restarted_coordinator_says_why(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = RunStore(f"sqlite:///{tmp_path}/s.db")
    run_id = create_run(store, SCENARIO, "deployment")
    pid, token = _dead_pid()
    _owned_by(store, run_id, owner_pid=pid, owner_token=token)
    assert close_orphans(store, "coordinator restarted") == [run_id]
    assert (store.get_run(run_id).error or "").startswith("coordinator restarted: process ended without finishing")
    store.close()


def test_a_run_from_another_pid_namespace_is_judged_by_its_heartbeat(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Two containers with one host name: the other's pids mean nothing here, even dead-looking ones."""
    store = RunStore(f"sqlite:///{tmp_path}/s.db")
    run_id = create_run(store, SCENARIO, "deployment")
    pid, token = _dead_pid()
    elsewhere = "0" * 36 + ":[4026531999]:" + token.rpartition(":")[2]
    _owned_by(store, run_id, owner_pid=pid, owner_token=elsewhere)  # this host's name, fresh heartbeat
    assert close_orphans(store) == []
    _owned_by(store, run_id, heartbeat_at=datetime.now(UTC) - timedelta(seconds=lifecycle.STALE_S + 60))
    assert close_orphans(store) == [run_id]
    store.close()
