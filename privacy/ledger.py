"""The site's privacy ledger: an append-only, hash-chained record of the spend it released.

One SQLite file per site, owned by the site, written through SQLAlchemy. Each entry is one
DP-SGD event the site ran, keyed by a fingerprint of the data set it ran on. The ledger
composes every entry (``cap_scope: ledger``, the default) or every entry for one data set
(``cap_scope: dataset``), across rounds *and* runs: the lifetime spend a data holder cares
about.

Rules it keeps:

* **Write-ahead, in the main file.** ``charge`` commits the event before the site trains,
  with a rollback journal (``journal_mode=DELETE``) and ``synchronous=FULL``: when the commit
  returns, the entry is fsynced into the ``.ledger`` file itself. There is no write-ahead-log
  file whose loss (or a backup that skips it) could drop a committed charge. A crash after
  the commit over-counts; a crash can never under-count.
* **Check and charge are one transaction** (``BEGIN IMMEDIATE``): two processes of the same
  site cannot both squeeze under the cap.
* **Created once, never replaced.** A new ledger is built under a temporary name and
  hard-linked into place, which fails if the path exists: two processes creating the same
  ledger at once end up sharing one file, and neither can overwrite a file already charged.
* **Refusal exactly at the cap.** A charge whose projected lifetime ε exceeds the cap is
  refused and writes nothing; one that lands exactly on it is accepted.
* **Tamper-evident.** Entries form a sha256 chain and the meta table holds the head; every
  open, every question and every charge re-verifies it (a question with several parts, such
  as a pre-flight's spend, projection, affordable rounds and head, reads one ``view``: one
  verification, not one per part). A damaged, truncated, edited or unknown-schema file
  raises ``LedgerError`` and is never reset or repaired automatically.
* **Bound to its site.** The meta table names the site the ledger belongs to and a random
  ledger id; a deployed site's ``site.yaml`` pins that id. A ledger copied from, or swapped
  with, another site's is refused, and so is a pinned ledger that has gone missing.
* **Cannot quietly go backwards.** After every charge the site writes the head (entry count
  and hash) to a *witness* file beside the ledger (``<ledger>.head``). An older copy of the
  ledger restored over a newer one no longer contains the witnessed head and is refused.
  The coordinator keeps the same kind of witness for every site it has heard from.

* **Rounds without DP are on it too.** A site whose policy has no cap may train the labelled
  non-private baseline (``privacy: none``): each such round is an entry with mechanism
  ``none`` (σ 0). It counts for replay and rounds checks like any other, the lifetime ε
  reported is the DP entries' composition *with* the count of rounds released without DP
  beside it (the data set's lifetime guarantee no longer holds), and a cap set later refuses
  every further charge in that scope: no finite ε can be promised after a non-private release.

The chain detects accidents, bugs and naive edits. It is not a defence against the site's
own administrator rewriting the whole chain and both witnesses: the ledger protects the data
from everyone *else*, and the site is the party enforcing it.
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
from sqlalchemy.pool import NullPool

from privacy.accounting import AccountantName, accountant_version, group_events, history_epsilon
from privacy.events import DpSgdEvent, remaining_budget
from privacy.randomness import RngMode
from veil import __version__
from veil.config import clean
from veil.errors import LedgerError
from veil.files import atomic_write, publish_new, regular_file_problem, resolved, temp_beside
from veil.logs import get_logger

log = get_logger("ledger")

SCHEMA_VERSION = "2"  # 2: site binding in the meta table, ``rng`` on entries
_GENESIS = "0" * 64
_JOURNALS = ("-journal", "-wal", "-shm")

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
    Column("rng", String(16), nullable=True),  # schema 2: where the noise came from (NULL in schema 1)
)
_HASHED = [c.name for c in entries_table.columns if c.name != "entry_hash"]
_V1_COLUMNS = {c.name for c in entries_table.columns} - {"rng"}
_LATER = {"rng"}  # columns added after schema 1: hashed only when set, so schema-1 entries still verify


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
    """One verified ledger entry: a DP-SGD event charged to one data set, and the lifetime ε recorded
    after it; or (``event`` None, mechanism ``none``) a round released without DP."""

    seq: int
    entry_id: str
    fingerprint: str
    run_ref: str
    round: int
    event: DpSgdEvent | None
    delta: float
    accountant: str
    accountant_version: str
    epsilon_after: float
    epsilon_cap: float | None
    created_at: str
    rng: str | None = None  # None: written by schema 1, before the mode was recorded

    @property
    def private(self) -> bool:
        """Whether the round ran DP-SGD (False: the labelled non-private baseline)."""
        return self.event is not None


@dataclass(frozen=True)
class Spend:
    """A data set's lifetime spend as the ledger measures it: ε of its DP entries, and how many
    rounds were released without DP (any: the lifetime guarantee no longer holds)."""

    epsilon: float
    delta: float
    accountant: str
    entries: int
    steps: int
    without_dp: int = 0


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
    entry_hash: str = _GENESIS
    ledger_id: str = ""
    without_dp: int = 0  # rounds the scope released without DP, this one included


@dataclass(frozen=True)
class Spent:
    """A refused charge: the claim it carried (a signed request's nonce) is already used up here."""

    detail: str


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
        """The refusal in words: projected lifetime ε against the cap at δ, and what was already spent."""
        return (f"lifetime ε would reach {self.projected:.4f} > cap {self.cap:g} at δ={self.delta:g} "
                f"({self.accountant}); already spent {self.spent:.4f}")


@dataclass(frozen=True)
class Head:
    """Which ledger this is and how far it has got (what a witness remembers)."""

    ledger_id: str
    seq: int
    entry_hash: str
    predecessor: str | None = None  # the ledger this one explicitly replaced, if any
    replaced_reason: str | None = None


class LedgerView:
    """A ledger as one verification found it: answers several questions from one read.

    A snapshot: a charge made after it was taken is not in it, so take a new view (``SiteLedger.
    view()``) for each new question. Charging never uses a view: it re-verifies in its own
    transaction."""

    __slots__ = ("_entries", "_head")

    def __init__(self, head: Head, entries: Sequence[Entry]) -> None:
        self._head = head
        self._entries = tuple(entries)

    def head(self) -> Head:
        """The ledger's id, entry count and chain head when the view was taken."""
        return self._head

    def entries(self, fingerprint: str | None = None) -> list[Entry]:
        """Every entry in sequence order (or only those of ``fingerprint``)."""
        return [e for e in self._entries if fingerprint is None or e.fingerprint == fingerprint]

    def fingerprints(self) -> list[str]:
        """Fingerprints of the data sets charged here, each once, in order of first charge."""
        return list(dict.fromkeys(e.fingerprint for e in self._entries))

    def _scope(self, fingerprint: str, scope: str) -> list[Entry]:
        return [e for e in self._entries if scope == "ledger" or e.fingerprint == fingerprint]

    def _events(self, fingerprint: str, scope: str) -> list[DpSgdEvent]:
        return [e.event for e in self._scope(fingerprint, scope) if e.event is not None]

    def without_dp(self, fingerprint: str, scope: str = "ledger") -> int:
        """Rounds released without DP in the scope (the labelled non-private baseline)."""
        return sum(1 for e in self._scope(fingerprint, scope) if e.event is None)

    def spent(self, fingerprint: str, *, delta: float, accountant: AccountantName = "pld",
              scope: str = "ledger") -> Spend:
        """Lifetime ε of the whole ledger (``scope="ledger"``) or of ``fingerprint`` only, at δ:
        the DP entries composed, with the count of rounds released without DP beside it."""
        events = self._events(fingerprint, scope)
        return Spend(history_epsilon(group_events(events), delta, accountant), delta, accountant,
                     len(events), sum(e.steps for e in events), self.without_dp(fingerprint, scope))

    def project(self, fingerprint: str, planned: Sequence[DpSgdEvent], *, delta: float,
                accountant: AccountantName = "pld", scope: str = "ledger") -> float:
        """Lifetime ε if ``planned`` were charged after everything already in the ledger."""
        return history_epsilon(group_events([*self._events(fingerprint, scope), *planned]), delta, accountant)

    def affordable_rounds(self, fingerprint: str, per_round: DpSgdEvent, max_rounds: int, *,
                          cap: float | None, delta: float, accountant: AccountantName = "pld",
                          scope: str = "ledger") -> int:
        """The most rounds of ``per_round`` (≤ ``max_rounds``) that keep lifetime ε ≤ cap."""
        if cap is None:
            return max_rounds
        if self.without_dp(fingerprint, scope):  # no finite ε holds after a release without DP
            return 0
        events = self._events(fingerprint, scope)

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


def _hash_row(row: dict[str, Any]) -> str:
    payload = json.dumps({k: row[k] for k in _HASHED if not (k in _LATER and row.get(k) is None)},
                         sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def _engine(path: Path) -> Engine:
    # a fresh connection per transaction (NullPool): a pooled connection would keep the old file
    # open after the path is replaced, and charge a file nobody will ever read again
    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": 60}, poolclass=NullPool)

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (below)
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA busy_timeout=60000")
        # committed entries live in the main file: a ledger written by an older Veil in WAL mode
        # is checkpointed and switched back to a rollback journal the first time it is opened
        if str(cur.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "delete":
            cur.execute("PRAGMA journal_mode=DELETE")
        cur.execute("PRAGMA synchronous=FULL")  # a commit is fsynced before it returns
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")  # check-and-charge is atomic across processes

    return engine


def witness_path(path: Path | str) -> Path:
    """Where the site keeps the last head it wrote (``<ledger>.head``)."""
    p = Path(path)
    return p.with_name(p.name + ".head")


def read_witness(path: Path | str) -> Head | None:
    """The witnessed head of the ledger at ``path``; None if there is no witness file."""
    file = witness_path(path)
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
        head = Head(str(raw["ledger_id"]), int(raw["seq"]), str(raw["hash"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise LedgerError(
            f"the ledger's head witness {file} is unreadable ({err}); it is never rewritten "
            "automatically: restore it, or delete it only if the ledger file is certainly the newest copy"
        ) from None
    if head.seq < 0 or len(head.entry_hash) != 64:
        raise LedgerError(f"the ledger's head witness {file} holds an impossible head; restore it")
    return head


def _write_witness(path: Path, head: Head, site_id: str | None) -> None:
    body = {"ledger_id": head.ledger_id, "site_id": site_id, "seq": head.seq, "hash": head.entry_hash,
            "written_at": datetime.now(UTC).isoformat(timespec="seconds")}
    atomic_write(witness_path(path), (json.dumps(body, indent=1) + "\n").encode(), mode=0o600)


class SiteLedger:
    """Open (or, when ``create`` and nothing says a ledger existed, create) a site ledger.

    ``site_id`` binds the ledger to its site: a ledger that names another site is refused (a
    schema-1 ledger without a name is bound on first open). ``ledger_id`` is the id the site's
    configuration pins: then the file must exist and carry exactly that id. ``readonly``
    opens without migrating, binding or writing the witness (for reports).
    """

    def __init__(self, path: Path | str, *, site_id: str | None = None, ledger_id: str | None = None,
                 create: bool = True, readonly: bool = False) -> None:
        try:
            self.path = resolved(path)
        except OSError as err:
            raise LedgerError(f"ledger {clean(str(path))}: {err.strerror}; point the ledger at its file") from None
        problem = regular_file_problem(self.path)
        if problem:
            raise LedgerError(f"ledger {clean(str(self.path))} {problem}; point the ledger at its file")
        self.site_id = site_id
        witness = read_witness(self.path)
        if not self.path.exists():
            self._missing(witness, ledger_id, create and not readonly, site_id)
        elif self.path.stat().st_size == 0:
            raise LedgerError(
                f"ledger {self.path} is empty (truncated?); it is never reset automatically: "
                "restore it from a backup, or move it aside if this data has never been used"
            )
        self.engine = _engine(self.path)
        try:
            with self._tx() as conn:
                meta, rows = self._verify(conn)
                if not readonly:
                    meta = self._upgrade_and_bind(conn, meta)
            self.ledger_id = str(meta["ledger_id"])
            self.meta = meta
            self._check_identity(meta, ledger_id)
            head = _head_of(self.ledger_id, rows, meta)
            self._check_witness(witness, head)
        except LedgerError:
            self.engine.dispose()
            raise
        if not readonly and (witness is None or witness.seq < head.seq):
            _write_witness(self.path, head, self.site_id or meta.get("site_id"))

    def _missing(self, witness: Head | None, ledger_id: str | None, create: bool, site_id: str | None) -> None:
        """The file is not there: create it only when nothing says a ledger existed before."""
        if ledger_id is not None:
            raise LedgerError(
                f"ledger {self.path} is missing, but this site's configuration pins ledger {ledger_id}: "
                "restore it from a backup (a new ledger would forget every ε this site has spent); only if "
                "it is truly lost, start a new one with `veil site init --config SITE.yaml --new-ledger "
                "--reason '...'`, which the coordinator will see"
            )
        if witness is not None:
            raise LedgerError(
                f"ledger {self.path} is missing, but its head witness {witness_path(self.path)} says it "
                f"held {witness.seq} entries (ledger {witness.ledger_id}): restore the ledger from a "
                "backup; a new one would forget that spend"
            )
        left = [self.path.with_name(self.path.name + j) for j in _JOURNALS]
        if any(p.exists() for p in left):
            raise LedgerError(
                f"ledger {self.path} is missing but its journal files are present: the ledger file was "
                "deleted or moved; restore it before training"
            )
        if not create:
            raise LedgerError(f"ledger {self.path} does not exist")
        _create(self.path, site_id)  # if another process got there first, its ledger is used

    def close(self) -> None:
        """Dispose of the database engine; the ledger file is left as it is."""
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

    def _verify(self, conn: Connection) -> tuple[dict[str, str], list[dict[str, Any]]]:
        """Check schema, version and the whole hash chain; return the meta and the rows in order."""
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
        if version not in ("1", SCHEMA_VERSION):
            raise LedgerError(
                f"ledger {self.path} has schema version {version!r}; this Veil reads versions 1 and "
                f"{SCHEMA_VERSION}. Use the Veil release that wrote it (or a newer one)"
            )
        cols = {c["name"] for c in insp.get_columns("ledger_entries")}
        expected = _V1_COLUMNS if version == "1" else {c.name for c in entries_table.columns}
        if cols != expected:
            raise LedgerError(
                f"ledger {self.path} has unexpected columns (missing {sorted(expected - cols)}, "
                f"extra {sorted(cols - expected)}): edited outside Veil"
            )
        table = entries_table if version != "1" else Table(
            "ledger_entries", MetaData(), *(c.copy() for c in entries_table.columns if c.name in _V1_COLUMNS))
        rows = [dict(r._mapping) for r in conn.execute(select(table).order_by(table.c.seq))]
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
        if not meta.get("ledger_id"):
            raise LedgerError(f"ledger {self.path} has no ledger id: edited outside Veil")
        opened = getattr(self, "ledger_id", None)
        if opened is not None and meta["ledger_id"] != opened:
            raise LedgerError(
                f"ledger {self.path} was replaced while in use (it was ledger {opened}, it is now "
                f"{meta['ledger_id']}); nothing was charged: put ledger {opened} back"
            )
        return meta, rows

    def _upgrade_and_bind(self, conn: Connection, meta: dict[str, str]) -> dict[str, str]:
        """Schema 1 → 2 in place (one transaction), and bind an unbound ledger to this site."""
        changes: dict[str, str] = {}
        if meta.get("schema_version") == "1":
            conn.exec_driver_sql("ALTER TABLE ledger_entries ADD COLUMN rng VARCHAR(16)")
            changes["schema_version"] = SCHEMA_VERSION
        if self.site_id is not None and not meta.get("site_id"):
            changes["site_id"] = self.site_id
            log.info("ledger %s is now bound to site %s", self.path, self.site_id)
        if changes:
            _set_meta(conn, **changes)
        return {**meta, **changes}

    def _check_identity(self, meta: dict[str, str], pinned: str | None) -> None:
        owner = meta.get("site_id")
        if self.site_id is not None and owner and owner != self.site_id:
            raise LedgerError(
                f"ledger {self.path} belongs to site {owner!r}, not {self.site_id!r}: it was copied or "
                f"swapped from another site's ledger. Put {self.site_id!r}'s own ledger back; ledgers of "
                "different sites are not interchangeable (nothing was charged)"
            )
        if pinned is not None and meta["ledger_id"] != pinned:
            raise LedgerError(
                f"ledger {self.path} is ledger {meta['ledger_id']}, but this site's configuration pins "
                f"ledger {pinned}: the file was replaced or copied from elsewhere. Restore ledger "
                f"{pinned} from a backup (nothing was charged)"
            )

    def _check_witness(self, witness: Head | None, head: Head, conn: Connection | None = None) -> None:
        if witness is None:
            return
        file = witness_path(self.path)
        if witness.ledger_id != head.ledger_id:
            raise LedgerError(
                f"ledger {self.path} is ledger {head.ledger_id}, but its head witness {file} was written "
                f"by ledger {witness.ledger_id}: the ledger file was replaced. Restore the right ledger"
            )
        if witness.seq > head.seq:
            raise LedgerError(
                f"ledger {self.path} has gone backwards: it holds {head.seq} entries, but this site "
                f"already wrote entry {witness.seq} (witness {file}). An older copy was restored over "
                "the newest one; restore the newest copy (the spend since then would be forgotten)"
            )
        if witness.seq and self._hash_at(witness.seq, conn) != witness.entry_hash:
            raise LedgerError(
                f"ledger {self.path}: entry {witness.seq} is not the one this site wrote (witness "
                f"{file}): the file was replaced by another history. Restore the newest copy"
            )

    def _hash_at(self, seq: int, conn: Connection | None = None) -> str | None:
        query = select(entries_table.c.entry_hash).where(entries_table.c.seq == seq)
        if conn is not None:
            return conn.execute(query).scalar()
        with self._tx() as own:
            return own.execute(query).scalar()

    # -- reading -----------------------------------------------------------------------------
    def view(self) -> LedgerView:
        """The ledger read and its whole chain verified once, to answer several questions from.

        Each method below verifies the chain afresh; a caller with several questions (a
        pre-flight asks for the spend, a projection, the affordable rounds and the head) takes
        one view instead, so the file is read and verified once per question, not once each."""
        with self._tx() as conn:
            meta, rows = self._verify(conn)
        return LedgerView(_head_of(str(meta["ledger_id"]), rows, meta), [_entry(r) for r in rows])

    def head(self) -> Head:
        """This ledger's id, entry count and chain head (verified)."""
        return self.view().head()

    def entries(self, fingerprint: str | None = None) -> list[Entry]:
        """Every entry in sequence order (or only those of ``fingerprint``), after verifying the whole chain."""
        return self.view().entries(fingerprint)

    def fingerprints(self) -> list[str]:
        """Fingerprints of the data sets charged here, each once, in order of first charge."""
        return self.view().fingerprints()

    def spent(self, fingerprint: str, *, delta: float, accountant: AccountantName = "pld",
              scope: str = "ledger") -> Spend:
        """Lifetime ε of the whole ledger (``scope="ledger"``) or of ``fingerprint`` only, at δ."""
        return self.view().spent(fingerprint, delta=delta, accountant=accountant, scope=scope)

    def project(self, fingerprint: str, planned: Sequence[DpSgdEvent], *, delta: float,
                accountant: AccountantName = "pld", scope: str = "ledger") -> float:
        """Lifetime ε if ``planned`` were charged after everything already in the ledger."""
        return self.view().project(fingerprint, planned, delta=delta, accountant=accountant, scope=scope)

    def affordable_rounds(self, fingerprint: str, per_round: DpSgdEvent, max_rounds: int, *,
                          cap: float | None, delta: float, accountant: AccountantName = "pld",
                          scope: str = "ledger") -> int:
        """The most rounds of ``per_round`` (≤ ``max_rounds``) that keep lifetime ε ≤ cap."""
        return self.view().affordable_rounds(fingerprint, per_round, max_rounds, cap=cap, delta=delta,
                                             accountant=accountant, scope=scope)

    # -- writing -----------------------------------------------------------------------------
    def charge(self, fingerprint: str, ev: DpSgdEvent | None, *, delta: float, cap: float | None,
               accountant: AccountantName = "pld", scope: str = "ledger", run_ref: str = "",
               round_number: int = 0, rng: RngMode = "os-entropy", claim: tuple[str, int] | None = None,
               without_dp: tuple[float, int] = (1.0, 0)) -> Charge | BudgetExceeded | Spent:
        """Commit ``ev`` durably, or refuse it (writing nothing) if it would pass ``cap``.

        ``ev=None`` records a round released *without* DP (the labelled baseline; ``without_dp``
        is its batch fraction and step count, for audit): refused under any cap, and once on the
        ledger it refuses every later capped charge in its scope. Its ε does not change.

        ``claim = (mark, limit)``: the charge spends a signed request whose entries' ``run_ref``
        end with ``mark``; it is refused if that request was charged under another ``run_ref`` or
        already ``limit`` times. Checked in the same transaction as the charge, so two processes
        cannot both spend the last round of one signature."""
        if len(fingerprint) != 64:
            raise ValueError(f"fingerprint must be a sha256 hex digest, got {fingerprint!r}")
        if not 0.0 < delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        with self._tx() as conn:
            meta, rows = self._verify(conn)
            if meta.get("schema_version") != SCHEMA_VERSION:
                raise LedgerError(f"ledger {self.path} was opened read-only; it cannot be charged")
            # restored from an older copy since it was opened? the witness says how far it got
            self._check_witness(read_witness(self.path), _head_of(self.ledger_id, rows, meta), conn)
            if claim is not None:
                mark, limit = claim
                spent = [r["run_ref"] for r in rows if r["run_ref"].endswith(mark)]
                if any(ref != run_ref[:200] for ref in spent):
                    return Spent("this signed request was already charged here under another run")
                if len(spent) >= limit:
                    return Spent(f"this signed request has paid for all {limit} of its rounds here")
            scoped = [_entry(r) for r in rows if scope == "ledger" or r["fingerprint"] == fingerprint]
            events = [e.event for e in scoped if e.event is not None]
            before = history_epsilon(group_events(events), delta, accountant)
            after = before if ev is None else history_epsilon(group_events([*events, ev]), delta, accountant)
            if cap is not None and (ev is None or len(events) < len(scoped)):
                # a release without DP voids every finite promise: a capped scope takes neither it
                # nor, after one, anything else
                return BudgetExceeded(before, math.inf, cap, delta, accountant)
            if cap is not None and not after <= cap:  # NaN/inf never pass
                return BudgetExceeded(before, after, cap, delta, accountant)
            if not math.isfinite(after):
                raise ValueError(f"refusing to charge an event with unbounded ε ({ev})")
            seq = len(rows) + 1
            # σ, q, steps, C (a round without DP: σ 0 and C 0, its batch fraction and steps for audit)
            mech = (0.0, *without_dp, 0.0) if ev is None else (
                ev.noise_multiplier, ev.sample_rate, ev.steps, ev.max_grad_norm)
            row: dict[str, Any] = {
                "seq": seq, "entry_id": uuid.uuid4().hex, "fingerprint": fingerprint,
                "run_ref": run_ref[:200], "round": int(round_number),
                "mechanism": "none" if ev is None else "dp-sgd",
                "sampling": "shuffled" if ev is None else "poisson",
                "noise_multiplier": float(mech[0]), "sample_rate": float(mech[1]), "steps": int(mech[2]),
                "max_grad_norm": float(mech[3]), "delta": float(delta),
                "accountant": accountant, "accountant_version": accountant_version(accountant),
                "epsilon_after": float(after), "epsilon_cap": None if cap is None else float(cap),
                "created_at": datetime.now(UTC).isoformat(),
                "prev_hash": rows[-1]["entry_hash"] if rows else _GENESIS, "rng": str(rng),
            }
            row["entry_hash"] = _hash_row(row)
            conn.execute(entries_table.insert().values(**row))
            _set_meta(conn, head_seq=str(seq), head_hash=row["entry_hash"])
        # committed (fsynced into the main file); the witness follows, so it can lag, never lead
        _write_witness(self.path, Head(self.ledger_id, seq, row["entry_hash"]), self.site_id)
        return Charge(row["entry_id"], seq, before, after, delta, accountant, row["accountant_version"],
                      row["epsilon_cap"], row["entry_hash"], self.ledger_id,
                      len(scoped) - len(events) + int(ev is None))


def _head_of(ledger_id: str, rows: list[dict[str, Any]], meta: dict[str, str]) -> Head:
    return Head(ledger_id, len(rows), rows[-1]["entry_hash"] if rows else _GENESIS,
                meta.get("predecessor") or None, meta.get("replaced_reason") or None)


def _entry(r: dict[str, Any]) -> Entry:
    if r["mechanism"] not in ("dp-sgd", "none"):
        raise LedgerError(f"ledger entry {r['seq']} records mechanism {str(r['mechanism'])[:32]!r}, which this "
                          "Veil does not know: it was written by a newer Veil; use that one")
    return Entry(
        seq=r["seq"], entry_id=r["entry_id"], fingerprint=r["fingerprint"], run_ref=r["run_ref"],
        round=r["round"],
        event=None if r["mechanism"] == "none"
        else DpSgdEvent(r["noise_multiplier"], r["sample_rate"], r["steps"], r["max_grad_norm"]),
        delta=r["delta"], accountant=r["accountant"], accountant_version=r["accountant_version"],
        epsilon_after=r["epsilon_after"], epsilon_cap=r["epsilon_cap"], created_at=r["created_at"],
        rng=r.get("rng"),
    )


def _set_meta(conn: Connection, **values: str) -> None:
    for key, value in values.items():
        conn.execute(meta_table.delete().where(meta_table.c.key == key))
        conn.execute(meta_table.insert().values(key=key, value=value))


def create_ledger(path: Path | str, site_id: str, *, predecessor: str | None = None,
                  reason: str | None = None) -> str:
    """Create a new, empty ledger for ``site_id`` at ``path`` and return its id.

    Refuses if anything is at ``path``. ``predecessor``/``reason`` record that the site's
    administrator explicitly replaced a lost ledger: the coordinator accepts the new ledger
    from that site only because it names the ledger it replaces.
    """
    try:
        target = resolved(path)
    except OSError as err:
        raise LedgerError(f"ledger {clean(str(path))}: {err.strerror}; point the ledger at its file") from None
    if target.exists():
        raise LedgerError(f"{target} already exists; a ledger is never overwritten")
    ledger_id = _create(target, site_id, predecessor=predecessor, reason=reason)
    if ledger_id is None:
        raise LedgerError(f"{target} was created by another process at the same moment; use that one")
    if witness_path(target).exists():  # the lost ledger's witness: the new ledger starts its own
        witness_path(target).unlink()
    _write_witness(target, Head(ledger_id, 0, _GENESIS), site_id)
    return ledger_id


def _create(path: Path, site_id: str | None, *, predecessor: str | None = None,
            reason: str | None = None) -> str | None:
    """Build the ledger under a temporary name, fsync it, then hard-link it into place.

    ``os.link`` fails if the path exists, so a ledger is created at most once and never
    replaced: a process that loses the race returns None and opens the winner's file. A crash
    while creating leaves at most a stray temporary file, never a half-made ledger.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(path, "creating")
    ledger_id = uuid.uuid4().hex
    meta = {"schema_version": SCHEMA_VERSION, "ledger_id": ledger_id,
            "created_at": datetime.now(UTC).isoformat(), "created_by": f"veil {__version__}",
            "head_seq": "0", "head_hash": _GENESIS}
    if site_id:
        meta["site_id"] = site_id
    if predecessor:
        meta |= {"predecessor": predecessor, "replaced_reason": (reason or "")[:190],
                 "replaced_at": datetime.now(UTC).isoformat(timespec="seconds")}
    engine = create_engine(f"sqlite:///{tmp}")
    try:
        _meta.create_all(engine)
        with engine.begin() as conn:
            _set_meta(conn, **meta)
    finally:
        engine.dispose()
    os.chmod(tmp, 0o600)
    try:
        if not publish_new(tmp, path):
            return None
    except OSError as err:
        raise LedgerError(
            f"cannot create ledger {path}: this filesystem does not support hard links ({err}); keep "
            "ledgers on a local filesystem"
        ) from None
    return ledger_id


@dataclass(frozen=True)
class DatasetSpend:
    """One data set in a ledger (or, ``dataset_id="all"``, the whole ledger composed)."""

    dataset_id: str
    entries: int
    runs: int
    steps: int
    epsilon: float
    delta: float
    accountant: str
    cap: float | None
    last_charge: str
    seeded_entries: int = 0  # charges made with reproducible (seeded, not private) noise
    without_dp: int = 0  # rounds released without DP: the lifetime guarantee no longer holds

    @property
    def remaining(self) -> float | None:
        """Lifetime ε left under the cap (None without a cap; 0 once a round went out without DP)."""
        return remaining_budget(self.cap, math.inf if self.without_dp else self.epsilon)


@dataclass(frozen=True)
class LedgerReport:
    """A ledger file, verified: whose it is, where it came from, and its spend."""

    ledger_id: str
    site_id: str | None
    created_at: str | None
    head: Head
    replaced_at: str | None
    datasets: list[DatasetSpend]
    whole: DatasetSpend | None  # every entry composed: what ``cap_scope: ledger`` enforces

    @property
    def predecessor(self) -> str | None:
        """The id of the lost ledger this one replaced (None if it replaced none)."""
        return self.head.predecessor


def _spend(label: str, entries: list[Entry]) -> DatasetSpend:
    last = entries[-1]
    acc = last.accountant if last.accountant in ("pld", "rdp", "prv") else "pld"
    events = [e.event for e in entries if e.event is not None]
    eps = history_epsilon(group_events(events), last.delta, acc)  # type: ignore[arg-type]
    return DatasetSpend(label, len(entries), len({e.run_ref for e in entries}),
                        sum(e.steps for e in events), eps, last.delta, acc, last.epsilon_cap,
                        last.created_at, sum(1 for e in entries if e.rng == "seeded"),
                        sum(1 for e in entries if e.event is None))


def ledger_report(path: Path | str) -> LedgerReport:
    """A ledger file read and verified without changing it, its spend recomputed from its entries."""
    with SiteLedger(path, create=False, readonly=True) as ledger:
        view, meta = ledger.view(), ledger.meta
    entries, head = view.entries(), view.head()
    datasets = [_spend(dataset_id(fp), [e for e in entries if e.fingerprint == fp])
                for fp in dict.fromkeys(e.fingerprint for e in entries)]
    return LedgerReport(head.ledger_id, meta.get("site_id"), meta.get("created_at"), head,
                        meta.get("replaced_at"), datasets, _spend("all", entries) if entries else None)
