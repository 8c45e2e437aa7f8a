"""What the researcher dashboard reads from the run store: run lists, comparisons, series, exports.

Every function answers from a few indexed, set-based queries (never one query per round or
per site), so a store with 100 runs x 100 rounds x 100 sites answers in about a second
(``benchmarks/dashboard.py``). Encrypted evaluation metrics stay ``None`` with
``encrypted=True`` unless a key is given. Stored values are checked as ``server.read.summary``
checks them (``server.read.stored``): a bad one is ``None`` with its reason in ``problems``.
Exports keep the stored values exactly, as valid JSON, CSV or Parquet.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Integer, and_, case, cast, func, not_, or_, select
from sqlalchemy.engine import make_url

from privacy.accounting import ACCOUNTANTS
from server.read.stored import (
    SIGMA_MAX,
    SIGMA_MIN,
    STEPS_MAX,
    Checker,
    accuracy,
    check_event,
    json_safe,
    nonneg,
    text,
)
from server.read.summary import (
    RUN_MODES,
    RunSummary,
    SiteMechanism,
    iso_utc,
    load_summary,
    natural_key,
    site_epsilons,
)
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
        return {text(acc): text(ver) for acc, ver in s.execute(
            select(S.PrivacyEvent.accountant, S.PrivacyEvent.accountant_version)
            .where(S.PrivacyEvent.run_id == run_id).distinct())}


def site_mechanisms(store: RunStore, run_id: int) -> dict[str, SiteMechanism]:
    """{site: its mechanism} over the run's privacy events (sites whose events pass their checks)."""
    return {e.site: e.mechanism for e in site_epsilons(store, run_id) if e.mechanism is not None}


FLOAT_MAX = 1.7e308  # a stored float above this is +inf (SQLite) or NaN (PostgreSQL sorts NaN last)


def _outside(column: Any, low: float, high: float, *, open_low: bool = False, open_high: bool = False) -> Any:
    """SQL: ``column`` is NULL, not a number in [low, high] (text in SQLite sorts above numbers), or NaN;
    ``open_low``/``open_high`` leave that end out of the range."""
    above_low = column > low if open_low else column >= low
    below_high = column < high if open_high else column <= high
    return or_(column.is_(None), not_(and_(above_low, below_high)))


def bad_events() -> Any:
    """SQL: a privacy event that fails ``server.read.stored.check_event`` or has a bad reported ε."""
    PE = S.PrivacyEvent
    return or_(
        _outside(PE.noise_multiplier, SIGMA_MIN, SIGMA_MAX), _outside(PE.sample_rate, 0.0, 1.0, open_low=True),
        _outside(PE.steps, 0, STEPS_MAX), PE.steps != cast(PE.steps, Integer),
        _outside(PE.max_grad_norm, 0.0, FLOAT_MAX, open_low=True),
        _outside(PE.delta, 0.0, 1.0, open_low=True, open_high=True),
        PE.accountant.is_(None), PE.accountant.not_in(ACCOUNTANTS),
        _outside(PE.reported_epsilon, 0.0, FLOAT_MAX),
    )


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
    no_dp: bool = False  # trained without DP (privacy: none): the labelled non-private baseline
    problems: dict[str, str] = field(default_factory=dict)


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
        rounds: dict[int, tuple[object, object]] = {rid: (done, moved or 0) for rid, done, moved in s.execute(
            select(S.Round.run_id, func.count().filter(S.Round.status == "completed"),
                   func.sum(S.Round.bytes_down + S.Round.bytes_up))
            .where(S.Round.run_id.in_(ids)).group_by(S.Round.run_id))}
        trained = dict(s.execute(
            select(S.Site.run_id, func.count()).where(S.Site.run_id.in_(ids), S.Site.num_train.is_not(None))
            .group_by(S.Site.run_id)).all())
        aggregate = (S.Metric.run_id.in_(ids), S.Metric.site_id.is_(None))
        last = (select(S.Metric.run_id, func.max(S.Metric.round_number).label("rn"))
                .where(*aggregate, S.Metric.name == P.EVAL_ACC).group_by(S.Metric.run_id).subquery())
        accuracy_ = dict(s.execute(
            select(S.Metric.run_id, S.Metric.value).join(
                last, (last.c.run_id == S.Metric.run_id) & (last.c.rn == S.Metric.round_number))
            .where(*aggregate, S.Metric.name == P.EVAL_ACC)).all())
        max_eps = dict(s.execute(
            select(S.Metric.run_id, func.max(S.Metric.value))
            .where(*aggregate, S.Metric.name == P.EPSILON).group_by(S.Metric.run_id)).all())
        encrypted = set(s.scalars(select(S.EncryptedMetric.run_id).where(
            S.EncryptedMetric.run_id.in_(ids)).distinct()))
        PE = S.PrivacyEvent
        flags = {rid: (bool(seeded), bool(bad)) for rid, seeded, bad in s.execute(
            select(PE.run_id, func.max(case((PE.rng == "seeded", 1), else_=0)),
                   func.max(case((bad_events(), 1), else_=0)))
            .where(PE.run_id.in_(ids)).group_by(PE.run_id))}
    return [_list_row(r, rounds.get(r.id, (0, 0)), trained.get(r.id, 0), accuracy_.get(r.id),
                      r.id in encrypted and r.id not in accuracy_, max_eps.get(r.id),
                      *flags.get(r.id, (False, False)))
            for r in runs]


