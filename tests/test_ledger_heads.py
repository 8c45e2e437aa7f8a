"""The coordinator's witness of each site's ledger: it may grow, never shrink or be swapped,
except by an explicit, recorded replacement. On SQLite and PostgreSQL."""

from __future__ import annotations

from sqlalchemy import select

from server.ledger_heads import LedgerWitness, judge
from server.store import RunStore
from server.store import schema as S
from veil import protocol as P

A, B = "a" * 32, "b" * 32


def head(ledger: str, seq: int, h: str = "1", predecessor: str | None = None) -> P.LedgerHead:
    return P.LedgerHead(ledger, seq, h * 64, predecessor, "disk died" if predecessor else None)


def known(ledger: str, seq: int, h: str = "1") -> S.LedgerHead:
    return S.LedgerHead(site_key="site-0", ledger_id=ledger, seq=seq, entry_hash=h * 64)


def test_judge_lets_a_ledger_grow_and_refuses_every_way_of_going_backwards() -> None:
    assert judge("site-0", None, head(A, 0)).refusal is None  # first contact
    assert judge("site-0", known(A, 3), head(A, 3)).refusal is None  # unchanged
    assert judge("site-0", known(A, 3), head(A, 5, "2")).refusal is None  # grew
    rolled = judge("site-0", known(A, 5), head(A, 3)).refusal
    assert rolled is not None and rolled.code == "ledger-rolled-back" and "holds 3 entries" in rolled.detail
    forked = judge("site-0", known(A, 3), head(A, 3, "9")).refusal
    assert forked is not None and forked.code == "ledger-rolled-back" and "different entry 3" in forked.detail
    swapped = judge("site-0", known(A, 3), head(B, 0)).refusal  # deleted and recreated, or another site's
    assert swapped is not None and swapped.code == "ledger-replaced" and f"restore ledger {A}" in swapped.detail
    replaced = judge("site-0", known(A, 3), head(B, 0, predecessor=A))
    assert replaced.refusal is None and replaced.replaced
    wrong = judge("site-0", known(A, 3), head(B, 0, predecessor="c" * 32))  # names a ledger it never was
    assert wrong.refusal is not None and wrong.refusal.code == "ledger-replaced"


def test_the_witness_lives_in_the_store_and_records_an_explicit_replacement(store_url: str) -> None:
    store = RunStore(store_url)
    run = store.create_run(name="t", spec={}, spec_hash="0" * 64, seed=0, num_sites=1, num_rounds=1)
    with store.session() as s:
        w = LedgerWitness(s, run)
        assert w.check("site-0", head(A, 2)).refusal is None
        w.advance("site-0", head(A, 4, "2"))  # a charge reported with a train reply
        w.advance("site-0", head(A, 3, "3"))  # an out-of-order, older report never moves it back
    with store.session() as s:
        row = s.scalars(select(S.LedgerHead)).one()
        assert (row.ledger_id, row.seq, row.entry_hash) == (A, 4, "2" * 64)
        assert LedgerWitness(s, run).check("site-0", head(A, 3)).refusal is not None
        assert LedgerWitness(s, run).check("site-0", head(B, 0)).refusal is not None
        assert LedgerWitness(s, run).check("site-0", head(B, 0, predecessor=A)).replaced
    with store.session() as s:
        row = s.scalars(select(S.LedgerHead)).one()
    assert (row.ledger_id, row.seq, row.replaced_ledger, row.replaced_seq) == (B, 0, A, 4)
    assert row.replaced_reason == "disk died" and row.replaced_at is not None
    store.close()
