"""What a deployed round costs over the training it does: a real localhost federation.

One coordinator (``veil coordinator start``: a Flower SuperLink with TLS and SuperNode
authentication, SQLite run store) and three sites (``veil site start``: a SuperNode each, node
keys registered), MNIST-5k split in three, MLP, DP-SGD, a run submitted with ``veil run``. It
runs the same federation twice: with the site's long-lived worker (the default) and with
``VEIL_SITE_WORKER=off`` and Flower's polling intervals at the site (every message answered in a
fresh ``flwr-clientapp`` process that imports torch and loads the site; the SuperNode idles 3 s
between pulls and its SuperExec 1 s, as before). The coordinator polls briskly in both
(``server.delivery``).

For each round it prints the round's wall time (the coordinator's, pre-flight excluded) over
the slowest site's DP-SGD time, and where the rest went, from the sites' own log lines:

* ``DP-SGD``: the slowest site's local training (``Participation.seconds``, train phase);
* ``site work``: the rest of the site's answers to the round's train and evaluate messages
  (model in/out, evaluation, ledger charge; the worker logs each answer's time);
* ``per-message process``: Flower's ``flwr-clientapp`` for each message, from the SuperNode's
  "Receiving" to its "Sent successfully", less the site work (process start, imports, Flower's
  runtime calls; with the worker off, also torch and the site's data);
* ``Flower delivery``: the rest of the round: Flower's polling (SuperNode idle 3 s, SuperExec
  1 s, ServerApp 3 s), messages on the wire, aggregation at the coordinator.

Run from the repo root (about 5 minutes on 2 cores):

    .venv/bin/python benchmarks/deployment.py [--rounds 4 --epochs 2] [--only veil|flower]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

VEIL = [sys.executable, "-m", "veil.cli"]
SITES = ("site-0", "site-1", "site-2")
LABELS = {"veil": "Veil (site worker, brisk polling)",
          "flower": "Flower's way (a process per message, Flower's polling at the site)"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"benchmark: timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.25)


def _events(log: Path) -> list[dict[str, Any]]:
    out = []
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def _prepare(base: Path, port: int, rounds: int, epochs: int, poll_s: float) -> None:
    import numpy as np
    import yaml

    from client.data import load_mnist_5k

    def veil(*args: str) -> None:
        subprocess.run([*VEIL, *args], cwd=base, check=True, capture_output=True, text=True, timeout=120)

    veil("certs", "create", "certs", "--host", "127.0.0.1")
    veil("certs", "researcher-key", "keys/researcher")
    (base / "researchers").mkdir()
    (base / "researchers" / "researcher.pub").write_bytes((base / "keys" / "researcher.pub").read_bytes())
    (base / "ledgers").mkdir()
    digits = load_mnist_5k()
    order = np.random.default_rng(0).permutation(len(digits))
    for i, name in enumerate(SITES):
        veil("certs", "node-key", "--site", name, "keys")  # keys/NAME.node-key, keys/NAME.node-key.pub
        sel = order[i::len(SITES)]
        np.savez(base / f"{name}.npz", x=digits.features[sel], y=digits.labels[sel])
        (base / f"{name}.yaml").write_text(yaml.safe_dump({
            "site_id": name, "data": {"format": "npz", "path": f"{name}.npz"}, "ledger": f"ledgers/{name}.ledger",
            "policy": {"epsilon_cap": 1000.0, "trusted_researchers": ["researchers"]}, "device": "cpu",
            "poll_interval_s": poll_s,
            "coordinator": {"address": f"127.0.0.1:{port}", "root_certificates": "certs/ca.crt",
                            "node_key": f"keys/{name}.node-key"}}))
        veil("site", "init", "--config", f"{name}.yaml")
    (base / "run.yaml").write_text(yaml.safe_dump({
        "name": "deployment-benchmark", "seed": 1,
        "federation": {"sites": len(SITES), "rounds": rounds, "min_sites": len(SITES), "round_timeout_s": 300},
        "model": {"arch": "mlp"},
        "training": {"batch_size": 64, "learning_rate": 0.5, "local_epochs": epochs},
        "privacy": {"noise_multiplier": 1.0}}))


def _federation(base: Path, worker: bool, rounds: int, epochs: int) -> dict[str, Any]:
    port = _free_port()
    _prepare(base, port, rounds, epochs, 0.5 if worker else 3.0)
    env = {**os.environ, "VEIL_SITE_WORKER": "on" if worker else "off"}
    if not worker:  # Flower's own SuperExec interval at the site
        env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = "1.0"
    procs: list[subprocess.Popen[bytes]] = []

    def start(args: list[str], log: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([*VEIL, *args], cwd=base, env=env, stdout=(base / log).open("w"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        return proc

    try:
        store = f"sqlite:///{base / 'veil.db'}"
        start(["coordinator", "start", "--certs", "certs", "--store", store,
               "--host", "127.0.0.1", "--port", str(port), "--state", "state/superlink.db",
               "--researchers", "researchers", "--artifacts-dir", "art"], "coordinator.log")
        _wait(lambda: _listening(port), 120, "the SuperLink to listen")
        for name in SITES:
            subprocess.run([*VEIL, "coordinator", "register", f"keys/{name}.node-key.pub", "--store", store,
                            "--coordinator",
                            f"127.0.0.1:{port}", "--ca", "certs/ca.crt"], cwd=base, check=True,
                           capture_output=True, timeout=120)
        for name in SITES:
            start(["site", "start", "--config", f"{name}.yaml"], f"{name}.log")

        def connected() -> bool:
            return all(json.loads((base / f"{n}.status.json").read_text()).get("state") == "connected"
                       if (base / f"{n}.status.json").exists() else False for n in SITES)

        _wait(connected, 300, "three connected sites")
        t0 = time.monotonic()
        done = subprocess.run([*VEIL, "run", "run.yaml", "--coordinator", f"127.0.0.1:{port}", "--ca",
                               "certs/ca.crt", "--key", "keys/researcher", "--timeout", "1800"], cwd=base, env=env,
                              capture_output=True, text=True, timeout=2000)
        run_wall = time.monotonic() - t0
        if done.returncode != 0:
            raise SystemExit(f"benchmark: veil run exited {done.returncode}:\n{done.stdout[-3000:]}"
                             f"{done.stderr[-2000:]}")
    finally:
        for proc in reversed(procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    return _measure(base, rounds, run_wall)


def _ts(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["ts"]).timestamp()


_ANSWERED = re.compile(r"answered (\S+) of run \d+ in ([0-9.]+) s")


def _site_messages(log: Path) -> list[dict[str, Any]]:
    """Each message the site's SuperNode handled, in order: type, seconds from Receiving to Sent,
    and the worker's own answer time (when it has a worker)."""
    out: list[dict[str, Any]] = []
    for e in _events(log):
        msg = str(e.get("message", ""))
        if e["event"] == "supernode-log" and msg.startswith("Receiving: "):
            out.append({"type": msg.split()[1], "received": _ts(e), "sent": None, "answer": None})
        elif e["event"] == "supernode-log" and msg.startswith("Sent successfully") and out:
            out[-1]["sent"] = _ts(e)
        elif e["event"] == "worker-log" and (m := _ANSWERED.search(msg)) and out:
            out[-1]["answer"] = float(m.group(2))
    return [m for m in out if m["sent"] is not None]


