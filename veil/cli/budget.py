"""``veil budget``: each site's lifetime privacy spend, from the run store or a ledger file."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from veil.cli.common import FormatOpt, StoreOpt, echo_json, errors
from veil.errors import VeilError


def budget(
    store: StoreOpt = None,
    run: Annotated[int | None, typer.Option(help="only what this run reported")] = None,
    site: Annotated[str | None, typer.Option(help="only this site (name or data set id)")] = None,
    ledger: Annotated[list[Path] | None, typer.Option(
        help="read a site's own ledger file instead of the run store (repeatable)")] = None,
    output: FormatOpt = "text",
) -> None:
    """Per-site privacy spend: lifetime ε spent, cap and remaining at δ, with the accountant."""
    from veil.cli.render import clean, console, draw_budget, table

    with errors():
        if ledger:
            from privacy.ledger import ledger_report

            reports = {str(p): ledger_report(p) for p in ledger}
            if output == "json":
                echo_json({k: asdict(v) | {"datasets": [asdict(d) | {"remaining": d.remaining}
                                                         for d in v.datasets]} for k, v in reports.items()})
                return
            con = console()
            for path, rep in reports.items():
                con.print(f"ledger {clean(path, 300)} (verified): id {clean(rep.ledger_id, 40)}, "
                          f"site {clean(rep.site_id or 'unbound', 80)}, "
                          f"created {clean((rep.created_at or '-')[:19])}, {rep.head.seq} entries", markup=False)
                if rep.predecessor:
                    con.print(f"  started by its administrator on {clean((rep.replaced_at or '-')[:19])} to "
                              f"replace lost ledger {clean(rep.predecessor, 40)}: "
                              f"{clean(rep.head.replaced_reason or 'no reason given', 500)}; the "
                              "spend recorded in that ledger is not included below", markup=False)
                spends = [*rep.datasets, *([rep.whole] if rep.whole and len(rep.datasets) > 1 else [])]
                con.print(table(
                    ["data set", "entries", "runs", "steps", "lifetime ε", "cap", "remaining", "δ", "accountant",
                     "seeded", "without DP"],
                    ((d.dataset_id if d.dataset_id != "all" else "all (cap_scope: ledger)", d.entries, d.runs,
                      d.steps, f"{d.epsilon:.3f}" + (" NOT PRIVATE" if d.without_dp else ""),
                      f"{d.cap:g}" if d.cap is not None else "none",
                      f"{d.remaining:.3f}" if d.remaining is not None else "-", f"{d.delta:.0e}", d.accountant,
                      d.seeded_entries, d.without_dp)
                     for d in spends)) if spends else "  (no charges yet)")
                if any(d.seeded_entries for d in rep.datasets):
                    con.print("  'seeded' counts charges whose noise was reproducible from a seed (simulation "
                              "research; not private)", markup=False)
                if any(d.without_dp for d in rep.datasets):
                    con.print("  'without DP' counts rounds trained with privacy: none (the labelled baseline): "
                              "their updates were released without differential privacy, so no lifetime ε "
                              "holds for that data; the ε shown composes its DP rounds only, and a cap refuses "
                              "every further charge", markup=False)
            return
        from server.read.dashboard import open_store, require_runs
        from server.read.summary import budget_rows

        run_store = open_store(store)
        require_runs(run_store)
        if run is not None:
            run_store.get_run(run)
        rows = budget_rows(run_store, run, site)
        if site is not None and not rows:
            raise VeilError(f"no privacy spend recorded for site or data set {site!r}"
                            + (f" in run {run}" if run is not None else "") + "; `veil budget` lists them all")
    if output == "json":
        echo_json([asdict(r) | {"remaining": r.remaining} for r in rows])
    else:
        draw_budget(console(), rows)
