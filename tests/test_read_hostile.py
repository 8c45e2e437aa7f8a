"""The read commands never trust what the store holds (issue 14).

A store written through the coordinator's own writer (``RoundWriter``, ``end_run``) then gets
hostile values planted with plain SQL, as an older Veil, a hand-edited database or another
tool sharing a PostgreSQL store could leave them: a site id with terminal escapes, a 10 KB run
name full of markup, an unknown accountant, σ = 1e-300 (and σ = 0.01, which keeps PLD busy for
minutes), steps 2.5, q = 7, NaN and ±inf in ε and metrics, broken JSON, unknown statuses.
Every read command is then run through the real CLI: it must exit 0, print no traceback and no
raw control character, stay bounded, and show each hostile value as invalid, never as a number.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text, update
from typer.testing import CliRunner

from privacy.accounting import epsilon
from privacy.events import DpSgdEvent
from server.checks import EvalReply, TrainReply
from server.lifecycle import create_run, end_run
from server.rounds import RoundWriter
from server.store import RunStore
from server.store import schema as S
from tests.conftest import pg_database
from tests.scenarios import small_scenario
from veil import protocol as P
from veil.cli.main import app
from veil.cli.render import clean
from veil.spec import parse_scenario

ESCAPES = "\x1b[2J\x1b]0;pwned\x07\r"
HOSTILE_SITE = f"{ESCAPES}evil\u202esite"
HOSTILE_NAME = "[/bold] <script>alert(1)</script> $\\frac{$ | `x` " + "\x1b[31mred\x1b[0m" * 10 + "N" * 10_000
SITES = ["site-0", HOSTILE_SITE, "site-gdp", "site-tiny", "site-slow", "site-q", "site-steps", "site-nan"]
EVENT = DpSgdEvent(1.0, 0.05, 20, 1.0)
# raw control characters a terminal would act on (JSON and our own line breaks aside)
RAW_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


@dataclass
class Hostile:
    url: str
    good: int
    bad: int
    backend: str
    derived: dict[str, float]  # each site's run ε derived at run end, before anything was planted
    name: str  # the hostile run name as planted (PostgreSQL keeps VARCHAR(200) to 200 characters)


def _reply(site: str, index: int, rn: int) -> TrainReply:
    eps = epsilon([EVENT] * rn, 1e-5, "pld")
    life = P.LifetimeSpend(f"ds{index}", f"e{rn}", eps, 1e-5, "pld", 10.0)
    head = P.LedgerHead(f"ledger{index}", rn, "a" * 64)
    report = P.PrivacyReport(EVENT, 1e-5, "pld", "dp-accounting x", eps, lifetime=life)
    return TrainReply(P.SiteInfo(site, "cpu", 0.1, 100), report, life, head, 500, 1000)


def _run(store: RunStore, name: str, sites: list[str]) -> int:
    """A two-round run written exactly as the coordinator writes one."""
    scenario = parse_scenario(small_scenario(name=name, federation={"sites": len(sites)}))
    run_id = create_run(store, scenario, "simulation")
    writer = RoundWriter(store, run_id, num_rounds=2, min_sites=1)
    nodes = list(range(len(sites)))
    for rn in (1, 2):
        writer.open_round(rn, nodes, 1000)
        with store.session() as s:
            for node, site in zip(nodes, sites, strict=True):
                writer.trained(s, rn, node, _reply(site, node, rn), 1000, {"train-loss": 0.5})
                writer.evaluated(s, rn, node, EvalReply(P.SiteInfo(site, "cpu", 0.1, 100), 100, 0.4, 0.8), 1000)
            writer.refused(s, rn, 99, "site-refuser", P.Refusal("budget-exhausted", "no budget left"), 1000)
        writer.round.ok, writer.round.train_loss = len(sites), 0.5
        writer.round.max_epsilon = epsilon([EVENT] * rn, 1e-5, "pld")
        writer.close_round(rn, 0.8, 0.4)
    end_run(store, run_id, "completed")
    return run_id


def _plant(store: RunStore, run_id: int, backend: str, name: str) -> None:
    """Hostile values, written with SQL straight into the tables (no Veil code checks them)."""
    PE, M = S.PrivacyEvent, S.Metric
    nan, inf = float("nan"), float("inf")
    sqlite = backend == "sqlite"
    with store.engine.begin() as conn:
        ids = dict(conn.execute(select(S.Site.site_key, S.Site.id).where(S.Site.run_id == run_id)).all())

        def events(site: str, **values: object) -> None:
            conn.execute(update(PE).where(PE.run_id == run_id, PE.site_id == ids[site]).values(**values))

        def underived(site: str) -> None:  # readers must recompute: the accountant would run
            conn.execute(update(S.Site).where(S.Site.id == ids[site]).values(derived_epsilon=None))

        events("site-gdp", accountant="gdp")
        underived("site-gdp")
        events("site-tiny", noise_multiplier=1e-300)
        underived("site-tiny")
        events("site-slow", noise_multiplier=0.01)  # PLD at σ = 0.01 runs for minutes
        underived("site-slow")
        events("site-q", sample_rate=7.0)
        if sqlite:  # PostgreSQL refuses text in a float column and 2.5 in an integer one
            conn.execute(text("UPDATE privacy_events SET steps = 2.5 WHERE site_id = :a"),
                         {"a": ids["site-steps"]})
            conn.execute(text("UPDATE privacy_events SET reported_epsilon = 'NaN', lifetime_epsilon = 1e999 "
                              "WHERE site_id = :a"), {"a": ids["site-nan"]})
        else:
            events("site-steps", steps=-3)
            events("site-nan", reported_epsilon=nan, lifetime_epsilon=inf)
        conn.execute(update(S.Site).where(S.Site.id == ids["site-nan"]).values(derived_epsilon=nan if not sqlite
                                                                                else inf))
        conn.execute(update(S.Run).where(S.Run.id == run_id).values(
            name=name, status="weird", spec_json="{not json", encryption_json='[1, 2',
            error="boom" + ESCAPES + "\n" + "E" * 5000, researcher=f"mallory{ESCAPES}", wall_seconds=-inf))
        conn.execute(update(S.Round).where(S.Round.run_id == run_id, S.Round.number == 1).values(
            status="weird", seconds=nan if not sqlite else inf))
        for name, value in (("eval-acc", inf), ("eval-loss", -inf), ("train-loss", inf), ("epsilon", inf)):
            conn.execute(update(M).where(M.run_id == run_id, M.round_number == 1, M.site_id.is_(None),
                                         M.name == name).values(value=value))
        conn.execute(update(M).where(M.run_id == run_id, M.round_number == 2, M.site_id.is_(None),
                                     M.name == "eval-acc").values(value=nan if not sqlite else 7.0))
        conn.execute(update(S.Participation).where(S.Participation.run_id == run_id,
                                                   S.Participation.status == "refused").values(
            status="weird", reason=f"refused {ESCAPES}" + "R" * 10_000))
        conn.execute(update(S.Site).where(S.Site.id == ids[HOSTILE_SITE]).values(
            dataset_id=f"ds{ESCAPES}"[:32]))


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def hostile(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    def fill(url: str) -> Hostile:
        store = RunStore(url)
        good = _run(store, "healthy", ["site-0", "site-1"])
        bad = _run(store, "to-be-hostile", SITES)
        with store.session() as s:
            derived = {key: value for key, value in s.execute(
                select(S.Site.site_key, S.Site.derived_epsilon).where(S.Site.run_id == bad))}
        name = HOSTILE_NAME if request.param == "sqlite" else HOSTILE_NAME[:200]
        _plant(store, bad, request.param, name)
        store.close()
        return Hostile(url, good, bad, request.param, derived, name)

    if request.param == "sqlite":
        yield fill(f"sqlite:///{tmp_path_factory.mktemp('hostile') / 'veil.db'}")
    else:
        with pg_database() as url:
            yield fill(url)


def cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def _safe(code: int, out: str, err: str, *, bound: int = 60_000, line: int | None = 1000) -> str:
    """The command succeeded, printed no traceback and nothing a terminal would act on, and stayed bounded."""
    assert code == 0, err or out
    assert "Traceback" not in out + err
    bad = RAW_CONTROL.search(out + err)
    assert bad is None, f"raw control character {bad.group()!r} in the output"
    assert len(out) + len(err) < bound
    if line is not None:
        assert max((len(text_) for text_ in out.splitlines()), default=0) <= line
    return out


def _strict_json(out: str) -> Any:
    def refuse(token: str) -> object:
        raise AssertionError(f"invalid JSON token {token}")

    return json.loads(out, parse_constant=refuse)


def _json(code: int, out: str, err: str) -> Any:
    """``--format json`` output: safe and strictly valid JSON (exact stored strings make long lines)."""
    return _strict_json(_safe(code, out, err, bound=10**6, line=None))


def _line(out: str, start: str) -> str:
    return next(line for line in out.splitlines() if line.startswith(start))


INVALID_EVENTS = ["site-gdp", "site-tiny", "site-slow", "site-q", "site-steps"]


def test_runs_list_marks_the_run_not_its_numbers(hostile: Hostile) -> None:
    out = _safe(*cli("runs", "--store", hostile.url))
    line = _line(out, f"{hostile.bad} ")
    assert "invalid (weird)" in line and "\\x1b[31mred" in line and "N" * 300 not in line
    cells = line.split()
    assert cells[-3:-1] == ["invalid", "invalid"] or "invalid" in cells[-4:]  # max ε and wall time
    assert "warning:" in out and "max_epsilon" in out and f"veil runs show {hostile.bad}" in out
    assert "inf" not in line and "nan" not in line
    rows = _json(*cli("runs", "--store", hostile.url, "--format", "json"))
    bad = next(r for r in rows if r["run_id"] == hostile.bad)
    assert bad["name"] == hostile.name and bad["max_epsilon"] is None and "max_epsilon" in bad["problems"]
    good = next(r for r in rows if r["run_id"] == hostile.good)
    assert good["max_epsilon"] > 0 and not good["problems"]


def test_runs_show_shows_each_hostile_value_as_invalid(hostile: Hostile) -> None:
    start = time.monotonic()
    out = _safe(*cli("runs", "show", str(hostile.bad), "--store", hostile.url))
    assert time.monotonic() - start < 60  # σ = 0.01 never reached the accountant
    header = out.strip().splitlines()[0]
    assert header.startswith(f"run {hostile.bad} ([/bold] <script>") and "invalid (weird)" in header
    assert len(header) < 300 and header.count("\\x1b") >= 2
    assert "  error: boom\\x1b[2J\\x1b]0;pwned\\x07\\r\\nEEE" in out  # one line, escapes visible
    assert "requested by mallory\\x1b[2J" in out
    for site in INVALID_EVENTS:  # columns: site, data set, train, test, rounds, noise σ, run ε, ...
        cells = _line(out, f"{site} ").split()
        assert cells[5:7] == ["invalid", "invalid"], cells  # the ε derived before the planting is not shown
    assert _line(out, "site-0 ").split()[6] == f"{hostile.derived['site-0']:.3f}"
    evil = _line(out, clean(HOSTILE_SITE, 80)[:20])
    assert "\\x1b[2J" in evil and "\\u202e" in evil and f"{hostile.derived[HOSTILE_SITE]:.3f}" in evil
    nan_cells = _line(out, "site-nan ").split()  # its events are sound: ε recomputed, not the bad cache
    assert nan_cells[6] == f"{hostile.derived['site-nan']:.3f}" and nan_cells[9:] == ["invalid", "10", "invalid"]
    round_one = next(line for line in out.splitlines() if line.split()[:1] == ["1"])
    assert "invalid (weird)" in round_one and round_one.split().count("invalid") >= 4
    assert "worst-case site ε this run: invalid" in out
    for needle in ("accountant 'gdp'", "σ 1e-300 is below 0.1", "σ 0.01 is below 0.1", "q 7 is above 1",
                   "spec: not valid JSON", "encryption: not valid JSON", "status: 'weird' is not one of"):
        assert needle in out, needle
    assert "R" * 200 not in out  # the 10 KB refusal reason is cut
    assert out.count(" warning: ") >= 10


def test_runs_show_json_is_valid_and_names_every_problem(hostile: Hostile) -> None:
    shown = _json(*cli("runs", "show", str(hostile.bad), "--store", hostile.url, "--format", "json"))
    assert isinstance(shown, dict)
    sites = {s["site"]: s for s in shown["sites"]}
    for site in INVALID_EVENTS:
        assert sites[site]["epsilon"] is None and "epsilon" in sites[site]["problems"], site
    assert sites["site-0"]["epsilon"] == pytest.approx(hostile.derived["site-0"])
    assert sites[HOSTILE_SITE]["epsilon"] == pytest.approx(hostile.derived[HOSTILE_SITE])  # exact id kept
    assert sites["site-nan"]["lifetime_epsilon"] is None and "lifetime_epsilon" in sites["site-nan"]["problems"]
    assert shown["max_epsilon"] is None and shown["spec"] == {} and shown["encryption"] is None
    assert shown["name"] == hostile.name and set(shown["problems"]) >= {"status", "spec", "encryption",
                                                                        "wall_seconds"}
    assert shown["rounds"][0]["accuracy"] is None and "accuracy" in shown["rounds"][0]["problems"]


def test_compare_and_metrics(hostile: Hostile, tmp_path: Path) -> None:
    url = hostile.url
    out = _safe(*cli("compare", str(hostile.good), str(hostile.bad), "--store", url))
    eps_line = _line(out, "max site ε")
    assert eps_line.split()[-1] == "invalid" and re.search(r"\d\.\d{3}", eps_line)  # the healthy run's ε stays
    assert "invalid (weird)" in _line(out, "status")
    rows = _json(*cli("compare", str(hostile.good), str(hostile.bad), "--store", url, "--format", "json"))
    assert rows[1]["max_epsilon"] is None and rows[1]["mean_noise"] is None

    out = _safe(*cli("metrics", str(hostile.bad), "--store", url))
    first = next(line for line in out.splitlines() if line.split()[:1] == ["1"])
    assert first.split()[1:5] == ["invalid"] * 4  # accuracy, loss, train-loss, max ε of round 1
    assert "\\x1b[2J" in out and "inf" not in first
    series = _json(*cli("metrics", str(hostile.bad), "--store", url, "--format", "json"))
    assert series["epsilon_by_site"]["site-nan"] == [None, None]
    assert "ε site-nan, round 1" in series["problems"]
    for metric in ("epsilon", "loss"):
        _safe(*cli("metrics", str(hostile.bad), "--store", url, "--plot", "--metric", metric))
    code, out, err = cli("metrics", str(hostile.bad), "--store", url, "--plot")  # no valid accuracy at all
    assert code == 1 and "no valid evaluation accuracy" in err and len(err.strip().splitlines()) == 1
    png = tmp_path / "m.png"
    out = _safe(*cli("metrics", str(hostile.bad), "--store", url, "--png", str(png)))
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_export_keeps_the_stored_values_exactly_as_valid_files(hostile: Hostile, tmp_path: Path) -> None:
    url = hostile.url
    tables = _json(*cli("export", str(hostile.bad), "--format", "json", "--store", url))
    assert isinstance(tables, dict)
    run = tables["run"][0]
    assert run["name"] == hostile.name and run["spec_json"] == "{not json" and run["status"] == "weird"
    assert run["wall_seconds"] == "-Infinity" and "status" in run["problems"]
    events = {(e["site"], e["round"]): e for e in tables["privacy_events"]}
    assert events[("site-gdp", 1)]["accountant"] == "gdp"
    assert events[("site-tiny", 1)]["noise_multiplier"] == 1e-300
    assert events[("site-nan", 1)]["reported_epsilon"] == "NaN"
    if hostile.backend == "sqlite":
        assert events[("site-steps", 1)]["steps"] == 2.5
    _safe(*cli("export", str(hostile.bad), "--format", "json", "--out", str(tmp_path / "e.json"), "--store", url))
    assert _strict_json((tmp_path / "e.json").read_text())["run"][0]["name"] == hostile.name
    _safe(*cli("export", str(hostile.bad), "--format", "csv", "--out", str(tmp_path / "csv"), "--store", url))
    with (tmp_path / "csv" / "run.csv").open(newline="") as fh:
        assert next(csv.DictReader(fh))["name"] == hostile.name
    with (tmp_path / "csv" / "sites.csv").open(newline="") as fh:
        assert HOSTILE_SITE in {row["site"] for row in csv.DictReader(fh)}
    _safe(*cli("export", str(hostile.bad), "--format", "parquet", "--out", str(tmp_path / "pq"), "--store", url))
    import pyarrow.parquet as pq

    rows = pq.read_table(tmp_path / "pq" / "privacy_events.parquet").to_pylist()
    assert {r["accountant"] for r in rows} >= {"gdp", "pld"} and len(rows) == 2 * len(SITES)


def test_report_escapes_for_markdown_and_html(hostile: Hostile, tmp_path: Path) -> None:
    out_dir = tmp_path / "rep"
    _safe(*cli("report", str(hostile.bad), "--out", str(out_dir), "--store", hostile.url))
    md = (out_dir / "report.md").read_text()
    page = (out_dir / "report.html").read_text()
    for body in (md, page):
        assert RAW_CONTROL.search(body) is None and "<script>" not in body and "N" * 300 not in body
    assert "Worst-case site: **invalid**" in md and "Stored values that failed their checks" in md
    for site in INVALID_EVENTS:  # site, records, rounds, σ, q, steps, C, run ε, δ, lifetime ε, cap, remaining
        cells = [c.strip() for c in next(line for line in md.splitlines() if line.startswith(f"| {site} |"))
                 .strip("|").split("|")]
        assert cells[3:8] == ["invalid"] * 5, cells
    assert "\\\\x1b\\[2J" in md  # the site id: escape visible, Markdown punctuation escaped
    assert "&lt;script&gt;" in page and "Privacy report: run" in page


def test_budget_reads_the_store_without_trusting_it(hostile: Hostile) -> None:
    out = _safe(*cli("budget", "--store", hostile.url))
    assert "invalid" in _line(out, "site-nan ") and "\\x1b[2J" in out
    rows = _json(*cli("budget", "--store", hostile.url, "--format", "json"))
    nan_row = next(r for r in rows if r["site"] == "site-nan")
    assert nan_row["run_epsilon"] is None and nan_row["spent"] is None and nan_row["remaining"] is None


def test_a_real_process_shows_the_run_quickly_and_safely(hostile: Hostile) -> None:
    """``veil runs show`` as a person runs it: a fresh process, bounded in time (σ = 0.01 would keep
    the PLD accountant busy for minutes) and in what it prints."""
    env = {**os.environ, "VEIL_STORE": hostile.url, "COLUMNS": "120"}
    for args in (["runs", "show", str(hostile.bad)], ["runs"]):
        done = subprocess.run([sys.executable, "-m", "veil.cli", *args], capture_output=True, text=True,
                              timeout=90, env=env, check=False)
        _safe(done.returncode, done.stdout, done.stderr)


# -- the pieces, one by one ------------------------------------------------------------------------
@pytest.mark.parametrize(("raw", "limit", "shown"), [
    ("site-0", 80, "site-0"),
    ("\x1b[2J", 80, "\\x1b[2J"),
    ("a\rb\nc\td\x00e\x7ff\x9bg", 80, "a\\rb\\nc\\td\\x00e\\x7ff\\x9bg"),
    ("right\u202eleft", 80, "right\\u202eleft"),
    ("x" * 100, 10, "x" * 9 + "…"),
    ("\x1b" * 100, 10, "\\x1b\\x1b…"),
    ("abcde", 5, "abcde"),
])
def test_clean_escapes_control_characters_and_bounds_length(raw: str, limit: int, shown: str) -> None:
    assert clean(raw, limit) == shown
    assert len(clean(raw, limit)) <= limit


@pytest.mark.parametrize(("event", "reason"), [
    ((1, 1.0, 0.05, 20, 1.0, 1e-5, "pld"), None),
    ((1, 1e-300, 0.05, 20, 1.0, 1e-5, "pld"), "σ 1e-300 is below 0.1"),
    ((1, 0.0, 0.05, 20, 1.0, 1e-5, "pld"), "σ 0 is below"),
    ((1, math.nan, 0.05, 20, 1.0, 1e-5, "pld"), "σ not finite"),
    ((1, "1.0", 0.05, 20, 1.0, 1e-5, "pld"), "σ not a number"),
    ((1, 1.0, 7.0, 20, 1.0, 1e-5, "pld"), "q 7 is above 1"),
    ((1, 1.0, 0.0, 20, 1.0, 1e-5, "pld"), "q 0 is not above 0"),
    ((1, 1.0, 0.05, 2.5, 1.0, 1e-5, "pld"), "steps not a whole number"),
    ((1, 1.0, 0.05, -1, 1.0, 1e-5, "pld"), "steps -1 is below 0"),
    ((1, 1.0, 0.05, 20, 1.0, 1.0, "pld"), "δ 1 is not below 1"),
    ((1, 1.0, 0.05, 20, 1.0, 1e-5, "gdp"), "accountant 'gdp' is not one of"),
])
def test_stored_events_are_checked_before_any_accountant(event: tuple, reason: str | None) -> None:
    from server.read.stored import StoredEvent, check_event

    checked = check_event(*event)
    if reason is None:
        assert isinstance(checked, StoredEvent) and checked.steps == 20
    else:
        assert isinstance(checked, str) and reason in checked and checked.startswith("round 1: ")
