"""Server-side optimisers: FedAvg, FedAvgM, FedAdam and FedYogi as one deterministic step.

Reddi et al., "Adaptive Federated Optimization" (ICLR 2021), Algorithm 2, treat the change a
round makes, Δ = mean(site models) − x, as a pseudo-gradient and let the server run an
optimiser on it. The formulas here are Flower's own (``flwr.serverapp.strategy``: ``FedAvgM``,
``FedAdam`` with its bias correction at exponent t + 1, ``FedYogi``), so a plaintext run could
equally use those strategies; ``tests/test_server_opt.py`` checks the two agree step for step.

Why Veil keeps its own copy: with CKKS on, the coordinator cannot run an optimiser on an
aggregate it cannot read. So the step is a pure function of (x, m, v, t, mean), applied by
whoever holds the plaintext: the coordinator in a plaintext run; every site after decrypting
the aggregate in an encrypted run. The state travels inside the encrypted stream itself:
each site appends its (identical) state x, m, √v, t, pre-weighted like its update, so the
weighted mean of those slots is the state again, and a site that missed rounds (or joins
late) reads the current state from the aggregate it is sent. The coordinator keeps nothing
it could read, and a round without enough replies keeps the previous aggregate, which every
reader decodes to the same model.

√v, not v, travels: decryption releases values rounded to 2^-28, which is a large error on
v ≈ 1e-8 but a negligible one on √v next to τ. t travels as t / 256: every encrypted value must
stay within ±64 once weighted, and 10,000 rounds (the spec's limit) stay below 40 this way
while the rounding error (≈ 1e-6 · 256) is far from the 0.5 that would change t. m travels
only when the momentum (β, β1) is above 0: with β = 0 the step's m is Δ itself, so FedAvgM
with β = 0 costs one extra model-sized vector (x), not two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

ServerRule = Literal["fedavg", "fedavgm", "fedadam", "fedyogi"]
SERVER_RULES: tuple[ServerRule, ...] = ("fedavg", "fedavgm", "fedadam", "fedyogi")
STATE_LAYOUT = 2
"""The layout of the state in an encrypted stream (1: x, m, √v, t, before 2026-12-01; 2: x, m only
when β > 0, √v, t · T_SCALE). Tasks and checkpoints name it; a reader refuses another one."""
T_SCALE = 1.0 / 256
"""The step count t travels as t · T_SCALE (see the module's docstring)."""
DEFAULT_LEARNING_RATE: dict[str, float] = {"fedavg": 1.0, "fedavgm": 1.0, "fedadam": 0.1, "fedyogi": 0.01}
"""Flower's defaults: FedAvgM's server_learning_rate, FedAdam's and FedYogi's eta."""
DEFAULT_MOMENTUM: dict[str, float] = {"fedavg": 0.0, "fedavgm": 0.0, "fedadam": 0.9, "fedyogi": 0.9}
"""Flower's defaults: FedAvgM's server_momentum, FedAdam's and FedYogi's beta_1."""


@dataclass(frozen=True)
class ServerOptimizer:
    """One server update rule and its hyper-parameters.

    ``momentum`` is FedAvgM's server momentum β, or β1 for FedAdam/FedYogi; ``beta2`` and
    ``tau`` (the adaptivity ε of Reddi et al.) apply to FedAdam/FedYogi only."""

    rule: ServerRule = "fedavg"
    learning_rate: float = 1.0
    momentum: float = 0.0
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        if self.rule not in SERVER_RULES:
            raise ValueError(f"server optimiser must be one of {SERVER_RULES}, got {str(self.rule)[:40]!r}")
        for name, value, lo, hi in (("learning_rate", self.learning_rate, 0.0, 100.0),
                                    ("momentum", self.momentum, 0.0, 1.0), ("beta2", self.beta2, 0.0, 1.0),
                                    ("tau", self.tau, 0.0, 1.0)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value < hi:
                raise ValueError(f"server optimiser {name} must be a number in [{lo:g}, {hi:g}), got {value!r}")
        if self.rule in ("fedadam", "fedyogi") and not self.tau > 0:
            raise ValueError("server optimiser tau must be > 0 for fedadam and fedyogi")

    @property
    def stateful(self) -> bool:
        """Whether the step needs more than the mean (plain FedAvg: the mean is the model)."""
        return self.rule != "fedavg"

    @property
    def adaptive(self) -> bool:
        """Whether the rule keeps a second moment v (FedAdam, FedYogi)."""
        return self.rule in ("fedadam", "fedyogi")

    @property
    def keeps_momentum(self) -> bool:
        """Whether m must travel: with β (β1) = 0 the step's m is the round's Δ itself."""
        return self.stateful and self.momentum > 0

    def state_values(self, params: int) -> int:
        """Values the state adds to an encrypted stream: x, m (when β > 0), √v (FedAdam, FedYogi), then t."""
        if not self.stateful:
            return 0
        return (1 + int(self.keeps_momentum) + int(self.adaptive)) * params + 1

    def describe(self) -> str:
        """One line for logs and summaries."""
        if self.rule == "fedavg":
            return "fedavg"
        if self.rule == "fedavgm":
            return f"fedavgm (η={self.learning_rate:g}, β={self.momentum:g})"
        return f"{self.rule} (η={self.learning_rate:g}, β1={self.momentum:g}, β2={self.beta2:g}, τ={self.tau:g})"


@dataclass
class ServerState:
    """What the step needs besides the round's mean: the model the round started from (``x``),
    the first moment ``m``, the second moment ``v`` (FedAdam/FedYogi) and the steps taken ``t``."""

    x: np.ndarray
    m: np.ndarray
    v: np.ndarray | None
    t: int = 0

    @classmethod
    def initial(cls, opt: ServerOptimizer, x: np.ndarray) -> ServerState:
        """The state before the first round: zero moments, no steps."""
        x = np.asarray(x, dtype=np.float64)
        return cls(x.copy(), np.zeros_like(x), np.zeros_like(x) if opt.adaptive else None)

    def to_stream(self, opt: ServerOptimizer) -> np.ndarray:
        """x, m (when β > 0), √v, t · T_SCALE as one float64 stream (empty for plain FedAvg)."""
        if not opt.stateful:
            return np.zeros(0)
        parts = [self.x, *([self.m] if opt.keeps_momentum else [])]
        if self.v is not None:
            parts.append(np.sqrt(self.v))
        return np.concatenate([*parts, np.array([float(self.t) * T_SCALE])])

    @classmethod
    def from_stream(cls, opt: ServerOptimizer, stream: np.ndarray, params: int) -> ServerState:
        """Inverse of ``to_stream``, from a decrypted (rounded) mean: t is rounded to an integer, a
        √v slot that came back slightly negative counts as 0, and an m that did not travel is 0 (β = 0
        never reads it)."""
        if stream.size != opt.state_values(params):
            raise ValueError(f"the {opt.rule} state holds {opt.state_values(params)} values, got {stream.size}")
        rows = iter(stream[:-1].reshape(-1, params))  # x, then m (β > 0), then √v (adaptive)
        x = next(rows).copy()
        m = next(rows).copy() if opt.keeps_momentum else np.zeros(params)
        v = np.square(np.maximum(next(rows), 0.0)) if opt.adaptive else None
        t = round(float(stream[-1]) / T_SCALE)
        if t < 0:
            raise ValueError(f"the server optimiser's step count is {t}: the aggregate is broken")
        return cls(x, m, v, t)


def server_step(opt: ServerOptimizer, state: ServerState, mean: np.ndarray) -> tuple[np.ndarray, ServerState]:
    """One server step from the round's (weighted) mean of site models: (new model, new state).

    Δ = mean − x. FedAvg: x' = mean. FedAvgM: m' = β·m + Δ, x' = x + η·m'. FedAdam:
    m' = β1·m + (1−β1)·Δ, v' = β2·v + (1−β2)·Δ², x' = x + η·√(1−β2^(t+1))/(1−β1^(t+1))·m'/(√v' + τ)
    with t the step's number (1 for the first, Flower's exponent). FedYogi: v' = v − (1−β2)·Δ²·sign(v − Δ²),
    x' = x + η·m'/(√v' + τ). All in float64."""
    mean = np.asarray(mean, dtype=np.float64)
    if mean.shape != state.x.shape:
        raise ValueError(f"the round's mean has {mean.size} values, the model {state.x.size}")
    t = state.t + 1
    if opt.rule == "fedavg":
        return mean.copy(), ServerState(mean.copy(), state.m, state.v, t)
    delta = mean - state.x
    if opt.rule == "fedavgm":
        m = opt.momentum * state.m + delta
        x = state.x + opt.learning_rate * m
        return x, ServerState(x.copy(), m, None, t)
    assert state.v is not None
    m = opt.momentum * state.m + (1.0 - opt.momentum) * delta
    sq = np.square(delta)
    if opt.rule == "fedadam":
        v = opt.beta2 * state.v + (1.0 - opt.beta2) * sq
        eta = opt.learning_rate * np.sqrt(1.0 - opt.beta2 ** (t + 1.0)) / (1.0 - opt.momentum ** (t + 1.0))
    else:
        v = state.v - (1.0 - opt.beta2) * sq * np.sign(state.v - sq)
        eta = opt.learning_rate
    x = state.x + eta * m / (np.sqrt(v) + opt.tau)
    return x, ServerState(x.copy(), m, v, t)


def decode_aggregate(opt: ServerOptimizer, mean: np.ndarray, params: int) -> tuple[np.ndarray, ServerState | None]:
    """A decrypted aggregate's weighted mean → (the model, the optimiser state after its step).

    The stream is the mean of the sites' models (``params`` values), then, for a stateful rule,
    the state they all started the round from; the step turns the two into the new model."""
    expected = params + opt.state_values(params)
    if mean.size != expected:
        raise ValueError(f"the aggregate holds {mean.size} values; a {params}-parameter model under {opt.rule} "
                         f"needs {expected}")
    if not opt.stateful:
        return np.asarray(mean, dtype=np.float64), None
    x, state = server_step(opt, ServerState.from_stream(opt, mean[params:], params), mean[:params])
    if not np.all(np.isfinite(x)):
        raise ValueError(f"the {opt.rule} step on this aggregate is not finite")
    return x, state
