"""The ``veil`` command line."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer

from veil.errors import BudgetRefusedError, StoreError, VeilError

if TYPE_CHECKING:
    from server.summary import RunSummary

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="Veil: private federated training with a record of everything.")
db_app = typer.Typer(no_args_is_help=True, help="Manage the run store's schema.")
app.add_typer(db_app, name="db")
keys_app = typer.Typer(no_args_is_help=True, help="CKKS key sets: the coordinator gets parameters only.")
app.add_typer(keys_app, name="keys")
certs_app = typer.Typer(no_args_is_help=True, help="TLS certificates and SuperNode keys for a deployment.")
app.add_typer(certs_app, name="certs")
site_app = typer.Typer(no_args_is_help=True, help="Run this machine as a data-holding site.")
app.add_typer(site_app, name="site")
coordinator_app = typer.Typer(no_args_is_help=True, help="Run the coordinator (Flower SuperLink + run store).")
app.add_typer(coordinator_app, name="coordinator")
runs_app = typer.Typer(help="Recorded runs, newest first; `veil runs show RUN` for one.")
app.add_typer(runs_app, name="runs")

StoreOpt = Annotated[str | None, typer.Option("--store", help="SQLAlchemy URL of the run store "
                                              "[env VEIL_STORE; default sqlite:///veil.db]")]
FormatOpt = Annotated[Literal["text", "json"], typer.Option("--format", help="text (tables) or json")]
KeyOpt = Annotated[Path | None, typer.Option("--key", help="a key set's secret.ckks: decrypts encrypted "
                                             "evaluation metrics (they stay encrypted without it)")]
RunArg = Annotated[int, typer.Argument(help="run id (see `veil runs`)")]


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
    reproducible_noise: Annotated[bool, typer.Option(
        "--reproducible-noise", help="research only: draw DP noise and sampling from the seed so the run "
        "replays exactly; NOT private, and recorded as such")] = False,
) -> None:
    """Run a simulated private federation and record it in the run store."""
    from veil import logs
    from veil.spec import load_scenario

    logs.configure()
    _quiet_third_parties(verbose)
    try:
        spec = load_scenario(scenario).with_overrides(
            **{"federation.sites": sites, "federation.rounds": rounds, "seed": seed, "device": device,
               "privacy.reproducible_noise": True if reproducible_noise else None}
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
                _echo_summary(load_summary(run_store, err.run_id), output, run_store.safe_url)
            raise
        summary = load_summary(run_store, result.run_id)
    except VeilError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(err.exit_code) from None
    _echo_summary(summary, output, run_store.safe_url)


def _echo_summary(summary: RunSummary, output: str, url: str) -> None:
    from veil.render import console, draw_summary

    if output == "json":
        _echo_json(_summary_json(summary))
    else:
        con = console()
        con.print()
        draw_summary(con, summary)
        con.print(f"\nrecorded in {url}", markup=False)


def _summary_json(summary: RunSummary) -> dict[str, Any]:
    return asdict(summary) | {
        "max_epsilon": summary.max_epsilon, "bytes_moved": summary.bytes_moved, "examples": summary.examples,
        "sites": [asdict(site) | {"remaining": site.remaining} for site in summary.sites]}


def _echo_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, default=str))


@contextmanager
def _errors() -> Iterator[None]:
    """Veil's errors as one line and an exit code; a database error too, with the likely fix."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield
    except VeilError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(err.exit_code) from None
    except SQLAlchemyError as err:
        why = " ".join(str(getattr(err, "orig", None) or err).split())[:300]
        typer.echo(f"error: the store query failed ({why}); if the store is from another Veil version, "
                   "run: veil db upgrade --store URL", err=True)
        raise typer.Exit(StoreError.exit_code) from None


