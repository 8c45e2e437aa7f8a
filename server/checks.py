"""Checks on what a site sends back: pure functions, no store, no Flower grid.

Each takes a reply's content and what the coordinator expects, and returns a typed record of
the reply or raises ``ValueError`` with the reason that goes on the record. Nothing here
decides what happens next (``server.strategy``) or writes anything (``server.rounds``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from privacy.accounting import ACCOUNTANTS, epsilon
from privacy.ckks import CoordinatorContext, EncryptedVector, ReplyBinding, ReplyIntegrityError
from privacy.events import DpSgdEvent
from privacy.randomness import RngMode
from veil import protocol as P

Model = ArrayRecord | ConfigRecord  # plaintext arrays, or the encrypted aggregate (P.encrypted_record)
Layout = dict[str, tuple[tuple[int, ...], str]]  # tensor name -> (shape, dtype) of the global model


def array_bytes(arrays: Model) -> int:
    """Bytes of tensor or ciphertext data in a model record (what crosses the wire, headers aside)."""
    if isinstance(arrays, ConfigRecord):
        return P.encrypted_nbytes(arrays)
    return sum(len(a.data) for a in arrays.values())


def model_key(model: Model) -> str:
    """The record key a model travels under (plaintext arrays or the encrypted stream)."""
    return P.ENC_MODEL if isinstance(model, ConfigRecord) else P.ARRAYS


def layout(arrays: ArrayRecord) -> Layout:
    """Names, shapes and dtypes of a model record: what every update must match."""
    return {k: (tuple(a.shape), a.dtype) for k, a in arrays.items()}


def aggregate_train_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Example-weighted mean loss; ε aggregated with *max* (a mean would hide the worst site)."""
    total = sum(float(P.metric(r, weight_key)) for r in records)
    loss = sum(P.metric(r, P.TRAIN_LOSS) * P.metric(r, weight_key) for r in records) / total
    return MetricRecord({P.TRAIN_LOSS: loss, P.EPSILON: max(P.metric(r, P.EPSILON) for r in records)})


@dataclass(frozen=True)
class TrainReply:
    """A training reply that passed every check."""

    info: P.SiteInfo
    report: P.PrivacyReport
    lifetime: P.LifetimeSpend
    head: P.LedgerHead
    num_examples: int
    update_bytes: int


MAX_WEIGHT = 1e6  # no trained weight comes near this; a reply that does is poisoning the average


def finite(arrays: ArrayRecord) -> bool:
    """Every value of every array is a finite number."""
    return all(np.isfinite(a.numpy()).all() for a in arrays.values())


def _finite_arrays(arrays: ArrayRecord) -> None:
    for name, array in arrays.items():
        values = array.numpy()
        if values.dtype.kind not in "fiu":
            raise ValueError(f"array {name[:60]!r} is not numeric")
        if values.size and not (np.isfinite(values).all() and np.abs(values).max() <= MAX_WEIGHT):
            raise ValueError(f"array {name[:60]!r} holds NaN, ±inf or values beyond ±{MAX_WEIGHT:g}: "
                             "not aggregated")


def _same(a: float, b: float, rel: float = 1e-6) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)


def _check_mechanism(report: P.PrivacyReport, task: P.TrainTask | None, declared: P.BudgetStatus | None,
                     history: Sequence[DpSgdEvent]) -> None:
    """The mechanism is the one the task asked for and the site declared at the pre-flight, and the
    reported ε is not below what the site's events in this run imply."""
    ev = report.event
    if task is not None:
        if not _same(ev.max_grad_norm, task.max_grad_norm):
            raise ValueError(f"clipping norm {ev.max_grad_norm:g} is not the task's {task.max_grad_norm:g}")
        if task.noise_multiplier > 0 and ev.noise_multiplier < task.noise_multiplier * (1 - 1e-9):
            raise ValueError(f"σ {ev.noise_multiplier:g} is below the task's {task.noise_multiplier:g}")
    if declared is not None:
        same = (_same(ev.noise_multiplier, declared.noise_multiplier)
                and _same(ev.sample_rate, declared.sample_rate) and ev.steps == declared.steps_per_round)
        if not same:
            raise ValueError(f"ran σ={ev.noise_multiplier:g}, q={ev.sample_rate:g}, {ev.steps} steps, but "
                             f"declared σ={declared.noise_multiplier:g}, q={declared.sample_rate:g}, "
                             f"{declared.steps_per_round} steps at the pre-flight")
    if report.accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant {report.accountant[:20]!r} is not one of {', '.join(ACCOUNTANTS)}")
    implied = epsilon([*history, ev], report.delta, report.accountant)  # type: ignore[arg-type]
    if report.epsilon < implied * (1 - 1e-6) - 1e-9:
        raise ValueError(f"reports run ε {report.epsilon:.4g}, below the {implied:.4g} its events imply")
    life = report.lifetime
    if life is not None and life.cap is not None and life.epsilon > life.cap * (1 + 1e-9):
        raise ValueError(f"reports lifetime ε {life.epsilon:.4g} above its own cap {life.cap:g}")


