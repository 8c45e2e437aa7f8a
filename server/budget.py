"""The coordinator's side of budgets: ask before the run, plan who trains when.

The coordinator sends the sites that may train the run's training task as a budget question
(``query.budget``). Each site answers from its *own* ledger and policy: what it has spent,
the σ and q it would run, the lifetime ε after its planned rounds, how many of them it can
afford, and any policy refusal. The coordinator cannot see the ledger or change the policy;
it can only plan around the answers:

* ``on_budget_exhausted: refuse`` fixes the whole sampling schedule before the pre-flight (by
  site id and seed; ``server.directory`` names the nodes), asks only the scheduled sites, each
  for the k rounds it is scheduled for (``P.SITE_ROUNDS``: it calibrates σ for k and refuses a
  round k+1), and refuses the run, before anything trains, if any of them would be sampled
  more often than it can afford or would refuse outright.
* ``on_budget_exhausted: drop`` samples each round from the sites that still have budget
  (and never from those that refused), asking a site when it is first sampled, and stops the
  run early when fewer than ``min_sites`` are left. Sites calibrate σ for all R rounds here.

Either way a site is charged (by itself) only for the rounds it trains in, with no credit
for the coordinator's client sampling. The site re-checks every task anyway, so a stale
plan can at worst cost a round, never a site's budget.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from sqlalchemy import select

from server.delivery import send_and_receive
from server.sentences import error_sentence, one_line
from server.store import RunStore
from server.store import schema as S
from veil import protocol as P
from veil.logs import get_logger

log = get_logger("server")


@dataclass
class SiteStanding:
    """What the coordinator knows about one node's budget."""

    node: int
    status: P.BudgetStatus | None = None
    failure: str | None = None  # the pre-flight got no usable answer
    remaining: int = 0  # rounds it may still be sampled for
    excluded: str | None = None  # why it is no longer sampled ("code: detail")
    rejection: P.Refusal | None = None  # the coordinator's own "no" (e.g. a ledger that went backwards)
    reported_id: str | None = None  # the site id a reply without a budget answer gave
    name: str | None = None  # the site id known before the budget question (``server.directory``)
    asked: bool = True  # whether the budget question went out (False: not yet, or never needed)
    planned_rounds: int | None = None  # the rounds its budget question planned for it (refuse mode)

    def take(self, answer: SiteStanding) -> None:
        """Take what ``ask_budgets`` learnt for this node (its answer, or why there is none)."""
        self.status, self.failure, self.reported_id = answer.status, answer.failure, answer.reported_id
        self.planned_rounds = answer.planned_rounds

    @property
    def site_id(self) -> str:
        """The site's own id from its answer, else the name known for it, else ``node-<id>``."""
        return self.status.site_id if self.status else self.reported_id or self.name or f"node-{self.node}"


JOIN_STALL_S = 60.0  # fewer sites than planned and none joined for this long: say so, do not wait an hour


class TooFewSites(Exception):
    """Fewer sites than ``federation.sites`` connected, and no more are joining."""


def wait_for_nodes(grid: Grid, count: int, timeout: float, stall: float | None = None) -> list[int]:
    """The connected node ids, once ``count`` are there. Raises ``TooFewSites`` (naming the
    setting) when fewer are connected and none has joined for ``stall`` seconds, or at the timeout."""
    stall = JOIN_STALL_S if stall is None else stall
    start = last_change = time.monotonic()
    seen = -1
    while len(nodes := sorted(grid.get_node_ids())) < count:
        now = time.monotonic()
        if len(nodes) != seen:
            seen, last_change = len(nodes), now
            log.info("waiting for sites: %d of %d connected", len(nodes), count)
        if now - last_change >= stall or now - start >= timeout:
            raise TooFewSites(
                f"only {len(nodes)} of {count} sites connected, and none joined in the last "
                f"{now - last_change:.0f} s: set federation.sites to {len(nodes)} in the scenario, or start the "
                "missing sites (for `flwr run .` on a local simulation: options.num-supernodes of the federation)")
        time.sleep(min(1.0, stall / 4))
    return nodes


def check_names(store: RunStore, standings: dict[int, SiteStanding]) -> None:
    """Hold every answer's site name against the register (``veil coordinator register``): a node
    whose key was registered under one name may not answer as another, nor take a name registered
    to another node. Nodes the register does not know (it is optional) are not judged here."""
    with store.session() as s:
        names = {row.node_id: row.name for row in s.scalars(select(S.RegisteredSite))}
    if not names:
        return
    nodes = {name: node for node, name in names.items()}
    for node, st in standings.items():
        if st.status is None or st.rejection is not None:
            continue
        claimed, registered = st.status.site_id, names.get(str(node))
        if registered is not None and claimed != registered:
            why = f"node {node} was registered as {registered!r} but answers as {claimed!r}"
        elif registered is None and claimed in nodes:
            why = f"{claimed!r} is registered to node {nodes[claimed]}, not to node {node}"
        else:
            continue
        st.rejection = P.Refusal("unregistered-name", why)
        log.error("pre-flight: %s", why)


