"""A run's summary, read back from the store (the store is the source of truth).

ε per site is recomputed here from the stored privacy events with the accountant the site
used; the ε a site reported is kept in the events for audit and compared in tests.

Nothing stored is trusted unchecked (``server.read.stored``): a value that fails its check is
``None`` in the summary with its reason in the record's ``problems`` (``{field: reason}``), and
``RunSummary.warnings`` lists them one line each. Strings are kept as stored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, get_args

from pydantic import ValidationError
from sqlalchemy import func, select

from privacy.events import remaining_budget
from server.read.stored import (
    STEPS_MAX,
    Checker,
    StoredEvent,
    accuracy,
    check_event,
    delta,
    nonneg,
    opt_text,
    problem_lines,
    quoted,
    text,
    why_bad,
)
from server.store import RunStore
from server.store import schema as S
from veil.errors import EncryptionError
from veil.names import (
    EVAL_ACC,
    EVAL_LOSS,
    EVAL_SUMS,
    RUN_STATUSES,
    TRAIN_LOSS,
    ParticipationStatus,
    Phase,
    RoundStatus,
    RunMode,
    eval_from_sums,
)

if TYPE_CHECKING:
    from privacy.ckks import SecretKey

ROUND_STATUSES: tuple[str, ...] = get_args(RoundStatus)
PARTICIPATION_STATUSES: tuple[str, ...] = get_args(ParticipationStatus)
PHASES: tuple[str, ...] = get_args(Phase)
RUN_MODES: tuple[str, ...] = get_args(RunMode)


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
    problems: dict[str, str] = field(default_factory=dict)  # {field: why its stored value was not used}


@dataclass(frozen=True)
class SiteMechanism:
    """A site's DP-SGD mechanism over one run: the worst case of each knob, and total steps."""

    max_sample_rate: float
    min_noise_multiplier: float
    steps: int
    max_grad_norm: float


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
    mechanism: SiteMechanism | None = None  # None: no events, or events that failed their checks
    planned_rounds: int | None = None  # the rounds the run planned for it (refuse mode); None: all
    # rounds its ledger released without DP in the cap's scope: any, and ``lifetime_epsilon`` (the
    # DP rounds composed) is no lifetime guarantee
    lifetime_without_dp: int = 0
    problems: dict[str, str] = field(default_factory=dict)

    @property
    def remaining(self) -> float | None:
        """Lifetime ε the site's ledger has left under its cap after this run (0 once it released
        a round without DP: a cap then refuses every charge)."""
        if self.lifetime_without_dp and self.epsilon_cap is not None:
            return 0.0
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
    problems: dict[str, str] = field(default_factory=dict)


NO_DP = "not private: trained without differential privacy (privacy: none, the non-private baseline)"