def _list_row(r: S.Run, rounds: tuple[object, object], trained: object, acc: object, encrypted: bool,
              max_eps: object, seeded: bool, bad: bool) -> RunListRow:
    check = Checker()
    max_epsilon = nonneg(check, "max_epsilon", max_eps)
    if bad:
        max_epsilon = None
        check.problems["max_epsilon"] = (f"some stored privacy events fail the read-side checks: `veil runs show "
                                         f"{r.id}` names them")
    return RunListRow(
        r.id, text(r.name), check.status("status", r.status, RUN_STATUSES),
        check.status("mode", r.mode, RUN_MODES),
        iso_utc(r.created_at), check.count("rounds_completed", rounds[0]),
        check.count("rounds_planned", r.num_rounds), check.count("sites_trained", trained),
        check.count("sites_planned", r.num_sites), accuracy(check, "accuracy", acc), encrypted, max_epsilon,
        nonneg(check, "wall_seconds", r.wall_seconds), check.count("bytes_moved", rounds[1]), seeded,
        _spec_without_dp(r.spec_json), problems=check.problems)


def _spec_without_dp(spec_json: str) -> bool:
    """Whether a stored scenario says ``privacy: none`` (an unreadable one says nothing)."""
    from server.read.summary import without_dp

    try:
        spec = json.loads(spec_json)
    except (TypeError, ValueError):
        return False
    return isinstance(spec, dict) and without_dp(spec)


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
    no_dp: bool = False  # trained without DP (privacy: none): the labelled non-private baseline, no ε
    noise_seeded: bool = False  # some site's DP noise was reproducible from the seed: not private
    server_optimizer: str | None = None  # ``ServerOptimizer.describe()`` of the stored spec (fedavg if none)
    problems: dict[str, str] = field(default_factory=dict)  # measures whose stored inputs failed a check


