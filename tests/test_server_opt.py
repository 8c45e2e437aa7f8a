"""Server optimisers (``veil.server_opt``): each step against a hand-computed one and against
Flower's own strategies, and the encrypted protocol (state carried in the CKKS stream, the step
applied by whoever decrypts) against the plaintext one, with real ciphertexts."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvgM, FedYogi

from tests.flowerkit import in_a_run
from veil import protocol as P
from veil.errors import ScenarioError
from veil.server_opt import ServerOptimizer, ServerState, decode_aggregate, server_step
from veil.spec import parse_scenario


def _steps(opt: ServerOptimizer, x0: list[float], means: list[list[float]]) -> list[np.ndarray]:
    state = ServerState.initial(opt, np.array(x0))
    out = []
    for mean in means:
        x, state = server_step(opt, state, np.array(mean))
        out.append(x)
    return out


def test_fedavg_takes_the_mean_as_the_model() -> None:
    opt = ServerOptimizer()
    assert not opt.stateful and opt.state_values(10) == 0
    (x,) = _steps(opt, [1.0, 2.0], [[0.5, 3.0]])
    assert list(x) == [0.5, 3.0]


def test_fedavgm_by_hand() -> None:
    opt = ServerOptimizer("fedavgm", learning_rate=0.5, momentum=0.9)
    x1, x2 = _steps(opt, [1.0], [[3.0], [4.0]])
    # round 1: Δ = 2, m = 2, x = 1 + 0.5·2 = 2;  round 2: Δ = 4 − 2 = 2, m = 0.9·2 + 2 = 3.8, x = 2 + 1.9
    assert x1[0] == pytest.approx(2.0) and x2[0] == pytest.approx(3.9)


def test_fedadam_by_hand() -> None:
    opt = ServerOptimizer("fedadam", learning_rate=0.1, momentum=0.9, beta2=0.99, tau=1e-3)
    x1, x2 = _steps(opt, [0.0], [[0.2], [0.1]])
    # round 1 (t = 1): Δ = 0.2, m = 0.02, v = 0.0004, η·√(1 − 0.99²)/(1 − 0.9²)
    m, v = 0.1 * 0.2, 0.01 * 0.04
    eta = 0.1 * math.sqrt(1 - 0.99**2) / (1 - 0.9**2)
    first = eta * m / (math.sqrt(v) + 1e-3)
    assert x1[0] == pytest.approx(first, rel=1e-12)
    # round 2 (t = 2): Δ = 0.1 − x1
    d = 0.1 - first
    m, v = 0.9 * m + 0.1 * d, 0.99 * v + 0.01 * d * d
    eta = 0.1 * math.sqrt(1 - 0.99**3) / (1 - 0.9**3)
    assert x2[0] == pytest.approx(first + eta * m / (math.sqrt(v) + 1e-3), rel=1e-12)


def test_fedyogi_by_hand() -> None:
    opt = ServerOptimizer("fedyogi", learning_rate=0.01, momentum=0.9, beta2=0.99, tau=1e-3)
    x1, x2 = _steps(opt, [0.0], [[0.2], [0.0]])
    m, v = 0.02, 0.01 * 0.04  # v = 0 − 0.01·0.04·sign(0 − 0.04)
    first = 0.01 * m / (math.sqrt(v) + 1e-3)
    assert x1[0] == pytest.approx(first, rel=1e-12)
    d = 0.0 - first
    m = 0.9 * m + 0.1 * d
    v = v - 0.01 * d * d * np.sign(v - d * d)
    assert x2[0] == pytest.approx(first + 0.01 * m / (math.sqrt(v) + 1e-3), rel=1e-12)


def _flower_reply(arrays: dict[str, np.ndarray], n: int) -> Message:
    in_a_run()
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": n})})
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


@pytest.mark.parametrize("rule", ["fedavgm", "fedadam", "fedyogi"])
def test_each_step_equals_flowers_strategy(rule: str) -> None:
    """Three rounds of two sites' replies: Flower's strategy and Veil's step give the same model."""
    rng = np.random.default_rng(7)
    shapes = {"w": (3, 4), "b": (4,)}
    x = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    if rule == "fedavgm":
        flower = FedAvgM(server_learning_rate=0.7, server_momentum=0.9)
        flower.current_arrays = ArrayRecord({k: Array(v) for k, v in x.items()})
        opt = ServerOptimizer("fedavgm", 0.7, 0.9)
    else:
        cls = FedAdam if rule == "fedadam" else FedYogi
        flower = cls(eta=0.05, beta_1=0.9, beta_2=0.99, tau=1e-3)
        opt = ServerOptimizer(rule, 0.05, 0.9, 0.99, 1e-3)  # type: ignore[arg-type]
    state = ServerState.initial(opt, np.concatenate([v.ravel() for v in x.values()]).astype(np.float64))
    for server_round in (1, 2, 3):
        if rule != "fedavgm":
            flower.current_arrays = {k: v.copy() for k, v in x.items()}  # what configure_train does
        sites = [({k: v + rng.normal(scale=0.1, size=v.shape).astype(np.float32) for k, v in x.items()}, n)
                 for n in (30, 50)]
        ours_mean = sum(n * np.concatenate([a[k].astype(np.float64).ravel() for k in shapes])
                        for a, n in sites) / 80
        theirs, _ = flower.aggregate_train(server_round, [_flower_reply(a, n) for a, n in sites])
        assert theirs is not None
        ours, state = server_step(opt, state, ours_mean)
        flat = np.concatenate([theirs[k].numpy().ravel() for k in shapes]).astype(np.float64)
        assert np.max(np.abs(flat - ours)) < 1e-5  # Flower computes in float32
        x = {k: theirs[k].numpy() for k in shapes}
        state.x = flat  # both go on from the same float32 model