def without_dp(spec: dict[str, Any]) -> bool:
    """Whether a stored scenario trained without DP (``privacy: {mechanism: none}``)."""
    return section(spec, "privacy").get("mechanism") == "none"


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
    flower_run_id: str | None = None  # Flower's own id of the run (`flwr ls`), deployments
    owner: str | None = None  # the process that ran it: "pid N on HOST"
    # the server optimiser as ``ServerOptimizer.describe()`` says it ("fedavg", "fedadam (η=0.1, ...)"); a
    # stored spec without the section ran fedavg; None: no spec stored, or one that fails its check
    server_optimizer: str | None = None
    problems: dict[str, str] = field(default_factory=dict)  # the run row's own fields

    @property
    def without_dp(self) -> bool:
        """The run trained without DP at all (``privacy: none``, the labelled non-private baseline)."""
        return without_dp(self.spec)

    @property
    def not_private(self) -> bool:
        """No DP, or some site's noise was reproducible from the seed: no ε of this run protects anyone."""
        return (self.without_dp or self.noise_rng == "seeded"
                or bool(section(self.spec, "privacy").get("reproducible_noise")))

    @property
    def privacy_note(self) -> str:
        """For reports: ``NO_DP`` without DP, ``NOT_PRIVATE`` if seeded, else OS entropy; empty without events."""
        from privacy.randomness import NOT_PRIVATE, describe

        if self.without_dp:
            return NO_DP
        if self.not_private:
            return NOT_PRIVATE
        return f"DP noise and Poisson sampling {describe('os-entropy')}" if self.noise_rng else ""

    @property
    def refusals(self) -> list[RefusalRow]:
        """The missed participations that a site refused (not failures, rejections or missing replies)."""
        return [m for m in self.missed if m.status == "refused"]

    @property
    def final(self) -> RoundRow | None:
        """The last round that produced evaluation metrics (or was decrypted, or holds an invalid one)."""
        done = [r for r in self.rounds if r.accuracy is not None or r.encrypted or "accuracy" in r.problems]
        return done[-1] if done else None

    @property
    def epsilon_invalid(self) -> bool:
        """Some site's run ε could not be derived from its stored events: no worst case can be stated."""
        return any("epsilon" in s.problems for s in self.sites)

    @property
    def max_epsilon(self) -> float | None:
        """The largest run ε over the sites; None if no site has privacy events or one site's ε is invalid."""
        if self.epsilon_invalid:
            return None
        return max((s.epsilon for s in self.sites if s.epsilon is not None), default=None)

    @property
    def bytes_moved(self) -> int:
        """Bytes sent to and from the sites, summed over every round (rounds with bad counts add 0)."""
        return sum(r.bytes_down + r.bytes_up for r in self.rounds)

    @property
    def examples(self) -> int:
        """Training records summed over rounds: each trained site's train-set size, once per round it trained."""
        return sum(r.examples for r in self.rounds)

    @property
    def warnings(self) -> list[str]:
        """One line per stored value of this run that failed its check (fields with one reason share a line)."""
        records: list[tuple[str, dict[str, str]]] = [(f"run {self.run_id}", self.problems)]
        records += [(f"round {r.number}", r.problems) for r in self.rounds]
        records += [(f"site {s.site}", s.problems) for s in self.sites]
        records += [(f"site {m.site} round {m.round}", m.problems) for m in self.missed]
        return list(dict.fromkeys(line for where, problems in records for line in problem_lines(where, problems)))


def server_optimizer(check: Checker, spec: dict[str, Any]) -> str | None:
    """The stored spec's server optimiser, as ``ServerOptimizer.describe()`` says it.

    A spec stored before server optimisers existed has no ``server_optimizer`` section: those runs
    took the weighted mean as the model, which is ``fedavg``. No spec at all gives None; a section
    the current spec model rejects gives None and a problem (field ``server_optimizer``)."""
    from veil.spec import ServerOptimizerSpec

    if not spec:
        return None
    raw = spec.get("server_optimizer", {})
    try:
        return ServerOptimizerSpec.model_validate(raw).optimizer().describe()
    except ValidationError as err:
        why = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'the section'}: {e['msg']}"
                        for e in err.errors()[:2])
        check.problems["server_optimizer"] = f"not a server optimiser this Veil runs ({why[:200]})"
    except ValueError as err:  # ServerOptimizer's own bounds
        check.problems["server_optimizer"] = f"not a server optimiser this Veil runs ({str(err)[:200]})"
    return None


def section(spec: dict[str, Any], name: str) -> dict[str, Any]:
    """A table of the stored spec (``privacy``, ``data``, ...), or ``{}`` if it is missing or not a table."""
    value = spec.get(name)
    return value if isinstance(value, dict) else {}


def decrypt_evaluation(key: SecretKey, key_id: str, blob: bytes) -> tuple[float, float]:
    """(accuracy, loss) from a round's encrypted evaluation sums; needs the key set's secret key."""
    from privacy.ckks import EncryptedVector

    return eval_from_sums(list(key.decrypt(EncryptedVector(key_id, len(EVAL_SUMS), (blob,)))))


