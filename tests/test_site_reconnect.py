"""Sites that stay in the federation (``client.supervisor``).

Real processes on 127.0.0.1 (a Flower SuperLink with TLS and SuperNode authentication, `veil
site start` daemons): a coordinator killed with SIGKILL and kept down for 90 s, longer than
the ~60 s after which a SuperNode started with ``--max-retries 10`` gave up, and a site
started while its coordinator is down, both back in the federation without anyone touching
them. Around it: what Flower itself does when it gives up (the process lives on, offline),
a supervisor that restarts a lost SuperNode but stops on a configuration error, and a site
with a missing node key that exits at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

from client.supervisor import read_status, status_path
from tests.test_deployment import _events, _free_port, _listening, _site_state, _wait_for

VEIL = [sys.executable, "-m", "veil.cli"]
BIN = Path(sys.executable).parent
OUTAGE_S = 90.0  # longer than Flower's give-up window with the old --max-retries 10 (~60 s)
RECONNECT_S = 30.0


class Procs:
    """The processes a test started, each the leader of its own group; all stopped at the end."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.started: list[subprocess.Popen] = []  # type: ignore[type-arg]

    def start(self, cmd: list[str], log: str) -> subprocess.Popen:  # type: ignore[type-arg]
        with (self.base / log).open("a") as out:
            proc = subprocess.Popen(cmd, cwd=self.base, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True,
                                    env={**os.environ, "FLWR_DISABLE_UPDATE_CHECK": "1",
                                         "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"})
        self.started.append(proc)
        return proc

    def superlink(self, port: int) -> subprocess.Popen:  # type: ignore[type-arg]
        from veil.cli.flower import superlink_command

        proc = self.start(superlink_command(self.base / "certs", host="127.0.0.1", port=port,
                                            state=self.base / "state" / "superlink.db"), "superlink.log")
        _wait_for(lambda: _listening(port) or proc.poll() is not None, 60, "the SuperLink to listen")
        assert proc.poll() is None, (self.base / "superlink.log").read_text()[-3000:]
        return proc

    def site(self, name: str) -> subprocess.Popen:  # type: ignore[type-arg]
        return self.start([*VEIL, "site", "start", "--config", f"{name}.yaml"], f"{name}.log")

    def stop_all(self) -> None:
        # Only the groups of leaders still running now: a leader reaped earlier freed its pid, which
        # another test's process may hold by now (as a group leader too). A group whose leader is
        # reaped below keeps its id while any member lives, so the last sweep reaches only its own.
        running = [proc for proc in self.started if proc.poll() is None]
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in running:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        for proc in running:  # a SuperNode's helpers live in their own group; the daemon stops them
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


def _federation(base: Path, port: int, names: tuple[str, ...]) -> None:
    """Certificates, one node key, data, ledger and site.yaml per site; researchers they trust."""
    from client.daemon import init_ledger
    from privacy.requests import create_researcher_key
    from veil.cli.pki import create_certs, create_site_node_key

    create_certs(base / "certs", ["127.0.0.1"])
    create_researcher_key(base / "alice")
    (base / "researchers").mkdir()
    (base / "researchers" / "alice.pub").write_bytes((base / "alice.pub").read_bytes())
    rng = np.random.default_rng(0)
    rows = ["a,b,c,d,label"] + [",".join(f"{v:.3f}" for v in rng.random(4)) + f",{'xyz'[i % 3]}"
                                for i in range(60)]
    (base / "data.csv").write_text("\n".join(rows) + "\n")
    (base / "state").mkdir()
    for name in names:
        create_site_node_key(base / "keys", name)  # keys/NAME.node-key and keys/NAME.node-key.pub
        (base / f"{name}.yaml").write_text(yaml.safe_dump({
            "site_id": name, "data": {"format": "csv", "path": "data.csv", "label": "label"},
            "ledger": f"{name}.ledger", "policy": {"trusted_researchers": ["researchers"]}, "device": "cpu",
            "runtime_port": _free_port(),
            "coordinator": {"address": f"127.0.0.1:{port}", "root_certificates": "certs/ca.crt",
                            "node_key": f"keys/{name}.node-key"}}))
        init_ledger(base / f"{name}.yaml")


def _register(base: Path, port: int, name: str) -> int:
    from veil.cli.flower import register_node

    return register_node(base / "keys" / f"{name}.node-key.pub", f"127.0.0.1:{port}", base / "certs" / "ca.crt",
                         name)


