"""The coordinator's register of sites: which public node key it registered under which name.

Flower's SuperLink keeps the keys it admits but not a name anyone can read back (Flower 1.41's and
1.42's ``flwr supernode list`` show no name), so ``veil coordinator register`` records each site in the
run store (``registered_sites``): its name (the site id its replies report), the node id Flower
assigned and the SHA-256 fingerprint of its public key. A key is registered once, and a name
belongs to one key: ``refusal`` says why a registration may not go ahead, checked before the
SuperLink is asked and again, atomically with the unique columns, when ``record`` writes it.
Refused registrations leave the store as it was.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from server.store import RunStore
from server.store import schema as S
from veil.errors import StoreError, VeilError
from veil.names import site_id_problem


class RegistrationError(VeilError):
    """A site registration the register refuses: its key is registered already, or its name is taken."""


def _when(row: S.RegisteredSite) -> str:
    at = row.registered_at
    if not isinstance(at, datetime):
        return "at an unreadable time"
    return "on " + (at if at.tzinfo else at.replace(tzinfo=UTC)).strftime("%Y-%m-%d %H:%M UTC")


def refusal(s: Session, name: str, fingerprint: str) -> str | None:
    """Why site ``name`` with key ``fingerprint`` cannot be registered (one line that says what to do),
    or None when neither the key nor the name is registered yet."""
    rows = s.scalars(select(S.RegisteredSite).where(
        or_(S.RegisteredSite.key_fingerprint == fingerprint, S.RegisteredSite.name == name))).all()
    for row in rows:
        if row.key_fingerprint == fingerprint:
            return (f"key {fingerprint} is already registered as site {row.name!r} (node {row.node_id}, "
                    f"{_when(row)}); nothing to do: `veil coordinator sites` lists the registered sites")
    for row in rows:
        return (f"site name {name!r} is taken by another key ({row.key_fingerprint}, node {row.node_id}, "
                f"registered {_when(row)}); if this is another site, register it under its own site_id "
                "with --name NAME; if the site made a new key, ask for the one registered before")
    return None


def check_new(store: RunStore, name: str, fingerprint: str) -> None:
    """Raise ``RegistrationError`` unless site ``name`` with key ``fingerprint`` may be registered."""
    problem = site_id_problem(name)
    if problem is not None:
        raise RegistrationError(f"site name {name!r} {problem}; give the site's site_id with --name NAME")
    with store.session() as s:
        why = refusal(s, name, fingerprint)
    if why is not None:
        raise RegistrationError(why)


def record(store: RunStore, name: str, node_id: int, fingerprint: str, now: datetime | None = None) -> None:
    """Record site ``name``: the node id its key was registered as and the key's fingerprint.

    Checked again inside the write, and the unique columns catch a registration that raced this one;
    either way a ``RegistrationError`` and nothing written."""
    check_new(store, name, fingerprint)
    try:
        with store.session() as s:
            why = refusal(s, name, fingerprint)
            if why is not None:
                raise RegistrationError(why)
            s.add(S.RegisteredSite(name=name, node_id=str(node_id), key_fingerprint=fingerprint,
                                   registered_at=now or datetime.now(UTC)))
    except StoreError as err:
        if not isinstance(err.__cause__, IntegrityError):
            raise
        raise RegistrationError(f"site {name!r}, key {fingerprint} or node {node_id} was registered by "
                                "another command at the same moment; see `veil coordinator sites`") from None
