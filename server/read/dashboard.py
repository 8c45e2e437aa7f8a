"""What the researcher dashboard reads from the run store: run lists, comparisons, series, exports.

Every function answers from a few indexed, set-based queries (never one query per round or
per site), so a store with 100 runs x 100 rounds x 100 sites answers in about a second
(``benchmarks/dashboard.py``). Encrypted evaluation metrics stay ``None`` with
``encrypted=True`` unless a key is given.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from server.read.summary import RunSummary, iso_utc, load_summary, natural_key
from server.store import RunStore
from server.store import schema as S
from server.store.store import resolve_store_url
from veil import names as P
from veil.errors import StoreError, VeilError
from veil.files import atomic_write
from veil.names import SHOWN_METRICS

if TYPE_CHECKING:
    from privacy.ckks import SecretKey


def open_store(url: str | None) -> RunStore:
    """Open an existing store for reading: never creates, never migrates; errors name the fix."""
    resolved = resolve_store_url(url)
    try:
        parsed = make_url(resolved)
    except Exception:
        return RunStore(resolved, migrate=False)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        path = Path(parsed.database or "").expanduser()
        if not path.exists():
            raise StoreError(f"no run store at {path}: run `veil simulate` to make one, or point at yours "
                             "with --store URL (or VEIL_STORE)")
    return RunStore(resolved, migrate=False)


def require_runs(store: RunStore) -> None:
    """Raise ``StoreError`` (naming how to start one) if the store holds no run yet."""
    with store.session() as s:
        if s.scalar(select(S.Run.id).limit(1)) is None:
            raise StoreError(f"store {store.safe_url} has no runs yet: start one with `veil simulate` "
                             "(or `veil run SPEC --coordinator HOST:PORT`)")


RUN_STATUSES = ("running", "completed", "failed", "refused", "stopped")


def accountant_versions(store: RunStore, run_id: int) -> dict[str, str]:
    """{accountant: the library version the sites ran} for a run's privacy events."""
    with store.session() as s:
        return {acc: ver for acc, ver in s.execute(
            select(S.PrivacyEvent.accountant, S.PrivacyEvent.accountant_version)
            .where(S.PrivacyEvent.run_id == run_id).distinct())}


@dataclass(frozen=True)
class SiteMechanism:
    """A site's DP-SGD mechanism over one run: the worst case of each knob, and total steps."""

    max_sample_rate: float
    min_noise_multiplier: float
    steps: int
    max_grad_norm: float


def site_mechanisms(store: RunStore, run_id: int) -> dict[str, SiteMechanism]:
    """{site: its mechanism} over the run's privacy events."""
    with store.session() as s:
        return {key: SiteMechanism(q, sigma, int(steps), c) for key, q, sigma, steps, c in s.execute(
            select(S.Site.site_key, func.max(S.PrivacyEvent.sample_rate),
                   func.min(S.PrivacyEvent.noise_multiplier),
                   func.sum(S.PrivacyEvent.steps), func.max(S.PrivacyEvent.max_grad_norm))
            .join(S.Site, S.Site.id == S.PrivacyEvent.site_id)
            .where(S.PrivacyEvent.run_id == run_id).group_by(S.Site.site_key))}


# -- veil runs --------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunListRow:
    """One line of ``veil runs``: a run's status, progress, last accuracy, largest ε and traffic."""

    run_id: int
    name: str
    status: str
    mode: str
    created_at: str | None
    rounds_completed: int
    rounds_planned: int
    sites_trained: int
    sites_planned: int
    accuracy: float | None  # last aggregated evaluation accuracy (None when encrypted)
    accuracy_encrypted: bool
    max_epsilon: float | None  # largest run ε any site reported (its own accountant)
    wall_seconds: float | None
    bytes_moved: int
    noise_seeded: bool = False  # some site's DP noise was reproducible from the seed: not private