def test_state_stream_round_trips_and_carries_sqrt_v() -> None:
    opt = ServerOptimizer("fedadam", 0.1, 0.9)
    state = ServerState(np.array([1.0, -2.0]), np.array([0.1, 0.2]), np.array([1e-8, 4.0]), 5)
    stream = state.to_stream(opt)
    assert stream.size == opt.state_values(2) == 7 and stream[4:6].tolist() == [1e-4, 2.0]
    back = ServerState.from_stream(opt, stream, 2)
    assert back.t == 5 and np.allclose(back.v, state.v, rtol=1e-12) and np.array_equal(back.x, state.x)
    with pytest.raises(ValueError, match="holds 7 values"):
        ServerState.from_stream(opt, stream[:-1], 2)
    with pytest.raises(ValueError, match="needs 9"):
        decode_aggregate(opt, stream, 2)


@pytest.mark.parametrize(("rule", "momentum", "vectors"), [("fedavgm", 0.9, 2), ("fedavgm", 0.0, 1),
                                                      ("fedadam", 0.9, 3), ("fedyogi", 0.0, 2)])
def test_the_stream_carries_m_only_with_momentum_and_t_within_the_headroom(rule: str, momentum: float,
                                                                          vectors: int) -> None:
    """β = 0 never reads m, so it does not travel (the encrypted default sends 2x, not 3x); t
    travels scaled, so the spec's 10,000 rounds stay inside CKKS's ±64 (t = 65 once failed)."""
    opt = ServerOptimizer(rule, 0.5, momentum)  # type: ignore[arg-type]
    rng = np.random.default_rng(0)
    state = ServerState.initial(opt, rng.normal(size=5))
    for _ in range(3):
        _, state = server_step(opt, state, state.x + rng.normal(scale=0.1, size=5))
    state.t = 10_000
    stream = state.to_stream(opt)
    assert stream.size == opt.state_values(5) == vectors * 5 + 1 and abs(stream[-1]) < 64
    back = ServerState.from_stream(opt, stream + 1e-6, 5)  # a decrypted mean is rounded, not exact
    assert back.t == 10_000 and np.allclose(back.x, state.x, atol=1e-5)
    assert np.allclose(back.m, state.m if momentum else 0.0, atol=1e-5)
    nxt = state.x + 0.01
    assert np.allclose(server_step(opt, back, nxt)[0], server_step(opt, state, nxt)[0], atol=1e-4)


