"""An empirical lower bound on ε from one training run (Steinke, Nasr & Jagielski, NeurIPS 2023).

The auditor picks m canaries and includes each one in the training data by an independent
fair coin it keeps secret. After training it scores every canary (higher = "looks trained
on"), guesses "in" for the k highest scores and "out" for the k lowest, and counts the
correct guesses. If the training were (ε, δ)-DP, the number of correct guesses among r is
stochastically dominated by Binomial(r, e^ε / (1 + e^ε)) up to a δ term (their Theorem 3.1
for δ = 0; Proposition 5.7 and the appendix algorithm for δ > 0). So a count of correct
guesses that would be improbable (p < 1 − confidence) under that binomial *refutes* the
claim at that ε: the largest such ε is a lower bound, valid with that confidence.

This is a smoke alarm, not a measurement: one-run audits of black-box models are loose,
so an honest run scores far below its claim, and only a gross failure (noise switched off,
sampling broken, ε off by a large factor) pushes the bound above the claim. Passing does
not prove the claimed ε; small accounting errors are invisible to it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[at least ``v`` of ``r`` guesses correct] under an (ε, δ)-DP training of ``m`` canaries.

    Steinke et al. (2023), appendix algorithm: β = P[Binomial(r, q) ≥ v] with
    q = e^ε / (1 + e^ε), plus 2·m·δ·α where α = max_i P[v − i ≤ Binomial(r, q) < v] / i.
    """
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if not epsilon >= 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and delta in [0, 1], got epsilon={epsilon}, delta={delta}")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    beta = float(stats.binom.sf(v - 1, r, q))
    if delta == 0 or v == 0:
        return min(beta, 1.0)
    i = np.arange(1, v + 1)
    window = stats.binom.sf(v - i - 1, r, q) - beta  # P[v - i <= Binomial(r, q) <= v - 1]
    alpha = float(np.max(window / i))
    return min(beta + alpha * delta * 2 * m, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, significance: float = 0.05) -> float:
    """The largest ε that ``v`` correct guesses out of ``r`` refute at ``significance``
    (0 when they refute none): the training is *not* (ε, δ)-DP for any smaller ε."""
    if not 0 < significance < 1:
        raise ValueError(f"significance must be in (0, 1), got {significance}")
    if p_value(m, r, v, 0.0, delta) >= significance:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < significance:  # p grows with ε: bracket, then bisect
        lo, hi = hi, hi * 2
        if hi > 1e3:
            return math.inf
    for _ in range(50):
        mid = (lo + hi) / 2
        if p_value(m, r, v, mid, delta) < significance:
            lo = mid
        else:
            hi = mid
    return lo


DEFAULT_KS = (25, 50, 100, 200, 400)


@dataclass(frozen=True)
class AuditOutcome:
    """What the one-run audit found, for one claim."""

    claimed_epsilon: float
    delta: float
    confidence: float
    canaries: int
    included: int
    guesses: int  # r: k "in" + k "out" for the k that gave the bound
    correct: int  # v
    lower_bound: float
    ceiling: float  # the largest bound this design could show (every guess correct, same correction)
    tried: tuple[int, ...]  # the k values tried (Bonferroni-corrected over all of them)

    @property
    def flagged(self) -> bool:
        """The lower bound contradicts the claim: the run leaked more than it says."""
        return self.lower_bound > self.claimed_epsilon


def audit_scores(scores: Sequence[float] | np.ndarray, included: Sequence[bool] | np.ndarray, *,
                 claimed_epsilon: float, delta: float, confidence: float = 0.95,
                 ks: Sequence[int] = DEFAULT_KS) -> AuditOutcome:
    """Guess top-k "in" and bottom-k "out" for each k in ``ks``; the best bound, with the
    significance split evenly over the k tried (Bonferroni), so choosing k costs confidence
    instead of inflating the bound."""
    s = np.asarray(scores, dtype=np.float64)
    inc = np.asarray(included, dtype=bool)
    if s.shape != inc.shape or s.ndim != 1 or len(s) < 2:
        raise ValueError("scores and included must be equal-length 1-d sequences of at least 2 canaries")
    if not np.all(np.isfinite(s)):
        raise ValueError("canary scores must be finite")
    m = len(s)
    usable = tuple(k for k in ks if 0 < 2 * k <= m)
    if not usable:
        raise ValueError(f"no guess count in {tuple(ks)} fits {m} canaries")
    significance = (1 - confidence) / len(usable)
    order = np.argsort(-s, kind="stable")
    best = (0.0, 2 * usable[0], int(inc[order[: usable[0]]].sum() + (~inc[order[-usable[0]:]]).sum()))
    for k in usable:
        v = int(inc[order[:k]].sum() + (~inc[order[-k:]]).sum())
        bound = epsilon_lower_bound(m, 2 * k, v, delta, significance)
        if bound > best[0]:
            best = (bound, 2 * k, v)
    ceiling = max(epsilon_lower_bound(m, 2 * k, 2 * k, delta, significance) for k in usable)
    return AuditOutcome(claimed_epsilon, delta, confidence, m, int(inc.sum()), best[1], best[2], best[0],
                        ceiling, usable)
