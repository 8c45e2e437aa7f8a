"""The coordinator checks every reply at the edge: malformed ones are rejected and recorded."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from sqlalchemy import select

from privacy import DpSgdEvent
from server.recording import RecordingStrategy, aggregate_train_metrics
from server.store import RunStore
from server.store import schema as S
from veil import protocol as P

GLOBAL = {"w": torch.zeros((2, 3), dtype=torch.float32)}
LIFE = P.LifetimeSpend("d" * 16, "e" * 32, 1.5, 1e-5, "pld", 4.0)


def _reply(**overrides: object) -> RecordDict:
    content = {
        P.ARRAYS: ArrayRecord({k: torch.ones_like(v) for k, v in GLOBAL.items()}),
        P.METRICS: MetricRecord({P.NUM_EXAMPLES: 10, P.TRAIN_LOSS: 0.5, P.EPSILON: 1.0}),
        P.PRIVACY: P.PrivacyReport(DpSgdEvent(1.0, 0.1, 10, 1.0), 1e-5, "pld", "x", 1.0,
                                   lifetime=LIFE).to_config(),
        P.SITE: P.SiteInfo("site-0", "cpu", 0.1, 3).to_config(),
    }
    content.update(overrides)  # type: ignore[arg-type]
    return RecordDict({k: v for k, v in content.items() if v is not None})  # type: ignore[misc]


@pytest.fixture
def strategy(tmp_path) -> RecordingStrategy:  # type: ignore[no-untyped-def]
    from flwr.serverapp.strategy import FedAvg

    store = RunStore(f"sqlite:///{tmp_path / 's.db'}")
    run_id = store.create_run(name="t", spec={}, spec_hash="0" * 64, seed=0, num_sites=1, num_rounds=1)
    strat = RecordingStrategy(FedAvg(), store, run_id, num_rounds=1, min_sites=1)
    strat._global_keys = {k: (tuple(a.shape), a.dtype) for k, a in ArrayRecord(GLOBAL).items()}
    return strat


def test_good_reply_passes(strategy: RecordingStrategy) -> None:
    info, report, n = strategy._check_train_reply(_reply())
    assert (info.site_id, n, report.event.steps) == ("site-0", 10, 10)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({P.ARRAYS: ArrayRecord({"w": torch.ones((3, 2))})}, "do not match the global model"),
        ({P.ARRAYS: ArrayRecord({"other": torch.ones((2, 3))})}, "do not match"),
        ({P.ARRAYS: ArrayRecord({"w": torch.ones((2, 3), dtype=torch.float64)})}, "do not match"),
        ({P.PRIVACY: None}, "no privacy record"),
        ({P.SITE: None}, "no site record"),
        ({P.METRICS: MetricRecord({P.NUM_EXAMPLES: 0, P.TRAIN_LOSS: 0.5, P.EPSILON: 1.0})}, "positive integer"),
        ({P.METRICS: MetricRecord({P.NUM_EXAMPLES: 10, P.TRAIN_LOSS: 0.5})}, "'epsilon' must be a number"),
        ({P.PRIVACY: ConfigRecord({"noise-multiplier": 1.0, "sample-rate": 2.0, "steps": 1,
                                   "max-grad-norm": 1.0, "delta": 1e-5, "epsilon": 1.0,
                                   "sampling": "poisson"})}, "Sampling rate must be in"),
        ({P.PRIVACY: P.PrivacyReport(DpSgdEvent(1.0, 0.1, 10, 1.0), 1e-5, "pld", "x", 1.0,
                                     sampling="shuffle", lifetime=LIFE).to_config()}, "must be 'poisson'"),
        ({P.PRIVACY: P.PrivacyReport(DpSgdEvent(1.0, 0.1, 10, 1.0), 1e-5, "pld", "x", 1.0).to_config()},
         "must keep a privacy ledger"),
    ],
)
def test_malformed_replies_are_rejected(strategy: RecordingStrategy, overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        strategy._check_train_reply(_reply(**overrides))


def test_epsilon_aggregates_with_max_not_mean() -> None:
    a = _reply(**{P.METRICS: MetricRecord({P.NUM_EXAMPLES: 90, P.TRAIN_LOSS: 1.0, P.EPSILON: 0.5})})
    b = _reply(**{P.METRICS: MetricRecord({P.NUM_EXAMPLES: 10, P.TRAIN_LOSS: 2.0, P.EPSILON: 4.0})})
    agg = aggregate_train_metrics([a, b], P.NUM_EXAMPLES)
    assert agg[P.EPSILON] == 4.0 and agg[P.TRAIN_LOSS] == pytest.approx(1.1)


def test_rejection_is_recorded_with_reason(strategy: RecordingStrategy) -> None:
    from flwr.app import Message
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0  # as in a run
    good = Message(_reply(), dst_node_id=1, message_type="train")
    bad = Message(_reply(**{P.PRIVACY: None}), dst_node_id=2, message_type="train")
    for msg, node in ((good, 1), (bad, 2)):
        msg.metadata.__dict__["_src_node_id"] = node
    strategy.round.sampled = [1, 2, 3]
    arrays, _ = strategy.aggregate_train(1, [good, bad])
    assert arrays is not None  # the round goes on with the good reply
    with strategy.store.session() as s:
        rows = {p.status: p.reason for p in s.scalars(select(S.Participation))}
    assert rows["ok"] is None
    assert "no privacy record" in (rows["rejected"] or "")
    assert "no reply" in (rows["no-reply"] or "")


def test_site_refusal_is_recorded_with_its_code_and_the_site_is_dropped(strategy: RecordingStrategy) -> None:
    from flwr.app import Message
    from flwr.supercore.task_identity import TaskIdentity

    from server.budget import ParticipationPlan, SiteStanding

    def status(site: str) -> P.BudgetStatus:
        return P.BudgetStatus(site, "d" * 16, 100, 1e-5, "pld", 4.0, 1.0, 1.0, 0.1, 10, 3.0, 3)

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    plan = ParticipationPlan({1: SiteStanding(1, status("site-0")), 2: SiteStanding(2, status("site-1"))},
                             rounds=3, per_round=2, min_sites=1, mode="drop", seed=0)
    strategy.plan = plan
    good = Message(_reply(), dst_node_id=1, message_type="train")
    refusal = RecordDict({P.REFUSAL: P.Refusal("budget-exhausted", "lifetime ε would reach 4.2 > 4").to_config(),
                          P.SITE: P.SiteInfo("site-1", "cpu", 0.0).to_config()})
    no = Message(refusal, dst_node_id=2, message_type="train")
    for msg, node in ((good, 1), (no, 2)):
        msg.metadata.__dict__["_src_node_id"] = node
    strategy.round.sampled = [1, 2]
    arrays, _ = strategy.aggregate_train(1, [good, no])
    assert arrays is not None
    with strategy.store.session() as s:
        row = s.scalars(select(S.Participation).where(S.Participation.status == "refused")).one()
        ev = s.scalars(select(S.PrivacyEvent)).one()
    assert row.reason_code == "budget-exhausted" and "4.2 > 4" in (row.reason or "")
    assert (ev.lifetime_epsilon, ev.epsilon_cap, ev.dataset_id) == (1.5, 4.0, "d" * 16)
    # the refusing site is never sampled again; the other is charged one round
    assert plan.choose(2) == [1] and plan.standings[1].remaining == 2
