"""The ``veil`` entry point: typer wiring only (each command lives in its own module)."""

from __future__ import annotations

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
    """Run the CLI; Ctrl-C exits 130 with one line."""
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(int(ExitCode.INTERRUPTED))
