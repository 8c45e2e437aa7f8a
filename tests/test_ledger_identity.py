"""A site's ledger is its own, cannot be lost quietly, and keeps every charge it committed.

Copied or swapped ledgers, a pinned ledger that went missing, an older copy restored over
the newest one, journal files deleted after a crash, two processes creating one ledger at
once, and a ledger written by the previous schema.
"""

from __future__ import annotations

import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from privacy import DpSgdEvent
from privacy.ledger import (
    Charge,
    SiteLedger,
    _hash_row,
    create_ledger,
    fingerprint_arrays,
    ledger_report,
    read_witness,
    witness_path,
)
from tests.sitekit import SiteDriver, make_site, refusal, task
from veil import protocol as P
from veil.errors import LedgerError

FP = fingerprint_arrays(np.arange(100))
EV = DpSgdEvent(1.0, 0.05, 40, 1.0)


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.parent.glob(path.name + "*"))}


def _trained_site(tmp_path: Path, site_id: str, rounds: int = 2) -> SiteDriver:
    driver = SiteDriver(make_site(tmp_path / f"{site_id}.ledger", site_id=site_id, seed=hash(site_id) % 100))
    for r in range(1, rounds + 1):
        assert P.ARRAYS in driver.train(task(run_ref=f"run-{site_id}"), server_round=r)
    return driver


