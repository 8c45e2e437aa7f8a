"""A run's summary, read back from the store (the store is the source of truth).

ε per site is recomputed here from the stored privacy events with the accountant the site
used; the ε a site reported is kept in the events for audit and compared in tests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select

from privacy.events import remaining_budget
from server.store import RunStore
from server.store import schema as S
from veil.names import EVAL_ACC, EVAL_LOSS, EVAL_SUMS, TRAIN_LOSS, eval_from_sums

if TYPE_CHECKING:
    from privacy.ckks import SecretKey


@dataclass(frozen=True)
class RoundRow:
    """One round: status, aggregate evaluation (None if encrypted, no key), train loss, participation, traffic."""

    number: int
    status: str
    accuracy: float | None
    loss: float | None
    train_loss: float | None
    sites_ok: int
    sites_sampled: int
    examples: int
    bytes_down: int
    bytes_up: int
    seconds: float | None
    encrypted: bool = False  # evaluation metrics stored as a ciphertext (decrypted only with a key)


@dataclass(frozen=True)
class SiteRow:
    """One site over a run: data sizes, rounds trained, run ε from its events, its ledger's lifetime spend."""

    site: str
    num_train: int | None
    num_test: int | None
    rounds_joined: int
    epsilon: float | None
    delta: float | None
    noise_multiplier: float | None
    accountant: str | None
    dataset_id: str | None = None
    lifetime_epsilon: float | None = None  # the site ledger's lifetime ε after this run
    lifetime_delta: float | None = None
    epsilon_cap: float | None = None
    ledger_accountant: str | None = None

    @property
    def remaining(self) -> float | None:
        """Lifetime ε the site's ledger has left under its cap after this run."""
        return remaining_budget(self.epsilon_cap, self.lifetime_epsilon)


@dataclass(frozen=True)
class RefusalRow:
    """A site that did not take part in a phase of a round, and the reason recorded."""

    site: str
    round: int
    phase: str
    status: str
    code: str | None
    reason: str | None


@dataclass(frozen=True)
class RunSummary:
    """A run as the store has it: rounds, sites, artifacts, missed participations, encryption and provenance."""

    run_id: int
    name: str
    status: str
    error: str | None
    wall_seconds: float | None
    rounds: list[RoundRow]
    sites: list[SiteRow]
    artifacts: list[tuple[str, str, int]]
    missed: list[RefusalRow]  # every non-ok participation: refused, failed, rejected, no-reply
    encryption: dict[str, Any] | None = None  # the public CKKS description: key id, parameters
    decrypted_with: str | None = None  # key id used to read encrypted metrics, if any
    spec: dict[str, Any] = field(default_factory=dict)
    created_at: str | None = None
    mode: str = "simulation"
    planned_rounds: int = 0
    planned_sites: int = 0
    seed: int | None = None
    spec_hash: str = ""
    code_version: str = ""
    # where the sites' DP noise came from: "os-entropy", "seeded" (any site), or None (no events)
    noise_rng: str | None = None
    researcher: str | None = None  # who signed the request that started the run: "name (key id)"

    @property
    def not_private(self) -> bool:
        """Some site's noise was reproducible from the seed: no ε of this run protects anyone."""
        return self.noise_rng == "seeded" or bool(self.spec.get("privacy", {}).get("reproducible_noise"))

    @property
    def privacy_note(self) -> str:
        """The noise source, for reports: ``NOT_PRIVATE`` if seeded, else OS entropy; empty without events."""
        from privacy.randomness import NOT_PRIVATE, describe

        if self.not_private:
            return NOT_PRIVATE
        return f"DP noise and Poisson sampling {describe('os-entropy')}" if self.noise_rng else ""

    @property
    def refusals(self) -> list[RefusalRow]:
        """The missed participations that a site refused (not failures, rejections or missing replies)."""
        return [m for m in self.missed if m.status == "refused"]

    @property
    def final(self) -> RoundRow | None:
        """The last round that produced evaluation metrics (or was decrypted), if any."""
        done = [r for r in self.rounds if r.accuracy is not None or r.encrypted]
        return done[-1] if done else None

    @property
    def max_epsilon(self) -> float | None:
        """The largest run ε over the sites; None if no site has privacy events."""
        return max((s.epsilon for s in self.sites if s.epsilon is not None), default=None)

    @property
    def bytes_moved(self) -> int:
        """Bytes sent to and from the sites, summed over every round."""
        return sum(r.bytes_down + r.bytes_up for r in self.rounds)

    @property
    def examples(self) -> int:
        """Training records summed over rounds: each trained site's train-set size, once per round it trained."""
        return sum(r.examples for r in self.rounds)


