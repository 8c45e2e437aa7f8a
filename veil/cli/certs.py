"""``veil certs``: a private CA, the coordinator's TLS certificate, site node keys and researcher keys."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from veil.cli.common import errors
from veil.errors import CertError

app = typer.Typer(no_args_is_help=True, help="TLS certificates and SuperNode keys for a deployment.")


@app.command("create")
def certs_create(
    directory: Annotated[Path, typer.Argument(help="new directory for ca.crt/ca.key/server.crt/server.key")],
    host: Annotated[list[str], typer.Option("--host", help="a host name or IP the sites dial (repeatable)")],
    days: Annotated[int, typer.Option(help="validity in days")] = 365,
) -> None:
    """A private CA and the coordinator's TLS certificate. Sites get ca.crt only."""
    from veil.cli.pki import create_certs

    with errors():
        made = create_certs(directory, host, days=days)
    typer.echo(f"CA {made.ca_cert} (give to every site) and key {made.ca_key} (mode 600: keep offline)")
    typer.echo(f"coordinator certificate {made.server_cert} for {', '.join(host)}, "
               f"key {made.server_key} (mode 600)")


@app.command("node-key")
def certs_node_key(
    target: Annotated[Path | None, typer.Argument(
        help="with --site: the directory the key pair goes in (default: here); without: the private key's "
             "path (older form)", show_default=False)] = None,
    site: Annotated[str | None, typer.Option(
        "--site", help="the site's name (its site_id): writes NAME.node-key and NAME.node-key.pub")] = None,
) -> None:
    """A site's SuperNode key pair (ECDSA P-384, OpenSSH), named after the site: `--site hospital-a DIR`
    writes DIR/hospital-a.node-key (mode 600, stays at the site) and DIR/hospital-a.node-key.pub (its
    comment names the site), which the coordinator registers."""
    from veil.cli.pki import create_node_key, create_site_node_key

    with errors():
        if site is not None:
            private, public = create_site_node_key(target if target is not None else Path("."), site)
        elif target is not None:
            private, public = target, create_node_key(target)
        else:
            raise CertError("name the site: `veil certs node-key --site NAME [DIR]` writes DIR/NAME.node-key "
                            "and DIR/NAME.node-key.pub")
    typer.echo(f"private key {private} (mode 600: stays at the site); public key {public}: send it to the "
               f"coordinator, who runs `veil coordinator register {public.name} --store URL ...`")
    if site is None:
        typer.echo(f"note: {public.name} does not name its site; register it with --name SITE_ID, or make "
                   "keys named after the site with `veil certs node-key --site NAME [DIR]`")


@app.command("researcher-key")
def certs_researcher_key(
    path: Annotated[Path, typer.Argument(help="where the researcher's private key goes (NAME; NAME.pub is the "
                                         "public key)")],
) -> None:
    """A researcher's signing key pair (Ed25519). Coordinators and sites are given NAME.pub; runs are
    signed with NAME (`veil run --key NAME`)."""
    from privacy.requests import create_researcher_key, load_researcher

    with errors():
        public = create_researcher_key(path)
        who = load_researcher(public)
    typer.echo(f"private key {path} (mode 600: stays with the researcher); public key {public} (key id "
               f"{who.key_id}): give it to the coordinator (--researchers DIR) and to every site that trusts "
               "you (site.yaml policy.trusted_researchers)")
