"""The site's privacy ledger: an append-only, hash-chained record of the spend it released.

One SQLite file per site, owned by the site, written through SQLAlchemy. Each entry is one
DP-SGD event the site ran, keyed by a fingerprint of the data set it ran on. The ledger
composes every entry for that data set, across rounds *and* runs, so its ε is the lifetime
spend of the data: what a data holder cares about.

Rules it keeps:

* **Write-ahead.** ``charge`` commits the event (``synchronous=FULL``: fsynced) *before* the
  site trains, so nothing trained on the data can leave the site unrecorded. A crash after
  the commit over-counts; a crash can never under-count.
* **Check and charge are one transaction** (``BEGIN IMMEDIATE``): two processes of the same
  site cannot both squeeze under the cap.
* **Refusal exactly at the cap.** A charge whose projected lifetime ε exceeds the cap is
  refused and writes nothing; one that lands exactly on it is accepted. The projection is
  the ε that gets recorded (``privacy.accounting`` is deterministic in the history).
* **Tamper-evident.** Entries form a sha256 chain and the meta table holds the head; every
  open and every charge re-verifies it. A damaged, truncated, edited or unknown-schema file
  raises ``LedgerError`` and is never reset or repaired automatically.

The chain detects accidents, bugs and naive edits. It is not a defence against the site's
own administrator rewriting the whole chain: the ledger protects the data from everyone
*else*, and the site is the party enforcing it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Column,
    Connection,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    event,
    inspect,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DatabaseError, OperationalError

from privacy.accounting import AccountantName, accountant_version, group_events, history_epsilon
from privacy.events import DpSgdEvent
from veil.errors import LedgerError

SCHEMA_VERSION = "1"
_GENESIS = "0" * 64

_meta = MetaData()
meta_table = Table(
    "ledger_meta", _meta,
    Column("key", String(64), primary_key=True),
    Column("value", String(200), nullable=False),
)
entries_table = Table(
    "ledger_entries", _meta,
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("entry_id", String(32), nullable=False, unique=True),
    Column("fingerprint", String(64), nullable=False, index=True),
    Column("run_ref", String(200), nullable=False),
    Column("round", Integer, nullable=False),
    Column("mechanism", String(32), nullable=False),
    Column("sampling", String(16), nullable=False),
    Column("noise_multiplier", Float, nullable=False),
    Column("sample_rate", Float, nullable=False),
    Column("steps", Integer, nullable=False),
    Column("max_grad_norm", Float, nullable=False),
    Column("delta", Float, nullable=False),
    Column("accountant", String(16), nullable=False),
    Column("accountant_version", String(64), nullable=False),
    Column("epsilon_after", Float, nullable=False),
    Column("epsilon_cap", Float, nullable=True),
    Column("created_at", String(40), nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("entry_hash", String(64), nullable=False),
)
_HASHED = [c.name for c in entries_table.columns if c.name != "entry_hash"]


def fingerprint_arrays(*arrays: Any) -> str:
    """sha256 over arrays' dtypes, shapes and bytes: the identity of a data set.

    Accepts numpy arrays and torch tensors. Any change to a record, a label, the order or
    the size gives a new fingerprint (and so, under ``cap_scope: dataset``, a new budget).
    """
    import numpy as np

    h = hashlib.sha256(b"veil-dataset-v1")
    for arr in arrays:
        a = arr.detach().cpu().numpy() if hasattr(arr, "detach") else np.asarray(arr)
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def dataset_id(fingerprint: str) -> str:
    """The short, derived id a site shares with the coordinator (never the raw fingerprint)."""
    return hashlib.sha256(f"veil-dataset-id:{fingerprint}".encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Entry:
    seq: int
    entry_id: str
    fingerprint: str
    run_ref: str
    round: int
    event: DpSgdEvent
    delta: float
    accountant: str
    accountant_version: str
    epsilon_after: float
    epsilon_cap: float | None
    created_at: str


@dataclass(frozen=True)
class Spend:
    """A data set's lifetime spend as the ledger measures it."""

    epsilon: float
    delta: float
    accountant: str
    entries: int
    steps: int