@app.command()
def budget(
    store: StoreOpt = None,
    run: Annotated[int | None, typer.Option(help="only what this run reported")] = None,
    site: Annotated[str | None, typer.Option(help="only this site (name or data set id)")] = None,
    ledger: Annotated[list[Path] | None, typer.Option(
        help="read a site's own ledger file instead of the run store (repeatable)")] = None,
    output: FormatOpt = "text",
) -> None:
    """Per-site privacy spend: lifetime ε spent, cap and remaining at δ, with the accountant."""
    from veil.render import console, draw_budget, table

    with _errors():
        if ledger:
            from privacy.ledger import ledger_report

            reports = {str(p): ledger_report(p) for p in ledger}
            if output == "json":
                _echo_json({k: asdict(v) | {"datasets": [asdict(d) | {"remaining": d.remaining}
                                                         for d in v.datasets]} for k, v in reports.items()})
                return
            con = console()
            for path, rep in reports.items():
                con.print(f"ledger {path} (verified): id {rep.ledger_id}, site {rep.site_id or 'unbound'}, "
                          f"created {(rep.created_at or '-')[:19]}, {rep.head.seq} entries", markup=False)
                if rep.predecessor:
                    con.print(f"  started by its administrator on {(rep.replaced_at or '-')[:19]} to replace lost "
                              f"ledger {rep.predecessor}: {rep.head.replaced_reason or 'no reason given'}; the "
                              "spend recorded in that ledger is not included below", markup=False)
                spends = [*rep.datasets, *([rep.whole] if rep.whole and len(rep.datasets) > 1 else [])]
                con.print(table(
                    ["data set", "entries", "runs", "steps", "lifetime ε", "cap", "remaining", "δ", "accountant",
                     "seeded"],
                    ((d.dataset_id if d.dataset_id != "all" else "all (cap_scope: ledger)", d.entries, d.runs,
                      d.steps, f"{d.epsilon:.3f}", f"{d.cap:g}" if d.cap is not None else "none",
                      f"{d.remaining:.3f}" if d.remaining is not None else "-", f"{d.delta:.0e}", d.accountant,
                      d.seeded_entries)
                     for d in spends)) if spends else "  (no charges yet)")
                if any(d.seeded_entries for d in rep.datasets):
                    con.print("  'seeded' counts charges whose noise was reproducible from a seed (simulation "
                              "research; not private)", markup=False)
            return
        from server.dashboard import open_store, require_runs
        from server.summary import budget_rows

        run_store = open_store(store)
        require_runs(run_store)
        if run is not None:
            run_store.get_run(run)
        rows = budget_rows(run_store, run, site)
        if site is not None and not rows:
            raise VeilError(f"no privacy spend recorded for site or data set {site!r}"
                            + (f" in run {run}" if run is not None else "") + "; `veil budget` lists them all")
    if output == "json":
        _echo_json([asdict(r) | {"remaining": r.remaining} for r in rows])
    else:
        draw_budget(console(), rows)


@app.command()
def audit(
    epsilon: Annotated[float, typer.Option(
        "--epsilon", help="the ε the training claims (σ is calibrated to it)")] = 2.0,
    delta: Annotated[float, typer.Option(help="δ of the claim")] = 1e-5,
    canaries: Annotated[int, typer.Option(help="canaries, each included by a secret fair coin")] = 2000,
    epochs: Annotated[int, typer.Option(help="local epochs of the audited training")] = 20,
    confidence: Annotated[float, typer.Option(help="confidence of the lower bound")] = 0.95,
    disable_noise: Annotated[bool, typer.Option(
        "--disable-noise", help="train with σ = 0 while claiming the calibrated ε: the broken run the audit "
        "must flag (to check the alarm itself)")] = False,
    output: FormatOpt = "text",
) -> None:
    """Empirical privacy audit of site training (one run, canaries): a lower bound on ε beside the claim."""
    from simulations.audit import AuditSetup, run_audit

    with _errors():
        result = run_audit(AuditSetup(claimed_epsilon=epsilon, delta=delta, canaries=canaries, epochs=epochs,
                                      confidence=confidence, disable_noise=disable_noise))
    o = result.outcome
    if output == "json":
        _echo_json(asdict(o) | {"flagged": o.flagged, "noise_multiplier": result.noise_multiplier,
                                "noise_disabled": disable_noise, "sample_rate": result.sample_rate,
                                "steps": result.steps, "seconds": result.seconds})
    else:
        setup = result.setup
        typer.echo("one-run privacy audit (Steinke, Nasr & Jagielski 2023) of Veil's site DP-SGD")
        sigma = "1e-9 (NOISE DISABLED on purpose; the claim below assumes σ=" if disable_noise else ""
        typer.echo(f"  training: mlp on {setup.records} real digits + {o.included} of {o.canaries} canaries "
                   f"(each in by a secret coin), {setup.epochs} epochs, q={result.sample_rate:.4f}, "
                   f"{result.steps} steps, C={setup.max_grad_norm:g}, σ={sigma}{result.noise_multiplier:.4f}"
                   + (")" if disable_noise else " (noise from OS entropy)"))
        typer.echo(f"  claimed:     ε = {o.claimed_epsilon:.3f} at δ = {o.delta:g} ({setup.accountant})")
        typer.echo(f"  lower bound: ε ≥ {o.lower_bound:.3f} at {o.confidence:.0%} confidence ({o.correct} of "
                   f"{o.guesses} guesses correct; best of k = {', '.join(map(str, o.tried))}, "
                   "Bonferroni-corrected)")
        typer.echo(f"  this design cannot show a bound above {o.ceiling:.2f}")
        verdict = ("FLAGGED: the lower bound exceeds the claimed ε; this training leaks more than it claims"
                   if o.flagged else "passed: no contradiction with the claim")
        typer.echo(f"  verdict: {verdict}")
        typer.echo("  an audit like this catches gross failures (noise off, broken sampling, ε off by a "
                   "large factor), not small accounting errors; passing does not prove the claimed ε")
    if o.flagged:
        from veil.errors import AuditFlaggedError

        raise typer.Exit(AuditFlaggedError.exit_code)


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


