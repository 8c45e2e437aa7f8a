"""Write-ahead: SIGKILL a training site at random moments, many times; the ledger must
never show less than what the site released. (A crash may over-count, never under-count.)

The ledger never uses a write-ahead log: after every kill there is no ``-wal`` file, and when
the kill left no rollback journal (it landed between transactions) a copy of the ``.ledger`` file
alone, as a backup of that one file would take, holds every released charge. When the kill tore
a transaction, its hot ``-journal`` stays beside the file and the next open rolls the torn write
back. (Deleting a hot journal is how an SQLite file is corrupted, sqlite.org/howtocorrupt.html,
"Deleting a hot journal"; the ledger then refuses to open, tests/test_ledger.py, and is never reset.)"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from privacy import DpSgdEvent, epsilon
from privacy.ledger import Entry, SiteLedger

KILLS = 20


def _released(path: Path) -> list[dict[str, float | str]]:
    if not path.exists():
        return []
    text = path.read_text()
    complete = text[: text.rfind("\n") + 1]  # a torn last line was never fully released
    return [json.loads(line) for line in complete.splitlines()]


@pytest.mark.slow  # a SIGKILL harness: 20 kills of a training process
def test_sigkill_never_loses_a_released_charge(tmp_path: Path) -> None:
    ledger_path = tmp_path / "site.ledger"
    worker = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("sigkill_worker.py")), str(tmp_path / "warm.ledger")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert worker.stdin is not None and worker.stdout is not None
    assert worker.stdout.readline().strip() == "ready"
    rng = random.Random(1234)
    released_total, charged_total, torn, copied = 0, 0, 0, 0
    try:
        for i in range(KILLS):
            release = tmp_path / f"release-{i}.jsonl"
            worker.stdin.write(f"fork {ledger_path} {release} {i}\n")
            worker.stdin.flush()
            pid = int(worker.stdout.readline())
            # random moment: before the first charge, mid-training, mid-commit, after a release
            time.sleep(rng.uniform(0.0, 1.2))
            os.kill(pid, signal.SIGKILL)
            _wait_gone(pid)
            assert not any(Path(f"{ledger_path}{suffix}").exists() for suffix in ("-wal", "-shm"))
            if Path(f"{ledger_path}-journal").exists():
                torn += 1  # mid-commit: the hot journal stays, the open below rolls the torn write back
            else:  # between transactions: the .ledger file alone holds every committed charge
                copy = tmp_path / f"backup-{i}" / "site.ledger"
                copy.parent.mkdir()
                shutil.copyfile(ledger_path, copy)
                with SiteLedger(copy, create=False, readonly=True) as backup:
                    _holds_every_release(backup, release, f"kill {i}, a copy of the .ledger file alone")
                copied += 1

            with SiteLedger(ledger_path, create=False) as ledger:  # re-verifies the whole chain
                entries = _holds_every_release(ledger, release, f"kill {i}")
            released = [DpSgdEvent(float(r["sigma"]), float(r["q"]), int(r["steps"]), float(r["clip"]))
                        for k in range(i + 1) for r in _released(tmp_path / f"release-{k}.jsonl")]
            charged = [e.event for e in entries.values()]
            assert len(charged) >= len(released)
            assert epsilon(charged, 1e-5) >= epsilon(released, 1e-5)
            released_total, charged_total = len(released), len(charged)
    finally:
        worker.kill()
        worker.wait()
    # the test must have exercised real releases, not only kills before the first round
    assert released_total >= 5, f"only {released_total} releases in {KILLS} kills"
    assert copied > 0, "no kill landed between transactions: the copy of the file alone was never checked"
    print(f"{KILLS} kills ({torn} mid-commit, {copied} copied alone): {charged_total} charges on the ledger, "
          f"{released_total} releases")


def _holds_every_release(ledger: SiteLedger, release: Path, where: str) -> dict[str, Entry]:
    entries = {e.entry_id: e for e in ledger.entries()}
    for rel in _released(release):
        entry = entries.get(str(rel["entry"]))
        assert entry is not None, f"{where}: released update {rel['entry']} is not in the ledger"
        assert entry.event == DpSgdEvent(float(rel["sigma"]), float(rel["q"]), int(rel["steps"]),
                                         float(rel["clip"]))
    return entries


def _wait_gone(pid: int) -> None:
    for _ in range(500):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} survived SIGKILL")
