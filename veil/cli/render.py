"""How the CLI draws tables: rich tables, with colour only on a terminal.

Every read command builds plain dataclasses first (``--format json`` prints those); this
module only turns them into text. Piped or captured output gets no escape codes and a wide,
fixed width, so scripts and tests see one row per line.

Every stored string reaches the terminal through ``clean``: control characters (C0, C1, DEL,
bidirectional overrides) become visible escapes such as ``\\x1b``, and long values end in an
ellipsis. Table cells are never read as Rich markup, and a value whose stored form failed its
check (``problems``) is shown as ``invalid``, with the reason in a warning line below.
"""

from __future__ import annotations

import io
import math
import re
import sys
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from server.read.stored import problem_lines

if TYPE_CHECKING:
    from server.read.dashboard import CompareRow, MetricSeries, RunListRow
    from server.read.summary import BudgetRow, RoundRow, RunSummary, SiteRow

PIPE_WIDTH = 240
CELL = 80  # characters of a stored string in a table cell
LINE = 300  # characters of a stored string on a line of its own (an error, a reason)
MAX_WARNINGS = 20
INVALID = "invalid"

# C0 and C1 controls, DEL, and the invisible marks that reorder or break lines (Trojan Source)
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _visible(ch: str) -> str:
    code = ord(ch)
    return _NAMED.get(ch) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def clean(value: object, limit: int = 200) -> str:
    """``value`` as one line that is safe on a terminal: every control character as a visible
    escape (ESC as ``\\x1b``, a newline as ``\\n``), at most ``limit`` characters (``…`` at the end)."""
    raw = value if isinstance(value, str) else str(value)
    raw = raw[: limit + 1]  # more can never be shown: each character takes at least one place
    out: list[str] = []
    size = 0
    for i, ch in enumerate(raw):
        piece = _visible(ch) if _UNSAFE.match(ch) else ch
        room = limit if i == len(raw) - 1 else limit - 1  # keep one place for the ellipsis
        if size + len(piece) > room:
            return "".join(out) + "…"
        out.append(piece)
        size += len(piece)
    return "".join(out)


def console(file: Any = None) -> Console:
    """A console on ``file`` (stdout): colour and terminal width on a TTY, plain and wide otherwise."""
    out = file if file is not None else sys.stdout
    tty = hasattr(out, "isatty") and out.isatty()
    return Console(file=out, highlight=False, soft_wrap=False, width=None if tty else PIPE_WIDTH,
                   force_terminal=None if tty else False, emoji=False)


def to_text(draw: Any, *args: Any) -> str:
    """What ``draw(console, *args)`` prints, as a string without escape codes."""
    buf = io.StringIO()
    draw(Console(file=buf, highlight=False, width=PIPE_WIDTH, force_terminal=False, soft_wrap=False,
                 emoji=False), *args)
    return buf.getvalue().rstrip("\n")


def table(columns: Sequence[str], rows: Iterable[Sequence[Any]], *, title: str | None = None,
          left: int = 1, limit: int = CELL) -> Table:
    """A table whose first ``left`` columns are left-aligned and the rest right-aligned (numbers).

    Header and string cells are plain text (never Rich markup) passed through ``clean``; a
    ``Text`` cell is kept as it is (styled by this module).
    """
    t = Table(box=box.SIMPLE_HEAD, title=title, title_justify="left", title_style="bold",
              header_style="bold", pad_edge=False, show_edge=False)
    for i, name in enumerate(columns):
        t.add_column(Text(clean(name, limit)), justify="left" if i < left else "right", no_wrap=True)
    for row in rows:
        t.add_row(*(c if isinstance(c, Text) else Text(clean(c if isinstance(c, str) else fmt(c), limit))
                    for c in row))
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
        return f"{value:.{digits}f}" if math.isfinite(value) else INVALID
    return str(value)


def checked(problems: dict[str, str], name: str, shown: str) -> str:
    """``shown``, or ``invalid`` when the stored value behind field ``name`` failed its check."""
    return INVALID if name in problems else shown


def say(con: Console, line: str) -> None:
    """Print one line of plain text (never markup), unwrapped: every stored value in it already ``clean``."""
    con.print(Text(line), soft_wrap=True)


def draw_warnings(con: Console, lines: Sequence[str], *, more: str = "--format json lists them all") -> None:
    """One line per stored value that failed its check (at most ``MAX_WARNINGS``), each made safe."""
    for line in lines[:MAX_WARNINGS]:
        say(con, f" warning: {clean(line, LINE)}")
    if len(lines) > MAX_WARNINGS:
        say(con, f" warning: {len(lines) - MAX_WARNINGS} more ({more})")


