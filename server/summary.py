"""A run's summary, read back from the store (the store is the source of truth).

ε per site is recomputed here from the stored privacy events with the accountant the site
used; the ε a site reported is kept in the events for audit and compared in tests.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select

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

    @property
    def bytes_moved(self) -> int:
        return sum(r.bytes_down + r.bytes_up for r in self.rounds)

    @property
    def examples(self) -> int:
        return sum(r.examples for r in self.rounds)


def load_summary(store: RunStore, run_id: int) -> RunSummary:
    run = store.get_run(run_id)
    eps = site_epsilons(store, run_id)
    with store.session() as s:
        agg: dict[tuple[int, str], float] = {
            (rn, name): value
            for rn, name, value in s.execute(
                select(S.Metric.round_number, S.Metric.name, S.Metric.value)
                .where(S.Metric.run_id == run_id, S.Metric.site_id.is_(None))
            ).all()
            if value is not None
        }
        rounds = [
            RoundRow(r.number, r.status, agg.get((r.number, "eval-acc")),
                     agg.get((r.number, "eval-loss")), agg.get((r.number, "train-loss")),
                     r.sites_ok, r.sites_sampled, r.examples, r.bytes_down, r.bytes_up, r.seconds)
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
        sites = []
        for site in s.scalars(select(S.Site).where(S.Site.run_id == run_id)):
            e = eps.get(site.site_key)
            sites.append(SiteRow(site.site_key, site.num_train, site.num_test,
                                 int(joined.get(site.id, 0)), e[0] if e else None,
                                 e[1] if e else site.delta, last_sigma.get(site.id),
                                 e[2] if e else None))
        sites.sort(key=lambda r: _natural(r.site))
        artifacts = [(a.uri, a.sha256, a.size_bytes) for a in
                     s.scalars(select(S.Artifact).where(S.Artifact.run_id == run_id))]
    return RunSummary(run.id, run.name, run.status, run.error, run.wall_seconds, rounds, sites,
                      artifacts)


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
        acc = f"{r.accuracy:.4f}" if r.accuracy is not None else "   -  "
        loss = f"{r.loss:.4f}" if r.loss is not None else "   -  "
        tl = f"{r.train_loss:.4f}" if r.train_loss is not None else "   -  "
        out.append(f" {r.number:>5}  {acc:>8}  {loss:>6}  {tl:>10}  {r.sites_ok:>2}/{r.sites_sampled:<2}"
                   f"  {r.examples:>8}  {_mb(r.bytes_down + r.bytes_up):>9}  {r.seconds or 0:>6.1f}")
    out.append("")
    out.append(" site        train  test  rounds   noise σ        ε        δ   accountant")
    for site in summary.sites:
        eps = f"{site.epsilon:.3f}" if site.epsilon is not None else "-"
        delta = f"{site.delta:.0e}" if site.delta else "-"
        sig = f"{site.noise_multiplier:.3f}" if site.noise_multiplier else "-"
        out.append(f" {site.site:<10} {site.num_train or 0:>6} {site.num_test or 0:>5}  {site.rounds_joined:>6}"
                   f"  {sig:>8} {eps:>8} {delta:>8}   {site.accountant or '-'}")
    worst = max((s.epsilon for s in summary.sites if s.epsilon is not None), default=None)
    out.append("")
    if worst is not None:
        out.append(f" worst-case site ε = {worst:.3f} (sample-level DP, each site at its own δ)")
    out.append(f" examples trained: {summary.examples}   bytes moved: {_mb(summary.bytes_moved)}"
               f"   wall time: {summary.wall_seconds or 0:.1f}s")
    for uri, sha, size in summary.artifacts:
        out.append(f" checkpoint: {uri} ({size} bytes, sha256 {sha[:12]}…)")
    return "\n".join(out)
