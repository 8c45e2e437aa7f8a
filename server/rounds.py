"""Every write to the round tables, in one place: rounds, participation, privacy events, metrics.

``RoundWriter`` is the coordinator's pen for one run. It knows which node is which site (a
node is named by the site id it last reported), records why a site is missing (an error
reply, no reply, a rejected or refused reply) and closes each round with its totals. It
checks nothing: replies reach it only after ``server.checks`` passed them.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from flwr.app import Message
from sqlalchemy import select
from sqlalchemy.orm import Session

from privacy.ckks import EncryptedVector
from privacy.events import DpSgdEvent
from server.budget import SiteStanding
from server.checks import EvalReply, TrainReply
from server.ledger_heads import LedgerWitness
from server.sentences import error_sentence
from server.store import RunStore
from server.store import schema as S
from veil import protocol as P
from veil.names import ParticipationStatus, Phase

ProgressFn = Callable[[dict[str, float | int | None]], None]


def format_progress(info: dict[str, float | int | None]) -> str:
    """One progress line per round: accuracy and loss (or encrypted), max ε, sites trained, seconds."""
    parts = [f"round {info['round']}/{info['rounds']}:"]
    if info["accuracy"] is not None:
        on = f" (on the {info['sites_evaluated']} sites sampled)" if info.get("sites_evaluated") else ""
        parts.append(f"accuracy {info['accuracy']:.4f}, loss {info['loss']:.4f}{on},")
    elif info.get("encrypted"):
        parts.append("evaluation encrypted,")
    if info["max_epsilon"] is not None:
        parts.append(f"max ε {info['max_epsilon']:.3f},")
    parts.append(f"{info['sites_ok']}/{info['sites_sampled']} sites trained, {info['seconds']:.1f}s")
    return " ".join(parts)


@dataclass
class RoundLog:
    """What one round has done so far (closed into its ``rounds`` row)."""

    number: int
    started: float = field(default_factory=time.perf_counter)
    sampled: list[int] = field(default_factory=list)
    bytes_down: int = 0
    bytes_up: int = 0
    ok: int = 0
    examples: int = 0
    train_loss: float | None = None
    max_epsilon: float | None = None
    evaluated: int = 0  # sites whose evaluation was accepted
    evaluation_sampled: bool = False  # only this round's sampled sites evaluated (a large federation)


class RoundWriter:
    """Writes one run's rounds to the store."""

    def __init__(self, store: RunStore, run_id: int, *, num_rounds: int, min_sites: int,
                 on_round: ProgressFn | None = None) -> None:
        self.store = store
        self.run_id = run_id
        self.num_rounds = num_rounds
        self.min_sites = min_sites
        self.on_round = on_round
        self.node_sites: dict[int, str] = {}
        self.round = RoundLog(0)

    def site_of(self, node: int) -> str:
        """The site id a node reported, or ``node-N`` before it has said who it is."""
        return self.node_sites.get(node, f"node-{node}")

    def history(self, s: Session, before_round: int, site_id: str) -> list[DpSgdEvent]:
        """The privacy events this run recorded for ``site_id`` before ``before_round``, in order."""
        PE = S.PrivacyEvent
        rows = s.execute(select(PE.noise_multiplier, PE.sample_rate, PE.steps, PE.max_grad_norm)
                         .join(S.Site, S.Site.id == PE.site_id)
                         .where(PE.run_id == self.run_id, S.Site.site_key == site_id,
                                PE.round_number < before_round)
                         .order_by(PE.round_number)).all()
        return [DpSgdEvent(sigma, q, steps, c) for sigma, q, steps, c in rows]

    def open_round(self, server_round: int, sampled: list[int], bytes_down: int) -> None:
        """Start a round: who was sampled and what was sent to them."""
        self.round = RoundLog(server_round, sampled=sampled, bytes_down=bytes_down)
        with self.store.session() as s:
            row = self.store.round_row(s, self.run_id, server_round)
            row.sites_sampled = len(sampled)

    def participation(self, s: Session, server_round: int, node: int, phase: Phase,
                      status: ParticipationStatus, *, reason: str, bytes_down: int,
                      code: str | None = None) -> None:
        """A site that did not take part as asked, and why."""
        site = self.store.site_row(s, self.run_id, self.site_of(node))
        s.add(S.Participation(run_id=self.run_id, round_number=server_round, site_id=site.id,
                              phase=phase, status=status, reason=reason[:2000], reason_code=code,
                              bytes_down=bytes_down))

    def answered(self, s: Session, server_round: int, phase: Phase, replies: list[Message],
                 sampled: list[int], bytes_down: int) -> list[Message]:
        """Record error replies and silent sites; return the replies that carry content."""
        answered = {m.metadata.src_node_id for m in replies}
        for msg in replies:
            if msg.has_error():
                self.participation(s, server_round, msg.metadata.src_node_id, phase, "failed",
                                   reason=error_sentence(msg.error.reason), bytes_down=bytes_down,
                                   code="site-error")
        for node in sampled:
            if node not in answered:
                self.participation(s, server_round, node, phase, "no-reply",
                                   reason="no reply before the round timeout", bytes_down=bytes_down)
        return [m for m in replies if not m.has_error()]

    def refused(self, s: Session, server_round: int, node: int, site_id: str, refusal: P.Refusal,
                bytes_down: int, phase: Phase = "train") -> None:
        """A site said no (to training or evaluating), with its machine-readable code."""
        self.node_sites[node] = site_id
        self.participation(s, server_round, node, phase, "refused", reason=str(refusal),
                           bytes_down=bytes_down, code=refusal.code)

    def trained(self, s: Session, server_round: int, node: int, reply: TrainReply, bytes_down: int,
                metrics: dict[str, float]) -> None:
        """A usable training reply: participation, the privacy event, the ledger head, metrics."""
        info, report, life = reply.info, reply.report, reply.lifetime
        self.node_sites[node] = info.site_id
        site = self.store.site_row(s, self.run_id, info.site_id)
        site.num_train, site.num_test = reply.num_examples, info.num_test
        site.device = info.device
        s.add(S.Participation(
            run_id=self.run_id, round_number=server_round, site_id=site.id, phase="train",
            status="ok", num_examples=reply.num_examples, seconds=info.seconds,
            bytes_down=bytes_down, bytes_up=reply.update_bytes,
        ))
        for name, value in metrics.items():
            s.add(S.Metric(run_id=self.run_id, round_number=server_round, site_id=site.id,
                           phase="train", name=name, value=value))
        self.round.bytes_up += reply.update_bytes
        self.round.examples += reply.num_examples
        if report is None or life is None or reply.head is None:  # a non-private run: no event, no charge
            return
        site.delta = report.delta
        ev = report.event
        site.dataset_id = life.dataset_id
        LedgerWitness(s, self.run_id).advance(info.site_id, reply.head)
        s.add(S.PrivacyEvent(
            run_id=self.run_id, round_number=server_round, site_id=site.id,
            noise_multiplier=ev.noise_multiplier, sample_rate=ev.sample_rate,
            steps=ev.steps, max_grad_norm=ev.max_grad_norm, delta=report.delta,
            sampling=report.sampling, accountant=report.accountant,
            accountant_version=report.accountant_version, reported_epsilon=report.epsilon,
            dataset_id=life.dataset_id, ledger_entry=life.entry_id,
            lifetime_epsilon=life.epsilon, lifetime_delta=life.delta,
            ledger_accountant=life.accountant, epsilon_cap=life.cap, rng=report.rng,
            ledger_id=reply.head.ledger_id, ledger_seq=reply.head.seq, lifetime_without_dp=life.without_dp,
        ))

    def evaluated(self, s: Session, server_round: int, node: int, reply: EvalReply, bytes_down: int) -> None:
        """A usable plaintext evaluation: participation and the site's loss and accuracy."""
        self.node_sites[node] = reply.info.site_id
        self.round.evaluated += 1
        site = self.store.site_row(s, self.run_id, reply.info.site_id)
        site.num_test = reply.num_examples
        s.add(S.Participation(
            run_id=self.run_id, round_number=server_round, site_id=site.id,
            phase="evaluate", status="ok", num_examples=reply.num_examples, seconds=reply.info.seconds,
            bytes_down=bytes_down,
        ))
        for name, value in ((P.EVAL_LOSS, reply.loss), (P.EVAL_ACC, reply.accuracy)):
            s.add(S.Metric(run_id=self.run_id, round_number=server_round, site_id=site.id,
                           phase="evaluate", name=name, value=value))

    def evaluated_encrypted(self, s: Session, server_round: int, node: int, info: P.SiteInfo,
                            enc: EncryptedVector, bytes_down: int) -> None:
        """A usable encrypted evaluation: participation only (its sums are unreadable here)."""
        self.node_sites[node] = info.site_id
        self.round.evaluated += 1
        site = self.store.site_row(s, self.run_id, info.site_id)
        s.add(S.Participation(
            run_id=self.run_id, round_number=server_round, site_id=site.id, phase="evaluate",
            status="ok", seconds=info.seconds, bytes_down=bytes_down, bytes_up=enc.nbytes,
        ))

    def encrypted_metrics(self, s: Session, server_round: int, total: EncryptedVector, sites: int,
                          weight_norm: float) -> None:
        """The round's summed, encrypted evaluation: one ciphertext, readable only with the secret key."""
        (blob,) = total.chunks
        s.add(S.EncryptedMetric(
            run_id=self.run_id, round_number=server_round, phase="evaluate",
            names=",".join(P.EVAL_SUMS), key_id=total.key_id, weight_norm=weight_norm,
            sites=sites, ciphertext=blob, sha256=hashlib.sha256(blob).hexdigest(),
        ))

    def preflight(self, standings: dict[int, SiteStanding], server_round: int = 0) -> None:
        """Each site's budget answer on the record (phase ``preflight``; round 0 when asked before
        training, else the round it was first sampled for), with the rounds planned for it."""
        with self.store.session() as s:
            for node, st in standings.items():
                if st.status is None:
                    if st.reported_id or st.name:  # it could not answer, but its name is known
                        self.node_sites[node] = st.reported_id or st.name or ""
                    self.participation(s, server_round, node, "preflight", "no-reply" if "timeout" in
                                       (st.failure or "") else "failed",
                                       reason=st.failure or "no answer", bytes_down=0)
                    continue
                b = st.status
                self.node_sites[node] = b.site_id
                site = self.store.site_row(s, self.run_id, b.site_id)
                site.planned_rounds = st.planned_rounds
                site.dataset_id, site.epsilon_cap = b.dataset_id, b.cap
                site.budget_delta, site.budget_accountant = b.delta, b.accountant
                site.spent_before, site.projected_epsilon = b.spent, b.projected
                site.without_dp_before = b.without_dp
                site.affordable_rounds, site.num_train = b.affordable_rounds, b.num_examples
                if b.ledger is not None:
                    site.ledger_id, site.ledger_seq = b.ledger.ledger_id, b.ledger.seq
                if st.rejection is not None:
                    self.participation(s, server_round, node, "preflight", "rejected", reason=str(st.rejection),
                                       bytes_down=0, code=st.rejection.code)
                elif b.refusal is not None:
                    self.participation(s, server_round, node, "preflight", "refused", reason=str(b.refusal),
                                       bytes_down=0, code=b.refusal.code)
                else:
                    s.add(S.Participation(run_id=self.run_id, round_number=server_round, site_id=site.id,
                                          phase="preflight", status="ok", bytes_down=0))

    def close_round(self, server_round: int, accuracy: float | None, loss: float | None,
                    encrypted: bool = False) -> None:
        """The round's row and aggregate metrics; then the progress callback."""
        r = self.round
        seconds = time.perf_counter() - r.started
        with self.store.session() as s:
            row = self.store.round_row(s, self.run_id, server_round)
            row.status = "completed" if r.ok >= self.min_sites else "insufficient"
            row.ended_at, row.seconds = datetime.now(UTC), seconds
            row.sites_ok, row.examples = r.ok, r.examples
            row.bytes_down, row.bytes_up = r.bytes_down, r.bytes_up
            for name, value in ((P.TRAIN_LOSS, r.train_loss), (P.EPSILON, r.max_epsilon),
                                (P.EVAL_LOSS, loss), (P.EVAL_ACC, accuracy)):
                if value is not None:
                    s.add(S.Metric(run_id=self.run_id, round_number=server_round, site_id=None,
                                   phase="aggregate", name=name, value=value))
        if self.on_round:
            self.on_round({"round": server_round, "rounds": self.num_rounds, "accuracy": accuracy,
                           "loss": loss, "max_epsilon": r.max_epsilon, "sites_ok": r.ok,
                           "sites_sampled": len(r.sampled), "seconds": seconds,
                           "encrypted": int(encrypted),
                           "sites_evaluated": r.evaluated if r.evaluation_sampled else None})