def _decrypted(key: SecretKey, row: S.EncryptedMetric) -> tuple[float | None, float | None, str | None]:
    """(accuracy, loss, None), or (None, None, why) for a ciphertext under this key that does not decrypt
    to a sane evaluation; a ciphertext under another key set stays an error (the wrong ``--key``)."""
    if text(row.key_id) != key.key_id:
        raise EncryptionError(f"round {row.round_number} is encrypted under key set {quoted(row.key_id)}, "
                              f"this key is {key.key_id}")
    try:
        acc, loss = decrypt_evaluation(key, key.key_id, bytes(row.ciphertext))
    except (ValueError, TypeError) as err:  # EncryptionError is a ValueError
        return None, None, f"the stored ciphertext does not decrypt to an evaluation ({quoted(str(err))})"
    return acc, loss, None


def _round_row(r: S.Round, agg: dict[tuple[int, str], object],
               encrypted: dict[int, tuple[float | None, float | None, str | None]]) -> RoundRow:
    check = Checker()
    number = check.count("number", r.number)
    enc = encrypted.get(number)
    stored = (agg.get((number, EVAL_ACC)), agg.get((number, EVAL_LOSS)), None)
    acc_, loss_, why = enc if enc is not None else stored
    acc, loss = accuracy(check, "accuracy", acc_), nonneg(check, "loss", loss_)
    if why is not None:
        check.problems["accuracy"] = check.problems["loss"] = why
    return RoundRow(
        number, check.status("status", r.status, ROUND_STATUSES), acc, loss,
        nonneg(check, "train_loss", agg.get((number, TRAIN_LOSS))),
        check.count("sites_ok", r.sites_ok), check.count("sites_sampled", r.sites_sampled),
        check.count("examples", r.examples), check.count("bytes_down", r.bytes_down),
        check.count("bytes_up", r.bytes_up), nonneg(check, "seconds", r.seconds),
        encrypted=enc is not None, problems=check.problems)


def _site_row(site: S.Site, joined: int, spend: SiteEpsilon | None, last: S.PrivacyEvent | None) -> SiteRow:
    check = Checker()
    if spend is not None and spend.problem is not None:  # and the ledger spend charged with those events
        for name in ("epsilon", "noise_multiplier", "lifetime_epsilon"):
            check.problems[name] = spend.problem
    accountant = spend.accountant if spend else None
    if accountant is not None:
        check.accountant("accountant", accountant)
    ledger_accountant = check.accountant("ledger_accountant",
                                         last.ledger_accountant if last else site.budget_accountant)
    cap = check.number("epsilon_cap", last.epsilon_cap if last else site.epsilon_cap, above=0.0)
    return SiteRow(
        text(site.site_key), check.opt_count("num_train", site.num_train),
        check.opt_count("num_test", site.num_test), joined,
        spend.epsilon if spend else None,
        delta(check, "delta", spend.delta if spend else site.delta),
        spend.noise_multiplier if spend else None, accountant, dataset_id=opt_text(site.dataset_id),
        lifetime_epsilon=None if "lifetime_epsilon" in check.problems else
        nonneg(check, "lifetime_epsilon", last.lifetime_epsilon if last else site.spent_before),
        lifetime_delta=delta(check, "lifetime_delta", last.lifetime_delta if last else site.budget_delta),
        epsilon_cap=cap, ledger_accountant=ledger_accountant,
        mechanism=spend.mechanism if spend else None,
        planned_rounds=check.opt_count("planned_rounds", site.planned_rounds),
        lifetime_without_dp=check.opt_count("lifetime_without_dp", last.lifetime_without_dp if last
                                            else site.without_dp_before) or 0,
        problems=check.problems,
    )


