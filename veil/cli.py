"""The ``veil`` command line."""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Literal

import typer

from veil.errors import VeilError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Veil: private federated training with a record of everything.")
db_app = typer.Typer(no_args_is_help=True, help="Manage the run store's schema.")
app.add_typer(db_app, name="db")

StoreOpt = Annotated[str | None, typer.Option("--store", help="SQLAlchemy URL of the run store "
                                              "[env VEIL_STORE; default sqlite:///veil.db]")]


def _quiet_third_parties(verbose: bool) -> None:
    """Veil prints its own per-round progress; Flower's round log is shown with --verbose.

    Opacus attaches a root handler when imported, so flwr's records would print twice;
    flwr keeps its own handler and stops propagating.
    """
    import flwr.simulation  # noqa: F401  (importing Flower resets its logger: import first)
    import opacus  # noqa: F401

    flwr_logger = logging.getLogger("flwr")
    flwr_logger.propagate = False
    flwr_logger.setLevel(logging.INFO if verbose else logging.WARNING)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.getLogger("absl").setLevel(logging.ERROR)


@app.command()
def simulate(
    scenario: Annotated[Path | None, typer.Argument(help="scenario YAML (default: the built-in one)")] = None,
    sites: Annotated[int | None, typer.Option(help="override federation.sites")] = None,
    rounds: Annotated[int | None, typer.Option(help="override federation.rounds")] = None,
    seed: Annotated[int | None, typer.Option(help="override seed")] = None,
    device: Annotated[str | None, typer.Option(help="override device: auto | cpu | cuda")] = None,
    store: StoreOpt = None,
    artifacts_dir: Annotated[Path, typer.Option(help="where checkpoints are written")] = Path("veil-artifacts"),
    output: Annotated[Literal["text", "json"], typer.Option("--format", help="summary format")] = "text",
    verbose: Annotated[bool, typer.Option(help="show Flower's own round log")] = False,
) -> None:
    """Run a simulated private federation and record it in the run store."""
    from veil import logs
    from veil.spec import load_scenario

    logs.configure()
    _quiet_third_parties(verbose)
    try:
        spec = load_scenario(scenario).with_overrides(
            **{"federation.sites": sites, "federation.rounds": rounds, "seed": seed, "device": device}
        )
        if spec.federation.min_sites > spec.federation.sites:  # after --sites shrinks it
            spec = spec.with_overrides(**{"federation.min_sites": spec.federation.sites})
        from server.store import RunStore
        from server.summary import format_summary, load_summary
        from simulations.simulate import simulate as run_sim

        run_store = RunStore(store)
        result = run_sim(spec, run_store, artifacts_dir, progress=output == "text")
        summary = load_summary(run_store, result.run_id)
    except VeilError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(err.exit_code) from None
    if output == "json":
        typer.echo(json.dumps(asdict(summary), indent=2, default=str))
    else:
        typer.echo("")
        typer.echo(format_summary(summary))
        typer.echo(f"\nrecorded in {run_store.url}")


@db_app.command("upgrade")
def db_upgrade(store: StoreOpt = None) -> None:
    """Create or migrate the run store's schema to this Veil's version."""
    from server.store import RunStore

    try:
        s = RunStore(store)
    except VeilError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(err.exit_code) from None
    typer.echo(f"store {s.url} is at the current schema")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
