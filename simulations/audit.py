"""``veil audit``: train one simulated site with canaries and test its claimed ε empirically.

The site's own DP-SGD code (``client.training.train_dp_sgd``, with noise and Poisson
sampling from OS entropy) trains an MLP on real digits plus canaries, σ calibrated so the
whole training is (ε, δ)-DP for the claimed ε by the site's accountant. Each canary joins
the training data by a secret fair coin (drawn from OS entropy); afterwards every canary is
scored by the model's log-likelihood of its label, and ``privacy.audit`` turns the guesses
into a lower bound on ε (Steinke, Nasr & Jagielski 2023).

Canaries are input-space "poison" records chosen to be easy to detect: each lights up 20
random pixels of the 4-pixel frame that real MNIST digits leave black, and carries a
random label, so one canary's influence on the model barely overlaps the data's or another
canary's. Without noise the model memorises the included ones; with honest noise it cannot.

``disable_noise`` runs the same training with the noise switched off (σ = 1e-9: Opacus's code
path, no noise to speak of) while still claiming the calibrated ε: the deliberately broken
run the alarm must catch. The site code has no such switch; the audit passes a tiny σ.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import TensorDataset

from client.data import load_mnist_5k
from client.training import poisson_plan, train_dp_sgd
from privacy import AccountantName, calibrate_noise_multiplier
from privacy.audit import AuditOutcome, audit_scores
from privacy.randomness import RoundRandomness
from veil.errors import ScenarioError
from veil.models import build_model

FRAME = 4  # border pixels that MNIST digits leave empty
CANARY_PIXELS = 20
NO_NOISE = 1e-9  # σ of the deliberately broken run


@dataclass(frozen=True)
class AuditSetup:
    """What ``veil audit`` trains and claims: ε at δ, canary and real-record counts, DP-SGD knobs, confidence."""

    claimed_epsilon: float = 2.0
    delta: float = 1e-5
    canaries: int = 2000
    records: int = 1000  # real digits the site trains on besides the canaries
    epochs: int = 20
    batch_size: int = 64
    learning_rate: float = 1.0
    max_grad_norm: float = 1.0
    accountant: AccountantName = "pld"
    confidence: float = 0.95
    disable_noise: bool = False  # the broken run the audit must flag

    def check(self) -> None:
        """Raise ``ScenarioError`` listing every setting out of range (ε in (0, 50], δ < 0.01, ...)."""
        problems = []
        if not 0 < self.claimed_epsilon <= 50:
            problems.append(f"--epsilon must be in (0, 50], got {self.claimed_epsilon}")
        if not 0 < self.delta < 1e-2:
            problems.append(f"--delta must be in (0, 0.01), got {self.delta}")
        if not 100 <= self.canaries <= 20_000:
            problems.append(f"--canaries must be in [100, 20000], got {self.canaries}")
        if not 100 <= self.records <= 4000:
            problems.append(f"--records must be in [100, 4000] (digits of the built-in 5,000), got {self.records}")
        if not 1 <= self.epochs <= 200:
            problems.append(f"--epochs must be in [1, 200], got {self.epochs}")
        if not 0.5 <= self.confidence < 1:
            problems.append(f"--confidence must be in [0.5, 1), got {self.confidence}")
        if problems:
            raise ScenarioError("; ".join(problems))


@dataclass(frozen=True)
class AuditRun:
    """One audit: its setup, the empirical outcome, the mechanism claimed (σ, q, steps), wall seconds."""

    setup: AuditSetup
    outcome: AuditOutcome
    noise_multiplier: float  # what was claimed (and run, unless noise was disabled)
    sample_rate: float
    steps: int
    seconds: float


def make_canaries(count: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` 1x28x28 images with ``CANARY_PIXELS`` random frame pixels lit, random labels."""
    frame = np.zeros((28, 28), dtype=bool)
    frame[:FRAME, :] = frame[-FRAME:, :] = frame[:, :FRAME] = frame[:, -FRAME:] = True
    pixels = np.flatnonzero(frame.ravel())
    x = np.zeros((count, 28 * 28), dtype=np.float32)
    for i in range(count):
        x[i, rng.choice(pixels, CANARY_PIXELS, replace=False)] = 1.0
    return torch.from_numpy(x.reshape(count, 1, 28, 28)), torch.from_numpy(rng.integers(0, 10, count))


def audit_ceiling(setup: AuditSetup) -> float:
    """The largest lower bound the audit could show for ``setup`` (every guess correct)."""
    from privacy.audit import DEFAULT_KS, epsilon_lower_bound

    usable = [k for k in DEFAULT_KS if 2 * k <= setup.canaries]
    significance = (1 - setup.confidence) / len(usable)
    return max(epsilon_lower_bound(setup.canaries, 2 * k, 2 * k, setup.delta, significance) for k in usable)


def run_audit(setup: AuditSetup) -> AuditRun:
    """Train once with canaries and return the audit of ``setup.claimed_epsilon``."""
    setup.check()
    ceiling = audit_ceiling(setup)
    if setup.claimed_epsilon >= ceiling:
        raise ScenarioError(f"with {setup.canaries} canaries this audit cannot show a lower bound above "
                            f"{ceiling:.2f}, so it cannot refute ε = {setup.claimed_epsilon:g}; lower --epsilon "
                            "or raise --canaries")
    start = time.perf_counter()
    rng = np.random.default_rng(secrets.randbits(128))  # the auditor's secret coins and canaries
    digits = load_mnist_5k()
    pick = rng.permutation(len(digits))[: setup.records]
    x = torch.from_numpy(digits.features[pick].copy())
    y = torch.from_numpy(digits.labels[pick].astype(np.int64))
    cx, cy = make_canaries(setup.canaries, rng)
    included = rng.random(setup.canaries) < 0.5
    keep = torch.from_numpy(included)
    data = TensorDataset(torch.cat([x, cx[keep]]), torch.cat([y, cy[keep]]))
    q, steps = poisson_plan(len(data), setup.batch_size, setup.epochs)
    sigma = calibrate_noise_multiplier(setup.claimed_epsilon, setup.delta, q, steps, setup.accountant)
    model = build_model("mlp", seed=int(rng.integers(2**31)))
    train_dp_sgd(model, data, noise_multiplier=NO_NOISE if setup.disable_noise else sigma,
                 max_grad_norm=setup.max_grad_norm, batch_size=setup.batch_size, local_epochs=setup.epochs,
                 learning_rate=setup.learning_rate, momentum=0.0, device=torch.device("cpu"),
                 randomness=RoundRandomness.from_os())
    model.eval()
    with torch.no_grad():
        scores = -torch.nn.functional.cross_entropy(model(cx), cy, reduction="none").numpy()
    outcome = audit_scores(scores, included, claimed_epsilon=setup.claimed_epsilon, delta=setup.delta,
                           confidence=setup.confidence)
    return AuditRun(setup, outcome, sigma, q, steps, time.perf_counter() - start)
