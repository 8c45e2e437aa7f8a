"""The researcher dashboard, driven through the real CLI against stores filled by real short
simulations (one plaintext run, one with CKKS-encrypted evaluation), on SQLite and PostgreSQL.
Every number the CLI prints is checked against the store itself."""

from __future__ import annotations

import csv
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from privacy.ckks import SecretKey
from server.read.summary import load_summary, site_epsilons
from server.store import RunStore
from server.store import schema as S
from simulations.simulate import simulate
from tests.conftest import pg_database
from tests.scenarios import merged, small_scenario
from veil.cli.main import app
from veil.spec import parse_scenario

SPEC = small_scenario(name="dash-plain", seed=5, federation={"sites": 3},
                      privacy={"noise_multiplier": None, "target_epsilon": 6.0},
                      site_policy={"epsilon_cap": 50.0})
ENCRYPTED = merged(SPEC, {"name": "dash-encrypted-eval", "federation": {"sites": 2},
                          "encryption": {"evaluation": "ckks"}})


@dataclass
class Filled:
    store: RunStore
    plain: int
    enc: int
    key: Path
    base: Path


@pytest.fixture(scope="module", params=[pytest.param("sqlite", marks=pytest.mark.slow),
                                        pytest.param("postgresql", marks=pytest.mark.slow)])
def filled(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Filled]:
    base = tmp_path_factory.mktemp(f"dash-{request.param}")

    def fill(url: str) -> Filled:
        store = RunStore(url)
        plain = simulate(parse_scenario(SPEC), store, base / "art", progress=False, ledger_dir=base / "l")
        enc = simulate(parse_scenario(ENCRYPTED), store, base / "art", progress=False, ledger_dir=base / "l")
        return Filled(store, plain.run_id, enc.run_id, base / "art" / f"run-{enc.run_id}" / "keys" / "secret.ckks",
                      base)

    if request.param == "sqlite":
        yield fill(f"sqlite:///{base / 'veil.db'}")
    else:
        with pg_database() as url:
            f = fill(url)
            yield f
            f.store.close()


def cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    if result.exit_code and result.exception is not None:
        import traceback
        traceback.print_exception(result.exception)
    return result.exit_code, result.stdout, result.stderr


def cli_json(*args: str) -> object:
    code, out, err = cli(*args, "--format", "json")
    assert code == 0, err or out
    return json.loads(out)


def _aggregate(store: RunStore, run_id: int, name: str) -> dict[int, float]:
    with store.session() as s:
        return dict(s.execute(select(S.Metric.round_number, S.Metric.value).where(
            S.Metric.run_id == run_id, S.Metric.site_id.is_(None), S.Metric.name == name)).all())


def _last_reported(store: RunStore, run_id: int) -> dict[str, float]:
    with store.session() as s:
        rows = s.execute(select(S.Site.site_key, S.PrivacyEvent.round_number, S.PrivacyEvent.reported_epsilon)
                         .join(S.Site, S.Site.id == S.PrivacyEvent.site_id)
                         .where(S.PrivacyEvent.run_id == run_id).order_by(S.PrivacyEvent.round_number)).all()
    return {site: value for site, _, value in rows}


def test_runs_lists_newest_first_with_numbers_from_the_store(filled: Filled) -> None:
    url = filled.store.url
    rows = cli_json("runs", "--store", url)
    assert [r["run_id"] for r in rows] == [filled.enc, filled.plain]  # type: ignore[index]
    enc, plain = rows  # type: ignore[misc]
    acc = _aggregate(filled.store, filled.plain, "eval-acc")
    assert plain["accuracy"] == pytest.approx(acc[max(acc)]) and not plain["accuracy_encrypted"]
    assert enc["accuracy"] is None and enc["accuracy_encrypted"]  # encrypted: not on the coordinator
    assert plain["max_epsilon"] == pytest.approx(max(_last_reported(filled.store, filled.plain).values()))
    assert plain["rounds_completed"] == 2 and plain["sites_trained"] == 3 and enc["sites_trained"] == 2
    with filled.store.session() as s:
        moved = s.scalar(select(func.sum(S.Round.bytes_down + S.Round.bytes_up)).where(
            S.Round.run_id == filled.plain))
    assert plain["bytes_moved"] == moved

    code, text, _ = cli("runs", "--store", url)
    assert code == 0 and "\x1b[" not in text  # no colour codes when not on a terminal
    lines = text.splitlines()
    plain_line = next(line for line in lines if line.split()[:2] == [str(filled.plain), "dash-plain"])
    assert f"{acc[max(acc)]:.4f}" in plain_line and "completed" in plain_line
    assert text.index("dash-encrypted-eval") < text.index("dash-plain")  # newest first
    assert "encrypted" in next(line for line in lines if "dash-encrypted-eval" in line)

    assert [r["run_id"] for r in cli_json("runs", "--store", url, "--name", "ENCRYPTED")] == [filled.enc]  # type: ignore[index]
    assert [r["run_id"] for r in cli_json("runs", "--store", url, "--limit", "1")] == [filled.enc]  # type: ignore[index]
    assert cli_json("runs", "--store", url, "--status", "failed") == []
    assert len(cli_json("runs", "--store", url, "--since", "2000-01-01", "--until", "2999-12-31")) == 2  # type: ignore[arg-type]
    code, text, _ = cli("runs", "--store", url, "--since", "2999-01-01")
    assert code == 0 and "no runs match" in text
    code, _, err = cli("runs", "--store", url, "--status", "done")
    assert code == 2 and "completed" in err


