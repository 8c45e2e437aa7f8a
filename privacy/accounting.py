"""ε from a history of DP-SGD events, with a library accountant (never a hand formula).

* ``pld``: dp_accounting's privacy-loss-distribution accountant (tight; the default).
* ``rdp``: dp_accounting's Rényi-DP accountant (7-12% looser, fast).
* ``prv``: Opacus's PRV accountant (Gopi et al., 2021, "Numerical Composition of
  Differential Privacy").

Each distinct (σ, q) pair in the history becomes one self-composed Poisson-subsampled
Gaussian event, so a history of many equal rounds costs one composition. Results are cached
on the grouped history, which is hashable.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from functools import lru_cache
from importlib.metadata import version
from typing import Literal, get_args

from privacy.events import DpSgdEvent

AccountantName = Literal["pld", "rdp", "prv"]
ACCOUNTANTS: tuple[str, ...] = get_args(AccountantName)

# dp_accounting's PLD is pessimistic: rounding privacy losses up to this grid can only
# over-report ε. At 1e-3 it is 10x faster than at 1e-4 and, measured here, over-reports by
# under 1e-4 for a few hundred steps and by ~0.013 for 10,000 steps (0.960 vs 0.947).
PLD_DISCRETIZATION = 1e-3

_History = tuple[tuple[float, float, int], ...]


def accountant_version(name: AccountantName) -> str:
    """Library and version behind an accountant, for the record (e.g. ``dp-accounting 0.6.0``)."""
    lib = "opacus" if name == "prv" else "dp-accounting"
    return f"{lib} {version(lib)}"


def group_events(events: Iterable[DpSgdEvent]) -> _History:
    """Merge events with equal (σ, q) into one entry with the summed step count."""
    counts: Counter[tuple[float, float]] = Counter()
    for ev in events:
        counts[(ev.noise_multiplier, ev.sample_rate)] += ev.steps
    return tuple(sorted((s, q, n) for (s, q), n in counts.items() if n > 0))


def epsilon(
    events: Iterable[DpSgdEvent],
    delta: float,
    accountant: AccountantName = "pld",
    pld_discretization: float = PLD_DISCRETIZATION,
) -> float:
    """ε at ``delta`` for the composition of all ``events``; 0.0 for an empty history.

    ``pld_discretization`` only matters for ``pld``: a coarser grid is faster and, the PLD
    accountant being pessimistic, still an upper bound on the true ε.
    """
    if not 0.0 < delta < 1.0:
        raise ValueError(f"Delta must be in (0, 1). Found {delta}.")
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"Unknown accountant {accountant!r}; choose one of {ACCOUNTANTS}.")
    history = group_events(events)
    if not history:
        return 0.0
    return _epsilon_cached(history, delta, accountant, pld_discretization)


@lru_cache(maxsize=4096)
def _epsilon_cached(
    history: _History, delta: float, accountant: AccountantName, grid: float
) -> float:
    if accountant == "prv":
        return _epsilon_prv(history, delta)
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant

    acc: dp_accounting.PrivacyAccountant
    if accountant == "pld":
        acc = pld_privacy_accountant.PLDAccountant(
            value_discretization_interval=grid
        )
    else:
        acc = rdp_privacy_accountant.RdpAccountant()
    event = dp_accounting.ComposedDpEvent(
        [
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), n
            )
            for sigma, q, n in history
        ]
    )
    acc.compose(event)
    eps = float(acc.get_epsilon(delta))
    return eps if math.isfinite(eps) else math.inf


def _epsilon_prv(history: _History, delta: float) -> float:
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    acc.history = [(sigma, q, n) for sigma, q, n in history]
    return float(acc.get_epsilon(delta=delta))
