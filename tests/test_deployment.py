"""A real deployment on 127.0.0.1: `veil coordinator start` (a Flower SuperLink with TLS and
SuperNode authentication, run store on PostgreSQL) and three `veil site start` daemons (Flower
SuperNodes), all separate processes, exactly the commands the Docker images run.

One run: 2 rounds of DP-SGD with CKKS-encrypted aggregation and evaluation. Site 2 is killed
with SIGKILL as soon as round 2 starts; the round finishes with the other two (min_sites 2)
and the participation table says why site 2 is missing. Around it: a SuperNode whose key
was never registered is refused, and a site whose preflight fails never starts a SuperNode.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import yaml
from sqlalchemy import select

from server.store import RunStore
from server.store import schema as S
from tests.conftest import pg_database

pytestmark = pytest.mark.slow  # a SuperLink and three SuperNodes, as separate processes

VEIL = [sys.executable, "-m", "veil.cli"]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    """A port nothing holds now, from below the kernel's ephemeral range where there is room: a port
    the kernel hands out for bind(0) (Ray's workers take many) could be taken by another test while a
    coordinator here is down for an outage and has to bind its port again."""
    low = 32768
    with contextlib.suppress(OSError, ValueError, IndexError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.SystemRandom()
    for _ in range(200 if low > 12_000 else 0):
        port = rng.randrange(10_000, low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> float:  # type: ignore[no-untyped-def,type-arg]
    """Seconds until ``predicate()`` is true; an AssertionError after ``timeout`` or if ``proc`` exits first."""
    start = time.monotonic()
    deadline = start + timeout
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic() - start
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited with {proc.returncode} first")
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _site_state(base: Path, name: str) -> str:
    """The state ``veil site start`` last wrote for site ``name`` (its status file beside the yaml)."""
    from client.supervisor import read_status

    return str(read_status(base / f"{name}.yaml").get("state"))


def _events(log: Path) -> list[dict]:  # type: ignore[type-arg]
    out = []
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


@dataclass
class Federation:
    base: Path
    port: int
    store: RunStore
    coordinator: subprocess.Popen  # type: ignore[type-arg]
    sites: dict[str, subprocess.Popen] = field(default_factory=dict)  # type: ignore[type-arg]

    def veil(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*VEIL, *args], cwd=self.base, capture_output=True, text=True, timeout=timeout,
                              check=False)

    def start_site(self, name: str) -> subprocess.Popen:  # type: ignore[type-arg]
        log = (self.base / f"{name}.log").open("w")
        proc = subprocess.Popen([*VEIL, "site", "start", "--config", f"{name}.yaml"], cwd=self.base,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.sites[name] = proc
        return proc


def _site_yaml(base: Path, name: str, port: int, data: str) -> None:
    (base / f"{name}.yaml").write_text(yaml.safe_dump({
        "site_id": name, "data": {"format": "npz", "path": data}, "ledger": f"ledgers/{name}.ledger",
        "keys": "ks/secret.ckks", "policy": {"epsilon_cap": 100.0, "trusted_researchers": ["researchers"]},
        "device": "cpu",  # no runtime_port: every site on this host picks a free one
        "coordinator": {"address": f"127.0.0.1:{port}", "root_certificates": "certs/ca.crt",
                        "node_key": f"keys/{name}.node-key"},
    }))


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    from client.data import load_mnist_5k

    base = tmp_path_factory.mktemp("deploy")
    port = _free_port()
    run = lambda *a: subprocess.run([*VEIL, *a], cwd=base, capture_output=True, text=True,  # noqa: E731
                                    check=True, timeout=120)
    run("certs", "create", "certs", "--host", "127.0.0.1", "--host", "localhost")
    for name in ("site-0", "site-1", "site-2", "rogue"):
        run("certs", "node-key", "--site", name, "keys")  # keys/NAME.node-key and keys/NAME.node-key.pub
    run("keys", "create", "ks")
    run("certs", "researcher-key", "keys/researcher")  # signs the run; coordinator and sites get the .pub
    (base / "researchers").mkdir()
    (base / "researchers" / "researcher.pub").write_bytes((base / "keys" / "researcher.pub").read_bytes())
    (base / "ledgers").mkdir()
    digits = load_mnist_5k()
    order = np.random.default_rng(7).permutation(len(digits))
    for i in range(3):
        sel = order[i * 250:(i + 1) * 250]
        np.savez(base / f"site-{i}.npz", x=digits.features[sel], y=digits.labels[sel])
        _site_yaml(base, f"site-{i}", port, f"site-{i}.npz")
        run("site", "init", "--config", f"site-{i}.yaml")  # the ledger, its id pinned in the yaml
    _site_yaml(base, "broken", port, "missing.npz")

    with pg_database() as url:
        coord_log = (base / "coordinator.log").open("w")
        coordinator = subprocess.Popen(
            [*VEIL, "coordinator", "start", "--certs", "certs", "--store", url, "--host", "127.0.0.1",
             "--port", str(port), "--state", "state/superlink.db", "--coordinator-key", "ks/coordinator.ckks",
             "--artifacts-dir", "art", "--researchers", "researchers"],
            cwd=base, stdout=coord_log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            # the coordinator migrates the store before its SuperLink listens
            _wait_for(lambda: _listening(port), 60, "the SuperLink to listen", coordinator)
            fed = Federation(base, port, RunStore(url, migrate=False), coordinator)
            for i in range(3):
                reg = fed.veil("coordinator", "register", f"keys/site-{i}.node-key.pub", "--store", url,
                               "--coordinator", f"127.0.0.1:{port}", "--ca", "certs/ca.crt")  # named by its key
                assert reg.returncode == 0 and "registered" in reg.stdout, reg.stdout + reg.stderr
            for i in range(3):
                fed.start_site(f"site-{i}")
            for name, proc in fed.sites.items():  # a run waits only round_timeout_s for its sites
                _wait_for(lambda n=name: _site_state(base, n) == "connected", 180, f"{name} to connect", proc)
            yield fed
        finally:
            started = [*fed.sites.values()] if "fed" in locals() else []
            for proc in [*started, coordinator]:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
            for proc in [*started, coordinator]:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
            if "fed" in locals():
                fed.store.close()


def test_an_unregistered_supernode_is_refused(federation: Federation) -> None:
    log = federation.base / "rogue.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{federation.port}",
             "--root-certificates", "certs/ca.crt", "--auth-supernode-private-key", "keys/rogue.node-key",
             "--port", str(_free_port()), "--max-retries", "1"],
            cwd=federation.base, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"})
        try:
            code = proc.wait(timeout=120)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # helpers it started
    assert code != 0
    assert "Failed to activate SuperNode" in log.read_text()


def test_a_site_whose_preflight_fails_never_connects(federation: Federation) -> None:
    done = federation.veil("site", "start", "--config", "broken.yaml", timeout=120)
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 3
    data = next(e for e in events if e.get("check") == "data")
    assert not data["ok"] and "missing.npz: no such file" in data["detail"]
    assert events[-1]["event"] == "refused-to-start"
    assert not any(e["event"].startswith("supernode") for e in events)  # no SuperNode was ever started
    check = federation.veil("site", "check", "--config", "broken.yaml", "--format", "json")
    assert check.returncode == 3 and json.loads(check.stdout)["ok"] is False


def test_two_encrypted_dp_rounds_and_a_site_killed_mid_round(federation: Federation) -> None:
    fed = federation
    (fed.base / "spec.yaml").write_text(yaml.safe_dump({
        "name": "deployed", "seed": 2,
        "federation": {"sites": 3, "rounds": 2, "min_sites": 2, "round_timeout_s": 45},
        "model": {"arch": "mlp"}, "training": {"batch_size": 50, "learning_rate": 0.5},
        "privacy": {"noise_multiplier": 1.0},
        "encryption": {"aggregation": "ckks", "evaluation": "ckks"},
    }))
    submit = subprocess.Popen([*VEIL, "run", "spec.yaml", "--coordinator", f"127.0.0.1:{fed.port}",
                               "--ca", "certs/ca.crt", "--key", "keys/researcher", "--timeout", "420"],
                              cwd=fed.base, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def round_two_started() -> bool:
        with fed.store.session() as s:
            return s.scalar(select(S.Round.id).where(S.Round.number == 2)) is not None

    _wait_for(round_two_started, 300, "round 2 to start", submit)
    victim = fed.sites["site-2"]
    from client.supervisor import read_status

    supernode = read_status(fed.base / "site-2.yaml")["supernode_pid"]  # the one running now (a restart
    assert supernode is not None  # would have made the first one logged stale)
    os.killpg(supernode, signal.SIGKILL)  # the SuperNode and the ClientApp it runs
    os.killpg(victim.pid, signal.SIGKILL)  # and the daemon
    out, _ = submit.communicate(timeout=420)
    assert submit.returncode == 0, out[-3000:]
    for number in (1, 2):  # veil run streams each round as veil simulate prints it
        assert f"round {number}/2: evaluation encrypted, max ε" in out, out[-3000:]
    log = (fed.base / "coordinator.log").read_text()  # one format: JSON lines, no colour codes
    assert "\x1b" not in log
    relayed = [json.loads(line)["line"] for line in log.splitlines()
               if line.startswith("{") and '"superlink-log"' in line]
    assert any(re.search(r"Created run \d+", line) for line in relayed)  # Flower's own lines, relayed

    with fed.store.session() as s:
        run = s.scalars(select(S.Run)).one()
        rounds = s.scalars(select(S.Round).order_by(S.Round.number)).all()
        sites = {row.id: row.site_key for row in s.scalars(select(S.Site))}
        part = [(p.round_number, sites[p.site_id], p.phase, p.status, p.reason or "")
                for p in s.scalars(select(S.Participation))]
        events = [(e.round_number, sites[e.site_id], e.mechanism, e.sampling)
                  for e in s.scalars(select(S.PrivacyEvent))]
        encrypted = s.scalars(select(S.EncryptedMetric.round_number)).all()
    assert run.status == "completed" and run.mode == "deployment" and run.name == "deployed"
    assert run.flower_run_id and run.flower_run_id.isdigit()  # Flower's own id, beside Veil's
    assert run.owner_pid and run.heartbeat_at is not None  # the ServerApp process that ran it
    assert json.loads(run.encryption_json or "{}")["aggregation"] == "ckks"
    assert [(r.number, r.status) for r in rounds] == [(1, "completed"), (2, "completed")]
    assert rounds[0].sites_ok == 3 and rounds[1].sites_ok == 2
    assert sorted((r, k) for r, k, _, _ in events) == [
        (1, "site-0"), (1, "site-1"), (1, "site-2"), (2, "site-0"), (2, "site-1")]
    assert all(m == "dp-sgd" and smp == "poisson" for _, _, m, smp in events)
    missing = [p for p in part if p[0] == 2 and p[1] == "site-2"]
    assert missing and all(status == "no-reply" and "no reply" in reason for _, _, _, status, reason in missing)
    assert sorted(encrypted) == [1, 2]  # evaluation sums stayed ciphertexts

    # the surviving sites stop cleanly on SIGTERM
    for name in ("site-0", "site-1"):
        os.killpg(fed.sites[name].pid, signal.SIGTERM)
        assert fed.sites[name].wait(timeout=60) == 0
        logged = _events(fed.base / f"{name}.log")
        assert [e["requested"] for e in logged if e["event"] == "supernode-exited"][-1] is True
        # the rounds were answered by the site's long-lived worker: one start, its charges in its log lines
        assert [e["event"] for e in logged].count("worker-ready") == 1
        charged = [e for e in logged if e["event"] == "worker-log" and "charged ledger" in e["message"]]
        assert len(charged) == 2 and all(f"{name} round" in e["message"] for e in charged)
        assert "stopped" in logged[-1].get("message", "")  # the worker stopped last, after its SuperNode
