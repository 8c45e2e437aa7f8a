"""``veil site``: check, initialise and run this machine as a data-holding site."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from veil.cli.common import FormatOpt, echo_json, errors
from veil.exits import ExitCode

app = typer.Typer(no_args_is_help=True, help="Run this machine as a data-holding site.")


@app.command("check")
def site_check(
    config: Annotated[Path, typer.Option("--config", help="the site's site.yaml")],
    output: FormatOpt = "text",
    offline: Annotated[bool, typer.Option(help="skip the TLS handshake with the coordinator")] = False,
) -> None:
    """Preflight: config, data, key, ledger, device, node key, CA, and a TLS handshake with the
    coordinator (an untrusted certificate fails; a coordinator that is down is a warning)."""
    from client.daemon import load_site_config, preflight, probe_coordinator

    with errors():
        cfg = load_site_config(config)
        checks = preflight(cfg)
        if not offline:
            checks.append(probe_coordinator(cfg.coordinator.address, cfg.coordinator.root_certificates))
    if output == "json":
        echo_json({"site": cfg.site_id, "ok": all(c.ok for c in checks), "checks": [asdict(c) for c in checks]})
    else:
        for c in checks:
            typer.echo(f"{'FAIL' if not c.ok else 'warn' if c.warning else 'ok  '} {c.name:<15} {c.detail}")
    failed = [c for c in checks if not c.ok]
    if failed:  # the last line says what to fix first, whatever the format
        from veil.config import clean

        more = f" (and {len(failed) - 1} more failed check(s) above)" if len(failed) > 1 else ""
        typer.echo(f"error: site check failed: {failed[0].name}: {clean(failed[0].detail)}{more}", err=True)
        raise typer.Exit(int(ExitCode.DATA))


@app.command("init")
def site_init(
    config: Annotated[Path, typer.Option("--config", help="the site's site.yaml")],
    new_ledger: Annotated[bool, typer.Option(
        "--new-ledger", help="replace a pinned ledger that is lost (recorded and shown to the coordinator)",
    )] = False,
    reason: Annotated[str | None, typer.Option(help="why the ledger is replaced (with --new-ledger)")] = None,
) -> None:
    """Create this site's privacy ledger (or adopt the existing one) and pin its id in site.yaml."""
    from client.daemon import init_ledger

    with errors():
        typer.echo(init_ledger(config, new_ledger=new_ledger, reason=reason))


@app.command("start")
def site_start(
    config: Annotated[Path, typer.Option("--config", help="the site's site.yaml")],
) -> None:
    """Preflight, then run a Flower SuperNode for this site until SIGTERM (JSON log lines on stdout)."""
    from client.daemon import run_site

    with errors():
        code = run_site(config)
    raise typer.Exit(code)


@app.command("status")
def site_status(
    config: Annotated[Path, typer.Option("--config", help="the site's site.yaml")],
    output: FormatOpt = "text",
) -> None:
    """Whether this site's daemon is connected to the coordinator, waiting for it, or down, and the
    last round it saw (from the status file `veil site start` keeps next to site.yaml). Exits 0 only
    when connected: usable as a container health check."""
    from client.supervisor import read_status

    status = read_status(config)
    if output == "json":
        echo_json(status)
    else:
        from veil.config import clean

        state = str(status.get("state"))
        typer.echo(f"{clean(str(status.get('site', config)))}: {state}"
                   + (f" since {clean(str(status['since']))}" if status.get("since") and state != "down" else ""))
        if status.get("reason"):
            typer.echo(f"  {clean(str(status['reason']))}")
        if status.get("coordinator"):
            node = f", node {status['node_id']}" if status.get("node_id") is not None else ""
            typer.echo(f"  coordinator {clean(str(status['coordinator']))}{node}; "
                       f"SuperNode restarts: {status.get('restarts', 0)}")
        last = status.get("last_message")
        if isinstance(last, dict):
            typer.echo(f"  last message: run {last.get('run')}, round {last.get('round')}, {last.get('type')}, "
                       f"received {last.get('received')}, replied {last.get('replied') or 'not yet'}")
        worker = status.get("worker")
        if isinstance(worker, dict):
            pid = f", pid {worker['pid']}" if isinstance(worker.get("pid"), int) else ""
            typer.echo(f"  site worker: {clean(str(worker.get('state')))}{pid}; "
                       f"restarts: {worker.get('restarts', 0)}"
                       + (f"; last: {clean(str(worker['last_error']))}" if worker.get("last_error") else ""))
        if status.get("last_error"):
            typer.echo(f"  last error: {clean(str(status['last_error']))}")
        if state == "never-started":
            typer.echo(f"  no status file at {status['status_file']}: start the site with "
                       f"`veil site start --config {config}`")
    if status.get("state") != "connected":
        raise typer.Exit(int(ExitCode.ERROR))
