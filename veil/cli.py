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

from veil.errors import BudgetRefusedError, VeilError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Veil: private federated training with a record of everything.")
db_app = typer.Typer(no_args_is_help=True, help="Manage the run store's schema.")
app.add_typer(db_app, name="db")
keys_app = typer.Typer(no_args_is_help=True, help="CKKS key sets: the coordinator gets parameters only.")
app.add_typer(keys_app, name="keys")
runs_app = typer.Typer(no_args_is_help=True, help="Read recorded runs.")
app.add_typer(runs_app, name="runs")

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
    ledger_dir: Annotated[Path, typer.Option(
        help="where the simulated sites keep their privacy ledgers; reuse it and their budgets "
        "carry over between runs")] = Path("veil-ledgers"),
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
        from server.summary import load_summary
        from simulations.simulate import simulate as run_sim

        run_store = RunStore(store)
        try:
            result = run_sim(spec, run_store, artifacts_dir, progress=output == "text",
                             ledger_dir=ledger_dir)
        except BudgetRefusedError as err:  # show what the sites said, then fail
            if err.run_id is not None:
                _echo_summary(load_summary(run_store, err.run_id), output, run_store.url)
            raise
        summary = load_summary(run_store, result.run_id)
    except VeilError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(err.exit_code) from None
    _echo_summary(summary, output, run_store.url)


def _echo_summary(summary: object, output: str, url: str) -> None:
    from server.summary import format_summary

    if output == "json":
        typer.echo(json.dumps(asdict(summary), indent=2, default=str))  # type: ignore[call-overload]
    else:
        typer.echo("")
        typer.echo(format_summary(summary))  # type: ignore[arg-type]
        typer.echo(f"\nrecorded in {url}")


@app.command()
def budget(
    store: StoreOpt = None,
    run: Annotated[int | None, typer.Option(help="only what this run reported")] = None,
    site: Annotated[str | None, typer.Option(help="only this site (name or data set id)")] = None,
    ledger: Annotated[list[Path] | None, typer.Option(
        help="read a site's own ledger file instead of the run store (repeatable)")] = None,
    output: Annotated[Literal["text", "json"], typer.Option("--format", help="output format")] = "text",
) -> None:
    """Per-site privacy spend: lifetime ε spent, cap and remaining, at the site's δ."""
    try:
        if ledger:
            from privacy.ledger import ledger_report

            reports = {str(p): ledger_report(p) for p in ledger}
            if output == "json":
                typer.echo(json.dumps({k: [asdict(d) | {"remaining": d.remaining} for d in v]
                                       for k, v in reports.items()}, indent=2))
                return
            for path, datasets in reports.items():
                typer.echo(f"ledger {path} (verified)")
                typer.echo("  data set          entries  runs    steps  lifetime ε       cap  remaining"
                           "        δ  accountant")
                for d in datasets:
                    cap = f"{d.cap:g}" if d.cap is not None else "none"
                    rem = f"{d.remaining:.3f}" if d.remaining is not None else "-"
                    typer.echo(f"  {d.dataset_id:<16} {d.entries:>8} {d.runs:>5} {d.steps:>8}"
                               f" {d.epsilon:>11.3f} {cap:>9} {rem:>10} {d.delta:>8.0e}  {d.accountant}")
                if not datasets:
                    typer.echo("  (no charges yet)")
            return
        from server.store import RunStore
        from server.summary import budget_rows, format_budget

        run_store = RunStore(store, migrate=False)
        if run is not None:
            run_store.get_run(run)
        rows = budget_rows(run_store, run, site)
    except VeilError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(err.exit_code) from None
    if output == "json":
        typer.echo(json.dumps([asdict(r) | {"remaining": r.remaining} for r in rows], indent=2))
    else:
        typer.echo(format_budget(rows))


@keys_app.command("create")
def keys_create(
    directory: Annotated[Path, typer.Argument(help="new directory for the key set")],
    poly_modulus_degree: Annotated[int, typer.Option(help="ring degree N")] = 4096,
    coeff_mod_bit_sizes: Annotated[str, typer.Option(help="modulus primes in bits, special prime last")] = "60,49",
    scale_bits: Annotated[int, typer.Option(help="encoding scale 2^scale_bits")] = 52,
    release_bits: Annotated[int, typer.Option(help="decrypted sums are noise-flooded and rounded to "
                                              "2^-release_bits")] = 28,
) -> None:
    """Make a CKKS key set: secret.ckks (sites, researchers; mode 600), coordinator.ckks (no key)."""
    from privacy.ckks import CkksParams, create_keyset

    try:
        try:
            bits = tuple(int(b) for b in coeff_mod_bit_sizes.split(","))
        except ValueError:
            raise typer.BadParameter(f"--coeff-mod-bit-sizes must be comma-separated integers, "
                                     f"got {coeff_mod_bit_sizes!r}") from None
        made = create_keyset(directory, CkksParams(poly_modulus_degree, bits, scale_bits, release_bits))
    except VeilError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(err.exit_code) from None
    p = made.info.params
    typer.echo(f"key set {made.info.key_id}: CKKS N={p.poly_modulus_degree}, moduli {list(p.coeff_mod_bit_sizes)} "
               f"bits, scale 2^{p.scale_bits}, {p.slots} values per ciphertext, "
               f"{p.ciphertext_bytes / p.slots:.0f} bytes per value")
    typer.echo(f"  {made.secret}  (secret key, mode 600): copy to every site and to researchers who may "
               "read results; never to the coordinator")
    typer.echo(f"  {made.coordinator}  (parameters only, no key): for the coordinator")


@keys_app.command("decrypt")
def keys_decrypt(
    checkpoint: Annotated[Path, typer.Argument(help="an encrypted checkpoint (round-NNNN.ckks)")],
    key: Annotated[Path, typer.Option("--key", help="the key set's secret.ckks")],
    out: Annotated[Path, typer.Option("--out", help="where to write the PyTorch state dict (.pt)")],
) -> None:
    """Decrypt an encrypted checkpoint into a PyTorch state dict (the released, rounded values)."""
    import torch

    from privacy.ckks import EncryptedVector, SecretKey, unflatten

    try:
        secret = SecretKey.load(key)
        enc, meta = EncryptedVector.from_file(checkpoint)
        mean, _ = secret.decrypt_mean(enc)
        layout = meta["layout"]
        like = [torch.empty(shape, dtype=getattr(torch, dtype)).numpy() for _, shape, dtype in layout]
        values = unflatten(mean, like)
    except VeilError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(err.exit_code) from None
    torch.save({name: torch.from_numpy(v) for (name, _, _), v in zip(layout, values, strict=True)}, out)
    typer.echo(f"decrypted {enc.values - 1} parameters ({meta.get('arch')}) into {out}")


@runs_app.command("show")
def runs_show(
    run: Annotated[int, typer.Argument(help="run id")],
    store: StoreOpt = None,
    key: Annotated[Path | None, typer.Option("--key", help="secret.ckks to read encrypted metrics")] = None,
    output: Annotated[Literal["text", "json"], typer.Option("--format", help="output format")] = "text",
) -> None:
    """One run: rounds, sites and privacy spend; encrypted metrics stay encrypted without --key."""
    from privacy.ckks import SecretKey
    from server.store import RunStore
    from server.summary import load_summary

    try:
        secret = SecretKey.load(key) if key is not None else None
        run_store = RunStore(store, migrate=False)
        summary = load_summary(run_store, run, secret)
    except VeilError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(err.exit_code) from None
    _echo_summary(summary, output, run_store.url)


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
