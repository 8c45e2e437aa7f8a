"""The coordinator checks every reply at the edge (``server.checks``, pure) and the strategy
records what it rejected, refused or never heard from (``server.strategy`` + ``server.rounds``)."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from sqlalchemy import select

from privacy import DpSgdEvent, epsilon
from server import checks
from server.checks import aggregate_train_metrics
from server.rounds import RoundWriter
from server.store import RunStore
from server.store import schema as S
from server.strategy import RecordingStrategy
from tests.flowerkit import LocalGrid, answers
from veil import protocol as P

GLOBAL = {"w": torch.zeros((2, 3), dtype=torch.float32)}
EVENT = DpSgdEvent(1.0, 0.1, 10, 1.0)
EPS = epsilon([EVENT], 1e-5, "pld")  # what a site honestly reports for that one event
LIFE = P.LifetimeSpend("d" * 16, "e" * 32, 1.5, 1e-5, "pld", 4.0, P.LedgerHead("f" * 32, 7, "a" * 64))


def _reply(**overrides: object) -> RecordDict:
    content = {
        P.ARRAYS: ArrayRecord({k: torch.ones_like(v) for k, v in GLOBAL.items()}),
        P.METRICS: MetricRecord({P.NUM_EXAMPLES: 10, P.TRAIN_LOSS: 0.5, P.EPSILON: 1.0}),
        P.PRIVACY: P.PrivacyReport(EVENT, 1e-5, "pld", "x", EPS,
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
    return RecordingStrategy(FedAvg(), RoundWriter(store, run_id, num_rounds=1, min_sites=1))


def _check(content: RecordDict) -> checks.TrainReply:
    return checks.check_train_reply(content, encrypted=False, expected=checks.layout(ArrayRecord(GLOBAL)),
                                    rng="os-entropy")


def _train(strategy: RecordingStrategy, nodes: list[int], content_for: dict[int, RecordDict]):  # type: ignore[no-untyped-def]
    """One training round through the strategy's public methods: send to ``nodes``, get replies."""
    sent = strategy.configure_train(1, ArrayRecord(GLOBAL), ConfigRecord(), LocalGrid(nodes))
    return strategy.aggregate_train(1, answers(sent, content_for))


