"""Killed and interrupted ``veil simulate`` runs.

SIGKILL at random moments, 20 times: no run is left ``running`` after the next ``veil
simulate`` or ``veil runs``, and no process it started (Ray's included) survives it. Ctrl-C:
exit 130 within seconds, one line, the run marked failed, nothing left behind.

Two lanes of kills run at once, each with its own store and ledgers. Every process is
started by this test and killed by its PID (and start time) only."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import func, select

from server.store import RunStore
from server.store import schema as S
from veil.errors import StoreError

KILLS = 20
VEIL = str(Path(sys.executable).with_name("veil"))


def _table() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, start time) straight from /proc (not Veil's own helper)."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                raw = Path(f"/proc/{name}/stat").read_text()
            except OSError:
                continue
            fields = raw[raw.rfind(")") + 2:].split()
            table[int(name)] = (int(fields[1]), fields[19])
    return table


def _below(root: int, table: dict[int, tuple[int, str]]) -> set[int]:
    found, todo = set(), [root]
    while todo:
        parent = todo.pop()
        for pid, (ppid, _) in table.items():
            if ppid == parent and pid not in found:
                found.add(pid)
                todo.append(pid)
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _ray_below(pid: int) -> bool:
    return any("ray" in _cmdline(child) for child in _below(pid, _table()))


def _rounds_of(store: str, pid: int) -> int:
    try:
        runs = RunStore(store, migrate=False)
    except StoreError:  # not created yet
        return 0
    try:
        with runs.session() as s:
            return s.scalar(select(func.count()).select_from(S.Round).join(S.Run, S.Run.id == S.Round.run_id)
                            .where(S.Run.owner_pid == pid)) or 0
    finally:
        runs.close()


def _one(lane: Path, moment: str, extra: float) -> tuple[str, dict[int, str], list[str]]:
    """Start a simulation, wait for ``moment`` (start-up, Ray up, a round begun) plus ``extra``
    seconds, then SIGKILL it. Returns where it was killed and what it had started."""
    store = f"sqlite:///{lane}/runs.db"
    proc = subprocess.Popen(
        [VEIL, "simulate", str(lane.parent / "small.yaml"), "--store", store,
         "--ledger-dir", str(lane / "ledgers"), "--artifacts-dir", str(lane / "artifacts")],
        cwd=lane, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    reached = {"start-up": lambda: True, "ray": lambda: _ray_below(proc.pid),
               "round": lambda: _rounds_of(store, proc.pid) > 0}[moment]
    deadline = time.monotonic() + 240  # bounded: a loaded machine is slow, not stuck
    while not reached() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    if proc.poll() is None:
        time.sleep(extra)
    table = _table()
    started = {pid: table[pid][1] for pid in _below(proc.pid, table)}
    names = [_cmdline(pid) for pid in started]
    where = moment if proc.poll() is None else "after it ended"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    return where, started, names


def _lane(lane: Path, plan: list[tuple[str, float]]) -> list[tuple[str, dict[int, str], list[str]]]:
    lane.mkdir()
    return [_one(lane, moment, extra) for moment, extra in plan]


def _alive(started: dict[int, str]) -> set[int]:
    table = _table()
    alive = {pid for pid, tok in started.items() if table.get(pid, (0, ""))[1] == tok}
    for pid in list(alive):
        alive |= _below(pid, table)
    return alive


@pytest.mark.slow  # 20 real `veil simulate` processes, killed at random moments
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to follow the process tree")
def test_sigkill_leaves_no_running_run_and_no_process(tmp_path: Path) -> None:
    # two lanes at once, each with its own store and ledgers (a site's ledger follows one
    # coordinator); ε 1 a run, so the sites' budgets (cap 20) outlast every kill
    (tmp_path / "small.yaml").write_text(
        "federation: {sites: 2, rounds: 2}\nprivacy: {target_epsilon: 1.0}\n")
    rng = random.Random(2026)
    # a random moment: in start-up, once Ray is up, once a round has begun; then a random extra
    plan = [(rng.choice(["start-up", "ray", "round", "round"]), rng.uniform(0.0, 3.0)) for _ in range(KILLS)]
    lanes = [tmp_path / "lane-0", tmp_path / "lane-1"]
    started: dict[int, str] = {}
    names: list[str] = []
    where: list[str] = []
    try:
        with ThreadPoolExecutor(2) as pool:
            for results in pool.map(_lane, lanes, [plan[0::2], plan[1::2]]):
                for at, got, cmds in results:
                    where.append(at)
                    started |= got
                    names += cmds
        _assert_all_gone(started)
        assert any("ray" in n for n in names), "no kill landed while Ray was up: the test proved nothing"
        assert where.count("round") >= 5, f"too few kills mid-round: {where}"

        statuses: dict[str, int] = {}
        reasons: set[str | None] = set()
        trained = 0
        for lane in lanes:
            store = f"sqlite:///{lane}/runs.db"
            done = subprocess.run([VEIL, "runs", "--store", store], cwd=lane, capture_output=True,
                                  text=True, timeout=120)
            assert done.returncode == 0, done.stderr
            runs = RunStore(store)
            with runs.session() as s:
                for status, count in s.execute(select(S.Run.status, func.count()).group_by(S.Run.status)):
                    statuses[status] = statuses.get(status, 0) + count
                reasons |= set(s.scalars(select(S.Run.error).where(S.Run.status == "failed")))
                trained += s.scalar(select(func.count(func.distinct(S.Round.run_id)))) or 0
            runs.close()
        assert "running" not in statuses, statuses
        assert set(statuses) <= {"failed", "completed"}, statuses  # nothing refused: budgets held
        assert trained >= 5, f"too few runs killed after a round began: {statuses}"
        assert all(r and r.startswith("process ended without finishing") for r in reasons), reasons
        print(f"{KILLS} kills ({', '.join(sorted(set(where)))}): runs {statuses}, {trained} with rounds, "
              f"{len(started)} processes stopped")
    finally:
        _kill_leftovers(None, started)


def _assert_all_gone(started: dict[int, str]) -> None:
    """Every process in ``started`` (and anything they started) ends within a minute."""
    deadline = time.monotonic() + 60
    while (alive := _alive(started)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not alive, f"processes left behind: {[_cmdline(p)[:120] for p in alive]}"


def _kill_leftovers(proc: subprocess.Popen[str] | None, started: dict[int, str]) -> None:
    """Never leave this test's processes behind, whatever failed: by pid and start time only."""
    if proc is not None and proc.poll() is None:
        proc.kill()
    for pid, tok in started.items():
        if _table().get(pid, (0, ""))[1] == tok:
            os.kill(pid, signal.SIGKILL)


