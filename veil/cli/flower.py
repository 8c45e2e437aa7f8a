"""The coordinator side of a deployment, on Flower's own engine (SuperLink / SuperNode).

* ``superlink_command``: a SuperLink with TLS and SuperNode authentication, its ServerApp
  writing to the coordinator's run store (``VEIL_STORE``) with the coordinator's CKKS
  parameters file (``VEIL_COORDINATOR_KEY``, never a secret key).
* ``register_node``: adds a site's public node key to the SuperLink (``flwr supernode
  register``); a SuperNode whose key is not registered is refused. ``list_nodes`` reads
  back what the SuperLink knows of each node (``flwr supernode list``): status and times.
* ``submit``: ``veil run SPEC --coordinator HOST:PORT`` builds Veil's Flower app, sends the
  validated scenario inline and streams the run's log until it ends.

Each Flower CLI call gets a private ``FLWR_HOME`` holding one connection, so a researcher's
own Flower configuration is neither read nor changed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.admission import REFUSED_LOG
from server.lifecycle import RUN_END_MARK
from veil.errors import BudgetRefusedError, DeployError, RunFailedError
from veil.exits import ExitCode
from veil.processes import bin_path, flower_exe

CONNECTION = "veil"
SERVERAPP_CRASHED = "An unhandled exception occurred in the ServerApp"  # Flower 1.41/1.42's words
STARTED_RUN = "Successfully started run "  # `flwr run`'s words before the Flower run id (1.41/1.42)
END_LINE_RETRIES_S = (0.0, 1.0, 2.0)  # pauses before each re-read of a finished run's log


def project_root() -> Path:
    """The directory whose pyproject.toml declares Veil's Flower app (what `flwr run` packages)."""
    root = Path(__file__).resolve().parents[2]
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or "[tool.flwr.app" not in pyproject.read_text():
        raise DeployError(f"{root} holds no Flower app (pyproject.toml with [tool.flwr.app]); install Veil "
                          "from its source tree (pip install -e .) to submit runs")
    return root


def superlink_command(certs: Path, *, host: str, port: int, state: Path) -> list[str]:
    """The ``flower-superlink`` command line: TLS from ``certs``, SuperNode authentication, state in ``state``."""
    missing = [p for p in (certs / "ca.crt", certs / "server.crt", certs / "server.key") if not p.is_file()]
    if missing:
        raise DeployError(f"missing {', '.join(map(str, missing))}; make them with `veil certs create {certs} "
                          "--host HOST`")
    return [flower_exe("flower-superlink"), "--ssl-ca-certfile", str(certs / "ca.crt"),
            "--ssl-certfile", str(certs / "server.crt"), "--ssl-keyfile", str(certs / "server.key"),
            "--enable-supernode-auth", "--disable-runtime-dependency-installation",
            "--database", str(state), "--host", host, "--port", str(port)]


