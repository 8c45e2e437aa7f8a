"""``veil site check`` and ``veil site start`` shake hands with the coordinator over TLS and tell
"certificate not trusted" (a configuration error) apart from "nothing listening" (wait for it)."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from client.daemon import probe_coordinator
from veil.cli.pki import create_certs


def _tls_server(certs: Path, tls: bool = True) -> Iterator[int]:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(certs / "server.crt", certs / "server.key")
    ctx.set_alpn_protocols(["h2"])
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                if not tls:
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
                    continue
                try:
                    with ctx.wrap_socket(conn, server_side=True):
                        pass
                except (ssl.SSLError, OSError):
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


@pytest.fixture
def pki(tmp_path: Path) -> tuple[Path, Path]:
    """The federation's certificates, and another CA's."""
    create_certs(tmp_path / "ours", ["127.0.0.1"])
    create_certs(tmp_path / "theirs", ["127.0.0.1"])
    return tmp_path / "ours", tmp_path / "theirs"


def test_a_trusted_coordinator_passes(pki: tuple[Path, Path]) -> None:
    ours, _ = pki
    for port in _tls_server(ours):
        check = probe_coordinator(f"127.0.0.1:{port}", ours / "ca.crt")
        assert check.ok and not check.warning and "verified against" in check.detail


def test_a_wrong_ca_is_a_failure_that_says_so(pki: tuple[Path, Path]) -> None:
    ours, theirs = pki
    for port in _tls_server(ours):
        check = probe_coordinator(f"127.0.0.1:{port}", theirs / "ca.crt")
        assert not check.ok and "certificate is not trusted" in check.detail
        assert str(theirs / "ca.crt") in check.detail


def test_nothing_listening_is_a_warning_not_a_failure(pki: tuple[Path, Path]) -> None:
    ours, _ = pki
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    check = probe_coordinator(f"127.0.0.1:{port}", ours / "ca.crt")
    assert check.ok and check.warning and "nothing is listening" in check.detail


def test_a_port_that_does_not_speak_tls_is_a_failure(pki: tuple[Path, Path]) -> None:
    ours, _ = pki
    for port in _tls_server(ours, tls=False):
        check = probe_coordinator(f"127.0.0.1:{port}", ours / "ca.crt")
        assert not check.ok and "not with TLS" in check.detail
