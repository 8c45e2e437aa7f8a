"""How the CLI draws tables: rich tables, with colour only on a terminal.

Every read command builds plain dataclasses first (``--format json`` prints those); this
module only turns them into text. Piped or captured output gets no escape codes and a wide,
fixed width, so scripts and tests see one row per line.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from server.read.dashboard import CompareRow, MetricSeries, RunListRow
    from server.read.summary import BudgetRow, RunSummary

PIPE_WIDTH = 240


def console(file: Any = None) -> Console:
    """A console on ``file`` (stdout): colour and terminal width on a TTY, plain and wide otherwise."""
    out = file if file is not None else sys.stdout
    tty = hasattr(out, "isatty") and out.isatty()
    return Console(file=out, highlight=False, soft_wrap=False, width=None if tty else PIPE_WIDTH,
                   force_terminal=None if tty else False)


def to_text(draw: Any, *args: Any) -> str:
    """What ``draw(console, *args)`` prints, as a string without escape codes."""
    buf = io.StringIO()
    draw(Console(file=buf, highlight=False, width=PIPE_WIDTH, force_terminal=False, soft_wrap=False), *args)
    return buf.getvalue().rstrip("\n")


def table(columns: Sequence[str], rows: Iterable[Sequence[Any]], *, title: str | None = None,
          left: int = 1) -> Table:
    """A table whose first ``left`` columns are left-aligned and the rest right-aligned (numbers)."""
    t = Table(box=box.SIMPLE_HEAD, title=title, title_justify="left", title_style="bold",
              header_style="bold", pad_edge=False, show_edge=False)
    for i, name in enumerate(columns):
        t.add_column(name, justify="left" if i < left else "right", no_wrap=True)
    for row in rows:
        t.add_row(*(c if isinstance(c, str) else fmt(c) for c in row))
    return t


def fmt(value: Any, digits: int = 3) -> str:
    """A cell's text: ``-`` for None, yes/no for a bool, ints as they are, floats to ``digits`` decimals."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def mb(n: int) -> str:
    """A byte count in megabytes (10^6 bytes), to two decimals."""
    return f"{n / 1e6:.2f} MB"


def eps(value: float | None) -> str:
    """An ε to three decimals; ``-`` for None."""
    return "-" if value is None else f"{value:.3f}"


def _status(status: str) -> str:
    colour = {"completed": "green", "running": "cyan", "failed": "red", "refused": "yellow",
              "stopped": "yellow", "insufficient": "yellow"}.get(status)
    return f"[{colour}]{status}[/]" if colour else status


# -- veil runs ------------------------------------------------------------------------------
def draw_runs(con: Console, rows: list[RunListRow]) -> None:
    """The ``veil runs`` table, one row per run, plus a warning line when any run's noise was seeded."""
    con.print(table(
        ["run", "name", "status", "mode", "created (UTC)", "rounds", "sites", "accuracy", "max ε", "wall",
         "moved"],
        ([str(r.run_id), r.name, _status(r.status), r.mode + (" (seeded)" if r.noise_seeded else ""),
          (r.created_at or "-")[:19].replace("T", " "),
          f"{r.rounds_completed}/{r.rounds_planned}", f"{r.sites_trained}/{r.sites_planned}",
          "encrypted" if r.accuracy_encrypted else fmt(r.accuracy, 4), eps(r.max_epsilon),
          f"{r.wall_seconds:.1f}s" if r.wall_seconds is not None else "-", mb(r.bytes_moved)]
         for r in rows), left=5))
    if any(r.noise_seeded for r in rows):
        con.print(" runs marked (seeded) are not private: their DP noise is reproducible from the seed",
                  markup=False)


