"""Checks on what a site sends back: pure functions, no store, no Flower grid.

Each takes a reply's content and what the coordinator expects, and returns a typed record of
the reply or raises ``ReplyRejected`` (a ``ValueError``) with the reason that goes on the record
and a machine-readable code from ``REJECTION_CODES``. Nothing here decides what happens next
(``server.strategy``) or writes anything (``server.rounds``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from privacy.accounting import ACCOUNTANTS, epsilon
from privacy.ckks import (
    CoordinatorContext,
    EncryptedVector,
    MalformedCiphertextError,
    ReplyBinding,
    ReplyIntegrityError,
)
from privacy.events import DpSgdEvent, default_delta
from privacy.randomness import RngMode
from veil import protocol as P

Model = ArrayRecord | ConfigRecord  # plaintext arrays, or the encrypted aggregate (P.encrypted_record)
Layout = dict[str, tuple[tuple[int, ...], str]]  # tensor name -> (shape, dtype) of the global model


REJECTION_CODES: dict[str, str] = {
    "invalid-site": "the reply's site record is missing or malformed",
    "wrong-site": "the reply names another site than its node named at the pre-flight",
    "invalid-update": "the update is missing, does not fit the global model, or holds NaN, ±inf or huge values "
                      "(or is plaintext in an encrypted run)",
    "invalid-metrics": "the metrics record is missing, or a count, loss or ε in it is not a number in range",
    "over-declared": "more examples than the site declared at the pre-flight (training), or than its "
                     "test set holds (evaluation)",
    "invalid-privacy-report": "the privacy record is missing or malformed, or has no ledger spend or head",
    "seeded-noise": "DP noise drawn from the run's seed (reproducible, not private) in a private run",
    "wrong-mechanism": "σ, q, steps or clipping norm differ from the task's or from the pre-flight's",
    "wrong-accounting": "δ or accountant is not the run's (the task's, or the site's default δ for its n)",
    "understated-epsilon": "a run ε below what the events imply, infinite, or unequal to the metric ε; "
                           "or a lifetime ε below the run ε",
    "over-cap": "a lifetime ε above the site's own cap",
    "invalid-evaluation": "an evaluation with a count, accuracy or loss out of range",
    "invalid-ciphertext": "bytes that are not a ciphertext of the run's key set, or of the wrong length",
    "ckks-integrity": "an encrypted reply without the run's key set's tag for its run, round, site and kind",
    "invalid-refusal": "a refusal that cannot be read",
    "invalid-reply": "a reply the checks could not read otherwise",
}
"""Every code a rejected reply is recorded with (``participation.reason_code``), and what it means."""


class ReplyRejected(ValueError):
    """A reply the coordinator does not use: the reason (the message) and its code."""

    def __init__(self, code: str, reason: str) -> None:
        if code not in REJECTION_CODES:
            raise ValueError(f"rejection code must be one of {sorted(REJECTION_CODES)}, got {code!r}")
        super().__init__(reason)
        self.code = code


@contextmanager
def _coded(code: str) -> Iterator[None]:
    """A ``ValueError`` raised inside (by a protocol decoder) is rejected with ``code``; one that
    already carries a code keeps it."""
    try:
        yield
    except (ReplyRejected, MalformedCiphertextError):
        raise
    except ValueError as err:
        raise ReplyRejected(code, str(err)) from None


def rejection_code(err: ValueError) -> str:
    """The machine-readable reason code a rejected reply is recorded with (see ``REJECTION_CODES``)."""
    if isinstance(err, ReplyRejected):
        return err.code
    if isinstance(err, ReplyIntegrityError):
        return ReplyIntegrityError.code
    if isinstance(err, MalformedCiphertextError):
        return "invalid-ciphertext"
    return "invalid-reply"


def reply_site(content: RecordDict) -> P.SiteInfo:
    """The site a reply names (``invalid-site`` if its record is missing or malformed)."""
    with _coded("invalid-site"):
        return P.site_info(content)


def _same_site(info: P.SiteInfo, site_id: str | None) -> None:
    if site_id is not None and info.site_id != site_id:
        raise ReplyRejected("wrong-site", f"reply names site {info.site_id!r}, but its node answered the "
                                          f"pre-flight as {site_id!r}: not used")


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
    """Example-weighted mean loss; ε aggregated with *max* (a mean would hide the worst site); no ε
    in a non-private run."""
    total = sum(float(P.metric(r, weight_key)) for r in records)
    loss = sum(P.metric(r, P.TRAIN_LOSS) * P.metric(r, weight_key) for r in records) / total
    out = MetricRecord({P.TRAIN_LOSS: loss})
    if all(P.EPSILON in _metrics(r) for r in records):
        out[P.EPSILON] = max(P.metric(r, P.EPSILON) for r in records)
    return out


def _metrics(content: RecordDict) -> MetricRecord:
    rec = content.get(P.METRICS)
    return rec if isinstance(rec, MetricRecord) else MetricRecord()


@dataclass(frozen=True)
class TrainReply:
    """A training reply that passed every check."""

    info: P.SiteInfo
    report: P.PrivacyReport | None  # None: a non-private run (no mechanism, no charge)
    lifetime: P.LifetimeSpend | None
    head: P.LedgerHead | None
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
            raise ReplyRejected("invalid-update", f"array {name[:60]!r} is not numeric")
        if values.size and not (np.isfinite(values).all() and np.abs(values).max() <= MAX_WEIGHT):
            raise ReplyRejected("invalid-update", f"array {name[:60]!r} holds NaN, ±inf or values beyond "
                                                  f"±{MAX_WEIGHT:g}: not aggregated")


def _same(a: float, b: float, rel: float = 1e-6) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)


def _check_mechanism(report: P.PrivacyReport, task: P.TrainTask | None, declared: P.BudgetStatus | None,
                     history: Sequence[DpSgdEvent], num_examples: int) -> None:
    """The mechanism is the one the task asked for and the site declared at the pre-flight."""
    ev = report.event
    if task is not None:
        if not _same(ev.max_grad_norm, task.max_grad_norm):
            raise ReplyRejected("wrong-mechanism", f"clipping norm {ev.max_grad_norm:g} is not the task's "
                                                   f"{task.max_grad_norm:g}")
        if task.noise_multiplier > 0 and ev.noise_multiplier < task.noise_multiplier * (1 - 1e-9):
            raise ReplyRejected("wrong-mechanism", f"σ {ev.noise_multiplier:g} is below the task's "
                                                   f"{task.noise_multiplier:g}")
    if declared is not None:
        same = (_same(ev.noise_multiplier, declared.noise_multiplier)
                and _same(ev.sample_rate, declared.sample_rate) and ev.steps == declared.steps_per_round)
        if not same:
            raise ReplyRejected("wrong-mechanism", f"ran σ={ev.noise_multiplier:g}, q={ev.sample_rate:g}, "
                                f"{ev.steps} steps, but declared σ={declared.noise_multiplier:g}, "
                                f"q={declared.sample_rate:g}, {declared.steps_per_round} steps at the pre-flight")
    if report.accountant not in ACCOUNTANTS:
        raise ReplyRejected("invalid-privacy-report", f"accountant {report.accountant[:20]!r} is not one of "
                                                      f"{', '.join(ACCOUNTANTS)}")
    if task is not None:
        if report.accountant != task.accountant:
            raise ReplyRejected("wrong-accounting", f"accountant {report.accountant!r} is not the task's "
                                                    f"{task.accountant!r}")
        # what the site runs with (client.app._run_delta): the task's δ, else its default for its n
        run_delta = task.delta if task.delta > 0 else default_delta(num_examples)
        if not _same(report.delta, run_delta, 1e-9):
            raise ReplyRejected("wrong-accounting", f"reports δ={report.delta:g}, but this run's δ for "
                                f"{num_examples} examples is {run_delta:g}: ε must be reported at the run's δ")


def _check_epsilon(report: P.PrivacyReport, metric_epsilon: float, history: Sequence[DpSgdEvent]) -> None:
    """The reported run ε is finite, is not below what the site's events in this run imply, equals
    the metric ε (the round's max is taken from the metric), and is not above its lifetime ε at the same δ
    and accountant; the lifetime ε is within the site's own cap."""
    if not math.isfinite(report.epsilon):
        raise ReplyRejected("understated-epsilon", f"reports run ε {report.epsilon}: it must be finite")
    implied = epsilon([*history, report.event], report.delta, report.accountant)  # type: ignore[arg-type]
    if report.epsilon < implied * (1 - 1e-6) - 1e-9:
        raise ReplyRejected("understated-epsilon", f"reports run ε {report.epsilon:.4g}, below the "
                                                   f"{implied:.4g} its events imply")
    if not _same(metric_epsilon, report.epsilon, 1e-9):
        raise ReplyRejected("understated-epsilon", f"metric ε {metric_epsilon:.6g} is not the privacy "
                                                   f"report's ε {report.epsilon:.6g}")
    life = report.lifetime
    if life is None:
        return
    if (life.accountant == report.accountant and _same(life.delta, report.delta, 1e-9)
            and life.epsilon < report.epsilon * (1 - 1e-9)):
        raise ReplyRejected("understated-epsilon", f"reports lifetime ε {life.epsilon:.6g}, below its run ε "
                                                   f"{report.epsilon:.6g} at the same δ and accountant")
    if life.cap is not None and life.epsilon > life.cap * (1 + 1e-9):
        raise ReplyRejected("over-cap", f"reports lifetime ε {life.epsilon:.4g} above its own cap {life.cap:g}")


def check_train_reply(content: RecordDict, *, encrypted: bool, expected: Layout, rng: RngMode,
                      task: P.TrainTask | None = None, declared: P.BudgetStatus | None = None,
                      history: Sequence[DpSgdEvent] = ()) -> TrainReply:
    """A site's training reply: it names the site its node named at the pre-flight; its update
    matches the global model and is finite (or is encrypted when the run is); its example count is
    at most what it declared at the pre-flight; it reports the mechanism it was asked for and
    declared, at the run's δ (the task's, else the site default for its count) with the task's
    accountant; its run ε is finite, equals its metric ε, is no lower than its events imply and no
    higher than its lifetime ε at the same δ and accountant; it reports its ledger's spend; and its
    noise source is the one the run asked for (a seeded reply to a private run is refused).
    ``task``, ``declared`` (this node's pre-flight answer) and ``history`` (the site's earlier
    events in this run) sharpen the checks when the coordinator has them. Every rejection is a
    ``ReplyRejected`` with its code."""
    info = reply_site(content)
    _same_site(info, declared.site_id if declared is not None else None)
    arrays = content.get(P.ARRAYS)
    if encrypted:
        if arrays is not None:
            raise ReplyRejected("invalid-update", "plaintext update in an encrypted run: not aggregated")
    elif not isinstance(arrays, ArrayRecord):
        raise ReplyRejected("invalid-update", "reply has no arrays record")
    elif layout(arrays) != expected:
        raise ReplyRejected("invalid-update",
                            "arrays do not match the global model (keys, shapes or dtypes differ)")
    else:
        _finite_arrays(arrays)
    with _coded("invalid-metrics"):
        n = P.metric(content, P.NUM_EXAMPLES)
        if not math.isfinite(n) or n != int(n) or n < 1:
            raise ValueError(f"num-examples must be a positive integer, got {n}")
        for key in (P.TRAIN_LOSS, P.EPSILON) if task is None or task.private else (P.TRAIN_LOSS,):
            value = P.metric(content, key)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{key} must be a finite number >= 0, got {value}")
    if declared is not None and n > declared.num_examples:
        raise ReplyRejected("over-declared", f"num-examples {int(n)} is more than the {declared.num_examples} "
                                             "the site declared")
    if task is not None and not task.private:  # the labelled baseline: no mechanism to report
        if P.PRIVACY in content or P.EPSILON in _metrics(content):
            raise ReplyRejected("invalid-privacy-report", "a privacy report or ε in a non-private run: the "
                                "site did not run the task it was sent")
        update = content[P.ENC_UPDATE if encrypted else P.ARRAYS]
        return TrainReply(info, None, None, None, int(n), array_bytes(update))  # type: ignore[arg-type]
    with _coded("invalid-privacy-report"):
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
        raise ReplyRejected("seeded-noise", "the site drew its DP noise from the seed (reproducible, not "
                            "private), but this run asked for noise from each site's own entropy: not aggregated")
    _check_mechanism(report, task, declared, history, int(n))
    _check_epsilon(report, P.metric(content, P.EPSILON), history)
    update = content[P.ENC_UPDATE if encrypted else P.ARRAYS]
    return TrainReply(info, report, life, life.head, int(n), array_bytes(update))  # type: ignore[arg-type]


def parse_update(content: RecordDict, cipher: CoordinatorContext, stream_values: int, *, run: str,
                 server_round: int, site_id: str | None = None) -> list[Any]:
    """An encrypted update's ciphertexts, checked to carry the key set's integrity tag for ``run``,
    ``server_round`` and ``site_id`` (default: the site the reply names) and to hold
    ``stream_values`` values under the run's key."""
    site = site_id if site_id is not None else reply_site(content).site_id
    return cipher.parse(P.encrypted_from(content, P.ENC_UPDATE), stream_values,
                        tag=P.reply_tag(content, P.ENC_UPDATE),
                        binding=ReplyBinding(run, server_round, site, "update"))


def check_refusal(content: RecordDict) -> tuple[P.Refusal, str]:
    """A site's refusal to train and the site's id (ValueError if it is malformed)."""
    try:
        rec = content[P.REFUSAL]
        if not isinstance(rec, ConfigRecord):
            raise ValueError("refusal is not a config record")
        return P.Refusal.from_config(rec), P.site_info(content).site_id
    except (ValueError, KeyError) as err:
        raise ReplyRejected("invalid-refusal", f"malformed refusal: {err}") from None


@dataclass(frozen=True)
class EvalReply:
    """A plaintext evaluation reply that passed the checks."""

    info: P.SiteInfo
    num_examples: int
    loss: float
    accuracy: float


MAX_TEST_RATIO = 9
"""Before a site has said how many test records it holds, its evaluation counts at most this many
times the training records it declared (a held-out share of at most 0.9)."""


def check_evaluate_reply(content: RecordDict, *, declared: P.BudgetStatus | None = None,
                         num_test: int = 0) -> EvalReply:
    """A site's plaintext evaluation: it names the site its node named at the pre-flight
    (``declared``), has a whole positive count, an accuracy in [0, 1] and a finite, non-negative loss.

    Its count is its weight in the global accuracy, so it is bounded: exactly ``num_test``, the
    test records the site's own training reply in this run reported, when there was one; else at
    most ``MAX_TEST_RATIO`` x the training records it declared at the pre-flight; unbounded only
    without either (no plan and no training reply)."""
    info = reply_site(content)
    _same_site(info, declared.site_id if declared is not None else None)
    with _coded("invalid-evaluation"):
        n = P.metric(content, P.NUM_EXAMPLES)
        loss, acc = P.metric(content, P.EVAL_LOSS), P.metric(content, P.EVAL_ACC)
    if not (math.isfinite(n) and n == int(n) and n >= 1) or not 0.0 <= acc <= 1.0:
        raise ReplyRejected("invalid-evaluation", f"implausible evaluation (n={n}, accuracy={acc})")
    if not (math.isfinite(loss) and loss >= 0):
        raise ReplyRejected("invalid-evaluation", f"evaluation loss must be a finite number >= 0, got {loss}")
    if num_test > 0 and n != num_test:
        raise ReplyRejected("over-declared", f"evaluated on {int(n)} records, but its training reply in this run "
                                             f"reported {num_test} test records")
    if num_test <= 0 and declared is not None and n > MAX_TEST_RATIO * declared.num_examples:
        raise ReplyRejected("over-declared", f"evaluated on {int(n)} records, more than {MAX_TEST_RATIO} x the "
                            f"{declared.num_examples} training records it declared at the pre-flight")
    return EvalReply(info, int(n), loss, acc)


def check_encrypted_evaluate_reply(content: RecordDict, cipher: CoordinatorContext, *, run: str,
                                   server_round: int, site_id: str | None = None
                                   ) -> tuple[P.SiteInfo, EncryptedVector, list[Any]]:
    """A site's encrypted evaluation sums: no plaintext beside them, the key set's integrity tag for
    ``run``, ``server_round`` and ``site_id`` (default: the site the reply names), one ciphertext
    of the slot layout; the site it names is ``site_id`` when that is given."""
    info = reply_site(content)
    _same_site(info, site_id)
    if P.METRICS in content:
        raise ReplyRejected("invalid-evaluation", "plaintext metrics in an encrypted evaluation: not used")
    enc = P.encrypted_from(content, P.ENC_METRICS)
    binding = ReplyBinding(run, server_round, site_id if site_id is not None else info.site_id, "eval-sums")
    return info, enc, cipher.parse(enc, len(P.EVAL_SUMS), tag=P.reply_tag(content, P.ENC_METRICS),
                                   binding=binding)
