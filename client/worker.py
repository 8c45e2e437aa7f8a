"""The site's long-lived worker, and the thin ClientApp that forwards Flower's messages to it.

Flower (1.41 and 1.42) starts a fresh ``flwr-clientapp`` process for every message. With the
whole site in that process, each one imported torch, Opacus and TenSEAL, loaded and split the
data, fingerprinted it and opened the ledger again: 4–5 s of start-up per message, several
messages per round. So ``veil site start`` runs one **worker** process for the site (the
ClientApp's handlers, with torch, the data, the ledger and the keys loaded once) and Flower's
per-message process only **forwards**: it imports Flower and this module (no torch), sends the
message and the run's ``Context`` to the worker over a Unix socket, and returns the worker's
reply and updated ``Context.state`` to Flower. Flower's engine, its scheduling, retries and
its per-run state are unchanged: the state still travels with each message and is Flower's to
keep, so a restarted worker loses nothing.

The socket lives in a directory only the site's user can enter (``mkdtemp``, mode 700), is
itself mode 600, and the worker also checks each caller's uid (``SO_PEERCRED``): no other
local user can ask the site to train or spend budget. Frames are length-prefixed, bounded by
``MAX_FRAME``; a malformed request gets a one-line error, never a traceback.

Crash safety: the worker charges the ledger before it trains, as before; a worker that dies
mid-round has over-counted at worst. ``veil site start`` restarts a dead worker with backoff
(``WorkerKeeper``). A forwarder that cannot connect (the worker is restarting) waits up to
``CONNECT_WAIT_S`` and then answers the message in its own process, the old, slow way, so a
round is not lost; one whose worker dies mid-answer answers ``site-error``, never a second
charge for the same message. One message is handled at a time (the lock), as one site trains
one model at a time; a ``ping`` is answered at once.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, RecordDict

PROTOCOL = b"veil-site-worker/1"
MAX_FRAME = 1 << 30  # 1 GiB: a CKKS update of ~30M parameters; nothing legitimate is larger
CONNECT_WAIT_S = 30.0  # a forwarder waits this long for a restarting worker
REPLY_TIMEOUT_S = 6 * 3600.0  # one message's whole answer (training included)
READY_TIMEOUT_S = 300.0  # a new worker has this long to load the site and answer a ping
DRAIN_S = 15.0  # on SIGTERM, an answer in progress gets this long (the keeper's grace is 20 s)
_HEADER = struct.Struct(">I")


class WorkerUnavailable(ConnectionError):
    """Nothing answers on the worker's socket (it is not started, or restarting)."""


class WorkerBroke(ConnectionError):
    """The worker accepted the message but did not answer it (it died, or sent nonsense)."""


