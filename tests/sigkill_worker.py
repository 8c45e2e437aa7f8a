"""Zygote for the write-ahead test: imports once, then forks site processes on request.

argv:   a scratch ledger path for the warm-up round
stdin:  ``fork <ledger> <release-file> <seed>`` per line
stdout: the child's pid per request

Each child is one site training round after round through the real ClientApp. After a
round's reply is built it "releases" the update: one line appended (a single ``write``)
to the release file with the ledger entry and the mechanism. The test SIGKILLs children at
random moments and checks the ledger against what was released.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import opacus  # noqa: F401  (preloaded so children start fast)
from dp_accounting.pld import privacy_loss_distribution  # noqa: F401

from privacy.policy import SitePolicy
from tests.sitekit import SiteDriver, make_site, task
from veil import protocol as P


def child(ledger: str, release_file: str, seed: int) -> None:
    import torch

    torch.set_num_threads(1)
    driver = SiteDriver(make_site(Path(ledger), SitePolicy(epsilon_cap=None), n=90))
    fd = os.open(release_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    t = task(batch_size=30, planned_rounds=1000, run_ref=f"kill-{seed}")
    for server_round in range(1, 1_000_000):
        content = driver.train(t, server_round)
        report = P.PrivacyReport.from_config(content[P.PRIVACY])  # type: ignore[arg-type]
        assert report.lifetime is not None
        ev = report.event
        line = json.dumps({"entry": report.lifetime.entry_id, "sigma": ev.noise_multiplier,
                           "q": ev.sample_rate, "steps": ev.steps, "clip": ev.max_grad_norm})
        os.write(fd, (line + "\n").encode())  # the update leaves the site here


def _warm_up(scratch: str) -> None:
    """One throwaway round, so children skip first-use costs (one thread: fork-safe)."""
    import torch

    torch.set_num_threads(1)
    driver = SiteDriver(make_site(Path(scratch), SitePolicy(epsilon_cap=None), n=90))
    driver.train(task(batch_size=30, planned_rounds=1000, run_ref="warm-up"), 1)


def main() -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped automatically
    _warm_up(sys.argv[1])
    print("ready", flush=True)
    for line in sys.stdin:
        _, ledger, release_file, seed = line.split()
        pid = os.fork()
        if pid == 0:
            try:
                child(ledger, release_file, int(seed))
            finally:
                os._exit(1)
        print(pid, flush=True)


if __name__ == "__main__":
    main()
