"""Pieces every command shares: options, the error handler, JSON and summary output."""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer

from veil.errors import StoreError, VeilError

if TYPE_CHECKING:
    from privacy.ckks import SecretKey
    from server.read.summary import RunSummary
    from server.store import RunStore

StoreOpt = Annotated[str | None, typer.Option("--store", help="SQLAlchemy URL of the run store "
                                              "[env VEIL_STORE; default sqlite:///veil.db]")]
FormatOpt = Annotated[Literal["text", "json"], typer.Option("--format", help="text (tables) or json")]
KeyOpt = Annotated[Path | None, typer.Option("--key", help="a key set's secret.ckks: decrypts encrypted "
                                             "evaluation metrics (they stay encrypted without it)")]
RunArg = Annotated[int, typer.Argument(help="run id (see `veil runs`)")]


TERMINATED: list[int] = []  # set when SIGTERM ended the command (veil.cli.main exits 143, not 130)


def end_on_signals() -> None:
    """Ctrl-C and SIGTERM (``veil runs stop``, ``docker stop``, systemd) end the command alike: the
    run it records is closed, its processes are stopped, it exits within seconds. Flower's and
    Ray's loggers go quiet first: their threads would print the tracebacks of actors that the
    same signal is ending."""
    import signal

    # Ray's driver otherwise installs absl's failure handler for SIGTERM, which replaces this one
    # and aborts the process (exit -6); read when Ray is imported, so set before that
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")

    def handler(signum: int, _frame: object) -> None:
        for name in ("flwr", "ray"):
            logging.getLogger(name).disabled = True
        if signum == signal.SIGTERM:
            TERMINATED.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    try:  # ray.init replaces SIGTERM's handler with sys.exit(15) (ray._private.worker.connect), and the
        # interpreter's shutdown then waits minutes for Flower's server thread: keep ours
        import ray._private.utils as ray_utils

        ray_utils.set_sigterm_handler = lambda _handler: None
    except (ImportError, AttributeError):  # no Ray here (no simulation engine), or Ray changed
        pass


def quiet_third_parties(verbose: bool) -> None:
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


def echo_summary(summary: RunSummary, output: str, url: str) -> None:
    """A run's summary as tables (text) or JSON, then where it is recorded."""
    from veil.cli.render import console, draw_summary

    if output == "json":
        echo_json(summary_json(summary))
    else:
        con = console()
        con.print()
        draw_summary(con, summary)
        con.print(f"\nrecorded in {url}", markup=False)


def summary_json(summary: RunSummary) -> dict[str, Any]:
    """The summary as JSON-ready data, with the derived totals and whether the run was private
    (``no_dp``: trained without DP, as ``veil runs`` and ``veil compare`` name it; ``not_private``:
    that, or DP noise reproducible from the seed)."""
    return asdict(summary) | {
        "no_dp": summary.without_dp, "not_private": summary.not_private, "privacy_note": summary.privacy_note,
        "max_epsilon": summary.max_epsilon, "bytes_moved": summary.bytes_moved, "examples": summary.examples,
        "sites": [asdict(site) | {"remaining": site.remaining} for site in summary.sites]}


def echo_json(value: Any) -> None:
    """Print ``value`` as indented, valid JSON (dates and paths as strings, NaN and ±inf as "NaN",
    "Infinity", "-Infinity"; control characters in strings escaped by JSON itself)."""
    from server.read.stored import json_safe

    typer.echo(json.dumps(json_safe(value), indent=2, default=str, allow_nan=False))


@contextmanager
def errors() -> Iterator[None]:
    """Veil's errors as one line and an exit code; a database error too, with the likely fix."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield
    except VeilError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(int(err.exit_code)) from None
    except SQLAlchemyError as err:
        why = " ".join(str(getattr(err, "orig", None) or err).split())[:300]
        typer.echo(f"error: the store query failed ({why}); if the store is from another Veil version, "
                   "run: veil db upgrade --store URL", err=True)
        raise typer.Exit(int(StoreError.exit_code)) from None


def open_with_key(store: str | None, key: Path | None) -> tuple[RunStore, SecretKey | None]:
    """The run store (it must exist) and, with ``--key``, the secret key that reads encrypted metrics."""
    from privacy.ckks import SecretKey
    from server.read.dashboard import open_store

    secret = SecretKey.load(key) if key is not None else None
    return open_store(store), secret


def run_summary(run_store: RunStore, run: int, secret: SecretKey | None) -> RunSummary:
    """One run's summary from a store that has runs (a clear error otherwise)."""
    from server.read.dashboard import require_runs
    from server.read.summary import load_summary

    require_runs(run_store)
    return load_summary(run_store, run, secret)