def check_ledgers(store: RunStore, run_id: int, standings: dict[int, SiteStanding]) -> None:
    """Hold every answer's ledger head against what the coordinator witnessed before
    (``server.ledger_heads``); a site whose ledger went backwards or was swapped is rejected."""
    from server.ledger_heads import LedgerWitness

    with store.session() as s:
        witness = LedgerWitness(s, run_id)
        for st in standings.values():
            if st.status is None or st.status.ledger is None or st.rejection is not None:
                continue
            verdict = witness.check(st.status.site_id, st.status.ledger)
            if verdict.refusal is not None:
                st.rejection = verdict.refusal
                log.error("pre-flight: %s", verdict.refusal)
            elif verdict.replaced:
                head = st.status.ledger
                log.warning("pre-flight: %s answers from a new ledger %s that explicitly replaces ledger %s "
                            "(reason given: %s); recorded", st.status.site_id, head.ledger_id,
                            head.predecessor, head.replaced_reason or "none")


def ask_budgets(grid: Grid, nodes: Iterable[int], task: ConfigRecord, timeout: float,
                rounds: dict[int, int] | None = None) -> dict[int, SiteStanding]:
    """Send the budget question to ``nodes``; every node gets a standing, answered or not.
    ``rounds``: the rounds planned for each node (``P.SITE_ROUNDS``), when fewer than all."""
    nodes = list(nodes)
    rounds = rounds or {}
    messages = [
        Message(content=RecordDict({P.TASK: with_site_rounds(task, rounds.get(n))}), dst_node_id=n,
                message_type=P.BUDGET_QUERY)
        for n in nodes
    ]
    standings = {n: SiteStanding(n, planned_rounds=rounds.get(n)) for n in nodes}
    private = task.get("private", True) is not False  # the non-private baseline's answers carry σ = 0
    for reply in send_and_receive(grid, messages, timeout=timeout):
        st = standings.get(reply.metadata.src_node_id)
        if st is None:
            continue
        if reply.has_error():
            st.failure = f"pre-flight failed at the site: {error_sentence(reply.error.reason)}"
            continue
        rec = reply.content.get(P.BUDGET)
        try:
            if rec is None and P.REFUSAL in reply.content:  # the site could not answer, and says why
                refused = reply.content[P.REFUSAL]
                if not isinstance(refused, ConfigRecord):
                    raise ValueError("refusal is not a config record")
                st.failure = f"pre-flight failed at the site: {one_line(str(P.Refusal.from_config(refused)))}"
                st.reported_id = one_line(P.site_info(reply.content).site_id, 200)
                continue
            if not isinstance(rec, ConfigRecord):
                raise ValueError("reply has no budget record")
            st.status = P.BudgetStatus.from_config(rec, private=private)
        except ValueError as err:
            st.failure = f"malformed budget answer: {err}"
    for st in standings.values():
        if st.status is None and st.failure is None:
            st.failure = "no answer to the budget question before the timeout"
    return standings


def with_site_rounds(task: ConfigRecord, rounds: int | None) -> ConfigRecord:
    """``task`` for one site: a copy carrying the rounds planned for it, or ``task`` itself (all rounds)."""
    if rounds is None:
        return task
    config = ConfigRecord(dict(task))
    config[P.SITE_ROUNDS] = rounds
    return config


