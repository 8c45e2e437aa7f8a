"""Write-ahead: SIGKILL a training site at random moments, many times; the ledger must
never show less than what the site released. (A crash may over-count, never under-count.)

After every kill the ledger's journal files (``-journal``, and ``-wal``/``-shm`` should an
older Veil have left any) are deleted, as a careless administrator or a backup of the
``.ledger`` file alone would: a committed charge lives in the main file, so nothing released
may go missing."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from privacy import DpSgdEvent, epsilon
from privacy.ledger import SiteLedger

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
    released_total, charged_total = 0, 0
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
            for suffix in ("-journal", "-wal", "-shm"):
                Path(f"{ledger_path}{suffix}").unlink(missing_ok=True)

            with SiteLedger(ledger_path, create=False) as ledger:  # re-verifies the whole chain
                entries = {e.entry_id: e for e in ledger.entries()}
            for rel in _released(release):
                entry = entries.get(str(rel["entry"]))
                assert entry is not None, f"kill {i}: released update {rel['entry']} is not in the ledger"
                assert entry.event == DpSgdEvent(float(rel["sigma"]), float(rel["q"]), int(rel["steps"]),
                                                 float(rel["clip"]))
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
    print(f"{KILLS} kills: {charged_total} charges on the ledger, {released_total} releases")


def _wait_gone(pid: int) -> None:
    for _ in range(500):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} survived SIGKILL")