def _simulation_in_a_round(tmp_path: Path, rounds: int, *, session: bool = False
                           ) -> tuple[subprocess.Popen[str], str, dict[int, str]]:
    """A real ``veil simulate`` once its first round has begun: the process, its store, and every
    process below it then (pid -> start time), to check that none outlives it."""
    (tmp_path / "small.yaml").write_text(f"federation: {{sites: 2, rounds: {rounds}}}\n"
                                         "privacy: {target_epsilon: 1.0}\n")
    store = f"sqlite:///{tmp_path}/runs.db"
    proc = subprocess.Popen(
        [VEIL, "simulate", str(tmp_path / "small.yaml"), "--store", store, "--ledger-dir",
         str(tmp_path / "ledgers"), "--artifacts-dir", str(tmp_path / "artifacts")],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=session)
    deadline = time.monotonic() + 240
    while _rounds_of(store, proc.pid) == 0 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    if proc.poll() is not None:
        pytest.fail(f"the simulation ended before a round began: {proc.communicate()[1][-800:]}")
    table = _table()
    return proc, store, {pid: table[pid][1] for pid in _below(proc.pid, table)}


@pytest.mark.slow  # one real `veil simulate`, interrupted mid-round
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to follow the process tree")
def test_ctrl_c_exits_130_within_seconds_and_marks_the_run_failed(tmp_path: Path) -> None:
    """Ctrl-C reaches the whole foreground process group, as a terminal sends it."""
    proc, store, started = _simulation_in_a_round(tmp_path, 3, session=True)
    try:
        os.killpg(proc.pid, signal.SIGINT)
        sent = time.monotonic()
        out, err = proc.communicate(timeout=60)
        took = time.monotonic() - sent
        assert proc.returncode == 130, err[-800:]
        assert took < 15, f"took {took:.1f}s to exit after Ctrl-C"
        assert "Traceback" not in out + err
        assert err.strip().splitlines()[-1] == "interrupted (Ctrl-C)"
        runs = RunStore(store)
        with runs.session() as s:
            status, error = s.execute(select(S.Run.status, S.Run.error)).one()
        runs.close()
        assert (status, error) == ("failed", "interrupted")
        _assert_all_gone(started)
    finally:
        _kill_leftovers(proc, started)


@pytest.mark.slow  # one real `veil simulate`, stopped mid-round by `veil runs stop`
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to follow the process tree")
def test_veil_runs_stop_records_stopped_and_ends_the_simulation(tmp_path: Path) -> None:
    proc, store, started = _simulation_in_a_round(tmp_path, 5)
    try:
        asked = time.monotonic()
        stop = subprocess.run([VEIL, "runs", "stop", "1", "--store", store, "--reason", "wrong data set"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert stop.returncode == 0 and "run 1 stopped: wrong data set" in stop.stdout, stop.stderr
        _, err = proc.communicate(timeout=60)
        assert time.monotonic() - asked < 30
        assert proc.returncode == 143 and err.strip().splitlines()[-1] == "terminated (SIGTERM)"
        runs = RunStore(store)
        row = runs.get_run(1)
        runs.close()
        assert (row.status, row.error) == ("stopped", "stopped: wrong data set") and row.ended_at is not None
        again = subprocess.run([VEIL, "runs", "stop", "1", "--store", store], cwd=tmp_path,
                               capture_output=True, text=True, timeout=120)
        assert again.returncode == 1 and "is stopped, not running" in again.stderr
        _assert_all_gone(started)
    finally:
        _kill_leftovers(proc, started)
