"""Noise calibration: the smallest σ (to a tolerance) whose ε does not exceed a target.

Bisection on σ with the *same* accountant that later reports ε, returning the upper end of
the final bracket, so the calibrated mechanism never overshoots the target by construction
(ε is non-increasing in σ for the subsampled Gaussian).

For PLD the search runs on a grid 10x coarser than the reporting one (``SEARCH_GRID``: each
probe builds a new one-step PLD, ~8x cheaper there), then the bracket is carried over to the
reporting grid: its ends are re-checked there and, if the coarse grid misjudged either one,
the search goes on on the reporting grid. What is returned always satisfies, *on the
reporting grid*: ε(σ) ≤ target, and ε(lo) > target for some lo ≥ σ·(1 − rel_tol) (or σ is
``SIGMA_MIN``). For a few hundred steps this costs two PLDs on the reporting grid; for
thousands of steps, where the coarse grid over-reports more, a few more (each cheap there).

A calibration is also kept on disk (``privacy.accounting_cache``). A stored σ is used only
after one ε on the reporting grid shows it meets the target, and one on the search grid shows
σ·(1 − rel_tol) does not: a damaged or forged entry can cost a recomputation, never an
overshoot (nor a wastefully large σ).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache

from privacy import accounting_cache
from privacy.accounting import (
    PLD_DISCRETIZATION,
    AccountantName,
    _epsilon_computed,
    accountant_version,
    check_accountant,
)
from privacy.events import DpSgdEvent

_SIGMA_MAX = 1e4
SEARCH_GRID = 1e-2
"""PLD grid of the coarse search (the reporting grid is ``accounting.PLD_DISCRETIZATION``)."""
SIGMA_MIN = 0.3
"""The least noise calibration returns (and a scenario may ask for): below it DP-SGD's ε runs into the
hundreds for any useful run, and the PLD accountant slows sharply (σ = 0.1, 10,000 full-batch steps: 7 s
per ε; σ = 0.01: minutes). A target that less noise would meet gets exactly this much."""
ALGORITHM = "coarse-then-reporting-grid-1"
"""Part of a stored calibration's key: a change to the search (or its grids) starts afresh."""


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
    if not 0.0 < delta < 1.0:
        raise ValueError(f"Delta must be in (0, 1). Found {delta}.")
    if not 0.0 < rel_tol < 0.5:
        raise ValueError(f"rel_tol must be in (0, 0.5). Found {rel_tol}.")
    check_accountant(accountant)
    DpSgdEvent(1.0, sample_rate, steps, 1.0)  # the sample rate and steps, checked like any event's
    return _calibrate(float(target_epsilon), float(delta), float(sample_rate), int(steps), accountant,
                      float(rel_tol))


@lru_cache(maxsize=1024)
def _calibrate(
    target: float, delta: float, q: float, steps: int, accountant: AccountantName, rel_tol: float
) -> float:
    key = {"target": target, "delta": delta, "q": q, "steps": steps, "accountant": accountant,
           "version": accountant_version(accountant), "rel_tol": rel_tol, "algorithm": ALGORITHM,
           "grids": [SEARCH_GRID, PLD_DISCRETIZATION] if accountant == "pld" else []}
    stored = accounting_cache.load("sigma", key)
    if stored is not None and _still_holds(stored, target, delta, q, steps, accountant, rel_tol):
        return stored
    sigma = _search(target, delta, q, steps, accountant, rel_tol)
    accounting_cache.save("sigma", key, sigma)
    return sigma


def _eps_fn(delta: float, q: float, steps: int, accountant: AccountantName, grid: float
            ) -> Callable[[float], float]:
    grid = grid if accountant == "pld" else 0.0  # only PLD has a grid: the others reuse one result

    def eps(sigma: float) -> float:
        return _epsilon_computed(((sigma, q, steps),), delta, accountant, grid)

    return eps


def _still_holds(sigma: float, target: float, delta: float, q: float, steps: int,
                 accountant: AccountantName, rel_tol: float) -> bool:
    """A stored σ meets the target on the reporting grid and is not wastefully large."""
    if not (math.isfinite(sigma) and SIGMA_MIN <= sigma <= _SIGMA_MAX):
        return False
    if not _eps_fn(delta, q, steps, accountant, PLD_DISCRETIZATION)(sigma) <= target:
        return False
    # the search returns hi with ε(lo) > target for lo ≥ hi·(1 − rel_tol), on the reporting grid,
    # which the search grid (coarser, so pessimistic) can only confirm
    return sigma == SIGMA_MIN or _eps_fn(delta, q, steps, accountant, SEARCH_GRID)(sigma * (1 - rel_tol)) > target


def _search(target: float, delta: float, q: float, steps: int, accountant: AccountantName,
            rel_tol: float) -> float:
    coarse = _eps_fn(delta, q, steps, accountant, SEARCH_GRID)
    fine = _eps_fn(delta, q, steps, accountant, PLD_DISCRETIZATION)
    hi = 1.0
    while coarse(hi) > target:
        hi *= 2.0
        if hi > _SIGMA_MAX:
            raise ValueError(
                f"No noise multiplier up to {_SIGMA_MAX:g} reaches ε={target} at δ={delta} "
                f"with q={q}, {steps} steps; raise the target or lower the steps."
            )
    lo = hi / 2.0
    while lo >= SIGMA_MIN and coarse(lo) <= target:
        hi, lo = lo, lo / 2.0
    lo = max(lo, SIGMA_MIN)  # never search below the floor: the target gets at least SIGMA_MIN
    lo, hi = _bisect(coarse, target, lo, hi, rel_tol)
    if accountant != "pld":
        return hi  # one grid: the bracket is final
    return _on_reporting_grid(fine, target, lo, hi, rel_tol)


def _bisect(eps: Callable[[float], float], target: float, lo: float, hi: float, rel_tol: float
            ) -> tuple[float, float]:
    """Shrink [lo, hi] (ε(hi) ≤ target; ε(lo) > target unless lo is the floor) to rel_tol·hi."""
    if lo == SIGMA_MIN and eps(lo) <= target:
        return lo, lo
    while (hi - lo) > rel_tol * hi:
        mid = 0.5 * (lo + hi)
        if eps(mid) <= target:
            hi = mid
        else:
            lo = mid
    return lo, hi


def _on_reporting_grid(fine: Callable[[float], float], target: float, lo: float, hi: float,
                       rel_tol: float) -> float:
    """Carry a search-grid bracket over to the reporting grid; the σ returned holds there."""
    if fine(hi) > target:  # the search grid was optimistic at hi (rare): step up until it holds
        while fine(hi) > target:
            lo, hi = hi, hi * (1.0 + rel_tol)
            if hi > _SIGMA_MAX:
                raise ValueError(f"No noise multiplier up to {_SIGMA_MAX:g} reaches ε={target}.")
        return hi  # ε(lo) > target and lo = hi / (1 + rel_tol)
    if lo == hi:  # the floor meets the target on the search grid, and on the reporting grid
        return hi
    width = hi - lo
    while fine(lo) <= target:  # the search grid was pessimistic at lo: less noise will do
        if lo == SIGMA_MIN:
            return lo
        width *= 2.0
        hi, lo = lo, max(SIGMA_MIN, lo - width)
    return _bisect(fine, target, lo, hi, rel_tol)[1]
