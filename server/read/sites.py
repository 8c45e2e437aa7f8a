"""The registered sites as the store knows them (``veil coordinator sites``).

One row per site in ``registered_sites`` (``server.site_registry``), with the last round it
answered in any run: the newest run, then the highest round, among its participation rows whose
status says it replied (``ok``, ``refused``, ``rejected``; round 0 is the pre-flight). The
join is on the registered name = ``sites.site_key``, the id the site reports. Two queries,
whatever the number of runs. Every stored value is checked (``server.read.stored``): a bad one
is ``None`` (or shown as stored) with its reason in ``problems``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import String, func, select, type_coerce

from server.read.stored import Checker, quoted, text
from server.read.summary import natural_key
from server.store import RunStore
from server.store import schema as S
from veil.names import site_id_problem

ANSWERED = ("ok", "refused", "rejected")  # a reply with content; "failed" and "no-reply" are not
_FINGERPRINT = re.compile(r"SHA256:[A-Za-z0-9+/]{43}")
_NODE_ID = re.compile(r"[0-9]{1,20}")


@dataclass(frozen=True)
class RegisteredSiteRow:
    """One registered site: its name, Flower node id, key fingerprint, when, and its last answered round."""

    name: str
    node_id: str | None
    key_fingerprint: str | None
    registered_at: str | None  # ISO 8601, UTC
    last_run: int | None = None  # the newest run it answered in
    last_round: int | None = None  # the highest round of that run it answered (0: the pre-flight)
    problems: dict[str, str] = field(default_factory=dict)


def _stored_time(check: Checker, name: str, value: object) -> str | None:
    """A stored timestamp as ISO 8601 UTC (SQLite hands back text, PostgreSQL a datetime)."""
    if value is None:
        return None
    when = value
    if not isinstance(when, datetime):
        try:
            when = datetime.fromisoformat(text(value))
        except ValueError:
            check.problems[name] = f"not a time ({quoted(value)})"
            return None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).isoformat(timespec="seconds")


def _pattern(check: Checker, name: str, value: object, pattern: re.Pattern[str], what: str) -> str | None:
    shown = text(value)
    if pattern.fullmatch(shown) is None:
        check.problems[name] = f"{quoted(value)} is not {what}"
        return None
    return shown


def registered_sites(store: RunStore) -> list[RegisteredSiteRow]:
    """Every registered site, by name (``site-2`` before ``site-10``), each checked."""
    R, P = S.RegisteredSite, S.Participation
    with store.session() as s:
        stored = s.execute(select(R.name, R.node_id, R.key_fingerprint,
                                  type_coerce(R.registered_at, String)).order_by(R.id)).all()
        answered: dict[str, tuple[int, int]] = {}
        for key, run_id, last_round in s.execute(
                select(S.Site.site_key, P.run_id, func.max(P.round_number))
                .join(S.Site, S.Site.id == P.site_id)
                .where(S.Site.site_key.in_(select(R.name)), P.status.in_(ANSWERED))
                .group_by(S.Site.site_key, P.run_id)):
            check = Checker()
            run, rnd = check.opt_count("run", run_id), check.opt_count("round", last_round)
            if run is None or rnd is None:
                continue
            answered[text(key)] = max(answered.get(text(key), (run, rnd)), (run, rnd))
    rows = []
    for name, node_id, fingerprint, registered_at in stored:
        check = Checker()
        shown = text(name)
        problem = site_id_problem(shown)
        if problem is not None:
            check.problems["name"] = f"{quoted(name)} {problem}"
        last = answered.get(shown)
        rows.append(RegisteredSiteRow(
            shown, _pattern(check, "node_id", node_id, _NODE_ID, "a Flower node id"),
            _pattern(check, "key_fingerprint", fingerprint, _FINGERPRINT, "a SHA-256 key fingerprint"),
            _stored_time(check, "registered_at", registered_at),
            last[0] if last else None, last[1] if last else None, check.problems))
    rows.sort(key=lambda r: natural_key(r.name))
    return rows
