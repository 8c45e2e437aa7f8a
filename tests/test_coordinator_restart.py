"""A coordinator that dies mid-run and comes back (the issue's "done when" test).

Real processes on 127.0.0.1: `veil coordinator start` (a Flower SuperLink with TLS and
SuperNode authentication, its run store on SQLite) and three `veil site start` daemons. A run
of several rounds is submitted with `veil run`; once round 1 trains, the coordinator's process
group is SIGKILLed (its reaper then stops the SuperLink and the ServerApp) and it stays down
for 90 s while the sites wait. The same coordinator (port, SuperLink state, store) is started
again and nobody touches the sites: all three are connected within 30 s, the interrupted run
is ``failed`` because the coordinator restarted, its `veil run` has exited non-zero, and a new
run completes with all three sites in every round.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from sqlalchemy import select

from client.supervisor import read_status
from server.lifecycle import STOPPED_BY_SIGNAL, record_run
from server.store import RunStore
from server.store import schema as S
from tests.test_deployment import _events, _free_port, _listening, _wait_for
from tests.test_site_reconnect import Procs, _federation, _online_nodes, _register, _state
from tests.test_site_reconnect import procs as procs  # the fixture: the processes a test starts, stopped after

VEIL = [sys.executable, "-m", "veil.cli"]
SITES = ("site-a", "site-b", "site-c")
OUTAGE_S = 90.0
RECONNECT_S = 30.0
FIRST_ROUNDS = 5  # the interrupted run: never gets that far
SECOND_ROUNDS = 2


def _spec(base: Path, name: str, rounds: int) -> str:
    """A tiny scenario for the federation's CSV sites (4 features, 3 labels, 48 training rows each)."""
    (base / f"{name}.yaml").write_text(yaml.safe_dump({
        "name": name, "seed": 5,
        "federation": {"sites": len(SITES), "rounds": rounds, "min_sites": len(SITES), "round_timeout_s": 90},
        "model": {"arch": "mlp", "in_features": 4, "num_classes": 3},
        "training": {"batch_size": 16, "learning_rate": 0.5}, "privacy": {"noise_multiplier": 2.0},
    }))
    return f"{name}.yaml"


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").exists() and Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z"


def _site_status(base: Path, name: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VEIL, "site", "status", "--config", f"{name}.yaml"], cwd=base, capture_output=True,
                          text=True, timeout=60, check=False)


def test_a_run_whose_serverapp_is_stopped_by_a_signal_says_so(tmp_path: Path) -> None:
    """Flower's runtimes turn SIGTERM into ``SystemExit(0)`` (``flwr_exit``): the record says what happened."""
    from veil.spec import parse_scenario

    store = RunStore(f"sqlite:///{tmp_path / 'runs.db'}")
    try:
        with pytest.raises(SystemExit), record_run(store, parse_scenario({"federation": {"sites": 2}})) as run_id:
            raise SystemExit(0)
        assert (store.get_run(run_id).status, store.get_run(run_id).error) == ("failed", STOPPED_BY_SIGNAL)
    finally:
        store.close()


def test_a_refusal_after_an_outage_means_the_site_reaches_the_coordinator(tmp_path: Path) -> None:
    """A SuperNode that was pulling a message when the coordinator died: its first answer after the
    restart is a 403 for the ended run, so Flower never logs "Connection successful"."""
    from client.supervisor import SiteStatus, Supervisor

    status = SiteStatus(site="s", coordinator="127.0.0.1:1", host="h", pid=os.getpid(), pid_token=None)
    supervisor = Supervisor(["true"], {}, status, tmp_path / "s.status.json", lambda *_a, **_kw: None)
    supervisor.on_line("\x1b[92mINFO \x1b[0m:      SuperNode ID: 42")
    supervisor.on_line("\x1b[33mWARNING \x1b[0m:   Connection attempt failed, retrying in 14.43 seconds")
    assert status.state == "waiting"
    supervisor.on_line("\x1b[92mINFO \x1b[0m:      Run ID 7 is not in `RUNNING` status. Ignoring message ab12.")
    assert status.state == "connected"


