"""``veil coordinator``: the Flower SuperLink with TLS and node authentication, and site registration."""

from __future__ import annotations

import json
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from veil import env as veil_env
from veil.cli.common import StoreOpt, errors
from veil.cli.sites import coordinator_sites
from veil.errors import VeilError

app = typer.Typer(no_args_is_help=True, help="Run the coordinator (Flower SuperLink + run store).")


@app.command("start")
def coordinator_start(
    certs: Annotated[Path, typer.Option("--certs", help="directory from `veil certs create`")],
    store: StoreOpt = None,
    host: Annotated[str, typer.Option(help="address to listen on (0.0.0.0 for all interfaces)")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="the SuperLink's port (sites, registration and runs)")] = 8000,
    state: Annotated[Path, typer.Option(help="the SuperLink's own state (registered nodes, runs)")] = Path(
        "veil-coordinator/superlink.db"),
    coordinator_key: Annotated[Path | None, typer.Option(
        help="a key set's coordinator.ckks for CKKS runs (a secret key is refused)")] = None,
    artifacts_dir: Annotated[Path, typer.Option(help="where checkpoints are written")] = Path("veil-artifacts"),
    researchers: Annotated[Path | None, typer.Option(
        help="directory of researcher public keys (NAME.pub): only runs they sign are admitted")] = None,
) -> None:
    """A Flower SuperLink with TLS and SuperNode authentication; runs are recorded in --store and
    admitted only when signed by a researcher in --researchers."""
    from server.store import RunStore
    from server.store.store import resolve_store_url
    from veil.cli.flower import superlink_command
    from veil.processes import SUPEREXEC_POLL_ENV, pinned_path, supervise

    with errors():
        if researchers is None:
            raise VeilError("--researchers DIR is required: the public keys (NAME.pub, from `veil certs "
                            "researcher-key NAME`) of the researchers whose signed runs this coordinator admits")
        from privacy.requests import load_researchers

        admitted = load_researchers([researchers])  # a bad key fails before the store is touched
        url = resolve_store_url(store)
        run_store = RunStore(url)  # creates or migrates it now: a bad URL fails before anything listens
        safe = run_store.safe_url
        from server.lifecycle import close_orphans

        for run_id in close_orphans(run_store, "coordinator restarted"):  # an earlier coordinator's runs
            typer.echo(f"run {run_id} was left running by a process that has ended: recorded as failed")
        run_store.close()
        if coordinator_key is not None:
            from privacy.ckks import CoordinatorContext

            ctx = CoordinatorContext.load(coordinator_key)
            typer.echo(f"CKKS: key set {ctx.key_id}, parameters only (no secret key)")
        typer.echo("admits runs signed by " + ", ".join(r.label() for r in admitted.values()))
        state.parent.mkdir(parents=True, exist_ok=True)
        from veil.processes import start_reaper

        start_reaper()  # a SIGKILLed coordinator takes its SuperLink and ServerApps with it
        cmd = superlink_command(certs, host=host, port=port, state=state)
        runners = tempfile.TemporaryDirectory(prefix="veil-coordinator-bin-")  # runs its own Veil only
        env = {SUPEREXEC_POLL_ENV: "0.2", **os.environ, "PATH": pinned_path(Path(runners.name)),
               "FLWR_HOME": str(state.parent.resolve() / "flwr"),
               **veil_env.coordinator_env(url, artifacts_dir.resolve(),
                                          coordinator_key.resolve() if coordinator_key else None,
                                          researchers.resolve())}
        typer.echo(f"coordinator on {host}:{port} (TLS, SuperNode authentication), run store {safe}")

        def event(name: str, **kw: Any) -> None:  # JSON lines from here on: the SuperLink's and ServerApps' too
            typer.echo(json.dumps({"ts": datetime.now(UTC).isoformat(timespec="milliseconds"),
                                   "event": f"superlink-{name}", **kw}))

        with runners:
            code = supervise(cmd, env, event, capture=True)
    raise typer.Exit(code)


@app.command("register")
def coordinator_register(
    public_key: Annotated[Path, typer.Argument(help="the site's NAME.node-key.pub")],
    coordinator: Annotated[str, typer.Option(help="the SuperLink as HOST:PORT")] = "127.0.0.1:8000",
    ca: Annotated[Path, typer.Option(help="the federation's ca.crt")] = Path("certs/ca.crt"),
    name: Annotated[str | None, typer.Option(
        help="the site's name (its site_id) [default: the key's comment, else its file name]")] = None,
    store: StoreOpt = None,
) -> None:
    """Register a site's public node key with the SuperLink (SuperNodes with unregistered keys are
    refused) and record the site in the run store: its name, node id and key fingerprint
    (`veil coordinator sites` lists them). A key, or a name, is registered once."""
    from contextlib import suppress

    from server.site_registry import check_new, record
    from server.store import RunStore
    from veil.cli.flower import register_node, unregister_node
    from veil.cli.pki import read_node_public_key, registered_name
    from veil.errors import DeployError

    with errors():
        key = read_node_public_key(public_key)
        site = registered_name(public_key, key, name)
        run_store = RunStore(store)  # creates or migrates it: a bad URL fails before the SuperLink is asked
        try:
            check_new(run_store, site, key.fingerprint)  # a known key or a taken name: nothing is changed
            node = register_node(public_key, coordinator, ca, site)
            try:
                record(run_store, site, node, key.fingerprint)
            except VeilError as err:  # undo the SuperLink's half, so a retry starts from nothing
                undone = False
                with suppress(DeployError):
                    unregister_node(node, coordinator, ca)
                    undone = True
                if not undone:
                    raise VeilError(f"{err}; node {node} stays registered at the SuperLink: remove it with "
                                    f"`flwr supernode unregister {node}` before trying again") from None
                raise
            safe = run_store.safe_url
        finally:
            run_store.close()
    typer.echo(f"registered site {site} (key {key.fingerprint}) as node {node}; recorded in {safe}")


app.command("sites")(coordinator_sites)