# -- veil runs show -------------------------------------------------------------------------
def draw_summary(con: Console, summary: RunSummary) -> None:
    """``veil runs show``: header, round and site tables, missed participations, encryption and totals."""
    s = summary
    con.print(f"[bold]run {s.run_id}[/] ({s.name}): {_status(s.status)}")
    if s.error:
        con.print(f"  error: {s.error}", markup=False)
    if s.not_private:
        con.print("  [bold red]NOT PRIVATE[/]: noise reproducible from the seed (--reproducible-noise, for "
                  "simulation research only); the ε below assumes noise nobody else can reproduce")
    elif s.privacy_note:
        con.print(f"  {s.privacy_note}", markup=False)
    spec = s.spec
    if spec:
        fed, data, train, priv = (spec.get(k, {}) for k in ("federation", "data", "training", "privacy"))
        target = (f"target ε {priv.get('target_epsilon')}" if priv.get("noise_multiplier") is None
                  else f"σ {priv.get('noise_multiplier')}")
        con.print(
            f"  {s.mode}, created {(s.created_at or '-')[:19].replace('T', ' ')} UTC, seed {s.seed}, "
            f"spec {s.spec_hash[:12]}, code {s.code_version}", markup=False)
        con.print(f"  requested by {s.researcher or 'nobody recorded (a run from before signed requests)'}",
                  markup=False)
        where = ("each site's own data" if s.mode == "deployment"
                 else f"{data.get('source', '?')} ({data.get('partitioner', '?')})")
        con.print(
            f"  {spec.get('model', {}).get('arch', '?')} on {where}, {fed.get('sites', s.planned_sites)} sites, "
            f"{fed.get('rounds', s.planned_rounds)} rounds, {train.get('local_epochs', '?')} local epoch(s), "
            f"batch {train.get('batch_size', '?')}, lr {train.get('learning_rate', '?')}; DP-SGD {target}, "
            f"C {priv.get('max_grad_norm', '?')}, accountant {priv.get('accountant', '?')}", markup=False)
    con.print()
    con.print(table(
        ["round", "status", "accuracy", "loss", "train-loss", "sites", "examples", "moved", "secs"],
        ((str(r.number), r.status,
          "encrypted" if r.encrypted and r.accuracy is None else fmt(r.accuracy, 4),
          "encrypted" if r.encrypted and r.loss is None else fmt(r.loss, 4),
          fmt(r.train_loss, 4), f"{r.sites_ok}/{r.sites_sampled}", r.examples,
          mb(r.bytes_down + r.bytes_up), fmt(r.seconds, 1))
         for r in s.rounds), left=2))
    con.print()
    con.print(table(
        ["site", "data set", "train", "test", "rounds", "noise σ", "run ε", "run δ", "accountant",
         "lifetime ε", "cap", "remaining"],
        ((site.site, site.dataset_id or "-", site.num_train or 0, site.num_test or 0, site.rounds_joined,
          fmt(site.noise_multiplier), eps(site.epsilon), f"{site.delta:.0e}" if site.delta else "-",
          site.accountant or "-", eps(site.lifetime_epsilon),
          f"{site.epsilon_cap:g}" if site.epsilon_cap is not None else "none", eps(site.remaining))
         for site in s.sites), left=2))
    if s.missed:
        con.print()
        con.print(" sites that did not take part (each site enforces its own policy and ledger):")
        if s.refusals:
            con.print("  refused by sites:")
        con.print(table(
            ["site", "where", "phase", "status", "reason"],
            ((m.site, "pre-flight" if m.phase == "preflight" else f"round {m.round}", m.phase, m.status,
              (m.reason or m.code or "-")[:160]) for m in s.missed), left=5))
    con.print()
    worst = s.max_epsilon
    if worst is not None:
        con.print(f" worst-case site ε this run = {worst:.3f} (sample-level DP, each site at its own δ); "
                  "lifetime ε is each site ledger's spend on its data set across runs", markup=False)
    if s.encryption:
        e, p = s.encryption, s.encryption["params"]
        on = "+".join(k for k in ("aggregation", "evaluation") if e.get(k) == "ckks")
        con.print(f" encryption: CKKS {on}, key set {e['key_id']} (N={p['poly_modulus_degree']}, moduli "
                  f"{p['coeff_mod_bit_sizes']} bits, scale 2^{p['scale_bits']}); the coordinator only added "
                  "ciphertexts", markup=False)
        if any(r.encrypted for r in s.rounds):
            con.print(f"   evaluation metrics decrypted with key set {s.decrypted_with}"
                      if s.decrypted_with else
                      f"   evaluation metrics are encrypted: veil runs show {s.run_id} --key "
                      "KEYSET/secret.ckks", markup=False)
    con.print(f" examples trained: {s.examples}   bytes moved: {mb(s.bytes_moved)}"
              f"   wall time: {s.wall_seconds or 0:.1f}s", markup=False)
    for uri, sha, size in s.artifacts:
        con.print(f" checkpoint: {uri} ({size} bytes, sha256 {sha[:12]}…)", markup=False)