def test_a_copied_or_swapped_ledger_is_refused_and_both_files_are_left_as_they_were(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    _trained_site(a, "site-0")
    _trained_site(b, "site-1")
    # copy site-1's ledger over site-0's (the witness of site-0 stays)
    shutil.copy(b / "site-1.ledger", a / "site-0.ledger")
    before = _files(a / "site-0.ledger")
    with pytest.raises(LedgerError, match="belongs to site 'site-1', not 'site-0'"):
        SiteLedger(a / "site-0.ledger", site_id="site-0")
    assert _files(a / "site-0.ledger") == before  # refused without touching anything
    # swap the two sites' ledgers and their witnesses: each site refuses the other's
    (tmp_path / "c").mkdir()
    _trained_site(tmp_path / "c", "site-0")
    for name in ("site-0.ledger", "site-0.ledger.head"):
        shutil.move(tmp_path / "c" / name, tmp_path / name)
    shutil.move(b / "site-1.ledger", tmp_path / "c" / "site-0.ledger")
    shutil.move(b / "site-1.ledger.head", tmp_path / "c" / "site-0.ledger.head")
    shutil.move(tmp_path / "site-0.ledger", b / "site-1.ledger")
    shutil.move(tmp_path / "site-0.ledger.head", b / "site-1.ledger.head")
    with pytest.raises(LedgerError, match="belongs to site 'site-1'"):
        SiteLedger(tmp_path / "c" / "site-0.ledger", site_id="site-0")
    with pytest.raises(LedgerError, match="belongs to site 'site-0'"):
        SiteLedger(b / "site-1.ledger", site_id="site-1")
    # and the site's own training refuses before anything is charged (this process still has
    # site-1's own ledger open from the rounds above, so it sees the file replaced under it)
    driver = SiteDriver(make_site(b / "site-1.ledger", site_id="site-1"))
    spent = len(SiteLedger(b / "site-1.ledger", readonly=True, create=False).entries())
    said = refusal(driver.train(task()))  # the site answers in one line, and trains nothing
    assert said.code == "site-error" and re.search(r"belongs to site|replaced while in use", said.detail)
    assert len(SiteLedger(b / "site-1.ledger", readonly=True, create=False).entries()) == spent


def test_a_ledger_swapped_while_a_site_process_has_it_open_is_caught_at_the_next_charge(tmp_path: Path) -> None:
    mine = SiteLedger(tmp_path / "mine", site_id="s")
    assert isinstance(mine.charge(FP, EV, delta=1e-5, cap=None), Charge)
    with SiteLedger(tmp_path / "other", site_id="s") as other:
        other.charge(FP, EV, delta=1e-5, cap=None)
    (tmp_path / "other").replace(tmp_path / "mine")
    with pytest.raises(LedgerError, match="replaced while in use"):
        mine.charge(FP, EV, delta=1e-5, cap=None)


def _pinned_site(tmp_path: Path) -> Path:
    from client.daemon import init_ledger

    (tmp_path / "site.yaml").write_text(yaml.safe_dump({
        "site_id": "clinic-a", "data": {"format": "csv", "path": "d.csv", "label": "y"},
        "ledger": "l/clinic.ledger",
        "coordinator": {"address": "127.0.0.1:1", "root_certificates": "ca.crt", "node_key": "k"}}))
    (tmp_path / "l").mkdir()
    init_ledger(tmp_path / "site.yaml")
    return tmp_path / "site.yaml"


def test_a_pinned_ledger_that_is_missing_or_foreign_stops_the_site_until_a_person_decides(tmp_path: Path) -> None:
    from client.daemon import init_ledger, load_site_config

    cfg = load_site_config(_pinned_site(tmp_path))
    assert cfg.ledger_id is not None
    with SiteLedger(cfg.ledger, site_id="clinic-a", ledger_id=cfg.ledger_id, create=False) as led:
        led.charge(FP, EV, delta=1e-5, cap=None)
    # deleted (with its witness): never silently recreated, whatever the caller asks
    cfg.ledger.unlink()
    witness_path(cfg.ledger).unlink()
    with pytest.raises(LedgerError, match=f"pins ledger {cfg.ledger_id}: restore it"):
        SiteLedger(cfg.ledger, site_id="clinic-a", ledger_id=cfg.ledger_id, create=True)
    assert not cfg.ledger.exists()
    with pytest.raises(LedgerError, match="missing"):
        init_ledger(tmp_path / "site.yaml")
    # a fresh ledger made by hand at that path: another id than the pinned one
    create_ledger(cfg.ledger, "clinic-a")
    with pytest.raises(LedgerError, match=f"pins ledger {cfg.ledger_id}"):
        SiteLedger(cfg.ledger, site_id="clinic-a", ledger_id=cfg.ledger_id, create=False)
    cfg.ledger.unlink()
    # only an explicit, recorded decision starts a new one
    with pytest.raises(Exception, match="--reason"):
        init_ledger(tmp_path / "site.yaml", new_ledger=True)
    said = init_ledger(tmp_path / "site.yaml", new_ledger=True, reason="disk failure 2026-11-20, no backup")
    assert f"replacing lost ledger {cfg.ledger_id}" in said
    new = load_site_config(tmp_path / "site.yaml")
    assert new.ledger_id not in (None, cfg.ledger_id)
    report = ledger_report(new.ledger)
    assert report.predecessor == cfg.ledger_id
    assert report.head.replaced_reason == "disk failure 2026-11-20, no backup"
    from typer.testing import CliRunner

    from veil.cli.main import app

    out = CliRunner().invoke(app, ["budget", "--ledger", str(new.ledger)])
    assert out.exit_code == 0 and f"to replace lost ledger {cfg.ledger_id}: disk failure" in out.output


def test_an_older_copy_restored_over_the_newest_is_caught_by_the_sites_witness(tmp_path: Path) -> None:
    path = tmp_path / "site.ledger"
    with SiteLedger(path, site_id="s") as led:
        led.charge(FP, EV, delta=1e-5, cap=None)
        backup = path.read_bytes()  # a backup of the .ledger file alone: complete (no -wal)
        for _ in range(2):
            led.charge(FP, EV, delta=1e-5, cap=None)
    witnessed = read_witness(path)
    assert witnessed is not None and witnessed.seq == 3
    path.write_bytes(backup)  # "restore from last week's backup"
    with pytest.raises(LedgerError, match=r"gone backwards: it holds 1 entries, but this site already wrote "
                                          r"entry 3"):
        SiteLedger(path, site_id="s")
    with pytest.raises(LedgerError, match="missing, but its head witness"):  # deleted: the witness remembers
        path.unlink()
        SiteLedger(path, site_id="s")


def test_committed_charges_live_in_the_main_file_not_in_a_separate_log(tmp_path: Path) -> None:
    path = tmp_path / "site.ledger"
    led = SiteLedger(path, site_id="s")
    charges = [led.charge(FP, EV, delta=1e-5, cap=None) for _ in range(3)]
    # while the ledger is still open: no -wal/-shm/-journal file holds anything
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site.ledger", "site.ledger.head"]
    shutil.copy(path, tmp_path / "copy.ledger")  # a backup that copies the .ledger alone
    led.close()
    with SiteLedger(tmp_path / "copy.ledger", site_id="s") as copy:
        assert [e.entry_id for e in copy.entries()] == [c.entry_id for c in charges]  # type: ignore[union-attr]
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "delete"


@pytest.mark.slow  # a second process, 120 races: ~1 min
def test_two_processes_creating_one_ledger_at_once_never_lose_a_charge(tmp_path: Path) -> None:
    trials = 120
    worker = subprocess.Popen([sys.executable, str(Path(__file__).with_name("ledger_race_worker.py"))],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert worker.stdin is not None and worker.stdout is not None
    assert worker.stdout.readline().strip() == "ready"
    failures: list[str] = []
    try:
        for i in range(trials):
            trial = tmp_path / f"t{i}"
            trial.mkdir()
            worker.stdin.write(f"race {trial / 'site.ledger'} {trial}\n")
            worker.stdin.flush()
            assert worker.stdout.readline().strip() == "done"
            said = [(trial / str(k)).read_text() for k in range(2)]
            charged = {line.split()[1] for line in said if line.startswith("charged ")}
            with SiteLedger(trial / "site.ledger", site_id="site-race", create=False) as led:
                on_file = {e.entry_id for e in led.entries()}
            if charged - on_file or any(not line.startswith("charged ") for line in said):
                failures.append(f"trial {i}: {said}; ledger holds {len(on_file)}")
    finally:
        worker.stdin.close()
        worker.wait(timeout=30)
    assert not failures, failures[:5]


def _v1_ledger(path: Path, rows: int = 2) -> None:
    """A ledger as Veil's schema 1 wrote it (WAL journal, no site binding, no rng column)."""
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE ledger_meta (key VARCHAR(64) PRIMARY KEY, value VARCHAR(200) NOT NULL)")
    cols = ("seq", "entry_id", "fingerprint", "run_ref", "round", "mechanism", "sampling", "noise_multiplier",
            "sample_rate", "steps", "max_grad_norm", "delta", "accountant", "accountant_version", "epsilon_after",
            "epsilon_cap", "created_at", "prev_hash", "entry_hash")
    db.execute(f"CREATE TABLE ledger_entries ({', '.join(cols)})")
    prev = "0" * 64
    for seq in range(1, rows + 1):
        row = {"seq": seq, "entry_id": f"{seq:032x}", "fingerprint": FP, "run_ref": "old", "round": seq,
               "mechanism": "dp-sgd", "sampling": "poisson", "noise_multiplier": 1.0, "sample_rate": 0.05,
               "steps": 40, "max_grad_norm": 1.0, "delta": 1e-5, "accountant": "pld", "accountant_version": "v",
               "epsilon_after": 1.0, "epsilon_cap": None, "created_at": "2026-11-01", "prev_hash": prev}
        row["entry_hash"] = prev = _hash_row(row)
        db.execute(f"INSERT INTO ledger_entries VALUES ({', '.join('?' * len(cols))})", [row[c] for c in cols])
    for key, value in {"schema_version": "1", "ledger_id": "1" * 32, "head_seq": str(rows), "head_hash": prev,
                       "created_at": "2026-11-01"}.items():
        db.execute("INSERT INTO ledger_meta VALUES (?, ?)", (key, value))
    db.commit()
    db.close()


def test_a_schema_1_ledger_is_upgraded_in_place_and_bound_to_the_first_site_that_opens_it(tmp_path: Path) -> None:
    path = tmp_path / "old.ledger"
    _v1_ledger(path)
    assert ledger_report(path).head.seq == 2  # read-only: readable, not changed
    with SiteLedger(path, site_id="site-0") as led:
        assert [e.rng for e in led.entries()] == [None, None]  # schema 1 never recorded it
        led.charge(FP, EV, delta=1e-5, cap=None, rng="seeded")
        assert [e.rng for e in led.entries()] == [None, None, "seeded"]
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    assert not Path(f"{path}-wal").exists()
    with pytest.raises(LedgerError, match="belongs to site 'site-0'"):
        SiteLedger(path, site_id="site-1")
    # an entry edited to claim another noise source breaks the chain, old rows and new alike
    db = sqlite3.connect(path)
    db.execute("UPDATE ledger_entries SET rng = 'os-entropy' WHERE seq = 3")
    db.commit()
    db.close()
    with pytest.raises(LedgerError, match="hash chain broken"):
        SiteLedger(path, site_id="site-0")