def parse_when(text: str, *, end: bool = False) -> datetime:
    """``YYYY-MM-DD`` (the whole day) or an ISO date-time; naive times are UTC."""
    try:
        if len(text) == 10:
            d = date.fromisoformat(text)
            return datetime.combine(d, time.max if end else time.min, tzinfo=UTC)
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a date: use YYYY-MM-DD or YYYY-MM-DDTHH:MM") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def list_runs(store: RunStore, *, status: str | None = None, name: str | None = None,
              since: datetime | None = None, until: datetime | None = None, limit: int = 50
              ) -> list[RunListRow]:
    """Runs newest first, filtered; the aggregates come from a fixed number of queries."""
    with store.session() as s:
        q = select(S.Run).order_by(S.Run.id.desc())
        if status:
            q = q.where(S.Run.status == status)
        if name:
            q = q.where(func.lower(S.Run.name).contains(name.lower(), autoescape=True))
        if since:
            q = q.where(S.Run.created_at >= since)
        if until:
            q = q.where(S.Run.created_at <= until)
        if limit > 0:
            q = q.limit(limit)
        runs = list(s.scalars(q))
        ids = [r.id for r in runs]
        if not ids:
            return []
        rounds = {rid: (done, moved or 0) for rid, done, moved in s.execute(
            select(S.Round.run_id, func.count().filter(S.Round.status == "completed"),
                   func.sum(S.Round.bytes_down + S.Round.bytes_up))
            .where(S.Round.run_id.in_(ids)).group_by(S.Round.run_id))}
        trained = dict(s.execute(
            select(S.Site.run_id, func.count()).where(S.Site.run_id.in_(ids), S.Site.num_train.is_not(None))
            .group_by(S.Site.run_id)).all())
        aggregate = (S.Metric.run_id.in_(ids), S.Metric.site_id.is_(None))
        last = (select(S.Metric.run_id, func.max(S.Metric.round_number).label("rn"))
                .where(*aggregate, S.Metric.name == P.EVAL_ACC).group_by(S.Metric.run_id).subquery())
        accuracy = dict(s.execute(
            select(S.Metric.run_id, S.Metric.value).join(
                last, (last.c.run_id == S.Metric.run_id) & (last.c.rn == S.Metric.round_number))
            .where(*aggregate, S.Metric.name == P.EVAL_ACC)).all())
        max_eps = dict(s.execute(
            select(S.Metric.run_id, func.max(S.Metric.value))
            .where(*aggregate, S.Metric.name == P.EPSILON).group_by(S.Metric.run_id)).all())
        encrypted = set(s.scalars(select(S.EncryptedMetric.run_id).where(
            S.EncryptedMetric.run_id.in_(ids)).distinct()))
        seeded = set(s.scalars(select(S.PrivacyEvent.run_id).where(
            S.PrivacyEvent.run_id.in_(ids), S.PrivacyEvent.rng == "seeded").distinct()))
    return [
        RunListRow(r.id, r.name, r.status, r.mode, iso_utc(r.created_at), rounds.get(r.id, (0, 0))[0],
                   r.num_rounds, int(trained.get(r.id, 0)), r.num_sites, accuracy.get(r.id),
                   r.id in encrypted and r.id not in accuracy, max_eps.get(r.id), r.wall_seconds,
                   int(rounds.get(r.id, (0, 0))[1]), r.id in seeded)
        for r in runs
    ]


# -- veil compare -----------------------------------------------------------------------------
@dataclass(frozen=True)
class CompareRow:
    """One run's column in ``veil compare``: outcome, privacy (ε, δ, accountant, mean σ), encryption and cost."""

    run_id: int
    name: str
    status: str
    rounds_completed: int
    rounds_planned: int
    sites_trained: int
    sites_planned: int
    final_accuracy: float | None
    final_loss: float | None
    accuracy_encrypted: bool
    max_epsilon: float | None  # recomputed from the stored events with each site's accountant
    delta: float | None
    accountant: str | None
    mean_noise: float | None
    encryption: str | None
    wall_seconds: float | None
    bytes_moved: int
    examples: int