def mb(n: int) -> str:
    """A byte count in megabytes (10^6 bytes), to two decimals."""
    return f"{n / 1e6:.2f} MB"


def eps(value: float | None) -> str:
    """An ε to three decimals; ``-`` for None."""
    return "-" if value is None else fmt(value, 3)


def exp(value: float | None) -> str:
    """A δ as ``1e-05``; ``-`` for None or 0."""
    return f"{value:.0e}" if value else "-"


def seconds(value: float | None) -> str:
    """Seconds to one decimal with an ``s``; ``-`` for None."""
    return "-" if value is None else f"{value:.1f}s"


def status_text(status: str, problems: dict[str, str] | None = None) -> Text:
    """A status, coloured on a terminal; one outside the known set as ``invalid (<what was stored>)``."""
    if problems and "status" in problems:
        return Text(f"{INVALID} ({clean(status, 24)})", style="red")
    colour = {"completed": "green", "running": "cyan", "failed": "red", "refused": "yellow",
              "stopped": "yellow", "insufficient": "yellow", "interrupted": "red"}.get(status)
    return Text(clean(status, 24), style=colour or "")


# -- veil runs ------------------------------------------------------------------------------
def draw_runs(con: Console, rows: list[RunListRow]) -> None:
    """The ``veil runs`` table, one row per run, plus a warning line when any run's noise was seeded."""
    con.print(table(
        ["run", "name", "status", "mode", "created (UTC)", "rounds", "sites", "accuracy", "max ε", "wall",
         "moved"],
        ([str(r.run_id), r.name, status_text(r.status, r.problems),
          checked(r.problems, "mode", r.mode) + (" (no DP)" if r.no_dp else " (seeded)" if r.noise_seeded else ""),
          (r.created_at or "-")[:19].replace("T", " "),
          f"{r.rounds_completed}/{r.rounds_planned}", f"{r.sites_trained}/{r.sites_planned}",
          "encrypted" if r.accuracy_encrypted else checked(r.problems, "accuracy", fmt(r.accuracy, 4)),
          "not private" if r.no_dp else checked(r.problems, "max_epsilon", eps(r.max_epsilon)),
          checked(r.problems, "wall_seconds", seconds(r.wall_seconds)),
          checked(r.problems, "bytes_moved", mb(r.bytes_moved))]
         for r in rows), left=5))
    if any(r.noise_seeded for r in rows):
        con.print(" runs marked (seeded) are not private: their DP noise is reproducible from the seed",
                  markup=False)
    if any(r.no_dp for r in rows):
        con.print(" runs marked (no DP) are not private: they trained without differential privacy "
                  "(privacy: none, the baseline)", markup=False)
    draw_warnings(con, [line for r in rows for line in problem_lines(f"run {r.run_id}", r.problems)])


# -- veil runs show -------------------------------------------------------------------------
def _spec_lines(s: RunSummary) -> list[str]:
    """The provenance and spec lines of ``veil runs show``: every stored value made safe and short."""
    from server.read.summary import section

    spec = s.spec
    fed, data, train, priv = (section(spec, k) for k in ("federation", "data", "training", "privacy"))

    def v(table_: dict[str, Any], key: str, default: object = "?") -> str:
        return clean(table_.get(key, default), 40)

    who = clean(s.researcher, CELL) if s.researcher else "nobody recorded (a run from before signed requests)"
    lines = [
        f"  {checked(s.problems, 'mode', clean(s.mode, 24))}, created "
        f"{(s.created_at or '-')[:19].replace('T', ' ')} UTC, seed {checked(s.problems, 'seed', str(s.seed))}, "
        f"spec {clean(s.spec_hash[:12], 40)}, code {clean(s.code_version, 64)}",
        f"  requested by {who}",
    ]
    if s.flower_run_id or s.owner:
        ran = " ".join(part for part in (f"as Flower run {clean(s.flower_run_id, 32)}" if s.flower_run_id else "",
                                         f"by {clean(s.owner, CELL)}" if s.owner else "") if part)
        lines.append(f"  ran {ran}")
    if not spec:
        return lines
    target = (f"target ε {v(priv, 'target_epsilon')}" if priv.get("noise_multiplier") is None
              else f"σ {v(priv, 'noise_multiplier')}")
    dp = (f"DP-SGD {target}, C {v(priv, 'max_grad_norm')}, accountant {v(priv, 'accountant')}"
          if priv.get("mechanism") != "none" else "NO DP (not private)")
    where = ("each site's own data" if s.mode == "deployment"
             else f"{v(data, 'source')} ({v(data, 'partitioner')})")
    return [*lines,
            f"  {v(section(spec, 'model'), 'arch')} on {where}, {v(fed, 'sites', s.planned_sites)} sites, "
            f"{v(fed, 'rounds', s.planned_rounds)} rounds, {v(train, 'local_epochs')} local epoch(s), "
            f"batch {v(train, 'batch_size')}, lr {v(train, 'learning_rate')}; {dp}",
            f"  server optimiser: {server_optimizer_text(s.server_optimizer, s.problems)}"]


