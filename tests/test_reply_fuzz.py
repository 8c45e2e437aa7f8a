"""Fuzzing the coordinator's edge: generated training and evaluation replies, plaintext and
CKKS-encrypted, most of them almost right, go through the real checks. Whatever comes in: the
only failure is a ValueError with a reason (never another exception, which would abort a run),
everything accepted is within bounds, the average of what was accepted is finite, and no
ciphertext is added without the run's key set's tag for its site, run, round and kind. Pre-flight
budget answers go through the coordinator's parsing and participation plan the same way."""

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
LIFE = P.LifetimeSpend("d" * 16, "e" * 32, 3.0, 1e-5, "pld", 4.0, HEAD)  # lifetime >= the run's EPS

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
        assert checks.rejection_code(err) in checks.REJECTION_CODES  # and a code
        return
    assert 1 <= reply.num_examples <= DECLARED.num_examples and reply.info.site_id == DECLARED.site_id
    ev, report = reply.report.event, reply.report
    assert ev.noise_multiplier >= TASK.noise_multiplier and ev.max_grad_norm == TASK.max_grad_norm
    assert (report.delta, report.accountant) == (TASK.delta, TASK.accountant)  # the run's, not the site's own
    # the oracle: the TASK's δ and accountant, whatever the reply says
    implied = epsilon([ev], TASK.delta, TASK.accountant)
    assert math.isfinite(report.epsilon) and report.epsilon >= implied * (1 - 1e-6) - 1e-9
    assert P.metric(content, P.EPSILON) == pytest.approx(report.epsilon, rel=1e-9)
    life = reply.lifetime
    assert (life.epsilon >= report.epsilon * (1 - 1e-9)
            or (life.delta, life.accountant) != (report.delta, report.accountant))
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
        reply = checks.check_evaluate_reply(content, declared=DECLARED)
    except ValueError as err:
        assert str(err) and checks.rejection_code(err) in checks.REJECTION_CODES
        return
    assert 1 <= reply.num_examples <= checks.MAX_TEST_RATIO * DECLARED.num_examples
    assert 0.0 <= reply.accuracy <= 1.0 and reply.info.site_id == DECLARED.site_id
    assert math.isfinite(reply.loss) and reply.loss >= 0


# -- encrypted replies (CKKS): tags, key ids and bytes from a hostile site or network --------------

RUN = "run-1:0011223344556677"
TAG_CHOICES = ["honest", "missing", "random", "short", "not-bytes", "other-round", "other-site", "other-run",
               "other-kind", "intruder"]


