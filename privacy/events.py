"""What a site actually ran: one DP-SGD event per site per round.

Following dp_accounting's separation of *what happened* (``dp_event``) from *how it is
accounted*, Veil records the mechanism and derives ε from the history on demand.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class DpSgdEvent:
    """``steps`` Poisson-subsampled Gaussian steps with sampling rate ``sample_rate``.

    ``noise_multiplier`` is σ, the noise standard deviation relative to the per-sample
    clipping norm ``max_grad_norm`` (Abadi et al., 2016, "Deep Learning with Differential
    Privacy", Algorithm 1). The clipping norm does not change ε but is kept for audit.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float

    def __post_init__(self) -> None:
        if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(
                f"Noise multiplier must be a positive finite number. Found {self.noise_multiplier}."
            )
        if not 0.0 < self.sample_rate <= 1.0:
            raise ValueError(f"Sampling rate must be in (0, 1]. Found {self.sample_rate}.")
        if isinstance(self.steps, bool) or not isinstance(self.steps, numbers.Integral):
            # a fractional count would be truncated when events are grouped: ε under-reported
            raise ValueError(f"Steps must be a whole number. Found {self.steps!r}.")
        if self.steps < 0:
            raise ValueError(f"Steps must be non-negative. Found {self.steps}.")
        if not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            raise ValueError(f"Clipping norm must be a positive finite number. Found {self.max_grad_norm}.")


def default_delta(num_records: int) -> float:
    """δ = min(1e-5, 0.1/n): always below 1/n, so no single record is likely to leak whole."""
    if num_records < 1:
        raise ValueError(f"A data set needs at least one record. Found {num_records}.")
    return min(1e-5, 0.1 / num_records)


def remaining_budget(cap: float | None, spent: float | None) -> float | None:
    """ε left under a lifetime ``cap`` after ``spent`` (never negative); None without a cap or a spend.

    The one definition behind every "remaining" Veil shows: the ledger report, ``veil budget``
    and the run summary.
    """
    if cap is None or spent is None:
        return None
    return max(0.0, cap - spent)