def test_runs_show_prints_the_stored_rounds_sites_and_spend(filled: Filled) -> None:
    shown = cli_json("runs", "show", str(filled.plain), "--store", filled.store.url)
    truth = load_summary(filled.store, filled.plain)
    acc = _aggregate(filled.store, filled.plain, "eval-acc")
    assert [r["accuracy"] for r in shown["rounds"]] == pytest.approx([acc[1], acc[2]])  # type: ignore[index]
    assert {s["site"]: s["epsilon"] for s in shown["sites"]} == {  # type: ignore[index]
        s.site: pytest.approx(s.epsilon) for s in truth.sites}
    # what the run's end derived and stored is what the accountant gives from the events now
    recomputed = site_epsilons(filled.store, filled.plain, use_derived=False)
    assert {s.site: s.epsilon for s in truth.sites} == {e.site: pytest.approx(e.epsilon) for e in recomputed}
    assert shown["spec"]["name"] == "dash-plain" and shown["planned_rounds"] == 2  # type: ignore[index]
    code, text, _ = cli("runs", "show", str(filled.plain), "--store", filled.store.url)
    assert code == 0
    for site in truth.sites:
        line = next(ln for ln in text.splitlines() if ln.startswith(site.site + " "))
        assert f"{site.epsilon:.3f}" in line and f"{site.noise_multiplier:.3f}" in line
    assert "mlp on mnist-5k (iid), 3 sites, 2 rounds" in text
    assert f"worst-case site ε this run = {truth.max_epsilon:.3f}" in text


def test_compare_puts_runs_side_by_side_and_decrypts_only_with_the_key(filled: Filled) -> None:
    url = filled.store.url
    rows = cli_json("compare", str(filled.plain), str(filled.enc), "--store", url)
    plain, enc = rows  # type: ignore[misc]
    acc = _aggregate(filled.store, filled.plain, "eval-acc")
    assert plain["final_accuracy"] == pytest.approx(acc[2]) and plain["encryption"] is None
    assert enc["final_accuracy"] is None and enc["accuracy_encrypted"] and enc["encryption"] == "ckks evaluation"
    for row, run in ((plain, filled.plain), (enc, filled.enc)):
        assert row["max_epsilon"] == pytest.approx(load_summary(filled.store, run).max_epsilon)
        assert row["rounds_completed"] == 2
    keyed = cli_json("compare", str(filled.plain), str(filled.enc), "--store", url, "--key", str(filled.key))
    truth = load_summary(filled.store, filled.enc, SecretKey.load(filled.key)).rounds[-1]
    assert keyed[1]["final_accuracy"] == truth.accuracy and truth.accuracy is not None  # type: ignore[index]
    assert 0.0 < truth.accuracy <= 1.0
    code, text, _ = cli("compare", str(filled.plain), str(filled.enc), "--store", url)
    assert code == 0
    line = next(ln for ln in text.splitlines() if ln.startswith("final accuracy"))
    assert f"{acc[2]:.4f}" in line and "encrypted" in line
    code, _, err = cli("compare", str(filled.plain), "--store", url)
    assert code == 2 and "at least two" in err
    code, _, err = cli("compare", str(filled.plain), "999", "--store", url)
    assert code == 5 and "no run 999" in err and len(err.strip().splitlines()) == 1


