"""The one-run privacy audit: the bound follows the paper, is sound at its stated confidence,
flags a training whose noise is off, and passes an honest one."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from typer.testing import CliRunner

from privacy.audit import audit_scores, epsilon_lower_bound, p_value


def _paper_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Steinke, Nasr & Jagielski (2023), appendix: the same quantity, computed term by term."""
    q = 1 / (1 + math.exp(-eps))
    beta = stats.binom.sf(v - 1, r, q)
    alpha, total = 0.0, 0.0
    for i in range(1, v + 1):
        total += stats.binom.pmf(v - i, r, q)
        alpha = max(alpha, total / i)
    return min(beta + alpha * delta * 2 * m, 1.0)


@pytest.mark.parametrize(("m", "r", "v", "eps", "delta"), [
    (1000, 100, 70, 0.5, 1e-5), (1000, 600, 600, 4.0, 1e-5), (200, 50, 50, 2.0, 0.0),
    (5000, 400, 300, 1.0, 1e-6), (1000, 10, 3, 0.0, 1e-5),
])
def test_p_value_matches_the_papers_algorithm(m: int, r: int, v: int, eps: float, delta: float) -> None:
    assert p_value(m, r, v, eps, delta) == pytest.approx(_paper_p_value(m, r, v, eps, delta), rel=1e-9, abs=1e-15)


def test_pure_dp_bound_is_the_binomial_tail_and_grows_with_correct_guesses() -> None:
    # δ = 0: the largest ε with P[Binomial(r, e^ε/(1+e^ε)) ≥ v] < p
    eps = epsilon_lower_bound(1000, 100, 90, 0.0, 0.05)
    q = 1 / (1 + math.exp(-eps))
    assert stats.binom.sf(89, 100, q) == pytest.approx(0.05, rel=1e-6)
    bounds = [epsilon_lower_bound(1000, 200, v, 1e-5) for v in (100, 120, 150, 180, 200)]
    assert bounds[0] == 0.0 and bounds == sorted(bounds) and bounds[-1] > 3
    # the paper's worked example: 600 of 600 guesses right among 1,000 canaries, 95%, δ = 1e-5
    example = epsilon_lower_bound(1000, 600, 600, 1e-5)
    assert p_value(1000, 600, 600, example, 1e-5) == pytest.approx(0.05, rel=1e-4)


@pytest.mark.slow  # 300 trials of the bound: ~10 s
def test_the_bound_is_sound_for_an_exactly_eps_dp_mechanism() -> None:
    """Randomized response at ε0 per canary is exactly ε0-DP: the 95% bound may exceed ε0 in
    at most ~5% of trials (it is conservative, so far fewer)."""
    rng = np.random.default_rng(2023)
    eps0, m, trials = 1.0, 1000, 300
    q0 = 1 / (1 + math.exp(-eps0))
    over = sum(epsilon_lower_bound(m, m, int(rng.binomial(m, q0)), 1e-5) > eps0 for _ in range(trials))
    assert over / trials <= 0.08


def test_scores_separate_or_not() -> None:
    rng = np.random.default_rng(0)
    included = rng.random(2000) < 0.5
    perfect = audit_scores(included.astype(float) + rng.normal(0, 0.01, 2000), included, claimed_epsilon=2.0,
                           delta=1e-5)
    assert perfect.flagged and perfect.correct == perfect.guesses
    assert perfect.lower_bound == pytest.approx(perfect.ceiling)
    noise = audit_scores(rng.normal(size=2000), included, claimed_epsilon=2.0, delta=1e-5)
    assert not noise.flagged and noise.lower_bound < 1.0
    with pytest.raises(ValueError, match="finite"):
        audit_scores([0.0, float("nan")], [True, False], claimed_epsilon=1.0, delta=1e-5)


@pytest.mark.slow  # two audited trainings: minutes
def test_veil_audit_flags_training_without_noise_and_passes_honest_training() -> None:
    from veil.cli.main import app

    broken = CliRunner().invoke(app, ["audit", "--disable-noise"])
    assert broken.exit_code == 13, broken.output
    assert "FLAGGED" in broken.output and "NOISE DISABLED" in broken.output
    assert "catches gross failures" in broken.output and "not small accounting errors" in broken.output
    honest = CliRunner().invoke(app, ["audit", "--format", "json"])
    assert honest.exit_code == 0, honest.output
    import json

    out = json.loads(honest.output)
    assert not out["flagged"] and out["lower_bound"] < out["claimed_epsilon"] == 2.0
    refused = CliRunner().invoke(app, ["audit", "--epsilon", "9"])
    assert refused.exit_code == 2 and "cannot refute" in refused.output