def compare_row(summary: RunSummary) -> CompareRow:
    """A run's summary reduced to its ``veil compare`` row, over the sites that trained at least once."""
    final = summary.final
    trained = [site for site in summary.sites if site.rounds_joined > 0]
    deltas = {site.delta for site in trained if site.delta}
    accountants = {site.accountant for site in trained if site.accountant}
    sigmas = [site.noise_multiplier for site in trained if site.noise_multiplier]
    enc = summary.encryption
    return CompareRow(
        summary.run_id, summary.name, summary.status,
        sum(1 for r in summary.rounds if r.status == "completed"), summary.planned_rounds,
        len(trained), summary.planned_sites,
        final.accuracy if final else None, final.loss if final else None,
        bool(final and final.encrypted and final.accuracy is None), summary.max_epsilon,
        max(deltas) if deltas else None, ",".join(sorted(accountants)) or None,
        sum(sigmas) / len(sigmas) if sigmas else None,
        (f"ckks {'+'.join(k for k in ('aggregation', 'evaluation') if enc.get(k) == 'ckks')}" if enc else None),
        summary.wall_seconds, summary.bytes_moved, summary.examples,
    )


# -- veil metrics -----------------------------------------------------------------------------
@dataclass(frozen=True)
class MetricSeries:
    """A run's per-round series for ``veil metrics``: aggregate accuracy and losses, worst and per-site ε."""

    run_id: int
    name: str
    rounds: list[int]
    accuracy: list[float | None]
    loss: list[float | None]
    train_loss: list[float | None]
    encrypted: list[bool]
    max_epsilon: list[float | None]
    # each site's run ε after each round, as the site's own accountant reported it (None: did not train)
    epsilon_by_site: dict[str, list[float | None]]
    epsilon_cap: float | None = None

    def values(self, metric: str) -> list[float | None]:
        """The per-round values of one of ``SHOWN_METRICS`` (ε: the worst site's)."""
        return {"accuracy": self.accuracy, "loss": self.loss, "train-loss": self.train_loss,
                "epsilon": self.max_epsilon}[metric]


METRICS = SHOWN_METRICS


def metric_series(store: RunStore, run_id: int, key: SecretKey | None = None,
                  summary: RunSummary | None = None) -> MetricSeries:
    """A run's per-round series from its summary (loaded with ``key`` if not given) plus each site's reported ε."""
    summary = summary or load_summary(store, run_id, key)
    rounds = [r.number for r in summary.rounds]
    index = {rn: i for i, rn in enumerate(rounds)}
    with store.session() as s:
        max_eps = dict(s.execute(
            select(S.Metric.round_number, S.Metric.value).where(
                S.Metric.run_id == run_id, S.Metric.site_id.is_(None), S.Metric.name == P.EPSILON)).all())
        by_site: dict[str, list[float | None]] = {}
        for key_, rn, value in s.execute(
                select(S.Site.site_key, S.PrivacyEvent.round_number, S.PrivacyEvent.reported_epsilon)
                .join(S.Site, S.Site.id == S.PrivacyEvent.site_id).where(S.PrivacyEvent.run_id == run_id)):
            if rn in index:
                by_site.setdefault(key_, [None] * len(rounds))[index[rn]] = value
    caps = {site.epsilon_cap for site in summary.sites if site.epsilon_cap is not None}
    return MetricSeries(
        run_id, summary.name, rounds, [r.accuracy for r in summary.rounds], [r.loss for r in summary.rounds],
        [r.train_loss for r in summary.rounds], [r.encrypted for r in summary.rounds],
        [max_eps.get(rn) for rn in rounds], dict(sorted(by_site.items(), key=lambda kv: natural_key(kv[0]))),
        min(caps) if caps else None,
    )


# -- veil export ------------------------------------------------------------------------------
EXPORT_TABLES = ("run", "rounds", "sites", "participation", "privacy_events", "metrics")


