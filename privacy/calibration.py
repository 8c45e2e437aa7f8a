"""Noise calibration: the smallest σ (to a tolerance) whose ε does not exceed a target.

Bisection on σ with the *same* accountant that later reports ε, returning the upper end of
the final bracket, so the calibrated mechanism never overshoots the target by construction
(ε is non-increasing in σ for the subsampled Gaussian). The search may run on a coarser PLD
grid than the reporting one; the result is then checked on the reporting grid and nudged up
until it holds there too.
"""

from __future__ import annotations

from functools import lru_cache

from privacy.accounting import PLD_DISCRETIZATION, AccountantName, epsilon
from privacy.events import DpSgdEvent

_SIGMA_MAX = 1e4
_SEARCH_GRID = 1e-3
SIGMA_MIN = 0.3
"""The least noise calibration returns (and a scenario may ask for): below it DP-SGD's ε runs into the
hundreds for any useful run, and the PLD accountant slows sharply (σ = 0.1, 10,000 full-batch steps: 7 s
per ε; σ = 0.01: minutes). A target that less noise would meet gets exactly this much."""


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: AccountantName = "pld",
    rel_tol: float = 1e-2,
) -> float:
    """σ such that ``epsilon([DpSgdEvent(σ, sample_rate, steps)], delta) <= target_epsilon``."""
    if not target_epsilon > 0:
        raise ValueError(f"Target epsilon must be positive. Found {target_epsilon}.")
    if steps < 1:
        raise ValueError(f"Calibration needs at least one step. Found {steps}.")
    return _calibrate(target_epsilon, delta, sample_rate, steps, accountant, rel_tol)


@lru_cache(maxsize=1024)
def _calibrate(
    target: float, delta: float, q: float, steps: int, accountant: AccountantName, rel_tol: float
) -> float:
    def eps(sigma: float, grid: float = _SEARCH_GRID) -> float:
        return epsilon([DpSgdEvent(sigma, q, steps, 1.0)], delta, accountant, grid)

    hi = 1.0
    while eps(hi) > target:
        hi *= 2.0
        if hi > _SIGMA_MAX:
            raise ValueError(
                f"No noise multiplier up to {_SIGMA_MAX:g} reaches ε={target} at δ={delta} "
                f"with q={q}, {steps} steps; raise the target or lower the steps."
            )
    lo = hi / 2.0
    while lo >= SIGMA_MIN and eps(lo) <= target:
        hi, lo = lo, lo / 2.0
    if lo < SIGMA_MIN:  # never search below the floor: the target gets at least SIGMA_MIN
        lo = SIGMA_MIN
        if eps(lo) <= target:
            hi = lo
    # invariant: eps(hi) <= target < eps(lo), or lo == hi == SIGMA_MIN
    while (hi - lo) > rel_tol * hi:
        mid = 0.5 * (lo + hi)
        if eps(mid) <= target:
            hi = mid
        else:
            lo = mid
    while eps(hi, PLD_DISCRETIZATION) > target:  # only PLD's grid can differ here
        hi *= 1.0 + rel_tol
    return hi
