"""``veil audit``: an empirical lower bound on ε for Veil's site training (a smoke alarm)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

import typer

from veil.cli.common import FormatOpt, echo_json, errors
from veil.errors import AuditFlaggedError


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

    with errors():
        result = run_audit(AuditSetup(claimed_epsilon=epsilon, delta=delta, canaries=canaries, epochs=epochs,
                                      confidence=confidence, disable_noise=disable_noise))
    o = result.outcome
    if output == "json":
        echo_json(asdict(o) | {"flagged": o.flagged, "noise_multiplier": result.noise_multiplier,
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
        raise typer.Exit(int(AuditFlaggedError.exit_code))

