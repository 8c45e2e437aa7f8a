"""The dashboard: ``veil runs [show]``, ``compare``, ``metrics``, ``report``, ``export``."""

from __future__ import annotations

import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Literal

import typer

from veil.cli.common import (
    FormatOpt,
    KeyOpt,
    RunArg,
    StoreOpt,
    echo_json,
    echo_summary,
    errors,
    open_with_key,
    run_summary,
)
from veil.errors import VeilError

app = typer.Typer(help="Recorded runs, newest first; `veil runs show RUN` for one.")


@app.callback(invoke_without_command=True)
def runs_list(
    ctx: typer.Context,
    store: StoreOpt = None,
    status: Annotated[str | None, typer.Option(
        help="only runs with this status: running, completed, failed, refused, stopped")] = None,
    name: Annotated[str | None, typer.Option(help="only runs whose name contains this (any case)")] = None,
    since: Annotated[str | None, typer.Option(help="created on or after: YYYY-MM-DD or ISO time (UTC)")] = None,
    until: Annotated[str | None, typer.Option(help="created on or before: YYYY-MM-DD or ISO time")] = None,
    limit: Annotated[int, typer.Option(min=0, help="at most this many runs (0: all)")] = 50,
    output: FormatOpt = "text",
) -> None:
    """Recorded runs, newest first (`veil runs show RUN` for one run)."""
    if ctx.invoked_subcommand is not None:
        return
    from server.read.dashboard import RUN_STATUSES, list_runs, open_store, parse_when, require_runs
    from veil.cli.render import console, draw_runs

    if status is not None and status not in RUN_STATUSES:
        raise typer.BadParameter(f"{status!r} is not a run status; use one of {', '.join(RUN_STATUSES)}",
                                 param_hint="--status")
    try:
        start = parse_when(since) if since else None
        end = parse_when(until, end=True) if until else None
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--since/--until") from None
    with errors():
        run_store = open_store(store)
        require_runs(run_store)
        from server.lifecycle import close_orphans_quietly

        close_orphans_quietly(run_store)  # runs whose process died are shown as what they are: failed
        rows = list_runs(run_store, status=status, name=name, since=start, until=end, limit=limit)
    if output == "json":
        echo_json([asdict(r) for r in rows])
    elif not rows:
        typer.echo("no runs match these filters")
    else:
        draw_runs(console(), rows)


@app.command("show")
def runs_show(
    run: RunArg,
    store: StoreOpt = None,
    key: KeyOpt = None,
    output: FormatOpt = "text",
) -> None:
    """One run: spec, rounds, sites, participation, privacy spend and artifacts."""
    with errors():
        run_store, secret = open_with_key(store, key)
        summary = run_summary(run_store, run, secret)
    echo_summary(summary, output, run_store.safe_url)


@app.command("stop")
def runs_stop(
    run: RunArg,
    store: StoreOpt = None,
    reason: Annotated[str, typer.Option(help="why, recorded with the run")] = "stopped on request",
    coordinator: Annotated[str | None, typer.Option(
        help="a deployed run: the SuperLink as HOST:PORT, asked to stop Flower's run")] = None,
    ca: Annotated[Path, typer.Option(help="the federation's ca.crt (with --coordinator)")] = Path("certs/ca.crt"),
) -> None:
    """Stop a running run and record it `stopped` with the reason: a deployed run through Flower
    (--coordinator), a simulation by signalling its `veil simulate` process on this host."""
    import os
    import signal

    from server.lifecycle import mark_stopped
    from server.read.dashboard import open_store
    from veil.cli.render import clean
    from veil.processes import owner_alive

    with errors():
        run_store = open_store(store)
        row = run_store.get_run(run)
        if row.status != "running":
            raise VeilError(f"run {run} is {clean(row.status, 24)}, not running: nothing to stop")
        if row.mode == "deployment" and coordinator is None:
            raise VeilError(f"run {run} is a deployment: add --coordinator HOST:PORT (and --ca) so Flower "
                            "stops it at the coordinator")
        if coordinator is not None and not row.flower_run_id:
            raise VeilError(f"run {run} has no Flower run id recorded; stop it with `flwr stop` and try again")
        alive = owner_alive(row.owner_host, row.owner_pid, row.owner_token)
        if coordinator is None and alive is not True:
            raise VeilError(f"run {run}'s process (pid {row.owner_pid} on {clean(row.owner_host, 80)}) is not "
                            "running on this machine; `veil runs` closes a run whose process has ended")
        if not mark_stopped(run_store, run, f"stopped: {reason}"):
            raise VeilError(f"run {run} ended meanwhile: nothing to stop")
        if coordinator is not None:
            from veil.cli.flower import stop_flower_run

            assert row.flower_run_id is not None
            stop_flower_run(row.flower_run_id, coordinator, ca)
        else:
            assert row.owner_pid is not None
            os.kill(row.owner_pid, signal.SIGTERM)  # veil simulate ends at once; its reaper stops Ray
    typer.echo(f"run {run} stopped: {reason}")


