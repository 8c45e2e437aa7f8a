"""The ``veil`` entry point: typer wiring only (each command lives in its own module)."""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys

import typer

from veil.cli import audit, budget, certs, coordinator, db, keys, run, runs, simulate, site
from veil.exits import ExitCode, table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="Veil: private federated training with a record of everything.",
                  epilog="Exit codes:\n\n" + table().replace("\n", "\n\n"))
app.command()(simulate.simulate)
app.command()(budget.budget)
app.command()(audit.audit)
app.command()(runs.compare)
app.command()(runs.metrics)
app.command()(runs.report)
app.command()(runs.export)
app.command("run")(run.run_remote)
app.add_typer(runs.app, name="runs")
app.add_typer(keys.app, name="keys")
app.add_typer(certs.app, name="certs")
app.add_typer(site.app, name="site")
app.add_typer(coordinator.app, name="coordinator")
app.add_typer(db.app, name="db")


def main() -> None:
    """Run the CLI; Ctrl-C exits 130 with one line, within seconds.

    By the time the interrupt reaches here, a command that records a run has marked it failed
    (``server.lifecycle.record_run``). The exit skips the interpreter's shutdown on purpose: it
    would wait for Flower's server thread, which waits for sites that will never answer (it hung
    2–3 minutes). Processes this one started are stopped by its reaper (``veil.reaper``).

    Any other exit freezes the heap first (``gc.freeze``): the interpreter's shutdown otherwise
    runs full collections over every object torch, Ray, Flower and Opacus made, which took
    1.5–4 s after ``veil simulate`` had finished. Exit handlers still run and streams are still
    flushed; only garbage cycles are left for the operating system to reclaim."""
    try:
        app()
    except KeyboardInterrupt:  # typer turns Ctrl-C into exit 130; an interrupt outside it lands here
        _interrupted()
    except SystemExit as done:
        if done.code == ExitCode.INTERRUPTED:
            _interrupted()
        raise
    finally:
        gc.freeze()


def _interrupted() -> None:
    from veil.cli.common import TERMINATED

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the exit
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    typer.echo("terminated (SIGTERM)" if TERMINATED else "interrupted (Ctrl-C)", err=True)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(ExitCode.TERMINATED if TERMINATED else ExitCode.INTERRUPTED))