@runs_app.callback(invoke_without_command=True)
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
    from server.dashboard import RUN_STATUSES, list_runs, open_store, parse_when, require_runs
    from veil.render import console, draw_runs

    if status is not None and status not in RUN_STATUSES:
        raise typer.BadParameter(f"{status!r} is not a run status; use one of {', '.join(RUN_STATUSES)}",
                                 param_hint="--status")
    try:
        start = parse_when(since) if since else None
        end = parse_when(until, end=True) if until else None
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--since/--until") from None
    with _errors():
        run_store = open_store(store)
        require_runs(run_store)
        rows = list_runs(run_store, status=status, name=name, since=start, until=end, limit=limit)
    if output == "json":
        _echo_json([asdict(r) for r in rows])
    elif not rows:
        typer.echo("no runs match these filters")
    else:
        draw_runs(console(), rows)


@runs_app.command("show")
def runs_show(
    run: RunArg,
    store: StoreOpt = None,
    key: KeyOpt = None,
    output: FormatOpt = "text",
) -> None:
    """One run: spec, rounds, sites, participation, privacy spend and artifacts."""
    with _errors():
        run_store, secret = _open(store, key)
        summary = _summary(run_store, run, secret)
    _echo_summary(summary, output, run_store.safe_url)


@app.command()
def compare(
    runs: Annotated[list[int], typer.Argument(help="two or more run ids")],
    store: StoreOpt = None,
    key: KeyOpt = None,
    output: FormatOpt = "text",
) -> None:
    """Runs side by side: final metrics, worst-case ε, rounds, wall time, bytes moved."""
    from server.dashboard import compare_row
    from veil.render import console, draw_compare

    if len(runs) < 2:
        raise typer.BadParameter("give at least two run ids, e.g. veil compare 3 4", param_hint="RUNS")
    with _errors():
        run_store, secret = _open(store, key)
        rows = [compare_row(_summary(run_store, r, secret)) for r in runs]
    if output == "json":
        _echo_json([asdict(r) for r in rows])
    else:
        draw_compare(console(), rows)


@app.command()
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
    from server.dashboard import METRICS, metric_series
    from veil import plots
    from veil.render import console, draw_series

    if metric not in METRICS:
        raise typer.BadParameter(f"{metric!r} is not a metric; use one of {', '.join(METRICS)}",
                                 param_hint="--metric")
    with _errors():
        run_store, secret = _open(store, key)
        series = metric_series(run_store, run, secret, _summary(run_store, run, secret))
        if png is not None:
            if png.suffix.lower() != ".png":
                raise VeilError(f"--png {png}: the file name must end in .png")
            plots.png(series, png)
    if output == "json":
        _echo_json(asdict(series))
    elif plot:
        out = sys.stdout
        tty = out.isatty()
        size = shutil.get_terminal_size((100, 30))
        try:
            text = plots.terminal_plot(series, metric, width=min(size.columns, 120) if tty else 100,
                                       height=max(15, min(size.lines - 4, 30)) if tty else 25, colour=tty)
        except ValueError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(VeilError.exit_code) from None
        typer.echo(text)
    else:
        draw_series(console(), series)
    if png is not None and output != "json":
        typer.echo(f"wrote {png}")


