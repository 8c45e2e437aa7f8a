"""The site ledger: lifetime composition, refusal exactly at the cap, tamper evidence."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from privacy import DpSgdEvent, epsilon
from privacy.ledger import BudgetExceeded, Charge, SiteLedger, Spent, fingerprint_arrays, ledger_report
from veil.errors import LedgerError

FP_A = fingerprint_arrays(np.arange(100))
FP_B = fingerprint_arrays(np.arange(101))
EV = DpSgdEvent(1.0, 0.05, 40, 1.0)


def _charge(ledger: SiteLedger, fp: str = FP_A, ev: DpSgdEvent = EV,
            **kw: object) -> Charge | BudgetExceeded | Spent:
    return ledger.charge(fp, ev, delta=1e-5, cap=kw.pop("cap", None), **kw)  # type: ignore[arg-type]


def test_a_claimed_request_pays_for_its_rounds_once_in_the_charge_itself(tmp_path: Path) -> None:
    """The claim is checked inside the charge's transaction: nothing is written when it is spent."""
    mark = "|req:" + "a" * 32
    with SiteLedger(tmp_path / "l") as ledger:
        for rnd in (1, 2):
            assert isinstance(_charge(ledger, run_ref="run-1" + mark, round_number=rnd, claim=(mark, 2)), Charge)
        third = _charge(ledger, run_ref="run-1" + mark, round_number=3, claim=(mark, 2))
        other = _charge(ledger, run_ref="run-9" + mark, round_number=1, claim=(mark, 5))
        fresh = _charge(ledger, run_ref="run-9|req:" + "b" * 32, round_number=1, claim=("|req:" + "b" * 32, 1))
        assert isinstance(third, Spent) and "all 2 of its rounds" in third.detail
        assert isinstance(other, Spent) and "under another run" in other.detail
        assert isinstance(fresh, Charge)
        assert [e.run_ref for e in ledger.entries()] == ["run-1" + mark] * 2 + ["run-9|req:" + "b" * 32]


def test_lifetime_composes_across_runs_and_keeps_data_sets_apart(tmp_path: Path) -> None:
    with SiteLedger(tmp_path / "l") as ledger:
        for run in ("run-1", "run-2"):
            for rnd in (1, 2):
                assert isinstance(_charge(ledger, run_ref=run, round_number=rnd, scope="dataset"), Charge)
        last = _charge(ledger, FP_B, run_ref="run-3", scope="dataset")
        assert isinstance(last, Charge) and last.epsilon_before == 0.0  # another data set (opt-in scope)
        spent = ledger.spent(FP_A, delta=1e-5, scope="dataset")
        assert spent.entries == 4 and spent.epsilon == pytest.approx(epsilon([EV] * 4, 1e-5), rel=1e-12)
        whole = ledger.spent(FP_A, delta=1e-5)  # the default scope composes every data set
        assert whole.epsilon == pytest.approx(epsilon([EV] * 5, 1e-5), rel=1e-12)
        after = [e.epsilon_after for e in ledger.entries(FP_A)]
        assert after == sorted(after)
    # reopened (another process would do the same): same numbers, chain verified
    report = ledger_report(tmp_path / "l")
    (a, b) = sorted(report.datasets, key=lambda d: -d.entries)
    assert (a.entries, a.runs, a.steps) == (4, 2, 160) and a.epsilon == pytest.approx(spent.epsilon)
    assert b.entries == 1
    assert report.whole is not None and report.whole.epsilon == pytest.approx(whole.epsilon)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sigma=st.floats(0.6, 3.0), q=st.floats(0.01, 0.3), steps=st.integers(1, 60), k=st.integers(1, 4),
       accountant=st.sampled_from(["pld", "rdp"]))
def test_refusal_exactly_at_the_cap(tmp_path_factory: pytest.TempPathFactory, sigma: float, q: float,
                                    steps: int, k: int, accountant: str) -> None:
    ev = DpSgdEvent(sigma, q, steps, 1.0)
    cap = epsilon([ev] * k, 1e-5, accountant)  # type: ignore[arg-type]
    with SiteLedger(tmp_path_factory.mktemp("cap") / "l") as ledger:
        results = [ledger.charge(FP_A, ev, delta=1e-5, cap=cap, accountant=accountant)  # type: ignore[arg-type]
                   for _ in range(k + 2)]
        assert all(isinstance(r, Charge) for r in results[:k])  # landing exactly on the cap is allowed
        assert all(isinstance(r, BudgetExceeded) for r in results[k:])  # one step past it is not
        assert results[k - 1].epsilon_after == cap  # type: ignore[union-attr]
        assert len(ledger.entries()) == k  # refusals write nothing
        assert ledger.spent(FP_A, delta=1e-5, accountant=accountant).epsilon <= cap  # type: ignore[arg-type]


def test_affordable_rounds_matches_what_charging_allows(tmp_path: Path) -> None:
    with SiteLedger(tmp_path / "l") as ledger:
        _charge(ledger)
        cap = 5.0
        n = ledger.affordable_rounds(FP_A, EV, 50, cap=cap, delta=1e-5)
        accepted = 0
        while isinstance(_charge(ledger, cap=cap), Charge):
            accepted += 1
        assert accepted == n > 0