def decrypt_evaluation(key: SecretKey, key_id: str, blob: bytes) -> tuple[float, float]:
    """(accuracy, loss) from a round's encrypted evaluation sums; needs the key set's secret key."""
    from privacy.ckks import EncryptedVector

    return eval_from_sums(list(key.decrypt(EncryptedVector(key_id, len(EVAL_SUMS), (blob,)))))


def load_summary(store: RunStore, run_id: int, key: SecretKey | None = None) -> RunSummary:
    """The run as the store has it; with ``key``, encrypted evaluation metrics are decrypted."""
    run = store.get_run(run_id)
    eps = {e.site: e for e in site_epsilons(store, run_id)}
    with store.session() as s:
        encrypted: dict[int, tuple[float | None, float | None]] = {}
        for row in s.scalars(select(S.EncryptedMetric).where(S.EncryptedMetric.run_id == run_id,
                                                              S.EncryptedMetric.phase == "evaluate")):
            encrypted[row.round_number] = (
                decrypt_evaluation(key, row.key_id, row.ciphertext) if key is not None else (None, None))
        agg: dict[tuple[int, str], float] = {
            (rn, name): value
            for rn, name, value in s.execute(
                select(S.Metric.round_number, S.Metric.name, S.Metric.value)
                .where(S.Metric.run_id == run_id, S.Metric.site_id.is_(None))
            ).all()
            if value is not None
        }
        rounds = [
            RoundRow(r.number, r.status,
                     encrypted[r.number][0] if r.number in encrypted else agg.get((r.number, EVAL_ACC)),
                     encrypted[r.number][1] if r.number in encrypted else agg.get((r.number, EVAL_LOSS)),
                     agg.get((r.number, TRAIN_LOSS)),
                     r.sites_ok, r.sites_sampled, r.examples, r.bytes_down, r.bytes_up, r.seconds,
                     encrypted=r.number in encrypted)
            for r in s.scalars(select(S.Round).where(S.Round.run_id == run_id).order_by(S.Round.number))
        ]
        joined = dict(
            s.execute(
                select(S.Participation.site_id, func.count())
                .where(S.Participation.run_id == run_id, S.Participation.phase == "train",
                       S.Participation.status == "ok")
                .group_by(S.Participation.site_id)
            ).all()
        )
        last_sigma = dict(
            s.execute(
                select(S.PrivacyEvent.site_id, func.max(S.PrivacyEvent.noise_multiplier))
                .where(S.PrivacyEvent.run_id == run_id).group_by(S.PrivacyEvent.site_id)
            ).all()
        )
        last_event = {
            ev.site_id: ev for ev in s.scalars(
                select(S.PrivacyEvent).where(S.PrivacyEvent.id.in_(
                    select(func.max(S.PrivacyEvent.id)).where(S.PrivacyEvent.run_id == run_id)
                    .group_by(S.PrivacyEvent.site_id))))
        }
        sites = []
        for site in s.scalars(select(S.Site).where(S.Site.run_id == run_id)):
            e = eps.get(site.site_key)
            ev = last_event.get(site.id)
            sites.append(SiteRow(
                site.site_key, site.num_train, site.num_test, int(joined.get(site.id, 0)),
                e.epsilon if e else None, e.delta if e else site.delta, last_sigma.get(site.id),
                e.accountant if e else None, dataset_id=site.dataset_id,
                lifetime_epsilon=ev.lifetime_epsilon if ev else site.spent_before,
                lifetime_delta=ev.lifetime_delta if ev else site.budget_delta,
                epsilon_cap=ev.epsilon_cap if ev else site.epsilon_cap,
                ledger_accountant=ev.ledger_accountant if ev else site.budget_accountant,
            ))
        sites.sort(key=lambda r: natural_key(r.site))
        modes = set(s.scalars(select(S.PrivacyEvent.rng).where(S.PrivacyEvent.run_id == run_id).distinct()))
        noise_rng = "seeded" if "seeded" in modes else "os-entropy" if "os-entropy" in modes else None
        artifacts = [(a.uri, a.sha256, a.size_bytes) for a in
                     s.scalars(select(S.Artifact).where(S.Artifact.run_id == run_id))]
        missed = [
            RefusalRow(key, p.round_number, p.phase, p.status, p.reason_code, p.reason)
            for p, key in s.execute(
                select(S.Participation, S.Site.site_key).join(S.Site, S.Site.id == S.Participation.site_id)
                .where(S.Participation.run_id == run_id, S.Participation.status != "ok")
                .order_by(S.Participation.round_number, S.Participation.id))
        ]
    encryption = json.loads(run.encryption_json) if run.encryption_json else None
    return RunSummary(run.id, run.name, run.status, run.error, run.wall_seconds, rounds, sites,
                      artifacts, missed, encryption,
                      key.key_id if key is not None and encrypted else None,
                      spec=json.loads(run.spec_json), created_at=iso_utc(run.created_at), mode=run.mode,
                      planned_rounds=run.num_rounds, planned_sites=run.num_sites, seed=run.seed,
                      spec_hash=run.spec_hash, code_version=run.code_version, noise_rng=noise_rng,
                      researcher=f"{run.researcher} ({run.researcher_key_id})" if run.researcher else None)