# -- frames -----------------------------------------------------------------------------------
def _send(sock: socket.socket, *frames: bytes) -> None:
    payload = b"".join(_HEADER.pack(len(f)) + f for f in frames)
    sock.sendall(_HEADER.pack(len(frames)) + payload)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise EOFError("the other side closed the connection")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _recv(sock: socket.socket, max_frames: int = 4) -> list[bytes]:
    (count,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
    if not 0 < count <= max_frames:
        raise ValueError(f"{count} frames (at most {max_frames})")
    frames = []
    for _ in range(count):
        (size,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
        if size > MAX_FRAME:
            raise ValueError(f"a frame of {size} bytes (at most {MAX_FRAME})")
        frames.append(_recv_exact(sock, size))
    return frames


# -- the forwarder (in each flwr-clientapp process) -------------------------------------------
def _connect(path: str, wait_s: float) -> socket.socket:
    deadline = time.monotonic() + wait_s
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(5.0)
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError) as err:
            sock.close()
            if time.monotonic() >= deadline:
                raise WorkerUnavailable(f"the site's worker does not answer at {path} ({err.strerror})") from None
            time.sleep(0.2)
        except OSError as err:
            sock.close()
            raise WorkerUnavailable(f"the site's worker socket {path}: {err}") from None


def ping(path: str, wait_s: float = 0.0) -> str:
    """The site id the worker at ``path`` serves (raises ``WorkerUnavailable``/``WorkerBroke``)."""
    with _connect(path, wait_s) as sock:
        try:
            _send(sock, PROTOCOL, b"ping")
            status, *rest = _recv(sock)
        except (OSError, EOFError, ValueError) as err:
            raise WorkerBroke(f"the site's worker at {path} did not answer a ping ({err})") from None
    if status != b"ok" or len(rest) != 1:
        raise WorkerBroke(f"the site's worker at {path} answered a ping with {status[:40]!r}")
    return rest[0].decode("utf-8", "replace")


def forward(msg: Message, context: Context, path: str, *, wait_s: float | None = None) -> Message:
    """Have the worker at ``path`` answer ``msg``; ``context.state`` comes back updated.

    ``WorkerUnavailable`` when nothing answers within ``wait_s`` (nothing was sent);
    ``WorkerBroke`` when it took the message and then failed to answer."""
    from flwr.common.serde import context_to_proto, message_to_proto, recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    request = (PROTOCOL, b"message", message_to_proto(msg).SerializeToString(),
               context_to_proto(context).SerializeToString())
    with _connect(path, CONNECT_WAIT_S if wait_s is None else wait_s) as sock:
        try:
            sock.settimeout(REPLY_TIMEOUT_S)
            _send(sock, *request)
            status, *rest = _recv(sock)
        except (OSError, EOFError, ValueError) as err:
            raise WorkerBroke(f"the site's worker stopped while answering ({err}); it is restarted by "
                              "`veil site start`") from None
    if status == b"error" and len(rest) == 1:
        raise WorkerBroke(rest[0].decode("utf-8", "replace")[:500])
    if status != b"ok" or len(rest) != 2:
        raise WorkerBroke(f"the site's worker answered with {status[:40]!r}")
    content = recorddict_from_proto(ProtoRecordDict.FromString(rest[0]))
    context.state = recorddict_from_proto(ProtoRecordDict.FromString(rest[1]))
    return Message(content=content, reply_to=msg)


# -- the worker ---------------------------------------------------------------------------------
class Worker:
    """Serves ``app`` (a ClientApp, or any ``(Message, Context) -> Message``) on a Unix socket.

    ``refresh``, when given, is asked before every message for the app to use from now on (the
    site's files changed: a new app) or None (unchanged); it raises ``ValueError`` with a sentence
    when the site no longer loads, and the message is answered with that sentence."""

    def __init__(self, app: Callable[[Message, Context], Message], path: Path, site_id: str,
                 refresh: Callable[[], Callable[[Message, Context], Message] | None] | None = None) -> None:
        self.app, self.path, self.site_id, self.refresh = app, Path(path), site_id, refresh
        self._lock = threading.Lock()
        self._server: socket.socket | None = None
        self._closed = threading.Event()

    def bind(self) -> None:
        """Listen on ``path`` (mode 600, in a directory that must be the caller's and mode 700)."""
        parent = self.path.parent
        st = parent.stat()
        if st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise PermissionError(f"{parent} must be owned by this user and mode 700 (it is "
                                  f"{st.st_mode & 0o777:o}): other users could reach the site's worker")
        self.path.unlink(missing_ok=True)  # a socket left by a worker that died
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            server.bind(str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        server.listen(16)
        self._server = server

    def serve_forever(self) -> None:
        """Accept callers until ``close()``; each is served on its own thread."""
        assert self._server is not None, "bind() first"
        while not self._closed.is_set():
            try:
                conn, _ = self._server.accept()
            except OSError:
                if self._closed.is_set():
                    return
                raise
            threading.Thread(target=self._serve_one, args=(conn,), daemon=True, name="veil-worker-conn").start()

    def drain(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the answer in progress (its charge is on disk: let it reach
        the site's caller). True when none is left."""
        if self._lock.acquire(timeout=timeout):
            self._lock.release()
            return True
        return False

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called."""
        return self._closed.is_set()

    def close(self) -> None:
        """Stop accepting and remove the socket (an answer in progress is not waited for: ``drain``)."""
        self._closed.set()
        if self._server is not None:
            self._server.close()
        self.path.unlink(missing_ok=True)

    def _serve_one(self, conn: socket.socket) -> None:
        from veil.logs import get_logger

        with conn:
            try:
                conn.settimeout(60.0)  # a request arrives at once; a caller that stalls is dropped
                if not _same_user(conn):
                    _send(conn, b"error", b"refused: the caller is not this site's user")
                    return
                frames = _recv(conn)
                if len(frames) < 2 or frames[0] != PROTOCOL:
                    _send(conn, b"error", b"not a veil-site-worker/1 request (upgrade Veil on both sides)")
                    return
                conn.settimeout(None)
                _send(conn, *self.answer(frames[1], frames[2:]))
            except (OSError, EOFError, ValueError) as err:  # the caller went away or sent nonsense
                get_logger("client").warning("site worker: dropped a request: %s", err)

    def answer(self, kind: bytes, frames: list[bytes]) -> tuple[bytes, ...]:
        """The reply frames for one request."""
        if kind == b"ping":
            return b"ok", self.site_id.encode()
        if kind != b"message" or len(frames) != 2:
            return b"error", b"unknown request: expected a message and its context"
        from flwr.common.serde import context_from_proto, message_from_proto, recorddict_to_proto
        from flwr.proto.message_pb2 import Context as ProtoContext
        from flwr.proto.message_pb2 import Message as ProtoMessage

        try:
            msg = message_from_proto(ProtoMessage.FromString(frames[0]))
            context = context_from_proto(ProtoContext.FromString(frames[1]))
        except Exception as err:  # a protobuf that does not parse
            return b"error", f"a message that does not parse: {type(err).__name__}".encode()
        with self._lock:  # one task at a time, as one site trains one model at a time
            start = time.perf_counter()
            from veil.logs import get_logger

            if self.refresh is not None:
                try:
                    self.app = self.refresh() or self.app
                except ValueError as err:
                    return b"error", str(err)[:500].encode()
            try:
                reply = self.app(msg, context)
            except Exception as err:  # the handlers answer in sentences; this is Flower's routing or a bug
                get_logger("client").error("site worker: cannot answer a %s message: %s",
                                           msg.metadata.message_type, err, exc_info=True)
                return b"error", f"the site cannot answer this message: {type(err).__name__}".encode()

            get_logger("client").info("%s: answered %s of run %s in %.2f s", self.site_id,
                                      msg.metadata.message_type, msg.metadata.run_id, time.perf_counter() - start)
        if not reply.has_content():  # the handlers answer refusals as content; an error has none
            return b"error", (reply.error.reason or "the site's handler failed")[:500].encode()
        return (b"ok", recorddict_to_proto(reply.content).SerializeToString(),
                recorddict_to_proto(context.state or RecordDict()).SerializeToString())


def _same_user(conn: socket.socket) -> bool:
    """Whether the peer runs as this process's user (Linux ``SO_PEERCRED``; elsewhere the
    socket's mode 600 and its mode-700 directory are the guard)."""
    opt = getattr(socket, "SO_PEERCRED", None)
    if opt is None:
        return True
    creds = conn.getsockopt(socket.SOL_SOCKET, opt, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return bool(uid == os.getuid())


def worker_command(config_path: Path, socket_path: Path) -> list[str]:
    """How ``veil site start`` runs the worker for ``config_path``."""
    # -P: the directory the site was started in is not on sys.path (nothing planted there is imported)
    return [sys.executable, "-P", "-c", "from client.daemon import worker_main; worker_main()",
            "--config", str(Path(config_path).resolve()), "--socket", str(socket_path)]


class SiteFiles:
    """Notices when the files behind a site change (``inputs(site.yaml)`` lists them; a file is
    known by its modification time and size, a folder also by its entries')."""

    def __init__(self, config: Path, inputs: Callable[[Path], list[Path]]) -> None:
        self.config, self.inputs = config, inputs
        self.paths = inputs(config)
        self.seen = self.signature()

    def signature(self) -> tuple[tuple[str, int, int], ...]:
        """(path, mtime ns, size) of every input, and of each entry of an input folder."""
        out = []
        for path in self.paths:
            try:
                st = path.stat()
                out.append((str(path), st.st_mtime_ns, st.st_size))
                if path.is_dir():
                    for entry in sorted(os.scandir(path), key=lambda e: e.name)[:1000]:
                        est = entry.stat()
                        out.append((entry.path, est.st_mtime_ns, est.st_size))
            except OSError:
                out.append((str(path), -1, -1))  # gone: a change too
        return tuple(out)

    def changed(self) -> bool:
        """Whether anything changed since the last call (the list of files is read again if so)."""
        now = self.signature()
        if now == self.seen:
            return False
        with contextlib.suppress(Exception):  # site.yaml no longer reads: the reload says why
            self.paths = self.inputs(self.config)
        self.seen = self.signature()
        return True


def main(load_site: Callable[[Path], Any], inputs: Callable[[Path], list[Path]],
         argv: list[str] | None = None) -> None:
    """The worker process: load the site (``load_site(site.yaml)``, a ``client.site.Site``), then
    answer forwarded messages until SIGTERM. When a file in ``inputs(site.yaml)`` changes (a
    researcher key removed, a cap lowered, new data) the site is loaded again before the next
    answer; until a changed site.yaml loads, every message is answered with why not."""
    parser = argparse.ArgumentParser(prog="veil-site-worker")
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--socket", required=True, type=Path)
    args = parser.parse_args(argv)

    from veil import logs

    logs.configure()
    log = logs.get_logger("client")
    started = time.monotonic()
    from client.app import build_client_app

    try:
        site = load_site(args.config)
        app = build_client_app(lambda _context: site)
        _ = site.fingerprint  # fingerprint the data now, not in the first round
    except Exception as err:
        log.error("site worker: cannot load the site from %s: %s", args.config, err)
        sys.exit(3)
    files = SiteFiles(args.config, inputs)

    def refresh() -> Callable[[Message, Context], Message] | None:
        if not files.changed():
            return None
        from client.app import forget_loaded

        forget_loaded()  # its key or ledger may be another file now
        try:
            fresh = load_site(args.config)
        except Exception as err:
            log.error("site worker: %s changed and no longer loads: %s", args.config, err)
            files.seen = ()  # try again at the next message
            raise ValueError(f"{site.site_id}: the site's configuration changed and no longer loads ({err}); "
                             "it answers nothing until its administrator fixes it") from None
        log.info("site worker: %s or a file it names changed: site %s reloaded (%d training / %d test records)",
                 args.config, fresh.site_id, len(fresh.train), len(fresh.test))
        return build_client_app(lambda _context: fresh)

    worker = Worker(app, args.socket, site.site_id, refresh)

    def stop(_signum: int, _frame: Any) -> None:
        worker.close()

    # before bind(): a caller can reach the socket (and the keeper call it ready) as soon as it
    # listens, and a SIGTERM from then on must remove it rather than kill the process outright
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        worker.bind()
    except OSError as err:  # a path too long for a socket, a directory others can enter, no permission
        if worker.closed:  # stopped while it bound (the handler removed the socket): a clean stop
            log.info("site worker for %s stopped before it answered", site.site_id)
            return
        log.error("site worker: cannot listen at %s: %s", args.socket, err)
        sys.exit(3)
    log.info("site worker for %s ready in %.1f s (pid %d): %d training / %d test records on %s, answering at %s",
             site.site_id, time.monotonic() - started, os.getpid(), len(site.train), len(site.test),
             site.device.type, args.socket)
    try:
        worker.serve_forever()
    finally:
        worker.close()
        if not worker.drain(DRAIN_S):
            log.warning("site worker for %s: stopping mid-answer after %.0f s; the caller gets no reply "
                        "(a charge already made stays on the ledger)", site.site_id, DRAIN_S)
        log.info("site worker for %s stopped", site.site_id)


# -- keeping the worker alive (in ``veil site start``) ------------------------------------------
class WorkerKeeper:
    """Runs the worker as a child of ``veil site start``: starts it, waits until it answers,
    restarts it with backoff (1 s doubling to 60 s) whenever it dies, and relays its log lines
    as ``worker-log`` JSON lines. ``status`` (a dict the site's status file shows) says
    ``starting`` / ``ready`` / ``restarting`` / ``stopped``, with its pid and restart count."""

    def __init__(self, cmd: list[str], env: dict[str, str], path: Path, emit: Callable[..., None],
                 on_change: Callable[[], None] = lambda: None) -> None:
        """``on_change()`` is called after every change of ``status`` (which is replaced, never mutated)."""
        self.cmd, self.env, self.path, self.emit, self.on_change = cmd, env, Path(path), emit, on_change
        self.status: dict[str, Any] = {"state": "starting", "pid": None, "restarts": 0, "socket": str(path)}
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._failed: str | None = None
        self._proc: Any = None
        self._thread = threading.Thread(target=self._loop, daemon=True, name="veil-worker-keeper")

    def start(self) -> None:
        """Start the first worker (in the background)."""
        self._thread.start()

    def wait_ready(self, timeout: float = READY_TIMEOUT_S, cancelled: Callable[[], bool] = lambda: False
                   ) -> str | None:
        """None once the first worker answers (or ``cancelled()``); why not, if it cannot start."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self._stop.is_set() and not cancelled():
            if self._ready.wait(0.2):
                return None
            if self._failed:
                return self._failed
        return self._failed or f"the site's worker did not become ready within {timeout:.0f} s"

    def stop(self, grace: float = 20.0) -> None:
        """Stop the worker (SIGTERM, SIGKILL after ``grace``) and keep it stopped."""
        from veil.processes import stop_group

        self._stop.set()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            stop_group(proc, grace)
        self._thread.join(timeout=grace + 5)
        if proc is None or proc.poll() is not None:  # a worker killed after ``grace`` leaves its socket
            self.path.unlink(missing_ok=True)
        self._set(state="stopped", pid=None)

    def _set(self, **kw: Any) -> None:
        self.status = {**self.status, **kw}  # a new dict: the status writer may be serialising the old one
        self.on_change()

    def _loop(self) -> None:
        from veil.processes import start_group, stop_group, strip_ansi

        delay, ever_ready = 1.0, False
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                proc = self._proc = start_group(self.cmd, self.env, capture=True)
            except OSError as err:
                self._failed = f"cannot start the site's worker ({self.cmd[0]}): {err}"
                return
            if self._stop.is_set():  # stop() came while it started: it may have missed this one
                stop_group(proc, 5.0)
                return
            self.emit("worker-started", pid=proc.pid)
            self._set(state="starting", pid=proc.pid)
            pump = threading.Thread(target=self._pump, args=(proc, strip_ansi), daemon=True, name="worker-log")
            pump.start()
            while proc.poll() is None and not self._stop.is_set():
                try:
                    ping(str(self.path))
                    break
                except (WorkerUnavailable, WorkerBroke):
                    if time.monotonic() - started > READY_TIMEOUT_S:
                        self.emit("worker-stuck", pid=proc.pid, waited_s=READY_TIMEOUT_S)
                        stop_group(proc, 5.0)
                    time.sleep(0.2)
            if proc.poll() is None and not self._stop.is_set():
                ever_ready, delay = True, 1.0
                self._set(state="ready", ready_s=round(time.monotonic() - started, 2))
                self._ready.set()
                self.emit("worker-ready", pid=proc.pid, seconds=round(time.monotonic() - started, 2))
            while proc.poll() is None and not self._stop.wait(0.5):
                pass
            if self._stop.is_set():
                stop_group(proc, 20.0)  # stop() may have stopped an older one
            code = proc.wait()
            pump.join(timeout=5)
            if self._stop.is_set():
                return
            reason = f"it exited with {code}"
            self.emit("worker-exited", pid=proc.pid, code=code)
            if not ever_ready and code == 3:  # it could not load the site: a configuration error
                self._failed = "the site's worker could not load the site or listen (see its worker-log lines)"
                self._set(state="failed", pid=None, last_error=self._failed)
                return
            self._ready.clear()
            self._set(state="restarting", pid=None, restarts=self.status["restarts"] + 1,
                      last_error=reason)
            if self._stop.wait(delay):
                return
            delay = min(delay * 2, 60.0)

    def _pump(self, proc: Any, strip: Callable[[str], str]) -> None:
        try:
            for raw in proc.stdout:
                text = strip(raw).rstrip()
                if text.strip():
                    self.emit("worker-log", message=text[:2000])
        except (OSError, ValueError):
            pass
