"""The README's `flwr run` recipe, end to end, as a user would follow it.

A Flower SuperLink and two SuperNodes, plain Flower processes on 127.0.0.1 (insecure: this is
the local-simulation path, no `veil coordinator start`, so no researcher keys), and
``flwr run APP CONNECTION --stream`` on a copy of the project (the first ``flwr run`` may
rewrite ``pyproject.toml``, so never on the checkout). The connection lives in
``$FLWR_HOME/config.toml``, runtime dependency installation is off
(``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``), and the scenario is named by a path
relative to the app, which no process here has as its working directory.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from sqlalchemy import select

from server.store import RunStore
from server.store import schema as S
from tests.test_deployment import _free_port, _listening, _wait_for
from tests.test_site_reconnect import Procs

pytestmark = pytest.mark.slow  # a SuperLink, two SuperNodes and `flwr run`, as separate processes

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("veil", "server", "client", "privacy", "simulations")  # [tool.setuptools.packages.find]
SCENARIO = "simulations/scenarios/flwr-run-test.yaml"  # only in the app copy: found there or nowhere
ROUNDS = 2


def _app_copy(dst: Path) -> Path:
    """What `flwr run` packages: pyproject.toml and the packages (no caches)."""
    dst.mkdir()
    shutil.copy2(ROOT / "pyproject.toml", dst / "pyproject.toml")
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, dst / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (dst / SCENARIO).write_text(yaml.safe_dump({
        "name": "flwr-run-recipe", "seed": 3,
        "federation": {"sites": 2, "rounds": ROUNDS, "min_sites": 2, "round_timeout_s": 120},
        "data": {"source": "mnist-5k", "partitioner": "iid"},
        "model": {"arch": "mlp"}, "training": {"batch_size": 64, "learning_rate": 0.5},
        "privacy": {"noise_multiplier": 1.0},
    }))
    return dst


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    (tmp_path / "work").mkdir()
    p = Procs(tmp_path / "work")  # every process's working directory: not the app's
    try:
        yield p
    finally:
        p.stop_all()


def test_flwr_run_on_the_project_against_a_superlink_and_supernodes(procs: Procs, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    app = _app_copy(tmp_path / "app")
    pyproject_before = (app / "pyproject.toml").read_text()
    work, port = procs.base, _free_port()
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "local-test"\n\n[superlink.local-test]\naddress = "127.0.0.1:{port}"\n'
        "insecure = true\n")
    monkeypatch.setenv("FLWR_HOME", str(home))  # Procs passes os.environ on
    monkeypatch.setenv("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    for var in ("VEIL_STORE", "VEIL_RESEARCHERS", "VEIL_COORDINATOR_KEY", "VEIL_ARTIFACTS_DIR"):
        monkeypatch.delenv(var, raising=False)

    superlink = procs.start([str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1",
                             "--port", str(port), "--database", str(work / "superlink.db")], "superlink.log")
    _wait_for(lambda: _listening(port), 60, "the SuperLink to listen", superlink)
    for i in range(2):
        procs.start([str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
                     "--port", str(_free_port()), "--node-config", f"partition-id={i}"], f"supernode-{i}.log")

    done = subprocess.run([str(BIN / "flwr"), "run", str(app), "local-test", "--stream",
                           "--run-config", f'scenario="{SCENARIO}"'], cwd=work,
                          capture_output=True, text=True, timeout=480, check=False,
                          env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"})
    out = done.stdout + done.stderr
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(work.glob("*.log")))
    assert done.returncode == 0, out[-4000:] + logs
    started = re.search(r"run (?:ID )?`?(\d+)`?", out)
    assert started, out[-2000:]
    assert "veil run ended: run 1 completed" in out, out[-4000:] + logs

    store = RunStore(f"sqlite:///{work / 'veil.db'}", migrate=False)  # the run config's `store`, from
    try:                                                              # the SuperLink's directory
        with store.session() as s:
            run = s.scalars(select(S.Run)).one()
            rounds = s.scalars(select(S.Round).order_by(S.Round.number)).all()
            sites = sorted(s.scalars(select(S.Site.site_key)))
    finally:
        store.close()
    assert run.status == "completed", run.error
    assert run.name == "flwr-run-recipe"  # the scenario resolved against the app copy
    assert run.mode == "deployment" and run.flower_run_id == started.group(1)
    assert [(r.number, r.status, r.sites_ok) for r in rounds] == [(n, "completed", 2)
                                                                  for n in range(1, ROUNDS + 1)]
    assert sites == ["site-0", "site-1"]
    assert sorted(p.name for p in (work / "veil-ledgers").glob("*.ledger")) == ["site-0.ledger", "site-1.ledger"]
    assert (app / "pyproject.toml").read_text() == pyproject_before  # no [tool.flwr.federations] to rewrite
