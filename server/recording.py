"""RecordingStrategy: wraps any Flower strategy and puts every round on the record.

Wrapping (not subclassing) keeps aggregation in Flower's strategy and recording here. Each
reply is checked at the edge before the inner strategy sees it: a site whose reply is
malformed (missing records, arrays that do not match the global model, an invalid privacy
event) is rejected with a recorded reason and the round goes on with the others. Error
replies and sites that never answered are recorded too, so the participation table always
says why a site is missing.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from sqlalchemy.orm import Session

from privacy.ckks import CoordinatorContext
from server.budget import ParticipationPlan, SiteStanding
from server.ledger_heads import LedgerWitness
from server.store import RunStore
from server.store import schema as S
from veil import protocol as P
from veil.logs import get_logger

log = get_logger("server")


Model = ArrayRecord | ConfigRecord  # plaintext arrays, or the encrypted aggregate (P.encrypted_record)


def array_bytes(arrays: Model) -> int:
    """Bytes of tensor or ciphertext data in a model record (what crosses the wire, headers aside)."""
    if isinstance(arrays, ConfigRecord):
        return P.encrypted_nbytes(arrays)
    return sum(len(a.data) for a in arrays.values())


def model_key(model: Model) -> str:
    return P.ENC_MODEL if isinstance(model, ConfigRecord) else P.ARRAYS


def aggregate_train_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Example-weighted mean loss; ε aggregated with *max* (a mean would hide the worst site)."""
    total = sum(float(P.metric(r, weight_key)) for r in records)
    loss = sum(P.metric(r, P.TRAIN_LOSS) * P.metric(r, weight_key) for r in records) / total
    return MetricRecord({P.TRAIN_LOSS: loss, P.EPSILON: max(P.metric(r, P.EPSILON) for r in records)})


@dataclass
class RoundLog:
    number: int
    started: float = field(default_factory=time.perf_counter)
    sampled: list[int] = field(default_factory=list)
    bytes_down: int = 0
    bytes_up: int = 0
    ok: int = 0
    examples: int = 0
    train_loss: float | None = None
    max_epsilon: float | None = None