def server_optimizer_text(described: str | None, problems: dict[str, str]) -> str:
    """A run's server optimiser (``ServerOptimizer.describe()``), ``invalid`` when its stored section
    failed its check, ``-`` when no spec was stored."""
    return checked(problems, "server_optimizer", clean(described, 80) if described else "-")


def _encryption_lines(s: RunSummary) -> list[str]:
    e = s.encryption or {}
    params = e.get("params")
    p: dict[str, Any] = params if isinstance(params, dict) else {}
    on = "+".join(k for k in ("aggregation", "evaluation") if e.get(k) == "ckks")
    lines = [f" encryption: CKKS {on}, key set {clean(e.get('key_id', '?'), 40)} "
             f"(N={clean(p.get('poly_modulus_degree', '?'), 20)}, "
             f"moduli {clean(p.get('coeff_mod_bit_sizes', '?'), 60)} bits, "
             f"scale 2^{clean(p.get('scale_bits', '?'), 20)}); the coordinator only added ciphertexts"]
    if any(r.encrypted for r in s.rounds):
        lines.append(f"   evaluation metrics decrypted with key set {clean(s.decrypted_with, 40)}"
                     if s.decrypted_with else
                     f"   evaluation metrics are encrypted: veil runs show {s.run_id} --key KEYSET/secret.ckks")
    return lines


def draw_summary(con: Console, summary: RunSummary) -> None:
    """``veil runs show``: header, round and site tables, missed participations, encryption and totals."""
    s = summary
    con.print(Text.assemble((f"run {s.run_id}", "bold"), f" ({clean(s.name)}): ",
                            status_text(s.status, s.problems)))
    if s.error:
        say(con, f"  error: {clean(s.error, LINE)}")
    if s.without_dp:
        con.print("  [bold red]NOT PRIVATE[/]: trained without differential privacy (privacy: none), the "
                  "non-private baseline; no ε applies to this run")
    elif s.not_private:
        con.print("  [bold red]NOT PRIVATE[/]: noise reproducible from the seed (--reproducible-noise, for "
                  "simulation research only); the ε below assumes noise nobody else can reproduce")
    elif s.privacy_note:
        say(con, f"  {s.privacy_note}")
    for line in _spec_lines(s):
        say(con, line)
    con.print()
    con.print(table(
        ["round", "status", "accuracy", "loss", "train-loss", "sites", "examples", "moved", "secs"],
        (_round_cells(r) for r in s.rounds), left=2))
    con.print()
    con.print(table(
        ["site", "data set", "train", "test", "rounds", "noise σ", "run ε", "run δ", "accountant",
         "lifetime ε", "cap", "remaining"],
        (_site_cells(site, s.without_dp) for site in s.sites), left=2))
    if s.missed:
        con.print()
        con.print(" sites that did not take part (each site enforces its own policy and ledger):")
        if s.refusals:
            con.print("  refused by sites:")
        con.print(table(
            ["site", "where", "phase", "status", "reason"],
            ((m.site, "pre-flight" if m.phase == "preflight" else f"round {m.round}",
              checked(m.problems, "phase", m.phase), status_text(m.status, m.problems),
              m.reason or m.code or "-") for m in s.missed), left=5, limit=160))
    con.print()
    worst = s.max_epsilon
    if s.epsilon_invalid:
        say(con, " worst-case site ε this run: invalid (some site's stored privacy events fail their "
                       "checks: see the warnings below); no ε of this run can be stated")
    elif s.without_dp:
        con.print(" no ε: this run trained without differential privacy (privacy: none); its model and updates "
                  "protect no record", markup=False)
    elif worst is not None:
        con.print(f" worst-case site ε this run = {worst:.3f} (sample-level DP, each site at its own δ); "
                  "lifetime ε is each site ledger's spend on its data set across runs", markup=False)
    if not s.without_dp and any(site.lifetime_without_dp for site in s.sites):
        con.print(WITHOUT_DP_NOTE, markup=False)
    if s.encryption:
        for line in _encryption_lines(s):
            say(con, line)
    say(con, f" examples trained: {s.examples}   bytes moved: {mb(s.bytes_moved)}"
                   f"   wall time: {checked(s.problems, 'wall_seconds', seconds(s.wall_seconds or 0.0))}")
    for uri, sha, size in s.artifacts:
        say(con, f" checkpoint: {clean(uri)} ({size} bytes, sha256 {clean(sha, 12)}…)")
    draw_warnings(con, s.warnings)


