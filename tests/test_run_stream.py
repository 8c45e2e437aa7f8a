"""`veil run` reads the outcome from the run's streamed log, not from `flwr run`'s exit code.

`flwr run --stream` exits 0 whenever the stream ends cleanly, and the stream also ends cleanly when
the SuperLink shuts down mid-run (a coordinator killed and reaped). Here a stand-in `flwr` prints a
given log and exits 0, so each ending is exercised exactly; the real coordinator-outage case is
tests/test_coordinator_restart.py."""

from __future__ import annotations

import stat
import sys
from pathlib import Path

import pytest

from server.lifecycle import RUN_END_MARK
from veil.cli import flower
from veil.errors import DeployError, RunFailedError


def _fake_flwr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lines: list[str], code: int = 0,
               stored: list[str] | None = None) -> Path:
    """A `flwr` whose `run --stream` prints ``lines`` and exits ``code``, and whose `log RUN --show` prints
    ``stored`` (the finished run's log as the SuperLink keeps it) or, without it, fails as an unreachable
    SuperLink does."""
    stream, show = tmp_path / "stream.txt", tmp_path / "show.txt"
    stream.write_text("".join(line + "\n" for line in lines))
    show.unlink(missing_ok=True)
    if stored is not None:
        show.write_text("".join(line + "\n" for line in stored))
    exe = tmp_path / "flwr"
    exe.write_text(f"#!{sys.executable}\nimport os, sys\n"
                   f"if sys.argv[1] == 'log':\n"
                   f"    assert sys.argv[2:] == ['1657', {flower.CONNECTION!r}, '--show'], sys.argv\n"
                   f"    if not os.path.exists({str(show)!r}): sys.exit(1)\n"
                   f"    sys.stdout.write(open({str(show)!r}).read()); sys.exit(0)\n"
                   f"sys.stdout.write(open({str(stream)!r}).read())\nsys.exit({code})\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(flower, "flower_exe", lambda name: str(exe))
    monkeypatch.setattr(flower, "END_LINE_RETRIES_S", (0.0, 0.0))
    ca = tmp_path / "ca.crt"
    ca.write_text("not read by the stand-in\n")
    return ca


START = ["🎊 Successfully started run 1657", "INFO :      Starting logstream for run_id `1657`",
         "2026-12-01 03:55:49,103 INFO veil.server: run 1: server optimiser fedavg"]


def test_a_stream_that_ends_before_the_run_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca = _fake_flwr(tmp_path, monkeypatch, [*START, "INFO :      Task stopped by user."])
    seen: list[str] = []
    with pytest.raises(DeployError, match="log stream ended before the run did") as err:
        flower.submit("{}", "127.0.0.1:1", ca, seen.append, timeout=60)
    assert "veil runs --store" in str(err.value)
    assert seen[-1] == "INFO :      Task stopped by user."  # the log was still shown as it came


def test_the_run_end_line_decides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca = _fake_flwr(tmp_path, monkeypatch, [*START, f"INFO veil.server: {RUN_END_MARK} run 1 completed"])
    assert flower.submit("{}", "127.0.0.1:1", ca, lambda _: None, timeout=60) == 0

    ca = _fake_flwr(tmp_path, monkeypatch, [*START, f"ERROR veil.server: {RUN_END_MARK} run 1 failed: b: boom"])
    with pytest.raises(RunFailedError, match="run 1 failed: b: boom"):
        flower.submit("{}", "127.0.0.1:1", ca, lambda _: None, timeout=60)


def test_a_failing_stream_keeps_its_exit_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca = _fake_flwr(tmp_path, monkeypatch, [*START, "connection refused"], code=1)
    assert flower.submit("{}", "127.0.0.1:1", ca, lambda _: None, timeout=60) == 1


def test_a_last_line_that_came_after_the_stream_ended_is_read_from_the_stored_log(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Flower ends the stream once the run is finished, which can precede the ServerApp's last upload
    end = f"INFO veil.server: {RUN_END_MARK} run 1 completed"
    ca = _fake_flwr(tmp_path, monkeypatch, START, stored=[*START[2:], end])
    seen: list[str] = []
    assert flower.submit("{}", "127.0.0.1:1", ca, seen.append, timeout=60) == 0
    assert seen[-1] == end  # shown, so the person sees how the run ended

    failed = f"ERROR veil.server: {RUN_END_MARK} run 1 failed: b: boom"
    ca = _fake_flwr(tmp_path, monkeypatch, START, stored=[*START[2:], failed])
    with pytest.raises(RunFailedError, match="run 1 failed: b: boom"):
        flower.submit("{}", "127.0.0.1:1", ca, lambda _: None, timeout=60)

    # stored, but still without its last line: the outcome stays unknown here
    ca = _fake_flwr(tmp_path, monkeypatch, START, stored=START[2:])
    with pytest.raises(DeployError, match="log stream ended before the run did"):
        flower.submit("{}", "127.0.0.1:1", ca, lambda _: None, timeout=60)