def _online_nodes(base: Path, port: int) -> set[int]:
    """The node ids the SuperLink itself lists as online (``flwr supernode list``)."""
    from veil.cli.flower import CONNECTION, flower_home

    with flower_home(f"127.0.0.1:{port}", base / "certs" / "ca.crt") as env:
        done = subprocess.run([str(BIN / "flwr"), "supernode", "list", CONNECTION, "--format", "json"],
                              env=env, capture_output=True, text=True, timeout=60, check=False)
    try:
        answer = json.loads(done.stdout[done.stdout.index("{"):])
    except ValueError:
        return set()
    return {int(n["node-id"]) for n in answer.get("nodes", []) if n.get("status") == "online"}


_state = _site_state  # the state `veil site start` last wrote for a site


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    try:
        yield p
    finally:
        p.stop_all()


@pytest.mark.slow
def test_sites_outlast_a_coordinator_outage_and_a_late_coordinator(procs: Procs) -> None:
    base, port = procs.base, _free_port()
    _federation(base, port, ("site-a", "site-b"))
    superlink = procs.superlink(port)
    node_a, node_b = _register(base, port, "site-a"), _register(base, port, "site-b")
    site_a = procs.site("site-a")
    _wait_for(lambda: _state(base, "site-a") == "connected", 90, "site-a to connect")
    _wait_for(lambda: node_a in _online_nodes(base, port), 60, "the SuperLink to list site-a online")

    # the coordinator dies; site-b is started while it is down
    os.killpg(superlink.pid, signal.SIGKILL)
    superlink.wait(timeout=10)
    down = time.monotonic()
    site_b = procs.site("site-b")
    _wait_for(lambda: _state(base, "site-a") == "waiting", 45, "site-a to notice the coordinator is gone")
    _wait_for(lambda: _state(base, "site-b") == "waiting", 120, "site-b to wait for the coordinator")
    time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down)))
    assert site_a.poll() is None and site_b.poll() is None  # still there after 90 s: nothing gave up
    assert {_state(base, "site-a"), _state(base, "site-b")} <= {"waiting", "restarting", "starting"}

    # the same coordinator (port, database) comes back; nobody touches the sites
    restarted = time.monotonic()
    procs.superlink(port)
    listening = time.monotonic() - restarted
    back = time.monotonic()  # README: sites find a coordinator that is back (listening) within ~20 s
    for name in ("site-a", "site-b"):
        _wait_for(lambda n=name: _state(base, n) == "connected", RECONNECT_S - (time.monotonic() - back),
                  f"{name} to reconnect within {RECONNECT_S:.0f} s of the coordinator listening again")
    connected = time.monotonic() - restarted
    _wait_for(lambda: {node_a, node_b} <= _online_nodes(base, port), 30, "the SuperLink to list both online")
    restarts = {n: read_status(base / f"{n}.yaml")["restarts"] for n in ("site-a", "site-b")}
    print(f"\nSuperLink listening {listening:.1f} s after the restart; both sites connected after "
          f"{connected:.1f} s; both listed online after {time.monotonic() - restarted:.1f} s; "
          f"SuperNode restarts {restarts}")

    status_a = read_status(base / "site-a.yaml")
    assert status_a["alive"] is True and status_a["node_id"] == node_a
    events = [e for e in _events(base / "site-a.log") if e["event"] == "site-state"]
    states = [e["state"] for i, e in enumerate(events) if i == 0 or events[i - 1]["state"] != e["state"]]
    assert states[:3] == ["starting", "connected", "waiting"]  # (starting twice: the worker, then the SuperNode)
    assert "worker" in events[0]["reason"]
    assert events[-1]["state"] == "connected"
    logs = [e for e in _events(base / "site-a.log") if e["event"] == "supernode-log"]
    assert logs and not any("\x1b" in e["message"] for e in logs)  # Flower's lines, without colour codes
    shown = subprocess.run([*VEIL, "site", "status", "--config", "site-b.yaml"], cwd=base, capture_output=True,
                           text=True, timeout=60, check=False)
    assert shown.returncode == 0 and "site-b: connected" in shown.stdout, shown.stdout + shown.stderr

    for proc in (site_a, site_b):  # and they still stop cleanly
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    logged = _events(base / "site-a.log")
    assert [e["requested"] for e in logged if e["event"] == "supernode-exited"][-1] is True
    assert logged[-1]["event"] == "worker-log" and "stopped" in logged[-1]["message"]  # the worker goes last
    assert _state(base, "site-a") == "stopped"
    down_now = subprocess.run([*VEIL, "site", "status", "--config", "site-a.yaml", "--format", "json"], cwd=base,
                              capture_output=True, text=True, timeout=60, check=False)
    assert down_now.returncode == 1 and json.loads(down_now.stdout)["state"] == "stopped"


