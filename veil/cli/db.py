"""``veil db``: the run store's schema."""

from __future__ import annotations

import typer

from veil.cli.common import StoreOpt, errors

app = typer.Typer(no_args_is_help=True, help="Manage the run store's schema.")


@app.command("upgrade")
def db_upgrade(store: StoreOpt = None) -> None:
    """Create or migrate the run store's schema to this Veil's version."""
    from server.store import RunStore

    with errors():
        s = RunStore(store)
    typer.echo(f"store {s.url} is at the current schema")
