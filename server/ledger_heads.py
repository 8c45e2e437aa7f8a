"""The coordinator's witness of every site's ledger: a ledger may grow, never shrink or swap.

A site enforces its own budget from its own ledger file, so the one thing a site cannot
protect itself against is losing that file: deleted and recreated, replaced by another
site's copy, or restored from a backup older than its last charge. The site's own witness
file (``<ledger>.head``) catches most of it; the coordinator keeps a second witness, in its
store, of the furthest head (ledger id, entry count, head hash) each site has reported in a
pre-flight or with a charge. At the next pre-flight a site is refused when

* it reports the same ledger with fewer entries, or another entry at a position already
  seen (``ledger-rolled-back``): an older copy was restored;
* it reports another ledger id without naming the witnessed one as the ledger its
  administrator explicitly replaced (``ledger-replaced``): the file was deleted and
  recreated, or copied from elsewhere.

An explicit replacement (``veil site init --new-ledger --reason ...``) is accepted and kept on
the record (``veil budget`` shows it). The check is pure (``judge``) and testable without a
store; ``LedgerWitness`` reads and moves the heads in the run store.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from server.store import schema as S
from veil import protocol as P


@dataclass(frozen=True)
class Verdict:
    """``refusal`` is None when the reported head may be used; ``replaced`` marks an explicit,
    accepted replacement of the witnessed ledger."""

    refusal: P.Refusal | None
    replaced: bool = False


def judge(site_id: str, known: S.LedgerHead | None, reported: P.LedgerHead) -> Verdict:
    """Whether ``reported`` can follow what the coordinator last witnessed for ``site_id``."""
    if known is None:
        return Verdict(None)
    if reported.ledger_id == known.ledger_id:
        if reported.seq < known.seq:
            return Verdict(P.Refusal("ledger-rolled-back", (
                f"{site_id}'s ledger {known.ledger_id} now holds {reported.seq} entries, but it already "
                f"reported {known.seq}: an older copy was restored, which forgets the spend since. The site "
                "must restore its newest ledger copy")))
        if reported.seq == known.seq and reported.entry_hash != known.entry_hash:
            return Verdict(P.Refusal("ledger-rolled-back", (
                f"{site_id}'s ledger {known.ledger_id} has a different entry {reported.seq} than the one it "
                "reported before: the file was replaced by another history. The site must restore its "
                "newest ledger copy")))
        return Verdict(None)
    if reported.predecessor == known.ledger_id:
        return Verdict(None, replaced=True)
    return Verdict(P.Refusal("ledger-replaced", (
        f"{site_id} now answers from ledger {reported.ledger_id} ({reported.seq} entries), but it reported "
        f"ledger {known.ledger_id} ({known.seq} entries) before, and the new ledger does not say it replaces "
        "that one: the ledger was deleted and recreated, or copied from elsewhere. The site must restore "
        f"ledger {known.ledger_id}; if it is truly lost, its administrator starts a new one with `veil site "
        "init --new-ledger --reason ...`, which is recorded. (A simulation started afresh needs a new "
        "--store as well as a new --ledger-dir.)")))


class LedgerWitness:
    """Reads and advances the witnessed heads inside the caller's store session."""

    def __init__(self, session: Session, run_id: int) -> None:
        self.s = session
        self.run_id = run_id

    def known(self, site_id: str) -> S.LedgerHead | None:
        """The furthest head witnessed so far for ``site_id``; None for a site never heard from."""
        return self.s.scalar(select(S.LedgerHead).where(S.LedgerHead.site_key == site_id))

    def check(self, site_id: str, reported: P.LedgerHead) -> Verdict:
        """Judge ``reported`` and, when it may be used, witness it."""
        known = self.known(site_id)
        verdict = judge(site_id, known, reported)
        if verdict.refusal is None:
            self.advance(site_id, reported, replaced=verdict.replaced)
        return verdict

    def advance(self, site_id: str, head: P.LedgerHead, *, replaced: bool = False) -> None:
        """Witness ``head`` if it is further along (or an accepted replacement)."""
        now = datetime.now(UTC)
        row = self.known(site_id)
        if row is None:
            self.s.add(S.LedgerHead(site_key=site_id, ledger_id=head.ledger_id, seq=head.seq,
                                    entry_hash=head.entry_hash, updated_at=now, run_id=self.run_id))
            self.s.flush()
            return
        if replaced:
            row.replaced_ledger, row.replaced_seq = row.ledger_id, row.seq
            row.replaced_reason, row.replaced_at = (head.replaced_reason or "")[:2000], now
        elif head.ledger_id != row.ledger_id or head.seq <= row.seq:
            return
        row.ledger_id, row.seq, row.entry_hash = head.ledger_id, head.seq, head.entry_hash
        row.updated_at, row.run_id = now, self.run_id
