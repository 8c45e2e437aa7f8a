"""Tables of the run store. Flower types never appear here; only plain values.

Nothing private is stored: no raw data, no per-record values, no keys. Checkpoints live in
files named by URI with their sha256 and size, never as blobs in the database.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from veil.names import ParticipationStatus, Phase, RequestStatus, RoundStatus, RunMode, RunStatus

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """The current time, timezone-aware in UTC: the default of every timestamp column."""
    return datetime.now(UTC)


class Base(DeclarativeBase):
    """Declarative base of the run store's tables, with fixed constraint names for Alembic migrations."""

    metadata = MetaData(naming_convention=NAMING)


class Run(Base):
    """One federated run: spec (JSON and hash), status, seed, planned size, timing, public CKKS description."""

    __tablename__ = "runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[RunStatus] = mapped_column(String(16), index=True)
    spec_json: Mapped[str] = mapped_column(Text)
    spec_hash: Mapped[str] = mapped_column(String(64), index=True)
    code_version: Mapped[str] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(Integer)
    num_sites: Mapped[int] = mapped_column(Integer)
    num_rounds: Mapped[int] = mapped_column(Integer)
    mode: Mapped[RunMode] = mapped_column(String(16), default="simulation")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    wall_seconds: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    # CKKS: {"aggregation", "evaluation", "key_id", "params"}; the public description only
    encryption_json: Mapped[str | None] = mapped_column(Text)
    # who asked for it: the researcher whose signed request the coordinator admitted
    researcher: Mapped[str | None] = mapped_column(String(120))
    researcher_key_id: Mapped[str | None] = mapped_column(String(16))
    # the process running it (host, pid, a token that tells a reused pid apart) and its heartbeat:
    # a ``running`` run whose owner is gone is closed as ``failed`` (server.lifecycle.close_orphans)
    owner_host: Mapped[str | None] = mapped_column(String(255))
    owner_pid: Mapped[int | None] = mapped_column(Integer)
    owner_token: Mapped[str | None] = mapped_column(String(80))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Flower's own run id (deployments: what `flwr ls` shows); None for simulations
    flower_run_id: Mapped[str | None] = mapped_column(String(32))