def compare(
    runs: Annotated[list[int], typer.Argument(help="two or more run ids")],
    store: StoreOpt = None,
    key: KeyOpt = None,
    output: FormatOpt = "text",
) -> None:
    """Runs side by side: final metrics, worst-case ε, rounds, wall time, bytes moved."""
    from server.read.dashboard import compare_row
    from veil.cli.render import console, draw_compare

    if len(runs) < 2:
        raise typer.BadParameter("give at least two run ids, e.g. veil compare 3 4", param_hint="RUNS")
    with errors():
        run_store, secret = open_with_key(store, key)
        rows = [compare_row(run_summary(run_store, r, secret)) for r in runs]
    if output == "json":
        echo_json([asdict(r) for r in rows])
    else:
        draw_compare(console(), rows)


def metrics(
    run: RunArg,
    metric: Annotated[str, typer.Option(help="accuracy | loss | train-loss | epsilon (ε per site)")] = "accuracy",
    plot: Annotated[bool, typer.Option("--plot", help="draw the metric per round in the terminal")] = False,
    png: Annotated[Path | None, typer.Option("--png", help="write accuracy, loss and ε per site per round "
                                             "to this PNG file")] = None,
    store: StoreOpt = None,
    key: KeyOpt = None,
    output: FormatOpt = "text",
) -> None:
    """A run's metrics per round: a table, a terminal plot (--plot), or a PNG (--png FILE)."""
    from server.read.dashboard import METRICS, metric_series
    from veil.cli import plots
    from veil.cli.render import console, draw_series

    if metric not in METRICS:
        raise typer.BadParameter(f"{metric!r} is not a metric; use one of {', '.join(METRICS)}",
                                 param_hint="--metric")
    with errors():
        run_store, secret = open_with_key(store, key)
        series = metric_series(run_store, run, secret, run_summary(run_store, run, secret))
        if png is not None:
            if png.suffix.lower() != ".png":
                raise VeilError(f"--png {png}: the file name must end in .png")
            plots.png(series, png)
    if output == "json":
        echo_json(asdict(series))
    elif plot:
        out = sys.stdout
        tty = out.isatty()
        size = shutil.get_terminal_size((100, 30))
        with errors():
            try:
                text = plots.terminal_plot(series, metric, width=min(size.columns, 120) if tty else 100,
                                           height=max(15, min(size.lines - 4, 30)) if tty else 25, colour=tty)
            except ValueError as err:
                raise VeilError(str(err)) from None
        typer.echo(text)
    else:
        draw_series(console(), series)
    if png is not None and output != "json":
        typer.echo(f"wrote {png}")


def report(
    run: RunArg,
    out: Annotated[Path, typer.Option("--out", help="directory for report.md, report.html and metrics.png")],
    store: StoreOpt = None,
    key: KeyOpt = None,
) -> None:
    """A self-contained privacy report: what was trained, the DP mechanism and accountant, ε/δ per site,
    encryption parameters and plain-language caveats."""
    from server.read.dashboard import accountant_versions, metric_series
    from veil.cli.report import write_report

    with errors():
        run_store, secret = open_with_key(store, key)
        summary = run_summary(run_store, run, secret)
        mechanisms = {site.site: site.mechanism for site in summary.sites if site.mechanism is not None}
        written = write_report(summary, metric_series(run_store, run, secret, summary), out,
                               accountant_versions(run_store, run), mechanisms)
    for path in written:
        typer.echo(f"wrote {path}")


def export(
    run: RunArg,
    fmt: Annotated[Literal["csv", "json", "parquet"], typer.Option("--format", help="csv | json | parquet")],
    out: Annotated[Path | None, typer.Option("--out", help="json: a file (default: print); csv, parquet: a "
                                             "directory, one file per table (default run-N-export/)")] = None,
    store: StoreOpt = None,
    key: KeyOpt = None,
) -> None:
    """Export a run's tables (run, rounds, sites, participation, privacy events, metrics); never keys
    or ciphertexts."""
    from server.read.dashboard import export_tables, write_export

    with errors():
        run_store, secret = open_with_key(store, key)
        run_summary(run_store, run, None)  # a missing run fails before anything is written
        tables = export_tables(run_store, run, secret)
        if fmt == "json" and out is None:
            echo_json(tables)
            return
        written = write_export(tables, fmt, out or Path(f"run-{run}-export"))
    for path in written:
        typer.echo(f"wrote {path}")