def check_train_reply(content: RecordDict, *, encrypted: bool, expected: Layout, rng: RngMode,
                      task: P.TrainTask | None = None, declared: P.BudgetStatus | None = None,
                      history: Sequence[DpSgdEvent] = ()) -> TrainReply:
    """A site's training reply: its update matches the global model and is finite (or is encrypted
    when the run is), its example count is at most what it declared at the pre-flight, it reports
    the mechanism it was asked for and declared, an ε no lower than its events imply, and its
    ledger's spend; and its noise source is the one the run asked for (a seeded reply to a private
    run is refused). ``task``, ``declared`` and ``history`` (the site's earlier events in this
    run) sharpen the checks when the coordinator has them."""
    info = P.site_info(content)
    arrays = content.get(P.ARRAYS)
    if encrypted:
        if arrays is not None:
            raise ValueError("plaintext update in an encrypted run: not aggregated")
    elif not isinstance(arrays, ArrayRecord):
        raise ValueError("reply has no arrays record")
    elif layout(arrays) != expected:
        raise ValueError("arrays do not match the global model (keys, shapes or dtypes differ)")
    else:
        _finite_arrays(arrays)
    n = P.metric(content, P.NUM_EXAMPLES)
    if not math.isfinite(n) or n != int(n) or n < 1:
        raise ValueError(f"num-examples must be a positive integer, got {n}")
    if declared is not None and n > declared.num_examples:
        raise ValueError(f"num-examples {int(n)} is more than the {declared.num_examples} the site declared")
    for key in (P.TRAIN_LOSS, P.EPSILON):
        value = P.metric(content, key)
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{key} must be a finite number >= 0, got {value}")
    privacy = content.get(P.PRIVACY)
    if not isinstance(privacy, ConfigRecord):
        raise ValueError("reply has no privacy record: a site must report the mechanism it ran")
    report = P.PrivacyReport.from_config(privacy)
    life = report.lifetime
    if life is None:
        raise ValueError("privacy record has no lifetime spend: the site must keep a privacy ledger")
    if life.head is None:
        raise ValueError("lifetime spend has no ledger head: the site must report its ledger's position")
    if report.rng != rng and report.rng == "seeded":
        raise ValueError("the site drew its DP noise from the seed (reproducible, not private), but this "
                         "run asked for noise from each site's own entropy: not aggregated")
    _check_mechanism(report, task, declared, history)
    update = content[P.ENC_UPDATE if encrypted else P.ARRAYS]
    return TrainReply(info, report, life, life.head, int(n), array_bytes(update))  # type: ignore[arg-type]


def parse_update(content: RecordDict, cipher: CoordinatorContext, stream_values: int, *, run: str,
                 server_round: int, site_id: str | None = None) -> list[Any]:
    """An encrypted update's ciphertexts, checked to carry the key set's integrity tag for ``run``,
    ``server_round`` and ``site_id`` (default: the site the reply names) and to hold
    ``stream_values`` values under the run's key."""
    site = site_id if site_id is not None else P.site_info(content).site_id
    return cipher.parse(P.encrypted_from(content, P.ENC_UPDATE), stream_values,
                        tag=P.reply_tag(content, P.ENC_UPDATE),
                        binding=ReplyBinding(run, server_round, site, "update"))


def rejection_code(err: ValueError) -> str | None:
    """The machine-readable reason code a rejected reply is recorded with (None: see the sentence)."""
    return ReplyIntegrityError.code if isinstance(err, ReplyIntegrityError) else None


def check_refusal(content: RecordDict) -> tuple[P.Refusal, str]:
    """A site's refusal to train and the site's id (ValueError if it is malformed)."""
    try:
        rec = content[P.REFUSAL]
        if not isinstance(rec, ConfigRecord):
            raise ValueError("refusal is not a config record")
        return P.Refusal.from_config(rec), P.site_info(content).site_id
    except (ValueError, KeyError) as err:
        raise ValueError(f"malformed refusal: {err}") from None


@dataclass(frozen=True)
class EvalReply:
    """A plaintext evaluation reply that passed the checks."""

    info: P.SiteInfo
    num_examples: int
    loss: float
    accuracy: float


def check_evaluate_reply(content: RecordDict) -> EvalReply:
    """A site's plaintext evaluation: a whole positive count, an accuracy in [0, 1] and a finite,
    non-negative loss."""
    info = P.site_info(content)
    n = P.metric(content, P.NUM_EXAMPLES)
    loss, acc = P.metric(content, P.EVAL_LOSS), P.metric(content, P.EVAL_ACC)
    if not (math.isfinite(n) and n == int(n) and n >= 1) or not 0.0 <= acc <= 1.0:
        raise ValueError(f"implausible evaluation (n={n}, accuracy={acc})")
    if not (math.isfinite(loss) and loss >= 0):
        raise ValueError(f"evaluation loss must be a finite number >= 0, got {loss}")
    return EvalReply(info, int(n), loss, acc)


def check_encrypted_evaluate_reply(content: RecordDict, cipher: CoordinatorContext, *, run: str,
                                   server_round: int, site_id: str | None = None
                                   ) -> tuple[P.SiteInfo, EncryptedVector, list[Any]]:
    """A site's encrypted evaluation sums: no plaintext beside them, the key set's integrity tag for
    ``run``, ``server_round`` and ``site_id`` (default: the site the reply names), one ciphertext
    of the slot layout."""
    info = P.site_info(content)
    if P.METRICS in content:
        raise ValueError("plaintext metrics in an encrypted evaluation: not used")
    enc = P.encrypted_from(content, P.ENC_METRICS)
    binding = ReplyBinding(run, server_round, site_id if site_id is not None else info.site_id, "eval-sums")
    return info, enc, cipher.parse(enc, len(P.EVAL_SUMS), tag=P.reply_tag(content, P.ENC_METRICS),
                                   binding=binding)