@app.command()
def report(
    run: RunArg,
    out: Annotated[Path, typer.Option("--out", help="directory for report.md, report.html and metrics.png")],
    store: StoreOpt = None,
    key: KeyOpt = None,
) -> None:
    """A self-contained privacy report: what was trained, the DP mechanism and accountant, ε/δ per site,
    encryption parameters and plain-language caveats."""
    from server.dashboard import accountant_versions, metric_series, site_mechanisms
    from veil.report import write_report

    with _errors():
        run_store, secret = _open(store, key)
        summary = _summary(run_store, run, secret)
        written = write_report(summary, metric_series(run_store, run, secret, summary), out,
                               accountant_versions(run_store, run), site_mechanisms(run_store, run))
    for path in written:
        typer.echo(f"wrote {path}")


@app.command()
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
    from server.dashboard import export_tables, write_export

    with _errors():
        run_store, secret = _open(store, key)
        _summary(run_store, run, None)  # a missing run fails before anything is written
        tables = export_tables(run_store, run, secret)
        if fmt == "json" and out is None:
            _echo_json(tables)
            return
        written = write_export(tables, fmt, out or Path(f"run-{run}-export"))
    for path in written:
        typer.echo(f"wrote {path}")


def _open(store: str | None, key: Path | None) -> tuple[Any, Any]:
    from privacy.ckks import SecretKey
    from server.dashboard import open_store

    secret = SecretKey.load(key) if key is not None else None
    return open_store(store), secret


def _summary(run_store: Any, run: int, secret: Any) -> RunSummary:
    from server.dashboard import require_runs
    from server.summary import load_summary

    require_runs(run_store)
    return load_summary(run_store, run, secret)


@certs_app.command("create")
def certs_create(
    directory: Annotated[Path, typer.Argument(help="new directory for ca.crt/ca.key/server.crt/server.key")],
    host: Annotated[list[str], typer.Option("--host", help="a host name or IP the sites dial (repeatable)")],
    days: Annotated[int, typer.Option(help="validity in days")] = 365,
) -> None:
    """A private CA and the coordinator's TLS certificate. Sites get ca.crt only."""
    from veil.certs import create_certs

    with _errors():
        made = create_certs(directory, host, days=days)
    typer.echo(f"CA {made.ca_cert} (give to every site) and key {made.ca_key} (mode 600: keep offline)")
    typer.echo(f"coordinator certificate {made.server_cert} for {', '.join(host)}, "
               f"key {made.server_key} (mode 600)")


@certs_app.command("node-key")
def certs_node_key(
    path: Annotated[Path, typer.Argument(help="where the site's private key goes (NAME; NAME.pub is the public)")],
) -> None:
    """A site's SuperNode key pair (ECDSA P-384, OpenSSH). The coordinator registers NAME.pub."""
    from veil.certs import create_node_key

    with _errors():
        public = create_node_key(path)
    typer.echo(f"private key {path} (mode 600: stays at the site); public key {public}: send it to the "
               f"coordinator, who runs `veil coordinator register {public.name} ...`")


@site_app.command("check")
def site_check(
    config: Annotated[Path, typer.Option("--config", help="the site's site.yaml")],
    output: FormatOpt = "text",
) -> None:
    """Preflight only: config, data, key, ledger, device, node key, CA; connects nowhere."""
    from client.daemon import load_site_config, preflight

    with _errors():
        cfg = load_site_config(config)
        checks = preflight(cfg)
    if output == "json":
        _echo_json({"site": cfg.site_id, "ok": all(c.ok for c in checks), "checks": [asdict(c) for c in checks]})
    else:
        for c in checks:
            typer.echo(f"{'FAIL' if not c.ok else 'warn' if c.warning else 'ok  '} {c.name:<15} {c.detail}")
    if not all(c.ok for c in checks):
        raise typer.Exit(3)


@site_app.command("init")
def site_init(
    config: Annotated[Path, typer.Option("--config", help="the site's site.yaml")],
    new_ledger: Annotated[bool, typer.Option(
        "--new-ledger", help="replace a pinned ledger that is lost (recorded and shown to the coordinator)",
    )] = False,
    reason: Annotated[str | None, typer.Option(help="why the ledger is replaced (with --new-ledger)")] = None,
) -> None:
    """Create this site's privacy ledger (or adopt the existing one) and pin its id in site.yaml."""
    from client.daemon import init_ledger

    with _errors():
        typer.echo(init_ledger(config, new_ledger=new_ledger, reason=reason))


