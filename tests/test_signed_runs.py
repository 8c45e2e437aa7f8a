"""Signed runs in a real deployment on 127.0.0.1: `veil coordinator start --researchers` and three
`veil site start` daemons, separate processes, each run submitted with `veil run --key`.

Three researchers: alice (admitted by the coordinator, trusted by every site), bob (admitted,
trusted by site-0 and site-1 only), mallory (admitted nowhere). Mallory's run and a request
altered after signing are refused by the coordinator and recorded, and never reach a site;
bob's run trains on site-0 and site-1 while site-2 refuses it and its ledger stays untouched;
alice's run trains everywhere. (A task altered *by the coordinator* after admission is refused
by the sites themselves: tests/test_requests.py drives the real ClientApp for that.)
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from sqlalchemy import select

from privacy.ledger import SiteLedger
from privacy.requests import load_private_key, sign_request
from server.store import RunStore
from server.store import schema as S
from tests.test_deployment import _free_port, _listening, _site_state, _wait_for

pytestmark = pytest.mark.slow
VEIL = [sys.executable, "-m", "veil.cli"]
SITES = ("site-0", "site-1", "site-2")
TRUST = {"site-0": ["researchers/alice.pub", "researchers/bob.pub"],
         "site-1": ["researchers/alice.pub", "researchers/bob.pub"],
         "site-2": ["researchers/alice.pub"]}


class Federation:
    """The coordinator and three sites (processes this test started), and the coordinator's store."""

    def __init__(self, base: Path, port: int, store: RunStore) -> None:
        self.base, self.port, self.store = base, port, store

    def submit(self, who: str, name: str) -> subprocess.CompletedProcess[str]:
        """`veil run` of a one-round scenario named ``name``, signed by ``who``."""
        (self.base / f"{name}.yaml").write_text(yaml.safe_dump({
            "name": name, "seed": 1,
            "federation": {"sites": 3, "rounds": 1, "min_sites": 2, "round_timeout_s": 60,
                           "on_budget_exhausted": "drop"},
            "model": {"arch": "mlp"}, "training": {"batch_size": 50, "learning_rate": 0.5},
            "privacy": {"noise_multiplier": 1.0},
        }))
        return subprocess.run([*VEIL, "run", f"{name}.yaml", "--key", f"keys/{who}", "--coordinator",
                               f"127.0.0.1:{self.port}", "--ca", "certs/ca.crt", "--timeout", "400"],
                              cwd=self.base, capture_output=True, text=True, timeout=450, check=False)

    def ledger_refs(self, site: str) -> list[str]:
        """The run references the site's own ledger has charged (read-only)."""
        with SiteLedger(self.base / "ledgers" / f"{site}.ledger", create=False, readonly=True) as ledger:
            return [e.run_ref for e in ledger.entries()]


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    from client.data import load_mnist_5k

    base = tmp_path_factory.mktemp("signed")
    port = _free_port()

    def run(*args: str) -> None:
        subprocess.run([*VEIL, *args], cwd=base, capture_output=True, text=True, check=True, timeout=120)

    run("certs", "create", "certs", "--host", "127.0.0.1")
    (base / "admitted").mkdir()
    (base / "researchers").mkdir()
    for who in ("alice", "bob", "mallory"):
        run("certs", "researcher-key", f"keys/{who}")
        if who != "mallory":
            for d in ("admitted", "researchers"):
                (base / d / f"{who}.pub").write_bytes((base / "keys" / f"{who}.pub").read_bytes())
    (base / "ledgers").mkdir()
    digits = load_mnist_5k()
    order = np.random.default_rng(3).permutation(len(digits))
    for i, site in enumerate(SITES):
        run("certs", "node-key", "--site", site, "keys")
        sel = order[i * 200:(i + 1) * 200]
        np.savez(base / f"{site}.npz", x=digits.features[sel], y=digits.labels[sel])
        (base / f"{site}.yaml").write_text(yaml.safe_dump({
            "site_id": site, "data": {"format": "npz", "path": f"{site}.npz"},
            "ledger": f"ledgers/{site}.ledger", "device": "cpu", "runtime_port": _free_port(),
            "policy": {"epsilon_cap": 100.0, "trusted_researchers": TRUST[site]},
            "coordinator": {"address": f"127.0.0.1:{port}", "root_certificates": "certs/ca.crt",
                            "node_key": f"keys/{site}.node-key"},
        }))
        run("site", "init", "--config", f"{site}.yaml")
    url = f"sqlite:///{base / 'coordinator.db'}"
    procs: list[subprocess.Popen] = []  # type: ignore[type-arg]

    def start(name: str, *args: str) -> subprocess.Popen:  # type: ignore[type-arg]
        log = (base / f"{name}.log").open("w")
        proc = subprocess.Popen([*VEIL, *args], cwd=base, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        procs.append(proc)
        return proc

    try:
        coordinator = start("coordinator", "coordinator", "start", "--certs", "certs", "--store", url,
                            "--host", "127.0.0.1", "--port", str(port), "--state", "state/superlink.db",
                            "--artifacts-dir", "art", "--researchers", "admitted")
        _wait_for(lambda: _listening(port), 60, "the SuperLink to listen", coordinator)
        for site in SITES:
            run("coordinator", "register", f"keys/{site}.node-key.pub", "--store", url, "--coordinator",
                f"127.0.0.1:{port}", "--ca", "certs/ca.crt")
            start(site, "site", "start", "--config", f"{site}.yaml")
        for site, proc in zip(SITES, procs[1:], strict=True):  # a run waits only round_timeout_s for its sites
            _wait_for(lambda n=site: _site_state(base, n) == "connected", 180, f"{site} to connect", proc)
        store = RunStore(url, migrate=False)
        yield Federation(base, port, store)
        store.close()
    finally:
        for proc in procs:  # only the processes this test started, by their process groups
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def test_a_stranger_and_an_altered_request_are_refused_by_the_coordinator(federation: Federation) -> None:
    fed = federation
    done = fed.submit("mallory", "strangers-run")
    assert done.returncode != 0, done.stdout[-2000:]
    assert "untrusted-researcher" in done.stdout
    from veil.cli.flower import submit

    honest = sign_request(json.loads(json.dumps(yaml.safe_load((fed.base / "strangers-run.yaml").read_text()))),
                          load_private_key(fed.base / "keys" / "alice"))
    altered = dataclasses.replace(honest, scenario={**honest.scenario, "federation": {
        **honest.scenario["federation"], "rounds": 50}})  # more rounds than alice signed for
    lines: list[str] = []
    code = submit(altered.to_json(), f"127.0.0.1:{fed.port}", fed.base / "certs" / "ca.crt", lines.append, 300)
    assert code != 0 and any("bad-signature" in line for line in lines), "\n".join(lines[-40:])
    with fed.store.session() as s:
        requests = [(r.status, r.reason_code, r.researcher) for r in s.scalars(select(S.RunRequest))]
        runs = s.scalars(select(S.Run)).all()
    assert ("refused", "untrusted-researcher", None) in requests
    assert ("refused", "bad-signature", None) in requests  # a forgery claiming alice's key names no one
    assert runs == []  # never a run: no site was asked anything
    assert all(fed.ledger_refs(site) == [] for site in SITES)


def test_a_run_trains_only_at_the_sites_that_trust_its_researcher(federation: Federation) -> None:
    fed = federation
    done = fed.submit("bob", "bobs-run")
    assert done.returncode == 0, done.stdout[-3000:]
    with fed.store.session() as s:
        run = s.scalars(select(S.Run).where(S.Run.name == "bobs-run")).one()
        sites = {row.id: row.site_key for row in s.scalars(select(S.Site).where(S.Site.run_id == run.id))}
        trained = sorted(sites[e.site_id] for e in s.scalars(
            select(S.PrivacyEvent).where(S.PrivacyEvent.run_id == run.id)))
        refused = [(sites[p.site_id], p.phase, p.reason_code) for p in s.scalars(
            select(S.Participation).where(S.Participation.run_id == run.id, S.Participation.status == "refused"))]
    assert run.status == "completed" and run.researcher == "bob" and run.researcher_key_id
    assert trained == ["site-0", "site-1"]
    # site-2 says no at the pre-flight, and will not even evaluate bob's model on its test set
    assert sorted(refused) == [("site-2", "evaluate", "untrusted-researcher"),
                               ("site-2", "preflight", "untrusted-researcher")]
    assert fed.ledger_refs("site-2") == []  # nothing charged where bob is not trusted
    for site in ("site-0", "site-1"):
        (ref,) = fed.ledger_refs(site)
        assert "|req:" in ref

    shown = subprocess.run([*VEIL, "runs", "show", str(run.id), "--store", fed.store.url], cwd=fed.base,
                           capture_output=True, text=True, timeout=120, check=False)
    assert shown.returncode == 0 and f"requested by bob ({run.researcher_key_id})" in shown.stdout


def test_a_run_signed_by_a_researcher_everyone_trusts_trains_everywhere(federation: Federation) -> None:
    fed = federation
    done = fed.submit("alice", "alices-run")
    assert done.returncode == 0, done.stdout[-3000:]
    with fed.store.session() as s:
        run = s.scalars(select(S.Run).where(S.Run.name == "alices-run")).one()
        request = s.scalars(select(S.RunRequest).where(S.RunRequest.run_id == run.id)).one()
        sites = {row.id: row.site_key for row in s.scalars(select(S.Site).where(S.Site.run_id == run.id))}
        trained = sorted(sites[e.site_id] for e in s.scalars(
            select(S.PrivacyEvent).where(S.PrivacyEvent.run_id == run.id)))
    assert run.status == "completed" and run.researcher == "alice" and request.status == "admitted"
    assert trained == list(SITES)
    for site in SITES:  # each site recorded the nonce the coordinator admitted with its charge
        assert any(ref.endswith(f"|req:{request.nonce}") for ref in fed.ledger_refs(site))


ROGUE_PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "rogue"
version = "1.0.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "mallory"

[tool.flwr.app.components]
serverapp = "rogue:app"
clientapp = "rogue:client"

[tool.flwr.app.config]
marker = "MARKER"
"""
ROGUE_APP = """from pathlib import Path

from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

app = ServerApp()
client = ClientApp()


@app.main()
def main(grid, context):
    Path(str(context.run_config["marker"])).write_text("the submitter's own code ran at the coordinator")
"""


def test_an_app_bundle_with_its_own_code_never_runs_it(federation: Federation) -> None:
    """Anyone with the CA can submit any app through Flower's Control API; the coordinator runs its
    installed Veil instead (so the submission is just an unsigned request, refused and recorded)."""
    from veil.cli.flower import CONNECTION, flower_home
    from veil.processes import flower_exe

    fed = federation
    rogue = fed.base / "rogue"
    rogue.mkdir()
    marker = fed.base / "rogue-ran"
    (rogue / "pyproject.toml").write_text(ROGUE_PYPROJECT.replace("MARKER", str(marker)))
    (rogue / "rogue.py").write_text(ROGUE_APP)
    with fed.store.session() as s:
        before = len(s.scalars(select(S.RunRequest)).all())
    with flower_home(f"127.0.0.1:{fed.port}", fed.base / "certs" / "ca.crt") as env:
        done = subprocess.run([flower_exe("flwr"), "run", str(rogue), CONNECTION, "--stream"], env=env,
                              cwd=fed.base, capture_output=True, text=True, timeout=300, check=False)
    assert not marker.exists(), done.stdout[-2000:]
    assert "unsigned-run" in done.stdout + done.stderr
    with fed.store.session() as s:
        rows = s.scalars(select(S.RunRequest).order_by(S.RunRequest.id)).all()
    assert len(rows) == before + 1 and (rows[-1].status, rows[-1].reason_code) == ("refused", "unsigned-run")