@pytest.mark.slow
def test_flower_gives_up_but_lives_on_and_the_wrapper_exits(procs: Procs) -> None:
    """The fact the supervisor rests on: with a retry limit, a connected ``flower-supernode`` whose
    SuperLink goes away gives up and stays alive, offline; ``supernode_main`` exits instead."""
    from client.supervisor import GAVE_UP

    base, port = procs.base, _free_port()
    _federation(base, port, ("plain", "wrapped"))
    superlink = procs.superlink(port)
    for name in ("plain", "wrapped"):
        _register(base, port, name)

    def supernode(name: str, head: list[str]) -> subprocess.Popen:  # type: ignore[type-arg]
        return procs.start([*head, "--superlink", f"127.0.0.1:{port}", "--root-certificates", "certs/ca.crt",
                            "--auth-supernode-private-key", f"keys/{name}.node-key", "--port", str(_free_port()),
                            "--max-retries", "1"], f"{name}.log")

    plain = supernode("plain", [str(BIN / "flower-supernode")])
    wrapped = supernode("wrapped", [sys.executable, "-c", "from client.supervisor import supernode_main; "
                                    "supernode_main()"])
    for name in ("plain", "wrapped"):
        _wait_for(lambda n=name: "SuperNode ID" in (base / f"{n}.log").read_text(), 60, f"{name} to connect")
    os.killpg(superlink.pid, signal.SIGKILL)
    assert wrapped.wait(timeout=90) == GAVE_UP
    _wait_for(lambda: "Giving up reconnection" in (base / "plain.log").read_text()
              or plain.poll() is not None, 60, "the plain SuperNode to give up")
    time.sleep(3)
    # Flower 1.41/1.42: alive and offline. If this fails, Flower now exits by itself; the wrapper is harmless.
    assert plain.poll() is None


def test_a_lost_supernode_is_restarted_and_a_configuration_error_ends_the_daemon(tmp_path: Path) -> None:
    """The supervisor on a stand-in SuperNode that logs as Flower does: it is restarted after it
    exits, and a Flower exit code naming a local configuration error stops the daemon (DEPLOY)."""
    from client.supervisor import SiteStatus, Supervisor
    from veil.exits import ExitCode

    fake = tmp_path / "fake_supernode.py"
    fake.write_text(textwrap.dedent(f"""
        import pathlib, sys
        runs = pathlib.Path({str(tmp_path / "runs")!r})
        n = len(runs.read_text()) if runs.exists() else 0
        runs.write_text("x" * (n + 1))
        print("\\x1b[32mINFO \\x1b[0m:      SuperNode ID: 42", flush=True)
        print("\\x1b[32mINFO \\x1b[0m:      [RUN 7, ROUND 3]", flush=True)
        print("\\x1b[32mINFO \\x1b[0m:      Receiving: train message (ID: abc)", flush=True)
        print("\\x1b[33mWARNING \\x1b[0m:   Connection attempt failed, retrying in 0.50 seconds", flush=True)
        if n:
            print("\\x1b[31mERROR \\x1b[0m:     Exit Code: 604", flush=True)
        sys.exit(1)
    """))
    events: list[tuple[str, dict]] = []  # type: ignore[type-arg]
    path = tmp_path / "site.status.json"
    status = SiteStatus(site="s", coordinator="127.0.0.1:1", host="h", pid=os.getpid(), pid_token=None)
    code = Supervisor([sys.executable, str(fake)], dict(os.environ), status, path,
                      lambda e, **kw: events.append((e, kw))).run()
    assert code == ExitCode.DEPLOY
    states = [kw["state"] for e, kw in events if e == "site-state"]
    assert states == ["starting", "connected", "waiting", "restarting",
                      "starting", "connected", "waiting", "failed"]
    said = [kw["message"] for e, kw in events if e == "supernode-log"]
    assert said[:2] == ["SuperNode ID: 42", "[RUN 7, ROUND 3]"]  # colour codes and level prefix removed
    saved = json.loads(path.read_text())
    assert saved["state"] == "failed" and saved["restarts"] == 1 and saved["node_id"] == 42
    assert saved["last_message"]["run"] == 7 and saved["last_message"]["round"] == "3"
    assert saved["last_error"] == "Flower exit code 604" and "configuration error" in saved["reason"]


def test_a_missing_node_key_exits_at_once(tmp_path: Path) -> None:
    _federation(tmp_path, _free_port(), ("site-a",))
    (tmp_path / "keys" / "site-a.node-key").unlink()
    start = time.monotonic()
    done = subprocess.run([*VEIL, "site", "start", "--config", "site-a.yaml"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, check=False)
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 3, done.stdout + done.stderr
    assert events[-1]["event"] == "refused-to-start" and "node key" in events[-1]["reason"]
    assert not any(e["event"].startswith("supernode") for e in events)
    assert time.monotonic() - start < 60
    assert not status_path(tmp_path / "site-a.yaml").exists()
    shown = subprocess.run([*VEIL, "site", "status", "--config", "site-a.yaml"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=60, check=False)
    assert shown.returncode == 1 and "never-started" in shown.stdout