@site_app.command("start")
def site_start(
    config: Annotated[Path, typer.Option("--config", help="the site's site.yaml")],
) -> None:
    """Preflight, then run a Flower SuperNode for this site until SIGTERM (JSON log lines on stdout)."""
    from client.daemon import run_site

    with _errors():
        code = run_site(config)
    raise typer.Exit(code)


@coordinator_app.command("start")
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
) -> None:
    """A Flower SuperLink with TLS and SuperNode authentication; runs are recorded in --store."""
    from server.store import RunStore
    from server.store.store import resolve_store_url
    from veil.deploy import bin_path, superlink_command, supervise

    with _errors():
        url = resolve_store_url(store)
        run_store = RunStore(url)  # creates or migrates it now: a bad URL fails before anything listens
        safe = run_store.safe_url
        run_store.close()
        if coordinator_key is not None:
            from privacy.ckks import CoordinatorContext

            ctx = CoordinatorContext.load(coordinator_key)
            typer.echo(f"CKKS: key set {ctx.key_id}, parameters only (no secret key)")
        state.parent.mkdir(parents=True, exist_ok=True)
        cmd = superlink_command(certs, host=host, port=port, state=state)
        env = {**os.environ, "PATH": bin_path(), "VEIL_STORE": url,
               "VEIL_ARTIFACTS": str(artifacts_dir.resolve()), "FLWR_HOME": str(state.parent.resolve() / "flwr")}
        if coordinator_key is not None:
            env["VEIL_COORDINATOR_KEY"] = str(coordinator_key.resolve())
        typer.echo(f"coordinator on {host}:{port} (TLS, SuperNode authentication), run store {safe}")

        def event(name: str, **kw: Any) -> None:
            typer.echo(json.dumps({"event": f"superlink-{name}", **kw}))

        code = supervise(cmd, env, event)
    raise typer.Exit(code)


@coordinator_app.command("register")
def coordinator_register(
    public_key: Annotated[Path, typer.Argument(help="the site's NAME.pub")],
    coordinator: Annotated[str, typer.Option(help="the SuperLink as HOST:PORT")] = "127.0.0.1:8000",
    ca: Annotated[Path, typer.Option(help="the federation's ca.crt")] = Path("certs/ca.crt"),
    name: Annotated[str | None, typer.Option(help="a name for the site in Flower's node list")] = None,
) -> None:
    """Register a site's public node key; SuperNodes with unregistered keys are refused."""
    from veil.deploy import register_node

    with _errors():
        node = register_node(public_key, coordinator, ca, name)
    typer.echo(f"registered {public_key} as node {node}")


@app.command("run")
def run_remote(
    scenario: Annotated[Path, typer.Argument(help="scenario YAML (federation.sites = sites to wait for)")],
    coordinator: Annotated[str, typer.Option(help="the SuperLink as HOST:PORT")],
    ca: Annotated[Path, typer.Option(help="the federation's ca.crt")] = Path("certs/ca.crt"),
    timeout: Annotated[float | None, typer.Option(help="stop following after this many seconds")] = None,
) -> None:
    """Submit a run to a deployed federation and follow its log; results land in the coordinator's store."""
    from veil.deploy import submit
    from veil.spec import load_scenario

    with _errors():
        spec = load_scenario(scenario)
        if spec.privacy.reproducible_noise:
            from veil.errors import ScenarioError
            from veil.spec import REPRODUCIBLE_REFUSED

            raise ScenarioError(REPRODUCIBLE_REFUSED)
        if spec.encryption.keys is not None:
            raise VeilError("encryption.keys names a local key directory; in a deployment the coordinator "
                            "holds coordinator.ckks (veil coordinator start --coordinator-key) and each site "
                            "its secret.ckks (site.yaml keys:). Remove encryption.keys")
        code = submit(spec.model_dump(mode="json"), coordinator, ca, typer.echo, timeout)
    if code != 0:
        typer.echo(f"error: the run failed to start or ended with an error (flwr exit code {code})", err=True)
    raise typer.Exit(code)


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