def test_ledger_file_is_private(tmp_path: Path) -> None:
    SiteLedger(tmp_path / "l").close()
    assert (tmp_path / "l").stat().st_mode & 0o077 == 0


def _filled(tmp_path: Path, n: int = 3) -> Path:
    with SiteLedger(tmp_path / "l") as ledger:
        for _ in range(n):
            _charge(ledger)
    return tmp_path / "l"


def _sql(path: Path, *statements: str) -> None:
    db = sqlite3.connect(path)
    for stmt in statements:
        db.execute(stmt)
    db.commit()
    db.close()


@pytest.mark.parametrize(
    ("statements", "message"),
    [
        (["UPDATE ledger_entries SET steps = 1 WHERE seq = 2"], "hash chain broken"),
        (["UPDATE ledger_entries SET noise_multiplier = 50 WHERE seq = 1"], "hash chain broken"),
        (["DELETE FROM ledger_entries WHERE seq = 3"], "entries were removed or added"),
        (["DELETE FROM ledger_entries WHERE seq = 2"], "sequence broken"),
        (["DELETE FROM ledger_entries"], "head says 3 entries but 0"),
        (["UPDATE ledger_meta SET value = '9' WHERE key = 'schema_version'"], "schema version '9'"),
        (["ALTER TABLE ledger_entries ADD COLUMN note TEXT"], "unexpected columns"),
        (["DROP TABLE ledger_entries"], "not a Veil ledger"),
    ],
)
def test_tampered_ledger_stops_with_a_clear_error(tmp_path: Path, statements: list[str], message: str) -> None:
    path = _filled(tmp_path)
    _sql(path, *statements)
    before = path.read_bytes()
    with pytest.raises(LedgerError, match=message):
        SiteLedger(path)
    assert path.read_bytes() == before  # never reset or repaired


def test_truncated_and_foreign_files_are_refused_not_reset(tmp_path: Path) -> None:
    path = _filled(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(LedgerError, match=r"damaged|integrity|not a Veil ledger"):
        SiteLedger(path)
    path.write_bytes(b"")
    with pytest.raises(LedgerError, match="empty"):
        SiteLedger(path)
    path.write_bytes(b"not a database at all" * 100)
    with pytest.raises(LedgerError, match="damaged"):
        SiteLedger(path)
    assert path.read_bytes() == b"not a database at all" * 100


@pytest.mark.parametrize("journal", ["-wal", "-journal"])
def test_a_deleted_ledger_with_its_log_left_behind_is_not_recreated(tmp_path: Path, journal: str) -> None:
    path = tmp_path / "l"
    (tmp_path / f"l{journal}").write_bytes(b"x")
    with pytest.raises(LedgerError, match="journal files are present"):
        SiteLedger(path)
    assert not path.exists()
    with pytest.raises(LedgerError, match="does not exist"):
        SiteLedger(tmp_path / "other", create=False)


def _count_verifications(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = SiteLedger._verify

    def counted(self: SiteLedger, conn: object) -> object:
        calls.append(1)
        return real(self, conn)  # type: ignore[arg-type]

    monkeypatch.setattr(SiteLedger, "_verify", counted)
    return calls


def test_one_view_answers_a_preflight_with_one_verification(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A pre-flight's questions (spend, projection, affordable rounds, head, past requests) read one
    verified view, and get the same answers as asking the ledger each time."""
    path = _filled(tmp_path)
    with SiteLedger(path) as ledger:
        calls = _count_verifications(monkeypatch)
        view = ledger.view()
        answers = (view.spent(FP_A, delta=1e-5), view.project(FP_A, [EV] * 3, delta=1e-5),
                   view.affordable_rounds(FP_A, EV, 10, cap=5.0, delta=1e-5), view.head(), view.entries(),
                   view.fingerprints())
        assert len(calls) == 1
        assert answers == (ledger.spent(FP_A, delta=1e-5), ledger.project(FP_A, [EV] * 3, delta=1e-5),
                           ledger.affordable_rounds(FP_A, EV, 10, cap=5.0, delta=1e-5), ledger.head(),
                           ledger.entries(), ledger.fingerprints())
        assert len(calls) == 7  # asked of the ledger itself, each question verifies afresh
        assert answers[3].seq == 3 and answers[1] == pytest.approx(epsilon([EV] * 6, 1e-5), rel=1e-12)


def test_a_tampered_ledger_is_caught_after_a_view(tmp_path: Path) -> None:
    """A view is a snapshot of one verification: the next question verifies again and sees the edit."""
    path = _filled(tmp_path)
    with SiteLedger(path) as ledger:
        view = ledger.view()
        assert view.spent(FP_A, delta=1e-5).entries == 3
        _sql(path, "UPDATE ledger_entries SET noise_multiplier = 50 WHERE seq = 1")  # less spend, on paper
        for question in (ledger.view, ledger.head, lambda: ledger.spent(FP_A, delta=1e-5),
                         lambda: _charge(ledger, cap=100.0)):
            with pytest.raises(LedgerError, match="hash chain broken"):
                question()
        assert view.spent(FP_A, delta=1e-5).epsilon == pytest.approx(epsilon([EV] * 3, 1e-5), rel=1e-12)