@contextmanager
def flower_home(address: str, ca: Path) -> Iterator[dict[str, str]]:
    """An environment whose FLWR_HOME names one TLS connection to ``address``."""
    if not ca.is_file():
        raise DeployError(f"{ca}: no CA certificate (the coordinator's ca.crt)")
    with tempfile.TemporaryDirectory(prefix="veil-flwr-") as home:
        Path(home, "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f"address = {json.dumps(address)}\nroot-certificates = {json.dumps(str(ca.resolve()))}\n")
        yield {**os.environ, "FLWR_HOME": home, "PATH": bin_path(),
               "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


def register_node(public_key: Path, address: str, ca: Path, name: str | None = None) -> int:
    """Register a site's node key; returns the node id the SuperLink assigned."""
    if not public_key.is_file():
        raise DeployError(f"{public_key}: no such public key file (the site's NAME.node-key.pub)")
    text = public_key.read_text().strip()
    if not text.startswith("ecdsa-sha2-nistp"):
        raise DeployError(f"{public_key} is not an OpenSSH ECDSA public key (make one with `veil certs node-key "
                          "--site NAME`)")
    cmd = ["supernode", "register", str(public_key), CONNECTION, "--format", "json"]
    answer = _flwr_json(cmd + (["--name", name] if name else []), address, ca,
                        f"registering {public_key} at {address} failed")
    return int(answer["node-id"])


def unregister_node(node_id: int, address: str, ca: Path) -> None:
    """Remove node ``node_id`` from the SuperLink (``flwr supernode unregister``), or a DeployError."""
    _flwr_json(["supernode", "unregister", str(node_id), CONNECTION, "--format", "json"], address, ca,
               f"the coordinator at {address} did not unregister node {node_id}")


@dataclass(frozen=True)
class FlowerNode:
    """One node as the SuperLink lists it (Flower 1.41/1.42's ``flwr supernode list --format json``).

    ``status``: registered (never connected), online, offline or unregistered; times are
    Flower's ``YYYY-MM-DD HH:MM:SSZ`` (UTC), None where it has none."""

    node_id: str
    status: str
    registered_at: str | None
    online_at: str | None
    offline_at: str | None
    unregistered_at: str | None

    @property
    def last_seen(self) -> str | None:
        """When the SuperLink last heard from the node: now while online, else when it went offline."""
        if self.status == "online":
            return "now"
        return self.offline_at if self.status in ("offline", "unregistered") else None


def list_nodes(address: str, ca: Path) -> list[FlowerNode]:
    """Every node the SuperLink at ``address`` lists, unregistered ones included; a DeployError when it
    cannot be asked (not running, wrong address or CA)."""
    answer = _flwr_json(["supernode", "list", CONNECTION, "--format", "json", "--verbose"], address, ca,
                        f"the coordinator at {address} did not list its nodes")

    def when(node: dict[str, Any], key: str) -> str | None:
        value = node.get(key)
        return None if value in (None, "", "N/A") else str(value)

    nodes = answer.get("nodes")
    return [FlowerNode(str(n.get("node-id")), str(n.get("status", "")), when(n, "created-at"),
                       when(n, "online-at"), when(n, "offline-at"), when(n, "deleted-at"))
            for n in (nodes if isinstance(nodes, list) else []) if isinstance(n, dict)]


def stop_flower_run(flower_run_id: str, address: str, ca: Path) -> None:
    """Ask the SuperLink to stop Flower run ``flower_run_id`` (``flwr stop``), or a DeployError."""
    _flwr_json(["stop", flower_run_id, CONNECTION, "--format", "json"], address, ca,
               f"the coordinator at {address} did not stop Flower run {flower_run_id}")


def _flwr_json(args: list[str], address: str, ca: Path, failure: str) -> dict[str, Any]:
    """``flwr ARGS`` against the coordinator; its JSON answer, or a DeployError starting with ``failure``."""
    with flower_home(address, ca) as env:
        done = subprocess.run([flower_exe("flwr"), *args], env=env, capture_output=True, text=True, timeout=60,
                              check=False)
    try:
        answer = json.loads(done.stdout[done.stdout.index("{"):])
    except ValueError:
        answer = {}
    if not answer.get("success"):
        why = " ".join(str(answer.get("error-message") or done.stderr or done.stdout).split())[:400]
        raise DeployError(f"{failure}: {why}")
    return answer


def _end_line_later(flower_run: str, env: dict[str, str], cwd: str, on_line: Callable[[str], None]) -> str | None:
    """What follows ``RUN_END_MARK`` in Flower run ``flower_run``'s stored log (shown through ``on_line``), read
    with ``flwr log --show`` a few times over a few seconds; None when it is not there or the SuperLink is gone."""
    for pause in END_LINE_RETRIES_S:
        time.sleep(pause)
        try:
            done = subprocess.run([flower_exe("flwr"), "log", flower_run, CONNECTION, "--show"], env=env, cwd=cwd,
                                  capture_output=True, text=True, timeout=60, check=False)
        except subprocess.TimeoutExpired:
            return None
        if done.returncode != 0:
            return None
        ends = [line for line in done.stdout.splitlines() if RUN_END_MARK in line]
        if ends:
            on_line(ends[-1])
            return ends[-1].split(RUN_END_MARK, 1)[1].strip()
    return None


def submit(request_json: str, address: str, ca: Path, on_line: Callable[[str], None],
           timeout: float | None = None) -> int:
    """Start the signed run request on the coordinator and stream its log; the `flwr run` exit code."""
    import tomli_w

    root = project_root()
    with flower_home(address, ca) as env, tempfile.TemporaryDirectory(prefix="veil-run-") as tmp:
        overrides = Path(tmp, "run-config.toml")
        overrides.write_bytes(tomli_w.dumps({"run-request": request_json}).encode())
        cmd = [flower_exe("flwr"), "run", str(root), CONNECTION, "--run-config", str(overrides), "--stream"]
        proc = subprocess.Popen(cmd, env=env, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        assert proc.stdout is not None
        timed_out: list[bool] = []

        def expire() -> None:  # fires even when the log goes quiet
            timed_out.append(True)
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)

        timer = threading.Timer(timeout, expire) if timeout is not None else None
        if timer is not None:
            timer.start()
        refused = crashed = False
        ended: str | None = None
        flower_run: str | None = None
        try:
            for line in proc.stdout:
                on_line(line.rstrip("\n"))
                refused = refused or REFUSED_LOG in line
                crashed = crashed or SERVERAPP_CRASHED in line
                if RUN_END_MARK in line:
                    ended = line.split(RUN_END_MARK, 1)[1].strip()
                if flower_run is None and STARTED_RUN in line:
                    flower_run = next(iter(line.split(STARTED_RUN, 1)[1].split()), None)
        finally:
            if timer is not None:
                timer.cancel()
            code = proc.wait()
        if timed_out:
            raise DeployError(f"stopped following after {timeout:.0f}s; the run goes on at the coordinator "
                              "(see `veil runs`)")
        if code == 0 and ended is None and not refused and not crashed and flower_run is not None:
            # The stream stops once Flower marks the run finished, which can come before the ServerApp's
            # last log upload lands: read the finished run's whole log again for its last line
            ended = _end_line_later(flower_run, env, tmp, on_line)
    if refused:  # `flwr run --stream` exits 0 even when the ServerApp fails: read what it said
        return int(ExitCode.REQUEST_REFUSED)
    if ended is not None:  # "run 7 failed: <first reason>"
        status = ended.split()[2].rstrip(":") if len(ended.split()) > 2 else ""
        if status in ("failed", "refused"):
            raise (RunFailedError if status == "failed" else BudgetRefusedError)(ended)
    if crashed and code == 0:
        return int(ExitCode.ERROR)
    if code == 0 and ended is None:
        # Flower's stream also ends cleanly when the SuperLink shuts down mid-run (a coordinator stopped
        # or killed and reaped), and then the log cannot be read again: the run's outcome is unknown here
        raise DeployError(f"the coordinator's log stream ended before the run did (its last line, "
                          f"'{RUN_END_MARK} …', never came: the coordinator may have stopped or restarted); "
                          "the run's outcome is in its store: veil runs --store URL")
    return code


