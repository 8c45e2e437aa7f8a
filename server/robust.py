"""Robust aggregation of plaintext updates: what one poisoned site can do to the global model.

The reply checks (``server.checks``) bound each value (finite, |x| ≤ 1e6) and each site's
weight (its pre-flight declaration); they do not bound how far a site moves the model. A
scenario's ``robustness.rule`` does:

* ``norm-bound`` (Sun et al. 2019, "Can you really backdoor federated learning?"): each
  site's update, taken as its difference from the model the coordinator sent, is scaled down
  to L2 norm ``max_update_norm`` when longer, then FedAvg weights them as usual. One site then
  moves the average by at most ``weight share x max_update_norm``.
* ``trimmed-mean`` (Yin et al. 2018): per coordinate, the ``trim_fraction`` largest and
  smallest values across sites are dropped and the rest averaged (unweighted), so up to that
  fraction of sites cannot pull any coordinate outside the honest sites' range.

Both read every update, so neither works with CKKS aggregation (the scenario refuses the
combination). Both are post-processing of DP outputs: the sites' privacy guarantee is the same.
Flower's own ``FedTrimmedAvg``/``FedMedian`` strategies drive their own round loop; Veil's
coordinator owns its loop (checks, records, budget plan), so the rules are applied here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

Arrays = list[np.ndarray]
RuleName = Literal["none", "norm-bound", "trimmed-mean"]


@dataclass(frozen=True)
class RobustRule:
    """A scenario's ``robustness``: the rule and its one parameter."""

    rule: RuleName = "none"
    max_update_norm: float | None = None  # norm-bound
    trim_fraction: float = 0.1  # trimmed-mean

    def __post_init__(self) -> None:
        if self.rule == "norm-bound" and not (self.max_update_norm is not None and self.max_update_norm > 0
                                               and math.isfinite(self.max_update_norm)):
            raise ValueError("robustness.rule norm-bound needs a positive, finite max_update_norm")
        if not 0.0 <= self.trim_fraction < 0.5:
            raise ValueError(f"robustness.trim_fraction must be in [0, 0.5), got {self.trim_fraction}")


def update_norm(update: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
    """The L2 norm of ``update - reference`` over every array (float64)."""
    total = 0.0
    for u, r in zip(update, reference, strict=True):
        d = np.asarray(u, dtype=np.float64) - np.asarray(r, dtype=np.float64)
        total += float(np.dot(d.ravel(), d.ravel()))
    return math.sqrt(total)


def bound_norm(update: Sequence[np.ndarray], reference: Sequence[np.ndarray], max_norm: float
               ) -> tuple[Arrays, float]:
    """``reference + (update - reference)`` scaled to norm at most ``max_norm``, and the
    update's norm before scaling. Arrays keep their dtype."""
    if not (max_norm > 0 and math.isfinite(max_norm)):
        raise ValueError(f"max_norm must be positive and finite, got {max_norm}")
    norm = update_norm(update, reference)
    if norm <= max_norm:
        return [np.array(u, copy=True) for u in update], norm
    scale = max_norm / norm
    out = [(np.asarray(r, np.float64) + scale * (np.asarray(u, np.float64) - np.asarray(r, np.float64)))
           .astype(np.asarray(u).dtype) for u, r in zip(update, reference, strict=True)]
    return out, norm


def trimmed_count(sites: int, trim_fraction: float) -> int:
    """How many values are dropped at each end of a coordinate, for ``sites`` replies."""
    return math.floor(trim_fraction * sites)


def trimmed_mean(updates: Sequence[Sequence[np.ndarray]], trim_fraction: float) -> Arrays:
    """Per coordinate: drop the ``trim_fraction`` largest and smallest values, average the rest."""
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    if not updates:
        raise ValueError("no updates to aggregate")
    k = trimmed_count(len(updates), trim_fraction)
    out = []
    for layer in zip(*updates, strict=True):
        stacked = np.stack([np.asarray(a, np.float64) for a in layer])
        kept = np.sort(stacked, axis=0)[k:len(layer) - k]
        out.append(kept.mean(axis=0).astype(np.asarray(layer[0]).dtype))
    return out