def format_summary(summary: RunSummary) -> str:
    """``draw_summary``'s output as plain text, without escape codes."""
    return to_text(draw_summary, summary)


# -- veil budget ----------------------------------------------------------------------------
def draw_budget(con: Console, rows: list[BudgetRow]) -> None:
    """The ``veil budget`` table (lifetime ε, cap, remaining per data set), then any ledger-replacement notes."""
    if not rows:
        con.print("no privacy spend recorded yet")
        return
    con.print(table(
        ["site", "data set", "last run", "run ε", "lifetime ε", "cap", "remaining", "δ", "accountant"],
        ((r.site, r.dataset_id or "-", str(r.run_id), eps(r.run_epsilon), eps(r.spent),
          f"{r.cap:g}" if r.cap is not None else "none", eps(r.remaining),
          f"{r.delta:.0e}" if r.delta else "-", r.accountant or "-") for r in rows), left=2))
    for site, note in dict.fromkeys((r.site, r.ledger_note) for r in rows if r.ledger_note):
        con.print(f" {site}: {note}", markup=False)


# -- veil compare ---------------------------------------------------------------------------
def draw_compare(con: Console, rows: list[CompareRow]) -> None:
    """``veil compare``: one column per run, one row per measure."""
    fields: list[tuple[str, Any]] = [
        ("name", lambda r: r.name), ("status", lambda r: _status(r.status)),
        ("rounds", lambda r: f"{r.rounds_completed}/{r.rounds_planned}"),
        ("sites trained", lambda r: f"{r.sites_trained}/{r.sites_planned}"),
        ("final accuracy", lambda r: "encrypted" if r.accuracy_encrypted else fmt(r.final_accuracy, 4)),
        ("final loss", lambda r: "encrypted" if r.accuracy_encrypted else fmt(r.final_loss, 4)),
        ("max site ε", lambda r: eps(r.max_epsilon)),
        ("δ", lambda r: f"{r.delta:.0e}" if r.delta else "-"),
        ("accountant", lambda r: r.accountant or "-"),
        ("noise σ (mean)", lambda r: fmt(r.mean_noise)),
        ("encryption", lambda r: r.encryption or "none"),
        ("wall time", lambda r: f"{r.wall_seconds:.1f}s" if r.wall_seconds is not None else "-"),
        ("bytes moved", lambda r: mb(r.bytes_moved)),
        ("examples", lambda r: str(r.examples)),
    ]
    t = table(["", *(f"run {r.run_id}" for r in rows)], [], left=1)
    for label, get in fields:
        t.add_row(label, *(get(r) for r in rows))
    con.print(t)


# -- veil metrics ---------------------------------------------------------------------------
def draw_series(con: Console, series: MetricSeries) -> None:
    """``veil metrics``: per-round accuracy, losses, max ε and the ε of the first 8 sites."""
    sites = sorted(series.epsilon_by_site)
    shown = sites[:8]
    cols = ["round", "accuracy", "loss", "train-loss", "max ε", *(f"ε {s}" for s in shown)]
    rows = []
    for i, rn in enumerate(series.rounds):
        acc = "encrypted" if series.encrypted[i] and series.accuracy[i] is None else fmt(series.accuracy[i], 4)
        loss = "encrypted" if series.encrypted[i] and series.loss[i] is None else fmt(series.loss[i], 4)
        rows.append([str(rn), acc, loss, fmt(series.train_loss[i], 4), eps(series.max_epsilon[i]),
                     *(eps(series.epsilon_by_site[s][i]) for s in shown)])
    con.print(table(cols, rows))
    if len(sites) > len(shown):
        con.print(f" ({len(sites) - len(shown)} more sites: --format json lists all)")