@dataclass(frozen=True)
class Charge:
    """An accepted, committed charge: the event is on disk before training starts."""

    entry_id: str
    seq: int
    epsilon_before: float
    epsilon_after: float
    delta: float
    accountant: str
    accountant_version: str
    epsilon_cap: float | None


@dataclass(frozen=True)
class BudgetExceeded:
    """A refused charge: nothing was written."""

    spent: float
    projected: float
    cap: float
    delta: float
    accountant: str

    @property
    def detail(self) -> str:
        return (f"lifetime ε would reach {self.projected:.4f} > cap {self.cap:g} at δ={self.delta:g} "
                f"({self.accountant}); already spent {self.spent:.4f}")


def _hash_row(row: dict[str, Any]) -> str:
    payload = json.dumps({k: row[k] for k in _HASHED}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def _engine(path: Path) -> Engine:
    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": 60})

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (below)
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")  # a commit is fsynced before it returns
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")  # check-and-charge is atomic across processes

    return engine


class SiteLedger:
    """Open (or, when ``create`` and the file does not exist, create) a site ledger."""

    def __init__(self, path: Path | str, *, create: bool = True) -> None:
        self.path = Path(path).expanduser().resolve()
        if not self.path.exists():
            if not create:
                raise LedgerError(f"ledger {self.path} does not exist")
            if Path(f"{self.path}-wal").exists():
                raise LedgerError(
                    f"ledger {self.path} is missing but its write-ahead log {self.path}-wal is "
                    "present: the ledger file was deleted or moved; restore it before training"
                )
            _create(self.path)
        elif self.path.stat().st_size == 0:
            raise LedgerError(
                f"ledger {self.path} is empty (truncated?); it is never reset automatically: "
                "restore it from a backup, or move it aside if this data has never been used"
            )
        self.engine = _engine(self.path)
        try:
            with self._tx() as conn:
                self._verify(conn)
                self.ledger_id = str(self._meta(conn)["ledger_id"])
        except LedgerError:
            self.engine.dispose()
            raise

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> SiteLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transactions and verification -----------------------------------------------------
    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        try:
            with self.engine.begin() as conn:
                yield conn
        except (DatabaseError, OperationalError, sqlite3.DatabaseError) as err:
            orig = getattr(err, "orig", err)
            if isinstance(orig, sqlite3.OperationalError) and "locked" in str(orig):
                raise LedgerError(f"ledger {self.path} is locked by another process: {orig}") from None
            raise LedgerError(
                f"ledger {self.path} is damaged or not a Veil ledger ({orig}); it is never reset "
                "automatically: restore it from a backup"
            ) from None

    def _meta(self, conn: Connection) -> dict[str, str]:
        return {k: v for k, v in conn.execute(select(meta_table.c.key, meta_table.c.value)).all()}

    def _verify(self, conn: Connection) -> list[dict[str, Any]]:
        """Check schema, version and the whole hash chain; return the rows in order."""
        check = conn.exec_driver_sql("PRAGMA quick_check").scalar()
        if check != "ok":
            raise LedgerError(f"ledger {self.path} failed SQLite's integrity check: {check}")
        insp = inspect(conn)
        tables = set(insp.get_table_names())
        if not {"ledger_meta", "ledger_entries"} <= tables:
            raise LedgerError(
                f"{self.path} is not a Veil ledger (tables found: {sorted(tables) or 'none'})"
            )
        meta = self._meta(conn)
        version = meta.get("schema_version")
        if version != SCHEMA_VERSION:
            raise LedgerError(
                f"ledger {self.path} has schema version {version!r}; this Veil reads version "
                f"{SCHEMA_VERSION!r}. Use the Veil release that wrote it (or a newer one)"
            )
        cols = {c["name"] for c in insp.get_columns("ledger_entries")}
        expected = {c.name for c in entries_table.columns}
        if cols != expected:
            raise LedgerError(
                f"ledger {self.path} has unexpected columns (missing {sorted(expected - cols)}, "
                f"extra {sorted(cols - expected)}): edited outside Veil"
            )
        rows = [dict(r._mapping) for r in conn.execute(select(entries_table).order_by(entries_table.c.seq))]
        prev = _GENESIS
        for i, row in enumerate(rows, start=1):
            where = f"ledger {self.path}, entry {row['seq']}"
            if row["seq"] != i:
                raise LedgerError(f"{where}: sequence broken (expected entry {i}); entries were removed")
            if row["prev_hash"] != prev or _hash_row(row) != row["entry_hash"]:
                raise LedgerError(f"{where}: hash chain broken; the entry was edited outside Veil")
            prev = row["entry_hash"]
        head_seq, head_hash = int(meta.get("head_seq", "-1")), meta.get("head_hash")
        if head_seq != len(rows) or head_hash != prev:
            raise LedgerError(
                f"ledger {self.path}: head says {head_seq} entries but {len(rows)} are present; "
                "entries were removed or added outside Veil"
            )
        return rows

    # -- reading -----------------------------------------------------------------------------
    def entries(self, fingerprint: str | None = None) -> list[Entry]:
        with self._tx() as conn:
            rows = self._verify(conn)
        return [_entry(r) for r in rows if fingerprint is None or r["fingerprint"] == fingerprint]

    def fingerprints(self) -> list[str]:
        seen: dict[str, None] = {}
        for e in self.entries():
            seen.setdefault(e.fingerprint, None)
        return list(seen)

    def spent(self, fingerprint: str, *, delta: float, accountant: AccountantName = "pld",
              scope: str = "dataset") -> Spend:
        """Lifetime ε of ``fingerprint`` (or of the whole ledger, ``scope="ledger"``) at δ."""
        events = [e.event for e in self.entries() if scope == "ledger" or e.fingerprint == fingerprint]
        return Spend(history_epsilon(group_events(events), delta, accountant), delta, accountant,
                     len(events), sum(e.steps for e in events))

    def project(self, fingerprint: str, planned: Sequence[DpSgdEvent], *, delta: float,
                accountant: AccountantName = "pld", scope: str = "dataset") -> float:
        """Lifetime ε if ``planned`` were charged after everything already in the ledger."""
        events = [e.event for e in self.entries() if scope == "ledger" or e.fingerprint == fingerprint]
        return history_epsilon(group_events([*events, *planned]), delta, accountant)

    def affordable_rounds(self, fingerprint: str, per_round: DpSgdEvent, max_rounds: int, *,
                          cap: float | None, delta: float, accountant: AccountantName = "pld",
                          scope: str = "dataset") -> int:
        """The most rounds of ``per_round`` (≤ ``max_rounds``) that keep lifetime ε ≤ cap."""
        if cap is None:
            return max_rounds
        events = [e.event for e in self.entries() if scope == "ledger" or e.fingerprint == fingerprint]

        def fits(k: int) -> bool:
            return history_epsilon(group_events([*events, *[per_round] * k]), delta, accountant) <= cap

        lo, hi = 0, max_rounds  # ε is non-decreasing in k: binary search for the last k that fits
        if not fits(0):
            return 0
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(mid):
                lo = mid
            else:
                hi = mid - 1
        return lo

    # -- writing -----------------------------------------------------------------------------
    def charge(self, fingerprint: str, ev: DpSgdEvent, *, delta: float, cap: float | None,
               accountant: AccountantName = "pld", scope: str = "dataset", run_ref: str = "",
               round_number: int = 0) -> Charge | BudgetExceeded:
        """Commit ``ev`` durably, or refuse it (writing nothing) if it would pass ``cap``."""
        if len(fingerprint) != 64:
            raise ValueError(f"fingerprint must be a sha256 hex digest, got {fingerprint!r}")
        if not 0.0 < delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        with self._tx() as conn:
            rows = self._verify(conn)
            events = [_entry(r).event for r in rows if scope == "ledger" or r["fingerprint"] == fingerprint]
            before = history_epsilon(group_events(events), delta, accountant)
            after = history_epsilon(group_events([*events, ev]), delta, accountant)
            if cap is not None and not after <= cap:  # NaN/inf never pass
                return BudgetExceeded(before, after, cap, delta, accountant)
            if not math.isfinite(after):
                raise ValueError(f"refusing to charge an event with unbounded ε ({ev})")
            seq = len(rows) + 1
            row: dict[str, Any] = {
                "seq": seq, "entry_id": uuid.uuid4().hex, "fingerprint": fingerprint,
                "run_ref": run_ref[:200], "round": int(round_number), "mechanism": "dp-sgd",
                "sampling": "poisson", "noise_multiplier": float(ev.noise_multiplier),
                "sample_rate": float(ev.sample_rate), "steps": int(ev.steps),
                "max_grad_norm": float(ev.max_grad_norm), "delta": float(delta),
                "accountant": accountant, "accountant_version": accountant_version(accountant),
                "epsilon_after": float(after), "epsilon_cap": None if cap is None else float(cap),
                "created_at": datetime.now(UTC).isoformat(),
                "prev_hash": rows[-1]["entry_hash"] if rows else _GENESIS,
            }
            row["entry_hash"] = _hash_row(row)
            conn.execute(entries_table.insert().values(**row))
            _set_meta(conn, head_seq=str(seq), head_hash=row["entry_hash"])
        return Charge(row["entry_id"], seq, before, after, delta, accountant,
                      row["accountant_version"], row["epsilon_cap"])


def _entry(r: dict[str, Any]) -> Entry:
    return Entry(
        seq=r["seq"], entry_id=r["entry_id"], fingerprint=r["fingerprint"], run_ref=r["run_ref"],
        round=r["round"],
        event=DpSgdEvent(r["noise_multiplier"], r["sample_rate"], r["steps"], r["max_grad_norm"]),
        delta=r["delta"], accountant=r["accountant"], accountant_version=r["accountant_version"],
        epsilon_after=r["epsilon_after"], epsilon_cap=r["epsilon_cap"], created_at=r["created_at"],
    )


def _set_meta(conn: Connection, **values: str) -> None:
    for key, value in values.items():
        conn.execute(meta_table.delete().where(meta_table.c.key == key))
        conn.execute(meta_table.insert().values(key=key, value=value))


def _create(path: Path) -> None:
    """Build the ledger under a temporary name, fsync it, then rename it into place.

    A crash while creating leaves at most a stray temporary file, never a half-made ledger
    that a later open would have to guess about.
    """
    from veil import __version__

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.creating")
    engine = create_engine(f"sqlite:///{tmp}")
    try:
        _meta.create_all(engine)
        with engine.begin() as conn:
            _set_meta(conn, schema_version=SCHEMA_VERSION, ledger_id=uuid.uuid4().hex,
                      created_at=datetime.now(UTC).isoformat(), created_by=f"veil {__version__}",
                      head_seq="0", head_hash=_GENESIS)
    finally:
        engine.dispose()
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.chmod(tmp, 0o600)
    tmp.replace(path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@dataclass(frozen=True)
class DatasetSpend:
    """One data set in a ledger: its lifetime spend at the latest entry's δ and accountant."""

    dataset_id: str
    entries: int
    runs: int
    steps: int
    epsilon: float
    delta: float
    accountant: str
    cap: float | None
    last_charge: str

    @property
    def remaining(self) -> float | None:
        return None if self.cap is None else max(0.0, self.cap - self.epsilon)


def ledger_report(path: Path | str) -> list[DatasetSpend]:
    """Every data set in a ledger file, recomputed from its entries (the file is verified)."""
    with SiteLedger(path, create=False) as ledger:
        entries = ledger.entries()
    out = []
    for fp in dict.fromkeys(e.fingerprint for e in entries):
        mine = [e for e in entries if e.fingerprint == fp]
        last = mine[-1]
        acc = last.accountant if last.accountant in ("pld", "rdp", "prv") else "pld"
        eps = history_epsilon(group_events(e.event for e in mine), last.delta, acc)  # type: ignore[arg-type]
        out.append(DatasetSpend(dataset_id(fp), len(mine), len({e.run_ref for e in mine}),
                                sum(e.event.steps for e in mine), eps, last.delta, acc,
                                last.epsilon_cap, last.created_at))
    return out