def iso_utc(when: datetime | None) -> str | None:
    """ISO 8601 to the second, a naive time taken as UTC; None stays None."""
    if when is None:
        return None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).isoformat(timespec="seconds")


def natural_key(key: str) -> tuple[str, int]:
    """Sort key that puts ``site-2`` before ``site-10``: (prefix, trailing number), or (key, -1) without one."""
    head, _, tail = key.rpartition("-")
    return (head, int(tail)) if tail.isdigit() else (key, -1)


@dataclass(frozen=True)
class BudgetRow:
    """One data set's lifetime spend as the coordinator last heard it from the site."""

    site: str
    dataset_id: str | None
    run_id: int
    run_epsilon: float | None  # ε of that run alone (the site's own report)
    spent: float | None  # lifetime ε on the site's ledger after that run's last charge
    cap: float | None
    delta: float | None
    accountant: str | None
    # the site's administrator replaced a lost ledger (explicitly): what, when and why
    ledger_note: str | None = None

    @property
    def remaining(self) -> float | None:
        """Lifetime ε left under the cap after that run's last charge."""
        return remaining_budget(self.cap, self.spent)


def ledger_notes(store: RunStore) -> dict[str, str]:
    """{site: what the coordinator recorded when the site's administrator replaced its ledger}."""
    with store.session() as s:
        rows = s.scalars(select(S.LedgerHead).where(S.LedgerHead.replaced_ledger.is_not(None))).all()
    return {r.site_key: (f"new ledger {r.ledger_id} since {iso_utc(r.replaced_at)}, replacing lost ledger "
                         f"{r.replaced_ledger} ({r.replaced_seq} entries): "
                         f"{r.replaced_reason or 'no reason given'}; the lost ledger's spend is not in the "
                         "lifetime ε the site reports")
            for r in rows}