def test_metrics_series_plot_and_png(filled: Filled, tmp_path: Path) -> None:
    url = filled.store.url
    series = cli_json("metrics", str(filled.enc), "--store", url, "--key", str(filled.key))
    assert series["epsilon_by_site"] == {  # type: ignore[index]
        site: [pytest.approx(v) for v in vals] for site, vals in _series_eps(filled.store, filled.enc).items()}
    truth = load_summary(filled.store, filled.enc, SecretKey.load(filled.key))
    assert series["accuracy"] == [r.accuracy for r in truth.rounds]  # type: ignore[index]

    hidden = cli_json("metrics", str(filled.enc), "--store", url)
    assert hidden["accuracy"] == [None, None] and hidden["encrypted"] == [True, True]  # type: ignore[index]
    code, _, err = cli("metrics", str(filled.enc), "--store", url, "--plot")
    assert code != 0 and "encrypted" in err and "--key" in err and len(err.strip().splitlines()) == 1

    code, text, _ = cli("metrics", str(filled.plain), "--store", url, "--plot", "--metric", "epsilon")
    assert code == 0 and "run ε per site" in text and "site-0" in text and "round" in text
    code, text, _ = cli("metrics", str(filled.plain), "--store", url)
    acc = _aggregate(filled.store, filled.plain, "eval-acc")
    assert f"{acc[2]:.4f}" in text.splitlines()[-1]

    png = tmp_path / "m.png"
    code, text, err = cli("metrics", str(filled.plain), "--store", url, "--png", str(png))
    assert code == 0 and f"wrote {png}" in text, err
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 2 * height > 0  # three panels side by side
    import matplotlib.image as mpimg
    import numpy as np

    pixels = mpimg.imread(png)[:, :, :3]
    coloured = (pixels.max(axis=2) - pixels.min(axis=2)) > 0.3  # line colours, not the grey axes
    thirds = np.array_split(coloured, 3, axis=1)
    assert all(part.sum() > 200 for part in thirds)  # each panel has a drawn line
    code, _, err = cli("metrics", str(filled.plain), "--store", url, "--png", str(tmp_path / "m.jpg"))
    assert code != 0 and ".png" in err