def _round_cells(r: RoundRow) -> list[Any]:
    bad = r.problems

    def hidden(value: float | None, encrypted: bool) -> str:
        return "encrypted" if encrypted and value is None else fmt(value, 4)

    return [str(r.number), status_text(r.status, bad),
            checked(bad, "accuracy", hidden(r.accuracy, r.encrypted)),
            checked(bad, "loss", hidden(r.loss, r.encrypted)), checked(bad, "train_loss", fmt(r.train_loss, 4)),
            f"{checked(bad, 'sites_ok', str(r.sites_ok))}/{checked(bad, 'sites_sampled', str(r.sites_sampled))}",
            checked(bad, "examples", str(r.examples)),
            INVALID if {"bytes_down", "bytes_up"} & set(bad) else mb(r.bytes_down + r.bytes_up),
            checked(bad, "seconds", fmt(r.seconds, 1))]


def _site_cells(site: SiteRow, without_dp: bool = False) -> list[Any]:
    bad = site.problems
    cap = f"{site.epsilon_cap:g}" if site.epsilon_cap is not None else "none"
    if without_dp:  # no mechanism, no ε; the site's ledger records each round as released without DP
        return [site.site, site.dataset_id or "-", checked(bad, "num_train", str(site.num_train or 0)),
                checked(bad, "num_test", str(site.num_test or 0)), site.rounds_joined, "-",
                "not private", "-", "-", "not private", cap, "-"]
    return [site.site, site.dataset_id or "-", checked(bad, "num_train", str(site.num_train or 0)),
            checked(bad, "num_test", str(site.num_test or 0)),
            site.rounds_joined if site.planned_rounds is None  # refuse mode: trained / planned for it
            else checked(bad, "planned_rounds", f"{site.rounds_joined}/{site.planned_rounds}"),
            checked(bad, "noise_multiplier", fmt(site.noise_multiplier)),
            checked(bad, "epsilon", eps(site.epsilon)),
            checked(bad, "delta", exp(site.delta)), _accountant(site.accountant, bad),
            checked(bad, "lifetime_epsilon", _lifetime(site.lifetime_epsilon, site.lifetime_without_dp)),
            checked(bad, "epsilon_cap", cap),
            INVALID if {"epsilon_cap", "lifetime_epsilon"} & set(bad) else eps(site.remaining)]


def _lifetime(value: float | None, without_dp: int) -> str:
    """A lifetime ε, marked NOT PRIVATE when the ledger also released rounds without DP."""
    return eps(value) + (f" NOT PRIVATE (+{without_dp} without DP)" if without_dp else "")


WITHOUT_DP_NOTE = (" NOT PRIVATE (+n without DP): the site's ledger also released n rounds without differential "
                   "privacy (privacy: none); the ε shown composes its DP rounds only, and no lifetime ε holds for "
                   "that data")


def _accountant(name: str | None, problems: dict[str, str]) -> str:
    if name is None:
        return "-"
    return f"{INVALID} ({clean(name, 16)})" if "accountant" in problems else name


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
        ((r.site, r.dataset_id or "-", str(r.run_id), checked(r.problems, "run_epsilon", eps(r.run_epsilon)),
          checked(r.problems, "spent", _lifetime(r.spent, r.without_dp)),
          checked(r.problems, "cap", f"{r.cap:g}" if r.cap is not None else "none"),
          INVALID if {"cap", "spent"} & set(r.problems) else eps(r.remaining),
          checked(r.problems, "delta", exp(r.delta)), _accountant(r.accountant, r.problems)) for r in rows),
        left=2))
    if any(r.without_dp for r in rows):
        con.print(WITHOUT_DP_NOTE, markup=False)
    for site, note in dict.fromkeys((r.site, r.ledger_note) for r in rows if r.ledger_note):
        say(con, f" {clean(site, CELL)}: {clean(note, 600)}")
    draw_warnings(con, [line for r in rows for line in problem_lines(f"site {r.site} (run {r.run_id})",
                                                                      r.problems)])


