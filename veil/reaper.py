"""The watchdog ``veil.processes.start_reaper`` starts: ``python -m veil.reaper PARENT_PID``.

It keeps a list of every process below its parent (polling the process table twice a
second) and waits for its stdin, a pipe from the parent, to close: that happens however the
parent ends, SIGKILL included. Then it stops what is left of that list (SIGTERM, SIGKILL
after 3 s), so a killed ``veil simulate`` leaves no Ray processes behind. It runs in its own
session, so the Ctrl-C meant for the parent does not reach it. Only processes it saw below
the parent, with the same start token, are signalled: never a reused pid.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time
from contextlib import suppress

from veil.processes import descendants, process_table

POLL_S = 0.5
GRACE_S = 3.0


def _watch(parent: int) -> dict[int, str]:
    seen: dict[int, str] = {}
    me = os.getpid()
    while True:
        table = process_table()
        for root in [parent, *seen]:
            for pid in descendants(root, table):
                if pid != me:
                    seen.setdefault(pid, table[pid][1])
        seen = {pid: tok for pid, tok in seen.items() if table.get(pid, (0, None))[1] == tok}
        ready, _, _ = select.select([sys.stdin], [], [], POLL_S)
        if ready and not os.read(sys.stdin.fileno(), 4096):  # EOF: the parent is gone
            return seen


def _stop(seen: dict[int, str]) -> None:
    table = process_table()
    for root in list(seen):  # what the dying processes started meanwhile
        for pid in descendants(root, table):
            if pid != os.getpid():
                seen.setdefault(pid, table[pid][1])
    for sig, wait in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, 0.0)):
        table = process_table()
        alive = [pid for pid, tok in seen.items() if table.get(pid, (0, None))[1] == tok]
        for pid in alive:
            with suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while alive and time.monotonic() < deadline:
            time.sleep(0.1)
            table = process_table()
            alive = [pid for pid in alive if table.get(pid, (0, None))[1] == seen[pid]]
        if not alive:
            return


def main() -> None:
    """Watch the parent named on the command line; stop its leftovers when it is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _stop(_watch(int(sys.argv[1])))


if __name__ == "__main__":
    main()
