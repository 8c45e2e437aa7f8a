"""``veil simulate``: a simulated private federation on this machine, recorded in the run store."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer

from veil.cli.common import StoreOpt, echo_summary, end_on_signals, errors, quiet_third_parties
from veil.errors import BudgetRefusedError, RunFailedError

if TYPE_CHECKING:
    from veil.spec import Scenario


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
        "carry over between runs (--no-dp: veil-ledgers-no-dp unless given)")] = Path("veil-ledgers"),
    output: Annotated[Literal["text", "json"], typer.Option("--format", help="summary format")] = "text",
    verbose: Annotated[bool, typer.Option(help="show Flower's own round log")] = False,
    reproducible_noise: Annotated[bool, typer.Option(
        "--reproducible-noise", help="research only: draw DP noise and sampling from the seed so the run "
        "replays exactly; NOT private, and recorded as such")] = False,
    no_dp: Annotated[bool, typer.Option(
        "--no-dp", help="the non-private baseline: the same federation without DP (privacy: none), plain "
        "FedAvg with batch 32 and lr 0.1, the simulated sites' shared ε cap lifted; NOT private, recorded and "
        "shown as such (not with --reproducible-noise)")] = False,
) -> None:
    """Run a simulated private federation and record it in the run store."""
    from veil import logs
    from veil.processes import start_reaper

    start_reaper()  # first: whatever ends this process, Ray's processes end with it
    from veil.spec import load_scenario

    logs.configure()
    with errors():
        spec = load_scenario(scenario).with_overrides(
            **{"federation.sites": sites, "federation.rounds": rounds, "seed": seed, "device": device,
               "privacy.reproducible_noise": True if reproducible_noise else None}
        )
        if no_dp:
            spec = _without_dp(spec)
            if ledger_dir == DEFAULT_LEDGERS:  # keep the DP runs' ledgers free of releases without DP
                ledger_dir = NO_DP_LEDGERS
                typer.echo(f"--no-dp: the simulated sites keep their ledgers in {NO_DP_LEDGERS}/, apart from "
                           f"{DEFAULT_LEDGERS}/: a round without DP on a ledger refuses every later capped charge "
                           "there", err=True)
        if spec.federation.min_sites > spec.federation.sites:  # after --sites shrinks it
            spec = spec.with_overrides(**{"federation.min_sites": spec.federation.sites})
        end_on_signals()  # imports Ray: after a bad scenario is reported
        quiet_third_parties(verbose)  # imports Flower and Opacus
        from server.read.summary import load_summary
        from server.store import RunStore
        from simulations.simulate import check_runnable
        from simulations.simulate import simulate as run_sim

        check_runnable(spec, ledger_dir, artifacts_dir)  # a scenario that cannot run writes nothing
        run_store = RunStore(store)
        try:
            result = run_sim(spec, run_store, artifacts_dir, progress=output == "text",
                             ledger_dir=ledger_dir)
        except (BudgetRefusedError, RunFailedError) as err:  # show what the sites said, then fail
            if err.run_id is not None:
                echo_summary(load_summary(run_store, err.run_id), output, run_store.safe_url)
            raise
        summary = load_summary(run_store, result.run_id)
    echo_summary(summary, output, run_store.safe_url)


DEFAULT_LEDGERS = Path("veil-ledgers")
NO_DP_LEDGERS = Path("veil-ledgers-no-dp")


def _without_dp(spec: Scenario) -> Scenario:
    """``spec`` as the non-private baseline (``veil.spec.non_private_baseline``), said on stderr."""
    from veil.spec import NON_PRIVATE_TRAINING, non_private_baseline

    baseline = non_private_baseline(spec)
    typer.echo("--no-dp: training WITHOUT differential privacy (the non-private baseline): plain FedAvg with "
               f"batch {NON_PRIVATE_TRAINING['batch_size']} and lr {NON_PRIVATE_TRAINING['learning_rate']:g} "
               "(the DP-tuned step overshoots without noise); the simulated sites' shared ε cap is lifted, and "
               "their ledgers record each round as released without DP", err=True)
    return baseline