class Site(Base):
    """One site in one run: data sizes, device, pre-flight budget answer, derived run ε, reported ledger head."""

    __tablename__ = "sites"
    __table_args__ = (UniqueConstraint("run_id", "site_key"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    site_key: Mapped[str] = mapped_column(String(200))
    num_train: Mapped[int | None] = mapped_column(Integer)
    num_test: Mapped[int | None] = mapped_column(Integer)
    device: Mapped[str | None] = mapped_column(String(16))
    delta: Mapped[float | None] = mapped_column(Float)
    first_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # what the site said at the pre-flight budget question (its own ledger and policy)
    dataset_id: Mapped[str | None] = mapped_column(String(32), index=True)
    epsilon_cap: Mapped[float | None] = mapped_column(Float)
    budget_delta: Mapped[float | None] = mapped_column(Float)
    budget_accountant: Mapped[str | None] = mapped_column(String(16))
    spent_before: Mapped[float | None] = mapped_column(Float)
    # rounds the site's ledger released without DP in its cap's scope, at the pre-flight (null: none said)
    without_dp_before: Mapped[int | None] = mapped_column(Integer)
    projected_epsilon: Mapped[float | None] = mapped_column(Float)
    affordable_rounds: Mapped[int | None] = mapped_column(Integer)
    # the rounds the run planned for this site at the pre-flight (refuse mode; None: all of them)
    planned_rounds: Mapped[int | None] = mapped_column(Integer)
    # the run's ε for this site, recomputed by the coordinator from the stored privacy events
    # with the site's accountant when the run ended, over ``derived_events`` events (a later
    # event makes it stale, and readers recompute)
    derived_epsilon: Mapped[float | None] = mapped_column(Float)
    derived_events: Mapped[int | None] = mapped_column(Integer)
    # the site's ledger as it reported it at the pre-flight (id and entry count)
    ledger_id: Mapped[str | None] = mapped_column(String(32))
    ledger_seq: Mapped[int | None] = mapped_column(Integer)


class Round(Base):
    """One round of a run: status, sites sampled and ok, training records, duration and bytes each way."""

    __tablename__ = "rounds"
    __table_args__ = (UniqueConstraint("run_id", "number"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    status: Mapped[RoundStatus] = mapped_column(String(16))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    seconds: Mapped[float | None] = mapped_column(Float)
    sites_sampled: Mapped[int] = mapped_column(Integer, default=0)
    sites_ok: Mapped[int] = mapped_column(Integer, default=0)
    examples: Mapped[int] = mapped_column(Integer, default=0)
    bytes_down: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_up: Mapped[int] = mapped_column(BigInteger, default=0)


class Participation(Base):
    """One site in one phase of one round: what it did, or why it did not."""

    __tablename__ = "participation"
    __table_args__ = (UniqueConstraint("run_id", "round_number", "site_id", "phase"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    round_number: Mapped[int] = mapped_column(Integer)
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id", ondelete="CASCADE"), index=True)
    phase: Mapped[Phase] = mapped_column(String(16))
    status: Mapped[ParticipationStatus] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    reason_code: Mapped[str | None] = mapped_column(String(40))  # a site's refusal code
    num_examples: Mapped[int | None] = mapped_column(Integer)
    seconds: Mapped[float | None] = mapped_column(Float)
    bytes_down: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_up: Mapped[int] = mapped_column(BigInteger, default=0)


class Metric(Base):
    """A named value for a round: per site (``site_id`` set) or aggregated (``site_id`` NULL)."""

    __tablename__ = "metrics"
    __table_args__ = (Index("ix_metrics_run_round", "run_id", "round_number"),
                      Index("ix_metrics_run_site_name", "run_id", "site_id", "name", "round_number"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    round_number: Mapped[int] = mapped_column(Integer)
    site_id: Mapped[int | None] = mapped_column(ForeignKey("sites.id", ondelete="CASCADE"))
    phase: Mapped[Phase] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(64))
    value: Mapped[float | None] = mapped_column(Float)
    encrypted: Mapped[bool] = mapped_column(Boolean, default=False)


class PrivacyEvent(Base):
    """The mechanism a site ran in a round; ε is derived from these, not stored as truth."""

    __tablename__ = "privacy_events"
    __table_args__ = (UniqueConstraint("run_id", "round_number", "site_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    round_number: Mapped[int] = mapped_column(Integer)
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id", ondelete="CASCADE"), index=True)
    mechanism: Mapped[str] = mapped_column(String(32), default="dp-sgd")
    sampling: Mapped[str] = mapped_column(String(16), default="poisson")
    noise_multiplier: Mapped[float] = mapped_column(Float)
    sample_rate: Mapped[float] = mapped_column(Float)
    steps: Mapped[int] = mapped_column(Integer)
    max_grad_norm: Mapped[float] = mapped_column(Float)
    delta: Mapped[float] = mapped_column(Float)
    accountant: Mapped[str] = mapped_column(String(16))
    accountant_version: Mapped[str] = mapped_column(String(64))
    reported_epsilon: Mapped[float] = mapped_column(Float)  # what the site said, for audit
    # the site's ledger after charging this event: lifetime spend of its data set
    dataset_id: Mapped[str | None] = mapped_column(String(32), index=True)
    ledger_entry: Mapped[str | None] = mapped_column(String(32))
    lifetime_epsilon: Mapped[float | None] = mapped_column(Float)
    lifetime_delta: Mapped[float | None] = mapped_column(Float)
    ledger_accountant: Mapped[str | None] = mapped_column(String(16))
    epsilon_cap: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # where the noise and the Poisson mask came from: os-entropy (private) | seeded (NOT private)
    rng: Mapped[str | None] = mapped_column(String(16))
    ledger_id: Mapped[str | None] = mapped_column(String(32))
    ledger_seq: Mapped[int | None] = mapped_column(Integer)  # the ledger entry this charge wrote
    # rounds the site's ledger released without DP in the cap's scope, after this charge (null or 0:
    # none); any: ``lifetime_epsilon`` composes the DP rounds only and is no lifetime guarantee
    lifetime_without_dp: Mapped[int | None] = mapped_column(Integer)


class RunRequest(Base):
    """Every signed run request the coordinator judged: admitted (with its run) or refused, and why.

    The nonce is unique, so a replayed request is refused even by two coordinators sharing
    one store; refused requests never get a run row.
    """

    __tablename__ = "run_requests"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    nonce: Mapped[str | None] = mapped_column(String(32), unique=True)
    key_id: Mapped[str | None] = mapped_column(String(16))
    researcher: Mapped[str | None] = mapped_column(String(120))
    issued_at: Mapped[str | None] = mapped_column(String(40))
    scenario_name: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[RequestStatus] = mapped_column(String(16))
    reason_code: Mapped[str | None] = mapped_column(String(32))
    reason: Mapped[str | None] = mapped_column(Text)
    run_id: Mapped[int | None] = mapped_column(Integer)


class LedgerHead(Base):
    """The coordinator's witness of each site's ledger: the furthest head it has seen.

    A site whose ledger later reports fewer entries (an older copy restored), a different
    entry at a seen position, or another ledger id without naming this one as the ledger it
    explicitly replaced, is refused. Sites are keyed by the id they report.
    """

    __tablename__ = "ledger_heads"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    site_key: Mapped[str] = mapped_column(String(200), unique=True)
    ledger_id: Mapped[str] = mapped_column(String(32))
    seq: Mapped[int] = mapped_column(Integer)
    entry_hash: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    run_id: Mapped[int | None] = mapped_column(Integer)  # the run that last moved it (no FK: outlives runs)
    # set when the site's administrator explicitly started a new ledger (``veil site init --new-ledger``)
    replaced_ledger: Mapped[str | None] = mapped_column(String(32))
    replaced_seq: Mapped[int | None] = mapped_column(Integer)
    replaced_reason: Mapped[str | None] = mapped_column(Text)
    replaced_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Artifact(Base):
    """A file a run produced (a checkpoint), by URI with its sha256 and size; never the bytes themselves."""

    __tablename__ = "artifacts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    round_number: Mapped[int | None] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(32))  # checkpoint
    uri: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class EncryptedMetric(Base):
    """A round's evaluation sums as one CKKS ciphertext: only a key holder can read them.

    ``names`` lists what the slots hold (each divided by ``weight_norm``); the coordinator
    only ever added ciphertexts to make it. One ciphertext per round (~65 KB at N = 4096)
    lives in the row so a researcher with the key needs nothing but the store.
    """

    __tablename__ = "encrypted_metrics"
    __table_args__ = (UniqueConstraint("run_id", "round_number", "phase"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    round_number: Mapped[int] = mapped_column(Integer)
    phase: Mapped[Phase] = mapped_column(String(16))
    names: Mapped[str] = mapped_column(String(200))
    key_id: Mapped[str] = mapped_column(String(32))
    weight_norm: Mapped[float] = mapped_column(Float)
    sites: Mapped[int] = mapped_column(Integer)
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    sha256: Mapped[str] = mapped_column(String(64))


class RegisteredSite(Base):
    """A site whose public node key the coordinator registered with its SuperLink
    (``veil coordinator register``): its name, Flower's node id and the key's fingerprint.

    Only the SHA-256 fingerprint of the public key is kept (``ssh-keygen -l``'s form), never key
    material. Each name, key and node id is registered once. ``name`` is the site id its
    replies report, so it joins ``sites.site_key`` (participation, ledger heads).
    """

    __tablename__ = "registered_sites"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    node_id: Mapped[str] = mapped_column(String(20), unique=True)  # Flower's uint64, as decimal text
    key_fingerprint: Mapped[str] = mapped_column(String(80), unique=True)  # "SHA256:<base64>"
    registered_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
