"""``veil run``: submit a scenario to a deployed federation and follow its log."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from veil.cli.common import errors
from veil.errors import ScenarioError, VeilError
from veil.exits import ExitCode


def run_remote(
    scenario: Annotated[Path, typer.Argument(help="scenario YAML (federation.sites = sites to wait for)")],
    coordinator: Annotated[str, typer.Option(help="the SuperLink as HOST:PORT")],
    key: Annotated[Path, typer.Option("--key", envvar="VEIL_RESEARCHER_KEY", help="your researcher private key "
                                      "(`veil certs researcher-key NAME`): the run is signed with it")],
    ca: Annotated[Path, typer.Option(help="the federation's ca.crt")] = Path("certs/ca.crt"),
    timeout: Annotated[float | None, typer.Option(help="stop following after this many seconds")] = None,
) -> None:
    """Sign a scenario with your researcher key, submit it to a deployed federation and follow its log;
    results land in the coordinator's store."""
    from veil.cli.flower import submit
    from veil.spec import load_scenario

    with errors():
        spec = load_scenario(scenario)
        if spec.privacy.reproducible_noise:
            from veil.spec import REPRODUCIBLE_REFUSED

            raise ScenarioError(REPRODUCIBLE_REFUSED)
        if spec.encryption.keys is not None:
            raise VeilError("encryption.keys names a local key directory; in a deployment the coordinator "
                            "holds coordinator.ckks (veil coordinator start --coordinator-key) and each site "
                            "its secret.ckks (site.yaml keys:). Remove encryption.keys")
        from privacy.requests import load_private_key, sign_request

        request = sign_request(spec.model_dump(mode="json"), load_private_key(key))
        typer.echo(f"signed request {request.nonce} with researcher key {request.key_id}")
        code = submit(request.to_json(), coordinator, ca, typer.echo, timeout)
    if code == ExitCode.REQUEST_REFUSED:
        typer.echo("error: the coordinator refused the run request (the reason is in the log above); "
                   "nothing was recorded as a run or charged", err=True)
    elif code != 0:
        typer.echo(f"error: the run failed to start or ended with an error (exit code {code})", err=True)
    raise typer.Exit(code)