@dataclass
class ParticipationPlan:
    """Who trains in which round: fixed up front (refuse) or sampled per round (drop).

    The plan can exist before any budget answer: its standings then carry only the sites' names
    (``asked=False``). In refuse mode the schedule is drawn over the named sites at once, so each
    scheduled site's budget question can carry the rounds planned for it, and a site never
    scheduled is never asked. In drop mode ``choose`` asks (through ``ask``) the sampled sites not
    asked yet, and draws again in their place for any that cannot train."""

    standings: dict[int, SiteStanding]
    rounds: int
    per_round: int
    min_sites: int
    mode: str  # "refuse" | "drop"
    seed: int
    schedule: dict[int, list[int]] = field(default_factory=dict)
    stopped: str | None = None  # why the run stopped early (drop mode)
    # drop mode: puts the budget question to these nodes, for this round, and admits their answers
    ask: Callable[[list[int], int], None] | None = None

    def __post_init__(self) -> None:
        self.admit(n for n, st in self.standings.items() if st.asked)
        if self.mode == "refuse":
            pool = [n for n, st in self.standings.items() if st.excluded is None]
            self.schedule = {r: self._sample(r, pool) for r in range(1, self.rounds + 1)}

    def admit(self, nodes: Iterable[int]) -> None:
        """Take the budget answers of ``nodes`` into the plan: who is excluded, and how many
        rounds each may still train."""
        for n in nodes:
            st = self.standings[n]
            st.asked = True
            if st.status is None:
                st.excluded = st.failure or "no budget answer"
            elif st.rejection is not None:
                st.excluded = str(st.rejection)
            elif st.status.refusal is not None:
                st.excluded = str(st.status.refusal)
            else:
                st.remaining = min(st.status.affordable_rounds, self.rounds)

    def _order(self, server_round: int, pool: list[int]) -> list[int]:
        """``pool`` in this round's seeded order, keyed by site id and seed: Flower's node ids change
        from run to run, so the same seed samples the same sites only when the draw is over site ids."""
        by_site = sorted(pool, key=lambda n: (self.standings[n].site_id, n))
        return random.Random(self.seed * 1_000_003 + server_round).sample(by_site, len(by_site))

    def _sample(self, server_round: int, pool: list[int]) -> list[int]:
        """``per_round`` of ``pool``: the first of this round's seeded order."""
        return sorted(self._order(server_round, pool)[:self.per_round])

    def joins(self) -> Counter[int]:
        """How often the fixed schedule samples each node (refuse mode)."""
        return Counter(n for nodes in self.schedule.values() for n in nodes)

    def site_rounds(self) -> dict[int, int]:
        """The rounds planned for each scheduled node (refuse mode; empty in drop mode: all rounds)."""
        return dict(self.joins()) if self.mode == "refuse" else {}

    def refusal_reasons(self) -> list[str]:
        """Why the run cannot go ahead as planned (refuse mode); empty when it can."""
        if self.mode != "refuse":
            return []
        reasons = []
        joins = self.joins()
        for n, st in sorted(self.standings.items(), key=lambda kv: kv[1].site_id):
            if st.rejection is not None:
                reasons.append(f"the coordinator refuses {st.site_id}: {st.rejection}")
            elif st.status is not None and st.status.refusal is not None:
                reasons.append(f"{st.site_id} refuses: {st.status.refusal}")
            elif st.status is not None and joins[n] > st.remaining:
                s = st.status
                cap = f"{s.cap:g}" if s.cap is not None else "none"
                reasons.append(
                    f"{st.site_id} can afford {st.remaining} of the {joins[n]} rounds it is "
                    f"sampled for (spent ε={s.spent:.3f}, all rounds would reach {s.projected:.3f}, "
                    f"cap {cap} at δ={s.delta:g})"
                )
        usable = sum(1 for st in self.standings.values() if st.asked and st.excluded is None)
        if usable < self.min_sites:
            reasons.append(f"only {usable} sites can train; min_sites is {self.min_sites}")
        return reasons

    def choose(self, server_round: int) -> list[int]:
        """The nodes to train in ``server_round``; empty (with ``stopped`` set) when too few."""
        if self.mode == "refuse":
            nodes = [n for n in self.schedule.get(server_round, [])
                     if self.standings[n].asked and self.standings[n].excluded is None]
        else:
            nodes = self._draw(server_round)
        if len(nodes) < self.min_sites:
            self.stopped = (f"stopped before round {server_round}: only {len(nodes)} sites can still "
                            f"train (min_sites {self.min_sites}); the others spent their budget "
                            "or refused")
            return []
        return nodes

    def _draw(self, server_round: int) -> list[int]:
        """Drop mode: ``per_round`` usable nodes, walking this round's seeded order and asking the
        budget question of the nodes not asked yet as they come up."""
        pool = [n for n, st in self.standings.items()
                if not st.asked or (st.excluded is None and st.remaining > 0)]
        order, at = self._order(server_round, pool), 0
        chosen: list[int] = []
        while len(chosen) < self.per_round and at < len(order):
            batch = order[at:at + self.per_round - len(chosen)]
            at += len(batch)
            fresh = [n for n in batch if not self.standings[n].asked]
            if fresh and self.ask is not None:
                self.ask(fresh, server_round)
            chosen += [n for n in batch if self._usable(n)]
        return sorted(chosen)

    def _usable(self, node: int) -> bool:
        st = self.standings[node]
        return st.asked and st.excluded is None and st.remaining > 0

    def trained(self, node: int) -> None:
        """Count one round trained by ``node`` against the rounds it may still be sampled for."""
        st = self.standings.get(node)
        if st is not None:
            st.remaining = max(0, st.remaining - 1)

    def refused(self, node: int, reason: str) -> None:
        """Stop sampling ``node`` for the rest of the run, recording ``reason``."""
        st = self.standings.get(node)
        if st is not None:
            st.remaining, st.excluded = 0, reason