@pytest.mark.parametrize("rule", ["fedavg", "fedavgm", "fedavgm-0", "fedadam", "fedyogi"])
def test_encrypted_protocol_gives_the_plaintext_model_within_ckks_precision(rule: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Four rounds, three sites with different weights, one site missing round 3 (it reads the
    state back from the aggregate): the coordinator only adds ciphertexts, each site decrypts
    and steps; the model equals the plaintext run's within the CKKS release precision."""
    from privacy.ckks import CoordinatorContext, ReplyBinding, SecretKey, create_keyset

    made = create_keyset(tmp_path / "keys")
    secret, coordinator = SecretKey.load(made.secret), CoordinatorContext.load(made.coordinator)
    opt = ServerOptimizer(rule.removesuffix("-0"), *{"fedavg": (1.0, 0.0), "fedavgm": (0.8, 0.9),  # type: ignore[arg-type]
                                                    "fedavgm-0": (2.0, 0.0), "fedadam": (0.05, 0.9),
                                                    "fedyogi": (0.05, 0.9)}[rule])
    params, weights = 300, {"a": 0.2, "b": 0.3, "c": 0.5}
    rng = np.random.default_rng(1)
    x0 = rng.normal(size=params)
    plain_state = ServerState.initial(opt, x0)
    plain_x = x0.copy()
    aggregate = None  # the encrypted global model (None: round 1 sends the public initial model)
    for server_round in (1, 2, 3, 4):
        joined = [s for s in weights if not (server_round == 3 and s == "a")]
        updates = {s: rng.normal(scale=0.05, size=params) for s in joined}  # each site's training
        streams = []
        for site in joined:
            if aggregate is None:
                x, state = x0.copy(), ServerState.initial(opt, x0) if opt.stateful else None
            else:
                mean, _ = secret.decrypt_mean(aggregate)
                x, state = decode_aggregate(opt, mean, params)
            tail = state.to_stream(opt) if state is not None else np.zeros(0)
            w = weights[site]
            enc = secret.encrypt(np.append(np.concatenate([x + updates[site], tail]) * w, w))
            binding = ReplyBinding("run-1", server_round, site, "update")
            streams.append(coordinator.parse(enc, enc.values, tag=secret.tag(enc, binding), binding=binding))
        aggregate = coordinator.add(streams)
        total = sum(weights[s] for s in joined)
        mean = sum(weights[s] * (plain_x + updates[s]) for s in joined) / total
        plain_x, plain_state = server_step(opt, plain_state, mean)
        decoded, _ = decode_aggregate(opt, secret.decrypt_mean(aggregate)[0], params)
        # the release rounds every value to 2^-28 (3.7e-9); the adaptive steps amplify that ~100x over
        # four rounds, still 1e-4 of a step here (~0.05)
        assert np.max(np.abs(decoded - plain_x)) < 1e-5, server_round


def test_scenario_server_optimizer_defaults_and_errors() -> None:
    s = parse_scenario({"server_optimizer": {"rule": "fedadam"}})
    assert s.server_optimizer.optimizer() == ServerOptimizer("fedadam", 0.1, 0.9, 0.99, 1e-3)
    task = P.TrainTask.from_scenario(s)
    assert P.TrainTask.from_config(task.to_config()).server_optimizer() == s.server_optimizer.optimizer()
    with pytest.raises(ScenarioError, match="plain fedavg takes the mean"):
        parse_scenario({"server_optimizer": {"rule": "fedavg", "learning_rate": 0.5}})
    assert parse_scenario({"server_optimizer": {"rule": "fedavgm"}}).server_optimizer.optimizer().momentum == 0.0
    assert parse_scenario({"server_optimizer": {"rule": "fedyogi"}}).server_optimizer.optimizer().momentum == 0.9
    # plain fedavg reads no momentum (specs stored before the per-rule default say 0.9 there)
    assert parse_scenario({"server_optimizer": {"rule": "fedavg", "momentum": 0.9}}).server_optimizer.optimizer(
    ) == ServerOptimizer()
    with pytest.raises(ScenarioError, match=r"server_optimizer\.rule"):
        parse_scenario({"server_optimizer": {"rule": "sgd"}})
    rec = task.to_config()
    for key in P.server_fields(ServerOptimizer()):
        del rec[key]
    assert P.TrainTask.from_config(rec).server_optimizer() == ServerOptimizer()  # an older coordinator
    rec = task.to_config()
    rec["server_momentum"] = 1.0
    with pytest.raises(ValueError, match="momentum must be a number in"):
        P.TrainTask.from_config(rec)
