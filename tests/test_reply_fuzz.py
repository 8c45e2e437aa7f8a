"""Fuzzing the coordinator's edge: generated training and evaluation replies, most of them
almost right, go through the real checks. Whatever comes in: the only failure is a ValueError
with a reason (never another exception, which would abort a run), everything accepted is
within bounds, and the average of what was accepted is finite."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from privacy import DpSgdEvent, epsilon
from server import checks
from tests.flowerkit import answer, in_a_run
from veil import protocol as P

GLOBAL = {"w": torch.zeros((2, 3), dtype=torch.float32), "b": torch.zeros(3, dtype=torch.float32)}
LAYOUT = checks.layout(ArrayRecord(GLOBAL))
EVENT = DpSgdEvent(1.0, 0.1, 10, 1.0)
EPS = epsilon([EVENT], 1e-5, "pld")
TASK = P.TrainTask("mlp", 1, 30, 0.1, 0.0, 1.0, 1.0, 0.0, 1e-5, "pld", 3, 0)
DECLARED = P.BudgetStatus("site-0", "d" * 16, 100, 1e-5, "pld", 4.0, 0.0, 1.0, 0.1, 10, 3.0, 3)
HEAD = P.LedgerHead("f" * 32, 7, "a" * 64)
LIFE = P.LifetimeSpend("d" * 16, "e" * 32, 1.5, 1e-5, "pld", 4.0, HEAD)

JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0, 1, -1, 1e-300, 1e300, 0.5, 2.5]),
    st.text(max_size=20), st.binary(max_size=20),
)
PRIVACY_KEYS = ["noise-multiplier", "sample-rate", "steps", "max-grad-norm", "delta", "epsilon", "sampling",
                "accountant", "rng", "lifetime-epsilon", "lifetime-delta", "epsilon-cap", "ledger-id",
                "ledger-seq", "dataset-id", "ledger-entry"]
METRIC_KEYS = [P.NUM_EXAMPLES, P.TRAIN_LOSS, P.EPSILON]


def _arrays(values: list[float]) -> ArrayRecord:
    flat = np.resize(np.array(values or [0.0], dtype=np.float64), 9)
    return ArrayRecord({"w": torch.tensor(flat[:6].reshape(2, 3), dtype=torch.float32),
                        "b": torch.tensor(flat[6:], dtype=torch.float32)})


@st.composite
def train_replies(draw: st.DrawFn) -> RecordDict:
    privacy = P.PrivacyReport(EVENT, 1e-5, "pld", "x", EPS, lifetime=LIFE).to_config()
    for key in draw(st.lists(st.sampled_from(PRIVACY_KEYS), max_size=3, unique=True)):
        value = draw(JUNK)
        if value is None:
            del privacy[key]
        else:
            privacy[key] = value  # type: ignore[assignment]
    metrics: dict[str, float] = {P.NUM_EXAMPLES: 10, P.TRAIN_LOSS: 0.5, P.EPSILON: EPS}
    for key in draw(st.lists(st.sampled_from(METRIC_KEYS), max_size=2, unique=True)):
        metrics[key] = draw(st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                                      st.integers(min_value=-(2**62), max_value=2**62)))
    values = draw(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), max_size=9))
    if draw(st.booleans()):  # most updates are ordinary
        values = [v if math.isfinite(v) and abs(v) < 10 else 0.1 for v in values]
    content = {P.ARRAYS: _arrays(values), P.METRICS: MetricRecord(metrics), P.PRIVACY: privacy,
               P.SITE: P.SiteInfo("site-0", "cpu", 0.1, 3).to_config()}
    if draw(st.integers(0, 9)) == 0:
        del content[draw(st.sampled_from(sorted(content)))]
    return RecordDict(content)  # type: ignore[arg-type]


@pytest.mark.slow
@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(train_replies())
def test_no_training_reply_escapes_the_checks_or_poisons_the_average(content: RecordDict) -> None:
    try:
        reply = checks.check_train_reply(content, encrypted=False, expected=LAYOUT, rng="os-entropy",
                                         task=TASK, declared=DECLARED)
    except ValueError as err:
        assert str(err)  # a reason, recorded for the site
        return
    assert 1 <= reply.num_examples <= DECLARED.num_examples
    ev, report = reply.report.event, reply.report
    assert ev.noise_multiplier >= TASK.noise_multiplier and ev.max_grad_norm == TASK.max_grad_norm
    assert report.epsilon >= epsilon([ev], report.delta, report.accountant) * (1 - 1e-6) - 1e-9  # type: ignore[arg-type]
    arrays = content[P.ARRAYS]
    assert isinstance(arrays, ArrayRecord) and checks.finite(arrays)
    # averaged with an honest site, what FedAvg returns is finite
    in_a_run()
    from flwr.app import Message

    honest = RecordDict({P.ARRAYS: ArrayRecord({k: torch.ones_like(v) for k, v in GLOBAL.items()}),
                         P.METRICS: MetricRecord({P.NUM_EXAMPLES: 50, P.TRAIN_LOSS: 0.4, P.EPSILON: EPS})})
    sent = [Message(RecordDict(), message_type="train", dst_node_id=n) for n in (1, 2)]
    replies = [answer(sent[0], honest), answer(sent[1], content)]
    aggregate, _ = FedAvg(weighted_by_key=P.NUM_EXAMPLES, arrayrecord_key=P.ARRAYS).aggregate_train(1, replies)
    assert aggregate is not None and checks.finite(aggregate)


@st.composite
def evaluation_replies(draw: st.DrawFn) -> RecordDict:
    metrics: dict[str, float] = {P.NUM_EXAMPLES: 20, P.EVAL_LOSS: 0.3, P.EVAL_ACC: 0.8}
    for key in draw(st.lists(st.sampled_from(sorted(metrics)), max_size=3, unique=True)):
        metrics[key] = draw(st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                                      st.integers(min_value=-(2**62), max_value=2**62)))
    site = ConfigRecord(dict(P.SiteInfo("site-0", "cpu", 0.1, 3).to_config()))
    if draw(st.booleans()):
        site[draw(st.sampled_from(sorted(site)))] = draw(JUNK.filter(lambda v: v is not None))  # type: ignore[assignment]
    return RecordDict({P.METRICS: MetricRecord(metrics), P.SITE: site})


@pytest.mark.slow
@settings(max_examples=1000, deadline=None)
@given(evaluation_replies())
def test_no_evaluation_reply_escapes_the_checks(content: RecordDict) -> None:
    try:
        reply = checks.check_evaluate_reply(content)
    except ValueError as err:
        assert str(err)
        return
    assert reply.num_examples >= 1 and 0.0 <= reply.accuracy <= 1.0
    assert math.isfinite(reply.loss) and reply.loss >= 0
