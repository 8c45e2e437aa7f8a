"""A run's summary, read back from the store (the store is the source of truth).

ε per site is recomputed here from the stored privacy events with the accountant the site
used; the ε a site reported is kept in the events for audit and compared in tests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select

from privacy.ckks import EncryptedVector, SecretKey
from server.recording import site_epsilons
from server.store import RunStore
from server.store import schema as S


@dataclass(frozen=True)
class RoundRow:
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
        if self.epsilon_cap is None or self.lifetime_epsilon is None:
            return None
        return max(0.0, self.epsilon_cap - self.lifetime_epsilon)


@dataclass(frozen=True)
class RefusalRow:
    site: str
    round: int
    phase: str
    status: str
    code: str | None
    reason: str | None


@dataclass(frozen=True)
class RunSummary:
    run_id: int
    name: str
    status: str
    error: str | None
    wall_seconds: float | None
    rounds: list[RoundRow]
    sites: list[SiteRow]
    artifacts: list[tuple[str, str, int]]
    refusals: list[RefusalRow]
    encryption: dict[str, Any] | None = None  # the public CKKS description: key id, parameters
    decrypted_with: str | None = None  # key id used to read encrypted metrics, if any

    @property
    def bytes_moved(self) -> int:
        return sum(r.bytes_down + r.bytes_up for r in self.rounds)

    @property
    def examples(self) -> int:
        return sum(r.examples for r in self.rounds)


def decrypt_evaluation(key: SecretKey, key_id: str, blob: bytes) -> tuple[float, float]:
    """(accuracy, loss) from a round's encrypted evaluation sums; needs the key set's secret key."""
    loss_sum, correct, examples = key.decrypt(EncryptedVector(key_id, 3, (blob,)))
    if examples <= 0:
        raise ValueError("decrypted example count is not positive")
    return float(correct / examples), float(loss_sum / examples)


def load_summary(store: RunStore, run_id: int, key: SecretKey | None = None) -> RunSummary:
    """The run as the store has it; with ``key``, encrypted evaluation metrics are decrypted."""
    run = store.get_run(run_id)
    eps = site_epsilons(store, run_id)
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
                     encrypted[r.number][0] if r.number in encrypted else agg.get((r.number, "eval-acc")),
                     encrypted[r.number][1] if r.number in encrypted else agg.get((r.number, "eval-loss")),
                     agg.get((r.number, "train-loss")),
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
                e[0] if e else None, e[1] if e else site.delta, last_sigma.get(site.id),
                e[2] if e else None, dataset_id=site.dataset_id,
                lifetime_epsilon=ev.lifetime_epsilon if ev else site.spent_before,
                lifetime_delta=ev.lifetime_delta if ev else site.budget_delta,
                epsilon_cap=ev.epsilon_cap if ev else site.epsilon_cap,
                ledger_accountant=ev.ledger_accountant if ev else site.budget_accountant,
            ))
        sites.sort(key=lambda r: _natural(r.site))
        artifacts = [(a.uri, a.sha256, a.size_bytes) for a in
                     s.scalars(select(S.Artifact).where(S.Artifact.run_id == run_id))]
        refusals = [
            RefusalRow(key, p.round_number, p.phase, p.status, p.reason_code, p.reason)
            for p, key in s.execute(
                select(S.Participation, S.Site.site_key).join(S.Site, S.Site.id == S.Participation.site_id)
                .where(S.Participation.run_id == run_id, S.Participation.status == "refused")
                .order_by(S.Participation.round_number, S.Participation.id))
        ]
    encryption = json.loads(run.encryption_json) if run.encryption_json else None
    return RunSummary(run.id, run.name, run.status, run.error, run.wall_seconds, rounds, sites,
                      artifacts, refusals, encryption,
                      key.key_id if key is not None and encrypted else None)


def _natural(key: str) -> tuple[str, int]:
    head, _, tail = key.rpartition("-")
    return (head, int(tail)) if tail.isdigit() else (key, -1)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def format_summary(summary: RunSummary) -> str:
    out = [f"run {summary.run_id} ({summary.name}): {summary.status}"]
    if summary.error:
        out.append(f"  error: {summary.error}")
    out.append("")
    out.append(" round  accuracy    loss  train-loss  sites  examples   moved     secs")
    for r in summary.rounds:
        hidden = r.encrypted and r.accuracy is None
        acc = f"{r.accuracy:.4f}" if r.accuracy is not None else ("encrypted" if hidden else "   -  ")
        loss = f"{r.loss:.4f}" if r.loss is not None else ("   -  " if not hidden else "  *   ")
        tl = f"{r.train_loss:.4f}" if r.train_loss is not None else "   -  "
        out.append(f" {r.number:>5}  {acc:>8}  {loss:>6}  {tl:>10}  {r.sites_ok:>2}/{r.sites_sampled:<2}"
                   f"  {r.examples:>8}  {_mb(r.bytes_down + r.bytes_up):>9}  {r.seconds or 0:>6.1f}")
    out.append("")
    out.append(" site        train  test  rounds   noise σ   run ε    run δ  lifetime ε       cap"
               "  remaining  (ledger δ, accountant)")
    for site in summary.sites:
        eps = f"{site.epsilon:.3f}" if site.epsilon is not None else "-"
        delta = f"{site.delta:.0e}" if site.delta else "-"
        sig = f"{site.noise_multiplier:.3f}" if site.noise_multiplier else "-"
        life = f"{site.lifetime_epsilon:.3f}" if site.lifetime_epsilon is not None else "-"
        cap = f"{site.epsilon_cap:g}" if site.epsilon_cap is not None else "none"
        rem = f"{site.remaining:.3f}" if site.remaining is not None else "-"
        ledger = (f"({site.lifetime_delta:.0e}, {site.ledger_accountant})"
                  if site.lifetime_delta and site.ledger_accountant else "")
        out.append(f" {site.site:<10} {site.num_train or 0:>6} {site.num_test or 0:>5}  {site.rounds_joined:>6}"
                   f"  {sig:>8} {eps:>7} {delta:>8} {life:>11} {cap:>9} {rem:>10}  {ledger}")
    if summary.refusals:
        out.append("")
        out.append(" refused by sites (each site enforces its own policy and ledger):")
        for ref in summary.refusals:
            where = "pre-flight" if ref.phase == "preflight" else f"round {ref.round}"
            out.append(f"  {ref.site:<10} {where:<10} {ref.reason or ref.code}")
    worst = max((s.epsilon for s in summary.sites if s.epsilon is not None), default=None)
    out.append("")
    if worst is not None:
        out.append(f" worst-case site ε this run = {worst:.3f} (sample-level DP, each site at its own δ);"
                   " lifetime ε is each site ledger's spend on its data set across runs")
    if summary.encryption:
        e, p = summary.encryption, summary.encryption["params"]
        on = "+".join(k for k in ("aggregation", "evaluation") if e.get(k) == "ckks")
        out.append(f" encryption: CKKS {on}, key set {e['key_id']} (N={p['poly_modulus_degree']}, moduli "
                   f"{p['coeff_mod_bit_sizes']} bits, scale 2^{p['scale_bits']}); the coordinator only added "
                   "ciphertexts")
        if any(r.encrypted for r in summary.rounds):
            out.append(f"   evaluation metrics decrypted with key set {summary.decrypted_with}"
                       if summary.decrypted_with else
                       f"   evaluation metrics are encrypted: veil runs show {summary.run_id} --key "
                       "KEYSET/secret.ckks")
    out.append(f" examples trained: {summary.examples}   bytes moved: {_mb(summary.bytes_moved)}"
               f"   wall time: {summary.wall_seconds or 0:.1f}s")
    for uri, sha, size in summary.artifacts:
        out.append(f" checkpoint: {uri} ({size} bytes, sha256 {sha[:12]}…)")
    return "\n".join(out)


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

    @property
    def remaining(self) -> float | None:
        return None if self.cap is None or self.spent is None else max(0.0, self.cap - self.spent)


def budget_rows(store: RunStore, run_id: int | None = None, site: str | None = None) -> list[BudgetRow]:
    """Per data set: the latest lifetime spend reported (in ``run_id``, or in any run).

    Answered from the stored per-event lifetime ε (each site computed it when it charged its
    ledger), so the query is one indexed scan however long the histories are.
    """
    with store.session() as s:
        latest = select(func.max(S.PrivacyEvent.id)).group_by(
            func.coalesce(S.PrivacyEvent.dataset_id, func.cast(S.PrivacyEvent.site_id, S.String)))
        if run_id is not None:
            latest = latest.where(S.PrivacyEvent.run_id == run_id)
        query = (select(S.PrivacyEvent, S.Site.site_key)
                 .join(S.Site, S.Site.id == S.PrivacyEvent.site_id)
                 .where(S.PrivacyEvent.id.in_(latest)))
        if site is not None:
            query = query.where((S.Site.site_key == site) | (S.PrivacyEvent.dataset_id == site))
        rows = [
            BudgetRow(key, ev.dataset_id, ev.run_id, ev.reported_epsilon, ev.lifetime_epsilon,
                      ev.epsilon_cap, ev.lifetime_delta, ev.ledger_accountant)
            for ev, key in s.execute(query).all()
        ]
    rows.sort(key=lambda r: (_natural(r.site), r.dataset_id or ""))
    return rows


def format_budget(rows: list[BudgetRow]) -> str:
    if not rows:
        return "no privacy spend recorded yet"
    out = [" site        data set          last run   run ε  lifetime ε       cap  remaining        δ"
           "  accountant"]
    for r in rows:
        f = (lambda v: f"{v:.3f}" if v is not None else "-")  # noqa: E731
        cap = f"{r.cap:g}" if r.cap is not None else "none"
        delta = f"{r.delta:.0e}" if r.delta else "-"
        out.append(f" {r.site:<10}  {r.dataset_id or '-':<16} {r.run_id:>9} {f(r.run_epsilon):>7}"
                   f" {f(r.spent):>11} {cap:>9} {f(r.remaining):>10} {delta:>8}  {r.accountant or '-'}")
    return "\n".join(out)
