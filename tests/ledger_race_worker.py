"""Zygote for the concurrent-creation test: imports once, then per request forks two site
processes that open the *same, not yet existing* ledger at the same instant and charge it.

stdin:  ``race <ledger-path> <results-dir>`` per line
stdout: ``done`` once both children have exited

Each child writes ``charged <entry_id>`` or ``error <message>`` to ``<results-dir>/<k>``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from dp_accounting import rdp  # noqa: F401  (preloaded so children start fast)

from privacy import DpSgdEvent
from privacy.ledger import BudgetExceeded, SiteLedger, fingerprint_arrays

FP = fingerprint_arrays(np.arange(50))
EVENT = DpSgdEvent(1.0, 0.05, 20, 1.0)


def child(ledger: str, result: Path, gate: int) -> None:
    os.read(gate, 1)  # both children wait here until the parent opens the gate
    try:
        with SiteLedger(ledger, site_id="site-race") as led:
            charge = led.charge(FP, EVENT, delta=1e-5, cap=None, accountant="rdp")
        line = "error refused" if isinstance(charge, BudgetExceeded) else f"charged {charge.entry_id}"
    except Exception as err:  # the test reports any failure, so record it instead of dying silently
        line = f"error {type(err).__name__}: {err}"
    result.write_text(line)


def main() -> None:
    print("ready", flush=True)
    for line in sys.stdin:
        _, ledger, results = line.split()
        gate_r, gate_w = os.pipe()
        pids = []
        for k in range(2):
            pid = os.fork()
            if pid == 0:
                os.close(gate_w)
                try:
                    child(ledger, Path(results) / str(k), gate_r)
                finally:
                    os._exit(0)
            pids.append(pid)
        os.close(gate_r)
        os.close(gate_w)  # EOF for both children at once
        for pid in pids:
            os.waitpid(pid, 0)
        print("done", flush=True)


if __name__ == "__main__":
    main()