def _run_fields(run: S.Run) -> tuple[Checker, dict[str, Any]]:
    """The run row's own fields, checked: what ``RunSummary`` takes from it."""
    check = Checker()
    spec = check.json_object("spec", run.spec_json) or {}
    encryption = check.json_object("encryption", run.encryption_json)
    if encryption is not None and not isinstance(encryption.get("params", {}), dict):
        check.problems["encryption"] = "its params are not a JSON object"
        encryption = None
    seed = check.number("seed", run.seed, whole=True)
    researcher = (f"{text(run.researcher)} ({text(run.researcher_key_id)})" if run.researcher else None)
    return check, {
        "name": text(run.name), "status": check.status("status", run.status, RUN_STATUSES),
        "error": opt_text(run.error), "wall_seconds": nonneg(check, "wall_seconds", run.wall_seconds),
        "encryption": encryption, "spec": spec, "created_at": iso_utc(run.created_at),
        "mode": check.status("mode", run.mode, RUN_MODES),
        "planned_rounds": check.count("planned_rounds", run.num_rounds),
        "planned_sites": check.count("planned_sites", run.num_sites),
        "seed": None if seed is None else int(seed), "spec_hash": text(run.spec_hash),
        "code_version": text(run.code_version), "researcher": researcher,
        "flower_run_id": opt_text(run.flower_run_id),
        "owner": f"pid {run.owner_pid} on {text(run.owner_host)}" if run.owner_pid is not None else None,
        "server_optimizer": server_optimizer(check, spec),
    }


def _missed(p: S.Participation, key: object) -> RefusalRow:
    check = Checker()
    return RefusalRow(text(key), check.count("round", p.round_number), check.status("phase", p.phase, PHASES),
                      check.status("status", p.status, PARTICIPATION_STATUSES), opt_text(p.reason_code),
                      opt_text(p.reason), problems=check.problems)


def load_summary(store: RunStore, run_id: int, key: SecretKey | None = None) -> RunSummary:
    """The run as the store has it; with ``key``, encrypted evaluation metrics are decrypted."""
    run = store.get_run(run_id)
    spends = {e.site_row: e for e in site_epsilons(store, run_id)}
    with store.session() as s:
        encrypted: dict[int, tuple[float | None, float | None, str | None]] = {}
        for row in s.scalars(select(S.EncryptedMetric).where(S.EncryptedMetric.run_id == run_id,
                                                              S.EncryptedMetric.phase == "evaluate")):
            encrypted[row.round_number] = _decrypted(key, row) if key is not None else (None, None, None)
        agg: dict[tuple[int, str], object] = {
            (rn, name): value
            for rn, name, value in s.execute(
                select(S.Metric.round_number, S.Metric.name, S.Metric.value)
                .where(S.Metric.run_id == run_id, S.Metric.site_id.is_(None))
            ).all()
            if value is not None
        }
        rounds = [_round_row(r, agg, encrypted)
                  for r in s.scalars(select(S.Round).where(S.Round.run_id == run_id).order_by(S.Round.number))]
        joined = dict(
            s.execute(
                select(S.Participation.site_id, func.count())
                .where(S.Participation.run_id == run_id, S.Participation.phase == "train",
                       S.Participation.status == "ok")
                .group_by(S.Participation.site_id)
            ).all()
        )
        last_event = {
            ev.site_id: ev for ev in s.scalars(
                select(S.PrivacyEvent).where(S.PrivacyEvent.id.in_(
                    select(func.max(S.PrivacyEvent.id)).where(S.PrivacyEvent.run_id == run_id)
                    .group_by(S.PrivacyEvent.site_id))))
        }
        sites = [_site_row(site, int(joined.get(site.id, 0)), spends.get(site.id), last_event.get(site.id))
                 for site in s.scalars(select(S.Site).where(S.Site.run_id == run_id))]
        sites.sort(key=lambda r: natural_key(r.site))
        modes = {text(m) for m in s.scalars(select(S.PrivacyEvent.rng).where(S.PrivacyEvent.run_id == run_id)
                                            .distinct())}
        noise_rng = "seeded" if "seeded" in modes else "os-entropy" if "os-entropy" in modes else None
        artifacts = [(text(a.uri), text(a.sha256), Checker().count("size", a.size_bytes)) for a in
                     s.scalars(select(S.Artifact).where(S.Artifact.run_id == run_id))]
        missed = [
            _missed(p, key_)
            for p, key_ in s.execute(
                select(S.Participation, S.Site.site_key).join(S.Site, S.Site.id == S.Participation.site_id)
                .where(S.Participation.run_id == run_id, S.Participation.status != "ok")
                .order_by(S.Participation.round_number, S.Participation.id))
        ]
    check, fields = _run_fields(run)
    return RunSummary(run.id, rounds=rounds, sites=sites, artifacts=artifacts, missed=missed,
                      decrypted_with=key.key_id if key is not None and encrypted else None,
                      noise_rng=noise_rng, problems=check.problems, **fields)