def compare_row(summary: RunSummary) -> CompareRow:
    """A run's summary reduced to its ``veil compare`` row, over the sites that trained at least once."""
    final = summary.final
    trained = [site for site in summary.sites if site.rounds_joined > 0]
    deltas = {site.delta for site in trained if site.delta}
    accountants = {site.accountant for site in trained if site.accountant}
    sigmas = [site.noise_multiplier for site in trained if site.noise_multiplier]
    enc = summary.encryption
    problems = {name: why for name, why in summary.problems.items()
                if name in ("status", "wall_seconds", "server_optimizer")}
    for name in ("accuracy", "loss"):
        if final and name in final.problems:
            problems[f"final_{name}"] = f"round {final.number}: {final.problems[name]}"
    for site in trained:
        for name, target in (("epsilon", "max_epsilon"), ("noise_multiplier", "mean_noise"),
                             ("accountant", "accountant"), ("delta", "delta")):
            if name in site.problems:
                problems.setdefault(target, f"site {site.site}: {site.problems[name]}")
    if summary.epsilon_invalid:
        problems.setdefault("max_epsilon", "some site's stored privacy events fail their checks")
    return CompareRow(
        summary.run_id, summary.name, summary.status,
        sum(1 for r in summary.rounds if r.status == "completed"), summary.planned_rounds,
        len(trained), summary.planned_sites,
        final.accuracy if final else None, final.loss if final else None,
        bool(final and final.encrypted and final.accuracy is None and "accuracy" not in final.problems),
        summary.max_epsilon, max(deltas) if deltas else None, ",".join(sorted(accountants)) or None,
        None if "mean_noise" in problems else sum(sigmas) / len(sigmas) if sigmas else None,
        (f"ckks {'+'.join(k for k in ('aggregation', 'evaluation') if enc.get(k) == 'ckks')}" if enc else None),
        summary.wall_seconds, summary.bytes_moved, summary.examples, summary.without_dp,
        summary.not_private and not summary.without_dp, summary.server_optimizer, problems,
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
    # {"<what>, round <n>": why}, what being accuracy, loss, train-loss, max ε or "ε <site>"
    problems: dict[str, str] = field(default_factory=dict)

    def problem(self, what: str, round_number: int) -> str | None:
        """Why the stored value of ``what`` in that round was not used, or None."""
        return self.problems.get(f"{what}, round {round_number}")

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
    problems = {f"{label}, round {r.number}": r.problems[name] for r in summary.rounds
                for name, label in (("accuracy", "accuracy"), ("loss", "loss"), ("train_loss", "train-loss"))
                if name in r.problems}
    with store.session() as s:
        max_eps: dict[object, float | None] = {}
        for rn, value in s.execute(
                select(S.Metric.round_number, S.Metric.value).where(
                    S.Metric.run_id == run_id, S.Metric.site_id.is_(None), S.Metric.name == P.EPSILON)):
            check = Checker()
            max_eps[rn] = nonneg(check, "max ε", value)
            if check.problems:
                problems[f"max ε, round {rn}"] = check.problems["max ε"]
        by_site: dict[str, list[float | None]] = {}
        PE = S.PrivacyEvent
        for key_, rn, value, *mechanism in s.execute(
                select(S.Site.site_key, PE.round_number, PE.reported_epsilon, PE.noise_multiplier,
                       PE.sample_rate, PE.steps, PE.max_grad_norm, PE.delta, PE.accountant)
                .join(S.Site, S.Site.id == PE.site_id).where(PE.run_id == run_id)):
            site = text(key_)
            if rn in index:  # an ε reported for a mechanism that fails its checks is not shown either
                event = check_event(rn, *mechanism)
                check = Checker()
                reported = nonneg(check, "ε", value) if not isinstance(event, str) else None
                by_site.setdefault(site, [None] * len(rounds))[index[rn]] = reported
                why = event.removeprefix(f"round {rn}: ") if isinstance(event, str) else check.problems.get("ε")
                if why:
                    problems[f"ε {site}, round {rn}"] = why
    caps = {site.epsilon_cap for site in summary.sites if site.epsilon_cap is not None}
    return MetricSeries(
        run_id, summary.name, rounds, [r.accuracy for r in summary.rounds], [r.loss for r in summary.rounds],
        [r.train_loss for r in summary.rounds], [r.encrypted for r in summary.rounds],
        [max_eps.get(rn) for rn in rounds], dict(sorted(by_site.items(), key=lambda kv: natural_key(kv[0]))),
        min(caps) if caps else None, problems,
    )


# -- veil export ------------------------------------------------------------------------------
EXPORT_TABLES = ("run", "rounds", "sites", "participation", "privacy_events", "metrics")


def export_tables(store: RunStore, run_id: int, key: SecretKey | None = None) -> dict[str, list[dict[str, Any]]]:
    """The run as flat tables (no ciphertexts, no keys): what `veil export` writes.

    The run, participation, privacy-event and metric tables hold the stored values exactly; the
    rounds and sites tables are the checked summary, each row's failed checks in ``problems``.
    """
    summary = load_summary(store, run_id, key)
    stored = store.get_run(run_id)
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
        "run_id": summary.run_id, "name": stored.name, "status": stored.status, "mode": stored.mode,
        "created_at": summary.created_at, "wall_seconds": stored.wall_seconds, "seed": stored.seed,
        "spec_hash": stored.spec_hash, "code_version": stored.code_version,
        "rounds_planned": stored.num_rounds, "sites_planned": stored.num_sites,
        "error": stored.error, "spec_json": stored.spec_json, "encryption_json": stored.encryption_json,
        "decrypted_with": summary.decrypted_with, "noise_rng": summary.noise_rng,
        "privacy_note": summary.privacy_note, "researcher": summary.researcher,
        "problems": _problems(summary.problems),
    }
    return {
        "run": [run],
        "rounds": [asdict(r) | {"problems": _problems(r.problems)} for r in summary.rounds],
        "sites": [{k: v for k, v in asdict(site).items() if k != "mechanism"}
                  | {"remaining": site.remaining, "problems": _problems(site.problems)} for site in summary.sites],
        "participation": participation,
        "privacy_events": events,
        "metrics": metrics,
    }


def _problems(problems: dict[str, str]) -> str | None:
    """A row's failed checks as one cell: ``field: why; ...`` (None when there are none)."""
    return "; ".join(f"{name}: {why}" for name, why in problems.items()) or None


def write_export(tables: dict[str, list[dict[str, Any]]], fmt: str, out: Path) -> list[Path]:
    """json: one file; csv and parquet: one file per table in the directory ``out``."""
    if fmt == "json":
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, export_json(tables).encode(), mode=0o644)
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


def export_json(tables: dict[str, list[dict[str, Any]]]) -> str:
    """The tables as valid JSON: NaN and ±inf as the strings "NaN", "Infinity", "-Infinity"."""
    return json.dumps(json_safe(tables), indent=2, default=str, allow_nan=False)


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    cols: dict[str, None] = {}
    for row in rows:
        cols.update(dict.fromkeys(row))
    return list(cols)


def _csv(rows: list[dict[str, Any]]) -> bytes:
    import csv
    import io

    buf = io.StringIO()
    # RFC 4180 line ends: a stored value holding \r or \n is then quoted, and stays one field
    writer = csv.DictWriter(buf, fieldnames=_columns(rows), lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode()


def _parquet(rows: list[dict[str, Any]]) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = _columns(rows)
    table = pa.table({c: _arrow_column([r.get(c) for r in rows]) for c in cols}) if rows else pa.table({})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _arrow_column(values: list[Any]) -> Any:
    """One Parquet column; a column whose stored values mix types (SQLite allows text in a number
    column) is written as text, each value as ``str`` and None kept."""
    import pyarrow as pa

    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return pa.array([None if v is None else str(v) for v in values], type=pa.string())
