"""RecordingStrategy: Flower's strategy shape, with every reply checked and put on the record.

It wraps any Flower ``Strategy`` (FedAvg by default) the way Flower's own DP wrappers do
(``DifferentialPrivacyServerSideFixedClipping(strategy, ...)``): the inner strategy
aggregates plaintext updates; this layer picks who trains (the participation plan), checks
each reply at the edge (``server.checks``), writes the round (``server.rounds``) and, with
CKKS on, adds the encrypted updates itself, never decrypting them.

Why it is not a ``Strategy`` subclass, and why the round loop is Veil's own
(``server.coordinator.train_rounds``): with CKKS aggregation the global model is an
encrypted stream (a ``ConfigRecord``), which ``Strategy.aggregate_train`` cannot return and
``Strategy.start`` cannot carry. The method names and arguments are Flower's, so the loop
reads like ``Strategy.start``; it just does not lie about the types.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from sqlalchemy.orm import Session

from privacy.ckks import CoordinatorContext, flatten, unflatten
from privacy.randomness import RngMode
from server import checks, robust
from server.budget import ParticipationPlan, with_site_rounds
from server.checks import Layout, Model, array_bytes, model_key
from server.robust import RobustRule
from server.rounds import RoundWriter
from veil import protocol as P
from veil.logs import get_logger
from veil.names import Phase
from veil.server_opt import ServerOptimizer, ServerState, server_step

log = get_logger("server")
EVALUATE_ALL_UP_TO = 50  # sites: a larger federation evaluates on each round's sampled sites only


class RecordingStrategy:
    """Plan, check, record and aggregate one run's rounds around an inner Flower strategy."""

    def __init__(
        self,
        inner: Strategy,
        writer: RoundWriter,
        *,
        plan: ParticipationPlan | None = None,
        cipher: CoordinatorContext | None = None,
        stream_values: int = 0,
        encrypted_train: bool = False,
        encrypted_eval: bool = False,
        weight_norm: float = 0.0,
        rng: RngMode = "os-entropy",
        task: P.TrainTask | None = None,
        robust: RobustRule | None = None,
        optimizer: ServerOptimizer | None = None,
    ) -> None:
        """``encrypted_train``: replies carry encrypted updates of ``stream_values`` values,
        which are checked and added with ``cipher``, never decrypted; ``encrypted_eval``:
        evaluation replies carry encrypted sums, stored as one ciphertext per round; ``rng``:
        the noise source the task asked for (a seeded reply to a private task is rejected);
        ``task``: what every site was asked to run (its mechanism is checked against it).
        With CKKS on, every task carries ``P.ENC_RUN``, this run's id plus a fresh nonce: each
        encrypted reply's integrity tag must be bound to it, the round and the node's site.
        ``robust``: a robust aggregation rule for plaintext updates (``server.robust``).
        ``optimizer``: the server step applied to the round's mean (``veil.server_opt``); with
        CKKS on, the sites apply it and carry its state in the encrypted stream, so here it only
        sizes the stream."""
        if cipher is None and (encrypted_train or encrypted_eval):
            raise ValueError("encrypted aggregation or evaluation needs the coordinator's CKKS context")
        if robust is not None and robust.rule != "none" and encrypted_train:
            raise ValueError("robust aggregation reads every update: it cannot run on encrypted updates")
        self.inner = inner
        self.writer = writer
        self.plan = plan
        self.cipher = cipher
        self.stream_values = stream_values
        self.encrypted_train = encrypted_train
        self.encrypted_eval = encrypted_eval
        self.weight_norm = weight_norm
        self.rng = rng
        self.task = task
        self.robust = robust if robust is not None and robust.rule != "none" else None
        self.optimizer = optimizer or ServerOptimizer()
        self._opt_state: ServerState | None = None  # plaintext runs: the server optimiser's state
        self.rounds_aggregated = 0  # rounds with enough usable replies to move the model
        self._sent: ArrayRecord | None = None  # the model this round's sites were sent
        self._layout: Layout = {}
        self._eval_sampled: list[int] = []
        self._eval_bytes = 0
        self._num_test: dict[int, int] = {}  # node -> test records its accepted training reply reported
        self.reply_run = f"run-{writer.run_id}:{secrets.token_hex(8)}"  # no reply of another run verifies

    def _declared(self, node: int) -> P.BudgetStatus | None:
        """What this node answered at the pre-flight (None without a plan or an answer): the site
        every reply from it must name, and the counts that bound its weight."""
        standing = self.plan.standings.get(node) if self.plan else None
        return standing.status if standing is not None else None

    def _preflight_site(self, node: int) -> str | None:
        """The site this node named at the pre-flight (its Flower node, authenticated when deployed):
        the site an encrypted reply's tag must be bound to; None without a plan (then its own claim)."""
        standing = self.plan.standings.get(node) if self.plan else None
        return standing.status.site_id if standing is not None and standing.status is not None else None

    def _site_order(self, msg: Message) -> str:
        """Replies are aggregated in the order of their sites' ids (so a seeded run replays exactly)."""
        return self.writer.site_of(msg.metadata.src_node_id)

    # -- train ---------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: Model, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Train the nodes the participation plan picks (all nodes without a plan)."""
        nodes = self.plan.choose(server_round) if self.plan else sorted(grid.get_node_ids())
        config["server-round"] = server_round
        if self.cipher is not None:
            config[P.ENC_RUN] = self.reply_run
        record = RecordDict({model_key(arrays): arrays, P.TASK: config})
        rounds = self.plan.site_rounds() if self.plan else {}  # refuse mode: each site's planned rounds
        messages = [Message(content=RecordDict({model_key(arrays): arrays,
                                                P.TASK: with_site_rounds(config, rounds[n])}) if n in rounds
                            else record, message_type=MessageType.TRAIN, dst_node_id=n) for n in nodes]
        if isinstance(arrays, ArrayRecord):
            self._layout = checks.layout(arrays)
            self._sent = arrays
            if self._opt_state is None and self.optimizer.stateful and not self.encrypted_train:
                self._opt_state = ServerState.initial(self.optimizer, flatten(_ordered(arrays)))
        self.writer.open_round(server_round, [m.metadata.dst_node_id for m in messages],
                               array_bytes(arrays) * len(messages))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[Model | None, MetricRecord | None]:
        """Check and record every reply; aggregate the usable ones (None: fewer than min_sites)."""
        w = self.writer
        valid: list[Message] = []
        streams: list[list[Any]] = []  # parsed ciphertexts of the valid replies (CKKS on)
        per_site_bytes = w.round.bytes_down // max(len(w.round.sampled), 1)
        with w.store.session() as s:
            for msg in w.answered(s, server_round, "train", list(replies), w.round.sampled, per_site_bytes):
                node = msg.metadata.src_node_id
                why = self._refused(s, server_round, node, msg.content, "train", per_site_bytes)
                if why is not None:
                    if self.plan:
                        self.plan.refused(node, why)
                    continue
                try:
                    declared = self._declared(node)
                    site_id = declared.site_id if declared else checks.reply_site(msg.content).site_id
                    reply = checks.check_train_reply(
                        msg.content, encrypted=self.encrypted_train, expected=self._layout, rng=self.rng,
                        task=self.task, declared=declared, history=w.history(s, server_round, site_id))
                    if self.cipher is not None and self.encrypted_train:
                        streams.append(checks.parse_update(
                            msg.content, self.cipher, self.stream_values, run=self.reply_run,
                            server_round=server_round, site_id=self._preflight_site(node)))
                except ValueError as err:
                    w.participation(s, server_round, node, "train", "rejected", reason=str(err),
                                    bytes_down=per_site_bytes, code=checks.rejection_code(err))
                    log.warning("round %d: rejected reply from node %d: %s", server_round, node, err)
                    continue
                if reply.info.num_test > 0:  # what its evaluations must count (checks.check_evaluate_reply)
                    self._num_test[node] = reply.info.num_test
                reported = (P.TRAIN_LOSS, P.EPSILON) if reply.report is not None else (P.TRAIN_LOSS,)
                w.trained(s, server_round, node, reply, per_site_bytes,
                          {name: P.metric(msg.content, name) for name in reported})
                if self.plan:
                    self.plan.trained(node)
                valid.append(msg)
        w.round.ok = len(valid)
        if len(valid) < w.min_sites:
            log.warning("round %d: %d usable replies, fewer than min_sites=%d; model kept",
                        server_round, len(valid), w.min_sites)
            return None, None
        arrays: Model | None
        metrics: MetricRecord | None
        if self.cipher is not None and self.encrypted_train:
            arrays = P.encrypted_record(self.cipher.add(streams))
            metrics = checks.aggregate_train_metrics([m.content for m in valid], P.NUM_EXAMPLES)
            log.info("round %d: added %d encrypted updates (%d bytes); the sum stays encrypted",
                     server_round, len(streams), array_bytes(arrays))
        else:  # in site order, not arrival order: float sums then do not depend on who answered first
            ordered = sorted(valid, key=self._site_order)
            arrays, metrics = self.inner.aggregate_train(server_round, ordered)
            if self.robust is not None and self._sent is not None:
                arrays = self._robust_aggregate(server_round, ordered, self._sent, self.robust)
            if isinstance(arrays, ArrayRecord) and not checks.finite(arrays):  # cannot happen after the checks
                log.error("round %d: the aggregate is not finite; model kept", server_round)
                return None, None
            if isinstance(arrays, ArrayRecord) and self._opt_state is not None:
                arrays = self._server_step(server_round, arrays, self._opt_state)
                if arrays is None:
                    return None, None
        self.rounds_aggregated += 1
        if metrics is not None:
            w.round.train_loss = float(metrics[P.TRAIN_LOSS])  # type: ignore[arg-type]
            if P.EPSILON in metrics:  # none in a non-private run
                w.round.max_epsilon = float(metrics[P.EPSILON])  # type: ignore[arg-type]
        return arrays, metrics

    def _server_step(self, server_round: int, mean: ArrayRecord, state: ServerState) -> ArrayRecord | None:
        """The new model from the round's mean by the server optimiser; its state moves only when
        the step's result is finite (otherwise the model and the state stay as they were)."""
        layers = _ordered(mean)
        x, new_state = server_step(self.optimizer, state, flatten(layers))
        if not np.all(np.isfinite(x)):
            log.error("round %d: the %s step is not finite; model kept", server_round, self.optimizer.rule)
            return None
        self._opt_state = new_state
        values = unflatten(x, layers)
        return ArrayRecord(array_dict={k: Array(v) for k, v in zip(list(mean), values, strict=True)})

    def _robust_aggregate(self, server_round: int, replies: list[Message], sent: ArrayRecord,
                          rule: RobustRule) -> ArrayRecord:
        """The round's model by ``rule`` instead of FedAvg's weighted mean (metrics stay FedAvg's)."""
        keys = list(sent.keys())
        reference = [sent[k].numpy() for k in keys]
        updates = []
        for msg in replies:
            record = msg.content[P.ARRAYS]
            assert isinstance(record, ArrayRecord)
            updates.append([record[k].numpy() for k in keys])
        if rule.rule == "trimmed-mean":
            merged = robust.trimmed_mean(updates, rule.trim_fraction)
            log.info("round %d: trimmed mean of %d updates (%d dropped at each end of every coordinate)",
                     server_round, len(updates), robust.trimmed_count(len(updates), rule.trim_fraction))
        else:
            assert rule.max_update_norm is not None
            weights = [float(P.metric(m.content, P.NUM_EXAMPLES)) for m in replies]
            total = sum(weights)
            merged = [np.zeros_like(r, dtype=np.float64) for r in reference]
            for msg, update, weight in zip(replies, updates, weights, strict=True):
                bounded, norm = robust.bound_norm(update, reference, rule.max_update_norm)
                if norm > rule.max_update_norm:
                    log.info("round %d: %s's update norm %.4g bounded to %.4g", server_round,
                             P.site_info(msg.content).site_id, norm, rule.max_update_norm)
                for acc, layer in zip(merged, bounded, strict=True):
                    acc += (weight / total) * layer
            merged = [m.astype(r.dtype) for m, r in zip(merged, reference, strict=True)]
        return ArrayRecord(array_dict={k: Array(v) for k, v in zip(keys, merged, strict=True)})

    # -- evaluate ------------------------------------------------------------------------
    def configure_evaluate(self, server_round: int, arrays: Model, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """The current global model evaluated (plaintext or encrypted) by every node, or, in a
        federation of more than ``EVALUATE_ALL_UP_TO`` sites, by the sites sampled to train this
        round (their held-out test sets): a round then costs its sampled sites, not all of them.
        Each evaluating site has its own ``participation`` row, so the record says who evaluated."""
        config["server-round"] = server_round
        if self.cipher is not None:
            config[P.ENC_RUN] = self.reply_run
        nodes = sorted(grid.get_node_ids())
        if self.plan is not None and len(nodes) > EVALUATE_ALL_UP_TO:
            nodes = sorted(self.writer.round.sampled)
            self.writer.round.evaluation_sampled = True
        messages = [Message(content=RecordDict({model_key(arrays): arrays, P.TASK: config}),
                            message_type=MessageType.EVALUATE, dst_node_id=n) for n in nodes]
        self._eval_sampled = [m.metadata.dst_node_id for m in messages]
        self._eval_bytes = array_bytes(arrays)
        self.writer.round.bytes_down += self._eval_bytes * len(messages)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Check and record evaluations; the inner strategy averages them; the round closes."""
        if self.encrypted_eval:
            self._aggregate_encrypted_evaluate(server_round, list(replies))
            return None
        w = self.writer
        valid: list[Message] = []
        with w.store.session() as s:
            for msg in w.answered(s, server_round, "evaluate", list(replies), self._eval_sampled,
                                  self._eval_bytes):
                node = msg.metadata.src_node_id
                if self._refused(s, server_round, node, msg.content, "evaluate", self._eval_bytes) is not None:
                    continue
                try:
                    reply = checks.check_evaluate_reply(msg.content, declared=self._declared(node),
                                                        num_test=self._num_test.get(node, 0))
                except ValueError as err:
                    w.participation(s, server_round, node, "evaluate", "rejected", reason=str(err),
                                    bytes_down=self._eval_bytes, code=checks.rejection_code(err))
                    log.warning("round %d: rejected evaluation from node %d: %s", server_round, node, err)
                    continue
                w.evaluated(s, server_round, node, reply, self._eval_bytes)
                valid.append(msg)
        valid.sort(key=self._site_order)
        metrics = self.inner.aggregate_evaluate(server_round, valid) if valid else None
        w.close_round(server_round,
                      float(metrics[P.EVAL_ACC]) if metrics else None,  # type: ignore[arg-type]
                      float(metrics[P.EVAL_LOSS]) if metrics else None)  # type: ignore[arg-type]
        return metrics

    def _refused(self, s: Session, server_round: int, node: int, content: RecordDict, phase: Phase,
                 bytes_down: int) -> str | None:
        """Record a site's refusal (or a malformed one); its reason, or None when the reply is not one."""
        if P.REFUSAL not in content:
            return None
        try:
            refusal, site_id = checks.check_refusal(content)
        except ValueError as err:
            self.writer.participation(s, server_round, node, phase, "rejected", reason=str(err),
                                      bytes_down=bytes_down, code=checks.rejection_code(err))
            return str(err)
        self.writer.refused(s, server_round, node, site_id, refusal, bytes_down, phase=phase)
        log.warning("round %d %s: %s refused: %s", server_round, phase, site_id, refusal)
        return str(refusal)

    def _aggregate_encrypted_evaluate(self, server_round: int, replies: list[Message]) -> None:
        """Sum the sites' encrypted evaluation sums; store the ciphertext; read nothing."""
        assert self.cipher is not None
        w = self.writer
        streams: list[list[Any]] = []
        with w.store.session() as s:
            for msg in w.answered(s, server_round, "evaluate", replies, self._eval_sampled, self._eval_bytes):
                node = msg.metadata.src_node_id
                if self._refused(s, server_round, node, msg.content, "evaluate", self._eval_bytes) is not None:
                    continue
                try:
                    info, enc, parsed = checks.check_encrypted_evaluate_reply(
                        msg.content, self.cipher, run=self.reply_run, server_round=server_round,
                        site_id=self._preflight_site(node))
                except ValueError as err:
                    w.participation(s, server_round, node, "evaluate", "rejected", reason=str(err),
                                    bytes_down=self._eval_bytes, code=checks.rejection_code(err))
                    log.warning("round %d: rejected evaluation from node %d: %s", server_round, node, err)
                    continue
                streams.append(parsed)
                w.evaluated_encrypted(s, server_round, node, info, enc, self._eval_bytes)
            if streams:
                w.encrypted_metrics(s, server_round, self.cipher.add(streams), len(streams), self.weight_norm)
        log.info("round %d evaluation: encrypted (%d sites summed; readable only with the key set's "
                 "secret key)", server_round, len(streams))
        w.close_round(server_round, None, None, encrypted=bool(streams))


def _ordered(arrays: ArrayRecord) -> list[np.ndarray]:
    """The record's layers in their order (the model's ``state_dict`` order)."""
    return [arrays[k].numpy() for k in arrays]
