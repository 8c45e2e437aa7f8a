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
LIFE = P.LifetimeSpend("d" * 16, "e" * 32, 3.0, 1e-5, "pld", 4.0, P.LedgerHead("f" * 32, 7, "a" * 64))  # >= EPS


def _reply(**overrides: object) -> RecordDict:
    content = {
        P.ARRAYS: ArrayRecord({k: torch.ones_like(v) for k, v in GLOBAL.items()}),
        P.METRICS: MetricRecord({P.NUM_EXAMPLES: 10, P.TRAIN_LOSS: 0.5, P.EPSILON: EPS}),
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
    assert (ev.lifetime_epsilon, ev.epsilon_cap, ev.dataset_id) == (3.0, 4.0, "d" * 16)
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

    from privacy.ckks import EncryptedVector, ReplyBinding

    secret, _ = ckks_keys
    strategy = _encrypted_strategy(f"sqlite:///{tmp_path / 'e.db'}", ckks_keys, values=7)
    update = np.array([0.5, -1.0, 2.0, 0.0, 3.0, 1.0, 0.25])  # 6 weighted values + weight 0.25

    def encrypted(enc: EncryptedVector) -> RecordDict:  # tagged by a key holder: the shape checks still hold
        tag = secret.tag(enc, ReplyBinding(strategy.reply_run, 1, "site-0", "update"))
        return _reply(**{P.ARRAYS: None, P.ENC_UPDATE: P.encrypted_record(enc, tag)})

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
    from server.read.summary import load_summary

    secret, _ = ckks_keys
    strategy = _encrypted_strategy(store_url, ckks_keys, values=9, encrypted_eval=True, weight_norm=1000.0)
    site_sums = [(40.0, 80, 100), (90.0, 150, 200)]  # (loss sum, correct, examples) per site
    content = {i + 1: _encrypted_eval(secret, strategy.reply_run, 1, f"site-{i}", sums)
               for i, sums in enumerate(site_sums)}
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


def _encrypted_eval(key, run: str, server_round: int, site: str, sums) -> RecordDict:  # type: ignore[no-untyped-def]
    """A site's encrypted evaluation reply, its sums divided by the weight norm 1,000, tagged by ``key``."""
    import numpy as np

    from privacy.ckks import ReplyBinding

    enc = key.encrypt(np.array(sums, dtype=float) / 1000.0)
    return RecordDict({
        P.ENC_METRICS: P.encrypted_record(enc, key.tag(enc, ReplyBinding(run, server_round, site, "eval-sums"))),
        P.SITE: P.SiteInfo(site, "cpu", 0.1, 0).to_config(),
    })


# -- reply integrity: a spoofed, replayed or re-addressed ciphertext is never added ---------------

@pytest.fixture(scope="module")
def intruder(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """Another key set with the same parameters: its ciphertexts parse under the run's context."""
    from privacy.ckks import SecretKey, create_keyset

    return SecretKey.load(create_keyset(tmp_path_factory.mktemp("k") / "intruder").secret)


def test_spoofed_or_re_addressed_encrypted_updates_are_rejected_and_the_honest_mean_survives(
        tmp_path, ckks_keys, intruder) -> None:  # type: ignore[no-untyped-def]
    """The hostile-input campaign's spoof, through the coordinator's real checks and strategy."""
    import numpy as np

    from privacy.ckks import EncryptedVector, ReplyBinding
    from server.budget import ParticipationPlan, SiteStanding

    secret, coord = ckks_keys
    sites = {n: f"site-{n - 1}" for n in range(1, 7)}
    status = {n: P.BudgetStatus(site, "d" * 16, 100, 1e-5, "pld", 4.0, 1.0, 1.0, 0.1, 10, 3.0, 3)
              for n, site in sites.items()}
    strategy = _encrypted_strategy(f"sqlite:///{tmp_path / 'i.db'}", ckks_keys, values=7)
    strategy.plan = ParticipationPlan({n: SiteStanding(n, st) for n, st in status.items()},
                                      rounds=3, per_round=6, min_sites=1, mode="drop", seed=0)
    run = strategy.reply_run
    rng = np.random.default_rng(5)
    honest = {1: (rng.normal(size=6), 0.3), 2: (rng.normal(size=6), 0.5)}

    def reply(node: int, enc: EncryptedVector, tag: bytes | None) -> RecordDict:
        return _reply(**{P.ARRAYS: None, P.ENC_UPDATE: P.encrypted_record(enc, tag),
                         P.SITE: P.SiteInfo(sites[node], "cpu", 0.1, 3).to_config()})

    def bind(node: int, run: str = run) -> ReplyBinding:
        return ReplyBinding(run, 1, sites[node], "update")

    content: dict[int, RecordDict] = {}
    for node, (u, w) in honest.items():
        enc = secret.encrypt(np.append(u * w, w))
        content[node] = reply(node, enc, secret.tag(enc, bind(node)))
    theirs = intruder.encrypt(np.append(np.full(6, 50.0), 1.0))
    spoof = EncryptedVector(coord.key_id, theirs.values, theirs.chunks)  # the run's key id on their ciphertext
    content[3] = reply(3, spoof, None)  # no tag
    content[4] = reply(4, spoof, intruder.tag(spoof, bind(4)))  # tagged with their own key set's reply key
    content[5] = RecordDict(dict(content[1]))  # site-0's reply, forwarded by node 5 (site-4 at the pre-flight)
    content[5][P.SITE] = P.SiteInfo("site-4", "cpu", 0.1, 3).to_config()  # ... and relabelled: the tag holds
    old = secret.encrypt(np.append(np.zeros(6), 0.2))
    content[6] = reply(6, old, secret.tag(old, bind(6, run="run-0:0000000000000000")))  # another run's reply

    model, metrics = _train(strategy, list(sites), content)
    assert isinstance(model, ConfigRecord) and metrics is not None  # the round goes on with the honest sites
    mean, weight = secret.decrypt_mean(P.encrypted_from(RecordDict({P.ENC_MODEL: model}), P.ENC_MODEL))
    expected = sum(u * w for u, w in honest.values()) / 0.8
    assert weight == pytest.approx(0.8, abs=1e-7) and np.max(np.abs(mean - expected)) < 1e-6
    with strategy.writer.store.session() as s:
        rows = [(p.status, p.reason_code, p.reason) for p in s.scalars(select(S.Participation))]
    rejected = [(code, reason) for status, code, reason in rows if status == "rejected"]
    assert [status for status, _, _ in rows].count("ok") == 2 and len(rejected) == 4
    assert all(code == "ckks-integrity" for code, _ in rejected)
    assert sum("carries no 32-byte integrity tag" in r for _, r in rejected) == 1
    assert any("does not match key set" in r and "'site-4'" in r for _, r in rejected)  # bound to its own site


def test_spoofed_or_replayed_encrypted_evaluations_are_rejected_and_not_summed(
        tmp_path, ckks_keys, intruder) -> None:  # type: ignore[no-untyped-def]
    from privacy.ckks import EncryptedVector

    secret, coord = ckks_keys
    strategy = _encrypted_strategy(f"sqlite:///{tmp_path / 'v.db'}", ckks_keys, values=9, encrypted_eval=True,
                                   weight_norm=1000.0)
    run = strategy.reply_run
    first = _encrypted_eval(secret, run, 1, "site-0", (40.0, 80, 100))
    theirs = _encrypted_eval(intruder, run, 1, "site-1", (0.0, 900, 900))
    enc = P.encrypted_from(theirs, P.ENC_METRICS)
    theirs[P.ENC_METRICS] = P.encrypted_record(EncryptedVector(coord.key_id, enc.values, enc.chunks),
                                               P.reply_tag(theirs, P.ENC_METRICS))
    rounds = {1: {1: first, 2: theirs},
              2: {1: _encrypted_eval(secret, run, 2, "site-0", (30.0, 90, 100)), 2: first}}  # round 1's, replayed
    for server_round, content in rounds.items():
        strategy.writer.open_round(server_round, [], 0)
        sent = strategy.configure_evaluate(server_round, ArrayRecord(GLOBAL), ConfigRecord(), LocalGrid([1, 2]))
        assert all(m.content[P.TASK][P.ENC_RUN] == run for m in sent)  # type: ignore[index]
        strategy.aggregate_evaluate(server_round, answers(sent, content))
    with strategy.writer.store.session() as s:
        stored = s.scalars(select(S.EncryptedMetric).order_by(S.EncryptedMetric.round_number)).all()
        codes = s.scalars(select(S.Participation.reason_code).where(S.Participation.status == "rejected")).all()
    assert [m.sites for m in stored] == [1, 1] and codes == ["ckks-integrity", "ckks-integrity"]
    sums = [secret.decrypt(EncryptedVector(coord.key_id, 3, (m.ciphertext,))) * 1000 for m in stored]
    assert sums[0] == pytest.approx([40.0, 80, 100], abs=1e-3)
    assert sums[1] == pytest.approx([30.0, 90, 100], abs=1e-3)


# -- the edge holds: poisoned, inflated or under-reported replies are rejected with a reason ------

DECLARED = P.BudgetStatus("site-0", "d" * 16, 100, 1e-5, "pld", 4.0, 0.0, 1.0, 0.1, 10, 3.0, 3)


def _privacy(**kw: object) -> ConfigRecord:
    rec = P.PrivacyReport(EVENT, 1e-5, "pld", "x", EPS, lifetime=LIFE).to_config()
    for key, value in kw.items():
        rec[key] = value  # type: ignore[assignment]
    return rec


def _metrics(**kw: float) -> MetricRecord:
    return MetricRecord({P.NUM_EXAMPLES: 10, P.TRAIN_LOSS: 0.5, P.EPSILON: EPS, **kw})


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


TASK = P.TrainTask("mlp", 1, 30, 0.1, 0.0, 1.0, 1.0, 0.0, 1e-5, "pld", 3, 0)
KW = {"encrypted": False, "expected": checks.layout(ArrayRecord(GLOBAL)), "rng": "os-entropy"}


@pytest.mark.parametrize(("overrides", "task_delta", "code", "message"), [
    # issue 14: a site that reports ε at its own δ under-reports it (δ 0.5 gave ε = 0)
    ({P.PRIVACY: _privacy(delta=0.5, epsilon=0.0)}, 1e-5, "wrong-accounting", "δ=0.5, but this run's δ"),
    ({P.PRIVACY: _privacy(delta=0.09)}, 1e-5, "wrong-accounting", "δ=0.09"),
    ({P.PRIVACY: _privacy(delta=1e-6)}, 0.0, "wrong-accounting", "for 10 examples is 1e-05"),  # site default
    ({P.PRIVACY: _privacy(delta=1e-5 * (1 + 1e-6))}, 1e-5, "wrong-accounting", "this run's δ"),
    ({P.SITE: P.SiteInfo("site-9", "cpu", 0.1, 3).to_config()}, 1e-5, "wrong-site", "'site-9'.*'site-0'"),
    ({P.PRIVACY: _privacy(**{"lifetime-epsilon": 0.0})}, 1e-5, "understated-epsilon", "lifetime ε 0, below"),
    ({P.PRIVACY: _privacy(**{"lifetime-epsilon": EPS * (1 - 1e-6)})}, 1e-5, "understated-epsilon",
     "below its run ε"),
    ({P.METRICS: _metrics(**{P.EPSILON: 0.0})}, 1e-5, "understated-epsilon", "metric ε 0 is not"),
    ({P.METRICS: _metrics(**{P.EPSILON: EPS * 2})}, 1e-5, "understated-epsilon", "metric ε .* is not"),
    ({P.PRIVACY: _privacy(epsilon=float("inf"))}, 1e-5, "understated-epsilon", "must be finite"),
    ({P.PRIVACY: _privacy(accountant="rdp", epsilon=epsilon([EVENT], 1e-5, "rdp"))}, 1e-5, "wrong-accounting",
     "'rdp' is not the task's 'pld'"),
    # every other rejection has its code too
    ({P.SITE: None}, 1e-5, "invalid-site", "no site record"),
    ({P.ARRAYS: None}, 1e-5, "invalid-update", "no arrays record"),
    ({P.ARRAYS: ArrayRecord({"w": torch.full((2, 3), float("nan"))})}, 1e-5, "invalid-update", "NaN"),
    ({P.METRICS: _metrics(**{P.TRAIN_LOSS: -1.0})}, 1e-5, "invalid-metrics", "finite number >= 0"),
    ({P.METRICS: None}, 1e-5, "invalid-metrics", "no metrics record"),
    ({P.METRICS: _metrics(**{P.NUM_EXAMPLES: 101})}, 1e-5, "over-declared", "more than the 100"),
    ({P.PRIVACY: None}, 1e-5, "invalid-privacy-report", "no privacy record"),
    ({P.PRIVACY: _privacy(accountant="gdp")}, 1e-5, "invalid-privacy-report", "not one of"),
    ({P.PRIVACY: P.PrivacyReport(EVENT, 1e-5, "pld", "x", EPS, lifetime=LIFE, rng="seeded").to_config()},
     1e-5, "seeded-noise", "from the seed"),
    ({P.PRIVACY: _privacy(**{"noise-multiplier": 0.5})}, 1e-5, "wrong-mechanism", "below the task's"),
    ({P.PRIVACY: _privacy(**{"sample-rate": 0.2})}, 1e-5, "wrong-mechanism", "declared"),
    ({P.PRIVACY: _privacy(epsilon=EPS / 2)}, 1e-5, "understated-epsilon", "its events imply"),
    ({P.PRIVACY: _privacy(**{"lifetime-epsilon": 5.0})}, 1e-5, "over-cap", "above its own cap"),
])
def test_every_rejection_has_its_code_and_the_run_delta_site_and_epsilons_hold(
        overrides: dict, task_delta: float, code: str, message: str) -> None:
    from dataclasses import replace

    task = replace(TASK, delta=task_delta)
    with pytest.raises(checks.ReplyRejected, match=message) as caught:
        checks.check_train_reply(_reply(**overrides), task=task, declared=DECLARED, **KW)  # type: ignore[arg-type]
    assert caught.value.code == code and checks.rejection_code(caught.value) == code
    assert checks.check_train_reply(_reply(), task=task, declared=DECLARED, **KW).report.delta == 1e-5  # type: ignore[arg-type]


def test_honest_variants_still_pass() -> None:
    """A lifetime at another δ may be below the run ε; the site default δ is min(1e-5, 0.1/n); a
    task without an accountant check (none given) takes the site's."""
    from dataclasses import replace

    other_delta = _privacy(**{"lifetime-epsilon": 1.0, "lifetime-delta": 1e-3})
    assert checks.check_train_reply(_reply(**{P.PRIVACY: other_delta}), task=TASK, declared=DECLARED, **KW)  # type: ignore[arg-type]
    big = P.BudgetStatus("site-0", "d" * 16, 100_000, 1e-5, "pld", None, 0.0, 1.0, 0.1, 10, 3.0, 3)
    small_delta = epsilon([EVENT], 1e-6, "pld")
    reply = _reply(**{P.PRIVACY: _privacy(delta=1e-6, epsilon=small_delta, **{"lifetime-epsilon": small_delta}),
                      P.METRICS: _metrics(**{P.NUM_EXAMPLES: 100_000, P.EPSILON: small_delta})})
    assert checks.check_train_reply(reply, task=replace(TASK, delta=0.0), declared=big, **KW).report.delta == 1e-6  # type: ignore[arg-type]


def test_rejection_codes_all_have_help_and_fit_the_column() -> None:
    assert all(help_text and len(code) <= 32 for code, help_text in checks.REJECTION_CODES.items())
    with pytest.raises(ValueError, match="rejection code must be one of"):
        checks.ReplyRejected("no-such-code", "x")


def test_a_second_round_must_report_the_epsilon_of_both_events() -> None:
    """ε over the site's events in this run: reporting only the latest round's ε is an under-statement."""
    kw = {"encrypted": False, "expected": checks.layout(ArrayRecord(GLOBAL)), "rng": "os-entropy"}
    with pytest.raises(ValueError, match="its events imply"):
        checks.check_train_reply(_reply(), history=[EVENT], **kw)  # type: ignore[arg-type]
    both = epsilon([EVENT, EVENT], 1e-5, "pld")
    both_reply = _reply(**{P.PRIVACY: _privacy(epsilon=both, **{"lifetime-epsilon": both}),
                           P.METRICS: _metrics(**{P.EPSILON: both})})
    assert checks.check_train_reply(both_reply, history=[EVENT], **kw).report.epsilon == both  # type: ignore[arg-type]


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


def _evaluation(n: float, acc: float = 0.5, site: str = "site-0") -> RecordDict:
    return RecordDict({P.METRICS: MetricRecord({P.NUM_EXAMPLES: n, P.EVAL_LOSS: 0.3, P.EVAL_ACC: acc}),
                       P.SITE: P.SiteInfo(site, "cpu", 0.1, 3).to_config()})


@pytest.mark.parametrize(("n", "num_test", "site", "code"), [
    (1e15, 0, "site-0", "over-declared"),  # issue 14: one site's weight dragged global accuracy to ~0
    (901, 0, "site-0", "over-declared"),  # 9 x the 100 training records it declared
    (4, 3, "site-0", "over-declared"),  # its training reply said 3 test records
    (2, 3, "site-0", "over-declared"),
    (3, 3, "site-9", "wrong-site"),
    (2.5, 0, "site-0", "invalid-evaluation"),
])
def test_evaluation_weight_is_bounded_by_what_the_site_declared(n: float, num_test: int, site: str,
                                                                code: str) -> None:
    with pytest.raises(checks.ReplyRejected) as caught:
        checks.check_evaluate_reply(_evaluation(n, site=site), declared=DECLARED, num_test=num_test)
    assert caught.value.code == code
    assert checks.check_evaluate_reply(_evaluation(900), declared=DECLARED).num_examples == 900
    assert checks.check_evaluate_reply(_evaluation(3), declared=DECLARED, num_test=3).num_examples == 3


def test_the_strategy_records_every_rejection_code_and_keeps_the_honest_accuracy(
        strategy: RecordingStrategy) -> None:
    """Through the strategy: a forwarded reply (wrong site), an inflated evaluation and a malformed
    refusal are rejected with their codes; the global accuracy is the honest sites' alone."""
    from server.budget import ParticipationPlan, SiteStanding

    status = {n: P.BudgetStatus(f"site-{n - 1}", "d" * 16, 100, 1e-5, "pld", 4.0, 0.0, 1.0, 0.1, 10, 3.0, 3)
              for n in (1, 2, 3)}
    strategy.plan = ParticipationPlan({n: SiteStanding(n, st) for n, st in status.items()},
                                      rounds=1, per_round=3, min_sites=1, mode="drop", seed=0)
    bad_refusal = RecordDict({P.REFUSAL: ConfigRecord({"code": "no-such"}),
                              P.SITE: P.SiteInfo("site-2", "cpu", 0.0).to_config()})
    arrays, _ = _train(strategy, [1, 2, 3], {1: _reply(), 2: _reply(), 3: bad_refusal})  # 2 forwards site-0's
    assert arrays is not None
    sent = strategy.configure_evaluate(1, ArrayRecord(GLOBAL), ConfigRecord(), LocalGrid([1, 2]))
    metrics = strategy.aggregate_evaluate(1, answers(sent, {1: _evaluation(4, 0.9),  # site-0 said 3 test records
                                                           2: _evaluation(1e15, 0.0, site="site-1")}))
    assert metrics is None  # nothing usable: neither moves the global accuracy
    with strategy.writer.store.session() as s:
        rows = sorted((p.phase, p.reason_code or "") for p in s.scalars(select(S.Participation))
                      if p.status == "rejected")
    assert rows == [("evaluate", "over-declared"), ("evaluate", "over-declared"),
                    ("train", "invalid-refusal"), ("train", "wrong-site")]


def test_an_inflated_evaluation_does_not_move_the_global_accuracy(strategy: RecordingStrategy) -> None:
    from server.budget import ParticipationPlan, SiteStanding

    status = {n: P.BudgetStatus(f"site-{n - 1}", "d" * 16, 100, 1e-5, "pld", 4.0, 0.0, 1.0, 0.1, 10, 3.0, 3)
              for n in (1, 2)}
    strategy.plan = ParticipationPlan({n: SiteStanding(n, st) for n, st in status.items()},
                                      rounds=1, per_round=2, min_sites=1, mode="drop", seed=0)
    strategy.writer.open_round(1, [], 0)
    sent = strategy.configure_evaluate(1, ArrayRecord(GLOBAL), ConfigRecord(), LocalGrid([1, 2]))
    metrics = strategy.aggregate_evaluate(1, answers(sent, {1: _evaluation(20, 0.9),
                                                           2: _evaluation(1e15, 0.0, site="site-1")}))
    assert metrics is not None and metrics[P.EVAL_ACC] == pytest.approx(0.9)


@pytest.mark.parametrize("rule", ["none", "norm-bound", "trimmed-mean"])
def test_a_poisoning_site_moves_the_model_only_as_far_as_the_rule_lets_it(tmp_path, rule: str) -> None:  # type: ignore[no-untyped-def]
    """Four honest sites send GLOBAL + 1 (update norm sqrt(6)); one sends GLOBAL + 1e5, finite
    and within the value bound, so every check passes it. The rule decides what it can do."""
    from flwr.serverapp.strategy import FedAvg

    from server.robust import RobustRule

    store = RunStore(f"sqlite:///{tmp_path / 's.db'}")
    run_id = store.create_run(name="t", spec={}, spec_hash="0" * 64, seed=0, num_sites=5, num_rounds=1)
    strategy = RecordingStrategy(FedAvg(), RoundWriter(store, run_id, num_rounds=1, min_sites=1),
                                 robust=RobustRule(rule, max_update_norm=3.0, trim_fraction=0.2))  # type: ignore[arg-type]

    def site(i: int, value: float) -> RecordDict:
        return _reply(**{P.ARRAYS: ArrayRecord({"w": torch.full((2, 3), value)}),
                         P.SITE: P.SiteInfo(f"site-{i}", "cpu", 0.1, 3).to_config()})

    replies = {i: site(i, 1.0) for i in range(1, 5)} | {5: site(5, 1e5)}
    arrays, _ = _train(strategy, [1, 2, 3, 4, 5], replies)
    assert arrays is not None
    got = arrays.to_torch_state_dict()["w"]
    expected = {
        "none": (4 * 1.0 + 1e5) / 5,  # FedAvg, equal weights: the poisoner owns the model
        # each honest delta has norm sqrt(6) < 3 and stays; the poisoner's is scaled to norm 3,
        # i.e. 3 / sqrt(6) per coordinate, then the equal-weight mean
        "norm-bound": (4 * 1.0 + 3.0 / 6 ** 0.5) / 5,
        "trimmed-mean": 1.0,  # 20% of 5 = 1 dropped at each end: the honest value
    }[rule]
    assert torch.allclose(got, torch.full((2, 3), expected), rtol=1e-6)
    assert got.dtype == torch.float32


def test_robust_aggregation_refuses_encrypted_updates(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from flwr.serverapp.strategy import FedAvg

    from server.robust import RobustRule

    store = RunStore(f"sqlite:///{tmp_path / 's.db'}")
    run_id = store.create_run(name="t", spec={}, spec_hash="0" * 64, seed=0, num_sites=1, num_rounds=1)
    with pytest.raises(ValueError, match="cannot run on encrypted updates"):
        RecordingStrategy(FedAvg(), RoundWriter(store, run_id, num_rounds=1, min_sites=1),
                          cipher=object(), encrypted_train=True,  # type: ignore[arg-type]
                          robust=RobustRule("trimmed-mean"))