def iso_utc(when: datetime | None) -> str | None:
    """ISO 8601 to the second, a naive time taken as UTC; None stays None."""
    if when is None:
        return None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).isoformat(timespec="seconds")


def natural_key(key: str) -> tuple[str, int]:
    """Sort key that puts ``site-2`` before ``site-10``: (prefix, trailing number), or (key, -1) without one."""
    head, _, tail = key.rpartition("-")
    return (head, int(tail)) if tail.isascii() and tail.isdigit() and len(tail) <= 18 else (key, -1)


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
    without_dp: int = 0  # rounds the ledger had released without DP: ``spent`` is then no guarantee
    problems: dict[str, str] = field(default_factory=dict)

    @property
    def remaining(self) -> float | None:
        """Lifetime ε left under the cap after that run's last charge (0 after a release without DP)."""
        if self.without_dp and self.cap is not None:
            return 0.0
        return remaining_budget(self.cap, self.spent)


def ledger_notes(store: RunStore) -> dict[str, str]:
    """{site: what the coordinator recorded when the site's administrator replaced its ledger}."""
    with store.session() as s:
        rows = s.scalars(select(S.LedgerHead).where(S.LedgerHead.replaced_ledger.is_not(None))).all()
    return {text(r.site_key): (
        f"new ledger {text(r.ledger_id)} since {iso_utc(r.replaced_at)}, replacing lost ledger "
        f"{text(r.replaced_ledger)} ({text(r.replaced_seq)} entries): "
        f"{text(r.replaced_reason) or 'no reason given'}; the lost ledger's spend is not in the "
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
    rows = [_budget_row(ev, text(key), notes) for ev, key in found]
    rows.sort(key=lambda r: (natural_key(r.site), r.dataset_id or ""))
    return rows


def _budget_row(ev: S.PrivacyEvent, key: str, notes: dict[str, str]) -> BudgetRow:
    check = Checker()
    run_epsilon = nonneg(check, "run_epsilon", ev.reported_epsilon)
    spent = nonneg(check, "spent", ev.lifetime_epsilon)
    event = check_event(ev.round_number, ev.noise_multiplier, ev.sample_rate, ev.steps, ev.max_grad_norm,
                        ev.delta, ev.accountant)
    if isinstance(event, str):  # spends reported with a mechanism that fails its checks are not shown
        run_epsilon = spent = None
        check.problems["run_epsilon"] = check.problems["spent"] = f"its privacy event, {event}"
    return BudgetRow(
        key, opt_text(ev.dataset_id), ev.run_id, run_epsilon, spent,
        check.number("cap", ev.epsilon_cap, above=0.0), delta(check, "delta", ev.lifetime_delta),
        check.accountant("accountant", ev.ledger_accountant), notes.get(key),
        without_dp=check.opt_count("without_dp", ev.lifetime_without_dp) or 0, problems=check.problems)


@dataclass(frozen=True)
class SiteEpsilon:
    """A site's run ε, derived from its recorded privacy events with its own accountant.

    ``epsilon`` is None, with the reason in ``problem``, when a stored event fails its check
    (``server.read.stored.check_event``) or the accountant cannot answer: the accountant is
    never run on an event outside the bounds.
    """

    site: str
    site_row: int
    epsilon: float | None
    delta: float | None
    accountant: str
    events: int
    problem: str | None = None
    noise_multiplier: float | None = None  # the largest σ of the site's events (None: invalid)
    mechanism: SiteMechanism | None = None


def site_epsilons(store: RunStore, run_id: int, *, use_derived: bool = True) -> list[SiteEpsilon]:
    """Each site's run ε: from the value derived at run end when it is a valid number covering every
    event of the site, otherwise (or with ``use_derived=False``) recomputed from the events. Every
    event is checked first, whichever way ε is found."""
    PE = S.PrivacyEvent
    with store.session() as s:
        sites = {row.id: row for row in s.scalars(select(S.Site).where(S.Site.run_id == run_id))}
        history: dict[int, list[tuple[int, StoredEvent | str, object, object]]] = {}
        for ev_id, sid, rn, sigma, q, steps, c, dlt, acc in s.execute(
                select(PE.id, PE.site_id, PE.round_number, PE.noise_multiplier, PE.sample_rate, PE.steps,
                       PE.max_grad_norm, PE.delta, PE.accountant)
                .where(PE.run_id == run_id).order_by(PE.round_number, PE.id)):
            history.setdefault(sid, []).append((ev_id, check_event(rn, sigma, q, steps, c, dlt, acc), dlt, acc))
    return [_site_epsilon(sites[sid], events, use_derived) for sid, events in history.items() if sid in sites]


def _site_epsilon(site: S.Site, events: list[tuple[int, StoredEvent | str, object, object]],
                  use_derived: bool) -> SiteEpsilon:
    from privacy.accounting import DpSgdEvent, check_accountant, epsilon

    _, _, last_delta, last_accountant = max(events, key=lambda e: e[0])
    good_delta = why_bad(last_delta, above=0.0, below=1.0) is None
    shown_delta = float(last_delta) if good_delta else None  # type: ignore[arg-type]
    out = SiteEpsilon(text(site.site_key), site.id, None, shown_delta, text(last_accountant), len(events))
    good = [e for _, e, _, _ in events if isinstance(e, StoredEvent)]
    problem = next((e for _, e, _, _ in events if isinstance(e, str)), None)
    if problem is None and len({e.accountant for e in good}) > 1:
        problem = (f"events name several accountants ({', '.join(sorted({e.accountant for e in good}))}): "
                   "no single ε covers them")
    if problem is None and sum(e.steps for e in good) > STEPS_MAX:
        problem = f"{sum(e.steps for e in good)} steps in all, above the {STEPS_MAX:g} a run can take"
    if problem is not None:
        return replace(out, problem=problem)
    mechanism = SiteMechanism(max(e.sample_rate for e in good), min(e.noise_multiplier for e in good),
                              sum(e.steps for e in good), max(e.max_grad_norm for e in good))
    out = replace(out, noise_multiplier=max(e.noise_multiplier for e in good), mechanism=mechanism)
    derived = site.derived_epsilon
    if use_derived and site.derived_events == len(events) and why_bad(derived, low=0.0) is None:
        return replace(out, epsilon=float(derived))  # type: ignore[arg-type]
    final = good[-1]
    try:
        eps = epsilon([DpSgdEvent(e.noise_multiplier, e.sample_rate, e.steps, e.max_grad_norm) for e in good],
                      final.delta, check_accountant(final.accountant))
    except (ValueError, ArithmeticError, MemoryError) as err:
        return replace(out, problem=f"the {final.accountant} accountant failed on the stored events "
                                     f"({quoted(str(err))})")
    if not math.isfinite(eps):
        return replace(out, problem=f"the {final.accountant} accountant gives a non-finite ε for the stored "
                                     "events")
    return replace(out, epsilon=eps)