@pytest.fixture(scope="module")
def ckks(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The run's key set (secret, coordinator context), another key set's secret, and a pool of streams."""
    from privacy.ckks import CoordinatorContext, SecretKey, create_keyset

    base = tmp_path_factory.mktemp("fuzz-keys")
    run_set, other = create_keyset(base / "run"), create_keyset(base / "other")
    secret, intruder = SecretKey.load(run_set.secret), SecretKey.load(other.secret)
    pool = {kind: [secret.encrypt(np.linspace(-1, 1, n)), intruder.encrypt(np.full(n, 3.0)),
                   secret.encrypt(np.linspace(-1, 1, n + 1))]
            for kind, n in (("update", 7), ("eval-sums", len(P.EVAL_SUMS)))}
    return secret, CoordinatorContext.load(run_set.coordinator), intruder, pool


@st.composite
def encrypted_replies(draw: st.DrawFn, pool: dict, secret, intruder):  # type: ignore[no-untyped-def]
    """(content, kind, vouched): ``vouched`` when a key holder of the run's set tagged exactly these
    bytes for this run, round 1, this kind and the site the reply names (the only replies that may pass)."""
    from privacy.ckks import EncryptedVector, ReplyBinding

    kind = draw(st.sampled_from(["update", "eval-sums"]))
    base = draw(st.sampled_from(pool[kind]))
    chunks = [bytearray(c) for c in base.chunks]
    for _ in range(draw(st.integers(0, 2))):  # byte-level damage
        i = draw(st.integers(0, len(chunks) - 1))
        how = draw(st.sampled_from(["flip", "cut", "splice", "replace", "drop", "double"]))
        blob = chunks[i]
        at = draw(st.integers(0, max(len(blob) - 1, 0)))
        if how == "flip" and blob:
            blob[at] ^= 1 << draw(st.integers(0, 7))
        elif how == "cut":
            del blob[at:]
        elif how == "splice":
            blob[at:at] = draw(st.binary(min_size=1, max_size=32))
        elif how == "replace":
            chunks[i] = bytearray(draw(st.binary(max_size=64)))
        elif how == "drop" and len(chunks) > 1:
            del chunks[i]
        elif how == "double":
            chunks.append(bytearray(blob))
    key_id = draw(st.sampled_from([secret.key_id, secret.key_id, intruder.key_id, "0" * 16]))
    enc = EncryptedVector(key_id, draw(st.sampled_from([base.values, base.values, 1, 2**31])),
                          tuple(bytes(c) for c in chunks))
    right = ReplyBinding(RUN, 1, "site-0", kind)
    choice = draw(st.sampled_from(TAG_CHOICES))
    tag: object = {
        "honest": lambda: secret.tag(enc, right),
        "missing": lambda: None,
        "random": lambda: draw(st.binary(min_size=32, max_size=32)),
        "short": lambda: secret.tag(enc, right)[:31],
        "not-bytes": lambda: draw(JUNK.filter(lambda v: v is not None and not isinstance(v, bytes))),
        "other-round": lambda: secret.tag(enc, ReplyBinding(RUN, 2, "site-0", kind)),
        "other-site": lambda: secret.tag(enc, ReplyBinding(RUN, 1, "site-1", kind)),
        "other-run": lambda: secret.tag(enc, ReplyBinding("run-2:8899aabbccddeeff", 1, "site-0", kind)),
        "other-kind": lambda: secret.tag(enc, ReplyBinding(RUN, 1, "site-0",
                                                           "update" if kind == "eval-sums" else "eval-sums")),
        "intruder": lambda: intruder.tag(enc, right),
    }[choice]()
    record = P.encrypted_record(enc)
    if tag is not None:
        record["tag"] = tag  # type: ignore[assignment]
    intact = True
    if draw(st.integers(0, 5)) == 0:  # a field of the record itself is junk
        field = draw(st.sampled_from(["key-id", "values", "chunks"]))
        junk, before = draw(JUNK.filter(lambda v: v is not None)), record[field]
        record[field] = junk  # type: ignore[assignment]
        intact = type(junk) is type(before) and junk == before  # junk may draw the very value it replaces
    site_id = draw(st.sampled_from(["site-0", "site-0", "site-1"]))
    content = {P.ENC_UPDATE if kind == "update" else P.ENC_METRICS: record,
               P.SITE: P.SiteInfo(site_id, "cpu", 0.1, 0).to_config()}
    expected = secret.tag(enc, ReplyBinding(RUN, 1, site_id, kind))  # for the site the reply names
    vouched = intact and key_id == secret.key_id and tag == expected
    return RecordDict(content), kind, vouched  # type: ignore[arg-type]


@pytest.mark.slow
def test_no_encrypted_reply_crashes_the_coordinator_or_gets_added_without_a_valid_tag(ckks) -> None:  # type: ignore[no-untyped-def]
    from privacy.ckks import ReplyBinding, ReplyIntegrityError

    secret, cipher, intruder, pool = ckks
    honest = {}
    for kind, streams in pool.items():
        binding = ReplyBinding(RUN, 1, "site-0", kind)
        honest[kind] = cipher.parse(streams[0], streams[0].values, tag=secret.tag(streams[0], binding),
                                    binding=binding)
    seen = {"accepted": 0, "integrity": 0, "malformed": 0}

    @settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(encrypted_replies(pool, secret, intruder))
    def one(drawn) -> None:  # type: ignore[no-untyped-def]
        content, kind, vouched = drawn
        values = pool[kind][0].values
        try:
            if kind == "update":
                parsed = checks.parse_update(content, cipher, values, run=RUN, server_round=1)
            else:
                _, _, parsed = checks.check_encrypted_evaluate_reply(content, cipher, run=RUN, server_round=1)
        except ValueError as err:
            assert str(err)  # a reason, recorded for the site
            integrity = isinstance(err, ReplyIntegrityError)
            code = checks.rejection_code(err)
            assert code in checks.REJECTION_CODES and (code == "ckks-integrity") == integrity
            assert not (integrity and vouched)  # a key holder's tag on exactly these bytes is never refused
            seen["integrity" if integrity else "malformed"] += 1
            return
        assert vouched  # nothing without the run's key set's tag for its site, run, round 1 and kind is added
        seen["accepted"] += 1
        total = cipher.add([parsed, honest[kind]])  # and adding it does not crash either (consumes ``parsed``)
        assert total.values == values

    one()
    assert all(seen.values()) and sum(seen.values()) >= 1000, seen


# -- pre-flight budget answers: whatever a site declares, the plan stays within bounds ---------------

PLANNED = 5
HONEST_BUDGET = P.BudgetStatus("site-0", "d" * 16, 100, 1e-5, "pld", 4.0, 0.5, 1.0, 0.1, 10, 3.0, 3, ledger=HEAD)
BUDGET_KEYS = sorted({*HONEST_BUDGET.to_config(), "refusal-code", "refusal-detail", "ledger-predecessor"})
HOSTILE = st.sampled_from([0, -1, 1, 2**40, 0.5, 1.0, 1.5, -0.0, 1e-300, 1e300, float("inf"), float("-inf"),
                           float("nan"), 3.0, "", "site-0\n", "\x00", "x" * 201, "budget-exhausted", True])


class PreflightGrid:
    """Each node answers the budget question with the content drawn for it (None: silent)."""

    def __init__(self, contents: dict[int, RecordDict | None]) -> None:
        in_a_run()
        self.contents = contents

    def send_and_receive(self, messages, timeout: float):  # type: ignore[no-untyped-def]
        return [answer(m, c) for m in messages if (c := self.contents[m.metadata.dst_node_id]) is not None]


@st.composite
def budget_answers(draw: st.DrawFn) -> RecordDict | None:
    rec = HONEST_BUDGET.to_config()
    for key in draw(st.lists(st.sampled_from(BUDGET_KEYS), max_size=4, unique=True)):
        value = draw(st.one_of(JUNK, HOSTILE))
        if value is None:
            rec.pop(key, None)
        else:
            rec[key] = value  # type: ignore[assignment]
    kind = draw(st.sampled_from(["budget", "budget", "budget", "refusal", "empty", "silent"]))
    if kind == "silent":
        return None
    if kind == "refusal":
        refusal = ConfigRecord({"code": draw(st.one_of(st.sampled_from(P.REFUSAL_CODES), JUNK.filter(
            lambda v: v is not None))), "detail": "x"})
        site = ConfigRecord(dict(P.SiteInfo("site-0", "cpu", 0.0).to_config()))
        if draw(st.booleans()):
            site["site-id"] = draw(st.one_of(JUNK, HOSTILE).filter(lambda v: v is not None))  # type: ignore[assignment]
        return RecordDict({P.REFUSAL: refusal, P.SITE: site})
    return RecordDict({P.BUDGET: rec} if kind == "budget" else {})


@pytest.mark.slow
@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(budget_answers(), min_size=1, max_size=4), st.sampled_from(["refuse", "drop"]))
def test_no_preflight_answer_escapes_the_parsing_or_puts_the_plan_out_of_bounds(
        answers_: list[RecordDict | None], mode: str) -> None:
    from server.budget import ParticipationPlan, ask_budgets

    nodes = list(range(1, len(answers_) + 1))
    grid = PreflightGrid(dict(zip(nodes, answers_, strict=True)))
    standings = ask_budgets(grid, nodes, TASK.to_config(), timeout=1.0)  # type: ignore[arg-type]
    assert sorted(standings) == nodes
    for st_ in standings.values():
        if st_.status is None:
            assert st_.failure  # a recorded failure, never an exception
            continue
        b = st_.status
        assert 0 < len(b.site_id) <= 200 and b.site_id.isprintable()
        assert all(type(v) is int for v in (b.num_examples, b.steps_per_round, b.affordable_rounds))
        assert b.num_examples >= 1 and b.steps_per_round >= 1 and b.affordable_rounds >= 0
        assert math.isfinite(b.noise_multiplier) and b.noise_multiplier > 0
        assert 0 < b.sample_rate <= 1 and 0 < b.delta < 1
        assert b.spent >= 0 and b.projected >= 0 and (b.cap is None or b.cap > 0)
        assert b.accountant in ("pld", "rdp", "prv")
    plan = ParticipationPlan(standings, rounds=PLANNED, per_round=2, min_sites=1, mode=mode, seed=0)
    for st_ in standings.values():
        assert type(st_.remaining) is int and 0 <= st_.remaining <= PLANNED
        assert st_.status is not None or st_.excluded
        assert len(st_.site_id) > 0 and st_.site_id.isprintable()
    assert all(isinstance(r, str) and r for r in plan.refusal_reasons())
    for server_round in range(1, PLANNED + 1):
        for node in plan.choose(server_round):
            chosen = standings[node]
            assert chosen.status is not None and chosen.excluded is None and chosen.status.refusal is None
            plan.trained(node)
        assert all(0 <= st_.remaining <= PLANNED for st_ in standings.values())


@pytest.mark.parametrize(("key", "value"), [
    ("num-examples", float("inf")), ("affordable-rounds", float("inf")),  # these two were an OverflowError
    ("ledger-seq", float("inf")),  # so was this one
    ("affordable-rounds", 2.5), ("steps-per-round", 0), ("sample-rate", 1.5), ("sample-rate", 0.0),
    ("delta", 1.0), ("noise-multiplier", 0.0), ("noise-multiplier", float("inf")), ("projected", -1.0),
    ("cap", 0.0), ("accountant", "gdp"), ("site-id", "site-0\x1b[2J"), ("site-id", ""),
])
def test_preflight_answers_out_of_bounds_are_malformed(key: str, value: object) -> None:
    rec = HONEST_BUDGET.to_config()
    rec[key] = value  # type: ignore[assignment]
    with pytest.raises(ValueError, match=key):
        P.BudgetStatus.from_config(rec)
    assert P.BudgetStatus.from_config(HONEST_BUDGET.to_config()) == HONEST_BUDGET