def _series_eps(store: RunStore, run_id: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    with store.session() as s:
        for site, value in s.execute(select(S.Site.site_key, S.PrivacyEvent.reported_epsilon)
                                     .join(S.Site, S.Site.id == S.PrivacyEvent.site_id)
                                     .where(S.PrivacyEvent.run_id == run_id)
                                     .order_by(S.PrivacyEvent.round_number)):
            out.setdefault(site, []).append(value)
    return out


def test_budget_answers_per_site_from_the_store(filled: Filled) -> None:
    url = filled.store.url
    rows = cli_json("budget", "--store", url, "--run", str(filled.plain))
    with filled.store.session() as s:
        truth = {site: (life, cap) for site, life, cap in s.execute(
            select(S.Site.site_key, S.PrivacyEvent.lifetime_epsilon, S.PrivacyEvent.epsilon_cap)
            .join(S.Site, S.Site.id == S.PrivacyEvent.site_id)
            .where(S.PrivacyEvent.run_id == filled.plain, S.PrivacyEvent.round_number == 2))}
    assert {r["site"]: (r["spent"], r["cap"]) for r in rows} == truth  # type: ignore[index]
    assert all(r["accountant"] == "pld" and r["remaining"] == pytest.approx(r["cap"] - r["spent"])  # type: ignore[index]
               for r in rows)  # type: ignore[union-attr]
    one = cli_json("budget", "--store", url, "--run", str(filled.plain), "--site", "site-1")
    assert [r["site"] for r in one] == ["site-1"]  # type: ignore[index]
    code, _, err = cli("budget", "--store", url, "--site", "site-77")
    assert code != 0 and "site-77" in err and len(err.strip().splitlines()) == 1


def test_report_is_self_contained_and_labels_the_guarantee_exactly(filled: Filled, tmp_path: Path) -> None:
    out = tmp_path / "report"
    code, text, err = cli("report", str(filled.plain), "--out", str(out), "--store", filled.store.url)
    assert code == 0, err
    assert f"wrote {out / 'report.html'}" in text
    md = (out / "report.md").read_text()
    truth = load_summary(filled.store, filled.plain)
    for site in truth.sites:
        row = next(ln for ln in md.splitlines() if ln.startswith(f"| {site.site} |"))
        assert f"| {site.epsilon:.3f} |" in row and f"| {site.noise_multiplier:.3f} |" in row
    assert "DP-SGD" in md and "Poisson" in md and "Accountant `pld`" in md and "dp-accounting" in md
    assert "sample-level" in md and "not client-level DP" in md
    assert "not differentially private" in md  # metrics are labelled as what they are
    assert "Encryption" in md and "None: the coordinator saw" in md
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 1 and "<table>" in page
    assert (out / "metrics.png").read_bytes()[:4] == b"\x89PNG"

    enc_out = tmp_path / "enc"
    code, _, _ = cli("report", str(filled.enc), "--out", str(enc_out), "--store", filled.store.url)
    enc_md = (enc_out / "report.md").read_text()
    assert code == 0 and "Final evaluation accuracy: encrypted" in enc_md and "CKKS (TenSEAL)" in enc_md
    code, _, _ = cli("report", str(filled.enc), "--out", str(enc_out), "--store", filled.store.url,
                     "--key", str(filled.key))
    accuracy = load_summary(filled.store, filled.enc, SecretKey.load(filled.key)).rounds[-1].accuracy
    assert code == 0 and f"Final evaluation accuracy: {accuracy:.4f}" in (enc_out / "report.md").read_text()


def test_export_writes_csv_json_and_parquet_matching_the_store(filled: Filled, tmp_path: Path) -> None:
    url = filled.store.url
    code, text, err = cli("export", str(filled.plain), "--format", "csv", "--out", str(tmp_path / "csv"),
                          "--store", url)
    assert code == 0, err
    with (tmp_path / "csv" / "rounds.csv").open() as fh:
        rounds = list(csv.DictReader(fh))
    acc = _aggregate(filled.store, filled.plain, "eval-acc")
    assert [float(r["accuracy"]) for r in rounds] == pytest.approx([acc[1], acc[2]])
    with filled.store.session() as s:
        n_events = s.scalar(select(func.count()).where(S.PrivacyEvent.run_id == filled.plain))
        n_part = s.scalar(select(func.count()).select_from(S.Participation).where(
            S.Participation.run_id == filled.plain))
    with (tmp_path / "csv" / "privacy_events.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == n_events == 6

    code, text, _ = cli("export", str(filled.enc), "--format", "json", "--store", url)
    tables = json.loads(text)
    assert code == 0 and set(tables) == {"run", "rounds", "sites", "participation", "privacy_events", "metrics"}
    assert [r["accuracy"] for r in tables["rounds"]] == [None, None]  # encrypted without the key
    assert "ciphertext" not in text and "secret" not in text

    code, _, err = cli("export", str(filled.plain), "--format", "parquet", "--out", str(tmp_path / "pq"),
                       "--store", url)
    assert code == 0, err
    import pyarrow.parquet as pq

    part = pq.read_table(tmp_path / "pq" / "participation.parquet")
    assert part.num_rows == n_part and "status" in part.column_names
    events = pq.read_table(tmp_path / "pq" / "privacy_events.parquet").to_pylist()
    assert {e["site"]: e["reported_epsilon"] for e in events if e["round"] == 2} == pytest.approx(
        _last_reported(filled.store, filled.plain))

    code, _, err = cli("export", "999", "--format", "csv", "--out", str(tmp_path / "none"), "--store", url)
    assert code == 5 and not (tmp_path / "none").exists()


# -- errors: one line, the fix, non-zero exit, no traceback ----------------------------------------
def _one_line_error(args: list[str], *needles: str) -> None:
    code, out, err = cli(*args)
    assert code != 0
    assert "Traceback" not in out + err
    assert len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize("command", [["runs"], ["runs", "show", "1"], ["budget"], ["metrics", "1"],
                                     ["compare", "1", "2"], ["export", "1", "--format", "json"]])
def test_store_problems_give_one_line_with_the_fix(tmp_path: Path, command: list[str]) -> None:
    missing = tmp_path / "nothing.db"
    _one_line_error([*command, "--store", f"sqlite:///{missing}"], "no run store", "veil simulate")
    assert not missing.exists()  # reading never creates a store

    empty = RunStore(f"sqlite:///{tmp_path / 'empty.db'}")
    _one_line_error([*command, "--store", empty.url], "no runs yet", "veil simulate")

    _one_line_error([*command, "--store", "postgresql://postgres@127.0.0.1:1/test"],
                    "cannot reach store", "--store")

    old = RunStore(f"sqlite:///{tmp_path / 'old.db'}")
    with old.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '0002'")
    _one_line_error([*command, "--store", old.url], "veil db upgrade")


def test_a_missing_run_names_the_run_and_the_store(tmp_path: Path) -> None:
    store = RunStore(f"sqlite:///{tmp_path / 's.db'}")
    store.create_run(name="x", spec={}, spec_hash="h", seed=0, num_sites=1, num_rounds=1)
    _one_line_error(["runs", "show", "42", "--store", store.url], "no run 42")
    _one_line_error(["metrics", "42", "--store", store.url], "no run 42")
    _one_line_error(["report", "42", "--out", str(tmp_path / "r"), "--store", store.url], "no run 42")
    assert not (tmp_path / "r").exists()
    import os

    env_store = CliRunner().invoke(app, ["runs", "--format", "json"], env={**os.environ, "VEIL_STORE": store.url})
    assert env_store.exit_code == 0 and [r["name"] for r in json.loads(env_store.stdout)] == ["x"]