@pytest.mark.slow  # a coordinator, three sites and two runs, as separate processes
def test_a_coordinator_killed_for_90_s_and_restarted(procs: Procs) -> None:
    began = time.monotonic()
    base, port = procs.base, _free_port()
    _federation(base, port, SITES)
    url = f"sqlite:///{base / 'runs.db'}"
    coordinator_cmd = [*VEIL, "coordinator", "start", "--certs", "certs", "--store", url, "--host", "127.0.0.1",
                       "--port", str(port), "--state", "state/superlink.db", "--artifacts-dir", "art",
                       "--researchers", "researchers"]  # alice, whom the sites trust too

    def start_coordinator() -> subprocess.Popen:
        proc = procs.start(coordinator_cmd, "coordinator.log")
        _wait_for(lambda: _listening(port), 90, "the SuperLink to listen", proc)
        return proc

    def submit(spec: str, log: str) -> subprocess.Popen:
        return procs.start([*VEIL, "run", spec, "--coordinator", f"127.0.0.1:{port}", "--ca", "certs/ca.crt",
                            "--key", "alice", "--timeout", "600"], log)

    coordinator = start_coordinator()
    nodes = {name: _register(base, port, name) for name in SITES}
    sites = {name: procs.site(name) for name in SITES}
    for name in SITES:
        _wait_for(lambda n=name: _state(base, n) == "connected", 120, f"{name} to connect", sites[name])
    _wait_for(lambda: set(nodes.values()) <= _online_nodes(base, port), 60, "the SuperLink to list all online")
    store = RunStore(url, migrate=False)  # the coordinator created and migrated it
    try:
        # run 1: several rounds, killed once round 1 trains
        first = submit(_spec(base, "interrupted", FIRST_ROUNDS), "run-1.log")

        def training() -> bool:  # round 1 begun, and every site has its train message
            with store.session() as s:
                if s.scalar(select(S.Round.id).where(S.Round.run_id == 1, S.Round.number == 1)) is None:
                    return False
            return all((read_status(base / f"{n}.yaml").get("last_message") or {}).get("type") == "train"
                       for n in SITES)

        _wait_for(training, 240, "round 1 of run 1 to start training at every site", first)
        with store.session() as s:
            run = s.get(S.Run, 1)
            assert run is not None and run.status == "running"
            serverapp = run.owner_pid
        assert serverapp is not None
        superlink = next(e["pid"] for e in _events(base / "coordinator.log") if e["event"] == "superlink-started")
        assert not _gone(superlink) and not _gone(serverapp)

        os.killpg(coordinator.pid, signal.SIGKILL)
        coordinator.wait(timeout=10)
        down = time.monotonic()
        # its reaper stops the SuperLink and the ServerApp (they run in their own process group)
        _wait_for(lambda: _gone(superlink) and _gone(serverapp), 30, "the SuperLink and the ServerApp to stop")
        _wait_for(lambda: not _listening(port), 10, "the SuperLink's port to close")
        stopped_after = time.monotonic() - down

        # the outage: every site waits, none gives up
        for name in SITES:
            _wait_for(lambda n=name: _state(base, n) in ("waiting", "restarting", "starting"), 60,
                      f"{name} to notice the coordinator is gone", sites[name])
        checks = 0
        first_exit: float | None = None  # seconds after the kill that its `veil run` exited
        while (left := OUTAGE_S - (time.monotonic() - down)) > 0:
            if first_exit is None and first.poll() is not None:
                first_exit = time.monotonic() - down
            for name in SITES:
                assert sites[name].poll() is None, f"{name}'s daemon exited during the outage"
                assert _state(base, name) != "connected"
            if checks < 2 and left < OUTAGE_S - 30 * (checks + 1):  # twice, through the command a person runs
                checks += 1
                for name in SITES:
                    shown = _site_status(base, name)
                    assert shown.returncode == 1, shown.stdout + shown.stderr
                    assert any(f"{name}: {s}" in shown.stdout for s in ("waiting", "restarting", "starting")), \
                        shown.stdout
            time.sleep(min(2.0, max(left, 0.0)))
        assert checks == 2

        # the same coordinator comes back; nobody touches the sites
        restarted = time.monotonic()
        coordinator = start_coordinator()
        listening = time.monotonic() - restarted
        back = time.monotonic()  # README: sites find a coordinator that is back (listening) within ~20 s
        for name in SITES:
            _wait_for(lambda n=name: _state(base, n) == "connected", RECONNECT_S - (time.monotonic() - back),
                      f"{name} to reconnect within {RECONNECT_S:.0f} s of the coordinator listening again")
        connected = time.monotonic() - restarted
        for name in SITES:
            shown = _site_status(base, name)
            assert shown.returncode == 0 and f"{name}: connected" in shown.stdout, shown.stdout + shown.stderr
            assert sites[name].poll() is None

        # the interrupted run is failed, and says why
        with store.session() as s:
            run = s.get(S.Run, 1)
            assert run is not None
            status, error = run.status, run.error or ""
        # The reaper's SIGTERM ends the ServerApp, which records why; had it needed the SIGKILL 3 s later,
        # the restarted coordinator would have closed the run (server.lifecycle.close_orphans)
        orphaned = f"coordinator restarted: process ended without finishing (pid {serverapp} "
        assert status == "failed" and (error == STOPPED_BY_SIGNAL or error.startswith(orphaned)), (status, error)
        closed_at_restart = "run 1 was left running by a process that has ended: recorded as failed" in \
            (base / "coordinator.log").read_text()
        assert closed_at_restart == error.startswith(orphaned)
        shown = subprocess.run([*VEIL, "runs", "show", "1", "--store", url], cwd=base, capture_output=True,
                               text=True, timeout=120, check=False)
        assert shown.returncode == 0, shown.stderr
        assert f"run 1 (interrupted): failed\n  error: {error}\n" in shown.stdout, shown.stdout[-3000:]
        first.wait(timeout=120)  # it may follow the run's log until the coordinator is back
        first_exit = first_exit or time.monotonic() - down
        said = (base / "run-1.log").read_text()
        assert first.returncode != 0 and said.strip().splitlines()[-1].startswith("error: "), said[-3000:]

        # a new run, with all three sites in every round
        second = submit(_spec(base, "after-restart", SECOND_ROUNDS), "run-2.log")
        assert second.wait(timeout=600) == 0, (base / "run-2.log").read_text()[-3000:]
        with store.session() as s:
            run = s.get(S.Run, 2)
            assert run is not None
            status, name = run.status, run.name
            rounds = [(r.number, r.status, r.sites_ok) for r in
                      s.scalars(select(S.Round).where(S.Round.run_id == 2).order_by(S.Round.number))]
            keys = {row.id: row.site_key for row in s.scalars(select(S.Site).where(S.Site.run_id == 2))}
            trained = sorted((p.round_number, keys[p.site_id]) for p in s.scalars(
                select(S.Participation).where(S.Participation.run_id == 2, S.Participation.phase == "train",
                                              S.Participation.status == "ok")))
        assert (status, name) == ("completed", "after-restart")
        assert rounds == [(n, "completed", len(SITES)) for n in range(1, SECOND_ROUNDS + 1)]
        assert trained == [(n, site) for n in range(1, SECOND_ROUNDS + 1) for site in SITES]
    finally:
        store.close()
    print(f"\nSuperLink and ServerApp stopped {stopped_after:.1f} s after the SIGKILL; the interrupted run's "
          f"`veil run` exited {first.returncode} within {first_exit:.0f} s of it; run 1: {error!r}; SuperLink "
          f"listening {listening:.1f} s after the restart, all sites connected after {connected:.1f} s; "
          f"total {time.monotonic() - began:.0f} s")