def budget_rows(store: RunStore, run_id: int | None = None, site: str | None = None) -> list[BudgetRow]:
    """Per data set: the latest lifetime spend reported (in ``run_id``, or in any run).

    Answered from the stored per-event lifetime ε (each site computed it when it charged its
    ledger), so the query is one indexed scan however long the histories are.
    """
    PE = S.PrivacyEvent
    with store.session() as s:
        # the latest event per data set (its ledger's running total), and per site for events
        # from sites that named no data set; two plain GROUP BYs that indexes answer
        by_dataset = select(func.max(PE.id)).where(PE.dataset_id.is_not(None)).group_by(PE.dataset_id)
        by_site = select(func.max(PE.id)).where(PE.dataset_id.is_(None)).group_by(PE.site_id)
        if run_id is not None:
            by_dataset, by_site = by_dataset.where(PE.run_id == run_id), by_site.where(PE.run_id == run_id)
        latest = list(s.scalars(by_dataset)) + list(s.scalars(by_site))
        query = (select(S.PrivacyEvent, S.Site.site_key)
                 .join(S.Site, S.Site.id == S.PrivacyEvent.site_id)
                 .where(S.PrivacyEvent.id.in_(latest)))
        if site is not None:
            query = query.where((S.Site.site_key == site) | (S.PrivacyEvent.dataset_id == site))
        found = s.execute(query).all()
    notes = ledger_notes(store)
    rows = [
        BudgetRow(key, ev.dataset_id, ev.run_id, ev.reported_epsilon, ev.lifetime_epsilon,
                  ev.epsilon_cap, ev.lifetime_delta, ev.ledger_accountant, notes.get(key))
        for ev, key in found
    ]
    rows.sort(key=lambda r: (natural_key(r.site), r.dataset_id or ""))
    return rows


@dataclass(frozen=True)
class SiteEpsilon:
    """A site's run ε, derived from its recorded privacy events with its own accountant."""

    site: str
    site_row: int
    epsilon: float
    delta: float
    accountant: str
    events: int


def site_epsilons(store: RunStore, run_id: int, *, use_derived: bool = True) -> list[SiteEpsilon]:
    """Each site's run ε: from the value derived at run end when it covers every event of the
    site, otherwise (or with ``use_derived=False``) recomputed from the events."""
    from privacy.accounting import DpSgdEvent, epsilon

    PE = S.PrivacyEvent
    with store.session() as s:
        sites = {row.id: row for row in s.scalars(select(S.Site).where(S.Site.run_id == run_id))}
        counts: dict[int, int] = dict(s.execute(
            select(PE.site_id, func.count()).where(PE.run_id == run_id).group_by(PE.site_id)).all())
        last = {ev.site_id: ev for ev in s.scalars(select(PE).where(PE.id.in_(
            select(func.max(PE.id)).where(PE.run_id == run_id).group_by(PE.site_id))))}
        stale = [sid for sid, n in counts.items() if not (
            use_derived and sites[sid].derived_events == n and sites[sid].derived_epsilon is not None)]
        history: dict[int, list[DpSgdEvent]] = {}
        if stale:
            for sid, sigma, q, steps, c in s.execute(
                    select(PE.site_id, PE.noise_multiplier, PE.sample_rate, PE.steps, PE.max_grad_norm)
                    .where(PE.run_id == run_id, PE.site_id.in_(stale)).order_by(PE.round_number)):
                history.setdefault(sid, []).append(DpSgdEvent(sigma, q, steps, c))
    out = []
    for sid, n in counts.items():
        ev = last[sid]
        eps = (epsilon(history[sid], ev.delta, ev.accountant)  # type: ignore[arg-type]
               if sid in history else sites[sid].derived_epsilon)
        out.append(SiteEpsilon(sites[sid].site_key, sid, float(eps or 0.0), ev.delta, ev.accountant, n))
    return out