def _measure(base: Path, rounds: int, run_wall: float) -> dict[str, Any]:
    from sqlalchemy import select

    from server.store import RunStore
    from server.store import schema as S

    store = RunStore(f"sqlite:///{base / 'veil.db'}", migrate=False)
    with store.session() as s:
        run = s.scalars(select(S.Run)).one()
        names = {row.id: row.site_key for row in s.scalars(select(S.Site).where(S.Site.run_id == run.id))}
        walls = {r.number: r.seconds for r in s.scalars(select(S.Round).where(S.Round.run_id == run.id))}
        train: dict[int, dict[str, float]] = {}
        for p in s.scalars(select(S.Participation).where(S.Participation.run_id == run.id,
                                                         S.Participation.phase == "train")):
            train.setdefault(p.round_number, {})[names[p.site_id]] = p.seconds or 0.0
    store.close()
    messages = {n: [m for m in _site_messages(base / f"{n}.log") if m["type"] in ("train", "evaluate")]
                for n in SITES}
    per_round = []
    for r in range(1, rounds + 1):
        slowest = max(train[r], key=lambda n: train[r][n])
        msgs = messages[slowest][2 * (r - 1):2 * r]  # its train and evaluate messages of round r
        at_site = sum(m["sent"] - m["received"] for m in msgs)
        answers = [m["answer"] for m in msgs]
        site_work = (sum(answers) - train[r][slowest]) if all(a is not None for a in answers) else None
        wall = float(walls[r])
        per_round.append({
            "round": r, "wall": wall, "dp_sgd": train[r][slowest],
            "site_work": site_work,
            "process": at_site - (sum(answers) if site_work is not None else train[r][slowest]),
            "delivery": wall - at_site,
        })
    return {"rounds": per_round, "run_wall": run_wall}


def _median(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r[key] is not None]
    return statistics.median(values) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2, help="local epochs per round")
    parser.add_argument("--only", choices=tuple(LABELS))
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    args = parser.parse_args()
    results = {}
    for mode in LABELS:
        if args.only and mode != args.only:
            continue
        with tempfile.TemporaryDirectory(prefix=f"veil-bench-{mode}-") as d:
            print(f"running a 3-site localhost federation, {args.rounds} rounds: {LABELS[mode]} ...", flush=True)
            results[mode] = _federation(Path(d), mode == "veil", args.rounds, args.epochs)
    print(f"\nDeployed round cost, 3 sites on 127.0.0.1 (TLS, node auth), MNIST-5k / 3, MLP, DP-SGD, "
          f"{args.epochs} local epochs, {args.rounds} rounds; medians over the rounds; seconds\n")
    head = ("| how sites answer | round wall | slowest DP-SGD | ratio | site work | per-message process "
            "| Flower delivery | ratio without delivery |")
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for mode, res in results.items():
        rows = res["rounds"]
        ratio = statistics.median(r["wall"] / r["dp_sgd"] for r in rows)
        no_delivery = statistics.median((r["wall"] - r["delivery"]) / r["dp_sgd"] for r in rows)
        site_work = _median(rows, "site_work")
        print(f"| {LABELS[mode]} | {_median(rows, 'wall'):.1f} | {_median(rows, 'dp_sgd'):.2f} | {ratio:.1f}x | "
              f"{'-' if site_work is None else f'{site_work:.2f}'} | {_median(rows, 'process'):.2f} | "
              f"{_median(rows, 'delivery'):.1f} | {no_delivery:.1f}x |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