def test_good_reply_passes() -> None:
    reply = _check(_reply())
    assert (reply.info.site_id, reply.num_examples, reply.report.event.steps) == ("site-0", 10, 10)


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
        ({P.PRIVACY: ConfigRecord({"noise-multiplier": 1.0, "sample-rate": 0.1, "steps": 2.5,
                                   "max-grad-norm": 1.0, "delta": 1e-5, "epsilon": 1.0,
                                   "sampling": "poisson"})}, "'steps' must be a whole number"),
        ({P.PRIVACY: ConfigRecord({"noise-multiplier": 1.0, "sample-rate": 0.1, "steps": 10,
                                   "max-grad-norm": float("inf"), "delta": 1e-5, "epsilon": 1.0,
                                   "sampling": "poisson"})}, "positive finite"),
        ({P.PRIVACY: P.PrivacyReport(EVENT, 1e-5, "pld", "x", EPS,
                                     sampling="shuffle", lifetime=LIFE).to_config()}, "must be 'poisson'"),
        ({P.PRIVACY: P.PrivacyReport(EVENT, 1e-5, "pld", "x", EPS).to_config()},
         "must keep a privacy ledger"),
        ({P.PRIVACY: P.PrivacyReport(EVENT, 1e-5, "pld", "x", EPS, lifetime=LIFE,
                                     rng="seeded").to_config()}, "from the seed .* not aggregated"),
        ({P.PRIVACY: P.PrivacyReport(EVENT, 1e-5, "pld", "x", EPS, lifetime=LIFE,
                                     rng="time").to_config()}, "rng must be one of"),
    ],
)
def test_malformed_replies_are_rejected(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _check(_reply(**overrides))


def test_epsilon_aggregates_with_max_not_mean() -> None:
    a = _reply(**{P.METRICS: MetricRecord({P.NUM_EXAMPLES: 90, P.TRAIN_LOSS: 1.0, P.EPSILON: 0.5})})
    b = _reply(**{P.METRICS: MetricRecord({P.NUM_EXAMPLES: 10, P.TRAIN_LOSS: 2.0, P.EPSILON: 4.0})})
    agg = aggregate_train_metrics([a, b], P.NUM_EXAMPLES)
    assert agg[P.EPSILON] == 4.0 and agg[P.TRAIN_LOSS] == pytest.approx(1.1)


def test_rejection_is_recorded_with_reason(strategy: RecordingStrategy) -> None:
    arrays, _ = _train(strategy, [1, 2, 3], {1: _reply(), 2: _reply(**{P.PRIVACY: None})})  # 3 is silent
    assert arrays is not None  # the round goes on with the good reply
    with strategy.writer.store.session() as s:
        rows = {p.status: p.reason for p in s.scalars(select(S.Participation))}
    assert rows["ok"] is None
    assert "no privacy record" in (rows["rejected"] or "")
    assert "no reply" in (rows["no-reply"] or "")


def test_site_refusal_is_recorded_with_its_code_and_the_site_is_dropped(strategy: RecordingStrategy) -> None:
    from server.budget import ParticipationPlan, SiteStanding

    def status(site: str) -> P.BudgetStatus:
        return P.BudgetStatus(site, "d" * 16, 100, 1e-5, "pld", 4.0, 1.0, 1.0, 0.1, 10, 3.0, 3)

    plan = ParticipationPlan({1: SiteStanding(1, status("site-0")), 2: SiteStanding(2, status("site-1"))},
                             rounds=3, per_round=2, min_sites=1, mode="drop", seed=0)
    strategy.plan = plan
    refusal = RecordDict({P.REFUSAL: P.Refusal("budget-exhausted", "lifetime ε would reach 4.2 > 4").to_config(),
                          P.SITE: P.SiteInfo("site-1", "cpu", 0.0).to_config()})
    arrays, _ = _train(strategy, [1, 2], {1: _reply(), 2: refusal})
    assert arrays is not None
    with strategy.writer.store.session() as s:
        row = s.scalars(select(S.Participation).where(S.Participation.status == "refused")).one()
        ev = s.scalars(select(S.PrivacyEvent)).one()
    assert row.reason_code == "budget-exhausted" and "4.2 > 4" in (row.reason or "")
    assert (ev.lifetime_epsilon, ev.epsilon_cap, ev.dataset_id) == (1.5, 4.0, "d" * 16)
    assert (ev.rng, ev.ledger_id, ev.ledger_seq) == ("os-entropy", "f" * 32, 7)
    with strategy.writer.store.session() as s:  # the coordinator now witnesses site-0's ledger at entry 7
        head = s.scalars(select(S.LedgerHead)).one()
    assert (head.site_key, head.ledger_id, head.seq, head.entry_hash) == ("site-0", "f" * 32, 7, "a" * 64)
    # the refusing site is never sampled again; the other is charged one round
    assert plan.choose(2) == [1] and plan.standings[1].remaining == 2


# -- CKKS: the coordinator checks and adds ciphertexts, never reads them --------------------

@pytest.fixture(scope="module")
def ckks_keys(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from privacy.ckks import CoordinatorContext, SecretKey, create_keyset

    made = create_keyset(tmp_path_factory.mktemp("k") / "set")
    return SecretKey.load(made.secret), CoordinatorContext.load(made.coordinator)


def _encrypted_strategy(url: str, ckks_keys, values: int, **kw):  # type: ignore[no-untyped-def]
    from flwr.serverapp.strategy import FedAvg

    store = RunStore(url)
    run_id = store.create_run(name="e", spec={}, spec_hash="0" * 64, seed=0, num_sites=3, num_rounds=1)
    return RecordingStrategy(FedAvg(), RoundWriter(store, run_id, num_rounds=1, min_sites=1), cipher=ckks_keys[1],
                             stream_values=values, encrypted_train=True, **kw)


def test_malformed_ciphertexts_are_rejected_with_a_reason_and_the_round_goes_on(
        tmp_path, ckks_keys) -> None:  # type: ignore[no-untyped-def]
    import numpy as np

    from privacy.ckks import EncryptedVector

    secret, _ = ckks_keys
    strategy = _encrypted_strategy(f"sqlite:///{tmp_path / 'e.db'}", ckks_keys, values=7)
    update = np.array([0.5, -1.0, 2.0, 0.0, 3.0, 1.0, 0.25])  # 6 weighted values + weight 0.25

    def encrypted(enc: EncryptedVector) -> RecordDict:
        return _reply(**{P.ARRAYS: None, P.ENC_UPDATE: P.encrypted_record(enc)})

    good = secret.encrypt(update)
    model, metrics = _train(strategy, [1, 2, 3, 4, 5], {
        1: encrypted(good),
        2: encrypted(EncryptedVector(good.key_id, 7, (b"\x00garbage" * 100,))),
        3: encrypted(secret.encrypt(update[:5])),  # wrong length
        4: _reply(),  # a plaintext update in an encrypted run
        5: encrypted(EncryptedVector(good.key_id, 7, (good.chunks[0] * 2,))),  # oversized
    })
    assert isinstance(model, ConfigRecord) and metrics is not None
    mean, weight = secret.decrypt_mean(P.encrypted_from(RecordDict({P.ENC_MODEL: model}), P.ENC_MODEL))
    assert weight == pytest.approx(0.25, abs=1e-7)  # only the good site is in the sum
    assert np.max(np.abs(mean - update[:6] / 0.25)) < 1e-6
    with strategy.writer.store.session() as s:
        rows = sorted((p.status, p.reason or "") for p in s.scalars(select(S.Participation)))
    reasons = [r for status, r in rows if status == "rejected"]
    assert [status for status, _ in rows].count("ok") == 1 and len(reasons) == 4
    assert any("not a CKKS ciphertext" in r for r in reasons)
    assert any("holds 5 values, expected 7" in r for r in reasons)
    assert any("plaintext update in an encrypted run" in r for r in reasons)
    assert any("over the" in r for r in reasons)


def test_encrypted_evaluation_is_stored_as_one_ciphertext_only_a_key_holder_reads(
        store_url, ckks_keys) -> None:  # type: ignore[no-untyped-def]
    """On SQLite and PostgreSQL: the ciphertext round-trips through the store's binary column."""
    import numpy as np

    from server.read.summary import load_summary

    secret, _ = ckks_keys
    strategy = _encrypted_strategy(store_url, ckks_keys, values=9, encrypted_eval=True, weight_norm=1000.0)
    site_sums = [(40.0, 80, 100), (90.0, 150, 200)]  # (loss sum, correct, examples) per site
    content = {
        i + 1: RecordDict({
            P.ENC_METRICS: P.encrypted_record(secret.encrypt(np.array(sums, dtype=float) / 1000.0)),
            P.SITE: P.SiteInfo(f"site-{i}", "cpu", 0.1, 0).to_config(),
        })
        for i, sums in enumerate(site_sums)
    }
    content[3] = RecordDict({  # plaintext metrics are not accepted in an encrypted evaluation
        P.METRICS: MetricRecord({P.NUM_EXAMPLES: 10, P.EVAL_LOSS: 0.1, P.EVAL_ACC: 1.0}),
        P.SITE: P.SiteInfo("site-2", "cpu", 0.1, 10).to_config()})
    grid = LocalGrid([1, 2, 3])
    strategy.writer.open_round(1, [], 0)
    sent = strategy.configure_evaluate(1, ArrayRecord(GLOBAL), ConfigRecord(), grid)
    assert strategy.aggregate_evaluate(1, answers(sent, content)) is None  # the coordinator learns nothing
    store, run_id = strategy.writer.store, strategy.writer.run_id
    with store.session() as s:
        stored = s.scalars(select(S.EncryptedMetric)).one()
        plain = s.scalars(select(S.Metric).where(S.Metric.name.in_([P.EVAL_ACC, P.EVAL_LOSS]))).all()
        rejected = s.scalars(select(S.Participation).where(S.Participation.status == "rejected")).one()
    assert stored.sites == 2 and stored.weight_norm == 1000.0 and plain == []
    assert "plaintext metrics" in (rejected.reason or "")
    hidden = load_summary(store, run_id).rounds[0]
    assert hidden.encrypted and hidden.accuracy is None
    shown = load_summary(store, run_id, secret).rounds[0]
    assert shown.accuracy == pytest.approx(230 / 300, abs=1e-6)
    assert shown.loss == pytest.approx(130 / 300, abs=1e-6)


def test_encrypted_evaluation_alone_keeps_plaintext_aggregation(tmp_path, ckks_keys) -> None:  # type: ignore[no-untyped-def]
    from flwr.serverapp.strategy import FedAvg

    store = RunStore(f"sqlite:///{tmp_path / 'p.db'}")
    run_id = store.create_run(name="p", spec={}, spec_hash="0" * 64, seed=0, num_sites=1, num_rounds=1)
    strategy = RecordingStrategy(FedAvg(), RoundWriter(store, run_id, num_rounds=1, min_sites=1),
                                 cipher=ckks_keys[1], stream_values=7, encrypted_train=False, encrypted_eval=True)
    arrays, _ = _train(strategy, [1], {1: _reply()})
    assert isinstance(arrays, ArrayRecord)  # plaintext FedAvg, as the scenario asked


# -- the edge holds: poisoned, inflated or under-reported replies are rejected with a reason ------

DECLARED = P.BudgetStatus("site-0", "d" * 16, 100, 1e-5, "pld", 4.0, 0.0, 1.0, 0.1, 10, 3.0, 3)


def _privacy(**kw: object) -> ConfigRecord:
    rec = P.PrivacyReport(EVENT, 1e-5, "pld", "x", EPS, lifetime=LIFE).to_config()
    for key, value in kw.items():
        rec[key] = value  # type: ignore[assignment]
    return rec


def _metrics(**kw: float) -> MetricRecord:
    return MetricRecord({P.NUM_EXAMPLES: 10, P.TRAIN_LOSS: 0.5, P.EPSILON: 1.0, **kw})


@pytest.mark.parametrize(("overrides", "message"), [
    ({P.ARRAYS: ArrayRecord({"w": torch.full((2, 3), float("nan"))})}, "NaN, ±inf"),
    ({P.ARRAYS: ArrayRecord({"w": torch.full((2, 3), float("-inf"))})}, "NaN, ±inf"),
    ({P.ARRAYS: ArrayRecord({"w": torch.full((2, 3), 1e38)})}, "beyond"),
    ({P.METRICS: _metrics(**{P.NUM_EXAMPLES: float("inf")})}, "positive integer"),  # was an OverflowError
    ({P.METRICS: _metrics(**{P.NUM_EXAMPLES: 1e18})}, "more than the 100 the site declared"),
    ({P.METRICS: _metrics(**{P.TRAIN_LOSS: float("inf")})}, "finite number >= 0"),
    ({P.METRICS: _metrics(**{P.TRAIN_LOSS: -1.0})}, "finite number >= 0"),
    ({P.PRIVACY: _privacy(epsilon=EPS / 2)}, "below the .* its events imply"),
    ({P.PRIVACY: _privacy(epsilon=0.0)}, "below the .* its events imply"),
    ({P.PRIVACY: _privacy(accountant="gdp")}, "not one of"),
    ({P.PRIVACY: _privacy(**{"noise-multiplier": 0.5})}, "below the task's"),
    ({P.PRIVACY: _privacy(**{"max-grad-norm": 2.0})}, "not the task's"),
    ({P.PRIVACY: _privacy(**{"sample-rate": 0.2})}, "declared σ=1, q=0.1, 10 steps"),
    ({P.PRIVACY: _privacy(**{"lifetime-epsilon": 5.0})}, "above its own cap"),
])
def test_poisoned_inflated_or_understated_replies_are_rejected(overrides: dict, message: str) -> None:
    task = P.TrainTask("mlp", 1, 30, 0.1, 0.0, 1.0, 1.0, 0.0, 1e-5, "pld", 3, 0)
    with pytest.raises(ValueError, match=message):
        checks.check_train_reply(_reply(**overrides), encrypted=False, expected=checks.layout(ArrayRecord(GLOBAL)),
                                 rng="os-entropy", task=task, declared=DECLARED)
    reply = checks.check_train_reply(_reply(), encrypted=False, expected=checks.layout(ArrayRecord(GLOBAL)),
                                     rng="os-entropy", task=task, declared=DECLARED)  # the honest one passes
    assert reply.num_examples == 10


def test_a_second_round_must_report_the_epsilon_of_both_events() -> None:
    """ε over the site's events in this run: reporting only the latest round's ε is an under-statement."""
    kw = {"encrypted": False, "expected": checks.layout(ArrayRecord(GLOBAL)), "rng": "os-entropy"}
    with pytest.raises(ValueError, match="its events imply"):
        checks.check_train_reply(_reply(), history=[EVENT], **kw)  # type: ignore[arg-type]
    both = epsilon([EVENT, EVENT], 1e-5, "pld")
    assert checks.check_train_reply(_reply(**{P.PRIVACY: _privacy(epsilon=both)}), history=[EVENT],
                                    **kw).report.epsilon == both  # type: ignore[arg-type]


@pytest.mark.parametrize(("metrics", "message"), [
    ({P.NUM_EXAMPLES: 2.5, P.EVAL_LOSS: 0.1, P.EVAL_ACC: 0.5}, "implausible"),
    ({P.NUM_EXAMPLES: float("inf"), P.EVAL_LOSS: 0.1, P.EVAL_ACC: 0.5}, "implausible"),
    ({P.NUM_EXAMPLES: 10, P.EVAL_LOSS: 0.1, P.EVAL_ACC: 1.5}, "implausible"),
    ({P.NUM_EXAMPLES: 10, P.EVAL_LOSS: float("inf"), P.EVAL_ACC: 0.5}, "finite number >= 0"),
    ({P.NUM_EXAMPLES: 10, P.EVAL_LOSS: -0.1, P.EVAL_ACC: 0.5}, "finite number >= 0"),
])
def test_implausible_evaluations_are_rejected(metrics: dict, message: str) -> None:
    site = P.SiteInfo("site-0", "cpu", 0.1, 3).to_config()
    content = RecordDict({P.METRICS: MetricRecord(metrics), P.SITE: site})
    with pytest.raises(ValueError, match=message):
        checks.check_evaluate_reply(content)