# -- veil compare ---------------------------------------------------------------------------
def draw_compare(con: Console, rows: list[CompareRow]) -> None:
    """``veil compare``: one column per run, one row per measure."""
    fields: list[tuple[str, Any]] = [
        ("name", lambda r: r.name), ("status", lambda r: status_text(r.status, r.problems)),
        ("rounds", lambda r: f"{r.rounds_completed}/{r.rounds_planned}"),
        ("sites trained", lambda r: f"{r.sites_trained}/{r.sites_planned}"),
        ("final accuracy", lambda r: checked(r.problems, "final_accuracy", "encrypted" if r.accuracy_encrypted
                                             else fmt(r.final_accuracy, 4))),
        ("final loss", lambda r: checked(r.problems, "final_loss", "encrypted" if r.accuracy_encrypted
                                         else fmt(r.final_loss, 4))),
        ("max site ε", _compare_epsilon),
        ("δ", lambda r: checked(r.problems, "delta", exp(r.delta))),
        ("accountant", lambda r: _accountant(r.accountant, r.problems)),
        ("noise σ (mean)", lambda r: checked(r.problems, "mean_noise", fmt(r.mean_noise))),
        ("encryption", lambda r: r.encryption or "none"),
        ("server optimiser", lambda r: server_optimizer_text(r.server_optimizer, r.problems)),
        ("wall time", lambda r: checked(r.problems, "wall_seconds", seconds(r.wall_seconds))),
        ("bytes moved", lambda r: mb(r.bytes_moved)),
        ("examples", lambda r: str(r.examples)),
    ]
    t = table(["", *(f"run {r.run_id}" for r in rows)], [], left=1)
    for label, get in fields:
        t.add_row(label, *(v if isinstance(v, Text) else Text(clean(v, CELL)) for v in (get(r) for r in rows)))
    con.print(t)
    if any(r.no_dp for r in rows):
        con.print(" runs marked (no DP) are not private: they trained without differential privacy "
                  "(privacy: none, the baseline)", markup=False)
    if any(r.noise_seeded for r in rows):
        con.print(" runs marked (seeded) are not private: their DP noise is reproducible from the seed",
                  markup=False)
    draw_warnings(con, [line for r in rows for line in problem_lines(f"run {r.run_id}", r.problems)])


def _compare_epsilon(r: CompareRow) -> str:
    """A run's worst-case site ε for ``veil compare``; a run without DP has none, and says so."""
    if r.no_dp:
        return "not private (no DP)"
    shown = checked(r.problems, "max_epsilon", eps(r.max_epsilon))
    return f"{shown} (seeded)" if r.noise_seeded else shown


# -- veil metrics ---------------------------------------------------------------------------
def draw_series(con: Console, series: MetricSeries) -> None:
    """``veil metrics``: per-round accuracy, losses, max ε and the ε of the first 8 sites."""
    sites = sorted(series.epsilon_by_site)
    shown = sites[:8]
    cols = ["round", "accuracy", "loss", "train-loss", "max ε", *(f"ε {clean(s, 40)}" for s in shown)]
    rows = []
    for i, rn in enumerate(series.rounds):

        def value(what: str, text_: str, rn: int = rn) -> str:
            return INVALID if series.problem(what, rn) else text_

        acc = "encrypted" if series.encrypted[i] and series.accuracy[i] is None else fmt(series.accuracy[i], 4)
        loss = "encrypted" if series.encrypted[i] and series.loss[i] is None else fmt(series.loss[i], 4)
        rows.append([str(rn), value("accuracy", acc), value("loss", loss),
                     value("train-loss", fmt(series.train_loss[i], 4)), value("max ε", eps(series.max_epsilon[i])),
                     *(value(f"ε {s}", eps(series.epsilon_by_site[s][i])) for s in shown)])
    con.print(table(cols, rows))
    if len(sites) > len(shown):
        con.print(f" ({len(sites) - len(shown)} more sites: --format json lists all)")
    draw_warnings(con, [f"run {series.run_id} {key}: {why}" for key, why in series.problems.items()])