class RecordingStrategy(Strategy):
    def __init__(
        self,
        inner: Strategy,
        store: RunStore,
        run_id: int,
        *,
        num_rounds: int,
        min_sites: int,
        on_round: Callable[[dict[str, float | int | None]], None] | None = None,
        plan: ParticipationPlan | None = None,
        cipher: CoordinatorContext | None = None,
        stream_values: int = 0,
        encrypted_train: bool = False,
        encrypted_eval: bool = False,
        weight_norm: float = 0.0,
        rng: str = "os-entropy",
    ) -> None:
        """``encrypted_train``: replies carry encrypted updates of ``stream_values`` values,
        which are checked and added with ``cipher``, never decrypted; ``encrypted_eval``:
        evaluation replies carry encrypted sums, stored as one ciphertext per round; ``rng``:
        the noise source the task asked for (a seeded reply to a private task is rejected)."""
        if cipher is None and (encrypted_train or encrypted_eval):
            raise ValueError("encrypted aggregation or evaluation needs the coordinator's CKKS context")
        self.cipher = cipher
        self.encrypted_train = encrypted_train
        self.stream_values = stream_values
        self.encrypted_eval = encrypted_eval
        self.weight_norm = weight_norm
        self.rng = rng
        self.inner = inner
        self.plan = plan
        self.store = store
        self.run_id = run_id
        self.num_rounds = num_rounds
        self.min_sites = min_sites
        self.on_round = on_round
        self.node_sites: dict[int, str] = {}
        self.round: RoundLog = RoundLog(0)
        self._global_keys: dict[str, tuple[tuple[int, ...], str]] = {}

    # -- delegation ----------------------------------------------------------------------
    def summary(self) -> None:
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: Model, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Train the nodes the participation plan picks (all nodes without a plan)."""
        nodes = self.plan.choose(server_round) if self.plan else sorted(grid.get_node_ids())
        config["server-round"] = server_round
        record = RecordDict({model_key(arrays): arrays, P.TASK: config})
        messages = [Message(content=record, message_type=MessageType.TRAIN, dst_node_id=n) for n in nodes]
        self.round = RoundLog(server_round, sampled=[m.metadata.dst_node_id for m in messages])
        self.round.bytes_down = array_bytes(arrays) * len(messages)
        if isinstance(arrays, ArrayRecord):
            self._global_keys = {k: (tuple(a.shape), a.dtype) for k, a in arrays.items()}
        with self.store.session() as s:
            row = self.store.round_row(s, self.run_id, server_round)
            row.sites_sampled = len(messages)
        return messages

    def configure_evaluate(self, server_round: int, arrays: Model, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Every node evaluates the current global model (plaintext or encrypted)."""
        config["server-round"] = server_round
        messages = [Message(content=RecordDict({model_key(arrays): arrays, P.TASK: config}),
                            message_type=MessageType.EVALUATE, dst_node_id=n)
                    for n in sorted(grid.get_node_ids())]
        self._eval_sampled = [m.metadata.dst_node_id for m in messages]
        self._eval_bytes = array_bytes(arrays)
        self.round.bytes_down += self._eval_bytes * len(messages)
        return messages

    # -- train ---------------------------------------------------------------------------
    def aggregate_train(self, server_round: int, replies: Iterable[Message]  # type: ignore[override]
                        ) -> tuple[Model | None, MetricRecord | None]:
        replies = list(replies)
        valid: list[Message] = []
        streams: list[list[Any]] = []  # parsed ciphertexts of the valid replies (CKKS on)
        per_site_bytes = self.round.bytes_down // max(len(self.round.sampled), 1)
        with self.store.session() as s:
            for msg in self._answered(s, server_round, "train", replies, self.round.sampled,
                                      per_site_bytes):
                node = msg.metadata.src_node_id
                if P.REFUSAL in msg.content:
                    self._refusal(s, server_round, node, msg.content, per_site_bytes)
                    continue
                try:
                    info, report, n = self._check_train_reply(msg.content)
                    parsed = self._parse_update(msg.content)
                except ValueError as err:
                    self._participation(s, server_round, node, "train", "rejected",
                                        reason=str(err), bytes_down=per_site_bytes)
                    log.warning("round %d: rejected reply from node %d: %s", server_round, node, err)
                    continue
                self.node_sites[node] = info.site_id
                up = array_bytes(msg.content[P.ENC_UPDATE if self.encrypted_train else P.ARRAYS])  # type: ignore[arg-type]
                site = self.store.site_row(s, self.run_id, info.site_id)
                site.num_train, site.num_test = n, info.num_test
                site.device, site.delta = info.device, report.delta
                s.add(S.Participation(
                    run_id=self.run_id, round_number=server_round, site_id=site.id, phase="train",
                    status="ok", num_examples=n, seconds=info.seconds,
                    bytes_down=per_site_bytes, bytes_up=up,
                ))
                ev, life = report.event, report.lifetime
                assert life is not None and life.head is not None  # checked in _check_train_reply
                site.dataset_id = life.dataset_id
                LedgerWitness(s, self.run_id).advance(info.site_id, life.head)
                s.add(S.PrivacyEvent(
                    run_id=self.run_id, round_number=server_round, site_id=site.id,
                    noise_multiplier=ev.noise_multiplier, sample_rate=ev.sample_rate,
                    steps=ev.steps, max_grad_norm=ev.max_grad_norm, delta=report.delta,
                    sampling=report.sampling, accountant=report.accountant,
                    accountant_version=report.accountant_version, reported_epsilon=report.epsilon,
                    dataset_id=life.dataset_id, ledger_entry=life.entry_id,
                    lifetime_epsilon=life.epsilon, lifetime_delta=life.delta,
                    ledger_accountant=life.accountant, epsilon_cap=life.cap, rng=report.rng,
                    ledger_id=life.head.ledger_id, ledger_seq=life.head.seq,
                ))
                if self.plan:
                    self.plan.trained(node)
                for name in (P.TRAIN_LOSS, P.EPSILON):
                    s.add(S.Metric(run_id=self.run_id, round_number=server_round, site_id=site.id,
                                   phase="train", name=name, value=P.metric(msg.content, name)))
                self.round.bytes_up += up
                self.round.examples += n
                valid.append(msg)
                if parsed is not None:
                    streams.append(parsed)
        self.round.ok = len(valid)
        if len(valid) < self.min_sites:
            log.warning("round %d: %d usable replies, fewer than min_sites=%d; model kept",
                        server_round, len(valid), self.min_sites)
            return None, None
        arrays: Model | None
        metrics: MetricRecord | None
        if self.cipher is not None and self.encrypted_train:
            arrays = P.encrypted_record(self.cipher.add(streams))
            metrics = aggregate_train_metrics([m.content for m in valid], P.NUM_EXAMPLES)
            log.info("round %d: added %d encrypted updates (%d bytes); the sum stays encrypted",
                     server_round, len(streams), array_bytes(arrays))
        else:
            arrays, metrics = self.inner.aggregate_train(server_round, valid)
        if metrics is not None:
            self.round.train_loss = float(metrics[P.TRAIN_LOSS])  # type: ignore[arg-type]
            self.round.max_epsilon = float(metrics[P.EPSILON])  # type: ignore[arg-type]
        return arrays, metrics

    def _parse_update(self, content: RecordDict) -> list[Any] | None:
        """CKKS on: the site's encrypted stream, checked (MalformedCiphertextError otherwise)."""
        if self.cipher is None or not self.encrypted_train:
            return None
        return self.cipher.parse(P.encrypted_from(content, P.ENC_UPDATE), self.stream_values)

    def _check_train_reply(self, content: RecordDict) -> tuple[P.SiteInfo, P.PrivacyReport, int]:
        info = P.site_info(content)
        arrays = content.get(P.ARRAYS)
        if self.encrypted_train:
            if arrays is not None:
                raise ValueError("plaintext update in an encrypted run: not aggregated")
        elif not isinstance(arrays, ArrayRecord):
            raise ValueError("reply has no arrays record")
        else:
            got = {k: (tuple(a.shape), a.dtype) for k, a in arrays.items()}
            if got != self._global_keys:
                raise ValueError("arrays do not match the global model (keys, shapes or dtypes differ)")
        n = P.metric(content, P.NUM_EXAMPLES)
        if n != int(n) or n < 1:
            raise ValueError(f"num-examples must be a positive integer, got {n}")
        for key in (P.TRAIN_LOSS, P.EPSILON):
            P.metric(content, key)
        privacy = content.get(P.PRIVACY)
        if not isinstance(privacy, ConfigRecord):
            raise ValueError("reply has no privacy record: a site must report the mechanism it ran")
        report = P.PrivacyReport.from_config(privacy)
        if report.lifetime is None:
            raise ValueError("privacy record has no lifetime spend: the site must keep a privacy ledger")
        if report.rng != self.rng and report.rng == "seeded":
            raise ValueError("the site drew its DP noise from the seed (reproducible, not private), but this "
                             "run asked for noise from each site's own entropy: not aggregated")
        return info, report, int(n)

    def _refusal(self, s: Session, server_round: int, node: int, content: RecordDict,
                 bytes_down: int) -> None:
        """A site said no before training: record its code and stop sampling it."""
        try:
            rec = content[P.REFUSAL]
            if not isinstance(rec, ConfigRecord):
                raise ValueError("refusal is not a config record")
            refusal = P.Refusal.from_config(rec)
            self.node_sites[node] = P.site_info(content).site_id
        except (ValueError, KeyError) as err:
            self._participation(s, server_round, node, "train", "rejected",
                                reason=f"malformed refusal: {err}", bytes_down=bytes_down)
            return
        self._participation(s, server_round, node, "train", "refused", reason=str(refusal),
                            bytes_down=bytes_down, code=refusal.code)
        log.warning("round %d: %s refused: %s", server_round, self.node_sites[node], refusal)
        if self.plan:
            self.plan.refused(node, str(refusal))

    def record_preflight(self, standings: dict[int, SiteStanding]) -> None:
        """Put each site's budget answer on the record (round 0, phase ``preflight``)."""
        with self.store.session() as s:
            for node, st in standings.items():
                if st.status is None:
                    self._participation(s, 0, node, "preflight", "no-reply" if "timeout" in
                                        (st.failure or "") else "failed",
                                        reason=st.failure or "no answer", bytes_down=0)
                    continue
                b = st.status
                self.node_sites[node] = b.site_id
                site = self.store.site_row(s, self.run_id, b.site_id)
                site.dataset_id, site.epsilon_cap = b.dataset_id, b.cap
                site.budget_delta, site.budget_accountant = b.delta, b.accountant
                site.spent_before, site.projected_epsilon = b.spent, b.projected
                site.affordable_rounds, site.num_train = b.affordable_rounds, b.num_examples
                if b.ledger is not None:
                    site.ledger_id, site.ledger_seq = b.ledger.ledger_id, b.ledger.seq
                if st.rejection is not None:
                    self._participation(s, 0, node, "preflight", "rejected", reason=str(st.rejection),
                                        bytes_down=0, code=st.rejection.code)
                elif b.refusal is not None:
                    self._participation(s, 0, node, "preflight", "refused", reason=str(b.refusal),
                                        bytes_down=0, code=b.refusal.code)
                else:
                    s.add(S.Participation(run_id=self.run_id, round_number=0, site_id=site.id,
                                          phase="preflight", status="ok", bytes_down=0))

    # -- evaluate ------------------------------------------------------------------------
    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        if self.encrypted_eval:
            self._aggregate_encrypted_evaluate(server_round, list(replies))
            return None
        replies = list(replies)
        valid: list[Message] = []
        with self.store.session() as s:
            for msg in self._answered(s, server_round, "evaluate", replies, self._eval_sampled,
                                      self._eval_bytes):
                node = msg.metadata.src_node_id
                try:
                    info = P.site_info(msg.content)
                    n = P.metric(msg.content, P.NUM_EXAMPLES)
                    loss, acc = P.metric(msg.content, P.EVAL_LOSS), P.metric(msg.content, P.EVAL_ACC)
                    if n < 1 or not 0.0 <= acc <= 1.0:
                        raise ValueError(f"implausible evaluation (n={n}, accuracy={acc})")
                except ValueError as err:
                    self._participation(s, server_round, node, "evaluate", "rejected",
                                        reason=str(err), bytes_down=self._eval_bytes)
                    continue
                self.node_sites[node] = info.site_id
                site = self.store.site_row(s, self.run_id, info.site_id)
                site.num_test = int(n)
                s.add(S.Participation(
                    run_id=self.run_id, round_number=server_round, site_id=site.id,
                    phase="evaluate", status="ok", num_examples=int(n), seconds=info.seconds,
                    bytes_down=self._eval_bytes,
                ))
                for name, value in ((P.EVAL_LOSS, loss), (P.EVAL_ACC, acc)):
                    s.add(S.Metric(run_id=self.run_id, round_number=server_round, site_id=site.id,
                                   phase="evaluate", name=name, value=value))
                valid.append(msg)
        metrics = self.inner.aggregate_evaluate(server_round, valid) if valid else None
        self._close_round(server_round, metrics)
        return metrics

    def _aggregate_encrypted_evaluate(self, server_round: int, replies: list[Message]) -> None:
        """Sum the sites' encrypted evaluation sums; store the ciphertext; read nothing."""
        assert self.cipher is not None
        streams: list[list[Any]] = []
        with self.store.session() as s:
            for msg in self._answered(s, server_round, "evaluate", replies, self._eval_sampled,
                                      self._eval_bytes):
                node = msg.metadata.src_node_id
                try:
                    info = P.site_info(msg.content)
                    if P.METRICS in msg.content:
                        raise ValueError("plaintext metrics in an encrypted evaluation: not used")
                    enc = P.encrypted_from(msg.content, P.ENC_METRICS)
                    streams.append(self.cipher.parse(enc, len(P.EVAL_SUMS)))
                except ValueError as err:
                    self._participation(s, server_round, node, "evaluate", "rejected",
                                        reason=str(err), bytes_down=self._eval_bytes)
                    log.warning("round %d: rejected evaluation from node %d: %s", server_round, node, err)
                    continue
                self.node_sites[node] = info.site_id
                site = self.store.site_row(s, self.run_id, info.site_id)
                s.add(S.Participation(
                    run_id=self.run_id, round_number=server_round, site_id=site.id, phase="evaluate",
                    status="ok", seconds=info.seconds, bytes_down=self._eval_bytes, bytes_up=enc.nbytes,
                ))
            if streams:
                total = self.cipher.add(streams)
                (blob,) = total.chunks
                s.add(S.EncryptedMetric(
                    run_id=self.run_id, round_number=server_round, phase="evaluate",
                    names=",".join(P.EVAL_SUMS), key_id=total.key_id, weight_norm=self.weight_norm,
                    sites=len(streams), ciphertext=blob, sha256=hashlib.sha256(blob).hexdigest(),
                ))
        log.info("round %d evaluation: encrypted (%d sites summed; readable only with the key set's "
                 "secret key)", server_round, len(streams))
        self._close_round(server_round, None, encrypted=bool(streams))

    def _close_round(self, server_round: int, eval_metrics: MetricRecord | None,
                     encrypted: bool = False) -> None:
        r = self.round
        seconds = time.perf_counter() - r.started
        acc = float(eval_metrics[P.EVAL_ACC]) if eval_metrics else None  # type: ignore[arg-type]
        loss = float(eval_metrics[P.EVAL_LOSS]) if eval_metrics else None  # type: ignore[arg-type]
        with self.store.session() as s:
            row = self.store.round_row(s, self.run_id, server_round)
            row.status = "completed" if r.ok >= self.min_sites else "insufficient"
            row.ended_at, row.seconds = datetime.now(UTC), seconds
            row.sites_ok, row.examples = r.ok, r.examples
            row.bytes_down, row.bytes_up = r.bytes_down, r.bytes_up
            for name, value in ((P.TRAIN_LOSS, r.train_loss), (P.EPSILON, r.max_epsilon),
                                (P.EVAL_LOSS, loss), (P.EVAL_ACC, acc)):
                if value is not None:
                    s.add(S.Metric(run_id=self.run_id, round_number=server_round, site_id=None,
                                   phase="aggregate", name=name, value=value))
        if self.on_round:
            self.on_round({"round": server_round, "rounds": self.num_rounds, "accuracy": acc,
                           "loss": loss, "max_epsilon": r.max_epsilon, "sites_ok": r.ok,
                           "sites_sampled": len(r.sampled), "seconds": seconds,
                           "encrypted": int(encrypted)})

    def _answered(self, s: Session, server_round: int, phase: str, replies: list[Message],
                  sampled: list[int], bytes_down: int) -> list[Message]:
        """Record error replies and silent sites; return the replies that carry content."""
        answered = {m.metadata.src_node_id for m in replies}
        for msg in replies:
            if msg.has_error():
                self._participation(s, server_round, msg.metadata.src_node_id, phase, "failed",
                                    reason=msg.error.reason or "error reply without a reason",
                                    bytes_down=bytes_down)
        for node in sampled:
            if node not in answered:
                self._participation(s, server_round, node, phase, "no-reply",
                                    reason="no reply before the round timeout", bytes_down=bytes_down)
        return [m for m in replies if not m.has_error()]

    def _participation(self, s: Session, server_round: int, node: int, phase: str, status: str,
                       *, reason: str, bytes_down: int, code: str | None = None) -> None:
        key = self.node_sites.get(node, f"node-{node}")
        site = self.store.site_row(s, self.run_id, key)
        s.add(S.Participation(run_id=self.run_id, round_number=server_round, site_id=site.id,
                              phase=phase, status=status, reason=reason[:2000], reason_code=code,
                              bytes_down=bytes_down))
