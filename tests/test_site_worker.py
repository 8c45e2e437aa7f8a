"""The site's long-lived worker and the thin ClientApp that forwards to it (``client.worker``).

What must hold: a forwarded message gets exactly the answer the in-process app gives, with
``Context.state`` carried back (run-level ε composes across rounds); the socket is the site
user's alone; nonsense on it is answered or dropped without taking the worker down; a worker
that is away is waited for and then replaced by an in-process answer, one that breaks
mid-answer is a ``site-error`` (never a second charge); Flower's per-message process imports
no torch; and ``veil site start``'s keeper restarts a worker that is SIGKILLed.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client import worker as W
from client.app import build_client_app
from privacy.ledger import SiteLedger
from tests.flowerkit import incoming
from tests.sitekit import make_site, task
from veil import protocol as P
from veil.models import build_model


@pytest.fixture
def private_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="veil-t-") as d:  # short: a Unix socket path has ~100 bytes
        yield Path(d)


def _serve(app: object, path: Path, site_id: str = "site-t") -> W.Worker:
    w = W.Worker(app, path, site_id)  # type: ignore[arg-type]
    w.bind()
    threading.Thread(target=w.serve_forever, daemon=True).start()
    return w


def _context() -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def _train_message(server_round: int) -> Message:
    from flwr.app import ArrayRecord

    config = task(arch="mlp").to_config()
    config["server-round"] = server_round
    arrays = ArrayRecord(build_model("mlp", seed=0).state_dict())
    return incoming(RecordDict({P.ARRAYS: arrays, P.TASK: ConfigRecord(dict(config))}), "train")


def test_forwarded_answers_are_the_in_process_answers_and_state_comes_back(tmp_path: Path,
                                                                           private_dir: Path) -> None:
    site = make_site(tmp_path / "a.ledger")
    app = build_client_app(lambda _c: site)
    w = _serve(app, private_dir / "w.sock")
    try:
        assert W.ping(str(w.path)) == "site-t"
        query = incoming(RecordDict({P.TASK: task().to_config()}), P.BUDGET_QUERY)
        here = P.BudgetStatus.from_config(app(query, _context()).content[P.BUDGET])  # type: ignore[arg-type]
        there = P.BudgetStatus.from_config(  # type: ignore[arg-type]
            W.forward(query, _context(), str(w.path)).content[P.BUDGET])
        assert there == here and there.affordable_rounds == 3

        ctx = _context()
        eps = []
        for rnd in (1, 2):
            reply = W.forward(_train_message(rnd), ctx, str(w.path))
            assert P.ARRAYS in reply.content and P.REFUSAL not in reply.content
            eps.append(float(reply.content[P.METRICS][P.EPSILON]))  # type: ignore[index]
        history = ctx.state["veil.privacy-history"]
        assert isinstance(history, ConfigRecord) and list(history["steps"]) == [4, 4]  # type: ignore[arg-type]
        assert eps[1] > eps[0] > 0  # run-level ε composes the history the state carried back
        with SiteLedger(site.ledger, create=False) as ledger:
            assert [e.round for e in ledger.entries()] == [1, 2]  # one charge per message
    finally:
        w.close()
    assert not (private_dir / "w.sock").exists()


def test_the_socket_is_the_site_users_alone(tmp_path: Path, private_dir: Path) -> None:
    w = _serve(lambda m, c: m, private_dir / "w.sock")
    try:
        assert stat.S_IMODE((private_dir / "w.sock").stat().st_mode) == 0o600
        assert stat.S_IMODE(private_dir.stat().st_mode) == 0o700
    finally:
        w.close()
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    with pytest.raises(PermissionError, match="mode 700"):
        W.Worker(lambda m, c: m, shared / "w.sock", "x").bind()


def _raw(path: Path, payload: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def test_nonsense_on_the_socket_is_refused_and_the_worker_lives_on(tmp_path: Path, private_dir: Path) -> None:
    site = make_site(tmp_path / "a.ledger")
    w = _serve(build_client_app(lambda _c: site), private_dir / "w.sock")
    try:
        frame = struct.Struct(">I")
        assert _raw(w.path, b"\xff\xff\xff\xff") == b""  # 4 billion frames: dropped unanswered
        assert _raw(w.path, frame.pack(1) + frame.pack(W.MAX_FRAME + 1)) == b""  # an oversized frame
        wrong = frame.pack(2) + frame.pack(5) + b"hello" + frame.pack(4) + b"ping"
        assert b"not a veil-site-worker/1 request" in _raw(w.path, wrong)
        junk = b"".join(frame.pack(len(f)) + f for f in (W.PROTOCOL, b"message", b"\x00junk", b"\x01"))
        assert b"does not parse" in _raw(w.path, frame.pack(4) + junk)
        unknown = b"".join(frame.pack(len(f)) + f for f in (W.PROTOCOL, b"shell"))
        assert b"unknown request" in _raw(w.path, frame.pack(2) + unknown)
        assert W.ping(str(w.path)) == "site-t"  # still serving
        with SiteLedger(site.ledger, create=True, site_id="site-t") as ledger:
            assert ledger.head().seq == 0  # nothing above charged anything
    finally:
        w.close()


def test_an_absent_worker_is_waited_for_then_answered_here_and_a_broken_one_is_a_site_error(
        private_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from veil.apps import clientapp

    path = private_dir / "w.sock"
    started = time.monotonic()
    with pytest.raises(W.WorkerUnavailable, match="does not answer"):
        W.forward(_train_message(1), _context(), str(path), wait_s=0.6)
    assert 0.5 < time.monotonic() - started < 10

    # a worker that takes the message and dies without answering
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(4)

    def accept_and_drop() -> None:
        for _ in range(2):
            conn, _ = server.accept()
            conn.recv(16)
            conn.close()

    threading.Thread(target=accept_and_drop, daemon=True).start()
    with pytest.raises(W.WorkerBroke, match="stopped while answering"):
        W.forward(_train_message(1), _context(), str(path))
    ctx = Context(run_id=1, node_id=7, node_config={"site-socket": str(path), "site-id": "clinic-a"},
                  state=RecordDict(), run_config={})
    reply = clientapp.handle(_train_message(1), ctx).content  # answered, not re-run in-process
    refusal = P.Refusal.from_config(reply[P.REFUSAL])  # type: ignore[arg-type]
    assert refusal.code == "site-error" and "stopped while answering" in refusal.detail
    assert P.SiteInfo.from_config(reply[P.SITE]).site_id == "clinic-a"  # type: ignore[arg-type]
    server.close()

    # nothing there at all: after the wait, the in-process app answers (here: a simulated scenario)
    calls: list[str] = []
    monkeypatch.setattr(W, "CONNECT_WAIT_S", 0.3)
    monkeypatch.setattr(clientapp, "_in_process", lambda: lambda m, c: calls.append(m.metadata.message_type) or m)
    path.unlink()
    clientapp.handle(_train_message(1), ctx)
    assert calls == ["train"]


def test_flowers_per_message_process_imports_no_torch() -> None:
    code = ("import sys, time; t = time.perf_counter(); import veil.apps.clientapp; "
            "print(round(time.perf_counter() - t, 2)); "
            "bad = [m for m in ('torch', 'opacus', 'tenseal', 'dp_accounting') if m in sys.modules]; "
            "assert not bad, bad")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def test_the_keeper_restarts_a_killed_worker_and_stops_it(tmp_path: Path, private_dir: Path) -> None:
    from client.daemon import init_ledger
    from tests.test_site_daemon import _site

    config = _site(tmp_path)
    init_ledger(config)
    sock = private_dir / "worker.sock"
    events: list[tuple[str, dict[str, object]]] = []
    keeper = W.WorkerKeeper(W.worker_command(config, sock), dict(os.environ), sock,
                            lambda e, **kw: events.append((e, kw)))
    keeper.start()
    try:
        assert keeper.wait_ready(timeout=180) is None
        assert W.ping(str(sock)) == "clinic-a" and keeper.status["state"] == "ready"
        first = keeper.status["pid"]
        assert isinstance(first, int)
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 180
        while not (keeper.status["restarts"] == 1 and keeper.status["state"] == "ready"):
            assert time.monotonic() < deadline, keeper.status
            time.sleep(0.2)
        assert keeper.status["pid"] not in (None, first)
        assert W.ping(str(sock)) == "clinic-a"
        assert any(e == "worker-exited" and kw["code"] == -signal.SIGKILL for e, kw in events)
        assert any(e == "worker-log" and "ready in" in str(kw["message"]) for e, kw in events)
    finally:
        keeper.stop(grace=10)
    second = keeper.status.get("pid")
    assert keeper.status["state"] == "stopped" and second is None and not sock.exists()


def test_a_worker_that_cannot_load_the_site_is_a_configuration_error(tmp_path: Path, private_dir: Path) -> None:
    from client.daemon import init_ledger
    from tests.test_site_daemon import _site

    config = _site(tmp_path)
    init_ledger(config)
    (tmp_path / "data.csv").unlink()
    sock = private_dir / "worker.sock"
    keeper = W.WorkerKeeper(W.worker_command(config, sock), dict(os.environ), sock, lambda e, **kw: None)
    keeper.start()
    try:
        problem = keeper.wait_ready(timeout=180)
        assert problem is not None and "could not load the site" in problem
        assert keeper.status["state"] == "failed" and keeper.status["restarts"] == 0
    finally:
        keeper.stop(grace=5)


def test_a_message_the_site_cannot_route_is_an_error_not_a_dead_worker(tmp_path: Path, private_dir: Path) -> None:
    site = make_site(tmp_path / "a.ledger")
    w = _serve(build_client_app(lambda _c: site), private_dir / "w.sock")
    try:
        with pytest.raises(W.WorkerBroke, match="cannot answer this message: ValueError"):
            W.forward(incoming(RecordDict(), "query.nothing"), _context(), str(w.path))
        assert W.ping(str(w.path)) == "site-t"
    finally:
        w.close()


def test_a_caller_of_another_user_is_refused(tmp_path: Path, private_dir: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    w = _serve(lambda m, c: m, private_dir / "w.sock")
    try:
        assert W.ping(str(w.path)) == "site-t"
        monkeypatch.setattr(os, "getuid", lambda: 4242)  # the worker now runs as someone else than its caller
        with pytest.raises(W.WorkerBroke, match="error"):
            W.ping(str(w.path))
    finally:
        w.close()


def test_the_worker_reloads_a_changed_site_and_refuses_a_broken_one(tmp_path: Path, private_dir: Path) -> None:
    import yaml

    from client.daemon import init_ledger
    from tests.test_site_daemon import _site

    config = _site(tmp_path)
    init_ledger(config)
    sock = private_dir / "worker.sock"
    keeper = W.WorkerKeeper(W.worker_command(config, sock), dict(os.environ), sock, lambda e, **kw: None)
    keeper.start()

    def cap() -> float | None:
        query = incoming(RecordDict({P.TASK: task(arch="mlp-4x3", batch_size=20).to_config()}), P.BUDGET_QUERY)
        reply = W.forward(query, _context(), str(sock)).content
        return P.BudgetStatus.from_config(reply[P.BUDGET]).cap  # type: ignore[arg-type]

    try:
        assert keeper.wait_ready(timeout=180) is None
        assert cap() == 10.0
        good = config.read_text()
        cfg = yaml.safe_load(good)
        cfg["policy"]["epsilon_cap"] = 0.5  # the administrator lowers the cap while the site runs
        config.write_text(yaml.safe_dump(cfg))
        assert cap() == 0.5  # the next answer follows it, without a restart
        config.write_text(good + "\nnot yaml: [\n")
        with pytest.raises(W.WorkerBroke, match="changed and no longer loads"):
            cap()
        config.write_text(good)
        assert cap() == 10.0 and keeper.status["restarts"] == 0
    finally:
        keeper.stop(grace=10)