def export_tables(store: RunStore, run_id: int, key: SecretKey | None = None) -> dict[str, list[dict[str, Any]]]:
    """The run as flat tables (no ciphertexts, no keys): what `veil export` writes."""
    summary = load_summary(store, run_id, key)
    with store.session() as s:
        keys = dict(s.execute(select(S.Site.id, S.Site.site_key).where(S.Site.run_id == run_id)).all())
        participation = [
            {"round": p.round_number, "site": keys.get(p.site_id), "phase": p.phase, "status": p.status,
             "reason_code": p.reason_code, "reason": p.reason, "examples": p.num_examples,
             "seconds": p.seconds, "bytes_down": p.bytes_down, "bytes_up": p.bytes_up}
            for p in s.scalars(select(S.Participation).where(S.Participation.run_id == run_id)
                               .order_by(S.Participation.round_number, S.Participation.id))]
        events = [
            {"round": e.round_number, "site": keys.get(e.site_id), "mechanism": e.mechanism,
             "sampling": e.sampling, "noise_multiplier": e.noise_multiplier, "sample_rate": e.sample_rate,
             "steps": e.steps, "max_grad_norm": e.max_grad_norm, "delta": e.delta, "accountant": e.accountant,
             "accountant_version": e.accountant_version, "reported_epsilon": e.reported_epsilon,
             "dataset_id": e.dataset_id, "lifetime_epsilon": e.lifetime_epsilon,
             "lifetime_delta": e.lifetime_delta, "epsilon_cap": e.epsilon_cap, "rng": e.rng,
             "ledger_id": e.ledger_id, "ledger_seq": e.ledger_seq}
            for e in s.scalars(select(S.PrivacyEvent).where(S.PrivacyEvent.run_id == run_id)
                               .order_by(S.PrivacyEvent.round_number, S.PrivacyEvent.id))]
        metrics = [
            {"round": m.round_number, "site": keys.get(m.site_id) if m.site_id else None, "phase": m.phase,
             "name": m.name, "value": m.value}
            for m in s.scalars(select(S.Metric).where(S.Metric.run_id == run_id)
                               .order_by(S.Metric.round_number, S.Metric.id))]
    run = {
        "run_id": summary.run_id, "name": summary.name, "status": summary.status, "mode": summary.mode,
        "created_at": summary.created_at, "wall_seconds": summary.wall_seconds, "seed": summary.seed,
        "spec_hash": summary.spec_hash, "code_version": summary.code_version,
        "rounds_planned": summary.planned_rounds, "sites_planned": summary.planned_sites,
        "error": summary.error, "spec_json": json.dumps(summary.spec, sort_keys=True),
        "encryption_json": json.dumps(summary.encryption) if summary.encryption else None,
        "decrypted_with": summary.decrypted_with, "noise_rng": summary.noise_rng,
        "privacy_note": summary.privacy_note, "researcher": summary.researcher,
    }
    return {
        "run": [run],
        "rounds": [asdict(r) for r in summary.rounds],
        "sites": [asdict(site) | {"remaining": site.remaining} for site in summary.sites],
        "participation": participation,
        "privacy_events": events,
        "metrics": metrics,
    }


def write_export(tables: dict[str, list[dict[str, Any]]], fmt: str, out: Path) -> list[Path]:
    """json: one file; csv and parquet: one file per table in the directory ``out``."""
    if fmt == "json":
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, json.dumps(tables, indent=2, default=str).encode(), mode=0o644)
        return [out]
    if out.exists() and not out.is_dir():
        raise VeilError(f"{out} is a file; --out for {fmt} is a directory (one file per table)")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, rows in tables.items():
        path = out / f"{name}.{fmt}"
        if fmt == "csv":
            atomic_write(path, _csv(rows), mode=0o644)
        else:
            atomic_write(path, _parquet(rows), mode=0o644)
        written.append(path)
    return written


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    cols: dict[str, None] = {}
    for row in rows:
        cols.update(dict.fromkeys(row))
    return list(cols)


def _csv(rows: list[dict[str, Any]]) -> bytes:
    import csv
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_columns(rows), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode()


def _parquet(rows: list[dict[str, Any]]) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = _columns(rows)
    table = pa.table({c: [r.get(c) for r in rows] for c in cols}) if rows else pa.table({})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()
